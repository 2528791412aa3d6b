"""Ahead-of-time compiles of the real steps for a 4-chip TPU topology (`python -m vosr_jax.aot`):
XLA:TPU compiles for chips that are not attached (needs libtpu, the [tpu] extra).

Tiny configs on v5e:2x2 (one compile each, 16 s to about 2 minutes on two busy cores; 7 minutes
for the file at load 5-6, the distillation and two-slice compiles marked slow):
the train step under FSDP over the 4 chips and data parallel, the distillation step, one-step
sampling through the command line, and the train step on 2 slices of v5e:2x2 (8 chips, a hybrid
mesh: FSDP inside each slice, data parallel across).
"""
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]'): no "
                    "ahead-of-time compile for TPU topologies without it")

from configs import multistep, onestep  # pylint: disable=wrong-import-position
from vosr_jax import aot  # pylint: disable=wrong-import-position

import train_utils  # pylint: disable=wrong-import-position

TOPOLOGY = "v5e:2x2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Parameters that FSDP leaves replicated (vectors and dimensions 4 does not divide in the tiny
# model) may put at most this fraction of the parameter bytes on a chip beyond total / 4.
PARAM_TOLERANCE = 0.05
RECORD_FIELDS = (
    "step", "topology", "slices", "chips", "devices", "device_kind", "mesh_shape",
    "per_chip_batch", "global_batch", "lower_s", "compile_s", "memory_per_device",
    "hbm_bytes_per_device", "fits", "compiler_estimate", "collectives", "state")
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_bytes_estimate")
ESTIMATE_FIELDS = ("label", "flops_per_device", "bytes_accessed_per_device", "optimal_seconds",
                   "step_time_s", "images_per_s_per_chip", "mfu", "peak_flops_per_chip")
STATE_FIELDS = ("fsdp", "params_bytes_total", "params_bytes_per_device", "state_bytes_total",
                "state_bytes_per_device", "state_bytes_total_over_fsdp", "replicated_over_1mib",
                "replicated_ok")


def _tiny(config_module, fsdp=False):
  """`train_utils.tiny_config` of `config_module`, FSDP over the 4 chips or data parallel."""
  config = train_utils.tiny_config(config_module)
  if fsdp:
    config.mesh.data = 1
    config.mesh.fsdp = -1
  return config


@pytest.fixture(scope="module")
def train_fsdp():
  """The one compile with every loop unrolled (`aot.run`'s default, for the time estimate)."""
  return aot.run(_tiny(multistep, fsdp=True), TOPOLOGY, step="train")


@pytest.fixture(scope="module")
def train_data_parallel():
  return aot.run(_tiny(multistep), TOPOLOGY, step="train", unroll=False)


def _check_record(record, step, estimated=True):
  missing = [k for k in RECORD_FIELDS if k not in record]
  assert not missing, missing
  assert record["step"] == step and record["topology"] == TOPOLOGY
  assert record["device_kind"] == "TPU v5 lite"
  assert record["hbm_bytes_per_device"] == 16 * 2**30
  assert set(MEMORY_FIELDS) <= set(record["memory_per_device"])
  assert record["fits"] is True
  estimate = record["compiler_estimate"]
  assert set(ESTIMATE_FIELDS) <= set(estimate) and "compiler estimate" in estimate["label"]
  assert estimate["flops_per_device"] > 0
  if not estimated:  # No valid time estimate: the fields are there, empty, with a note.
    assert estimate["step_time_s"] is None and estimate["mfu"] is None and estimate["note"]
    return
  assert estimate["optimal_seconds"] > 0 and estimate["flops_per_device"] > 0
  assert 0 < estimate["mfu"] < 1 and estimate["images_per_s_per_chip"] > 0
  assert set(record["collectives"]) == set(aot.COLLECTIVES)
  assert set(STATE_FIELDS) <= set(record["state"])
  json.dumps(record)


