"""Mesh construction, logical-axis mapping, and equal training on 8 virtual devices."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vosr_jax import sharding

import train_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("layers", None))


class _FakeMesh:
  def __init__(self, **shape):
    self.shape = shape


def test_mesh_shape_fills_and_rejects():
  assert sharding.mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
  assert sharding.mesh_shape(dict(data=1, fsdp=8, tensor=1), 8) == (1, 8, 1)
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.mesh_shape(dict(data=3, fsdp=1, tensor=1), 8)
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)
  with pytest.raises(ValueError, match="config.dcn_mesh"):
    sharding.mesh_shape(dict(data=3, fsdp=1, tensor=1), 2, key="config.dcn_mesh")


class _FakeDevice:
  def __init__(self, i, slice_index=None):
    self.id, self.slice_index = i, slice_index


def test_num_slices():
  assert sharding.num_slices([_FakeDevice(i) for i in range(4)]) == 1
  assert sharding.num_slices([_FakeDevice(i, i // 4) for i in range(8)]) == 2
  assert sharding.num_slices([object()]) == 1  # devices without slice_index (CPU, GPU)


def test_logical_to_spec():
  mesh = _FakeMesh(data=2, fsdp=4, tensor=1)
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh, RULES) == P("fsdp", None)
  # Not divisible -> replicated; stacked 'layers' axis never sharded.
  assert sharding.logical_to_spec(("embed",), (6,), mesh, RULES) == P(None)
  assert sharding.logical_to_spec(("layers", "embed"), (4, 8), mesh, RULES) == P(None, "fsdp")
  # A mesh axis is used once per array.
  assert sharding.logical_to_spec(("embed", "embed"), (8, 8), mesh, RULES) == P("fsdp", None)
  assert sharding.logical_to_spec(None, (3,), mesh, RULES) == P()


def test_batch_check_names_key():
  mesh = _FakeMesh(data=2, fsdp=4, tensor=1)
  sharding.check_batch_size(16, mesh)
  with pytest.raises(ValueError, match="config.batch_size=12"):
    sharding.check_batch_size(12, mesh)


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
  out = tmp_path_factory.mktemp("mesh")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=train_utils.xla_flags("--xla_force_host_platform_device_count=8"))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mesh_equivalence_script.py"),
                         str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out / "results.json") as f:
    results = json.load(f)
  params = {name: dict(np.load(out / f"{name}.npz")) for name in ("data8", "data2_fsdp4", "fsdp8")}
  return results, params


@pytest.mark.slow
def test_meshes_train_identically(mesh_results):
  """data=8, data=2 x fsdp=4, fsdp=8 give the same 3 losses (rtol 1e-5) and parameters
  (atol 2e-6 + rtol 1e-5; measured max abs difference 5.5e-7)."""
  results, params = mesh_results
  ref_losses = results["data8"]["losses"]
  for name in ("data2_fsdp4", "fsdp8"):
    np.testing.assert_allclose(results[name]["losses"], ref_losses, rtol=1e-5)
    for key, value in params["data8"].items():
      np.testing.assert_allclose(params[name][key], value, rtol=1e-5, atol=2e-6, err_msg=key)
  assert ref_losses[0] != ref_losses[1]


@pytest.mark.slow
def test_fsdp_really_shards(mesh_results):
  results, _ = mesh_results
  assert results["data8"]["kernel_spec"] == "P(None, None, None, None)"
  # w12 kernel (layers, embed, 2, mlp): the embed axis (64) split 4 and 8 ways, Adam moments too.
  assert results["data2_fsdp4"]["kernel_shard_shape"] == [2, 16, 2, 170]
  assert results["fsdp8"]["kernel_shard_shape"] == [2, 8, 2, 170]
  assert "fsdp" in results["fsdp8"]["kernel_spec"] and "fsdp" in results["fsdp8"]["mu_spec"]


@pytest.mark.slow
def test_bad_mesh_and_batch_fail_before_compute(mesh_results):
  errors = mesh_results[0]["errors"]
  assert "config.mesh" in errors["mesh"] and "8 are available" in errors["mesh"]
  assert "config.batch_size=12" in errors["batch"]
