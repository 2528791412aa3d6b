"""Pure train/eval steps (jitted with their shardings by `vosr_jax.builder`).

Data flow of one train step (all one compiled program):

  batch {'hq': uint8 (B, R, R, 3)}
    -> encode_batch: degrade -> LQ; encoder tokens of LQ; autoencoder latents of [LQ, HQ]
    -> loss: multistep (objectives.targets_multistep -> denoiser -> velocity loss)
             or one-step distillation (objectives.distill_loss with the frozen teacher)
    -> grads -> optax (clip, AdamW, schedule) -> EMA

`train_step(state, frozen, batch)` and `distill_step(state, teacher_params, frozen, batch)` share
everything but the loss function. Frozen networks (encoder, autoencoder, teacher) are arguments of
the step (`frozen` = {'encoder': params, 'autoencoder': params}), never closed-over constants; their
graph definitions are static. With `frozen=None` the batch is already encoded (the latents of
`encode_batch`): the step's denoiser part alone, which the benchmarks time. Every random draw
comes from `jax.random.fold_in(state.rng, state.step)`, split once per purpose.
"""
import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vosr_jax import objectives
from vosr_jax.data import degradation
from vosr_jax.models import vit as vit_lib


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training; a pytree that Orbax saves as is.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: denoiser parameters (nested dict of float32 arrays).
    opt_state: optax state for `params`.
    ema_params: exponential moving average of `params`.
    rng: uint32 (2,) raw PRNG key of the run; per-step keys are folded from it with `step`.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class Graphs:
  """Static graph definitions of the networks (`nnx.split`), bound into the jitted steps.

  `denoiser` is the trained network (the one-step student when distilling); `teacher` is the frozen
  multistep denoiser of distillation (None for multistep training).
  """
  denoiser: Any
  encoder: Any
  autoencoder: Any
  teacher: Any = None


def make_optimizer(optim_config):
  """AdamW with global-norm clipping, a linear warm-up, then a constant (official) or cosine lr.

  Args:
    optim_config: `config.optim` (`lr`, `b1`, `b2`, `eps`, `weight_decay`, `grad_clip_norm`,
      `warmup_steps`, `decay_steps`: 0 keeps the lr constant after the warm-up (official), N > 0
      decays it to 0 along a cosine over the N steps after the warm-up). Weight decay applies to
      every parameter, as in the official code.
  Returns:
    (tx, schedule): the optax transformation and the step -> learning-rate function.
  """
  decay_steps = optim_config.decay_steps
  if decay_steps and optim_config.warmup_steps:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, optim_config.lr, optim_config.warmup_steps, optim_config.warmup_steps + decay_steps)
  elif decay_steps:
    schedule = optax.cosine_decay_schedule(optim_config.lr, decay_steps)
  elif optim_config.warmup_steps:
    schedule = optax.warmup_constant_schedule(0.0, optim_config.lr, optim_config.warmup_steps)
  else:
    schedule = optax.constant_schedule(optim_config.lr)
  tx = optax.chain(
      optax.clip_by_global_norm(optim_config.grad_clip_norm),
      optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                  weight_decay=optim_config.weight_decay))
  return tx, schedule


def apply_denoiser(graphdef, params, inputs):
  """Calls the denoiser held as (graphdef, params) with the keyword `inputs` of an objective."""
  return nnx.merge(graphdef, params, copy=True)(**inputs)


def degrade_batch(key, hq_uint8, degradation_config):
  """HQ uint8 (B, R, R, 3) -> (lq, hq), both float32 in [-1, 1]; lq is degraded and resized back."""
  hq = hq_uint8.astype(jnp.float32) / 255.0
  lq = degradation.degrade(key, hq, degradation_config)
  return lq * 2.0 - 1.0, hq * 2.0 - 1.0


def encode_images(graphs, frozen, key, lq, hq, config):
  """Encoder tokens of `lq` and autoencoder latents of `lq` (and `hq` when given).

  Args:
    graphs: `Graphs`.
    frozen: {'encoder': params, 'autoencoder': params}.
    key: PRNG key of the posterior sample.
    lq, hq: (B, H, W, 3) in [-1, 1]; hq may be None (sampling).
    config: the run config (`encoder.image_size`, `encoder.tap_layer`).
  Returns:
    dict(tokens (B, N, D), lr_latent, and hr_latent when hq is given), gradient-stopped.
  """
  encoder = nnx.merge(graphs.encoder, frozen["encoder"])
  tokens = encoder(vit_lib.preprocess(lq, config.encoder.image_size),
                   tap_layer=config.encoder.tap_layer)
  autoencoder = nnx.merge(graphs.autoencoder, frozen["autoencoder"])
  images = lq if hq is None else jnp.concatenate([lq, hq], axis=0)
  latents = autoencoder.encode(images, key)
  out = dict(tokens=tokens, lr_latent=latents[:lq.shape[0]])
  if hq is not None:
    out["hr_latent"] = latents[lq.shape[0]:]
  return jax.lax.stop_gradient(out)


def encode_batch(graphs, frozen, batch, key, config):
  """The front half of every train step: degrade -> tokens -> latents of [LR, HR].

  Args:
    graphs, frozen: as in `encode_images`.
    batch: {'hq': uint8 (B, R, R, 3)}.
    key: PRNG key (split into degradation and posterior keys).
    config: the run config.
  Returns:
    dict(tokens, lr_latent, hr_latent), the `latents` argument of the objectives.
  """
  k_degrade, k_posterior = jax.random.split(key)
  lq, hq = degrade_batch(k_degrade, batch["hq"], config.degradation)
  return encode_images(graphs, frozen, k_posterior, lq, hq, config)


