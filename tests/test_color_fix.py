"""`vosr_jax.color_fix`: the AdaIN and wavelet (Gaussian split) colour fixes against PyTorch,
OpenCV and NumPy references, the dispatcher, and the one float -> uint8 rounding."""
import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vosr_jax import color_fix


def _numpy_blur(x, sigma):
  """Separable Gaussian of (H, W, C) float64 with reflect-101 borders (np.pad 'reflect')."""
  radius = int(round(4 * sigma))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps /= taps.sum()
  p = np.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
  h, w = x.shape[:2]
  p = sum(t * p[i:i + h] for i, t in enumerate(taps))
  return sum(t * p[:, i:i + w] for i, t in enumerate(taps))


def test_adain_matches_torch_unbiased_std():
  rng = np.random.default_rng(0)
  sr, src = rng.random((2, 1, 16, 12, 3), np.float32)
  sr = sr * 0.5 + 0.2
  ours = color_fix.adain(jnp.asarray(sr), jnp.asarray(src))
  t_sr, t_src = torch.from_numpy(sr).permute(0, 3, 1, 2), torch.from_numpy(src).permute(0, 3, 1, 2)

  def stats(a):
    return a.mean((2, 3), keepdim=True), a.flatten(2).std(2)[..., None, None] + 1e-5

  (m1, s1), (m2, s2) = stats(t_sr), stats(t_src)
  ref = ((t_sr - m1) / s1 * s2 + m2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_gaussian_split_matches_opencv():
  rng = np.random.default_rng(1)
  sr, src = rng.random((2, 48, 40, 3), np.float32)
  ours = color_fix.gaussian_split(jnp.asarray(sr[None]), jnp.asarray(src[None]))[0]
  ref = np.clip(cv2.GaussianBlur(src, (0, 0), 5) + sr - cv2.GaussianBlur(sr, (0, 0), 5), 0, 1)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_to_uint8_rounds():
  x = jnp.asarray([0.0, 0.499 / 255, 0.501 / 255, 254.6 / 255, 1.2])
  assert color_fix.to_uint8(x).tolist() == [0, 0, 1, 255, 255]


def test_adain_matches_a_numpy_reference_and_transfers_the_statistics():
  rng = np.random.default_rng(2)
  sr = rng.random((2, 20, 24, 3)) * 0.2 + 0.3
  src = rng.random((2, 20, 24, 3)) * 0.3 + 0.35
  mean = lambda a: a.mean(axis=(1, 2), keepdims=True)  # pylint: disable=unnecessary-lambda-assignment
  std = lambda a: a.std(axis=(1, 2), ddof=1, keepdims=True)  # pylint: disable=unnecessary-lambda-assignment
  ref = np.clip((sr - mean(sr)) / (std(sr) + 1e-5) * (std(src) + 1e-5) + mean(src), 0, 1)
  ours = np.asarray(color_fix.adain(jnp.asarray(sr, jnp.float32), jnp.asarray(src, jnp.float32)))
  np.testing.assert_allclose(ours, ref, atol=2e-6)
  # Nothing is clipped here: the result has the source's per-image, per-channel statistics.
  assert 0 < ref.min() and ref.max() < 1
  np.testing.assert_allclose(mean(ours), mean(src), atol=1e-6)
  np.testing.assert_allclose(std(ours), std(src), rtol=1e-4)


@pytest.mark.parametrize("shape, sigma", [((9, 7, 3), 1.5), ((33, 30, 2), 5.0)])
def test_gaussian_blur_matches_numpy_and_opencv(shape, sigma):
  x = np.random.default_rng(3).random(shape)
  ours = np.asarray(color_fix.gaussian_blur(jnp.asarray(x[None], jnp.float32), sigma))[0]
  np.testing.assert_allclose(ours, _numpy_blur(x, sigma), atol=1e-5)
  cv = cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
  np.testing.assert_allclose(ours, cv.reshape(shape), atol=1e-5)


def test_wavelet_is_the_low_frequencies_of_src_plus_the_high_of_sr():
  rng = np.random.default_rng(4)
  sr, src = rng.random((2, 24, 28, 3))
  ref = np.clip(_numpy_blur(src, 5.0) + sr - _numpy_blur(sr, 5.0), 0, 1)
  ours = color_fix.gaussian_split(jnp.asarray(sr[None], jnp.float32),
                                  jnp.asarray(src[None], jnp.float32))[0]
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_apply_dispatches_by_name():
  rng = np.random.default_rng(5)
  sr = jnp.asarray(rng.random((1, 16, 16, 3)) * 1.4 - 0.2, jnp.float32)
  src = jnp.asarray(rng.random((1, 16, 16, 3)), jnp.float32)
  np.testing.assert_array_equal(color_fix.apply("adain", sr, src), color_fix.adain(sr, src))
  np.testing.assert_array_equal(color_fix.apply("wavelet", sr, src),
                                color_fix.gaussian_split(sr, src))
  np.testing.assert_array_equal(color_fix.apply("none", sr, src), np.clip(sr, 0, 1))
  with pytest.raises(ValueError, match="unknown colour fix 'histogram'"):
    color_fix.apply("histogram", sr, src)


def test_to_uint8_rounds_to_nearest_and_keeps_the_array_kind():
  x = np.array([-0.1, 0.5, 1.0, 127.4 / 255, 1.7], np.float32)
  want = [0, 128, 255, 127, 255]  # 0.5 -> 127.5 -> 128, where truncation gives 127
  got = color_fix.to_uint8(x)
  assert isinstance(got, np.ndarray) and got.dtype == np.uint8 and got.tolist() == want
  assert jax.jit(color_fix.to_uint8)(jnp.asarray(x)).tolist() == want


def test_to_uint8_of_signed_images_is_the_former_signed_rounding():
  """(x + 1) / 2 through to_uint8 equals round((x + 1) * 127.5) for every float32 [-1, 1] input
  (the validation LR's conversion before there was one helper)."""
  x = np.concatenate([np.linspace(-1.1, 1.1, 200_001, dtype=np.float32),
                      np.arange(-255, 256, dtype=np.float32) / 255 * 2 - 1 + 1 / 255])
  former = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(color_fix.to_uint8((x + 1.0) / 2.0), former)
