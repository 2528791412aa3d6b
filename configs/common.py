"""Defaults shared by the training configs (multistep training and one-step distillation).

Every hyper-parameter lives here or in the experiment file that overrides it; the trainer reads
`config.x` and never supplies its own default. The config is locked: an unknown key (a typo on the
command line) is an error.
"""
import ml_collections
from ml_collections import config_dict

from configs import data as data_config
from configs import degradation as degradation_config
from configs import sampling as sampling_config


def parse_arg(arg, **defaults):
  """Parses 'key=value,key=value' (or a bare first value for the first key) into a ConfigDict.

  `get_config("0.5b")` and `get_config("variant=0.5b")` are the same; values take the type of the
  default.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for i, item in enumerate(arg.split(",")):
    if "=" not in item:
      if i:
        raise ValueError(f"config argument {arg!r}: only the first item may omit 'key='")
      item = f"{next(iter(defaults))}={item}"
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"config argument {arg!r}: unknown key {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    out[key] = (value.lower() in ("1", "true", "yes")) if isinstance(default, bool) \
        else type(default)(value)
  return out


def get_base_config():
  """The full set of training fields with the official multistep values (docs/official.md §4)."""
  config = ml_collections.ConfigDict()
  # 'multistep' (flow matching, configs/multistep.py) or 'onestep' (distillation of a multistep
  # teacher into a one-step student, configs/onestep.py, which adds the `distill` section).
  config.kind = "multistep"
  config.seed = 42  # The run's PRNG key; per-step keys fold in the step.
  config.total_steps = 400_001
  config.batch_size = 8  # GLOBAL batch (all processes and devices together), as the official YAML.
  config.grad_accum_steps = 1  # Micro-batches per optimizer step (batch_size must divide by it).
  config.dtype = "bfloat16"  # Compute dtype of the denoiser and the encoder; parameters stay f32.
  config.ema_decay = 0.9999

  # Mesh axis sizes; one -1 fills the remaining devices. Batch is sharded over data x fsdp.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Multi-slice TPU runs: `mesh` is the mesh inside one slice (ICI) and `dcn_mesh` the sizes of the
  # same axes across slices (DCN); the default is data parallelism across slices. Unused on one
  # slice (every size must resolve to 1 there).
  config.dcn_mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Logical parameter axis -> mesh axis. ('embed', 'fsdp') with mesh.fsdp > 1 gives FSDP.
  config.sharding_rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
                           ("kv", "tensor"), ("vocab", None), ("layers", None), ("norm", None),
                           ("conv_in", None), ("conv_out", None))

  config.model = ml_collections.ConfigDict()
  config.model.variant = "0.5b"  # A key of vosr_jax.models.dit.VARIANTS.
  config.model.overrides = ml_collections.ConfigDict()  # Constructor arguments over the variant.
  config.model.init = "random"  # 'random' (from scratch) or 'checkpoint' (config.model.path).
  # A multistep denoiser: a converted one (`python -m vosr_jax.convert --kind=dit`, e.g. the
  # released multistep EMA) or a training workdir (the EMA of its latest checkpoint).
  config.model.path = ""
  config.model.scan = True  # lax.scan over the blocks (compile time independent of depth).
  config.model.remat_policy = config_dict.placeholder(str)  # None or a dit.REMAT_POLICIES key.
  # Attention: None (CPU 'explicit', else 'xla'), 'xla', 'cudnn', 'explicit' (custom VJP) or
  # 'explicit_saved' (the same, keeping the probabilities for the backward pass).
  config.model.attention = config_dict.placeholder(str)
  # Operand dtype of the denoiser's dense and attention products: None (config.dtype) or
  # 'bfloat16' (bf16 operands, float32 accumulation; the fast path of a float32 step on CPUs with
  # avx512_bf16 or AMX).
  config.model.matmul_dtype = config_dict.placeholder(str)

  config.encoder = ml_collections.ConfigDict()
  config.encoder.variant = "B/14"  # A key of vosr_jax.models.vit.VARIANTS.
  config.encoder.init = "checkpoint"  # 'checkpoint' (config.encoder.path) or 'random' (tests).
  config.encoder.path = ""  # Converted DINOv2 weights.
  config.encoder.tap_layer = 8  # 0-based block whose output tokens condition the denoiser.
  config.encoder.image_size = 448  # Square input side of the encoder.
  config.encoder.scan = True
  config.encoder.attention = config_dict.placeholder(str)
  config.encoder.seed = 0  # Only for init='random'.

  config.autoencoder = ml_collections.ConfigDict()
  config.autoencoder.kind = "sd21"  # 'sd21', 'qwen2d' or 'pixel' (identity).
  config.autoencoder.variant = "sd21"  # A key of vae.VARIANTS / qwen_vae.VARIANTS.
  config.autoencoder.init = "checkpoint"
  config.autoencoder.path = ""  # Converted autoencoder weights.
  config.autoencoder.seed = 0  # Only for init='random'.

  config.objective = ml_collections.ConfigDict()
  # What the flow generates: 'latent' (official: the HR latent) or 'residual' (a departure, used by
  # the demo: (HR latent - LR latent) / residual_scale; the samplers add the LR latent back).
  config.objective.target = "latent"
  config.objective.residual_scale = 1.0  # Only for target='residual'.
  # 0: the residual is divided by residual_scale alone. Odd k (a departure): by residual_scale *
  # (residual_floor + the LR latent's local standard deviation in k x k windows).
  config.objective.residual_window = 0
  config.objective.residual_floor = 0.01
  # Space of the multistep loss: 'velocity' (official: the velocity MSE) or 'x' (a departure: the
  # MSE of the clean sample the velocity implies, the velocity MSE times t^2).
  config.objective.loss_space = "velocity"
  # 0: every flow element weighs alike. p > 0 (a departure; needs residual_window): each position
  # weighs scale_map(lr)^p over the batch mean; 2 is the error in latent (pixel) units.
  config.objective.loss_scale_power = 0.0
  config.objective.time_dist = "uniform"  # 'uniform' or 'logit_normal'.
  config.objective.time_mu = 0.0  # logit_normal: t = sigmoid(N(mu, sigma^2)).
  config.objective.time_sigma = 1.0
  config.objective.cond_strength_mu = 5.0  # s = sigmoid(N(mu_c, sigma_c^2)), spherical LR noise.
  config.objective.cond_strength_sigma = 1.0
  config.objective.cfg_ratio = 0.1  # Probability that a sample is in the weak (guidance) set.
  config.objective.weak_strength_range = (0.05, 0.25)  # w ~ U(range) for the weak LR w * lr.
  config.objective.weak_strength_per_sample = False  # Official: one w per batch.

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 5e-5
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.01  # On every parameter (official).
  config.optim.grad_clip_norm = 1.0
  config.optim.warmup_steps = 0  # Linear warm-up from 0, then constant.
  config.optim.decay_steps = 0  # > 0: cosine decay to 0 over this many steps after the warm-up.

  config.log_every_steps = 50
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 10_000
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True

  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 10_000  # 0 disables the periodic validation samples.
  config.eval.num_images = 4  # Fixed validation crops from the data sources (seed below).
  config.eval.seed = 1234  # Picks and degrades the validation crops, and draws the noise.
  config.eval.crop_border = 4  # PSNR/SSIM border crop (the x4 BasicSR convention).
  # How validation samples: the sampler of `python -m vosr_jax.sample` with these settings (the
  # multistep YAMLs' eval guidance, docs/official.md §8.6).
  config.sampling = sampling_config.get_config("realsr")

  config.data = data_config.get_config()
  config.degradation = degradation_config.get_config()
  return config
