"""Metric writers: stdout (absl), a JSONL file, and TensorBoard events when a writer is installed.

TensorBoard: `clu.metric_writers` and `flax.metrics.tensorboard` import TensorFlow, which the base
install does not have. Events are written with `tensorboardX` when it is importable (the
`tensorboard` extra: `pip install -e ".[tensorboard]"`); otherwise only stdout and JSONL are
written (a log line says so).
Only the main process (jax.process_index() == 0) writes.
"""
import json
import os
import time

import jax
import numpy as np
from absl import logging
from PIL import Image

from vosr_jax import cli_utils


def truncate_jsonl(path, last_step):
  """Keeps the rows of the JSONL log `path` with step <= `last_step` (none when it is 0), and
  drops an unreadable last line (a process killed mid-write). Rewrites the file atomically."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      continue
    if 0 < last_step and step <= last_step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if kept != lines:
    logging.info("%s: %d rows after step %d dropped (they are logged again from there).", path,
                 len(lines) - len(kept), last_step)
    cli_utils.atomic_write_text(path, "".join(kept))


def _tensorboard_writer(logdir):
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.info("TensorBoard events disabled: tensorboardX is not installed "
                 "(metrics go to stdout and %s/metrics.jsonl).", logdir)
    return None
  return tensorboardX.SummaryWriter(logdir)


class MetricWriter:
  """Writes flat dicts of scalars ({'train/loss': 0.1, ...}) and images under `workdir`.

  Files: `<workdir>/metrics.jsonl` (one JSON object per call, with `step` and `time`),
  `<workdir>/samples/<name>_<step>.png`, and TensorBoard events in `<workdir>` when available.
  """

  def __init__(self, workdir, resume_step=0):
    """Opens the sinks; `metrics.jsonl` first loses its rows after `resume_step` (all of them for
    a fresh run, `resume_step` 0): a resumed run writes those steps again."""
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    if self.enabled:
      os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      truncate_jsonl(path, resume_step)
      self._jsonl = open(path, "a")
      self._tb = _tensorboard_writer(workdir)

  def write_scalars(self, step, scalars):
    """Logs `scalars` (name -> number) at `step` to every sink."""
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items())))
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def write_image(self, step, name, image):
    """Saves `image` (uint8 (H, W, 3)) as samples/<name>_<step>.png (and to TensorBoard)."""
    if not self.enabled:
      return
    path = os.path.join(self.workdir, "samples", f"{name}_{int(step):08d}.png")
    cli_utils.atomic_write(path, lambda f: Image.fromarray(np.asarray(image)).save(f, "PNG"))
    if self._tb is not None:
      self._tb.add_image(name, np.asarray(image), step, dataformats="HWC")

  def close(self):
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
