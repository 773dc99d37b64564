"""The Mosaic GPU kernels (`pallas_kernels.mosaic_gpu`: forward, dK/dV, dQ) in Mosaic GPU's interpreter on the CPU.

The interpreter runs each warpgroup as a thread, with the kernel's barriers,
TMA copies and persistent item loop as on the GPU (its P @ V product is a
plain dot, see `mosaic_gpu.fwd.forward`), so these tests check the schedule
and the synchronization: few programs running many items each, items with
and without keys in every order, tail tiles, GQA, causal longest-first, token
predicates (`mask_fn`) on partial tiles, attention dropout in the forward
and the backward (the same keep bits as the reference and the Triton
forward). Lengths that are not
multiples of 128 (or shorter than a tile) run on both kernels through TMA's
out-of-bounds handling, which the interpreter models as the GPU does (reads
past a box's array zero-filled, stores there dropped); that Mosaic GPU also
lowers those copies, and refuses lengths that are not multiples of 8 at
D=128 (at D=64 the copies go row-major, `common.row_major_copies`), is
checked by tests/test_cuda_lowering.py. A
deadlock would hang the interpreter: each kernel test runs under a watchdog
that prints every thread's stack and ends the run instead. Unwritten output reads
as NaN (the interpreter's uninitialized memory). The compiled kernel's
numerics are checked on a Hopper GPU (test_forward, the benchmark suite).
"""

import dataclasses
import functools
from unittest import mock

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from bsattn_jax import masks
from bsattn_jax.block_mask import BlockMask
from bsattn_jax.reference import block_sparse_reference
from pallas_kernels import dropout as dropout_bits
from pallas_kernels import registry
from pallas_kernels import seq_info as si
from pallas_kernels.mosaic_gpu import bwd as mosaic_bwd
from pallas_kernels.mosaic_gpu import fwd as mosaic_fwd
from pallas_kernels.mosaic_gpu.common import (Schedule, persistent_schedule,
                                              targets_hopper)
from conftest import (assert_lse_close, assert_output_close,
                      padded_dropout_call, rel_err, tol_for)


