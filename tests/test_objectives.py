"""Flow-matching objective: interpolation, targets, guidance set, time sampling
(docs/official.md §4.2)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vosr_jax import objectives


def _config(**kw):
  base = dict(target="latent", time_dist="uniform", time_mu=0.0, time_sigma=1.0, cond_strength_mu=5.0,
              cond_strength_sigma=1.0, cfg_ratio=0.1, weak_strength_range=(0.05, 0.25),
              weak_strength_per_sample=False)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _latents(batch, key=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
  return dict(hr_latent=jax.random.normal(k1, (batch, 4, 4, 3)),
              lr_latent=jax.random.normal(k2, (batch, 4, 4, 3)) + 1.0,
              tokens=jax.random.normal(k3, (batch, 5, 6)) + 2.0)


def test_interpolation_and_velocity_endpoints():
  x, eps = jnp.full((2, 2, 2, 1), 3.0), jnp.full((2, 2, 2, 1), -1.0)
  z = objectives.interpolate(x, eps, jnp.array([0.0, 1.0]))
  np.testing.assert_array_equal(z[0], x[0])  # t = 0 is data
  np.testing.assert_array_equal(z[1], eps[1])  # t = 1 is noise
  # d z_t / dt = eps - x: the finite difference equals the target.
  t = jnp.array([0.3, 0.3])
  dz = (objectives.interpolate(x, eps, t + 1e-3) - objectives.interpolate(x, eps, t)) / 1e-3
  np.testing.assert_allclose(dz, objectives.velocity(x, eps), rtol=1e-3)


def test_targets_are_consistent_with_inputs():
  latents = _latents(16)
  inputs, target, info = objectives.targets_multistep(jax.random.PRNGKey(1), _config(), latents)
  t = inputs["t"].reshape(-1, 1, 1, 1)
  eps = target + latents["hr_latent"]
  np.testing.assert_allclose(inputs["z_t"], (1 - t) * latents["hr_latent"] + t * eps, atol=1e-5)
  assert set(inputs) == {"z_t", "lr_latent", "t", "tokens"}
  assert set(info) == {"weak_fraction", "weak_strength", "t_mean"}


@pytest.mark.parametrize("per_sample", [False, True])
def test_guidance_set_fraction_and_contents(per_sample):
  batch, ratio = 4096, 0.1
  config = _config(cfg_ratio=ratio, weak_strength_per_sample=per_sample)
  lat = _latents(batch)
  lr_cond = lat["lr_latent"] + 100.0  # distinguishable from any weak value
  lr_mixed, tokens_mixed, weak, w = jax.jit(
      lambda k1, k2: objectives.guidance_set(k1, k2, lr_cond, lat["lr_latent"], lat["tokens"],
                                             config))(jax.random.PRNGKey(2), jax.random.PRNGKey(3))
  weak, w = np.asarray(weak), np.asarray(w)
  # Binomial(4096, 0.1): std 0.0047; 4 sigma.
  assert abs(weak.mean() - ratio) < 0.019
  # Weak samples: exactly w * lr and all-zero tokens; the others untouched.
  expected = w[:, None, None, None] * np.asarray(lat["lr_latent"])
  np.testing.assert_array_equal(np.asarray(lr_mixed)[weak], expected[weak])
  assert np.all(np.asarray(tokens_mixed)[weak] == 0)
  np.testing.assert_array_equal(np.asarray(lr_mixed)[~weak], np.asarray(lr_cond)[~weak])
  np.testing.assert_array_equal(np.asarray(tokens_mixed)[~weak], np.asarray(lat["tokens"])[~weak])
  assert np.all((w >= 0.05) & (w <= 0.25))
  assert (len(np.unique(w)) == 1) != per_sample  # one w per batch unless per sample


def test_weak_fraction_over_many_draws():
  config = _config(cfg_ratio=0.3)
  lat = _latents(8)
  fracs = jax.vmap(lambda k: objectives.targets_multistep(k, config, lat)[2]["weak_fraction"])(
      jax.random.split(jax.random.PRNGKey(4), 2000))
  assert abs(float(fracs.mean()) - 0.3) < 0.015  # std of the mean over 16000 draws is 0.0036


def test_cond_strength_is_spherical():
  # With s near 1 the conditional LR stays close to the clean LR; unit variance is preserved.
  lr = jax.random.normal(jax.random.PRNGKey(5), (64, 8, 8, 4))
  s = jnp.full((64,), 0.6)
  out = objectives.spherical_noise(jax.random.PRNGKey(6), lr, s)
  assert abs(float(out.std()) - 1.0) < 0.03
  corr = float(jnp.mean(out * lr))
  assert abs(corr - 0.6) < 0.03


def test_time_distributions():
  key = jax.random.PRNGKey(7)
  u = objectives.sample_time(key, 20000, _config())
  assert 0.0 <= float(u.min()) and float(u.max()) <= 1.0 and abs(float(u.mean()) - 0.5) < 0.01
  ln = objectives.sample_time(key, 20000, _config(time_dist="logit_normal", time_mu=1.0))
  np.testing.assert_allclose(float(jnp.median(jnp.log(ln / (1 - ln)))), 1.0, atol=0.03)
  with pytest.raises(ValueError, match="time_dist"):
    objectives.sample_time(key, 4, _config(time_dist="beta"))


def test_velocity_loss_is_plain_mse():
  a, b = jnp.ones((2, 3)), jnp.zeros((2, 3))
  assert float(objectives.velocity_loss(a * 2, b)) == 4.0


def _loss_config(**kw):
  return ml_collections.ConfigDict(dict(dict(target="latent", loss_space="velocity",
                                             loss_scale_power=0.0), **kw))


def test_x_loss_space_is_the_clean_sample_mse():
  """loss_space='x' weighs the velocity MSE by t^2: the MSE of x = z_t - t v (t >= the floor)."""
  rng = np.random.default_rng(0)
  x, eps, v_hat = rng.standard_normal((3, 4, 5, 5, 3)).astype(np.float32)
  t = np.array([0.05, 0.2, 0.7, 1.0], np.float32)
  z_t = objectives.interpolate(x, eps, t)
  x_hat = z_t - t[:, None, None, None] * v_hat
  weight = objectives.loss_weight(_loss_config(loss_space="x"), t, x)
  np.testing.assert_allclose(
      objectives.velocity_loss(v_hat, objectives.velocity(x, eps), weight),
      np.mean(np.square(x_hat - x)), rtol=1e-5)
  assert objectives.loss_weight(_loss_config(), t, x) is None
  # Below the floor the weight stays at floor^2 (as dit.x_to_velocity floors t).
  low = objectives.loss_weight(_loss_config(loss_space="x"), np.float32([0.0]), x[:1])
  np.testing.assert_allclose(low.ravel(), [0.05 ** 2], rtol=1e-6)
  with pytest.raises(ValueError, match="loss_space"):
    objectives.loss_weight(_loss_config(loss_space="eps"), t, x)


def test_loss_scale_power_2_is_the_mse_in_latent_units():
  """With a local residual scale s(lr), power 2 weighs the flow-space error by s^2 / mean(s^2):
  the MSE of the latents the flow maps back to, over the batch's mean s^2."""
  rng = np.random.default_rng(1)
  lr = rng.standard_normal((2, 8, 8, 3)).astype(np.float32) * np.linspace(0.1, 2, 8)[:, None, None]
  hr, hr_hat = rng.standard_normal((2, 2, 8, 8, 3)).astype(np.float32)
  config = _loss_config(target="residual", residual_scale=0.5, residual_window=3,
                        residual_floor=0.01, loss_scale_power=2.0)
  scale = objectives.residual_scale(config)
  x, x_hat = (objectives.to_flow(a, lr, scale) for a in (hr, hr_hat))
  weight = objectives.loss_weight(config, np.ones(2, np.float32), lr)
  s2 = np.square(np.asarray(objectives.scale_map(lr, scale)))
  np.testing.assert_allclose(objectives.velocity_loss(x_hat, x, weight),
                             np.mean(np.square(hr_hat - hr)) / s2.mean(), rtol=1e-4)
  with pytest.raises(ValueError, match="loss_scale_power"):
    objectives.loss_weight(_loss_config(loss_scale_power=2.0), np.ones(2, np.float32), lr)
