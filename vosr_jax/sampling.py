"""Samplers (guided multi-step Euler, one-step), latent tiling, tiled VAE, and the end-to-end
super-resolution function (docs/official.md §6).

Layers, from the inside out:
  * a velocity function `velocity(z, lr, t, tokens, r)` (scalar t and r) wraps the denoiser
    `apply_fn(z, lr, t, tokens, r)` (batched t, r): `guided_velocity` (multi-step, restoration
    guidance with the weak branch batched with the conditional one) or `plain_velocity` (one-step);
  * a field `field(z, t, r)` applies it to the whole latent, or to square-ish tiles whose velocities
    are blended with Gaussian weights at every step (`Tiles`);
  * `euler_step` moves z from t_k to t_{k+1}; `sample_multistep` / `sample_onestep` loop it.
`super_resolve` = `prepare` (VAE encode, encoder tokens, noise) -> Euler steps -> `finish`
(decode, crop, colour fix, rounding to uint8); the stages are public so that a caller can run the
steps one by one (a progress bar for large images) with the same code.

Everything is pure and jits once per image size and `Settings`.
"""
import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vosr_jax import color_fix, objectives
from vosr_jax.models import vit

# Gaussian blend weights of a tile: exp(-((y - (n-1)/2) / n)^2 / 0.02) per axis
# (docs/official.md §6.5).
_BLEND_VARIANCE = 0.01


# ------------------------------------------------------------------------------------------------
# Velocities and the Euler loop.

def guided_velocity(apply_fn, cfg_scale, weak_strength):
  """Restoration-guided velocity v_weak + cfg * (v_cond - v_weak) (docs/official.md §6.3).

  Args:
    apply_fn: denoiser (z (B,h,w,C), lr (B,h,w,C), t (B,), tokens (B,N,D), r (B,) | None) ->
      velocity (B,h,w,C).
    cfg_scale: guidance scale s (1 = conditional only, and the weak branch is not evaluated;
      0 = weak only).
    weak_strength: w of the weak condition (w * lr latent, zero tokens).
  Returns:
    velocity(z, lr, t, tokens, r) with scalar t; r is ignored (multi-step models have no r).
  """
  def velocity(z, lr, t, tokens, r):
    del r
    b = z.shape[0]
    if isinstance(cfg_scale, (int, float)) and cfg_scale == 1:  # The weak branch has weight 0.
      return apply_fn(z, lr, jnp.full((b,), t, jnp.float32), tokens, None)
    out = apply_fn(jnp.concatenate([z, z]), jnp.concatenate([lr, weak_strength * lr]),
                   jnp.full((2 * b,), t, jnp.float32),
                   jnp.concatenate([tokens, jnp.zeros_like(tokens)]), None)
    v_cond, v_weak = out[:b], out[b:]
    return v_weak + cfg_scale * (v_cond - v_weak)

  return velocity


def plain_velocity(apply_fn):
  """The one-step student's average velocity u(z, t, r) without guidance
  (docs/official.md §6.4)."""
  def velocity(z, lr, t, tokens, r):
    b = z.shape[0]
    return apply_fn(z, lr, jnp.full((b,), t, jnp.float32), tokens,
                    None if r is None else jnp.full((b,), r, jnp.float32))

  return velocity


def latent_velocity(velocity, residual_scale):
  """`velocity` (of the flow the denoiser learnt) as the velocity of the latent.

  With the official latent target (`residual_scale` None) the two are the same. With the residual
  target the denoiser's flow lives in x = `objectives.to_flow`(z, lr) = (z - lr) / s, s =
  `objectives.scale_map`(lr) (fixed along the path); Euler steps on z = lr + s x with the velocity
  s * v(x) are exactly Euler steps on x, so the samplers keep one latent-space state whatever the
  target (start: `objectives.from_flow`(noise, lr)). Tiles compute a local s from their own LR
  crop, which differs from the whole image's only within window // 2 of a tile edge, where the
  blend weights are small.

  Args:
    velocity: (z, lr, t, tokens, r) -> velocity in the denoiser's flow space.
    residual_scale: an `objectives.ResidualScale`, or None.
  Returns:
    (z, lr, t, tokens, r) -> latent-space velocity.
  """
  if residual_scale is None:
    return velocity

  def wrapped(z, lr, t, tokens, r):
    x = objectives.to_flow(z, lr, residual_scale)
    return objectives.scale_map(lr, residual_scale) * velocity(x, lr, t, tokens, r)

  return wrapped


