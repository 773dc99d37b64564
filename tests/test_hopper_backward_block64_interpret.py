"""The Mosaic GPU backward at 64x64 mask tiles (`mosaic_gpu.bwd` with `mask_tile=64`) in Mosaic GPU's interpreter on the CPU.

There each compute warpgroup's 64 rows are one mask row (dQ) or column
(dK/dV) with a list and a ring of 64-row tiles of their own, so the cases put
an item's two lists in every combination, as the 64x64 forward's tests do
(`test_hopper_block64_interpret.py`, whose cases and inputs these reuse):
one list empty and the other not, both empty (items with no step, also
several in a row), lists of different lengths (random per-head masks, GQA),
an odd number of mask rows or columns (the last item's second warpgroup
has none), lengths ending inside a tile or shorter than an item, causal
diagonals and token predicates on partial tiles, dropout, and a loss on the
lse. The gradients are checked against autodiff of the fp32 reference, fed
the reference's o and lse (so no forward kernel is involved); a deadlock is
caught by the watchdog, unwritten output reads as NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsattn_jax.block_mask import BlockMask
from bsattn_jax.reference import block_sparse_reference
from pallas_kernels import registry
from pallas_kernels.mosaic_gpu import bwd as mosaic_bwd
from conftest import padded_dropout_call, rel_err, tol_for
from test_hopper_block64_interpret import (CASES, TILE, Block64Case, _flat,
                                           _inputs)

BACKWARD_CASES = [
  # One row with keys and the other without, then the other way round, then
  # both (dQ); the transposed lists of the same mask for dK/dV.
  CASES[0],
  # Programs whose first items have no step.
  CASES[2],
  # An odd number of mask rows (5) and of mask columns (7).
  CASES[12],
  # Per-head random lists of different lengths, GQA.
  CASES[4],
  # Sparse, D=128: many lists empty next to lists that are not.
  CASES[6],
  # Causal: lengths ending inside a tile, per-head random blocks.
  CASES[9],
  # Causal with 3 key columns (odd) under 8 query rows, D=128.
  CASES[10],
  # Shorter than an item on both sides: one 64-row mask row, keys ending
  # inside their only tile.
  Block64Case(2, 3, 64, 40, 2, 1, 128, "float16", causal=True),
  # Token predicates on partial tiles on both sides of full ones.
  CASES[16],
  Block64Case(3, 2, 197, 197, 2, 2, 64, "bfloat16", mask="local:1"),
]


def _cotangent(case: Block64Case):
  return jax.random.normal(jax.random.key(3), (case.b, case.sq, case.h, case.d),
                           jnp.float32).astype(case.dtype)


def _reference_forward(q, k, v, mask, **dropout):
  """The reference's o (in q's dtype) and lse `[H, B * Sq]`, flat, as the
  kernels' forwards return them."""
  out, lse = block_sparse_reference(*(x.astype(jnp.float32) for x in (q, k, v)),
                                    mask, **dropout)
  return (_flat(out.astype(q.dtype)),
          lse.transpose(1, 0, 2).reshape(lse.shape[1], -1))


def _check_grads(case, grads, refs, q, k, v):
  for name, grad, ref, x in zip(("dq", "dk", "dv"), grads, refs, (q, k, v)):
    grad = grad.reshape(x.shape)
    assert grad.dtype == x.dtype, name
    assert not np.isnan(np.asarray(grad, np.float32)).any(), f"{name} has NaN"
    assert rel_err(grad, ref) < tol_for(case.dtype), name


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: c.id)
def test_interpreted_block64_backward_matches_reference(case, deadlock_watchdog):
  """dQ, dK, dV against autodiff of the fp32 reference; keys no query sees
  get exactly 0."""
  q, k, v, mask = _inputs(case)
  do = _cotangent(case)
  o, lse = _reference_forward(q, k, v, mask)
  grads = mosaic_bwd.backward(
      _flat(q), _flat(k), _flat(v), o, lse, _flat(do), None, mask.kv_lists,
      mask.q_lists, softmax_scale=case.d ** -0.5, rule=mask.element_rule,
      q_len=case.sq, kv_len=case.sk, num_programs=case.programs,
      mask_tile=TILE, interpret=True)
  upcast = lambda x: x.astype(jnp.float32)
  _, vjp = jax.vjp(lambda q, k, v: block_sparse_reference(q, k, v, mask)[0],
                   upcast(q), upcast(k), upcast(v))
  refs = vjp(upcast(do))
  _check_grads(case, grads, refs, q, k, v)
  unseen = np.all(np.asarray(refs[2]) == 0.0, axis=-1)  # [B, Sk, Hkv]
  dv = np.asarray(upcast(grads[2].reshape(v.shape)))
  assert np.all(dv[unseen] == 0.0), "dv of keys no query sees"


