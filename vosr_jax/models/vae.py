"""Autoencoders: the SD-2.1 KL VAE, the VOSR LightDecoder and the identity "pixel" autoencoder.

The autoencoder interface (shared with `vosr_jax.models.qwen_vae`):

  An autoencoder is an `nnx.Module` with
    encode(images, key) -> latents   images (B, H, W, 3) in [-1, 1]; latents (B, H/d, W/d, C)
                                     float32, already normalised for the denoiser (for KL VAEs a
                                     posterior SAMPLE drawn with `key`, then scaled/normalised).
    decode(latents) -> images        the inverse; images float32 (B, H, W, 3) clamped to [-1, 1].
    latent_channels: int             C (4 for SD, 16 for Qwen, 3 for pixel).
    downsample: int                  d, the spatial factor between images and latents (8 or 1).
  H and W must be multiples of `downsample`. The weights are frozen. To pass them into a jitted
  function as an argument (never as closed-over constants), split outside and merge inside:

    graphdef, state = nnx.split(autoencoder)
    @jax.jit
    def step(state, images, key):
      latents = nnx.merge(graphdef, state).encode(images, key)

  `PixelAutoencoder` has no parameters, so its state is empty and the same code works unchanged.

Building blocks follow diffusers 0.42 (`Encoder`, `Decoder`, `UNetMidBlock2D`, `ResnetBlock2D`,
`Downsample2D`, `Upsample2D`, the deprecated-attention-block `Attention`) in NHWC with HWIO conv
kernels. Parameters are float32; `dtype` is the compute dtype; GroupNorm and softmax run in float32.
The module tree mirrors the diffusers state-dict names (`down_blocks.0.resnets.1.norm1`), except
that single-element lists are plain attributes (`downsamplers.0` -> `downsampler`, `upsamplers.0` ->
`upsampler`, `attentions.0` -> `attention`, `to_out.0` -> `to_out`) and torch `weight` is `kernel`
(conv, linear) or `scale` (norm). Logical axes: conv and attention kernels (.., 'conv_in',
'conv_out'), their biases ('conv_out',), norm parameters ('norm',).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from vosr_jax.models.layers import conv, init_with_axes, linear, to_numpy

SD_SCALING_FACTOR = 0.18215  # diffusers config of stabilityai/stable-diffusion-2-1(-base)/vae.

# Constructor arguments shared by `AutoencoderKL` and `LightDecoder` (both default to 4 latent
# channels; the SD latents are scaled by SD_SCALING_FACTOR in `SDAutoencoder`).
VARIANTS = {
    "sd21": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
    "light": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2),
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1),
}

_EPS = 1e-6  # every GroupNorm in the SD VAE and the LightDecoder.


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm on NHWC: statistics over (H, W, channels of a group), biased variance."""

  def __init__(self, channels, num_groups=32, eps=_EPS, *, dtype=jnp.float32, rngs):
    if channels % num_groups:
      raise ValueError(f"GroupNorm: {channels} channels are not divisible by {num_groups} groups.")
    self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
    key = rngs.params()
    self.scale = nnx.Param(init_with_axes(nnx.initializers.ones, "norm")(key, (channels,)))
    self.bias = nnx.Param(init_with_axes(nnx.initializers.zeros, "norm")(key, (channels,)))

  def __call__(self, x):
    """x: (B, H, W, C) -> (B, H, W, C) in `dtype`; computed in float32."""
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class ResnetBlock2D(nnx.Module):
  """diffusers ResnetBlock2D without time embedding.

  Computes shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))); the shortcut is a 1x1 conv
  when the channel count changes, else the identity.
  """

  def __init__(self, cin, cout, num_groups, *, dtype, rngs):
    self.norm1 = GroupNorm(cin, num_groups, dtype=dtype, rngs=rngs)
    self.conv1 = conv(cin, cout, 3, dtype=dtype, rngs=rngs)
    self.norm2 = GroupNorm(cout, num_groups, dtype=dtype, rngs=rngs)
    self.conv2 = conv(cout, cout, 3, dtype=dtype, rngs=rngs)
    self.conv_shortcut = conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nnx.Module):
  """The VAE mid-block attention: single head of width C over the H*W tokens, plus a residual."""

  def __init__(self, channels, num_groups, *, dtype, rngs):
    self.dtype = dtype
    self.group_norm = GroupNorm(channels, num_groups, dtype=dtype, rngs=rngs)
    kw = dict(axes=("conv_in", "conv_out"), dtype=dtype, rngs=rngs,
              init=nnx.initializers.lecun_normal())
    self.to_q = linear(channels, channels, **kw)
    self.to_k = linear(channels, channels, **kw)
    self.to_v = linear(channels, channels, **kw)
    self.to_out = linear(channels, channels, **kw)

  def __call__(self, x):
    """x: (B, H, W, C) -> (B, H, W, C). Logits and softmax in float32, scale C**-0.5."""
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c**-0.5
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = self.to_out(jnp.einsum("bqk,bkc->bqc", probs, v))
    return x + out.reshape(b, h, w, c)


