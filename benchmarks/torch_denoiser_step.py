"""The PyTorch side of the CPU denoiser-step comparison (README "Performance").

Times one training step of the PyTorch LightningDiT written from docs/official.md §1
(tests/torch_reference.py, the reference the JAX denoiser is checked against; attention through
F.scaled_dot_product_attention as in the official code) at the shapes of
`configs/multistep.py:bench-small`, doing what `python -m vosr_jax.bench --what=denoiser` does:
forward, velocity MSE, backward, global-norm clip, AdamW. Prints one JSON record like the JAX bench
(median, min, max over --steps after --warmup).

  .venv/bin/python benchmarks/torch_denoiser_step.py --threads=2 --steps=10

`python -m vosr_jax.bench --what=denoiser --vs-torch` runs it in alternation with the JAX step and
reads SHAPES, BATCH and ENC_TOKENS from this file (importable without torch).
"""
import argparse
import json
import os
import statistics
import sys
import time

# configs/multistep.py:bench-small: 32x32 SD latents (256 px), 4 channels, ViT-B/14 tokens at 448 px.
SHAPES = dict(latent_channels=4, hidden_size=384, depth=12, num_heads=6, enc_dim=768,
              input_size=32, patch_size=2)
BATCH, ENC_TOKENS = 4, 1024


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args()
  import torch  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
  import torch_reference  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  torch.set_num_threads(args.threads)
  model = torch_reference.LightningDiT(**SHAPES)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  c, side = SHAPES["latent_channels"], SHAPES["input_size"]
  x = torch.randn(BATCH, 2 * c, side, side)
  t = torch.rand(BATCH)
  tokens = torch.randn(BATCH, ENC_TOKENS, SHAPES["enc_dim"])
  target = torch.randn(BATCH, c, side, side)

  def step():
    loss = torch.mean((model(x, t, z=[tokens]) - target) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()

  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  print(json.dumps(dict(
      what="torch_denoiser_step", torch=torch.__version__, threads=args.threads,
      batch=BATCH, steps=args.steps, warmup=args.warmup, median_s=median, min_s=min(times),
      max_s=max(times), mean_s=statistics.fmean(times), images_per_s=BATCH / median,
      parameters=sum(p.numel() for p in model.parameters())), indent=2))


if __name__ == "__main__":
  main()
