"""The Qwen-Image 2D VAE of VOSR-1.4B (docs/official.md §3.3), with the official-checkpoint
mapping.

Images are NHWC in [-1, 1]; latents are NHWC with `latent_channels` (16) channels at 1/`downsample`
(1/8) of the image resolution, normalised with the folder's `latents_mean` / `latents_std`:
  encode: latents = (posterior sample - latents_mean) / latents_std
  decode: images = clamp(decoder(post_quant_conv(latents * latents_std + latents_mean)), -1, 1)

Parameters are named after the official PyTorch modules (`encoder.down_blocks.{i}`, `mid_block.
resnets.{i}`, `up_blocks.{i}.upsamplers.0`, ...), so `params_from_torch` is a transpose per tensor
plus one rename: a resampler's conv is `conv` here and `resample.1` there (`resample.0` is the
parameter-free zero pad or nearest upsampling).

The encoder starts with `encoder.conv_in` (3x3, 3 -> base_dim) before its `down_blocks`
(docs/official.md §3.3; diffusers' Qwen-Image/Wan encoders have it too). Differences from the
official code: none in what is computed; `attn_scales` must be empty and `dropout` zero (the
released configuration; this port is a frozen autoencoder). The tiny model's random init is slow
eagerly: build large ones with `nnx.eval_shape` and fill them from `params_from_torch` /
`load_folder`.
"""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.flax import load_file

from vosr_jax.models.layers import conv, dot_product_attention, init_with_axes, to_numpy

# Code defaults of latents_mean / latents_std (the Wan-2.1 constants); checkpoints override them
# through their config.json.
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

VARIANTS = {
    "qwen2d": dict(base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2),
    # For tests: three levels (downsample 4), so the decoder has the 8 -> 16 first resnet after an
    # upsampler, like 192 -> 384 in the full model.
    "tiny": dict(base_dim=8, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1),
}

# The constructor arguments read from a diffusers-style config.json (other entries are ignored).
CONFIG_KEYS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "dropout",
               "latents_mean", "latents_std")


