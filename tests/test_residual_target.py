"""`config.objective.target='residual'`: training, distillation and the samplers share one map."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import multistep
from configs import sampling as sampling_config
from vosr_jax import checkpoint, inference, objectives, sampling

S = objectives.ResidualScale(0.1)
LOCAL = objectives.ResidualScale(0.5, window=3, floor=0.01)  # the LR's local deviation


def _objective(target="residual", **kw):
  base = dict(target=target, residual_scale=S.scale, residual_window=0, residual_floor=0.01,
              time_dist="uniform", time_mu=0.0, time_sigma=1.0,
              cond_strength_mu=5.0, cond_strength_sigma=1.0, cfg_ratio=0.1,
              weak_strength_range=(0.05, 0.25), weak_strength_per_sample=False)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _latents(batch=3):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return dict(hr_latent=jax.random.normal(k1, (batch, 4, 4, 3)),
              lr_latent=jax.random.normal(k2, (batch, 4, 4, 3)) + 1.0,
              tokens=jax.random.normal(k3, (batch, 5, 6)))


def test_scale_and_round_trip():
  assert objectives.residual_scale(_objective("latent")) is None
  older = checkpoint.upgrade_saved_config({"objective": {}})["objective"]  # saved before target
  assert objectives.residual_scale(ml_collections.ConfigDict(older)) is None
  assert objectives.residual_scale(_objective()) == objectives.ResidualScale(0.1, 0, 0.01)
  assert objectives.residual_scale(_objective(residual_scale=0.5, residual_window=3)) == LOCAL
  with pytest.raises(ValueError, match="config.objective.target"):
    objectives.residual_scale(_objective("hr"))
  with pytest.raises(ValueError, match="residual_scale"):
    objectives.residual_scale(_objective(residual_scale=0.0))
  for window in (-1, 4):
    with pytest.raises(ValueError, match="residual_window"):
      objectives.residual_scale(_objective(residual_window=window))
  with pytest.raises(ValueError, match="residual_floor"):
    objectives.residual_scale(_objective(residual_window=3, residual_floor=0.0))
  lat = _latents()
  hr, lr = lat["hr_latent"], lat["lr_latent"]
  x = objectives.to_flow(hr, lr, S)
  np.testing.assert_allclose(x, (hr - lr) / 0.1, rtol=1e-6)
  np.testing.assert_allclose(objectives.from_flow(x, lr, S), hr, atol=1e-5)
  assert objectives.to_flow(x, lr, None) is x
  x = objectives.to_flow(hr, lr, LOCAL)
  np.testing.assert_allclose(objectives.from_flow(x, lr, LOCAL), hr, atol=1e-5)


def test_local_scale_is_the_windowed_deviation_of_the_lr():
  """scale_map = s (floor + per-channel deviation in k x k edge-replicated windows, averaged
  over channels), against a NumPy loop."""
  lr = np.random.default_rng(0).normal(size=(2, 6, 7, 3)).astype(np.float32)
  padded = np.pad(lr, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  want = np.zeros((2, 6, 7, 1))
  for i in range(6):
    for j in range(7):
      want[:, i, j, 0] = padded[:, i:i + 3, j:j + 3].std(axis=(1, 2)).mean(-1)
  got = objectives.scale_map(jnp.asarray(lr), LOCAL)
  np.testing.assert_allclose(got, 0.5 * (0.01 + want), rtol=1e-4, atol=1e-6)
  flat = objectives.scale_map(jnp.ones((1, 5, 5, 3)), LOCAL)
  np.testing.assert_allclose(flat, 0.5 * 0.01, rtol=1e-5)


def test_training_and_distillation_targets_are_the_latent_ones_on_the_residual():
  """Residual target == the official objective run on hr' = (hr - lr) / s (same key)."""
  lat = _latents()
  swapped = dict(lat, hr_latent=(lat["hr_latent"] - lat["lr_latent"]) / S.scale)
  key = jax.random.key(1)
  got = objectives.targets_multistep(key, _objective(), lat)
  want = objectives.targets_multistep(key, _objective("latent"), swapped)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  distill = ml_collections.ConfigDict(dict(beta_a=1.0, beta_b=1.0, cfg_scale=0.5, t_start=0.0,
                                           t_end=1.0))

  def teacher(inputs):
    return inputs["z_t"] - inputs["lr_latent"]

  got = objectives.distill_inputs(key, _objective(), distill, lat, teacher)
  want = objectives.distill_inputs(key, _objective("latent"), distill, swapped, teacher)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _denoiser(z, lr, t, tokens, r):
  v = jnp.sin(z) - 0.3 * lr + 0.1 * t[:, None, None, None] + tokens.mean(axis=(1, 2))[
      :, None, None, None]
  return v if r is None else v + r[:, None, None, None]


@pytest.mark.parametrize("scale", [S, LOCAL], ids=["constant", "local"])
@pytest.mark.parametrize("one_step", [False, True])
def test_samplers_integrate_the_residual_flow_in_latent_space(one_step, scale):
  """Latent-space sampling from from_flow(noise) == lr + s * (flow-space sampling from noise)."""
  lat = _latents(2)
  lr, tokens = lat["lr_latent"], lat["tokens"]
  noise = jax.random.normal(jax.random.key(2), lr.shape)
  if one_step:
    def run(start, scale, tiles=None):
      return sampling.sample_onestep(_denoiser, lr, tokens, start, num_steps=3, tiles=tiles,
                                     residual_scale=scale)
  else:
    def run(start, scale, tiles=None):
      return sampling.sample_multistep(_denoiser, lr, tokens, start, num_steps=3, cfg_scale=0.7,
                                       weak_strength=0.15, tiles=tiles, residual_scale=scale)
  flow = run(noise, None)
  latent = run(objectives.from_flow(noise, lr, scale), scale)
  np.testing.assert_allclose(latent, lr + objectives.scale_map(lr, scale) * flow, atol=1e-5)


def test_pipeline_reads_the_target_and_stages_match_super_resolve():
  config = multistep.get_config("demo")
  pipe = inference.random_pipeline(config)
  assert pipe.networks.residual_scale == objectives.residual_scale(config.objective)
  assert pipe.networks.residual_scale.window == 9
  settings = sampling.Settings.from_config(
      sampling_config.get_config(), False, num_steps=2, cfg_scale=1.0, tile_size=32,
      tile_overlap=8, color_fix="none")
  images = jax.random.uniform(jax.random.key(3), (1, 48, 64, 3), jnp.float32, -1.0, 1.0)
  keys = jax.random.key(4)[None]
  whole = np.asarray(pipe.jit(settings)(pipe.params, images, keys))
  prepare, step, finish = pipe.jit_stages(settings)
  state = prepare(pipe.params, images, keys)
  for k in range(settings.num_steps):
    state = step(pipe.params, state, jnp.int32(k))
  staged = np.asarray(finish(pipe.params, state["z"], images))
  assert np.abs(whole.astype(int) - staged.astype(int)).max() <= 1
