"""Evaluate a folder of super-resolved images against a folder of ground truths.

  python -m vosr_jax.evaluate --pred out/sd21_steps25 --gt data/DIV2K_valid_HR
  python -m vosr_jax.evaluate --pred out/x --gt gt/ --metrics psnr,ssim,niqe --crop-border 4
  python -m vosr_jax.evaluate --pred out/x --metrics niqe          # no-reference only: no --gt

Images pair up by file stem (`0801.png` with `0801.jpg`). The result is printed as a markdown
table and written atomically to `metrics.json` and `metrics.csv` in `--out-dir` (default: the
`--pred` folder). The JSON holds
`{"mean": {metric: value}, "per_image": {stem: {metric: value}}, "skipped": [{"file", "reason"}],
"settings": {...}}`; non-finite values (the PSNR of identical images) are written as the strings
"inf"/"nan". Missing pairs, duplicate stems, unreadable or non-image files, mismatched sizes and
images a metric cannot handle (e.g. NIQE below two 96x96 blocks) are skipped with a reason and
the run continues; means cover the evaluated images only. Hidden files and this tool's own
outputs are ignored. Exit status: 0 when at least one image was evaluated, 1 when none was, 2 on
a usage or setup error (unknown metric, missing folder, missing weights).

Metrics (see `vosr_jax.metrics` for the definitions), with their direction as the printed
table's header marks it (↑ higher is better, ↓ lower is better, →1 closest to 1 is best):
  psnr, ssim  ↑ full reference; `--crop-border` and `--y-channel` (BasicSR's x4 convention: 4, Y).
  flat_noise  ↓ full reference: high-pass energy of the prediction where the HR is locally flat
              (lowest quarter of its local standard deviation) over the HR's own there (floor 1
              grey level^2). The HR scores 1, blur < 1, noise and speckle >> 1. Y, same crop.
  detail_hf   →1 the same energy ratio where the HR is most detailed (highest quarter): blur < 1;
              noise raises it too, so read it with detail_gsim.
  detail_gsim ↑ gradient similarity (GMSD's GMS on Prewitt gradient vectors) on that detailed
              region: 1 for the HR, lowered by blur and by noise alike.
  niqe        ↓ no reference, on the prediction; always the Y channel (as BasicSR), same crop.
              NIQE rewards noise: a speckled output can score better than the HR photos
              themselves; flat_noise is the check for that.
  lpips ↓, dists ↓ (full reference), musiq ↑, maniqa ↑, clipiqa ↑ (no reference): through the
              optional package `pyiqa` on the whole RGB image (no crop), only from weight files
              already in the torch hub cache (`$TORCH_HOME/hub`, default ~/.cache/torch/hub); a
              missing file is an error naming it. Backbones that pyiqa fetches through timm or
              the Hugging Face hub (MANIQA's ViT) are not checked here; pyiqa's own error is
              re-raised.

Image reading: `vosr_jax.data.image_io.decode`'s 8-bit RGB (EXIF orientation applied, grey and
palette expanded to RGB, 16-bit levels rounded to the nearest 8-bit level). Alpha is dropped (not
composited; as OpenCV's `imread`).
"""
import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from vosr_jax import cli_utils
from vosr_jax import metrics as M
from vosr_jax.data import image_io

OUTPUT_FILES = ("metrics.json", "metrics.csv")
DEFAULT_METRICS = ("psnr", "ssim")
_BUILTIN_FULL_REFERENCE = {"psnr": True, "ssim": True, "flat_noise": True, "detail_hf": True,
                           "detail_gsim": True, "niqe": False}


class PyiqaMetric(NamedTuple):
  """A metric computed by pyiqa and the weight files it needs, relative to the torch hub dir."""
  pyiqa_name: str
  full_reference: bool
  weight_files: tuple


