r"""Benchmarks: one JSON record per run, with the command, the device and the timing statistics.

  python -m vosr_jax.bench --config=configs/multistep.py:bench-small --what=denoiser
  python -m vosr_jax.bench --config=configs/multistep.py:bench-small --what=denoiser --steps=10 \
    --vs-torch
  python -m vosr_jax.bench --config=configs/multistep.py:bench-small --what=train
  python -m vosr_jax.bench --config=configs/onestep.py:bench-small --what=distill
  python -m vosr_jax.bench --config=configs/multistep.py:bench-small --what=degradation
  python -m vosr_jax.bench --config=configs/multistep.py:bench-small --what=pipeline --folder=DIR
  python -m vosr_jax.bench --config=configs/multistep.py:bench-small --what=sampling
  python -m vosr_jax.bench --config=configs/multistep.py:0.5b --what=compile --step=denoiser \
    --depth=14 --per_device_batch=8
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m vosr_jax.bench \
    --config=configs/multistep.py:0.5b --what=memory --step=train --memory_gb=80 \
    --config.mesh.data=1 --config.mesh.fsdp=8

Modes (`--what`); the networks, state and jitted steps are `builder.build`'s:
  denoiser     the run's step from already encoded latents (`Run.denoiser_step`: the train step
               of a multistep config without degradation and frozen encoders, i.e. denoiser
               forward, backward, clipped AdamW, EMA) on random latents and tokens of the
               config's shapes. `--vs-torch`: side by side with the PyTorch step of
               benchmarks/torch_denoiser_step.py (bench-small shapes only), `VS_TORCH_ROUNDS`
               alternating rounds of JAX (in this process, the step compiled once) and torch
               (a subprocess, same --steps/--warmup, --threads = this process's usable cores).
  train        the train step of a multistep config (`Run.train_step`: degradation, encoder,
               autoencoder, denoiser, optimizer) on random uint8 HQ batches of
               `config.batch_size` x `config.data.resolution`^2.
  distill      the train step of a one-step config (configs/onestep.py): the distillation step
               with the student and a random multistep teacher (teacher and student calls of
               `config.distill`).
  degradation  the jitted degradation chain (`degradation.make_degrade`) on a random float batch of
               `--degradation_batch` images of `--degradation_size`^2 pixels, a new key per call.
  pipeline     `next()` of the training data iterator reading the images of `--folder` with
               `config.data` (`num_workers`, `resolution`) and `config.batch_size`.
  sampling     `inference.benchmark_sampling`: `sampling.super_resolve` end to end (encoder, VAE
               encode, denoiser steps, decode, colour fix) for a multi-step model
               (`--sampling_steps` guided Euler steps) and a one-step student, at `--sizes`
               (`--sampling_models` picks one of them).
  compile      lowers and compiles (never runs) the `--step` step ('denoiser', 'train' or
               'distill') from abstract networks and batch (`jax.eval_shape`: nothing of parameter
               size is allocated): `lower_s`, `compile_s`, the per-device fields of
               `compiled.memory_analysis()` and `peak_bytes_estimate` = argument + output + temp -
               alias, with `memory_source` naming the compiler (a CPU figure is the CPU compiler's,
               not a GPU's). `--depth` overrides the denoiser depth (compile time vs depth, with
               `--config.model.scan`); `--per_device_batch` sets config.batch_size to it times
               mesh data x fsdp.
  memory       the largest per-device batch of `--step` whose `peak_bytes_estimate` fits
               `--memory_gb` (1e9 bytes): compiles at the two `--probe_batches`, fits peak =
               fixed + per_sample x batch, predicts the largest batch, compiles there to verify
               (and refits and steps down once if it does not fit).

Every network has random weights (`init='random'` is forced): timings do not depend on the values.
Each timed figure is the median, min, max and mean over `--steps` calls after `--warmup` untimed
ones, each call blocked on (`perf.time_fn`); compilation is timed apart (`compile_s`). FLOPs per
step come from XLA's cost analysis of the lowered step with the block stacks unrolled (`model.scan` and
`encoder.scan` off): the cost analysis counts a `lax.scan` body once, not once per layer. MFU is
given where the peak FLOP/s of the device is known (`PEAK_FLOPS`) or passed with `--peak_tflops`.
Every record carries `machine` (`perf.machine_info`: CPU model and ISA features, logical and
usable cores, XLA_FLAGS, jax/jaxlib versions, backend, device kind). A flag given on the command
line that the mode does not use (`FLAG_MODES`) is a usage error.
"""
import importlib.util
import inspect
import json
import os
import platform
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vosr_jax import builder, cli_utils, inference, perf, sharding
from vosr_jax.perf import MEMORY_FIELDS, PEAK_FLOPS, memory_stats, peak_flops  # noqa: F401
from vosr_jax.models import dit
from vosr_jax.data import degradation, pipeline

