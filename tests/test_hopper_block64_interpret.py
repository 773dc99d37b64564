"""The Mosaic GPU forward at 64x64 mask tiles (`mosaic_gpu.fwd_block64`) in Mosaic GPU's interpreter on the CPU.

As `test_hopper_interpret.py` does for the 128-tile kernels: each warpgroup
runs as a thread with the kernel's barriers, TMA copies and persistent item
loop, a deadlock is caught by a watchdog (every thread's stack, then exit),
unwritten output reads as NaN. The cases put the two rows of an item (one
per compute warpgroup) in every combination: one row with keys and the
other without, both without (items with no step, also two in a row), rows
with lists of different lengths (random per-head masks), rows that share
their tiles (dense, causal, bands either way round: the item's shift), the
last item of an odd number of row tiles (no second row), lengths ending
inside a tile, GQA, several programs, token predicates and dropout; rows
paired by tile count (the default) and adjacent ones. The schedule itself
(which rows make an item, which tile each row runs at each step, what is
loaded) is checked against the lists in plain JAX.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsattn_jax import masks
from bsattn_jax.block_mask import BlockMask, lists_from_tiles
from bsattn_jax.reference import block_sparse_reference
from pallas_kernels import dropout as dropout_bits
from pallas_kernels import registry
from pallas_kernels.mosaic_gpu import fwd_block64
from conftest import (assert_lse_close, assert_output_close,
                      padded_dropout_call, rel_err)

TILE = fwd_block64.MASK_TILE


@dataclasses.dataclass(frozen=True)
class Block64Case:
  programs: int
  b: int
  sq: int
  sk: int
  h: int
  hkv: int
  d: int
  dtype: str
  causal: bool = False
  # "none" | "random:<density>:<B|1><H|1>" | "rows:<0/1 per 64-row tile>" |
  # "local:<w>" | "antilocal:<w>" (the band mirrored: each row's keys start
  # one tile before the previous row's) | "global_local"
  mask: str = "none"
  mask_fn: object = None   # a token predicate (lists per example and head)
  dropout: float = 0.0
  sort_rows: bool = True   # False: items of adjacent rows

  @property
  def id(self) -> str:
    rule = (getattr(self.mask_fn, "__name__", None) or repr(self.mask_fn)
            if self.mask_fn else "")
    return (f"p{self.programs}_b{self.b}_s{self.sq}x{self.sk}_h{self.h}kv{self.hkv}"
            f"_d{self.d}_{self.dtype}_{self.mask.replace(':', '')}"
            f"{'_causal' if self.causal else ''}{'_' + rule if rule else ''}"
            f"{f'_drop{self.dropout}' if self.dropout else ''}"
            f"{'' if self.sort_rows else '_adjacent'}")

  def user_mask(self):
    n_q, n_k = -(-self.sq // TILE), -(-self.sk // TILE)
    if self.mask == "none":
      return None
    if self.mask == "global_local":
      return masks.global_local(n_q, n_k, 1, 1)
    kind, *args = self.mask.split(":")
    if kind == "rows":          # query tile i sees every key iff args[0][i] == "1"
      rows = np.array([c == "1" for c in args[0]])
      assert rows.size == n_q
      return jnp.asarray(np.repeat(rows[:, None], n_k, axis=1)[None, None])
    if kind == "local":
      return masks.local(n_q, n_k, int(args[0]))
    if kind == "antilocal":
      return masks.local(n_q, n_k, int(args[0]))[..., ::-1]
    density, layout = args
    return masks.random(n_q, n_k, float(density), seed=7,
                        batch=self.b if layout[0] == "B" else 1,
                        num_heads=self.h if layout[1] == "H" else 1)


def _head_window(b, h, q_idx, kv_idx):
  """Head h sees keys within 48 * (h + 1) tokens."""
  return jnp.abs(q_idx - kv_idx) < 48 * (h + 1)


def _example_chunks(b, h, q_idx, kv_idx):
  """Example b attends within chunks of 96 + 40 * b tokens."""
  chunk = 96 + 40 * b
  return jax.lax.div(q_idx, chunk) == jax.lax.div(kv_idx, chunk)


CASES = [
  # Adjacent rows: row A with keys and row B without, then the other way
  # round, then both.
  Block64Case(1, 1, 384, 256, 1, 1, 64, "bfloat16", mask="rows:100111",
              sort_rows=False),
  # An item with no step first, then rows of one warpgroup only.
  Block64Case(2, 1, 384, 320, 1, 1, 128, "float16", mask="rows:000110",
              sort_rows=False),
  # Programs whose first items have no step (two in a row for program 0).
  Block64Case(2, 1, 640, 256, 1, 1, 64, "float16", mask="rows:0000001001",
              sort_rows=False),
  # Rows paired by count: (0, 2), (3, 1) (row B without keys), then row 4
  # with no second row and no key.
  Block64Case(2, 2, 320, 384, 2, 1, 64, "bfloat16", mask="rows:10110"),
  # Per-head random lists of different lengths, GQA; more items than programs.
  Block64Case(3, 2, 512, 512, 4, 2, 64, "bfloat16", mask="random:0.3:BH"),
  Block64Case(3, 2, 512, 512, 4, 2, 64, "bfloat16", mask="random:0.3:BH",
              sort_rows=False),
  # Sparse: many rows without keys next to rows with, D=128.
  Block64Case(5, 2, 512, 640, 2, 1, 128, "bfloat16", mask="random:0.15:BH",
              sort_rows=False),
  Block64Case(1, 2, 384, 384, 2, 2, 128, "float16", mask="random:0.6:B1"),
  # Causal: the rows share every tile but the last; longest items first.
  Block64Case(2, 1, 1024, 1024, 2, 2, 64, "float16", causal=True),
  # Lengths ending inside a tile (keys masked, the last item's rows stored
  # by count: 64 + 8), causal with per-head random blocks.
  Block64Case(3, 3, 200, 328, 2, 1, 128, "bfloat16", causal=True,
              mask="random:0.6:BH"),
  Block64Case(7, 3, 456, 136, 2, 2, 128, "bfloat16", causal=True),
  Block64Case(3, 2, 456, 328, 2, 1, 64, "float16", causal=True,
              mask="random:0.6:BH", sort_rows=False),
  # An odd number of row tiles: the last item has no second row.
  Block64Case(2, 2, 320, 448, 2, 2, 64, "float16", mask="random:0.5:1H"),
  # Bands: row B's keys one tile after row A's (shared), and before (mirrored).
  Block64Case(4, 2, 576, 576, 2, 2, 64, "bfloat16", mask="local:2"),
  Block64Case(3, 1, 512, 512, 2, 1, 128, "float16", mask="antilocal:1"),
  Block64Case(2, 1, 768, 768, 2, 1, 64, "bfloat16", mask="global_local"),
  # Token predicates: partial tiles on both sides of full ones, per-head and
  # per-example rules (they read h and b), intersected with blocks.
  Block64Case(3, 1, 640, 640, 2, 1, 64, "bfloat16",
              mask_fn=masks.sliding_window(100, 150)),
  Block64Case(2, 2, 384, 512, 2, 2, 128, "float16", mask="random:0.7:1H",
              mask_fn=masks.or_masks(masks.prefix_lm(70), _head_window)),
  Block64Case(4, 2, 512, 512, 2, 1, 64, "bfloat16", causal=True,
              mask_fn=_example_chunks),
]


def _flat(x):
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _inputs(case: Block64Case):
  keys = jax.random.split(jax.random.key(0), 3)
  dtype = jnp.dtype(case.dtype)
  normal = lambda key, rows, heads: jax.random.normal(
      key, (case.b, rows, heads, case.d), jnp.float32).astype(dtype)
  q = normal(keys[0], case.sq, case.h)
  k, v = normal(keys[1], case.sk, case.hkv), normal(keys[2], case.sk, case.hkv)
  per_item = case.mask_fn is not None
  mask = BlockMask.build(case.user_mask(), seq_len_q=case.sq, seq_len_kv=case.sk,
                         block_size=(TILE, TILE), is_causal=case.causal,
                         mask_fn=case.mask_fn,
                         batch_size=case.b if per_item else None,
                         num_heads=case.h if per_item else None)
  assert mask.tile == (TILE, TILE)
  return q, k, v, mask


def _unflat(case, q, out, lse):
  return (out.reshape(q.shape),
          lse.reshape(case.h, case.b, case.sq).transpose(1, 0, 2))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_interpreted_block64_forward_matches_reference(case, deadlock_watchdog):
  q, k, v, mask = _inputs(case)
  out, lse = fwd_block64.forward(
      _flat(q), _flat(k), _flat(v), mask.kv_lists, softmax_scale=case.d ** -0.5,
      rule=mask.element_rule, q_len=case.sq, kv_len=case.sk,
      sort_rows=case.sort_rows, num_programs=case.programs, interpret=True)
  out, lse = _unflat(case, q, jax.block_until_ready(out), lse)
  assert out.dtype == q.dtype
  ref_out, ref_lse = block_sparse_reference(
      *(x.astype(jnp.float32) for x in (q, k, v)), mask)
  assert_output_close(out, lse, ref_out, ref_lse, case.dtype)
  no_key = np.isneginf(np.asarray(ref_lse))              # [B, H, Sq]
  out_np = np.asarray(out.astype(jnp.float32)).transpose(0, 2, 1, 3)
  assert np.all(out_np[no_key] == 0.0)


# --- the schedule, in plain JAX ----------------------------------------------


def _walk(lists, rows, batch: int, head: int, q_tile: int):
  """What the kernel's warpgroups do for one item (its rows from
  `pair_rows`): (the tiles row A and row B run, in order, as (tile, full)
  pairs; the tiles loaded; the plan)."""
  count, full, index = (jnp.asarray(x) for x in lists.walked)
  plan = fwd_block64._item_plan(rows, count, full, index, jnp.int32(batch),
                                jnp.int32(head), jnp.int32(q_tile))
  plan = jax.tree.map(int, plan)
  runs, loads = ([], []), []
  entries = plan.first
  for t in range(plan.steps):
    step = fwd_block64._step(plan, t, entries)
    on = [bool(x) for x in step.on]
    assert any(on), "a step where no warpgroup runs a tile"
    loads.append(entries[0] if on[0] else entries[1])
    if bool(step.two):
      loads.append(entries[1])
    for w in range(2):
      if on[w]:
        runs[w].append((int(entries[w]), t - plan.pre[w] < plan.full[w]))
    entries = jax.tree.map(int, fwd_block64._step_entries(
        index, jnp.int32(batch), jnp.int32(head), plan, jnp.int32(t + 1)))
  return runs, loads, plan


def _listed(lists, batch, head, row):
  """Row `row`'s list as (tile, full) pairs (none past the last row)."""
  count, full, index = (np.asarray(x)[min(batch, x.shape[0] - 1),
                                      min(head, x.shape[1] - 1)]
                        for x in lists.walked)
  if row >= count.shape[0]:
    return []
  return [(int(index[row, t]), t < int(full[row])) for t in range(count[row])]