class Downsample(nnx.Module):
  """diffusers Downsample2D(padding=0): zero-pad right and bottom by 1, then conv 3x3 stride 2."""

  def __init__(self, channels, *, dtype, rngs):
    self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs, strides=2,
                     padding=((0, 1), (0, 1)))

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  """diffusers Upsample2D: nearest-neighbour x2, then conv 3x3."""

  def __init__(self, channels, *, dtype, rngs):
    self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class _Blocks(nnx.Module):
  """A diffusers DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional resampler."""

  def __init__(self, cin, cout, num_layers, num_groups, resample, *, dtype, rngs):
    self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, num_groups, dtype=dtype,
                                           rngs=rngs) for i in range(num_layers)])
    self.downsampler = Downsample(cout, dtype=dtype, rngs=rngs) if resample == "down" else None
    self.upsampler = Upsample(cout, dtype=dtype, rngs=rngs) if resample == "up" else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.downsampler is not None:
      x = self.downsampler(x)
    if self.upsampler is not None:
      x = self.upsampler(x)
    return x


class MidBlock(nnx.Module):
  """diffusers UNetMidBlock2D without time embedding: resnet, attention, resnet."""

  def __init__(self, channels, num_groups, *, dtype, rngs):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, num_groups, dtype=dtype, rngs=rngs)
                             for _ in range(2)])
    self.attention = Attention(channels, num_groups, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.resnets[1](self.attention(self.resnets[0](x)))


class KLEncoder(nnx.Module):
  """diffusers `Encoder` (DownEncoderBlock2D blocks); downsamples by 2**(len(blocks) - 1)."""

  def __init__(self, in_channels=3, latent_channels=4, block_out_channels=(64,), layers_per_block=2,
               norm_num_groups=32, double_z=True, *, dtype=jnp.float32, rngs):
    chans = tuple(block_out_channels)
    self.conv_in = conv(in_channels, chans[0], 3, dtype=dtype, rngs=rngs)
    self.down_blocks = nnx.List([
        _Blocks(chans[max(i - 1, 0)], c, layers_per_block, norm_num_groups,
                "down" if i < len(chans) - 1 else None, dtype=dtype, rngs=rngs)
        for i, c in enumerate(chans)])
    self.mid_block = MidBlock(chans[-1], norm_num_groups, dtype=dtype, rngs=rngs)
    self.conv_norm_out = GroupNorm(chans[-1], norm_num_groups, dtype=dtype, rngs=rngs)
    self.conv_out = conv(chans[-1], 2 * latent_channels if double_z else latent_channels, 3,
                         dtype=dtype, rngs=rngs)

  def __call__(self, x):
    """x: (B, H, W, in_channels) -> (B, H/d, W/d, 2*latent_channels if double_z else latent)."""
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class KLDecoder(nnx.Module):
  """diffusers `Decoder` (UpDecoderBlock2D blocks, layers_per_block + 1 resnets each)."""

  def __init__(self, in_channels=4, out_channels=3, block_out_channels=(64,), layers_per_block=2,
               norm_num_groups=32, *, dtype=jnp.float32, rngs):
    rev = tuple(reversed(block_out_channels))
    self.conv_in = conv(in_channels, rev[0], 3, dtype=dtype, rngs=rngs)
    self.mid_block = MidBlock(rev[0], norm_num_groups, dtype=dtype, rngs=rngs)
    self.up_blocks = nnx.List([
        _Blocks(rev[max(i - 1, 0)], c, layers_per_block + 1, norm_num_groups,
                "up" if i < len(rev) - 1 else None, dtype=dtype, rngs=rngs)
        for i, c in enumerate(rev)])
    self.conv_norm_out = GroupNorm(rev[-1], norm_num_groups, dtype=dtype, rngs=rngs)
    self.conv_out = conv(rev[-1], out_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, z):
    """z: (B, h, w, in_channels) -> (B, h*d, w*d, out_channels), not clamped."""
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class LightDecoder(KLDecoder):
  """VOSR LightDecoder (docs/official.md §3.2): the SD decoder topology with its own channels.

  Defaults are the official `sd21_lwdecoder.pth` config: in 4, out 3, block_out_channels
  (64, 128, 256, 256), layers_per_block 2, GroupNorm 32 groups with eps 1e-6, SiLU. Unlike
  `AutoencoderKL.decode` it has NO post_quant_conv: it maps unscaled SD latents straight to pixels.
  """

  def __init__(self, in_channels=4, out_channels=3, block_out_channels=(64, 128, 256, 256),
               layers_per_block=2, norm_num_groups=32, *, dtype=jnp.float32, rngs):
    super().__init__(in_channels, out_channels, block_out_channels, layers_per_block,
                     norm_num_groups, dtype=dtype, rngs=rngs)


class AutoencoderKL(nnx.Module):
  """diffusers AutoencoderKL: encoder + quant_conv, post_quant_conv + decoder."""

  def __init__(self, in_channels=3, out_channels=3, latent_channels=4,
               block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, *,
               dtype=jnp.float32, rngs):
    self.encoder = KLEncoder(in_channels, latent_channels, block_out_channels, layers_per_block,
                             norm_num_groups, dtype=dtype, rngs=rngs)
    self.quant_conv = conv(2 * latent_channels, 2 * latent_channels, 1, dtype=dtype, rngs=rngs)
    self.post_quant_conv = conv(latent_channels, latent_channels, 1, dtype=dtype, rngs=rngs)
    self.decoder = KLDecoder(latent_channels, out_channels, block_out_channels, layers_per_block,
                             norm_num_groups, dtype=dtype, rngs=rngs)

  def posterior(self, x):
    """x: (B, H, W, 3) in [-1, 1] -> (mean, std), each float32 (B, H/d, W/d, latent_channels).

    std = exp(0.5 * clip(logvar, -30, 20)), as diffusers' DiagonalGaussianDistribution.
    """
    moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

  def decode(self, z):
    """z: unscaled latents (B, h, w, latent_channels) -> (B, h*d, w*d, 3), not clamped."""
    return self.decoder(self.post_quant_conv(z))


class SDAutoencoder(nnx.Module):
  """The SD-2.1 autoencoder behind the module interface (see the module docstring).

  encode: posterior sample * scaling_factor. decode: latents / scaling_factor through the
  LightDecoder when one is given (what official inference does), else through the full KL decoder
  with post_quant_conv (official training-time eval); clamped to [-1, 1].
  """

  def __init__(self, vae: AutoencoderKL, light_decoder: LightDecoder | None = None,
               scaling_factor=SD_SCALING_FACTOR):
    self.vae = vae
    self.light_decoder = light_decoder
    self.scaling_factor = scaling_factor
    self.latent_channels = vae.post_quant_conv.in_features
    self.downsample = 2 ** (len(vae.encoder.down_blocks) - 1)

  def encode(self, images, key):
    """images (B, H, W, 3) in [-1, 1] -> float32 latents (B, H/d, W/d, C); d = 8, C = 4 for SD.

    latents = (mean + std * jax.random.normal(key, mean.shape, float32)) * scaling_factor.
    """
    mean, std = self.vae.posterior(images)
    return (mean + std * jax.random.normal(key, mean.shape, jnp.float32)) * self.scaling_factor

  def decode(self, latents):
    """latents (B, h, w, C) -> float32 images (B, h*d, w*d, 3) clamped to [-1, 1]."""
    z = latents / self.scaling_factor
    x = self.vae.decode(z) if self.light_decoder is None else self.light_decoder(z)
    return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)


