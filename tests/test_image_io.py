"""`vosr_jax.data.image_io`: the one image reader, against Pillow/NumPy expectations, and its use by
`sample`, `evaluate` and the data pipeline."""
import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps, UnidentifiedImageError

from vosr_jax import color_fix, evaluate, sample
from vosr_jax.data import image_io

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 9, 3), np.uint8)
ALPHA = RNG.integers(0, 256, (6, 9), np.uint8)
DEEP = RNG.integers(0, 65536, (6, 9, 4), np.uint16)


def _encoded(image, fmt="PNG", **kw):
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _png16(x, exif=None):
  """A 16-bit PNG of (H, W, 1|2|3|4) levels written by hand (grey, grey + alpha, RGB, RGBA), with
  an optional eXIf chunk: Pillow cannot write 16-bit colour and OpenCV no grey + alpha."""
  h, w, c = x.shape

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  rows = b"".join(b"\x00" + x[i].astype(">u2").tobytes() for i in range(h))
  header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
  extra = chunk(b"eXIf", exif) if exif else b""
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra
          + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _round8(levels):
  return np.round(levels / 257.0).astype(np.uint8)


def _orientation(value):
  exif = Image.Exif()
  exif[0x0112] = value
  return exif


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "JPEG"])
def test_eight_bit_rgb_is_pillows(fmt):
  data = _encoded(Image.fromarray(RGB), fmt)
  got = image_io.decode(data)
  want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  np.testing.assert_array_equal(got.rgb, want)
  assert got.alpha is None and got.mode == "RGB" and got.rgb8() is got.rgb
  rgb, alpha = got.unit()
  assert rgb.dtype == np.float32 and alpha is None
  np.testing.assert_array_equal(rgb, want.astype(np.float32) / 255.0)


