"""Forward pass: the kernel (backend="auto") against the fp32 reference.

Each case compares `out` and `lse` with `backend="reference"` on the upcast
inputs, and checks that reference against an attention whose token mask is
built here in numpy from the user block mask (so a BlockMask bug cannot hide by
being shared by kernel and reference). Rows that may see no key must be exactly
0 with lse -inf, and nothing may be NaN: in interpret mode Pallas fills outputs
with NaN before the kernel runs, so an unwritten element shows up.

The cases are a representative cover of every axis (head dim, dtype, block
size, lengths, GQA/MQA, causal, ragged, builders, mask layouts, densities),
not a cartesian product.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsattn_jax import BlockMask, block_sparse_attention
from pallas_kernels.mosaic_gpu.common import targets_hopper
from pallas_kernels.triton import fwd as triton_fwd
from conftest import (Case, assert_lse_close, assert_output_close, case_token_mask,
                      independent_reference, jitted_attention, no_key_rows, random_qkv,
                      rel_err, seqlens, upcast, user_mask)

HEAD_DIMS = (32, 64, 80, 96, 128, 256)
DTYPES = ("float32", "bfloat16", "float16")

# Every head dim with every dtype; other axes rotate underneath.
_HEAD_DIM_DTYPE = [
    Case(d=d, dtype=dt, sq=197, sk=197 if i % 3 else 260, h=2, hkv=1 + i % 2,
         block=(64, 64), causal=i % 2 == 0, mask="random:0.5:1H")
    for i, (d, dt) in enumerate(itertools.product(HEAD_DIMS, DTYPES))
]

# Every block size, each with a different builder / length pair.
_BLOCK_SIZES = [
    Case(block=(16, 16), sq=197, sk=197, d=64, dtype="bfloat16", hkv=1,
         causal=True, mask="local"),
    Case(block=(32, 32), sq=197, sk=577, d=64, mask="strided"),
    Case(block=(64, 64), sq=577, sk=577, d=128, dtype="float16", causal=True,
         mask="global_local"),
    Case(block=(128, 128), sq=577, sk=197, d=64, causal=True, mask="diagonal"),
    Case(b=2, block=(192, 192), sq=577, sk=577, d=96, dtype="bfloat16",
         mask="random:0.5:BH"),
    Case(block=(128, 256), sq=577, sk=577, d=64, mask="causal"),
    Case(block=(256, 256), sq=577, sk=600, d=32, dtype="float16", mask="predicate"),
    Case(block=(64, 128), sq=600, sk=577, d=80, dtype="bfloat16", causal=True,
         mask="dense"),
]

# GQA, MQA and plain multi-head.
_HEADS = [
    Case(b=2, h=4, hkv=2, block=(32, 32), causal=True, q_lens=(197, 120),
         kv_lens=(150, 197)),
    Case(b=2, h=4, hkv=1, d=128, dtype="bfloat16", block=(64, 64),
         mask="random:0.5:BH"),
    Case(h=4, hkv=4, sq=260, sk=197, dtype="float16", block=(128, 128), mask="none"),
]

# Ragged lengths, including empty examples (their rows: 0, lse -inf, no NaN).
_RAGGED = [
    Case(b=2, q_lens=(197, 0), kv_lens=(100, 150), mask="random:0.5:11"),
    Case(b=2, dtype="bfloat16", block=(32, 32), causal=True, q_lens=(50, 197),
         kv_lens=(0, 197)),
    Case(b=2, sq=577, sk=577, block=(128, 128), causal=True, q_lens=(1, 577),
         kv_lens=(577, 1), mask="none"),
    Case(b=2, causal=True, q_lens=(100, 197), mask="local"),
    Case(b=2, block=(16, 16), kv_lens=(60, 197), hkv=1, mask="random:0.5:B1"),
]

# Mask layouts: shared, per head, per batch, per batch and head.
_LAYOUTS = [
    Case(b=2, h=4, hkv=2, mask=f"random:0.5:{layout}", causal=layout == "BH")
    for layout in ("11", "1H", "B1", "BH")
]

# Densities 0, 0.1, 0.5 and 1.
_DENSITIES = [
    Case(b=2, mask="random:0:11", causal=True, q_lens=(197, 90)),
    Case(b=2, block=(32, 32), mask="random:0.1:BH"),
    Case(block=(16, 16), sq=260, sk=197, mask="random:0.5:1H", dtype="float16"),
    Case(mask="random:1:11", sq=197, sk=260),
]

# Empty query-block rows, never-seen key-block columns, an int mask.
_STRUCTURE = [
    Case(mask="empty_rows", block=(32, 32)),
    Case(mask="empty_cols", block=(32, 64), causal=True, dtype="bfloat16"),
    Case(mask="int", block=(16, 32), h=4, hkv=2),
]

# One longer sequence.
_LONG = [
    Case(sq=1025, sk=1025, h=2, hkv=1, d=64, dtype="bfloat16", block=(128, 128),
         causal=True, mask="local"),
]

# Short sequences: fewer rows in the whole batch than one kernel tile, and decode.
_SHORT = [
    Case(sq=40, sk=40, dtype="bfloat16", block=(128, 128), mask="none"),
    Case(sq=577, sk=20, block=(128, 128), causal=True, mask="none"),
    Case(b=2, sq=1, sk=577, h=4, hkv=1, block=(128, 128), causal=True, mask="none"),
]

# Shapes the Mosaic GPU forward takes on a Hopper GPU (fp16/bf16, D 64/128,
# 128x128 mask tiles, lengths that are multiples of 8 or any at D=64, no
# seqlens); elsewhere
# they run the Triton forward like every other case.
_HOPPER_SHAPES = [
    Case(b=2, sq=256, sk=256, h=4, hkv=2, d=128, dtype="bfloat16",
         block=(128, 128), mask="random:0.5:BH"),
    Case(sq=384, sk=256, h=2, hkv=1, d=64, dtype="float16", block=(128, 128),
         causal=True, mask="none"),
    Case(b=2, sq=256, sk=512, d=128, dtype="float16", block=(256, 256),
         causal=True, mask="random:0.7:B1"),
    Case(sq=512, sk=512, h=2, hkv=1, d=64, dtype="bfloat16", block=(128, 128),
         mask="local"),
    Case(sq=256, sk=384, h=4, hkv=4, d=128, dtype="bfloat16", block=(128, 128),
         mask="empty_rows"),
    # lengths ending inside a tile (per-example views: TMA zero-fills the
    # rows past the example's end and drops stores there)
    Case(b=3, sq=200, sk=328, h=2, hkv=1, d=128, dtype="bfloat16",
         block=(128, 128), causal=True, mask="random:0.7:BH"),
    Case(b=2, sq=576, sk=576, h=2, hkv=2, d=64, dtype="float16",
         block=(128, 128), mask="local"),
    Case(b=2, sq=456, sk=136, h=2, hkv=2, d=128, dtype="bfloat16",
         block=(128, 128), causal=True, mask="none"),
    # more items than an H100 has SMs: programs run 2-4 items in turn (the
    # q buffers alternate; at density 0.15 over 8 key tiles about a quarter
    # of the items have no key, mixed with ones that have)
    Case(b=2, sq=2048, sk=1024, h=16, hkv=4, d=64, dtype="bfloat16",
         block=(128, 128), mask="random:0.15:BH"),
    Case(b=2, sq=1024, sk=1024, h=16, hkv=16, d=128, dtype="float16",
         block=(128, 128), causal=True, mask="none"),
    # shorter than one tile (the second warpgroup's rows lie past the end)
    Case(b=2, sq=64, sk=64, h=4, hkv=2, d=64, dtype="bfloat16",
         block=(128, 128), causal=True, mask="none"),
    Case(b=3, sq=136, sk=40, h=2, hkv=1, d=128, dtype="float16",
         block=(128, 128), mask="random:0.7:BH"),
    # D=64, lengths that are not multiples of 8 (TMA copies through
    # row-major aliases, `common.row_major_copies`): ViT-B's 197 tokens;
    # causal cross lengths with a sparse mask per example and head
    Case(b=3, sq=197, sk=197, h=12, hkv=12, d=64, dtype="bfloat16",
         block=(128, 128), mask="none"),
    Case(b=2, sq=1025, sk=577, h=4, hkv=2, d=64, dtype="float16",
         block=(128, 128), causal=True, mask="random:0.7:BH"),
]

FORWARD_CASES = (_HEAD_DIM_DTYPE + _BLOCK_SIZES + _HEADS + _RAGGED + _LAYOUTS
                 + _DENSITIES + _STRUCTURE + _LONG + _SHORT + _HOPPER_SHAPES)


def _check_against_reference(case: Case, q, k, v, mask, out, lse):
  q_lens, kv_lens = seqlens(case)
  reference = jitted_attention(block_size=case.block, is_causal=case.causal,
                               return_lse=True, backend="reference")
  ref_out, ref_lse = reference(*upcast(q, k, v), mask, q_lens, kv_lens)
  allowed = case_token_mask(case, mask)
  ind_out, ind_lse = independent_reference(q, k, v, allowed)
  # The library's reference agrees with one that never touches BlockMask.
  assert rel_err(ref_out, ind_out) < 1e-6
  assert_lse_close(ref_lse, ind_lse, 1e-6)

  assert out.shape == q.shape and out.dtype == q.dtype
  assert lse.shape == (case.b, case.h, case.sq) and lse.dtype == jnp.float32
  assert_output_close(out, lse, ref_out, ref_lse, case.dtype)
  out_np = np.asarray(out.astype(jnp.float32))

  # Rows that may see no key (empty mask rows, causal, padding): exactly 0, -inf.
  empty = no_key_rows(allowed, case.b, case.h)
  rows = out_np.transpose(0, 2, 1, 3)[empty]
  assert np.all(rows == 0.0), "rows with no visible key must be exactly 0"
  assert np.all(np.isneginf(np.asarray(lse)[empty]))
  assert np.all(np.isfinite(np.asarray(lse)[~empty]))


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: c.id)
def test_forward_matches_reference(case, seed, key):
  q, k, v = random_qkv(key, case)
  mask = user_mask(case, seed)
  q_lens, kv_lens = seqlens(case)
  attention = jitted_attention(block_size=case.block, is_causal=case.causal,
                               return_lse=True)
  out, lse = attention(q, k, v, mask, q_lens, kv_lens)
  _check_against_reference(case, q, k, v, mask, out, lse)


@pytest.mark.skipif(not targets_hopper(),
                    reason="the Mosaic GPU forward runs only on a Hopper GPU; "
                    "tests/test_cuda_lowering.py checks its dispatch on any machine")
@pytest.mark.parametrize("case", _HOPPER_SHAPES, ids=lambda c: c.id)
def test_hopper_shapes_run_the_mosaic_forward(case, seed):
  """On Hopper the cases above really ran the Mosaic GPU kernel."""
  q, k, v = random_qkv(jax.random.key(0), case)
  attention = jitted_attention(block_size=case.block, is_causal=case.causal)
  text = attention.lower(q, k, v, user_mask(case, seed), None, None).as_text()
  assert "mosaic_gpu" in text and "xla.gpu.triton" not in text


# Shapes the Mosaic GPU forward at 64x64 mask tiles (`fwd_block64`) takes on a
# Hopper GPU (fp16/bf16, D 64/128, lengths >= 128 and multiples of 8, no
# seqlens; 64-multiple blocks that are not 128-multiples); elsewhere they run
# the Triton forward, and so does D=64 unless routed here
# (`fwd_block64.ROUTED_HEAD_DIMS`, the `block64_forward_at_d64` fixture).
# Each item is two 64-row mask tiles, one per compute warpgroup: lists of
# different lengths, one row empty and the other not (empty_rows: every
# other row), rows sharing their tiles (causal, bands).
_HOPPER_BLOCK64_SHAPES = [
    Case(b=2, sq=512, sk=512, h=4, hkv=2, d=128, dtype="bfloat16",
         block=(64, 64), mask="random:0.3:BH"),
    Case(sq=384, sk=320, h=2, hkv=1, d=64, dtype="float16", block=(64, 64),
         causal=True, mask="none"),
    # lengths ending inside a tile (the last tile reads into the next example)
    Case(b=3, sq=200, sk=328, h=2, hkv=1, d=128, dtype="bfloat16",
         block=(64, 64), causal=True, mask="random:0.7:BH"),
    # an odd number of 64-row tiles: the last item has one row
    Case(b=2, sq=320, sk=576, h=2, hkv=2, d=64, dtype="float16",
         block=(64, 64), mask="local"),
    Case(sq=256, sk=384, h=4, hkv=4, d=128, dtype="bfloat16", block=(64, 64),
         mask="empty_rows"),
    Case(b=2, sq=576, sk=576, h=2, hkv=1, d=64, dtype="bfloat16",
         block=(192, 192), mask="random:0.5:BH"),
    # more items than an H100 has SMs; per-head random lists at density 0.1
    Case(b=2, sq=2048, sk=1024, h=16, hkv=4, d=64, dtype="bfloat16",
         block=(64, 64), mask="random:0.1:BH"),
    Case(b=2, sq=1024, sk=1024, h=16, hkv=16, d=128, dtype="float16",
         block=(64, 64), causal=True, mask="none"),
]


@pytest.mark.parametrize("case", _HOPPER_BLOCK64_SHAPES, ids=lambda c: c.id)
def test_hopper_block64_shapes_match_reference(case, seed, key,
                                               block64_forward_at_d64):
  q, k, v = random_qkv(key, case)
  mask = user_mask(case, seed)
  attention = jitted_attention(block_size=case.block, is_causal=case.causal,
                               return_lse=True)
  out, lse = attention(q, k, v, mask, None, None)
  _check_against_reference(case, q, k, v, mask, out, lse)


@pytest.mark.skipif(not targets_hopper(),
                    reason="the Mosaic GPU forward runs only on a Hopper GPU; "
                    "tests/test_cuda_lowering.py checks its dispatch on any machine")
@pytest.mark.parametrize("case", _HOPPER_BLOCK64_SHAPES, ids=lambda c: c.id)
def test_hopper_block64_shapes_run_the_mosaic_forward(case, seed,
                                                     block64_forward_at_d64):
  """On Hopper the 64x64-tile cases above really ran a Mosaic GPU kernel
  (at D=64 too, routed there by the fixture)."""
  q, k, v = random_qkv(jax.random.key(0), case)
  attention = jitted_attention(block_size=case.block, is_causal=case.causal)
  text = attention.lower(q, k, v, user_mask(case, seed), None, None).as_text()
  assert "mosaic_gpu" in text and "xla.gpu.triton" not in text


# Dropout on shapes the Mosaic GPU forward takes on a Hopper GPU (dense with
# GQA, causal, sparse per example and head with lengths ending inside a tile;
# at 128x128 and at 64x64 mask tiles); elsewhere the Triton forward runs them.
_DROPOUT_CASES = ([_HOPPER_SHAPES[i] for i in (0, 1, 5)]
                  + [_HOPPER_BLOCK64_SHAPES[i] for i in (0, 2)])


@functools.lru_cache(maxsize=None)
def _jitted_dropout(backend: str, **static):
  """jit of `block_sparse_attention` with dropout: (q, k, v, mask, rng)."""
  def attention(q, k, v, mask, rng):
    return block_sparse_attention(q, k, v, mask, dropout_rng=rng,
                                  return_lse=True, backend=backend, **static)
  return jax.jit(attention)


@pytest.mark.parametrize("rate", [0.1, 0.5])
@pytest.mark.parametrize("case", _DROPOUT_CASES, ids=lambda c: c.id)
def test_dropout_matches_reference(case, rate, seed):
  """The forward with dropout keeps the reference's elements (same key, same
  bits; the lse is the one before dropout), gives the same output for the
  same key and another for another key. On Hopper these shapes run the
  Mosaic GPU forward (checked there), so this is its compiled numerics."""
  q, k, v = random_qkv(jax.random.key(0), case)
  mask = user_mask(case, seed)
  static = dict(block_size=case.block, is_causal=case.causal, dropout_rate=rate)
  run = _jitted_dropout("auto", **static)
  reference = _jitted_dropout("reference", **static)
  rng = jax.random.key(5)
  out, lse = run(q, k, v, mask, rng)
  ref_out, ref_lse = reference(*upcast(q, k, v), mask, rng)
  assert_output_close(out, lse, ref_out, ref_lse, case.dtype)
  np.testing.assert_array_equal(np.asarray(run(q, k, v, mask, rng)[0]),
                                np.asarray(out))
  other = reference(*upcast(q, k, v), mask, jax.random.key(6))[0]
  assert rel_err(out, other) > 0.1
  if targets_hopper():
    text = run.lower(q, k, v, mask, rng).as_text()
    assert "mosaic_gpu" in text and text.count("xla.gpu.triton") == 0


def test_zero_length_example(key):
  """An example with q length 0 gives all-zero rows and lse -inf, no NaN."""
  case = Case(b=2, h=2, hkv=1, q_lens=(0, 150), kv_lens=(197, 0), mask="none")
  q, k, v = random_qkv(key, case)
  out, lse = block_sparse_attention(q, k, v, block_size=case.block,
                                    q_seqlens=jnp.array(case.q_lens),
                                    kv_seqlens=jnp.array(case.kv_lens),
                                    return_lse=True)
  # Example 0 has no queries, example 1 no keys: everything is empty.
  assert np.all(np.asarray(out) == 0.0)
  assert np.all(np.isneginf(np.asarray(lse)))


@pytest.mark.parametrize("causal", [False, True])
def test_all_zero_mask_is_exactly_zero(key, causal):
  """Density 0: no tile runs, every output is exactly 0 and every lse -inf."""
  case = Case(b=2, h=4, hkv=2, sq=197, sk=260, block=(32, 64), causal=causal)
  q, k, v = random_qkv(key, case)
  mask = jnp.zeros((2, 4) + case.num_blocks, jnp.bool_)
  out, lse = block_sparse_attention(q, k, v, mask, block_size=case.block,
                                    is_causal=causal, return_lse=True)
  assert out.shape == q.shape
  assert np.all(np.asarray(out) == 0.0)
  assert np.all(np.isneginf(np.asarray(lse)))


@pytest.mark.parametrize("causal", [False, True])
def test_all_ones_mask_is_dense_attention(key, causal):
  """All-ones mask == mask=None (bit-identical) == jax.nn.dot_product_attention."""
  sk = 197 if causal else 260   # jax.nn's causal mask is top-left aligned
  case = Case(h=4, hkv=2, sq=197, sk=sk, block=(64, 64), causal=causal)
  q, k, v = random_qkv(key, case)
  ones = jnp.ones((1, 1) + case.num_blocks, jnp.bool_)
  attention = jitted_attention(block_size=case.block, is_causal=causal)
  out_ones = attention(q, k, v, ones, None, None)
  out_none = attention(q, k, v, None, None, None)
  np.testing.assert_array_equal(np.asarray(out_ones), np.asarray(out_none))
  with jax.default_matmul_precision("highest"):
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                            implementation="xla")
  err = rel_err(out_ones, expected)
  assert err < 1e-5, err


def test_softmax_scale_is_used(key):
  """A non-default softmax_scale changes the result and matches the reference."""
  case = Case(h=2, hkv=1, block=(32, 32), causal=True)
  q, k, v = random_qkv(key, case)
  kw = dict(block_size=case.block, is_causal=True)
  out = jitted_attention(softmax_scale=0.31, **kw)(q, k, v, None, None, None)
  ref = jitted_attention(softmax_scale=0.31, backend="reference", **kw)(
      q, k, v, None, None, None)
  default = jitted_attention(**kw)(q, k, v, None, None, None)
  assert rel_err(out, ref) < 1e-5
  assert rel_err(out, default) > 1e-2


@pytest.mark.parametrize("fill", ["nan", "large"])
def test_padded_tokens_are_never_read(key, fill):
  """Poisoned padding (beyond q_seqlens / kv_seqlens) changes nothing real.

  Real rows are bit-identical to a run with clean padding, padded query rows are
  exactly 0 (lse -inf), and no NaN appears anywhere in out or lse.
  """
  case = Case(b=2, h=4, hkv=2, sq=197, sk=197, block=(64, 64), causal=True,
              q_lens=(150, 197), kv_lens=(120, 70), mask="random:0.7:BH")
  q, k, v = random_qkv(key, case)
  q_lens, kv_lens = seqlens(case)
  bad = jnp.nan if fill == "nan" else 3e4
  q_pad = np.arange(case.sq)[None, :, None, None] >= np.asarray(case.q_lens)[:, None, None, None]
  kv_pad = np.arange(case.sk)[None, :, None, None] >= np.asarray(case.kv_lens)[:, None, None, None]
  qp = jnp.where(q_pad, jnp.asarray(bad, q.dtype), q)
  kp = jnp.where(kv_pad, jnp.asarray(bad, k.dtype), k)
  vp = jnp.where(kv_pad, jnp.asarray(bad, v.dtype), v)
  mask = user_mask(case, 7)
  attention = jitted_attention(block_size=case.block, is_causal=True, return_lse=True)
  out, lse = attention(q, k, v, mask, q_lens, kv_lens)
  out_p, lse_p = attention(qp, kp, vp, mask, q_lens, kv_lens)
  out_p, lse_p = np.asarray(out_p), np.asarray(lse_p)
  assert not np.isnan(out_p).any() and not np.isnan(lse_p).any()
  np.testing.assert_array_equal(out_p, np.asarray(out))
  np.testing.assert_array_equal(lse_p, np.asarray(lse))
  q_pad_rows = q_pad[:, :, 0, 0]                            # [B, Sq]
  assert np.all(out_p[q_pad_rows] == 0.0)
  assert np.all(np.isneginf(lse_p.transpose(0, 2, 1)[q_pad_rows]))
  _check_against_reference(case, q, k, v, mask, jnp.asarray(out_p), jnp.asarray(lse_p))


def test_jit_with_traced_mask_array(seed, key):
  """The raw mask and the lengths may be traced jit arguments."""
  case = Case(b=2, h=4, hkv=2, block=(32, 32), causal=True, q_lens=(197, 101),
              kv_lens=(160, 197), mask="random:0.4:BH")
  q, k, v = random_qkv(key, case)
  mask = user_mask(case, seed)
  q_lens, kv_lens = seqlens(case)

  @jax.jit
  def f(q, k, v, mask, q_lens, kv_lens):
    return block_sparse_attention(q, k, v, mask, block_size=(32, 32), is_causal=True,
                                  q_seqlens=q_lens, kv_seqlens=kv_lens,
                                  return_lse=True)

  out, lse = f(q, k, v, mask, q_lens, kv_lens)
  _check_against_reference(case, q, k, v, mask, out, lse)
  # A second mask through the same compiled function gives a different answer.
  other = jnp.logical_not(mask)
  out2, _ = f(q, k, v, other, q_lens, kv_lens)
  assert f._cache_size() == 1
  reference = jitted_attention(block_size=(32, 32), is_causal=True,
                               backend="reference")
  assert rel_err(out2, reference(q, k, v, other, q_lens, kv_lens)) < 1e-5


def test_jit_with_prebuilt_block_mask(seed, key):
  """A BlockMask built outside jit passes through jit as a pytree argument."""
  case = Case(b=2, h=4, hkv=1, block=(192, 192), sq=400, sk=400, causal=True,
              q_lens=(400, 333), kv_lens=(380, 400), mask="random:0.6:1H")
  q, k, v = random_qkv(key, case)
  mask = user_mask(case, seed)
  q_lens, kv_lens = seqlens(case)
  bm = BlockMask.build(mask, seq_len_q=case.sq, seq_len_kv=case.sk,
                       block_size=case.block, is_causal=True, q_seqlens=q_lens,
                       kv_seqlens=kv_lens)
  f = jax.jit(lambda q, k, v, bm: block_sparse_attention(q, k, v, bm, is_causal=True,
                                                          return_lse=True))
  out, lse = f(q, k, v, bm)
  _check_against_reference(case, q, k, v, mask, out, lse)
  # Built inside jit from traced inputs: the same answer, bit for bit.
  g = jax.jit(lambda q, k, v, mask, ql, kl: block_sparse_attention(
      q, k, v, BlockMask.build(mask, seq_len_q=case.sq, block_size=case.block,
                               is_causal=True, q_seqlens=ql, kv_seqlens=kl),
      is_causal=True))
  np.testing.assert_array_equal(np.asarray(g(q, k, v, mask, q_lens, kv_lens)),
                                np.asarray(out))


def test_jit_with_constant_seqlens(seed, key):
  """Concrete lengths closed over inside a jitted function (a common pattern) work."""
  case = Case(b=2, h=2, hkv=1, block=(64, 64), causal=True, q_lens=(197, 64),
              kv_lens=(120, 197), mask="random:0.6:11")
  q, k, v = random_qkv(key, case)
  mask = user_mask(case, seed)
  q_lens, kv_lens = seqlens(case)
  f = jax.jit(lambda q, k, v: block_sparse_attention(
      q, k, v, mask, block_size=case.block, is_causal=True, q_seqlens=q_lens,
      kv_seqlens=kv_lens, return_lse=True))
  out, lse = f(q, k, v)
  _check_against_reference(case, q, k, v, mask, out, lse)


@pytest.mark.parametrize("kv_len, block_kv, expected", [
    (197, 64, (192, 16)),      # ViT-B: 5 keys in the last tile
    (600, 64, (576, 32)),
    (20, 64, (0, 32)),         # shorter than one tile
    (250, 64, None),           # 58 keys: a 64-wide step is no wider than needed
    (256, 64, None),           # no tail
    (None, 64, None),          # length differs per example
])
def test_narrow_tail_width(kv_len, block_kv, expected):
  tail = triton_fwd.narrow_tail(kv_len, block_kv)
  assert (None if tail is None else tuple(tail)) == expected
