"""Image resizing that reproduces `torch.nn.functional.interpolate` (align_corners=False, no antialias).

Resizing is a product of two 1-D interpolation matrices (rows, then columns), so sizes are static
while scales may be traced: the degradation chain can draw a scale per sample without recompiling.
Images are NHWC (or HWC) floats; the value range is untouched (no clipping).
"pil_bicubic" is PIL's Image.resize(BICUBIC) instead (static sizes only): the upscaler of
`vosr_jax.sample`, so a model can be trained on the LR upscaling it will be sampled with.
"""
import math

import jax.numpy as jnp
import numpy as np

METHODS = ("nearest", "bilinear", "bicubic", "area", "pil_bicubic")
_CUBIC_A = -0.75  # PyTorch's Keys coefficient (PIL and jax.image use -0.5).
_PIL_CUBIC_A = -0.5


def _cubic_weights(frac):
  """Keys cubic convolution weights for taps at offsets -1, 0, 1, 2; frac in [0, 1). Shape (..., 4)."""
  a = _CUBIC_A

  def near(d):  # |d| <= 1
    return ((a + 2) * d - (a + 3)) * d * d + 1

  def far(d):  # 1 < |d| < 2
    return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

  return jnp.stack([far(frac + 1), near(frac), near(1 - frac), far(2 - frac)], axis=-1)


def _pil_cubic(d):
  """PIL's bicubic filter (Keys, a = -0.5) at offsets `d` (NumPy, any shape)."""
  a, d = _PIL_CUBIC_A, np.abs(d)
  near = ((a + 2) * d - (a + 3)) * d * d + 1
  far = (((d - 5) * d + 8) * d - 4) * a
  return np.where(d < 1, near, np.where(d < 2, far, 0.0))


def pil_bicubic_matrix(in_size, out_size):
  """(out_size, in_size) matrix of PIL's BICUBIC resize (Resample.c `precompute_coeffs`).

  Pixel centres map by (i + 0.5) * in/out; when downscaling the filter is stretched by in/out
  (antialiasing); taps outside the signal are dropped and each row renormalised to sum to 1.
  """
  scale = in_size / out_size
  stretch = max(scale, 1.0)
  support = 2.0 * stretch
  matrix = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = (i + 0.5) * scale
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    weights = _pil_cubic((np.arange(lo, hi) - center + 0.5) / stretch)
    total = weights.sum()
    matrix[i, lo:hi] = weights / total if total != 0 else weights
  return jnp.asarray(matrix, jnp.float32)


def interp_matrix(in_size, out_size, method, scale=None):
  """(out_size, in_size) matrix M with `resized = M @ signal`, following PyTorch's index rules.

  Args:
    in_size, out_size: static ints.
    method: one of METHODS.
    scale: optional ratio in_size/out_size used to map coordinates, as PyTorch does when it is given
      `scale_factor` (it then uses 1/scale_factor, not in/out). May be a traced scalar. Ignored for
      "area", which is adaptive average pooling and depends on the sizes only, and "pil_bicubic".
  """
  if method not in METHODS:
    raise ValueError(f"Unknown resize method {method!r}; expected one of {METHODS}.")
  if method == "pil_bicubic":
    return pil_bicubic_matrix(in_size, out_size)
  if method == "area":
    rows = []
    for i in range(out_size):
      start, end = (i * in_size) // out_size, math.ceil((i + 1) * in_size / out_size)
      rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(in_size)])
    return jnp.asarray(rows, jnp.float32)
  ratio = in_size / out_size if scale is None else jnp.asarray(scale, jnp.float32)
  out_idx = jnp.arange(out_size, dtype=jnp.float32)
  cols = jnp.arange(in_size)
  if method == "nearest":
    src = jnp.minimum(jnp.floor(out_idx * ratio).astype(jnp.int32), in_size - 1)
    return (src[:, None] == cols[None, :]).astype(jnp.float32)
  src = (out_idx + 0.5) * ratio - 0.5
  if method == "bilinear":
    src = jnp.maximum(src, 0.0)
    taps, weights = jnp.floor(src)[:, None] + jnp.arange(2), jnp.stack(
        [1 - (src - jnp.floor(src)), src - jnp.floor(src)], axis=-1)
  else:  # bicubic: no clamp of the source coordinate, taps clamped to the border
    taps, weights = jnp.floor(src)[:, None] + jnp.arange(-1, 3), _cubic_weights(src - jnp.floor(src))
  taps = jnp.clip(taps.astype(jnp.int32), 0, in_size - 1)
  # Scatter tap weights into dense rows; taps clamped onto the same border index add up, as in PyTorch.
  return jnp.sum(weights[..., None] * (taps[..., None] == cols), axis=1)


