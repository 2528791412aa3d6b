"""Autoencoders against diffusers (float32 reference, every parameter randomised)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.models.autoencoders.vae import Decoder as TorchDecoder
from flax import nnx

from torch_utils import abstract, load, max_err, nchw, nhwc, randomize
from vosr_jax.models import vae

TOL = 1e-5  # max abs error vs diffusers in float32; measured <= 2e-6 on CPU.
KL_CONFIG = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8)
LIGHT_CONFIG = dict(in_channels=4, out_channels=3, block_out_channels=(32, 32, 64),
                    layers_per_block=2)


@pytest.fixture(scope="module")
def kl():
  torch_vae = randomize(TorchAutoencoderKL(
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      latent_channels=4, **KL_CONFIG), seed=0)
  params, kwargs = vae.params_from_diffusers(torch_vae.state_dict(), norm_num_groups=8)
  return torch_vae, params, kwargs


@pytest.fixture(scope="module")
def light():
  torch_dec = randomize(TorchDecoder(up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32,
                                      **LIGHT_CONFIG), seed=1)
  checkpoint = {"config": dict(LIGHT_CONFIG), "model_state_dict": torch_dec.state_dict()}
  params, kwargs = vae.light_decoder_params_from_torch(checkpoint)
  return torch_dec, checkpoint, params, kwargs


def _images(seed=0, size=32):
  return np.random.default_rng(seed).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)


def test_params_layout_and_axes(kl):
  _, params, kwargs = kl
  assert kwargs == dict(in_channels=3, out_channels=3, latent_channels=4, **KL_CONFIG)
  model = abstract(vae.AutoencoderKL, **kwargs)
  expected = nnx.state(model, nnx.Param).to_pure_dict()
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, expected)
  meta = lambda v: v.get_metadata()["out_sharding"]
  assert meta(model.encoder.conv_in.kernel) == (None, None, "conv_in", "conv_out")
  assert meta(model.decoder.mid_block.attention.to_q.kernel) == ("conv_in", "conv_out")
  assert meta(model.decoder.conv_norm_out.scale) == ("norm",)


def test_kl_matches_diffusers(kl):
  torch_vae, params, kwargs = kl
  model = load(vae.AutoencoderKL, params, **kwargs)
  x = _images()
  mean, std = jax.jit(lambda x: model.posterior(x))(x)
  z = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  out = jax.jit(model.decode)(z)
  with torch.no_grad():
    dist = torch_vae.encode(nchw(x)).latent_dist
    ref_out = torch_vae.decode(nchw(z)).sample
  assert mean.shape == (2, 16, 16, 4) and out.shape == (2, 16, 16, 3)
  # The posterior std must not be degenerate for the comparison to mean anything.
  assert 0.1 < float(jnp.mean(std)) < 10
  assert max_err(mean, nhwc(dist.mean)) <= TOL
  assert max_err(std, nhwc(dist.std)) <= TOL
  assert max_err(out, nhwc(ref_out)) <= TOL


def test_light_decoder_matches_torch(light):
  torch_dec, _, params, kwargs = light
  assert kwargs == dict(norm_num_groups=32, **LIGHT_CONFIG)
  model = load(vae.LightDecoder, params, **kwargs)
  z = np.random.default_rng(2).normal(size=(1, 8, 8, 4)).astype(np.float32)
  out = jax.jit(lambda z: model(z))(z)
  with torch.no_grad():
    ref = nhwc(torch_dec(nchw(z)))
  assert out.shape == (1, 32, 32, 3)
  assert max_err(out, ref) <= TOL


def test_light_decoder_ignores_and_logs_extra_config_keys(light, caplog):
  """The official loader builds the module from the four size keys and ignores the rest."""
  _, checkpoint, params, kwargs = light
  extra = {**checkpoint, "config": {**checkpoint["config"], "scaling_factor": 0.18215,
                                    "act_fn": "silu"}}
  with caplog.at_level("WARNING"):
    got, got_kwargs = vae.light_decoder_params_from_torch(extra)
  assert got_kwargs == kwargs
  jax.tree.map(np.testing.assert_array_equal, got, params)
  assert "['act_fn', 'scaling_factor'] ignored" in caplog.text


def test_sd_autoencoder_interface(kl, light):
  """encode = (mean + std * normal(key)) * 0.18215 under jit with the state as an argument;
  decode divides by the factor, uses the LightDecoder when given, and clamps to [-1, 1]."""
  torch_vae, params, kwargs = kl
  torch_dec, _, light_params, light_kwargs = light
  kl_model = load(vae.AutoencoderKL, params, **kwargs)
  ae = vae.SDAutoencoder(kl_model)
  assert (ae.latent_channels, ae.downsample) == (4, 2)
  graphdef, state = nnx.split(ae)
  x, key = _images(3), jax.random.key(7)
  encode = jax.jit(lambda s, x, k: nnx.merge(graphdef, s).encode(x, k))
  latents = encode(state, x, key)
  mean, std = jax.jit(lambda x: kl_model.posterior(x))(x)
  noise = jax.random.normal(key, mean.shape, jnp.float32)
  assert latents.dtype == jnp.float32
  assert max_err(latents, (mean + std * noise) * vae.SD_SCALING_FACTOR) <= TOL
  assert max_err(encode(state, x, jax.random.key(8)), latents) > 1e-3  # the key matters

  z = np.random.default_rng(4).normal(size=(2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    ref_kl = nhwc(torch_vae.decode(nchw(z)).sample.clamp(-1, 1))
    ref_light = nhwc(torch_dec(nchw(z)).clamp(-1, 1))
  assert np.mean(np.abs(ref_kl) == 1) > 0.01  # the clamp is exercised
  scaled = z * vae.SD_SCALING_FACTOR
  assert max_err(jax.jit(ae.decode)(scaled), ref_kl) <= TOL
  ae_light = vae.SDAutoencoder(kl_model, load(vae.LightDecoder, light_params, **light_kwargs))
  assert max_err(jax.jit(ae_light.decode)(scaled), ref_light) <= TOL


def test_bfloat16_stays_close(kl):
  """bf16 compute (params f32, norms/softmax f32): measured max abs err ~0.02 on O(1) outputs."""
  _, params, kwargs = kl
  f32 = load(vae.AutoencoderKL, params, **kwargs)
  bf16 = load(vae.AutoencoderKL, params, dtype=jnp.bfloat16, **kwargs)
  x = _images(5)
  z = np.random.default_rng(6).normal(size=(2, 8, 8, 4)).astype(np.float32)
  mean32, std32 = jax.jit(lambda x: f32.posterior(x))(x)
  mean16, std16 = jax.jit(lambda x: bf16.posterior(x))(x)
  out16 = jax.jit(bf16.decode)(z)
  assert mean16.dtype == jnp.float32 and out16.dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(mean32)))
  assert max_err(mean16, mean32) <= 0.05 * scale
  assert max_err(std16, std32) <= 0.05 * float(jnp.max(std32))
  out32 = jax.jit(f32.decode)(z)
  assert max_err(out16, out32) <= 0.05 * float(jnp.max(jnp.abs(out32)))


def test_pixel_autoencoder_is_identity():
  ae = vae.PixelAutoencoder()
  assert (ae.latent_channels, ae.downsample) == (3, 1)
  graphdef, state = nnx.split(ae)
  assert not jax.tree.leaves(state)
  x = _images(7, size=16)
  encode = jax.jit(lambda s, x, k: nnx.merge(graphdef, s).encode(x, k))
  latents = encode(state, x, jax.random.key(0))
  np.testing.assert_array_equal(latents, x)
  np.testing.assert_array_equal(ae.decode(latents), x)
  np.testing.assert_array_equal(ae.decode(jnp.full((1, 2, 2, 3), 3.0)), jnp.ones((1, 2, 2, 3)))


def test_old_attention_names(kl):
  torch_vae, params, _ = kl
  old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  state_dict = {}
  for key, value in torch_vae.state_dict().items():
    for new, old in old_names.items():
      key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    state_dict[key] = value
  assert "decoder.mid_block.attentions.0.proj_attn.weight" in state_dict
  old_params, _ = vae.params_from_diffusers(state_dict, norm_num_groups=8)
  jax.tree.map(np.testing.assert_array_equal, old_params, params)


def test_bad_state_dicts_name_the_key(kl, light):
  torch_vae, _, _ = kl
  good = dict(torch_vae.state_dict())
  missing = {k: v for k, v in good.items() if k != "decoder.mid_block.attentions.0.to_k.bias"}
  with pytest.raises(KeyError, match=r"decoder\.mid_block\.attentions\.0\.to_k\.bias"):
    vae.params_from_diffusers(missing, norm_num_groups=8)
  with pytest.raises(KeyError, match=r"encoder\.extra\.weight"):
    vae.params_from_diffusers({**good, "encoder.extra.weight": torch.zeros(1)}, norm_num_groups=8)
  bad_shape = {**good, "encoder.mid_block.resnets.1.conv2.weight": torch.zeros(64, 64, 1, 1)}
  with pytest.raises(ValueError, match=r"encoder\.mid_block\.resnets\.1\.conv2\.weight"):
    vae.params_from_diffusers(bad_shape, norm_num_groups=8)

  _, checkpoint, _, _ = light
  no_config_key = {**checkpoint, "config": {k: v for k, v in checkpoint["config"].items()
                                            if k != "layers_per_block"}}
  with pytest.raises(KeyError, match="layers_per_block"):
    vae.light_decoder_params_from_torch(no_config_key)
  extra = {**checkpoint, "model_state_dict": {**checkpoint["model_state_dict"],
                                              "decoder.conv_in.weight": torch.zeros(1)}}
  with pytest.raises(KeyError, match=r"decoder\.conv_in\.weight"):
    vae.light_decoder_params_from_torch(extra)


@pytest.mark.parametrize("variant", ["sd21", "light"])
def test_variant_sizes_match_diffusers(variant):
  """Full-size variants have diffusers' parameter sizes (83,653,863 for sd21); torch builds on the
  meta device, so nothing is allocated."""
  kwargs = vae.VARIANTS[variant]
  blocks = len(kwargs["block_out_channels"])
  with torch.device("meta"):
    if variant == "sd21":
      ref = TorchAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks,
                               up_block_types=("UpDecoderBlock2D",) * blocks, **kwargs)
    else:
      ref = TorchDecoder(in_channels=4, out_channels=3,
                         up_block_types=("UpDecoderBlock2D",) * blocks, **kwargs)
  cls = vae.AutoencoderKL if variant == "sd21" else vae.LightDecoder
  model = abstract(cls, **kwargs)
  shapes = sorted(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert shapes == sorted(p.numel() for p in ref.parameters())