class PixelAutoencoder(nnx.Module):
  """Identity autoencoder for pixel-space models: latents are the images (3 channels, factor 1)."""

  def __init__(self):
    self.latent_channels = 3
    self.downsample = 1

  def encode(self, images, key):
    """images (B, H, W, 3) -> the same values as float32; `key` is unused."""
    del key
    return images.astype(jnp.float32)

  def decode(self, latents):
    """latents (B, H, W, 3) -> float32 images clamped to [-1, 1]."""
    return jnp.clip(latents.astype(jnp.float32), -1.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Official-checkpoint key mappings.

_OLD_ATTENTION = re.compile(r"(\.attentions\.0\.)(query|key|value|proj_attn)\.")
_OLD_ATTENTION_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_TORCH_NAMES = {"downsampler": "downsamplers.0", "upsampler": "upsamplers.0",
                "attention": "attentions.0", "to_out": "to_out.0", "kernel": "weight",
                "scale": "weight"}


def params_from_diffusers(state_dict, norm_num_groups=32):
  """Converts a diffusers AutoencoderKL state dict (e.g. an SD-2.1 `vae/` folder).

  Args:
    state_dict: {key: torch tensor or array} with diffusers keys (`encoder.conv_in.weight`,
      `quant_conv.weight`, `decoder.mid_block.attentions.0.to_q.weight`, ...). The pre-0.14
      attention names (`query`, `key`, `value`, `proj_attn`) are accepted too.
    norm_num_groups: GroupNorm groups (the folder's config.json; 32 for SD). Weights don't hold it.
  Returns:
    (params, model_kwargs): `params` has exactly the layout of
    `nnx.state(AutoencoderKL(**model_kwargs, rngs=...), nnx.Param).to_pure_dict()`.
  Raises:
    KeyError / ValueError naming the offending key for unknown or missing keys and shape mismatches.
  """
  state_dict = _rename_old_attention(state_dict)
  block_out_channels = []
  while (k := f"encoder.down_blocks.{len(block_out_channels)}.resnets.0.conv1.weight") in (
      state_dict):
    block_out_channels.append(int(state_dict[k].shape[0]))
  layers = 0
  while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in state_dict:
    layers += 1
  if not block_out_channels:
    raise KeyError("diffusers VAE state dict: missing key 'encoder.down_blocks.0.resnets.0.conv1."
                   "weight' (is this an AutoencoderKL state dict?).")
  model_kwargs = dict(
      in_channels=int(_get(state_dict, "encoder.conv_in.weight").shape[1]),
      out_channels=int(_get(state_dict, "decoder.conv_out.weight").shape[0]),
      latent_channels=int(_get(state_dict, "decoder.conv_in.weight").shape[1]),
      block_out_channels=tuple(block_out_channels), layers_per_block=layers,
      norm_num_groups=norm_num_groups)
  abstract = nnx.eval_shape(lambda: AutoencoderKL(**model_kwargs, rngs=nnx.Rngs(0)))
  return _convert(state_dict, abstract, "diffusers VAE state dict"), model_kwargs


def light_decoder_params_from_torch(checkpoint):
  """Converts the official LightDecoder checkpoint (`sd21_lwdecoder.pth`, loaded with torch.load).

  Args:
    checkpoint: {'config': {in_channels, out_channels, block_out_channels, layers_per_block
      [, norm_num_groups]}, 'model_state_dict': {key: tensor}} with diffusers Decoder keys at the
      top level (`conv_in.weight`, `mid_block.attentions.0.to_q.weight`, ...).
  Returns:
    (params, model_kwargs): `params` has the layout of
    `nnx.state(LightDecoder(**model_kwargs, rngs=...), nnx.Param).to_pure_dict()`.
  Raises:
    KeyError / ValueError naming the offending key (config or state dict). Other config keys are
    logged and ignored, as the official loader does.
  """
  for key in ("config", "model_state_dict"):
    if key not in checkpoint:
      raise KeyError(f"LightDecoder checkpoint: missing top-level key '{key}' (expected a dict "
                     f"with 'config' and 'model_state_dict'; got keys {sorted(checkpoint)}).")
  config = dict(checkpoint["config"])
  required = ("in_channels", "out_channels", "block_out_channels", "layers_per_block")
  for key in required:
    if key not in config:
      raise KeyError(f"LightDecoder checkpoint: config is missing '{key}' (expected {required}).")
  ignored = sorted(set(config) - set(required) - {"norm_num_groups"})
  if ignored:
    # The official loader builds the module from the four size keys and ignores the rest.
    logging.warning("LightDecoder checkpoint: config key(s) %s ignored (the architecture comes "
                    "from %s and 'norm_num_groups').", ignored, required)
  model_kwargs = dict(
      in_channels=int(config["in_channels"]), out_channels=int(config["out_channels"]),
      block_out_channels=tuple(int(c) for c in config["block_out_channels"]),
      layers_per_block=int(config["layers_per_block"]),
      norm_num_groups=int(config.get("norm_num_groups", 32)))
  abstract = nnx.eval_shape(lambda: LightDecoder(**model_kwargs, rngs=nnx.Rngs(0)))
  state_dict = _rename_old_attention(checkpoint["model_state_dict"])
  return _convert(state_dict, abstract, "LightDecoder model_state_dict"), model_kwargs


def _get(state_dict, key):
  if key not in state_dict:
    raise KeyError(f"diffusers VAE state dict: missing key '{key}'.")
  return state_dict[key]


def _rename_old_attention(state_dict):
  """Maps pre-0.14 diffusers attention names (query/key/value/proj_attn) to the current ones."""
  renamed = {}
  for key, value in state_dict.items():
    new = _OLD_ATTENTION.sub(lambda m: m.group(1) + _OLD_ATTENTION_NEW[m.group(2)] + ".", key)
    if new in renamed:
      raise KeyError(f"State dict holds both '{key}' and its current name '{new}'.")
    renamed[new] = value
  return renamed


def _torch_key(path):
  return ".".join(_TORCH_NAMES.get(p, str(p)) for p in path)


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, prefix + (key,)).items()}
  return {prefix: tree}


def _convert(state_dict, abstract_module, what):
  """Fills the Param tree of `abstract_module` from `state_dict`, converting layouts.

  Conv (O, I, kh, kw) -> HWIO, Linear (O, I) -> (I, O); vectors unchanged.
  """
  targets = {_torch_key(path): (path, leaf) for path, leaf in
             _flatten(nnx.state(abstract_module, nnx.Param).to_pure_dict()).items()}
  for key in state_dict:
    if key not in targets:
      raise KeyError(f"{what}: unknown key '{key}' (no parameter of the JAX model maps to it).")
  missing = [key for key in targets if key not in state_dict]
  if missing:
    raise KeyError(f"{what}: missing key '{missing[0]}' ({len(missing)} missing in all).")
  params = {}
  for key, (path, leaf) in targets.items():
    value = to_numpy(state_dict[key])
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
      value = value.T
    if value.shape != tuple(leaf.shape):
      raise ValueError(f"{what}: key '{key}' has shape {tuple(state_dict[key].shape)}, which maps "
                       f"to {value.shape}; the model expects {tuple(leaf.shape)} (JAX layout).")
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = jnp.asarray(value)
  return params
