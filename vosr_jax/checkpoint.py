"""Checkpoints on disk (Orbax).

Parameter checkpoints (`save_params` / `load_params`) hold one network's parameters plus JSON
metadata naming the network kind and its constructor arguments. `python -m vosr_jax.convert` writes
them from official PyTorch weights; training reads frozen encoders/autoencoders from them.
Orbax writes into a temporary folder and renames it when complete, so a checkpoint is never half
written.

`TrainCheckpointer` saves and restores the train state with the data-iterator state and the config
under `<workdir>/checkpoints` (`CHECKPOINTS`).

`resolve(path)` says what a path holds (a training workdir, one converted network, or a release
folder of converted networks); `load_network` and `load_workdir` load them, checking the network's
constructor arguments against what the caller's config wants. Every caller (the frozen networks of
`vosr_jax.models`, the teacher of distillation, `vosr_jax.inference`) resolves paths here.

Failures of the storage layer become two errors that name the folder: `DamagedCheckpoint` (a
committed checkpoint that cannot be read: a data file, the manifest or an item missing or
truncated) and `CheckpointNotWritten` (a save that failed, e.g. a full disk; Orbax never commits a
partial step, so the earlier steps stay intact).
"""
import contextlib
import dataclasses
import json
import logging as logging_std
import os
import re
import time

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils


# The folder of a training workdir that holds its train-state checkpoints (one per step).
CHECKPOINTS = "checkpoints"
# Network kinds of parameter checkpoints (the metadata `kind`; `python -m vosr_jax.convert --kind`).
KINDS = ("dit", "vit", "sd21", "light_decoder", "qwen2d")


class DamagedCheckpoint(ValueError):
  """A committed checkpoint folder that cannot be read back."""


class CheckpointNotWritten(OSError):
  """A save that failed (nothing was committed for its step)."""


def _damage(error):
  """What is wrong with a checkpoint, read off the storage layer's error; None when `error` is not
  about unreadable files (e.g. a shape mismatch, which the callers report as such)."""
  text = str(error)
  if isinstance(error, KeyError) and "was not found in the checkpoint" in text:
    return f"item '{text.split(chr(34))[1]}' missing"
  if isinstance(error, FileNotFoundError):
    return f"a file is missing ({error.filename or text})"
  if isinstance(error, json.JSONDecodeError):
    return f"unreadable JSON ({error.msg})"
  if "NOT_FOUND" in text or "does not exist" in text:
    return "a data file or the manifest is missing"
  if type(error) is Exception or "DATA_LOSS" in text:  # pylint: disable=unidiomatic-typecheck
    # TensorStore reports a truncated or missing chunk as a bare Exception.
    return "a data file is missing or truncated"
  return None


