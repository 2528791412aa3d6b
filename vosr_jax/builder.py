"""A run assembled from its config: networks, frozen weights, train state, optimizer and the jitted
steps, all placed on one mesh (`build`). Training, distillation, the benchmarks and the tests get
them here; nothing else creates a `TrainState` or jits a step.

  run = builder.build(config, mesh)                  # weights loaded or randomly initialised
  state, metrics = run.train_step(*run.step_args(batch))
  run = builder.build(config, mesh, abstract=True)   # ShapeDtypeStructs with shardings only
  compiled = run.train_step.lower(*run.step_args(run.batch_spec())).compile()

With `abstract=True` nothing of parameter size is read or allocated (converted frozen networks
still read their metadata for their constructor arguments): an ahead-of-time compile for devices
that are not attached passes a mesh over them.

Which weights a run starts from:
  * the multistep denoiser (`load_multistep_ema` of `config.model.path`) when `config.model.init`
    is 'checkpoint': the initialisation of multistep fine-tuning, or the frozen teacher and the
    student's initialisation (all but its new `r_embedder`) of one-step distillation;
  * `config.model.init == 'random'`: a random denoiser from `config.seed` (one-step configs: a
    random teacher from `config.seed + 1`, which the student starts from; benchmarks only);
  * the frozen encoder and autoencoder as `models.build_encoder` / `build_autoencoder` load them.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from vosr_jax import checkpoint, models, sharding, steps


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything the steps of one run need, on `mesh`.

  Attributes:
    config, mesh: what the run was built from.
    graphs: `steps.Graphs` (static graph definitions; `teacher` only for one-step runs).
    tx, schedule: the optimizer (`steps.make_optimizer(config.optim)`).
    state, state_sh: the initial `steps.TrainState` and its shardings.
    frozen, frozen_sh: {'encoder': params, 'autoencoder': params} and their shardings.
    teacher, teacher_sh: the frozen multistep teacher of one-step runs and its shardings (None
      for multistep runs).
    train_step: `steps.train_step` (multistep) or `steps.distill_step` (one-step) jitted with
      in/out shardings and the state donated: f(state, *frozen_args, batch) -> (state, metrics).
    denoiser_step: the same step on already encoded latents (no degradation and no frozen
      encoders: the step's denoiser part), f(state, *teacher, latents) -> (state, metrics).
  Arrays are `jax.Array`s, or `jax.ShapeDtypeStruct`s with shardings for `abstract=True`.
  """
  config: Any
  mesh: jax.sharding.Mesh
  graphs: steps.Graphs
  tx: Any
  schedule: Any
  state: steps.TrainState
  state_sh: steps.TrainState
  frozen: dict
  frozen_sh: dict
  teacher: Any
  teacher_sh: Any
  train_step: Callable
  denoiser_step: Callable

  @property
  def frozen_args(self):
    """The arguments of `train_step` between the state and the batch."""
    return (self.frozen,) if self.teacher is None else (self.teacher, self.frozen)

  def step_args(self, batch):
    """`train_step`'s arguments from the initial state: (state, *frozen_args, batch)."""
    return (self.state, *self.frozen_args, batch)

  def denoiser_args(self, latents):
    """`denoiser_step`'s arguments from the initial state: (state, [teacher,] latents)."""
    return (self.state, *self.frozen_args[:-1], latents)

  def batch_spec(self):
    """The global batch {'hq': uint8 (config.batch_size, R, R, 3)} as ShapeDtypeStructs."""
    res = self.config.data.resolution
    return {"hq": jax.ShapeDtypeStruct((self.config.batch_size, res, res, 3), np.uint8,
                                       sharding=sharding.batch_sharding(self.mesh))}

  def latent_spec(self):
    """`steps.encode_batch`'s output for `batch_spec()` (tokens, lr_latent, hr_latent) as
    ShapeDtypeStructs, batch-sharded: the `latents` of `denoiser_step`."""
    shapes = jax.eval_shape(
        lambda frozen, batch: steps.encode_batch(self.graphs, frozen, batch,
                                                 jax.random.PRNGKey(0), self.config),
        self.frozen, self.batch_spec())
    batch_sh = sharding.batch_sharding(self.mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sh),
                        shapes)


