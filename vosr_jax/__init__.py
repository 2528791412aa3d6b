"""vosr-jax: VOSR (vision-only generative image super-resolution) in JAX/Flax."""
import flax

# Parameters carry logical axis names only (metadata); `vosr_jax.sharding` maps them to a mesh
# when the train state is created, so building a model never needs a mesh context.
flax.config.update("flax_always_shard_variable", False)