@pytest.mark.parametrize("sort_rows", [True, False], ids=["sorted", "adjacent"])
@pytest.mark.parametrize("mask,causal,pre,shares", [
    ("none", False, (0, 0), "all"),
    ("none", True, (0, 0), "all"),
    ("local:2", False, (0, 1), "adjacent"),
    ("antilocal:1", False, (1, 0), "adjacent"),
    ("global_local", False, None, "no"),
    ("random:0.3:1H", False, None, "no"),
    ("rows:10011011", False, (0, 0), "all"),
])
def test_schedule_runs_each_listed_tile_once(mask, causal, pre, shares,
                                             sort_rows):
  """Each warpgroup runs exactly its row's list, in list order (full tiles
  first: they run unmasked); a tile both rows run at one step is loaded
  once. Dense and causal rows share every tile (`shares`), so do adjacent
  band rows (where the rows start on different tiles, by the item's shift
  `pre`)."""
  case = Block64Case(1, 1, 512, 640, 2, 2, 64, "bfloat16", causal=causal,
                     mask=mask)
  lists = _inputs(case)[3].kv_lists
  rows = fwd_block64.pair_rows(lists, sort_rows)
  assert sorted(np.asarray(rows[0, 0]).tolist()) == list(range(8))
  for head in range(2):
    for q_tile in range(4):
      (run_a, run_b), loads, plan = _walk(lists, rows, 0, head, q_tile)
      row_a, row_b = (int(r) for r in rows[0, min(head, rows.shape[1] - 1),
                                           2 * q_tile:2 * q_tile + 2])
      if not sort_rows:
        assert (row_a, row_b) == (2 * q_tile, 2 * q_tile + 1)
      listed = [_listed(lists, 0, head, row) for row in (row_a, row_b)]
      assert run_a == listed[0] and run_b == listed[1]
      union = {t for t, _ in listed[0]} | {t for t, _ in listed[1]}
      assert set(loads) == union
      assert plan.steps == max(pre_w + len(l) for pre_w, l in zip(plan.pre,
                                                                   listed))
      adjacent = abs(row_a - row_b) == 1
      if pre is not None and listed[0][:1] != listed[1][:1] and adjacent:
        assert tuple(plan.pre) == pre, (head, q_tile)
      if shares == "all" or shares == "adjacent" and adjacent:
        assert len(loads) == len(union), (head, q_tile, loads)   # once each


