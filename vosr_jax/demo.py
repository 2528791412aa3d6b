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
  python -m vosr_jax.demo report --workdir=runs/demo
      report.md: a table of the METHODS folders present under sr/ (bicubic is required) with
      the COLUMNS metrics from `python -m vosr_jax.evaluate`'s metrics.json in each (computed
      here when missing there) and a legend per metric, the timings (one row per name), and under
      report/ one side-by-side PNG per held-out image (every method, then the HR) and one
      `<image>_zoom.png`: the HR's flattest and most detailed 48x48 windows at 2x, per method.
  python -m vosr_jax.demo degrade --input=HR_DIR --output=LR_DIR [--hr-output=DIR]
      the x4 LR of your own HR images made the demo's way (the held-out degradation of
      `prepare`), as PNG. Each HR is first cut at its bottom and right to multiples of 4, as
      `prepare` cuts the held-out HR; --hr-output writes those cut HRs, the references for
      `python -m vosr_jax.evaluate`. All images run as one batch, padded to the largest.

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
import textwrap
import time

import numpy as np
from PIL import Image

from vosr_jax import cli_utils
from vosr_jax.data import image_io

TRAIN = ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina",
         "stereo_motorcycle_left", "stereo_motorcycle_right")
HELDOUT = ("chelsea", "coffee", "rocket")
# The report's rows, in order: (folder under WORKDIR/sr/, label). `bicubic` is required; the
# others are shown when their folder exists.
METHODS = (("bicubic", "LR bicubic"), ("multistep_4", "multi-step SR, 4 steps"),
           ("multistep_25", "multi-step SR, 25 steps"), ("onestep", "one-step SR"))
# The report's metric columns: (metric, column title, decimals, legend).
COLUMNS = (
    ("psnr", "PSNR (dB) ↑", 2, "PSNR: fidelity to the HR (Y channel); higher is better."),
    ("ssim", "SSIM ↑", 4, "SSIM: structural fidelity to the HR (Y channel); higher is better."),
    ("flat_noise", "flat noise ↓", 3,
     "flat noise: high-pass energy where the HR is locally flat, over the HR's own there (HR = 1, "
     "blur < 1, noise and speckle >> 1); lower is better. It is the check for NIQE, which "
     "rewards noise."),
    ("detail_hf", "detail HF →1", 3,
     "detail HF: the same ratio where the HR is most detailed (bicubic < 1); closer to 1 is "
     "sharper, but noise raises it too: read it with detail GSIM."),
    ("detail_gsim", "detail GSIM ↑", 4,
     "detail GSIM: gradient similarity to the HR there (1 = the HR's gradients; blur and noise "
     "both lower it); higher is better: above bicubic's is sharper than bicubic."),
    ("niqe", "NIQE ↓", 2,
     "NIQE: no-reference naturalness, lower is better, but it rewards noise: a speckled output "
     "can score better than the HR photos; read it with flat noise."),
)
ZOOM_CROP = 48    # pixels: side of the flat and the detailed window, shown at 2x
ZOOM_MARGIN = 16  # pixels: the windows keep this far from every edge
SEED = 0  # Of the held-out degradation.


