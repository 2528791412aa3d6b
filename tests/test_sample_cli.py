"""`python -m vosr_jax.sample`: checkpoints, determinism and the bad-input table."""
import os

import numpy as np
import pytest
from PIL import Image

import train_utils
from vosr_jax import sample

ARGS = ["--steps", "2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A training workdir of the tiny config with one checkpoint (EMA = perturbed random init)."""
  return train_utils.tiny_workdir(str(tmp_path_factory.mktemp("run")), perturb_seed=0)


def _save(folder, rgb, name, **kw):
  os.makedirs(folder, exist_ok=True)
  Image.fromarray(rgb, **kw).save(os.path.join(folder, name))


def _rgb(seed, h=8, w=8):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def _run(workdir, inp, out, *extra):
  return sample.main(["--checkpoint", workdir, "--input", str(inp), "--output", str(out),
                      *ARGS, *extra])


def _no_temp_files(folder):
  return not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_same_seed_and_name_give_the_same_output_whatever_the_other_files(workdir, tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  _save(a, _rgb(0), "x.png")
  _save(b, _rgb(0), "x.png")
  _save(b, _rgb(1), "a_first.png")
  _save(b, _rgb(2), "z_last.png")
  assert _run(workdir, a, tmp_path / "oa") == 0
  assert _run(workdir, b, tmp_path / "ob") == 0
  xa = np.asarray(Image.open(tmp_path / "oa" / "x.png"))
  assert xa.shape == (32, 32, 3)
  np.testing.assert_array_equal(xa, np.asarray(Image.open(tmp_path / "ob" / "x.png")))
  # Another seed gives another sample.
  assert _run(workdir, a, tmp_path / "oc", "--seed", "7") == 0
  assert (np.asarray(Image.open(tmp_path / "oc" / "x.png")) != xa).any()


def _exif_rotated_jpeg(path):
  im = Image.fromarray(_rgb(3, 4, 8))  # 8 wide, 4 high as stored
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
  im.save(path, exif=exif, quality=95)


def _png16(path, channels):
  import cv2
  x = np.random.default_rng(4).integers(0, 65536, (8, 8, channels) if channels > 1 else (8, 8),
                                        dtype=np.uint16)
  cv2.imwrite(str(path), x)


# name -> (writer(path), expected output (H, W, channels) or None for "reported as failed").
CASES = {
    "gray.png": (lambda p: Image.fromarray(_rgb(5)[..., 0], "L").save(p), (32, 32, 3)),
    "rgba.png": (lambda p: Image.fromarray(np.dstack([_rgb(6), np.full((8, 8), 128, np.uint8)]),
                                           "RGBA").save(p), (32, 32, 4)),
    "deep16.png": (lambda p: _png16(p, 3), (32, 32, 3)),
    "gray16.png": (lambda p: _png16(p, 1), (32, 32, 3)),
    "palette.png": (lambda p: Image.fromarray(_rgb(7)).convert("P").save(p), (32, 32, 3)),
    "rotated.jpg": (_exif_rotated_jpeg, (32, 16, 3)),
    "one.png": (lambda p: Image.fromarray(_rgb(8, 1, 1)).save(p), (4, 4, 3)),
    "text.png": (lambda p: open(p, "w").write("not an image"), None),
    "truncated.png": (lambda p: open(p, "wb").write(
        open(os.path.join(os.path.dirname(p), "gray.png"), "rb").read()[:60]), None),
}


def test_bad_input_table(workdir, tmp_path, capsys):
  inp, out = tmp_path / "in", tmp_path / "out"
  inp.mkdir()
  for name, (write, _) in CASES.items():
    write(str(inp / name))
  (inp / "notes.txt").write_text("ignored: not an image extension")
  code = _run(workdir, inp, out)
  report = capsys.readouterr().out
  assert code == 1  # some inputs failed
  for name, (_, shape) in CASES.items():
    target = out / (os.path.splitext(name)[0] + ".png")
    line = next(l for l in report.splitlines() if l.startswith(name + ":"))
    if shape is None:
      assert "FAILED" in line and "not a readable image" in line and not target.exists()
    else:
      got = np.asarray(Image.open(target))
      assert got.shape == shape and got.dtype == np.uint8, name
  assert "notes.txt" not in report
  assert np.asarray(Image.open(out / "rgba.png"))[..., 3].min() == 128  # alpha upscaled, kept
  assert "total:" in report.splitlines()[-1]
  assert _no_temp_files(out)


def test_too_many_tokens_are_refused_with_a_hint(workdir, tmp_path, capsys):
  """The guard counts denoiser tokens: a long thin 3000x20 input is 60000 tokens of this
  pixel-space model (4x4 px each at x4), though under 1 megapixel."""
  _save(tmp_path / "in", _rgb(9, 20, 3000), "thin.png")
  assert _run(workdir, tmp_path / "in", tmp_path / "out") == 1
  line = capsys.readouterr().out.splitlines()[0]
  assert "12000x80 output is 60000 denoiser tokens" in line and "--tile-size=512" in line
  # Tiled, one 64 px tile is 256 tokens: over a limit of 100, a smaller tile is the hint.
  assert _run(workdir, tmp_path / "in", tmp_path / "out", "--tile-size=64", "--tile-overlap=16",
              "--max-tokens=100") == 1
  assert "one 64x64 tile is 256 denoiser tokens" in capsys.readouterr().out
  assert not (tmp_path / "out" / "thin.png").exists()


def test_existing_output_is_kept_without_overwrite(workdir, tmp_path, capsys):
  _save(tmp_path / "in", _rgb(10), "x.png")
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "x.png").write_bytes(b"old")
  assert _run(workdir, tmp_path / "in", tmp_path / "out") == 0
  assert "skipped" in capsys.readouterr().out
  assert (tmp_path / "out" / "x.png").read_bytes() == b"old"
  assert _run(workdir, tmp_path / "in", tmp_path / "out", "--overwrite") == 0
  assert np.asarray(Image.open(tmp_path / "out" / "x.png")).shape == (32, 32, 3)


def test_empty_folder_and_empty_checkpoint_are_errors(workdir, tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert _run(workdir, tmp_path / "empty", tmp_path / "out") == 2
  assert "no images" in capsys.readouterr().err
  _save(tmp_path / "in", _rgb(11), "x.png")
  (tmp_path / "nomodel").mkdir()
  assert _run(str(tmp_path / "nomodel"), tmp_path / "in", tmp_path / "out") == 2
  assert "no model there" in capsys.readouterr().err
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_converted_release_folder_with_a_one_step_denoiser(tmp_path, capsys):
  """dit (one-step) + vit + qwen2d sub-folders as `python -m vosr_jax.convert --release` writes
  (their loading is checked in test_inference.py)."""
  release = tmp_path / "release"
  train_utils.tiny_release(release)
  _save(tmp_path / "in", _rgb(12), "x.png")
  code = sample.main(["--checkpoint", str(release), "--input", str(tmp_path / "in"),
                      "--output", str(tmp_path / "out")])
  assert code == 0, capsys.readouterr()
  assert "one-step model" in capsys.readouterr().err
  assert np.asarray(Image.open(tmp_path / "out" / "x.png")).shape == (32, 32, 3)
