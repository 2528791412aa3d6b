"""A small PyTorch LightningDiT written from the official code's description in
docs/official.md §1, with the official state-dict keys.

It is the reference the JAX denoiser is checked against: NCHW, square grids only, RoPE tables
rebuilt for the input's grid as the official `forward_flexible` does, `feat_rope.freqs_*` buffers
for the training grid kept so the state dict has every official key.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):

  def __init__(self, dim, eps=1e-6):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class TimestepEmbedder(nn.Module):

  def __init__(self, dim, freq=256):
    super().__init__()
    self.freq = freq
    self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

  def forward(self, t):
    half = self.freq // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def rope_table(side, head_dim, pt_seq_len):
  """(side*side, hd) cos and sin: first half row position, second half column, pairs repeated."""
  dim = head_dim // 2
  freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[:dim // 2].float() / dim))
  pos = torch.arange(side).float() / side * pt_seq_len
  ang = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (L, dim)
  rows, cols = ang[:, None, :].expand(side, side, dim), ang[None, :, :].expand(side, side, dim)
  full = torch.cat([rows, cols], dim=-1).reshape(side * side, head_dim)
  return full.cos(), full.sin()


def rotate_pairs(x):
  x = x.unflatten(-1, (-1, 2))
  return torch.stack([-x[..., 1], x[..., 0]], dim=-1).flatten(-2)


class Attention(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.q_norm, self.k_norm = RMSNorm(dim // heads), RMSNorm(dim // heads)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, cos, sin):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    q = q * cos.to(q.dtype) + rotate_pairs(q) * sin.to(q.dtype)
    k = k * cos.to(k.dtype) + rotate_pairs(k) * sin.to(k.dtype)
    out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.q_linear, self.k_linear, self.v_linear = (nn.Linear(dim, dim) for _ in range(3))
    self.q_norm, self.k_norm = RMSNorm(dim // heads), RMSNorm(dim // heads)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, cond):
    b, n, d = x.shape
    split = lambda y: y.reshape(b, y.shape[1], self.heads, -1).transpose(1, 2)
    q = self.q_norm(split(self.q_linear(x)))
    k = self.k_norm(split(self.k_linear(cond)))
    out = F.scaled_dot_product_attention(q, k, split(self.v_linear(cond)))
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    a, b = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(a) * b)


class Mlp(nn.Module):

  def __init__(self, din, hidden, dout):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(din, hidden), nn.Linear(hidden, dout)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):

  def __init__(self, dim, heads, mlp_ratio):
    super().__init__()
    self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
    self.attn = Attention(dim, heads)
    self.cross_attn = CrossAttention(dim, heads)
    self.mlp = SwiGLU(dim, int(2 / 3 * int(dim * mlp_ratio)))
    self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

  def forward(self, x, c0, zc, cos, sin):
    chunks = (self.scale_shift_table[None] + c0.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks
    x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa, cos, sin)
    x = x + self.cross_attn(x, zc)
    return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class FinalLayer(nn.Module):

  def __init__(self, dim, out):
    super().__init__()
    self.norm_final = RMSNorm(dim)
    self.linear = nn.Linear(dim, out)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(self.norm_final(x) * (1 + scale[:, None]) + shift[:, None])


class PatchEmbed(nn.Module):

  def __init__(self, cin, dim, p):
    super().__init__()
    self.proj = nn.Conv2d(cin, dim, kernel_size=p, stride=p)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class LightningDiT(nn.Module):

  def __init__(self, *, latent_channels, hidden_size, depth, num_heads, enc_dim, input_size,
               patch_size=2, mlp_ratio=4, encdim_ratio=3, one_step=False):
    super().__init__()
    d, p, c = hidden_size, patch_size, latent_channels
    self.p, self.c, self.hd, self.grid = p, c, d // num_heads, input_size // patch_size
    self.x_embedder = PatchEmbed(2 * c, d, p)
    self.t_embedder = TimestepEmbedder(d)
    self.r_embedder = TimestepEmbedder(d) if one_step else None
    self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
    self.layer_norm = nn.LayerNorm(enc_dim)
    self.mlp_ca = Mlp(enc_dim, d * encdim_ratio, d)
    self.blocks = nn.ModuleList([Block(d, num_heads, mlp_ratio) for _ in range(depth)])
    self.final_layer = FinalLayer(d, p * p * c)
    self.feat_rope = nn.Module()
    cos, sin = rope_table(self.grid, self.hd, self.grid)
    self.feat_rope.register_buffer("freqs_cos", cos)
    self.feat_rope.register_buffer("freqs_sin", sin)

  def forward(self, x, t, r=None, z=None):
    """x: (B, 2C, H, W) = [LR latent, z_t]; t, r: (B,); z: [tokens (B, M, enc)] -> (B, C, H, W)."""
    b, _, hh, ww = x.shape
    assert hh == ww
    side = hh // self.p
    cos, sin = rope_table(side, self.hd, self.grid)
    x = self.x_embedder(x)
    c = self.t_embedder(t)
    if self.r_embedder is not None:
      c = c + self.r_embedder(r) * (t - r)[:, None]
    c0 = self.t_block(c)
    zc = self.mlp_ca(self.layer_norm(z[0]))
    for block in self.blocks:
      x = block(x, c0, zc, cos, sin)
    x = self.final_layer(x, c).reshape(b, side, side, self.p, self.p, self.c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, self.c, hh, ww)
