"""The JAX LightningDiT against torch_reference, a PyTorch one written from the
official code's description in docs/official.md §1."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import vosr_jax  # noqa: F401  (package config)
from torch_reference import LightningDiT as TorchDiT
from torch_reference import rope_table
from torch_utils import abstract, max_err, nchw, param_state, randomize
from vosr_jax.models import dit, layers

SMALL = dict(latent_channels=4, hidden_size=64, depth=2, num_heads=4, enc_dim=48)
GRID = 8  # RoPE training grid of the small model: input_size 16 // patch 2.
ATOL_F32 = 1e-5  # max |JAX - torch| in float32; outputs have std ~1.
BF16_REL = 0.03  # ||bf16 - f32|| / ||f32||; measured 6e-3 to 9e-3 (max abs error ~3e-2).


def _forward_fn(model):
  """A jitted (params, z_t, lr, t, tokens, r) -> velocity for `model`'s graph."""
  graphdef, _ = nnx.split(model, nnx.Param)
  return jax.jit(lambda params, *args: nnx.merge(graphdef, params)(*args))


def _inputs(seed, batch, hw, one_step):
  """NHWC (z_t, lr), t, tokens and r; the last sample is a weak-branch one (zero tokens)."""
  rng = np.random.default_rng(seed)
  z_t = rng.standard_normal((batch, *hw, 4), dtype=np.float32)
  lr = rng.standard_normal((batch, *hw, 4), dtype=np.float32)
  lr[-1] *= 0.15
  t = rng.uniform(0, 1, batch).astype(np.float32)
  tok = rng.standard_normal((batch, 12, 48), dtype=np.float32)
  tok[-1] = 0
  r = (t * rng.uniform(0, 1, batch)).astype(np.float32) if one_step else None
  return z_t, lr, t, tok, r


def _torch_forward(ref, z_t, lr, t, tok, r):
  x = nchw(np.concatenate([lr, z_t], -1))
  rr = None if r is None else torch.from_numpy(r)
  return ref(x, torch.from_numpy(t), rr, [torch.from_numpy(tok)]).permute(0, 2, 3, 1)


@pytest.fixture(scope="module", params=[False, True], ids=["teacher", "student"])
def pair(request):
  """(randomised torch reference, its state dict, converted params, inferred model kwargs)."""
  torch.manual_seed(0)
  ref = randomize(TorchDiT(**SMALL, input_size=2 * GRID, one_step=request.param), seed=1)
  sd = ref.state_dict()
  params, kwargs = dit.params_from_torch(sd)
  return ref, sd, params, kwargs


def test_inferred_kwargs(pair):
  _, _, _, kwargs = pair
  assert kwargs == dict(SMALL, patch_size=2, mlp_ratio=4, encdim_ratio=3, rope_grid=GRID,
                        one_step=kwargs["one_step"])


@pytest.mark.parametrize("side", [2 * GRID, 3 * GRID], ids=["train_grid", "interpolated_rope"])
def test_matches_torch_reference(pair, side):
  ref, _, pure, kwargs = pair
  args = _inputs(side, 3, (side, side), kwargs["one_step"])
  with torch.no_grad():
    want = _torch_forward(ref, *args).numpy()
  outs = {}
  for scan in (True, False):
    model = abstract(dit.LightningDiT, **kwargs, scan=scan)
    outs[scan] = np.asarray(_forward_fn(model)(param_state(model, pure), *args))
  assert outs[True].shape == want.shape == (3, side, side, 4)
  assert np.std(want) > 0.5  # a live output, so the comparison means something
  assert max_err(outs[True], want) <= ATOL_F32
  np.testing.assert_allclose(outs[False], outs[True], atol=1e-6, rtol=0)  # unrolled == scanned