MODES = ("denoiser", "train", "distill", "degradation", "pipeline", "sampling", "compile",
         "memory")
STEPS = ("denoiser", "train", "distill")
SAMPLING_MODELS = ("multistep", "onestep")  # Pipelines of --what=sampling.
# The modes that use each mode-specific flag: any other mode rejects the flag when it is given.
TIMED = ("denoiser", "train", "distill", "degradation", "pipeline", "sampling")
FLAG_MODES = {
    "steps": TIMED, "warmup": TIMED,
    "peak_tflops": ("denoiser", "train", "distill"),
    "folder": ("pipeline",),
    "degradation_batch": ("degradation",), "degradation_size": ("degradation",),
    "sizes": ("sampling",), "sampling_steps": ("sampling",), "sampling_models": ("sampling",),
    "step": ("compile", "memory"),
    "depth": ("denoiser", "train", "distill", "sampling", "compile", "memory"),
    "per_device_batch": ("compile",),
    "memory_gb": ("memory",), "probe_batches": ("memory",),
    "vs-torch": ("denoiser",),
}
# The PyTorch partner of `--vs-torch` (a file of the checkout, next to the vosr_jax package).
TORCH_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "benchmarks", "torch_denoiser_step.py")
VS_TORCH_ROUNDS = 3  # Alternating JAX / torch rounds of --vs-torch.


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].",
                                          lock_config=True)
_WHAT = flags.DEFINE_enum("what", "denoiser", MODES, "What to time.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls (after the warm-up).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls before the timed ones.", lower_bound=0)
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None,
                                  "Peak TFLOP/s per device for MFU (default: PEAK_FLOPS table).")
_FOLDER = flags.DEFINE_string("folder", None, "Image folder of --what=pipeline.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON record to this file.")
_DEGRADATION_BATCH = flags.DEFINE_integer("degradation_batch", 8, "Batch of --what=degradation.",
                                          lower_bound=1)
_DEGRADATION_SIZE = flags.DEFINE_integer("degradation_size", 512,
                                         "Square image side of --what=degradation.", lower_bound=16)
_SIZES = flags.DEFINE_list("sizes", ["128:512", "256:1024"],
                           "LR_SIDE:HR_SIDE pairs of --what=sampling.")
_SAMPLING_STEPS = flags.DEFINE_integer("sampling_steps", None,
                                       "Euler steps of the multi-step model in --what=sampling "
                                       "(default: config.sampling.num_steps).", lower_bound=1)
_SAMPLING_MODELS = flags.DEFINE_list("sampling_models", list(SAMPLING_MODELS),
                                     "Which pipelines --what=sampling times.")
_STEP = flags.DEFINE_enum("step", "train", STEPS, "The step of --what=compile and --what=memory.")
_DEPTH = flags.DEFINE_integer("depth", None,
                              "Denoiser depth (config.model.overrides.depth) over the variant's.",
                              lower_bound=1)
_PER_DEVICE_BATCH = flags.DEFINE_integer(
    "per_device_batch", None, "--what=compile: config.batch_size = this x the data-parallel size "
    "(mesh data x fsdp); default: config.batch_size as it is.", lower_bound=1)
_MEMORY_GB = flags.DEFINE_float("memory_gb", 80.0,
                                "--what=memory: device memory in GB (1e9 bytes) to fit.")
