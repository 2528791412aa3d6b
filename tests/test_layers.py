"""The attention implementations of vosr_jax.models.layers against the plain formulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vosr_jax  # noqa: F401  (package config)
from vosr_jax.models import layers


def _plain_attention(q, k, v):
  """softmax(q k^T / sqrt(hd)) v, written out; differentiated by jax.grad."""
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(logits, axis=-1), v)


def _qkv(seed, nq, nk, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = 2 * jax.random.normal(keys[0], (2, nq, 3, 16))  # logits of a few units: a peaked softmax
  k = 2 * jax.random.normal(keys[1], (2, nk, 3, 16))
  v = jax.random.normal(keys[2], (2, nk, 3, 16))
  cotangent = jax.random.normal(keys[3], (2, nq, 3, 16))
  return tuple(a.astype(dtype) for a in (q, k, v)), cotangent


@pytest.mark.parametrize("nq,nk", [(24, 24), (24, 40)], ids=["self", "cross"])
def test_explicit_attention_matches_plain_grad(nq, nk):
  (q, k, v), cotangent = _qkv(0, nq, nk)

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * cotangent), argnums=(0, 1, 2)))

  want_loss, want = loss(_plain_attention)(q, k, v)
  got_loss, got = loss(layers.explicit_attention)(q, k, v)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for g, w in zip(got, want):
    assert float(jnp.max(jnp.abs(w))) > 0.1  # live gradients
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=0)


@pytest.mark.parametrize("implementation", [None, "xla", "explicit"])
def test_implementations_agree_forward(implementation):
  (q, k, v), _ = _qkv(1, 24, 40)
  out = layers.dot_product_attention(q, k, v, implementation)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, _plain_attention(q, k, v), atol=1e-5, rtol=0)


def test_explicit_attention_bfloat16_tracks_float32():
  (q, k, v), cotangent = _qkv(2, 24, 40)
  (qb, kb, vb), _ = _qkv(2, 24, 40, jnp.bfloat16)
  grad = jax.grad(lambda *a: jnp.sum(layers.explicit_attention(*a).astype(jnp.float32)
                                     * cotangent), argnums=(0, 1, 2))
  for got, want in zip(grad(qb, kb, vb), grad(q, k, v)):
    assert got.dtype == jnp.bfloat16
    rel = jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want)
    assert rel < 0.03


def test_explicit_attention_under_remat_and_vmap():
  (q, k, v), cotangent = _qkv(3, 8, 12)

  def loss(fn):
    return lambda *a: jnp.sum(fn(*a) * cotangent)

  want = jax.grad(loss(_plain_attention), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(jax.checkpoint(loss(layers.explicit_attention)), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=0)
  stacked = jax.vmap(layers.explicit_attention)(*(jnp.stack([a, a]) for a in (q, k, v)))
  np.testing.assert_allclose(stacked[1], _plain_attention(q, k, v), atol=1e-5, rtol=0)


def test_unknown_implementation_raises():
  (q, k, v), _ = _qkv(4, 8, 8)
  with pytest.raises(ValueError, match="flash"):
    layers.dot_product_attention(q, k, v, "flash")