def test_alpha_grey_and_palette():
  rgba = image_io.decode(_encoded(Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA")))
  np.testing.assert_array_equal(rgba.rgb, RGB)
  np.testing.assert_array_equal(rgba.alpha, ALPHA)
  assert rgba.mode == "RGBA"
  np.testing.assert_array_equal(rgba.unit()[1], ALPHA / np.float32(255.0))
  grey = image_io.decode(_encoded(Image.fromarray(RGB[..., 0], "L")))
  np.testing.assert_array_equal(grey.rgb, np.repeat(RGB[..., :1], 3, axis=2))
  assert grey.alpha is None and grey.mode == "L"
  la = image_io.decode(_encoded(Image.fromarray(np.dstack([RGB[..., 0], ALPHA]), "LA")))
  np.testing.assert_array_equal(la.rgb, np.repeat(RGB[..., :1], 3, axis=2))
  np.testing.assert_array_equal(la.alpha, ALPHA)
  palette = Image.fromarray(RGB).convert("P")
  data = _encoded(palette, transparency=3)
  got = image_io.decode(data)
  assert got.mode == "P"
  np.testing.assert_array_equal(got.rgb, np.asarray(palette.convert("RGB")))
  np.testing.assert_array_equal(got.alpha, np.where(np.asarray(palette) == 3, 0, 255))


@pytest.mark.parametrize("channels, mode", [(1, "L;16"), (2, "LA;16"), (3, "RGB;16"),
                                            (4, "RGBA;16")])
def test_sixteen_bit_png_keeps_sixteen_bits_and_rounds_to_eight(channels, mode):
  x = DEEP[..., :channels]
  got = image_io.decode(_png16(x))
  colour = x[..., :3] if channels >= 3 else np.repeat(x[..., :1], 3, axis=2)
  assert got.mode == mode and got.rgb.dtype == np.uint16
  np.testing.assert_array_equal(got.rgb, colour)
  if channels in (2, 4):
    np.testing.assert_array_equal(got.alpha, x[..., -1])
  else:
    assert got.alpha is None
  np.testing.assert_array_equal(got.rgb8(), _round8(colour))
  rgb, _ = got.unit()
  np.testing.assert_array_equal(rgb, colour.astype(np.float32) / np.float32(65535.0))


def test_sixteen_bit_from_pillow_and_opencv_writers(tmp_path):
  grey = DEEP[..., 0]
  Image.fromarray(grey).save(tmp_path / "g.png")  # Pillow: mode I;16
  np.testing.assert_array_equal(image_io.decode(tmp_path / "g.png").rgb8(),
                                np.repeat(_round8(grey)[..., None], 3, axis=2))
  cv2.imwrite(str(tmp_path / "c.png"), DEEP[..., 2::-1])  # OpenCV writes BGR
  np.testing.assert_array_equal(image_io.decode(str(tmp_path / "c.png")).rgb, DEEP[..., :3])
  # Pillow's own 8-bit reading of 16-bit colour is the high byte, not the rounding.
  assert (np.asarray(Image.open(tmp_path / "c.png").convert("RGB")) != _round8(DEEP[..., :3])).any()


def test_integer_and_float_modes(tmp_path):
  wide = np.array([[-5, 0, 1000, 65535, 70000]], np.int32)
  Image.fromarray(wide, "I").save(tmp_path / "i.tif")
  got = image_io.decode(tmp_path / "i.tif")
  assert got.mode == "I" and got.rgb.dtype == np.uint16
  np.testing.assert_array_equal(got.rgb[..., 0], [[0, 0, 1000, 65535, 65535]])
  floats = np.array([[-3.0, 0.4, 127.5, 254.6, 300.0]], np.float32)
  Image.fromarray(floats, "F").save(tmp_path / "f.tif")
  got = image_io.decode(tmp_path / "f.tif")
  assert got.mode == "F" and got.rgb.dtype == np.uint8
  np.testing.assert_array_equal(got.rgb[..., 0], [[0, 0, 128, 255, 255]])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_pillows(orientation):
  data = _encoded(Image.fromarray(RGB), exif=_orientation(orientation))
  want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
  np.testing.assert_array_equal(image_io.decode(data).rgb, want)
  # A 16-bit PNG is turned the same way, alpha with it.
  exif = _orientation(orientation).tobytes()
  got = image_io.decode(_png16(DEEP, exif=exif.removeprefix(b"Exif\x00\x00")))
  for levels, value in ((got.rgb8(), _round8(DEEP[..., :3])), (got.alpha, DEEP[..., 3])):
    upright = Image.fromarray(value if value.dtype == np.uint8 else value.astype(np.int32))
    data = _encoded(upright, "TIFF", exif=_orientation(orientation))
    np.testing.assert_array_equal(levels, np.asarray(ImageOps.exif_transpose(
        Image.open(io.BytesIO(data)))))


def test_arrays_and_errors():
  np.testing.assert_array_equal(image_io.decode(RGB).rgb, RGB)
  assert image_io.decode(RGB).mode == "RGB"
  assert image_io.decode(RGB[..., :1]).mode == "L"
  deep = image_io.decode(DEEP[..., 0])
  assert deep.mode == "L;16"
  np.testing.assert_array_equal(deep.rgb8()[..., 1], _round8(DEEP[..., 0]))
  for bad in (RGB.astype(np.float32), np.zeros((0, 4, 3), np.uint8), np.zeros((4, 4, 5), np.uint8)):
    with pytest.raises(TypeError):
      image_io.decode(bad)
  jpeg = _encoded(Image.fromarray(RGB), "JPEG")
  with pytest.raises(UnidentifiedImageError):
    image_io.decode(b"not an image")
  with pytest.raises(OSError):
    image_io.decode(jpeg[:len(jpeg) // 2])


def test_sample_evaluate_and_pipeline_read_alike(tmp_path):
  """The three readers agree on 16-bit colour: sample's floats round to evaluate's 8 bits."""
  path = tmp_path / "deep.png"
  path.write_bytes(_png16(DEEP))
  rgb, alpha = sample.read_image(str(path))
  np.testing.assert_array_equal(alpha, DEEP[..., 3] / np.float32(65535.0))
  want = _round8(DEEP[..., :3])
  np.testing.assert_array_equal(color_fix.to_uint8(rgb), want)
  np.testing.assert_array_equal(evaluate._read(path)[0], want)  # pylint: disable=protected-access
  with pytest.raises(sample.InputError, match="not a readable image"):
    sample.read_image(str(tmp_path))
