"""The VOSR denoiser: a LightningDiT with DINOv2 cross-attention (docs/official.md §1).

Input: the LR latent and the noisy latent z_t (NHWC, concatenated channel-wise in that order inside
the model), the flow time t in [0, 1] (t=1 is noise), DINOv2 patch tokens of the LR image, and for
one-step students the endpoint r. Output: the velocity (or the average velocity for one-step models)
with z_t's shape.

Differences from the official code, all compatible with its checkpoints:
  * NHWC latents; any H, W divisible by the patch size (the official code needs square grids). RoPE
    interpolates rows and columns separately (`i * rope_grid / L`), which equals the official
    `forward_flexible` on square grids.
  * The blocks are one stacked module (leading `layers` axis), run scanned or unrolled.
  * The fused projections (qkv, cross-attention k/v, SwiGLU w12, t_block, final adaLN) keep their
    chunk as a separate kernel axis, so tensor-parallel sharding never splits across chunks.
  * With a bfloat16 compute dtype the residual stream stays float32 (as it does under torch
    autocast, where the float32 scale_shift_table promotes every gated update).
"""
import math

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vosr_jax.models.layers import (CrossAttention, Mlp, RMSNorm, SelfAttention, SwiGLU,
                                    TimestepEmbedder, conv, init_with_axes, linear, rope_tables,
                                    to_numpy)
from vosr_jax.sharding import constrain_batch

# Sizes: the official models (docs/official.md §0), a 32x32-latent benchmark model, and a test
# model.
VARIANTS = {
    "0.5b": dict(hidden_size=1024, depth=28, num_heads=16, latent_channels=4, enc_dim=768),
    "1.4b": dict(hidden_size=1536, depth=36, num_heads=24, latent_channels=16, enc_dim=1024),
    "bench-small": dict(hidden_size=384, depth=12, num_heads=6, latent_channels=4, enc_dim=768,
                        rope_grid=16),
    "tiny": dict(hidden_size=64, depth=2, num_heads=2, latent_channels=4, enc_dim=32, rope_grid=8),
}

# Rematerialisation policies for the block stack (names from jax.checkpoint_policies).
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_zeros = jax.nn.initializers.zeros

PREDICTIONS = ("velocity", "x", "x_skip")  # What the final layer predicts (`LightningDiT` `prediction`).
X_PREDICTION_MIN_T = 0.05  # Floor of t in `x_to_velocity`.


def variant_kwargs(variant, **overrides):
  """Constructor arguments of `LightningDiT` for a named size (a key of `VARIANTS`).

  Args:
    variant: a key of `VARIANTS` (case-insensitive).
    **overrides: further constructor arguments (they win over the variant's).
  Returns:
    A dict to pass as `LightningDiT(**variant_kwargs(...), rngs=...)`.
  """
  key = variant.lower()
  if key not in VARIANTS:
    raise ValueError(f"dit.py: unknown DiT variant {variant!r}; expected one of {sorted(VARIANTS)}")
  return {**VARIANTS[key], **overrides}


def is_one_step(kwargs):
  """Whether constructor arguments `kwargs` make a one-step student (with `r_embedder`): the one
  signal that decides one-step versus multi-step everywhere (training, teacher, sampling)."""
  return bool(kwargs.get("one_step", False))