@pytest.mark.parametrize("pair", [True], ids=["student"], indirect=True)
def test_grads_match_torch_with_remat(pair):
  """Gradients of every parameter (mapped by the same conversion), scanned blocks with remat."""
  ref, _, pure, kwargs = pair
  args = _inputs(7, 2, (2 * GRID, 2 * GRID), one_step=True)
  weight = np.random.default_rng(8).standard_normal(args[0].shape, dtype=np.float32)
  ref.zero_grad()
  (_torch_forward(ref, *args) * torch.from_numpy(weight)).sum().backward()
  want, _ = dit.params_from_torch({k: p.grad for k, p in ref.named_parameters()})

  model = abstract(dit.LightningDiT, **kwargs, remat_policy="nothing_saveable")
  graphdef, _ = nnx.split(model, nnx.Param)
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(*args) * weight)
  got = jax.jit(jax.grad(loss))(param_state(model, pure)).to_pure_dict()
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = want
    for key in path:
      w = w[key.key]
    np.testing.assert_allclose(np.asarray(g), w, atol=1e-4 * np.abs(w).max() + 1e-7, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("pair", [True], ids=["student"], indirect=True)
def test_bfloat16_compute_tracks_float32(pair):
  ref, _, pure, kwargs = pair
  args = _inputs(5, 2, (2 * GRID, 2 * GRID), one_step=True)
  with torch.no_grad():
    want = _torch_forward(ref, *args).numpy()
  model = abstract(dit.LightningDiT, **kwargs, dtype=jnp.bfloat16)
  params = param_state(model, pure)
  got = _forward_fn(model)(params, *args)
  assert got.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  rel = np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want)
  assert 1e-4 < rel < BF16_REL  # really computed in bf16, and close


