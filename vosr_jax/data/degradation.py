"""Real-ESRGAN second-order degradation chain (docs/official.md §7.1), pure and jittable.

`degrade(key, hq, config)` maps an HQ batch (B, H, W, 3) in [0, 1] to the LQ batch on the 8-bit
grid: blur -> resize -> noise -> JPEG -> [blur] -> resize -> noise -> {resize + sinc, JPEG} in a
random order -> resize back to H x W (`resize_back`) -> quantise. Every random parameter is drawn
per sample by default (`per_sample=True`); `per_sample=False` draws kernels, scales, modes and
branch choices once per batch as the official code does (noise levels, gray flags and JPEG
qualities stay per sample in both, as there).

Variable sizes: every intermediate image lives on a fixed-size canvas (the largest size its stage
can reach, rounded up to a multiple of 16) with its traced effective size (h, w) in the top-left
corner. Resizes are products of (canvas_out, canvas_in) matrices built from the traced sizes
(`resize.canvas_interp_matrix`; area = exact adaptive average pooling of the traced sizes), blurs
reflect at the traced border, and JPEG zeroes the canvas past the effective size, which matches
DiffJPEG's zero padding to a multiple of 16 exactly. So one program serves every draw and nothing
recompiles. A canvas was chosen over bucketing because per-sample scales put every size in one
batch: buckets would need data-dependent sub-batches; the price is computing stage 1 on the largest
canvas (768^2 for a 512^2 HQ, up to 2.25x the HQ area).

Noise: Gaussian and Poisson noise are drawn by inverse transform from one uniform per pixel and
channel (a sample uses one of the two, and gray noise uses channel 0), which halves the random bits.
Poisson noise follows basicsr's `generate_poisson_noise_pt` with the number of levels fixed to
`poisson_levels` (256): basicsr uses 2**ceil(log2(#unique 8-bit values)), which is 256 for any
image with more than 128 distinct values, i.e. nearly every natural image after blur and resize;
the data-dependent count would be a full-image sort per sample. Counts come from the exact CDF,
summed elementwise along the pmf recurrence (`_poisson_counts`: no table gathers, which TPUs run
slowly).
"""
import functools
import math
import types

import numpy as np

import jax
import jax.numpy as jnp

from vosr_jax.data import jpeg as jpeg_lib
from vosr_jax.data import kernels
from vosr_jax.data import resize as resize_lib

RESIZE_MODES = ("area", "bilinear", "bicubic")
# The resize back has static sizes, so it may also use PIL's BICUBIC (what the sampler upscales with).
RESIZE_BACK_MODES = RESIZE_MODES + ("pil_bicubic",)
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale, as basicsr.

# Config schema: key -> kind. Every key of configs/degradation.py, and no other, must be present.
_PROB_VECTORS = {"kernel_prob": len(kernels.FAMILIES), "kernel_prob2": len(kernels.FAMILIES),
                 "resize_prob": 3, "resize_prob2": 3}
_PROBS = ("sinc_prob", "sinc_prob2", "final_sinc_prob", "second_blur_prob", "gaussian_noise_prob",
          "gaussian_noise_prob2", "gray_noise_prob", "gray_noise_prob2", "resize_sinc_first_prob")
_RANGES = ("blur_sigma", "blur_sigma2", "betag_range", "betag_range2", "betap_range",
           "betap_range2", "rotation_range", "resize_range", "resize_range2", "noise_range",
           "noise_range2", "poisson_scale_range", "poisson_scale_range2", "jpeg_range",
           "jpeg_range2")
_OTHER = ("scale", "per_sample", "resize_back", "resize_modes", "resize_back_modes", "kernel_sizes",
          "kernel_pad_to", "poisson_levels", "unroll_poisson")
# Parameters the official code draws per sample even when the rest is per batch.
_ALWAYS_PER_SAMPLE = ("sigma1", "poisson1", "gray1", "quality1", "sigma2", "poisson2", "gray2",
                      "quality2")


def _error(key, expected, got):
  return ValueError(f"Degradation config key {key!r}: expected {expected}, got {got!r} "
                    "(see configs/degradation.py).")


