r"""Ahead-of-time compilation of the real steps for a named TPU topology, without a TPU.

  python -m vosr_jax.aot --config=configs/multistep.py:0.5b --topology=v5p:4x4x4 \
    --config.mesh.data=1 --config.mesh.fsdp=-1 --per_chip_batch=8 --out=/tmp/aot.json
  python -m vosr_jax.aot --config=configs/onestep.py:0.5b --topology=v5e:16x16 --step=distill \
    --config.mesh.data=1 --config.mesh.fsdp=-1 --max_batch
  python -m vosr_jax.aot --config=configs/onestep.py:0.5b --topology=v6e:8x8 --step=sample
  python -m vosr_jax.aot --config=configs/multistep.py:tiny --topology=v5e:2x2 --slices=2 \
    --config.mesh.data=1 --config.mesh.fsdp=-1

Needs libtpu (`pip install -e '.[tpu]'`): JAX then describes the chips of a topology that is not
attached (`jax.experimental.topologies`), and XLA:TPU compiles for them, as on the pod. Nothing
of parameter or batch size is allocated: the networks, state and batch are abstract
(`builder.build(config, mesh, abstract=True)`, the same code as training and sampling), and the
mesh is `sharding.make_mesh(config.mesh, topology devices, config.dcn_mesh)`.

Steps (`--step`):
  train    `Run.train_step` of a multistep config: degradation, encoder, autoencoder, denoiser
           forward and backward, clipped AdamW, EMA, on a uint8 batch of config.data.resolution^2.
  distill  the same `Run.train_step` of a one-step config (the distillation step).
  sample   `sampling.super_resolve` (encoder, VAE encode, `config.sampling` Euler steps, decode,
           colour fix) of the run's EMA denoiser (a one-step config samples in one step) on a batch
           of images at config.data.resolution^2, batch-sharded.

Each compile prints (and `--out` writes) one JSON record: the topology, chips and devices, the
mesh, per-chip and global batch, lower and compile times, the per-device memory analysis
against the chip's HBM and `fits`; the compiler's cost analysis (flops, bytes accessed and
`optimal_seconds`, XLA:TPU's own estimate of the step time) with the images/s per chip and the
MFU they give, all under `compiler_estimate`: they are the compiler's model of the chip, not
measurements; the collectives of the partitioned HLO (count and result bytes per kind, each
instruction once as written: a loop body counts once); and the train state per chip (parameters,
optimizer moments, EMA) against its total divided by the fsdp size, with every state tensor
above 1 MiB that stays replicated on a mesh with fsdp or tensor > 1.

The block stacks are unrolled by default (`model.scan` and `encoder.scan` off, `--unroll`): the
TPU cost analysis of a program with a loop counts the body once and gives no valid
`optimal_seconds`. `--nounroll` compiles the config's scans (what training compiles; smaller
compile) and leaves the estimates out when they are not valid.

`--max_batch`: the largest per-chip batch whose peak fits the chip's HBM (`perf.max_batch_search`:
two probe compiles, a linear fit, a verifying compile). A compile over the HBM fails in XLA:TPU;
its message gives the bytes it needed, which count as the peak.

Multi-slice programs (`--slices` > 1) compile and report memory and collectives, but XLA:TPU gives
no step-time estimate for them (`optimal_seconds` < 0; the record says so). libtpu lets one
process at a time load it: a second compile alongside needs ALLOW_MULTIPLE_LIBTPU_LOAD=1.
"""
import math
import os
import re
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from vosr_jax import builder, cli_utils, objectives, perf, sampling, sharding

