"""Loading trained or converted networks into a ready sampling pipeline, and timing it.

`load_pipeline(path)` accepts:
  * a training workdir (`<workdir>/checkpoints/<step>/{state,config}`): the EMA denoiser of the
    latest step, and the frozen encoder / autoencoder named by its config (`config.encoder.path`,
    `config.autoencoder.path`, or random ones for `init='random'`);
  * a converted release folder: one sub-folder per network, each a `checkpoint.save_params`
    checkpoint whose metadata `kind` is 'dit', 'vit', 'sd21' (+ optional 'light_decoder') or
    'qwen2d' (`python -m vosr_jax.convert --release`);
  * a single converted denoiser checkpoint (kind 'dit').
`checkpoint.resolve` tells them apart. `encoder=` / `autoencoder=` point at other converted folders
for the frozen networks (they win over what the checkpoint names). Multi-step or one-step is the
denoiser's `one_step` constructor argument (`dit.is_one_step`: one-step students have an
`r_embedder`). A training workdir's `config.objective.target` tells whether the denoiser generates
the latent (official; always so for converted checkpoints) or the scaled residual.
"""
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vosr_jax import checkpoint, models, objectives, perf, sampling
from vosr_jax.models import qwen_vae, vae, vit

# Official VOSR tap layers by DINOv2 width (docs/official.md §2), for converted encoders whose
# metadata does not name one.
OFFICIAL_TAP_LAYERS = {768: 8, 1024: 17}
OFFICIAL_ENCODER_SIZE = 448


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """Networks (static) plus parameters {'denoiser', 'encoder', 'autoencoder'} and where from."""
  networks: sampling.Networks
  params: dict
  source: str

  def jit(self, settings):
    """`sampling.super_resolve` jitted for `settings`: f(params, images, keys) -> uint8."""
    return _jitted(sampling.super_resolve, self.networks, settings)

  def jit_stages(self, settings):
    """(prepare, step, finish) jitted for `settings`, to run the Euler steps from the host:
    prepare(params, images, keys) -> state; step(params, state, k) -> state;
    finish(params, state['z'], images) -> uint8."""
    return (_jitted(sampling.prepare, self.networks, settings),
            _jitted(sampling.step, self.networks, settings),
            _jitted(sampling.finish, self.networks, settings))


@functools.lru_cache(maxsize=32)
def _jitted(fn, networks, settings):
  """One compiled function per (stage, networks, settings), shared by every caller."""
  return jax.jit(lambda *args: fn(networks, *args, settings))


def _no_model(path):
  return FileNotFoundError(
      f"{path}: no model there. --checkpoint takes a training workdir (with checkpoints/<step>/), "
      "a folder converted by `python -m vosr_jax.convert` (sub-folders with params/ and "
      "metadata), or one converted denoiser checkpoint.")


def _converted(path):
  """{kind: folder} of the converted checkpoints at `path` (itself one, or its sub-folders)."""
  return checkpoint.resolve(path).networks


def _load(folder, make):
  """(graphdef, params, metadata) of `make(kwargs, rngs)` restored from the converted `folder`."""
  return checkpoint.load_network(folder, make, kind=checkpoint.load_metadata(folder)["kind"],
                                 label=folder)


def _pick(found, kinds, what, path, flag):
  hits = [k for k in kinds if k in found]
  if not hits:
    raise FileNotFoundError(f"{path}: no converted {what} ({'/'.join(kinds)}) there; pass {flag} "
                            "with a folder `python -m vosr_jax.convert` wrote.")
  return found[hits[0]]


def _converted_encoder(found, path, dtype):
  folder = _pick(found, ("vit",), "encoder", path, "--encoder")
  graphdef, params, metadata = _load(
      folder, lambda kw, rngs: vit.ViT(**kw, dtype=dtype, rngs=rngs))
  hidden = metadata["kwargs"]["hidden_size"]
  tap = metadata.get("tap_layer", OFFICIAL_TAP_LAYERS.get(hidden))
  if tap is None:
    raise ValueError(f"{folder}: the metadata names no 'tap_layer' and width {hidden} is not an "
                     f"official VOSR encoder ({OFFICIAL_TAP_LAYERS}); reconvert with a tap layer.")
  return graphdef, params, tap, metadata.get("image_size", OFFICIAL_ENCODER_SIZE)


