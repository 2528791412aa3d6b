"""Measuring calls: wall-clock statistics of repeated calls (`time_fn`) and the FLOPs of a lowered
or compiled program from XLA's cost analysis (`flops`).

Every timing loop of the package (the benchmark CLI, `inference.benchmark_sampling`,
`data.pipeline.benchmark_pipeline`) is `time_fn`.
"""
import statistics
import time

import jax


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
  from XLA's cost analysis, or None when the backend reports none.

  Some jaxlib versions return one analysis per program in a list: the first is taken.
  """
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None