def build(config, mesh, *, abstract=False, multistep_params=None):
  """Builds the run of `config` on `mesh` (module docstring).

  Args:
    config: the run config (`kind`, `model`, `encoder`, `autoencoder`, `optim`, `seed`,
      `sharding_rules`, ...).
    mesh: the Mesh.
    abstract: only shapes, dtypes and shardings (`jax.ShapeDtypeStruct`s): nothing is loaded,
      initialised or placed.
    multistep_params: the multistep denoiser's parameters (pure dict, placed on `mesh`) to start
      from, and to distil from in one-step runs, instead of those `config.model` names.
  Returns:
    `Run`.
  Raises:
    FileNotFoundError, ValueError: a missing or mismatched checkpoint (`load_multistep_ema`,
      `models.build_encoder`, `models.build_autoencoder`).
  """
  dtype = models.compute_dtype(config.dtype)
  onestep = config.kind == "onestep"

  def shard(abstract_params):
    return sharding.param_shardings(abstract_params, mesh, config.sharding_rules)

  multistep_graph, multistep_abstract = nnx.split(nnx.eval_shape(lambda: models.build_denoiser(
      teacher_model_config(config.model), nnx.Rngs(0), dtype)), nnx.Param)
  if multistep_params is None and (onestep or config.model.init == "checkpoint"):
    if abstract:
      multistep_params = checkpoint.abstract_target(multistep_abstract, shard)
    elif config.model.init == "checkpoint":
      multistep_params = load_multistep_ema(config, multistep_abstract, mesh)
    else:
      multistep_params = _random_multistep(config, dtype, shard(multistep_abstract))
  enc_graph, enc_params = models.build_encoder(config.encoder, dtype, shard, abstract=abstract)
  ae_graph, ae_params = models.build_autoencoder(config.autoencoder, shard, abstract=abstract)
  frozen = {"encoder": enc_params, "autoencoder": ae_params}
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  tx, schedule = steps.make_optimizer(config.optim)
  graphdef, state, state_sh = _train_state(
      lambda rngs: models.build_denoiser(config.model, rngs, dtype), config, mesh, tx,
      multistep_params, new_modules=("r_embedder",) if onestep else (), abstract=abstract)
  graphs = steps.Graphs(denoiser=graphdef, encoder=enc_graph, autoencoder=ae_graph,
                        teacher=multistep_graph if onestep else None)
  # One-step runs distil from the multistep parameters as they were loaded (the state holds its
  # own copies).
  teacher = multistep_params if onestep else None
  teacher_sh = jax.tree.map(lambda x: x.sharding, teacher) if onestep else None
  statics = dict(graphs=graphs, config=config, tx=tx, schedule=schedule)
  batch_sh = sharding.batch_sharding(mesh)
  step_fn = steps.distill_step if onestep else steps.train_step
  teacher_in = (teacher_sh,) if onestep else ()
  return Run(
      config=config, mesh=mesh, graphs=graphs, tx=tx, schedule=schedule, state=state,
      state_sh=state_sh, frozen=frozen, frozen_sh=frozen_sh, teacher=teacher,
      teacher_sh=teacher_sh,
      train_step=_jit_step(step_fn, (state_sh, *teacher_in, frozen_sh, batch_sh), statics,
                           state_sh, mesh),
      denoiser_step=_jit_step(_from_latents(step_fn), (state_sh, *teacher_in, batch_sh), statics,
                              state_sh, mesh))


def _random_multistep(config, dtype, shardings):
  """A random multistep denoiser (seed `config.seed + 1`) placed with `shardings`."""
  def init():
    model = models.build_denoiser(teacher_model_config(config.model),
                                  nnx.Rngs(config.seed + 1), dtype)
    return nnx.state(model, nnx.Param).to_pure_dict()

  return jax.jit(init, out_shardings=shardings)()


def _state_shardings(abstract_state, param_shardings, mesh, tx):
  """Shardings of a `TrainState`: params and EMA as `param_shardings`, optimizer moments likewise,
  scalars (step, counts) and the key replicated."""
  rep = sharding.replicated(mesh)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, param_shardings,
                              transform_non_params=lambda _: rep,
                              is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return steps.TrainState(step=rep, params=param_shardings, opt_state=opt,
                          ema_params=param_shardings, rng=rep)