_PROBE_BATCHES = flags.DEFINE_list("probe_batches", ["2", "8"],
                                   "--what=memory: the two per-device batches of the linear fit.")
_VS_TORCH = flags.DEFINE_bool(
    "vs-torch", False, "--what=denoiser: alternate the JAX step with the PyTorch step of "
    "benchmarks/torch_denoiser_step.py (bench-small shapes), 3 rounds each, and report both "
    "sides' medians and their ratio.")
flags.mark_flags_as_required(["config"])
for _name in ("peak_tflops", "memory_gb"):
  flags.register_validator(_name, lambda v: v is None or v > 0, f"--{_name} must be > 0")


def _step(what, run):
  """(the jitted step of `what`, its arguments from `run`'s initial state): 'denoiser'
  `run.denoiser_step` on random latents, 'train' and 'distill' `run.train_step` on a random uint8
  batch; abstract (ShapeDtypeStructs) when `run` is."""
  config, mesh = run.config, run.mesh
  abstract = isinstance(run.state.step, jax.ShapeDtypeStruct)
  if what == "denoiser":
    shapes = run.latent_spec()
    if abstract:
      return run.denoiser_step, run.denoiser_args(shapes)

    def draw():
      keys = jax.random.split(jax.random.PRNGKey(config.seed), len(shapes))
      return {k: jax.random.normal(key, s.shape, s.dtype)
              for key, (k, s) in zip(keys, sorted(shapes.items()))}

    latents = jax.jit(draw, out_shardings=sharding.batch_sharding(mesh))()
    return run.denoiser_step, run.denoiser_args(latents)
  batch = run.batch_spec()
  if not abstract:
    shape = batch["hq"].shape
    local = (shape[0] // jax.process_count(),) + shape[1:]
    hq = np.random.default_rng(config.seed).integers(0, 256, local, np.uint8)
    batch = sharding.shard_batch({"hq": hq}, mesh)
  return run.train_step, run.step_args(batch)


def _step_flops(what, config, mesh, lowered):
  """(FLOPs of one global step, how they were counted) from XLA's cost analysis.

  The cost analysis counts a loop body once, not once per iteration, so a config with loops (the
  block stacks' `lax.scan`, the degradation's Poisson sums) is lowered again, abstractly (nothing
  allocated or compiled), with them unrolled (`builder.unrolled`).
  """
  source = "xla_cost_analysis(lowered step)"
  if config.model.scan or config.encoder.scan or not config.degradation.unroll_poisson:
    fn, args = _step(what, builder.build(builder.unrolled(config), mesh, abstract=True))
    lowered = fn.lower(*args)
    source = "xla_cost_analysis(lowered step, loops unrolled)"
  flops = perf.flops(lowered)
  return (None, None) if flops is None else (flops, source)


def bench_step(what, config, mesh, *, num_steps, warmup, peak_tflops=None, partner=None,
               rounds=VS_TORCH_ROUNDS):
  """Times the 'denoiser', 'train' or 'distill' step of `config` on `mesh` (module docstring).

  Args:
    partner: optional callable with no arguments that times another implementation of the step
      and returns a record with `median_s` (`torch_partner`): then the step (compiled once) and
      the partner run in `rounds` alternating rounds (`perf.side_by_side`), the step first.
  Returns:
    JSON-able dict: compile_s, the `perf.time_fn` statistics, images_per_s, flops_per_step,
    flops_source, tflops_per_s (all devices), peak_tflops_per_device, peak_source, mfu (or None),
    and the input shapes. With `partner`: the statistics are over all rounds (median_s the median
    of the per-round medians, `steps` per round) and `vs_torch` holds the rounds of both sides
    (`perf.side_by_side`: jax, torch) and `ratio_jax_over_torch`.
  """
  run = builder.build(config, mesh)
  fn, args = _step(what, run)
  start = time.perf_counter()
  lowered = fn.lower(*args)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops, flops_source = _step_flops(what, config, mesh, lowered)
  shapes = {k: list(v.shape) for k, v in args[-1].items()}
  current = [args]  # The donated state moves on with each call.

  def update(a, out):
    current[0] = (out[0],) + a[1:]
    return current[0]

  def time_step():
    return perf.time_fn(compiled, current[0], num_steps, warmup, update=update)

  extra = {}
  if partner is None:
    timing = time_step()
  else:
    compared = perf.side_by_side({"jax": time_step, "torch": partner}, rounds)
    runs = compared["sides"]["jax"]["runs"]
    timing = dict(steps=num_steps, warmup=warmup, rounds=rounds,
                  median_s=compared["sides"]["jax"]["median_s"],
                  min_s=min(r["min_s"] for r in runs), max_s=max(r["max_s"] for r in runs),
                  mean_s=sum(r["mean_s"] for r in runs) / len(runs))
    extra["vs_torch"] = compared
  median = timing["median_s"]
  peak, peak_source = perf.peak_flops(jax.devices()[0].device_kind, config.dtype, peak_tflops)
  return dict(
      compile_s=compile_s, **timing, batch_size=config.batch_size, shapes=shapes,
      images_per_s=config.batch_size / median,
      params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.state.params)),
      flops_per_step=flops, flops_source=flops_source,
      tflops_per_s=None if flops is None else flops / median / 1e12,
      peak_tflops_per_device=None if peak is None else peak / 1e12, peak_source=peak_source,
      mfu=None if flops is None or peak is None else flops / median / (peak * mesh.size),
      **extra)


