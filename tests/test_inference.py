"""`vosr_jax.inference`: `load_pipeline` of a training workdir, a release folder and a single
converted denoiser with separate frozen networks, its errors, and `benchmark_sampling`."""
import shutil

import grain
import jax
import numpy as np
import pytest
from flax import nnx

import train_utils
from configs import multistep, onestep
from configs import sampling as sampling_config
from vosr_jax import checkpoint, inference, models, objectives


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _workdir(path, config):
  """A training workdir whose step 1 holds `config`'s denoiser (perturbed) as its EMA; returns
  those parameters. Only the EMA is saved: the pipeline reads nothing else."""
  config = config.copy_and_resolve_references()
  config.unlock()
  config.checkpoint.async_save = False
  denoiser = models.build_denoiser(config.model, nnx.Rngs(0), np.float32)
  ema = train_utils.perturbed(nnx.state(denoiser, nnx.Param).to_pure_dict(), 2)
  ckpt = checkpoint.TrainCheckpointer(str(path), config)
  ckpt.save(1, {"step": np.int32(1), "ema_params": ema},
            iter(grain.MapDataset.range(2).to_iter_dataset()))
  ckpt.wait()
  ckpt.close()
  return ema


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  folder = tmp_path_factory.mktemp("release")
  return folder, train_utils.tiny_release(folder)


@pytest.fixture(scope="module")
def multistep_workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("multistep")
  return path, _workdir(path, multistep.get_config("tiny"))


@pytest.mark.parametrize("kind", ["multistep", "onestep"])
def test_workdir_is_loaded_with_its_ema_and_its_config(multistep_workdir, tmp_path, kind):
  config = (multistep if kind == "multistep" else onestep).get_config("tiny")
  path, ema = multistep_workdir if kind == "multistep" else (tmp_path, _workdir(tmp_path, config))
  pipe = inference.load_pipeline(str(path))
  assert pipe.networks.one_step == (kind == "onestep") and "(step 1, EMA)" in pipe.source
  _equal(pipe.params["denoiser"], ema)
  assert pipe.networks.downsample == 1 and pipe.networks.tap_layer == config.encoder.tap_layer
  assert pipe.networks.encoder_size == config.encoder.image_size
  assert pipe.networks.residual_scale == objectives.residual_scale(config.objective)


def test_release_folder_is_loaded_network_by_network(release):
  folder, saved = release
  pipe = inference.load_pipeline(str(folder))
  assert pipe.networks.one_step and pipe.source == str(folder / "dit")
  assert pipe.networks.downsample == 4 and pipe.networks.residual_scale is None
  assert (pipe.networks.tap_layer, pipe.networks.encoder_size) == (1, 56)
  for kind, name in (("dit", "denoiser"), ("vit", "encoder"), ("qwen2d", "autoencoder")):
    _equal(pipe.params[name], saved[kind])


def test_single_denoiser_takes_the_frozen_networks_from_flags(release):
  folder, saved = release
  with pytest.raises(FileNotFoundError, match=r"no converted encoder \(vit\) there; pass --encoder"):
    inference.load_pipeline(str(folder / "dit"))
  pipe = inference.load_pipeline(str(folder / "dit"), encoder=str(folder / "vit"),
                                 autoencoder=str(folder))
  assert pipe.networks.one_step and pipe.networks.tap_layer == 1
  _equal(pipe.params["encoder"], saved["vit"])


def test_load_errors_name_the_folder_and_the_fix(tmp_path, release):
  folder, _ = release
  with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
    inference.load_pipeline(str(tmp_path / "absent"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no model there"):
    inference.load_pipeline(str(tmp_path / "empty"))
  for kind in ("vit", "qwen2d"):
    shutil.copytree(folder / kind, tmp_path / "frozen" / kind)
  with pytest.raises(FileNotFoundError, match=r"no converted denoiser \(dit\) there"):
    inference.load_pipeline(str(tmp_path / "frozen"))
  # A converted encoder whose width is no official one and whose metadata names no tap layer.
  params, metadata = checkpoint.load_params(str(folder / "vit"))
  checkpoint.save_params(str(tmp_path / "vit"), params, {"kind": "vit",
                                                         "kwargs": metadata["kwargs"]})
  with pytest.raises(ValueError, match="names no 'tap_layer' and width 64"):
    inference.load_pipeline(str(folder), encoder=str(tmp_path / "vit"))


def test_latent_channels_must_match_the_autoencoder(tmp_path):
  train_utils.tiny_release(tmp_path, dict(train_utils.RELEASE_DIT, latent_channels=4))
  with pytest.raises(ValueError, match="takes 4-channel latents but the autoencoder makes 16"):
    inference.load_pipeline(str(tmp_path))


def test_benchmark_sampling_reports_the_timed_calls(multistep_workdir):
  pipe = inference.load_pipeline(str(multistep_workdir[0]))
  result = inference.benchmark_sampling(pipe, sampling_config=sampling_config.get_config(),
                                        sizes=((8, 32),), multistep_steps=2, batch_size=2,
                                        repeats=2, warmup=1)
  assert result["backend"] == jax.default_backend()
  rows = result["results"]
  assert [(r["mode"], r["steps"], r["lr_size"], r["hr_size"], r["batch_size"]) for r in rows] == [
      ("multistep", 2, 8, 32, 2)]
  for r in rows:
    assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["min_s"] <= r["mean_s"] <= r["max_s"]
    assert r["images_per_s"] == pytest.approx(2 / r["median_s"])
