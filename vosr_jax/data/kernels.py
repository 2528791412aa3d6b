"""Blur kernels of the Real-ESRGAN degradation (basicsr 1.4.2 `degradations.py`), in JAX.

Kernels are (k, k) float32 arrays that sum to 1, indexed [row, column]. The grid follows basicsr's
`mesh_grid`: x is the column offset from the centre, y the row offset. A kernel of traced odd size
`size` is built on a static `pad_to` grid and truncated to the central size x size square before
normalising, which equals basicsr's "generate at `size`, then zero-pad to `pad_to`".
"""
import math

import numpy as np

import jax
import jax.numpy as jnp

# The order of `kernel_list` in params_realsr.yml; family probabilities are given in this order.
FAMILIES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def mesh_grid(size):
  """Centre offsets (xx, yy), each (size, size) float32: xx = column offset, yy = row offset."""
  ax = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  return jnp.meshgrid(ax, ax)


def _mahalanobis(size, sig_x, sig_y, theta):
  """Squared Mahalanobis distance [x y] Sigma^-1 [x y]^T on the (size, size) grid."""
  xx, yy = mesh_grid(size)
  # Sigma^-1 = R diag(1/sig_x^2, 1/sig_y^2) R^T: no general matrix inverse in the traced graph.
  c, s = jnp.cos(theta), jnp.sin(theta)
  u, v = c * xx + s * yy, -s * xx + c * yy  # coordinates in the kernel's principal axes
  return (u / sig_x)**2 + (v / sig_y)**2


def bivariate_gaussian(size, sig_x, sig_y, theta):
  """Normalised exp(-Q/2), Q the squared Mahalanobis distance. (size, size)."""
  k = jnp.exp(-0.5 * _mahalanobis(size, sig_x, sig_y, theta))
  return k / jnp.sum(k)


def bivariate_generalized_gaussian(size, sig_x, sig_y, theta, beta):
  """Normalised exp(-Q^beta / 2) (basicsr `bivariate_generalized_Gaussian`). (size, size)."""
  k = jnp.exp(-0.5 * jnp.power(_mahalanobis(size, sig_x, sig_y, theta), beta))
  return k / jnp.sum(k)


def bivariate_plateau(size, sig_x, sig_y, theta, beta):
  """Normalised 1 / (Q^beta + 1) (basicsr `bivariate_plateau`). (size, size)."""
  k = 1.0 / (jnp.power(_mahalanobis(size, sig_x, sig_y, theta), beta) + 1.0)
  return k / jnp.sum(k)


def bessel_j1(x):
  """Bessel function J1 for x >= 0 (Numerical Recipes rational approximations, |err| < 3e-6 in f32).

  jax.scipy.special.bessel_jn returns NaN on this JAX version, hence this implementation.
  """
  x = jnp.asarray(x, jnp.float32)
  y = x * x
  small = x * (72362614232.0 + y * (-7895059235.0 + y * (242396853.1 + y * (
      -2972611.439 + y * (15704.48260 + y * -30.16036606))))) / (144725228442.0 + y * (
          2300535178.0 + y * (18583304.74 + y * (99447.43394 + y * (376.9991397 + y)))))
  xl = jnp.maximum(x, 8.0)  # keeps the large-argument branch finite where it is not selected
  z = 8.0 / xl
  zz = z * z
  p = 1.0 + zz * (0.183105e-2 + zz * (-0.3516396496e-4 + zz * (
      0.2457520174e-5 + zz * -0.240337019e-6)))
  q = 0.04687499995 + zz * (-0.2002690873e-3 + zz * (0.8449199096e-5 + zz * (
      -0.88228987e-6 + zz * 0.105787412e-6)))
  xx = xl - 2.356194491
  large = jnp.sqrt(0.636619772 / xl) * (jnp.cos(xx) * p - z * jnp.sin(xx) * q)
  return jnp.where(x < 8.0, small, large)


def circular_lowpass_kernel(cutoff, size):
  """Normalised 2-D sinc (ideal circular low-pass) kernel, basicsr `circular_lowpass_kernel`.

  k(r) = cutoff J1(cutoff r) / (2 pi r), with the limit cutoff^2 / (4 pi) at r = 0.

  Args:
    cutoff: angular cut-off frequency omega_c in radians per pixel (may be traced).
    size: static odd kernel size.
  Returns:
    (size, size) float32 summing to 1.
  """
  xx, yy = mesh_grid(size)
  r = jnp.sqrt(xx * xx + yy * yy)
  safe_r = jnp.where(r > 0, r, 1.0)
  k = jnp.where(r > 0, cutoff * bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r),
                cutoff**2 / (4 * math.pi))
  return k / jnp.sum(k)


