r"""The demo-only pieces of `make demo` (see the Makefile and the README, "The demo").

`make demo` runs the VOSR recipe at demo scale through the public entry points; this module only
adds what they lack:

  python -m vosr_jax.demo prepare --out=runs/demo/data
      the colour photographs shipped in scikit-image: train/ (training, BMP: fast to decode for
      every crop), heldout_hr/ (held out, PNG, sides cut to multiples of 4) and heldout_lr/ (their
      x4 LR, made by the training degradation of configs/multistep.py:demo, so train and test LR
      come from one process).
  python -m vosr_jax.demo bicubic --input=runs/demo/data/heldout_lr --output=runs/demo/sr/bicubic
      the baseline: the LR upscaled by the sampler's own bicubic (`sample.upscale`), rounded to
      8 bits as the sampler rounds.
  python -m vosr_jax.demo time --log=runs/demo/timings.json NAME -- COMMAND...
      runs COMMAND, adds its wall time to NAME's in the log, exits with its status.
  python -m vosr_jax.demo report --workdir=runs/demo [--fidelity-noise=0.5]
      report.md (PSNR/SSIM/NIQE table from `python -m vosr_jax.evaluate`'s metrics.json in
      sr/{bicubic,multistep,onestep}/ and, when present, sr/{multistep,onestep}_fidelity/ (the
      same models from a scaled-down starting noise), timings) and one side-by-side PNG per
      held-out image (LR bicubic | multi-step SR | one-step SR | HR) under report/.

Held-out photos: chelsea (a cat), coffee (a cup on a table) and rocket (a launch pad): three
everyday scenes with fur, specular and fine man-made detail, none a near-copy of a training
photo. Training keeps the rest, including the two largest (retina, hubble_deep_field) that give
the most distinct random crops: astronaut, hubble_deep_field, immunohistochemistry, retina and
both stereo_motorcycle views. The synthetic colorwheel and logo are left out (not photographs).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from vosr_jax import cli_utils

TRAIN = ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina",
         "stereo_motorcycle_left", "stereo_motorcycle_right")
HELDOUT = ("chelsea", "coffee", "rocket")
METHODS = (("bicubic", "LR bicubic"), ("multistep", "multi-step SR"),
           ("onestep", "one-step SR"))
# The same two models sampled from a scaled-down starting noise (`--noise-scale`, make demo's
# FIDELITY_NOISE): table rows only, when their metrics.json exists.
FIDELITY = (("multistep_fidelity", "multi-step SR, start noise x{}"),
            ("onestep_fidelity", "one-step SR, start noise x{}"))
SEED = 0  # Of the held-out degradation.


def skimage_photo(name):
  """The uint8 (H, W, 3) RGB photo `name` from `skimage.data` (no download)."""
  from skimage import data  # pylint: disable=import-outside-toplevel
  if name.startswith("stereo_motorcycle_"):
    left, right, _ = data.stereo_motorcycle()
    return left if name.endswith("left") else right
  return getattr(data, name)()


def _save_png(path, array):
  """Writes uint8 `array` as a PNG atomically (`cli_utils.atomic_write`)."""
  cli_utils.atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def degrade_lr(images, degradation_config, key):
  """The x4 LR of uint8 HR images by `vosr_jax.data.degradation.degrade` (no resize back).

  The images run as one batch (one compilation): each is padded at its bottom and right edges to
  the largest size, and its LR cropped back. With the demo's chain (no blur, bicubic x4, JPEG at
  quality 99) the padding never reaches an LR pixel of the image itself: bicubic taps of LR pixel
  i lie in HR pixels 4i..4i+3.

  Args:
    images: list of uint8 (H, W, 3), H and W multiples of the scale.
    degradation_config: a degradation ConfigDict (configs/degradation.py fields).
    key: PRNG key.
  Returns:
    list of uint8 (H / scale, W / scale, 3).
  """
  from vosr_jax.data import degradation  # pylint: disable=import-outside-toplevel
  config = degradation_config.copy_and_resolve_references()
  config.resize_back = False
  height, width = (max(x.shape[i] for x in images) for i in (0, 1))
  batch = np.stack([np.pad(x, ((0, height - x.shape[0]), (0, width - x.shape[1]), (0, 0)),
                           mode="edge") for x in images]).astype(np.float32) / 255.0
  lr = np.asarray(degradation.make_degrade(config)(key, batch))
  if not np.isfinite(lr).all():
    raise FloatingPointError("the degradation returned non-finite values; check "
                             "config.degradation (JPEG quality 100 divides by zero)")
  lr = np.clip(np.round(lr * 255.0), 0, 255).astype(np.uint8)
  scale = config.scale
  return [y[:x.shape[0] // scale, :x.shape[1] // scale] for x, y in zip(images, lr)]


def prepare(out):
  """Writes train/, heldout_hr/ and heldout_lr/ under `out` (see the module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  from configs import multistep  # pylint: disable=import-outside-toplevel
  degradation_config = multistep.get_config("demo").degradation
  scale = degradation_config.scale
  folders = {k: os.path.join(out, k) for k in ("train", "heldout_hr", "heldout_lr")}
  for folder in folders.values():
    os.makedirs(folder, exist_ok=True)
  for name in TRAIN:
    # BMP, not PNG: the pipeline decodes a whole photo for every random crop, and a 1411^2 PNG
    # takes about 0.1-0.2 s to decode on these cores (BMP: under 10 ms).
    image = Image.fromarray(skimage_photo(name))
    cli_utils.atomic_write(os.path.join(folders["train"], f"{name}.bmp"),
                           lambda f, image=image: image.save(f, format="BMP"))
    print(f"train: {name}")
  hrs = []
  for name in HELDOUT:
    hr = skimage_photo(name)
    hrs.append(hr[:hr.shape[0] // scale * scale, :hr.shape[1] // scale * scale])
  lrs = degrade_lr(hrs, degradation_config, jax.random.key(SEED))
  for name, hr, lr in zip(HELDOUT, hrs, lrs):
    _save_png(os.path.join(folders["heldout_hr"], f"{name}.png"), hr)
    _save_png(os.path.join(folders["heldout_lr"], f"{name}.png"), lr)
    print(f"held out: {name} HR {hr.shape[1]}x{hr.shape[0]}, LR {lr.shape[1]}x{lr.shape[0]}")


def bicubic(input_dir, output_dir, scale):
  """Upscales every image of `input_dir` by `scale` as `vosr_jax.sample` does before denoising."""
  from vosr_jax import sample  # pylint: disable=import-outside-toplevel
  os.makedirs(output_dir, exist_ok=True)
  for name, path in sample.list_inputs(input_dir):
    rgb, _ = sample.read_image(path)
    up = sample.upscale(rgb, (rgb.shape[1] * scale, rgb.shape[0] * scale))
    out = np.clip(np.round(np.clip(up, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    _save_png(os.path.join(output_dir, os.path.splitext(name)[0] + ".png"), out)
    print(f"bicubic: {name} -> {out.shape[1]}x{out.shape[0]}")


def timed(log, name, command):
  """Runs `command`, adds its seconds to `name`'s in the JSON `log`; returns its exit status."""
  start = time.perf_counter()
  status = subprocess.call(command)
  seconds = time.perf_counter() - start
  timings = {}
  if os.path.exists(log):
    with open(log, encoding="utf-8") as f:
      timings = json.load(f)
  timings[name] = round(timings.get(name, 0.0) + seconds, 1)
  os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
  cli_utils.atomic_write_text(log, json.dumps(timings, indent=2))
  print(f"[{name}: {seconds:.1f} s]", file=sys.stderr)
  return status


def _load_metrics(workdir):
  """{method: metrics.json dict} of the METHODS folders (an error names a missing one) and of the
  FIDELITY folders that exist."""
  results = {}
  for (method, _), required in [(m, True) for m in METHODS] + [(m, False) for m in FIDELITY]:
    path = os.path.join(workdir, "sr", method, "metrics.json")
    if not os.path.exists(path):
      if required:
        raise FileNotFoundError(f"{path} is missing: run `python -m vosr_jax.evaluate --pred="
                                f"{os.path.dirname(path)} ...` first (make demo does)")
      continue
    with open(path, encoding="utf-8") as f:
      results[method] = json.load(f)
  return results


def _rows(results, fidelity_noise):
  """(folder, title) of every evaluated method: METHODS, then the FIDELITY rows present."""
  return list(METHODS) + [(method, title.format(fidelity_noise)) for method, title in FIDELITY
                          if method in results]


def _label(image, text):
  """`image` (uint8 H, W, 3) with a 14-pixel caption strip above it."""
  from PIL import ImageDraw  # pylint: disable=import-outside-toplevel
  canvas = Image.new("RGB", (image.shape[1], image.shape[0] + 14), (255, 255, 255))
  canvas.paste(Image.fromarray(image), (0, 14))
  ImageDraw.Draw(canvas).text((2, 1), text, fill=(0, 0, 0))
  return np.asarray(canvas)


def side_by_side(workdir, data, stem, results):
  """LR bicubic | multi-step | one-step | HR of `stem`, captioned with PSNR/SSIM; the PNG path."""
  panels = []
  for method, title in METHODS:
    image = np.asarray(Image.open(os.path.join(workdir, "sr", method, f"{stem}.png"))
                       .convert("RGB"))
    scores = results[method]["per_image"].get(stem, {})
    caption = title if "psnr" not in scores else \
        f"{title} {scores['psnr']:.2f} dB / {scores['ssim']:.3f}"
    panels.append(_label(image, caption))
  hr = np.asarray(Image.open(os.path.join(data, "heldout_hr", f"{stem}.png")).convert("RGB"))
  panels.append(_label(hr, "HR"))
  gap = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
  row = np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1)
  os.makedirs(os.path.join(workdir, "report"), exist_ok=True)
  path = os.path.join(workdir, "report", f"{stem}.png")
  _save_png(path, row)
  return path


def _fmt(value, digits):
  return "n/a" if value is None else f"{float(value):.{digits}f}"


def report(workdir, data, fidelity_noise=0.5):
  """Writes `workdir`/report.md and the side-by-side PNGs; returns the markdown text.

  `fidelity_noise` is the --noise-scale the FIDELITY folders were sampled with (for their titles).
  """
  results = _load_metrics(workdir)
  metrics = results["bicubic"]["settings"]["metrics"]
  digits = {"psnr": 2, "ssim": 4, "niqe": 2}
  stems = sorted(results["bicubic"]["per_image"])
  lines = ["# VOSR demo report", "",
           "Held-out images (never seen in training), x4, "
           f"{', '.join(m.upper() for m in metrics)} "
           "(PSNR/SSIM on the Y channel with a 4-pixel border crop; NIQE: lower is more natural).",
           "", "| method | " + " | ".join(f"mean {m.upper()}" for m in metrics) + " |",
           "|---|" + "---:|" * len(metrics)]
  rows = _rows(results, fidelity_noise)
  for method, title in rows:
    mean = results[method]["mean"]
    lines.append(f"| {title} | " + " | ".join(_fmt(mean.get(m), digits.get(m, 4))
                                             for m in metrics) + " |")
  lines += ["", "Per image (PSNR dB / SSIM):", "",
            "| image | " + " | ".join(t for _, t in rows) + " |", "|---|" + "---:|" * len(rows)]
  for stem in stems:
    cells = []
    for method, _ in rows:
      s = results[method]["per_image"].get(stem)
      cells.append("n/a" if s is None else f"{s['psnr']:.2f} / {s['ssim']:.4f}")
    lines.append(f"| {stem} | " + " | ".join(cells) + " |")
  bic = results["bicubic"]["mean"].get("psnr")
  for (ms_key, _), (os_key, _) in (METHODS[1:], FIDELITY):
    if ms_key in results and os_key in results:
      ms, os_ = (results[k]["mean"].get("psnr") for k in (ms_key, os_key))
      if None not in (bic, ms, os_):
        lines += ["", f"{ms_key}: multi-step - bicubic {ms - bic:+.2f} dB; one-step - "
                  f"multi-step {os_ - ms:+.2f} dB."]
  lines += ["", "Side by side (LR bicubic | multi-step SR | one-step SR | HR):", ""]
  for stem in stems:
    path = side_by_side(workdir, data, stem, results)
    lines.append(f"![{stem}]({os.path.relpath(path, workdir)})")
  timings_path = os.path.join(workdir, "timings.json")
  if os.path.exists(timings_path):
    with open(timings_path, encoding="utf-8") as f:
      timings = json.load(f)
    lines += ["", "| stage | wall time (s) |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines.append(f"| **total** | {sum(timings.values()):.1f} |")
  lines += ["", "The frozen ViT encoder is the DINOv2 architecture at a tiny size with RANDOM "
            "weights (config.encoder.init='random'); set config.encoder.path to converted DINOv2 "
            "weights to use real ones."]
  text = "\n".join(lines) + "\n"
  cli_utils.atomic_write_text(os.path.join(workdir, "report.md"), text)
  return text


def main(argv=None):
  """CLI entry point; returns the exit status."""
  p = argparse.ArgumentParser(prog="python -m vosr_jax.demo", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  a = sub.add_parser("prepare", help="write the skimage photos: train / held-out HR and LR")
  a.add_argument("--out", default="runs/demo/data")
  a = sub.add_parser("bicubic", help="the bicubic baseline of a folder of LR images")
  a.add_argument("--input", required=True)
  a.add_argument("--output", required=True)
  a.add_argument("--upscale", type=int, default=4)
  a = sub.add_parser("time", help="run a command and log its wall time")
  a.add_argument("--log", required=True)
  a.add_argument("name")
  a.add_argument("cmd", nargs=argparse.REMAINDER)
  a = sub.add_parser("report", help="report.md and side-by-side images from the evaluations")
  a.add_argument("--workdir", default="runs/demo")
  a.add_argument("--data", help="the prepare folder (default: WORKDIR/data)")
  a.add_argument("--fidelity-noise", type=float, default=0.5,
                 help="the --noise-scale of sr/{multistep,onestep}_fidelity (for the titles)")
  args = p.parse_args(argv)
  errors = []
  cli_utils.check_range(errors, "--upscale", getattr(args, "upscale", None), 1)
  cli_utils.check_range(errors, "--fidelity-noise", getattr(args, "fidelity_noise", None), 0.0)
  if errors:
    p.error("; ".join(errors))
  if args.command == "prepare":
    prepare(args.out)
  elif args.command == "bicubic":
    bicubic(args.input, args.output, args.upscale)
  elif args.command == "time":
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
      p.error("time: no command after NAME --")
    return timed(args.log, args.name, command)
  else:
    try:
      print(report(args.workdir, args.data or os.path.join(args.workdir, "data"),
                   args.fidelity_noise))
    except FileNotFoundError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