@pytest.mark.parametrize("sort_rows", [True, False], ids=["sorted", "adjacent"])
def test_schedule_covers_a_missing_second_row(sort_rows):
  """With an odd number of row tiles the last item's row B is none (the
  row count), with no tiles."""
  case = Block64Case(1, 1, 320, 256, 1, 1, 64, "bfloat16", mask="none")
  lists = _inputs(case)[3].kv_lists
  rows = fwd_block64.pair_rows(lists, sort_rows)
  np.testing.assert_array_equal(rows, [[[0, 1, 2, 3, 4]]])
  (run_a, run_b), loads, plan = _walk(lists, rows, 0, 0, 2)
  assert run_b == [] and plan.count[1] == 0 and plan.rows == (4, 5)
  assert run_a == _listed(lists, 0, 0, 4) and len(loads) == len(run_a) == 4


def test_sorted_pairs_are_longest_first_and_keep_ties_in_order():
  counts = np.asarray([[[3, 0, 5, 3, 5, 1, 3]], [[2, 2, 2, 2, 2, 2, 2]]])
  active = np.arange(6) < counts[..., None]                # [2, 1, 7, 6]
  lists = lists_from_tiles(jnp.asarray(active), jnp.asarray(active))
  np.testing.assert_array_equal(lists.count, counts)
  np.testing.assert_array_equal(fwd_block64.pair_rows(lists), [
      [[2, 4, 0, 3, 6, 5, 1]], [[0, 1, 2, 3, 4, 5, 6]]])
  np.testing.assert_array_equal(fwd_block64.pair_rows(lists, False),
                                [[list(range(7))]] * 2)


