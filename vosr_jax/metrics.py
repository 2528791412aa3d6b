"""Full-reference (PSNR, SSIM, flat-region noise, detail sharpness) and no-reference (NIQE) metrics.

Images are NumPy arrays in HWC RGB order (or HW for a single channel), either uint8 or float
holding values in [0, 255]; they are never rescaled, so a float image in [0, 1] gives wrong
numbers. Everything is computed in float64 with NumPy only (no OpenCV/SciPy at run time); the
tests check agreement with BasicSR 1.4.2 (OpenCV/SciPy based) and with `skimage.metrics`.

Conventions (BasicSR `calculate_psnr`, `calculate_ssim`, `calculate_niqe`):
  * `crop_border` pixels are removed from every edge before anything else (x4 SR uses 4);
  * the Y channel is ITU-R BT.601 as MATLAB's `rgb2ycbcr`: Y = 16 + (65.481 R + 128.553 G +
    24.966 B) / 255 on [0, 255] RGB, unrounded, in [16, 235];
  * SSIM uses an 11x11 Gaussian window (sigma 1.5) over the valid region only, constants
    (0.01 * 255)^2 and (0.03 * 255)^2, and averages the per-channel SSIMs of a colour image;
  * NIQE always works on the rounded Y channel, with the standard pristine model
    (`assets/niqe_pris_params.npz`, from BasicSR 1.4.2, Apache-2.0).

NIQE rewards noise: a speckled output can score better (lower) than the HR photo itself.
`flat_noise` is the check for that. It and the two detail measures (`detail_hf`, `detail_gsim`;
ours, defined in their docstrings) split the image by the HR's local activity, always on the
unrounded Y channel after the same border crop.
"""
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

NIQE_PARAMS_ENV = "VOSR_NIQE_PARAMS"
DEFAULT_NIQE_PARAMS = Path(__file__).parent / "assets" / "niqe_pris_params.npz"
_NIQE_BLOCK = 96  # pixels; the block size the pristine model was fitted with
# Flat-region noise and detail sharpness (definitions in `flat_noise`, `detail_gsim`).
HIGHPASS_SIGMA = 1.5    # pixels: h(y) = y - Gaussian blur of y
ACTIVITY_SIGMA = 3.0    # pixels: window of the HR's local standard deviation
REGION_QUANTILE = 0.25  # flat: lowest quarter of the HR's activity; detail: highest quarter
ENERGY_FLOOR = 1.0      # grey levels^2: least HR high-pass energy an energy ratio divides by
GSIM_C = 170.0          # GMSD's stability constant for [0, 255] data


def rgb_to_y(img):
  """Y channel of ITU-R BT.601 YCbCr, as MATLAB `rgb2ycbcr` and BasicSR `rgb2ycbcr(y_only)`.

  Args:
    img: (H, W, 3) RGB, uint8 or float with values in [0, 255].

  Returns:
    (H, W) float64 Y in [16, 235] (for inputs in [0, 255]), not rounded.
  """
  img = np.asarray(img)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"rgb_to_y expects an (H, W, 3) RGB image, got shape {img.shape}")
  rgb = img.astype(np.float64) / 255.0
  return 16.0 + rgb @ np.array([65.481, 128.553, 24.966])


def _prepare_pair(pred, gt, crop_border, y_channel, name):
  """Checks shapes, crops borders, optionally takes Y; returns float64 (H, W, C) arrays."""
  pred, gt = np.asarray(pred), np.asarray(gt)
  if pred.shape != gt.shape:
    raise ValueError(f"{name}: image shapes differ: pred {pred.shape} vs gt {gt.shape}")
  if pred.ndim not in (2, 3):
    raise ValueError(f"{name}: expected an (H, W) or (H, W, C) image, got shape {pred.shape}")
  out = []
  for img in (pred, gt):
    img = _crop(img, crop_border, name)
    if y_channel and img.ndim == 3 and img.shape[-1] == 3:
      img = rgb_to_y(img)
    img = img.astype(np.float64)
    out.append(img[..., None] if img.ndim == 2 else img)
  return out


def _crop(img, crop_border, name):
  """Removes `crop_border` pixels from each spatial edge; errors if nothing is left."""
  if crop_border < 0:
    raise ValueError(f"{name}: crop_border must be >= 0, got {crop_border}")
  h, w = img.shape[:2]
  if 2 * crop_border >= min(h, w):
    raise ValueError(f"{name}: crop_border {crop_border} leaves nothing of a {h}x{w} image")
  if crop_border:
    img = img[crop_border:-crop_border, crop_border:-crop_border]
  return img