class DiTBlock(nnx.Module):
  """AdaLN-single block: gated self-attention, ungated un-normed cross-attention, gated SwiGLU."""

  def __init__(self, dim, num_heads, mlp_hidden, *, attention, dtype, param_dtype, rngs,
               matmul_dtype=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul_dtype=matmul_dtype)
    table_init = jax.nn.initializers.normal(1.0 / math.sqrt(dim))  # torch.randn(6, D) / sqrt(D)
    self.scale_shift_table = nnx.Param(
        init_with_axes(table_init, None, "embed")(rngs.params(), (6, dim), param_dtype))
    self.norm1 = RMSNorm(dim, dtype=dtype, param_dtype=param_dtype)
    self.attn = SelfAttention(dim, num_heads, attention=attention, **kw)
    self.cross_attn = CrossAttention(dim, num_heads, attention=attention, **kw)
    self.norm2 = RMSNorm(dim, dtype=dtype, param_dtype=param_dtype)
    self.mlp = SwiGLU(dim, mlp_hidden, **kw)

  def __call__(self, x, c0, cond, rope):
    """x: (B, N, D) residual stream, c0: (B, 6, D), cond: (B, M, D) -> (B, N, D)."""
    mod = c0 + self.scale_shift_table[...]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mod[:, i:i + 1] for i in range(6))
    x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa, rope)
    x = x + self.cross_attn(x, cond)
    return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class FinalLayer(nnx.Module):
  """RMSNorm modulated by (shift, scale) = Linear(SiLU(c)), then Linear(D, p*p*C); zero-init."""

  def __init__(self, dim, out_dim, *, dtype, param_dtype, rngs, matmul_dtype=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul_dtype=matmul_dtype,
              init=_zeros)
    self.norm_final = RMSNorm(dim, dtype=dtype, param_dtype=param_dtype)
    self.adaLN_modulation = linear(dim, (2, dim), ("embed", None, "mlp"), **kw)
    self.linear = linear(dim, out_dim, ("embed", "vocab"), **kw)

  def __call__(self, x, c):
    """x: (B, N, D), c: (B, D) -> (B, N, out_dim)."""
    mod = self.adaLN_modulation(jax.nn.silu(c))
    return self.linear(self.norm_final(x) * (1 + mod[:, 1:2]) + mod[:, 0:1])