@pytest.mark.parametrize("pair", [True], ids=["student"], indirect=True)
def test_bf16_products_of_a_float32_model_track_torch(pair):
  """matmul_dtype='bfloat16': float32 activations and outputs, bf16 operands in every product;
  the output and every parameter gradient stay within BF16_REL of the float32 torch reference."""
  ref, _, pure, kwargs = pair
  args = _inputs(9, 2, (2 * GRID, 2 * GRID), one_step=True)
  weight = np.random.default_rng(10).standard_normal(args[0].shape, dtype=np.float32)
  ref.zero_grad()
  out = _torch_forward(ref, *args)
  (out * torch.from_numpy(weight)).sum().backward()
  want_out = out.detach().numpy()
  want, _ = dit.params_from_torch({k: p.grad for k, p in ref.named_parameters()})

  model = abstract(dit.LightningDiT, **kwargs, matmul_dtype="bfloat16")
  graphdef, _ = nnx.split(model, nnx.Param)

  def loss(params):
    out = nnx.merge(graphdef, params)(*args)
    return jnp.sum(out * weight), out

  (_, got_out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(param_state(model, pure))
  assert got_out.dtype == jnp.float32
  rel = np.linalg.norm(np.asarray(got_out) - want_out) / np.linalg.norm(want_out)
  assert 1e-4 < rel < BF16_REL
  for path, g in jax.tree_util.tree_leaves_with_path(grads.to_pure_dict()):
    w = want
    for key in path:
      w = w[key.key]
    assert g.dtype == jnp.float32
    rel = np.linalg.norm(np.asarray(g) - w) / (np.linalg.norm(w) + 1e-12)
    assert rel < BF16_REL, jax.tree_util.keystr(path)


def test_rectangular_grid_rope_positions():
  """Rows use positions i/h*G on the first half of hd, columns j/w*G on the second half."""
  h, w, hd = 4, 6, 16
  cos, sin = layers.rope_tables((h, w), hd, GRID)
  for table, (want_h, want_w) in ((cos, (rope_table(h, hd, GRID)[0], rope_table(w, hd, GRID)[0])),
                                  (sin, (rope_table(h, hd, GRID)[1], rope_table(w, hd, GRID)[1]))):
    table = table.reshape(h, w, hd)
    rows = want_h.numpy().reshape(h, h, hd)[:, :1, :hd // 2]  # square table: row i, any column
    cols = want_w.numpy().reshape(w, w, hd)[:1, :, hd // 2:]
    np.testing.assert_allclose(table[..., :hd // 2], np.broadcast_to(rows, (h, w, hd // 2)),
                               atol=1e-6)
    np.testing.assert_allclose(table[..., hd // 2:], np.broadcast_to(cols, (h, w, hd // 2)),
                               atol=1e-6)


@pytest.fixture(scope="module")
def fresh():
  """A randomly initialised student and its jitted forward (z_t, lr, t, tokens, r) -> velocity."""
  # Jitted construction: eager initialisation under nnx.vmap dispatches many small programs.
  model = nnx.jit(lambda: dit.LightningDiT(**SMALL, rope_grid=GRID, one_step=True,
                                           rngs=nnx.Rngs(3)))()
  fwd = _forward_fn(model)
  return model, lambda *args: fwd(nnx.state(model, nnx.Param), *args)


def test_rectangular_latents_run(pair):
  """A 16x24 latent (8x12 tokens) through the converted reference weights."""
  _, _, pure, kwargs = pair
  model = abstract(dit.LightningDiT, **kwargs)
  args = _inputs(3, 2, (16, 24), kwargs["one_step"])
  out = np.asarray(_forward_fn(model)(param_state(model, pure), *args))
  assert out.shape == (2, 16, 24, 4) and np.all(np.isfinite(out)) and np.std(out) > 0.5


def test_initialization_follows_spec(fresh):
  model, forward = fresh
  p = nnx.state(model, nnx.Param).to_pure_dict()
  d = SMALL["hidden_size"]
  assert np.all(np.asarray(forward(*_inputs(0, 2, (16, 16), True))) == 0)  # zero final layer
  qkv = np.asarray(p["blocks"]["attn"]["qkv"]["kernel"])
  bound = math.sqrt(6 / (d + 3 * d))  # xavier_uniform on torch's (3D, D) weight
  assert np.abs(qkv).max() <= bound and np.std(qkv) == pytest.approx(bound / math.sqrt(3), rel=0.05)
  assert not np.allclose(qkv[0], qkv[1])  # each block draws its own weights
  patch = np.asarray(p["x_embedder"]["kernel"])  # xavier on the conv's (D, Cin*p*p) view
  assert np.abs(patch).max() <= math.sqrt(6 / (patch.shape[0] + d))
  for name in ("t_embedder", "r_embedder"):
    assert np.std(p[name]["linear1"]["kernel"]) == pytest.approx(0.02, rel=0.05)
  assert np.std(p["t_block"]["kernel"]) == pytest.approx(0.02, rel=0.05)
  table = np.asarray(p["blocks"]["scale_shift_table"])
  assert np.std(table) == pytest.approx(1 / math.sqrt(d), rel=0.15)
  assert np.all(np.asarray(p["blocks"]["norm1"]["weight"]) == 1)
  assert np.all(np.asarray(p["blocks"]["attn"]["proj"]["bias"]) == 0)


def test_every_parameter_has_logical_axes(fresh):
  for path, var in nnx.to_flat_state(nnx.state(fresh[0], nnx.Param)):
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == var[...].ndim, path
    assert (axes[0] == "layers") == (path[0] == "blocks"), path


@pytest.mark.parametrize("variant,one_step,count", [
    ("0.5b", False, 485_623_616), ("0.5b", True, 485_623_616 + 1_312_768),
    ("1.4b", False, 1_393_943_616), ("1.4b", True, 1_393_943_616 + 2_755_584)])
def test_official_parameter_counts(variant, one_step, count):
  assert dit.param_count(**dit.variant_kwargs(variant, one_step=one_step)) == count


def test_official_0_5b_key_set_converts():
  """Every key and shape of an official 0.5B state dict (docs/official.md §1.2; 2 of 28 blocks)
  maps."""
  d, enc, c, hid = 1024, 768, 4, 2730
  shapes = {"x_embedder.proj.weight": (d, 2 * c, 2, 2), "x_embedder.proj.bias": (d,),
            "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
            "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
            "t_block.1.weight": (6 * d, d), "t_block.1.bias": (6 * d,),
            "layer_norm.weight": (enc,), "layer_norm.bias": (enc,),
            "mlp_ca.fc1.weight": (3 * d, enc), "mlp_ca.fc1.bias": (3 * d,),
            "mlp_ca.fc2.weight": (d, 3 * d), "mlp_ca.fc2.bias": (d,),
            "final_layer.norm_final.weight": (d,),
            "final_layer.adaLN_modulation.1.weight": (2 * d, d),
            "final_layer.adaLN_modulation.1.bias": (2 * d,),
            "final_layer.linear.weight": (4 * c, d), "final_layer.linear.bias": (4 * c,),
            "feat_rope.freqs_cos": (1024, 64), "feat_rope.freqs_sin": (1024, 64)}
  for i in range(2):
    b = f"blocks.{i}."
    shapes.update({b + "scale_shift_table": (6, d), b + "norm1.weight": (d,),
                   b + "norm2.weight": (d,), b + "attn.qkv.weight": (3 * d, d),
                   b + "attn.qkv.bias": (3 * d,), b + "mlp.w12.weight": (2 * hid, d),
                   b + "mlp.w12.bias": (2 * hid,), b + "mlp.w3.weight": (d, hid),
                   b + "mlp.w3.bias": (d,)})
    for name in ("attn.q_norm", "attn.k_norm", "cross_attn.q_norm", "cross_attn.k_norm"):
      shapes[b + name + ".weight"] = (64,)
    for name in ("attn.proj", "cross_attn.q_linear", "cross_attn.k_linear",
                 "cross_attn.v_linear", "cross_attn.proj"):
      shapes.update({b + name + ".weight": (d, d), b + name + ".bias": (d,)})
  params, kwargs = dit.params_from_torch({k: np.zeros(s, np.float32) for k, s in shapes.items()})
  assert kwargs == dict(dit.variant_kwargs("0.5b", depth=2), patch_size=2, mlp_ratio=4,
                        encdim_ratio=3, rope_grid=32, one_step=False)
  assert params["blocks"]["mlp"]["w12"]["kernel"].shape == (2, d, 2, hid)


def test_conversion_maps_each_torch_entry_to_its_place(pair):
  """Spot checks of the layout: qkv chunks, k/v stacking, SwiGLU halves, patch-embed order."""
  _, sd, p, kwargs = pair
  np_ = lambda k: sd[k].numpy()
  d = SMALL["hidden_size"]
  np.testing.assert_array_equal(p["blocks"]["attn"]["qkv"]["kernel"][1, :, 1],
                                np_("blocks.1.attn.qkv.weight")[d:2 * d].T)  # k of block 1
  np.testing.assert_array_equal(p["blocks"]["cross_attn"]["kv_linear"]["bias"][0, 1],
                                np_("blocks.0.cross_attn.v_linear.bias"))
  hid = p["blocks"]["mlp"]["w3"]["kernel"].shape[1]
  np.testing.assert_array_equal(p["blocks"]["mlp"]["w12"]["kernel"][0, :, 0],
                                np_("blocks.0.mlp.w12.weight")[:hid].T)  # gate half
  w = np_("x_embedder.proj.weight")  # (D, Cin, ph, pw); our rows are ordered (ph, pw, cin)
  np.testing.assert_array_equal(p["x_embedder"]["kernel"][(1 * 2 + 0) * 8 + 5], w[:, 5, 1, 0])


def test_bad_state_dicts_name_the_key(pair):
  _, sd, _, kwargs = pair
  missing = {k: v for k, v in sd.items() if k != "blocks.1.cross_attn.v_linear.bias"}
  with pytest.raises(ValueError, match=r"blocks\.1\.cross_attn\.v_linear\.bias"):
    dit.params_from_torch(missing)
  with pytest.raises(ValueError, match=r"blocks\.0\.attn\.bogus"):
    dit.params_from_torch({**sd, "blocks.0.attn.bogus": torch.zeros(3)})
  with pytest.raises(ValueError, match=r"mlp_ca\.fc2\.weight"):
    dit.params_from_torch({**sd, "mlp_ca.fc2.weight": torch.zeros(64, 100)})
  with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight"):
    dit.params_from_torch({**sd, "blocks.0.attn.qkv.weight": torch.zeros(190, 64)})
  with pytest.raises(ValueError, match=r"x_embedder\.proj\.weight"):
    dit.params_from_torch({k: v for k, v in sd.items() if not k.startswith("x_embedder")})
  if kwargs["one_step"]:  # half an r_embedder: the rest is unknown
    with pytest.raises(ValueError, match=r"r_embedder\.mlp\.2\.weight"):
      dit.params_from_torch({k: v for k, v in sd.items() if k != "r_embedder.mlp.0.weight"})


def test_bad_configs_and_inputs_raise(fresh):
  with pytest.raises(ValueError, match="num_heads"):
    abstract(dit.LightningDiT, **dict(SMALL, num_heads=5))
  with pytest.raises(ValueError, match="remat_policy"):
    abstract(dit.LightningDiT, **SMALL, remat_policy="everything")
  with pytest.raises(ValueError, match="variant"):
    dit.variant_kwargs("2b")
  _, forward = fresh
  z_t, lr, t, tok, r = _inputs(0, 2, (16, 16), True)
  with pytest.raises(ValueError, match="divisible by 2"):
    forward(z_t[:, :15], lr[:, :15], t, tok, r)
  with pytest.raises(ValueError, match=r"\(B, H, W, 4\)"):
    forward(z_t[..., :3], lr[..., :3], t, tok, r)
  with pytest.raises(ValueError, match="tokens"):
    forward(z_t, lr, t, tok[..., :40], r)
  graphdef, abstract_params = nnx.split(abstract(dit.LightningDiT, **SMALL), nnx.Param)
  with pytest.raises(ValueError, match="r_embedder"):
    jax.eval_shape(lambda p: nnx.merge(graphdef, p)(z_t, lr, t, tok, r), abstract_params)


def test_x_prediction_returns_the_implied_velocity(pair):
  """prediction='x' (not official; the demo's): the network's output is read as the clean sample
  x, and the model returns (z_t - x) / max(t, 0.05); the exact velocity eps - x of the flow."""
  _, _, pure, kwargs = pair
  plain = abstract(dit.LightningDiT, **kwargs)
  xpred = abstract(dit.LightningDiT, **kwargs, prediction="x")
  z_t, lr, t, tok, r = _inputs(4, 3, (16, 16), kwargs["one_step"])
  t[0] = 0.01  # below the floor
  x_hat = np.asarray(_forward_fn(plain)(param_state(plain, pure), z_t, lr, t, tok, r))
  got = np.asarray(_forward_fn(xpred)(param_state(xpred, pure), z_t, lr, t, tok, r))
  floor = np.maximum(t, dit.X_PREDICTION_MIN_T)[:, None, None, None]
  np.testing.assert_allclose(got, (z_t - x_hat) / floor, rtol=1e-5, atol=1e-4)
  # On the flow z_t = (1 - t) x + t eps the implied velocity of the true x is eps - x.
  rng = np.random.default_rng(0)
  x, eps = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
  tt = np.array([0.05, 0.5, 1.0], np.float32)[:, None, None, None]
  v = dit.x_to_velocity((1 - tt) * x + tt * eps, x, tt[:, 0, 0, 0])
  np.testing.assert_allclose(v, eps - x, atol=1e-5)
  with pytest.raises(ValueError, match="prediction"):
    abstract(dit.LightningDiT, **kwargs, prediction="eps")


def test_time_scale_scales_the_embedded_time(pair):
  """time_scale=s (not official; the demo's) embeds s t: without r it equals the official model
  called at time s t; with r the (t - r) factor stays unscaled."""
  _, _, pure, kwargs = pair
  plain = abstract(dit.LightningDiT, **kwargs)
  scaled = abstract(dit.LightningDiT, **kwargs, time_scale=1000.0)
  z_t, lr, t, tok, _ = _inputs(5, 3, (16, 16), False)
  want = np.asarray(_forward_fn(plain)(param_state(plain, pure), z_t, lr, 1000.0 * t, tok, None))
  got = np.asarray(_forward_fn(scaled)(param_state(scaled, pure), z_t, lr, t, tok, None))
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert not np.allclose(got, np.asarray(
      _forward_fn(plain)(param_state(plain, pure), z_t, lr, t, tok, None)), atol=1e-3)


def test_x_skip_prediction_is_the_preconditioned_clean_sample(pair):
  """prediction='x_skip' (not official; the demo's): x = c_skip z_t + c_out f, whose f target has
  unit variance at every t for unit-variance data, is f at t = 1 and z_t at t = 0."""
  _, _, pure, kwargs = pair
  plain = abstract(dit.LightningDiT, **kwargs)
  skip = abstract(dit.LightningDiT, **kwargs, prediction="x_skip")
  z_t, lr, t, tok, r = _inputs(6, 3, (16, 16), kwargs["one_step"])
  f = np.asarray(_forward_fn(plain)(param_state(plain, pure), z_t, lr, t, tok, r))
  got = np.asarray(_forward_fn(skip)(param_state(skip, pure), z_t, lr, t, tok, r))
  want = dit.x_to_velocity(z_t, dit.skip_x(z_t, f, t), t)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  ones, twos = np.ones((2, 1, 1, 1), np.float32), np.full((2, 1, 1, 1), 2.0, np.float32)
  np.testing.assert_allclose(dit.skip_x(ones, twos, np.float32([1.0, 0.0])).ravel(), [2.0, 1.0])
  rng = np.random.default_rng(1)
  x, eps = rng.standard_normal((2, 200_000))
  for tt in (0.1, 0.5, 0.9):
    z = (1 - tt) * x + tt * eps
    n2 = (1 - tt) ** 2 + tt ** 2
    f_target = (x - (1 - tt) / n2 * z) / (tt / np.sqrt(n2))
    assert abs(f_target.std() - 1.0) < 0.01, tt



def test_pixel_head_is_a_3x3_convolution_of_the_unpatchified_features():
  """pixel_head=K (not official; the demo's): the output is a 3x3 convolution (torch's conv2d,
  zero padding) of the SiLU of the K features per pixel that the final layer unpatchifies, so a
  pixel sees its neighbours across the patch border; K = 0 adds no parameter."""
  k, kwargs = 5, dict(SMALL, patch_size=4)
  model = dit.LightningDiT(**kwargs, pixel_head=k, rngs=nnx.Rngs(3))
  graphdef, state = nnx.split(model, nnx.Param)
  # The final layer is zero-initialised: make its features non-zero.
  state = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape),
                       state)
  z_t, lr, t, tok, _ = _inputs(7, 2, (16, 16), False)
  got = np.asarray(nnx.merge(graphdef, state)(z_t, lr, t, tok))
  headless = nnx.merge(graphdef, state)
  head = headless.pixel_head
  headless.pixel_head = None  # The same network up to the unpatchified (B, H, W, K) features.
  features = torch.from_numpy(np.array(headless(z_t, lr, t, tok))).permute(0, 3, 1, 2)
  want = torch.nn.functional.conv2d(
      torch.nn.functional.silu(features),
      torch.from_numpy(np.asarray(head.kernel[...])).permute(3, 2, 0, 1),
      torch.from_numpy(np.asarray(head.bias[...])), padding=1).permute(0, 2, 3, 1).numpy()
  assert got.shape == z_t.shape and features.shape[1] == k
  np.testing.assert_allclose(got, want, atol=1e-5)
  p, c, d = 4, SMALL["latent_channels"], SMALL["hidden_size"]
  extra = (d + 1) * p * p * (k - c) + 9 * k * c + c  # Wider final layer, plus the convolution.
  assert dit.param_count(**kwargs, pixel_head=k) - dit.param_count(**kwargs) == extra
