"""`python -m vosr_jax.convert`: a tiny official release folder -> parameter checkpoints.

The model tests check each key mapping numerically against its reference; here the release layout
is discovered, every network is written and read back exactly, the DiT loaded from disk reproduces
the PyTorch forward, absent parts are reported, and broken inputs fail naming the file or key.
"""
import json
import os

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

import vosr_jax  # noqa: F401  (sets the flax config)
from vosr_jax import checkpoint, convert
from vosr_jax.models import dit, vit

import qwen_vae_reference
import torch_reference
from torch_utils import abstract, nchw, nhwc, param_state, randomize

DIT = dict(latent_channels=4, hidden_size=32, depth=2, num_heads=2, enc_dim=24)
VIT_HEADS = 2  # Of the width-24 DINOv2 below: width // 64 would be no head at all.


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """A release folder with every official part, each tiny and randomly initialised."""
  root = tmp_path_factory.mktemp("release")
  denoiser = randomize(torch_reference.LightningDiT(**DIT, input_size=8, one_step=True), 0)
  os.makedirs(root / "VOSR_0.5B_os" / "clean_weights")
  save_file({k: v.contiguous() for k, v in denoiser.state_dict().items()},
            str(root / "VOSR_0.5B_os" / "clean_weights" / "ema_model.safetensors"))
  vae_config = dict(block_out_channels=(32,), layers_per_block=1, norm_num_groups=8,
                    down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
  randomize(diffusers.AutoencoderKL(**vae_config), 1).save_pretrained(
      root / "stable-diffusion-2-1-base" / "vae")
  light_config = dict(in_channels=4, out_channels=3, block_out_channels=[32, 32],
                      layers_per_block=1)
  light = randomize(diffusers.models.autoencoders.vae.Decoder(
      in_channels=4, out_channels=3, up_block_types=("UpDecoderBlock2D",) * 2,
      block_out_channels=(32, 32), layers_per_block=1), 2)
  torch.save({"config": light_config, "model_state_dict": light.state_dict()},
             root / "sd21_lwdecoder.pth")
  dinov2 = randomize(transformers.Dinov2Model(transformers.Dinov2Config(
      hidden_size=24, num_hidden_layers=2, num_attention_heads=VIT_HEADS, image_size=56,
      patch_size=14)), 3)
  os.makedirs(root / "torch_cache" / "hub" / "checkpoints")
  hub = {k: torch.from_numpy(np.asarray(v)) for k, v in vit._hf_to_hub(dinov2.state_dict()).items()}
  torch.save(hub, root / "torch_cache" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth")
  qwen = qwen_vae_reference.QwenImageVAE2D(8, 16, (1, 2), 1, [0.0] * 16, [1.0] * 16)
  os.makedirs(root / "Qwen-Image-vae-2d")
  save_file({k: v.contiguous() for k, v in randomize(qwen, 4).state_dict().items()},
            str(root / "Qwen-Image-vae-2d" / "diffusion_pytorch_model.safetensors"))
  with open(root / "Qwen-Image-vae-2d" / "config.json", "w") as f:
    json.dump(dict(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                   dropout=0.0, latents_mean=[0.0] * 16, latents_std=[1.0] * 16), f)
  return root, denoiser


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
  out = tmp_path_factory.mktemp("converted")
  return out, convert.convert_release(str(release[0]), str(out), num_heads=VIT_HEADS)


def test_release_converts_every_part(converted):
  out, report = converted
  kinds = {name: meta["kind"] for name, meta in report.items()}
  assert kinds == {"VOSR_0.5B_os": "dit", "sd21_vae": "sd21", "light_decoder": "light_decoder",
                   "dinov2_vits14": "vit", "qwen2d_vae": "qwen2d"}
  assert report["VOSR_0.5B_os"]["source"].endswith("clean_weights/ema_model.safetensors")
  assert report["VOSR_0.5B_os"]["kwargs"]["one_step"] is True


@pytest.mark.parametrize("name,kind", [("VOSR_0.5B_os", "dit"), ("sd21_vae", "sd21"),
                                       ("light_decoder", "light_decoder"),
                                       ("dinov2_vits14", "vit"), ("qwen2d_vae", "qwen2d")])
def test_written_params_equal_direct_conversion(release, converted, name, kind):
  out, report = converted
  options = {"num_heads": VIT_HEADS} if kind == "vit" else {}
  expected, kwargs, _ = convert.CONVERTERS[kind](report[name]["source"], **options)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), expected)
  params, metadata = checkpoint.load_params(str(out / name), target)
  assert metadata == report[name]
  assert json.loads(json.dumps(kwargs)) == metadata["kwargs"]
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, expected))