class LightningDiT(nnx.Module):
  """The VOSR denoiser (docs/official.md §1); parameters in `params_from_torch`'s layout.

  Args:
    latent_channels: C, the VAE latent channels (input has 2C: LR latent and z_t).
    hidden_size, depth, num_heads: D, number of blocks, attention heads.
    enc_dim: width of the DINOv2 tokens.
    patch_size: p.
    mlp_ratio: SwiGLU hidden = int(2/3 * int(D * mlp_ratio)) (2730 for D = 1024).
    encdim_ratio: hidden width of the token projection, as a multiple of D.
    rope_grid: token-grid side the RoPE positions are scaled to (official: 64 // 2 = 32).
    one_step: adds `r_embedder` (one-step students; `auxiliary_time_cond` upstream).
    prediction: what the final layer predicts. "velocity" (official; the only choice for
      converted checkpoints): the output is the network's. "x" (a departure): the network
      predicts the clean flow sample x and the output is the velocity it implies,
      `x_to_velocity(z_t, x, t)`, so the noise never has to pass through the network (Li & He,
      "Back to Basics: Let Denoising Generative Models Denoise", arXiv 2511.13720). "x_skip" (a
      departure, the demo's): the same with x = `skip_x(z_t, f, t)`, which is the network's f at
      t = 1 and tends to z_t as t -> 0 (Karras et al. 2022's preconditioning), so near the data
      the network corrects z_t by at most about t f instead of copying it.
    pixel_head: 0 (official): the final layer's p x p x C values per token are the output. K > 0
      (a departure, the demo's): the final layer gives K features per pixel and a 3x3 convolution
      of their SiLU makes the C output channels, so each output pixel also sees its neighbours
      across patch borders, where a per-token output shows the p-pixel patch grid.
    time_scale: t and r are multiplied by it before their sinusoidal embeddings. 1 (official): the
      raw t in [0, 1], where only the lowest of the 128 frequencies turn by more than a fraction
      of a radian; 1000 (a departure, the demo's) spreads them over t as DDPM-style models do.
    scan: run the block stack with `lax.scan` (compile time independent of depth) or unrolled.
    remat_policy: None, or a key of `REMAT_POLICIES`, to rematerialise each block.
    attention: `layers.dot_product_attention` implementation: None (the backend's fastest:
      "explicit" on CPU, "xla" elsewhere), "xla", "cudnn", "explicit" or "explicit_saved".
    matmul_dtype: None (every product in `dtype`), or "bfloat16": the dense layers and the
      attention take bfloat16 operands with float32 accumulation, forward and backward
      (`layers.low_precision_dot_general`), while everything else keeps `dtype`; on CPUs with
      native bf16 dot instructions this is the fast path of a float32 model.
    dtype: compute dtype; parameters are `param_dtype`, norms and softmax run in float32.
    rngs: initialisation randomness (stream `params`).
  """

  def __init__(self, *, latent_channels, hidden_size, depth, num_heads, enc_dim, patch_size=2,
               mlp_ratio=4, encdim_ratio=3, rope_grid=32, one_step=False, prediction="velocity",
               pixel_head=0, time_scale=1.0,
               scan=True, remat_policy=None, attention=None, matmul_dtype=None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    if hidden_size % num_heads or (hidden_size // num_heads) % 4:
      raise ValueError(f"dit.py: hidden_size {hidden_size} / num_heads {num_heads} must give a "
                       "head dim divisible by 4 (2D RoPE)")
    if remat_policy is not None and remat_policy not in REMAT_POLICIES:
      raise ValueError(f"dit.py: remat_policy {remat_policy!r} is not one of "
                       f"{sorted(REMAT_POLICIES)} or None")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul_dtype=matmul_dtype)
    d, p, c = hidden_size, patch_size, latent_channels
    self.latent_channels, self.patch_size, self.depth = c, p, depth
    self.head_dim, self.rope_grid, self.enc_dim = d // num_heads, rope_grid, enc_dim
    self.scan, self.remat_policy, self.dtype = scan, remat_policy, dtype
    if prediction not in PREDICTIONS:
      raise ValueError(f"dit.py: prediction {prediction!r} is not one of {PREDICTIONS}")
    self.prediction, self.time_scale = prediction, time_scale

    # Dense on (ph, pw, cin)-flattened patches == the official stride-p conv.
    self.x_embedder = linear(p * p * 2 * c, d, ("vocab", "embed"), **kw)
    self.t_embedder = TimestepEmbedder(d, **kw)
    self.r_embedder = TimestepEmbedder(d, **kw) if one_step else None
    self.t_block = linear(d, (6, d), ("embed", None, "mlp"), init=jax.nn.initializers.normal(0.02),
                          **kw)
    self.layer_norm = nnx.LayerNorm(
        enc_dim, epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32,
        param_dtype=param_dtype, scale_init=init_with_axes(jax.nn.initializers.ones, "norm"),
        bias_init=init_with_axes(_zeros, "norm"), rngs=rngs)
    self.mlp_ca = Mlp(enc_dim, d * encdim_ratio, d, **kw)
    mlp_hidden = int(2 / 3 * int(d * mlp_ratio))

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(block_rngs):
      return DiTBlock(d, num_heads, mlp_hidden, attention=attention, dtype=dtype,
                      param_dtype=param_dtype, rngs=block_rngs, matmul_dtype=matmul_dtype)

    self.blocks = make_blocks(rngs)
    self.final_layer = FinalLayer(d, p * p * (pixel_head or c), **kw)
    self.pixel_head = conv(pixel_head, c, 3, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs) if pixel_head else None

  def _conditioning(self, t, r):
    """c = t_emb(t) [+ r_emb(r) * (t - r)]: (B,) times -> (B, D)."""
    c = self.t_embedder(t * self.time_scale)
    if r is not None:
      if self.r_embedder is None:
        raise ValueError("dit.py: r was given but this model has no r_embedder (one_step=False)")
      c = c + self.r_embedder(r * self.time_scale) * (t - r).astype(c.dtype)[:, None]
    return c

  def _run_blocks(self, x, c0, cond, rope):
    """Applies the stacked blocks, scanned or unrolled, with optional remat."""
    graphdef, state = nnx.split(self.blocks)

    def body(h, layer_state):
      # Batch-sharded residual stream: FSDP must gather weights, not shard activations by 'embed'.
      return nnx.merge(graphdef, layer_state)(constrain_batch(h), c0, cond, rope), None

    if self.remat_policy is not None:
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat_policy])
    if self.scan:
      return jax.lax.scan(body, x, state)[0]
    for i in range(self.depth):
      x = body(x, jax.tree.map(lambda a: a[i], state))[0]
    return x

  def __call__(self, z_t, lr_latent, t, tokens, r=None):
    """Predicts the velocity (average velocity from t to r for one-step models).

    Args:
      z_t: (B, H, W, C) noisy latent; H, W divisible by the patch size.
      lr_latent: (B, H, W, C) LR latent (scaled by the weak strength for the weak branch).
      t: (B,) flow time in [0, 1], t = 1 is noise.
      tokens: (B, M, enc_dim) DINOv2 tokens (zeros for the weak branch).
      r: (B,) endpoint time, one-step models only; None drops the r-term (as r = t would).
    Returns:
      (B, H, W, C) float32.
    """
    b, hh, ww, c = z_t.shape
    p = self.patch_size
    if hh % p or ww % p or c != self.latent_channels or lr_latent.shape != z_t.shape:
      raise ValueError(f"dit.py: z_t {z_t.shape} and lr_latent {lr_latent.shape} must be equal "
                       f"(B, H, W, {self.latent_channels}) with H, W divisible by {p}")
    if tokens.ndim != 3 or tokens.shape[0] != b or tokens.shape[2] != self.enc_dim:
      raise ValueError(f"dit.py: tokens {tokens.shape} must be ({b}, M, {self.enc_dim})")
    h, w = hh // p, ww // p
    x = jnp.concatenate([lr_latent, z_t], axis=-1)
    x = einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)  # patchify
    x = self.x_embedder(x).astype(jnp.float32)  # float32 residual stream (module docstring)

    c_vec = self._conditioning(t, r)
    c0 = self.t_block(jax.nn.silu(c_vec))
    cond = constrain_batch(self.mlp_ca(self.layer_norm(tokens)))
    rope = rope_tables((h, w), self.head_dim, self.rope_grid)
    x = self._run_blocks(x, c0, cond, rope)

    out = einops.rearrange(self.final_layer(x, c_vec), "b (h w) (p q c) -> b (h p) (w q) c",
                           h=h, p=p, q=p)  # unpatchify
    if self.pixel_head is not None:
      out = self.pixel_head(jax.nn.silu(out))
    out = out.astype(jnp.float32)
    if self.prediction == "x":
      out = x_to_velocity(z_t.astype(jnp.float32), out, t)
    elif self.prediction == "x_skip":
      z = z_t.astype(jnp.float32)
      out = x_to_velocity(z, skip_x(z, out, t), t)
    return out


