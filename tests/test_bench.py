"""`python -m vosr_jax.bench`: every mode on the `tiny` configs, a few steps each.

The records are checked for consistency (median within [min, max], rates and FLOP/s from the
times they derive from, parameter counts from the model, compile times within the call's wall
time, the memory fit through its probes); nothing asserts a time.
"""
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from configs import multistep, onestep  # pylint: disable=g-import-not-at-top,wrong-import-position
from vosr_jax import bench, models, perf, sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from vosr_jax.models import dit  # pylint: disable=g-import-not-at-top,wrong-import-position

import train_utils  # pylint: disable=g-import-not-at-top,wrong-import-position

COMMON = ("what", "model_variant", "dtype", "device_kind", "device_count", "process_count",
          "backend", "jax_version", "weights", "host_load_avg", "machine")


def _run(config, what, **kwargs):
  """(`bench.run` record, the call's wall time in seconds)."""
  start = time.perf_counter()
  record = bench.run(config, what, **kwargs)
  return record, time.perf_counter() - start


def _params(config):
  """The denoiser's parameter count of `config`, from the model itself."""
  return dit.param_count(**models.denoiser_kwargs(config.model))


def _check_timing(record, seconds=None):
  """`seconds`: the wall time of the call, which bounds the compile time."""
  assert record["steps"] == 2 and record["warmup"] == 1
  assert 0 < record["min_s"] <= record["median_s"] <= record["max_s"]
  assert record["min_s"] <= record["mean_s"] <= record["max_s"]
  assert record["images_per_s"] == pytest.approx(record["batch_size"] / record["median_s"])
  if seconds is not None:
    assert 0 < record["compile_s"] + 2 * record["min_s"] < seconds


def _check_machine(record):
  machine = record["machine"]
  for key in ("cpu_model", "isa", "logical_cores", "affinity_cores", "xla_flags", "jax_version",
              "jaxlib_version", "backend", "device_kind"):
    assert key in machine, key
  assert machine["backend"] == record["backend"] and machine["device_kind"] == record["device_kind"]


def _check_step(record, seconds, what, config):
  for key in COMMON:
    assert key in record, key
  _check_machine(record)
  assert record["what"] == what and record["device_count"] == jax.device_count()
  _check_timing(record, seconds)
  assert record["params"] == _params(config)
  # At least one multiply-add per parameter and image.
  assert record["flops_per_step"] >= 2 * record["params"] * record["batch_size"]
  assert record["flops_source"].startswith("xla_cost_analysis")
  assert record["tflops_per_s"] == pytest.approx(
      record["flops_per_step"] / record["median_s"] / 1e12)
  json.dumps(record)  # JSON-able.


def test_denoiser(monkeypatch):
  """The denoiser step, alternating with a stub partner in place of the PyTorch subprocess (the
  shape check passed over: the tiny config is not the torch script's)."""
  partner_args, calls = [], []

  def partner():
    calls.append("torch")
    return dict(median_s=0.5, threads=2)

  monkeypatch.setattr(bench, "check_vs_torch", lambda *args: None)
  monkeypatch.setattr(bench, "torch_partner", lambda *args: partner_args.append(args) or partner)
  config = multistep.get_config("tiny")
  record, seconds = _run(config, "denoiser", num_steps=2, warmup=1, peak_tflops=1.0,
                         vs_torch=True)
  _check_step(record, seconds, "denoiser", config)
  assert record["shapes"] == {"hr_latent": [8, 64, 64, 3], "lr_latent": [8, 64, 64, 3],
                              "tokens": [8, 16, 64]}
  assert record["peak_source"] == "--peak_tflops"
  assert record["mfu"] == pytest.approx(record["tflops_per_s"] / record["device_count"])
  # The same --steps/--warmup for torch, and --threads = this process's usable cores.
  assert partner_args == [(2, 1, perf.usable_cores())]
  rounds = bench.VS_TORCH_ROUNDS
  compared = record["vs_torch"]
  assert calls == ["torch"] * rounds and compared["rounds"] == record["rounds"] == rounds
  jax_side = compared["sides"]["jax"]
  assert [(r["steps"], r["warmup"]) for r in jax_side["runs"]] == [(2, 1)] * rounds
  assert record["median_s"] == jax_side["median_s"] == np.median(jax_side["median_s_per_round"])
  assert compared["sides"]["torch"]["median_s_per_round"] == [0.5] * rounds
  assert compared["ratio_jax_over_torch"] == pytest.approx(jax_side["median_s"] / 0.5)


