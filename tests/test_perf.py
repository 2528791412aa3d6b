"""`perf.time_fn` (the one timing loop) and `perf.flops`."""
import jax
import jax.numpy as jnp
import pytest

from vosr_jax import perf


def test_time_fn_threads_arguments():
  calls = []
  timing = perf.time_fn(lambda x: calls.append(x) or x + 1, (0,), 3, 2,
                        update=lambda args, out: (out,))
  assert calls == [0, 1, 2, 3, 4] and timing["steps"] == 3 and timing["warmup"] == 2
  assert 0 <= timing["min_s"] <= timing["median_s"] <= timing["max_s"]
  assert timing["min_s"] <= timing["mean_s"] <= timing["max_s"]
  with pytest.raises(ValueError, match="--steps"):
    perf.time_fn(lambda: None, (), 0, 0)


def test_flops_of_a_matmul():
  x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
  lowered = jax.jit(lambda a: a @ a.T).lower(x)
  assert perf.flops(lowered) == pytest.approx(2 * 8 * 8 * 16, rel=0.1)
  assert perf.flops(lowered.compile()) == pytest.approx(2 * 8 * 8 * 16, rel=0.1)
