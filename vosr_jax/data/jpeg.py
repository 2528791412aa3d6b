"""JPEG round trip (encode + decode) following basicsr's `DiffJPEG(differentiable=False)`.

RGB in [0, 1] -> x255 -> YCbCr (JFIF, full range) -> 4:2:0 chroma (2x2 average) -> 8x8 DCT ->
quantisation by the standard tables scaled by the quality factor, with rounding -> inverse.
Images are zero-padded at the bottom/right to a multiple of 16 (as DiffJPEG does); an image of
traced size `size` inside a larger static canvas gives exactly the result of JPEG at that size,
because blocks are aligned to the top-left corner and everything past `size` is zeroed first.

Departure from DiffJPEG: its tables are the transposes of the standard ones (`y_table = ....T`);
here they are in the standard orientation, as real encoders (libjpeg, Pillow) use them.
"""
import numpy as np

import jax.numpy as jnp

LUMA_TABLE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], np.float32)
CHROMA_TABLE = np.full((8, 8), 99, np.float32)
CHROMA_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]

_RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],
                          [0.5, -0.418688, -0.081312]], np.float32)
_YCBCR_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]],
                         np.float32)
_u, _x = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
# Orthonormal DCT-II: coefficients = D @ block @ D^T (rows = vertical frequency).
_DCT = (np.where(_u == 0, np.sqrt(1 / 8), np.sqrt(2 / 8)) *
        np.cos((2 * _x + 1) * _u * np.pi / 16)).astype(np.float32)


def quality_to_factor(quality):
  """Table multiplier of basicsr/IJG: 5000/q for q < 50, else 200 - 2q, divided by 100."""
  quality = jnp.asarray(quality, jnp.float32)
  return jnp.where(quality < 50, 5000.0 / quality, 200.0 - 2.0 * quality) / 100.0


def _code_plane(plane, table):
  """Quantises a (h, w) plane (h, w multiples of 8, values in [0, 255]) blockwise and decodes it."""
  h, w = plane.shape
  blocks = plane.reshape(h // 8, 8, w // 8, 8) - 128.0
  dct = jnp.asarray(_DCT)
  coef = jnp.einsum("ux,axby,vy->abuv", dct, blocks, dct, precision="highest")
  coef = jnp.round(coef / table) * table
  blocks = jnp.einsum("ux,abuv,vy->axby", dct, coef, dct, precision="highest")
  return blocks.reshape(h, w) + 128.0


def jpeg(x, quality, size=None):
  """JPEG round trip of one RGB image at a (possibly traced, fractional) quality.

  Args:
    x: (H, W, 3) float in [0, 1] (values outside are clipped). H and W need not be multiples of 16.
    quality: scalar quality in (0, 100], e.g. U(30, 95) as in Real-ESRGAN.
    size: optional effective (h, w) (int, may be traced): only x[:h, :w] is the image; the rest of
      the canvas is ignored and comes back as unspecified values.
  Returns:
    (H, W, 3) float32 in [0, 1], not rounded to 8 bits (as DiffJPEG).
  """
  height, width = x.shape[0], x.shape[1]
  pad_h, pad_w = -height % 16, -width % 16
  x = jnp.clip(x.astype(jnp.float32), 0.0, 1.0)
  if size is not None:
    inside = ((jnp.arange(height) < size[0])[:, None, None] &
              (jnp.arange(width) < size[1])[None, :, None])
    x = jnp.where(inside, x, 0.0)
  x = jnp.pad(x, ((0, pad_h), (0, pad_w), (0, 0)))
  h, w = x.shape[0], x.shape[1]
  ycc = jnp.einsum("hwc,dc->hwd", x * 255.0, jnp.asarray(_RGB_TO_YCBCR), precision="highest")
  ycc = ycc + jnp.asarray([0.0, 128.0, 128.0])
  factor = quality_to_factor(quality)
  # Quantisation steps of at least 1, as libjpeg clamps them (quality 100 gives factor 0).
  luma_table = jnp.maximum(jnp.asarray(LUMA_TABLE) * factor, 1.0)
  chroma_table = jnp.maximum(jnp.asarray(CHROMA_TABLE) * factor, 1.0)
  luma = _code_plane(ycc[..., 0], luma_table)
  chroma = ycc[..., 1:].reshape(h // 2, 2, w // 2, 2, 2).mean(axis=(1, 3))
  chroma = jnp.stack([_code_plane(chroma[..., c], chroma_table) for c in range(2)], axis=-1)
  chroma = jnp.repeat(jnp.repeat(chroma, 2, axis=0), 2, axis=1)
  ycc = jnp.concatenate([luma[..., None], chroma - 128.0], axis=-1)
  rgb = jnp.einsum("hwd,cd->hwc", ycc, jnp.asarray(_YCBCR_TO_RGB), precision="highest")
  return jnp.clip(rgb, 0.0, 255.0)[:height, :width] / 255.0