def _item_counts(case: Block64Case) -> np.ndarray:
  """`[..., items, 2]` tile counts of each item's two rows."""
  lists = _inputs(case)[3].kv_lists
  count = lists.count
  rows = fwd_block64.pair_rows(lists, case.sort_rows)
  if rows.shape[-1] % 2:
    rows = jnp.pad(rows, [(0, 0)] * 2 + [(0, 1)], constant_values=rows.shape[-1])
  padded = jnp.pad(count, [(0, 0)] * 2 + [(0, 1)])       # the row past the end
  paired = jnp.take_along_axis(padded, rows, axis=-1)
  return np.asarray(paired).reshape(*paired.shape[:-1], -1, 2)


def test_cases_exercise_rows_of_one_warpgroup_only():
  """The 'rows' cases and the sparse random ones have items where one row
  has keys and the other has none, and the 'rows' ones items where neither
  has."""
  for case in CASES[:4] + [CASES[6]]:
    counts = _item_counts(case) > 0
    assert np.any(counts[..., 0] != counts[..., 1]), case.id
  for case in CASES[1:4]:
    assert np.any(_item_counts(case).sum(axis=-1) == 0), case.id


# --- dropout, through the registry's entry -------------------------------------


DROPOUT_CASES = [
  Block64Case(2, 2, 384, 384, 4, 2, 64, "bfloat16", mask="random:0.5:BH",
              dropout=0.1),
  Block64Case(3, 2, 456, 328, 2, 1, 128, "float16", causal=True,
              mask="random:0.6:BH", dropout=0.5),
  Block64Case(2, 1, 512, 512, 2, 1, 64, "float16", mask="local:1", dropout=0.5),
  Block64Case(2, 1, 384, 384, 2, 2, 128, "bfloat16",
              mask_fn=masks.sliding_window(100, 150), dropout=0.1),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: c.id)