def skip_x(z_t, f, t):
  """c_skip(t) z_t + c_out(t) f, the clean-sample estimate of EDM's preconditioning (Karras et
  al. 2022) for unit-variance data on z_t = (1 - t) x + t eps: c_skip = (1 - t) / n^2, c_out =
  t / n, n^2 = (1 - t)^2 + t^2; f's target (x - c_skip z_t) / c_out has unit variance at every t.
  z_t, f: (B, H, W, C); t: (B,).
  """
  t = jnp.asarray(t, jnp.float32)[:, None, None, None]
  n2 = jnp.square(1 - t) + jnp.square(t)
  return (1 - t) / n2 * z_t + t / jnp.sqrt(n2) * f


def x_to_velocity(z_t, x, t):
  """The velocity (z_t - x) / max(t, X_PREDICTION_MIN_T) of a clean-sample prediction x.

  With z_t = (1 - t) x + t eps the velocity eps - x equals (z_t - x) / t; the floor keeps it finite
  near t = 0 (as JiT's t_eps). For a one-step student this is the average velocity from t to any
  r, so a jump to r = 0 lands on x. z_t, x: (B, H, W, C); t: (B,).
  """
  t = jnp.maximum(jnp.asarray(t, jnp.float32), X_PREDICTION_MIN_T)[:, None, None, None]
  return (z_t - x) / t