@dataclasses.dataclass(frozen=True)
class HopperCase:
  programs: int
  b: int
  sq: int
  sk: int
  h: int
  hkv: int
  d: int
  dtype: str
  causal: bool = False
  # "none" | "random:<density>:<B|1><H|1>" | "local" | "rows:<0/1 per q tile>"
  # | "cols:<0/1 per key tile>"
  mask: str = "none"
  mask_fn: object = None   # a token predicate (lists per example and head)
  dropout: float = 0.0     # attention dropout rate

  @property
  def id(self) -> str:
    return (f"p{self.programs}_b{self.b}_s{self.sq}x{self.sk}_h{self.h}kv{self.hkv}"
            f"_d{self.d}_{self.dtype}_{self.mask}{'_causal' if self.causal else ''}"
            f"{'_' + (getattr(self.mask_fn, '__name__', None) or repr(self.mask_fn)) if self.mask_fn else ''}"
            f"{f'_drop{self.dropout}' if self.dropout else ''}")

  def user_mask(self):
    n_q, n_k = -(-self.sq // 128), -(-self.sk // 128)
    if self.mask == "none":
      return None
    if self.mask == "local":
      return masks.local(n_q, n_k, 1)
    kind, *args = self.mask.split(":")
    if kind == "rows":              # query tile i sees every key iff args[0][i] == "1"
      rows = np.array([c == "1" for c in args[0]])
      return jnp.asarray(np.repeat(rows[:, None], n_k, axis=1)[None, None])
    if kind == "cols":              # every query sees key tile j iff args[0][j] == "1"
      cols = np.array([c == "1" for c in args[0]])
      return jnp.asarray(np.repeat(cols[None, :], n_q, axis=0)[None, None])
    density, layout = args
    return masks.random(n_q, n_k, float(density), seed=7,
                        batch=self.b if layout[0] == "B" else 1,
                        num_heads=self.h if layout[1] == "H" else 1)


def _head_window(b, h, q_idx, kv_idx):
  """Head h sees keys within 64 * (h + 1) tokens."""
  return jnp.abs(q_idx - kv_idx) < 64 * (h + 1)


def _example_chunks(b, h, q_idx, kv_idx):
  """Example b attends within chunks of 96 + 64 * b tokens."""
  chunk = 96 + 64 * b
  return jax.lax.div(q_idx, chunk) == jax.lax.div(kv_idx, chunk)


CASES = [
  # The first two items of each program have no key, the third has: the
  # compute warpgroups must not wait on each other across items.
  HopperCase(2, 1, 768, 256, 1, 1, 64, "bfloat16", mask="rows:000011"),
  # One program: keys, none, none, keys, none.
  HopperCase(1, 1, 640, 384, 1, 1, 128, "float16", mask="rows:10010"),
  # dK/dV at D=128 (its warpgroups take turns): key tiles no query sees
  # between ones that are seen, over two GQA heads, two programs.
  HopperCase(2, 1, 256, 768, 4, 2, 128, "bfloat16", mask="cols:010011"),
  HopperCase(3, 2, 512, 512, 2, 1, 64, "bfloat16", mask="random:0.3:BH"),
  HopperCase(2, 1, 1024, 1024, 2, 2, 64, "float16", causal=True),
  HopperCase(5, 3, 200, 328, 2, 1, 128, "bfloat16", causal=True, mask="random:0.5:BH"),
  HopperCase(4, 2, 576, 576, 2, 2, 64, "float16", mask="local"),
  HopperCase(3, 2, 456, 136, 2, 2, 128, "bfloat16", causal=True),
  HopperCase(7, 3, 576, 1032, 4, 4, 64, "float16", mask="random:0.5:BH"),
  HopperCase(1, 2, 384, 384, 2, 1, 128, "bfloat16", mask="random:0.6:B1"),
  # Token predicates: a window with partial tiles on both sides, per-head
  # and per-example rules (they read h and b), intersected with blocks.
  HopperCase(3, 1, 640, 640, 2, 1, 64, "bfloat16",
             mask_fn=masks.sliding_window(100, 150)),
  HopperCase(2, 2, 384, 512, 2, 2, 128, "float16", mask="random:0.7:1H",
             mask_fn=masks.or_masks(masks.prefix_lm(70), _head_window)),
  HopperCase(4, 2, 512, 512, 2, 1, 64, "bfloat16", causal=True,
             mask_fn=_example_chunks),
  # Lengths that are not multiples of 128 (`common.token_view`: TMA boxes
  # bounded per example, zero-filled reads and dropped stores past its
  # end): GQA over several programs; shorter than a tile on both sides (the
  # second warpgroup's rows lie wholly past the end), causal; a tail of 8
  # query rows with a per-head token rule; short keys under long causal
  # queries (most rows see no key); a one-item tail after sparse full tiles.
  HopperCase(3, 2, 200, 200, 4, 2, 64, "bfloat16"),
  HopperCase(2, 3, 64, 40, 2, 1, 128, "float16", causal=True),
  HopperCase(4, 2, 136, 328, 2, 2, 64, "bfloat16", mask_fn=_head_window),
  HopperCase(5, 2, 584, 40, 4, 1, 128, "bfloat16", causal=True),
  HopperCase(3, 1, 8, 1000, 2, 1, 64, "float16", mask="random:0.6:1H"),
  # D=64, lengths that are not multiples of 8 (on the GPU the copies go
  # through row-major aliases, `common.row_major_copies`): ViT's 197 tokens
  # with GQA; 201 x 330 with a per-head token rule.
  HopperCase(3, 2, 197, 197, 2, 2, 64, "bfloat16"),
  HopperCase(2, 1, 201, 330, 2, 1, 64, "bfloat16", mask_fn=_head_window),
]


def _flat(x):
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _inputs(case: HopperCase):
  """q, k, v, a cotangent do (fresh normals in the case's dtype), the mask."""
  keys = jax.random.split(jax.random.key(0), 4)
  dtype = jnp.dtype(case.dtype)
  normal = lambda key, rows, heads: jax.random.normal(
      key, (case.b, rows, heads, case.d), jnp.float32).astype(dtype)
  q, do = normal(keys[0], case.sq, case.h), normal(keys[3], case.sq, case.h)
  k, v = normal(keys[1], case.sk, case.hkv), normal(keys[2], case.sk, case.hkv)
  per_item = case.mask_fn is not None
  mask = BlockMask.build(case.user_mask(), seq_len_q=case.sq, seq_len_kv=case.sk,
                         is_causal=case.causal, mask_fn=case.mask_fn,
                         batch_size=case.b if per_item else None,
                         num_heads=case.h if per_item else None)
  return q, k, v, do, mask


def _run(case: HopperCase):
  q, k, v, _, mask = _inputs(case)
  flat = _flat
  out, lse = mosaic_fwd.forward(
      flat(q), flat(k), flat(v), mask.kv_lists, softmax_scale=case.d ** -0.5,
      rule=mask.element_rule, q_len=case.sq,
      kv_len=case.sk, num_programs=case.programs, interpret=True)
  out = jax.block_until_ready(out)
  ref_out, ref_lse = block_sparse_reference(
      *(x.astype(jnp.float32) for x in (q, k, v)), mask)
  out = out.reshape(q.shape)
  lse = lse.reshape(case.h, case.b, case.sq).transpose(1, 0, 2)
  return out, lse, ref_out, ref_lse


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_interpreted_hopper_forward_matches_reference(case, deadlock_watchdog):
  out, lse, ref_out, ref_lse = _run(case)
  assert_output_close(out, lse, ref_out, ref_lse, case.dtype)
  out_np = np.asarray(out.astype(jnp.float32))
  no_key = np.isneginf(np.asarray(ref_lse))              # [B, H, Sq]
  assert np.all(out_np.transpose(0, 2, 1, 3)[no_key] == 0.0)


@pytest.mark.parametrize("head_dim,seq", [(64, 128), (128, 256)])
def test_interpreted_hopper_forward_one_hot_rows_are_their_v_rows(
    head_dim, seq, deadlock_watchdog):
  """fp16 logits in the thousands, every softmax row one-hot: the output is
  exactly the V row (the row sum is taken of the probabilities as rounded
  for P @ V, `numerics.probability_row_sums`), as the Triton forward's
  (`tests/test_reliability.py::test_saturated_softmax_has_no_gradient_in_q_and_k`).
  At D=128 over two key tiles, with the lazy maximum (`lazy_rescale`): the
  winning probability is then at most 2**HEADROOM, still exact."""
  keys = jax.random.split(jax.random.key(1), 3)
  shape = (1, seq, 2, head_dim)
  k = (jax.random.normal(keys[0], shape) * 30).astype(jnp.float16)
  pick = jax.random.permutation(keys[1], seq)
  q = k[:, pick]
  v = jax.random.normal(keys[2], shape).astype(jnp.float16)
  mask = BlockMask.build(None, seq_len_q=seq, seq_len_kv=seq)
  out, _ = mosaic_fwd.forward(_flat(q), _flat(k), _flat(v), mask.kv_lists,
                              softmax_scale=head_dim ** -0.5,
                              rule=mask.element_rule, q_len=seq, kv_len=seq,
                              num_programs=1, interpret=True)
  np.testing.assert_array_equal(np.asarray(out.reshape(q.shape), np.float32),
                                np.asarray(v[:, pick], np.float32))


BACKWARD_CASES = CASES


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: c.id)
def test_interpreted_hopper_backward_matches_reference(case, deadlock_watchdog):
  """dQ, dK, dV of the Mosaic backward (fed the Mosaic forward's o and lse)
  against autodiff of the fp32 reference; keys no query sees get exactly 0."""
  q, k, v, do, mask = _inputs(case)
  kw = dict(softmax_scale=case.d ** -0.5, rule=mask.element_rule, q_len=case.sq,
            kv_len=case.sk, num_programs=case.programs, interpret=True)
  o, lse = mosaic_fwd.forward(_flat(q), _flat(k), _flat(v), mask.kv_lists, **kw)
  grads = mosaic_bwd.backward(_flat(q), _flat(k), _flat(v), o, lse, _flat(do),
                              None, mask.kv_lists, mask.q_lists, **kw)
  upcast = lambda x: x.astype(jnp.float32)
  _, vjp = jax.vjp(lambda q, k, v: block_sparse_reference(q, k, v, mask)[0],
                   upcast(q), upcast(k), upcast(v))
  for name, grad, ref, x in zip(("dq", "dk", "dv"), grads, vjp(upcast(do)),
                                (q, k, v)):
    grad = grad.reshape(x.shape)
    assert grad.dtype == x.dtype, name
    assert not np.isnan(np.asarray(upcast(grad))).any(), f"{name} has NaN"
    assert rel_err(grad, ref) < tol_for(case.dtype), name
  unseen = np.all(np.asarray(vjp(upcast(do))[2]) == 0.0, axis=-1)  # [B, Sk, Hkv]
  dv = np.asarray(upcast(grads[2].reshape(v.shape)))
  assert np.all(dv[unseen] == 0.0), "dv of keys no query sees"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_interpreted_hopper_backward_nan_reaches_exactly_its_keys(
    head_dim, deadlock_watchdog):
  """A NaN in one element of query row 150 (causal, 256 tokens: the row
  sees keys 0..150, one full key tile and part of the diagonal one) makes
  that dQ row NaN, and the dV and dK rows of exactly the keys it sees, in
  both dK/dV paths (D=64: S^T and dP^T together; D=128: one at a time, P^T
  through shared memory): the keys it does not see get dS = 0 and p = 0
  there, not NaN. Only dK's product `dS^T Q` multiplies those zeros by the
  NaN element itself, as any matmul does (the reference's too): the
  diagonal tile's other keys get NaN in that one column of dK."""
  case = HopperCase(1, 1, 256, 256, 1, 1, head_dim, "bfloat16", causal=True)
  q, k, v, do, mask = _inputs(case)
  row, col = 150, 3
  q = q.at[0, row, 0, col].set(jnp.nan)
  kw = dict(softmax_scale=head_dim ** -0.5, rule=mask.element_rule, q_len=256,
            kv_len=256, num_programs=1, interpret=True)
  o, lse = mosaic_fwd.forward(_flat(q), _flat(k), _flat(v), mask.kv_lists, **kw)
  dq, dk, dv = (np.asarray(g.astype(jnp.float32)) for g in mosaic_bwd.backward(
      _flat(q), _flat(k), _flat(v), o, lse, _flat(do), None, mask.kv_lists,
      mask.q_lists, **kw))
  want_dq = np.zeros(dq.shape, bool)
  want_dq[row] = True
  np.testing.assert_array_equal(np.isnan(dq), want_dq)
  want_dv = np.zeros(dv.shape, bool)
  want_dv[:row + 1] = True
  np.testing.assert_array_equal(np.isnan(dv), want_dv)
  want_dk = want_dv.copy()
  want_dk[row + 1:, :, col] = True          # the rest of key tile 128..255
  np.testing.assert_array_equal(np.isnan(dk), want_dk)


