"""`make demo` end to end with two training steps: every artefact is produced and readable.

The run goes through the Makefile target itself (the same commands as the full demo) with
`MS_FLAGS`/`OS_FLAGS` cutting training to 2 steps and `MS_STEPS=1`; it is not timed.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vosr_jax import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(path):
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_produces_every_artefact(tmp_path):
  workdir = tmp_path / "demo"
  quick = "--config.total_steps=2"
  # -o: the venv stamp counts as up to date (this interpreter runs the commands).
  cmd = ["make", "-o", ".venv/.installed", "demo", f"PY={sys.executable}", f"WORKDIR={workdir}",
         f"MS_FLAGS={quick}", f"OS_FLAGS={quick}", "MS_STEPS=1"]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500,
                          check=False)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

  data = workdir / "data"
  assert sorted(p.name for p in (data / "train").iterdir()) == sorted(
      f"{n}.bmp" for n in demo.TRAIN)
  for stem in demo.HELDOUT:
    hr, lr = _png(data / "heldout_hr" / f"{stem}.png"), _png(data / "heldout_lr" / f"{stem}.png")
    assert hr.shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)
    for method, _ in demo.METHODS + demo.FIDELITY:
      assert _png(workdir / "sr" / method / f"{stem}.png").shape == hr.shape
    row = _png(workdir / "report" / f"{stem}.png")
    assert row.shape[1] >= 4 * hr.shape[1]
  for method, _ in demo.METHODS + demo.FIDELITY:
    metrics = json.loads((workdir / "sr" / method / "metrics.json").read_text())
    assert sorted(metrics["per_image"]) == sorted(demo.HELDOUT)
    assert np.isfinite(metrics["mean"]["psnr"]) and 0 < metrics["mean"]["ssim"] <= 1
  for kind in ("multistep", "onestep"):
    assert (workdir / kind / "checkpoints" / "2").is_dir()
  report = (workdir / "report.md").read_text()
  assert "| multi-step SR |" in report and "RANDOM" in report
  assert "| one-step SR, start noise x0.5 |" in report
  for stem in demo.HELDOUT:
    assert f"report/{stem}.png" in report
  timings = json.loads((workdir / "timings.json").read_text())
  assert {"prepare", "train_multistep", "distill_onestep", "sample_multistep", "sample_onestep",
          "bicubic", "evaluate"} <= set(timings)


def test_demo_config_uses_the_residual_target_and_cosine_decay():
  from configs import multistep, onestep  # pylint: disable=import-outside-toplevel
  ms, os_ = multistep.get_config("demo"), onestep.get_config("demo")
  for config in (ms, os_):
    assert config.objective.target == "residual" and config.autoencoder.kind == "pixel"
    assert config.encoder.init == "random" and config.optim.decay_steps == config.total_steps
  assert os_.kind == "onestep" and os_.model.path == "runs/demo/multistep"
  assert ms.data.sources == "runs/demo/data/train"
  assert multistep.get_config("tiny").objective.target == "latent"


def test_report_fails_clearly_without_evaluations(tmp_path, capsys):
  assert demo.main(["report", f"--workdir={tmp_path}"]) == 2
  assert "metrics.json is missing" in capsys.readouterr().err
