"""Train state, optimizer and the front half of the step on the `tiny` config (the samplers the
validation uses are tested in test_sampling.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import multistep
from vosr_jax import builder, sharding, steps


@pytest.fixture(scope="module")
def setup():
  config = multistep.get_config("tiny")
  mesh = sharding.make_mesh(config.mesh)
  built = builder.build(config, mesh)
  return dict(config=config, mesh=mesh, frozen=built.frozen, state=built.state,
              graphs=built.graphs, run=built)


def test_optimizer_schedule_and_decay_on_all_params():
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(dict(lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.5,
                                       grad_clip_norm=1.0, warmup_steps=4, decay_steps=0))
  tx, schedule = steps.make_optimizer(cfg)
  np.testing.assert_allclose([schedule(s) for s in (0, 2, 4, 100)], [0, 5e-3, 1e-2, 1e-2])
  # Zero gradients: AdamW moves every parameter (norm scales and biases too) by -lr * wd * p.
  params = {"norm": {"scale": jnp.ones(3)}, "bias": jnp.full(2, 2.0)}
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(5):  # the 5th update runs at step 4, after the warm-up: lr = 1e-2
    updates, state = tx.update(zeros, state, params)
  np.testing.assert_allclose(updates["norm"]["scale"], -1e-2 * 0.5 * 1.0, rtol=1e-6)
  np.testing.assert_allclose(updates["bias"], -1e-2 * 0.5 * 2.0, rtol=1e-6)
  # Clipping at global norm 1.
  big = {"norm": {"scale": jnp.full(3, 100.0)}, "bias": jnp.zeros(2)}
  clipped, _ = optax.clip_by_global_norm(1.0).update(big, None)
  np.testing.assert_allclose(optax.global_norm(clipped), 1.0, rtol=1e-6)


def test_initial_state(setup):
  state = setup["state"]
  assert int(state.step) == 0 and state.rng.dtype == jnp.uint32
  for p, e in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(p, e)
    assert p.dtype == jnp.float32
  # The final layer is zero-initialised (docs/official.md §1.5): the untrained model predicts 0.
  assert not np.any(np.asarray(state.params["final_layer"]["linear"]["kernel"]))


def test_abstract_run_is_the_real_one(setup):
  """`builder.build(abstract=True)`: the real run's shapes, dtypes and shardings, nothing placed."""
  def specs(tree):
    return jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype), x.sharding), tree)

  real = setup["run"]
  abstract = builder.build(setup["config"], setup["mesh"], abstract=True)
  assert not any(isinstance(x, jax.Array)
                 for x in jax.tree.leaves((abstract.state, abstract.frozen)))
  assert specs(abstract.state) == specs(real.state)
  assert specs(abstract.frozen) == specs(real.frozen)
  assert specs(abstract.batch_spec()) == specs(real.batch_spec())


def test_front_half_shapes(setup):
  config = setup["config"]
  rng = np.random.default_rng(0)
  batch = {"hq": rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)}
  latents = jax.jit(lambda f, b, k: steps.encode_batch(setup["graphs"], f, b, k, config))(
      setup["frozen"], batch, jax.random.PRNGKey(0))
  assert latents["tokens"].shape == (2, 16, 64)
  assert latents["lr_latent"].shape == latents["hr_latent"].shape == (2, 64, 64, 3)
  # Pixel autoencoder: the HR latent is the image itself; the LR one is its degradation.
  np.testing.assert_allclose(latents["hr_latent"], batch["hq"] / 127.5 - 1.0, atol=1e-6)
  assert float(jnp.abs(latents["lr_latent"] - latents["hr_latent"]).mean()) > 1e-3
