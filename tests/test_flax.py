"""The Flax layer: a drop-in for stock attention, its modules, transforms, errors.

The truth is Flax's own attention with the same parameters: an all-ones block
mask must give stock outputs and gradients, and a sparse pattern must give stock
attention under the token mask its blocks expand to. Shapes are tiny: on a CPU
the kernels run interpreted.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from bsattn_jax import BlockMask, masks
from bsattn_jax.flax import (BlockSparseMultiHeadAttention,
                             BlockSparseMultiHeadAttentionNNX, make_attention_fn)
from conftest import rel_err, token_mask_np

B, S, F, H = 2, 40, 32, 2          # S = 40: the last 16-token block is partial
BLOCK = (16, 16)
NB = masks.num_blocks(S, 16)       # 3 blocks
TOL = 1e-5


@pytest.fixture(autouse=True)
def _fp32_matmuls():
  """Stock attention's einsums at full fp32 (a GPU's default is TF32, 5e-4
  from fp32 on these shapes); the kernels compute fp32 inputs in fp32 anyway."""
  with jax.default_matmul_precision("highest"):
    yield


def _x(seed: int = 1, seq_len: int = S) -> jax.Array:
  return jax.random.normal(jax.random.PRNGKey(seed), (B, seq_len, F))


def _tree_rel_err(got, want) -> float:
  """Relative error of a whole pytree (a leaf that should be ~0, like the key
  bias gradient, is judged against the tree's scale, not its own)."""
  flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])
  return rel_err(flat(got), flat(want))


def _sparse_per_head() -> jax.Array:
  """`[1, H, 3, 3]`: head 0 dense, head 1 local (each row keeps its diagonal)."""
  return jnp.concatenate([masks.dense(NB, NB), masks.local(NB, NB, 0)], axis=1)


def _token_mask(block_mask: jax.Array, seq_len: int = S) -> jax.Array:
  return jnp.asarray(token_mask_np(block_mask, block=BLOCK, sq=seq_len,
                                   sk=seq_len, causal=False))


def test_linen_drop_in_and_module_match_stock_with_an_all_ones_mask():
  x = _x()
  stock = nn.MultiHeadDotProductAttention(H)
  drop_in = nn.MultiHeadDotProductAttention(
      H, attention_fn=make_attention_fn(masks.dense(NB, NB), block_size=BLOCK))
  params = jax.jit(stock.init)(jax.random.PRNGKey(0), x)
  loss = lambda model: lambda p: jnp.sum(jnp.sin(model.apply(p, x)))
  want, want_grad = jax.jit(jax.value_and_grad(loss(stock)))(params)
  got, got_grad = jax.jit(jax.value_and_grad(loss(drop_in)))(params)
  assert rel_err(got, want) < TOL
  assert _tree_rel_err(got_grad, want_grad) < TOL
  # The module has the stock parameter layout: a stock checkpoint loads as is.
  module = BlockSparseMultiHeadAttention(H, mask=masks.dense(NB, NB), block_size=BLOCK)
  assert (jax.tree.structure(jax.eval_shape(module.init, jax.random.PRNGKey(0), x))
          == jax.tree.structure(params))
  assert rel_err(jax.jit(module.apply)(params, x), jax.jit(stock.apply)(params, x)) < TOL


def test_nnx_drop_in_and_module_match_stock_under_jit_grad_remat():
  x = _x()
  stock = nnx.MultiHeadAttention(H, F, decode=False, rngs=nnx.Rngs(0))
  drop_in = nnx.MultiHeadAttention(
      H, F, decode=False, rngs=nnx.Rngs(0),
      attention_fn=make_attention_fn(masks.dense(NB, NB), block_size=BLOCK))
  loss = nnx.remat(lambda model, x: jnp.sum(jnp.sin(model(x))))
  want, want_grad = nnx.jit(nnx.value_and_grad(loss))(stock, x)
  got, got_grad = nnx.jit(nnx.value_and_grad(loss))(drop_in, x)
  assert rel_err(got, want) < TOL
  assert _tree_rel_err(got_grad, want_grad) < TOL
  # The module with a sparse pattern, and causal given at call time (nnx passes
  # it on to the attention function).
  pattern = masks.global_local(NB, NB, 1, 0)
  module = BlockSparseMultiHeadAttentionNNX(H, F, pattern, block_size=BLOCK,
                                            rngs=nnx.Rngs(0))
  causal = nnx.jit(lambda m, x, **kw: m(x, is_causal=True, **kw))
  assert rel_err(causal(module, x), causal(stock, x, mask=_token_mask(pattern))) < TOL