PYIQA_METRICS = {
    "lpips": PyiqaMetric("lpips", True, ("pyiqa/LPIPS_v0.1_alex-df73285e.pth",
                                         "checkpoints/alexnet-owt-7be5be79.pth")),
    "dists": PyiqaMetric("dists", True, ("pyiqa/DISTS_weights-f5e65c96.pth",
                                         "checkpoints/vgg16-397923af.pth")),
    "musiq": PyiqaMetric("musiq", False, ("pyiqa/musiq_koniq_ckpt-e95806b9.pth",)),
    "maniqa": PyiqaMetric("maniqa", False, ("pyiqa/ckpt_koniq10k.pt",)),
    "clipiqa": PyiqaMetric("clipiqa", False, ("clip/RN50.pt",)),
}
KNOWN_METRICS = tuple(_BUILTIN_FULL_REFERENCE) + tuple(PYIQA_METRICS)
# Which way is better: "↑" higher, "↓" lower, "→1" closest to 1.
DIRECTIONS = {"psnr": "↑", "ssim": "↑", "flat_noise": "↓", "detail_hf": "→1", "detail_gsim": "↑",
              "niqe": "↓", "lpips": "↓", "dists": "↓", "musiq": "↑", "maniqa": "↑",
              "clipiqa": "↑"}
_REGION_METRICS = {"flat_noise": M.flat_noise, "detail_hf": M.detail_hf,
                   "detail_gsim": M.detail_gsim}


class _Metric(NamedTuple):
  full_reference: bool
  fn: object  # (pred (H, W, 3) uint8, gt (H, W, 3) uint8 or None) -> float


def _torch_hub_dir():
  """`torch.hub.get_dir()` without importing torch: $TORCH_HOME/hub, default ~/.cache/torch/hub."""
  cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
  torch_home = os.environ.get("TORCH_HOME", os.path.join(cache, "torch"))
  return Path(os.path.expanduser(torch_home)) / "hub"


def _pyiqa_metric(name):
  """Builds a pyiqa metric from local weights only; errors name the metric and missing files."""
  spec = PYIQA_METRICS[name]
  hub = _torch_hub_dir()
  missing = [str(hub / f) for f in spec.weight_files if not (hub / f).is_file()]
  if missing:
    raise FileNotFoundError(
        f"metric '{name}' (pyiqa '{spec.pyiqa_name}') needs weight file(s) that are not present: "
        f"{', '.join(missing)}. pyiqa would download them on first use; copy them there instead "
        f"(TORCH_HOME moves the cache).")
  try:
    import pyiqa  # optional: imported only when a pyiqa metric is asked for
    import torch
  except ImportError as e:
    raise ImportError(f"metric '{name}' needs the optional package pyiqa "
                      f"(pip install pyiqa): {e}") from e
  try:
    model = pyiqa.create_metric(spec.pyiqa_name)
  except Exception as e:  # pyiqa raises many types; add which metric and where weights were read
    raise RuntimeError(f"metric '{name}': pyiqa could not build '{spec.pyiqa_name}' from the "
                       f"local weights under {hub}: {e}") from e

  def to_tensor(img):
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0

  def fn(pred, gt):
    inputs = (to_tensor(pred), to_tensor(gt)) if spec.full_reference else (to_tensor(pred),)
    with torch.no_grad():
      return float(model(*inputs).item())

  return _Metric(spec.full_reference, fn)


def _build_metrics(names, crop_border, y_channel, niqe_params):
  """Resolves metric names to callables, failing before any image is read."""
  unknown = [n for n in names if n not in KNOWN_METRICS]
  if unknown or not names:
    raise ValueError(f"unknown metric(s) {unknown or names}; known: {', '.join(KNOWN_METRICS)}")
  built = {}
  for name in names:
    if name == "psnr":
      built[name] = _Metric(True, lambda p, g: M.psnr(p, g, crop_border, y_channel))
    elif name == "ssim":
      built[name] = _Metric(True, lambda p, g: M.ssim(p, g, crop_border, y_channel))
    elif name in _REGION_METRICS:
      built[name] = _Metric(True, lambda p, g, fn=_REGION_METRICS[name]: fn(p, g, crop_border))
    elif name == "niqe":
      params = M.load_niqe_params(niqe_params)
      built[name] = _Metric(False, lambda p, g: M.niqe(p, params, crop_border))
    else:
      built[name] = _pyiqa_metric(name)
  return built


def _index(folder):
  """Maps file stem -> files in `folder` (not recursive; hidden files and outputs ignored)."""
  by_stem = {}
  for path in sorted(folder.iterdir()):
    if path.is_file() and not path.name.startswith(".") and path.name not in OUTPUT_FILES:
      by_stem.setdefault(path.stem, []).append(path)
  return by_stem


