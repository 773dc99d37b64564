"""Token-level masks: the ready predicates, create_block_mask, and the kernels
applying a `mask_fn` on partial tiles.

The predicates are checked against their definitions written out here in
numpy; tile classification against a brute-force evaluation of every element
(S = 8192); the kernels (forward and gradients, interpret mode) against the
fp32 reference with a token mask built here from the block mask, the lengths,
causality and the predicate evaluated on every element.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsattn_jax import (BlockMask, block_sparse_attention, create_block_mask,
                        masks)
from bsattn_jax.reference import attention_reference
from conftest import (Case, assert_output_close, case_block_mask, case_token_mask,
                      no_key_rows, predicate_grid, random_qkv, rel_err,
                      tol_for, unattended_keys, upcast, user_mask)


def _rule_id(rule) -> str:
  """Stable across processes (pytest-xdist compares ids): no addresses."""
  return getattr(rule, "__name__", None) or repr(rule)


# --- The predicates against their definitions ---------------------------------

Q = np.arange(300)[:, None]
K = np.arange(300)[None, :]
DEFINITIONS = [
    (masks.causal, K <= Q),
    (masks.sliding_window(20, 5), (K >= Q - 20) & (K <= Q + 5)),
    (masks.sliding_window(0, 0), K == Q),
    (masks.prefix_lm(37), (K < 37) | (K <= Q)),
    (masks.chunked_causal(64), (Q // 64 == K // 64) & (K <= Q)),
    (masks.chunked_causal(50), (Q // 50 == K // 50) & (K <= Q)),
    (masks.sink_window(4, 30), (K <= Q) & ((K < 4) | (K > Q - 30))),
    (masks.and_masks(masks.causal, masks.sliding_window(10, 10)),
     (K <= Q) & (K >= Q - 10)),
    (masks.or_masks(masks.prefix_lm(0), masks.sliding_window(3, 3)),
     (K <= Q) | (np.abs(Q - K) <= 3)),
]


@pytest.mark.parametrize("mask_fn,expected", DEFINITIONS,
                         ids=[_rule_id(d[0]) for d in DEFINITIONS])
def test_predicate_matches_definition(mask_fn, expected):
  got = predicate_grid(mask_fn, 1, 1, 300, 300)[0, 0]
  np.testing.assert_array_equal(got, expected)


def test_equal_rules_are_equal_values():
  """Two equal rules hash equal, so jit reuses one compiled kernel."""
  assert masks.sliding_window(4, 4) == masks.sliding_window(4, 4)
  assert hash(masks.prefix_lm(9)) == hash(masks.prefix_lm(9))
  assert masks.sliding_window(4, 4) != masks.sliding_window(4, 5)
  assert repr(masks.sink_window(4, 64)) == "sink_window(4, 64)"


@pytest.mark.parametrize("make,args,match", [
    (masks.sliding_window, (-1, 3), "left"),
    (masks.sliding_window, (2, 1.5), "right"),
    (masks.prefix_lm, (-3,), "prefix_len"),
    (masks.chunked_causal, (0,), "chunk"),
    (masks.sink_window, (True, 3), "sink"),
    (masks.and_masks, (), "at least one"),
    (masks.or_masks, (masks.causal, 3), "argument 1"),
])
def test_predicate_arguments_are_checked(make, args, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make(*args)


# --- Exact tiles ---------------------------------------------------------------

READY_AT_8K = [
    masks.causal,
    masks.sliding_window(448, 448),
    masks.sliding_window(1000, 0),
    masks.prefix_lm(1000),
    masks.chunked_causal(1000),
    masks.sink_window(64, 1000),
    masks.and_masks(masks.chunked_causal(2048), masks.sliding_window(700, 0)),
    masks.or_masks(masks.prefix_lm(300), masks.sliding_window(200, 200)),
]


def _brute_force_tiles(mask_fn, seq_len: int, tile: int):
  """(visited, full) tiles `[n, n]` from the predicate on every element."""
  idx = np.arange(seq_len, dtype=np.int32)
  grid = np.asarray(mask_fn(jnp.int32(0), jnp.int32(0), jnp.asarray(idx[:, None]),
                            jnp.asarray(idx[None, :])))
  grid = np.broadcast_to(grid, (seq_len, seq_len))
  n = seq_len // tile
  per_tile = grid.reshape(n, tile, n, tile)
  return per_tile.any(axis=(1, 3)), per_tile.all(axis=(1, 3))


@pytest.mark.parametrize("mask_fn", READY_AT_8K, ids=_rule_id)
def test_create_block_mask_visits_exactly_the_tiles_with_an_element(mask_fn):
  seq_len, tile = 8192, 128
  bm = create_block_mask(mask_fn, None, None, seq_len, seq_len,
                         block_size=(tile, tile))
  visited, full = _brute_force_tiles(mask_fn, seq_len, tile)
  np.testing.assert_array_equal(np.asarray(bm.to_dense())[0, 0], visited)
  np.testing.assert_array_equal(np.asarray(bm.full_tiles())[0, 0], full & visited)
  assert int(np.asarray(bm.kv_lists.count).sum()) == int(visited.sum())
  # The transposed lists list the same tiles.
  q_count = np.asarray(bm.q_lists.count)[0, 0]
  np.testing.assert_array_equal(q_count, visited.sum(axis=0))


def test_window_448_visits_nine_tiles_four_partial():
  """The benchmark's ±448-token window at 128-token tiles: 9 tiles per
  interior query tile, the outer two on each side partial."""
  bm = create_block_mask(masks.sliding_window(448, 448), None, None, 8192, 8192)
  count = np.asarray(bm.kv_lists.count)[0, 0]
  full = np.asarray(bm.kv_lists.full_count)[0, 0]
  assert (count[8:-8] == 9).all() and (full[8:-8] == 5).all()


def test_create_block_mask_per_example_and_head():
  """A rule reading b and h gets lists per example and head, each exact."""
  def rule(b, h, q_idx, kv_idx):
    return jnp.abs(q_idx - kv_idx) <= 40 * (h + 1) + 100 * b
  bm = create_block_mask(rule, 2, 3, 512, 384, block_size=(64, 64))
  assert bm.kv_lists.count.shape == (2, 3, 8)
  grid = predicate_grid(rule, 2, 3, 512, 384).reshape(2, 3, 8, 64, 6, 64)
  np.testing.assert_array_equal(np.asarray(bm.to_dense()), grid.any(axis=(3, 5)))
  np.testing.assert_array_equal(np.asarray(bm.full_tiles()), grid.all(axis=(3, 5)))


def test_create_block_mask_with_lengths_and_causal():
  """Tails and bottom-right causality are part of the classification."""
  rule = masks.sliding_window(70, 70)
  q_lens, kv_lens = np.array([300, 170]), np.array([250, 300])
  bm = create_block_mask(rule, None, None, 300, 300, block_size=(32, 32),
                         is_causal=True, q_seqlens=jnp.asarray(q_lens),
                         kv_seqlens=jnp.asarray(kv_lens))
  assert bm.kv_lists.count.shape[0] == 2
  q, k = np.arange(320)[:, None], np.arange(320)[None, :]
  for b in range(2):
    ok = (np.abs(q - k) <= 70) & (k < kv_lens[b]) & (k <= q + kv_lens[b] - q_lens[b])
    real = np.broadcast_to(q < q_lens[b], ok.shape)
    tiles = lambda x: x.reshape(10, 32, 10, 32)
    visited = tiles(ok & real).any(axis=(1, 3))
    full = tiles(ok | ~real).all(axis=(1, 3)) & visited
    np.testing.assert_array_equal(np.asarray(bm.to_dense())[b, 0], visited)
    np.testing.assert_array_equal(np.asarray(bm.full_tiles())[b, 0], full)


def test_build_intersects_a_block_mask_with_a_rule():
  n = masks.num_blocks(512, 64)
  blocks = masks.strided(n, n, 2)
  rule = masks.sliding_window(100, 100)
  bm = BlockMask.build(blocks, seq_len_q=512, block_size=(64, 64), mask_fn=rule)
  by_rule = create_block_mask(rule, None, None, 512, 512, block_size=(64, 64))
  np.testing.assert_array_equal(np.asarray(bm.to_dense()),
                                np.asarray(blocks) & np.asarray(by_rule.to_dense()))


def test_create_block_mask_under_jit_matches_eager():
  rule = masks.sink_window(16, 200)
  eager = create_block_mask(rule, None, None, 1000, 1000, block_size=(64, 64))
  jitted = jax.jit(lambda: create_block_mask(rule, None, None, 1000, 1000,
                                             block_size=(64, 64)))()
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_create_block_mask_memory_is_bounded():
  """S = 32768: the compiled build's temporary memory stays far under one
  Sq x Sk array (1 GiB as bools)."""
  build = jax.jit(lambda: create_block_mask(masks.sliding_window(2048, 2048),
                                            None, None, 32768, 32768))
  stats = build.lower().compile().memory_analysis()
  if stats is None:
    pytest.fail("this backend reports no memory analysis")
  assert stats.temp_size_in_bytes < 256 * 2**20, stats.temp_size_in_bytes


def test_block_mask_describes_itself():
  bm = create_block_mask(masks.sliding_window(64, 0), None, None, 256, 256,
                         block_size=(64, 64))
  assert bm.shape == (1, 1, 256, 256)
  assert bm.to_string() == "+...\n++..\n.++.\n..++"
  assert bm.sparsity() == pytest.approx(100 * (1 - 7 / 16))
  text = repr(bm)
  assert "sliding_window(64, 0)" in text and "density=0.438" in text


# --- Bad predicates --------------------------------------------------------------

def test_mask_fn_closing_over_an_array_is_rejected():
  doc = jnp.arange(256) // 100
  with pytest.raises(ValueError, match="closes over arrays"):
    create_block_mask(lambda b, h, q, k: doc[q] == doc[k], None, None, 256, 256)


def test_mask_fn_closing_over_a_traced_value_is_rejected():
  def build(width):
    return create_block_mask(lambda b, h, q, k: jnp.abs(q - k) < width, None,
                             None, 256, 256)
  with pytest.raises(ValueError, match="closes over arrays"):
    jax.jit(build)(jnp.int32(10))


@pytest.mark.parametrize("mask_fn,error,match", [
    (lambda b, h, q, k: q - k, TypeError, "must return bool"),
    (lambda b, h, q: q > 0, TypeError, "traceable"),
    (3, TypeError, "callable"),
    (lambda b, h, q, k: jnp.zeros((4, 4, 4), bool), ValueError, "broadcast"),
])
def test_bad_mask_fn_is_rejected(mask_fn, error, match):
  with pytest.raises(error, match=match):
    create_block_mask(mask_fn, None, None, 128, 128)


def test_mask_fn_reading_b_or_h_needs_their_size():
  with pytest.raises(ValueError, match="reads `h`"):
    create_block_mask(lambda b, h, q, k: q >= k + h, 2, None, 128, 128)
  with pytest.raises(ValueError, match="reads `b`"):
    create_block_mask(lambda b, h, q, k: q >= k + b, None, 4, 128, 128)
  with pytest.raises(ValueError, match="B must be a positive int"):
    create_block_mask(masks.causal, 0, None, 128, 128)


# --- The kernels apply the rule --------------------------------------------------

def _window_case(window, block, **kw):
  return Case(block=(block, block), mask="none",
              mask_fn=masks.sliding_window(window, window), **kw)


KERNEL_CASES = [
    # Token windows of 1, 100 and 257 tokens at blocks 64 and 128.
    _window_case(1, 64, sq=197, sk=197, h=2, hkv=1, d=32),
    _window_case(1, 128, sq=300, sk=260, h=2, hkv=2, d=64, causal=True),
    _window_case(100, 64, sq=300, sk=300, h=4, hkv=2, d=32, dtype="bfloat16"),
    _window_case(100, 128, b=2, sq=400, sk=400, h=2, hkv=1, d=64,
                 q_lens=(400, 333), kv_lens=(301, 400)),
    _window_case(257, 64, sq=577, sk=577, h=2, hkv=1, d=32, causal=True),
    _window_case(257, 128, sq=400, sk=600, h=2, hkv=2, d=32, dtype="float16"),
    # Every other ready predicate; Sq != Sk; GQA; tails.
    Case(sq=300, sk=200, h=2, hkv=1, d=32, block=(64, 64), mask="none",
         mask_fn=masks.causal),
    Case(sq=260, sk=260, h=2, hkv=2, d=64, block=(64, 64), mask="none",
         mask_fn=masks.prefix_lm(70)),
    Case(b=2, sq=333, sk=333, h=3, hkv=1, d=32, block=(32, 32), mask="none",
         mask_fn=masks.chunked_causal(50)),
    Case(sq=300, sk=300, h=2, hkv=1, d=32, block=(128, 128), mask="none",
         mask_fn=masks.sink_window(5, 90)),
    Case(sq=256, sk=256, h=2, hkv=2, d=32, block=(64, 64), mask="none",
         mask_fn=masks.and_masks(masks.prefix_lm(100), masks.sliding_window(60, 60))),
    Case(sq=256, sk=320, h=2, hkv=2, d=32, block=(64, 64), mask="none",
         mask_fn=masks.or_masks(masks.sink_window(3, 20), masks.sliding_window(0, 90))),
    # Combined with block masks (per head / per example) and is_causal.
    Case(b=2, sq=300, sk=300, h=2, hkv=1, d=32, block=(64, 64),
         mask="random:0.7:BH", causal=True, mask_fn=masks.sliding_window(90, 30)),
    Case(sq=384, sk=384, h=2, hkv=1, d=64, block=(192, 192), mask="global_local",
         mask_fn=masks.chunked_causal(100)),
]


def _head_rule(b, h, q_idx, kv_idx):
  """Per head: head h sees keys within 30 * (h + 1) tokens."""
  return jnp.abs(q_idx - kv_idx) <= 30 * (h + 1)


def _example_rule(b, h, q_idx, kv_idx):
  """Per example: a prefix of 50 + 80 * b tokens, causal after."""
  return (kv_idx < 50 + 80 * b) | (kv_idx <= q_idx)


KERNEL_CASES += [
    Case(sq=256, sk=256, h=4, hkv=2, d=32, block=(64, 64), mask="none",
         mask_fn=_head_rule),
    Case(b=2, sq=250, sk=250, h=2, hkv=1, d=32, block=(32, 32), mask="none",
         q_lens=(250, 190), kv_lens=(250, 240), mask_fn=_example_rule),
    # Shapes whose forward runs the Mosaic GPU kernel on Hopper (the Triton
    # one elsewhere): a window with partial tiles on both sides; per example
    # with a block mask, causal, Sq != Sk.
    Case(sq=384, sk=384, h=2, hkv=1, d=64, dtype="bfloat16", block=(128, 128),
         mask="none", mask_fn=masks.sliding_window(100, 150)),
    Case(b=2, sq=384, sk=512, h=2, hkv=1, d=64, dtype="float16", block=(128, 128),
         mask="random:0.7:BH", causal=True, mask_fn=_example_rule),
]


@functools.lru_cache(maxsize=None)
def _jitted(block_size, is_causal):
  def run(q, k, v, cot, block_mask):
    def loss(q, k, v):
      out, lse = block_sparse_attention(q, k, v, block_mask, block_size=block_size,
                                        is_causal=is_causal, return_lse=True)
      return jnp.sum(out.astype(jnp.float32) * cot), (out, lse)
    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                                has_aux=True)(q, k, v)
    return out, lse, grads
  return jax.jit(run)


def _reference(q, k, v, cot, allowed):
  def loss(q, k, v):
    out, lse = attention_reference(q, k, v, jnp.asarray(allowed))
    return jnp.sum(out * cot), (out, lse)
  (_, (out, lse)), grads = jax.value_and_grad(
      loss, argnums=(0, 1, 2), has_aux=True)(*upcast(q, k, v))
  return out, lse, grads


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.id)
def test_kernels_apply_mask_fn(case, seed, key):
  k_in, k_cot = jax.random.split(key)
  q, k, v = random_qkv(k_in, case)
  cot = jax.random.normal(k_cot, q.shape, jnp.float32)
  mask = user_mask(case, seed)
  block_mask = case_block_mask(case, mask)
  out, lse, grads = _jitted(case.block, case.causal)(q, k, v, cot, block_mask)
  allowed = case_token_mask(case, mask)
  ref_out, ref_lse, ref_grads = _reference(q, k, v, cot, allowed)
  assert_output_close(out, lse, ref_out, ref_lse, case.dtype)
  tol = tol_for(case.dtype)
  for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
    g_np = np.asarray(g.astype(jnp.float32))
    assert not np.isnan(g_np).any(), f"{name} has NaN"
    err = rel_err(g, r)
    assert err < tol, f"{name} rel err {err:.3g} >= {tol}"
  # Rows that see no key and keys no query sees get exact zeros.
  no_keys = no_key_rows(allowed, case.b, case.h)
  dq = np.asarray(grads[0].astype(jnp.float32)).transpose(0, 2, 1, 3)
  assert np.all(dq[no_keys] == 0.0)
  unseen = unattended_keys(allowed, case.b, case.h, case.hkv)
  for g in grads[1:]:
    assert np.all(np.asarray(g.astype(jnp.float32)).transpose(0, 2, 1, 3)[unseen] == 0.0)


def test_reference_backend_applies_mask_fn(key):
  """backend='reference' materializes the same rule (lengths, causal, mask_fn)."""
  case = KERNEL_CASES[3]
  q, k, v = random_qkv(key, case)
  block_mask = case_block_mask(case, None)
  out = block_sparse_attention(*upcast(q, k, v), block_mask, backend="reference")
  ref, _ = attention_reference(*upcast(q, k, v),
                               jnp.asarray(case_token_mask(case, None)))
  assert rel_err(out, ref) < 1e-6


def test_rule_with_a_per_example_block_mask():
  """A block mask with a batch axis and a rule that reads neither b nor h
  (found by the property tests): the rule's lists broadcast over the batch."""
  blocks = jnp.asarray(np.array([[[[1, 0], [1, 1]]], [[[0, 1], [1, 0]]]], bool))
  bm = BlockMask.build(blocks, seq_len_q=128, block_size=(64, 64),
                       mask_fn=masks.causal)
  assert bm.kv_lists.count.shape == (2, 1, 2)
  np.testing.assert_array_equal(np.asarray(bm.to_dense())[:, 0],
                                np.asarray(blocks)[:, 0] & np.tril(np.ones((2, 2), bool)))
