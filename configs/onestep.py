r"""One-step VOSR distillation (docs/official.md §5): a student with an `r` embedder learns the
average velocity u(z_t, t, r) from a frozen multistep teacher with restoration guidance (RCGM or
shortcut).

The teacher, and the student's initial parameters, are the EMA of a multistep denoiser at
`config.model.path`: a training workdir of configs/multistep.py (its latest checkpoint) or a
converted official checkpoint (`python -m vosr_jax.convert --kind=dit`). The student adds the
`r_embedder` (N(0, 0.02) weights, zero biases). A missing or mismatched teacher is an error.

Variants (`--config=configs/onestep.py:VARIANT`) mirror configs/multistep.py, with the one-step
settings of the official YAMLs (lr 2e-5, global batch 32, 100001 steps, checkpoints and validation
every 5k, teacher guidance 0.5 with weak strength 0.1):
  0.5b, 1.4b   the paper's models.
  bench-small  throughput measurements (random frozen networks).
  tiny         pixel-space toy for tests (distils a configs/multistep.py:tiny workdir).
  demo         `make demo`: distils the configs/multistep.py:demo workdir (default
               runs/demo/multistep) with unguided teacher targets (cfg 1), batch 8, cosine lr.

Launch (single host):
  python -m vosr_jax.main --config=configs/onestep.py:0.5b --workdir=/ckpt/vosr05b_1step \
    --config.data.sources=/data/train_list.txt \
    --config.model.path=/weights/vosr_0.5b_ms_ema --config.encoder.path=/weights/dinov2_vitb14 \
    --config.autoencoder.path=/weights/sd21_vae
Shortcut instead of RCGM: --config.distill.distill_type=shortcut.
"""
import ml_collections

from configs import common, multistep


def get_config(arg="0.5b"):
  """Returns the locked config of `arg` ('0.5b', '1.4b', 'bench-small', 'tiny' or 'demo')."""
  variant = common.parse_arg(arg, variant="0.5b").variant
  config = multistep.variant_config(variant)
  config.kind = "onestep"
  config.model.init = "checkpoint"  # The teacher; always a checkpoint (config.model.path).
  config.model.overrides.one_step = True  # The student has the r embedder.
  config.objective.weak_strength_range = (0.1, 0.1)  # Fixed weak strength (docs/official.md §5.1).
  config.batch_size = 32
  config.total_steps = 100_001
  config.optim.lr = 2e-5
  config.checkpoint.every_steps = 5_000
  config.eval.every_steps = 5_000

  config.distill = ml_collections.ConfigDict()
  config.distill.distill_type = "rcgm"  # 'rcgm' (default) or 'shortcut'.
  config.distill.cfg_scale = 0.5  # Teacher guidance w in v_weak + w (v_cond - v_weak).
  config.distill.t_start = 0.0  # Guidance window: w applies for t_start <= t <= t_end, else 1.
  config.distill.t_end = 1.0
  config.distill.u_weight = 1.0  # loss = v_loss + u_weight * u_loss.
  config.distill.beta_a = 1.0  # r = t (1 - g), g ~ Beta(a, b).
  config.distill.beta_b = 1.0
  config.distill.delta = 0.01  # RCGM: length of the teacher step.
  config.distill.n_steps = 2  # RCGM: student sub-steps from t - delta to r.

  if variant == "bench-small":
    config.batch_size = 4
  elif variant == "tiny":
    config.batch_size = 8
    config.total_steps = 100
    config.optim.lr = 1e-3
    config.checkpoint.every_steps = 50
    config.eval.every_steps = 50
  elif variant == "demo":
    # Step count and lr sized for `make demo` on 2 CPU cores (README, "The demo"); the cosine decay of
    # configs/multistep.py:demo follows total_steps.
    config.model.path = f"{multistep.DEMO_WORKDIR}/multistep"
    config.batch_size = 8
    config.total_steps = 120
    config.optim.lr = 2e-4
    config.checkpoint.every_steps = 1000  # And at the last step.
    config.eval.every_steps = 0
    config.distill.cfg_scale = 1.0  # The multi-step demo samples without guidance too.
  config.lock()
  return config
