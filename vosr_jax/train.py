"""The outer training loop: mesh, data, state, checkpoints, logging, validation, preemption.

`run(config, workdir)` is what `python -m vosr_jax.main` calls. `config.kind` picks the step:
'multistep' (`steps.train_step`) or 'onestep' (`steps.distill_step`, with the frozen teacher loaded
once and passed to every step). Order of work:
  1. checks that need no compute: config values, workdir, mesh vs devices, batch vs mesh, the saved
     config of an existing checkpoint, the frozen-weight paths;
  2. the run (`builder.build`: frozen networks loaded sharded, the teacher of one-step runs, the
     train state created sharded, the jitted steps; its parameter table logged), the data
     iterator;
  3. restore of the latest checkpoint (state and iterator) if there is one;
  4. the step, compiled ahead of time (compile time logged apart from throughput);
  5. the loop: steps, metrics every `log_every_steps`, validation samples (the sampler of
     `python -m vosr_jax.sample` with `config.sampling`) every `eval.every_steps` (and before the first step of a fresh run: the baseline of a fine-tuned
     or distilled model), checkpoints every `checkpoint.every_steps` and at the end.
A non-finite loss stops the run with the step number before anything is saved. SIGTERM
(preemption) saves a checkpoint of the current step and returns normally (exit status 0).
"""
import functools
import os
import signal
import tempfile
import time

import jax
import numpy as np
from absl import logging
from clu import parameter_overview
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from vosr_jax import builder, checkpoint, cli_utils, color_fix, logging_utils, metrics, models
from vosr_jax import objectives, perf, sampling, sharding, steps
from vosr_jax.data import pipeline
from vosr_jax.models import dit


KINDS = ("multistep", "onestep")


class _StopSignal:
  """Records SIGTERM; the loop polls it between steps (a handler must not touch JAX)."""

  def __init__(self):
    self.received = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.received = True

  def poll(self):
    """True on every process once any process received SIGTERM."""
    if jax.process_count() == 1:
      return self.received
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.received))))

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


# Numeric config fields and their valid range [low, high] (None: unbounded); the fields of a
# section that the config lacks (`distill` of multistep runs) are not checked.
RANGES = (
    ("total_steps", 1, None), ("batch_size", 1, None), ("ema_decay", 0.0, 1.0),
    ("log_every_steps", 1, None), ("checkpoint.every_steps", 1, None),
    ("checkpoint.max_to_keep", 1, None), ("eval.every_steps", 0, None),
    ("eval.num_images", 1, None), ("eval.crop_border", 0, None),
    ("sampling.num_steps", 1, None), ("sampling.onestep_num_steps", 1, None),
    ("sampling.weak_strength", 0.0, None), ("sampling.cfg_scale", None, None),
    ("sampling.noise_scale", 0.0, None),
    ("optim.lr", 0.0, None), ("optim.b1", 0.0, 1.0), ("optim.b2", 0.0, 1.0),
    ("optim.eps", 0.0, None), ("optim.weight_decay", 0.0, None),
    ("optim.grad_clip_norm", 0.0, None), ("optim.warmup_steps", 0, None),
    ("optim.decay_steps", 0, None), ("encoder.tap_layer", 0, None),
    ("encoder.image_size", 1, None), ("objective.time_sigma", 0.0, None),
    ("objective.cond_strength_sigma", 0.0, None), ("data.resolution", 16, None),
    ("data.num_workers", 0, None), ("data.num_threads", 1, None), ("data.prefetch", 1, None),
    ("data.warn_every", 1, None), ("degradation.scale", 1, None),
    ("distill.cfg_scale", None, None), ("distill.t_start", 0.0, 1.0), ("distill.t_end", 0.0, 1.0),
    ("distill.u_weight", 0.0, None), ("distill.beta_a", 0.0, None),
    ("distill.beta_b", 0.0, None), ("distill.delta", 0.0, 1.0), ("distill.n_steps", 1, None))