def param_count(**kwargs):
  """Number of parameters of `LightningDiT(**kwargs)`, from shapes only (nothing allocated)."""
  model = nnx.eval_shape(lambda: LightningDiT(**kwargs, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _dense(*names, chunks=0):
  """Recipes for a JAX dense from torch Linear(s) `names`, whose outputs are concatenated.

  A recipe is (torch keys, function of their arrays -> JAX array). Torch (out, in) weights become
  (in, out) kernels; with `chunks`, the output axis splits into (chunks, out / chunks).
  """
  def kernel(*ws):
    w = np.concatenate(ws)
    return w.reshape(chunks, -1, w.shape[1]).transpose(2, 0, 1) if chunks else w.T

  def bias(*bs):
    b = np.concatenate(bs)
    return b.reshape(chunks, -1) if chunks else b

  return {"kernel": ([n + ".weight" for n in names], kernel),
          "bias": ([n + ".bias" for n in names], bias)}


def _copy(key):
  return ([key], lambda a: a)


def _block_recipes():
  """Recipes of one block, torch keys relative to `blocks.{i}.`."""
  norm = lambda name: {"weight": _copy(name + ".weight")}
  return {
      "scale_shift_table": _copy("scale_shift_table"),
      "norm1": norm("norm1"), "norm2": norm("norm2"),
      "attn": {"qkv": _dense("attn.qkv", chunks=3), "proj": _dense("attn.proj"),
               "q_norm": norm("attn.q_norm"), "k_norm": norm("attn.k_norm")},
      "cross_attn": {"q_linear": _dense("cross_attn.q_linear"),
                     "kv_linear": _dense("cross_attn.k_linear", "cross_attn.v_linear", chunks=2),
                     "proj": _dense("cross_attn.proj"),
                     "q_norm": norm("cross_attn.q_norm"), "k_norm": norm("cross_attn.k_norm")},
      "mlp": {"w12": _dense("mlp.w12", chunks=2), "w3": _dense("mlp.w3")},
  }


def _stacked(recipe, depth):
  """Turns a per-block recipe into one for the (depth, ...) stacked parameter."""
  keys, fn = recipe
  return ([f"blocks.{i}.{k}" for i in range(depth) for k in keys],
          lambda *arrays: np.stack([fn(*arrays[i * len(keys):(i + 1) * len(keys)])
                                    for i in range(depth)]))


def _recipes(depth, one_step):
  """Recipe tree in the layout of `nnx.state(LightningDiT(...), nnx.Param).to_pure_dict()`."""
  embedder = lambda name: {"linear1": _dense(f"{name}.mlp.0"), "linear2": _dense(f"{name}.mlp.2")}
  is_recipe = lambda x: isinstance(x, tuple)
  tree = {
      # Conv (D, Cin, p, p) -> dense kernel on (ph, pw, cin)-flattened patches.
      "x_embedder": {"kernel": (["x_embedder.proj.weight"],
                                lambda w: w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])),
                     "bias": _copy("x_embedder.proj.bias")},
      "t_embedder": embedder("t_embedder"),
      "t_block": _dense("t_block.1", chunks=6),
      "layer_norm": {"scale": _copy("layer_norm.weight"), "bias": _copy("layer_norm.bias")},
      "mlp_ca": {"fc1": _dense("mlp_ca.fc1"), "fc2": _dense("mlp_ca.fc2")},
      "blocks": jax.tree.map(lambda r: _stacked(r, depth), _block_recipes(), is_leaf=is_recipe),
      "final_layer": {"norm_final": {"weight": _copy("final_layer.norm_final.weight")},
                      "adaLN_modulation": _dense("final_layer.adaLN_modulation.1", chunks=2),
                      "linear": _dense("final_layer.linear")},
  }
  if one_step:
    tree["r_embedder"] = embedder("r_embedder")
  return tree


