"""Helpers shared by the training-loop tests (test_train.py, test_distill.py): command lines of
`python -m vosr_jax.main` on the `tiny` configs, their environment, reading back results, and a
tiny training workdir with one checkpoint (test_sample_cli.py, test_reliability.py), and damage
to Orbax folders (test_reliability.py, test_checkpoint.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import skimage.data
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "stereo_motorcycle")
KINDS = ("multistep", "onestep")


def data_folders(root):
  """The folders `make_data` fills under `root`: `varied`, `same` and `cache` (compilation)."""
  return dict(varied=str(root / "varied"), same=str(root / "same"), cache=str(root / "jax_cache"))


def make_data(root):
  """Folders of 64x64 crops of real photos under `root`: 8 different ones, and 8 copies of one."""
  varied, same = root / "varied", root / "same"
  varied.mkdir()
  same.mkdir()
  for i, name in enumerate(IMAGES):
    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):
      img = img[0]
    h, w = img.shape[:2]
    crop = img[h // 2 - 32:h // 2 + 32, w // 2 - 32:w // 2 + 32, :3]
    Image.fromarray(crop).save(varied / f"{name}.png")
    Image.fromarray(crop if i == 0 else np.asarray(Image.open(varied / f"{IMAGES[0]}.png"))).save(
        same / f"{i}.png")


def tiny_config(config_module):
  """The unlocked tiny config of `config_module` (configs/multistep.py or onestep.py) with the
  Poisson sums over 4 levels instead of 256 (a window of 42 terms instead of 224): the step's
  structure is the same, and the compiles that unroll the sums (TPU estimates, FLOP counts)
  take about half the time."""
  config = config_module.get_config("tiny")
  config.unlock()
  config.degradation.poisson_levels = 4
  return config


def xla_flags(*flags):
  """XLA_FLAGS of a subprocess: the suite's (conftest.py) followed by `flags`."""
  return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def env(data, devices=1):
  """Environment of a CPU run with `devices` virtual devices and the shared compilation cache."""
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
              XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"),
              JAX_COMPILATION_CACHE_DIR=data["cache"],
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def cmd(workdir, sources, *overrides, kind="multistep", teacher=None):
  """`python -m vosr_jax.main` on configs/<kind>.py:tiny; one-step runs distil `teacher`."""
  config = [f"--config=configs/{kind}.py:tiny"]
  if kind == "onestep":
    config.append(f"--config.model.path={teacher}")
  return [sys.executable, "-m", "vosr_jax.main", *config, f"--workdir={workdir}",
          f"--config.data.sources={sources}", "--config.eval.every_steps=0",
          "--config.log_every_steps=1", *overrides]


def run(command, environment, timeout=600):
  proc = subprocess.run(command, env=environment, cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc


def saved_state(workdir, step):
  """The saved TrainState of `step` as arrays on this process's first device (any topology)."""
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return ckptr.restore(path, target)


def metric_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def metric(workdir, name):
  """{step: value} of metric `name` in `workdir`'s metrics.jsonl."""
  return {r["step"]: r[name] for r in metric_rows(workdir) if name in r}


def assert_trees_equal(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for (path, x), y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def section(config, dotted):
  """The sub-config at `dotted` ('' is the config itself)."""
  for part in filter(None, dotted.split(".")):
    config = config[part]
  return config


def tiny_workdir(path, perturb_seed=None):
  """Writes a training workdir of configs/multistep.py:tiny with one checkpoint (step 1) at `path`
  and returns `path`. The EMA is the random init, or `perturbed` with `perturb_seed`."""
  import grain  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from configs import multistep  # pylint: disable=import-outside-toplevel
  from vosr_jax import builder, checkpoint, sharding  # pylint: disable=import-outside-toplevel
  config = multistep.get_config("tiny")
  config.unlock()
  config.checkpoint.async_save = False
  state = builder.build(config, sharding.make_mesh(config.mesh)).state
  ema = state.ema_params if perturb_seed is None else perturbed(state.ema_params, perturb_seed)
  state = state.replace(step=jnp.int32(1), ema_params=ema)
  ckpt = checkpoint.TrainCheckpointer(path, config)
  ckpt.save(1, state, iter(grain.MapDataset.range(2).to_iter_dataset()))
  ckpt.wait()
  ckpt.close()
  return path


# Constructor arguments of the tiny networks of `tiny_release`.
RELEASE_DIT = dict(latent_channels=16, hidden_size=32, depth=1, num_heads=2, enc_dim=64,
                   patch_size=2, rope_grid=4, one_step=True)


def tiny_release(folder, dit_kwargs=RELEASE_DIT):
  """dit (by default one-step, weights perturbed) + vit + qwen2d sub-folders of `folder`, as
  `python -m vosr_jax.convert --release` writes them; returns {kind: saved params}."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from vosr_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from vosr_jax.models import dit, qwen_vae, vit  # pylint: disable=import-outside-toplevel
  nets = {"dit": (dit.LightningDiT, dict(dit_kwargs)), "vit": (vit.ViT, dict(vit.VARIANTS["tiny"])),
          "qwen2d": (qwen_vae.QwenImageVAE, dict(qwen_vae.VARIANTS["tiny"]))}
  saved = {}
  for kind, (make, kwargs) in nets.items():
    params = nnx.state(make(**kwargs, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
    if kind == "dit":
      params = perturbed(params, 1)
    metadata = {"kind": kind, "kwargs": kwargs}
    if kind == "vit":
      metadata.update(tap_layer=1, image_size=56)
    checkpoint.save_params(os.path.join(str(folder), kind), params, metadata)
    saved[kind] = params
  return saved


def data_files(item_folder):
  """The array data files (under a `d/` folder) of an Orbax item folder."""
  return [os.path.join(d, f) for d, _, names in os.walk(item_folder)
          for f in names if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep]


def largest_data_file(item_folder):
  """The largest array data file of an Orbax item folder."""
  return max(data_files(item_folder), key=os.path.getsize)


def truncate(path):
  """Cuts a file to 1000 bytes (a copy killed mid-way)."""
  with open(path, "r+b") as f:
    f.truncate(1000)


def perturbed(params, seed):
  """Every leaf + 0.05 N(0, 1): the zero-initialised output layer would make the model a no-op."""
  import jax  # pylint: disable=import-outside-toplevel
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])
