r"""Super-resolves images with a trained or converted VOSR model.

  python -m vosr_jax.sample --checkpoint=/weights/vosr_0.5b_ms --input=lr/ --output=sr/
  python -m vosr_jax.sample --checkpoint=/ckpt/run1 --input=photo.jpg --output=sr/ \
      --preset=realsr --tile-size=512

The sampling settings are a preset of configs/sampling.py (`--preset`, default 'default'); the
flags below override its fields.

Each input gives `<output>/<input stem>.png` (8-bit, rounded; RGBA when the input has alpha).
Per-image noise comes from `--seed` and the file name, so a result does not depend on the other
files. Inputs that cannot be processed are reported and written nowhere; the exit status is then 1.
Bad flags, a missing or damaged --checkpoint and an --output that cannot be written are one line
`error: ...` and exit status 2, before any image is computed.
See README, "Sampling", for the presets and the bad-input table.
"""
import argparse
import collections
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from vosr_jax import cli_utils, color_fix, inference, sampling
from vosr_jax.data import image_io

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
FORMATS = {"png": ("PNG", ".png"), "jpg": ("JPEG", ".jpg")}
SAMPLING_CONFIG = os.path.join(cli_utils.CONFIGS_DIR, "sampling.py")
# Flags that override the field of the same name of the sampling config (`--steps`: num_steps or
# onestep_num_steps, once the model is known).
CONFIG_FLAGS = ("cfg_scale", "weak_strength", "noise_scale", "tile_size", "tile_overlap",
                "vae_tile_size", "vae_tile_overlap", "color_fix", "seed")
# Denoiser tokens of a 2048x2048 output of the released models (8x autoencoder, 2x2 patches):
# what the attention of one call may hold by default.
MAX_TOKENS = (2048 // 16) ** 2


Item = collections.namedtuple("Item", "name path out")  # input name, input file, output file


class InputError(Exception):
  """An input image that cannot be processed (reported, the others go on)."""


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m vosr_jax.sample", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True,
                 help="training workdir, converted release folder, or converted denoiser")
  p.add_argument("--encoder", help="converted encoder folder (overrides the checkpoint's)")
  p.add_argument("--autoencoder", help="converted autoencoder folder (overrides the checkpoint's)")
  p.add_argument("--input", required=True, help="an image or a folder of images")
  p.add_argument("--output", required=True, help="output folder (created if needed)")
  p.add_argument("--upscale", type=int, default=4, help="scale factor (default 4)")
  p.add_argument("--preset", default="default",
                 help="sampling preset of --config: default, screensr, realsr or demo")
  p.add_argument("--config", default=SAMPLING_CONFIG,
                 help="the sampling config file (default: configs/sampling.py of this checkout)")
  p.add_argument("--steps", type=int, help="Euler steps (preset: num_steps multi-step, "
                 "onestep_num_steps one-step)")
  p.add_argument("--cfg-scale", type=float,
                 help="restoration guidance scale, multi-step only (paper settings: --preset=realsr, "
                 "--preset=screensr)")
  p.add_argument("--weak-strength", type=float,
                 help="w of the weak anchor w * LR latent, multi-step only")
  p.add_argument("--noise-scale", type=float,
                 help="scale of the starting noise (1: as trained; below 1 trades sampled detail "
                 "for fidelity, 0 is deterministic)")
  p.add_argument("--tile-size", type=int,
                 help="denoiser tile side in output pixels (0: whole image; 512 recommended)")
  p.add_argument("--tile-overlap", type=int,
                 help="tile overlap in output pixels (at least tile/8 is used)")
  p.add_argument("--vae-tile-size", type=int,
                 help="autoencoder tile side in pixels for larger images (0: never tile)")
  p.add_argument("--vae-tile-overlap", type=int, help="autoencoder tile overlap")
  p.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                 help="most denoiser tokens (attention length) in one call: an untiled image or "
                 f"one tile (default {MAX_TOKENS}: a 2048x2048 output of the released models)")
  p.add_argument("--color-fix", choices=color_fix.METHODS)
  p.add_argument("--seed", type=int, help="of the per-image keys")
  p.add_argument("--batch-size", type=int, default=1, help="images of the same size per call")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--format", choices=sorted(FORMATS), default="png")
  p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  args = p.parse_args(argv)
  try:
    args.sampling = cli_utils.load_config(args.config, args.preset)
  except (OSError, ValueError) as e:
    p.error(f"--config={args.config} --preset={args.preset}: {e}")
  for name in CONFIG_FLAGS:
    if getattr(args, name) is None:
      setattr(args, name, args.sampling[name])
  errors = flag_errors(args)
  if errors:
    p.error("; ".join(errors))
  return args