def test_interpreted_block64_forward_dropout(case, deadlock_watchdog, monkeypatch):
  """The registry's entry (seeds from seq_info's SEED column) keeps exactly
  the reference's and the Triton forward's elements: every row within the
  output dtype's rounding of both (see `test_hopper_interpret`)."""
  q, k, v, mask = _inputs(case)
  seeds, info, call = padded_dropout_call(case, mask, "interpret")
  monkeypatch.setattr(fwd_block64, "forward", functools.partial(
      fwd_block64.forward, num_programs=case.programs, interpret=True))
  args = (_flat(q), _flat(k), _flat(v), info, mask.kv_lists)
  out, lse = _unflat(case, q, *registry._mosaic_forward64(
      *args, call=call, softmax_scale=case.d ** -0.5))
  out = jax.block_until_ready(out)
  assert registry.choose(registry.FORWARD, call)[0].name == "triton"
  tri_out, tri_lse = _unflat(case, q, *registry.forward(
      *args, call=call, softmax_scale=case.d ** -0.5))
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref_out, ref_lse = block_sparse_reference(*f32, mask, dropout_rate=case.dropout,
                                            dropout_seeds=seeds)
  other = block_sparse_reference(*f32, mask, dropout_rate=case.dropout,
                                 dropout_seeds=seeds + 1)[0]
  assert_output_close(out, lse, ref_out, ref_lse, case.dtype)
  eps = float(jnp.finfo(case.dtype).eps)
  for name, target in (("reference", ref_out), ("Triton forward", tri_out)):
    num = np.linalg.norm(np.asarray(out, np.float32) - np.asarray(target, np.float32),
                         axis=-1)
    den = np.linalg.norm(np.asarray(target, np.float32), axis=-1)
    worst = (num[den > 0] / den[den > 0]).max()
    assert worst < eps, f"a row {worst:.3g} from the {name} (eps {eps:.3g})"
  assert rel_err(other, ref_out) > 0.1 and rel_err(out, other) > 0.1
  # In fp16 both sum the probabilities as rounded for P @ V
  # (`numerics.probability_row_sums`), each against the maximum it keeps
  # (`lazy_rescale`), so their l agree to fp16's rounding.
  assert_lse_close(lse, tri_lse, eps if case.dtype == "float16" else 1e-6)


# --- argument checks ---------------------------------------------------------


def test_forward_checks_its_arguments():
  x = jnp.zeros((256, 1, 64), jnp.bfloat16)
  kw = dict(softmax_scale=0.125, q_len=256, kv_len=256, interpret=True)
  mask = BlockMask.build(None, seq_len_q=256, block_size=(64, 64))
  with pytest.raises(ValueError, match="num_programs"):
    fwd_block64.forward(x, x, x, mask.kv_lists, rule=mask.element_rule,
                        num_programs=0, **kw)
  with pytest.raises(ValueError, match="slots must be"):
    fwd_block64.forward(x, x, x, mask.kv_lists, rule=mask.element_rule,
                        slots=1, **kw)
  mask128 = BlockMask.build(None, seq_len_q=256)
  with pytest.raises(ValueError, match="do not match 64x64 tiles"):
    fwd_block64.forward(x, x, x, mask128.kv_lists, rule=mask128.element_rule,
                        **kw)
  with pytest.raises(ValueError, match="seeds of shape"):
    fwd_block64.forward(x, x, x, mask.kv_lists, rule=mask.element_rule,
                        dropout=dropout_bits.Dropout(0.1), **kw)


@pytest.mark.parametrize("args,reason", [
    ((jnp.float32, 64, (64, 64), 256, 256), "dtype float32"),
    ((jnp.bfloat16, 96, (64, 64), 256, 256), "head dim 96"),
    ((jnp.bfloat16, 64, (128, 128), 256, 256), "mask tile (128, 128)"),
    ((jnp.bfloat16, 64, (64, 32), 256, 256), "mask tile (64, 32)"),
    ((jnp.bfloat16, 64, (64, 64), 120, 256), "lengths 120/256"),
    ((jnp.bfloat16, 64, (64, 64), 256, 197), "lengths 256/197"),
    ((jnp.bfloat16, 64, (64, 64), None, 256), "per-example lengths"),
])
def test_scope(args, reason):
  assert reason in fwd_block64.unsupported(*args)
  assert fwd_block64.unsupported(jnp.float16, 128, (64, 64), 136, 128) is None