def validate_config(config):
  """Checks a degradation config and returns it as a namespace of Python values.

  Args:
    config: ml_collections.ConfigDict (or mapping) with exactly the keys of configs/degradation.py.
  Returns:
    types.SimpleNamespace with tuples of floats for ranges and probability vectors.
  Raises:
    ValueError naming the key, for unknown or missing keys, probability vectors of the wrong length
    or not summing to 1, probabilities outside [0, 1], and malformed ranges.
  """
  values = dict(config.items())
  known = set(_PROB_VECTORS) | set(_PROBS) | set(_RANGES) | set(_OTHER)
  unknown, missing = sorted(set(values) - known), sorted(known - set(values))
  if unknown:
    raise ValueError(f"Unknown degradation config key(s) {unknown}; known keys: {sorted(known)}.")
  if missing:
    raise ValueError(f"Degradation config is missing key(s) {missing} "
                     "(see configs/degradation.py).")
  out = {}
  for key, length in _PROB_VECTORS.items():
    probs = tuple(float(p) for p in values[key])
    if len(probs) != length or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
      raise _error(key, f"{length} non-negative probabilities summing to 1", values[key])
    out[key] = probs
  for key in _PROBS:
    if not 0 <= float(values[key]) <= 1:
      raise _error(key, "a probability in [0, 1]", values[key])
    out[key] = float(values[key])
  for key in _RANGES:
    rng = tuple(float(v) for v in values[key])
    if len(rng) != 2 or rng[0] > rng[1]:
      raise _error(key, "a (low, high) pair with low <= high", values[key])
    out[key] = rng
  for key in ("resize_range", "resize_range2", "betag_range", "betag_range2", "betap_range",
              "betap_range2"):
    if not 0 < out[key][0] <= 1 <= out[key][1]:
      raise _error(key, "0 < low <= 1 <= high (draws are U(low, 1) and U(1, high))", values[key])
  for key in ("jpeg_range", "jpeg_range2"):
    if not 0 < out[key][0] and out[key][1] <= 100:
      raise _error(key, "qualities in (0, 100]", values[key])
  modes = tuple(values["resize_modes"])
  if not modes or not set(modes) <= set(RESIZE_MODES):
    raise _error("resize_modes", f"a non-empty subset of {RESIZE_MODES}", values["resize_modes"])
  back_modes = tuple(values["resize_back_modes"])
  if not back_modes or not set(back_modes) <= set(RESIZE_BACK_MODES):
    raise _error("resize_back_modes", f"a non-empty subset of {RESIZE_BACK_MODES}",
                 values["resize_back_modes"])
  pad_to = int(values["kernel_pad_to"])
  sizes = tuple(int(k) for k in values["kernel_sizes"])
  if pad_to % 2 != 1:
    raise _error("kernel_pad_to", "an odd int", pad_to)
  if not sizes or any(k % 2 != 1 or not 0 < k <= pad_to for k in sizes):
    raise _error("kernel_sizes", f"odd sizes in [1, kernel_pad_to={pad_to}]",
                 values["kernel_sizes"])
  for key in ("scale", "poisson_levels"):
    if int(values[key]) < 1:
      raise _error(key, "a positive int", values[key])
  out.update(scale=int(values["scale"]), per_sample=bool(values["per_sample"]),
             resize_back=bool(values["resize_back"]), resize_modes=modes,
             resize_back_modes=back_modes, kernel_sizes=sizes,
             kernel_pad_to=pad_to, poisson_levels=int(values["poisson_levels"]),
             unroll_poisson=bool(values["unroll_poisson"]))
  return types.SimpleNamespace(**out)


def _lerp(u, lo_hi):
  return lo_hi[0] + u * (lo_hi[1] - lo_hi[0])


def _random_scale(u_kind, u_value, probs, scale_range):
  """Up U(1, hi), down U(lo, 1) or keep 1, chosen with `probs` (up, down, keep)."""
  kind = jnp.sum(u_kind >= jnp.asarray(np.cumsum(probs)[:-1], jnp.float32))
  return jnp.stack([_lerp(u_value, (1.0, scale_range[1])), _lerp(u_value, (scale_range[0], 1.0)),
                    jnp.float32(1)])[kind]


# Named scalar draws of one chain; each gets its own entry of one uniform vector.
_SCALAR_DRAWS = ("blur2", "sinc_first", "mode1", "mode2", "mode_final", "mode_back") + tuple(
    f"{n}{i}" for i in (1, 2)
    for n in ("scale_kind", "scale", "gauss", "sigma", "poisson", "gray", "quality"))