def _has_one_sided_items(lists) -> bool:
  """Whether some item's two lists (rows 2i, 2i + 1) are one empty, one not."""
  active = np.asarray(lists.count) > 0              # [Bm, Hm, rows]
  even = active[..., : active.shape[-1] // 2 * 2]
  pairs = even.reshape(*even.shape[:-1], -1, 2)
  return bool(np.any(pairs[..., 0] != pairs[..., 1]))


def test_the_cases_have_lists_of_one_warpgroup_only():
  """For dQ and for dK/dV, some case has an item whose warpgroups have one
  list empty and the other not; an odd number of mask rows and columns
  occurs."""
  built = [_inputs(case)[3] for case in BACKWARD_CASES]
  assert any(_has_one_sided_items(mask.kv_lists) for mask in built)
  assert any(_has_one_sided_items(mask.q_lists) for mask in built)
  mask = _inputs(CASES[12])[3]
  assert np.asarray(mask.kv_lists.count).shape[2] % 2 == 1
  assert np.asarray(mask.q_lists.count).shape[2] % 2 == 1


DROPOUT_CASES = [
  Block64Case(2, 2, 384, 384, 4, 2, 64, "bfloat16", mask="random:0.5:BH",
              dropout=0.1),
  Block64Case(3, 2, 456, 328, 2, 1, 128, "float16", causal=True,
              mask="random:0.6:BH", dropout=0.5),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: c.id)
def test_interpreted_block64_backward_dropout_and_lse_cotangent(
    case, deadlock_watchdog, monkeypatch):
  """Through the registry's entry (seeds from seq_info's SEED column), with
  dropout and a loss on the lse too: the reference's gradients with the
  same keep bits, which other seeds would not give."""
  q, k, v, mask = _inputs(case)
  do = _cotangent(case)
  dlse = 3.0 * jax.random.normal(jax.random.key(5), (case.b, case.h, case.sq))
  seeds, info, call = padded_dropout_call(case, mask, "pallas")
  drop = dict(dropout_rate=case.dropout, dropout_seeds=seeds)
  o, lse = _reference_forward(q, k, v, mask, **drop)
  monkeypatch.setattr(mosaic_bwd, "backward", _interpreted(case))
  flat_dlse = dlse.transpose(1, 0, 2).reshape(case.h, case.b * case.sq)
  grads = registry._mosaic_backward(
      _flat(q), _flat(k), _flat(v), o, lse, _flat(do), flat_dlse, info,
      mask.kv_lists, mask.q_lists, call=call, softmax_scale=case.d ** -0.5)
  upcast = lambda x: x.astype(jnp.float32)

  def reference_grads(seeds):
    _, vjp = jax.vjp(lambda q, k, v: block_sparse_reference(
        q, k, v, mask, dropout_rate=case.dropout, dropout_seeds=seeds),
                     upcast(q), upcast(k), upcast(v))
    return vjp((upcast(do), dlse))

  _check_grads(case, grads, reference_grads(seeds), q, k, v)
  other = reference_grads(seeds + 1)
  assert rel_err(grads[2].reshape(v.shape), other[2]) > 0.1


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_triton_forward_feeds_the_64_tile_backward_on_saturated_rows(
    dtype, deadlock_watchdog):
  """D=64 at 64x64 tiles on Hopper runs the Triton forward (faster there,
  `fwd_block64.ROUTED_HEAD_DIMS`) and this backward: on rows whose softmax
  is one-hot (each query a copy of one key, logits ~1e4) the forward's o is
  exactly that V row and dq, dk hold only fp32 rounding, as
  `test_saturated_softmax_has_no_gradient_in_q_and_k` asks of the
  compiled pair (both interpreted here)."""
  b, s, h, d = 1, 128, 2, 64
  keys = jax.random.split(jax.random.key(1), 4)
  k = (jax.random.normal(keys[0], (b, s, h, d)) * 30).astype(dtype)
  pick = jax.random.permutation(keys[1], s)
  q = k[:, pick]
  v = jax.random.normal(keys[2], (b, s, h, d)).astype(dtype)
  do = jax.random.normal(keys[3], (b, s, h, d)).astype(dtype)
  mask = BlockMask.build(None, seq_len_q=s, block_size=(TILE, TILE))
  case = Block64Case(1, b, s, s, h, h, d, jnp.dtype(dtype).name)
  _, info, call = padded_dropout_call(case, mask, "interpret")   # Triton
  o, lse = registry.forward(_flat(q), _flat(k), _flat(v), info, mask.kv_lists,
                            call=call, softmax_scale=d ** -0.5)
  f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  np.testing.assert_array_equal(f64(o).reshape(q.shape), f64(v[:, pick]))
  dq, dk, _ = mosaic_bwd.backward(
      _flat(q), _flat(k), _flat(v), o, lse, _flat(do), None, mask.kv_lists,
      mask.q_lists, softmax_scale=d ** -0.5, rule=mask.element_rule,
      q_len=s, kv_len=s, mask_tile=TILE, interpret=True)
  unit = (np.linalg.norm(f64(do), axis=-1).max() * np.linalg.norm(f64(v), axis=-1).max()
          * np.linalg.norm(f64(k), axis=-1).max() / np.sqrt(d))
  for grad in (dq, dk):
    assert np.linalg.norm(f64(grad), axis=-1).max() < 1e-6 * unit


def _interpreted(case):
  """`mosaic_bwd.backward` in the interpreter with the case's programs."""
  backward = mosaic_bwd.backward

  def run(*args, **kw):
    return backward(*args, **kw, num_programs=case.programs, interpret=True)
  return run


def test_backward_checks_its_lists():
  """Lists at another tile than `mask_tile` are refused by name."""
  x = jnp.zeros((256, 1, 64), jnp.bfloat16)
  lse = jnp.zeros((1, 256), jnp.float32)
  mask = BlockMask.build(None, seq_len_q=256, block_size=(64, 64))
  mask128 = BlockMask.build(None, seq_len_q=256)
  kw = dict(softmax_scale=0.125, rule=mask.element_rule, q_len=256, kv_len=256,
            interpret=True)
  with pytest.raises(ValueError, match="do not match 128x128 tiles"):
    mosaic_bwd.backward(x, x, x, x, lse, x, None, mask.kv_lists, mask.q_lists,
                        **kw)
  with pytest.raises(ValueError, match="do not match 64x64 tiles"):
    mosaic_bwd.backward(x, x, x, x, lse, x, None, mask128.kv_lists,
                        mask128.q_lists, mask_tile=64, **kw)
  with pytest.raises(ValueError, match="mask tile"):
    mosaic_bwd.backward(x, x, x, x, lse, x, None, mask.kv_lists, mask.q_lists,
                        mask_tile=32, **kw)


@pytest.mark.parametrize("mask_tile,reason", [
    ((64, 64), None), ((128, 128), None), ((64, 128), "mask tile (64, 128)"),
    ((32, 32), "mask tile (32, 32)")])
def test_scope_takes_both_mask_tiles(mask_tile, reason):
  got = mosaic_bwd.unsupported(jnp.bfloat16, 64, mask_tile, 197, 197)
  assert got == reason if reason is None else reason in got