def flag_errors(args):
  """Range checks of the numeric flags that need no model; a list of messages."""
  errors = []
  for flag, value in (("--upscale", args.upscale), ("--batch-size", args.batch_size),
                      ("--steps", args.steps), ("--max-tokens", args.max_tokens)):
    cli_utils.check_range(errors, flag, value, 1)
  for flag, value in (("--noise-scale", args.noise_scale),
                      ("--weak-strength", args.weak_strength)):
    cli_utils.check_range(errors, flag, value, 0.0)
  cli_utils.check_range(errors, "--cfg-scale", args.cfg_scale)
  cli_utils.check_range(errors, "--seed", args.seed, -2**63, 2**63 - 1)
  for size, overlap in (("tile_size", "tile_overlap"), ("vae_tile_size", "vae_tile_overlap")):
    size_flag, overlap_flag = ("--" + name.replace("_", "-") for name in (size, overlap))
    tile, over = getattr(args, size), getattr(args, overlap)
    cli_utils.check_range(errors, size_flag, tile, 1, allow=(0,))
    cli_utils.check_range(errors, overlap_flag, over, 0)
    if tile > 0 and over >= tile:
      errors.append(f"{overlap_flag}={over} must be below {size_flag}={tile} (pass a smaller "
                    f"{overlap_flag})")
  return errors


def geometry_errors(args, networks):
  """Checks of the tile flags against the model's geometry (after loading); a list of messages.

  Denoiser tiles are `--tile-size` rounded down to a multiple of m = autoencoder factor x patch
  (at least m); autoencoder tiles are `--vae-tile-size` rounded down to the autoencoder factor.
  """
  errors = []
  d, m = networks.downsample, networks.multiple
  if args.tile_size:
    tile = (args.tile_size // m) * m
    if tile < m:
      errors.append(f"--tile-size={args.tile_size} is below this model's smallest tile, {m} px "
                    f"(autoencoder factor {d} x patch {networks.patch_size})")
    elif args.tile_overlap // d >= tile // d:
      errors.append(f"--tile-overlap={args.tile_overlap} leaves no stride: tiles are {tile} px "
                    f"(--tile-size rounded down to a multiple of {m})")
  if args.vae_tile_size:
    tile = (args.vae_tile_size // d) * d
    if tile < d:
      errors.append(f"--vae-tile-size={args.vae_tile_size} is below the autoencoder factor {d}")
    elif args.vae_tile_overlap // d >= tile // d:
      errors.append(f"--vae-tile-overlap={args.vae_tile_overlap} leaves no stride: autoencoder "
                    f"tiles are {tile} px (--vae-tile-size rounded down to a multiple of {d})")
  return errors


def list_inputs(path):
  """[(name, file)] sorted by name: the file itself, or the image files of a folder.

  Raises:
    FileNotFoundError / ValueError: no such path, or a folder without images.
  """
  if os.path.isfile(path):
    return [(os.path.basename(path), path)]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--input {path}: no such file or folder")
  names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))
                 and n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise ValueError(f"--input {path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
  return [(n, os.path.join(path, n)) for n in names]


def read_image(path):
  """Decodes an image into float32 RGB and optional alpha, both in [0, 1] (`image_io.decode`: EXIF
  orientation applied, grey and palette expanded to RGB, 16-bit PNGs keep their 16 bits).

  Returns:
    (rgb (H, W, 3), alpha (H, W) or None).
  Raises:
    InputError: unreadable or not an image.
  """
  try:
    return image_io.decode(path).unit()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise InputError(f"{path}: not a readable image ({e})") from e


def upscale(x, size):
  """PIL BICUBIC resize of a float (H, W[, C]) array to `size` (W, H), channel by channel."""
  channels = x[..., None] if x.ndim == 2 else x
  out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(channels[..., c]), "F")
                             .resize(size, Image.BICUBIC)) for c in range(channels.shape[2])], -1)
  return out[..., 0] if x.ndim == 2 else out