def test_sparse_per_head_pattern_equals_stock_with_the_token_mask():
  x = _x()
  pattern = _sparse_per_head()
  stock = nn.MultiHeadDotProductAttention(H)
  ours = nn.MultiHeadDotProductAttention(
      H, attention_fn=make_attention_fn(pattern, block_size=BLOCK))
  params = jax.jit(stock.init)(jax.random.PRNGKey(0), x)
  apply = jax.jit(stock.apply)
  got = jax.jit(ours.apply)(params, x)
  assert rel_err(got, apply(params, x, mask=_token_mask(pattern))) < TOL
  # The sparse head really differs from dense attention.
  assert rel_err(got, apply(params, x)) > 1e-2


def test_mask_function_serves_several_sequence_lengths():
  pattern_for = lambda sq, sk: masks.local(masks.num_blocks(sq, 16),
                                           masks.num_blocks(sk, 16), 0)
  module = BlockSparseMultiHeadAttention(H, mask=pattern_for, block_size=BLOCK)
  stock = nn.MultiHeadDotProductAttention(H)
  params = jax.jit(stock.init)(jax.random.PRNGKey(0), _x())
  for seq_len in (40, 24):
    x = _x(seq_len=seq_len)
    want = jax.jit(stock.apply)(
        params, x, mask=_token_mask(pattern_for(seq_len, seq_len), seq_len))
    assert rel_err(jax.jit(module.apply)(params, x), want) < TOL