@pytest.mark.parametrize("case", [
    HopperCase(3, 2, 200, 200, 4, 2, 64, "bfloat16"),
    HopperCase(2, 1, 256, 384, 2, 1, 128, "float16", causal=True, dropout=0.2),
], ids=lambda c: c.id)
def test_interpreted_hopper_backward_takes_the_lse_cotangent(case, deadlock_watchdog):
  """dQ computes delta = rowsum(dO O) - dlse itself (and dK/dV reads it): a
  loss on the lse too gets the reference's gradients, with tails, GQA and
  dropout."""
  q, k, v, do, mask = _inputs(case)
  dlse = 3.0 * jax.random.normal(jax.random.key(5), (case.b, case.h, case.sq))
  seeds = dropout_bits.example_seeds(jax.random.key(9), case.b)
  rate = case.dropout
  drop = dict(dropout=dropout_bits.Dropout(rate), seeds=seeds) if rate else {}
  kw = dict(softmax_scale=case.d ** -0.5, rule=mask.element_rule, q_len=case.sq,
            kv_len=case.sk, num_programs=case.programs, interpret=True, **drop)
  o, lse = mosaic_fwd.forward(_flat(q), _flat(k), _flat(v), mask.kv_lists, **kw)
  flat_dlse = dlse.transpose(1, 0, 2).reshape(case.h, case.b * case.sq)
  grads = mosaic_bwd.backward(_flat(q), _flat(k), _flat(v), o, lse, _flat(do),
                              flat_dlse, mask.kv_lists, mask.q_lists, **kw)
  upcast = lambda x: x.astype(jnp.float32)
  _, vjp = jax.vjp(lambda q, k, v: block_sparse_reference(
      q, k, v, mask, dropout_rate=rate, dropout_seeds=seeds if rate else None),
                   upcast(q), upcast(k), upcast(v))
  no_lse = mosaic_bwd.backward(_flat(q), _flat(k), _flat(v), o, lse, _flat(do),
                               None, mask.kv_lists, mask.q_lists, **kw)
  for name, grad, ref, without, x in zip(("dq", "dk", "dv"), grads,
                                         vjp((upcast(do), dlse)), no_lse,
                                         (q, k, v)):
    assert rel_err(grad.reshape(x.shape), ref) < tol_for(case.dtype), name
    if name != "dv":   # dV does not depend on the lse
      assert rel_err(without.reshape(x.shape), ref) > 0.1, name


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("sq,sk", [(128, 128), (200, 328), (64, 40), (8, 1000),
                                   (197, 197), (577, 577), (1025, 1025),
                                   (130, 328), (256, 100)])
