"""DINOv2-compatible ViT encoder (docs/official.md §2) and its official-checkpoint key mappings.

The network is the DINOv2 `DinoVisionTransformer`: a patch-14 conv patch embedding, a cls token,
optional register tokens, a learned positional table for the pretraining grid (37x37 + cls for the
518 px hub models) interpolated to the input grid, pre-norm blocks (LayerNorm eps 1e-6, attention
with qkv bias, LayerScale, exact-erf GELU MLP) and a final LayerNorm.

Positional-table interpolation (`pos_interpolation`), which differs between the implementations:
  "hub"        torch.hub DINOv2 without registers (`dinov2_vitb14`, ...; VOSR's encoders):
               F.interpolate(scale_factor=((g+0.1)/M, ...), bicubic, no antialias). Coordinates
               then map with M/(g+0.1) instead of M/g, so the samples sit slightly off "hf"'s.
  "hf"         transformers `Dinov2Model` (checked in transformers 5.24):
               F.interpolate(size=(gh, gw), bicubic, no antialias).
  "antialias"  torch.hub `*_reg` models (interpolate_offset 0, interpolate_antialias True) and
               transformers `Dinov2WithRegistersModel`: F.interpolate(size=..., bicubic,
               antialias=True), i.e. PIL-style Keys a=-0.5 filter widened when downsampling.
All three return the stored table unchanged when the input grid equals the pretraining grid.
"""
import math
import re

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vosr_jax.data.resize import interp_matrix, resize
from vosr_jax.models.layers import (conv, dot_product_attention, init_with_axes, linear,
                                    to_numpy)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_INTERPOLATIONS = ("hub", "hf", "antialias")
LN_EPS = 1e-6
# hub dinov2 adds this to the target grid when it builds the scale factor (facebookresearch/dino#8).
_HUB_INTERPOLATE_OFFSET = 0.1

# name -> constructor sizes; mlp_ratio 4 and patch 14 throughout. ViT-g/14 (1536/40/24) uses a
# SwiGLU FFN, which this module does not implement.
VARIANTS = {
    "tiny": dict(hidden_size=64, depth=4, num_heads=4, pretrain_grid=4),
    "S/14": dict(hidden_size=384, depth=12, num_heads=6),
    "B/14": dict(hidden_size=768, depth=12, num_heads=12),
    "L/14": dict(hidden_size=1024, depth=24, num_heads=16),
}

_TRUNC_NORMAL = nnx.initializers.truncated_normal(0.02)


def _ln(features, rngs):
  return nnx.LayerNorm(
      features, epsilon=LN_EPS, dtype=jnp.float32, use_fast_variance=False,
      scale_init=init_with_axes(nnx.initializers.ones_init(), "norm"),
      bias_init=init_with_axes(nnx.initializers.zeros_init(), "norm"), rngs=rngs)


class Block(nnx.Module):
  """DINOv2 pre-norm block: x + ls1*attn(norm1(x)), then x + ls2*mlp(norm2(x)).

  LayerNorms and the softmax run in float32, the matmuls in `dtype`; the residual stream is float32.
  """

  def __init__(self, hidden_size, num_heads, mlp_hidden, layerscale_init, dtype, attention,
               *, rngs):
    self.num_heads = num_heads
    self.dtype = dtype
    self.attention = attention
    layerscale = init_with_axes(nnx.initializers.constant(layerscale_init), "embed")
    kw = dict(dtype=dtype, rngs=rngs, init=_TRUNC_NORMAL)
    self.norm1 = _ln(hidden_size, rngs)
    self.qkv = linear(hidden_size, 3 * hidden_size, ("embed", "heads"), **kw)
    self.proj = linear(hidden_size, hidden_size, ("heads", "embed"), **kw)
    self.ls1 = nnx.Param(layerscale(rngs.params(), (hidden_size,), jnp.float32))
    self.norm2 = _ln(hidden_size, rngs)
    self.fc1 = linear(hidden_size, mlp_hidden, ("embed", "mlp"), **kw)
    self.fc2 = linear(mlp_hidden, hidden_size, ("mlp", "embed"), **kw)
    self.ls2 = nnx.Param(layerscale(rngs.params(), (hidden_size,), jnp.float32))

  def __call__(self, x):
    """x: (B, N, D) float32 -> (B, N, D) float32."""
    h = self.norm1(x).astype(self.dtype)
    # qkv output order is [q; k; v], each split as (heads, head_dim), as in the hub's fused Linear.
    q, k, v = einops.rearrange(self.qkv(h), "b n (qkv h d) -> qkv b n h d", qkv=3,
                               h=self.num_heads)
    a = einops.rearrange(dot_product_attention(q, k, v, self.attention), "b n h d -> b n (h d)")
    x = x + self.ls1[...] * self.proj(a).astype(jnp.float32)
    h = self.norm2(x).astype(self.dtype)
    h = self.fc2(jax.nn.gelu(self.fc1(h), approximate=False))
    return x + self.ls2[...] * h.astype(jnp.float32)


