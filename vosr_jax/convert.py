r"""Official PyTorch checkpoints -> vosr-jax parameter checkpoints (Orbax + JSON metadata).

One network at a time:
  python -m vosr_jax.convert --kind=dit --input=VOSR_0.5B_ms --output=/weights/vosr_0.5b_ms
  python -m vosr_jax.convert --kind=vit --input=torch_cache/hub/checkpoints/dinov2_vitb14_pretrain.pth \
    --output=/weights/dinov2_vitb14
A whole release folder laid out as the official README shows (`Qwen-Image-vae-2d/`,
`stable-diffusion-2-1-base/`, `sd21_lwdecoder.pth`, `torch_cache/`, `VOSR_*/`):
  python -m vosr_jax.convert --release=preset/ckpts --output=/weights/vosr
converts what is present into one sub-folder per network and says what is absent.

Kinds (the `kind` in each checkpoint's metadata, which `vosr_jax.models` builders check):
  dit            VOSR denoiser safetensors (multistep or one-step; a folder is searched as the
                 official inference does: {clean_weights,checkpoints,.}/{ema_model,model}.safetensors)
  vit            DINOv2: torch.hub `.pth` or a Hugging Face `Dinov2Model` folder/safetensors
  sd21           diffusers AutoencoderKL folder (the pipeline folder or its `vae/`)
  light_decoder  VOSR's `sd21_lwdecoder.pth` ({config, model_state_dict})
  qwen2d         the Qwen-Image 2D VAE folder (config.json + safetensors)
Exit status: 0 done; 1 some parts of a --release failed (each reported, the others converted); 2 a
usage error or an input that cannot be converted (one line naming the file or key).
Reading `.pth` files needs PyTorch (`pip install 'vosr_jax[torch]'`). Unknown keys, missing keys and
shape mismatches are errors naming the key; only the DiT's `feat_rope.*` buffers (recomputed) and
DINOv2's `mask_token` (pretraining only) are dropped.
"""
import argparse
import glob
import json
import os
import pickle
import sys

from vosr_jax import checkpoint
from vosr_jax.models import dit, qwen_vae, vae, vit

KINDS = checkpoint.KINDS


def _read_safetensors(path):
  """All tensors of one safetensors file (bf16 included) as a dict of arrays.

  Raises:
    ValueError: naming the file, when it is not a valid safetensors file (garbage, empty, cut).
  """
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  from safetensors.flax import load_file  # numpy's loader rejects bf16.
  try:
    return load_file(path)
  except SafetensorError as e:
    raise ValueError(f"{path}: not a valid safetensors file ({e})") from e


