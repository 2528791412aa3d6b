"""Networks: the VOSR denoiser (dit), the DINOv2-compatible encoder (vit), the autoencoders (vae).

Builders from config sections (configs/common.py):
  build_denoiser(config.model, rngs, dtype)        -> LightningDiT (trained; random init)
  build_encoder(config.encoder, dtype, shardings)  -> (graphdef, params) of the frozen ViT
  build_autoencoder(config.autoencoder, shardings) -> (graphdef, params) of the frozen autoencoder
(`abstract=True`: params as ShapeDtypeStructs, nothing loaded or initialised).

  load_denoiser(path, ...)                         -> `Denoiser` of a workdir or converted folder

Frozen networks load converted weights (`vosr_jax.checkpoint.save_params`; metadata
{'kind': ..., 'kwargs': constructor arguments}) from `config.<section>.path`. Only
`config.<section>.init == "random"` initialises them randomly, with a loud warning: such a model
only makes sense for tests and throughput measurements. Paths are resolved by
`vosr_jax.checkpoint.resolve`.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from vosr_jax import checkpoint
from vosr_jax.models import dit, qwen_vae, vae, vit

INITS = ("checkpoint", "random")


def denoiser_kwargs(model_config):
  """The constructor arguments (the architecture) of `config.model`: `variant` plus `overrides`."""
  return dit.variant_kwargs(model_config.variant, **model_config.overrides.to_dict())


def _denoiser_module(kwargs, model_config, dtype, rngs):
  """LightningDiT(**kwargs) with the execution options (`scan`, `remat_policy`, `attention`,
  `matmul_dtype`) of `model_config`, or the constructor's own without one."""
  options = {} if model_config is None else dict(
      scan=model_config.scan, remat_policy=model_config.remat_policy,
      attention=model_config.attention, matmul_dtype=model_config.matmul_dtype)
  return dit.LightningDiT(**kwargs, **options, dtype=dtype, rngs=rngs)


def build_denoiser(model_config, rngs, dtype):
  """The denoiser of `config.model` (`variant` name plus `overrides`), randomly initialised.

  Args:
    model_config: `config.model` (`variant`, `overrides`, `scan`, `remat_policy`, `attention`,
      `matmul_dtype`).
    rngs: nnx.Rngs with a `params` stream.
    dtype: compute dtype (parameters stay float32).
  """
  return _denoiser_module(denoiser_kwargs(model_config), model_config, dtype, rngs)


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """A loaded denoiser: graph, parameters (pure dict), constructor arguments, where from.

  `config` is the saved training config (ConfigDict) of a workdir, None for a converted one.
  """
  graphdef: Any
  params: Any
  kwargs: dict
  config: Any
  source: str

  @property
  def one_step(self):
    return dit.is_one_step(self.kwargs)


def load_denoiser(path, *, label, missing, dtype, model_config=None, want=None, shardings=None,
                  target=None):
  """The denoiser at `path` (`checkpoint.resolve`): a training workdir (the EMA of its latest
  step, built from its saved config) or a converted 'dit' checkpoint (alone or in a release
  folder).

  Args:
    path: the folder.
    label: how errors name it (e.g. "config.model.path='/w'").
    missing: the FileNotFoundError to raise when `path` holds no denoiser.
    dtype: compute dtype.
    model_config: optional `config.model` whose execution options (`scan`, ...) the module gets
      (None: the workdir's saved ones, or the constructor's for a converted checkpoint).
    want: optional constructor arguments the denoiser must have (ValueError naming `label`).
    shardings: optional nnx.State -> pytree of shardings to restore onto (default: the first
      local device).
    target: optional pytree of `jax.ShapeDtypeStruct` to restore onto (wins over `shardings`).
  Returns:
    `Denoiser`.
  Raises:
    `missing`; ValueError naming `label`; checkpoint.DamagedCheckpoint.
  """
  found = checkpoint.resolve(path)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = lambda abstract: jax.tree.map(lambda _: device, abstract.to_pure_dict())  # pylint: disable=unnecessary-lambda-assignment
  if found.what == "workdir":
    try:
      _, saved = checkpoint.latest_train_config(found.path)
    except FileNotFoundError:
      raise missing from None
    saved = ml_collections.ConfigDict(saved)
    kwargs = denoiser_kwargs(saved.model)
    diffs = checkpoint.kwargs_differences(kwargs, want or {})
    if diffs:
      raise ValueError(f"{label}: the workdir's denoiser differs from the config (workdir, "
                       f"config): {diffs}")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _denoiser_module(
        kwargs, model_config or saved.model, dtype, nnx.Rngs(0))), nnx.Param)
    if target is None:
      target = checkpoint.abstract_target(abstract, shardings)
    try:
      params, step, _ = checkpoint.load_train_ema(found.path, target)
    except checkpoint.DamagedCheckpoint:
      raise
    except (ValueError, KeyError) as e:
      raise ValueError(f"{label}: the latest checkpoint does not match the config: {e}") from e
    return Denoiser(graphdef, params, kwargs, saved, f"{found.path} (step {step}, EMA)")
  if "dit" not in found.networks:
    raise missing
  folder = found.networks["dit"]
  graphdef, params, metadata = checkpoint.load_network(
      folder, lambda kw, rngs: _denoiser_module(kw, model_config, dtype, rngs), kind="dit",
      label=label, want=want, shardings=shardings, target=target)
  return Denoiser(graphdef, params, metadata["kwargs"], None, folder)