def _antialias_bicubic_matrix(in_size, out_size):
  """(out, in) matrix of F.interpolate(size=out, mode='bicubic', antialias=True) along one axis.

  Follows PyTorch's `_compute_indices_min_size_weights_aa`: Keys a=-0.5 filter, support 2*scale
  when downsampling, taps truncated at the borders and the weights renormalised.
  """
  scale = in_size / out_size
  support = 2.0 * max(scale, 1.0)
  invscale = 1.0 / scale if scale >= 1.0 else 1.0

  def keys(x):
    x = abs(x)
    if x < 1.0:
      return (1.5 * x - 2.5) * x * x + 1.0
    if x < 2.0:
      return ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return 0.0

  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    w = np.array([keys((j - center + 0.5) * invscale) for j in range(lo, hi)])
    m[i, lo:hi] = w / w.sum()
  return jnp.asarray(m, jnp.float32)


def _pos_matrices(grid, out_h, out_w, mode):
  """Row and column interpolation matrices taking the (grid, grid) table to (out_h, out_w)."""
  if mode == "antialias":
    return _antialias_bicubic_matrix(grid, out_h), _antialias_bicubic_matrix(grid, out_w)
  if mode == "hub":
    # torch maps coordinates with 1/scale_factor (in double, then rounded to float32).
    scales = [1.0 / ((g + _HUB_INTERPOLATE_OFFSET) / grid) for g in (out_h, out_w)]
  else:
    scales = [None, None]
  return (interp_matrix(grid, out_h, "bicubic", scales[0]),
          interp_matrix(grid, out_w, "bicubic", scales[1]))


