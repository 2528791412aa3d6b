r"""Sampling settings: the defaults of `python -m vosr_jax.sample` (its flags override them) and the
sampler of training's periodic validation (`config.sampling` of the training configs).

Presets (`get_config(PRESET)`; `python -m vosr_jax.sample --preset=PRESET`):
  default   the official README's practical guidance 0.5, the official weak strength and steps.
  screensr  the paper's ScreenSR setting: the same as default.
  realsr    the paper's RealSR setting: guidance -0.5 (also the official multistep YAMLs' eval
            value, docs/official.md §8.6).
  demo      `make demo`: no guidance (1.0), 64 px denoiser tiles overlapping 16 px, no colour fix.
"""
import ml_collections

PRESETS = ("default", "screensr", "realsr", "demo")


def get_config(arg="default"):
  """Returns the sampling ConfigDict of the preset `arg` (one of PRESETS)."""
  if arg not in PRESETS:
    raise ValueError(f"configs/sampling.py: unknown preset {arg!r}; expected one of {PRESETS}")
  c = ml_collections.ConfigDict()
  c.num_steps = 25  # Euler steps of multi-step models on t = linspace(1, 0, N + 1).
  c.onestep_num_steps = 1  # Steps of one-step students (1: one jump from t = 1 to r = 0).
  # Restoration guidance v_weak + cfg_scale (v_cond - v_weak), multi-step only. The official CLI
  # default is 2.0; its README calls 0.5 practical.
  c.cfg_scale = 0.5
  # w of the weak anchor w * LR latent (zero encoder tokens): the midpoint of the training range
  # (0.05, 0.25), as the official sampler.
  c.weak_strength = 0.15
  # Starting noise N(0, noise_scale^2 I) in the flow space: 1 as trained; below 1 trades sampled
  # detail for fidelity (0: deterministic).
  c.noise_scale = 1.0
  c.tile_size = 0  # Denoiser tiles in output pixels (0: the whole image; 512 recommended).
  c.tile_overlap = 64  # At least tile / 8 is used.
  c.vae_tile_size = 1024  # Autoencoder tiles for larger images (0: never tile).
  c.vae_tile_overlap = 64
  c.color_fix = "adain"  # 'adain', 'wavelet' or 'none' (vosr_jax.color_fix.METHODS).
  c.seed = 42  # Per-image keys of `python -m vosr_jax.sample` (training validation: eval.seed).
  if arg == "realsr":
    c.cfg_scale = -0.5
  elif arg == "demo":
    c.cfg_scale = 1.0  # The demo's models are trained and sampled without guidance.
    c.tile_size = 64
    c.tile_overlap = 16
    c.color_fix = "none"
  return c