def _read_torch(path):
  """A `.pth` file's object, loaded on the CPU without executing pickled code."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"Reading {path} needs PyTorch: pip install 'vosr_jax[torch]' "
                      "(torch==2.13.0 is the CPU build).") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    text = str(e)
    if "Unsupported global" in text:  # A real checkpoint that pickles more than tensors.
      raise ValueError(f"{path}: the PyTorch checkpoint holds pickled objects other than tensors "
                       f"and plain containers; not loaded (it could run code): {text}") from e
    reason = text.split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
    raise ValueError(f"{path}: not a valid PyTorch checkpoint ({reason})") from e
  except (EOFError, RuntimeError) as e:  # Empty, or a cut or garbage zip archive.
    reason = str(e).split(". ")[0] or "empty file"
    raise ValueError(f"{path}: not a valid PyTorch checkpoint ({reason})") from e


def _require(path):
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or folder")
  return path


def find_denoiser_weights(path):
  """The denoiser safetensors file of `path` (a file, or a folder searched like the official code)."""
  if os.path.isfile(_require(path)):
    return path
  for sub in ("clean_weights", "checkpoints", "."):
    for name in ("ema_model", "model"):
      candidate = os.path.normpath(os.path.join(path, sub, f"{name}.safetensors"))
      if os.path.isfile(candidate):
        return candidate
  found = sorted(glob.glob(os.path.join(path, "**", "*.safetensors"), recursive=True))
  if not found:
    raise FileNotFoundError(f"{path}: no VOSR denoiser weights (*.safetensors) in this folder")
  return found[0]


def convert_dit(path):
  source = find_denoiser_weights(path)
  params, kwargs = dit.params_from_torch(_read_safetensors(source))
  return params, kwargs, source


def convert_vit(path, num_heads=None):
  """A torch.hub `.pth`, or Hugging Face naming in a `.safetensors` file or a folder holding one.

  `num_heads` (not stored in checkpoints) defaults to width // 64, as the released ViT-S/B/L/g.
  """
  _require(path)
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
      raise FileNotFoundError(f"{path}: no *.safetensors (Hugging Face Dinov2Model) in this folder")
    state_dict = {k: v for f in files for k, v in _read_safetensors(f).items()}
  elif path.endswith(".safetensors"):
    state_dict = _read_safetensors(path)
  else:
    state_dict = _read_torch(path)
  naming = "hf" if any(k.startswith(("embeddings.", "encoder.layer.")) for k in state_dict) \
      else "hub"
  params, kwargs = vit.params_from_torch(state_dict, naming, num_heads=num_heads)
  return params, kwargs, path


def convert_sd21(path):
  """A diffusers AutoencoderKL folder (or a pipeline folder with `vae/`)."""
  folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
  files = sorted(glob.glob(os.path.join(_require(folder), "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"{folder}: no diffusers AutoencoderKL weights (*.safetensors)")
  config_path = os.path.join(folder, "config.json")
  groups = 32
  if os.path.isfile(config_path):
    with open(config_path) as f:
      try:
        groups = json.load(f).get("norm_num_groups", groups)
      except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from e
  state_dict = {k: v for f in files for k, v in _read_safetensors(f).items()}
  params, kwargs = vae.params_from_diffusers(state_dict, norm_num_groups=groups)
  return params, kwargs, folder


def convert_light_decoder(path):
  params, kwargs = vae.light_decoder_params_from_torch(_read_torch(_require(path)))
  return params, kwargs, path


def convert_qwen2d(path):
  params, kwargs = qwen_vae.load_folder(_require(path), _read_safetensors)
  return params, kwargs, path


CONVERTERS = {"dit": convert_dit, "vit": convert_vit, "sd21": convert_sd21,
              "light_decoder": convert_light_decoder, "qwen2d": convert_qwen2d}


def convert(kind, path, output, num_heads=None):
  """Converts one network and writes a parameter checkpoint to `output`; returns its metadata.

  `num_heads` overrides the guessed head count of a 'vit' (see `convert_vit`).
  """
  if kind not in CONVERTERS:
    raise ValueError(f"--kind={kind!r} must be one of {KINDS}")
  options = {"num_heads": num_heads} if kind == "vit" else {}
  params, kwargs, source = CONVERTERS[kind](path, **options)
  # Through JSON once, so the returned dict equals what `load_metadata` reads back (lists, not tuples).
  metadata = json.loads(json.dumps(
      {"kind": kind, "kwargs": kwargs, "source": os.path.abspath(source)}))
  checkpoint.save_params(output, params, metadata)
  return metadata


def release_contents(release):
  """(kind, input path, output sub-folder name) of everything convertible found in `release`."""
  found = []
  for name in sorted(os.listdir(_require(release))):
    path = os.path.join(release, name)
    if name.startswith("VOSR_") and os.path.isdir(path):
      found.append(("dit", path, name))
  checks = (("qwen2d", "Qwen-Image-vae-2d", "qwen2d_vae"),
            ("sd21", "stable-diffusion-2-1-base", "sd21_vae"),
            ("light_decoder", "sd21_lwdecoder.pth", "light_decoder"))
  for kind, name, out in checks:
    if os.path.exists(os.path.join(release, name)):
      found.append((kind, os.path.join(release, name), out))
  for pth in sorted(glob.glob(os.path.join(release, "torch_cache", "**", "dinov2_vit*14*.pth"),
                              recursive=True)):
    found.append(("vit", pth, os.path.basename(pth).split("_pretrain")[0].removesuffix(".pth")))
  return found


EXPECTED_IN_RELEASE = ("VOSR_*/ (denoisers)", "Qwen-Image-vae-2d/", "stable-diffusion-2-1-base/",
                       "sd21_lwdecoder.pth", "torch_cache/**/dinov2_vit*14*.pth")


ERRORS = (FileNotFoundError, KeyError, ValueError, ImportError)  # Bad inputs, named in the text.


def convert_release(release, output, num_heads=None):
  """Converts every network found in `release` into `output/<name>/`.

  A part that fails is reported (`FAILED: ...`) and the others are still converted.

  Returns:
    {name: metadata dict, or the error message (str) of a part that failed}.
  """
  contents = release_contents(release)
  if not contents:
    raise FileNotFoundError(f"{release}: none of {', '.join(EXPECTED_IN_RELEASE)} found")
  report = {}
  for kind, path, name in contents:
    print(f"converting {kind:13s} {path} -> {os.path.join(output, name)}", flush=True)
    try:
      report[name] = convert(kind, path, os.path.join(output, name), num_heads)
    except ERRORS as e:
      report[name] = str(e).strip("'\"")
      print(f"FAILED: {kind}: {report[name]}", file=sys.stderr, flush=True)
  kinds = {kind for kind, _, _ in contents}
  for kind, what in (("dit", "VOSR_* denoiser"), ("vit", "DINOv2 (torch_cache)"),
                     ("sd21", "SD-2.1 VAE"), ("light_decoder", "light decoder"),
                     ("qwen2d", "Qwen-Image 2D VAE")):
    if kind not in kinds:
      print(f"absent: {what}", flush=True)
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m vosr_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--release", help="an official release folder: convert all it holds")
  parser.add_argument("--kind", choices=KINDS, help="the network of --input")
  parser.add_argument("--input", help="the official file or folder of one network")
  parser.add_argument("--output", required=True, help="output folder")
  parser.add_argument("--num-heads", type=int,
                      help="ViT attention heads (not stored in checkpoints; default width // 64, "
                      "right for the released DINOv2 S/B/L/g)")
  args = parser.parse_args(argv)
  if bool(args.release) == bool(args.kind or args.input):
    parser.error("give either --release, or --kind and --input")
  if args.num_heads is not None and (args.num_heads < 1 or args.kind not in (None, "vit")):
    parser.error(f"--num-heads={args.num_heads} must be >= 1 and goes with --kind=vit or --release")
  try:
    if args.release:
      report = convert_release(args.release, args.output, args.num_heads)
      failed = [name for name, r in report.items() if isinstance(r, str)]
      if failed:
        print(f"error: {len(failed)} of {len(report)} parts failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    else:
      if not (args.kind and args.input):
        parser.error("--kind and --input go together")
      metadata = convert(args.kind, args.input, args.output, args.num_heads)
      print(json.dumps(metadata, indent=1))
  except ERRORS as e:
    print(f"error: {str(e).strip(chr(39) + chr(34))}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
