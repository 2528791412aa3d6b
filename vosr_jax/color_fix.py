"""Colour correction of super-resolved images against the upscaled LR input
(docs/official.md §6.1).

Both fixes work on float images in [0, 1] (NHWC) and return [0, 1]. Unlike the official scripts,
they run on the float decoder output, not on an 8-bit truncated copy of it.
"""
import jax.numpy as jnp
import numpy as np

METHODS = ("adain", "wavelet", "none")

_ADAIN_EPS = 1e-5
_SPLIT_SIGMA = 5.0


def adain(sr, src):
  """Per-image, per-channel mean/std transfer from `src` to `sr` (the official 'adain').

  Args:
    sr: (B, H, W, C) float in [0, 1], the super-resolved image.
    src: (B, H, W, C) float in [0, 1], the bicubic-upscaled LR input.
  Returns:
    (B, H, W, C) float32 in [0, 1]: (sr - mean_sr) / std_sr * std_src + mean_src, clipped, with
    the unbiased std (H*W - 1 in the denominator) plus 1e-5, as torch `std()` + 1e-5 upstream.
  """
  def stats(x):
    x = x.astype(jnp.float32)
    n = x.shape[1] * x.shape[2]
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.sum((x - mean) ** 2, axis=(1, 2), keepdims=True) / max(n - 1, 1)
    return mean, jnp.sqrt(var) + _ADAIN_EPS

  sr_mean, sr_std = stats(sr)
  src_mean, src_std = stats(src)
  return jnp.clip((sr - sr_mean) / sr_std * src_std + src_mean, 0.0, 1.0)


def _gaussian_kernel(sigma):
  """OpenCV's kernel for a float image: size 2 * round(4 sigma) + 1, normalised to sum 1."""
  radius = int(round(4 * sigma))
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def gaussian_blur(x, sigma=_SPLIT_SIGMA):
  """Separable Gaussian blur with reflect-101 borders (cv2.GaussianBlur's default).

  Args:
    x: (B, H, W, C) float.
    sigma: standard deviation in pixels.
  Returns:
    (B, H, W, C) float32.
  """
  k = jnp.asarray(_gaussian_kernel(sigma))
  r = (k.shape[0] - 1) // 2
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
  h, w = x.shape[1] - 2 * r, x.shape[2] - 2 * r
  x = sum(k[i] * x[:, i:i + h] for i in range(2 * r + 1))
  return sum(k[i] * x[:, :, i:i + w] for i in range(2 * r + 1))


def gaussian_split(sr, src, sigma=_SPLIT_SIGMA):
  """The official 'wavelet' fix: low frequencies of `src` plus high frequencies of `sr`.

  Args:
    sr, src: (B, H, W, C) float in [0, 1].
    sigma: the Gaussian's standard deviation in pixels (official: 5).
  Returns:
    clip(blur(src) + sr - blur(sr), 0, 1), float32.
  """
  return jnp.clip(gaussian_blur(src, sigma) + sr - gaussian_blur(sr, sigma), 0.0, 1.0)


def apply(method, sr, src):
  """Applies the fix named `method` (one of `METHODS`) to [0, 1] images; 'none' returns `sr`."""
  if method == "adain":
    return adain(sr, src)
  if method == "wavelet":
    return gaussian_split(sr, src)
  if method == "none":
    return jnp.clip(sr, 0.0, 1.0)
  raise ValueError(f"color_fix.py: unknown colour fix {method!r}; expected one of {METHODS}")


def to_uint8(images):
  """[0, 1] float images -> uint8, ROUNDED to the nearest level (the official scripts truncate).

  The project's one float -> 8-bit rounding: it takes NumPy or JAX arrays (traced too) and returns
  the same kind, computing in float32 (round half to even, then clip to [0, 255]).
  """
  return (images.astype(np.float32) * 255.0).round().clip(0, 255).astype(np.uint8)