@pytest.mark.slow
def test_train_flops_count_every_layer():
  config = train_utils.tiny_config(multistep)
  record, seconds = _run(config, "train", num_steps=2, warmup=1)
  _check_step(record, seconds, "train", config)
  assert record["shapes"] == {"hq": [8, 64, 64, 3]}
  assert record["mfu"] is None  # CPU: no known peak.
  # Loops are counted per iteration (lowered unrolled), so scan does not change the count.
  config.model.scan = True
  mesh = sharding.make_mesh(config.mesh)
  flops, source = bench._step_flops("train", config, mesh, None)  # pylint: disable=protected-access
  assert source.endswith("loops unrolled)")
  assert flops == pytest.approx(record["flops_per_step"], rel=1e-6)


@pytest.mark.slow
def test_distill():
  config = train_utils.tiny_config(onestep)
  _check_step(*_run(config, "distill", num_steps=2, warmup=1), "distill", config)


def test_distill_needs_onestep_config():
  with pytest.raises(ValueError, match="config.kind='onestep'"):
    bench.run(multistep.get_config("tiny"), "distill")
  with pytest.raises(ValueError, match="config.kind='multistep'"):
    bench.run(onestep.get_config("tiny"), "train")


def test_degradation():
  record, seconds = _run(multistep.get_config("tiny"), "degradation", num_steps=2, warmup=1,
                         degradation_batch=2, degradation_size=32)
  _check_timing(record, seconds)
  assert record["batch_size"] == 2 and record["image_size"] == 32


def test_pipeline(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(4):
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), np.uint8)).save(tmp_path / f"{i}.jpg")
  record = bench.run(multistep.get_config("tiny"), "pipeline", num_steps=2, warmup=1,
                     folder=str(tmp_path))
  _check_timing(record)
  assert record["resolution"] == 64 and record["batch_size"] == 8
  with pytest.raises(ValueError, match="--folder"):
    bench.run(multistep.get_config("tiny"), "pipeline")


def test_sampling():
  record = bench.run(multistep.get_config("tiny"), "sampling", num_steps=2, warmup=1,
                     sizes=("16:64",), sampling_steps=2)
  assert [(r["mode"], r["steps"], r["hr_size"]) for r in record["results"]] == [
      ("multistep", 2, 64), ("onestep", 1, 64)]
  for r in record["results"]:
    assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
    assert r["images_per_s"] == pytest.approx(r["batch_size"] / r["median_s"])
  record = bench.run(multistep.get_config("tiny"), "sampling", num_steps=2, warmup=1,
                     sizes=("16:64",), sampling_models=("onestep",))
  assert [r["mode"] for r in record["results"]] == ["onestep"]
  with pytest.raises(ValueError, match="sampling_models"):
    bench.run(multistep.get_config("tiny"), "sampling", sampling_models=("twostep",))


def test_peak_flops():
  assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989e12
  assert bench.peak_flops("NVIDIA H100 PCIe", "bfloat16")[0] == 756e12
  assert bench.peak_flops("TPU v5 lite", "bfloat16")[0] == 197e12
  assert bench.peak_flops("TPU v5", "bfloat16")[0] == 459e12
  assert bench.peak_flops("TPU v4", "float32") == (None, None)
  assert bench.peak_flops("cpu", "float32") == (None, None)
  assert bench.peak_flops("cpu", "float32", 2.0) == (2e12, "--peak_tflops")