def _multistep_loss(params, aux_params, graphs, latents, key, config):
  """Flow-matching loss of the denoiser `params` (`aux_params` is unused: None)."""
  del aux_params
  inputs, target, info = objectives.targets_multistep(key, config.objective, latents)
  prediction = apply_denoiser(graphs.denoiser, params, inputs)
  weight = objectives.loss_weight(config.objective, inputs["t"], latents["lr_latent"])
  return objectives.velocity_loss(prediction, target, weight), info


def _distill_loss(params, teacher_params, graphs, latents, key, config):
  """Distillation loss of the student `params` against the frozen teacher."""
  def student(inputs):
    return apply_denoiser(graphs.denoiser, params, inputs)

  def student_target(inputs):
    return apply_denoiser(graphs.denoiser, jax.lax.stop_gradient(params), inputs)

  def teacher(inputs):
    return apply_denoiser(graphs.teacher, teacher_params, inputs)

  return objectives.distill_loss(key, config.objective, config.distill, latents, teacher, student,
                                 student_target)


def _grads(loss_fn, params, aux_params, graphs, frozen, batch, key, config):
  """(loss, info, grads) of `loss_fn` averaged over `config.grad_accum_steps` micro-batches.

  `loss_fn(params, aux_params, graphs, latents, key, config) -> (loss, info)` is differentiated
  in `params`; `aux_params` are further frozen parameters (the teacher) or None. With
  `frozen=None`, `batch` is the latents themselves.
  """
  k_front, k_objective = jax.random.split(key)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro(mb, i):
    latents = mb if frozen is None else encode_batch(graphs, frozen, mb,
                                                     jax.random.fold_in(k_front, i), config)
    (loss, info), grads = grad_fn(params, aux_params, graphs, latents,
                                  jax.random.fold_in(k_objective, i), config)
    return loss, info, grads

  steps = config.grad_accum_steps
  if steps == 1:
    return micro(batch, 0)

  # Micro-batch i takes rows i, i + A, i + 2A, ...: each device keeps its own rows (no transfer).
  def split(x):
    return jnp.moveaxis(x.reshape((x.shape[0] // steps, steps) + x.shape[1:]), 1, 0)

  def body(acc, xs):
    out = micro(xs[0], xs[1])
    return jax.tree.map(jnp.add, acc, out), None

  first = jax.eval_shape(micro, batch, 0)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
  total, _ = jax.lax.scan(body, zeros, (jax.tree.map(split, batch), jnp.arange(steps)))
  return jax.tree.map(lambda x: x / steps, total)


def _step(loss_fn, state, aux_params, frozen, batch, *, graphs, config, tx, schedule):
  """Gradients of `loss_fn`, the optax update and the EMA: (new state, metrics)."""
  key = jax.random.fold_in(state.rng, state.step)
  loss, info, grads = _grads(loss_fn, state.params, aux_params, graphs, frozen, batch, key, config)
  return apply_gradients(state, loss, info, grads, config=config, tx=tx, schedule=schedule)


def apply_gradients(state, loss, info, grads, *, config, tx, schedule):
  """The optax update and the EMA of a step's gradients: (new state, metrics)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = config.ema_decay
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  metrics = {"train/loss": loss, "train/grad_norm": optax.global_norm(grads),
             "train/param_norm": optax.global_norm(params),
             "train/update_norm": optax.global_norm(updates),
             "train/lr": jnp.asarray(schedule(state.step), jnp.float32)}
  metrics.update({f"train/{k}": v for k, v in info.items()})
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema_params)
  return new_state, metrics


def train_step(state, frozen, batch, *, graphs, config, tx, schedule):
  """One optimizer step of multistep flow matching.

  Args:
    state: `TrainState`.
    frozen: {'encoder': params, 'autoencoder': params}, or None: `batch` is already encoded.
    batch: {'hq': uint8 (B, R, R, 3)}, the global batch; with `frozen=None` its latents
      dict(tokens, lr_latent, hr_latent) as `encode_batch` returns them.
    graphs, config, tx, schedule: static (bound by `builder.build`).
  Returns:
    (new state, metrics): metrics is a flat dict of float32 scalars (`train/loss`,
    `train/grad_norm`, `train/param_norm`, `train/update_norm`, `train/lr`, `train/weak_fraction`,
    `train/weak_strength`, `train/t_mean`).
  """
  return _step(_multistep_loss, state, None, frozen, batch, graphs=graphs, config=config, tx=tx,
               schedule=schedule)


def distill_step(state, teacher_params, frozen, batch, *, graphs, config, tx, schedule):
  """One optimizer step of one-step distillation (docs/official.md §5) of the student
  `state.params`.

  Per step (RCGM, `config.distill.n_steps` = N): one teacher call on 2B samples (conditional and
  weak branches), one student call with gradient on 2B samples (r = t and r), N student sub-steps
  on B samples without gradient. Shortcut: the same with N = 2 half jumps.

  Args:
    state: `TrainState` of the student (a denoiser with `r_embedder`).
    teacher_params: the frozen multistep denoiser's parameters (graph `graphs.teacher`).
    frozen, batch: as in `train_step`.
    graphs, config, tx, schedule: static (bound by `builder.build`).
  Returns:
    (new state, metrics): as `train_step`, plus `train/loss_v`, `train/loss_u`, `train/r_mean`.
    Per call with RCGM (N = 2): the equivalent of 2 teacher forwards and 2 student forwards +
    backward on B samples, plus 2 student forwards without gradient.
  """
  return _step(_distill_loss, state, teacher_params, frozen, batch, graphs=graphs, config=config,
               tx=tx, schedule=schedule)


