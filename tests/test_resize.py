"""`vosr_jax.data.resize.resize` vs torch F.interpolate (align_corners=False, no antialias), and
its "pil_bicubic" method vs PIL's Image.resize(BICUBIC) on float ("F") images.

Tolerances on images in [0, 1] (float32): nearest is exact; bilinear and area within 1e-6; bicubic
within 3e-6. Torch's own float32 bicubic is ~1.3e-6 away from its float64 result at 7x upsampling,
and so is ours (both are float32-accurate evaluations of the same weights in a different order).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vosr_jax.data.resize import METHODS, resize

TORCH_METHODS = tuple(m for m in METHODS if m != "pil_bicubic")

ATOL = {"nearest": 0.0, "bilinear": 1e-6, "area": 1e-6, "bicubic": 3e-6}
_resize = jax.jit(resize, static_argnums=(1, 2))


def _image(h=9, w=13, seed=0):
  return np.random.default_rng(seed).random((2, h, w, 3)).astype(np.float32)


def _torch(x, method, **kwargs):
  extra = {} if method in ("nearest", "area") else {"align_corners": False}
  t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  return F.interpolate(t, mode=method, **kwargs, **extra).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("method", TORCH_METHODS)
@pytest.mark.parametrize("size", [(63, 91), (4, 5), (6, 31)])
def test_size_semantics(method, size):
  """Output size given: coordinates map with in/out (up, down, and mixed rectangular)."""
  x = _image()
  np.testing.assert_allclose(np.asarray(_resize(jnp.asarray(x), size, method)),
                             _torch(x, method, size=size), rtol=0, atol=ATOL[method])


@pytest.mark.parametrize("method", TORCH_METHODS)
@pytest.mark.parametrize("factors", [(7.0, 7.0), (3.3, 0.45), (0.37, 0.5)])
def test_scale_factor_semantics(method, factors):
  """scale_factor given: torch maps coordinates with 1/scale_factor, not in/out."""
  x = _image()
  ref = _torch(x, method, scale_factor=factors)
  got = _resize(jnp.asarray(x), ref.shape[1:3], method, (1 / factors[0], 1 / factors[1]))
  np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=ATOL[method])


@pytest.mark.parametrize("size", [(36, 52), (4, 5), (6, 31), (63, 91)])
def test_pil_bicubic_matches_pil(size):
  """"pil_bicubic" = PIL BICUBIC: x4 up, antialiased down, and mixed, borders included."""
  x = _image()
  ref = np.stack([np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c]), "F")
                                       .resize(size[::-1], Image.BICUBIC))
                            for c in range(3)], -1) for img in x])
  got = np.asarray(_resize(jnp.asarray(x), size, "pil_bicubic"))
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)


def test_traced_scale_under_jit():
  """Scales may be traced (per-sample draws in the degradation chain) without recompiling."""
  x = _image()
  ref = _torch(x, "bicubic", scale_factor=(3.3, 0.45))
  fn = jax.jit(lambda img, s: resize(img, ref.shape[1:3], "bicubic", scale=(s[0], s[1])))
  got = fn(jnp.asarray(x), jnp.asarray([1 / 3.3, 1 / 0.45]))
  np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=ATOL["bicubic"])


def test_unknown_method():
  with pytest.raises(ValueError, match="lanczos"):
    resize(jnp.zeros((4, 4, 3)), (2, 2), "lanczos")