def _train_state(make_denoiser, config, mesh, tx, initial_params, new_modules, abstract):
  """Initialises the train state directly sharded on `mesh` (no host copy of the parameters).

  Args:
    make_denoiser: rngs -> denoiser module (see `vosr_jax.models.build_denoiser`).
    config: the run config (`seed`, `sharding_rules`).
    mesh: the Mesh.
    tx: the optax transformation.
    initial_params: optional pretrained parameters (pure dict, already sharded); None initialises
      randomly from `config.seed`. The EMA starts as a copy of the initial parameters.
    new_modules: top-level modules that `initial_params` lacks and that keep their random
      initialisation (the one-step student's `r_embedder`, docs/official.md §5.1).
    abstract: return the state as ShapeDtypeStructs with shardings (nothing computed).
  Returns:
    (graphdef, state, shardings): the denoiser graph, the `TrainState`, its shardings.
  Raises:
    ValueError: when `initial_params` plus `new_modules` are not exactly the model's modules.
  """
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: make_denoiser(nnx.Rngs(0))),
                                        nnx.Param)
  param_sh = sharding.param_shardings(abstract_params, mesh, config.sharding_rules)
  if initial_params is not None:
    have, want = set(initial_params) | set(new_modules), set(abstract_params.to_pure_dict())
    if have != want or set(initial_params) & set(new_modules):
      raise ValueError(f"builder.py: initial parameters {sorted(initial_params)} with new modules "
                       f"{sorted(new_modules)} do not make the denoiser's {sorted(want)}")

  def init(rng, params):
    if params is None or new_modules:
      random = nnx.state(make_denoiser(nnx.Rngs(params=jax.random.fold_in(rng, 0))),
                         nnx.Param).to_pure_dict()
      # Unused random parameters are dead code for XLA: only the new modules are computed.
      params = random if params is None else {**params, **{k: random[k] for k in new_modules}}
    # A separate buffer for the EMA: both are donated to the step.
    ema = jax.tree.map(lambda p: p + 0.0, params)
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params), ema_params=ema, rng=rng)

  rng = jax.random.PRNGKey(config.seed)
  shardings = _state_shardings(jax.eval_shape(init, rng, initial_params), param_sh, mesh, tx)
  make = jax.jit(init, out_shardings=shardings)
  state = jax.eval_shape(make, rng, initial_params) if abstract else make(rng, initial_params)
  return graphdef, state, shardings


def _from_latents(step_fn):
  """`step_fn(state, *aux, frozen, batch)` as f(state, *aux, latents): frozen = None, the batch
  already encoded (the step skips degradation and the frozen encoders)."""
  def fn(state, *args, **statics):
    *aux, latents = args
    return step_fn(state, *aux, None, latents, **statics)
  return fn


def _jit_step(step_fn, in_shardings, statics, state_sh, mesh):
  """`step_fn(state, *args)` jitted with `in_shardings` (state first), the state donated."""
  fn = functools.partial(step_fn, **statics)
  return jax.jit(sharding.with_mesh(fn, mesh), in_shardings=in_shardings,
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))


# ---- Config variants of the benchmarks and ahead-of-time compiles. ----------------------------

def random_weights(config):
  """A copy of `config` with every network randomly initialised (timings only)."""
  config = config.copy_and_resolve_references()
  config.model.init = "random"
  config.encoder.init = "random"
  config.autoencoder.init = "random"
  return config


def unrolled(config):
  """A copy of `config` with the block stacks and the degradation's Poisson sums unrolled (for
  FLOP counting and XLA:TPU's time estimate)."""
  config = config.copy_and_resolve_references()
  config.model.scan = False
  config.encoder.scan = False
  config.degradation.unroll_poisson = True
  return config


def with_per_device_batch(config, per_device_batch, mesh):
  """A copy of `config` whose global batch is `per_device_batch` x the mesh's data x fsdp."""
  config = config.copy_and_resolve_references()
  config.batch_size = per_device_batch * sharding.batch_size_per_step(mesh)
  return config


# ---- The multistep denoiser behind a config. ---------------------------------------------------

def teacher_model_config(model_config):
  """`config.model` of the multistep denoiser behind a model config: without the r embedder."""
  out = ml_collections.ConfigDict(model_config.to_dict())
  out.overrides.one_step = False
  return out


def load_multistep_ema(config, abstract, mesh):
  """Loads the multistep denoiser of `config.model.path` onto the parameter shardings of `mesh`.

  `config.model.path` is a training workdir (the EMA of its latest checkpoint) or a converted
  checkpoint of kind 'dit' (`checkpoint.resolve`), whose constructor arguments must be those of
  `config.model` as a multistep model (one_step=False).

  Args:
    config: the run config.
    abstract: abstract parameters (nnx.State of ShapeDtypeStructs) of the multistep denoiser.
    mesh: the Mesh.
  Returns:
    The parameters (pure dict of sharded arrays).
  Raises:
    FileNotFoundError, ValueError naming config.model.path: a missing or mismatched checkpoint.
  """
  target = checkpoint.abstract_target(
      abstract, lambda a: sharding.param_shardings(a, mesh, config.sharding_rules))
  key = f"config.model.path={config.model.path!r}"
  want = teacher_model_config(config.model)
  missing = FileNotFoundError(
      f"{key}: neither a training workdir (with checkpoints/) nor a converted denoiser "
      "checkpoint. Train one with configs/multistep.py or convert the official weights with "
      "`python -m vosr_jax.convert --kind=dit`.")
  denoiser = models.load_denoiser(
      config.model.path, label=key, missing=missing, dtype=models.compute_dtype(config.dtype),
      model_config=want, want=models.denoiser_kwargs(want), target=target)
  logging.info("Multistep denoiser: %s.", denoiser.source)
  return denoiser.params
