"""XLA:TPU compiler estimates of the degradation chain and of its stages (README "TPU pods").

Compiles `degradation.degrade` and its stages (parameter draws, blur, resize, noise, JPEG) for a TPU
topology that is not attached (needs libtpu, the [tpu] extra), the batch sharded over the chips,
and prints each stage's compile time and cost analysis: `optimal_seconds` (the compiler's estimate
of the time), bytes accessed and flops, per chip. Nothing runs.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/degradation_tpu_stages.py --size=64
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/degradation_tpu_stages.py --size=512 --stages=chain
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import degradation as degradation_config
from vosr_jax import aot, perf
from vosr_jax.data import degradation, jpeg, resize


def stages(s, batch, size, sharded, replicated):
  """{name: (function, abstract arguments)} of the chain and its first-degradation stages."""
  def spec(shape, dtype=jnp.float32, sharding=sharded):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  key = spec((2,), jnp.uint32, replicated)
  images = spec((batch, size, size, 3))
  params = jax.tree.map(lambda a: spec(a.shape, a.dtype), jax.eval_shape(
      lambda k: degradation.sample_params(k, batch, s), jnp.zeros(2, jnp.uint32)))
  canvas = -(-int(size * s.resize_range[1]) // 16) * 16

  def resize_one(x, p):
    out = (jnp.floor(size * p["scale1"]).astype(jnp.int32),) * 2
    return resize.resize_canvas(x, (canvas, canvas), (size, size), out, p["mode1"],
                                s.resize_modes, (1 / p["scale1"],) * 2)

  def noise_one(x, p, k):
    return degradation.add_noise(x, k, p["gauss1"], p["sigma1"], p["poisson1"], p["gray1"],
                                 s.poisson_levels, s.unroll_poisson)

  return {
      "chain": (lambda k, x: degradation.degrade(k, x, s), (key, images)),
      "sample_params": (lambda k: degradation.sample_params(k, batch, s), (key,)),
      "filter2d": (lambda x, p: jax.vmap(degradation.filter2d)(x, p["kernel1"]), (images, params)),
      "resize_canvas": (lambda x, p: jax.vmap(resize_one)(x, p), (images, params)),
      "add_noise": (lambda x, p, k: jax.vmap(noise_one)(x, p, jax.random.split(k, batch)),
                    (images, params, key)),
      "jpeg": (lambda x, p: jax.vmap(lambda xi, pi: jpeg.jpeg(xi, pi["quality1"], (size - 3,
                                                                                   size - 5)))(x, p),
               (images, params)),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--size", type=int, default=64, help="square HQ side")
  parser.add_argument("--batch", type=int, default=8, help="global batch")
  parser.add_argument("--stages", default="chain,sample_params,filter2d,resize_canvas,add_noise,"
                      "jpeg", help="comma-separated")
  args = parser.parse_args()
  jax.config.update("jax_threefry_partitionable", True)
  _, _, devices = aot.topology_devices(args.topology)
  mesh = Mesh(np.array(devices), ("batch",))
  config = degradation_config.get_config()
  config.unroll_poisson = True  # XLA:TPU estimates no time for a program with loops.
  s = degradation.validate_config(config)
  table = stages(s, args.batch, args.size, NamedSharding(mesh, P("batch")),
                 NamedSharding(mesh, P()))
  for name in args.stages.split(","):
    fn, fn_args = table[name]
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*fn_args).compile()
    cost = perf.first_analysis(compiled.cost_analysis())
    print(json.dumps(dict(stage=name, topology=args.topology, size=args.size, batch=args.batch,
                          compile_s=round(time.perf_counter() - start, 1),
                          optimal_seconds=cost.get("optimal_seconds"),
                          bytes_accessed=cost.get("bytes accessed"), flops=cost.get("flops"))),
          flush=True)


if __name__ == "__main__":
  main()