def _read(path):
  """Reads an image; returns (array, None) or (None, reason)."""
  try:
    return image_io.decode(path).rgb8(), None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    return None, f"unreadable image: {e}"


def evaluate_folders(pred_dir, gt_dir=None, metrics=DEFAULT_METRICS, crop_border=4,
                     y_channel=True, niqe_params=None, progress=False):
  """Computes metrics for every prediction/ground-truth pair of two folders.

  Args:
    pred_dir: folder of predicted (super-resolved) images.
    gt_dir: folder of ground-truth images, paired by file stem; may be None when every metric is
      no-reference.
    metrics: metric names, a subset of KNOWN_METRICS.
    crop_border: pixels removed from each edge for the built-in metrics (all but pyiqa's).
    y_channel: psnr/ssim on the BT.601 Y channel (True) or averaged over RGB (False); the other
      built-in metrics always use Y.
    niqe_params: NIQE pristine-model npz; None means `metrics.load_niqe_params` defaults.
    progress: show a tqdm progress bar.

  Returns:
    {"mean": {metric: float or None}, "per_image": {stem: {metric: float}},
     "skipped": [{"file": str, "reason": str}], "settings": {...}}. Means are None when no
    image was evaluated.
  """
  metrics = tuple(metrics)
  built = _build_metrics(metrics, crop_border, y_channel, niqe_params)
  needs_gt = any(m.full_reference for m in built.values())
  pred_dir = Path(pred_dir)
  gt_dir = Path(gt_dir) if gt_dir is not None else None
  if needs_gt and gt_dir is None:
    raise ValueError(f"metrics {[n for n, m in built.items() if m.full_reference]} need a "
                     f"ground-truth folder")
  for folder in (pred_dir, gt_dir):
    if folder is not None and not folder.is_dir():
      raise NotADirectoryError(f"not a folder: {folder}")

  preds = _index(pred_dir)
  gts = _index(gt_dir) if needs_gt else {}
  skipped = []

  def skip(path, reason):
    skipped.append({"file": str(path), "reason": reason})

  for stem, paths in list(preds.items()) + list(gts.items()):
    if len(paths) > 1:
      for path in paths:
        skip(path, f"several files share the stem '{stem}': {', '.join(p.name for p in paths)}")
  for stem, paths in gts.items():
    if stem not in preds and len(paths) == 1:
      skip(paths[0], f"no prediction with stem '{stem}' in {pred_dir}")

  per_image = {}
  for stem, paths in tqdm(sorted(preds.items()), disable=not progress, desc="evaluate"):
    if len(paths) > 1:
      continue
    pred_path, gt_path = paths[0], None
    if needs_gt:
      if stem not in gts:
        skip(pred_path, f"no ground-truth file with stem '{stem}' in {gt_dir}")
        continue
      if len(gts[stem]) > 1:
        skip(pred_path, f"ambiguous ground truth: several files with stem '{stem}' in {gt_dir}")
        continue
      gt_path = gts[stem][0]
    pred, reason = _read(pred_path)
    if reason:
      skip(pred_path, reason)
      continue
    gt = None
    if gt_path is not None:
      gt, reason = _read(gt_path)
      if reason:
        skip(gt_path, reason)
        continue
      if gt.shape != pred.shape:
        skip(pred_path, f"size {pred.shape[1]}x{pred.shape[0]} (WxH) differs from the ground "
                        f"truth {gt_path} ({gt.shape[1]}x{gt.shape[0]})")
        continue
    try:
      per_image[stem] = {name: m.fn(pred, gt) for name, m in built.items()}
    except (ValueError, RuntimeError) as e:  # e.g. NIQE on an image below two 96x96 blocks
      skip(pred_path, f"metric failed: {e}")

  mean = {name: (float(np.mean([v[name] for v in per_image.values()])) if per_image else None)
          for name in metrics}
  settings = {"pred_dir": str(pred_dir), "gt_dir": str(gt_dir) if gt_dir else None,
              "metrics": list(metrics), "crop_border": crop_border, "y_channel": y_channel,
              "niqe_params": str(M.niqe_params_path(niqe_params)) if "niqe" in built else None}
  return {"mean": mean, "per_image": per_image, "skipped": skipped, "settings": settings}