def test_length_scope(sq, sk, head_dim):
  """At D=64 both kernels take every length (row-major copies,
  `common.row_major_copies`); at D=128 every multiple of 8, whether or not
  a multiple of 128 (or of one tile), and lengths off the 8-row tiles of
  the TMA copies are refused, with the reason."""
  takes = head_dim == 64 or (sq % 8 == 0 and sk % 8 == 0)
  for module in (mosaic_fwd, mosaic_bwd):
    reason = module.unsupported(jnp.bfloat16, head_dim, (128, 128), sq, sk)
    assert (reason is None) == takes, (module.__name__, reason)
    if not takes:
      assert "multiples of 8" in reason, reason
    # Off a Hopper GPU, supported shapes are passed over for the target only.
    reason = module.unsupported_call(jnp.bfloat16, head_dim, (128, 128),
                                     si.padded_static(sq, sk, False, False))
    if targets_hopper():
      assert (reason is None) == takes, reason
    else:
      assert ("target is not a Hopper" in reason) == takes, reason
  if not takes:
    q, kv = (jnp.zeros((2 * n, 1, head_dim), jnp.bfloat16) for n in (sq, sk))
    mask = BlockMask.build(None, seq_len_q=sq, seq_len_kv=sk)
    kw = dict(softmax_scale=0.125, rule=mask.element_rule, q_len=sq, kv_len=sk,
              interpret=True)
    with pytest.raises(ValueError, match="multiples of 8"):
      mosaic_fwd.forward(q, kv, kv, mask.kv_lists, **kw)
    with pytest.raises(ValueError, match="multiples of 8"):
      mosaic_bwd.backward(q, kv, kv, q, jnp.zeros((1, 2 * sq)), q, None,
                          mask.kv_lists, mask.q_lists, **kw)