def default_folders():
  """(workdir, data): `make demo`'s folders, DEMO_WORKDIR and DEMO_DATA of configs/multistep.py."""
  module = cli_utils.load_config_module(os.path.join(cli_utils.CONFIGS_DIR, "multistep.py"))
  return module.DEMO_WORKDIR, module.DEMO_DATA


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
  from vosr_jax import color_fix  # pylint: disable=import-outside-toplevel
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
  lr = color_fix.to_uint8(lr)
  scale = config.scale
  return [y[:x.shape[0] // scale, :x.shape[1] // scale] for x, y in zip(images, lr)]


def _degrade_and_write(named_hrs, lr_dir, hr_dir=None):
  """Cuts uint8 HRs to multiples of the scale, writes their demo LR (and the cut HR) as PNG.

  The degradation is configs/multistep.py:demo's, run once over all images with the key SEED.

  Args:
    named_hrs: list of (name, (H, W, 3) uint8); the files are named `name`.png.
    lr_dir: folder for the LR images, created if needed.
    hr_dir: folder for the cut HR images, or None.
  """
  import jax  # pylint: disable=import-outside-toplevel
  degradation_config = cli_utils.load_config(
      os.path.join(cli_utils.CONFIGS_DIR, "multistep.py"), "demo").degradation
  scale = degradation_config.scale
  hrs = [x[:x.shape[0] // scale * scale, :x.shape[1] // scale * scale] for _, x in named_hrs]
  lrs = degrade_lr(hrs, degradation_config, jax.random.key(SEED))
  for folder in filter(None, (lr_dir, hr_dir)):
    os.makedirs(folder, exist_ok=True)
  for (name, full), hr, lr in zip(named_hrs, hrs, lrs):
    if hr_dir:
      _save_png(os.path.join(hr_dir, f"{name}.png"), hr)
    _save_png(os.path.join(lr_dir, f"{name}.png"), lr)
    cut = "" if hr.shape == full.shape else f" (cut from {full.shape[1]}x{full.shape[0]})"
    print(f"{name}: HR {hr.shape[1]}x{hr.shape[0]}{cut}, LR {lr.shape[1]}x{lr.shape[0]}")


def prepare(out):
  """Writes train/, heldout_hr/ and heldout_lr/ under `out` (see the module docstring)."""
  train = os.path.join(out, "train")
  os.makedirs(train, exist_ok=True)
  for name in TRAIN:
    # BMP, not PNG: the pipeline decodes a whole photo for every random crop, and a 1411^2 PNG
    # takes about 0.1-0.2 s to decode on these cores (BMP: under 10 ms).
    image = Image.fromarray(skimage_photo(name))
    cli_utils.atomic_write(os.path.join(train, f"{name}.bmp"),
                           lambda f, image=image: image.save(f, format="BMP"))
    print(f"train: {name}")
  _degrade_and_write([(name, skimage_photo(name)) for name in HELDOUT],
                     os.path.join(out, "heldout_lr"), os.path.join(out, "heldout_hr"))


def degrade(input_dir, output_dir, hr_output=None):
  """Writes the demo's x4 LR of every image in `input_dir` (see the module docstring).

  Raises:
    FileNotFoundError / ValueError: no such folder, no images in it, or two sharing a stem.
  """
  from vosr_jax import sample  # pylint: disable=import-outside-toplevel
  inputs = sample.list_inputs(input_dir)
  stems = [os.path.splitext(name)[0] for name, _ in inputs]
  if len(set(stems)) < len(stems):
    raise ValueError(f"--input {input_dir}: several images share a name ({', '.join(stems)}); "
                     f"the outputs are <name>.png")
  hrs = [(stem, image_io.decode(path).rgb8()) for stem, (_, path) in zip(stems, inputs)]
  _degrade_and_write(hrs, output_dir, hr_output)


def bicubic(input_dir, output_dir, scale):
  """Upscales every image of `input_dir` by `scale` as `vosr_jax.sample` does before denoising."""
  from vosr_jax import color_fix, sample  # pylint: disable=import-outside-toplevel
  os.makedirs(output_dir, exist_ok=True)
  for name, path in sample.list_inputs(input_dir):
    rgb, _ = sample.read_image(path)
    out = color_fix.to_uint8(sample.upscale(rgb, (rgb.shape[1] * scale, rgb.shape[0] * scale)))
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


def _load_metrics(workdir, data):
  """{folder: metrics.json dict} of `bicubic` and of every other METHODS folder under sr/.

  COLUMNS metrics that a folder's metrics.json lacks are computed here with `evaluate`'s settings
  of that file (not written back).
  """
  from vosr_jax import evaluate  # pylint: disable=import-outside-toplevel
  results = {}
  for method, _ in METHODS:
    folder = os.path.join(workdir, "sr", method)
    if method != "bicubic" and not os.path.isdir(folder):
      continue
    path = os.path.join(folder, "metrics.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing: run `python -m vosr_jax.evaluate --pred="
                              f"{folder} ...` first (make demo does)")
    with open(path, encoding="utf-8") as f:
      result = json.load(f)
    missing = [m for m, *_ in COLUMNS if m not in result["mean"]]
    if missing:
      settings = result["settings"]
      extra = evaluate.evaluate_folders(folder, os.path.join(data, "heldout_hr"), missing,
                                        settings["crop_border"], settings["y_channel"])
      result["mean"].update(extra["mean"])
      for stem, values in extra["per_image"].items():
        result["per_image"].setdefault(stem, {}).update(values)
    results[method] = result
  return results


def _wrap(text, width):
  """`text` in lines that fit `width` pixels of PIL's default font (about 6 px a character)."""
  return textwrap.wrap(text, max(1, width // 6))


def _label(image, text, lines=1):
  """`image` (uint8 H, W, 3) under `lines` 14-pixel caption lines of `text`, wrapped to fit."""
  from PIL import ImageDraw  # pylint: disable=import-outside-toplevel
  canvas = Image.new("RGB", (image.shape[1], image.shape[0] + 14 * lines), (255, 255, 255))
  canvas.paste(Image.fromarray(image), (0, 14 * lines))
  draw = ImageDraw.Draw(canvas)
  for i, line in enumerate(_wrap(text, image.shape[1])[:lines]):
    draw.text((2, 1 + 14 * i), line, fill=(0, 0, 0))
  return np.asarray(canvas)


def _labelled_row(images, texts):
  """`images` captioned with `texts`, all with as many caption lines as the longest needs."""
  lines = max(len(_wrap(t, x.shape[1])) for x, t in zip(images, texts))
  return _hstack([_label(x, t, lines) for x, t in zip(images, texts)])


def _hstack(panels):
  """Equal-height uint8 (H, W_i, 3) panels side by side, 4 white pixels apart."""
  gap = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
  return np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1)


def _save_report_png(workdir, name, array):
  """Writes `array` to `workdir`/report/`name`; returns the path."""
  os.makedirs(os.path.join(workdir, "report"), exist_ok=True)
  path = os.path.join(workdir, "report", name)
  _save_png(path, array)
  return path


def side_by_side(workdir, images, stem, results, rows):
  """Every method of `rows`, then the HR, captioned with PSNR/SSIM/flat noise; the PNG path.

  `images` maps each folder of `rows` and "hr" to `stem`'s (H, W, 3) uint8 image.
  """
  texts = [f"{title}: {_scores(results[method]['per_image'].get(stem))}"
           for method, title in rows] + ["HR"]
  row = _labelled_row([images[m] for m, _ in rows] + [images["hr"]], texts)
  return _save_report_png(workdir, f"{stem}.png", row)


def zoom_windows(hr, size=ZOOM_CROP, margin=ZOOM_MARGIN):
  """The flat and the detailed window of an HR image, chosen from the HR alone.

  Of all `size` x `size` windows at least `margin` pixels from every edge, the ones with the
  lowest and the highest mean `metrics.local_activity` of the HR's Y (the measure that
  `metrics.flat_noise` splits regions by); the first in row-major order on a tie.

  Args:
    hr: (H, W, 3) uint8 RGB, H and W >= size + 2 * margin.

  Returns:
    {"flat": (row, col), "detail": (row, col)}: top-left corners in `hr`.
  """
  from vosr_jax import metrics  # pylint: disable=import-outside-toplevel
  act = metrics.local_activity(metrics.rgb_to_y(hr))[margin:hr.shape[0] - margin,
                                                     margin:hr.shape[1] - margin]
  if min(act.shape) < size:
    raise ValueError(f"a {hr.shape[1]}x{hr.shape[0]} image has no {size}x{size} window "
                     f"{margin} px from its edges")
  c = np.pad(act.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  sums = c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]
  corner = lambda i: tuple(int(v) + margin for v in np.unravel_index(i, sums.shape))
  return {"flat": corner(np.argmin(sums)), "detail": corner(np.argmax(sums))}


def zoom_strip(workdir, images, stem, rows, windows, size=ZOOM_CROP):
  """The flat (top) and detailed (bottom) windows at 2x (nearest), one column per method and the
  HR, captioned; the PNG path (report/`stem`_zoom.png)."""
  from PIL import ImageDraw  # pylint: disable=import-outside-toplevel
  gap = np.full((4, 2 * size, 3), 255, np.uint8)
  columns = []
  for key in [m for m, _ in rows] + ["hr"]:
    flat, detail = (np.kron(images[key][r:r + size, c:c + size], np.ones((2, 2, 1), np.uint8))
                    for r, c in (windows["flat"], windows["detail"]))
    columns.append(np.concatenate([flat, gap, detail]))
  names = Image.new("RGB", (40, columns[0].shape[0]), (255, 255, 255))
  for y, text in ((size - 6, "flat"), (3 * size - 2, "detail")):
    ImageDraw.Draw(names).text((2, y), text, fill=(0, 0, 0))
  row = _labelled_row([np.asarray(names)] + columns, [""] + [t for _, t in rows] + ["HR"])
  return _save_report_png(workdir, f"{stem}_zoom.png", row)


def _fmt(value, digits):
  return "n/a" if value is None else f"{float(value):.{digits}f}"


def _scores(values):
  """"PSNR dB, SSIM, flat noise" of one image's metrics dict (None: all "n/a")."""
  values = values or {}
  return (f"{_fmt(values.get('psnr'), 2)} dB, SSIM {_fmt(values.get('ssim'), 4)}, flat noise "
          f"{_fmt(values.get('flat_noise'), 2)}")


def _tables(results, rows, stems):
  """The markdown lines of the mean table (with legends) and of the per-image table."""
  titles = [title for _, title, *_ in COLUMNS]
  cells = lambda values: [_fmt(values.get(m), d) for m, _, d, _ in COLUMNS]
  bicubic_psnr = results["bicubic"]["mean"]["psnr"]
  lines = ["| method | " + " | ".join(titles[:1] + ["PSNR - bicubic (dB)"] + titles[1:]) + " |",
           "|---|" + "---:|" * (len(COLUMNS) + 1)]
  for method, title in rows:
    mean = results[method]["mean"]
    row = cells(mean)
    row.insert(1, "n/a" if None in (mean["psnr"], bicubic_psnr) else
               f"{float(mean['psnr']) - float(bicubic_psnr):+.2f}")
    lines.append(f"| {title} | " + " | ".join(row) + " |")
  lines += [""] + [f"- {legend}" for *_, legend in COLUMNS]
  lines += ["", "Per image:", "", "| image | method | " + " | ".join(titles) + " |",
            "|---|---|" + "---:|" * len(COLUMNS)]
  for stem in stems:
    for method, title in rows:
      values = results[method]["per_image"].get(stem, {})
      lines.append(f"| {stem} | {title} | " + " | ".join(cells(values)) + " |")
  return lines


def _timings(workdir):
  """The markdown lines of the stage wall times in timings.json, one row per name."""
  path = os.path.join(workdir, "timings.json")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    timings = json.load(f)
  return (["", "| stage | wall time (s) |", "|---|---:|"] +
          [f"| {k} | {v:.1f} |" for k, v in timings.items()] +
          [f"| **total** | {sum(timings.values()):.1f} |"])


def report(workdir, data):
  """Writes `workdir`/report.md and the side-by-side and zoom PNGs; returns the markdown text."""
  results = _load_metrics(workdir, data)
  rows = [(m, title) for m, title in METHODS if m in results]
  stems = sorted(results["bicubic"]["per_image"])
  lines = ["# VOSR demo report", "",
           "Held-out images (never seen in training), x4; every metric on the Y channel with a "
           "4-pixel border crop (`python -m vosr_jax.evaluate`; definitions in its `--help`). "
           "↑ higher is better, ↓ lower is better, →1 closest to 1 is best.", ""]
  lines += _tables(results, rows, stems)
  lines += ["", "Side by side (" + " | ".join(t for _, t in rows) + " | HR):", ""]
  zoom_lines = []
  for stem in stems:
    paths = {m: os.path.join(workdir, "sr", m, f"{stem}.png") for m, _ in rows}
    paths["hr"] = os.path.join(data, "heldout_hr", f"{stem}.png")
    images = {m: image_io.decode(path).rgb8() for m, path in paths.items()}
    path = side_by_side(workdir, images, stem, results, rows)
    lines.append(f"![{stem}]({os.path.relpath(path, workdir)})")
    windows = zoom_windows(images["hr"])
    path = zoom_strip(workdir, images, stem, rows, windows)
    zoom_lines += [f"{stem}: flat window at x={windows['flat'][1]}, y={windows['flat'][0]}; "
                   f"detailed window at x={windows['detail'][1]}, y={windows['detail'][0]}.", "",
                   f"![{stem} zoomed]({os.path.relpath(path, workdir)})", ""]
  lines += ["", f"Zoomed 2x (nearest neighbour): top, the {ZOOM_CROP}x{ZOOM_CROP} window of the HR "
            "with the lowest mean local activity (flat); bottom, the one with the highest "
            "(detailed). Local activity is the local standard deviation of the HR's Y in a "
            "Gaussian window of sigma 3 (the measure flat noise and the detail metrics split "
            f"regions by); windows lie at least {ZOOM_MARGIN} px from the edges and are chosen "
            "from the HR alone, the same for every method.", ""] + zoom_lines
  lines += _timings(workdir)
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
  a.add_argument("--out", help="default: DEMO_DATA of configs/multistep.py")
  a = sub.add_parser("bicubic", help="the bicubic baseline of a folder of LR images")
  a.add_argument("--input", required=True)
  a.add_argument("--output", required=True)
  a.add_argument("--upscale", type=int, default=4)
  a = sub.add_parser("degrade", help="the demo's x4 LR of a folder of your own HR images")
  a.add_argument("--input", required=True, help="folder of HR images")
  a.add_argument("--output", required=True, help="folder for the LR PNGs")
  a.add_argument("--hr-output", help="folder for the HRs cut to multiples of 4 (PNG)")
  a = sub.add_parser("time", help="run a command and log its wall time")
  a.add_argument("--log", required=True)
  a.add_argument("name")
  a.add_argument("cmd", nargs=argparse.REMAINDER)
  a = sub.add_parser("report", help="report.md, side-by-side and zoomed images of the results")
  a.add_argument("--workdir", help="default: DEMO_WORKDIR of configs/multistep.py")
  a.add_argument("--data", help="the prepare folder (default: WORKDIR/data)")
  args = p.parse_args(argv)
  errors = []
  cli_utils.check_range(errors, "--upscale", getattr(args, "upscale", None), 1)
  if errors:
    p.error("; ".join(errors))
  if args.command == "prepare":
    prepare(args.out or default_folders()[1])
  elif args.command == "bicubic":
    bicubic(args.input, args.output, args.upscale)
  elif args.command == "degrade":
    try:
      degrade(args.input, args.output, args.hr_output)
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  elif args.command == "time":
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
      p.error("time: no command after NAME --")
    return timed(args.log, args.name, command)
  else:
    try:
      workdir = args.workdir or default_folders()[0]
      print(report(workdir, args.data or os.path.join(workdir, "data")))
    except FileNotFoundError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