def _finite_or_str(x):
  """JSON has no inf/nan: write them as strings (float('inf') reads them back)."""
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if isinstance(x, dict):
    return {k: _finite_or_str(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_finite_or_str(v) for v in x]
  return x


def write_results(result, out_dir):
  """Writes `metrics.json` and `metrics.csv` (one row per image, then a "(mean)" row).

  Args:
    result: the dict returned by `evaluate_folders`.
    out_dir: destination folder, created if needed.

  Returns:
    (json_path, csv_path).
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  json_path, csv_path = (out_dir / name for name in OUTPUT_FILES)
  cli_utils.atomic_write_text(
      json_path, json.dumps(_finite_or_str(result), indent=2, allow_nan=False) + "\n")
  names = result["settings"]["metrics"]
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(["image"] + names)
  for stem, values in result["per_image"].items():
    writer.writerow([stem] + [repr(values[n]) for n in names])
  writer.writerow(["(mean)"] + ["" if result["mean"][n] is None else repr(result["mean"][n])
                                for n in names])
  cli_utils.atomic_write_text(csv_path, buf.getvalue())
  return json_path, csv_path


def format_table(result):
  """Markdown table: one row per evaluated image and a bold mean row; headers show DIRECTIONS."""
  names = result["settings"]["metrics"]

  def fmt(v):
    return "n/a" if v is None else f"{v:.4f}"

  lines = ["| image | " + " | ".join(f"{n} {DIRECTIONS[n]}" for n in names) + " |",
           "|---|" + "---:|" * len(names)]
  for stem, values in result["per_image"].items():
    lines.append(f"| {stem} | " + " | ".join(fmt(values[n]) for n in names) + " |")
  lines.append("| **mean** | " + " | ".join(fmt(result["mean"][n]) for n in names) + " |")
  lines.append("\n↑ higher is better, ↓ lower is better, →1 closest to 1 is best.")
  if "niqe" in names:
    lines.append("NIQE rewards noise (a speckled output can beat the HR): check flat_noise.")
  return "\n".join(lines)


def _parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m vosr_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--pred", required=True, help="folder of predicted images")
  p.add_argument("--gt", help="folder of ground-truth images (paired by file stem)")
  p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                 help="comma-separated, from: " + ", ".join(
                     f"{n} {DIRECTIONS[n]}" for n in KNOWN_METRICS) + " (see above)")
  p.add_argument("--crop-border", type=int, default=4, help="pixels cut from each edge")
  p.add_argument("--y-channel", action=argparse.BooleanOptionalAction, default=True,
                 help="psnr/ssim on the BT.601 Y channel (default) or on RGB")
  p.add_argument("--out-dir", help="where metrics.json/csv go (default: the --pred folder)")
  p.add_argument("--niqe-params", help=f"NIQE pristine-model npz (default: ${M.NIQE_PARAMS_ENV} "
                                       f"or the packaged copy)")
  args = p.parse_args(argv)
  if args.crop_border < 0:
    p.error(f"--crop-border={args.crop_border} must be >= 0")
  return args


def main(argv=None):
  """CLI entry point; returns the exit status."""
  args = _parse_args(argv)
  metrics = tuple(n.strip().lower() for n in args.metrics.split(",") if n.strip())
  try:
    if args.out_dir:
      cli_utils.check_output_folder(args.out_dir, "--out-dir")
    elif os.path.isdir(args.pred):  # A missing --pred is reported below.
      cli_utils.check_output_folder(args.pred, "--pred", "the results go there; pass --out-dir")
    result = evaluate_folders(args.pred, args.gt, metrics, args.crop_border, args.y_channel,
                              args.niqe_params, progress=True)
  except (ValueError, OSError, ImportError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_table(result))
  n_eval, skipped = len(result["per_image"]), result["skipped"]
  print(f"\n{n_eval} image(s) evaluated, {len(skipped)} file(s) skipped")
  for s in skipped:
    print(f"  skipped {s['file']}: {s['reason']}")
  try:
    paths = write_results(result, args.out_dir or args.pred)
  except OSError as e:
    print(f"error: could not write the results: {e}", file=sys.stderr)
    return 2
  print(f"wrote {paths[0]} and {paths[1]}")
  if not n_eval:
    print("error: no image pair could be evaluated", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