def _encoder_module(encoder_config, dtype, kwargs, rngs):
  return vit.ViT(**kwargs, scan=encoder_config.scan, attention=encoder_config.attention,
                 dtype=dtype, rngs=rngs)


def _autoencoder_module(kind, kwargs, rngs):
  if kind == "pixel":
    return vae.PixelAutoencoder()
  if kind == "sd21":
    return vae.SDAutoencoder(vae.AutoencoderKL(**kwargs, rngs=rngs))
  if kind == "qwen2d":
    return qwen_vae.QwenImageVAE(**kwargs, rngs=rngs)
  raise ValueError(f"config.autoencoder.kind={kind!r} must be 'pixel', 'sd21' or 'qwen2d'")


def build_encoder(encoder_config, dtype, shardings=None, *, abstract=False):
  """The frozen ViT encoder of `config.encoder`.

  Args:
    encoder_config: `config.encoder` (`variant`, `init`, `path`, `scan`, `attention`, `seed`).
    dtype: compute dtype.
    shardings: optional nnx.State -> pytree of shardings (see `sharding.param_shardings`).
    abstract: params as ShapeDtypeStructs with `shardings`: nothing is loaded or initialised (a
      converted checkpoint's metadata is still read for the constructor arguments).
  Returns:
    (graphdef, params) with params a nested dict of arrays placed with `shardings`.
  """
  def make(kwargs, rngs):
    return _encoder_module(encoder_config, dtype, kwargs, rngs)

  variant = dict(vit.VARIANTS[encoder_config.variant])
  # A converted encoder may keep fewer blocks (`vit.params_from_torch(keep_blocks=...)`): its
  # depth is not checked.
  return _frozen("encoder", encoder_config, "vit", variant, make, shardings, abstract,
                 want={k: variant[k] for k in ("hidden_size", "num_heads")})


def build_autoencoder(autoencoder_config, shardings=None, *, abstract=False):
  """The frozen autoencoder of `config.autoencoder` (kind 'pixel', 'sd21' or 'qwen2d').

  Args:
    autoencoder_config: `config.autoencoder` (`kind`, `variant`, `init`, `path`, `seed`).
    shardings: optional nnx.State -> pytree of shardings.
    abstract: as in `build_encoder`.
  Returns:
    (graphdef, params); the module has `encode(images, key)` and `decode(latents)`.
  """
  kind = autoencoder_config.kind
  if kind == "pixel":
    graphdef, state = nnx.split(vae.PixelAutoencoder())
    return graphdef, state.to_pure_dict()
  variants = vae.VARIANTS if kind == "sd21" else qwen_vae.VARIANTS
  if autoencoder_config.variant not in variants:
    raise ValueError(f"config.autoencoder.variant={autoencoder_config.variant!r} is not one of "
                     f"{sorted(variants)} (kind {kind!r})")
  return _frozen("autoencoder", autoencoder_config, kind,
                 dict(variants[autoencoder_config.variant]),
                 lambda kwargs, rngs: _autoencoder_module(kind, kwargs, rngs), shardings,
                 abstract)


def _frozen(section, cfg, kind, variant_kwargs, make, shardings, abstract, want=None):
  """Loads (or, with init == 'random', initialises) a frozen network as (graphdef, params); with
  `abstract`, params are ShapeDtypeStructs placed with `shardings` (nothing loaded).

  A converted checkpoint is built from its own metadata kwargs, which must agree with `want`
  (default: `variant_kwargs`, those of `config.<section>.variant`)."""
  if cfg.init not in INITS:
    raise ValueError(f"config.{section}.init={cfg.init!r} must be one of {INITS}")
  if cfg.init == "random":
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: make(variant_kwargs,
                                                                     nnx.Rngs(0))))
    if abstract:
      return graphdef, checkpoint.abstract_target(abstract_state, shardings)
    target = shardings(abstract_state) if shardings is not None else None
    logging.warning("=" * 80 + "\nconfig.%s.init='random': the FROZEN %s has RANDOM weights. "
                    "Results are meaningless except for tests and benchmarks.\n" + "=" * 80,
                    section, kind)

    def init():
      return nnx.split(make(variant_kwargs, nnx.Rngs(cfg.seed)))[1].to_pure_dict()

    return graphdef, jax.jit(init, out_shardings=target)()
  found = checkpoint.resolve(cfg.path)
  if found.what != "network":
    raise FileNotFoundError(
        f"config.{section}.path={cfg.path!r}: no converted checkpoint there. Convert the "
        f"official weights with `python -m vosr_jax.convert` and set config.{section}.path, or "
        f"set config.{section}.init='random' for a test run.")
  graphdef, params, _ = checkpoint.load_network(
      found.path, make, kind=kind, label=f"config.{section}.path={found.path}",
      want=variant_kwargs if want is None else want, shardings=shardings, abstract=abstract)
  return graphdef, params


def compute_dtype(name):
  """`config.dtype` ('float32' or 'bfloat16') -> the jnp dtype."""
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"config.dtype={name!r} must be 'float32' or 'bfloat16'")
  return jnp.dtype(name)