def resize(x, size, method="bicubic", scale=None):
  """Resizes NHWC (or HWC) images to `size` = (height, width) like F.interpolate.

  Args:
    x: float array (..., H, W, C).
    size: static (out_h, out_w).
    method: one of METHODS.
    scale: optional (scale_h, scale_w) = input/output coordinate ratios (see `interp_matrix`).
  """
  in_h, in_w = x.shape[-3], x.shape[-2]
  scale_h, scale_w = (None, None) if scale is None else scale
  rows = interp_matrix(in_h, size[0], method, scale_h).astype(x.dtype)
  cols = interp_matrix(in_w, size[1], method, scale_w).astype(x.dtype)
  x = jnp.einsum("oh,...hwc->...owc", rows, x, precision="highest")
  return jnp.einsum("pw,...owc->...opc", cols, x, precision="highest")


def canvas_interp_matrix(in_canvas, out_canvas, in_size, out_size, method, ratio=None):
  """(out_canvas, in_canvas) matrix resizing a signal of traced length on static-size canvases.

  The input's first `in_size` entries are the signal (the rest is ignored); the output's first
  `out_size` rows follow F.interpolate from length in_size to out_size and the other rows are 0.
  With sizes traced, one compiled program serves every per-sample scale.
    area: PyTorch's adaptive average pooling with the traced sizes (window
      [floor(i in/out), ceil((i+1) in/out))), exactly what F.interpolate(mode='area') does.
    bilinear / bicubic: align_corners=False, no antialias, taps clamped to [0, in_size - 1].

  Args:
    in_canvas, out_canvas: static ints.
    in_size, out_size: int32 scalars (may be traced); 1 <= in_size <= in_canvas and
      out_size <= out_canvas.
    method: "area" | "bilinear" | "bicubic".
    ratio: input/output coordinate ratio (traced ok); None means in_size/out_size (the `size=`
      form of F.interpolate); pass 1/scale_factor for the `scale_factor=` form. Unused by area.
  """
  out_idx = jnp.arange(out_canvas, dtype=jnp.int32)
  cols = jnp.arange(in_canvas, dtype=jnp.int32)
  in_size = jnp.asarray(in_size, jnp.int32)
  out_size = jnp.asarray(out_size, jnp.int32)
  valid_rows = (out_idx < out_size)[:, None]
  if method == "area":
    start = (out_idx * in_size) // out_size
    end = ((out_idx + 1) * in_size + out_size - 1) // out_size
    inside = (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
    weights = inside / jnp.maximum(end - start, 1)[:, None].astype(jnp.float32)
    return jnp.where(valid_rows, weights, 0.0).astype(jnp.float32)
  if method not in ("bilinear", "bicubic"):
    raise ValueError(f"Unknown canvas resize method {method!r}; expected area, bilinear or "
                     "bicubic.")
  if ratio is None:
    ratio = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
  src = (out_idx.astype(jnp.float32) + 0.5) * jnp.asarray(ratio, jnp.float32) - 0.5
  if method == "bilinear":
    src = jnp.maximum(src, 0.0)
    frac = src - jnp.floor(src)
    taps, weights = jnp.floor(src)[:, None] + jnp.arange(2), jnp.stack([1 - frac, frac], axis=-1)
  else:
    taps = jnp.floor(src)[:, None] + jnp.arange(-1, 3)
    weights = _cubic_weights(src - jnp.floor(src))
  taps = jnp.clip(taps.astype(jnp.int32), 0, in_size - 1)
  matrix = jnp.sum(weights[..., None] * (taps[..., None] == cols), axis=1)
  return jnp.where(valid_rows, matrix, 0.0)


def resize_canvas(x, out_canvas, in_size, out_size, mode, methods, ratio=(None, None)):
  """Resizes one HWC canvas image whose valid part is x[:in_h, :in_w] to a valid part of out_size.

  Args:
    x: (H, W, C) float canvas.
    out_canvas: static (out_H, out_W).
    in_size, out_size: (h, w) pairs of int32 scalars (may be traced).
    mode: int32 index (may be traced) into `methods`; every method's matrix is built and the
      selected one applied (the matrices are small next to the image, so one program serves all).
    methods: static tuple of canvas_interp_matrix methods.
    ratio: (ratio_h, ratio_w) input/output coordinate ratios, or None entries for in/out.
  Returns:
    (out_H, out_W, C) canvas, zero outside the valid part.
  """
  mats = []
  for axis in range(2):
    stack = jnp.stack([canvas_interp_matrix(x.shape[axis], out_canvas[axis], in_size[axis],
                                            out_size[axis], m, ratio[axis]) for m in methods])
    mats.append(stack[mode].astype(x.dtype))
  x = jnp.einsum("oh,hwc->owc", mats[0], x, precision="highest")
  return jnp.einsum("pw,owc->opc", mats[1], x, precision="highest")
