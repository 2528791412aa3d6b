"""Building blocks shared by the networks.

Every parameter carries logical axis names (see `vosr_jax.sharding` for the mapping to mesh axes):
  embed    the model width D                  mlp      MLP hidden widths
  heads    attention heads (x head dim)       kv       key/value widths
  vocab    patch/latent input features        conv_in / conv_out  convolution channels
  layers   the stacked-block axis of scanned block stacks
  norm     normalisation weights
"""
import functools
import math

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def to_numpy(value):
  """A float32 NumPy array of a NumPy array, a JAX array or a torch tensor (any float dtype,
  bf16 and fp16 included, any device); torch itself is not imported here."""
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def init_with_axes(init, *axes):
  """Wraps a parameter initializer so the parameter carries logical axis names `axes`."""
  return nnx.with_partitioning(init, axes)


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "explicit", "explicit_saved")


def dot_product_attention(q, k, v, implementation=None, matmul_dtype=None):
  """Softmax attention with scale hd**-0.5 and no mask.

  Args:
    q: (B, Nq, H, hd); k, v: (B, Nk, H, hd).
    implementation: one of `ATTENTION_IMPLEMENTATIONS`, or None for the backend's fastest:
      "xla"      `jax.nn.dot_product_attention` lowered by XLA (default off CPU);
      "cudnn"    `jax.nn.dot_product_attention`'s cuDNN flash kernel (NVIDIA GPUs);
      "explicit" `explicit_attention`: head-major einsums and a hand-written VJP that recomputes
                 the probabilities from the saved log-normaliser (default on CPU, where XLA's
                 autodiff of the softmax and its transposed operands cost more than the matmuls).
      "explicit_saved" the same VJP from the probabilities kept by the forward pass, in the
                 operands' dtype: (Nq, Nk) more memory per call for one product and exponential
                 less; faster with bfloat16 operands in unrolled blocks, slower in scanned ones
                 (README, "Performance").
    matmul_dtype: None, or the dtype q, k and v are cast to for the attention's products (see
      `low_precision_dot_general`; the logits and softmax stay float32).
  Returns:
    (B, Nq, H, hd) in q's dtype.
  """
  if implementation is None:
    implementation = "explicit" if jax.default_backend() == "cpu" else "xla"
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"layers.py: attention implementation {implementation!r} is not one of "
                     f"{ATTENTION_IMPLEMENTATIONS} or None")
  out_dtype = q.dtype
  if matmul_dtype is not None:
    q, k, v = (a.astype(matmul_dtype) for a in (q, k, v))
  if implementation in ("explicit", "explicit_saved"):
    return explicit_attention(q, k, v, implementation == "explicit_saved").astype(out_dtype)
  return jax.nn.dot_product_attention(
      q, k, v, implementation=None if implementation == "xla" else "cudnn").astype(out_dtype)


def _heads_first(x):
  """(B, N, H, hd) <-> (B, H, N, hd)."""
  return jnp.swapaxes(x, 1, 2)


def _explicit_attention_fwd(q, k, v, save_probabilities):
  """Forward of `explicit_attention`; saves head-major q (scaled), k, v, the output and either the
  probabilities (B, H, Nq, Nk) in v's dtype or the softmax's log-normaliser (B, H, Nq, 1)."""
  q = _heads_first(q) * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  k, v = _heads_first(k), _heads_first(v)
  logits = jnp.einsum("bhnd,bhmd->bhnm", q, k, preferred_element_type=jnp.float32)
  shift = jnp.max(logits, axis=-1, keepdims=True)
  probs = jnp.exp(logits - shift)
  total = jnp.sum(probs, axis=-1, keepdims=True)
  probs = (probs / total).astype(v.dtype)
  out = jnp.einsum("bhnm,bhmd->bhnd", probs, v, preferred_element_type=jnp.float32)
  saved = probs if save_probabilities else shift + jnp.log(total)
  return _heads_first(out).astype(q.dtype), (q, k, v, out, saved)