def test_gqa_module_matches_stock_nnx_gqa_and_grouped_reference():
  x = _x()
  heads, kv_heads = 4, 2
  pattern = masks.global_local(NB, NB, num_global=1, window=0)
  stock = nnx.MultiHeadAttention(heads, F, num_kv_heads=kv_heads, decode=False,
                                 rngs=nnx.Rngs(0))
  ours = BlockSparseMultiHeadAttentionNNX(heads, F, pattern, block_size=BLOCK,
                                          num_kv_heads=kv_heads, rngs=nnx.Rngs(0))
  assert ours.key.kernel[...].shape == (F, kv_heads, F // heads)
  call = nnx.jit(lambda m, x, **kw: m(x, **kw))
  assert rel_err(call(ours, x), call(stock, x, mask=_token_mask(pattern))) < TOL

  linen = BlockSparseMultiHeadAttention(heads, mask=pattern, block_size=BLOCK,
                                        num_kv_heads=kv_heads)
  params = jax.jit(linen.init)(jax.random.PRNGKey(0), x)["params"]
  assert params["key"]["kernel"].shape == (F, kv_heads, F // heads)
  proj = lambda name: (jnp.einsum("bsf,fhd->bshd", x, params[name]["kernel"])
                       + params[name]["bias"])
  attended = jax.nn.dot_product_attention(
      proj("query"), proj("key"), proj("value"), mask=_token_mask(pattern))
  want = (jnp.einsum("bshd,hdf->bsf", attended, params["out"]["kernel"])
          + params["out"]["bias"])
  assert rel_err(jax.jit(linen.apply)({"params": params}, x), want) < TOL


def test_dtype_casts_inputs_like_flax():
  x = _x()
  stock = nn.MultiHeadDotProductAttention(H, dtype=jnp.bfloat16)
  ours = BlockSparseMultiHeadAttention(H, mask=masks.dense(NB, NB),
                                       block_size=BLOCK, dtype=jnp.bfloat16)
  params = jax.jit(stock.init)(jax.random.PRNGKey(0), x)
  got = jax.jit(ours.apply)(params, x)
  assert got.dtype == jnp.bfloat16
  assert rel_err(got, jax.jit(stock.apply)(params, x)) < 2e-2


class _Encoder(nn.Module):
  """Pre-norm attention layers; layer i attends with `attention_fns[i]` (None:
  stock attention) under `token_masks[i]`."""

  attention_fns: tuple
  token_masks: tuple

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, (fn, mask) in enumerate(zip(self.attention_fns, self.token_masks)):
      attention = nn.MultiHeadDotProductAttention(
          H, attention_fn=fn or nn.dot_product_attention, name=f"attention{i}")
      x = x + attention(nn.LayerNorm(name=f"norm{i}")(x), mask=mask)
    return x


def test_linen_drop_in_per_layer_patterns_under_remat_jit_grad():
  x = _x()
  patterns = (masks.dense(NB, NB), masks.local(NB, NB, 0))
  ours = nn.remat(_Encoder)(
      tuple(make_attention_fn(p, block_size=BLOCK) for p in patterns), (None, None))
  stock = _Encoder((None, None), tuple(_token_mask(p) for p in patterns))
  params = jax.jit(stock.init)(jax.random.PRNGKey(0), x)
  loss = lambda model: lambda p: jnp.sum(jnp.sin(model.apply(p, x)))
  want, want_grad = jax.jit(jax.value_and_grad(loss(stock)))(params)
  got, got_grad = jax.jit(jax.value_and_grad(loss(ours)))(params)
  assert rel_err(got, want) < TOL
  assert _tree_rel_err(got_grad, want_grad) < TOL


class _ScannedLayer(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array, block_mask: BlockMask):
    return x + BlockSparseMultiHeadAttention(H)(x, mask=block_mask), None


def test_linen_scan_over_layers_with_stacked_block_masks():
  x = _x()
  patterns = (masks.local(NB, NB, 0), masks.global_local(NB, NB, 1, 0))
  built = [BlockMask.build(p, seq_len_q=S, block_size=BLOCK) for p in patterns]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *built)
  scan = nn.scan(_ScannedLayer, variable_axes={"params": 0},
                 split_rngs={"params": True}, length=len(patterns))()
  params = jax.jit(scan.init)(jax.random.PRNGKey(0), x, stacked)
  got = jax.jit(lambda p, x, bm: scan.apply(p, x, bm)[0])(params, x, stacked)
  want = x
  for i, pattern in enumerate(patterns):
    layer = jax.tree.map(lambda leaf: leaf[i],
                         params["params"]["BlockSparseMultiHeadAttention_0"])
    want = want + jax.jit(nn.MultiHeadDotProductAttention(H).apply)(
        {"params": layer}, want, mask=_token_mask(pattern))
  assert rel_err(got, want) < TOL


def test_orbax_checkpoint_round_trip(tmp_path):
  x = _x()
  model = nn.Sequential([
      BlockSparseMultiHeadAttention(H, mask=masks.local(NB, NB, 0), block_size=BLOCK),
      nn.Dense(F)])
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  apply = jax.jit(model.apply)
  before = apply(params, x)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", params)
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
  restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  np.testing.assert_array_equal(apply(restored, x), before)


def _stock_linen(attention_fn) -> tuple[nn.Module, dict]:
  module = nn.MultiHeadDotProductAttention(H, attention_fn=attention_fn)
  return module, nn.MultiHeadDotProductAttention(H).init(jax.random.PRNGKey(0), _x())


@pytest.mark.parametrize("build, call, error, match", [
    # A fixed block mask for another sequence length.
    (lambda: make_attention_fn(masks.dense(2, 2), block_size=BLOCK), {},
     ValueError, r"mask must have 3 x 3 blocks .*got shape \(1, 1, 2, 2\).*function"),
    (lambda: make_attention_fn(BlockMask.build(None, seq_len_q=32, block_size=BLOCK)),
     {}, ValueError, r"mask: the BlockMask was built for seq_len_q=32"),
    # Block size of an array mask vs a BlockMask's own.
    (lambda: make_attention_fn(masks.dense(NB, NB), block_size=(32, 32)), {},
     ValueError, r"mask must have 2 x 2 blocks .*block_size=\(32, 32\)"),
    (lambda: make_attention_fn(BlockMask.build(None, seq_len_q=S, block_size=BLOCK),
                               block_size=(32, 32)),
     None, ValueError, r"block_size=\(32, 32\) does not match .*\(16, 16\)"),
    # Per-head pattern for another head count.
    (lambda: make_attention_fn(jnp.ones((1, 3, NB, NB), bool), block_size=BLOCK), {},
     ValueError, r"mask head dim must be 1 or 2 .* got 3"),
    (lambda: make_attention_fn([[1]]), {}, TypeError, r"mask must be a 4-D block mask"),
    # What stock attention applies and the block kernels cannot.
    (lambda: make_attention_fn(None), {"mask": jnp.ones((B, H, S, S), bool)},
     ValueError, r"mask: .*token-level attention mask \(got shape \(2, 2, 40, 40\)\)"),
    (lambda: make_attention_fn(None), {"sow_weights": True},
     ValueError, r"sow_weights=True"),
])
def test_linen_bad_input_errors(build, call, error, match):
  with pytest.raises(error, match=match):
    module, params = _stock_linen(build())
    module.apply(params, _x(), **(call or {}))


def test_attention_fn_refuses_a_bias():
  q = jnp.ones((B, S, H, 8))
  with pytest.raises(ValueError, match=r"bias: .*token-level attention bias"):
    make_attention_fn(None)(q, q, q, jnp.zeros((B, H, S, S)))


def test_module_argument_errors():
  x = _x()
  with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(2\)"):
    BlockSparseMultiHeadAttention(H, num_kv_heads=3).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"decode=True"):
    BlockSparseMultiHeadAttention(H, decode=True).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"decode=True"):
    BlockSparseMultiHeadAttentionNNX(H, F, decode=True, rngs=nnx.Rngs(0))
  module = BlockSparseMultiHeadAttentionNNX(H, F, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"decode=True"):
    module(x, decode=True)
  with pytest.raises(ValueError, match=r"init_cache"):
    module.init_cache(x.shape)
  with pytest.raises(ValueError, match=r"mask: .*token-level attention mask"):
    module(x, mask=jnp.ones((B, H, S, S), bool))
  bm = BlockMask.build(None, seq_len_q=S, block_size=BLOCK)
  with pytest.raises(ValueError, match=r"give the pattern in one place only"):
    BlockSparseMultiHeadAttentionNNX(H, F, masks.dense(NB, NB), block_size=BLOCK,
                                     rngs=nnx.Rngs(0))(x, mask=bm)