class RMSNorm2D(nnx.Module):
  """`x / max(||x||_2 over channels, 1e-12) * sqrt(dim) * gamma` (an L2 norm, not an RMS)."""

  def __init__(self, dim, *, dtype, param_dtype):
    self.gamma = nnx.Param(init_with_axes(nnx.initializers.ones, "norm")(None, (dim,), param_dtype))
    self.scale = float(dim) ** 0.5
    self.dtype = dtype

  def __call__(self, x):
    """x: (B, H, W, dim) -> same shape in the compute dtype; computed in float32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    y = x / jnp.maximum(norm, 1e-12) * self.scale * self.gamma[...].astype(jnp.float32)
    return y.astype(self.dtype)


class ResidualBlock2D(nnx.Module):
  """`shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`.

  The shortcut is the identity, or the 1x1 `conv_shortcut` when cin != cout.
  """

  def __init__(self, cin, cout, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = RMSNorm2D(cin, **kw)
    self.conv1 = conv(cin, cout, 3, rngs=rngs, **kw)
    self.norm2 = RMSNorm2D(cout, **kw)
    self.conv2 = conv(cout, cout, 3, rngs=rngs, **kw)
    self.conv_shortcut = conv(cin, cout, 1, rngs=rngs, **kw) if cin != cout else None

  def __call__(self, x):
    """x: (B, H, W, cin) -> (B, H, W, cout)."""
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock2D(nnx.Module):
  """Single-head self-attention over the H*W positions (feature size dim, scale dim**-0.5)."""

  def __init__(self, dim, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm = RMSNorm2D(dim, **kw)
    self.to_qkv = conv(dim, 3 * dim, 1, rngs=rngs, **kw)
    self.proj = conv(dim, dim, 1, rngs=rngs, **kw)

  def __call__(self, x):
    """x: (B, H, W, dim) -> same shape (residual added)."""
    b, h, w, c = x.shape
    # The official code reads the 3*dim output channels as [q | k | v], dim consecutive each.
    qkv = self.to_qkv(self.norm(x)).reshape(b, h * w, 3, 1, c)
    y = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return x + self.proj(y.reshape(b, h, w, c))


class Resample2D(nnx.Module):
  """Down: zero pad right/bottom by 1, 3x3 conv stride 2 (dim -> dim).

  Up: nearest x2, 3x3 conv (dim -> dim // 2). The conv is the official `resample.1`.
  """

  def __init__(self, dim, mode, *, dtype, param_dtype, rngs):
    if mode not in ("down", "up"):
      raise ValueError(f"Resample2D mode must be 'down' or 'up', got {mode!r}.")
    self.mode = mode
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if mode == "down":
      self.conv = conv(dim, dim, 3, strides=2, padding="VALID", **kw)
    else:
      self.conv = conv(dim, dim // 2, 3, **kw)

  def __call__(self, x):
    """x: (B, H, W, dim) -> (B, H/2, W/2, dim) (down) or (B, 2H, 2W, dim/2) (up)."""
    if self.mode == "down":
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    else:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class MidBlock(nnx.Module):
  """`resnets.0`, `attentions.0`, `resnets.1`, all at width dim."""

  def __init__(self, dim, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResidualBlock2D(dim, dim, **kw), ResidualBlock2D(dim, dim, **kw)])
    self.attentions = nnx.List([AttentionBlock2D(dim, **kw)])

  def __call__(self, x):
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nnx.Module):
  """Image (B, H, W, 3) -> posterior moments (B, H/d, W/d, 2 * z_dim), d = 2**(levels - 1)."""

  def __init__(self, base_dim, z_dim, dim_mult, num_res_blocks, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dims = [base_dim * m for m in (1, *dim_mult)]
    self.conv_in = conv(3, dims[0], 3, **kw)
    blocks = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(num_res_blocks):
        blocks.append(ResidualBlock2D(cin, cout, **kw))
        cin = cout
      if i != len(dim_mult) - 1:
        blocks.append(Resample2D(cout, "down", **kw))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], **kw)
    self.norm_out = RMSNorm2D(dims[-1], dtype=dtype, param_dtype=param_dtype)
    self.conv_out = conv(dims[-1], 2 * z_dim, 3, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.norm_out(self.mid_block(x))))


class UpBlock(nnx.Module):
  """`resnets` (num_res_blocks + 1; the first cin -> cout) and an optional `upsamplers.0`."""

  def __init__(self, cin, cout, num_res_blocks, upsample, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResidualBlock2D(cin if j == 0 else cout, cout, **kw)
                             for j in range(num_res_blocks + 1)])
    self.upsamplers = nnx.List([Resample2D(cout, "up", **kw)] if upsample else [])

  def __call__(self, x):
    for block in (*self.resnets, *self.upsamplers):
      x = block(x)
    return x


class Decoder(nnx.Module):
  """Latent (B, h, w, z_dim) -> image (B, h*d, w*d, 3), not clamped."""

  def __init__(self, base_dim, z_dim, dim_mult, num_res_blocks, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dims = [base_dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
    self.conv_in = conv(z_dim, dims[0], 3, **kw)
    self.mid_block = MidBlock(dims[0], **kw)
    blocks = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
      # Every upsampler halves the channels, so later levels start from half the previous width.
      blocks.append(UpBlock(cin if i == 0 else cin // 2, cout, num_res_blocks,
                            upsample=i != len(dim_mult) - 1, **kw))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm2D(dims[-1], dtype=dtype, param_dtype=param_dtype)
    self.conv_out = conv(dims[-1], 3, 3, **kw)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


class QwenImageVAE(nnx.Module):
  """The Qwen-Image 2D VAE as a frozen autoencoder: `encode`, `decode`, `posterior`.

  Attributes:
    latent_channels: z_dim (16).
    downsample: spatial reduction factor, 2**(len(dim_mult) - 1) (8).
  """

  def __init__(self, *, base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
               attn_scales=(), dropout=0.0, latents_mean=WAN21_LATENTS_MEAN,
               latents_std=WAN21_LATENTS_STD, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs):
    """Args:
      base_dim, z_dim, dim_mult, num_res_blocks: the official config entries.
      attn_scales: must be empty (the released model has no attention outside the mid blocks).
      dropout: must be 0.
      latents_mean, latents_std: z_dim floats each, normalising the latents.
      dtype: compute dtype; parameters are `param_dtype`; norms, softmax and the posterior run in
        float32.
      rngs: nnx.Rngs for the (random) initial parameters.
    """
    if list(attn_scales):
      raise ValueError(f"QwenImageVAE: attn_scales must be empty (the released 2D VAE), got "
                       f"{attn_scales!r}.")
    if dropout != 0:
      raise ValueError(f"QwenImageVAE: dropout must be 0 (frozen autoencoder), got {dropout!r}.")
    for name, value in (("latents_mean", latents_mean), ("latents_std", latents_std)):
      if len(value) != z_dim:
        raise ValueError(f"QwenImageVAE: {name} needs z_dim={z_dim} values, got {len(value)}.")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder = Encoder(base_dim, z_dim, tuple(dim_mult), num_res_blocks, **kw)
    self.quant_conv = conv(2 * z_dim, 2 * z_dim, 1, **kw)
    self.post_quant_conv = conv(z_dim, z_dim, 1, **kw)
    self.decoder = Decoder(base_dim, z_dim, tuple(dim_mult), num_res_blocks, **kw)
    self.latents_mean = tuple(float(v) for v in latents_mean)
    self.latents_std = tuple(float(v) for v in latents_std)
    self.latent_channels = z_dim
    self.downsample = 2 ** (len(dim_mult) - 1)
    self.dtype = dtype

  def posterior(self, images):
    """Posterior moments of the diagonal Gaussian, before latent normalisation.

    Args:
      images: (B, H, W, 3) in [-1, 1]; H and W multiples of `downsample`.
    Returns:
      (mean, std), each (B, H/8, W/8, 16) float32; std = exp(0.5 * clip(logvar, -30, 20)).
    """
    moments = self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

  def encode(self, images, key):
    """Normalised latents (posterior sample - latents_mean) / latents_std.

    Args:
      images: (B, H, W, 3) in [-1, 1].
      key: PRNG key for the posterior sample.
    Returns:
      (B, H/8, W/8, 16) float32.
    """
    mean, std = self.posterior(images)
    sample = mean + std * jax.random.normal(key, mean.shape, jnp.float32)
    # The official code stores the reciprocal of latents_std and multiplies by it.
    inv_std = 1.0 / jnp.asarray(self.latents_std, jnp.float32)
    return (sample - jnp.asarray(self.latents_mean, jnp.float32)) * inv_std

  def decode(self, latents):
    """Images from normalised latents.

    Args:
      latents: (B, h, w, 16).
    Returns:
      (B, 8h, 8w, 3) float32 in [-1, 1].
    """
    z = (latents.astype(jnp.float32) * jnp.asarray(self.latents_std, jnp.float32)
         + jnp.asarray(self.latents_mean, jnp.float32))
    x = self.decoder(self.post_quant_conv(z.astype(self.dtype)))
    return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)


def model_kwargs_from_config(config):
  """The QwenImageVAE constructor arguments (JSON-able) of a parsed diffusers config.json dict.

  Entries missing from `config` take the code defaults (VARIANTS["qwen2d"], Wan-2.1 latent stats).
  """
  kwargs = dict(VARIANTS["qwen2d"], attn_scales=(), dropout=0.0,
                latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD)
  kwargs.update({k: config[k] for k in CONFIG_KEYS if k in config})
  return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()}


def _torch_key(path, resample_paths):
  """The official state-dict key of the parameter at nnx path `path`."""
  parts = [str(p) for p in path]
  if tuple(path[:-2]) in resample_paths:
    parts[-2:-1] = ["resample", "1"]
  parts[-1] = {"kernel": "weight"}.get(parts[-1], parts[-1])
  return ".".join(parts)


def _to_jax_layout(name, value, key, expected_shape):
  """Converts one torch tensor to the nnx layout, checking its shape; errors name `key`."""
  value = to_numpy(value)
  if name == "kernel":
    # Conv weight (O, I, kh, kw) -> (kh, kw, I, O).
    want = (expected_shape[3], expected_shape[2], *expected_shape[:2])
    if value.shape != want:
      raise ValueError(f"{key}: expected shape {want}, got {value.shape}.")
    return value.transpose(2, 3, 1, 0)
  if name == "gamma":
    # Stored as (C, 1, 1), or (C, 1, 1, 1) by the 3D (video) code.
    if value.ndim < 1 or value.shape[0] != expected_shape[0] or value.size != expected_shape[0]:
      raise ValueError(f"{key}: expected shape ({expected_shape[0]}, 1, 1), got {value.shape}.")
    return value.reshape(expected_shape)
  if value.shape != tuple(expected_shape):
    raise ValueError(f"{key}: expected shape {tuple(expected_shape)}, got {value.shape}.")
  return value


def params_from_torch(state_dict, config):
  """Maps an official state dict to nnx parameters.

  Args:
    state_dict: {key: array} of the folder's safetensors (numpy, jax or torch arrays of any float
      dtype; NCHW conv weights (O, I, kh, kw), norm `gamma` (C, 1, 1) or (C, 1, 1, 1)).
    config: the parsed config.json (dict); see `model_kwargs_from_config`.
  Returns:
    (params, model_kwargs): params is a nested dict laid out like
    `nnx.state(QwenImageVAE(**model_kwargs, rngs=...), nnx.Param).to_pure_dict()` (float32 numpy);
    model_kwargs is JSON-able.
  Raises:
    KeyError: a key the model needs is missing, or the state dict holds keys the model lacks.
    ValueError: a tensor's shape does not match the config.
  """
  model_kwargs = model_kwargs_from_config(config)
  model = nnx.eval_shape(lambda: QwenImageVAE(**model_kwargs, rngs=nnx.Rngs(0)))
  resample_paths = {tuple(p) for p, node in nnx.iter_graph(model) if isinstance(node, Resample2D)}
  abstract = nnx.state(model, nnx.Param).to_pure_dict()

  used = set()

  def convert(path, leaf):
    names = [p.key for p in path]
    key = _torch_key(names, resample_paths)
    if key not in state_dict:
      raise KeyError(f"Qwen VAE state dict: missing key {key!r} (nnx shape {leaf.shape}).")
    used.add(key)
    return _to_jax_layout(names[-1], state_dict[key], key, leaf.shape)

  params = jax.tree_util.tree_map_with_path(convert, abstract)
  unknown = sorted(set(state_dict) - used)
  if unknown:
    raise KeyError(f"Qwen VAE state dict: {len(unknown)} keys the model does not have, e.g. "
                   f"{unknown[:5]}; check the config (base_dim, dim_mult, num_res_blocks).")
  return params, model_kwargs


def load_folder(path, read_safetensors=load_file):
  """Reads a diffusers-style VAE folder: `config.json` plus `*.safetensors` (shards are merged).

  Args:
    path: folder such as `Qwen-Image-vae-2d`.
    read_safetensors: file -> {key: array} (the flax loader keeps bfloat16 tensors; numpy's
      rejects them).
  Returns:
    (params, model_kwargs) as `params_from_torch`.
  Raises:
    FileNotFoundError: naming the missing config.json or safetensors file.
    ValueError: naming a config.json that is not JSON.
  """
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"Qwen VAE folder: {config_path} not found (expected a diffusers-style "
                            f"folder with config.json and *.safetensors).")
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"Qwen VAE folder: no {os.path.join(path, '*.safetensors')} found.")
  with open(config_path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path}: not valid JSON ({e})") from e
  state_dict = {}
  for file in files:
    state_dict.update(read_safetensors(file))
  return params_from_torch(state_dict, config)
