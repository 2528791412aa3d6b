"""Real-ESRGAN degradation config for `vosr_jax.data.degradation`: params_realsr.yml
(docs/official.md §7.1).

Presets (`get_config(preset)`):
  realesrgan     the official second-order chain (params_realsr.yml), the default.
  clean_bicubic  the same chain set to a clean x4 downscale: PyTorch bicubic resizes (no
                 antialiasing), no blur, noise or sinc, JPEG at quality 99 (luma within about two
                 8-bit levels, but its 4:2:0 chroma subsampling blurs colour edges; quality 100
                 divides by zero in DiffJPEG's tables), and the resize back with PIL's bicubic, the
                 upscaler of `vosr_jax.sample` (the demo's).

Train configs include it as `config.degradation = degradation.get_config()`; override fields with
e.g. `--config.degradation.per_sample=False` (kernels, scales, modes and branch choices drawn once
per batch, as the official code does) or `--config.degradation.jpeg_range="(60, 95)"`.
Family probabilities follow `vosr_jax.data.kernels.FAMILIES`:
(iso, aniso, generalized_iso, generalized_aniso, plateau_iso, plateau_aniso).
Resize probabilities are (up, down, keep).
"""
import math

import ml_collections


PRESETS = ("realesrgan", "clean_bicubic")


def get_config(preset="realesrgan"):
  """Returns the degradation ConfigDict of `preset` (module docstring) with every field."""
  if preset not in PRESETS:
    raise ValueError(f"configs/degradation.py: unknown preset {preset!r}; expected one of "
                     f"{PRESETS}")
  c = ml_collections.ConfigDict()
  c.scale = 4  # HR / LR size ratio.
  # True: kernels, scales, modes and branches drawn per sample; False: per batch (official code).
  c.per_sample = True
  c.resize_back = True  # Resize the LR back to the HR size (VOSR training); False: return the LR.
  c.resize_modes = ("area", "bilinear", "bicubic")  # Drawn uniformly for every resize.
  # Drawn uniformly for the resize back; may also hold "pil_bicubic" (the sampler's upscaler).
  c.resize_back_modes = ("area", "bilinear", "bicubic")
  c.kernel_sizes = tuple(range(7, 22, 2))  # Odd blur-kernel sizes, drawn uniformly.
  c.kernel_pad_to = 21  # Every kernel is zero-padded to this size.
  # Poisson counts are Poisson(levels * x) / levels; basicsr's 2**ceil(log2(#unique 8-bit values)),
  # which is 256 for any image with more than 128 distinct values.
  c.poisson_levels = 256
  # Unroll the Poisson sums' loops: a larger program that compiles slower, but XLA:TPU's cost
  # analysis (`python -m vosr_jax.aot`, which sets it) estimates no time for a program with loops.
  c.unroll_poisson = False
  c.resize_sinc_first_prob = 0.5  # Final stage: [resize + sinc] -> JPEG; otherwise JPEG first.
  # First degradation.
  c.kernel_prob = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
  c.sinc_prob = 0.1
  c.blur_sigma = (0.2, 3.0)
  c.betag_range = (0.5, 4.0)
  c.betap_range = (1.0, 2.0)
  c.rotation_range = (-math.pi, math.pi)
  c.resize_prob = (0.2, 0.7, 0.1)
  c.resize_range = (0.15, 1.5)
  c.gaussian_noise_prob = 0.5
  c.noise_range = (1.0, 30.0)  # Gaussian sigma in 8-bit units (divided by 255).
  c.poisson_scale_range = (0.05, 3.0)
  c.gray_noise_prob = 0.4
  c.jpeg_range = (30.0, 95.0)
  # Second degradation.
  c.second_blur_prob = 0.8
  c.kernel_prob2 = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
  c.sinc_prob2 = 0.1
  c.blur_sigma2 = (0.2, 1.5)
  c.betag_range2 = (0.5, 4.0)
  c.betap_range2 = (1.0, 2.0)
  c.resize_prob2 = (0.3, 0.4, 0.3)
  c.resize_range2 = (0.3, 1.2)
  c.gaussian_noise_prob2 = 0.5
  c.noise_range2 = (1.0, 25.0)
  c.poisson_scale_range2 = (0.05, 2.5)
  c.gray_noise_prob2 = 0.4
  c.jpeg_range2 = (30.0, 95.0)
  c.final_sinc_prob = 0.8
  if preset == "clean_bicubic":
    _clean_bicubic(c)
  return c


def _clean_bicubic(c):
  """The chain with every stage but the bicubic x4 downscale (and a lossless-looking JPEG) off."""
  c.resize_modes = ("bicubic",)
  c.resize_back_modes = ("pil_bicubic",)
  c.kernel_prob = c.kernel_prob2 = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
  c.kernel_sizes = (7,)
  c.kernel_pad_to = 7
  c.resize_range = c.resize_range2 = (1.0, 1.0)  # Also keeps the chain's canvases at the crop size.
  c.blur_sigma = c.blur_sigma2 = (0.1, 0.1)
  c.sinc_prob = c.sinc_prob2 = c.final_sinc_prob = c.second_blur_prob = 0.0
  c.resize_prob = c.resize_prob2 = (0.0, 0.0, 1.0)
  c.gaussian_noise_prob = c.gaussian_noise_prob2 = 1.0
  c.noise_range = c.noise_range2 = (0.0, 0.0)
  c.gray_noise_prob = c.gray_noise_prob2 = 0.0
  c.jpeg_range = c.jpeg_range2 = (99.0, 99.0)
