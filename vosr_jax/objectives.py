"""Flow-matching objectives (VOSR_SPEC.md §4.2): pure functions of keys, latents and a config.

Conventions: latents NHWC; flow time t in [0, 1] with t = 1 pure noise; `z_t = (1 - t) x + t eps`;
the network predicts the velocity `eps - x`.

Every objective has the shape of kvfrans/shortcut-models' `get_targets`:

    targets_xxx(key, config, latents, ...) -> (inputs, target, info)

`latents` is the output of `steps.encode_batch` (`lr_latent`, `hr_latent`, `tokens`); `inputs` is
the keyword dict the denoiser is called with (`z_t`, `lr_latent`, `t`, `tokens`, and `r` for
one-step students); `target` has z_t's shape; `info` holds scalars for logging. A distillation
objective adds its teacher/student callables as further arguments and returns the same triple, so
the train step only swaps the function.
"""
import jax
import jax.numpy as jnp


def sample_time(key, batch, config):
  """Flow times t, one per sample.

  Args:
    key: PRNG key.
    batch: B.
    config: the objective config; `time_dist` is "uniform" (U(0, 1), the official default) or
      "logit_normal" (sigmoid(N(time_mu, time_sigma^2))).
  Returns:
    (B,) float32 in [0, 1].
  """
  if config.time_dist == "uniform":
    return jax.random.uniform(key, (batch,), jnp.float32)
  if config.time_dist == "logit_normal":
    return jax.nn.sigmoid(config.time_mu + config.time_sigma * jax.random.normal(key, (batch,)))
  raise ValueError(f"config.objective.time_dist must be 'uniform' or 'logit_normal', got "
                   f"{config.time_dist!r}")


def interpolate(x, eps, t):
  """z_t = (1 - t) x + t eps, with t (B,) broadcast over the latent axes."""
  t = t.reshape((-1,) + (1,) * (x.ndim - 1))
  return (1.0 - t) * x + t * eps


def velocity(x, eps):
  """The flow-matching target eps - x."""
  return eps - x


def spherical_noise(key, lr_latent, strength):
  """s * lr + sqrt(1 - s^2) * xi, xi ~ N(0, I): the noised LR condition of the conditional branch.

  Args:
    key: PRNG key for xi.
    lr_latent: (B, H, W, C).
    strength: (B,) s in (0, 1).
  """
  s = strength.reshape((-1,) + (1,) * (lr_latent.ndim - 1))
  xi = jax.random.normal(key, lr_latent.shape, lr_latent.dtype)
  return s * lr_latent + jnp.sqrt(1.0 - s * s) * xi


def guidance_set(key_mask, key_strength, lr_cond, lr_latent, tokens, config):
  """Restoration-oriented guidance: replaces a random subset by the weak condition.

  Each sample joins the weak set independently with probability `config.cfg_ratio`; there the LR
  condition becomes `w * lr_latent` (the clean latent, not noised) and the tokens become zeros.
  `w ~ U(*config.weak_strength_range)` is one scalar per batch as in the official code, or one per
  sample when `config.weak_strength_per_sample`.

  Args:
    key_mask, key_strength: PRNG keys for the weak-set draw and for w.
    lr_cond: (B, H, W, C) the conditional-branch LR latent (spherically noised).
    lr_latent: (B, H, W, C) the clean LR latent.
    tokens: (B, N, D) encoder tokens.
    config: the objective config.
  Returns:
    (lr_mixed, tokens_mixed, weak, w): the mixed condition, the (B,) bool weak mask and the (B,)
    strengths that were drawn (equal entries when drawn per batch).
  """
  batch = lr_latent.shape[0]
  weak = jax.random.bernoulli(key_mask, config.cfg_ratio, (batch,))
  lo, hi = config.weak_strength_range
  w = jax.random.uniform(key_strength, (batch if config.weak_strength_per_sample else 1,),
                         jnp.float32, lo, hi)
  w = jnp.broadcast_to(w, (batch,))
  lat_mask = weak.reshape((-1,) + (1,) * (lr_latent.ndim - 1))
  lr_weak = w.reshape(lat_mask.shape).astype(lr_latent.dtype) * lr_latent
  lr_mixed = jnp.where(lat_mask, lr_weak, lr_cond)
  tokens_mixed = jnp.where(weak[:, None, None], jnp.zeros_like(tokens), tokens)
  return lr_mixed, tokens_mixed, weak, w


def targets_multistep(key, config, latents):
  """Inputs and target of the multistep flow-matching loss (`VOSR.loss_fm`).

  Args:
    key: PRNG key; split into one key per purpose below.
    config: the objective config (`time_dist`, `time_mu`, `time_sigma`, `cond_strength_mu`,
      `cond_strength_sigma`, `cfg_ratio`, `weak_strength_range`, `weak_strength_per_sample`).
    latents: dict with `hr_latent`, `lr_latent` (B, H, W, C) and `tokens` (B, N, D).
  Returns:
    (inputs, target, info): denoiser keyword inputs, the (B, H, W, C) velocity target, and
    scalars `weak_fraction`, `weak_strength`, `t_mean`.
  """
  k_time, k_eps, k_strength, k_xi, k_mask, k_weak = jax.random.split(key, 6)
  x, lr, tokens = latents["hr_latent"], latents["lr_latent"], latents["tokens"]
  batch = x.shape[0]
  # 1. Time and noise.
  t = sample_time(k_time, batch, config)
  eps = jax.random.normal(k_eps, x.shape, x.dtype)
  # 2. Conditional LR: spherically noised with s = sigmoid(N(mu_c, sigma_c^2)) per sample.
  s = jax.nn.sigmoid(config.cond_strength_mu
                     + config.cond_strength_sigma * jax.random.normal(k_strength, (batch,)))
  lr_cond = spherical_noise(k_xi, lr, s)
  # 3. The weak (guidance) set gets w * lr and zero tokens.
  lr_mixed, tokens_mixed, weak, w = guidance_set(k_mask, k_weak, lr_cond, lr, tokens, config)
  # 4. Interpolate and build the velocity target.
  inputs = dict(z_t=interpolate(x, eps, t), lr_latent=lr_mixed, t=t, tokens=tokens_mixed)
  info = dict(weak_fraction=jnp.mean(weak.astype(jnp.float32)), weak_strength=jnp.mean(w),
              t_mean=jnp.mean(t))
  return inputs, velocity(x, eps), info


def velocity_loss(prediction, target):
  """Mean squared error over every element, computed in float32."""
  return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))
