"""`python -m vosr_jax.bench`: every mode on the `tiny` configs, a few steps each.

Only the JSON record's fields are checked (present, positive, median within [min, max]); nothing
asserts a time.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from configs import multistep, onestep  # pylint: disable=g-import-not-at-top,wrong-import-position
from vosr_jax import bench, sharding  # pylint: disable=g-import-not-at-top,wrong-import-position

COMMON = ("what", "model_variant", "dtype", "device_kind", "device_count", "process_count",
          "backend", "jax_version", "weights", "host_load_avg")


def _check_timing(record):
  assert record["steps"] == 2 and record["warmup"] == 1
  assert 0 < record["min_s"] <= record["median_s"] <= record["max_s"]
  assert record["min_s"] <= record["mean_s"] <= record["max_s"]
  assert record["images_per_s"] > 0


def _check_step(record, what):
  for key in COMMON:
    assert key in record, key
  assert record["what"] == what and record["device_count"] >= 1
  _check_timing(record)
  assert record["compile_s"] > 0 and record["params"] > 0
  assert record["flops_per_step"] > 0 and record["flops_source"].startswith("xla_cost_analysis")
  assert record["tflops_per_s"] > 0
  json.dumps(record)  # JSON-able.


def test_denoiser():
  record = bench.run(multistep.get_config("tiny"), "denoiser", num_steps=2, warmup=1,
                     peak_tflops=1.0)
  _check_step(record, "denoiser")
  assert record["shapes"] == {"hr_latent": [8, 64, 64, 3], "lr_latent": [8, 64, 64, 3],
                              "tokens": [8, 16, 64]}
  assert record["peak_source"] == "--peak_tflops" and 0 < record["mfu"]


@pytest.mark.slow
def test_train_flops_count_every_layer():
  config = multistep.get_config("tiny")
  record = bench.run(config, "train", num_steps=2, warmup=1)
  _check_step(record, "train")
  assert record["shapes"] == {"hq": [8, 64, 64, 3]}
  assert record["mfu"] is None  # CPU: no known peak.
  # A scanned stack is counted per layer (lowered unrolled), so scan does not change the count.
  config.model.scan = True
  mesh = sharding.make_mesh(config.mesh)
  flops, source = bench._step_flops("train", config, mesh, None)  # pylint: disable=protected-access
  assert source.endswith("model.scan=encoder.scan=False)")
  assert flops == pytest.approx(record["flops_per_step"], rel=1e-6)


@pytest.mark.slow
def test_distill():
  _check_step(bench.run(onestep.get_config("tiny"), "distill", num_steps=2, warmup=1), "distill")


def test_distill_needs_onestep_config():
  with pytest.raises(ValueError, match="config.kind='onestep'"):
    bench.run(multistep.get_config("tiny"), "distill")


def test_degradation():
  record = bench.run(multistep.get_config("tiny"), "degradation", num_steps=2, warmup=1,
                     degradation_batch=2, degradation_size=32)
  _check_timing(record)
  assert record["batch_size"] == 2 and record["image_size"] == 32 and record["compile_s"] > 0


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
    assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"] and r["images_per_s"] > 0


def test_time_fn_threads_arguments():
  calls = []
  timing = bench.time_fn(lambda x: calls.append(x) or x + 1, (0,), 3, 2,
                         update=lambda args, out: (out,))
  assert calls == [0, 1, 2, 3, 4] and timing["steps"] == 3 and timing["warmup"] == 2
  with pytest.raises(ValueError, match="--steps"):
    bench.time_fn(lambda: None, (), 0, 0)


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
