"""DINOv2 ViT vs transformers' Dinov2Model / Dinov2WithRegistersModel, and its checkpoint mappings.

Reference models are tiny (D=48, 4 blocks, pretraining grid 6x6) with every parameter randomised, so
LayerScale, LayerNorm affine and the positional table all matter; 224 and 448 px inputs (grids 16
and 32) exercise the positional-table interpolation.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx

import vosr_jax  # noqa: F401  (sets the flax config)
from torch_utils import abstract, load, max_err, nchw, randomize
from vosr_jax.models.vit import IMAGENET_MEAN, IMAGENET_STD, VARIANTS, ViT, params_from_torch
from vosr_jax.models.vit import preprocess

D, DEPTH, HEADS, GRID = 48, 4, 4, 6
TAP = 1  # a middle block
F32_ATOL = 1e-5
BF16_RTOL = 0.02  # max abs error / max abs value of the f32 tokens (measured 0.5%)


def _hf_model(registers=0, seed=0):
  common = dict(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4,
                image_size=14 * GRID, patch_size=14, layerscale_value=1e-5,
                attn_implementation="eager")
  if registers:
    config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
    return randomize(transformers.Dinov2WithRegistersModel(config), seed)
  return randomize(transformers.Dinov2Model(transformers.Dinov2Config(**common)), seed)


def _hf_to_hub_names(sd):
  """Inverse renaming for the round trip: a transformers state dict in torch.hub names."""
  out = {}
  for key, value in sd.items():
    parts = key.split(".")
    if key.startswith("embeddings."):
      out[{"cls_token": "cls_token", "mask_token": "mask_token",
           "register_tokens": "register_tokens", "position_embeddings": "pos_embed"}.get(
               parts[1], "patch_embed.proj." + parts[-1])] = value
    elif key.startswith("layernorm."):
      out["norm." + parts[-1]] = value
    else:
      i, rest = parts[2], ".".join(parts[3:])
      if rest.startswith("attention.q_proj"):
        kind = parts[-1]
        qkv = [sd[f"encoder.layer.{i}.attention.{n}_proj.{kind}"] for n in "qkv"]
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv, 0)
      elif rest.startswith(("attention.k_proj", "attention.v_proj")):
        continue
      else:
        rest = (rest.replace("attention.o_proj", "attn.proj")
                .replace("layer_scale1.lambda1", "ls1.gamma")
                .replace("layer_scale2.lambda1", "ls2.gamma"))
        out[f"blocks.{i}.{rest}"] = value
  return out


def _images(side, seed, batch=2):
  return np.random.default_rng(seed).standard_normal((batch, side, side, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def hf():
  model = _hf_model()
  sd = model.state_dict()
  params, kwargs = params_from_torch(sd, naming="hf", num_heads=HEADS)
  return model, sd, params, kwargs


@pytest.fixture(scope="module")
def vit(hf):
  """Converted models, built once per (option, value) pair: vit() or vit(scan=False)."""
  _, _, params, kwargs = hf
  cache = {}

  def get(**options):
    key = tuple(sorted(options.items()))
    if key not in cache:
      cache[key] = load(ViT, params, **{**kwargs, **options})
    return cache[key]

  return get


@nnx.jit(static_argnames=("tap_layer", "final_norm"))
def _run(model, x, tap_layer=None, final_norm=False):
  return model(x, tap_layer=tap_layer, final_norm=final_norm)


def test_layout_matches_module_state(hf):
  _, _, params, kwargs = hf
  assert kwargs == dict(patch_size=14, hidden_size=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=4.0,
                        num_register_tokens=0, pretrain_grid=GRID, pos_interpolation="hf")
  expected = nnx.state(abstract(ViT, **kwargs), nnx.Param).to_pure_dict()
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    assert got.shape == want.shape and got.dtype == np.float32


@pytest.mark.parametrize("side,scan", [(224, True), (448, True), (224, False)])
def test_matches_transformers(hf, vit, side, scan):
  model = hf[0]
  x = _images(side, seed=side)
  with torch.no_grad():
    ref = model(nchw(x), output_hidden_states=True)
  mid = ref.hidden_states[TAP + 1][:, 1:].numpy()  # hidden_states[0] is the embedding output
  final = ref.last_hidden_state[:, 1:].numpy()
  got_mid = np.asarray(_run(vit(scan=scan), jnp.asarray(x), tap_layer=TAP))
  got_final = np.asarray(_run(vit(scan=scan), jnp.asarray(x), final_norm=True))
  assert got_mid.shape == mid.shape == (2, (side // 14) ** 2, D)
  assert max_err(got_mid, mid) <= F32_ATOL
  assert max_err(got_final, final) <= F32_ATOL


def test_hub_naming_round_trip(hf):
  _, sd, params, kwargs = hf
  hub_sd = _hf_to_hub_names(sd)
  assert "blocks.0.attn.qkv.weight" in hub_sd and "pos_embed" in hub_sd
  hub_params, hub_kwargs = params_from_torch(hub_sd, naming="hub", num_heads=HEADS)
  assert hub_kwargs == {**kwargs, "pos_interpolation": "hub"}
  jax.tree.map(np.testing.assert_array_equal, hub_params, params)


def test_hf_legacy_on_disk_names(hf):
  _, sd, params, _ = hf
  legacy = {k.replace("attention.q_proj", "attention.attention.query")
            .replace("attention.k_proj", "attention.attention.key")
            .replace("attention.v_proj", "attention.attention.value")
            .replace("attention.o_proj", "attention.output.dense"): v for k, v in sd.items()}
  jax.tree.map(np.testing.assert_array_equal, params_from_torch(legacy, "hf", num_heads=HEADS)[0],
               params)


def test_keep_blocks(hf, vit):
  sd = hf[1]
  cut, cut_kwargs = params_from_torch(sd, naming="hf", num_heads=HEADS, keep_blocks=TAP + 1)
  assert cut_kwargs["depth"] == TAP + 1 and cut["blocks"]["qkv"]["kernel"].shape[0] == TAP + 1
  x = jnp.asarray(_images(224, seed=1, batch=1))
  full = _run(vit(), x, tap_layer=TAP)
  np.testing.assert_array_equal(np.asarray(_run(load(ViT, cut, **cut_kwargs), x, tap_layer=TAP)),
                                np.asarray(full))


def test_bfloat16_close(vit):
  x = jnp.asarray(_images(224, seed=2))
  ref = np.asarray(_run(vit(), x, tap_layer=TAP))
  got = _run(vit(dtype=jnp.bfloat16), x, tap_layer=TAP)
  assert got.dtype == jnp.float32
  assert max_err(got, ref) <= BF16_RTOL * np.abs(ref).max()


@pytest.mark.parametrize("scan", [True, False])
def test_tap_layer_skips_later_blocks(hf, scan):
  _, _, params, kwargs = hf
  poisoned = jax.tree.map(np.copy, params)
  for leaf in jax.tree.leaves(poisoned["blocks"]):
    leaf[TAP + 1:] = np.nan
  model = load(ViT, poisoned, **kwargs, scan=scan)
  x = jnp.asarray(_images(224, seed=3, batch=1))
  assert np.isfinite(np.asarray(_run(model, x, tap_layer=TAP))).all()
  assert np.isnan(np.asarray(_run(model, x, final_norm=True))).all()


def test_registers_and_antialiased_pos_embed():
  model = _hf_model(registers=2, seed=1)
  params, kwargs = params_from_torch(model.state_dict(), naming="hf", num_heads=HEADS)
  assert kwargs["num_register_tokens"] == 2 and kwargs["pos_interpolation"] == "antialias"
  reg_vit = load(ViT, params, **kwargs)
  x = _images(224, seed=4)
  with torch.no_grad():
    ref = model(nchw(x), output_hidden_states=True)
  np.testing.assert_allclose(np.asarray(_run(reg_vit, jnp.asarray(x), tap_layer=TAP)),
                             ref.hidden_states[TAP + 1][:, 3:].numpy(), rtol=0, atol=F32_ATOL)
  np.testing.assert_allclose(np.asarray(_run(reg_vit, jnp.asarray(x), final_norm=True)),
                             ref.last_hidden_state[:, 3:].numpy(), rtol=0, atol=F32_ATOL)


@pytest.mark.parametrize("mode", ["hub", "antialias"])
@pytest.mark.parametrize("grid_hw", [(16, 16), (5, 8), (3, 4)])
def test_pos_embed_interpolation_vs_torch(hf, vit, mode, grid_hw):
  """Positional tables vs the hub's scale-factor formula and torch's antialiased bicubic."""
  params = hf[2]
  table = torch.from_numpy(params["pos_embed"])
  patch = table[1:].reshape(1, GRID, GRID, D).permute(0, 3, 1, 2)
  gh, gw = grid_hw
  if mode == "hub":  # dinov2/models/vision_transformer.py, interpolate_offset 0.1
    ref = F.interpolate(patch, scale_factor=((gh + 0.1) / GRID, (gw + 0.1) / GRID),
                        mode="bicubic", antialias=False)
  else:
    ref = F.interpolate(patch, size=(gh, gw), mode="bicubic", antialias=True)
  assert ref.shape[-2:] == (gh, gw)
  ref = torch.cat([table[:1], ref.permute(0, 2, 3, 1).reshape(gh * gw, D)]).numpy()
  got = nnx.jit(lambda m: m._pos_embed(gh, gw))(vit(pos_interpolation=mode))
  np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-6)


def test_preprocess_vs_torch():
  lr = np.random.default_rng(5).uniform(-1.05, 1.05, (2, 100, 76, 3)).astype(np.float32)
  raw = (0.5 * nchw(lr) + 0.5) * 255.0  # the official code's round trip through [0, 255]
  ref = F.interpolate(raw / 255.0, size=448, mode="bicubic", align_corners=False).clamp(0, 1)
  mean, std = (torch.tensor(v)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))
  ref = (ref - mean) / std
  got = np.asarray(jax.jit(preprocess)(jnp.asarray(lr)))
  assert got.shape == (2, 448, 448, 3)
  np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-5)


def test_variants_construct():
  for name, sizes in VARIANTS.items():
    state = nnx.state(abstract(ViT, **sizes), nnx.Param)
    n = sum(math.prod(v.shape) for v in jax.tree.leaves(state))
    if name == "B/14":
      assert n == 86_579_712  # dinov2_vitb14's 86,580,480 less the 768-wide mask_token


def test_bad_inputs(hf, vit):
  sd = hf[1]
  with pytest.raises(KeyError, match="encoder.layer.0.bogus"):
    params_from_torch({**sd, "encoder.layer.0.bogus": sd["layernorm.bias"]}, "hf", num_heads=HEADS)
  with pytest.raises(KeyError, match="blocks.1.ls2.gamma"):
    params_from_torch({k: v for k, v in sd.items() if "layer.1.layer_scale2" not in k}, "hf",
                      num_heads=HEADS)
  with pytest.raises(ValueError, match="blocks.2.mlp.fc1.bias"):
    params_from_torch({**sd, "encoder.layer.2.mlp.fc1.bias": torch.zeros(7)}, "hf", num_heads=HEADS)
  with pytest.raises(KeyError, match="hub state dict lacks 'cls_token'"):
    params_from_torch(sd, "hub")
  with pytest.raises(ValueError, match="multiples of 14"):
    vit()(jnp.zeros((1, 224, 230, 3)), tap_layer=0)
  with pytest.raises(ValueError, match="tap_layer 4"):
    vit()(jnp.zeros((1, 224, 224, 3)), tap_layer=4)
