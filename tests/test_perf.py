"""`perf.time_fn` (the one timing loop), `perf.side_by_side`, `perf.flops` and
`perf.machine_info`."""
import json
import os
import time

import jax
import jax.numpy as jnp
import pytest

from vosr_jax import perf


def test_time_fn_threads_arguments():
  calls = []
  timing = perf.time_fn(lambda x: calls.append(x) or x + 1, (0,), 3, 2,
                        update=lambda args, out: (out,))
  assert calls == [0, 1, 2, 3, 4] and timing["steps"] == 3 and timing["warmup"] == 2
  with pytest.raises(ValueError, match="--steps"):
    perf.time_fn(lambda: None, (), 0, 0)


def test_time_fn_times_each_call():
  """Calls that sleep 10 ms, then 200 ms twice (after an untimed warm-up): their statistics."""
  sleeps = iter([0.0, 0.01, 0.2, 0.2])
  timing = perf.time_fn(lambda: time.sleep(next(sleeps)), (), 3, 1)
  assert 0.01 <= timing["min_s"] < 0.2 <= timing["median_s"] <= timing["max_s"]
  assert timing["mean_s"] == pytest.approx((timing["min_s"] + timing["median_s"]
                                            + timing["max_s"]) / 3)


def test_flops_of_a_matmul():
  x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
  lowered = jax.jit(lambda a: a @ a.T).lower(x)
  assert perf.flops(lowered) == pytest.approx(2 * 8 * 8 * 16, rel=0.1)
  assert perf.flops(lowered.compile()) == pytest.approx(2 * 8 * 8 * 16, rel=0.1)


def test_side_by_side_alternates_and_takes_medians():
  calls = []

  def side(name, medians):
    it = iter(medians)
    return lambda: calls.append(name) or dict(median_s=next(it))

  out = perf.side_by_side({"jax": side("jax", [3.0, 1.0, 2.0]),
                           "torch": side("torch", [4.0, 8.0, 6.0])}, rounds=3)
  assert calls == ["jax", "torch"] * 3 and out["order"] == ["jax", "torch"]
  assert out["sides"]["jax"]["median_s_per_round"] == [3.0, 1.0, 2.0]
  assert out["sides"]["jax"]["median_s"] == 2.0 and out["sides"]["torch"]["median_s"] == 6.0
  assert out["ratio_jax_over_torch"] == pytest.approx(1 / 3)
  assert out["sides"]["torch"]["runs"] == [dict(median_s=m) for m in (4.0, 8.0, 6.0)]
  with pytest.raises(ValueError, match="rounds"):
    perf.side_by_side({"jax": lambda: {}}, rounds=0)


def test_parse_cpuinfo():
  text = ("processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu avx2 avx512f amx_tile\n\n"
          "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
  assert perf.parse_cpuinfo(text) == ("Some CPU @ 2.0GHz", {"fpu", "avx2", "avx512f", "amx_tile"})
  assert perf.parse_cpuinfo("processor : 0\nFeatures : fp asimd\n") == (None, {"fp", "asimd"})


def test_machine_info(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  info = perf.machine_info()
  json.dumps(info)
  assert isinstance(info["cpu_model"], str) and info["cpu_model"]
  assert set(info["isa"]) == set(perf.ISA_FEATURES)
  assert isinstance(info["logical_cores"], int) and info["logical_cores"] >= 1
  assert isinstance(info["affinity_cores"], int) and 1 <= info["affinity_cores"]
  assert info["affinity_cores"] <= info["logical_cores"]
  assert info["xla_flags"] == "--xla_cpu_enable_fast_math=false"
  assert info["jax_version"] == jax.__version__ and isinstance(info["jaxlib_version"], str)
  assert info["backend"] == jax.default_backend()
  assert info["device_kind"] == jax.devices()[0].device_kind
  if os.path.isfile("/proc/cpuinfo"):  # Linux: the first processor's fields.
    model, flags = perf.parse_cpuinfo(open("/proc/cpuinfo", encoding="utf-8").read())
    lines = open("/proc/cpuinfo", encoding="utf-8").read().splitlines()
    flag_line = next((l for l in lines if l.split(":")[0].strip() in ("flags", "Features")), None)
    if model is not None:
      first = next(l for l in lines if l.startswith("model name"))
      assert info["cpu_model"] == first.split(":", 1)[1].strip()
      assert info["cpu_model_source"] == "/proc/cpuinfo"
    if flag_line is not None:
      cpu_flags = flag_line.split(":", 1)[1].split()
      assert flags == set(cpu_flags)
      assert info["isa"] == {k: k in cpu_flags for k in perf.ISA_FEATURES}
      assert all(isinstance(v, bool) for v in info["isa"].values())
    assert info["affinity_cores"] == len(os.sched_getaffinity(0))
  # Without a cpuinfo file: the platform's name, features unknown.
  info = perf.machine_info(cpuinfo_path=str(tmp_path / "missing"))
  assert info["cpu_model_source"] == "platform"
  assert all(v is None for v in info["isa"].values())


def test_max_batch_search_fits_verifies_and_steps_down():
  calls = []

  def linear(batch):
    calls.append(batch)
    return 100 + 10 * batch

  out = perf.max_batch_search(linear, 155, ("2", "1"))
  assert (out["predicted"], out["verified"], out["tried"]) == (5, 5, [5])
  assert out["fixed_bytes"] == 100 and out["per_sample_bytes"] == 10
  assert sorted(calls[:2]) == [1, 2] and calls[2:] == [5]  # each batch compiled once

  # Above 3 the peak jumps: the prediction (5) does not fit; the refit through it picks 3.
  out = perf.max_batch_search(lambda b: 100 + 10 * b + (50 if b > 3 else 0), 155, (1, 2))
  assert (out["predicted"], out["tried"], out["verified"]) == (5, [5, 3], 3)
  with pytest.raises(ValueError, match="does not grow"):
    perf.max_batch_search(lambda b: 100, 155, (1, 2))
  with pytest.raises(ValueError, match="two distinct"):
    perf.max_batch_search(lambda b: b, 155, (2, 2))