class ViT(nnx.Module):
  """DINOv2 ViT returning patch tokens of one block (docs/official.md §2).

  Parameters (float32, logical axes in brackets; L = depth, D = hidden_size, M = pretrain_grid):
    patch_embed.kernel (p, p, 3, D) [-, -, conv_in, embed], patch_embed.bias (D,)
    cls_token (D,), register_tokens (R, D) when R > 0, pos_embed (1 + M*M, D) (cls row first)
    blocks.*: one `Block` stacked on a leading (L,) 'layers' axis
    norm.scale / norm.bias (D,): the final LayerNorm
  """

  def __init__(self, *, patch_size=14, hidden_size, depth, num_heads, mlp_ratio=4.0,
               num_register_tokens=0, pretrain_grid=37, layerscale_init=1.0,
               pos_interpolation="hub", scan=True, attention=None,
               dtype=jnp.float32, rngs):
    """Builds the encoder.

    Args:
      patch_size: patch side in pixels (14 for DINOv2).
      hidden_size, depth, num_heads: width D, number of blocks, attention heads (D % heads == 0).
      mlp_ratio: MLP hidden = int(D * mlp_ratio).
      num_register_tokens: register tokens inserted after cls (0 for VOSR's hub models).
      pretrain_grid: side M of the stored positional table (37 for the 518 px hub models).
      layerscale_init: initial LayerScale value.
      pos_interpolation: "hub" | "hf" | "antialias" (see the module docstring).
      scan: run the blocks with lax.scan (compile once) instead of an unrolled loop.
      attention: `layers.dot_product_attention` implementation (None: "explicit" on CPU, else
        "xla"; or "xla", "cudnn", "explicit", "explicit_saved").
      dtype: matmul compute dtype; LayerNorm, softmax, the residual stream and outputs stay float32.
      rngs: nnx.Rngs with a 'params' stream.
    """
    if hidden_size % num_heads:
      raise ValueError(f"vit.py: hidden_size {hidden_size} is not divisible by num_heads "
                       f"{num_heads}.")
    if pos_interpolation not in POS_INTERPOLATIONS:
      raise ValueError(f"vit.py: pos_interpolation {pos_interpolation!r} is not one of "
                       f"{POS_INTERPOLATIONS}.")
    self.patch_size = patch_size
    self.hidden_size = hidden_size
    self.depth = depth
    self.num_register_tokens = num_register_tokens
    self.pretrain_grid = pretrain_grid
    self.pos_interpolation = pos_interpolation
    self.scan = scan
    self.dtype = dtype
    self.patch_embed = conv(3, hidden_size, patch_size, (None, None, "conv_in", "embed"),
                            strides=patch_size, padding="VALID", dtype=dtype, rngs=rngs,
                            init=_TRUNC_NORMAL)
    self.cls_token = nnx.Param(
        init_with_axes(nnx.initializers.normal(1e-6), "embed")(rngs.params(), (hidden_size,)))
    if num_register_tokens:
      self.register_tokens = nnx.Param(init_with_axes(_TRUNC_NORMAL, None, "embed")(
          rngs.params(), (num_register_tokens, hidden_size)))
    self.pos_embed = nnx.Param(init_with_axes(_TRUNC_NORMAL, None, "embed")(
        rngs.params(), (1 + pretrain_grid**2, hidden_size)))
    mlp_hidden = int(hidden_size * mlp_ratio)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return Block(hidden_size, num_heads, mlp_hidden, layerscale_init, dtype, attention,
                   rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.norm = _ln(hidden_size, rngs)

  def _pos_embed(self, grid_h, grid_w):
    """Positional table for a (grid_h, grid_w) patch grid: (1 + grid_h*grid_w, D) float32."""
    table = self.pos_embed[...]
    m = self.pretrain_grid
    if (grid_h, grid_w) == (m, m):
      return table
    rows, cols = _pos_matrices(m, grid_h, grid_w, self.pos_interpolation)
    patch = table[1:].reshape(m, m, self.hidden_size)
    patch = jnp.einsum("oh,hwd->owd", rows, patch, precision="highest")
    patch = jnp.einsum("pw,owd->opd", cols, patch, precision="highest")
    return jnp.concatenate([table[:1], patch.reshape(grid_h * grid_w, self.hidden_size)], 0)

  def _run_blocks(self, x, n):
    """Applies blocks 0..n-1 to x (B, T, D); blocks n.. are neither sliced in nor computed."""
    graphdef, state = nnx.split(self.blocks)
    state = jax.tree.map(lambda a: a[:n], state)
    if self.scan:
      def body(h, block_state):
        return nnx.merge(graphdef, block_state)(h), None
      return jax.lax.scan(body, x, state)[0]
    for i in range(n):
      x = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))(x)
    return x

  def __call__(self, images, *, tap_layer=None, final_norm=False):
    """Patch tokens of an ImageNet-normalised batch.

    Args:
      images: (B, H, W, 3), H and W multiples of patch_size, already normalised (see `preprocess`).
      tap_layer: 0-based block whose output is returned, without the final norm; blocks after it
        are not computed. None means the last block.
      final_norm: run all blocks and return the final-LayerNorm output (tap_layer must then be
        None or depth - 1).
    Returns:
      (B, (H/p)*(W/p), D) float32 patch tokens in row-major grid order (cls and registers dropped).
    """
    b, h, w, c = images.shape
    p = self.patch_size
    if h % p or w % p or c != 3:
      raise ValueError(f"vit.py: images must be (B, H, W, 3) with H and W multiples of {p}; "
                       f"got {images.shape}.")
    last = self.depth - 1
    tap = last if tap_layer is None else tap_layer
    if not 0 <= tap <= last:
      raise ValueError(f"vit.py: tap_layer {tap_layer} is outside 0..{last}.")
    if final_norm and tap != last:
      raise ValueError(f"vit.py: final_norm=True runs all {self.depth} blocks; tap_layer "
                       f"{tap_layer} would drop blocks.")
    x = self.patch_embed(images.astype(self.dtype)).astype(jnp.float32)
    x = x.reshape(b, (h // p) * (w // p), self.hidden_size)
    x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (b, 1, self.hidden_size)), x], 1)
    x = x + self._pos_embed(h // p, w // p)
    if self.num_register_tokens:
      regs = jnp.broadcast_to(self.register_tokens[...], (b,) + self.register_tokens.shape)
      x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], 1)
    x = self._run_blocks(x, tap + 1)
    if final_norm:
      x = self.norm(x)
    return x[:, 1 + self.num_register_tokens:]


