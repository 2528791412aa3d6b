"""Failure paths of the command-line tools, with real files: damaged checkpoints, flag ranges,
bad destinations, file modes and temporaries. Each failure is one line naming what is wrong."""
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from configs import multistep
import train_utils
from train_utils import ROOT
from vosr_jax import checkpoint, cli_utils, demo, evaluate, logging_utils, sample, train

DEAD_PID = 2**22 + 12345  # Above Linux's pid_max: no process has it.


def _env():
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")


def _cli(module, *args, unprivileged=False):
  """Runs `python -m module args`; as root with `unprivileged`, without the capabilities that
  bypass file permissions. Returns the CompletedProcess."""
  command = [sys.executable, "-m", module, *args]
  if unprivileged and os.geteuid() == 0:
    command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all",
               "--"] + command
  return subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=300)


@pytest.fixture
def read_only(tmp_path):
  """A folder this process cannot write into, even as root (or a skip saying why not)."""
  folder = tmp_path / "read_only"
  folder.mkdir()
  folder.chmod(0o555)
  if os.geteuid() == 0 and not shutil.which("setpriv"):
    pytest.skip("running as root without setpriv: cannot drop the permission override")
  probe = [sys.executable, "-c", f"open({str(folder / 'x')!r}, 'w')"]
  if os.geteuid() == 0:
    probe = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all",
             "--"] + probe
  if subprocess.run(probe, capture_output=True).returncode == 0:
    pytest.skip("the permission override could not be dropped (setpriv needs CAP_SETPCAP)")
  yield folder
  folder.chmod(0o755)


# ---- 1. Checkpoints -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny-config training workdir with one committed checkpoint (step 1)."""
  return train_utils.tiny_workdir(str(tmp_path_factory.mktemp("run")))


def _large_data_files(step_folder, damage):
  """Applies `damage` to the large array data files of a step's state (at least half the largest):
  the parameters and the EMA are about the same size, and which of them sampling reads depends on
  how the save laid them out."""
  files = train_utils.data_files(os.path.join(step_folder, "state"))
  largest = max(os.path.getsize(f) for f in files)
  for path in files:
    if os.path.getsize(path) * 2 >= largest:
      damage(path)