def _explicit_attention_bwd(save_probabilities, residuals, grad):
  """Softmax-attention VJP (flash-attention's formulas), P saved or recomputed as
  exp(Q K^T - lse).

  dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K * scale, dK = dS^T (Q * scale); dK
  and dV are computed as (hd, Nk) products, so that no (Nq, Nk) matrix is transposed. With
  operands narrower than float32 the (hd, Nq) copies of Q and dO are kept apart by an
  optimisation barrier: folded into the product, the transpose sends it to XLA:CPU's generic dot
  instead of its YNNPACK kernel (measured on a 2-core AMD EPYC at the bench-small
  cross-attention's shapes: 81 against 158 GFLOP/s with bfloat16 operands; 99 against 118 in
  float32, where the whole step showed no difference).
  """
  q, k, v, out, saved = residuals
  grad = _heads_first(grad)
  if save_probabilities:
    probs = saved.astype(jnp.float32)
  else:
    probs = jnp.exp(jnp.einsum("bhnd,bhmd->bhnm", q, k, preferred_element_type=jnp.float32)
                    - saved)
  dprobs = jnp.einsum("bhnd,bhmd->bhnm", grad, v, preferred_element_type=jnp.float32)
  delta = jnp.sum(grad.astype(jnp.float32) * out, axis=-1, keepdims=True)
  dlogits = probs * (dprobs - delta)
  dq = jnp.einsum("bhnm,bhmd->bhnd", dlogits.astype(k.dtype), k,
                  preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  if jnp.finfo(q.dtype).bits < 32:
    q_in, grad_in = jax.lax.optimization_barrier((jnp.swapaxes(q, 2, 3),
                                                  jnp.swapaxes(grad, 2, 3)))
    spec = "bhdn,bhnm->bhdm"
  else:  # float32: the same speed either way, and the program it always was.
    q_in, grad_in, spec = q, grad, "bhnd,bhnm->bhdm"
  dk = jnp.einsum(spec, q_in, dlogits.astype(q.dtype), preferred_element_type=jnp.float32)
  dv = jnp.einsum(spec, grad_in, probs.astype(grad.dtype), preferred_element_type=jnp.float32)
  dk, dv = (jnp.transpose(a, (0, 3, 1, 2)).astype(k.dtype) for a in (dk, dv))
  return _heads_first(dq).astype(q.dtype), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def explicit_attention(q, k, v, save_probabilities=False):
  """Softmax attention (scale hd**-0.5, no mask) with the VJP `_explicit_attention_bwd`.

  Args:
    q: (B, Nq, H, hd); k, v: (B, Nk, H, hd).
    save_probabilities: keep the (B, H, Nq, Nk) probabilities for the VJP (in v's dtype) instead
      of recomputing them from the (B, H, Nq, 1) log-normaliser.
  Returns:
    (B, Nq, H, hd) in q's dtype; the logits, softmax and its gradient run in float32.
  """
  return _explicit_attention_fwd(q, k, v, save_probabilities)[0]


explicit_attention.defvjp(_explicit_attention_fwd, _explicit_attention_bwd)


MATMUL_DTYPES = ("bfloat16",)  # Operand dtypes of `low_precision_dot_general`.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_matmul(x, w, dtype):
  """(M, K) @ (K, N) with both operands cast to `dtype`, accumulated and returned in float32."""
  return _low_precision_matmul_fwd(x, w, dtype)[0]


def _low_precision_matmul_fwd(x, w, dtype):
  """Forward of `_low_precision_matmul`; saves the cast operands."""
  x, w = x.astype(dtype), w.astype(dtype)
  return jnp.dot(x, w, preferred_element_type=jnp.float32), (x, w)


def _low_precision_matmul_bwd(dtype, residuals, grad):
  """dx = g w^T and dw = x^T g from `dtype` operands (the saved casts and the cast cotangent),
  accumulated in float32: the three products of a training step at the operands' speed."""
  x, w = residuals
  grad = grad.astype(dtype)
  dx = jax.lax.dot_general(grad, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  dw = jax.lax.dot_general(x, grad, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx, dw


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def low_precision_dot_general(dtype):
  """A `dot_general` for nnx.Linear/LinearGeneral whose products take `dtype` operands (a
  `MATMUL_DTYPES` name) with float32 accumulation, forward and backward.

  bfloat16 operands run at the speed of the CPU's native bf16 dot instructions (avx512_bf16, AMX)
  where it has them; the result is cast to the input's dtype, so the compute dtype is unchanged.
  Handles the contractions of a dense layer only: the input's trailing axes against the kernel's
  leading ones, no batch axes.
  """
  if dtype not in MATMUL_DTYPES:
    raise ValueError(f"layers.py: matmul dtype {dtype!r} is not one of {MATMUL_DTYPES} or None")

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                  out_sharding=None):
    del precision, preferred_element_type  # The operand dtype decides; the output is lhs's.
    (lhs_axes, rhs_axes), batch_axes = dimension_numbers
    n = len(rhs_axes)
    if (any(batch_axes) or out_sharding is not None or tuple(rhs_axes) != tuple(range(n))
        or tuple(lhs_axes) != tuple(range(lhs.ndim - n, lhs.ndim))):
      raise ValueError(f"layers.py: low_precision_dot_general takes dense-layer contractions "
                       f"only, not {dimension_numbers} (out_sharding {out_sharding})")
    kernel_in = math.prod(rhs.shape[:n])
    out = _low_precision_matmul(lhs.reshape(-1, kernel_in), rhs.reshape(kernel_in, -1), dtype)
    return out.reshape(lhs.shape[:lhs.ndim - n] + rhs.shape[n:]).astype(lhs.dtype)

  return dot_general


def linear(din, dout, axes, *, dtype, param_dtype=jnp.float32, rngs, matmul_dtype=None,
           init=jax.nn.initializers.xavier_uniform(), bias_init=jax.nn.initializers.zeros):
  """A dense layer with a bias, both carrying logical axes (the bias takes `axes[1:]`).

  Args:
    din: input width.
    dout: output width, or a tuple (chunks, width) for a fused projection whose chunks stay a
      separate kernel axis (so sharding the width never splits across chunks); fan-in/fan-out of
      `init` are those of the flat (din, prod(dout)) matrix, as for torch's fused nn.Linear.
    axes: logical names of the kernel axes, len 1 + len(dout).
    matmul_dtype: None (products in `dtype`), or the operand dtype of the product
      (`low_precision_dot_general`).
  Returns:
    nnx.Linear, or nnx.LinearGeneral for a tuple `dout`; output (..., *dout) in `dtype`.
  """
  kw = dict(kernel_init=init_with_axes(init, *axes), bias_init=init_with_axes(bias_init, *axes[1:]),
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  if matmul_dtype is not None:
    kw["dot_general"] = low_precision_dot_general(matmul_dtype)
  if isinstance(dout, tuple):
    return nnx.LinearGeneral(din, dout, **kw)
  return nnx.Linear(din, dout, **kw)


def conv(cin, cout, kernel_size, axes=(None, None, "conv_in", "conv_out"), *, dtype,
         param_dtype=jnp.float32, rngs, strides=1, padding="SAME",
         init=jax.nn.initializers.lecun_normal(), bias_init=jax.nn.initializers.zeros):
  """A square 2D convolution (NHWC, HWIO kernel) with a bias, both carrying logical axes.

  Args:
    cin, cout: input and output channels.
    kernel_size: side of the square kernel.
    axes: logical names of the 4 kernel axes; the bias takes `axes[-1]`.
    strides: int stride for both spatial axes.
    padding: as nnx.Conv ("SAME", "VALID" or explicit ((top, bottom), (left, right)) pairs);
      "SAME" at stride 1 equals torch's `padding=kernel_size // 2` for odd kernels.
    init, bias_init: initializers of the kernel and bias (random init only).
  Returns:
    nnx.Conv with parameters `kernel` (k, k, cin, cout) and `bias` (cout,); output in `dtype`.
  """
  return nnx.Conv(cin, cout, (kernel_size, kernel_size), strides, padding=padding, dtype=dtype,
                  param_dtype=param_dtype, kernel_init=init_with_axes(init, *axes),
                  bias_init=init_with_axes(bias_init, axes[-1]), rngs=rngs)


class RMSNorm(nnx.Module):
  """Llama-style RMSNorm (last axis): normalise in float32, cast to `dtype`, then * weight."""

  def __init__(self, dim, *, dtype, param_dtype=jnp.float32, eps=1e-6):
    self.weight = nnx.Param(
        init_with_axes(jax.nn.initializers.ones, "norm")(None, (dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    """x: (..., dim) -> (..., dim) in `dtype`."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * self.weight[...].astype(self.dtype)


def timestep_embedding(t, dim=256, max_period=10000.0):
  """DiT sinusoidal embedding of the raw time (no x1000 scaling), cosines first.

  Args:
    t: (B,) times.
    dim: embedding width (even).
  Returns:
    (B, dim) float32: [cos(t * f_k), sin(t * f_k)], f_k = exp(-ln(max_period) * k / (dim/2)).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
  """timestep_embedding(t) -> Linear(256, D) -> SiLU -> Linear(D, D); weights N(0, 0.02)."""

  def __init__(self, hidden_size, *, dtype, param_dtype=jnp.float32, rngs, freq_dim=256,
               matmul_dtype=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul_dtype=matmul_dtype,
              init=jax.nn.initializers.normal(0.02))
    self.freq_dim = freq_dim
    self.linear1 = linear(freq_dim, hidden_size, (None, "embed"), **kw)
    self.linear2 = linear(hidden_size, hidden_size, ("mlp", "embed"), **kw)

  def __call__(self, t):
    """t: (B,) -> (B, D)."""
    return self.linear2(jax.nn.silu(self.linear1(timestep_embedding(t, self.freq_dim))))


def rope_tables(grid_hw, head_dim, rope_grid):
  """2D RoPE angle tables (EVA-02 `VisionRotaryEmbeddingFast`, position-interpolated).

  Channels [0, hd/2) rotate by the row position i / h * rope_grid, channels [hd/2, hd) by the column
  position j / w * rope_grid; each half uses the frequencies 10000**(-2k/(hd/2)), k < hd/4, repeated
  in interleaved pairs. On a square grid this is the official table (`forward_flexible`).

  Args:
    grid_hw: (h, w) token grid.
    head_dim: hd (divisible by 4).
    rope_grid: the training grid side the positions are scaled to.
  Returns:
    (cos, sin), float32 numpy arrays of shape (h*w, hd), tokens in row-major order.
  """
  axis_dim = head_dim // 2
  freqs = 1.0 / (10000.0 ** (np.arange(0, axis_dim, 2, dtype=np.float32) / axis_dim))

  def axis_angles(length):
    pos = np.arange(length, dtype=np.float32) / np.float32(length) * np.float32(rope_grid)
    return np.repeat(pos[:, None] * freqs[None, :], 2, axis=-1)  # (length, hd/2)

  h, w = grid_hw
  rows = np.broadcast_to(axis_angles(h)[:, None, :], (h, w, axis_dim))
  cols = np.broadcast_to(axis_angles(w)[None, :, :], (h, w, axis_dim))
  angles = np.concatenate([rows, cols], axis=-1).reshape(h * w, head_dim)
  return np.cos(angles), np.sin(angles)


def apply_rope(x, rope):
  """Rotates the interleaved pairs (2j, 2j+1) of x (B, N, H, hd) by the (N, hd) tables `rope`.

  out[2j] = x[2j] cos - x[2j+1] sin, out[2j+1] = x[2j+1] cos + x[2j] sin; tables in x's dtype.
  """
  cos, sin = (jnp.asarray(a, x.dtype)[None, :, None, :] for a in rope)
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return x * cos + rotated * sin


class SelfAttention(nnx.Module):
  """Fused-qkv self-attention, RMSNorm on q and k (over hd), then 2D RoPE on q and k."""

  def __init__(self, dim, num_heads, *, attention=None, dtype, param_dtype=jnp.float32, rngs,
               matmul_dtype=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul_dtype=matmul_dtype)
    self.num_heads, self.attention, self.matmul_dtype = num_heads, attention, matmul_dtype
    self.qkv = linear(dim, (3, dim), ("embed", None, "heads"), **kw)
    self.q_norm = RMSNorm(dim // num_heads, dtype=dtype, param_dtype=param_dtype)
    self.k_norm = RMSNorm(dim // num_heads, dtype=dtype, param_dtype=param_dtype)
    self.proj = linear(dim, dim, ("heads", "embed"), **kw)

  def __call__(self, x, rope):
    """x: (B, N, D), rope: (cos, sin) tables (N, hd) -> (B, N, D)."""
    q, k, v = einops.rearrange(self.qkv(x), "b n qkv (h d) -> qkv b n h d", h=self.num_heads)
    q = apply_rope(self.q_norm(q), rope)
    k = apply_rope(self.k_norm(k), rope)
    out = dot_product_attention(q, k, v, self.attention, self.matmul_dtype)
    return self.proj(einops.rearrange(out, "b n h d -> b n (h d)"))


class CrossAttention(nnx.Module):
  """Attention from x to a condition sequence: separate q and fused kv, RMSNorm q/k, no RoPE."""

  def __init__(self, dim, num_heads, *, attention=None, dtype, param_dtype=jnp.float32, rngs,
               matmul_dtype=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul_dtype=matmul_dtype)
    self.num_heads, self.attention, self.matmul_dtype = num_heads, attention, matmul_dtype
    self.q_linear = linear(dim, dim, ("embed", "heads"), **kw)
    self.kv_linear = linear(dim, (2, dim), ("embed", None, "heads"), **kw)
    self.q_norm = RMSNorm(dim // num_heads, dtype=dtype, param_dtype=param_dtype)
    self.k_norm = RMSNorm(dim // num_heads, dtype=dtype, param_dtype=param_dtype)
    self.proj = linear(dim, dim, ("heads", "embed"), **kw)

  def __call__(self, x, cond):
    """x: (B, N, D), cond: (B, M, D) -> (B, N, D)."""
    q = self.q_norm(einops.rearrange(self.q_linear(x), "b n (h d) -> b n h d", h=self.num_heads))
    k, v = einops.rearrange(self.kv_linear(cond), "b m kv (h d) -> kv b m h d", h=self.num_heads)
    out = dot_product_attention(q, self.k_norm(k), v, self.attention, self.matmul_dtype)
    return self.proj(einops.rearrange(out, "b n h d -> b n (h d)"))


class SwiGLU(nnx.Module):
  """w3(silu(gate) * value), where w12(x) gives [gate, value] as a (2, hidden) output axis."""

  def __init__(self, dim, hidden, *, dtype, param_dtype=jnp.float32, rngs, matmul_dtype=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul_dtype=matmul_dtype)
    self.w12 = linear(dim, (2, hidden), ("embed", None, "mlp"), **kw)
    self.w3 = linear(hidden, dim, ("mlp", "embed"), **kw)

  def __call__(self, x):
    """x: (..., D) -> (..., D)."""
    h = self.w12(x)
    return self.w3(jax.nn.silu(h[..., 0, :]) * h[..., 1, :])


class Mlp(nnx.Module):
  """fc1 -> GELU (tanh approximation) -> fc2 (timm `Mlp` with approx_gelu)."""

  def __init__(self, din, hidden, dout, *, dtype, param_dtype=jnp.float32, rngs,
               matmul_dtype=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul_dtype=matmul_dtype)
    self.fc1 = linear(din, hidden, ("embed", "mlp"), **kw)
    self.fc2 = linear(hidden, dout, ("mlp", "embed"), **kw)

  def __call__(self, x):
    """x: (..., din) -> (..., dout)."""
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))