def psnr(pred, gt, crop_border=0, y_channel=False):
  """Peak signal-to-noise ratio in dB with peak 255 (BasicSR `calculate_psnr`).

  Args:
    pred: (H, W, C) or (H, W) image, uint8 or float in [0, 255].
    gt: reference image of the same shape and range.
    crop_border: pixels removed from every edge before comparing.
    y_channel: compare the BT.601 Y channel (see `rgb_to_y`) instead of all RGB channels.

  Returns:
    PSNR in dB as a Python float; `inf` for identical images.
  """
  pred, gt = _prepare_pair(pred, gt, crop_border, y_channel, "psnr")
  mse = np.mean((pred - gt) ** 2)
  if mse == 0:
    return float("inf")
  return float(10.0 * np.log10(255.0**2 / mse))


@lru_cache(maxsize=None)
def _gaussian_1d(size=11, sigma=1.5):
  """Normalised 1-D Gaussian taps, equal to `cv2.getGaussianKernel(size, sigma)`."""
  x = np.arange(size) - (size - 1) / 2
  k = np.exp(-(x**2) / (2 * sigma**2))
  return k / k.sum()


def _filter_valid(x, k):
  """Separable 2-D correlation of (H, W) `x` with the outer product k k^T, valid region only."""
  n = len(k)
  h, w = x.shape
  rows = sum(k[i] * x[i:h - n + 1 + i] for i in range(n))
  return sum(k[j] * rows[:, j:w - n + 1 + j] for j in range(n))


def _ssim_channel(a, b):
  """SSIM of two (H, W) float64 channels in [0, 255], mean over the valid region."""
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  k = _gaussian_1d()
  mu1, mu2 = _filter_valid(a, k), _filter_valid(b, k)
  sigma1 = _filter_valid(a * a, k) - mu1**2
  sigma2 = _filter_valid(b * b, k) - mu2**2
  sigma12 = _filter_valid(a * b, k) - mu1 * mu2
  ssim_map = ((2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)) / (
      (mu1**2 + mu2**2 + c1) * (sigma1 + sigma2 + c2))
  return ssim_map.mean()


def ssim(pred, gt, crop_border=0, y_channel=False):
  """Structural similarity (BasicSR `calculate_ssim`, same as the authors' MATLAB code).

  Args:
    pred: (H, W, C) or (H, W) image, uint8 or float in [0, 255]; at least 11x11 after cropping.
    gt: reference image of the same shape and range.
    crop_border: pixels removed from every edge before comparing.
    y_channel: compare the BT.601 Y channel instead of averaging over the RGB channels.

  Returns:
    SSIM as a Python float in [-1, 1].
  """
  pred, gt = _prepare_pair(pred, gt, crop_border, y_channel, "ssim")
  if min(pred.shape[:2]) < 11:
    raise ValueError(f"ssim: needs at least 11x11 pixels after cropping, got {pred.shape[:2]}")
  return float(np.mean([_ssim_channel(pred[..., c], gt[..., c]) for c in range(pred.shape[-1])]))


def _prepare_y_pair(pred, gt, crop_border, name):
  """`_prepare_pair` on the Y channel; returns two (H, W) float64 arrays."""
  pred, gt = _prepare_pair(pred, gt, crop_border, True, name)
  if pred.shape[-1] != 1:
    raise ValueError(f"{name}: expected an (H, W, 3) RGB or (H, W) image, got {pred.shape[-1]} "
                     f"channels")
  return pred[..., 0], gt[..., 0]


def _gaussian_blur(x, sigma):
  """(H, W) `x` smoothed by a Gaussian truncated at 3 sigma, edges extended (scipy 'nearest')."""
  radius = int(3 * sigma + 0.5)
  return _filter_valid(np.pad(x, radius, mode="edge"), _gaussian_1d(2 * radius + 1, sigma))


def _highpass(y):
  """h(y) = y - G(y): the detail a Gaussian of sigma HIGHPASS_SIGMA removes; (H, W) -> (H, W)."""
  return y - _gaussian_blur(y, HIGHPASS_SIGMA)


def local_activity(y):
  """Local standard deviation in a Gaussian window of sigma ACTIVITY_SIGMA.

  Args:
    y: (H, W) luma (e.g. `rgb_to_y`), values in [0, 255].

  Returns:
    (H, W) float64, in grey levels: sqrt(max(G(y^2) - G(y)^2, 0)).
  """
  mu = _gaussian_blur(y, ACTIVITY_SIGMA)
  return np.sqrt(np.maximum(_gaussian_blur(y * y, ACTIVITY_SIGMA) - mu**2, 0.0))