def truncate(kernel, size):
  """Keeps the central size x size square (size odd, may be traced) and renormalises to sum 1."""
  xx, yy = mesh_grid(kernel.shape[0])
  half = (size - 1) / 2
  k = jnp.where((jnp.abs(xx) <= half) & (jnp.abs(yy) <= half), kernel, 0.0)
  return k / jnp.sum(k)


def pulse(pad_to):
  """Identity kernel: 1 at the centre of a (pad_to, pad_to) grid."""
  c = pad_to // 2
  return jnp.zeros((pad_to, pad_to), jnp.float32).at[c, c].set(1.0)


def _choose(u, probs):
  """Index drawn with static probabilities `probs` from a uniform u in [0, 1) (inverse CDF)."""
  edges = np.cumsum(np.asarray(probs, np.float64))[:-1]
  return jnp.sum(u >= jnp.asarray(edges, jnp.float32)).astype(jnp.int32)


def _pick(u, values):
  """Uniform choice among static `values` from a uniform u in [0, 1)."""
  return jnp.asarray(values, jnp.int32)[jnp.minimum((u * len(values)).astype(jnp.int32),
                                                    len(values) - 1)]


def _lerp(u, lo, hi):
  return lo + u * (hi - lo)


def _split_beta(u_side, u_val, beta_range):
  """basicsr's shape draw: U(beta_lo, 1) or U(1, beta_hi), each with probability 1/2."""
  return jnp.where(u_side < 0.5, _lerp(u_val, beta_range[0], 1.0), _lerp(u_val, 1.0, beta_range[1]))


def random_mixed_kernel(key, size, family_probs, sigma_range, rotation_range, betag_range,
                        betap_range, pad_to=21):
  """One kernel of a random family (basicsr `random_mixed_kernels`), truncated to `size`.

  Isotropic families use sig_y = sig_x and no rotation; anisotropic ones draw sig_x, sig_y from
  `sigma_range` and the angle from `rotation_range`. All draws come from one uniform vector (one
  PRNG call instead of one per draw keeps the compiled program small).

  Args:
    key: PRNG key.
    size: odd kernel size (int32, may be traced) <= pad_to.
    family_probs: probabilities of FAMILIES (static, summing to 1).
    sigma_range, rotation_range, betag_range, betap_range: (lo, hi) ranges.
    pad_to: static grid size.
  Returns:
    (pad_to, pad_to) float32 kernel summing to 1.
  """
  u = jax.random.uniform(key, (8,))
  family = _choose(u[0], family_probs)
  iso = family % 2 == 0
  sig_x = _lerp(u[1], *sigma_range)
  sig_y = jnp.where(iso, sig_x, _lerp(u[2], *sigma_range))
  theta = jnp.where(iso, 0.0, _lerp(u[3], *rotation_range))
  kernels = jnp.stack([
      bivariate_gaussian(pad_to, sig_x, sig_y, theta),
      bivariate_generalized_gaussian(pad_to, sig_x, sig_y, theta,
                                     _split_beta(u[4], u[5], betag_range)),
      bivariate_plateau(pad_to, sig_x, sig_y, theta, _split_beta(u[6], u[7], betap_range)),
  ])
  return truncate(kernels[family // 2], size)


def random_blur_kernel(key, kernel_sizes, sinc_prob, family_probs, sigma_range, rotation_range,
                       betag_range, betap_range, pad_to=21):
  """Real-ESRGAN's first/second blur kernel (`RealESRGANDataset.__getitem__`).

  The size is drawn uniformly from `kernel_sizes`. With probability `sinc_prob` the kernel is a
  sinc with omega_c ~ U(pi/3, pi) for sizes < 13 and U(pi/5, pi) otherwise; else a mixed kernel.

  Returns:
    (pad_to, pad_to) float32 kernel summing to 1.
  """
  k_draw, k_mixed = jax.random.split(key)
  u = jax.random.uniform(k_draw, (3,))
  size = _pick(u[0], kernel_sizes)
  cutoff = jnp.where(size < 13, _lerp(u[1], math.pi / 3, math.pi),
                     _lerp(u[1], math.pi / 5, math.pi))
  sinc = truncate(circular_lowpass_kernel(cutoff, pad_to), size)
  mixed = random_mixed_kernel(k_mixed, size, family_probs, sigma_range, rotation_range,
                              betag_range, betap_range, pad_to)
  return jnp.where(u[2] < sinc_prob, sinc, mixed)


def random_final_sinc(key, kernel_sizes, sinc_prob, pad_to=21):
  """The final filter: with probability `sinc_prob` a sinc, omega_c ~ U(pi/3, pi); else a pulse."""
  u = jax.random.uniform(key, (3,))
  size = _pick(u[0], kernel_sizes)
  sinc = truncate(circular_lowpass_kernel(_lerp(u[1], math.pi / 3, math.pi), pad_to), size)
  return jnp.where(u[2] < sinc_prob, sinc, pulse(pad_to))
