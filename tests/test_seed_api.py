"""The CUDA library Block-Sparse-Attention's API on JAX arrays: the packed
layout, head mask types, streaming, dropout, and its own correctness grid.

`SEED_GRID=full` runs the library's whole grid (14400 cases; the GPU
script); by default a fixed, seeded sample runs in interpret mode.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsattn_jax import (block_sparse_attention, block_sparse_attn_func,
                        block_streaming_attn_func, masks, token_streaming_attn_func)
from bsattn_jax.packed_layout import to_packed, to_padded
from bsattn_jax.reference import attention_reference
from conftest import rel_err
import seed_grid

GRID = (seed_grid.full_grid() if os.environ.get("SEED_GRID") == "full"
        else seed_grid.cpu_sample(6))


@pytest.mark.parametrize("index", range(len(GRID)), ids=[c.id for c in GRID])
def test_library_grid(index):
  seed_grid.run_case(GRID[index], seed=index)


def _packed(key, lens_q, lens_k, heads=4, kv_heads=2, d=32, dtype=jnp.float32):
  keys = jax.random.split(key, 3)
  cu_q = jnp.asarray(np.concatenate([[0], np.cumsum(lens_q)]), jnp.int32)
  cu_k = jnp.asarray(np.concatenate([[0], np.cumsum(lens_k)]), jnp.int32)
  q = jax.random.normal(keys[0], (int(cu_q[-1]), heads, d)).astype(dtype)
  k = jax.random.normal(keys[1], (int(cu_k[-1]), kv_heads, d)).astype(dtype)
  v = jax.random.normal(keys[2], (int(cu_k[-1]), kv_heads, d)).astype(dtype)
  return q, k, v, cu_q, cu_k


def test_packed_equals_padded_per_sequence(key):
  """Each packed sequence gives what the padded call gives for it alone."""
  lens = [150, 77, 200]
  q, k, v, cu, _ = _packed(key, lens, lens)
  out, lse, _ = block_sparse_attn_func(q, k, v, cu, cu, jnp.zeros(4, jnp.int32),
                                       is_causal=True)
  for b, n in enumerate(lens):
    rows = slice(int(cu[b]), int(cu[b + 1]))
    want, want_lse = block_sparse_attention(
        q[None, rows], k[None, rows], v[None, rows], is_causal=True,
        return_lse=True, backend="reference")
    assert rel_err(out[rows], want[0]) < 1e-5
    np.testing.assert_allclose(lse[b, :, :n], want_lse[0], rtol=1e-5)
    assert np.isneginf(np.asarray(lse[b, :, n:])).all()


def test_head_types_mix_in_one_call(key):
  """Dense, two block-sparse (numbered by head order) and block streaming
  heads against the reference with the same token mask."""
  lens_q, lens_k = [300, 190], [260, 300]
  q, k, v, cu_q, cu_k = _packed(key, lens_q, lens_k, heads=4, kv_heads=4)
  base = masks.random(3, 3, 0.5, seed=1, num_heads=2, batch=2)
  types = [1, 0, -1, 1]
  for causal in (False, True):
    out, _, _ = block_sparse_attn_func(
        q, k, v, cu_q, cu_k, jnp.asarray(types, jnp.int32),
        jnp.asarray([0, 0, 0, 0, 1, 1, 0, 0], jnp.int32), base, is_causal=causal)
    seed_grid.LOCAL_BLOCKS, saved = 1, seed_grid.LOCAL_BLOCKS
    try:
      allowed = seed_grid.expected_token_mask(types, np.asarray(base), lens_q,
                                              lens_k, 300, 300, causal)
    finally:
      seed_grid.LOCAL_BLOCKS = saved
    pad = lambda x, cu: to_padded(x, cu, 300)
    ref, _ = attention_reference(pad(q, cu_q), pad(k, cu_k), pad(v, cu_k),
                                 jnp.asarray(allowed))
    assert rel_err(out, to_packed(ref, cu_q, q.shape[0])) < 1e-5


def test_exact_streaming_is_token_exact(key):
  """Sink tokens plus a local token window, bottom-right aligned per
  sequence (the library's `construct_exact_streaming_mask`), beside a dense head."""
  lens_q, lens_k = [200, 90], [230, 250]
  q, k, v, cu_q, cu_k = _packed(key, lens_q, lens_k, heads=2, kv_heads=1)
  sink, local = 5, 40
  info = jnp.asarray([0, 0, sink, local], jnp.int32)
  types = jnp.asarray([0, -1], jnp.int32)
  out, _, probs = token_streaming_attn_func(q, k, v, cu_q, cu_k, types, info,
                                            return_attn_probs=True)
  qi, ki = np.arange(200)[:, None], np.arange(250)[None, :]
  allowed = np.zeros((2, 2, 200, 250), bool)
  for b in range(2):
    real = (qi < lens_q[b]) & (ki < lens_k[b])
    diag = qi + lens_k[b] - lens_q[b]
    allowed[b, 0] = real & (ki <= diag)
    allowed[b, 1] = real & (ki <= diag) & ((ki < sink) | (ki > diag - local))
  ref, _ = attention_reference(to_padded(q, cu_q, 200), to_padded(k, cu_k, 250),
                               to_padded(v, cu_k, 250), jnp.asarray(allowed))
  assert rel_err(out, to_packed(ref, cu_q, q.shape[0])) < 1e-5
  assert probs.shape == (2, 2, 200, 250)
  np.testing.assert_array_equal(np.asarray(probs) > 0, allowed)
  np.testing.assert_allclose(np.asarray(probs).sum(-1)[allowed.any(-1)], 1.0, rtol=1e-5)


def test_block_streaming_function_matches_the_general_one(key):
  q, k, v, cu, _ = _packed(key, [400], [400], heads=2, kv_heads=2)
  types = jnp.asarray([-1, 0], jnp.int32)
  info = jnp.asarray([1, 2, 0, 0], jnp.int32)
  a = block_streaming_attn_func(q, k, v, cu, cu, types, info)[0]
  b = block_sparse_attn_func(q, k, v, cu, cu, types, info, is_causal=True)[0]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_positional_call_as_ported_code_writes_it(key):
  """The library's positional order, with its block dims as keywords."""
  q, k, v, cu, _ = _packed(key, [192, 192], [192, 192], heads=2, kv_heads=2)
  base = jnp.ones((2, 2, 1, 1), bool)
  out, lse, probs = block_sparse_attn_func(
      q, k, v, cu, cu, jnp.ones(2, jnp.int32), None, base, 192, 192, 0.0, False,
      None, False, False, False, m_block_dim=192, n_block_dim=192)
  dense, _, _ = block_sparse_attn_func(q, k, v, cu, cu, jnp.zeros(2, jnp.int32))
  assert probs is None and lse.shape == (2, 2, 192)
  assert rel_err(out, dense) < 1e-6


def test_dropout_is_reproducible_and_matches_the_reference(key):
  q, k, v, cu, _ = _packed(key, [130, 70], [130, 70], heads=2, kv_heads=1)
  types = jnp.zeros(2, jnp.int32)
  rng = jax.random.key(7)
  run = lambda r, backend="auto": block_sparse_attn_func(
      q, k, v, cu, cu, types, p_dropout=0.25, dropout_rng=r, backend=backend)[0]
  first, again = run(rng), run(rng)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  assert rel_err(first, run(rng, "reference")) < 1e-5
  assert rel_err(first, run(jax.random.key(8))) > 0.1


def test_dropout_fraction_is_the_rate():
  from pallas_kernels import dropout as dropout_bits
  seeds = dropout_bits.example_seeds(jax.random.key(3), 2)
  for rate in (0.1, 0.17, 0.5):
    kept = np.asarray(dropout_bits.keep_grid(seeds, 4, 256, 256,
                                             dropout_bits.Dropout(rate)))
    assert abs(1.0 - kept.mean() - rate) < 0.005, (rate, kept.mean())
    # Rows and columns are not correlated: every row drops about `rate`.
    per_row = 1.0 - kept.mean(axis=-1)
    assert np.abs(per_row - rate).max() < 0.15


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_bits_have_no_structure(rate):
  """The per-element hash is light (`dropout.keep`: the row hash XOR the key
  position times a constant, one multiply), so its bits are checked for what
  a dropout mask needs, on 2 examples x 2 heads x 1024 x 1024: neighbours
  along keys (1, 2, 8 and 64 apart), queries and the diagonal are
  uncorrelated; every 2x2 pattern appears as often as independent bits
  give (chi-square, 15 degrees of freedom); row and column counts spread as
  a binomial's; heads and examples differ."""
  from pallas_kernels import dropout as dropout_bits
  seeds = dropout_bits.example_seeds(jax.random.key(11), 2)
  kept = np.asarray(dropout_bits.keep_grid(seeds, 2, 1024, 1024,
                                           dropout_bits.Dropout(rate)), np.float64)
  frac = kept.mean()
  x = kept - frac
  corr = lambda a, b: (a * b).mean() / x.var()
  for shift in (1, 2, 8, 64):
    assert abs(corr(x[..., :-shift], x[..., shift:])) < 0.01, ("keys", shift)
  assert abs(corr(x[..., :-1, :], x[..., 1:, :])) < 0.01
  assert abs(corr(x[..., :-1, :-1], x[..., 1:, 1:])) < 0.01
  assert abs(corr(x[:, 0], x[:, 1])) < 0.01 and abs(corr(x[0], x[1])) < 0.01
  bit = lambda i, j: kept[..., i::2, j::2].astype(int)
  pattern = (bit(0, 0) + 2 * bit(0, 1) + 4 * bit(1, 0) + 8 * bit(1, 1)).ravel()
  counts = np.bincount(pattern, minlength=16)
  expected = pattern.size * np.array(
      [np.prod([frac if (p >> b) & 1 else 1 - frac for b in range(4)])
       for p in range(16)])
  assert ((counts - expected) ** 2 / expected).sum() < 40   # p ~ 5e-4 under H0
  binomial = 1024 * frac * (1 - frac)
  for axis in (-1, -2):
    spread = kept.sum(axis=axis).var() / binomial
    assert 0.8 < spread < 1.2, (axis, spread)


def test_packed_sequences_never_see_each_other(key):
  """Changing one sequence leaves every other sequence's output and gradients
  bit-identical."""
  lens = [100, 140, 60]
  q, k, v, cu, _ = _packed(key, lens, lens, heads=2, kv_heads=1)
  cot = jax.random.normal(jax.random.key(5), q.shape)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(block_sparse_attn_func(
      q, k, v, cu, cu, jnp.asarray([0, -1], jnp.int32),
      jnp.asarray([0, 0, 1, 1], jnp.int32), None, 140, 140, is_causal=True)[0] * cot),
      argnums=(0, 1, 2)))
  before = grad(q, k, v)
  rows = slice(100, 240)   # sequence 1
  changed = [x.at[rows].set(x[rows] * -3.0 + 1.0) for x in (q, k, v)]
  after = grad(*changed)
  for g0, g1 in zip(before, after):
    for keep in (slice(0, 100), slice(240, 300)):
      np.testing.assert_array_equal(np.asarray(g0[keep]), np.asarray(g1[keep]))
  out0 = block_sparse_attn_func(q, k, v, cu, cu, jnp.zeros(2, jnp.int32))[0]
  out1 = block_sparse_attn_func(*changed, cu, cu, jnp.zeros(2, jnp.int32))[0]
  np.testing.assert_array_equal(np.asarray(out0[:100]), np.asarray(out1[:100]))
  np.testing.assert_array_equal(np.asarray(out0[240:]), np.asarray(out1[240:]))