def _range_errors(config):
  errors = []
  for key, low, high in RANGES:
    section, _, name = key.rpartition(".")
    if section and section not in config:
      continue
    value = (config[section] if section else config)[name]
    cli_utils.check_range(errors, f"config.{key}", value, low, high)
  return errors


def check_config(config):
  """Value checks that need neither devices nor files; errors name the config key."""
  errors = _range_errors(config)
  if errors:
    raise ValueError("; ".join(errors))
  models.compute_dtype(config.dtype)
  if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
    raise ValueError(f"config.grad_accum_steps={config.grad_accum_steps} must be >= 1 and divide "
                     f"config.batch_size={config.batch_size}")
  if config.model.init not in models.INITS:
    raise ValueError(f"config.model.init={config.model.init!r} must be one of {models.INITS}")
  if not 0.0 <= config.objective.cfg_ratio <= 1.0:
    raise ValueError(f"config.objective.cfg_ratio={config.objective.cfg_ratio} is not in [0, 1]")
  if config.data.sources is None:
    raise ValueError("config.data.sources is not set: pass --config.data.sources=LIST_OR_FOLDER")
  if config.kind not in KINDS:
    raise ValueError(f"config.kind={config.kind!r} must be one of {KINDS}")
  one_step = dit.is_one_step(models.denoiser_kwargs(config.model))
  if one_step != (config.kind == "onestep"):
    raise ValueError(f"config.model.overrides.one_step={one_step} does not fit config.kind="
                     f"{config.kind!r}: only one-step students have the r embedder")
  if config.kind == "onestep":
    if config.model.init != "checkpoint":
      raise ValueError("config.model.init must be 'checkpoint' for one-step distillation: "
                       "config.model.path is the multistep teacher (never a random one)")
    if config.distill.distill_type not in objectives.DISTILL_TARGETS:
      raise ValueError(f"config.distill.distill_type={config.distill.distill_type!r} must be one "
                       f"of {sorted(objectives.DISTILL_TARGETS)}")