def _converted_autoencoder(found, path):
  if "qwen2d" in found:
    folder = found["qwen2d"]
    graphdef, params, _ = _load(folder, lambda kw, rngs: qwen_vae.QwenImageVAE(**kw, rngs=rngs))
    return graphdef, params
  folder = _pick(found, ("sd21", "qwen2d"), "autoencoder", path, "--autoencoder")
  kl_graph, kl_params, _ = _load(folder, lambda kw, rngs: vae.AutoencoderKL(**kw, rngs=rngs))
  kl = nnx.merge(kl_graph, kl_params)
  params = {"vae": kl_params}
  light = None
  if "light_decoder" in found:
    # Official inference decodes with the LightDecoder (docs/official.md §3.2).
    light_graph, params["light_decoder"], _ = _load(
        found["light_decoder"], lambda kw, rngs: vae.LightDecoder(**kw, rngs=rngs))
    light = nnx.merge(light_graph, params["light_decoder"])
  graphdef, _ = nnx.split(vae.SDAutoencoder(kl, light))
  return graphdef, params


def load_pipeline(path, *, encoder=None, autoencoder=None, dtype="float32"):
  """Builds the sampling pipeline of a training workdir or converted checkpoint folder.

  Args:
    path: see the module docstring.
    encoder: optional folder of a converted encoder ('vit').
    autoencoder: optional folder of converted autoencoder checkpoints ('sd_vae' [+
      'light_decoder'] or 'qwen_vae').
    dtype: compute dtype name ('float32' or 'bfloat16'); parameters stay float32.
  Returns:
    `Pipeline`.
  Raises:
    FileNotFoundError / ValueError naming the folder and what to pass.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such checkpoint folder")
  compute = models.compute_dtype(dtype)
  found, scale = checkpoint.resolve(path), None
  missing = FileNotFoundError(
      f"{path}: no converted denoiser (dit) there; pass a release folder as --checkpoint with a "
      "folder `python -m vosr_jax.convert` wrote.") if found.networks else _no_model(path)
  denoiser = models.load_denoiser(path, label=path, missing=missing, dtype=compute)
  den_graph, den_params, source = denoiser.graphdef, denoiser.params, denoiser.source
  if found.what == "workdir":
    config = denoiser.config
    scale = objectives.residual_scale(config.objective)
    tap, size = config.encoder.tap_layer, config.encoder.image_size
    if encoder is None:
      enc_graph, enc_params = models.build_encoder(config.encoder, compute)
    if autoencoder is None:
      ae_graph, ae_params = models.build_autoencoder(config.autoencoder)
  else:
    found = found.networks
    if encoder is None:
      enc_graph, enc_params, tap, size = _converted_encoder(found, path, compute)
    if autoencoder is None:
      ae_graph, ae_params = _converted_autoencoder(found, path)
  if encoder is not None:
    enc_graph, enc_params, tap, size = _converted_encoder(_converted(encoder), encoder, compute)
  if autoencoder is not None:
    ae_graph, ae_params = _converted_autoencoder(_converted(autoencoder), autoencoder)
  module = nnx.merge(den_graph, den_params)
  ae = nnx.merge(ae_graph, ae_params)
  if ae.latent_channels != module.latent_channels:
    raise ValueError(f"{path}: the denoiser takes {module.latent_channels}-channel latents but "
                     f"the autoencoder makes {ae.latent_channels}; pass the matching --autoencoder")
  networks = sampling.Networks(
      denoiser=den_graph, encoder=enc_graph, autoencoder=ae_graph, tap_layer=int(tap),
      encoder_size=int(size), downsample=ae.downsample, patch_size=module.patch_size,
      one_step=denoiser.one_step, residual_scale=scale)
  params = {"denoiser": den_params, "encoder": enc_params, "autoencoder": ae_params}
  return Pipeline(networks, params, source)


def random_pipeline(config, *, one_step=False):
  """A pipeline with a randomly initialised denoiser for a training `config` (tests, benchmarks).

  The frozen networks follow `config.encoder` / `config.autoencoder` (random with init='random').
  """
  config = ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
  config.model.overrides.one_step = one_step
  compute = models.compute_dtype(config.dtype)
  denoiser = models.build_denoiser(config.model, nnx.Rngs(config.seed), compute)
  den_graph, den_params = nnx.split(denoiser, nnx.Param)
  enc_graph, enc_params = models.build_encoder(config.encoder, compute)
  ae_graph, ae_params = models.build_autoencoder(config.autoencoder)
  ae = nnx.merge(ae_graph, ae_params)
  networks = sampling.Networks(
      denoiser=den_graph, encoder=enc_graph, autoencoder=ae_graph,
      tap_layer=config.encoder.tap_layer, encoder_size=config.encoder.image_size,
      downsample=ae.downsample, patch_size=denoiser.patch_size, one_step=one_step,
      residual_scale=objectives.residual_scale(config.objective))
  params = {"denoiser": den_params.to_pure_dict(), "encoder": enc_params,
            "autoencoder": ae_params}
  return Pipeline(networks, params, "random")


def benchmark_sampling(multistep=None, onestep=None, *, sampling_config,
                       sizes=((128, 512), (256, 1024)), multistep_steps=None, batch_size=1,
                       repeats=5, warmup=1, tile_size=None, seed=0):
  """Times `sampling.super_resolve` end to end (encoder, VAE encode, denoiser steps, decode,
  colour fix) on random inputs.

  Args:
    multistep, onestep: `Pipeline`s (either may be None).
    sampling_config: the sampling settings (configs/sampling.py; `config.sampling`).
    sizes: (LR side, output side) pairs; the input is the upscaled LR at the output side.
    multistep_steps: Euler steps of the multi-step pipeline (None: the config's `num_steps`).
    batch_size: images per call.
    repeats, warmup: timed calls after `warmup` untimed ones (`perf.time_fn`; compilation is
      timed apart, ahead of time).
    tile_size: denoiser tiles in pixels (None: the config's; 0: whole image).
    seed: of the random inputs.
  Returns:
    JSON-able dict: {'device': ..., 'results': [{'mode', 'steps', 'lr_size', 'hr_size',
    'batch_size', 'compile_s', 'median_s', 'min_s', 'max_s', 'mean_s', 'images_per_s'}, ...]}.
  """
  results = []
  for mode, pipe, steps in (("multistep", multistep, multistep_steps), ("onestep", onestep, None)):
    if pipe is None:
      continue
    settings = sampling.Settings.from_config(sampling_config, pipe.networks.one_step,
                                             num_steps=steps, tile_size=tile_size)
    steps = settings.num_steps
    fn = pipe.jit(settings)
    for lr_side, hr_side in sizes:
      images = jax.random.uniform(jax.random.key(seed), (batch_size, hr_side, hr_side, 3),
                                  jnp.float32, -1.0, 1.0)
      keys = jax.random.split(jax.random.key(seed + 1), batch_size)
      start = time.perf_counter()
      compiled = fn.lower(pipe.params, images, keys).compile()
      compile_s = time.perf_counter() - start
      timing = perf.time_fn(compiled, (pipe.params, images, keys), repeats, warmup)
      results.append(dict(mode=mode, steps=steps, lr_size=lr_side, hr_size=hr_side,
                          batch_size=batch_size, compile_s=compile_s,
                          **{k: timing[k] for k in ("median_s", "min_s", "max_s", "mean_s")},
                          images_per_s=batch_size / timing["median_s"]))
  return dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
              results=[{k: (float(v) if isinstance(v, (float, np.floating)) else v)
                        for k, v in r.items()} for r in results])
