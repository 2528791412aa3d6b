"""Fixtures shared by the training-loop tests (test_train.py, test_distill.py)."""
import pytest

import train_utils


@pytest.fixture(scope="session")
def data(tmp_path_factory):
  """Folders of 64x64 crops of real photos (`varied`, `same`) and a compilation-cache folder."""
  return train_utils.make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def overfit_run(data, tmp_path_factory):
  """100 multistep steps of configs/multistep.py:tiny on 8 fixed photos, validated at step 100:
  the multistep test subject, and the teacher of the distillation tests (it also fills the
  compilation cache of the runs below)."""
  workdir = tmp_path_factory.mktemp("overfit")
  train_utils.run(train_utils.cmd(workdir, data["varied"], "--config.total_steps=100",
                                  "--config.checkpoint.every_steps=100",
                                  "--config.eval.every_steps=100"), train_utils.env(data))
  return str(workdir)
