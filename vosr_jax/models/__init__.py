"""Networks: the VOSR denoiser (dit), the DINOv2-compatible encoder (vit), the autoencoders (vae).

Builders from config sections (configs/common.py):
  build_denoiser(config.model, rngs, dtype)        -> LightningDiT (trained; random init)
  build_encoder(config.encoder, dtype, shardings)  -> (graphdef, params) of the frozen ViT
  build_autoencoder(config.autoencoder, shardings) -> (graphdef, params) of the frozen autoencoder
(`abstract=True`: params as ShapeDtypeStructs, nothing loaded or initialised).

Frozen networks load converted weights (`vosr_jax.checkpoint.save_params`; metadata
{'kind': ..., 'kwargs': constructor arguments}) from `config.<section>.path`. Only
`config.<section>.init == "random"` initialises them randomly, with a loud warning: such a model
only makes sense for tests and throughput measurements.
"""
import os

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from vosr_jax import checkpoint
from vosr_jax.models import dit, qwen_vae, vae, vit

INITS = ("checkpoint", "random")


def build_denoiser(model_config, rngs, dtype):
  """The denoiser of `config.model` (`variant` name plus `overrides`), randomly initialised.

  Args:
    model_config: `config.model` (`variant`, `overrides`, `scan`, `remat_policy`, `attention`).
    rngs: nnx.Rngs with a `params` stream.
    dtype: compute dtype (parameters stay float32).
  """
  kwargs = dit.variant_kwargs(model_config.variant, **model_config.overrides.to_dict())
  return dit.LightningDiT(**kwargs, scan=model_config.scan, remat_policy=model_config.remat_policy,
                          attention=model_config.attention, dtype=dtype, rngs=rngs)


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

  return _frozen("encoder", encoder_config, "vit", dict(vit.VARIANTS[encoder_config.variant]),
                 make, shardings, abstract)


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


def _frozen(section, cfg, kind, variant_kwargs, make, shardings, abstract_only):
  """Loads (or, with init == 'random', initialises) a frozen network as (graphdef, params); only
  its abstract params (ShapeDtypeStructs with the `shardings`) with `abstract_only`."""
  if cfg.init not in INITS:
    raise ValueError(f"config.{section}.init={cfg.init!r} must be one of {INITS}")
  if cfg.init == "random":
    kwargs = variant_kwargs
  else:
    path = os.path.abspath(cfg.path) if cfg.path else ""
    if not path or not os.path.isdir(os.path.join(path, "params")):
      raise FileNotFoundError(
          f"config.{section}.path={cfg.path!r}: no converted checkpoint there. Convert the "
          f"official weights with `python -m vosr_jax.convert` and set config.{section}.path, or "
          f"set config.{section}.init='random' for a test run.")
    metadata = checkpoint.load_metadata(path)
    if metadata.get("kind") != kind:
      raise ValueError(f"config.{section}.path={path} holds a {metadata.get('kind')!r} checkpoint; "
                       f"config.{section} needs {kind!r}")
    kwargs = metadata["kwargs"]
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make(kwargs, nnx.Rngs(0))))
  target = shardings(abstract) if shardings is not None else None
  abstract_params = abstract.to_pure_dict()
  if target is not None:
    abstract_params = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_params, target)
  if abstract_only:
    return graphdef, abstract_params
  if cfg.init == "random":
    logging.warning("=" * 80 + "\nconfig.%s.init='random': the FROZEN %s has RANDOM weights. "
                    "Results are meaningless except for tests and benchmarks.\n" + "=" * 80,
                    section, kind)

    def init():
      return nnx.split(make(kwargs, nnx.Rngs(cfg.seed)))[1].to_pure_dict()

    return graphdef, jax.jit(init, out_shardings=target)()
  try:
    params, _ = checkpoint.load_params(path, abstract_params)
  except (ValueError, KeyError) as e:
    raise ValueError(f"config.{section}.path={path}: the checkpoint does not match the "
                     f"{kind} built from its metadata: {e}") from e
  return graphdef, params


def compute_dtype(name):
  """`config.dtype` ('float32' or 'bfloat16') -> the jnp dtype."""
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"config.dtype={name!r} must be 'float32' or 'bfloat16'")
  return jnp.dtype(name)