def test_the_deadlock_cases_have_items_without_keys():
  """The first two cases exercise what they claim (some items have no key)."""
  for case in CASES[:2]:
    counts = np.asarray(BlockMask.build(case.user_mask(), seq_len_q=case.sq,
                                        seq_len_kv=case.sk).kv_lists.count).reshape(-1)
    pattern = case.mask.split(":")[1]
    np.testing.assert_array_equal(counts > 0, [c == "1" for c in pattern])


def test_num_programs_must_be_positive():
  x = jnp.zeros((256, 1, 64), jnp.bfloat16)
  mask = BlockMask.build(None, seq_len_q=256)
  with pytest.raises(ValueError, match="num_programs"):
    mosaic_fwd.forward(x, x, x, mask.kv_lists, softmax_scale=0.125,
                       rule=mask.element_rule, q_len=256, kv_len=256,
                       num_programs=0, interpret=True)


def _program_items(schedule: Schedule) -> list[list[tuple[int, int, int]]]:
  """Each program's (tile, head, example) items, in the order it runs them."""
  runs = []
  for program in range(schedule.num_programs):
    with mock.patch.object(lax, "axis_index", lambda _: jnp.int32(program)):
      _, count = schedule.items_of_this_program()
    runs.append([tuple(int(x) for x in schedule.item(jnp.int32(program),
                                                     jnp.int32(i)))
                 for i in range(int(count))])
  return runs


