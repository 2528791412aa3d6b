"""Runs 3 train steps of the `tiny` config on several meshes of 8 virtual CPU devices.

Run by tests/test_sharding.py in a subprocess (the device count must be fixed before JAX starts):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_equivalence_script.py OUT
Writes OUT/results.json (losses and sharding facts per mesh) and OUT/<mesh>.npz (final params).
"""
import json
import os
import sys

import jax
import numpy as np

from configs import multistep
from vosr_jax import builder, sharding, train

MESHES = {"data8": dict(data=8, fsdp=1), "data2_fsdp4": dict(data=2, fsdp=4),
          "fsdp8": dict(data=1, fsdp=8)}


def run(mesh_axes, batches):
  config = multistep.get_config("tiny")
  config.mesh.data, config.mesh.fsdp = mesh_axes["data"], mesh_axes["fsdp"]
  mesh = sharding.make_mesh(config.mesh)
  built = builder.build(config, mesh)
  state, frozen, step = built.state, built.frozen, built.train_step
  losses = []
  for b in batches:
    state, metrics = step(state, frozen, sharding.shard_batch({"hq": b}, mesh))
    losses.append(float(metrics["train/loss"]))
  kernel = state.params["blocks"]["mlp"]["w12"]["kernel"]
  facts = dict(losses=losses, kernel_spec=str(kernel.sharding.spec),
               kernel_shape=list(kernel.shape),
               kernel_shard_shape=list(kernel.addressable_shards[0].data.shape),
               mu_spec=[str(x.sharding.spec) for p, x in
                        jax.tree_util.tree_leaves_with_path(state.opt_state)
                        if "mu" in jax.tree_util.keystr(p) and "w12" in jax.tree_util.keystr(p)
                        and "kernel" in jax.tree_util.keystr(p)][0])
  flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in
          jax.tree_util.tree_leaves_with_path((state.params, state.ema_params))}
  return facts, flat


def bad_inputs():
  """Errors raised before any compute on 8 devices."""
  out = {}
  config = multistep.get_config("tiny")
  config.data.sources = ["/nonexistent"]
  config.mesh.data = 3
  try:
    train.run(config, "/tmp/unused_mesh_workdir")
  except ValueError as e:
    out["mesh"] = str(e)
  config.mesh.data, config.batch_size = 8, 12
  try:
    train.run(config, "/tmp/unused_mesh_workdir")
  except ValueError as e:
    out["batch"] = str(e)
  return out


def main(out_dir):
  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8) for _ in range(3)]
  results = {}
  for name, axes in MESHES.items():
    facts, flat = run(axes, batches)
    results[name] = facts
    np.savez(os.path.join(out_dir, f"{name}.npz"), **flat)
  results["errors"] = bad_inputs()
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(sys.argv[1])