def preprocess(lr_images, size=448):
  """VOSR's DINOv2 input: LR in [-1, 1] -> [0, 1] -> bicubic square `size` -> clip -> ImageNet norm.

  Args:
    lr_images: (B, H, W, 3) float in [-1, 1] (the LR image already upscaled to the HR size).
    size: output side; aspect ratio is ignored, as in the official code (F.interpolate(size=int)).
  Returns:
    (B, size, size, 3) float32, ready for `ViT.__call__`.
  """
  x = lr_images.astype(jnp.float32) * 0.5 + 0.5
  x = jnp.clip(resize(x, (size, size), "bicubic"), 0.0, 1.0)
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


# ------------------------------------------------------------------------------------------------
# Official-checkpoint key mappings.

# Hugging Face key -> hub key, for everything except the split q/k/v projections. Both the
# transformers 5.x in-memory names (attention.q_proj, o_proj) and the on-disk names of the released
# facebook/dinov2-* safetensors (attention.attention.query, attention.output.dense) are accepted.
_HF_RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.mask_token", "mask_token"),
    (r"embeddings\.register_tokens", "register_tokens"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.(o_proj|output\.dense)\.(weight|bias)",
     r"blocks.\1.attn.proj.\3"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\."
                     r"(?:(q|k|v)_proj|attention\.(query|key|value))\.(weight|bias)")
_HUB_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
# hub per-block key -> (path in the block's param dict, transpose the torch (out, in) weight).
_HUB_BLOCK_KEYS = {
    "norm1.weight": (("norm1", "scale"), False), "norm1.bias": (("norm1", "bias"), False),
    "attn.qkv.weight": (("qkv", "kernel"), True), "attn.qkv.bias": (("qkv", "bias"), False),
    "attn.proj.weight": (("proj", "kernel"), True), "attn.proj.bias": (("proj", "bias"), False),
    "ls1.gamma": (("ls1",), False),
    "norm2.weight": (("norm2", "scale"), False), "norm2.bias": (("norm2", "bias"), False),
    "mlp.fc1.weight": (("fc1", "kernel"), True), "mlp.fc1.bias": (("fc1", "bias"), False),
    "mlp.fc2.weight": (("fc2", "kernel"), True), "mlp.fc2.bias": (("fc2", "bias"), False),
    "ls2.gamma": (("ls2",), False),
}