@pytest.mark.parametrize("tiles,heads,batch,programs,reverse,balanced", [
    (64, 16, 2, 132, True, False), (128, 16, 1, 132, True, True),
    (8, 3, 2, 5, True, True), (5, 4, 1, 3, False, True),
    (7, 1, 1, 2, False, False), (9, 2, 1, 4, False, True)])
def test_schedule_runs_every_item_once(tiles, heads, batch, programs, reverse,
                                       balanced):
  """Every (tile, head, example) is one program's item, exactly once, also
  balanced (whose last round may be odd and partial); reversed schedules
  run each sequence's last tile first."""
  schedule = Schedule(tiles, heads, tiles * heads * batch, programs, reverse,
                      balanced)
  runs = _program_items(schedule)
  assert sorted(item for run in runs for item in run) == [
      (t, h, b) for t in range(tiles) for h in range(heads) for b in range(batch)]
  assert runs[0][0][0] == (tiles - 1 if reverse else 0)


@pytest.mark.parametrize("tiles,heads,batch", [(128, 16, 1), (64, 16, 2),
                                               (32, 16, 4), (256, 4, 1)])
@pytest.mark.parametrize("reverse", [True, False])
def test_causal_schedule_gives_programs_equal_work(tiles, heads, batch, reverse):
  """A causal schedule's busiest program runs at most 1% more key tiles than
  the mean (132 programs; a query tile t sees t + 1 key tiles, a key tile t
  is seen by tiles - t query tiles), where handing out every 132nd item
  gave up to 57% more."""
  schedule = persistent_schedule(tiles, heads, batch, 132, causal=True,
                                 reverse=reverse)
  length = (lambda t: t + 1) if reverse else (lambda t: tiles - t)
  work = [sum(length(t) for t, _, _ in run) for run in _program_items(schedule)]
  assert max(work) <= 1.01 * sum(work) / len(work)


DROPOUT_CASES = [
  # dense, GQA
  HopperCase(2, 2, 384, 384, 4, 2, 64, "bfloat16", dropout=0.1),
  # causal, MQA, fp16, D=128, more items than programs
  HopperCase(3, 2, 512, 512, 2, 1, 128, "float16", causal=True, dropout=0.5),
  # sparse per example and head, causal, lengths ending inside a tile
  HopperCase(3, 2, 456, 328, 2, 2, 64, "bfloat16", causal=True,
             mask="random:0.5:BH", dropout=0.5),
  HopperCase(2, 1, 384, 512, 4, 2, 128, "bfloat16", mask="random:0.6:1H",
             dropout=0.1),
  # items without keys between items with (the seed is read one item ahead)
  HopperCase(2, 2, 768, 256, 2, 1, 64, "float16", mask="rows:010011",
             dropout=0.5),
  # a token predicate: partial tiles on both sides of full ones
  HopperCase(2, 1, 640, 640, 2, 1, 128, "float16",
             mask_fn=masks.sliding_window(100, 150), dropout=0.1),
]