def write_image(path, rgb, alpha, pil_format):
  """Writes uint8 `rgb` (H, W, 3) [+ `alpha` (H, W)] atomically (`cli_utils.atomic_write`)."""
  image = Image.fromarray(rgb)
  if alpha is not None and pil_format == "PNG":
    image.putalpha(Image.fromarray(alpha))
  cli_utils.atomic_write(path, lambda f: image.save(f, format=pil_format))


def _plan(args):
  """The work list: inputs whose output is to be written, plus the skipped names."""
  inputs = list_inputs(args.input)
  ext = FORMATS[args.format][1]
  outs = {}
  for name, path in inputs:
    out = os.path.join(args.output, os.path.splitext(name)[0] + ext)
    if out in outs:
      raise ValueError(f"--input {args.input}: {outs[out]} and {name} would both be written to "
                       f"{out}; rename one")
    outs[out] = name
  todo, skipped = [], []
  for name, path in inputs:
    out = os.path.join(args.output, os.path.splitext(name)[0] + ext)
    (skipped if os.path.exists(out) and not args.overwrite else todo).append(Item(name, path, out))
  return todo, skipped


class Sampler:
  """Runs batches of same-size images through the pipeline and writes the outputs."""

  def __init__(self, pipeline, settings, args):
    self.pipeline, self.settings, self.args = pipeline, settings, args
    self.fn = pipeline.jit(settings)

  def load(self, item):
    """(upscaled rgb in [-1, 1], upscaled alpha uint8 or None) of an item, checked against the
    pixel limit. Raises InputError."""
    rgb, alpha = read_image(item.path)
    size = (rgb.shape[1] * self.args.upscale, rgb.shape[0] * self.args.upscale)
    self.check_tokens(item, size)
    up = np.clip(upscale(rgb, size), 0.0, 1.0) * 2.0 - 1.0
    if alpha is not None:
      alpha = color_fix.to_uint8(upscale(alpha, size))
    return up.astype(np.float32), alpha

  def check_tokens(self, item, size):
    """Raises InputError when one denoiser call on an output of `size` (W, H) pixels (the whole
    image, or one tile) holds more than --max-tokens tokens: attention memory grows with their
    square, whatever the pixel count (a pixel-space model has one token per p x p pixels)."""
    networks, limit = self.pipeline.networks, self.args.max_tokens
    tiles = sampling.layout(networks, size[::-1], self.settings)
    p, m = networks.patch_size, networks.multiple
    if tiles is None:
      h, w = sampling.padded_size(size[::-1], m)
      tokens, what = (h // m) * (w // m), f"the {size[0]}x{size[1]} output"
      hint = "pass --tile-size=512"
    else:
      tokens = (tiles.size[0] // p) * (tiles.size[1] // p)
      what = f"one {tiles.size[1] * networks.downsample}x{tiles.size[0] * networks.downsample} tile"
      hint = "pass a smaller --tile-size"
    if tokens > limit:
      raise InputError(f"{item.path}: {what} is {tokens} denoiser tokens ({m}x{m} px each), above "
                       f"--max-tokens={limit}; {hint} (or raise --max-tokens if the accelerator "
                       "memory allows)")

  def run(self, items, images):
    """Super-resolves a batch (all the same size) -> uint8 (B, H, W, 3) numpy."""
    n = len(items)
    pad = self.args.batch_size - n
    x = jnp.asarray(np.stack(images + images[-1:] * pad))
    keys = jnp.stack([sampling.image_key(self.args.seed, it.name) for it in items]
                     + [sampling.image_key(self.args.seed, items[-1].name)] * pad)
    tiles = sampling.layout(self.pipeline.networks, x.shape[1:3], self.settings)
    if tiles is None:
      return np.asarray(self.fn(self.pipeline.params, x, keys))[:n]
    # A large image: run the steps from here to show their progress.
    prepare, step, finish = self.pipeline.jit_stages(self.settings)
    params = self.pipeline.params
    state = prepare(params, x, keys)
    for k in tqdm(range(self.settings.num_steps), desc=f"steps ({len(tiles.starts)} tiles)",
                  leave=False, file=sys.stderr):
      state = step(params, state, jnp.int32(k))
    return np.asarray(finish(params, state["z"], x))[:n]


def main(argv=None):
  """Runs the CLI; returns the exit status (0 ok, 1 some images failed, 2 nothing could run)."""
  args = parse_args(argv)
  try:
    todo, skipped = _plan(args)
    for item in skipped:
      print(f"{item.name}: skipped, {item.out} exists (pass --overwrite to replace it)")
    if not todo:
      return 0
    cli_utils.check_output_folder(args.output, "--output")
    pipeline = inference.load_pipeline(args.checkpoint, encoder=args.encoder,
                                       autoencoder=args.autoencoder, dtype=args.dtype)
    errors = geometry_errors(args, pipeline.networks)
    if errors:
      raise ValueError("; ".join(errors))
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  one_step = pipeline.networks.one_step
  settings = sampling.Settings.from_config(
      args.sampling, one_step, num_steps=args.steps,
      **{name: getattr(args, name) for name in CONFIG_FLAGS if name != "seed"})
  print(f"{pipeline.source}: {'one-step' if one_step else 'multi-step'} model, {settings}",
        file=sys.stderr)
  sampler = Sampler(pipeline, settings, args)
  pil_format = FORMATS[args.format][0]
  report, pending = {}, {}
  start = time.perf_counter()

  def flush(shape):
    batch = pending.pop(shape)
    t0 = time.perf_counter()
    try:
      out = sampler.run([it for it, _, _ in batch], [x for _, x, _ in batch])
      for (item, _, alpha), rgb in zip(batch, out):
        write_image(item.out, rgb, alpha, pil_format)
    except (RuntimeError, OSError, ValueError) as e:  # XLA out of memory, disk full, ...
      for item, _, _ in batch:
        report[item.name] = f"FAILED: {e}"
      return
    per_image = (time.perf_counter() - t0) / len(batch)
    for item, x, _ in batch:
      report[item.name] = f"{per_image:.2f} s ({x.shape[1]}x{x.shape[0]} -> {item.out})"

  for item in tqdm(todo, desc="images", unit="img", file=sys.stderr):
    try:
      x, alpha = sampler.load(item)
    except InputError as e:
      report[item.name] = f"FAILED: {e}"
      continue
    pending.setdefault(x.shape, []).append((item, x, alpha))
    if len(pending[x.shape]) == args.batch_size:
      flush(x.shape)
  for shape in list(pending):
    flush(shape)
  for item in todo:
    print(f"{item.name}: {report[item.name]}")
  failed = sum(r.startswith("FAILED") for r in report.values())
  print(f"total: {time.perf_counter() - start:.2f} s for {len(todo) - failed} images"
        + (f", {failed} failed" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
