"""Checkpoints on disk (Orbax).

Parameter checkpoints (`save_params` / `load_params`) hold one network's parameters plus JSON
metadata naming the network kind and its constructor arguments. `python -m vosr_jax.convert` writes
them from official PyTorch weights; training reads frozen encoders/autoencoders from them.
Orbax writes into a temporary folder and renames it when complete, so a checkpoint is never half
written.

`TrainCheckpointer` saves and restores the train state with the data-iterator state and the config.
"""
import json
import os

import grain
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


# Config sections whose change makes a train-state checkpoint unusable (different parameters).
ARCHITECTURE_KEYS = ("model.variant", "model.overrides", "encoder.variant", "encoder.tap_layer",
                     "autoencoder.kind", "autoencoder.variant")


def _lookup(tree, dotted):
  for part in dotted.split("."):
    tree = tree[part]
  return tree


class TrainCheckpointer:
  """Orbax CheckpointManager under `<workdir>/checkpoints` for resumable training.

  Each step folder holds three items: `state` (the `TrainState` pytree, written by every host),
  `data_iter` (the grain iterator state of each process) and `config` (JSON). Saves are async when
  `config.checkpoint.async_save`; Orbax writes a temporary folder and renames it on commit, so a
  killed process never leaves a checkpoint that `latest_step` would pick.

  Resume order: check the saved config (before any compute) -> build the state -> `restore` the
  state onto its shardings and the iterator in place -> continue from `state.step`.
  """

  def __init__(self, workdir, config):
    """Opens (creating if needed) `<workdir>/checkpoints` and checks the latest saved config.

    Raises:
      ValueError: when the latest checkpoint was written by a config with another architecture.
    """
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.max_to_keep,
        enable_async_checkpointing=config.checkpoint.async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.config_json = json.loads(config.to_json_best_effort())
    step = self.latest_step()
    if step is not None:
      saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
      self._check_compatible(saved.config, step)

  def _check_compatible(self, saved, step):
    diffs = []
    for key in ARCHITECTURE_KEYS:
      old, new = _lookup(saved, key), _lookup(self.config_json, key)
      if old != new:
        diffs.append(f"config.{key}: checkpoint {old!r} vs now {new!r}")
    if diffs:
      raise ValueError(
          f"The checkpoint of step {step} in {self.directory} was written by another config ("
          + "; ".join(diffs) + "). Use another --workdir or the config it was trained with.")

  def latest_step(self):
    """The last committed step, or None."""
    return self.manager.latest_step()

  def save(self, step, state, data_iter):
    """Starts saving (async if configured) `state` and `data_iter` at `step`."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(self.config_json)), force=True)

  def restore(self, step, abstract_state, data_iter):
    """Restores the state of `step` onto the shardings of `abstract_state` (a pytree of
    `jax.ShapeDtypeStruct` with `sharding`) and sets `data_iter` to its saved position."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored.state

  def wait(self):
    """Blocks until pending async saves are committed."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def is_train_workdir(path):
  """True when `path` is a training workdir (has a `checkpoints/` folder)."""
  return os.path.isdir(os.path.join(path, "checkpoints"))


def latest_train_config(workdir):
  """(step, config dict) of the latest committed checkpoint of a training workdir.

  Raises:
    FileNotFoundError: when the workdir holds no committed checkpoint.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{directory}: no committed training checkpoint")
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return step, saved.config


def load_train_ema(workdir, abstract_params):
  """The EMA parameters of the latest checkpoint of a training workdir.

  Args:
    workdir: a `--workdir` of `python -m vosr_jax.main`.
    abstract_params: pytree of `jax.ShapeDtypeStruct` (with shardings) of the EMA parameters.
  Returns:
    (ema_params, step, config): the parameters, the step and the saved config (dict).
  Raises:
    FileNotFoundError: when the workdir holds no committed checkpoint.
  """
  step, config = latest_train_config(workdir)
  item = {"ema_params": abstract_params}
  with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints")) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
  return restored.state["ema_params"], step, config