def _run_dropout(case: HopperCase, monkeypatch):
  """The Mosaic forward through the registry's entry (seeds from seq_info's
  SEED column), the Triton forward in interpret mode on the same seq_info,
  and the reference with the same dropout bits."""
  q, k, v, _, mask = _inputs(case)
  seeds, info, call = padded_dropout_call(case, mask, "interpret")
  # The registry's Mosaic entry compiles for a GPU: run it in the interpreter.
  monkeypatch.setattr(mosaic_fwd, "forward", functools.partial(
      mosaic_fwd.forward, num_programs=case.programs, interpret=True))
  args = (_flat(q), _flat(k), _flat(v), info, mask.kv_lists)
  out, lse = registry._mosaic_forward(*args, call=call,
                                      softmax_scale=case.d ** -0.5)
  out = jax.block_until_ready(out)
  assert registry.choose(registry.FORWARD, call)[0].name == "triton"
  tri_out, tri_lse = registry.forward(*args, call=call,
                                      softmax_scale=case.d ** -0.5)
  unflat = lambda o, l: (o.reshape(q.shape),
                         l.reshape(case.h, case.b, case.sq).transpose(1, 0, 2))
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref = block_sparse_reference(*f32, mask, dropout_rate=case.dropout,
                               dropout_seeds=seeds)
  other_seeds = block_sparse_reference(*f32, mask, dropout_rate=case.dropout,
                                       dropout_seeds=seeds + 1)[0]
  return unflat(out, lse), unflat(tri_out, tri_lse), ref, other_seeds


def _row_errors(out, ref) -> np.ndarray:
  """||out - ref|| / ||ref|| of each output row (rows with a nonzero ref)."""
  out, ref = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
              for x in (out, ref))
  num, den = (np.linalg.norm(x, axis=-1) for x in (out - ref, ref))
  return num[den > 0] / den[den > 0]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: c.id)
def test_interpreted_hopper_forward_dropout(case, deadlock_watchdog, monkeypatch):
  """Dropout in the Mosaic forward keeps exactly the reference's and the
  Triton forward's elements.

  Both kernels stay within the output dtype's rounding of the reference in
  every row (about half the dtype's eps here, with or without dropout): one
  wrong keep bit moves its row by its probability / (1 - rate), in most rows
  more than the eps checked here, and wrong seeds miss by far more. The
  kernels differ by their order of summation and where p rounds to half
  precision, so they agree to the dtype's rounding, not bit for bit.
  """
  (out, lse), (tri_out, tri_lse), (ref_out, ref_lse), other = _run_dropout(
      case, monkeypatch)
  assert_output_close(out, lse, ref_out, ref_lse, case.dtype)
  eps = float(jnp.finfo(case.dtype).eps)
  worst = _row_errors(out, ref_out).max()
  assert worst < eps, f"a row {worst:.3g} from the reference (eps {eps:.3g})"
  assert rel_err(other, ref_out) > 0.1      # the bits matter at this rate
  assert rel_err(out, other) > 0.1
  # Same as the Triton forward to the output's rounding; the lse is the one
  # before dropout in both. In fp16 both sum the probabilities as rounded
  # for P @ V (`numerics.probability_row_sums`), each against its own
  # running max over its own key tiles, so their l agree to fp16's rounding.
  assert rel_err(out, tri_out) < eps / 2
  worst = _row_errors(out, tri_out).max()
  assert worst < eps, f"a row {worst:.3g} from the Triton forward (eps {eps:.3g})"
  assert_lse_close(lse, tri_lse, eps if case.dtype == "float16" else 1e-6)
  no_key = np.isneginf(np.asarray(ref_lse))
  assert np.all(np.asarray(out.astype(jnp.float32)).transpose(0, 2, 1, 3)[no_key] == 0.0)


BACKWARD_DROPOUT_CASES = DROPOUT_CASES + [
  # lengths ending inside a tile or shorter than one (tails): a per-head
  # token rule, GQA; causal MQA with the second warpgroup's rows past the end
  HopperCase(4, 2, 136, 328, 2, 2, 64, "bfloat16", mask_fn=_head_window,
             dropout=0.5),
  HopperCase(2, 3, 64, 40, 2, 1, 128, "float16", causal=True, dropout=0.1),
  # ViT's 197 tokens at D=64 (row-major copies on the GPU), causal
  HopperCase(2, 2, 197, 197, 2, 1, 64, "bfloat16", causal=True, dropout=0.1),
]