def time_grid(num_steps):
  """t_k = linspace(1, 0, N + 1): (N + 1,) float32."""
  return jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)


def euler_step(field, z, k, num_steps, with_r):
  """z_{k+1} = z_k - (t_k - t_{k+1}) field(z_k, t_k, r), r = t_{k+1} for one-step models.

  Args:
    field: (z, t, r) -> velocity, see `make_field`.
    z: (B, h, w, C) float32 latent at t_k.
    k: step index in [0, num_steps) (may be traced).
    num_steps: N of the time grid.
    with_r: pass r = t_{k+1} (one-step students) or None.
  """
  times = time_grid(num_steps)
  t, t_next = times[k], times[k + 1]
  return z - (t - t_next) * field(z, t, t_next if with_r else None)


def _integrate(field, noise, num_steps, with_r):
  return jax.lax.fori_loop(
      0, num_steps, lambda k, z: euler_step(field, z, k, num_steps, with_r),
      noise.astype(jnp.float32))


def sample_multistep(apply_fn, lr_latent, tokens, noise, *, num_steps, cfg_scale, weak_strength,
                     tiles=None, residual_scale=None):
  """Guided Euler from t = 1 (noise) to 0 (docs/official.md §6.3): 2N denoiser evaluations per
  image (N with cfg_scale 1).

  Args:
    apply_fn: the denoiser, see `guided_velocity`.
    lr_latent: (B, h, w, C) clean LR latent.
    tokens: (B, N, D) encoder tokens, or (T, B, N, D) per tile when `tiles` is given.
    noise: (B, h, w, C) the latent z_1 at t = 1: `objectives.from_flow`(N(0, I) noise, lr),
      drawn once for the whole latent (the noise itself for the official latent target).
    num_steps: N.
    cfg_scale, weak_strength: see `guided_velocity`.
    tiles: None (whole latent) or a `Tiles` layout.
    residual_scale: None (official latent target) or the residual target's scale, see
      `latent_velocity`.
  Returns:
    (B, h, w, C) float32 latent z_0.
  """
  velocity = latent_velocity(guided_velocity(apply_fn, cfg_scale, weak_strength), residual_scale)
  field = make_field(velocity, lr_latent, tokens, tiles)
  return _integrate(field, noise, num_steps, with_r=False)


def sample_onestep(apply_fn, lr_latent, tokens, noise, *, num_steps, tiles=None,
                   residual_scale=None):
  """One-step student sampling (docs/official.md §6.4):
  z <- z - (t_k - t_{k+1}) u(z, t_k, r = t_{k+1}).

  Args: as `sample_multistep`, without guidance. Returns: (B, h, w, C) float32 latent z_0.
  """
  field = make_field(latent_velocity(plain_velocity(apply_fn), residual_scale), lr_latent, tokens,
                     tiles)
  return _integrate(field, noise, num_steps, with_r=True)


# ------------------------------------------------------------------------------------------------
# Tiling.

@dataclasses.dataclass(frozen=True)
class Tiles:
  """A static tile layout on a grid (latent pixels): tile size and the tiles' top-left corners."""
  size: tuple[int, int]
  starts: tuple[tuple[int, int], ...]


def _axis_starts(length, tile, overlap):
  """range(0, L - t + 1, max(t - ov, 1)) plus L - t when the last tile stops short
  (docs/official.md §6.5)."""
  starts = list(range(0, length - tile + 1, max(tile - min(overlap, tile - 1), 1)))
  if starts[-1] + tile < length:
    starts.append(length - tile)
  return starts