def test_loaded_denoiser_reproduces_torch(release, converted):
  root, denoiser = release
  path = str(converted[0] / "VOSR_0.5B_os")
  kwargs = checkpoint.load_metadata(path)["kwargs"]
  model = abstract(dit.LightningDiT, **kwargs)
  params, _ = checkpoint.load_params(path, nnx.state(model, nnx.Param).to_pure_dict())
  nnx.update(model, param_state(model, params))
  rng = np.random.default_rng(0)
  z_t, lr = (rng.normal(size=(2, 8, 8, 4)).astype(np.float32) for _ in range(2))
  tokens = rng.normal(size=(2, 16, 24)).astype(np.float32)
  t, r = np.array([0.9, 0.4], np.float32), np.array([0.2, 0.1], np.float32)
  ours = model(z_t, lr, t, tokens, r)
  x = nchw(np.concatenate([lr, z_t], -1))
  with torch.no_grad():
    ref = denoiser(x, torch.from_numpy(t), torch.from_numpy(r), [torch.from_numpy(tokens)])
  np.testing.assert_allclose(np.asarray(ours), nhwc(ref), atol=1e-5)


def test_absent_parts_are_reported(tmp_path, release, capsys):
  partial = tmp_path / "partial"
  os.makedirs(partial)
  os.symlink(release[0] / "sd21_lwdecoder.pth", partial / "sd21_lwdecoder.pth")
  report = convert.convert_release(str(partial), str(tmp_path / "out"))
  assert list(report) == ["light_decoder"]
  printed = capsys.readouterr().out
  for absent in ("VOSR_* denoiser", "DINOv2", "SD-2.1 VAE", "Qwen-Image 2D VAE"):
    assert f"absent: {absent}" in printed


def test_cli_errors_name_the_problem(tmp_path, release, capsys):
  assert convert.main(["--release", str(tmp_path / "nowhere"), "--output", str(tmp_path)]) == 2
  assert "nowhere: no such file or folder" in capsys.readouterr().err
  empty = tmp_path / "empty"
  os.makedirs(empty)
  assert convert.main(["--release", str(empty), "--output", str(tmp_path / "o")]) == 2
  assert "none of" in capsys.readouterr().err
  state = {k: v for k, v in release[1].state_dict().items()}
  state["blocks.0.attn.extra.weight"] = torch.zeros(3)
  save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
  assert convert.main(["--kind", "dit", "--input", str(tmp_path / "bad.safetensors"),
                       "--output", str(tmp_path / "o2")]) == 2
  assert "blocks.0.attn.extra.weight" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o2")


# ---- Bad files: the file is named, one bad part does not stop a release. ----------------------

def _garbage(path, size):
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(size))
  return str(path)


@pytest.mark.parametrize("kind,name,size,message", [
    ("dit", "garbage.safetensors", 300, "not a valid safetensors file"),
    ("dit", "empty.safetensors", 0, "not a valid safetensors file"),
    ("light_decoder", "garbage.pth", 300, "not a valid PyTorch checkpoint"),
    ("light_decoder", "empty.pth", 0, "not a valid PyTorch checkpoint"),
    ("vit", "garbage.safetensors", 300, "not a valid safetensors file")])
def test_garbage_files_are_named(tmp_path, capsys, kind, name, size, message):
  path = _garbage(tmp_path / name, size)
  assert convert.main(["--kind", kind, "--input", path, "--output", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {path}: {message}") and len(err.splitlines()) == 1, err
  assert "weights_only" not in err and not os.path.exists(tmp_path / "o")


def test_a_corrupt_part_does_not_stop_the_release(tmp_path, release, capsys):
  part = tmp_path / "release"
  os.makedirs(part / "VOSR_0.5B_os")
  _garbage(part / "VOSR_0.5B_os" / "ema_model.safetensors", 0)
  _garbage(part / "sd21_lwdecoder.pth", 300)
  for name in ("stable-diffusion-2-1-base", "Qwen-Image-vae-2d", "torch_cache"):
    os.symlink(release[0] / name, part / name)
  code = convert.main(["--release", str(part), "--output", str(tmp_path / "out"),
                       "--num-heads", str(VIT_HEADS)])
  err = capsys.readouterr().err
  assert code == 1
  assert "ema_model.safetensors: not a valid safetensors file" in err
  assert "sd21_lwdecoder.pth: not a valid PyTorch checkpoint" in err
  assert "2 of 5 parts failed: VOSR_0.5B_os, light_decoder" in err
  assert sorted(os.listdir(tmp_path / "out")) == ["dinov2_vits14", "qwen2d_vae", "sd21_vae"]


def test_vit_heads_are_not_guessed_when_64_does_not_divide_the_width(tmp_path, release, capsys):
  pth = str(next((release[0] / "torch_cache").rglob("*.pth")))
  def run(*flags):
    return convert.main(["--kind", "vit", "--input", pth, "--output", str(tmp_path / "o"), *flags])

  assert run() == 2
  assert "width 24 is not a multiple of 64" in capsys.readouterr().err
  assert run("--num-heads", "5") == 2
  assert "5 heads do not divide the width 24" in capsys.readouterr().err
  for bad in ("0", "-1"):  # A usage error of argparse.
    with pytest.raises(SystemExit) as e:
      run("--num-heads", bad)
    assert e.value.code == 2
  assert run("--num-heads", "2") == 0
  assert checkpoint.load_metadata(str(tmp_path / "o"))["kwargs"]["num_heads"] == 2