def _region(gt, region):
  """Boolean (H, W) mask: the lowest ("flat") or highest ("detail") REGION_QUANTILE of activity."""
  act = local_activity(gt)
  if region == "flat":
    return act <= np.quantile(act, REGION_QUANTILE)
  return act >= np.quantile(act, 1.0 - REGION_QUANTILE)


def _energy_ratio(pred, gt, mask):
  """mean(h(pred)^2) / max(mean(h(gt)^2), ENERGY_FLOOR) over `mask`."""
  energy = [np.mean(_highpass(x)[mask] ** 2) for x in (pred, gt)]
  return float(energy[0] / max(energy[1], ENERGY_FLOOR))


def flat_noise(pred, gt, crop_border=0):
  """High-pass energy the prediction adds where the HR is locally flat, relative to the HR's.

  On the Y channel (after the border crop): h(x) = x - G_1.5(x), with G_s a Gaussian blur of
  sigma s pixels (truncated at 3 s, edges extended); the flat mask is the pixels whose HR local
  activity (`local_activity`: local standard deviation, Gaussian window of sigma 3) is at or
  below its 25 % quantile in this image. The score is mean(h(pred)^2) / max(mean(h(gt)^2), 1)
  over the mask; the floor of 1 grey level^2 keeps an HR without texture there (e.g. a clipped
  sky) from dividing by ~0. The HR scores 1 (if above the floor), a blurred output < 1, noise or
  speckle >> 1. Lower is better down to 1, below which the output is smoother than the HR.

  Args:
    pred: (H, W, 3) RGB or (H, W) Y image, uint8 or float in [0, 255].
    gt: reference image of the same shape and range.
    crop_border: pixels removed from every edge first.

  Returns:
    The energy ratio as a Python float (>= 0).
  """
  pred, gt = _prepare_y_pair(pred, gt, crop_border, "flat_noise")
  return _energy_ratio(pred, gt, _region(gt, "flat"))


def detail_hf(pred, gt, crop_border=0):
  """High-pass energy ratio where the HR is most detailed: `flat_noise` on the other region.

  The mask is the pixels whose HR local activity is at or above its 75 % quantile in this image;
  h, the activity and the floor are those of `flat_noise`. The HR scores 1, a blurred output
  (bicubic) < 1. Noise raises it as well as restored detail does, so read it with `detail_gsim`.

  Args:
    pred: (H, W, 3) RGB or (H, W) Y image, uint8 or float in [0, 255].
    gt: reference image of the same shape and range.
    crop_border: pixels removed from every edge first.

  Returns:
    The energy ratio as a Python float (>= 0); closer to 1 is better.
  """
  pred, gt = _prepare_y_pair(pred, gt, crop_border, "detail_hf")
  return _energy_ratio(pred, gt, _region(gt, "detail"))


def _prewitt(y):
  """Gradients (gx, gy) of (H, W) `y` with GMSD's Prewitt filters ([1 0 -1] x [1 1 1] / 3)."""
  p = np.pad(y, 1, mode="edge")
  across = p[:, :-2] - p[:, 2:]  # (H + 2, W): horizontal differences
  down = p[:-2] - p[2:]          # (H, W + 2): vertical differences
  gx = (across[:-2] + across[1:-1] + across[2:]) / 3
  gy = (down[:, :-2] + down[:, 1:-1] + down[:, 2:]) / 3
  return gx, gy


def detail_gsim(pred, gt, crop_border=0):
  """Gradient similarity where the HR is most detailed: GMSD's GMS on gradient vectors.

  On the Y channel (after the border crop), g = (gx, gy) are Prewitt gradients (filters
  [1 0 -1] x [1 1 1] / 3, edges extended), and per pixel
    gsim = (2 g_pred . g_gt + c) / (|g_pred|^2 + |g_gt|^2 + c)
         = 1 - |g_pred - g_gt|^2 / (|g_pred|^2 + |g_gt|^2 + c),
  with c = 170 (GMSD's constant, 0.0026 on [0, 1] data); the score is its mean over the
  `detail_hf` mask. GMS (Xue et al. 2014) compares gradient magnitudes |g|, which added noise
  raises towards the HR's on a blurred image (bicubic + noise scores higher than bicubic); the dot
  product cancels noise uncorrelated with the HR, so blur and noise both lower this score. Unlike
  GMSD, it is taken at full resolution (no 2x downsampling: x4 SR restores the finest scale) and
  averaged, not pooled by its standard deviation. 1 for the HR; higher is better.

  Args:
    pred: (H, W, 3) RGB or (H, W) Y image, uint8 or float in [0, 255].
    gt: reference image of the same shape and range.
    crop_border: pixels removed from every edge first.

  Returns:
    Mean gradient similarity as a Python float in [-1, 1].
  """
  pred, gt = _prepare_y_pair(pred, gt, crop_border, "detail_gsim")
  (px, py), (gx, gy) = _prewitt(pred), _prewitt(gt)
  gsim = (2 * (px * gx + py * gy) + GSIM_C) / (px**2 + py**2 + gx**2 + gy**2 + GSIM_C)
  return float(gsim[_region(gt, "detail")].mean())


