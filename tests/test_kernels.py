"""Blur kernels against closed forms and an independent NumPy port of basicsr's generators."""
import math

import numpy as np
import pytest
from scipy import special

import jax
import jax.numpy as jnp

from vosr_jax.data import kernels

SIZES = (7, 9, 11, 13, 15, 17, 19, 21)
PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)


def np_grid(size):
  ax = np.arange(-size // 2 + 1.0, size // 2 + 1.0)
  return np.meshgrid(ax, ax)


def np_sigma(sig_x, sig_y, theta):
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  return rot @ np.diag([sig_x**2, sig_y**2]) @ rot.T


def np_quadratic(size, sig_x, sig_y, theta):
  xx, yy = np_grid(size)
  grid = np.stack([xx, yy], -1)
  return np.sum((grid @ np.linalg.inv(np_sigma(sig_x, sig_y, theta))) * grid, -1)


def np_kernel(family, size, sig_x, sig_y, theta, beta):
  q = np_quadratic(size, sig_x, sig_y, theta)
  k = {"gauss": np.exp(-0.5 * q), "generalized": np.exp(-0.5 * q**beta),
       "plateau": 1 / (q**beta + 1)}[family]
  return k / k.sum()


def np_sinc(cutoff, size):
  c = (size - 1) / 2
  y, x = np.mgrid[:size, :size]
  r = np.hypot(x - c, y - c)
  with np.errstate(invalid="ignore", divide="ignore"):
    k = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
  k[int(c), int(c)] = cutoff**2 / (4 * np.pi)
  return k / k.sum()


@pytest.mark.parametrize("sig_x,sig_y,theta,beta", [(1.0, 1.0, 0.0, 1.0), (2.5, 0.7, 0.6, 0.5),
                                                    (0.3, 2.9, -2.4, 3.7), (1.7, 1.1, 3.0, 1.6)])
def test_closed_forms_match_numpy(sig_x, sig_y, theta, beta):
  for family, fn in (("gauss", lambda: kernels.bivariate_gaussian(21, sig_x, sig_y, theta)),
                     ("generalized", lambda: kernels.bivariate_generalized_gaussian(
                         21, sig_x, sig_y, theta, beta)),
                     ("plateau", lambda: kernels.bivariate_plateau(21, sig_x, sig_y, theta, beta))):
    got = np.asarray(fn())
    np.testing.assert_allclose(got, np_kernel(family, 21, sig_x, sig_y, theta, beta), atol=2e-6)
    assert got.sum() == pytest.approx(1.0, abs=1e-5)


def test_bessel_and_sinc_match_scipy():
  x = np.linspace(0, 45, 4001, dtype=np.float32)
  np.testing.assert_allclose(np.asarray(kernels.bessel_j1(x)), special.j1(x), atol=3e-6)
  for cutoff, size in ((math.pi / 3, 7), (math.pi / 5, 21), (math.pi, 13), (2.0, 21)):
    got = np.asarray(kernels.circular_lowpass_kernel(cutoff, size))
    np.testing.assert_allclose(got, np_sinc(cutoff, size), atol=1e-6)


def test_isotropy_and_point_symmetry():
  iso = np.asarray(kernels.bivariate_gaussian(21, 1.8, 1.8, 1.1))  # the angle is irrelevant
  for view in (iso.T, iso[::-1], iso[:, ::-1], np.rot90(iso)):
    np.testing.assert_allclose(view, iso, atol=1e-7)
  aniso = np.asarray(kernels.bivariate_plateau(21, 2.0, 0.5, 0.4, 1.5))
  np.testing.assert_allclose(aniso[::-1, ::-1], aniso, atol=1e-7)
  assert np.abs(aniso - aniso.T).max() > 1e-3


@pytest.mark.parametrize("sig_x,sig_y,theta", [(3.0, 1.0, 0.0), (3.0, 1.0, math.pi / 4),
                                               (2.0, 4.0, -1.0)])
def test_anisotropic_covariance_and_rotation(sig_x, sig_y, theta):
  size = 61  # wide enough that truncation does not bias the second moments
  k = np.asarray(kernels.bivariate_gaussian(size, sig_x, sig_y, theta), np.float64)
  xx, yy = np_grid(size)
  cov = np.array([[np.sum(k * xx * xx), np.sum(k * xx * yy)],
                  [np.sum(k * xx * yy), np.sum(k * yy * yy)]])
  np.testing.assert_allclose(cov, np_sigma(sig_x, sig_y, theta), atol=2e-3)
  # Rotating by 90 degrees swaps the axes: theta + pi/2 with (sig_y, sig_x) is the same kernel.
  swapped = np.asarray(kernels.bivariate_gaussian(size, sig_y, sig_x, theta + math.pi / 2))
  np.testing.assert_allclose(swapped, k, atol=1e-6)


@pytest.mark.parametrize("cutoff", [math.pi / 4, math.pi / 2])
def test_sinc_cutoff(cutoff):
  k = np.asarray(kernels.circular_lowpass_kernel(cutoff, 21), np.float64)
  n = 256
  response = np.abs(np.fft.fft2(k, (n, n)))
  f = np.fft.fftfreq(n) * 2 * np.pi
  radius = np.hypot(*np.meshgrid(f, f))
  # A 21-tap truncation leaves Gibbs ripple of about 15% around the ideal 1 / 0 response.
  assert response[radius < 0.7 * cutoff].min() > 0.8
  assert response[radius > 1.3 * cutoff].max() < 0.2


def test_truncate_equals_generate_then_pad():
  for size in (7, 13):
    got = np.asarray(kernels.truncate(kernels.bivariate_gaussian(21, 2.0, 1.0, 0.3), size))
    pad = (21 - size) // 2
    want = np.pad(np_kernel("gauss", size, 2.0, 1.0, 0.3, 1.0), pad)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_random_kernels():
  keys = jax.random.split(jax.random.key(0), 2000)
  blur = jax.jit(jax.vmap(lambda k: kernels.random_blur_kernel(
      k, SIZES, 0.1, PROBS, (0.2, 3.0), (-math.pi, math.pi), (0.5, 4.0), (1.0, 2.0))))
  ks = np.asarray(blur(keys))
  assert ks.shape == (2000, 21, 21)
  np.testing.assert_allclose(ks.sum((1, 2)), 1.0, atol=1e-5)
  np.testing.assert_allclose(ks[:, ::-1, ::-1], ks, atol=1e-6)
  support = np.array([np.max(np.abs(np.nonzero(np.abs(k) > 0)[0] - 10)) * 2 + 1 for k in ks])
  # Narrow Gaussians underflow to exact zeros before the truncation edge, so the support can be
  # smaller than the drawn size, never larger; every size must occur.
  assert set(support) >= set(SIZES) and max(support) == 21
  final = jax.jit(jax.vmap(lambda k: kernels.random_final_sinc(k, SIZES, 0.8)))(keys)
  pulse_rate = np.mean(np.asarray(final)[:, 10, 10] == 1.0)
  assert abs(pulse_rate - 0.2) < 4 * math.sqrt(0.2 * 0.8 / 2000)
  assert jnp.allclose(kernels.pulse(21).sum(), 1.0)