DAMAGE = {
    "truncated data file": (lambda s: _large_data_files(s, train_utils.truncate),
                            "a data file is missing or truncated"),
    "missing data file": (lambda s: _large_data_files(s, os.remove),
                          "a data file is missing or truncated"),
    "missing manifest": (lambda s: os.remove(os.path.join(s, "state", "manifest.ocdbt")),
                         "a data file or the manifest is missing"),
    "missing config item": (lambda s: shutil.rmtree(os.path.join(s, "config")),
                            "item 'config' missing"),
    "garbage config": (lambda s: open(os.path.join(s, "config", "metadata"), "w").write("{"),
                       "unreadable JSON"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_sampling_a_damaged_checkpoint_names_the_step_folder(workdir, tmp_path, capsys, case):
  damaged = tmp_path / "run"
  shutil.copytree(workdir, damaged)
  damage, reason = DAMAGE[case]
  damage(str(damaged / "checkpoints" / "1"))
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
  code = sample.main(["--checkpoint", str(damaged), "--input", str(tmp_path / "x.png"),
                      "--output", str(tmp_path / "out")])
  errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
  assert code == 2 and len(errors) == 1
  assert errors[0].startswith(f"error: {damaged}/checkpoints/1: damaged checkpoint, ")
  assert reason in errors[0]
  assert not os.listdir(tmp_path / "out")


def test_atomic_writes_take_the_umask_and_clean_stale_temporaries(tmp_path):
  stale = tmp_path / f".metrics.json.{DEAD_PID}.tmp"
  live = tmp_path / ".metrics.json.1.tmp"  # pid 1 always runs.
  other = tmp_path / f".other.png.{DEAD_PID}.tmp"
  mine = tmp_path / f".metrics.json.{os.getpid()}.tmp"
  for path in (stale, live, other, mine):
    path.write_text("partial")
    path.chmod(0o666)
  old = os.umask(0o027)
  try:
    cli_utils.atomic_write_text(tmp_path / "metrics.json", "{}\n")
  finally:
    os.umask(old)
  assert (tmp_path / "metrics.json").read_text() == "{}\n"
  assert oct((tmp_path / "metrics.json").stat().st_mode & 0o777) == oct(0o640)
  # The dead writer's temporary of this name is gone; a running writer's and other names stay.
  # A leftover of this very pid (a reused pid) does not lend its mode to the new file.
  assert not stale.exists() and live.exists() and other.exists()
  assert cli_utils.remove_stale_temporaries(str(tmp_path)) == [str(other)]


def test_cli_outputs_take_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    sample.write_image(str(tmp_path / "x.png"), np.zeros((4, 4, 3), np.uint8), None, "PNG")
    result = {"mean": {"psnr": 1.0}, "per_image": {"a": {"psnr": 1.0}}, "skipped": [],
              "settings": {"metrics": ["psnr"]}}
    paths = evaluate.write_results(result, tmp_path)
  finally:
    os.umask(old)
  for path in (tmp_path / "x.png", *paths):
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644), path


# ---- 2. Flags -------------------------------------------------------------------------------

SAMPLE = ["--checkpoint", "c", "--input", "i", "--output", "o"]


@pytest.mark.parametrize("flags,ok", [
    (["--tile-size=0"], True), (["--tile-size=1", "--tile-overlap=0"], True),
    (["--tile-size=-5"], False), (["--tile-size=512", "--tile-overlap=511"], True),
    (["--tile-size=512", "--tile-overlap=512"], False), (["--tile-overlap=-1"], False),
    (["--vae-tile-size=0"], True), (["--vae-tile-size=-1"], False),
    (["--vae-tile-overlap=1024"], False), (["--vae-tile-overlap=-1"], False),
    (["--upscale=1"], True), (["--upscale=0"], False), (["--steps=1"], True),
    (["--steps=0"], False), (["--batch-size=0"], False), (["--max-tokens=1"], True),
    (["--max-tokens=0"], False), (["--noise-scale=0"], True), (["--noise-scale=-0.1"], False),
    (["--noise-scale=nan"], False), (["--weak-strength=0"], True),
    (["--weak-strength=-0.1"], False), (["--cfg-scale=-0.5"], True), (["--cfg-scale=inf"], False),
    ([f"--seed={2**63 - 1}"], True), ([f"--seed={2**63}"], False)])
def test_sample_flag_ranges(flags, ok, capsys):
  if ok:
    sample.parse_args(SAMPLE + flags)
    return
  with pytest.raises(SystemExit) as e:
    sample.parse_args(SAMPLE + flags)
  assert e.value.code == 2
  assert flags[-1].split("=")[0] in capsys.readouterr().err


def test_sample_tiles_are_checked_against_the_model_geometry():
  networks = types.SimpleNamespace(downsample=8, patch_size=2, multiple=16)

  def errors(*flags):
    return sample.geometry_errors(sample.parse_args(SAMPLE + list(flags)), networks)

  assert errors("--tile-size=16", "--tile-overlap=7") == []
  assert "below this model's smallest tile, 16 px" in errors("--tile-size=15",
                                                            "--tile-overlap=0")[0]
  # 40 px tiles are 32 px (a multiple of 16): an overlap of 32 leaves no stride.
  assert "tiles are 32 px" in errors("--tile-size=40", "--tile-overlap=32")[0]
  assert errors("--tile-size=40", "--tile-overlap=31") == []
  assert "below the autoencoder factor 8" in errors("--vae-tile-size=7", "--vae-tile-overlap=0")[0]
  assert errors("--vae-tile-size=8", "--vae-tile-overlap=7") == []


@pytest.mark.parametrize("key,value", [
    ("total_steps", 0), ("log_every_steps", 0), ("checkpoint.every_steps", 0),
    ("checkpoint.max_to_keep", 0), ("eval.every_steps", -1), ("eval.crop_border", -1),
    ("ema_decay", 1.5), ("optim.lr", -1e-4), ("data.resolution", 15), ("data.num_workers", -1)])
def test_training_config_ranges(key, value):
  config = multistep.get_config("tiny")
  config.data.sources = ["/nowhere"]
  section, _, name = key.rpartition(".")
  setattr(config[section] if section else config, name, value)
  with pytest.raises(ValueError, match=f"config.{key}={value} must be"):
    train.check_config(config)


def test_evaluate_and_demo_flag_ranges(tmp_path, capsys):
  for main, flags in ((evaluate.main, ["--pred", str(tmp_path), "--crop-border=-3"]),
                      (demo.main, ["bicubic", "--input=i", "--output=o", "--upscale=0"])):
    with pytest.raises(SystemExit) as e:
      main(flags)
    assert e.value.code == 2
  err = capsys.readouterr().err
  for message in ("--crop-border=-3 must be >= 0", "--upscale=0 must be >= 1"):
    assert message in err


@pytest.mark.parametrize("module,flags,message", [
    ("vosr_jax.main", ["--config.foo=1"], "--config.foo: config has no field 'foo'; its fields: "),
    ("vosr_jax.main", ["--config.model.varaint=x"], "config.model has no field 'varaint'; did you "
     "mean variant?"),
    ("vosr_jax.main", ["--config.total_steps=0"], "config.total_steps=0 must be >= 1"),
    ("vosr_jax.main", ["--process_id=2", "--num_processes=2"], "--process_id=2 must be below"),
    ("vosr_jax.bench", ["--steps=0"], "flag --steps=0: 0 is not a positive integer")])
def test_absl_tools_give_one_line_usage_errors(tmp_path, module, flags, message):
  run_flags = [f"--workdir={tmp_path}", "--config.data.sources=/nowhere"] \
      if module == "vosr_jax.main" else []
  proc = _cli(module, "--config=configs/multistep.py:tiny", *run_flags, *flags)
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 2 and last.startswith("error: ") and message in last, proc.stderr
  assert "Traceback" not in proc.stderr


# ---- 3. Destinations --------------------------------------------------------------------------

def test_sample_output_is_checked_before_the_model_loads(tmp_path, capsys):
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
  (tmp_path / "file").write_text("not a folder")
  # The checkpoint does not exist: the --output error shows that nothing was loaded first.
  assert sample.main(["--checkpoint", str(tmp_path / "nowhere"), "--input",
                      str(tmp_path / "x.png"), "--output", str(tmp_path / "file")]) == 2
  assert "--output=" + str(tmp_path / "file") + " is an existing file" in capsys.readouterr().err


def test_unwritable_destinations_fail_before_any_compute(tmp_path, read_only):
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
  proc = _cli("vosr_jax.sample", "--checkpoint", str(tmp_path / "nowhere"), "--input",
              str(tmp_path / "x.png"), "--output", str(read_only), unprivileged=True)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip() == f"error: --output={read_only}: not writable; choose another folder"
  proc = _cli("vosr_jax.evaluate", "--pred", str(tmp_path), "--gt", str(tmp_path),
              "--out-dir", str(read_only / "sub"), unprivileged=True)
  assert proc.returncode == 2, proc.stderr
  assert f"--out-dir={read_only / 'sub'}: not writable" in proc.stderr
  assert os.listdir(read_only) == []


# ---- 4. Logs after a resume -------------------------------------------------------------------

def test_metrics_log_is_cut_back_to_the_restored_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, 6)]
  path.write_text("".join(rows) + '{"step": 6, "train/lo')  # killed mid-line
  writer = logging_utils.MetricWriter(str(tmp_path), resume_step=3)
  writer.write_scalars(4, {"train/loss": 0.25})
  writer.close()
  steps_logged = [json.loads(line)["step"] for line in path.read_text().splitlines()]
  assert steps_logged == [1, 2, 3, 4]
  logging_utils.MetricWriter(str(tmp_path)).close()  # A fresh run (step 0) starts a new log.
  assert path.read_text() == ""