class NiqeParams(NamedTuple):
  """NIQE pristine model: a multivariate Gaussian of natural-scene statistics.

  Attributes:
    mu: (36,) mean feature vector.
    cov: (36, 36) feature covariance.
    window: (7, 7) Gaussian window for the local mean/deviation of the MSCN transform.
  """
  mu: np.ndarray
  cov: np.ndarray
  window: np.ndarray


def niqe_params_path(path=None):
  """Resolves the NIQE pristine-model file: `path`, else $VOSR_NIQE_PARAMS, else the packaged copy.

  Args:
    path: npz file or None.

  Returns:
    The Path that `load_niqe_params(path)` reads (not checked for existence).
  """
  return Path(path or os.environ.get(NIQE_PARAMS_ENV) or DEFAULT_NIQE_PARAMS)


def load_niqe_params(path=None):
  """Loads the NIQE pristine model.

  Args:
    path: npz file with `mu_pris_param`, `cov_pris_param` and `gaussian_window` (BasicSR's
      `niqe_pris_params.npz`); None resolves as in `niqe_params_path`.

  Returns:
    NiqeParams.
  """
  path = niqe_params_path(path)
  if not path.is_file():
    raise FileNotFoundError(
        f"NIQE pristine parameters not found: {path}. Expected BasicSR's niqe_pris_params.npz "
        f"(in the basicsr 1.4.2 sdist under basicsr/metrics/); pass --niqe-params or set "
        f"{NIQE_PARAMS_ENV}.")
  with np.load(path) as data:
    missing = {"mu_pris_param", "cov_pris_param", "gaussian_window"} - set(data.files)
    if missing:
      raise ValueError(f"NIQE parameter file {path} lacks arrays {sorted(missing)}")
    return NiqeParams(mu=data["mu_pris_param"].reshape(-1).astype(np.float64),
                      cov=data["cov_pris_param"].astype(np.float64),
                      window=data["gaussian_window"].astype(np.float64))