def _model_kwargs(sd):
  """Infers LightningDiT constructor arguments from official state-dict shapes."""
  for key in ("x_embedder.proj.weight", "final_layer.linear.weight", "blocks.0.attn.q_norm.weight",
              "blocks.0.mlp.w3.weight", "layer_norm.weight", "mlp_ca.fc1.weight"):
    if key not in sd:
      raise ValueError(f"dit.py: the checkpoint has no key {key!r}; is it a VOSR denoiser state "
                       "dict (without a wrapper prefix such as 'module.')?")
  d, cin, p, _ = sd["x_embedder.proj.weight"].shape
  head_dim = sd["blocks.0.attn.q_norm.weight"].shape[0]
  mlp_hidden = sd["blocks.0.mlp.w3.weight"].shape[1]
  if int(2 / 3 * int(d * 4)) != mlp_hidden:
    raise ValueError(f"dit.py: blocks.0.mlp.w3.weight has {mlp_hidden} inputs; mlp_ratio 4 with "
                     f"hidden size {d} gives {int(2 / 3 * int(d * 4))}")
  rope_rows = sd["feat_rope.freqs_cos"].shape[0] if "feat_rope.freqs_cos" in sd else 32 * 32
  return dict(
      latent_channels=sd["final_layer.linear.weight"].shape[0] // (p * p), hidden_size=d,
      depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
      num_heads=d // head_dim, enc_dim=sd["layer_norm.weight"].shape[0], patch_size=p,
      mlp_ratio=4, encdim_ratio=sd["mlp_ca.fc1.weight"].shape[0] // d,
      rope_grid=math.isqrt(rope_rows), one_step="r_embedder.mlp.0.weight" in sd)


def params_from_torch(state_dict):
  """Maps an official VOSR denoiser state dict onto `LightningDiT` parameters
  (docs/official.md §9).

  Linear weights are transposed; fused outputs ([q; k; v], [gate; value], the 6 adaLN chunks, the
  final [shift; scale]) and the stacked cross-attention [k; v] get a separate chunk axis; the
  patch-embed conv becomes a dense kernel on (ph, pw, cin) patches; blocks are stacked on a leading
  axis. `feat_rope.freqs_cos/sin` only give the RoPE training grid (their side); the tables are
  recomputed.

  Args:
    state_dict: official key -> numpy array or torch tensor, without any wrapper prefix.
  Returns:
    (params, model_kwargs): a nested dict of float32 numpy arrays in the layout of
    `nnx.state(LightningDiT(**model_kwargs, rngs=...), nnx.Param).to_pure_dict()`, and the size
    arguments inferred from the shapes (one_step from the presence of `r_embedder`).
  Raises:
    ValueError: naming the missing, unknown or mis-shaped keys.
  """
  sd = {k: to_numpy(v) for k, v in state_dict.items()}
  kwargs = _model_kwargs(sd)
  model = nnx.eval_shape(lambda: LightningDiT(**kwargs, rngs=nnx.Rngs(0)))
  expected = nnx.state(model, nnx.Param).to_pure_dict()
  used = {"feat_rope.freqs_cos", "feat_rope.freqs_sin"}

  def convert(path, recipe, want):
    keys, fn = recipe
    missing = [k for k in keys if k not in sd]
    if missing:
      raise ValueError(f"dit.py: the checkpoint has no key {missing[0]!r} (needed for "
                       f"{jax.tree_util.keystr(path)} of a model with {kwargs})")
    used.update(keys)
    shapes = {k: sd[k].shape for k in keys[:3]}
    try:
      got = fn(*(sd[k] for k in keys))
    except ValueError as e:
      raise ValueError(f"dit.py: cannot convert {shapes} (first keys) for "
                       f"{jax.tree_util.keystr(path)}: {e}") from None
    if got.shape != want.shape:
      raise ValueError(f"dit.py: keys {shapes} (first keys) give {jax.tree_util.keystr(path)} the "
                       f"shape {got.shape}; a model with {kwargs} expects {want.shape}")
    return got

  recipes = _recipes(kwargs["depth"], kwargs["one_step"])
  params = jax.tree_util.tree_map_with_path(
      lambda path, want, recipe: convert(path, recipe, want), expected, recipes)
  unknown = sorted(set(sd) - used)
  if unknown:
    raise ValueError(f"dit.py: the checkpoint has keys no LightningDiT parameter uses: "
                     f"{unknown[:8]} ({len(unknown)} in all)")
  return params, kwargs
