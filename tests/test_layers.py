"""The attention implementations of vosr_jax.models.layers against the plain formulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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


@pytest.mark.parametrize("implementation", [None, "xla", "explicit", "explicit_saved"])
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


def _bf16_rounded(a):
  """a rounded to bfloat16, as float64 NumPy (the exact operand the products see)."""
  return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("dout", [12, (3, 4)], ids=["Linear", "LinearGeneral"])
def test_low_precision_dense_layer_is_the_product_of_bf16_operands(dout):
  """Forward and both gradients equal NumPy's float64 products of the bf16-rounded input, kernel
  and cotangent: the three products take bf16 operands and accumulate in float32."""
  axes = ("embed", None, "mlp") if isinstance(dout, tuple) else ("embed", "mlp")
  layer = layers.linear(8, dout, axes, dtype=jnp.float32, matmul_dtype="bfloat16",
                        rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer, nnx.Param)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 8)).astype(np.float32)
  out_shape = dout if isinstance(dout, tuple) else (dout,)
  cotangent = rng.standard_normal((2, 5) + out_shape).astype(np.float32)

  def loss(p, x):
    y = nnx.merge(graphdef, p)(x)
    return jnp.sum(y * cotangent), y

  (_, y), (dparams, dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  kernel = np.asarray(params["kernel"][...]).reshape(8, -1)
  bias = np.asarray(params["bias"][...]).reshape(-1)
  x2, g2 = x.reshape(10, 8), cotangent.reshape(10, -1)
  want_y = _bf16_rounded(x2) @ _bf16_rounded(kernel) + bias
  want_dx = _bf16_rounded(g2) @ _bf16_rounded(kernel).T
  want_dw = _bf16_rounded(x2).T @ _bf16_rounded(g2)
  assert y.dtype == jnp.float32 and dx.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y).reshape(10, -1), want_y, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(dx).reshape(10, 8), want_dx, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(dparams["kernel"][...]).reshape(8, -1), want_dw,
                             atol=1e-5, rtol=0)
  # Not a float32 product: the bf16 rounding is visible at this tolerance.
  assert np.abs(np.asarray(y).reshape(10, -1) - (x2 @ kernel + bias)).max() > 1e-4


def test_low_precision_dot_general_rejects_what_it_does_not_compute():
  dot = layers.low_precision_dot_general("bfloat16")
  a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
  with pytest.raises(ValueError, match="dense-layer contractions"):
    dot(a, b, (((2,), (1,)), ((0,), (0,))))  # a batched product
  with pytest.raises(ValueError, match="float16"):
    layers.low_precision_dot_general("float16")


def test_attention_with_bf16_products_tracks_float32():
  (q, k, v), cotangent = _qkv(5, 24, 40)

  def grads(matmul_dtype):
    return jax.grad(lambda *a: jnp.sum(layers.dot_product_attention(
        *a, "explicit", matmul_dtype) * cotangent), argnums=(0, 1, 2))(q, k, v)

  out = layers.dot_product_attention(q, k, v, "explicit", "bfloat16")
  assert out.dtype == jnp.float32
  rel = jnp.linalg.norm(out - _plain_attention(q, k, v)) / jnp.linalg.norm(out)
  assert 1e-4 < rel < 0.03
  for got, want in zip(grads("bfloat16"), grads(None)):
    assert got.dtype == jnp.float32
    rel = jnp.linalg.norm(got - want) / jnp.linalg.norm(want)
    assert 1e-4 < rel < 0.03


def test_explicit_attention_saved_probabilities_give_the_same_gradients():
  """'explicit_saved' keeps the probabilities (rows summing to 1, in the operands' dtype) where
  'explicit' keeps the (B, H, Nq, 1) log-normaliser; both give the plain gradients."""
  (q, k, v), cotangent = _qkv(6, 24, 40)
  fwd = layers._explicit_attention_fwd  # pylint: disable=protected-access
  assert fwd(q, k, v, False)[1][-1].shape == (2, 3, 24, 1)
  saved = fwd(q, k, v, True)[1][-1]
  assert saved.shape == (2, 3, 24, 40)
  np.testing.assert_allclose(jnp.sum(saved, -1), 1.0, atol=1e-5)
  want = jax.grad(lambda *a: jnp.sum(_plain_attention(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(lambda *a: jnp.sum(layers.dot_product_attention(*a, "explicit_saved")
                                    * cotangent), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=0)
