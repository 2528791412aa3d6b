"""The Real-ESRGAN chain: building blocks against torch, noise statistics, and the whole chain."""
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

import jax
import jax.numpy as jnp

from vosr_jax.data import degradation
from vosr_jax.data import resize
from vosr_jax import sample

from configs import degradation as degradation_config

BATCH, SIZE = 8, 128


@pytest.fixture(scope="module")
def hq():
  crops = [getattr(data, n)()[:SIZE, :SIZE] for n in ("astronaut", "chelsea", "coffee", "rocket")]
  crops += [getattr(data, n)()[-SIZE:, -SIZE:]
            for n in ("astronaut", "chelsea", "coffee", "rocket")]
  return jnp.asarray(np.stack(crops), jnp.float32) / 255


@pytest.fixture(scope="module")
def degrade_fn():
  return degradation.make_degrade(degradation_config.get_config())


def test_filter2d_matches_basicsr(hq):
  kernel = np.random.default_rng(0).random((21, 21)).astype(np.float32)
  kernel /= kernel.sum()
  x = np.array(hq[0])
  ref = F.conv2d(F.pad(torch.from_numpy(x.transpose(2, 0, 1))[:, None], (10,) * 4, mode="reflect"),
                 torch.from_numpy(kernel)[None, None])[:, 0].numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(degradation.filter2d(x, kernel), ref, atol=2e-5)
  # On a canvas: reflection at the traced effective border, as filter2D on the cropped image.
  h, w = 77, 90
  canvas = jnp.zeros((SIZE, SIZE, 3)).at[:h, :w].set(x[:h, :w])
  got = jax.jit(degradation.filter2d)(canvas, kernel, (jnp.int32(h), jnp.int32(w)))[:h, :w]
  np.testing.assert_allclose(got, degradation.filter2d(x[:h, :w], kernel), atol=2e-5)


@pytest.mark.parametrize("method", ["area", "bilinear", "bicubic"])
def test_canvas_resize_matches_torch(hq, method):
  x = np.asarray(hq[1, :100, :90])
  canvas = jnp.zeros((SIZE, SIZE, 3)).at[:100, :90].set(x)
  t = torch.from_numpy(x.transpose(2, 0, 1))[None]
  fn = jax.jit(functools.partial(resize.resize_canvas, out_canvas=(160, 160), mode=0,
                                 methods=(method,)))
  for scale in (0.37, 1.0, 1.43):  # the scale_factor form: coordinates mapped by 1 / scale
    want = F.interpolate(t, scale_factor=scale, mode=method)[0].numpy().transpose(1, 2, 0)
    size = (jnp.int32(want.shape[0]), jnp.int32(want.shape[1]))
    got = fn(canvas, in_size=(jnp.int32(100), jnp.int32(90)), out_size=size,
             ratio=(1 / scale, 1 / scale))
    np.testing.assert_allclose(got[:want.shape[0], :want.shape[1]], want, atol=2e-6)
    assert float(jnp.abs(got[want.shape[0]:]).max()) == 0.0
  want = F.interpolate(t, size=(37, 51), mode=method)[0].numpy().transpose(1, 2, 0)
  got = fn(canvas, in_size=(jnp.int32(100), jnp.int32(90)), out_size=(jnp.int32(37), jnp.int32(51)))
  np.testing.assert_allclose(got[:37, :51], want, atol=2e-6)


@pytest.fixture(scope="module")
def noise_fn():
  return jax.jit(degradation.add_noise, static_argnames="levels")


@pytest.mark.parametrize("gray", [False, True])
def test_gaussian_noise_statistics(noise_fn, gray):
  x = jnp.full((256, 256, 3), 0.5)
  sigma = 12 / 255
  noise = np.asarray(noise_fn(x, jax.random.key(1), True, sigma, 1.0, gray, levels=256)) - 0.5
  n = noise[..., 0].size
  assert abs(noise.mean()) < 4 * sigma / math.sqrt(n)
  assert noise.std() == pytest.approx(sigma, rel=4 / math.sqrt(2 * n))
  channels_equal = np.array_equal(noise[..., 0], noise[..., 1]) and np.array_equal(
      noise[..., 0], noise[..., 2])
  assert channels_equal == gray


# Levels and scales where clipping to [0, 1] cannot bias the statistics (at level 3 a count of 0
# lands exactly on 0); level 3 has rate ~3, far from the normal regime.
@pytest.mark.parametrize("level,scale", [(128, 1.0), (128, 2.5), (3, 1.0), (200, 0.05)])
def test_poisson_noise_statistics(noise_fn, level, scale):
  value = level / 255
  x = jnp.full((256, 256, 3), value)
  noise = (np.asarray(noise_fn(x, jax.random.key(2), False, 0.0, scale, False, levels=256),
                      np.float64) - value)
  lam = value * 256
  std = scale * math.sqrt(lam) / 256
  n = noise.size
  assert abs(noise.mean()) < 4 * std / math.sqrt(n)
  assert noise.std() == pytest.approx(std, rel=5 / math.sqrt(2 * n) + 0.01)
  # Counts are integers: the noisy image is on the 1/256 grid scaled by `scale` (where unclipped).
  counts = (noise[noise + value < 1 - 1e-6] / scale + value) * 256
  np.testing.assert_allclose(counts, np.round(counts), atol=2e-3)


def test_gray_poisson_noise_equal_across_channels(noise_fn, hq):
  x = hq[2]
  noise = np.asarray(noise_fn(x, jax.random.key(3), False, 0.0, 0.5, True, levels=256) - x)
  inside = (np.asarray(x) > 0.05).all(-1) & (np.asarray(x) < 0.95).all(-1)  # away from clipping
  np.testing.assert_allclose(noise[inside][:, 0], noise[inside][:, 1], atol=1e-6)
  np.testing.assert_allclose(noise[inside][:, 0], noise[inside][:, 2], atol=1e-6)


