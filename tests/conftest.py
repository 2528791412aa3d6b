"""Fixtures shared by the training-loop tests (test_train.py, test_distill.py).

Under pytest-xdist (`make test`), `data` and `overfit_run` are made once for all workers, in the
folder the workers' temporary folders share, under a file lock: test_train.py and test_distill.py
run on different workers and both need the same 100-step run, and every subprocess run of the
tiny configs then shares one compilation cache.
"""
import filelock
import pytest

import train_utils


def _made_once(tmp_path_factory, worker_id, name, make):
  """The folder `name`, filled by make(folder) once per test session whatever the workers.

  A worker that finds another one making it waits for the lock, then reuses it.
  """
  root = tmp_path_factory.getbasetemp()
  if worker_id != "master":
    root = root.parent  # pytest-xdist: the workers' basetemps are sub-folders of one folder.
  folder = root / f"shared_{name}"
  with filelock.FileLock(f"{folder}.lock"):
    if not (folder / ".done").exists():
      folder.mkdir(exist_ok=True)
      make(folder)
      (folder / ".done").touch()
  return folder


@pytest.fixture(scope="session")
def data(tmp_path_factory, worker_id):
  """Folders of 64x64 crops of real photos (`varied`, `same`) and a compilation-cache folder."""
  return train_utils.data_folders(
      _made_once(tmp_path_factory, worker_id, "data", train_utils.make_data))


@pytest.fixture(scope="session")
def overfit_run(data, tmp_path_factory, worker_id):
  """100 multistep steps of configs/multistep.py:tiny on 8 fixed photos, validated at step 100:
  the multistep test subject, and the teacher of the distillation tests (it also fills the
  compilation cache of the runs below). Read only."""
  def make(workdir):
    train_utils.run(train_utils.cmd(workdir, data["varied"], "--config.total_steps=100",
                                    "--config.checkpoint.every_steps=100",
                                    "--config.eval.every_steps=100"), train_utils.env(data))
  return str(_made_once(tmp_path_factory, worker_id, "overfit", make))
