"""The training loop end to end through `python -m vosr_jax.main` on the `tiny` config.

Every single-process run uses the same compiled step, shared through JAX's persistent compilation
cache, so only the first run compiles.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train_utils
from configs import multistep
from train_utils import ROOT, assert_trees_equal, cmd as _cmd, env as _env, run as _run
from vosr_jax import checkpoint, train

# Fixtures `data` and `overfit_run` come from conftest.py.


def _kind_args(kind, overfit_run):
  """cmd() keywords of a run of `kind`; one-step runs distil the overfit run."""
  return dict(kind=kind, teacher=overfit_run if kind == "onestep" else None)


def test_overfits_a_handful_of_photos(overfit_run):
  """Measured: mean loss 1.12 over steps 1-10 -> 0.25 over steps 91-100 (factor ~4.4)."""
  losses = train_utils.metric(overfit_run, "train/loss")
  first = np.mean([losses[s] for s in range(1, 11)])
  last = np.mean([losses[s] for s in range(91, 101)])
  assert first / last > 3.0, (first, last)
  logged = set().union(*train_utils.metric_rows(overfit_run))
  for key in ("train/grad_norm", "train/lr", "perf/img_per_sec", "perf/tflops_per_sec_per_device",
              "eval/psnr", "eval/ssim"):
    assert key in logged, key
  assert os.path.exists(os.path.join(overfit_run, "samples", "eval_lr_sr_hr_00000100.png"))
  img = Image.open(os.path.join(overfit_run, "samples", "eval_lr_sr_hr_00000100.png"))
  assert img.size == (3 * 64, 2 * 64)  # LR | SR | HR, one row per validation image


@pytest.mark.parametrize("kind", train_utils.KINDS)
def test_resume_after_kill_is_bit_identical(data, tmp_path, overfit_run, kind):
  # The overfit run fills the compilation cache and is the one-step runs' teacher.
  env, kw = _env(data), _kind_args(kind, overfit_run)
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  _run(_cmd(straight, data["varied"], "--config.total_steps=6",
            "--config.checkpoint.every_steps=3", **kw), env)
  proc = subprocess.Popen(_cmd(killed, data["varied"], "--config.total_steps=1000",
                               "--config.checkpoint.every_steps=3", **kw), env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  committed = killed / "checkpoints" / "3"
  deadline = time.time() + 300
  while not committed.is_dir() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert committed.is_dir()
  for later in (killed / "checkpoints").iterdir():  # a later save may have slipped in
    if later.name.isdigit() and int(later.name) > 3:
      subprocess.run(["rm", "-rf", str(later)], check=True)
  _run(_cmd(killed, data["varied"], "--config.total_steps=6",
            "--config.checkpoint.every_steps=3", **kw), env)
  a, b = train_utils.saved_state(straight, 6), train_utils.saved_state(killed, 6)
  assert int(a["step"]) == int(b["step"]) == 6
  assert_trees_equal(a, b)  # params, EMA, optimizer state, rng
  # The steps logged after step 3 by the killed run were cut from the log: each step once.
  logged = [r["step"] for r in train_utils.metric_rows(killed) if "train/loss" in r]
  assert logged == list(range(1, 7))


def test_damaged_latest_checkpoint_is_set_aside_and_training_resumes(data, tmp_path,
                                                                     overfit_run):
  del overfit_run  # Fills the compilation cache.
  env = _env(data)
  _run(_cmd(tmp_path, data["varied"], "--config.total_steps=4",
            "--config.checkpoint.every_steps=2"), env)
  step4 = tmp_path / "checkpoints" / "4"
  data_files = [p for p in step4.rglob("*") if p.is_file() and p.parent.name == "d"]
  biggest = max(data_files, key=lambda p: p.stat().st_size)
  with open(biggest, "r+b") as f:
    f.truncate(1000)
  proc = _run(_cmd(tmp_path, data["varied"], "--config.total_steps=5",
                   "--config.checkpoint.every_steps=2"), env)
  assert f"{step4}: damaged checkpoint, a data file is missing or truncated" in proc.stderr
  assert "Resumed from the checkpoint of step 2" in proc.stderr
  # Step 4 is written again, next to the damaged one set aside.
  names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  assert len(names) == 4 and names[:2] == ["2", "4"] and names[2].startswith("4.damaged-")
  assert names[3] == "5"
  aside = tmp_path / "checkpoints" / names[2]
  assert (aside / biggest.relative_to(step4)).stat().st_size == 1000  # Kept as it was.
  logged = [r["step"] for r in train_utils.metric_rows(tmp_path) if "train/loss" in r]
  assert logged == [1, 2, 3, 4, 5]


def test_disk_full_while_saving_exits_3_and_keeps_the_earlier_checkpoint(data, tmp_path,
                                                                          overfit_run):
  """On a disk with room for one checkpoint and a half, the second save fails."""
  one = sum(p.stat().st_size for p in (Path(overfit_run) / "checkpoints").rglob("*")
            if p.is_file())
  disk = tmp_path / "small_disk"
  disk.mkdir()
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={one * 3 // 2 // 1024}k", "tmpfs",
                          str(disk)], capture_output=True, text=True)
  if mount.returncode:
    pytest.skip(f"cannot mount a small tmpfs to fill ({mount.stderr.strip()}): needs root")
  try:
    workdir = disk / "run"
    proc = subprocess.run(_cmd(workdir, data["varied"], "--config.total_steps=4",
                               "--config.checkpoint.every_steps=2"), env=_env(data), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = next(l for l in proc.stderr.splitlines() if "was not written" in l)
    assert f"{workdir}/checkpoints: the checkpoint of step 4 was not written" in line
    assert "No space left on device" in line and "the checkpoint of step 2 is intact" in line
    # Ours never prints a traceback; TensorStore's background callbacks may still print asyncio's
    # "Event loop is closed" one as the process exits (a known leftover, not a user-facing error).
    tracebacks = proc.stderr.split("Traceback")[1:]
    assert all("Event loop is closed" in t for t in tracebacks), proc.stderr[-3000:]
    assert int(train_utils.saved_state(str(workdir), 2)["step"]) == 2
  finally:
    subprocess.run(["umount", str(disk)], check=True)


def test_sigterm_saves_and_exits_zero(data, tmp_path, overfit_run):
  del overfit_run
  proc = subprocess.Popen(_cmd(tmp_path, data["varied"], "--config.total_steps=100000",
                               "--config.checkpoint.every_steps=100000"),
                          env=_env(data), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and "train/loss" in metrics.read_text():
      break
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert steps and steps[0] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", train_utils.KINDS)
def test_two_processes_match_one(data, tmp_path, request, kind):
  """2 processes x 2 CPU devices vs 1 process x 4 devices, 2 steps, identical images.

  Cross-process reductions sum in another order than in-process ones: agreement is to float32
  rounding (measured max 2.3e-6 absolute), not bit-exact.
  """
  kw = _kind_args(kind, request.getfixturevalue("overfit_run") if kind == "onestep" else None)
  overrides = ("--config.total_steps=2", "--config.checkpoint.every_steps=2",
               "--config.batch_size=4")
  single = tmp_path / "single"
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  multi = tmp_path / "multi"
  procs = [subprocess.Popen(
      _cmd(multi, data["same"], *overrides, **kw) + [f"--coordinator_address=127.0.0.1:{port}",
                                               "--num_processes=2", f"--process_id={i}"],
      env=_env(data, devices=2), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  _run(_cmd(single, data["same"], *overrides, **kw), _env(data, devices=4))
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-5000:]
  a, b = train_utils.saved_state(single, 2), train_utils.saved_state(multi, 2)
  assert_trees_equal(a["step"], b["step"])
  for key in ("params", "ema_params", "opt_state"):
    import jax  # pylint: disable=g-import-not-at-top
    for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key])):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=5e-6)


# ---- Bad input: clear errors before any compute. -------------------------------------------------

def _tiny(**overrides):
  config = multistep.get_config("tiny")
  config.data.sources = ["/nonexistent"]
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    setattr(train_utils.section(config, section), field, value)
  return config


def test_unknown_config_key_fails():
  config = multistep.get_config("tiny")
  with pytest.raises(AttributeError):
    config.modle = 1
  with pytest.raises(ValueError, match="unknown variant"):
    multistep.get_config("2b")
  proc = subprocess.run([sys.executable, "-m", "vosr_jax.main",
                         "--config=configs/multistep.py:tiny", "--workdir=/tmp/unused",
                         "--config.optim.lrr=1"], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0 and "lrr" in proc.stderr


def test_missing_frozen_weights(tmp_path):
  config = _tiny(**{"encoder.init": "checkpoint", "encoder.path": str(tmp_path / "nope")})
  with pytest.raises(FileNotFoundError, match="config.encoder.path"):
    train.run(config, str(tmp_path / "wd"))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(PermissionError, match="--workdir"):
    train.run(_tiny(), str(blocker / "sub"))


def test_bad_values(tmp_path):
  with pytest.raises(ValueError, match="config.grad_accum_steps"):
    train.run(_tiny(grad_accum_steps=3), str(tmp_path))
  with pytest.raises(ValueError, match="config.mesh"):
    train.run(_tiny(**{"mesh.data": 2}), str(tmp_path))
  with pytest.raises(ValueError, match="config.dtype"):
    train.run(_tiny(dtype="float16"), str(tmp_path))


def test_checkpoint_from_another_config(tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  config = _tiny()
  ckpt = checkpoint.TrainCheckpointer(tmp_path, config)
  ckpt.save(1, {"x": np.zeros(2)}, iter(grain.MapDataset.range(4).to_iter_dataset()))
  ckpt.wait()
  ckpt.close()
  other = _tiny(**{"model.overrides.patch_size": 2})
  with pytest.raises(ValueError, match="config.model.overrides"):
    train.run(other, str(tmp_path))