def test_cli_writes_json(tmp_path):
  output = tmp_path / "bench.json"
  result = subprocess.run(
      [sys.executable, "-m", "vosr_jax.bench", "--config=configs/multistep.py:tiny",
       "--config.seed=3", "--what=degradation", "--steps=2", "--warmup=1",
       "--degradation_batch=1", "--degradation_size=32", f"--output={output}"],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"), capture_output=True,
      text=True, check=True)
  record = json.loads(result.stdout)
  assert record == json.loads(output.read_text())
  assert record["config"] == "configs/multistep.py:tiny"
  assert record["config_overrides"] == {"seed": "3"}
  assert record["command"].startswith("python -m vosr_jax.bench --config=configs/multistep.py")
  _check_timing(record)
  _check_machine(record)


def _bench_cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "vosr_jax.bench", *args], cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"), capture_output=True, text=True)


def _check_usage_error(result, match):
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr and result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and match in lines[-1], result.stderr


def test_cli_rejects_flags_of_other_modes():
  _check_usage_error(_bench_cli("--config=configs/multistep.py:tiny", "--what=compile",
                                "--vs-torch"),
                     "--vs-torch does not apply to --what=compile (only to --what=denoiser)")
  _check_usage_error(_bench_cli("--config=configs/multistep.py:tiny", "--what=denoiser",
                                "--folder=x"),
                     "--folder does not apply to --what=denoiser")
  _check_usage_error(_bench_cli("--config=configs/multistep.py:tiny", "--what=denoiser",
                                "--vs-torch"), "--vs-torch")  # Shapes (or torch) do not fit.


def test_vs_torch_errors(monkeypatch):
  tiny = multistep.get_config("tiny")
  with pytest.raises(ValueError, match="--what=denoiser only, not --what=train"):
    bench.run(tiny, "train", vs_torch=True)
  monkeypatch.setattr(bench, "_torch_importable", lambda: True)
  with pytest.raises(ValueError, match=r"hidden_size 64 \(torch 384\).*batch_size 8 \(torch 4\)"):
    bench.run(tiny, "denoiser", vs_torch=True)
  config = multistep.get_config("bench-small")
  mesh = sharding.make_mesh(config.mesh)
  assert bench.denoiser_shapes(config, mesh) == bench.torch_shapes()
  bench.check_vs_torch("denoiser", config, mesh)
  with config.unlocked():
    config.dtype = "bfloat16"
    config.model.overrides.depth = 6
  with pytest.raises(ValueError, match=r"depth 6 \(torch 12\), .*dtype bfloat16"):
    bench.check_vs_torch("denoiser", config, mesh)
  monkeypatch.undo()
  monkeypatch.setitem(sys.modules, "torch", None)  # Not importable.
  with pytest.raises(ValueError, match="needs PyTorch"):
    bench.run(tiny, "denoiser", vs_torch=True)
  with pytest.raises(FileNotFoundError, match="benchmarks/"):
    bench.check_vs_torch("denoiser", tiny, mesh, script=os.path.join(ROOT, "no_such.py"))


def _check_memory(memory):
  assert all(isinstance(memory[key], int) for key in bench.MEMORY_FIELDS)
  assert memory["alias_size_in_bytes"] > 0  # The donated train state is aliased to the output.
  assert memory["peak_bytes_estimate"] == (
      memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
      + memory["temp_size_in_bytes"] - memory["alias_size_in_bytes"])