def test_attention_dropout_runs_in_the_kernels():
  """Dropout comes from the module's 'dropout' rng: reproducible per key,
  different across keys, absent when deterministic."""
  x = _x()
  linen = BlockSparseMultiHeadAttention(H, dropout_rate=0.3)
  stock = nn.MultiHeadDotProductAttention(H)
  params = jax.jit(stock.init)(jax.random.PRNGKey(0), x)
  train = jax.jit(lambda params, key: linen.apply(params, x, deterministic=False,
                                                  rngs={"dropout": key}))
  first, again = train(params, jax.random.key(1)), train(params, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  assert rel_err(first, train(params, jax.random.key(2))) > 1e-2
  assert rel_err(first, jax.jit(stock.apply)(params, x)) > 1e-2
  with pytest.raises(ValueError, match="needs dropout_rng"):
    make_attention_fn()(*(x.reshape(x.shape[:-1] + (H, F // H)),) * 3,
                        dropout_rate=0.1, deterministic=False)
  nnx_layer = BlockSparseMultiHeadAttentionNNX(H, F, dropout_rate=0.3,
                                               rngs=nnx.Rngs(0, dropout=3))
  out = nnx_layer(x, deterministic=False)
  assert np.isfinite(np.asarray(out)).all()
  # Deterministic calls of a model configured with dropout run, without dropout.
  deterministic = jax.jit(functools.partial(linen.apply, deterministic=True))
  assert rel_err(deterministic(params, x), jax.jit(stock.apply)(params, x)) < TOL