def test_chain_properties(degrade_fn, hq):
  out = [np.asarray(degrade_fn(jax.random.key(i), hq)) for i in range(5)]
  assert degrade_fn._cache_size() == 1  # five keys, one compilation
  lq = out[0]
  assert lq.shape == hq.shape and lq.dtype == np.float32
  assert lq.min() >= 0 and lq.max() <= 1
  np.testing.assert_allclose(lq * 255, np.round(lq * 255), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(degrade_fn(jax.random.key(0), hq)), lq)
  assert not np.array_equal(out[0], out[1])
  # The chain degrades strongly but keeps the content: over 40 photo crops, LR-vs-HR PSNR lies in
  # [12, 38] dB with a median in [18, 30] dB (about 24 dB measured).
  psnr = np.concatenate([10 * np.log10(1 / np.mean((o - np.asarray(hq))**2, axis=(1, 2, 3)))
                         for o in out])
  assert psnr.min() > 12 and psnr.max() < 38, psnr
  assert 18 < np.median(psnr) < 30, psnr


def test_per_batch_option_shares_parameters():
  config = degradation_config.get_config()
  config.per_sample = False
  params = jax.jit(lambda k: degradation.sample_params(k, 6, config))(jax.random.key(4))
  for name in ("kernel1", "kernel2", "sinc", "scale1", "scale2", "mode1", "sinc_first"):
    assert np.all(np.asarray(params[name]) == np.asarray(params[name])[0]), name
  for name in ("quality1", "sigma2", "poisson1"):  # per sample in the official code too
    assert len(np.unique(np.asarray(params[name]))) == 6, name
  config.per_sample = True
  params = jax.jit(lambda k: degradation.sample_params(k, 6, config))(jax.random.key(4))
  assert len(np.unique(np.asarray(params["scale1"]))) > 1


def test_lr_output_without_resize_back(hq):
  config = degradation_config.get_config()
  config.resize_back = False
  lq = jax.jit(functools.partial(degradation.degrade, config=config))(jax.random.key(5),
                                                                      hq[:2, :64, :64])
  assert lq.shape == (2, 16, 16, 3)


def test_pil_bicubic_resize_back_is_the_samplers_upscaling(hq):
  """resize_back_modes=('pil_bicubic',): the LR comes back to HR size as PIL BICUBIC upscales it
  (vosr_jax.sample's upscaler), up to the 8-bit rounding and clipping of the LR (the chain
  rounds and clips once, at the end) plus that final rounding: within 2 levels, 0.5 on average."""
  config = degradation_config.get_config()
  config.resize_back_modes = ("pil_bicubic",)
  key, x = jax.random.key(3), hq[:2, :64, :64]
  back = np.asarray(degradation.make_degrade(config)(key, x))
  config.resize_back = False
  lq = np.asarray(degradation.make_degrade(config)(key, x))
  ref = np.stack([sample.upscale(img, (64, 64)) for img in lq])
  assert back.shape == (2, 64, 64, 3)
  np.testing.assert_allclose(back, np.clip(ref, 0, 1), rtol=0, atol=2 / 255)
  assert np.abs(back - np.clip(ref, 0, 1)).mean() < 0.5 / 255


def test_clean_bicubic_preset_is_a_plain_bicubic_downscale(hq):
  """configs/degradation.py:clean_bicubic gives PyTorch's bicubic x4 (no antialiasing) up to the
  JPEG at quality 99 and the 8-bit rounding, in luma (measured: within 2.1 levels). The JPEG's
  4:2:0 chroma subsampling moves colours at sharp colour edges much more (up to 30 levels)."""
  config = degradation_config.get_config("clean_bicubic")
  config.resize_back = False
  x = hq[:2, :64, :64]
  lq = np.asarray(jax.jit(functools.partial(degradation.degrade, config=config))(
      jax.random.key(7), x))
  ref = F.interpolate(torch.from_numpy(np.asarray(x, np.float32)).permute(0, 3, 1, 2),
                      scale_factor=0.25, mode="bicubic", align_corners=False)
  ref = np.clip(ref.permute(0, 2, 3, 1).numpy(), 0, 1)
  assert lq.shape == ref.shape == (2, 16, 16, 3)
  luma = np.float32([0.299, 0.587, 0.114])
  np.testing.assert_allclose(lq @ luma, ref @ luma, rtol=0, atol=4 / 255)
  assert np.abs((lq - ref) @ luma).mean() < 1 / 255
  with pytest.raises(ValueError, match="unknown preset"):
    degradation_config.get_config("clean")


def test_bad_config_raises():
  config = degradation_config.get_config()
  config.resize_back_modes = ("lanczos",)
  with pytest.raises(ValueError, match="resize_back_modes"):
    degradation.validate_config(config)
  config = degradation_config.get_config()
  config.jpeg_quality = 50
  with pytest.raises(ValueError, match="jpeg_quality"):
    degradation.validate_config(config)
  config = degradation_config.get_config()
  config.kernel_prob = (0.5, 0.25, 0.12, 0.03, 0.12, 0.03)
  with pytest.raises(ValueError, match="kernel_prob.*summing to 1"):
    degradation.validate_config(config)
  config = degradation_config.get_config()
  config.resize_prob2 = (0.5, 0.5)
  with pytest.raises(ValueError, match="resize_prob2"):
    degradation.validate_config(config)
