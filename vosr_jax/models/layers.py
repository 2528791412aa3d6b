"""Building blocks shared by the networks.

Every parameter carries logical axis names (see `vosr_jax.sharding` for the mapping to mesh axes):
  embed    the model width D                  mlp      MLP hidden widths
  heads    attention heads (x head dim)       kv       key/value widths
  vocab    patch/latent input features        conv_in / conv_out  convolution channels
  layers   the stacked-block axis of scanned block stacks
"""
import jax
from flax import nnx


def init_with_axes(init, *axes):
  """Wraps a parameter initializer so the parameter carries logical axis names `axes`."""
  return nnx.with_partitioning(init, axes)


def dot_product_attention(q, k, v, implementation=None):
  """Softmax attention with scale hd**-0.5 and no mask.

  Args:
    q: (B, Nq, H, hd); k, v: (B, Nk, H, hd).
    implementation: None (XLA), "xla" or "cudnn" (jax.nn.dot_product_attention's choices).
  Returns:
    (B, Nq, H, hd) in q's dtype.
  """
  if implementation == "xla":
    implementation = None
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