def torch_shapes(script=TORCH_SCRIPT):
  """The denoiser shapes the PyTorch step of `script` is fixed to (its SHAPES, BATCH and
  ENC_TOKENS, read without importing torch), keyed as `denoiser_shapes`."""
  if not os.path.isfile(script):
    raise FileNotFoundError(f"--vs-torch needs {script} (benchmarks/ of a vosr-jax checkout)")
  spec = importlib.util.spec_from_file_location("_vosr_torch_denoiser_step", script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  shapes = module.SHAPES
  return dict(hidden_size=shapes["hidden_size"], depth=shapes["depth"],
              num_heads=shapes["num_heads"], patch_size=shapes["patch_size"],
              latent_channels=shapes["latent_channels"],
              latent_size=[shapes["input_size"]] * 2, encoder_tokens=module.ENC_TOKENS,
              encoder_width=shapes["enc_dim"], batch_size=module.BATCH, dtype="float32")


def denoiser_shapes(config, mesh):
  """The shapes of `config`'s denoiser step (from an abstract build: nothing allocated): the DiT
  size (hidden_size, depth, num_heads, patch_size), the latents (latent_channels, latent_size),
  the encoder tokens (encoder_tokens, encoder_width), the global batch_size and the dtype."""
  kwargs = dit.variant_kwargs(config.model.variant, **config.model.overrides.to_dict())
  patch_size = kwargs.get(
      "patch_size", inspect.signature(dit.LightningDiT.__init__).parameters["patch_size"].default)
  spec = builder.build(config, mesh, abstract=True).latent_spec()
  latent, tokens = spec["hr_latent"].shape, spec["tokens"].shape
  return dict(hidden_size=kwargs["hidden_size"], depth=kwargs["depth"],
              num_heads=kwargs["num_heads"], patch_size=patch_size, latent_channels=latent[-1],
              latent_size=list(latent[1:3]), encoder_tokens=tokens[1], encoder_width=tokens[-1],
              batch_size=latent[0], dtype=config.dtype)


def _torch_importable():
  return importlib.util.find_spec("torch") is not None


def check_vs_torch(what, config, mesh, script=TORCH_SCRIPT):
  """Raises ValueError (or FileNotFoundError) unless `--vs-torch` can compare `config`'s step: the
  denoiser mode, the partner script, an importable torch, and the script's shapes."""
  if what != "denoiser":
    raise ValueError(f"--vs-torch applies to --what=denoiser only, not --what={what}")
  wanted = torch_shapes(script)
  if not _torch_importable():
    raise ValueError("--vs-torch needs PyTorch importable in this Python "
                     "(pip install -e '.[torch]')")
  have = denoiser_shapes(config, mesh)
  differ = [f"{k} {have[k]} (torch {wanted[k]})" for k in wanted if have[k] != wanted[k]]
  if differ:
    raise ValueError(f"--vs-torch: {os.path.basename(script)} is fixed to the bench-small "
                     f"denoiser shapes (configs/multistep.py:bench-small); this config differs: "
                     + ", ".join(differ))


def torch_partner(num_steps, warmup, threads, script=TORCH_SCRIPT):
  """A callable that runs the PyTorch step of `script` in a subprocess (this Python) with the
  given --steps, --warmup and --threads and returns its JSON record plus the command."""
  command = [sys.executable, script, f"--threads={threads}", f"--steps={num_steps}",
             f"--warmup={warmup}"]

  def call():
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode:
      tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
      raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}: {tail[0]}")
    return dict(json.loads(proc.stdout), command=" ".join(command))

  return call


