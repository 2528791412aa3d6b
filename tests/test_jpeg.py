"""JPEG round trip against Pillow's encoder/decoder on real photos."""
import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

import jax
import jax.numpy as jnp

from vosr_jax.data import jpeg

PHOTOS = ("astronaut", "chelsea", "coffee")


def psnr(a, b):
  return 10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b)**2))


@pytest.fixture(scope="module")
def jpeg_fn():
  return jax.jit(jpeg.jpeg)


@pytest.fixture(scope="module")
def photos():
  return {name: getattr(data, name)()[:256, :256] for name in PHOTOS}


@pytest.mark.parametrize("quality", [30, 50, 75, 95])
def test_matches_pillow(jpeg_fn, photos, quality):
  for name, img in photos.items():
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)  # 4:2:0, the standard tables
    pil = np.asarray(Image.open(buf), np.float64) / 255
    ours = jpeg_fn(jnp.asarray(img, jnp.float32) / 255, quality)
    assert psnr(ours, pil) >= 30.0, (name, quality, psnr(ours, pil))


def test_higher_quality_degrades_less(jpeg_fn, photos):
  for img in photos.values():
    x = img.astype(np.float32) / 255
    assert psnr(jpeg_fn(x, 95.0), x) > psnr(jpeg_fn(x, 30.0), x) + 3.0


def test_canvas_matches_exact_size(jpeg_fn, photos):
  img = photos["coffee"].astype(np.float32) / 255
  h, w = 93, 70  # not multiples of 16: the canvas holds DiffJPEG's zero padding exactly
  canvas = np.pad(img[:h, :w], ((0, 160 - h), (0, 96 - w), (0, 0)), constant_values=0.7)
  got = jax.jit(jpeg.jpeg)(canvas, 47.5, (jnp.int32(h), jnp.int32(w)))[:h, :w]
  np.testing.assert_allclose(got, jpeg_fn(img[:h, :w], 47.5), atol=1e-5)


def test_quality_to_factor():
  np.testing.assert_allclose(jpeg.quality_to_factor(jnp.array([10.0, 30.0, 50.0, 95.0])),
                             [5.0, 5 / 3, 1.0, 0.1], rtol=1e-6)


def test_quality_100_is_near_lossless(jpeg_fn, photos):
  """Factor 0 at quality 100: quantisation steps are clamped to 1 (libjpeg), not divided by 0."""
  for img in photos.values():
    x = img.astype(np.float32) / 255
    out = np.asarray(jpeg_fn(x, 100.0))
    assert np.isfinite(out).all()
    assert psnr(out, x) > psnr(np.asarray(jpeg_fn(x, 95.0)), x)