def _hf_to_hub(state_dict):
  """Renames a Hugging Face Dinov2(WithRegisters)Model state dict to torch.hub names."""
  out, qkv = {}, {}
  for key, value in state_dict.items():
    match = _HF_QKV.fullmatch(key)
    if match:
      layer, short, long, kind = match.groups()
      qkv.setdefault((int(layer), kind), {})[short or long[0]] = (key, value)
      continue
    for pattern, repl in _HF_RENAMES:
      if re.fullmatch(pattern, key):
        out[re.sub(pattern, repl, key)] = value
        break
    else:
      raise KeyError(f"vit.py: unknown key {key!r} in a Hugging Face DINOv2 state dict (SwiGLU "
                     "FFNs of ViT-g are not supported).")
  for (layer, kind), parts in sorted(qkv.items()):
    missing = [n for n in "qkv" if n not in parts]
    if missing:
      have = ", ".join(k for k, _ in parts.values())
      raise KeyError(f"vit.py: layer {layer} has {have} but lacks the {'/'.join(missing)} "
                     f"projection {kind}.")
    out[f"blocks.{layer}.attn.qkv.{kind}"] = np.concatenate(
        [to_numpy(parts[n][1]) for n in "qkv"], 0)
  return out


def params_from_torch(state_dict, naming="hub", *, num_heads=None, keep_blocks=None,
                      pos_interpolation=None):
  """Converts an official DINOv2 state dict to `ViT` parameters.

  Args:
    state_dict: mapping name -> torch.Tensor or array: a torch.hub `dinov2_vit*14(_reg)` `.pth`
      (naming "hub") or a transformers `Dinov2Model`/`Dinov2WithRegistersModel` state dict or
      safetensors file contents (naming "hf").
    naming: "hub" | "hf".
    num_heads: attention heads; checkpoints do not store it. Default hidden_size // 64, right for
      S/B/L/g (an error when 64 does not divide the width).
    keep_blocks: convert only blocks 0..keep_blocks-1 (VOSR 0.5B needs 9 of ViT-B's 12); the
      final norm is still converted. Default: all blocks.
    pos_interpolation: override; default "hub" for naming "hub", "hf" for naming "hf", and
      "antialias" for either when the checkpoint has register tokens (see the module docstring).
  Returns:
    (params, model_kwargs): params is a nested dict of float32 numpy arrays laid out exactly like
    `nnx.state(ViT(**model_kwargs, rngs=...), nnx.Param).to_pure_dict()`; model_kwargs holds every
    constructor argument fixed by the checkpoint. `mask_token` (used only for masked pretraining)
    is dropped.
  Raises:
    KeyError: unknown or missing keys, naming them. ValueError: inconsistent shapes, naming the key.
  """
  if naming == "hf":
    hub = _hf_to_hub(state_dict)
  elif naming == "hub":
    hub = dict(state_dict)
  else:
    raise ValueError(f"vit.py: naming {naming!r} is not 'hub' or 'hf'.")
  hub.pop("mask_token", None)
  for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
              "norm.weight", "norm.bias"):
    if key not in hub:
      raise KeyError(f"vit.py: the {naming} state dict lacks {key!r}.")
  weight = to_numpy(hub.pop("patch_embed.proj.weight"))  # (D, 3, p, p)
  hidden, patch = weight.shape[0], weight.shape[-1]
  if weight.shape != (hidden, 3, patch, patch):
    raise ValueError(f"vit.py: patch_embed.proj.weight has shape {weight.shape}; expected "
                     "(D, 3, p, p).")

  def take(key, shape):
    value = to_numpy(hub.pop(key))
    if value.size != math.prod(shape) or value.shape[-1] != shape[-1]:
      raise ValueError(f"vit.py: {key!r} has shape {value.shape}; expected {shape} (hub layout).")
    return value.reshape(shape)

  pos = to_numpy(hub["pos_embed"])
  grid = math.isqrt(pos.shape[-2] - 1) if pos.ndim >= 2 and pos.shape[-2] > 1 else 0
  if pos.ndim < 2 or grid * grid + 1 != pos.shape[-2]:
    raise ValueError(f"vit.py: pos_embed has shape {pos.shape}; expected (1, 1 + M*M, D).")
  params = {
      "patch_embed": {"kernel": weight.transpose(2, 3, 1, 0),
                      "bias": take("patch_embed.proj.bias", (hidden,))},
      "cls_token": take("cls_token", (hidden,)),
      "pos_embed": take("pos_embed", (1 + grid * grid, hidden)),
      "norm": {"scale": take("norm.weight", (hidden,)), "bias": take("norm.bias", (hidden,))},
  }
  registers = 0
  if "register_tokens" in hub:
    registers = to_numpy(hub["register_tokens"]).shape[-2]
    params["register_tokens"] = take("register_tokens", (registers, hidden))

  blocks = {}
  for key in list(hub):
    match = _HUB_BLOCK.fullmatch(key)
    if not match or match.group(2) not in _HUB_BLOCK_KEYS:
      raise KeyError(f"vit.py: unknown key {key!r} in a {naming} DINOv2 state dict (SwiGLU FFNs "
                     "of ViT-g and chunked block lists are not supported).")
    blocks.setdefault(int(match.group(1)), {})[match.group(2)] = hub.pop(key)
  depth = max(blocks, default=-1) + 1
  if depth == 0:
    raise KeyError(f"vit.py: the {naming} state dict has no blocks.")
  fc1 = blocks.get(0, {}).get("mlp.fc1.weight")
  mlp_hidden = to_numpy(fc1).shape[0] if fc1 is not None else 4 * hidden
  keep = depth if keep_blocks is None else keep_blocks
  if not 1 <= keep <= depth:
    raise ValueError(f"vit.py: keep_blocks {keep_blocks} is outside 1..{depth}.")
  shapes = {"norm1.weight": (hidden,), "norm1.bias": (hidden,), "attn.qkv.weight": (3 * hidden,
            hidden), "attn.qkv.bias": (3 * hidden,), "attn.proj.weight": (hidden, hidden),
            "attn.proj.bias": (hidden,), "ls1.gamma": (hidden,), "norm2.weight": (hidden,),
            "norm2.bias": (hidden,), "mlp.fc1.weight": (mlp_hidden, hidden),
            "mlp.fc1.bias": (mlp_hidden,), "mlp.fc2.weight": (hidden, mlp_hidden),
            "mlp.fc2.bias": (hidden,), "ls2.gamma": (hidden,)}
  per_block = []
  for i in range(depth):
    missing = sorted(set(_HUB_BLOCK_KEYS) - set(blocks.get(i, {})))
    if missing:
      raise KeyError(f"vit.py: block {i} of the {naming} state dict lacks "
                     f"{', '.join(f'blocks.{i}.{m}' for m in missing)} (hub names).")
    tree = {}
    for name, (path, transpose) in _HUB_BLOCK_KEYS.items():
      value = to_numpy(blocks[i][name])
      if value.shape != shapes[name]:
        raise ValueError(f"vit.py: blocks.{i}.{name} (hub name) has shape {value.shape}; "
                         f"expected {shapes[name]}.")
      node = tree
      for part in path[:-1]:
        node = node.setdefault(part, {})
      node[path[-1]] = value.T if transpose else value
    per_block.append(tree)
  params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *per_block[:keep])

  mlp_ratio = mlp_hidden / hidden
  if int(hidden * mlp_ratio) != mlp_hidden:
    raise ValueError(f"vit.py: MLP hidden {mlp_hidden} is not int(D * ratio) for D={hidden}.")
  if pos_interpolation is None:
    pos_interpolation = "antialias" if registers else naming
  if num_heads is None and hidden % 64:
    raise ValueError(f"vit.py: width {hidden} is not a multiple of 64, so the head count "
                     "(checkpoints do not store it) cannot be guessed as width // 64; pass it "
                     "(--num-heads).")
  num_heads = hidden // 64 if num_heads is None else num_heads
  if num_heads < 1 or hidden % num_heads:
    raise ValueError(f"vit.py: {num_heads} heads do not divide the width {hidden}.")
  model_kwargs = dict(patch_size=patch, hidden_size=hidden, depth=keep, num_heads=num_heads,
                      mlp_ratio=mlp_ratio, num_register_tokens=registers, pretrain_grid=grid,
                      pos_interpolation=pos_interpolation)
  return params, model_kwargs