def _depth(config):
  """The denoiser depth of `config.model` (variant plus overrides)."""
  return dit.variant_kwargs(config.model.variant, **config.model.overrides.to_dict())["depth"]


def bench_compile(what, config, mesh):
  """Lowers and compiles step `what` of `config` on `mesh` abstractly (nothing of parameter or
  batch size is allocated) and reads the compiler's memory analysis.

  Returns:
    JSON-able dict: step, lower_s, compile_s, batch_size (global), per_device_batch, shapes,
    params, depth, scan, remat_policy, mesh_shape, memory_per_device (`memory_stats`, or None)
    and memory_source (which compiler's analysis).
  """
  run = builder.build(config, mesh, abstract=True)
  fn, args = _step(what, run)
  start = time.perf_counter()
  lowered = fn.lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - lowered_at
  memory = perf.memory_stats(compiled)
  backend = jax.default_backend()
  return dict(
      step=what, lower_s=lowered_at - start, compile_s=compile_s, batch_size=config.batch_size,
      per_device_batch=config.batch_size // sharding.batch_size_per_step(mesh),
      shapes={k: list(v.shape) for k, v in args[-1].items()},
      params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.state.params)),
      depth=_depth(config), scan=config.model.scan, remat_policy=config.model.remat_policy,
      mesh_shape=dict(mesh.shape), memory_per_device=memory,
      memory_source=None if memory is None else
      f"{backend} compiled memory_analysis ({jax.devices()[0].device_kind})")


def bench_memory(what, config, mesh, *, memory_gb=80.0, probe_batches=(2, 8)):
  """The largest per-device batch of step `what` whose compiled `peak_bytes_estimate` fits
  `memory_gb` GB (1e9 bytes) per device, from few compiles (`bench_compile`).

  Compiles at the two per-device `probe_batches`, fits peak = fixed + per_sample x batch, predicts
  the largest batch under the limit, and verifies it by compiling there; a prediction that does
  not fit is refitted once (through the larger probe and the failed point) and compiled again
  (`perf.max_batch_search`).

  Returns:
    JSON-able dict: limit_bytes, probes (the `bench_compile` records), fit (fixed_bytes,
    per_sample_bytes), predicted_max_batch, verify (the `bench_compile` records of the
    verification compiles), verified_max_batch (None when no compile confirmed it) and the
    model/mesh figures of the probes.
  """
  limit = int(memory_gb * 1e9)
  records = {}

  def peak(batch):
    records[batch] = bench_compile(what, builder.with_per_device_batch(config, batch, mesh), mesh)
    memory = records[batch]["memory_per_device"]
    if not memory or "peak_bytes_estimate" not in memory:
      raise ValueError(f"--what=memory: the {jax.default_backend()} backend gives no compiled "
                       "memory analysis")
    return memory["peak_bytes_estimate"]

  try:
    search = perf.max_batch_search(peak, limit, probe_batches)
  except ValueError as e:
    raise ValueError(f"--what=memory, --probe_batches={probe_batches}: {e}") from e
  b1, b2 = sorted(int(b) for b in probe_batches)
  first = records[b1]
  return dict(
      step=what, limit_bytes=limit, memory_gb=memory_gb,
      probes=[records[b1], records[b2]],
      fit=dict(fixed_bytes=search["fixed_bytes"], per_sample_bytes=search["per_sample_bytes"]),
      predicted_max_batch=search["predicted"], verify=[records[b] for b in search["tried"]],
      verified_max_batch=search["verified"],
      **{k: first[k] for k in ("params", "depth", "scan", "remat_policy", "mesh_shape",
                               "memory_source")})


