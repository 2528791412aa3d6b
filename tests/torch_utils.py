"""Helpers shared by the tests that compare the JAX models with PyTorch references.

Imported by plain name (`import torch_utils`): pytest puts tests/ on sys.path.
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx


def randomize(module, seed):
  """Redraws every parameter of a torch module, so that none keeps its (often trivial) init.

  Draws N(0, 1) noise from `torch.Generator().manual_seed(seed)` in `named_parameters` order and
  scales it per role, keeping activations O(1) while every parameter matters:
    gains (1-D norm `*weight`, `gamma`, layer-scale `lambda1`): 1 + 0.2 * noise;
    weights (matrices and conv kernels named `*weight`): noise / sqrt(p[0].numel()), i.e. fan-in;
    everything else (biases, norm shifts, tokens, positional and modulation tables): 0.2 * noise.

  Args:
    module: torch.nn.Module, changed in place.
    seed: generator seed.
  Returns:
    `module`, in eval mode.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      gain = name.endswith(("gamma", "lambda1")) or (
          p.ndim == 1 and "norm" in name and name.endswith("weight"))
      if gain:
        p.copy_(1 + 0.2 * noise)
      elif p.ndim >= 2 and name.endswith("weight"):
        p.copy_(noise / p[0].numel() ** 0.5)
      else:
        p.copy_(0.2 * noise)
  return module.eval()


def nchw(x):
  """NHWC array -> contiguous float32 NCHW torch tensor."""
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
  """NCHW torch tensor -> NHWC numpy array."""
  return t.detach().numpy().transpose(0, 2, 3, 1)


def max_err(a, b):
  """max |a - b| over all elements, computed in float32."""
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def abstract(cls, **kwargs):
  """`cls(**kwargs)` built with nnx.eval_shape: shapes and metadata only, no random init."""
  return nnx.eval_shape(lambda: cls(**kwargs, rngs=nnx.Rngs(0)))


def param_state(module, params):
  """`module`'s nnx.Param state with its values replaced by the nested dict `params`."""
  state = nnx.state(module, nnx.Param)
  state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
  return state


def load(cls, params, **kwargs):
  """`cls(**kwargs)` built abstractly (see `abstract`) and filled with the nested dict `params`.

  Skips the random init, which for the conv models takes seconds of eager compilation.
  """
  module = abstract(cls, **kwargs)
  nnx.update(module, param_state(module, params))
  return module
