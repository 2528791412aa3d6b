"""Flow-matching objectives (docs/official.md §4.2): pure functions of keys, latents and a config.

Conventions: latents NHWC; flow time t in [0, 1] with t = 1 pure noise; `z_t = (1 - t) x + t eps`;
the network predicts the velocity `eps - x`.

What the flow generates (`config.objective.target`): 'latent' (official) x = the HR latent;
'residual' (a departure used by the demo) x = (HR latent - LR latent) / `residual_scale`, the
scaled correction of the upsampled LR. `to_flow` and `from_flow` are the one place that maps
between the two; the samplers integrate the same flow in latent space (`sampling.latent_velocity`).

Every objective has the shape of kvfrans/shortcut-models' `get_targets`:

    targets_xxx(key, config, latents, ...) -> (inputs, target, info)

`latents` is the output of `steps.encode_batch` (`lr_latent`, `hr_latent`, `tokens`); `inputs` is
the keyword dict the denoiser is called with (`z_t`, `lr_latent`, `t`, `tokens`, and `r` for
one-step students); `target` has z_t's shape; `info` holds scalars for logging.

One-step distillation (docs/official.md §5) needs the student's own prediction to build its target
(RCGM corrects the gradient-stopped u), so its entry point is a loss rather than a target:

    distill_loss(key, config, distill_config, latents, teacher, student, student_target)
      -> (loss, info)

with the networks as callables `f(inputs) -> velocity`: `teacher` (frozen), `student` (carries
the gradient) and `student_target` (the same student with its parameters gradient-stopped, for
the sub-steps that build targets). `rcgm_target` and `shortcut_target` share one signature, so
`config.distill.distill_type` only swaps the function.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vosr_jax.models import dit

TARGETS = ("latent", "residual")
LOSS_SPACES = ("velocity", "x")


class ResidualScale(NamedTuple):
  """How the residual target scales HR latent - LR latent into the flow's data space.

  scale: s. window: 0 for the constant scale s; an odd k for the local scale s (floor + the
  standard deviation of the LR latent in a k x k window, averaged over channels), which gives the
  flow the same variance in flat and detailed regions. floor: added to that deviation (latent
  units).
  """
  scale: float
  window: int = 0
  floor: float = 0.0


def residual_scale(config):
  """The `ResidualScale` of the objective config, or None for the official latent target.

  Args:
    config: the objective config (`target`, `residual_scale`, `residual_window`,
      `residual_floor`); a saved config without `target` (written before the field existed)
      gets 'latent' when it is read (`checkpoint.SAVED_CONFIG_FIELDS`).
  Raises:
    ValueError naming the field: an unknown target, a non-positive scale, an even or negative
    window, or a non-positive floor with a window.
  """
  target = config.target
  if target not in TARGETS:
    raise ValueError(f"config.objective.target={target!r} must be one of {TARGETS}")
  if target == "latent":
    return None
  if not config.residual_scale > 0:
    raise ValueError(f"config.objective.residual_scale={config.residual_scale} must be > 0")
  window = int(config.residual_window)
  if window < 0 or (window and window % 2 == 0):
    raise ValueError(f"config.objective.residual_window={window} must be 0 or odd and positive")
  if window and not config.residual_floor > 0:
    raise ValueError(f"config.objective.residual_floor={config.residual_floor} must be > 0")
  return ResidualScale(float(config.residual_scale), window, float(config.residual_floor))


def local_std(x, window):
  """Standard deviation of (B, H, W, C) `x` in `window` x `window` neighbourhoods (edges
  replicated), averaged over channels: (B, H, W, 1) float32."""
  p = window // 2
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")

  def box_mean(a):
    return jax.lax.reduce_window(a, 0.0, jax.lax.add, (1, window, window, 1), (1, 1, 1, 1),
                                 "VALID") / window ** 2

  var = jnp.maximum(box_mean(x * x) - jnp.square(box_mean(x)), 0.0)
  return jnp.mean(jnp.sqrt(var), axis=-1, keepdims=True)


def scale_map(lr_latent, scale):
  """The residual scale at each latent position: s, or (B, H, W, 1) s (floor + `local_std`)."""
  if not scale.window:
    return scale.scale
  return scale.scale * (scale.floor + local_std(lr_latent, scale.window))


def to_flow(latent, lr_latent, scale):
  """The flow's data space from latent space: `latent` (scale None) or (latent - lr) /
  `scale_map`(lr)."""
  return latent if scale is None else (latent - lr_latent) / scale_map(lr_latent, scale)


def from_flow(x, lr_latent, scale):
  """The inverse of `to_flow`: `x` (scale None) or lr + `scale_map`(lr) x."""
  return x if scale is None else lr_latent + scale_map(lr_latent, scale) * x


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


def _per_sample(x, like):
  """(B,) -> (B, 1, 1, 1) to broadcast over `like`'s latent axes."""
  return x.reshape((-1,) + (1,) * (like.ndim - 1))


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
    config: the objective config (`target`, `residual_scale`, `time_dist`, `time_mu`,
      `time_sigma`, `cond_strength_mu`, `cond_strength_sigma`, `cfg_ratio`,
      `weak_strength_range`, `weak_strength_per_sample`).
    latents: dict with `hr_latent`, `lr_latent` (B, H, W, C) and `tokens` (B, N, D).
  Returns:
    (inputs, target, info): denoiser keyword inputs, the (B, H, W, C) velocity target (in the
    flow space of `config.target`), and scalars `weak_fraction`, `weak_strength`, `t_mean`.
  """
  k_time, k_eps, k_cond = jax.random.split(key, 3)
  x = to_flow(latents["hr_latent"], latents["lr_latent"], residual_scale(config))
  # 1. Time and noise.
  t = sample_time(k_time, x.shape[0], config)
  eps = jax.random.normal(k_eps, x.shape, x.dtype)
  # 2. Conditions: noised LR, and the weak set with w * lr and zero tokens.
  cond = conditions(k_cond, config, latents)
  # 3. Interpolate and build the velocity target.
  inputs = dict(z_t=interpolate(x, eps, t), lr_latent=cond["lr_mixed"], t=t,
                tokens=cond["tokens_mixed"])
  return inputs, velocity(x, eps), dict(cond["info"], t_mean=jnp.mean(t))


def conditions(key, config, latents):
  """The conditioning of a training batch, shared by the multistep and distillation objectives.

  Args:
    key: PRNG key; split into the strength, xi, weak-set and weak-strength keys.
    config: the objective config (`cond_strength_mu`, `cond_strength_sigma`, `cfg_ratio`,
      `weak_strength_range`, `weak_strength_per_sample`).
    latents: dict with `lr_latent` (B, H, W, C) and `tokens` (B, N, D).
  Returns:
    dict with `lr_cond` (the spherically noised LR with s = sigmoid(N(mu_c, sigma_c^2)) per
    sample), `lr_mixed`/`tokens_mixed` (weak-set samples replaced by w * lr and zero tokens), `w`
    (B,) and `info` (`weak_fraction`, `weak_strength`).
  """
  k_strength, k_xi, k_mask, k_weak = jax.random.split(key, 4)
  lr, tokens = latents["lr_latent"], latents["tokens"]
  batch = lr.shape[0]
  s = jax.nn.sigmoid(config.cond_strength_mu
                     + config.cond_strength_sigma * jax.random.normal(k_strength, (batch,)))
  lr_cond = spherical_noise(k_xi, lr, s)
  lr_mixed, tokens_mixed, weak, w = guidance_set(k_mask, k_weak, lr_cond, lr, tokens, config)
  info = dict(weak_fraction=jnp.mean(weak.astype(jnp.float32)), weak_strength=jnp.mean(w))
  return dict(lr_cond=lr_cond, lr_mixed=lr_mixed, tokens_mixed=tokens_mixed, w=w, info=info)


def velocity_loss(prediction, target, weight=None):
  """Mean squared error over every element, computed in float32; `weight` (broadcastable to the
  prediction, e.g. (B, 1, 1, 1) or (B, H, W, 1)) scales the squared errors (None: 1)."""
  err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
  if weight is not None:
    err = weight * err
  return jnp.mean(err)


def loss_weight(config, t, lr_latent):
  """Weight of the multistep velocity loss's squared errors, or None (every element alike).

  `config.loss_space`: 'velocity' (official) weighs every t alike in velocity; 'x' (a departure,
  the demo's) gives the MSE of the clean sample x = z_t - t v that a velocity implies, i.e. the
  velocity MSE times t^2 (t floored as `dit.x_to_velocity` floors it), so every t weighs alike in
  x and the last, nearly clean steps do not dominate.
  `config.loss_scale_power` p (a departure; residual target with a local scale only): each
  position is also weighed by scale_map(lr)^p over its batch mean. p = 2 measures the error in
  latent (pixel) units, where PSNR measures it, instead of in units of the local scale, which
  would let flat regions, where every residual is tiny, outweigh edges.

  Args:
    config: the objective config (`loss_space`, `loss_scale_power` and the residual fields).
    t: (B,) flow times.
    lr_latent: (B, H, W, C) LR latent (the clean one the residual is relative to).
  Returns:
    None, or float32 (B, 1, 1, 1) or (B, H, W, 1).
  """
  if config.loss_space not in LOSS_SPACES:
    raise ValueError(f"config.objective.loss_space={config.loss_space!r} must be one of "
                     f"{LOSS_SPACES}")
  weight = None
  if config.loss_space == "x":
    weight = _per_sample(jnp.square(jnp.maximum(t, dit.X_PREDICTION_MIN_T)), lr_latent)
  if config.loss_scale_power:
    scale = residual_scale(config)
    if scale is None or not scale.window:
      raise ValueError(f"config.objective.loss_scale_power={config.loss_scale_power} needs "
                       "target='residual' with a residual_window")
    local = jnp.power(scale_map(lr_latent, scale), config.loss_scale_power)
    local = local / jnp.mean(local)
    weight = local if weight is None else weight * local
  return weight


# ------------------------------------------------------------------------------------------------
# One-step distillation (docs/official.md §5). `distill_config` is `config.distill`.

def distill_times(key, batch, distill_config):
  """(t, r) per sample: t = max(u1, u2) (density 2t), r = t (1 - g), g ~ Beta(beta_a, beta_b).

  Args:
    key: PRNG key.
    batch: B.
    distill_config: `beta_a`, `beta_b`.
  Returns:
    t, r: (B,) float32 with 0 <= r <= t <= 1.
  """
  k_t, k_g = jax.random.split(key)
  t = jnp.max(jax.random.uniform(k_t, (2, batch), jnp.float32), axis=0)
  g = jax.random.beta(k_g, distill_config.beta_a, distill_config.beta_b, (batch,), jnp.float32)
  return t, t * (1.0 - g)


def guided_target(v_cond, v_weak, t, distill_config):
  """The teacher's guided velocity v_weak + w (v_cond - v_weak), w per sample.

  w = `cfg_scale` for t in the guidance window [`t_start`, `t_end`], else 1 (conditional only).

  Args:
    v_cond, v_weak: (B, H, W, C) teacher velocities of the conditional and weak branches.
    t: (B,) flow times.
    distill_config: `cfg_scale`, `t_start`, `t_end`.
  """
  inside = (t >= distill_config.t_start) & (t <= distill_config.t_end)
  w = _per_sample(jnp.where(inside, distill_config.cfg_scale, 1.0), v_cond)
  return v_weak + w * (v_cond - v_weak)


def rcgm_target(student_target, inputs, v, u, distill_config):
  """RCGM average-velocity target (`loss_fm_distill_rcgm_improved`, docs/official.md §5.3).

  One step of length Delta = t - t_m (t_m = max(t - delta, r)) along the teacher velocity `v`,
  then N Euler sub-steps of the student's average velocity from t_m to r accumulate F; the
  normalised residual of (t - r) u ~ Delta v + F, clamped to [-1, 1] element-wise, corrects u:

    corr = clip(u cof_l - F cof_r - v, -1, 1),  target = u - corr,
    cof_l, cof_r = (1, 1/d) if t - r < delta (near case, target = v unless clamped)
                   else (d/delta, 1/delta),     d = max(t - r, 1e-6).

  Args:
    student_target: inputs -> (B, H, W, C) average velocity of the current student, gradient
      stopped (only `z_t`, `t`, `r` of `inputs` change between calls).
    inputs: the student inputs at (z_t, t, r), see `distill_inputs`.
    v: (B, H, W, C) teacher velocity at (z_t, t).
    u: (B, H, W, C) the student's prediction at (z_t, t, r), gradient stopped.
    distill_config: `delta`, `n_steps`.
  Returns:
    (B, H, W, C) float32 target for u.
  """
  delta, n = distill_config.delta, distill_config.n_steps
  t, r = inputs["t"], inputs["r"]
  t_m = jnp.maximum(t - delta, r)
  x = inputs["z_t"] - _per_sample(t - t_m, v) * v

  def sub_step(k, carry):
    x, f = carry
    tau = t_m * (1.0 - k / n) + r * (k / n)
    tau_next = t_m * (1.0 - (k + 1) / n) + r * ((k + 1) / n)
    dx = _per_sample(tau - tau_next, x) * student_target(dict(inputs, z_t=x, t=tau, r=tau_next))
    return x - dx, f + dx

  # The near case (t_m = r) still runs the sub-steps with dt = 0, as the official code does.
  _, f = jax.lax.fori_loop(0, n, sub_step, (x, jnp.zeros_like(x)))
  d = jnp.maximum(t - r, 1e-6)
  near = t < r + delta + 1e-6
  cof_l = _per_sample(jnp.where(near, 1.0, d / delta), u)
  cof_r = _per_sample(jnp.where(near, 1.0 / d, 1.0 / delta), u)
  corr = jnp.clip(u * cof_l - f * cof_r - v, -1.0, 1.0)
  return u - corr


def shortcut_target(student_target, inputs, v, u, distill_config):
  """Shortcut self-consistency target (`loss_fm_distill_shortcut_improved`, docs/official.md §5.4).

  Two half jumps of the student, t -> m = (t + r) / 2 -> r; the target is their mean velocity.
  Same signature as `rcgm_target` (`v`, `u` and `distill_config` are not used).

  Returns:
    (B, H, W, C) float32 target for u.
  """
  del v, u, distill_config
  z_t, t, r = inputs["z_t"], inputs["t"], inputs["r"]
  m = 0.5 * (t + r)
  v1 = student_target(dict(inputs, t=t, r=m))
  z_m = z_t - _per_sample(0.5 * (t - r), v1) * v1
  v2 = student_target(dict(inputs, z_t=z_m, t=m, r=r))
  return 0.5 * (v1 + v2)


DISTILL_TARGETS = {"rcgm": rcgm_target, "shortcut": shortcut_target}


def distill_inputs(key, config, distill_config, latents, teacher):
  """The part of distillation shared by both targets (docs/official.md §5.2).

  Args:
    key: PRNG key; split into time, noise and condition keys.
    config: the objective config (see `conditions`; `target`/`residual_scale` as in
      `targets_multistep`; `weak_strength_range` (0.1, 0.1) gives the official fixed weak
      strength).
    distill_config: `beta_a`, `beta_b`, `cfg_scale`, `t_start`, `t_end`.
    latents: dict with `hr_latent`, `lr_latent` (B, H, W, C) and `tokens` (B, N, D).
    teacher: inputs -> velocity (B, H, W, C), the frozen multistep model.
  Returns:
    (inputs, v, info): the student inputs (z_t, the mixed conditions, t and r, all (B, ...)), the
    gradient-stopped guided teacher velocity at (z_t, t), and scalars `weak_fraction`,
    `weak_strength`, `t_mean`, `r_mean`.
  """
  k_time, k_eps, k_cond = jax.random.split(key, 3)
  lr, tokens = latents["lr_latent"], latents["tokens"]
  x = to_flow(latents["hr_latent"], lr, residual_scale(config))
  batch = x.shape[0]
  # 1. Times, noise and conditions (the weak strength w also weakens the teacher's weak branch).
  t, r = distill_times(k_time, batch, distill_config)
  eps = jax.random.normal(k_eps, x.shape, x.dtype)
  cond = conditions(k_cond, config, latents)
  z_t = interpolate(x, eps, t)
  # 2. The teacher: conditional branch (noised LR, tokens) for every sample, weak branch
  # (w * clean LR, zero tokens), batched together.
  lr_weak = _per_sample(cond["w"], lr).astype(lr.dtype) * lr
  v_both = teacher(dict(z_t=jnp.concatenate([z_t, z_t]),
                        lr_latent=jnp.concatenate([cond["lr_cond"], lr_weak]),
                        t=jnp.concatenate([t, t]),
                        tokens=jnp.concatenate([tokens, jnp.zeros_like(tokens)])))
  v = jax.lax.stop_gradient(guided_target(v_both[:batch], v_both[batch:], t, distill_config))
  # 3. The student sees the mixed conditions (weak-set samples: weak input, guided target).
  inputs = dict(z_t=z_t, lr_latent=cond["lr_mixed"], t=t, tokens=cond["tokens_mixed"], r=r)
  info = dict(cond["info"], t_mean=jnp.mean(t), r_mean=jnp.mean(r))
  return inputs, v, info


def distill_loss(key, config, distill_config, latents, teacher, student, student_target):
  """One-step distillation loss v_loss + u_weight * u_loss (docs/official.md §5.2-5.4).

  v_loss = mean((S(z_t, t, r=t) - v)^2) (the instantaneous velocity, the r-term vanishes);
  u_loss = mean((S(z_t, t, r) - target)^2) with the `distill_type` target. The two student
  forwards that carry the gradient run as one call on the doubled batch.

  Args:
    key: PRNG key.
    config, distill_config, latents, teacher: see `distill_inputs`; `distill_config` also gives
      `distill_type` ('rcgm' or 'shortcut'), `u_weight`, `delta`, `n_steps`.
    student: inputs -> average velocity, differentiable in the student's parameters.
    student_target: the same network with its parameters gradient-stopped.
  Returns:
    (loss, info): scalar float32 loss, and scalars `loss_v`, `loss_u` plus `distill_inputs`'s.
  """
  if distill_config.distill_type not in DISTILL_TARGETS:
    raise ValueError(f"config.distill.distill_type={distill_config.distill_type!r} must be one of "
                     f"{sorted(DISTILL_TARGETS)}")
  inputs, v, info = distill_inputs(key, config, distill_config, latents, teacher)
  batch = v.shape[0]
  both = jax.tree.map(lambda a: jnp.concatenate([a, a]), inputs)
  both["r"] = jnp.concatenate([inputs["t"], inputs["r"]])
  prediction = student(both)
  pred_v, u = prediction[:batch], prediction[batch:]
  target = DISTILL_TARGETS[distill_config.distill_type](
      student_target, inputs, v, jax.lax.stop_gradient(u), distill_config)
  loss_v = velocity_loss(pred_v, v)
  loss_u = velocity_loss(u, jax.lax.stop_gradient(target))
  return loss_v + distill_config.u_weight * loss_u, dict(info, loss_v=loss_v, loss_u=loss_u)