def bench_degradation(config, *, batch, size, num_steps, warmup):
  """Times the jitted degradation chain of `config.degradation` on a random float batch."""
  fn = degradation.make_degrade(config.degradation)
  key = jax.random.PRNGKey(config.seed)
  hq = jax.random.uniform(key, (batch, size, size, 3))
  start = time.perf_counter()
  compiled = fn.lower(key, hq).compile()
  compile_s = time.perf_counter() - start
  timing = perf.time_fn(compiled, (key, hq), num_steps, warmup,
                        update=lambda a, _: (jax.random.fold_in(a[0], 1), a[1]))
  return dict(compile_s=compile_s, **timing, batch_size=batch, image_size=size,
              images_per_s=batch / timing["median_s"])


def bench_pipeline(config, folder, *, num_steps, warmup):
  """Times batches of the training iterator over the images of `folder` (`config.data`)."""
  if not folder:
    raise ValueError("--what=pipeline needs --folder=DIR (a folder of images)")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--folder={folder} is not a folder")
  return dict(**pipeline.benchmark_pipeline(folder, config.data, batch_size=config.batch_size,
                                            num_batches=num_steps, warmup_batches=warmup),
              folder=folder)


def bench_sampling(config, *, sizes, sampling_steps, num_steps, warmup, models=SAMPLING_MODELS):
  """`inference.benchmark_sampling` of random multi-step and/or one-step pipelines of `config`."""
  unknown = set(models) - set(SAMPLING_MODELS)
  if unknown or not models:
    raise ValueError(f"--sampling_models={','.join(models)}: expected a non-empty subset of "
                     f"{SAMPLING_MODELS}")
  pairs = []
  for item in sizes:
    try:
      lr_side, hr_side = (int(v) for v in item.split(":"))
    except ValueError as e:
      raise ValueError(f"--sizes: {item!r} is not LR_SIDE:HR_SIDE (e.g. 128:512)") from e
    if min(lr_side, hr_side) < 1:
      raise ValueError(f"--sizes: {item!r} needs positive sides")
    pairs.append((lr_side, hr_side))
  return inference.benchmark_sampling(
      inference.random_pipeline(config) if "multistep" in models else None,
      inference.random_pipeline(config, one_step=True) if "onestep" in models else None,
      sampling_config=config.sampling, sizes=tuple(pairs), multistep_steps=sampling_steps,
      repeats=num_steps, warmup=warmup, seed=config.seed)