def _draw(key, s):
  """The random parameters of one chain, a dict of scalars and (pad_to, pad_to) kernels.

  One key per purpose (two blur kernels, the final sinc, the scalars); the scalars share one
  uniform vector, which keeps the number of PRNG calls, and so the compiled program, small.
  """
  k_kernel1, k_kernel2, k_sinc, k_scalars = jax.random.split(key, 4)
  u = dict(zip(_SCALAR_DRAWS, jax.random.uniform(k_scalars, (len(_SCALAR_DRAWS),))))
  p = {}
  for i, suffix, k_kernel in ((1, "", k_kernel1), (2, "2", k_kernel2)):
    get = functools.partial(lambda name, sfx: getattr(s, name + sfx), sfx=suffix)
    p[f"kernel{i}"] = kernels.random_blur_kernel(
        k_kernel, s.kernel_sizes, get("sinc_prob"), get("kernel_prob"), get("blur_sigma"),
        s.rotation_range, get("betag_range"), get("betap_range"), s.kernel_pad_to)
    p[f"scale{i}"] = _random_scale(u[f"scale_kind{i}"], u[f"scale{i}"], get("resize_prob"),
                                   get("resize_range"))
    p[f"gauss{i}"] = u[f"gauss{i}"] < get("gaussian_noise_prob")
    p[f"sigma{i}"] = _lerp(u[f"sigma{i}"], get("noise_range")) / 255.0
    p[f"poisson{i}"] = _lerp(u[f"poisson{i}"], get("poisson_scale_range"))
    p[f"gray{i}"] = u[f"gray{i}"] < get("gray_noise_prob")
    p[f"quality{i}"] = _lerp(u[f"quality{i}"], get("jpeg_range"))
  # A skipped second blur is a pulse: one filter call serves both cases.
  p["kernel2"] = jnp.where(u["blur2"] < s.second_blur_prob, p["kernel2"],
                           kernels.pulse(s.kernel_pad_to))
  p["sinc"] = kernels.random_final_sinc(k_sinc, s.kernel_sizes, s.final_sinc_prob, s.kernel_pad_to)
  p["sinc_first"] = u["sinc_first"] < s.resize_sinc_first_prob
  for name in ("mode1", "mode2", "mode_final", "mode_back"):
    count = len(s.resize_back_modes if name == "mode_back" else s.resize_modes)
    p[name] = jnp.minimum((u[name] * count).astype(jnp.int32), count - 1)
  return p


def sample_params(key, batch, config):
  """Draws the chain parameters of a batch: a dict of arrays with leading axis `batch`.

  Args:
    key: PRNG key.
    batch: static batch size.
    config: degradation config (ConfigDict) or the namespace from `validate_config`.
  """
  s = config if isinstance(config, types.SimpleNamespace) else validate_config(config)
  k_shared, k_samples = jax.random.split(key)
  params = jax.vmap(lambda k: _draw(k, s))(jax.random.split(k_samples, batch))
  if s.per_sample:
    return params
  shared = _draw(k_shared, s)
  return {name: value if name in _ALWAYS_PER_SAMPLE else
          jnp.broadcast_to(shared[name], value.shape) for name, value in params.items()}