def test_under_jit_max_seqlen_is_required(key):
  q, k, v, cu, _ = _packed(key, [64, 64], [64, 64], heads=2, kv_heads=2)
  types = jnp.zeros(2, jnp.int32)
  with pytest.raises(ValueError, match="max_seqlen_q is required under jit"):
    jax.jit(lambda cu: block_sparse_attn_func(q, k, v, cu, cu, types)[0])(cu)
  out = jax.jit(lambda cu: block_sparse_attn_func(q, k, v, cu, cu, types, None,
                                                  None, 64, 64)[0])(cu)
  assert rel_err(out, block_sparse_attn_func(q, k, v, cu, cu, types)[0]) < 1e-6


# --- Bad input ------------------------------------------------------------------

def _bad(**overrides):
  q, k, v, cu, _ = _packed(jax.random.key(0), [64, 64], [64, 64], heads=3, kv_heads=3)
  args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu,
              head_mask_type=jnp.asarray([0, 1, -1], jnp.int32),
              streaming_info=jnp.asarray([0, 0, 0, 0, 1, 1], jnp.int32),
              base_blockmask=jnp.ones((2, 1, 1, 1), bool))
  args.update(overrides)
  return block_sparse_attn_func(**args)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(cu_seqlens_q=np.asarray([0, 64, 128], np.int64)), TypeError,
     "cu_seqlens_q must be int32"),
    (dict(cu_seqlens_k=jnp.asarray([0, 64, 100, 128], jnp.int32)), ValueError,
     "same length"),
    (dict(cu_seqlens_q=jnp.asarray([0, 70, 64], jnp.int32)), ValueError,
     "non-decreasing"),
    (dict(cu_seqlens_q=jnp.asarray([4, 64, 128], jnp.int32)), ValueError,
     "start at 0"),
    (dict(cu_seqlens_k=jnp.asarray([0, 64, 200], jnp.int32)), ValueError,
     "end at the packed array's length"),
    (dict(max_seqlen_q=32), ValueError, "below the longest"),
    (dict(head_mask_type=jnp.asarray([0, 2, -1], jnp.int32)), ValueError,
     "refers to base_blockmask head"),
    (dict(head_mask_type=jnp.asarray([0, 1, -2], jnp.int32)), ValueError,
     "must be -1"),
    (dict(head_mask_type=jnp.asarray([0, 1], jnp.int32)), ValueError,
     r"shape \[H\]"),
    (dict(base_blockmask=jnp.ones((2, 2, 1, 1), bool)), ValueError,
     "number of block-sparse heads"),
    (dict(base_blockmask=jnp.ones((2, 1, 2, 1), bool)), ValueError,
     "base_blockmask must have shape"),
    (dict(streaming_info=jnp.asarray([0, 0, 1, 1], jnp.int32)), ValueError,
     r"streaming_info must have shape \[2 \* H\]"),
    (dict(streaming_info=None), ValueError, "streaming_info is None"),
    (dict(p_dropout=1.0), ValueError, r"p_dropout must be in \[0, 1\)"),
    (dict(p_dropout=0.1), ValueError, "needs dropout_rng"),
    (dict(m_block_dim=96), ValueError, "m_block_dim must be a positive multiple of 64"),
    (dict(exact_streaming=True), ValueError, "needs is_causal=True"),
])
def test_bad_input_names_the_argument(overrides, error, match):
  with pytest.raises(error, match=match):
    _bad(**overrides)


def test_uniform_packed_batch_runs_as_the_padded_layout(key):
  """Packed sequences that all have the longest length are the padded layout:
  the same kernels (constant lengths) and bit-identical results."""
  q, k, v, cu, _ = _packed(key, [96, 96, 96], [96, 96, 96], heads=2, kv_heads=1)
  out = block_sparse_attn_func(q, k, v, cu, cu, jnp.zeros(2, jnp.int32),
                               is_causal=True)[0]
  pad = lambda x: x.reshape(3, 96, *x.shape[1:])
  want = block_sparse_attention(pad(q), pad(k), pad(v), is_causal=True)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want.reshape(out.shape)))


def test_seed_tutorial_runs_and_its_checks_pass(capsys):
  from examples import seed_tutorial
  assert seed_tutorial.main(["--pattern-tokens", "300", "--repeats", "1"]) == 0
  printed = capsys.readouterr().out
  # Heads per call: 2 on a CPU, ViT-B's 12 on a GPU.
  assert re.search(r"head_mask_type = ones\(\d+\)", printed), printed
  assert "all checks passed" in printed
