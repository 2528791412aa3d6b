"""Decoding image files into pixel arrays: the one reader of the data pipeline, `vosr_jax.sample`,
`vosr_jax.evaluate` and the demo.

`decode(source)` takes a path, encoded bytes or an array and returns `Decoded`: the RGB and the
alpha as integer levels, 8-bit or 16-bit as the source holds them, and the source's mode. The rules:
  * EXIF orientation is applied (the image as a viewer shows it). Arrays are taken as they are.
  * Grey, palette, CMYK and the other Pillow modes become RGB by Pillow's `Image.convert`; alpha
    (RGBA, LA, PA, or a palette or tRNS transparency) is kept apart.
  * 16-bit PNGs (grey or colour, with or without alpha) keep their 16 bits: OpenCV decodes them,
    since Pillow keeps only the high byte of 16-bit colour. Pillow's integer modes ('I;16', and
    'I' clipped to [0, 65535]) are 16-bit grey; floating-point images (mode 'F') are taken as
    [0, 255] and rounded to 8 bits.
`Decoded.rgb8()` is the 8-bit RGB that the uint8 consumers take: 16-bit levels are rounded to the
nearest 8-bit level (v / 257), so a 16-bit image and its 8-bit rounding read alike.
`Decoded.unit()` is float32 in [0, 1] (v / 255 or v / 65535), every bit kept.
"""
import io
import os
from typing import NamedTuple, Optional

import cv2
import numpy as np
from PIL import ExifTags, Image

# EXIF orientation -> the array operation that shows the image upright (Pillow's
# `ImageOps.exif_transpose`, done on arrays so that 16-bit data is turned the same way).
_ORIENTATIONS = {
    2: lambda x: x[:, ::-1],                       # FLIP_LEFT_RIGHT
    3: lambda x: x[::-1, ::-1],                    # ROTATE_180
    4: lambda x: x[::-1],                          # FLIP_TOP_BOTTOM
    5: lambda x: x.swapaxes(0, 1),                 # TRANSPOSE
    6: lambda x: np.rot90(x, -1),                  # ROTATE_270 (90 degrees clockwise)
    7: lambda x: x[::-1, ::-1].swapaxes(0, 1),     # TRANSVERSE
    8: lambda x: np.rot90(x, 1),                   # ROTATE_90 (counter-clockwise)
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}  # IHDR colour type -> Pillow's name
_ARRAY_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


class Decoded(NamedTuple):
  """A decoded image.

  Attributes:
    rgb: (H, W, 3) uint8 or uint16 levels.
    alpha: (H, W) levels of the same dtype, or None when the source has no alpha.
    mode: the source's mode before conversion to RGB: Pillow's name ('RGB', 'L', 'RGBA', 'P',
      'I;16', ...), with ';16' added for 16-bit PNGs and arrays ('RGB;16', 'LA;16', ...). 'RGB'
      means an 8-bit RGB source, taken without conversion.
  """
  rgb: np.ndarray
  alpha: Optional[np.ndarray]
  mode: str

  def rgb8(self):
    """(H, W, 3) uint8: the RGB, 16-bit levels rounded to the nearest 8-bit level."""
    if self.rgb.dtype == np.uint8:
      return self.rgb
    # round(v / 257) in integers; v / 257 is never halfway between two integers.
    return ((self.rgb.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)

  def unit(self):
    """(rgb (H, W, 3), alpha (H, W) or None) as float32 in [0, 1]."""
    top = float(np.iinfo(self.rgb.dtype).max)
    return (self.rgb.astype(np.float32) / top,
            None if self.alpha is None else self.alpha.astype(np.float32) / top)


def _split(x, mode):
  """(H, W), (H, W, 1|2|3|4) levels -> `Decoded` (grey replicated to RGB, alpha apart)."""
  if x.ndim == 2:
    x = x[..., None]
  colour = x[..., :3] if x.shape[2] >= 3 else np.repeat(x[..., :1], 3, axis=2)
  alpha = x[..., -1] if x.shape[2] in (2, 4) else None
  return Decoded(np.ascontiguousarray(colour), alpha, mode)


def _png_bit_depth(data):
  return data[24] if data[:8] == _PNG_SIGNATURE and len(data) > 25 else 8


def _sixteen_bit_png(data):
  x = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if x is None:
    raise ValueError("cannot decode this 16-bit PNG")
  # OpenCV gives grey (H, W), BGR or BGRA (grey with alpha comes replicated to BGRA).
  if x.ndim == 3:
    x = x[..., [2, 1, 0, 3][:x.shape[2]]]
  return _split(x, _PNG_COLOUR_TYPES.get(data[25], "?") + ";16")


def _pillow(im):
  mode = im.mode
  if mode == "I" or mode.startswith("I;16"):
    return _split(np.clip(np.asarray(im), 0, 65535).astype(np.uint16), mode)
  if mode == "F":
    return _split(np.clip(np.round(np.asarray(im, np.float64)), 0, 255).astype(np.uint8), mode)
  target = "RGBA" if mode in ("RGBA", "LA", "PA") or "transparency" in im.info else "RGB"
  return _split(np.asarray(im if mode == target else im.convert(target)), mode)


def _from_array(x):
  x = x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x
  if (x.dtype not in (np.uint8, np.uint16) or x.ndim not in (2, 3) or min(x.shape[:2]) == 0
      or (x.ndim == 3 and x.shape[2] not in (2, 3, 4))):
    raise TypeError(f"image array of shape {x.shape} and dtype {x.dtype}; expected uint8 or "
                    "uint16 (H, W[, 1|2|3|4])")
  mode = _ARRAY_MODES[1 if x.ndim == 2 else x.shape[2]]
  return _split(x, mode + (";16" if x.dtype == np.uint16 else ""))


def decode(source):
  """Decodes an image (rules in the module docstring).

  Args:
    source: a file path, encoded image bytes, or a uint8/uint16 array (H, W[, 1|2|3|4]) whose
      channels are grey, grey + alpha, RGB or RGBA.

  Returns:
    `Decoded`.
  Raises:
    What Pillow raises for data it cannot decode (OSError, including UnidentifiedImageError,
    ValueError, ...), ValueError for an undecodable 16-bit PNG, TypeError for an array of another
    shape or dtype.
  """
  if isinstance(source, np.ndarray):
    return _from_array(source)
  if isinstance(source, (str, os.PathLike)):
    with open(source, "rb") as f:
      source = f.read()
  with Image.open(io.BytesIO(source)) as im:
    im.load()  # Decode now: truncated or corrupt files fail here.
    orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    decoded = _sixteen_bit_png(source) if _png_bit_depth(source) == 16 else _pillow(im)
  turn = _ORIENTATIONS.get(orientation)
  if turn is None:
    return decoded
  return Decoded(np.ascontiguousarray(turn(decoded.rgb)),
                 None if decoded.alpha is None else np.ascontiguousarray(turn(decoded.alpha)),
                 decoded.mode)