def tile_layout(grid_hw, tile, overlap):
  """Tiles of side `tile` (capped by each grid side) overlapping by `overlap` grid pixels.

  Returns None when one tile covers the grid, so tiled and untiled runs are then identical.
  """
  th, tw = min(tile, grid_hw[0]), min(tile, grid_hw[1])
  if (th, tw) == tuple(grid_hw):
    return None
  return Tiles((th, tw), tuple((h, w) for h in _axis_starts(grid_hw[0], th, overlap)
                               for w in _axis_starts(grid_hw[1], tw, overlap)))


def denoiser_tiles(latent_hw, tile_size, tile_overlap, downsample, patch_size):
  """The official latent tile geometry (docs/official.md §6.5) from pixel sizes; None when tiling
  is off.

  lt = max((tile_size // d // p) * p, p) latent pixels, overlap max(tile_overlap // d, lt // 8).
  Departure: a tile is lt x lt capped per axis by the latent, so a wide image keeps tiles of full
  height instead of shrinking both sides to the short one.
  """
  if not tile_size:
    return None
  lt = max((tile_size // downsample // patch_size) * patch_size, patch_size)
  return tile_layout(latent_hw, lt, max(tile_overlap // downsample, lt // 8))


def gaussian_weights(size):
  """(h, w) float32 separable Gaussian blend weights of a tile (docs/official.md §6.5)."""
  def axis(n):
    x = (np.arange(n) - (n - 1) / 2) / n
    return np.exp(-x * x / (2 * _BLEND_VARIANCE))
  return np.outer(axis(size[0]), axis(size[1])).astype(np.float32)


def ramp_weights(size, overlap):
  """(h, w) float32 weights rising linearly over `overlap` pixels at each tile edge, 1 inside."""
  def axis(n):
    i = np.arange(n)
    return np.minimum(1.0, np.minimum(i + 1, n - i) / (overlap + 1))
  return np.outer(axis(size[0]), axis(size[1])).astype(np.float32)


def blend_tiles(fn, x, tiles, weights, *, in_scale=1, out_scale=1, per_tile=None):
  """sum_i fn(crop_i(x), per_tile[i], i) * W / sum_i W over a static tile layout.

  Tiles run sequentially (lax.scan), so memory holds one tile's activations at a time.

  Args:
    fn: (crop (B, th*in_scale, tw*in_scale, Cin), per_tile slice or None, tile index) ->
      (B, th*out_scale, tw*out_scale, Cout).
    x: (B, H*in_scale, W*in_scale, Cin); H, W the grid of `tiles`.
    tiles: `Tiles` on the (H, W) grid.
    weights: (th*out_scale, tw*out_scale) numpy blend weights.
    in_scale, out_scale: pixels of x / of the output per grid pixel.
    per_tile: optional pytree with a leading tile axis, sliced for each tile.
  Returns:
    (B, H*out_scale, W*out_scale, Cout) float32.
  """
  b, th, tw = x.shape[0], *tiles.size
  out_hw = (x.shape[1] // in_scale * out_scale, x.shape[2] // in_scale * out_scale)
  total = np.zeros(out_hw, np.float32)
  for h0, w0 in tiles.starts:
    total[h0 * out_scale:(h0 + th) * out_scale, w0 * out_scale:(w0 + tw) * out_scale] += weights
  starts = jnp.asarray(tiles.starts, jnp.int32)
  w = jnp.asarray(weights)[None, :, :, None]
  out_size = (th * out_scale, tw * out_scale)

  def body(acc, xs):
    (h0, w0), extra, i = xs
    crop = jax.lax.dynamic_slice(x, (0, h0 * in_scale, w0 * in_scale, 0),
                                 (b, th * in_scale, tw * in_scale, x.shape[3]))
    y = fn(crop, extra, i).astype(jnp.float32)
    corner = (0, h0 * out_scale, w0 * out_scale, 0)
    old = jax.lax.dynamic_slice(acc, corner, (b, *out_size, y.shape[3]))
    return jax.lax.dynamic_update_slice(acc, old + y * w, corner), None

  out_channels = jax.eval_shape(
      lambda c, e: fn(c, e, 0), jax.ShapeDtypeStruct((b, th * in_scale, tw * in_scale, x.shape[3]),
                                                    x.dtype),
      None if per_tile is None else jax.tree.map(lambda a: a[0], per_tile)).shape[3]
  acc = jnp.zeros((b, *out_hw, out_channels), jnp.float32)
  acc = jax.lax.scan(body, acc, (starts, per_tile, jnp.arange(len(tiles.starts))))[0]
  return acc / jnp.asarray(total)[None, :, :, None]


def make_field(velocity, lr_latent, tokens, tiles):
  """field(z, t, r): `velocity` on the whole latent, or Gaussian-blended over `tiles`.

  Args:
    velocity: (z, lr, t, tokens, r) -> velocity, see `guided_velocity`.
    lr_latent: (B, h, w, C).
    tokens: (B, N, D), or (T, B, N, D) per tile when `tiles` is given.
    tiles: None or `Tiles` on the (h, w) latent grid.
  """
  if tiles is None:
    return lambda z, t, r: velocity(z, lr_latent, t, tokens, r)
  c = lr_latent.shape[3]
  weights = gaussian_weights(tiles.size)

  def field(z, t, r):
    def tile_velocity(crop, tile_tokens, i):
      del i
      return velocity(crop[..., c:], crop[..., :c], t, tile_tokens, r)
    return blend_tiles(tile_velocity, jnp.concatenate([lr_latent, z], axis=3), tiles, weights,
                       per_tile=tokens)

  return field


# ------------------------------------------------------------------------------------------------
# Tiled VAE.

def encode(autoencoder, images, key, tile_size, tile_overlap):
  """Autoencoder latents of `images`, in overlapping pixel tiles when larger than `tile_size`.

  Each tile draws its posterior sample from `fold_in(key, tile index)`; latents are blended with
  linear ramps over the overlap.

  Args:
    autoencoder: module with `encode(images, key)` and `downsample` d.
    images: (B, H, W, 3) in [-1, 1]; H, W multiples of d.
    key: PRNG key.
    tile_size, tile_overlap: pixels; tile_size 0 disables tiling.
  Returns:
    (B, H/d, W/d, C) float32.
  """
  d = autoencoder.downsample
  grid = (images.shape[1] // d, images.shape[2] // d)
  tiles = tile_layout(grid, max(tile_size // d, 1), tile_overlap // d) if tile_size else None
  if tiles is None:
    return autoencoder.encode(images, key)
  return blend_tiles(lambda crop, _, i: autoencoder.encode(crop, jax.random.fold_in(key, i)),
                     images, tiles, ramp_weights(tiles.size, tile_overlap // d), in_scale=d)


def decode(autoencoder, latents, tile_size, tile_overlap):
  """Images of `latents`, decoded in overlapping tiles when larger than `tile_size` pixels.

  Args:
    autoencoder: module with `decode(latents)` and `downsample` d.
    latents: (B, h, w, C).
    tile_size, tile_overlap: pixels; tile_size 0 disables tiling.
  Returns:
    (B, h*d, w*d, 3) float32 in [-1, 1].
  """
  d = autoencoder.downsample
  tiles = tile_layout(latents.shape[1:3], max(tile_size // d, 1), tile_overlap // d) \
      if tile_size else None
  if tiles is None:
    return autoencoder.decode(latents)
  return blend_tiles(lambda crop, _, i: autoencoder.decode(crop), latents, tiles,
                     ramp_weights((tiles.size[0] * d, tiles.size[1] * d), tile_overlap),
                     out_scale=d)


# ------------------------------------------------------------------------------------------------
# End to end.

@dataclasses.dataclass(frozen=True)
class Networks:
  """The static half of an inference pipeline: graph definitions and the facts sampling needs.

  Attributes:
    denoiser, encoder, autoencoder: nnx GraphDefs; their params are `{'denoiser': ...,
      'encoder': ..., 'autoencoder': ...}` pure dicts passed separately.
    tap_layer: encoder block whose tokens condition the denoiser.
    encoder_size: square side the encoder input is resized to (448 for DINOv2).
    downsample: autoencoder factor d.
    patch_size: denoiser patch p (latent sides must be multiples of it).
    one_step: a one-step student (has an r embedder) or a multi-step model.
    residual_scale: None (the official latent target) or the `objectives.ResidualScale` of a
      denoiser trained with `config.objective.target='residual'`.
  """
  denoiser: Any = dataclasses.field(repr=False)
  encoder: Any = dataclasses.field(repr=False)
  autoencoder: Any = dataclasses.field(repr=False)
  tap_layer: int
  encoder_size: int
  downsample: int
  patch_size: int
  one_step: bool
  residual_scale: objectives.ResidualScale | None = None

  @property
  def multiple(self):
    """Image sides must be multiples of this many pixels (d * p); `prepare` pads to it."""
    return self.downsample * self.patch_size


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static sampling settings (hashable: a change recompiles); `from_config` makes them from a
  sampling config section (configs/sampling.py), the only source of their defaults.

  Attributes:
    num_steps: Euler steps.
    cfg_scale, weak_strength: guidance (multi-step only).
    tile_size, tile_overlap: denoiser tiles in output pixels (tile_size 0: whole latent).
    vae_tile_size, vae_tile_overlap: autoencoder tiles in pixels (0: whole image).
    color_fix: one of `color_fix.METHODS`.
    noise_scale: the starting noise is N(0, noise_scale^2 I) in the denoiser's flow space: 1 is
      the distribution the model was trained from (official); below 1 trades sampled detail for
      fidelity (0: deterministic, close to the posterior mean when few steps are taken).
  """
  num_steps: int
  cfg_scale: float
  weak_strength: float
  tile_size: int
  tile_overlap: int
  vae_tile_size: int
  vae_tile_overlap: int
  color_fix: str
  noise_scale: float

  @classmethod
  def from_config(cls, config, one_step, **overrides):
    """The settings of a sampling config section for a one-step or a multi-step model.

    Args:
      config: a configs/sampling.py ConfigDict (`num_steps` for multi-step models,
        `onestep_num_steps` for one-step students, and the other fields by name).
      one_step: whether the model is a one-step student (`dit.is_one_step`).
      **overrides: fields that win over the config (e.g. command-line flags); None values are
        ignored.
    """
    values = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name != "num_steps"}
    values["num_steps"] = config.onestep_num_steps if one_step else config.num_steps
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def image_key(seed, name):
  """The per-image key: fold_in(key(seed), crc32(name)), independent of file order and count."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode("utf-8")))


def padded_size(hw, multiple):
  """(H, W) rounded up to multiples of `multiple`."""
  return tuple(-(-s // multiple) * multiple for s in hw)


def layout(networks, image_hw, settings):
  """The denoiser `Tiles` for an (H, W) image (before padding), or None when untiled."""
  ph, pw = padded_size(image_hw, networks.multiple)
  return latent_layout(networks, (ph // networks.downsample, pw // networks.downsample), settings)


def latent_layout(networks, latent_hw, settings):
  """The denoiser `Tiles` on an (h, w) latent grid, or None when untiled."""
  return denoiser_tiles(latent_hw, settings.tile_size, settings.tile_overlap, networks.downsample,
                        networks.patch_size)


def _modules(networks, params):
  return {name: nnx.merge(getattr(networks, name), params[name], copy=True)
          for name in ("denoiser", "encoder", "autoencoder")}


def _tokens(encoder, networks, images):
  return encoder(vit.preprocess(images, networks.encoder_size), tap_layer=networks.tap_layer)


def prepare(networks, params, images, keys, settings):
  """Pads, encodes, extracts encoder tokens and draws the noise of a batch.

  Args:
    networks, params: the pipeline (`Networks` and its parameter dicts).
    images: (B, H, W, 3) LR images already upscaled to the output size, in [-1, 1].
    keys: (B,) per-image PRNG keys (`image_key`); row i depends only on images[i] and keys[i].
    settings: `Settings`.
  Returns:
    dict(z (B, h, w, C) the latent at t = 1 (see `sample_multistep`), lr_latent (B, h, w, C),
    tokens (B, N, D) or (T, B, N, D) per tile).
  """
  m = _modules(networks, params)
  h, w = images.shape[1:3]
  ph, pw = padded_size((h, w), networks.multiple)
  padded = jnp.pad(images, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="reflect")
  split = jax.vmap(jax.random.split)(keys)

  def encode_one(image, key):
    return encode(m["autoencoder"], image[None], key, settings.vae_tile_size,
                  settings.vae_tile_overlap)[0]

  lr_latent = jax.vmap(encode_one)(padded, split[:, 0])
  noise = jax.vmap(lambda k: jax.random.normal(k, lr_latent.shape[1:], jnp.float32))(split[:, 1])
  noise = objectives.from_flow(settings.noise_scale * noise, lr_latent, networks.residual_scale)
  tiles = layout(networks, (h, w), settings)
  if tiles is None:
    tokens = _tokens(m["encoder"], networks, padded)
  else:
    d = networks.downsample
    size = (tiles.size[0] * d, tiles.size[1] * d)
    starts = jnp.asarray(tiles.starts, jnp.int32) * d
    tokens = jax.lax.map(lambda s: _tokens(m["encoder"], networks, jax.lax.dynamic_slice(
        padded, (0, s[0], s[1], 0), (padded.shape[0], *size, 3))), starts)
  return dict(z=noise, lr_latent=lr_latent, tokens=tokens)


def _apply_fn(networks, params):
  model = _modules(networks, params)["denoiser"]
  return lambda z, lr, t, tokens, r: model(z, lr, t, tokens, r=r)


def _velocity(networks, params, settings):
  apply_fn = _apply_fn(networks, params)
  if networks.one_step:
    velocity = plain_velocity(apply_fn)
  else:
    velocity = guided_velocity(apply_fn, settings.cfg_scale, settings.weak_strength)
  return latent_velocity(velocity, networks.residual_scale)


def step(networks, params, state, k, settings):
  """One Euler step (index k, may be traced) of `prepare`'s state; returns the state with the new z.

  For running the steps one by one from the host (e.g. with a progress bar); `super_resolve` does
  the same steps inside one compiled loop.
  """
  field = make_field(_velocity(networks, params, settings), state["lr_latent"], state["tokens"],
                     latent_layout(networks, state["lr_latent"].shape[1:3], settings))
  return {**state, "z": euler_step(field, state["z"], k, settings.num_steps, networks.one_step)}


def finish(networks, params, z, images, settings):
  """Decodes z_0, crops the padding, colour-fixes against `images` and rounds to uint8.

  Args:
    z: (B, h, w, C) final latent.
    images: (B, H, W, 3) the upscaled LR input of `prepare`, in [-1, 1].
  Returns:
    (B, H, W, 3) uint8.
  """
  ae = _modules(networks, params)["autoencoder"]
  h, w = images.shape[1:3]
  sr = decode(ae, z, settings.vae_tile_size, settings.vae_tile_overlap)[:, :h, :w]
  fixed = color_fix.apply(settings.color_fix, sr * 0.5 + 0.5, images * 0.5 + 0.5)
  return color_fix.to_uint8(fixed)


def super_resolve(networks, params, images, keys, settings):
  """The whole pipeline: `prepare`, `settings.num_steps` Euler steps, `finish`.

  Args:
    networks, params: the pipeline.
    images: (B, H, W, 3) upscaled LR images in [-1, 1], any H, W.
    keys: (B,) per-image keys.
    settings: `Settings`.
  Returns:
    (B, H, W, 3) uint8 super-resolved images.
  """
  state = prepare(networks, params, images, keys, settings)
  tiles = layout(networks, images.shape[1:3], settings)
  apply_fn = _apply_fn(networks, params)
  if networks.one_step:
    z = sample_onestep(apply_fn, state["lr_latent"], state["tokens"], state["z"],
                       num_steps=settings.num_steps, tiles=tiles,
                       residual_scale=networks.residual_scale)
  else:
    z = sample_multistep(apply_fn, state["lr_latent"], state["tokens"], state["z"],
                         num_steps=settings.num_steps, cfg_scale=settings.cfg_scale,
                         weak_strength=settings.weak_strength, tiles=tiles,
                         residual_scale=networks.residual_scale)
  return finish(networks, params, z, images, settings)
