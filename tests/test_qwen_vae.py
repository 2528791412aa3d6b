"""Qwen-Image 2D VAE: parity with a PyTorch reference written from the official code's description
(docs/official.md §3.3), and the key mapping."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vosr_jax  # noqa: F401  (sets the flax sharding flag)
from vosr_jax.models import qwen_vae

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
import qwen_vae_reference as ref  # noqa: E402  (tests/ is on sys.path under pytest)
from torch_utils import abstract, load, max_err, nchw, nhwc, randomize  # noqa: E402

TINY = qwen_vae.VARIANTS["tiny"]
# Not the Wan-2.1 code defaults, so the tests see which statistics were used.
MEAN = [0.1 * i - 0.8 for i in range(16)]
STD = [0.5 + 0.1 * i for i in range(16)]
CONFIG = dict(TINY, dim_mult=list(TINY["dim_mult"]), attn_scales=[], dropout=0.0,
              latents_mean=MEAN, latents_std=STD, _class_name="AutoencoderKLQwenImage2D")


def _torch_model(seed=0):
  """The tiny reference with every parameter (gamma and biases too) randomised."""
  return randomize(ref.QwenImageVAE2D(TINY["base_dim"], TINY["z_dim"], TINY["dim_mult"],
                                      TINY["num_res_blocks"], MEAN, STD), seed)


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _jax_model(params, model_kwargs, dtype=jnp.float32):
  # Built abstractly and filled with `params`: eager random init of even the tiny model takes ~10 s.
  return load(qwen_vae.QwenImageVAE, params, dtype=dtype, **model_kwargs)


@nnx.jit
def _run(model, images, latents, key):
  """posterior, encode and decode in one compiled program."""
  mean, std = model.posterior(images)
  return mean, std, model.encode(images, key), model.decode(latents)


@pytest.fixture(scope="module")
def pair():
  tmodel = _torch_model()
  params, kwargs = qwen_vae.params_from_torch(tmodel.state_dict(), CONFIG)
  return tmodel, params, kwargs, _jax_model(params, kwargs)


def _inputs():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  latents = rng.normal(size=(2, 8, 8, 16)).astype(np.float32)
  return images, latents


def test_params_layout_matches_nnx_state(pair):
  _, params, kwargs, _ = pair
  model = abstract(qwen_vae.QwenImageVAE, **kwargs)
  want = nnx.state(model, nnx.Param).to_pure_dict()
  assert jax.tree.structure(params) == jax.tree.structure(want)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, want)
  assert kwargs["latents_mean"] == MEAN and kwargs["latents_std"] == STD
  assert model.latent_channels == 16 and model.downsample == 4


def test_matches_torch_reference_float32(pair):
  tmodel, _, _, model = pair
  images, latents = _inputs()
  key = jax.random.key(3)
  noise = jax.random.normal(key, (2, 8, 8, 16), jnp.float32)
  with torch.no_grad():
    mean_t, std_t = tmodel.posterior(nchw(images))
    want = (mean_t, std_t, tmodel.normalize(mean_t + std_t * nchw(noise)),
            tmodel.decode(nchw(latents)))
  got = _run(model, jnp.asarray(images), jnp.asarray(latents), key)
  # Measured on CPU: max abs err 1.4e-6 (mean), 1.7e-6 (std), 2.4e-6 (encode, values up to 9.6),
  # 1.8e-6 (decode).
  for name, g, w in zip(("mean", "std", "encode", "decode"), got, want):
    err = max_err(g, nhwc(w))
    assert err <= 1e-5, (name, err)
  # The check is not vacuous: the decoded image is not saturated by the clamp.
  assert np.mean(np.abs(np.asarray(got[3])) < 1) > 0.2


def test_load_folder_roundtrip_and_latent_statistics(pair, tmp_path):
  tmodel, params, _, _ = pair
  safetensors_torch.save_file(tmodel.state_dict(), str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(CONFIG))
  loaded, kwargs = qwen_vae.load_folder(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  images, latents = _inputs()
  key = jax.random.key(0)
  mean, std, lat, _ = _run(_jax_model(loaded, kwargs), jnp.asarray(images),
                                jnp.asarray(latents), key)
  # encode normalises with the config's latents_mean / latents_std, not the code defaults.
  sample = mean + std * jax.random.normal(key, mean.shape)
  want = (sample - jnp.asarray(MEAN)) / jnp.asarray(STD)
  np.testing.assert_allclose(lat, want, rtol=1e-6, atol=1e-6)


def test_load_folder_bfloat16_shards(pair, tmp_path):
  tmodel, params, _, _ = pair
  sd = {k: v.to(torch.bfloat16) for k, v in tmodel.state_dict().items()}
  keys = sorted(sd)
  safetensors_torch.save_file({k: sd[k] for k in keys[::2]}, str(tmp_path / "a.safetensors"))
  safetensors_torch.save_file({k: sd[k] for k in keys[1::2]}, str(tmp_path / "b.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(CONFIG))
  loaded, _ = qwen_vae.load_folder(str(tmp_path))
  # bf16 keeps 8 mantissa bits: relative error <= 2**-9.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2 ** -8, atol=0), loaded, params)


def test_load_folder_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    qwen_vae.load_folder(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(CONFIG))
  with pytest.raises(FileNotFoundError, match="safetensors"):
    qwen_vae.load_folder(str(tmp_path))


def test_bad_state_dicts_name_the_key(pair):
  tmodel = pair[0]
  sd = _state_dict(tmodel)
  missing = dict(sd)
  del missing["decoder.up_blocks.0.upsamplers.0.resample.1.weight"]
  with pytest.raises(KeyError, match=r"decoder\.up_blocks\.0\.upsamplers\.0\.resample\.1\.weight"):
    qwen_vae.params_from_torch(missing, CONFIG)
  with pytest.raises(KeyError, match=r"encoder\.extra\.weight"):
    qwen_vae.params_from_torch(dict(sd, **{"encoder.extra.weight": np.zeros(1)}), CONFIG)
  bad = dict(sd, **{"encoder.conv_in.weight": np.zeros((8, 3, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight"):
    qwen_vae.params_from_torch(bad, CONFIG)
  bad = dict(sd, **{"decoder.norm_out.gamma": np.ones((9, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"decoder\.norm_out\.gamma"):
    qwen_vae.params_from_torch(bad, CONFIG)
  # The 3D (video) layout of gamma, (C, 1, 1, 1), is accepted.
  video = dict(sd, **{"decoder.norm_out.gamma": sd["decoder.norm_out.gamma"][..., None]})
  params, _ = qwen_vae.params_from_torch(video, CONFIG)
  np.testing.assert_array_equal(params["decoder"]["norm_out"]["gamma"],
                                sd["decoder.norm_out.gamma"].reshape(-1))


def test_bfloat16_close_to_float32(pair):
  _, params, kwargs, model = pair
  images, latents = (jnp.asarray(a) for a in _inputs())
  key = jax.random.key(0)
  got = _run(_jax_model(params, kwargs, dtype=jnp.bfloat16), images, latents, key)
  want = _run(model, images, latents, key)
  assert all(g.dtype == jnp.float32 for g in got)
  # Measured (random weights, ~20 layers): max abs err 0.026 (mean, values up to 2.8), 0.032
  # (std), 0.088 (encode, up to 11), 0.034 (decode); mean abs err <= 0.0057 on each.
  for name, g, w in zip(("mean", "std", "encode", "decode"), got, want):
    scale = max(float(jnp.max(jnp.abs(w))), 1.0)
    assert max_err(g, w) <= 0.15 * scale, name
    assert float(jnp.mean(jnp.abs(g - w))) <= 0.02 * scale, name


def test_full_size_keys_and_shapes_match_reference():
  """The qwen2d key set and shapes equal the reference's (no weights are materialised)."""
  with torch.device("meta"):
    tmodel = ref.QwenImageVAE2D(96, 16, (1, 2, 4, 4), 2, qwen_vae.WAN21_LATENTS_MEAN,
                                qwen_vae.WAN21_LATENTS_STD)
  sd = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in tmodel.state_dict().items()}
  assert sd["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"].shape == (384, 192, 1, 1)
  assert sd["decoder.up_blocks.0.upsamplers.0.resample.1.weight"].shape == (192, 384, 3, 3)
  assert sd["encoder.down_blocks.10.conv2.weight"].shape == (384, 384, 3, 3)
  params, kwargs = qwen_vae.params_from_torch(sd, {})
  assert kwargs["latents_mean"] == list(qwen_vae.WAN21_LATENTS_MEAN)
  assert len(params["encoder"]["down_blocks"]) == 11
  first = params["decoder"]["up_blocks"][1]["resnets"][0]
  assert first["conv1"]["kernel"].shape == (3, 3, 192, 384)
  model = abstract(qwen_vae.QwenImageVAE)
  assert model.latent_channels == 16 and model.downsample == 8