def _ceil16(n):
  return -(-n // 16) * 16


def _fft_size(n):
  """Smallest 2^a 3^b 5^c >= n (fast FFT lengths)."""
  while True:
    m = n
    for f in (2, 3, 5):
      while m % f == 0:
        m //= f
    if m == 1:
      return n
    n += 1


def _reflect(idx, n):
  """PyTorch 'reflect' padding index map (edge not repeated) onto [0, n); n may be traced."""
  period = jnp.maximum(2 * (n - 1), 1)
  idx = jnp.mod(idx, period)
  return jnp.where(idx >= n, period - idx, idx)


def filter2d(x, kernel, size=None):
  """basicsr `filter2D` of one image: reflect padding by k//2, then cross-correlation (via FFT).

  Args:
    x: (H, W, C) float canvas.
    kernel: (k, k), k odd.
    size: optional effective (h, w) (may be traced): reflection happens at that border; rows and
      columns past it come back unspecified.
  Returns:
    (H, W, C) float32.
  """
  height, width = x.shape[0], x.shape[1]
  k = kernel.shape[0]
  pad = k // 2
  h, w = (height, width) if size is None else size
  xp = x[_reflect(jnp.arange(-pad, height + pad), h)][:, _reflect(jnp.arange(-pad, width + pad), w)]
  fft_shape = (_fft_size(height + 2 * pad), _fft_size(width + 2 * pad))
  spectrum = jnp.fft.rfft2(xp, s=fft_shape, axes=(0, 1))
  spectrum = spectrum * jnp.fft.rfft2(kernel[::-1, ::-1], s=fft_shape)[..., None]
  y = jnp.fft.irfft2(spectrum, s=fft_shape, axes=(0, 1))
  return y[k - 1:k - 1 + height, k - 1:k - 1 + width].astype(jnp.float32)


def _poisson_counts(level, u, levels, unroll):
  """Inverse-CDF Poisson draws: the count whose CDF interval holds u, without table lookups.

  The rate is lam = k * levels / 255 for the 8-bit level k. The probabilities are summed along
  the pmf recurrence p(j + 1) = p(j) lam / (j + 1) over a window [j0, j0 + W) that holds all but
  ~1e-9 of the mass (j0 = lam - 6 sqrt(lam) - 6, W = 13 sqrt(levels) + 16 static) and normalised by
  the window's total, which cancels the float32 error of p(j0). Elementwise: no gathers
  (per-pixel table lookups are slow on TPUs); the two passes are `fori_loop`s, so the compiled
  program does not grow with the window (`unroll` True unrolls them: XLA:TPU's cost analysis
  gives no time estimate for a program with loops). Agrees with a float64 CDF table up to
  float32 rounding (one draw in ~1e5 differs by one).

  Args:
    level: int32 8-bit levels k.
    u: uniforms in (0, 1), same shape.
    unroll: static bool.
  """
  lam = level.astype(jnp.float32) * (levels / 255)
  j0 = jnp.maximum(jnp.floor(lam - 6.0 * jnp.sqrt(lam) - 6.0), 0.0)
  width = int(math.ceil(13 * math.sqrt(levels) + 16))
  log_p0 = j0 * jnp.log(jnp.maximum(lam, 1e-30)) - lam - jax.lax.lgamma(j0 + 1.0)
  p0 = jnp.where(lam > 0, jnp.exp(log_p0), 1.0)

  def add_mass(i, carry):
    p, total = carry
    p = p * (lam / (j0 + i))
    return p, total + p

  _, total = jax.lax.fori_loop(1, width, add_mass, (p0, p0), unroll=unroll)
  threshold = u * total

  def add_count(i, carry):
    p, cdf, count = carry
    p = p * (lam / (j0 + i))
    cdf = cdf + p
    return p, cdf, count + (cdf < threshold)

  return jax.lax.fori_loop(1, width, add_count, (p0, p0, j0 + (p0 < threshold)),
                           unroll=unroll)[2]


def add_noise(x, key, gaussian, sigma, poisson_scale, gray, levels, unroll=False):
  """basicsr's Gaussian-or-Poisson noise (with the gray-noise option) on one image, then clip.

  Args:
    x: (H, W, 3) float image.
    key: PRNG key.
    gaussian: bool scalar, Gaussian (else Poisson) noise.
    sigma: Gaussian standard deviation in [0, 1] units.
    poisson_scale: multiplier of the Poisson noise.
    gray: bool scalar, the same noise on all channels (from the luma for Poisson).
    levels: static Poisson levels (counts are Poisson(levels * x) / levels).
  Returns:
    (H, W, 3) float32 in [0, 1].
  """
  # Midpoints of the 2^-23 grid keep u inside (0, 1), so the inverse CDFs stay finite.
  u = jax.random.uniform(key, x.shape, jnp.float32) + 2.0**-24
  z = jax.scipy.special.ndtri(u)
  gauss_noise = sigma * jnp.where(gray, z[..., :1], z)
  quantised = jnp.clip(jnp.round(x * 255.0), 0, 255)
  luma = jnp.clip(jnp.round(x @ jnp.asarray(_GRAY_WEIGHTS, x.dtype) * 255.0), 0, 255)[..., None]
  color = (_poisson_counts(quantised.astype(jnp.int32), u, levels, unroll) / levels
           - quantised / 255.0)
  mono = _poisson_counts(luma.astype(jnp.int32), u[..., :1], levels, unroll) / levels - luma / 255.0
  poisson_noise = poisson_scale * jnp.where(gray, mono, color)
  return jnp.clip(x + jnp.where(gaussian, gauss_noise, poisson_noise), 0.0, 1.0)


def _degrade_one(hq, p, key, s):
  """The chain on one (H, W, 3) image with parameters p (a dict of scalars and kernels)."""
  height, width = hq.shape[0], hq.shape[1]
  modes = s.resize_modes
  k_noise1, k_noise2 = jax.random.split(key)
  lr = (height // s.scale, width // s.scale)
  top1 = max(1.0, s.resize_range[1])
  canvas1 = (_ceil16(math.floor(height * top1)), _ceil16(math.floor(width * top1)))
  top2 = max(1.0, s.resize_range2[1])
  canvas2 = (_ceil16(math.floor(height / s.scale * top2)),
             _ceil16(math.floor(width / s.scale * top2)))
  canvas3 = (_ceil16(lr[0]), _ceil16(lr[1]))
  # Stage 1: F.interpolate(scale_factor=s1): size floor(H s1), coordinates mapped by 1/s1.
  x = filter2d(hq, p["kernel1"])
  size1 = (jnp.floor(height * p["scale1"]).astype(jnp.int32),
           jnp.floor(width * p["scale1"]).astype(jnp.int32))
  x = resize_lib.resize_canvas(x, canvas1, (height, width), size1, p["mode1"], modes,
                               (1 / p["scale1"], 1 / p["scale1"]))
  x = add_noise(x, k_noise1, p["gauss1"], p["sigma1"], p["poisson1"], p["gray1"], s.poisson_levels,
                s.unroll_poisson)
  x = jpeg_lib.jpeg(x, p["quality1"], size1)
  # Stage 2: F.interpolate(size=int(H / scale * s2)).
  x = filter2d(x, p["kernel2"], size1)
  size2 = (jnp.floor(height / s.scale * p["scale2"]).astype(jnp.int32),
           jnp.floor(width / s.scale * p["scale2"]).astype(jnp.int32))
  x = resize_lib.resize_canvas(x, canvas2, size1, size2, p["mode2"], modes)
  x = add_noise(x, k_noise2, p["gauss2"], p["sigma2"], p["poisson2"], p["gray2"], s.poisson_levels,
                s.unroll_poisson)

  def resize_sinc(y, size):
    y = resize_lib.resize_canvas(y, canvas3, size, lr, p["mode_final"], modes)
    return filter2d(y, p["sinc"], lr)

  # Both orders are computed on the small LR canvases and one is selected per sample.
  sinc_first = jpeg_lib.jpeg(resize_sinc(x, size2), p["quality2"], lr)
  jpeg_first = resize_sinc(jpeg_lib.jpeg(x, p["quality2"], size2), size2)
  x = jnp.where(p["sinc_first"], sinc_first, jpeg_first)[:lr[0], :lr[1]]
  if s.resize_back:
    back = s.resize_back_modes
    rows = jnp.stack([resize_lib.interp_matrix(lr[0], height, m) for m in back])[p["mode_back"]]
    cols = jnp.stack([resize_lib.interp_matrix(lr[1], width, m) for m in back])[p["mode_back"]]
    x = jnp.einsum("oh,hwc,pw->opc", rows, x, cols, precision="highest")
  return jnp.clip(jnp.round(x * 255.0), 0, 255) / 255.0


def degrade(key, hq, config):
  """Real-ESRGAN second-order degradation of an HQ batch (pure; jit with the config closed over).

  Args:
    key: PRNG key; split into one key for the parameters and one per sample for the noise.
    hq: (B, H, W, 3) float in [0, 1], static shape; H, W >= 16.
    config: degradation ConfigDict (configs/degradation.py) or `validate_config`'s namespace.
  Returns:
    LQ float32 on the 1/255 grid in [0, 1]: (B, H, W, 3) with resize_back, else
    (B, H // scale, W // scale, 3).
  """
  s = config if isinstance(config, types.SimpleNamespace) else validate_config(config)
  if hq.ndim != 4 or hq.shape[-1] != 3 or min(hq.shape[1:3]) < 16:
    raise ValueError(f"degrade expects an NHWC RGB batch with H, W >= 16, got shape {hq.shape}.")
  k_params, k_noise = jax.random.split(key)
  params = sample_params(k_params, hq.shape[0], s)
  noise_keys = jax.random.split(k_noise, hq.shape[0])
  return jax.vmap(lambda x, p, k: _degrade_one(x, p, k, s))(hq.astype(jnp.float32), params,
                                                            noise_keys)


def make_degrade(config):
  """Validates `config` once and returns the jitted `(key, hq) -> lq` of `degrade`."""
  return jax.jit(functools.partial(degrade, config=validate_config(config)))