def _filter_nearest(x, window):
  """2-D convolution of (H, W) `x` with `window`, edges extended (scipy `mode='nearest'`)."""
  kh, kw = window.shape
  h, w = x.shape
  pad = np.pad(x, ((kh // 2, kh - 1 - kh // 2), (kw // 2, kw - 1 - kw // 2)), mode="edge")
  flipped = window[::-1, ::-1]  # convolution, not correlation
  return sum(flipped[i, j] * pad[i:i + h, j:j + w] for i in range(kh) for j in range(kw))


def _matlab_cubic(x):
  """MATLAB's bicubic kernel (a = -0.5)."""
  ax = np.abs(x)
  near = (1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1)
  far = (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
  return near + far


def _matlab_resize_axis(x, scale, axis):
  """MATLAB `imresize(..., 'bicubic')` along one axis, antialiased when downscaling.

  Symmetric boundary extension, output length ceil(n * scale), as BasicSR's `imresize`.
  """
  n = x.shape[axis]
  out_len = math.ceil(n * scale)
  width = 4.0 / scale if scale < 1 else 4.0
  u = np.arange(1, out_len + 1) / scale + 0.5 * (1 - 1 / scale)  # 1-based input coordinates
  left = np.floor(u - width / 2)
  idx = left[:, None] + np.arange(math.ceil(width) + 2)[None, :]
  dist = u[:, None] - idx
  weights = scale * _matlab_cubic(dist * scale) if scale < 1 else _matlab_cubic(dist)
  weights /= weights.sum(axis=1, keepdims=True)
  idx = idx.astype(np.int64) - 1
  idx = np.where(idx < 0, -idx - 1, idx)
  idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
  taken = np.take(x, idx, axis=axis)  # axis grows into (out_len, taps)
  weights = weights.reshape(weights.shape + (1,) * (x.ndim - 1 - axis))
  return (taken * weights).sum(axis=axis + 1)


@lru_cache(maxsize=1)
def _aggd_table():
  """Shape grid 0.2:0.001:10 and its ratio Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a))."""
  gam = np.arange(0.2, 10.001, 0.001)
  g = np.vectorize(math.gamma)
  r_gam = g(2 / gam) ** 2 / (g(1 / gam) * g(3 / gam))
  return gam, r_gam


def _aggd_fit(x):
  """Asymmetric generalised Gaussian fit by moment matching: (alpha, beta_left, beta_right).

  A side without samples gives NaN scales; such blocks are left out of the covariance, as in
  BasicSR.
  """
  x = x.ravel()
  gam, r_gam = _aggd_table()
  neg, pos = x[x < 0], x[x > 0]
  left_std = np.sqrt(np.mean(neg**2)) if neg.size else np.nan
  right_std = np.sqrt(np.mean(pos**2)) if pos.size else np.nan
  gammahat = left_std / right_std
  mean_sq = np.mean(x**2)
  rhat = np.mean(np.abs(x)) ** 2 / mean_sq if mean_sq > 0 else np.nan
  rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / (gammahat**2 + 1) ** 2
  alpha = gam[np.argmin((r_gam - rhatnorm) ** 2)]  # NaN -> first grid point, as BasicSR
  scale = np.sqrt(math.gamma(1 / alpha) / math.gamma(3 / alpha))
  return alpha, left_std * scale, right_std * scale


def _block_features(block):
  """The 18 NIQE features of one MSCN block: AGGD of the block and of 4 neighbour products."""
  alpha, beta_l, beta_r = _aggd_fit(block)
  feat = [alpha, (beta_l + beta_r) / 2]
  for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
    alpha, beta_l, beta_r = _aggd_fit(block * np.roll(block, shift, axis=(0, 1)))
    mean = (beta_r - beta_l) * math.gamma(2 / alpha) / math.gamma(1 / alpha)
    feat += [alpha, mean, beta_l, beta_r]
  return feat


def niqe(img, params, crop_border=0):
  """Natural Image Quality Evaluator (Mittal et al. 2013), BasicSR `calculate_niqe` definition.

  The rounded Y channel is cut to whole 96x96 blocks; at scales 1 and 1/2 (MATLAB bicubic) each
  block gives 18 AGGD features of its MSCN coefficients; the score is the Mahalanobis-like
  distance between the Gaussian fitted to those features and the pristine model. Lower is more
  natural. Results on small images are noisy (few blocks).

  Args:
    img: (H, W, 3) RGB or (H, W) grey/Y image, uint8 or float in [0, 255]; at least two whole
      96x96 blocks after cropping.
    params: NiqeParams from `load_niqe_params`.
    crop_border: pixels removed from every edge first.

  Returns:
    NIQE as a Python float.
  """
  img = np.asarray(img)
  if img.ndim == 3 and img.shape[-1] == 3:
    y = rgb_to_y(img)
  elif img.ndim == 2:
    y = img.astype(np.float64)
  else:
    raise ValueError(f"niqe: expected an (H, W, 3) or (H, W) image, got shape {img.shape}")
  y = np.round(_crop(y, crop_border, "niqe"))  # BasicSR rounds to match MATLAB
  nh, nw = y.shape[0] // _NIQE_BLOCK, y.shape[1] // _NIQE_BLOCK
  if nh * nw < 2:
    raise ValueError(f"niqe: needs at least two {_NIQE_BLOCK}x{_NIQE_BLOCK} blocks after "
                     f"cropping, got a {y.shape[0]}x{y.shape[1]} image")
  y = y[:nh * _NIQE_BLOCK, :nw * _NIQE_BLOCK]

  scale_feats = []
  for scale in (1, 2):
    mu = _filter_nearest(y, params.window)
    sigma = np.sqrt(np.abs(_filter_nearest(y * y, params.window) - mu**2))
    mscn = (y - mu) / (sigma + 1)
    b = _NIQE_BLOCK // scale
    scale_feats.append([_block_features(mscn[i * b:(i + 1) * b, j * b:(j + 1) * b])
                        for j in range(nw) for i in range(nh)])
    if scale == 1:
      y = _matlab_resize_axis(_matlab_resize_axis(y / 255.0, 0.5, 0), 0.5, 1) * 255.0
  feats = np.concatenate([np.asarray(f) for f in scale_feats], axis=1)  # (blocks, 36)

  mu_dist = np.nanmean(feats, axis=0)
  finite = feats[~np.isnan(feats).any(axis=1)]
  if len(finite) < 2:
    raise ValueError("niqe: fewer than two blocks have defined statistics (flat image?)")
  cov_dist = np.cov(finite, rowvar=False)
  diff = params.mu - mu_dist
  quality = diff @ np.linalg.pinv((params.cov + cov_dist) / 2) @ diff
  return float(np.sqrt(quality))