def _write_error(error):
  """The system's reason of a failed write ('No space left on device'), or the error's text."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  match = re.search(r": ([^:\[]+?) \[os_error_code='(\d+)'\]", str(error))
  return match[1] if match else str(error).splitlines()[0][:200]


def _from_orbax(record):
  """True when a log record comes from Orbax or carries an exception raised in Orbax."""
  tb = record.exc_info[2] if record.exc_info else None
  paths = [record.pathname]
  while tb is not None:
    paths.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  return any(f"{os.sep}orbax{os.sep}" in path for path in paths)


class _OneLineStorageErrors(logging_std.Filter):
  """Orbax logs a failed background write with its traceback (and asyncio logs it again as a
  never-retrieved task exception), then re-raises it in the main thread, where
  `CheckpointNotWritten` reports it in one line: keep the log lines, drop the tracebacks."""

  def filter(self, record):
    if _from_orbax(record):
      record.exc_info = record.exc_text = None
    return True


for _logger in (logging.get_absl_logger(), logging_std.getLogger("asyncio")):
  _logger.addFilter(_OneLineStorageErrors())


@contextlib.contextmanager
def _reading(folder):
  """Turns the storage layer's errors about unreadable files under `folder` into
  `DamagedCheckpoint` naming the folder."""
  try:
    yield
  except Exception as e:  # Orbax and TensorStore raise many types, some bare Exception.
    reason = _damage(e)
    if reason is None:
      raise
    raise DamagedCheckpoint(f"{folder}: damaged checkpoint, {reason}") from e


def save_params(path, params, metadata):
  """Writes `params` (a nested dict of arrays) and `metadata` (JSON-able dict) to folder `path`."""
  path = os.path.abspath(path)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(path, ocp.args.Composite(
        params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave(metadata)), force=True)


def load_metadata(path):
  """Reads the metadata dict of a parameter checkpoint written by `save_params`."""
  path = _existing_checkpoint(path)
  with _reading(path), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(path, ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata


def load_params(path, abstract_params=None):
  """Returns (params, metadata) from folder `path`.

  Args:
    path: a folder written by `save_params`.
    abstract_params: optional pytree of `jax.ShapeDtypeStruct` (with shardings) to restore onto.
  Raises:
    FileNotFoundError: no checkpoint there; DamagedCheckpoint: one that cannot be read.
  """
  path = _existing_checkpoint(path)
  with _reading(path), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(path, ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), metadata=ocp.args.JsonRestore()))
  return restored.params, restored.metadata


def _existing_checkpoint(path):
  path = os.path.abspath(path)
  if not is_params_checkpoint(path):
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

  Resume order: check the saved config (before any compute) -> build the state ->
  `restore_latest`: the state onto its shardings, then the iterator in place -> continue from
  `state.step`. A step that cannot be read is renamed `<step>.damaged-<time>` (out of Orbax's
  view, nothing deleted) with a warning, and the next older step is tried.
  """

  def __init__(self, workdir, config):
    """Opens (creating if needed) `<workdir>/checkpoints` and checks the newest readable config.

    Raises:
      ValueError: when the latest checkpoint was written by a config with another architecture.
    """
    self.directory = train_directory(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.max_to_keep,
        enable_async_checkpointing=config.checkpoint.async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.config_json = json.loads(config.to_json_best_effort())
    self._pending = None  # The step of an async save not yet known to be committed.
    while (step := self.latest_step()) is not None:
      try:
        with _reading(self.step_folder(step)):
          saved = self.manager.restore(step, args=ocp.args.Composite(
              config=ocp.args.JsonRestore()))
      except DamagedCheckpoint as e:
        self._set_aside(step, e)
        continue
      self._check_compatible(saved.config, step)
      break

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

  def step_folder(self, step):
    return os.path.join(self.directory, str(step))

  def _set_aside(self, step, error):
    """Renames the damaged folder of `step` out of Orbax's view (process 0) and rescans."""
    target = f"{self.step_folder(step)}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    logging.warning("%s; moved to %s, resuming from an older step.", error, target)
    if jax.process_index() == 0:
      os.rename(self.step_folder(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self.manager.reload()

  def latest_step(self):
    """The last committed step, or None."""
    return self.manager.latest_step()

  def save(self, step, state, data_iter):
    """Starts saving (async if configured) `state` and `data_iter` at `step`.

    Raises:
      CheckpointNotWritten: this save, or the pending async one it waits for, failed (e.g. disk
        full).
    """
    with self._writing(step if self._pending is None else self._pending):
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data_iter=grain.checkpoint.CheckpointSave(data_iter),
          config=ocp.args.JsonSave(self.config_json)), force=True)
    self._pending = step

  def restore(self, step, abstract_state, data_iter):
    """Restores the state of `step` onto the shardings of `abstract_state` (a pytree of
    `jax.ShapeDtypeStruct` with `sharding`), then sets `data_iter` to its saved position (only
    once the state has been read, so a damaged step leaves the iterator as it was).

    Raises:
      DamagedCheckpoint: naming the step folder.
    """
    with _reading(self.step_folder(step)):
      state = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state))).state
      self.manager.restore(step, args=ocp.args.Composite(
          data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    return state

  def restore_latest(self, abstract_state, data_iter):
    """(step, state) of the newest step that restores, or (None, None) when none does. Damaged
    steps on the way are set aside (see the class docstring)."""
    while (step := self.latest_step()) is not None:
      try:
        return step, self.restore(step, abstract_state, data_iter)
      except DamagedCheckpoint as e:
        self._set_aside(step, e)
    return None, None

  def wait(self):
    """Blocks until pending async saves are committed.

    Raises:
      CheckpointNotWritten: a pending save failed.
    """
    with self._writing(self._pending):
      self.manager.wait_until_finished()
    self._pending = None

  @contextlib.contextmanager
  def _writing(self, step):
    """Turns a failed save into `CheckpointNotWritten` naming the intact latest step."""
    try:
      yield
    except Exception as e:  # Orbax re-raises TensorStore write errors as ValueError.
      if not isinstance(e, OSError) and "RESOURCE_EXHAUSTED" not in str(e) \
          and "os_error_code" not in str(e):
        raise
      self._pending = None
      intact = self.manager.latest_step()
      raise CheckpointNotWritten(
          f"{self.directory}: the checkpoint of step {step} was not written ({_write_error(e)}); "
          + (f"the checkpoint of step {intact} is intact" if intact is not None
             else "no earlier checkpoint") + ". Free space (or fix the folder) and rerun the "
          "same command to resume.") from e

  def close(self):
    self.manager.close()


# ------------------------------------------------------------------------------------------------
# What is at a path, and loading it.

def train_directory(workdir):
  """`<workdir>/checkpoints`: the train-state checkpoints of a training workdir."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


def is_train_workdir(path):
  """True when `path` is a training workdir (has a `checkpoints/` folder)."""
  return bool(path) and os.path.isdir(os.path.join(path, CHECKPOINTS))


def is_params_checkpoint(path):
  """True when `path` is a parameter checkpoint of `save_params` (has a `params/` folder)."""
  return bool(path) and os.path.isdir(os.path.join(path, "params"))


@dataclasses.dataclass(frozen=True)
class Found:
  """What `resolve` found at `path`.

  Attributes:
    path: the absolute path.
    what: 'workdir' (a training workdir), 'network' (one parameter checkpoint), 'release' (a
      folder of parameter checkpoints, one per network) or None (nothing usable).
    networks: {kind: folder} of the parameter checkpoints ('network' and 'release').
  """
  path: str
  what: str | None
  networks: dict = dataclasses.field(default_factory=dict)


def resolve(path):
  """What `path` holds: see `Found`. A training workdir wins over parameter checkpoints.

  Raises:
    ValueError: a parameter checkpoint of an unknown kind, or two of one kind in a release folder.
    DamagedCheckpoint: metadata that cannot be read.
  """
  path = os.path.abspath(path) if path else ""
  if not path or not os.path.isdir(path):
    return Found(path, None)
  if is_train_workdir(path):
    return Found(path, "workdir")
  single = is_params_checkpoint(path)
  folders = [path] if single else sorted(
      os.path.join(path, n) for n in os.listdir(path) if is_params_checkpoint(os.path.join(path, n)))
  found = {}
  for folder in folders:
    kind = load_metadata(folder).get("kind")
    if kind not in KINDS:
      raise ValueError(f"{folder}: unknown network kind {kind!r}; expected one of {KINDS}")
    if kind in found:
      raise ValueError(f"{path}: two {kind!r} checkpoints ({found[kind]} and {folder}); keep one")
    found[kind] = folder
  if not found:
    return Found(path, None)
  return Found(path, "network" if single else "release", found)


def kwargs_differences(have, want):
  """{name: (checkpoint value, wanted value)} of the constructor arguments in `want` that `have`
  (a parameter checkpoint's metadata `kwargs`) lacks or sets otherwise. JSON turns tuples into
  lists, so sequences compare as lists."""
  def norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v
  return {k: (have.get(k), v) for k, v in want.items() if norm(have.get(k, False)) != norm(v)}


def load_network(folder, make, *, kind, label, want=None, shardings=None, target=None,
                 abstract=False):
  """Restores a converted network from the parameter checkpoint `folder`.

  Args:
    folder: a `save_params` folder.
    make: (constructor kwargs, nnx.Rngs) -> the module.
    kind: the metadata `kind` it must have.
    label: how errors name the checkpoint (e.g. "config.model.path='/w/dit'" or the folder).
    want: optional constructor arguments the checkpoint's `kwargs` must agree with (from the
      caller's config); a difference is a ValueError listing them.
    shardings: optional nnx.State -> pytree of shardings to restore onto.
    target: optional pytree of `jax.ShapeDtypeStruct` to restore onto (wins over `shardings`).
    abstract: return that target instead of the parameters (only the metadata is read).
  Returns:
    (graphdef, params as a pure dict, metadata).
  Raises:
    ValueError naming `label`: another kind, other kwargs, parameters that do not fit them.
    DamagedCheckpoint: a checkpoint that cannot be read.
  """
  metadata = load_metadata(folder)
  if metadata.get("kind") != kind:
    raise ValueError(f"{label} holds a {metadata.get('kind')!r} checkpoint; {kind!r} is needed")
  kwargs = metadata["kwargs"]
  diffs = kwargs_differences(kwargs, want or {})
  if diffs:
    raise ValueError(f"{label}: the converted {kind!r} network differs from the config "
                     f"(checkpoint, config): {diffs}")
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: make(kwargs, nnx.Rngs(0))))
  if target is None:
    target = abstract_target(abstract_state, shardings)
  if abstract:
    return graphdef, target, metadata
  try:
    params, _ = load_params(folder, target)
  except DamagedCheckpoint:
    raise
  except (ValueError, KeyError) as e:
    raise ValueError(f"{label}: the parameters do not match the {kind!r} network its metadata "
                     f"describes: {e}") from e
  return graphdef, params, metadata


def abstract_target(abstract, shardings=None):
  """The pure dict of `jax.ShapeDtypeStruct` of an abstract nnx.State, placed with `shardings`
  (nnx.State -> pytree of shardings) or unplaced."""
  target = abstract.to_pure_dict()
  if shardings is not None:
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          target, shardings(abstract))
  return target


# Config fields added after the first training runs, with the value that reproduces how a run
# whose saved config lacks them was trained. `latest_train_config` fills them in: the one place
# where old saved configs are brought up to date.
SAVED_CONFIG_FIELDS = (("model.overrides.one_step", False), ("objective.target", "latent"),
                       ("optim.decay_steps", 0), ("model.matmul_dtype", None))


def upgrade_saved_config(config):
  """Fills the `SAVED_CONFIG_FIELDS` that a saved config (a dict, changed in place) lacks."""
  for dotted, value in SAVED_CONFIG_FIELDS:
    *sections, name = dotted.split(".")
    tree = config
    for section in sections:
      tree = tree.setdefault(section, {})
    tree.setdefault(name, value)
  return config


def latest_train_config(workdir):
  """(step, config dict) of the latest committed checkpoint of a training workdir; fields the
  saved config lacks are filled in (`SAVED_CONFIG_FIELDS`).

  Raises:
    FileNotFoundError: when the workdir holds no committed checkpoint.
    DamagedCheckpoint: when the latest one cannot be read.
  """
  directory = train_directory(workdir)
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{directory}: no committed training checkpoint")
    with _reading(os.path.join(directory, str(step))):
      saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return step, upgrade_saved_config(saved.config)


def load_train_ema(workdir, abstract_params):
  """The EMA parameters of the latest checkpoint of a training workdir.

  Args:
    workdir: a `--workdir` of `python -m vosr_jax.main`.
    abstract_params: pytree of `jax.ShapeDtypeStruct` (with shardings) of the EMA parameters.
  Returns:
    (ema_params, step, config): the parameters, the step and the saved config (dict, see
    `latest_train_config`).
  Raises:
    FileNotFoundError: when the workdir holds no committed checkpoint.
    DamagedCheckpoint: when the latest one cannot be read.
  """
  step, config = latest_train_config(workdir)
  item = {"ema_params": abstract_params}
  directory = train_directory(workdir)
  with _reading(os.path.join(directory, str(step))), ocp.CheckpointManager(directory) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
  return restored.state["ema_params"], step, config
