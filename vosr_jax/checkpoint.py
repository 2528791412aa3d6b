"""Checkpoints on disk (Orbax).

Parameter checkpoints (`save_params` / `load_params`) hold one network's parameters plus JSON
metadata naming the network kind and its constructor arguments. `python -m vosr_jax.convert` writes
them from official PyTorch weights; training reads frozen encoders/autoencoders from them.
Orbax writes into a temporary folder and renames it when complete, so a checkpoint is never half
written.
"""
import os

import orbax.checkpoint as ocp


def save_params(path, params, metadata):
  """Writes `params` (a nested dict of arrays) and `metadata` (JSON-able dict) to folder `path`."""
  path = os.path.abspath(path)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(path, ocp.args.Composite(
        params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave(metadata)), force=True)


def load_metadata(path):
  """Reads the metadata dict of a parameter checkpoint written by `save_params`."""
  path = _existing_checkpoint(path)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(path, ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata


def load_params(path, abstract_params=None):
  """Returns (params, metadata) from folder `path`.

  Args:
    path: a folder written by `save_params`.
    abstract_params: optional pytree of `jax.ShapeDtypeStruct` (with shardings) to restore onto.
  """
  path = _existing_checkpoint(path)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(path, ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), metadata=ocp.args.JsonRestore()))
  return restored.params, restored.metadata


def _existing_checkpoint(path):
  path = os.path.abspath(path)
  if not os.path.isdir(os.path.join(path, "params")):
    raise FileNotFoundError(
        f"No parameter checkpoint at {path} (expected a folder with 'params/' and 'metadata', as "
        "written by `python -m vosr_jax.convert`).")
  return path
