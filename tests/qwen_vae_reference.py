"""A small PyTorch Qwen-Image 2D VAE written from the official code's description in
docs/official.md §3.3, for tests only.

Official key names (`encoder.down_blocks.{i}`, `mid_block.resnets.{i}`, `resample.1`, `gamma` of
shape (C, 1, 1), ...), NCHW tensors, images in [-1, 1].
"""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm2D(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.scale = dim ** 0.5
    self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

  def forward(self, x):
    return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock2D(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.norm1 = RMSNorm2D(cin)
    self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
    self.norm2 = RMSNorm2D(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
    self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return self.conv_shortcut(x) + h


class AttentionBlock2D(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.norm = RMSNorm2D(dim)
    self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
    self.proj = nn.Conv2d(dim, dim, 1)

  def forward(self, x):
    b, c, h, w = x.shape
    qkv = self.to_qkv(self.norm(x)).reshape(b, 3, c, h * w).permute(1, 0, 3, 2)  # (3, b, hw, c)
    attn = torch.softmax(qkv[0] @ qkv[1].transpose(1, 2) * c ** -0.5, dim=-1)
    y = (attn @ qkv[2]).permute(0, 2, 1).reshape(b, c, h, w)
    return x + self.proj(y)


class Resample2D(nn.Module):

  def __init__(self, dim, mode):
    super().__init__()
    if mode == "down":
      self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
    else:
      self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                    nn.Conv2d(dim, dim // 2, 3, padding=1))

  def forward(self, x):
    return self.resample(x)


class MidBlock(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.resnets = nn.ModuleList([ResidualBlock2D(dim, dim), ResidualBlock2D(dim, dim)])
    self.attentions = nn.ModuleList([AttentionBlock2D(dim)])

  def forward(self, x):
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):

  def __init__(self, base_dim, z_dim, dim_mult, num_res_blocks):
    super().__init__()
    dims = [base_dim * m for m in [1, *dim_mult]]
    self.conv_in = nn.Conv2d(3, dims[0], 3, padding=1)
    blocks = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(num_res_blocks):
        blocks.append(ResidualBlock2D(cin, cout))
        cin = cout
      if i != len(dim_mult) - 1:
        blocks.append(Resample2D(cout, "down"))
    self.down_blocks = nn.ModuleList(blocks)
    self.mid_block = MidBlock(dims[-1])
    self.norm_out = RMSNorm2D(dims[-1])
    self.conv_out = nn.Conv2d(dims[-1], 2 * z_dim, 3, padding=1)

  def forward(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    return self.conv_out(F.silu(self.norm_out(self.mid_block(x))))


class UpBlock(nn.Module):

  def __init__(self, cin, cout, num_res_blocks, upsample):
    super().__init__()
    self.resnets = nn.ModuleList(
        [ResidualBlock2D(cin if j == 0 else cout, cout) for j in range(num_res_blocks + 1)])
    self.upsamplers = nn.ModuleList([Resample2D(cout, "up")]) if upsample else None

  def forward(self, x):
    for block in self.resnets:
      x = block(x)
    return x if self.upsamplers is None else self.upsamplers[0](x)


class Decoder(nn.Module):

  def __init__(self, base_dim, z_dim, dim_mult, num_res_blocks):
    super().__init__()
    dims = [base_dim * m for m in [dim_mult[-1], *dim_mult[::-1]]]
    self.conv_in = nn.Conv2d(z_dim, dims[0], 3, padding=1)
    self.mid_block = MidBlock(dims[0])
    self.up_blocks = nn.ModuleList([
        UpBlock(cin if i == 0 else cin // 2, cout, num_res_blocks, i != len(dim_mult) - 1)
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:]))])
    self.norm_out = RMSNorm2D(dims[-1])
    self.conv_out = nn.Conv2d(dims[-1], 3, 3, padding=1)

  def forward(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(F.silu(self.norm_out(x)))


class QwenImageVAE2D(nn.Module):

  def __init__(self, base_dim, z_dim, dim_mult, num_res_blocks, latents_mean, latents_std):
    super().__init__()
    self.encoder = Encoder(base_dim, z_dim, dim_mult, num_res_blocks)
    self.quant_conv = nn.Conv2d(2 * z_dim, 2 * z_dim, 1)
    self.post_quant_conv = nn.Conv2d(z_dim, z_dim, 1)
    self.decoder = Decoder(base_dim, z_dim, dim_mult, num_res_blocks)
    self.register_buffer("mean", torch.tensor(latents_mean).view(1, -1, 1, 1), persistent=False)
    self.register_buffer("inv_std", 1.0 / torch.tensor(latents_std).view(1, -1, 1, 1),
                         persistent=False)

  def posterior(self, x):
    """x: (B, 3, H, W) -> (mean, std) of the unnormalised latent."""
    mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

  def normalize(self, sample):
    return (sample - self.mean) * self.inv_std

  def decode(self, latents):
    z = latents / self.inv_std + self.mean
    return self.decoder(self.post_quant_conv(z)).clamp(-1.0, 1.0)
