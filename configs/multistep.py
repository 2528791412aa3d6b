r"""Multistep VOSR training (flow matching with restoration-oriented guidance).

Variants (`--config=configs/multistep.py:VARIANT`):
  0.5b         the paper's 0.5B model: SD-2.1 VAE, DINOv2 ViT-B/14 block 8, fine-tunes the released
               multistep EMA (config.model.path).
  1.4b         the paper's 1.4B model: Qwen-Image 2D VAE, DINOv2 ViT-L/14 block 17, from scratch.
  bench-small  a 384/12/6 DiT on 32x32 SD latents (256 px crops), 1024 ViT-B tokens, batch 4, with
               random frozen networks: throughput measurements only.
  tiny         pixel-space toy (64 px crops, tiny DiT and ViT, random frozen ViT) for tests.
  demo         `make demo` (vosr_jax/demo.py): tiny plus a 128-wide, 4-deep DiT, batch 32, cosine
               lr, the residual target and a clean bicubic x4 degradation, on the skimage photos
               that `python -m vosr_jax.demo prepare` writes to runs/demo/data/train.

Launch (single host):
  python -m vosr_jax.main --config=configs/multistep.py:0.5b --workdir=/ckpt/vosr05b \
    --config.data.sources=/data/train_list.txt \
    --config.model.path=/weights/vosr_0.5b_ms_ema --config.encoder.path=/weights/dinov2_vitb14 \
    --config.autoencoder.path=/weights/sd21_vae
FSDP instead of data parallelism: --config.mesh.data=1 --config.mesh.fsdp=-1.
"""
from configs import common
from configs import degradation as degradation_config
from configs import sampling as sampling_config


def get_config(arg="0.5b"):
  """Returns the locked config of `arg` ('0.5b', '1.4b', 'bench-small', 'tiny' or 'demo')."""
  config = variant_config(common.parse_arg(arg, variant="0.5b").variant)
  config.lock()
  return config


def variant_config(variant):
  """The unlocked multistep config of `variant` (configs/onestep.py builds on it)."""
  config = common.get_base_config()
  if variant == "0.5b":
    # The shipped 0.5B YAML fine-tunes the released multistep EMA (docs/official.md §4.3).
    config.model.init = "checkpoint"
  elif variant == "1.4b":
    config.model.variant = "1.4b"
    config.encoder.variant = "L/14"
    config.encoder.tap_layer = 17
    config.autoencoder.kind = "qwen2d"
    config.autoencoder.variant = "qwen2d"
  elif variant == "bench-small":
    config.model.variant = "bench-small"
    config.dtype = "float32"  # As the official PyTorch timing it is compared with.
    config.data.resolution = 256  # 32x32 SD latents.
    config.batch_size = 4
    config.encoder.init = "random"
    config.autoencoder.init = "random"
  elif variant in ("tiny", "demo"):
    # Pixel space (3 channels), 4x4 patches of 64 px crops (16x16 tokens), tiny-ViT width 64.
    config.model.variant = "tiny"
    config.model.overrides = dict(latent_channels=3, enc_dim=64, patch_size=4, rope_grid=16)
    config.model.scan = False  # Unrolled is faster at small depth on CPU.
    config.encoder.variant = "tiny"
    config.encoder.init = "random"
    config.encoder.tap_layer = 1
    config.encoder.image_size = 56  # 4x4 patches of 14 px = the tiny ViT's native grid.
    config.encoder.scan = False
    config.autoencoder.kind = "pixel"
    config.autoencoder.variant = "pixel"
    config.autoencoder.init = "random"
    config.dtype = "float32"
    config.data.resolution = 64
    config.data.num_workers = 0
    config.batch_size = 8
    config.total_steps = 200
    config.ema_decay = 0.99
    config.optim.lr = 3e-3
    config.log_every_steps = 10
    config.checkpoint.every_steps = 100
    config.eval.every_steps = 100
    config.eval.num_images = 2
    config.sampling = sampling_config.get_config("default")
    config.sampling.num_steps = 4
    if variant == "demo":
      demo_overrides(config)
  else:
    raise ValueError(f"configs/multistep.py: unknown variant {variant!r}; expected 0.5b, 1.4b, "
                     "bench-small, tiny or demo")
  return config


DEMO_WORKDIR = "runs/demo"  # `make demo`'s default WORKDIR.
DEMO_DATA = f"{DEMO_WORKDIR}/data"  # Where `python -m vosr_jax.demo prepare` writes by default.


def demo_overrides(config):
  """The `demo` variant's changes to `tiny` (configs/onestep.py:demo starts from them too).

  Timings and held-out results on 2 CPU cores are in the README, "The demo".
  The frozen ViT stays the tiny DINOv2 architecture with random weights (logged loudly); point
  config.encoder.path at converted DINOv2 weights (with the matching config.encoder.variant and
  tap_layer) to use real ones.
  """
  # Clean-sample prediction with a skip to z_t (not in the official model): the noise need not
  # pass through the network, and near t = 0 it corrects z_t rather than copying it. The pixel
  # head (16 features per pixel, then a 3x3 convolution) lets each pixel see across the 4-px patch
  # border, where a per-token output leaves the patch grid in the samples.
  config.model.overrides.update(hidden_size=128, depth=4, num_heads=4, prediction="x_skip",
                                pixel_head=16, time_scale=1000.0)
  config.data.sources = f"{DEMO_DATA}/train"
  config.batch_size = 32
  config.total_steps = 450
  config.optim.lr = 1e-3
  # Cosine decay to 0 at the last step, whatever --config.total_steps says.
  config.optim.decay_steps = config.get_ref("total_steps")
  config.ema_decay = 0.995
  # Generate the residual HR - upsampled LR, not the HR, divided by the LR's local standard
  # deviation (9x9 windows, + 0.01): about unit variance in flat and detailed regions alike.
  config.objective.target = "residual"
  config.objective.residual_window = 9
  # A clean LR condition: the official spherical noise (s ~ sigmoid(N(5, 1)), noise std ~0.1)
  # would be as large as the pixel detail the demo's residual holds.
  config.objective.cond_strength_mu = 10.0
  # The loss stays the official velocity MSE: with x_skip that weighs the network's own target
  # about alike at every t (between 1 and 2 times Karras et al.'s weighting), so the corrections
  # near t = 0, which the last of many Euler steps rely on, are trained as hard as the rest.
  # It is in pixel units (the local scale squared over its batch mean), where PSNR measures the
  # error: flat regions, whose residual is tiny, do not outweigh edges.
  config.objective.loss_scale_power = 2.0
  config.log_every_steps = 25
  config.checkpoint.every_steps = 1000  # And at the last step.
  config.eval.every_steps = 0  # Held-out evaluation is `make demo`'s sample + evaluate.
  config.sampling = sampling_config.get_config("demo")
  # Clean bicubic x4 (configs/degradation.py: clean_bicubic). `python -m vosr_jax.demo prepare`
  # makes the held-out LR with it too. The LR goes back to the HR size with PIL's bicubic, as
  # `vosr_jax.sample` upscales it: the residual target is relative to that upscaling, so training
  # and sampling must share it.
  config.degradation = degradation_config.get_config("clean_bicubic")
