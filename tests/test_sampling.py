"""Samplers, tiling, tiled VAE and the end-to-end function (vosr_jax.sampling)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import multistep
from configs import sampling as sampling_config
from vosr_jax import inference, sampling
from vosr_jax.models import vae



def _settings(**overrides):
  """Multi-step `sampling.Settings` of the default sampling preset with `overrides`."""
  return sampling.Settings.from_config(sampling_config.get_config(), False, **overrides)

def _linear_denoiser(z, lr, t, tokens, r):
  """An analytic stand-in: v = z - lr + 0.1 t + token mean (+ r when given)."""
  v = z - lr + 0.1 * t[:, None, None, None] + tokens.mean(axis=(1, 2))[:, None, None, None]
  return v if r is None else v + r[:, None, None, None]


def _blur_denoiser(z, lr, t, tokens, r):
  """Smooth in the input, with a 5x5 box blur of lr zero-padded at the borders of what it sees:
  like a real network, a tile's velocity is wrong near the tile's borders."""
  del tokens, r
  h, w = lr.shape[1:3]
  p = jnp.pad(lr, ((0, 0), (2, 2), (2, 2), (0, 0)))
  blur = sum(p[:, i:i + h, j:j + w] for i in range(5) for j in range(5)) / 25
  return z - jnp.tanh(blur) * (0.5 + 0.5 * t[:, None, None, None])


def test_multistep_is_the_guided_euler_recursion():
  key = jax.random.split(jax.random.key(0), 3)
  lr = jax.random.normal(key[0], (2, 8, 8, 3))
  tokens = jax.random.normal(key[1], (2, 5, 4))
  noise = jax.random.normal(key[2], (2, 8, 8, 3))
  n, cfg, w = 5, 1.7, 0.2
  out = sampling.sample_multistep(_linear_denoiser, lr, tokens, noise, num_steps=n, cfg_scale=cfg,
                                  weak_strength=w)
  z, lr, tokens = (np.asarray(a, np.float64) for a in (noise, lr, tokens))
  times = np.linspace(1, 0, n + 1)
  for k in range(n):
    t = times[k]
    v_cond = z - lr + 0.1 * t + tokens.mean(axis=(1, 2))[:, None, None, None]
    v_weak = z - w * lr + 0.1 * t
    z = z - (t - times[k + 1]) * (v_weak + cfg * (v_cond - v_weak))
  np.testing.assert_allclose(out, z, atol=1e-5)
  other = sampling.sample_multistep(_linear_denoiser, jnp.asarray(lr), jnp.asarray(tokens), noise,
                                    num_steps=n, cfg_scale=cfg, weak_strength=0.05)
  assert np.abs(np.asarray(other) - z).max() > 1e-2  # the weak strength really changes the anchor


def test_unit_guidance_is_the_conditional_velocity_alone():
  """cfg 1 gives v_cond, and the denoiser sees only the conditional batch."""
  key = jax.random.split(jax.random.key(1), 3)
  lr, z = jax.random.normal(key[0], (2, 2, 8, 8, 3))
  tokens = jax.random.normal(key[1], (2, 5, 4))
  batches = []

  def denoiser(z, lr, t, tokens, r):
    batches.append(z.shape[0])
    return _linear_denoiser(z, lr, t, tokens, r)

  unit = sampling.guided_velocity(denoiser, 1.0, 0.15)(z, lr, 0.3, tokens, None)
  assert batches == [2]
  guided = sampling.guided_velocity(denoiser, 1.0 + 1e-7, 0.15)(z, lr, 0.3, tokens, None)
  assert batches == [2, 4]
  np.testing.assert_allclose(unit, guided, atol=1e-5)


def test_onestep_uses_r_and_no_guidance():
  key = jax.random.split(jax.random.key(1), 2)
  lr = jax.random.normal(key[0], (1, 8, 8, 3))
  noise = jax.random.normal(key[1], (1, 8, 8, 3))
  tokens = jnp.zeros((1, 4, 2))
  out = sampling.sample_onestep(_linear_denoiser, lr, tokens, noise, num_steps=1)
  # x0 = eps - S(eps, t=1, r=0) = eps - (eps - lr + 0.1 + 0).
  np.testing.assert_allclose(out, lr - 0.1, atol=1e-6)


def test_tile_geometry_follows_the_official_rule():
  # tile 512 px, SD (d=8, p=2): lt = 64 latent px, overlap max(32 // 8, 8) = 8 -> stride 56.
  tiles = sampling.denoiser_tiles((128, 100), 512, 32, 8, 2)
  assert tiles.size == (64, 64)
  assert sorted({h for h, _ in tiles.starts}) == [0, 56, 64]
  assert sorted({w for _, w in tiles.starts}) == [0, 36]
  assert sampling.denoiser_tiles((64, 64), 512, 32, 8, 2) is None
  assert sampling.denoiser_tiles((64, 64), 0, 32, 8, 2) is None
  # A wide latent keeps full-height tiles (departure from the square-only official tiles).
  assert sampling.denoiser_tiles((32, 200), 512, 32, 8, 2).size == (32, 64)
  w = sampling.gaussian_weights((64, 64))
  np.testing.assert_allclose(w[31, 31], np.exp(-(0.5 / 64) ** 2 / 0.02) ** 2, rtol=1e-6)


def test_tiled_sampling_has_no_visible_seams():
  """Smooth LR, the border-sensitive stand-in, 64-px tiles with the official 8-px overlap.

  Each tile's own velocity is off by up to ~0.1 within 2 px of its borders. Measured: the
  Gaussian-blended velocity is within 6.2e-3 of the untiled one (a plain average of the tiles is off
  by > 0.05), and after 4 steps |tiled - untiled| <= 3.3e-3 everywhere, with the largest jump
  between neighbouring pixels unchanged (to 1e-4).
  """
  y, x = np.mgrid[0:128, 0:128] / 128.0
  lr = jnp.asarray(np.stack([np.sin(2 * x + y), np.cos(3 * y), x * y], -1)[None], jnp.float32)
  noise = jnp.asarray(0.3 * np.stack([np.sin(5 * x), np.cos(4 * y), x - y], -1)[None], jnp.float32)
  tokens = jnp.zeros((1, 4, 2))
  tiles = sampling.tile_layout((128, 128), 64, 8)
  assert len(tiles.starts) == 9
  tile_tokens = jnp.broadcast_to(tokens, (len(tiles.starts), 1, 4, 2))

  velocity = sampling.guided_velocity(_blur_denoiser, 1.0, 0.15)
  exact = velocity(noise, lr, 1.0, tokens, None)
  blended = sampling.make_field(velocity, lr, tile_tokens, tiles)(noise, 1.0, None)
  both = jnp.concatenate([lr, noise], axis=3)
  averaged = sampling.blend_tiles(
      lambda c, tok, i: velocity(c[..., 3:], c[..., :3], 1.0, tok, None), both, tiles,
      np.ones(tiles.size, np.float32), per_tile=tile_tokens)
  assert np.abs(np.asarray(blended - exact)).max() < 1e-2
  assert np.abs(np.asarray(averaged - exact)).max() > 0.05

  whole = np.asarray(sampling.sample_multistep(_blur_denoiser, lr, tokens, noise, num_steps=4,
                                               cfg_scale=1.0, weak_strength=0.15))[0]
  tiled = np.asarray(sampling.sample_multistep(_blur_denoiser, lr, tile_tokens, noise,
                                               num_steps=4, cfg_scale=1.0, weak_strength=0.15,
                                               tiles=tiles))[0]

  def max_jump(a):
    return max(np.abs(np.diff(a, axis=0)).max(), np.abs(np.diff(a, axis=1)).max())

  assert np.abs(tiled - whole).max() < 5e-3
  assert max_jump(tiled) < max_jump(whole) + 1e-3


def test_tiled_vae_equals_whole_for_the_identity_autoencoder():
  ae = vae.PixelAutoencoder()
  x = jax.random.uniform(jax.random.key(2), (1, 40, 56, 3), minval=-1, maxval=1)
  enc = sampling.encode(ae, x, jax.random.key(0), 16, 4)
  np.testing.assert_allclose(enc, x, atol=1e-6)
  np.testing.assert_allclose(sampling.decode(ae, x, 16, 4), x, atol=1e-6)


def test_tiled_vae_decode_is_close_for_a_conv_decoder():
  """A random tiny SD VAE: tiles of 32 px with 16 px overlap vs whole (receptive-field cut)."""
  from flax import nnx
  ae = vae.SDAutoencoder(vae.AutoencoderKL(**vae.VARIANTS["tiny"], rngs=nnx.Rngs(0)))
  z = jax.random.normal(jax.random.key(3), (1, 24, 24, 4)) * 0.2
  whole = ae.decode(z)
  tiled = sampling.decode(ae, z, 64, 32)
  err = float(np.abs(np.asarray(tiled) - np.asarray(whole)).max())
  assert err < 0.05 * float(np.abs(np.asarray(whole)).max()) + 1e-3, err


def test_image_key_depends_on_seed_and_name_only():
  k = jax.random.key_data
  assert (k(sampling.image_key(1, "a.png")) == k(sampling.image_key(1, "a.png"))).all()
  assert (k(sampling.image_key(1, "a.png")) != k(sampling.image_key(1, "b.png"))).any()
  assert (k(sampling.image_key(1, "a.png")) != k(sampling.image_key(2, "a.png"))).any()


@pytest.fixture(scope="module")
def tiny():
  """The tiny pixel-space pipeline with every denoiser weight perturbed (its zero-initialised
  output layer would otherwise make the velocity 0)."""
  pipe = inference.random_pipeline(multistep.get_config("tiny"))
  leaves, tree = jax.tree.flatten(pipe.params["denoiser"])
  keys = jax.random.split(jax.random.key(7), len(leaves))
  noisy = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  params = {**pipe.params, "denoiser": jax.tree.unflatten(tree, noisy)}
  return inference.Pipeline(pipe.networks, params, "tiny")


def _smooth_batch(h, w):
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  img = np.stack([np.sin(3 * x + y), np.cos(2 * y), 2 * x * y - 0.5], -1) * 0.8
  return jnp.asarray(img[None], jnp.float32)


def test_pipeline_tile_larger_than_image_is_exact_and_batch_independent(tiny):
  x = jnp.concatenate([_smooth_batch(36, 44), -_smooth_batch(36, 44)])
  keys = jnp.stack([sampling.image_key(0, "a"), sampling.image_key(0, "b")])
  base = _settings(num_steps=3)
  out = np.asarray(tiny.jit(base)(tiny.params, x, keys))
  assert out.shape == (2, 36, 44, 3) and out.dtype == np.uint8
  big = _settings(num_steps=3, tile_size=512, vae_tile_size=512)
  np.testing.assert_array_equal(tiny.jit(big)(tiny.params, x, keys), out)
  # Row 0 does not depend on row 1 (another image, another key).
  x2 = x.at[1].set(0.0)
  keys2 = keys.at[1].set(sampling.image_key(0, "c"))
  np.testing.assert_array_equal(tiny.jit(base)(tiny.params, x2, keys2)[0], out[0])


def test_noise_scale_scales_the_starting_noise(tiny):
  """prepare's z_1 is from_flow(noise_scale * N(0, I), lr), which is the noise itself for the
  latent target: 0 gives z_1 = 0, and the output then no longer depends on the key."""
  x = _smooth_batch(32, 32)
  keys = [jnp.stack([sampling.image_key(0, name)]) for name in ("a", "b")]
  full, half, zero = (_settings(num_steps=2, noise_scale=s) for s in (1.0, 0.5, 0.0))
  z = {s: tiny.jit_stages(s)[0](tiny.params, x, keys[0])["z"] for s in (full, half, zero)}
  np.testing.assert_allclose(z[half], 0.5 * z[full], atol=1e-6)
  np.testing.assert_array_equal(z[zero], 0.0)
  np.testing.assert_array_equal(tiny.jit(zero)(tiny.params, x, keys[0]),
                                tiny.jit(zero)(tiny.params, x, keys[1]))
  assert not np.array_equal(tiny.jit(full)(tiny.params, x, keys[0]),
                            tiny.jit(full)(tiny.params, x, keys[1]))


def test_pipeline_tiles_with_overlap_blend_smoothly(tiny):
  """Tiny model, smooth image, 32 px tiles with overlap vs untiled, steps run one by one."""
  x = _smooth_batch(64, 64)
  keys = jnp.stack([sampling.image_key(0, "a")])
  whole_settings = _settings(num_steps=2, color_fix="none")
  whole = np.asarray(tiny.jit(whole_settings)(tiny.params, x, keys), np.float64)
  settings = _settings(num_steps=2, tile_size=32, tile_overlap=16, color_fix="none")
  prepare, step, finish = tiny.jit_stages(settings)
  state = prepare(tiny.params, x, keys)
  for k in range(settings.num_steps):
    state = step(tiny.params, state, jnp.int32(k))
  tiled = np.asarray(finish(tiny.params, state["z"], x), np.float64)
  assert len(sampling.layout(tiny.networks, (64, 64), settings).starts) == 9

  def max_jump(a):
    return max(np.abs(np.diff(a[0], axis=0)).max(), np.abs(np.diff(a[0], axis=1)).max())

  # Measured: the tiled result differs from the untiled one, and its sharpest neighbour jump is
  # within 8 levels of the untiled one's (borders of tiles are not visible as steps).
  assert np.abs(tiled - whole).max() > 0
  assert max_jump(tiled) <= max_jump(whole) + 8