STEPS = ("train", "distill", "sample")
# HBM per chip (bytes) by device kind; the first key found in the lower-cased `device_kind` wins.
HBM_BYTES = (
    ("tpu v5 lite", 16 * 2**30),  # v5e
    ("tpu v6 lite", 32 * 2**30),  # v6e
    ("tpu v5", 95 * 2**30),  # v5p
    ("tpu v4", 32 * 2**30),
)
# Product names (counting chips, as Cloud TPU names v5e/v6e; v5p and v4 names count TensorCores,
# two per chip) -> libtpu topology names.
TOPOLOGY_ALIASES = {
    "v5e-4": "v5e:2x2", "v5e-16": "v5e:4x4", "v5e-64": "v5e:8x8", "v5e-256": "v5e:16x16",
    "v6e-4": "v6e:2x2", "v6e-16": "v6e:4x4", "v6e-64": "v6e:8x8", "v6e-256": "v6e:16x16",
    "v5p-8": "v5p:2x2x1", "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8",
    "v4-8": "v4:2x2x1", "v4-128": "v4:4x4x4",
}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
REPLICATED_LIMIT_BYTES = 2**20  # State tensors above 1 MiB must not stay replicated under FSDP.
FLAGS = flags.FLAGS
ESTIMATE_LABEL = "compiler estimate (XLA:TPU cost analysis of the compiled step), not a measurement"
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_OOM = re.compile(r"Used ([0-9.]+)([KMGT]?) of ([0-9.]+)([KMGT]?) hbm")


def topology_devices(topology, slices=1):
  """(libtpu topology name, chips, the TPU devices of `slices` slices of it).

  Raises:
    ValueError: naming --topology when libtpu is missing or does not know the topology.
  """
  name = TOPOLOGY_ALIASES.get(topology, topology)
  match = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", name)
  if not match:
    raise ValueError(f"--topology={topology!r}: expected GENERATION:AxB[xC] (e.g. v5e:16x16, "
                     f"v5p:4x4x4) or one of {sorted(TOPOLOGY_ALIASES)}")
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    devices = topologies.get_topology_desc(
        platform="tpu", topology_name=name, chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=slices).devices
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"--topology={topology!r} ({name}): no TPU topology description ({e}); "
                     "install libtpu with `pip install -e '.[tpu]'`") from e
  chips = math.prod(int(d) for d in match.group(2).split("x")) * slices
  return name, chips, list(devices)


def hbm_bytes(device_kind):
  """HBM bytes per chip of `device_kind`, or None when unknown."""
  kind = device_kind.lower()
  return next((b for key, b in HBM_BYTES if key in kind), None)


