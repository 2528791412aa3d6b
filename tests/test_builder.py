"""`builder.build(abstract=True)` on the `tiny` configs: shapes and shardings only, as an
ahead-of-time compile for devices that are not attached gets them; the steps lower and compile
without any weights. (That the abstract run has the real one's shapes, dtypes and shardings is
checked in test_steps.py, which builds the real run anyway.)"""
import jax
import pytest

from configs import multistep, onestep
from vosr_jax import builder, checkpoint, perf, sharding


def _unreadable_weights(kind):
  """The tiny config of `kind` whose denoiser weights cannot be read (model.path is missing)."""
  config = (multistep if kind == "multistep" else onestep).get_config("tiny")
  config.unlock()
  config.model.init = "checkpoint"
  config.model.path = "/nonexistent/teacher"
  return config


@pytest.fixture
def nothing_loaded(monkeypatch):
  """Fails the test if anything reads parameters."""
  def fail(*args, **kwargs):
    raise AssertionError("an abstract build read weights")
  monkeypatch.setattr(checkpoint, "load_params", fail)
  monkeypatch.setattr(checkpoint, "load_train_ema", fail)


def test_abstract_train_step_compiles_without_weights(nothing_loaded):
  config = _unreadable_weights("multistep")
  mesh = sharding.make_mesh(config.mesh)
  run = builder.build(config, mesh, abstract=True)
  args = run.step_args(run.batch_spec())
  leaves = jax.tree.leaves(args)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
                        for x in leaves)
  assert run.teacher is None and len(args) == 3  # (state, frozen, batch)
  # CPU code quality does not matter here: the cheapest backend optimisation (half the time).
  compiled = run.train_step.lower(*args).compile(
      {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
  # At least one multiply-add per trained parameter and image.
  params = sum(x.size for x in jax.tree.leaves(run.state.params))
  assert perf.flops(compiled) >= 2 * params * config.batch_size


def test_abstract_distill_step_lowers_without_weights(nothing_loaded):
  config = _unreadable_weights("onestep")
  run = builder.build(config, sharding.make_mesh(config.mesh), abstract=True)
  assert isinstance(jax.tree.leaves(run.teacher)[0], jax.ShapeDtypeStruct)
  assert "r_embedder" in run.state.params and "r_embedder" not in run.teacher
  args = run.step_args(run.batch_spec())
  assert len(args) == 4  # (state, teacher, frozen, batch)
  run.train_step.lower(*args)
  run.denoiser_step.lower(*run.denoiser_args(run.latent_spec()))
