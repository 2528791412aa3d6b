"""Measuring calls: wall-clock statistics of repeated calls (`time_fn`), alternating rounds of
two timed programs (`side_by_side`), the FLOPs of a lowered or compiled program from XLA's cost
analysis (`flops`), the compiled memory per device (`memory_stats`) and the largest batch that fits
(`max_batch_search`), the peak FLOP/s of a device (`peak_flops`), and what a figure was measured on
(`machine_info`).

Every timing loop of the package (the benchmark CLI, `inference.benchmark_sampling`,
`data.pipeline.benchmark_pipeline`) is `time_fn`.
"""
import importlib.metadata
import math
import os
import platform
import statistics
import time

import jax

# The CPU features that decide which matmul kernels XLA and PyTorch can use (/proc/cpuinfo flags).
ISA_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def time_fn(fn, args, steps, warmup, update=None):
  """Calls `fn(*args)` `warmup + steps` times, blocking on each result; times the last `steps`.

  Args:
    fn: any callable (a compiled step, a jitted function, a Python iterator's `next`).
    args: tuple of arguments of the first call.
    steps: timed calls (>= 1).
    warmup: untimed calls first (>= 0).
    update: optional (args, result) -> the arguments of the next call, outside the timed region
      (threads a donated train state, draws a new key).
  Returns:
    dict(steps, warmup, median_s, min_s, max_s, mean_s).
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0")
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    if i >= warmup:
      times.append(time.perf_counter() - start)
    if update is not None:
      args = update(args, out)
  return dict(steps=steps, warmup=warmup, median_s=statistics.median(times), min_s=min(times),
              max_s=max(times), mean_s=statistics.fmean(times))


def flops(stage):
  """FLOPs of one call of a `jax.stages.Lowered` (the global program) or `Compiled` (per device)
  from XLA's cost analysis (`first_analysis`), or None when the backend reports none.
  """
  cost = first_analysis(stage.cost_analysis())
  return float(cost["flops"]) if cost and "flops" in cost else None


def first_analysis(analysis):
  """A cost or memory analysis as one object: some jaxlib versions return one per program in a
  list, of which the first is taken (None for an empty list)."""
  if isinstance(analysis, (list, tuple)):
    return analysis[0] if analysis else None
  return analysis


# Per-device fields of `compiled.memory_analysis()` (`jaxlib` CompiledMemoryStats) reported.
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes")

# Dense peak FLOP/s per chip by compute dtype; the first key found in the lower-cased
# `device_kind` wins (so the more specific names come first). GPU float32 is the TF32 tensor-core
# peak, which JAX's default matmul precision uses; TPU float32 has no single peak (left out).
PEAK_FLOPS = (
    ("h100 pcie", {"bfloat16": 756e12, "float32": 378e12}),
    ("h100 nvl", {"bfloat16": 835e12, "float32": 418e12}),
    ("h100", {"bfloat16": 989e12, "float32": 495e12}),  # SXM.
    ("h200", {"bfloat16": 989e12, "float32": 495e12}),
    ("a100", {"bfloat16": 312e12, "float32": 156e12}),
    ("tpu v4", {"bfloat16": 275e12}),
    ("tpu v5 lite", {"bfloat16": 197e12}),  # v5e.
    ("tpu v5", {"bfloat16": 459e12}),  # v5p.
    ("tpu v6 lite", {"bfloat16": 918e12}),  # v6e.
)


def peak_flops(device_kind, dtype, peak_tflops=None):
  """(peak FLOP/s per device, where it comes from), or (None, None) when unknown.

  Args:
    device_kind: `jax.devices()[0].device_kind`.
    dtype: the compute dtype name (`config.dtype`).
    peak_tflops: `--peak_tflops`, which wins over the table.
  """
  if peak_tflops is not None:
    return peak_tflops * 1e12, "--peak_tflops"
  kind = device_kind.lower()
  for key, peaks in PEAK_FLOPS:
    if key in kind:
      return (peaks[dtype], f"PEAK_FLOPS[{key!r}][{dtype!r}]") if dtype in peaks else (None, None)
  return None, None


def memory_stats(compiled):
  """Per-device `MEMORY_FIELDS` of `compiled.memory_analysis()` plus `peak_bytes_estimate`
  (argument + output + temp - alias: live at once, donated inputs counted once), or None when the
  backend reports nothing."""
  try:
    stats = first_analysis(compiled.memory_analysis())
  except NotImplementedError:  # Backends without a memory analysis.
    return None
  if stats is None:
    return None
  out = {k: int(getattr(stats, k)) for k in MEMORY_FIELDS if getattr(stats, k, None) is not None}
  if len(out) < len(MEMORY_FIELDS):
    return out or None
  out["peak_bytes_estimate"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
  return out

def max_batch_search(peak_at, limit_bytes, probe_batches):
  """The largest batch whose peak bytes fit `limit_bytes`, from few compiles.

  Compiles at the two `probe_batches`, fits peak = fixed + per_sample x batch, predicts the
  largest batch under the limit, and verifies it by compiling there; a prediction that does not
  fit is refitted once (through the larger probe and the failed point) and compiled again.

  Args:
    peak_at: batch -> peak bytes (a compile; called at most once per batch).
    limit_bytes: the memory to fit.
    probe_batches: two distinct batches >= 1.
  Returns:
    dict(fixed_bytes, per_sample_bytes, predicted (the first fit's prediction), tried (the
    verified candidates in order), verified (None when no compile confirmed one), peaks {batch:
    bytes}).
  Raises:
    ValueError: bad probes, or a peak that does not grow with the batch.
  """
  b1, b2 = sorted(int(b) for b in probe_batches)
  if not 1 <= b1 < b2:
    raise ValueError(f"probe batches {probe_batches}: two distinct batches >= 1")
  peaks = {}

  def peak(batch):
    if batch not in peaks:
      peaks[batch] = peak_at(batch)
    return peaks[batch]

  def fit(x1, x2):
    per_sample = (peak(x2) - peak(x1)) / (x2 - x1)
    if per_sample <= 0:
      raise ValueError(f"the peak does not grow with the batch ({x1}: {peak(x1)}, {x2}: "
                       f"{peak(x2)} bytes); try other probe batches")
    fixed = peak(x1) - per_sample * x1
    return fixed, per_sample, max(0, math.floor((limit_bytes - fixed) / per_sample))

  fixed, per_sample, predicted = fit(b1, b2)
  candidate, verified, tried = predicted, None, []
  while verified is None and candidate >= 1 and len(tried) < 2:  # Prediction, then a step down.
    tried.append(candidate)
    if peak(candidate) <= limit_bytes:
      verified = candidate
    elif candidate != b2:  # Refit through the failed point (its compile is cached).
      candidate = min(fit(b2, candidate)[2], candidate - 1)
    else:
      candidate -= 1
  return dict(fixed_bytes=fixed, per_sample_bytes=per_sample, predicted=predicted, tried=tried,
              verified=verified, peaks=peaks)


def side_by_side(sides, rounds=3):
  """Alternates timed runs of several programs, `rounds` times in turn (first, second, ..., first,
  second, ...), so that each sees the same changes of machine load.

  Args:
    sides: dict name -> callable with no arguments returning a dict with `median_s` (a `time_fn`
      record, or another process's); called in the dict's order each round.
    rounds: rounds (>= 1).
  Returns:
    dict(rounds, order, sides={name: dict(median_s_per_round, median_s (the median of those),
    runs (the callables' records))}, and, for exactly two sides A and B, ratio (A's median_s / B's)
    named `ratio_A_over_B`.
  """
  if rounds < 1 or not sides:
    raise ValueError(f"side_by_side: rounds={rounds} must be >= 1 with at least one side")
  runs = {name: [] for name in sides}
  for _ in range(rounds):
    for name, fn in sides.items():
      runs[name].append(fn())
  out = dict(rounds=rounds, order=list(sides), sides={})
  for name, records in runs.items():
    medians = [float(r["median_s"]) for r in records]
    out["sides"][name] = dict(median_s_per_round=medians, median_s=statistics.median(medians),
                              runs=records)
  if len(sides) == 2:
    a, b = sides
    out[f"ratio_{a}_over_{b}"] = out["sides"][a]["median_s"] / out["sides"][b]["median_s"]
  return out


def usable_cores():
  """The logical cores this process may run on (its CPU affinity; `os.cpu_count()` where the OS
  has no affinity call)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count()


def parse_cpuinfo(text):
  """(CPU model name, set of CPU flags) of the first processor in a /proc/cpuinfo text; (None,
  None) for a field it does not have (an ARM cpuinfo has no "model name" and names its flags
  "Features")."""
  model = flags_ = None
  for line in text.splitlines():
    key, sep, value = line.partition(":")
    if not sep:
      continue
    key = key.strip().lower()
    if key == "model name" and model is None:
      model = value.strip()
    elif key in ("flags", "features") and flags_ is None:
      flags_ = set(value.split())
    if model is not None and flags_ is not None:
      break
  return model, flags_


def machine_info(cpuinfo_path="/proc/cpuinfo"):
  """What a figure was measured on, for comparing records across machines.

  Returns:
    JSON-able dict: cpu_model (/proc/cpuinfo "model name", else `platform.processor()` or
    `platform.machine()`), cpu_model_source, isa (each of `ISA_FEATURES`: True/False from the
    /proc/cpuinfo flags, None where there is no such file), logical_cores (`os.cpu_count()`),
    affinity_cores (`usable_cores()`: the cores this process may use), xla_flags (the XLA_FLAGS
    environment variable, or None), jax_version, jaxlib_version, backend, device_kind and
    device_count.
  """
  model = cpu_flags = None
  try:
    with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
      model, cpu_flags = parse_cpuinfo(f.read())
  except OSError:
    pass
  source = cpuinfo_path
  if not model:
    model, source = platform.processor() or platform.machine() or None, "platform"
  try:
    jaxlib_version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    jaxlib_version = None
  device = jax.devices()[0]
  return dict(
      cpu_model=model, cpu_model_source=source,
      isa={k: None if cpu_flags is None else k in cpu_flags for k in ISA_FEATURES},
      logical_cores=os.cpu_count(), affinity_cores=usable_cores(),
      xla_flags=os.environ.get("XLA_FLAGS"), jax_version=jax.__version__,
      jaxlib_version=jaxlib_version, backend=jax.default_backend(),
      device_kind=device.device_kind, device_count=jax.device_count())