def collectives(hlo_text):
  """{kind: {count, bytes}} of the collectives in an HLO module's text (`COLLECTIVES`).

  Each instruction counts once as written (the `-start` of an async pair; a loop body once);
  bytes are those of its result (of an async all-gather or collective-permute: the received
  buffer). XLA:TPU writes a reduce-scatter as an all-reduce inside a fusion computation named
  `all-reduce-scatter...`: it counts as a reduce-scatter, with the bytes of the unscattered buffers.
  """
  out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
  computation = ""
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    result, kind, start = match.groups()
    sizes = [_DTYPE_BYTES[d] * math.prod(int(n) for n in dims.split(",") if n)
             for d, dims in _SHAPE.findall(result)]
    if start and kind == "all-gather" and len(sizes) >= 2:
      sizes = sizes[len(sizes) // 2:]  # (operands, results)
    elif start and kind == "collective-permute" and len(sizes) >= 2:
      sizes = sizes[1:2]  # (operand, result, contexts)
    if kind == "all-reduce" and computation.startswith("all-reduce-scatter"):
      kind = "reduce-scatter"
    out[kind]["count"] += 1
    out[kind]["bytes"] += sum(sizes)
  return out


def _tree_bytes(tree, shardings=None):
  """(total bytes, bytes of one device's shard) of a pytree of ShapeDtypeStructs."""
  leaves = jax.tree.leaves(tree)
  shs = jax.tree.leaves(shardings if shardings is not None
                        else jax.tree.map(lambda x: x.sharding, tree),
                        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  total = per_device = 0
  for leaf, sh in zip(leaves, shs, strict=True):
    itemsize = np.dtype(leaf.dtype).itemsize
    total += math.prod(leaf.shape) * itemsize
    per_device += math.prod(sh.shard_shape(leaf.shape)) * itemsize
  return total, per_device


def state_report(run):
  """The train state per device against its total over fsdp, and replicated large tensors."""
  mesh = run.mesh
  fsdp = mesh.shape["fsdp"]
  params_total, params_device = _tree_bytes(run.state.params, run.state_sh.params)
  state_total, state_device = _tree_bytes(run.state, run.state_sh)
  frozen = (run.frozen, run.teacher)
  frozen_total, frozen_device = _tree_bytes(frozen, (run.frozen_sh, run.teacher_sh))
  replicated = []
  if fsdp * mesh.shape["tensor"] > 1:
    flat, _ = jax.tree_util.tree_flatten_with_path(run.state)
    shs = jax.tree.leaves(run.state_sh, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    for (path, leaf), sh in zip(flat, shs, strict=True):
      size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
      if size > REPLICATED_LIMIT_BYTES and sh.is_fully_replicated:
        replicated.append(dict(path=jax.tree_util.keystr(path), shape=list(leaf.shape),
                               bytes=size))
  return dict(
      fsdp=fsdp, params_bytes_total=params_total, params_bytes_per_device=params_device,
      state_bytes_total=state_total, state_bytes_per_device=state_device,
      state_bytes_total_over_fsdp=state_total / fsdp,
      frozen_bytes_total=frozen_total, frozen_bytes_per_device=frozen_device,
      replicated_over_1mib=replicated, replicated_ok=not replicated)


def sample_step(run, per_device_batch):
  """(jitted `sampling.super_resolve` of `run`'s EMA denoiser, its abstract arguments)."""
  config, mesh = run.config, run.mesh
  one_step = config.kind == "onestep"
  denoiser = nnx.merge(run.graphs.denoiser, run.state.ema_params)
  autoencoder = nnx.merge(run.graphs.autoencoder, run.frozen["autoencoder"])
  networks = sampling.Networks(
      denoiser=run.graphs.denoiser, encoder=run.graphs.encoder, autoencoder=run.graphs.autoencoder,
      tap_layer=config.encoder.tap_layer, encoder_size=config.encoder.image_size,
      downsample=autoencoder.downsample, patch_size=denoiser.patch_size, one_step=one_step,
      residual_scale=objectives.residual_scale(config.objective))
  settings = sampling.Settings.from_config(config.sampling, one_step)
  params = {"denoiser": run.state.ema_params, **run.frozen}
  params_sh = {"denoiser": run.state_sh.ema_params, **run.frozen_sh}
  batch_sh = sharding.batch_sharding(mesh)
  batch = per_device_batch * sharding.batch_size_per_step(mesh)
  res = config.data.resolution
  images = jax.ShapeDtypeStruct((batch, res, res, 3), np.float32, sharding=batch_sh)
  key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
  keys = jax.ShapeDtypeStruct((batch,), key_dtype, sharding=batch_sh)

  def fn(p, x, k):
    return sampling.super_resolve(networks, p, x, k, settings)

  jitted = jax.jit(sharding.with_mesh(fn, mesh), in_shardings=(params_sh, batch_sh, batch_sh),
                   out_shardings=batch_sh)
  info = dict(num_steps=settings.num_steps, tile_size=settings.tile_size)
  return jitted, (params, images, keys), info


def _oom_bytes(message):
  """The bytes an XLA:TPU compile over the HBM needed ("Used 20.5G of 15.75G hbm"), or None."""
  match = _OOM.search(message)
  if not match:
    return None
  unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  return int(float(match.group(1)) * unit[match.group(2)])


def compile_step(step, config, mesh, *, chips, topology, hlo_out=None):
  """Compiles `step` of `config` on `mesh` (topology devices) and returns its JSON record
  (module docstring). A compile that fails for lack of HBM gives a record with fits=False.
  `hlo_out`: also write the partitioned HLO text there."""
  run = builder.build(config, mesh, abstract=True)
  devices = mesh.devices.size
  per_device_batch = config.batch_size // sharding.batch_size_per_step(mesh)
  extra = {}
  if step == "sample":
    fn, args, extra = sample_step(run, per_device_batch)
    extra = {"sampling": extra}
  else:
    fn, args = run.train_step, run.step_args(run.batch_spec())
  device_kind = mesh.devices.flat[0].device_kind
  devices_per_chip = devices // chips
  hbm_chip = hbm_bytes(device_kind)
  hbm_device = None if hbm_chip is None else hbm_chip // devices_per_chip
  global_batch = args[1].shape[0] if step == "sample" else config.batch_size
  record = dict(
      step=step, topology=topology, slices=sharding.num_slices(list(mesh.devices.flat)),
      chips=chips, devices=devices, device_kind=device_kind,
      mesh_shape=dict(mesh.shape), per_chip_batch=global_batch // chips,
      per_device_batch=global_batch // devices, global_batch=global_batch,
      image_size=config.data.resolution, dtype=config.dtype, model_variant=config.model.variant,
      scan=dict(model=config.model.scan, encoder=config.encoder.scan),
      remat_policy=config.model.remat_policy, **extra,
      state=state_report(run), hbm_bytes_per_device=hbm_device)
  start = time.perf_counter()
  lowered = fn.lower(*args)
  record["lower_s"] = time.perf_counter() - start
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    needed = _oom_bytes(str(e))
    if needed is None:
      raise
    record.update(compile_s=time.perf_counter() - start, fits=False,
                  memory_per_device=dict(peak_bytes_estimate=needed,
                                         source="XLA:TPU out-of-memory message"),
                  error=str(e).splitlines()[0][:500])
    return record
  record["compile_s"] = time.perf_counter() - start
  memory = perf.memory_stats(compiled)
  record["memory_per_device"] = memory
  record["fits"] = (None if memory is None or hbm_device is None
                    else memory["peak_bytes_estimate"] <= hbm_device)
  record["compiler_estimate"] = _estimate(compiled, record, devices_per_chip)
  hlo = compiled.as_text()
  record["collectives"] = collectives(hlo)
  if hlo_out:
    cli_utils.atomic_write_text(hlo_out, hlo)
    record["hlo"] = hlo_out
  return record


def _estimate(compiled, record, devices_per_chip):
  """The compiler's cost analysis and what it implies (`ESTIMATE_LABEL`)."""
  cost = perf.first_analysis(compiled.cost_analysis()) or {}
  flops = cost.get("flops")
  optimal = cost.get("optimal_seconds")
  valid = optimal is not None and optimal > 0
  # MFU against the chip's bf16 peak whatever the compute dtype (TPUs have no float32 peak).
  peak, peak_source = perf.peak_flops(record["device_kind"], "bfloat16")
  step_s = optimal if valid else None
  per_chip_flops = None if flops is None else flops * devices_per_chip
  return dict(
      label=ESTIMATE_LABEL,
      flops_per_device=flops, bytes_accessed_per_device=cost.get("bytes accessed"),
      optimal_seconds=optimal,
      step_time_s=step_s,
      images_per_s_per_chip=None if step_s is None else record["per_chip_batch"] / step_s,
      mfu=None if step_s is None or peak is None or per_chip_flops is None
      else per_chip_flops / step_s / peak,
      peak_flops_per_chip=peak, peak_source=peak_source,
      note=None if valid else "no valid optimal_seconds: XLA:TPU gives none for programs with "
      "loops (scanned block stacks, gradient accumulation, multi-step sampling; see --unroll) "
      "nor for multi-slice programs")


def _check_step(step, config):
  if step == "train" and config.kind != "multistep":
    raise ValueError(f"--step=train needs a multistep config (configs/multistep.py), not "
                     f"config.kind={config.kind!r}; the one-step train step is --step=distill")
  if step == "distill" and config.kind != "onestep":
    raise ValueError(f"--step=distill needs a one-step config (configs/onestep.py), not "
                     f"config.kind={config.kind!r}")


def run(config, topology, *, step="train", slices=1, per_chip_batch=None, max_batch=False,
        probe_batches=(1, 2), unroll=True, hlo_out=None):
  """Compiles `step` of `config` for `slices` slices of `topology` (module docstring).

  Returns:
    The JSON-able record (with --max_batch: the verified batch's record plus `max_batch`).
  Raises:
    ValueError: bad flags or config (naming them), a topology libtpu does not know.
  """
  if per_chip_batch is not None and max_batch:
    raise ValueError("--per_chip_batch and --max_batch exclude each other")
  _check_step(step, config)
  jax.config.update("jax_threefry_partitionable", True)
  config = builder.random_weights(config)
  if unroll:
    config = builder.unrolled(config)
  name, chips, devices = topology_devices(topology, slices)
  mesh = sharding.make_mesh(config.mesh, devices, config.dcn_mesh)
  if len(devices) != chips:
    raise ValueError(f"--topology={topology}: {len(devices)} devices on {chips} chips; only "
                     "one device per chip is supported (v5e, v5p, v6e)")

  def compile_at(cfg):
    return compile_step(step, cfg, mesh, chips=chips, topology=name, hlo_out=hlo_out)

  if max_batch:
    limit = hbm_bytes(devices[0].device_kind)
    records = {}

    def peak(batch):
      records[batch] = compile_at(builder.with_per_device_batch(config, batch, mesh))
      return records[batch]["memory_per_device"]["peak_bytes_estimate"]

    search = perf.max_batch_search(peak, limit, probe_batches)
    verified = search["verified"]
    summary = dict(
        verified_max_batch=verified, predicted_max_batch=search["predicted"], limit_bytes=limit,
        fit=dict(fixed_bytes=search["fixed_bytes"], per_sample_bytes=search["per_sample_bytes"]),
        compiles={b: dict(fits=r["fits"], peak_bytes=r["memory_per_device"]["peak_bytes_estimate"],
                          compile_s=r["compile_s"]) for b, r in sorted(records.items())})
    best = records[verified] if verified is not None else records[min(records)]
    return {**best, "max_batch": summary}
  if per_chip_batch is not None:
    config = builder.with_per_device_batch(config, per_chip_batch, mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  return compile_at(config)


def _define_flags():
  """The command-line flags, defined only when the module runs as a program (other modules with
  flags, e.g. vosr_jax.bench's --config, may be imported next to it)."""
  config_flags.DEFINE_config_file("config", None, "Config file[:variant].", lock_config=True)
  flags.DEFINE_string(
      "topology", None, "TPU topology: a libtpu name (v5e:16x16, v5p:4x4x4, v6e:8x8) or a product "
      f"name ({', '.join(sorted(TOPOLOGY_ALIASES))}).")
  flags.DEFINE_integer("slices", 1, "Slices of --topology (multi-slice over DCN).", lower_bound=1)
  flags.DEFINE_enum("step", "train", STEPS, "The step to compile.")
  flags.DEFINE_integer("per_chip_batch", None, "config.batch_size = this x mesh data x fsdp "
                       "(default: config.batch_size as it is).", lower_bound=1)
  flags.DEFINE_bool("max_batch", False, "Find the largest per-chip batch that fits the chip's HBM.")
  flags.DEFINE_list("probe_batches", ["1", "2"],
                    "--max_batch: the two per-chip batches of the linear fit.")
  flags.DEFINE_bool("unroll", True, "Unroll the block stacks (model.scan = encoder.scan = False) "
                    "so that the compiler's estimates count every layer.")
  flags.DEFINE_string("out", None, "Also write the JSON record to this file.")
  flags.DEFINE_string("hlo_out", None,
                      "Also write the compiled, partitioned HLO text to this file.")
  flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.out:
    try:
      cli_utils.check_output_folder(os.path.dirname(os.path.abspath(FLAGS.out)), "--out")
    except OSError as e:
      cli_utils.usage_exit(str(e))
  config_flag = FLAGS["config"]
  try:
    probes = tuple(int(b) for b in FLAGS.probe_batches)
    record = run(FLAGS.config, FLAGS.topology, step=FLAGS.step, slices=FLAGS.slices,
                 per_chip_batch=FLAGS.per_chip_batch, max_batch=FLAGS.max_batch,
                 probe_batches=probes, unroll=FLAGS.unroll, hlo_out=FLAGS.hlo_out)
  except (ValueError, FileNotFoundError) as e:
    cli_utils.usage_exit(str(e))
  try:
    import importlib.metadata  # pylint: disable=import-outside-toplevel
    libtpu = importlib.metadata.version("libtpu")
  except Exception:  # pylint: disable=broad-except
    libtpu = None
  cli_utils.emit_record("vosr_jax.aot", config_flag,
                        dict(record, jax_version=jax.__version__, libtpu_version=libtpu), FLAGS.out)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli_utils.parse_absl_flags)
