"""BlockMask.build: the index lists the kernels walk, checked by brute force.

The expected lists are built here token by token in numpy, without the
library's interval arithmetic: a mask tile is active when any (query, key) pair
in it is allowed; it is *full* (no element masking) when every pair of a real
query row with a key of the tile is inside the key length and causal; the
transposed (dK/dV) lists additionally call a query tile that crosses the real
query length partial. Lists are full tiles ascending, then partial ascending.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsattn_jax import BlockMask, masks

# User block dim -> expected mask tile (largest power of two dividing it, <= 128).
EXPECTED_TILE = {16: 16, 32: 32, 48: 16, 64: 64, 96: 32, 128: 128, 192: 64,
                 256: 128, 384: 128}


def brute_force_lists(mask, *, block, sq, sk, causal, q_lens, kv_lens):
  """Expected (kv_count, kv_full_count, kv_index, q_count, q_full_count, q_index).

  Index lists are returned as python lists per row holding only the first
  `count` entries (the rest is unspecified).
  """
  m, n = block
  tq, tk = EXPECTED_TILE[m], EXPECTED_TILE[n]
  nq, nk = math.ceil(sq / tq), math.ceil(sk / tk)
  mask = np.asarray(mask) != 0
  ql_all = np.asarray([sq] if q_lens is None else q_lens)
  kl_all = np.asarray([sk] if kv_lens is None else kv_lens)
  bm = max(mask.shape[0], len(ql_all), len(kl_all))
  hm = mask.shape[1]
  kv_count = np.zeros((bm, hm, nq), int)
  kv_full = np.zeros((bm, hm, nq), int)
  q_count = np.zeros((bm, hm, nk), int)
  q_full = np.zeros((bm, hm, nk), int)
  kv_index = [[None] * nq for _ in range(bm * hm)]
  q_index = [[None] * nk for _ in range(bm * hm)]
  qpos = np.arange(nq * tq)[:, None]
  kpos = np.arange(nk * tk)[None, :]
  for b in range(bm):
    ql = int(ql_all[b % len(ql_all)])
    kl = int(kl_all[b % len(kl_all)])
    causal_ok = (kpos <= qpos + kl - ql) if causal else np.ones_like(qpos & kpos, bool)
    in_len = (qpos < ql) & (kpos < kl)
    for h in range(hm):
      user = mask[b % mask.shape[0], h]
      user_tok = np.repeat(np.repeat(user, m, 0), n, 1)
      user_tok = np.pad(user_tok, ((0, max(0, nq * tq - user_tok.shape[0])),
                                   (0, max(0, nk * tk - user_tok.shape[1]))))
      user_tok = user_tok[:nq * tq, :nk * tk]
      allowed = user_tok & in_len & causal_ok
      # Pairs that need no masking: key inside its length and causal.
      free = (kpos < kl) & causal_ok
      real_q = np.broadcast_to(qpos < ql, free.shape)
      free_real = free | ~real_q          # only real query rows must be free
      tiles = lambda x: x.reshape(nq, tq, nk, tk)
      active = tiles(allowed).any(axis=(1, 3))
      full = active & tiles(free_real).all(axis=(1, 3))
      full_t = full & (np.arange(nq)[:, None] * tq + tq <= ql)
      for i in range(nq):
        cols = np.flatnonzero(active[i])
        fulls = [j for j in cols if full[i, j]]
        parts = [j for j in cols if not full[i, j]]
        kv_count[b, h, i], kv_full[b, h, i] = len(cols), len(fulls)
        kv_index[b * hm + h][i] = fulls + parts
      for j in range(nk):
        rows = np.flatnonzero(active[:, j])
        fulls = [i for i in rows if full_t[i, j]]
        parts = [i for i in rows if not full_t[i, j]]
        q_count[b, h, j], q_full[b, h, j] = len(rows), len(fulls)
        q_index[b * hm + h][j] = fulls + parts
  return kv_count, kv_full, kv_index, q_count, q_full, q_index


def _assert_lists(bm: BlockMask, expected):
  kv_count, kv_full, kv_index, q_count, q_full, q_index = expected
  np.testing.assert_array_equal(np.asarray(bm.kv_lists.count), kv_count)
  np.testing.assert_array_equal(np.asarray(bm.kv_lists.full_count), kv_full)
  np.testing.assert_array_equal(np.asarray(bm.q_lists.count), q_count)
  np.testing.assert_array_equal(np.asarray(bm.q_lists.full_count), q_full)
  for lists, count in ((bm.kv_lists, kv_count), (bm.q_lists, q_count)):
    # Rows by count, longest first; equal counts in row order.
    longest_first = np.asarray(lists.longest_first)
    assert longest_first.dtype == np.int32
    np.testing.assert_array_equal(longest_first,
                                  np.argsort(-count, axis=-1, kind="stable"))
  hm = kv_count.shape[1]
  got_kv, got_q = np.asarray(bm.kv_lists.index), np.asarray(bm.q_lists.index)
  for b in range(kv_count.shape[0]):
    for h in range(hm):
      for i, want in enumerate(kv_index[b * hm + h]):
        assert list(got_kv[b, h, i, :len(want)]) == want, ("kv_index", b, h, i)
      for j, want in enumerate(q_index[b * hm + h]):
        assert list(got_q[b, h, j, :len(want)]) == want, ("q_index", b, h, j)


BUILD_CASES = [
    # (block, sq, sk, causal, q_lens, kv_lens, mask layout (batch, heads), density)
    ((16, 16), 100, 100, False, None, None, (1, 1), 0.6),
    ((16, 16), 100, 130, True, None, None, (1, 2), 0.8),
    ((32, 64), 150, 90, True, None, None, (1, 1), 1.0),
    ((48, 48), 130, 100, True, (130, 77), (100, 40), (2, 1), 0.7),
    ((64, 64), 200, 200, True, (200, 0), (33, 200), (1, 3), 0.7),
    ((192, 192), 400, 300, True, (400, 250), (300, 170), (2, 2), 0.8),
    ((256, 256), 600, 520, False, (513, 600), (520, 129), (1, 1), 0.9),
    ((128, 256), 300, 700, True, (300, 100), (700, 650), (2, 1), 1.0),
    ((96, 16), 250, 70, True, None, (70, 5), (1, 2), 0.5),
    ((384, 32), 400, 200, False, (1, 399), None, (1, 1), 0.7),
]


@pytest.mark.parametrize(
    "block,sq,sk,causal,q_lens,kv_lens,layout,density", BUILD_CASES,
    ids=[f"blk{c[0][0]}x{c[0][1]}_s{c[1]}x{c[2]}{'_causal' if c[3] else ''}"
         f"{'_ragged' if c[4] or c[5] else ''}" for c in BUILD_CASES])
def test_lists_match_brute_force(seed, block, sq, sk, causal, q_lens, kv_lens,
                                 layout, density):
  nm, nn = math.ceil(sq / block[0]), math.ceil(sk / block[1])
  mask = np.random.default_rng(seed).random((*layout, nm, nn)) < density
  bm = BlockMask.build(jnp.asarray(mask), seq_len_q=sq, seq_len_kv=sk,
                       block_size=block, is_causal=causal,
                       q_seqlens=None if q_lens is None else jnp.asarray(q_lens),
                       kv_seqlens=None if kv_lens is None else jnp.asarray(kv_lens))
  expected = brute_force_lists(mask, block=block, sq=sq, sk=sk, causal=causal,
                               q_lens=q_lens, kv_lens=kv_lens)
  assert bm.tile == (EXPECTED_TILE[block[0]], EXPECTED_TILE[block[1]])
  assert bm.block_size == tuple(block)
  assert (bm.seq_len_q, bm.seq_len_kv, bm.is_causal) == (sq, sk, causal)
  for arr in (bm.kv_lists.count, bm.kv_lists.full_count, bm.kv_lists.index, bm.q_lists.count,
              bm.q_lists.full_count, bm.q_lists.index, bm.q_lens, bm.kv_lens):
    assert arr.dtype == jnp.int32
  _assert_lists(bm, expected)
  # Every slot holds a valid tile number (a kernel never indexes out of range).
  nk, nq = bm.kv_lists.index.shape[-1], bm.q_lists.index.shape[-1]
  for idx, n in ((np.asarray(bm.kv_lists.index), nk), (np.asarray(bm.q_lists.index), nq)):
    assert idx.min() >= 0 and idx.max() < n

  # to_dense() round-trips the lists; density() is the active fraction.
  active = np.zeros(bm.kv_lists.index.shape, bool)
  for b in range(active.shape[0]):
    for h in range(active.shape[1]):
      for i in range(active.shape[2]):
        active[b, h, i, expected[2][b * active.shape[1] + h][i]] = True
  np.testing.assert_array_equal(np.asarray(bm.to_dense()), active)
  np.testing.assert_allclose(float(bm.density()), active.mean(), rtol=1e-6)


@pytest.mark.parametrize("block,tile", [((192, 192), (64, 64)), ((256, 256), (128, 128)),
                                        ((16, 16), (16, 16)), ((48, 48), (16, 16)),
                                        ((64, 128), (64, 128)), ((128, 256), (128, 128)),
                                        ((384, 96), (128, 32))])
def test_tile_choice(block, tile):
  bm = BlockMask.build(None, seq_len_q=1000, seq_len_kv=777, block_size=block)
  assert bm.tile == tile
  assert bm.kv_lists.index.shape[-2:] == (math.ceil(1000 / tile[0]), math.ceil(777 / tile[1]))
  assert bm.q_lists.index.shape[-2:] == (math.ceil(777 / tile[1]), math.ceil(1000 / tile[0]))


def test_build_under_jit_with_traced_mask_and_lengths(seed):
  block, sq, sk = (32, 32), 200, 170
  rng = np.random.default_rng(seed)
  mask = jnp.asarray(rng.random((2, 3, 7, 6)) < 0.6)
  q_lens, kv_lens = jnp.array([200, 123]), jnp.array([99, 170])
  build = lambda m, ql, kl: BlockMask.build(m, seq_len_q=sq, seq_len_kv=sk,
                                            block_size=block, is_causal=True,
                                            q_seqlens=ql, kv_seqlens=kl)
  eager = build(mask, q_lens, kv_lens)
  jitted = jax.jit(build)(mask, q_lens, kv_lens)
  assert isinstance(jitted, BlockMask)
  for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _assert_lists(jitted, brute_force_lists(np.asarray(mask), block=block, sq=sq, sk=sk,
                                          causal=True, q_lens=[200, 123],
                                          kv_lens=[99, 170]))
  # Other traced values through the same compiled function give other lists.
  jf = jax.jit(build)
  jf(mask, q_lens, kv_lens)
  other = jf(~mask, jnp.array([5, 200]), kv_lens)
  assert jf._cache_size() == 1
  _assert_lists(other, brute_force_lists(~np.asarray(mask), block=block, sq=sq, sk=sk,
                                         causal=True, q_lens=[5, 200], kv_lens=[99, 170]))


def test_pytree_flatten_unflatten():
  bm = BlockMask.build(masks.local(5, 4, 1), seq_len_q=150, seq_len_kv=120,
                       block_size=(32, 32), is_causal=True)
  leaves, treedef = jax.tree_util.tree_flatten(bm)
  assert len(leaves) == 10 and all(isinstance(x, jax.Array) for x in leaves)
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  assert isinstance(again, BlockMask)
  assert (again.block_size, again.tile, again.seq_len_q, again.seq_len_kv,
          again.is_causal) == ((32, 32), (32, 32), 150, 120, True)
  for a, b in zip(leaves, jax.tree_util.tree_leaves(again)):
    assert a is b
  # Static fields live in the treedef: a different one gives a different treedef.
  other = BlockMask.build(masks.local(5, 4, 1), seq_len_q=150, seq_len_kv=120,
                          block_size=(32, 32), is_causal=False)
  assert jax.tree_util.tree_structure(other) != treedef
  # Through jit unchanged.
  through = jax.jit(lambda x: x)(bm)
  assert isinstance(through, BlockMask) and through.tile == bm.tile
  np.testing.assert_array_equal(np.asarray(through.kv_lists.index), np.asarray(bm.kv_lists.index))


def test_density_and_to_dense_simple():
  """Dense mask: density 1; empty mask: density 0 and an all-False tile mask."""
  dense = BlockMask.build(None, seq_len_q=256, block_size=(64, 64))
  assert float(dense.density()) == 1.0
  assert np.asarray(dense.to_dense()).all()
  empty = BlockMask.build(jnp.zeros((1, 1, 4, 4), bool), seq_len_q=256,
                          block_size=(64, 64))
  assert float(empty.density()) == 0.0
  assert not np.asarray(empty.to_dense()).any()
  half = BlockMask.build(masks.diagonal(4, 4, (0, 1)), seq_len_q=256,
                         block_size=(64, 64))
  np.testing.assert_allclose(float(half.density()), 7 / 16)


def test_long_sequence_build_never_materializes_s_by_s():
  """S = 65536 at block 128: every array, leaf or intermediate, is far below S x S."""
  s, block = 65536, (128, 128)
  n = s // 128
  mask = masks.local(n, n, 3) | masks.global_local(n, n, 1, 0)
  build = lambda m, ql: BlockMask.build(m, seq_len_q=s, block_size=block,
                                        is_causal=True, q_seqlens=ql)
  q_lens = jnp.array([s, s - 1000])
  jaxpr = jax.make_jaxpr(build)(mask, q_lens)
  sizes = []

  def walk(jx):
    for eqn in jx.eqns:
      sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars
                   if hasattr(v.aval, "shape"))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          sub = getattr(sub, "jaxpr", sub)           # ClosedJaxpr -> Jaxpr
          if hasattr(sub, "eqns"):
            walk(sub)

  walk(jaxpr.jaxpr)
  assert len(sizes) > 10
  assert max(sizes) <= 4 * n * n < s * s // 1000

  start = time.perf_counter()
  bm = jax.block_until_ready(build(mask, q_lens))
  elapsed = time.perf_counter() - start
  largest = max(x.nbytes for x in jax.tree_util.tree_leaves(bm))
  assert largest <= 2 * 4 * n * n        # [B, 1, nQ, nK] int32 lists
  assert largest < s * s // 1000
  assert elapsed < 30.0, f"build took {elapsed:.1f}s"
  # Spot-check against the structure: a local band of 7 tiles, causal halves it.
  counts = np.asarray(bm.kv_lists.count)
  assert counts.shape == (2, 1, n)
  assert counts[0, 0, 0] == 1 and counts[0, 0, 100] == 5   # 4 below + diag + global
