"""The evaluation CLI: pairing, bad inputs, outputs, image reading, optional pyiqa metrics."""
import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from vosr_jax import evaluate as E
from vosr_jax import metrics as M

SIDE = 200  # two 96x96 NIQE blocks per side after a 4-pixel crop


def _photo(name):
  return getattr(data, name)()[:SIDE, :SIDE]


def _degrade(img):
  im = Image.fromarray(img)
  return np.asarray(im.resize((SIDE // 4, SIDE // 4), Image.BICUBIC).resize((SIDE, SIDE),
                                                                             Image.BICUBIC))


@pytest.fixture()
def folders(tmp_path):
  """pred/ and gt/ with two good pairs (PNG prediction vs JPEG-named stems differ in extension)."""
  pred, gt = tmp_path / "pred", tmp_path / "gt"
  pred.mkdir()
  gt.mkdir()
  for name in ("astronaut", "coffee"):
    Image.fromarray(_photo(name)).save(gt / f"{name}.png")
    Image.fromarray(_degrade(_photo(name))).save(pred / f"{name}.png")
  return pred, gt


def test_values_outputs_and_table(folders, capsys):
  pred, gt = folders
  assert E.main(["--pred", str(pred), "--gt", str(gt), "--metrics", "psnr,ssim,niqe"]) == 0
  result = json.loads((pred / "metrics.json").read_text())
  assert set(result) == {"mean", "per_image", "skipped", "settings"}
  assert result["skipped"] == []
  assert result["settings"]["crop_border"] == 4 and result["settings"]["y_channel"] is True
  params = M.load_niqe_params()
  for name in ("astronaut", "coffee"):
    p, g = _degrade(_photo(name)), _photo(name)
    got = result["per_image"][name]
    assert got["psnr"] == pytest.approx(M.psnr(p, g, 4, True), abs=1e-12)
    assert got["ssim"] == pytest.approx(M.ssim(p, g, 4, True), abs=1e-12)
    assert got["niqe"] == pytest.approx(M.niqe(p, params, 4), abs=1e-12)
  for metric in ("psnr", "ssim", "niqe"):
    assert result["mean"][metric] == pytest.approx(
        np.mean([v[metric] for v in result["per_image"].values()]))
  rows = list(csv.reader((pred / "metrics.csv").open()))
  assert rows[0] == ["image", "psnr", "ssim", "niqe"]
  assert [r[0] for r in rows[1:]] == ["astronaut", "coffee", "(mean)"]
  assert float(rows[-1][1]) == pytest.approx(result["mean"]["psnr"])
  out = capsys.readouterr().out
  assert "| image | psnr ↑ | ssim ↑ | niqe ↓ |" in out and "| **mean** |" in out
  assert "NIQE rewards noise" in out
  assert "2 image(s) evaluated, 0 file(s) skipped" in out
  # Written atomically: no temporary files remain.
  assert sorted(p.name for p in pred.iterdir()) == [
      "astronaut.png", "coffee.png", "metrics.csv", "metrics.json"]


def test_region_metrics(folders, capsys):
  pred, gt = folders
  names = ("flat_noise", "detail_hf", "detail_gsim")
  assert E.main(["--pred", str(pred), "--gt", str(gt), "--metrics", ",".join(names)]) == 0
  result = json.loads((pred / "metrics.json").read_text())
  for name in ("astronaut", "coffee"):
    p, g = _degrade(_photo(name)), _photo(name)
    got = result["per_image"][name]
    assert got["flat_noise"] == pytest.approx(M.flat_noise(p, g, 4), abs=1e-12)
    assert got["detail_hf"] == pytest.approx(M.detail_hf(p, g, 4), abs=1e-12)
    assert got["detail_gsim"] == pytest.approx(M.detail_gsim(p, g, 4), abs=1e-12)
    assert got["flat_noise"] < 1 and got["detail_hf"] < 1 and got["detail_gsim"] < 1
  out = capsys.readouterr().out
  assert "| image | flat_noise ↓ | detail_hf →1 | detail_gsim ↑ |" in out
  assert "NIQE" not in out
  assert E.main(["--pred", str(pred), "--metrics", "flat_noise"]) == 2
  assert "need a ground-truth folder" in capsys.readouterr().err


def test_help_documents_directions_and_the_niqe_caveat(capsys):
  with pytest.raises(SystemExit):
    E.main(["--help"])
  out = capsys.readouterr().out
  assert "flat_noise ↓" in out and "detail_hf →1" in out and "detail_gsim ↑" in out
  assert "NIQE rewards noise" in out


def test_settings_flags_and_out_dir(folders, tmp_path):
  pred, gt = folders
  out = tmp_path / "report"
  assert E.main(["--pred", str(pred), "--gt", str(gt), "--crop-border", "0", "--no-y-channel",
                 "--out-dir", str(out)]) == 0
  result = json.loads((out / "metrics.json").read_text())
  assert result["settings"]["crop_border"] == 0 and result["settings"]["y_channel"] is False
  p, g = _degrade(_photo("coffee")), _photo("coffee")
  assert result["per_image"]["coffee"]["psnr"] == pytest.approx(M.psnr(p, g, 0, False))
  assert not (pred / "metrics.json").exists()


def test_bad_inputs_are_skipped_with_reasons(folders):
  pred, gt = folders
  img = _photo("chelsea")
  Image.fromarray(img).save(gt / "sizes.png")                      # mismatched size
  Image.fromarray(img[:, :150]).save(pred / "sizes.png")
  Image.fromarray(img).save(pred / "orphan.png")                   # no ground truth
  Image.fromarray(img).save(gt / "lonely.png")                     # no prediction
  (pred / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # unreadable
  Image.fromarray(img).save(gt / "broken.png")
  (pred / "notes.txt").write_text("not an image")                  # non-image
  (gt / "notes.txt").write_text("not an image either")
  Image.fromarray(img).save(pred / "dup.png")                      # ambiguous stem
  Image.fromarray(img).save(pred / "dup.jpg")
  Image.fromarray(img).save(gt / "dup.png")
  Image.fromarray(img[:100, :100]).save(pred / "small.png")       # too small for NIQE
  Image.fromarray(img[:100, :100]).save(gt / "small.png")
  (pred / ".hidden").write_text("ignored")

  result = E.evaluate_folders(pred, gt, ("psnr", "niqe"))
  assert sorted(result["per_image"]) == ["astronaut", "coffee"]
  reasons = {Path(s["file"]).relative_to(pred.parent).as_posix(): s["reason"]
             for s in result["skipped"]}
  assert set(reasons) == {"pred/sizes.png", "pred/orphan.png", "gt/lonely.png",
                          "pred/broken.png", "pred/notes.txt", "pred/dup.png", "pred/dup.jpg",
                          "pred/small.png"}
  assert "150x200 (WxH) differs" in reasons["pred/sizes.png"]
  assert "no ground-truth file with stem 'orphan'" in reasons["pred/orphan.png"]
  assert "no prediction with stem 'lonely'" in reasons["gt/lonely.png"]
  assert reasons["pred/broken.png"].startswith("unreadable image")
  assert reasons["pred/notes.txt"].startswith("unreadable image")
  assert "dup.jpg, dup.png" in reasons["pred/dup.png"]
  assert "two 96x96 blocks" in reasons["pred/small.png"]
  assert result["mean"]["psnr"] == pytest.approx(
      np.mean([result["per_image"][k]["psnr"] for k in ("astronaut", "coffee")]))


def test_empty_and_missing_folders(tmp_path, capsys):
  empty_pred, empty_gt = tmp_path / "p", tmp_path / "g"
  empty_pred.mkdir()
  empty_gt.mkdir()
  assert E.main(["--pred", str(empty_pred), "--gt", str(empty_gt)]) == 1
  result = json.loads((empty_pred / "metrics.json").read_text())
  assert result["mean"] == {"psnr": None, "ssim": None} and result["per_image"] == {}
  assert "no image pair could be evaluated" in capsys.readouterr().err
  assert E.main(["--pred", str(tmp_path / "absent"), "--gt", str(empty_gt)]) == 2
  assert "not a folder" in capsys.readouterr().err
  assert E.main(["--pred", str(empty_pred), "--gt", str(empty_gt), "--metrics", "psnr,fid"]) == 2
  assert "unknown metric(s) ['fid']" in capsys.readouterr().err
  assert E.main(["--pred", str(empty_pred), "--metrics", "psnr"]) == 2
  assert "need a ground-truth folder" in capsys.readouterr().err


def test_no_reference_only_and_niqe_params_flag(folders, tmp_path, capsys):
  pred, _ = folders
  assert E.main(["--pred", str(pred), "--metrics", "niqe"]) == 0
  result = json.loads((pred / "metrics.json").read_text())
  assert sorted(result["per_image"]) == ["astronaut", "coffee"]
  assert result["settings"]["niqe_params"] == str(M.DEFAULT_NIQE_PARAMS)
  # The second run ignores the first run's metrics.json/csv.
  assert E.main(["--pred", str(pred), "--metrics", "niqe"]) == 0
  assert json.loads((pred / "metrics.json").read_text())["skipped"] == []
  missing = tmp_path / "pris.npz"
  assert E.main(["--pred", str(pred), "--metrics", "niqe", "--niqe-params", str(missing)]) == 2
  assert str(missing) in capsys.readouterr().err


def test_identical_images_give_inf_in_json(folders, capsys):
  pred, gt = folders
  Image.open(gt / "coffee.png").save(pred / "coffee.png")
  assert E.main(["--pred", str(pred), "--gt", str(gt), "--metrics", "psnr"]) == 0
  result = json.loads((pred / "metrics.json").read_text())
  assert result["per_image"]["coffee"]["psnr"] == "inf" and result["mean"]["psnr"] == "inf"
  assert "| coffee | inf |" in capsys.readouterr().out


def test_pyiqa_metric_errors_name_metric_and_file(folders, tmp_path, monkeypatch):
  pred, gt = folders
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  weight = tmp_path / "torch" / "hub" / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth"
  with pytest.raises(FileNotFoundError, match=rf"metric 'musiq'.*{weight}"):
    E.evaluate_folders(pred, gt, ("psnr", "musiq"))
  with pytest.raises(FileNotFoundError, match="metric 'lpips'.*alexnet-owt-7be5be79.pth"):
    E.evaluate_folders(pred, gt, ("lpips",))
  if importlib.util.find_spec("pyiqa") is not None:
    pytest.skip("pyiqa is installed; only its absence is tested here")
  weight.parent.mkdir(parents=True)
  weight.write_bytes(b"")
  with pytest.raises(ImportError, match="metric 'musiq' needs the optional package pyiqa"):
    E.evaluate_folders(pred, gt, ("musiq",))


def test_module_entry_point(folders):
  pred, gt = folders
  proc = subprocess.run([sys.executable, "-m", "vosr_jax.evaluate", "--pred", str(pred), "--gt",
                         str(gt), "--metrics", "psnr"], capture_output=True, text=True,
                        check=False, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "| **mean** |" in proc.stdout
