"""`make demo` end to end with two training steps: every artefact is produced and readable.

The run goes through the Makefile target itself (the same commands as the full demo) with
`MS_FLAGS`/`OS_FLAGS` cutting training to 2 steps and `SAMPLE_STEPS=4` leaving out the 25-step
samples (the same command at another step count); it is not timed.
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
# The sr/ folders make demo writes with SAMPLE_STEPS=4.
MADE = ("bicubic", "multistep_4", "onestep")


def _png(path):
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_produces_every_artefact(tmp_path):
  workdir = tmp_path / "demo"
  quick = "--config.total_steps=2"
  # -o: the venv stamp counts as up to date (this interpreter runs the commands).
  cmd = ["make", "-o", ".venv/.installed", "demo", f"PY={sys.executable}", f"WORKDIR={workdir}",
         f"MS_FLAGS={quick}", f"OS_FLAGS={quick}", "SAMPLE_STEPS=4"]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500,
                          check=False)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

  data = workdir / "data"
  assert sorted(p.name for p in (data / "train").iterdir()) == sorted(
      f"{n}.bmp" for n in demo.TRAIN)
  for stem in demo.HELDOUT:
    hr, lr = _png(data / "heldout_hr" / f"{stem}.png"), _png(data / "heldout_lr" / f"{stem}.png")
    assert hr.shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)
    for method in MADE:
      assert _png(workdir / "sr" / method / f"{stem}.png").shape == hr.shape
    row = _png(workdir / "report" / f"{stem}.png")
    assert row.shape[1] >= (len(MADE) + 1) * hr.shape[1]
    assert (workdir / "report" / f"{stem}_zoom.png").is_file()
  for method in MADE:
    metrics = json.loads((workdir / "sr" / method / "metrics.json").read_text())
    assert sorted(metrics["per_image"]) == sorted(demo.HELDOUT)
    assert np.isfinite(metrics["mean"]["psnr"]) and 0 < metrics["mean"]["ssim"] <= 1
  for kind in ("multistep", "onestep"):
    assert (workdir / kind / "checkpoints" / "2").is_dir()
  report = (workdir / "report.md").read_text()
  assert "| multi-step SR, 4 steps |" in report and "RANDOM" in report
  assert "25 steps" not in report and not (workdir / "sr" / "multistep_25").exists()
  for stem in demo.HELDOUT:
    assert f"report/{stem}.png" in report and f"report/{stem}_zoom.png" in report
  timings = json.loads((workdir / "timings.json").read_text())
  assert {"prepare", "train_multistep", "distill_onestep", "sample_multistep_4", "sample_onestep",
          "bicubic", "evaluate_multistep_4", "evaluate_onestep"} <= set(timings)


def test_demo_config_uses_the_residual_target_and_cosine_decay():
  from configs import multistep, onestep  # pylint: disable=import-outside-toplevel
  ms, os_ = multistep.get_config("demo"), onestep.get_config("demo")
  for config in (ms, os_):
    assert config.objective.target == "residual" and config.autoencoder.kind == "pixel"
    assert config.encoder.init == "random" and config.optim.decay_steps == config.total_steps
  assert os_.kind == "onestep" and os_.model.path == f"{multistep.DEMO_WORKDIR}/multistep"
  assert ms.data.sources == f"{multistep.DEMO_DATA}/train"
  assert multistep.get_config("tiny").objective.target == "latent"
  # The demo's departures are options whose defaults are the official recipe.
  assert ms.model.overrides.prediction == os_.model.overrides.prediction == "x_skip"
  assert ms.model.overrides.pixel_head == os_.model.overrides.pixel_head == 16
  assert ms.objective.loss_space == "velocity" and ms.objective.residual_window == 9
  official = multistep.get_config("0.5b")
  assert not {"prediction", "time_scale", "pixel_head"} & set(official.model.overrides)
  assert official.objective.loss_space == "velocity" and official.objective.target == "latent"


def test_report_fails_clearly_without_evaluations(tmp_path, capsys):
  assert demo.main(["report", f"--workdir={tmp_path}"]) == 2
  assert "metrics.json is missing" in capsys.readouterr().err


def test_default_folders_are_the_configs(tmp_path, monkeypatch, capsys):
  from configs import multistep  # pylint: disable=import-outside-toplevel
  assert demo.default_folders() == (multistep.DEMO_WORKDIR, multistep.DEMO_DATA)
  monkeypatch.chdir(tmp_path)
  assert demo.main(["report"]) == 2
  missing = os.path.join(multistep.DEMO_WORKDIR, "sr", "bicubic", "metrics.json")
  assert f"{missing} is missing" in capsys.readouterr().err


def _bicubic_x4(img):
  h, w = img.shape[:2]
  small = Image.fromarray(img).resize((w // 4, h // 4), Image.BICUBIC)
  return np.asarray(small.resize((w, h), Image.BICUBIC))


def _noisy(img, std, seed=0):
  noise = np.random.default_rng(seed).normal(0, std, img.shape)
  return np.clip(np.round(img + noise), 0, 255).astype(np.uint8)


@pytest.fixture()
def evaluated(tmp_path):
  """A workdir as make demo leaves it, on two 112x208 crops: sr/bicubic (evaluated for PSNR and
  SSIM only), sr/multistep_4 (bicubic + noise) and sr/onestep (bicubic), evaluated for all."""
  from skimage import data  # pylint: disable=import-outside-toplevel
  from vosr_jax import evaluate  # pylint: disable=import-outside-toplevel
  hr_dir = tmp_path / "data" / "heldout_hr"
  hr_dir.mkdir(parents=True)
  outputs = {"bicubic": _bicubic_x4, "multistep_4": lambda x: _noisy(_bicubic_x4(x), 8),
             "onestep": _bicubic_x4}
  for method in outputs:
    (tmp_path / "sr" / method).mkdir(parents=True)
  for name in ("astronaut", "coffee"):
    hr = getattr(data, name)()[:112, :208]
    Image.fromarray(hr).save(hr_dir / f"{name}.png")
    for method, make in outputs.items():
      Image.fromarray(make(hr)).save(tmp_path / "sr" / method / f"{name}.png")
  for method in outputs:
    metrics = "psnr,ssim" if method == "bicubic" else ",".join(m for m, *_ in demo.COLUMNS)
    assert evaluate.main([f"--pred={tmp_path / 'sr' / method}", f"--gt={hr_dir}",
                          f"--metrics={metrics}"]) == 0
  (tmp_path / "timings.json").write_text(json.dumps(
      {"sample_multistep": 1.25, "sample_multistep_25": 2.5}))
  return tmp_path


def test_report_tables_legends_and_images(evaluated, capsys):
  from vosr_jax import metrics  # pylint: disable=import-outside-toplevel
  assert demo.main(["report", f"--workdir={evaluated}"]) == 0
  capsys.readouterr()
  report = (evaluated / "report.md").read_text()
  lines = report.splitlines()
  header = "| method | PSNR (dB) ↑ | PSNR - bicubic (dB) | SSIM ↑ | flat noise ↓ | detail HF →1 | "
  assert header + "detail GSIM ↑ | NIQE ↓ |" in lines
  rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines
          if line.startswith("| ") and " | " in line}
  # Present folders only (no multistep_25 here), in METHODS order.
  titles = [line.split(" | ")[0][2:] for line in lines[lines.index(header + "detail GSIM ↑ | "
                                                                   "NIQE ↓ |") + 2:][:3]]
  assert titles == ["LR bicubic", "multi-step SR, 4 steps", "one-step SR"]
  assert "25 steps" not in report
  # The bicubic folder's metrics.json lacks the region metrics and NIQE: computed for the report.
  hr, bic = (_png(evaluated / d / "astronaut.png") for d in ("data/heldout_hr", "sr/bicubic"))
  astronaut = [line for line in lines if line.startswith("| astronaut | LR bicubic |")][0]
  assert f" {metrics.flat_noise(bic, hr, 4):.3f} |" in astronaut
  flat_noise = {t: float(rows[t][3]) for t in titles}
  assert flat_noise["multi-step SR, 4 steps"] > 5 > 1 > flat_noise["LR bicubic"] == flat_noise["one-step SR"]
  assert rows["LR bicubic"][1] == "+0.00" and float(rows["multi-step SR, 4 steps"][1]) < 0
  assert all(rows[t][-1] != "n/a" for t in titles)
  # One legend line per metric; NIQE's caveat sits with the flat-noise measure.
  legends = [line for line in lines if line.startswith("- ")]
  assert len(legends) == len(demo.COLUMNS)
  assert "rewards noise" in legends[2] and legends[2].startswith("- flat noise")
  assert "rewards noise" in legends[-1]
  # Timings: each name its own row.
  assert "| sample_multistep | 1.2 |" in report and "| sample_multistep_25 | 2.5 |" in report
  assert "| **total** | 3.8 |" in report
  # Images: a side-by-side and a 2x zoom strip per image, every method and the HR.
  for stem in ("astronaut", "coffee"):
    assert f"](report/{stem}.png)" in report and f"](report/{stem}_zoom.png)" in report
    assert _png(evaluated / "report" / f"{stem}.png").shape[1] == 4 * 208 + 3 * 4
    zoom = _png(evaluated / "report" / f"{stem}_zoom.png")
    size = 2 * demo.ZOOM_CROP
    assert zoom.shape[1] == 40 + 4 * (size + 4)
    windows = demo.zoom_windows(_png(evaluated / "data/heldout_hr" / f"{stem}.png"))
    assert f"{stem}: flat window at x={windows['flat'][1]}, y={windows['flat'][0]}" in report
    hr = _png(evaluated / "data/heldout_hr" / f"{stem}.png")
    (r, c), bottom = windows["detail"], zoom.shape[0] - size
    np.testing.assert_array_equal(  # the HR column's detailed crop, nearest-neighbour 2x
        zoom[bottom:, -size:], hr[r:r + 48, c:c + 48].repeat(2, axis=0).repeat(2, axis=1))


def test_zoom_windows_follow_the_hr_only():
  rng = np.random.default_rng(0)
  hr = np.full((160, 200, 3), 120, np.uint8)
  hr[:, 100:] = rng.integers(0, 255, (160, 100, 3))     # textured right half
  hr[20:60, 30:70] = rng.integers(100, 140, (40, 40, 3))  # a mildly textured patch on the left
  hr[90:130, 140:180] = 128                               # a flat patch inside the texture
  windows = demo.zoom_windows(hr)
  (fr, fc), (dr, dc) = windows["flat"], windows["detail"]
  assert fc + demo.ZOOM_CROP <= 100 and not (fr < 60 and fc < 70 and fr + 48 > 20)
  assert dc >= 100 and not (90 - 48 < dr < 130 and 140 - 48 < dc < 180)
  assert min(fr, fc, dr, dc) >= demo.ZOOM_MARGIN
  assert max(fr, dr) + 48 <= 160 - demo.ZOOM_MARGIN and max(fc, dc) + 48 <= 200 - demo.ZOOM_MARGIN
  assert demo.zoom_windows(hr) == windows
  with pytest.raises(ValueError, match="no 48x48 window"):
    demo.zoom_windows(hr[:70])


def test_degrade_makes_the_demo_lr_of_a_folder(tmp_path, capsys, monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  from configs import multistep  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  hr_in, lr_out, hr_out = tmp_path / "hr", tmp_path / "lr", tmp_path / "hr_cut"
  hr_in.mkdir()
  images = {"a": rng.integers(0, 255, (37, 50, 3), np.uint8),
            "b": rng.integers(0, 255, (40, 44, 3), np.uint8)}
  Image.fromarray(images["a"]).save(hr_in / "a.png")
  Image.fromarray(images["b"]).save(hr_in / "b.bmp")
  (hr_in / "notes.txt").write_text("not an image")
  calls = []  # One real degradation (one compilation), its arguments and result recorded.
  real = demo.degrade_lr
  monkeypatch.setattr(demo, "degrade_lr", lambda *a: calls.append((a, real(*a))) or calls[-1][1])
  assert demo.main(["degrade", f"--input={hr_in}", f"--output={lr_out}",
                    f"--hr-output={hr_out}"]) == 0
  assert "a: HR 48x36 (cut from 50x37), LR 12x9" in capsys.readouterr().out
  assert sorted(p.name for p in lr_out.iterdir()) == ["a.png", "b.png"]
  [((hrs, config, key), lrs)] = calls
  assert config == multistep.get_config("demo").degradation
  assert jax.random.key_data(key).tolist() == jax.random.key_data(
      jax.random.key(demo.SEED)).tolist()
  cut = [images["a"][:36, :48], images["b"]]
  for name, hr, expected_hr, lr in zip("ab", hrs, cut, lrs):
    np.testing.assert_array_equal(hr, expected_hr)
    np.testing.assert_array_equal(_png(hr_out / f"{name}.png"), hr)
    np.testing.assert_array_equal(_png(lr_out / f"{name}.png"), lr)
  assert lrs[0].shape == (9, 12, 3) and lrs[1].shape == (10, 11, 3)


def test_degrade_errors(tmp_path, capsys):
  assert demo.main(["degrade", f"--input={tmp_path / 'absent'}", f"--output={tmp_path}"]) == 2
  assert "no such file or folder" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  assert demo.main(["degrade", f"--input={tmp_path / 'empty'}", f"--output={tmp_path}"]) == 2
  assert "no images" in capsys.readouterr().err
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "empty" / "x.png")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "empty" / "x.jpg")
  assert demo.main(["degrade", f"--input={tmp_path / 'empty'}", f"--output={tmp_path}"]) == 2
  assert "share a name" in capsys.readouterr().err