def check_workdir(workdir):
  """Creates `workdir` and checks that it is writable (a clear error instead of a late failure)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise PermissionError(f"--workdir={workdir} is not writable ({e}); choose another folder.") \
        from e


def _host(x):
  """The host value of a replicated global array (every process holds all of it)."""
  return np.asarray(x.addressable_data(0))


class Validator:
  """A fixed validation set (first crops of the data sources with `config.eval.seed`, degraded
  with that seed) super-resolved with the EMA model by the sampler of `python -m vosr_jax.sample`
  (`sampling.super_resolve` with `config.sampling`); writes LR | SR | HR rows and PSNR/SSIM."""

  def __init__(self, config, run):
    """`run`: the `builder.Run` of `config` (its mesh, graphs and shardings)."""
    self.config = config
    mesh = run.mesh
    data_config = config.data.copy_and_resolve_references()
    data_config.num_workers = 0
    data_config.seed = config.eval.seed
    hq = next(pipeline.make_train_iterator(data_config, config.eval.num_images, process_index=0,
                                           process_count=1))["hq"]
    rep = sharding.replicated(mesh)
    degrade = jax.jit(functools.partial(steps.degrade_batch, degradation_config=config.degradation),
                      out_shardings=rep)
    key = jax.random.PRNGKey(config.eval.seed)
    lq, _ = degrade(key, jax.make_array_from_process_local_data(rep, hq))
    self.lq, self.hq = lq, np.asarray(hq)
    self.lq_uint8 = color_fix.to_uint8((_host(lq).astype(np.float32) + 1.0) / 2.0)  # [-1, 1] in
    # One key per image, as the sampler draws them (`sampling.prepare`).
    self.keys = jax.device_put(jax.random.split(jax.random.key(config.eval.seed), len(self.hq)),
                               rep)
    kwargs = models.denoiser_kwargs(config.model)
    self.one_step = dit.is_one_step(kwargs)
    self.settings = sampling.Settings.from_config(config.sampling, self.one_step)
    self._graphs, self._patch_size = run.graphs, kwargs["patch_size"]
    self._shardings, self._fn = (run.state_sh.ema_params, run.frozen_sh, rep, rep), None

  def networks(self, frozen):
    """The `sampling.Networks` of the trained denoiser with the frozen networks `frozen`."""
    config, graphs = self.config, self._graphs
    return sampling.Networks(
        denoiser=graphs.denoiser, encoder=graphs.encoder, autoencoder=graphs.autoencoder,
        tap_layer=config.encoder.tap_layer, encoder_size=config.encoder.image_size,
        downsample=nnx.merge(graphs.autoencoder, frozen["autoencoder"]).downsample,
        patch_size=self._patch_size, one_step=self.one_step,
        residual_scale=objectives.residual_scale(config.objective))

  def sample(self, ema_params, frozen, lq, keys):
    """Super-resolves `lq` (B, H, W, 3) in [-1, 1] (the LR at the output size) -> uint8."""
    if self._fn is None:
      networks, settings = self.networks(frozen), self.settings

      def fn(params, frozen, images, keys):
        return sampling.super_resolve(networks, {"denoiser": params, **frozen}, images, keys,
                                      settings)

      # The validation set is small and need not divide over the mesh: keep it replicated.
      self._fn = jax.jit(fn, in_shardings=self._shardings, out_shardings=self._shardings[2])
    return self._fn(ema_params, frozen, lq, keys)

  def __call__(self, step, ema_params, frozen, writer):
    """Samples, then logs `eval/psnr`, `eval/ssim` (Y channel) and the comparison image.

    Returns:
      {'eval/psnr': mean PSNR (dB), 'eval/ssim': mean SSIM} against the HR crops.
    """
    sr = _host(self.sample(ema_params, frozen, self.lq, self.keys))
    border = self.config.eval.crop_border
    psnrs = [metrics.psnr(s, h, border, y_channel=True) for s, h in zip(sr, self.hq)]
    ssims = [metrics.ssim(s, h, border, y_channel=True) for s, h in zip(sr, self.hq)]
    scores = {"eval/psnr": float(np.mean(psnrs)), "eval/ssim": float(np.mean(ssims))}
    writer.write_scalars(step, scores)
    rows = [np.concatenate([lq, s, h], axis=1) for lq, s, h in zip(self.lq_uint8, sr, self.hq)]
    writer.write_image(step, "eval_lr_sr_hr", np.concatenate(rows, axis=0))
    return scores


def run(config, workdir):
  """Trains `config` in `workdir` until `config.total_steps` or SIGTERM.

  Returns:
    The final `TrainState`.
  Raises:
    FloatingPointError: when the loss becomes NaN/Inf (nothing is saved for that step).
  """
  # From here on SIGTERM only sets a flag; the loop saves and returns after the current step.
  stop = _StopSignal()
  try:
    return _run(config, workdir, stop)
  finally:
    stop.restore()


def _run(config, workdir, stop):
  """`run` once SIGTERM is redirected to `stop`."""
  jax.config.update("jax_threefry_partitionable", True)
  check_config(config)
  check_workdir(workdir)
  mesh = sharding.make_mesh(config.mesh, dcn_config=config.dcn_mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  per_device = config.batch_size // sharding.batch_size_per_step(mesh)
  if per_device % config.grad_accum_steps:
    raise ValueError(f"config.grad_accum_steps={config.grad_accum_steps} must divide the "
                     f"per-device batch {per_device} (config.batch_size={config.batch_size} over "
                     f"{sharding.batch_size_per_step(mesh)} data-parallel devices)")
  ckpt = checkpoint.TrainCheckpointer(workdir, config)
  logging.info("Mesh %s over %d devices, %d processes.", dict(mesh.shape), jax.device_count(),
               jax.process_count())

  built = builder.build(config, mesh)
  state, frozen = built.state, built.frozen
  parameter_overview.log_parameter_overview(
      state.params, include_stats=False, msg="Denoiser parameters:", jax_logging_process=0)
  data_iter = pipeline.make_train_iterator(config.data, config.batch_size // jax.process_count())

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  start, restored = ckpt.restore_latest(abstract, data_iter)
  if start is not None:
    state = restored
    logging.info("Resumed from the checkpoint of step %d in %s.", start, ckpt.directory)
  step = int(state.step)

  # Rows after the restored step come from a run that was stopped before its next checkpoint:
  # they are computed again from here.
  writer = logging_utils.MetricWriter(workdir, resume_step=step)
  validator = Validator(config, built) if config.eval.every_steps else None
  frozen_args = built.frozen_args
  batch = sharding.shard_batch(next(data_iter), mesh)
  t0 = time.perf_counter()
  compiled = built.train_step.lower(state, *frozen_args, batch).compile()
  flops = perf.flops(compiled)
  writer.write_scalars(step, {"perf/compile_seconds": time.perf_counter() - t0})

  if validator is not None and step == 0:
    validator(step, state.ema_params, frozen, writer)
  progress = tqdm(total=config.total_steps, initial=step, disable=jax.process_index() != 0,
                  desc="train", dynamic_ncols=True)
  history, timed_steps, timer, pending = [], 0, time.perf_counter(), None
  try:
    while step < config.total_steps:
      if batch is None:
        batch = sharding.shard_batch(next(data_iter), mesh)
      state, step_metrics = compiled(state, *frozen_args, batch)
      # The next batch is drawn at the top of the next iteration, after any checkpoint: the saved
      # iterator position is then exactly that of the saved step (bit-exact resume).
      batch = None
      step += 1
      # Check the previous step's loss while this one runs (one step of lag keeps the queue full).
      if pending is not None:
        history.append(_checked(pending, step - 1))
      pending = step_metrics
      progress.update(1)
      timed_steps += 1
      due_log = step % config.log_every_steps == 0
      due_eval = validator is not None and step % config.eval.every_steps == 0
      due_ckpt = step % config.checkpoint.every_steps == 0 or step == config.total_steps
      preempted = stop.poll()
      if not (due_log or due_eval or due_ckpt or preempted):
        continue
      history.append(_checked(pending, step))
      pending = None
      if due_log:
        elapsed = time.perf_counter() - timer
        scalars = {k: np.mean([h[k] for h in history]) for k in history[0]}
        scalars["perf/img_per_sec"] = timed_steps * config.batch_size / elapsed
        scalars["perf/img_per_sec_per_device"] = scalars["perf/img_per_sec"] / jax.device_count()
        scalars["perf/step_seconds"] = elapsed / timed_steps
        if flops is not None:
          scalars["perf/tflops_per_sec_per_device"] = flops * timed_steps / elapsed / 1e12
        writer.write_scalars(step, scalars)
        history = []
      if due_eval:
        validator(step, state.ema_params, frozen, writer)
      if due_ckpt or preempted:
        ckpt.save(step, state, data_iter)
      if preempted:
        ckpt.wait()
        logging.warning("Stopped by SIGTERM after step %d; checkpoint saved.", step)
        break
      if due_log or due_eval or due_ckpt:
        timed_steps, timer = 0, time.perf_counter()
    ckpt.wait()
  finally:
    progress.close()
    writer.close()
    ckpt.close()
  return state


def _checked(step_metrics, step):
  """Fetches a step's metrics to the host; raises FloatingPointError on a non-finite loss."""
  values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  if not np.isfinite(values["train/loss"]):
    raise FloatingPointError(
        f"Non-finite loss {values['train/loss']} at step {step} (grad norm "
        f"{values['train/grad_norm']}); stopping without saving. The last checkpoint is intact.")
  return values