def test_compile_is_abstract_and_reports_memory():
  config = multistep.get_config("tiny")
  record, seconds = _run(config, "compile", step="denoiser", depth=3, per_device_batch=4)
  for key in COMMON:
    assert key in record, key
  assert record["what"] == "compile" and record["step"] == "denoiser"
  assert 0 < record["lower_s"] + record["compile_s"] < seconds
  with config.unlocked():
    config.model.overrides.depth = 3
  assert record["depth"] == 3 and record["params"] == _params(config) and record["scan"] is False
  assert record["per_device_batch"] == 4 and record["batch_size"] == 4 * record["device_count"]
  assert record["shapes"]["tokens"][0] == record["batch_size"]
  assert record["memory_source"].startswith("cpu compiled memory_analysis")
  _check_memory(record["memory_per_device"])
  # The parameters, optimizer moments and EMA are arguments: about 4 x f32 parameters.
  assert record["memory_per_device"]["argument_size_in_bytes"] > 4 * 4 * record["params"]
  json.dumps(record)


def test_memory_predicts_and_verifies_the_largest_batch():
  record = bench.run(multistep.get_config("tiny"), "memory", step="denoiser", memory_gb=0.05,
                     probe_batches=("1", "2"))
  assert [p["per_device_batch"] for p in record["probes"]] == [1, 2]
  for probe in record["probes"] + record["verify"]:
    _check_memory(probe["memory_per_device"])
  fit, limit, best = record["fit"], record["limit_bytes"], record["verified_max_batch"]
  # The fit is the line through the two probes.
  (b1, p1), (b2, p2) = ((p["per_device_batch"], p["memory_per_device"]["peak_bytes_estimate"])
                        for p in record["probes"])
  assert limit == 50_000_000 and fit["per_sample_bytes"] == (p2 - p1) / (b2 - b1)
  assert fit["fixed_bytes"] == p1 - fit["per_sample_bytes"] * b1
  verified = {v["per_device_batch"]: v["memory_per_device"]["peak_bytes_estimate"]
              for v in record["verify"]}
  assert best is not None and best >= 1 and verified[best] <= limit
  # The fit puts one more sample over the limit.
  assert fit["fixed_bytes"] + fit["per_sample_bytes"] * (record["predicted_max_batch"] + 1) > limit
  assert best <= record["predicted_max_batch"] and len(record["verify"]) <= 2
  json.dumps(record)


@pytest.mark.slow
def test_compile_fsdp_shards_the_state(tmp_path):
  """Per-device arguments (the train state) shrink under FSDP over 2 devices, and activations stay
  sharded over the batch: temporaries no larger than data parallelism's. Measured on the
  bench-small denoiser step: FSDP temp 743 MB vs 809 MB data parallel; 981 MB without
  `sharding.constrain_batch` (the tiny model is too small to show the difference)."""
  records = {}
  for name, mesh in (("dp", "--config.mesh.data=-1"),
                     ("fsdp", "--config.mesh.data=1 --config.mesh.fsdp=2")):
    output = tmp_path / f"{name}.json"
    subprocess.run(
        [sys.executable, "-m", "vosr_jax.bench", "--config=configs/multistep.py:bench-small",
         *mesh.split(), "--what=compile", "--step=denoiser", "--per_device_batch=2",
         f"--output={output}"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                           XLA_FLAGS=train_utils.xla_flags(
                               "--xla_force_host_platform_device_count=2")),
        capture_output=True, text=True, check=True)
    records[name] = json.loads(output.read_text())
  dp, fsdp = records["dp"], records["fsdp"]
  assert dp["mesh_shape"] == {"data": 2, "fsdp": 1, "tensor": 1}
  assert fsdp["mesh_shape"] == {"data": 1, "fsdp": 2, "tensor": 1}
  assert dp["batch_size"] == fsdp["batch_size"] == 4 and dp["params"] == fsdp["params"]
  dp_args = dp["memory_per_device"]["argument_size_in_bytes"]
  assert fsdp["memory_per_device"]["argument_size_in_bytes"] < 0.75 * dp_args
  dp_temp = dp["memory_per_device"]["temp_size_in_bytes"]
  assert fsdp["memory_per_device"]["temp_size_in_bytes"] <= 1.1 * dp_temp, (fsdp, dp)