@pytest.mark.parametrize("case", BACKWARD_DROPOUT_CASES, ids=lambda c: c.id)
def test_interpreted_hopper_backward_dropout(case, deadlock_watchdog,
                                             monkeypatch):
  """dQ, dK, dV of the Mosaic backward with dropout, through the registry's
  entries (seeds from seq_info's SEED column, fed the Mosaic forward's o and
  lse with dropout), against autodiff of the fp32 reference with the same
  dropout bits; the reference's gradients with other seeds are far from
  them (the bits matter), and keys no query sees get exactly 0.

  The gradients stay within the dtype's eps of the reference (about a third
  of it here), tighter than the backward's usual budget: a wrong 1 / (1 -
  rate) at rate 0.1 (in dV, or in dP against delta) misses by more.
  """
  q, k, v, do, mask = _inputs(case)
  seeds, info, call = padded_dropout_call(case, mask, "pallas")
  # The registry's Mosaic entries compile for a GPU: run them in the
  # interpreter.
  for module, name in ((mosaic_fwd, "forward"), (mosaic_bwd, "backward")):
    monkeypatch.setattr(module, name, functools.partial(
        getattr(module, name), num_programs=case.programs, interpret=True))
  scale = case.d ** -0.5
  o, lse = registry._mosaic_forward(_flat(q), _flat(k), _flat(v), info,
                                    mask.kv_lists, call=call,
                                    softmax_scale=scale)
  grads = registry._mosaic_backward(
      _flat(q), _flat(k), _flat(v), o, lse, _flat(do), None, info,
      mask.kv_lists, mask.q_lists, call=call, softmax_scale=scale)
  grads = jax.block_until_ready(grads)

  upcast = lambda x: x.astype(jnp.float32)

  def reference_grads(seeds):
    _, vjp = jax.vjp(lambda q, k, v: block_sparse_reference(
        q, k, v, mask, dropout_rate=case.dropout, dropout_seeds=seeds)[0],
                     upcast(q), upcast(k), upcast(v))
    return vjp(upcast(do))

  refs, others = reference_grads(seeds), reference_grads(seeds + 1)
  eps = float(jnp.finfo(case.dtype).eps)
  for name, grad, ref, other, x in zip(("dq", "dk", "dv"), grads, refs, others,
                                       (q, k, v)):
    grad = grad.reshape(x.shape)
    assert grad.dtype == x.dtype, name
    assert not np.isnan(np.asarray(upcast(grad))).any(), f"{name} has NaN"
    err = rel_err(grad, ref)
    assert err < eps, f"{name} rel err {err:.3g} >= eps {eps:.3g}"
    assert rel_err(other, ref) > 0.1, f"{name}: the bits barely matter"
  unseen = np.all(np.asarray(refs[2]) == 0.0, axis=-1)     # [B, Sk, Hkv]
  dv = np.asarray(upcast(grads[2].reshape(v.shape)))
  assert np.all(dv[unseen] == 0.0), "dv of keys no query sees"


def test_dropout_needs_one_seed_per_example():
  x = jnp.zeros((512, 1, 64), jnp.bfloat16)
  mask = BlockMask.build(None, seq_len_q=256)
  for seeds in (None, jnp.zeros((3,), jnp.int32)):
    with pytest.raises(ValueError, match="seeds of shape"):
      mosaic_fwd.forward(x, x, x, mask.kv_lists, softmax_scale=0.125,
                         rule=mask.element_rule, q_len=256, kv_len=256,
                         dropout=dropout_bits.Dropout(0.1), seeds=seeds,
                         interpret=True)
    with pytest.raises(ValueError, match="seeds of shape"):
      mosaic_bwd.backward(x, x, x, x, jnp.zeros((1, 512)), x, None,
                          mask.kv_lists, mask.q_lists, softmax_scale=0.125,
                          rule=mask.element_rule, q_len=256, kv_len=256,
                          dropout=dropout_bits.Dropout(0.1), seeds=seeds,
                          interpret=True)