def test_train_step_under_fsdp(train_fsdp):
  _check_record(train_fsdp, "train")
  assert train_fsdp["chips"] == train_fsdp["devices"] == 4
  assert train_fsdp["mesh_shape"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert train_fsdp["per_chip_batch"] * 4 == train_fsdp["global_batch"] == 8
  state = train_fsdp["state"]
  assert state["params_bytes_per_device"] <= state["params_bytes_total"] * (
      1 / 4 + PARAM_TOLERANCE)
  assert state["state_bytes_per_device"] <= state["state_bytes_total"] * (1 / 4 + PARAM_TOLERANCE)
  assert state["replicated_ok"], state["replicated_over_1mib"]
  found = train_fsdp["collectives"]
  assert found["all-gather"]["count"] + found["reduce-scatter"]["count"] > 0, found
  assert found["all-gather"]["bytes"] > 0


def test_train_step_data_parallel(train_data_parallel):
  record = train_data_parallel
  _check_record(record, "train")
  assert record["mesh_shape"] == {"data": 4, "fsdp": 1, "tensor": 1}
  # fsdp = 1: parameters replicated, gradients all-reduced; no all-gather or reduce-scatter.
  found = record["collectives"]
  assert found["all-gather"]["count"] == found["reduce-scatter"]["count"] == 0, found
  assert found["all-reduce"]["count"] > 0
  state = record["state"]
  assert state["params_bytes_per_device"] == state["params_bytes_total"]
  assert state["replicated_ok"]  # nothing is meant to be sharded


@pytest.mark.slow
def test_two_slices_fsdp_inside_data_parallel_across():
  record = aot.run(_tiny(multistep, fsdp=True), TOPOLOGY, step="train", slices=2,
                   per_chip_batch=1, unroll=False)
  # XLA:TPU gives no step-time estimate for a multi-slice program (optimal_seconds < 0).
  _check_record(record, "train", estimated=False)
  assert record["slices"] == 2 and record["chips"] == record["devices"] == 8
  assert record["mesh_shape"] == {"data": 2, "fsdp": 4, "tensor": 1}  # config.dcn_mesh data=-1
  assert record["global_batch"] == 8
  state = record["state"]
  assert state["params_bytes_per_device"] <= state["params_bytes_total"] * (
      1 / 4 + PARAM_TOLERANCE)
  found = record["collectives"]
  assert found["all-gather"]["count"] > 0 and found["all-reduce"]["count"] > 0, found


@pytest.mark.slow
def test_distill_step():
  record = aot.run(_tiny(onestep, fsdp=True), TOPOLOGY, step="distill", unroll=False)
  _check_record(record, "distill")
  assert record["state"]["params_bytes_per_device"] <= record["state"]["params_bytes_total"] * (
      1 / 4 + PARAM_TOLERANCE)


def test_sample_step_from_the_command_line(tmp_path):
  out = tmp_path / "aot.json"
  proc = subprocess.run(
      [sys.executable, "-m", "vosr_jax.aot", f"--config={ROOT}/configs/onestep.py:tiny",
       f"--topology={TOPOLOGY}", "--step=sample", "--per_chip_batch=1", f"--out={out}",
       f"--hlo_out={tmp_path / 'sample.hlo'}"],
      capture_output=True, text=True, cwd=ROOT, check=False,
      # This process holds libtpu (the fixtures' compiles): let the child load it too.
      env={**os.environ, "PYTHONPATH": ROOT, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(out.read_text())
  _check_record(record, "sample")
  assert record["command"].startswith("python -m vosr_jax.aot ")
  assert record["sampling"]["num_steps"] == 1 and record["global_batch"] == 4
  assert "ENTRY" in (tmp_path / "sample.hlo").read_text()


def test_usage_errors():
  with pytest.raises(ValueError, match="--topology"):
    aot.run(multistep.get_config("tiny"), "v5e-3", step="train")
  with pytest.raises(ValueError, match="--step=distill needs a one-step config"):
    aot.run(multistep.get_config("tiny"), TOPOLOGY, step="distill")
  with pytest.raises(ValueError, match="exclude each other"):
    aot.run(multistep.get_config("tiny"), TOPOLOGY, per_chip_batch=1, max_batch=True)


def test_collectives_parser():
  hlo = "\n".join([
      "  %ag = bf16[8,64]{1,0} all-gather(bf16[2,64]{1,0} %p), dimensions={0}",
      "  %ags = (bf16[2,64]{1,0}, bf16[8,64]{1,0}) all-gather-start(bf16[2,64]{1,0} %p)",
      "  %agd = bf16[8,64]{1,0} all-gather-done((bf16[2,64]{1,0}, bf16[8,64]{1,0}) %ags)",
      "  %rs = f32[16]{0} reduce-scatter(f32[64]{0} %g), dimensions={0}",
      "  %ar = (f32[4]{0}, f32[]) all-reduce(f32[4]{0} %a, f32[] %b), to_apply=%add",
      "  %cp = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(f32[4]{0} %x)",
      "  %add = f32[4]{0} add(f32[4]{0} %x, f32[4]{0} %y)",
      "}",
      "",
      "%all-reduce-scatter.10 (input_0: f32[64,8]) -> (f32[16,8]) {",
      "  %all-reduce.1 = (f32[64,8]{1,0}) all-reduce(f32[64,8]{1,0} %input_0), to_apply=%add",
      "}",
  ])
  found = aot.collectives(hlo)
  assert found["all-gather"] == {"count": 2, "bytes": 2 * 8 * 64 * 2}
  assert found["reduce-scatter"] == {"count": 2, "bytes": 64 + 64 * 8 * 4}
  assert found["all-reduce"] == {"count": 1, "bytes": 20}
  assert found["collective-permute"] == {"count": 1, "bytes": 16}
  assert found["all-to-all"] == {"count": 0, "bytes": 0}
  assert math.isclose(aot._oom_bytes("Used 20.5G of 15.75G hbm. Exceeded"), 20.5 * 2**30,
                      rel_tol=1e-9)  # pylint: disable=protected-access