def run(config, what, *, num_steps=10, warmup=2, peak_tflops=None, folder=None,
        degradation_batch=8, degradation_size=512, sizes=("128:512", "256:1024"),
        sampling_steps=None, sampling_models=SAMPLING_MODELS, step="train", depth=None,
        per_device_batch=None, memory_gb=80.0, probe_batches=(2, 8), vs_torch=False):
  """Runs benchmark `what` (one of `MODES`) on `config`; arguments as the flags of the same names
  (`vs_torch`: `--vs-torch`).

  Returns:
    JSON-able dict: the mode's figures plus what, model_variant, dtype, device_kind,
    device_count, process_count, backend, jax_version, weights, host_load_avg, host and machine
    (`perf.machine_info`).
  """
  if what not in MODES:
    raise ValueError(f"--what={what!r} must be one of {MODES}")
  if vs_torch and what != "denoiser":
    raise ValueError(f"--vs-torch applies to --what=denoiser only, not --what={what}")
  jax.config.update("jax_threefry_partitionable", True)
  config = builder.random_weights(config)
  if depth is not None:
    with config.unlocked():
      config.model.overrides.depth = depth
  stepped = step if what in ("compile", "memory") else what
  if stepped not in STEPS and what in ("compile", "memory"):
    raise ValueError(f"--step={step!r} must be one of {STEPS}")
  if stepped == "distill" and config.kind != "onestep":
    raise ValueError(f"--what=distill needs a one-step config (config.kind='onestep', "
                     f"configs/onestep.py), not config.kind={config.kind!r}")
  if stepped == "train" and config.kind != "multistep":
    raise ValueError(f"--what=train needs a multistep config (config.kind='multistep', "
                     f"configs/multistep.py), not config.kind={config.kind!r}; the one-step "
                     "train step is --what=distill")
  if what in ("compile", "memory"):
    mesh = sharding.make_mesh(config.mesh)
    if what == "memory":
      result = bench_memory(step, config, mesh, memory_gb=memory_gb, probe_batches=probe_batches)
    else:
      if per_device_batch is not None:
        config = builder.with_per_device_batch(config, per_device_batch, mesh)
      sharding.check_batch_size(config.batch_size, mesh)
      result = bench_compile(step, config, mesh)
  elif what in ("denoiser", "train", "distill"):
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    partner = None
    if vs_torch:
      check_vs_torch(what, config, mesh)
      partner = torch_partner(num_steps, warmup, perf.usable_cores())
    result = bench_step(what, config, mesh, num_steps=num_steps, warmup=warmup,
                        peak_tflops=peak_tflops, partner=partner)
  elif what == "degradation":
    result = bench_degradation(config, batch=degradation_batch, size=degradation_size,
                               num_steps=num_steps, warmup=warmup)
  elif what == "pipeline":
    result = bench_pipeline(config, folder, num_steps=num_steps, warmup=warmup)
  else:
    result = bench_sampling(config, sizes=sizes, sampling_steps=sampling_steps,
                            num_steps=num_steps, warmup=warmup, models=tuple(sampling_models))
  device = jax.devices()[0]
  return {**dict(what=what, model_variant=config.model.variant, dtype=config.dtype,
                 device_kind=device.device_kind, device_count=jax.device_count(),
                 process_count=jax.process_count(), backend=jax.default_backend(),
                 jax_version=jax.__version__, weights="random",
                 host_load_avg=list(os.getloadavg()), host=platform.node(),
                 machine=perf.machine_info()), **result}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _OUTPUT.value:
    try:
      cli_utils.check_output_folder(os.path.dirname(os.path.abspath(_OUTPUT.value)), "--output")
    except OSError as e:
      cli_utils.usage_exit(str(e))
  for name, modes in FLAG_MODES.items():
    if flags.FLAGS[name].present and _WHAT.value not in modes:
      cli_utils.usage_exit(f"--{name} does not apply to --what={_WHAT.value} (only to "
                           + ", ".join(f"--what={m}" for m in modes) + ")")
  config_flag = flags.FLAGS["config"]
  try:
    record = run(_CONFIG.value, _WHAT.value, num_steps=_STEPS.value, warmup=_WARMUP.value,
                 peak_tflops=_PEAK_TFLOPS.value, folder=_FOLDER.value,
                 degradation_batch=_DEGRADATION_BATCH.value,
                 degradation_size=_DEGRADATION_SIZE.value, sizes=_SIZES.value,
                 sampling_steps=_SAMPLING_STEPS.value, sampling_models=_SAMPLING_MODELS.value,
                 step=_STEP.value, depth=_DEPTH.value,
                 per_device_batch=_PER_DEVICE_BATCH.value, memory_gb=_MEMORY_GB.value,
                 probe_batches=_PROBE_BATCHES.value, vs_torch=_VS_TORCH.value)
  except (ValueError, FileNotFoundError) as e:  # Flag and config checks, before any timing.
    cli_utils.usage_exit(str(e))
  cli_utils.emit_record("vosr_jax.bench", config_flag, record, _OUTPUT.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli_utils.parse_absl_flags)
