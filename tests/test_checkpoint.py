"""`vosr_jax.checkpoint`: parameter checkpoints, `resolve` of each kind of folder, `load_network`'s
checks, damaged folders, saved-config upgrades and the train checkpointer's damaged-step handling,
on small states (no model is trained)."""
import os
import shutil

import grain
import jax
import numpy as np
import pytest
from flax import nnx

import train_utils
from configs import multistep
from vosr_jax import checkpoint

LINEAR = {"in_features": 3, "out_features": 2}


def _linear(kwargs, rngs):
  return nnx.Linear(**kwargs, rngs=rngs)


def _save_linear(folder, kind="dit", kwargs=LINEAR, seed=0):
  """A converted-style checkpoint of an nnx.Linear; returns its parameters."""
  params = nnx.state(_linear(kwargs, nnx.Rngs(seed)), nnx.Param).to_pure_dict()
  checkpoint.save_params(str(folder), params, {"kind": kind, "kwargs": kwargs})
  return params


def _tiny_config():
  config = multistep.get_config("tiny")
  config.unlock()
  config.checkpoint.async_save = False
  return config


def _w(step, size):
  return np.random.default_rng(step).standard_normal(size, np.float32)


def _abstract(size, dtype=np.float32):
  """A ShapeDtypeStruct of `size` elements (None: a scalar) on the first device."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.ShapeDtypeStruct(() if size is None else (size,), dtype, sharding=device)


def _save_steps(workdir, steps, size=50_000):
  """A training workdir whose steps hold {'step', 'ema_params': {'w'}} (w: `size` random floats of
  seed `step`, so that the state has a data file of its own)."""
  ckpt = checkpoint.TrainCheckpointer(str(workdir), _tiny_config())
  for step in steps:
    state = {"step": np.int32(step), "ema_params": {"w": _w(step, size)}}
    ckpt.save(step, state, iter(grain.MapDataset.range(2).to_iter_dataset()))
    ckpt.wait()
  ckpt.close()


def test_params_round_trip(tmp_path):
  params = {"a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(4, np.int32)}
  metadata = {"kind": "vit", "kwargs": {"hidden_size": 8}, "tap_layer": 1}
  checkpoint.save_params(str(tmp_path / "n"), params, metadata)
  got, meta = checkpoint.load_params(str(tmp_path / "n"))
  assert meta == metadata == checkpoint.load_metadata(str(tmp_path / "n"))
  jax.tree.map(np.testing.assert_array_equal, got, params)
  with pytest.raises(FileNotFoundError, match="No parameter checkpoint"):
    checkpoint.load_params(str(tmp_path))


def test_resolve_tells_each_kind_of_folder_apart(tmp_path):
  assert checkpoint.resolve(str(tmp_path / "absent")).what is None
  assert checkpoint.resolve("").what is None
  (tmp_path / "empty").mkdir()
  assert checkpoint.resolve(str(tmp_path / "empty")) == checkpoint.Found(
      str(tmp_path / "empty"), None)
  _save_linear(tmp_path / "one")
  assert checkpoint.resolve(str(tmp_path / "one")) == checkpoint.Found(
      str(tmp_path / "one"), "network", {"dit": str(tmp_path / "one")})
  release = tmp_path / "release"
  _save_linear(release / "a", "dit")
  _save_linear(release / "b", "vit")
  (release / "notes.txt").write_text("not a checkpoint")
  found = checkpoint.resolve(str(release))
  assert found.what == "release"
  assert found.networks == {"dit": str(release / "a"), "vit": str(release / "b")}
  # A training workdir wins over parameter checkpoints inside it.
  _save_steps(release, [1], size=10)
  assert checkpoint.resolve(str(release)).what == "workdir"
  assert checkpoint.is_train_workdir(str(release)) and not checkpoint.is_train_workdir(
      str(tmp_path / "one"))


def test_resolve_rejects_unknown_and_repeated_kinds(tmp_path):
  _save_linear(tmp_path / "odd", "resnet")
  with pytest.raises(ValueError, match="unknown network kind 'resnet'"):
    checkpoint.resolve(str(tmp_path / "odd"))
  _save_linear(tmp_path / "two" / "x", "dit")
  _save_linear(tmp_path / "two" / "y", "dit")
  with pytest.raises(ValueError, match="two 'dit' checkpoints"):
    checkpoint.resolve(str(tmp_path / "two"))


def test_a_damaged_network_folder_is_named(tmp_path):
  _save_linear(tmp_path / "good")
  garbled = tmp_path / "garbled"
  shutil.copytree(tmp_path / "good", garbled)
  (garbled / "metadata" / "metadata").write_text("{")
  with pytest.raises(checkpoint.DamagedCheckpoint, match=f"{garbled}: damaged checkpoint, "
                     "unreadable JSON"):
    checkpoint.resolve(str(garbled))
  cut = tmp_path / "cut"
  shutil.copytree(tmp_path / "good", cut)
  shutil.rmtree(cut / "params" / "d")
  with pytest.raises(checkpoint.DamagedCheckpoint, match=f"{cut}: damaged checkpoint, "):
    checkpoint.load_network(str(cut), _linear, kind="dit", label="x")


def test_load_network_checks_kind_kwargs_and_shapes(tmp_path):
  params = _save_linear(tmp_path / "n")
  graphdef, got, metadata = checkpoint.load_network(str(tmp_path / "n"), _linear, kind="dit",
                                                    label="L", want={"out_features": 2})
  jax.tree.map(np.testing.assert_array_equal, got, params)
  assert metadata["kwargs"] == LINEAR
  x = np.ones((1, 3), np.float32)
  np.testing.assert_allclose(nnx.merge(graphdef, got)(x), x @ params["kernel"] + params["bias"])
  _, target, _ = checkpoint.load_network(str(tmp_path / "n"), _linear, kind="dit", label="L",
                                         abstract=True)
  assert target["kernel"] == jax.ShapeDtypeStruct((3, 2), np.float32)
  with pytest.raises(ValueError, match="L holds a 'dit' checkpoint; 'vit' is needed"):
    checkpoint.load_network(str(tmp_path / "n"), _linear, kind="vit", label="L")
  with pytest.raises(ValueError, match=r"differs from the config .*'out_features': \(2, 4\)"):
    checkpoint.load_network(str(tmp_path / "n"), _linear, kind="dit", label="L",
                            want={"out_features": 4})
  # Metadata that describes another shape than the saved parameters.
  _save_linear(tmp_path / "m")
  checkpoint.save_params(str(tmp_path / "m"), params,
                         {"kind": "dit", "kwargs": {"in_features": 3, "out_features": 5}})
  with pytest.raises(ValueError, match="do not match the 'dit' network"):
    checkpoint.load_network(str(tmp_path / "m"), _linear, kind="dit", label="M")


def test_kwargs_differences_compare_sequences_as_lists():
  have = {"grid": [4, 4], "depth": 2}
  assert checkpoint.kwargs_differences(have, {"grid": (4, 4), "depth": 2}) == {}
  assert checkpoint.kwargs_differences(have, {"depth": 3, "one_step": True}) == {
      "depth": (2, 3), "one_step": (None, True)}
  assert checkpoint.kwargs_differences(have, {"one_step": False}) == {}  # absent reads False


def test_upgrade_saved_config_fills_only_missing_fields():
  saved = {"objective": {"target": "residual"}, "model": {"overrides": {}}}
  upgraded = checkpoint.upgrade_saved_config(saved)
  assert upgraded["objective"]["target"] == "residual"  # kept
  assert upgraded["model"]["overrides"]["one_step"] is False
  assert upgraded["optim"]["decay_steps"] == 0
  assert upgraded["model"]["matmul_dtype"] is None  # configs saved before the option


def test_latest_train_config_and_ema_are_the_newest_steps(tmp_path):
  _save_steps(tmp_path, [1, 3], size=10)
  step, config = checkpoint.latest_train_config(str(tmp_path))
  assert step == 3 and config["model"]["variant"] == _tiny_config().model.variant
  ema, step, _ = checkpoint.load_train_ema(str(tmp_path), {"w": _abstract(10)})
  assert step == 3
  np.testing.assert_array_equal(ema["w"], _w(3, 10))
  with pytest.raises(FileNotFoundError, match="no committed training checkpoint"):
    checkpoint.latest_train_config(str(tmp_path / "none"))


def test_a_damaged_latest_step_is_set_aside_and_an_older_one_restored(tmp_path, caplog):
  """Unit level (the training loop end to end is in test_train.py): step 2 is damaged, step 1
  restores, step 2 is renamed out of Orbax's view with every file kept."""
  _save_steps(tmp_path, [1, 2])
  step2 = str(tmp_path / "checkpoints" / "2")
  cut = train_utils.largest_data_file(os.path.join(step2, "state"))
  train_utils.truncate(cut)
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path), _tiny_config())
  abstract = {"step": _abstract(None, np.int32), "ema_params": {"w": _abstract(50_000)}}
  with caplog.at_level("WARNING"):
    step, state = ckpt.restore_latest(abstract, iter(grain.MapDataset.range(2).to_iter_dataset()))
  ckpt.close()
  assert step == 1 and int(state["step"]) == 1
  np.testing.assert_array_equal(state["ema_params"]["w"], _w(1, 50_000))
  aside = [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith("2.damaged-")]
  assert len(aside) == 1 and sorted(os.listdir(tmp_path / "checkpoints")) == ["1", aside[0]]
  assert "checkpoints/2: damaged checkpoint, a data file is missing or truncated" in caplog.text
  kept = os.path.join(tmp_path, "checkpoints", aside[0], "state", os.path.relpath(cut, os.path.join(
      step2, "state")))
  assert os.path.getsize(kept) == 1000  # Kept as it was.
