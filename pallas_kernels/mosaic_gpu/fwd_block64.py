"""Block-sparse attention forward for Hopper on Mosaic GPU at 64x64 mask tiles.

The 128-tile forward (`fwd.py`) gives each 128-row work item one key list,
walked by both compute warpgroups. At 64-token blocks the two 64-row halves
of an item are two rows of the mask with lists of their own (`index` per
64-row query tile over 64-key tiles, full ones first). Here:

- an item is still 128 query rows: two 64-row mask-tile rows, one per
  compute warpgroup (warpgroup 0 owns row A, warpgroup 1 row B), walked
  one *step* at a time; unlike `fwd.py` the two warpgroups do not take
  turns on the tensor cores (no ping-pong): each runs as its barriers
  allow. On random per-head masks turns cost 12% at D=128 and 3% at D=64,
  and gain 2% on dense and 1% on causal masks; choosing them per item cost
  4-7% on those (H200, PERF_NOTES "without turns");
- at step t each warpgroup runs (at most) one 64-key tile of its own list,
  walked in list order: warpgroup 0 its entry t - preA, warpgroup 1 its
  entry t - preB. So each warpgroup still runs its full tiles unmasked and
  then its partial ones masked by `ElementRule`, as loops of their own (no
  branch per step), and an item takes max(preA + countA, preB + countB)
  steps; a warpgroup with no tile at a step (its list is done, or not yet
  begun) only waits for and releases the step's half slots;
- where both rows run the same key tile at a step (dense and causal rows,
  band rows, which are each other's list shifted by one tile) it is loaded
  once and both read it; the shift (preA, preB) in {(0, 0), (0, 1), (1, 0)}
  is chosen per item, by every warpgroup alike, from the first entries of
  both lists (`_item_plan`), so a band whose rows differ by one tile shares
  every tile but the two ends;
- K/V go through a ring of `slots` 64-key *half slots*: a step takes one
  (a shared tile, or one warpgroup's alone) or two (each warpgroup its own
  tile: warpgroup 0 the first, warpgroup 1 the second). Both compute
  warpgroups wait for and release every half slot of every step, whoever
  reads it (a barrier's phases are counted per thread: who waits on a
  barrier waits on all its phases), and the memory warpgroup refills each
  as soon as both released it. With 4 half slots (the shared memory of the
  128 forward's 2 stages of 128 keys) a run of shared steps has four tiles
  in flight, a run of paired steps two.

Which two rows make an item (`pair_rows`): the rows of each (example,
head) sorted by their tile count, longest first (a stable sort, made with
the lists: `BlockLists.longest_first`), paired in that order. Random
per-head masks (the case this kernel is for: the Triton forward at 64x64
tiles ran at 0.66x of the 128 Mosaic forward on the same density) have
rows with independent lists: every step then pairs the two rows' t-th
tiles and an item takes as many steps as its longer row has tiles, so rows
of about the same count go together (at density 0.1 over 128 key tiles
adjacent rows left 14% of the warpgroup steps idle, sorted ones 1%). Rows
of equal count keep their order, so dense rows, causal ones (counts grow
with the row) and the inside of a band still pair with their neighbour and
share its tiles; items run longest first (the persistent programs' load
balance; causal's longest-first order as a special case). A query row's q
is loaded, and its o and lse stored, by its own warpgroup wherever it
lies, so an item's rows need not be adjacent.
`sort_rows=False` pairs rows 2i and 2i + 1 instead (causal items then run
last tile first, as in `fwd.py`).

At D=128 the QK matmul reads q from registers, loaded once per item
(`Q_IN_REGISTERS_HEAD_DIMS`): a 64-key step then reads only K and V from
shared memory.

Everything else follows `fwd.py` (read it first): the persistent schedule
(`common.Schedule`), the q double buffer and the o store through it, where
the previous item's q buffer is released, the online softmax in base 2,
dropout bits
(`pallas_kernels.dropout`), and the scope of lengths: every example's query
and key length at least 128 and a multiple of 8 (padded layout at full
length; a key tile ending past its example reads into the next one and is
masked for length, a query tile ending past it computes on the next one's
rows and stores only its own). With `interpret=True` the
kernel runs in Mosaic GPU's interpreter on the CPU
(`tests/test_hopper_block64_interpret.py`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.pallas.mosaic_gpu.core import SMEM_ALIGNMENT
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu.utils import MBARRIER_BYTES
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import dropout as dropout_bits
from pallas_kernels.block_lists import BlockLists
from pallas_kernels.masking import ElementRule
from pallas_kernels.mosaic_gpu import common, online_softmax
from pallas_kernels.mosaic_gpu.common import (
    COMPUTE_WARPGROUPS, ROW_TILE, ROWS_PER_WARPGROUP, TILE, Schedule,
    persistent_schedule, list_entry, unsupported_shape)
from pallas_kernels.numerics import LOG2_E
from pallas_kernels.seq_info import StaticSizes

MASK_TILE = 64                         # query rows per warpgroup = keys per tile
ITEM_ROWS = COMPUTE_WARPGROUPS * ROWS_PER_WARPGROUP   # 128: two mask-tile rows
MEMORY_WARPGROUP = COMPUTE_WARPGROUPS
NUM_WARPGROUPS = COMPUTE_WARPGROUPS + 1
DEFAULT_SLOTS = 4                      # 64-key half slots of the K/V ring
MIN_SLOTS = 2                          # a step may take two
# List entries of each row compared to choose an item's shift (`_item_plan`).
PROBES = 3
# Head dims whose QK matmul reads q from registers (32 a thread at D=128,
# loaded once per item), so a step reads only K and V from shared memory,
# whose bandwidth the TMA copies share (H200, forward kernel: random
# per-head d=0.1 288 -> 278 µs, dense 2134 -> 1955, causal 1060 -> 1000).
# Not D=64: there QK and PV are both `m64n64k16` with A in registers, and
# ptxas (CUDA 13.0) gives P the registers still holding q, so every step
# after an item's first computes its scores from P (on the GPU every row
# was wrong). `benchmarks/register_operands.py` reads that off the SASS, and
# finds q's registers untouched in every step loop at D=128.
Q_IN_REGISTERS_HEAD_DIMS = (128,)
# Head dims the registry routes here (`unsupported_call`); the kernel itself
# also takes D=64, where the Triton forward at 64x64 tiles is faster (H200,
# B2 S8192 H16 bf16, forward kernel µs, this kernel / Triton: random
# per-head d=0.1 216 / 184, dense 1678 / 1536, causal 870 / 861, local band
# d=0.1 188 / 179). Tests and tools that exercise the kernel at D=64
# through the API widen it.
ROUTED_HEAD_DIMS = (128,)

assert ROWS_PER_WARPGROUP == MASK_TILE and ITEM_ROWS == TILE


def unsupported(dtype, head_dim: int, mask_tile: tuple[int, int],
                q_len: int | None, kv_len: int | None) -> str | None:
  """Why this kernel cannot take a call of this shape, or None if it can
  (lengths: multiples of 8 for the TMA copies into the 8-row tiled shared
  memory, as `fwd.unsupported`, and at least one 128-row item)."""
  reason = unsupported_shape(dtype, head_dim, mask_tile, q_len, kv_len,
                             tile=MASK_TILE,
                             blocks="blocks that are odd multiples of 64")
  if reason is None and (min(q_len, kv_len) < ITEM_ROWS or q_len % ROW_TILE
                         or kv_len % ROW_TILE):
    reason = (f"lengths {q_len}/{kv_len} (takes lengths >= {ITEM_ROWS} that are "
              f"multiples of {ROW_TILE})")
  return reason


def unsupported_call(dtype, head_dim: int, mask_tile: tuple[int, int],
                     static: StaticSizes) -> str | None:
  """`unsupported` for a call of the flat layout, plus the target GPU and
  the head dims the registry routes here (`ROUTED_HEAD_DIMS`)."""
  reason = common.unsupported_call(unsupported, dtype, head_dim, mask_tile,
                                   static)
  if reason is None and head_dim not in ROUTED_HEAD_DIMS:
    reason = (f"head dim {head_dim} (the Triton forward is faster at 64x64 "
              f"tiles; routed here: {ROUTED_HEAD_DIMS})")
  return reason


class _Shared(NamedTuple):
  """A program's shared memory and barriers (allocation specs in
  `_shared_memory`, the references inside the kernel)."""
  q_smem: Any     # [2 buffers, 2 warpgroups, 64, D]: q of an item, then its o
  k_smem: Any     # [slots, 64, D]
  v_smem: Any     # [slots, 64, D]
  lse_smem: Any   # [2 warpgroups, 64] fp32
  q_ready: Any    # [2 buffers * 2 warpgroups]: TMA of a q half landed
  q_free: Any     # [2 buffers]: both warpgroups' o of that buffer left for HBM
  k_ready: Any    # [slots]
  v_ready: Any    # [slots]
  k_free: Any     # [slots]: both compute warpgroups are done with the half slot
  v_free: Any     # [slots]


def _shared_memory(head_dim: int, dtype, slots: int) -> _Shared:
  """What a program allocates in shared memory, as `pl.run_scoped` takes it."""
  kv_ring = common.token_tiles((slots, MASK_TILE, head_dim), dtype,
                               row_major=False)
  return _Shared(
      q_smem=common.token_tiles(
          (2, COMPUTE_WARPGROUPS, ROWS_PER_WARPGROUP, head_dim), dtype,
          row_major=False),
      k_smem=kv_ring,
      v_smem=kv_ring,
      lse_smem=plgpu.SMEM((COMPUTE_WARPGROUPS, ROWS_PER_WARPGROUP), jnp.float32),
      q_ready=plgpu.Barrier(num_barriers=2 * COMPUTE_WARPGROUPS),
      q_free=plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=2),
      k_ready=plgpu.Barrier(num_barriers=slots),
      v_ready=plgpu.Barrier(num_barriers=slots),
      k_free=plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=slots),
      v_free=plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=slots),
  )


def _compiler_params() -> plgpu.CompilerParams:
  return plgpu.CompilerParams(approx_math=True)


def _check_slots(slots: int) -> None:
  if not isinstance(slots, int) or slots < MIN_SLOTS:
    raise ValueError(f"slots must be an int of at least {MIN_SLOTS} (a step "
                     f"may take two half slots), got {slots!r}")


def shared_memory_bytes(head_dim: int, dtype, slots: int = DEFAULT_SLOTS) -> int:
  """Dynamic shared memory one program of `forward` launches with, in bytes.

  Counted as Pallas lays `_shared_memory` out (as `fwd.shared_memory_bytes`):
  each buffer rounded up to `SMEM_ALIGNMENT`, the softmax's cross-warp
  reduction scratch, `MBARRIER_BYTES` per barrier. D=128, 4 half slots: the
  same 192 KiB of buffers as the 128 forward's 2 stages.
  `tests/test_debug_and_tuning.py` checks it against the kernel lowered for
  an H100.
  """
  _check_slots(slots)
  scratch = common.align(_compiler_params().reduction_scratch_bytes,
                         SMEM_ALIGNMENT)
  barriers = 0
  for spec in _shared_memory(head_dim, dtype, slots):
    if isinstance(spec, plgpu.Barrier):
      barriers += math.prod(spec.num_barriers)
    else:
      scratch += common.align(common.spec_bytes(spec), SMEM_ALIGNMENT)
  return scratch + barriers * MBARRIER_BYTES


class _ItemPlan(NamedTuple):
  """How an item walks its two rows' lists (scalars; A: warpgroup 0's row,
  B: warpgroup 1's; `rows`: their mask-tile rows, B = the number of rows
  when the item has none). Row A's entry t - pre[0] and row B's t - pre[1]
  run at step t, for `steps` steps; `first` are the entries of step 0."""
  rows: tuple[Any, Any]
  count: tuple[Any, Any]
  full: tuple[Any, Any]
  pre: tuple[Any, Any]
  steps: Any
  first: tuple[Any, Any]


def pair_rows(lists: BlockLists, sort_rows: bool = True) -> jax.Array:
  """`[Bm, Hm, nQ]` int32: the mask-tile rows of each item, in the order the
  items run (item i: rows 2i and 2i + 1 of the result; with an odd nQ the
  last item has no row B). Sorted: `lists.longest_first` (by count, longest
  first, equal counts in row order, built with the lists: nothing to compute
  per call); else adjacent rows."""
  if sort_rows:
    return lists.longest_first
  num_rows = lists.count.shape[-1]
  return jnp.broadcast_to(jnp.arange(num_rows, dtype=jnp.int32),
                          lists.count.shape)


def _item_plan(rows_ref, count_ref, full_ref, index_ref, batch, head,
               q_tile) -> _ItemPlan:
  """The plan of item `q_tile` (of its (example, head); its rows from
  `pair_rows`), read from the lists; every warpgroup computes the same one.
  An item past the rows' end (the last one of an odd number) has none as
  its row B: `rows` holds the number of rows there.

  The shift: of the alignments (0, 0), B one step later (0, 1) and A one step
  later (1, 0), the one under which the first `PROBES` aligned entries of the
  two rows name the same tile most often (ties: the earlier one), so rows
  that are each other shifted by one tile (bands) share their tiles.
  """
  num_rows, num_cols = index_ref.shape[2:]
  has_b = 2 * q_tile + 1 < num_rows
  row_a = list_entry(rows_ref, batch, head, 2 * q_tile)
  # Row B's entries are read from a real row (of no meaning when it has none).
  row_b = list_entry(rows_ref, batch, head,
                     jnp.minimum(2 * q_tile + 1, num_rows - 1))
  zero = jnp.int32(0)
  count = (list_entry(count_ref, batch, head, row_a),
           jnp.where(has_b, list_entry(count_ref, batch, head, row_b), zero))
  full = (list_entry(full_ref, batch, head, row_a),
          jnp.where(has_b, list_entry(full_ref, batch, head, row_b), zero))
  depth = min(PROBES + 1, num_cols)
  entries = tuple(
      tuple(list_entry(index_ref, batch, head, row, t) for t in range(depth))
      for row in (row_a, row_b))

  def matches(shift_a: int, shift_b: int):
    total = zero
    for t in range(PROBES):
      ta, tb = t + shift_b, t + shift_a     # the later row is the shifted one
      if max(ta, tb) >= depth:
        continue
      same = ((ta < count[0]) & (tb < count[1])
              & (entries[0][ta] == entries[1][tb]))
      total = total + same.astype(jnp.int32)
    return total

  aligned, b_later, a_later = matches(0, 0), matches(0, 1), matches(1, 0)
  pre_b = (b_later > aligned) & (b_later >= a_later)
  pre_a = (a_later > aligned) & (a_later > b_later)
  pre = (pre_a.astype(jnp.int32), pre_b.astype(jnp.int32))
  steps = jnp.maximum(pre[0] + count[0], pre[1] + count[1])
  return _ItemPlan((row_a, jnp.where(has_b, row_b, num_rows)), count, full,
                   pre, steps, (entries[0][0], entries[1][0]))


def _step_entries(index_ref, batch, head, plan: _ItemPlan, t):
  """The list entries rows A and B run at step t (clamped into the lists:
  an entry a row does not run at step t is a value of no meaning)."""
  num_rows, num_cols = index_ref.shape[2:]
  return tuple(
      list_entry(index_ref, batch, head, jnp.minimum(row, num_rows - 1),
                 jnp.clip(t - pre, 0, num_cols - 1))
      for row, pre in zip(plan.rows, plan.pre))


class _Step(NamedTuple):
  """Which rows run a step, and whether it takes two half slots."""
  on: tuple[Any, Any]
  two: Any


def _step(plan: _ItemPlan, t, entries) -> _Step:
  on = tuple((t >= pre) & (t < pre + count)
             for pre, count in zip(plan.pre, plan.count))
  shared = on[0] & on[1] & (entries[0] == entries[1])
  return _Step(on, on[0] & on[1] & jnp.logical_not(shared))


def _ring_position(position, slots: int):
  """The half slot of ring position `position` (>= 0): a bit mask where
  `slots` is a power of two (the default 4), which takes ptxas a third of
  a signed remainder's instructions (the step loop: 552 -> 516 PTX
  instructions, deviceless compile of B2 S8192 H16 D128; H200, random
  per-head masks d=0.1 there: forward kernel 304-306 -> 294-297 µs)."""
  if slots & (slots - 1) == 0:
    return position & (slots - 1)
  return lax.rem(position, jnp.int32(slots))


def _compute_warpgroup(wg, refs, sh: _Shared, schedule: Schedule, *,
                       scale: float, rule: ElementRule, q_len: int, kv_len: int,
                       slots: int, dropout: dropout_bits.Dropout,
                       interpret: bool):
  rows_ref, count_ref, full_ref, index_ref, seed_ref, o_ref, lse_ref = refs
  rows = ROWS_PER_WARPGROUP
  num_rows = index_ref.shape[2]
  dtype = o_ref.dtype
  head_dim = o_ref.shape[-1]
  qk_scale = scale * LOG2_E
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  program, num_items = schedule.items_of_this_program()
  mine = lambda pair: jnp.where(wg == 0, pair[0], pair[1])

  def item_plan(i):
    """Item `i`'s plan (clamped to the last item), and with dropout its
    example's seed."""
    q_tile, head, batch = schedule.item(program, jnp.minimum(i, num_items - 1))
    plan = _item_plan(rows_ref, count_ref, full_ref, index_ref, batch, head,
                      q_tile)
    return plan, ((seed_ref[batch],) if dropout.active else ())

  def each_half_slot(barrier, hp, two, action):
    """`action` on the barrier of each half slot of a step starting at ring
    position `hp` (one, or two when `two`)."""
    action(barrier.at[_ring_position(hp, slots)])

    @pl.when(two)
    def _():
      action(barrier.at[_ring_position(hp + 1, slots)])

  def one_item(i, carry):
    first_hp, (plan, seed) = carry
    q_tile, head, batch = schedule.item(program, i)
    # Read the next item's plan (and seed) now: the loads' latency hides
    # behind this item.
    next_plan = item_plan(i + 1)
    my_row = mine(plan.rows)                       # num_rows: none
    first_row = my_row * rows                      # within the example
    num_steps = plan.steps
    drop_rows = None
    if dropout.active:
      drop_rows = common.query_hashes(dropout_bits.head_seed(seed[0], head),
                                      first_row, rows, row_layout)
    buf = lax.rem(i, jnp.int32(2))
    q_smem = sh.q_smem.at[buf, wg]
    with jax.named_scope("item_start"):
      plgpu.barrier_wait(sh.q_ready.at[buf * COMPUTE_WARPGROUPS + wg])
    # (The interpreter has no wgmma with an operand in registers.)
    q_operand = (plgpu.load(q_smem, layout=plgpu.Layout.WGMMA)
                 if head_dim in Q_IN_REGISTERS_HEAD_DIMS and not interpret
                 else q_smem)

    release_previous = lambda: common.release_q_buffer(sh.q_free, i - 1)

    acc, m, l = online_softmax.initial_state(rows, head_dim)

    with jax.named_scope("item_start"):
      @pl.when(num_steps > 0)
      def _():
        first = _step(plan, jnp.int32(0), plan.first)
        each_half_slot(sh.k_ready, first_hp, first.two, plgpu.barrier_wait)

    def step(kind: str, t, carry):
      """Step t of the item: kind 'full' / 'partial' runs this warpgroup's
      tile of the step (unmasked / masked by element), 'idle' only waits
      and releases (this warpgroup's row has no tile at step t)."""
      acc, m, l, hp, entries = carry
      this = _step(plan, t, entries)
      # The next step's entries: loaded now, needed at this step's end.
      next_entries = _step_entries(index_ref, batch, head, plan, t + 1)
      next_hp = hp + 1 + this.two.astype(jnp.int32)

      def wait_next_keys():
        @pl.when(t + 1 < num_steps)
        def _():
          following = _step(plan, t + 1, next_entries)
          each_half_slot(sh.k_ready, next_hp, following.two, plgpu.barrier_wait)

      def release_slots(free):
        each_half_slot(free, hp, this.two, plgpu.barrier_arrive)

      def wait_values():
        each_half_slot(sh.v_ready, hp, this.two, plgpu.barrier_wait)

      if kind == "idle":
        pl.when((t == 0) & (i > 0))(release_previous)
        release_slots(sh.k_free)
        wait_values()
        wait_next_keys()
        release_slots(sh.v_free)
        return acc, m, l, next_hp, next_entries

      masked = kind == "partial"
      # Warpgroup 1 reads the step's second half slot when it has two.
      slot = _ring_position(
          hp + jnp.where(wg == 1, this.two, False).astype(jnp.int32), slots)
      kv_first = mine(entries) * MASK_TILE

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_operand, sh.k_smem.at[slot].transpose((1, 0)))
        keep = None
        if dropout.active:
          keep = lax.optimization_barrier(keep_mask(kv_first))
        pl.when((t == 0) & (i > 0))(release_previous)
        return acc_ref[...], keep
      with jax.named_scope("qk"):
        s, keep = pl.run_scoped(qk, plgpu.ACC((rows, MASK_TILE), jnp.float32))
        release_slots(sh.k_free)
      with jax.named_scope("softmax"):
        acc, m_new, l, p16 = softmax(masked, kv_first, s, acc, m, l, keep)
      with jax.named_scope("wait_values"):
        wait_values()

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, sh.v_smem.at[slot])
        wait_next_keys()
      with jax.named_scope("pv"):
        if interpret:
          # Mosaic GPU's interpreter has no wgmma with an operand in registers.
          acc = acc + jnp.dot(p16, sh.v_smem.at[slot][...],
                              preferred_element_type=jnp.float32)
          wait_next_keys()
        else:
          acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        release_slots(sh.v_free)
      return acc, m_new, l, next_hp, next_entries

    def keep_mask(kv_first):
      """The dropout mask of the tile starting at key `kv_first`, as 16-bit
      masks to AND with p's half-precision bits (`common.keep_mask`)."""
      return common.keep_mask(drop_rows, kv_first, (rows, MASK_TILE), dropout)

    def softmax(masked, kv_first, s, acc, m, l, keep):
      """The online softmax of the score tile starting at key `kv_first`
      (`online_softmax.softmax_tile`), masked by element when the tile is
      partial."""
      valid = None
      if masked:
        valid = common.partial_tile_mask(
            rule, first_row, kv_first, (rows, MASK_TILE), q_len=q_len,
            kv_len=kv_len, batch=batch, head=head)
      return online_softmax.softmax_tile(
          s, acc, m, l, qk_scale=qk_scale, dtype=dtype, valid=valid,
          keep=keep, interpret=interpret)

    # This warpgroup's steps: idle until its row's list begins, its full
    # tiles, its partial tiles, idle once the list is done.
    pre, full, count = mine(plan.pre), mine(plan.full), mine(plan.count)
    carry = (acc, m, l, first_hp, plan.first)
    carry = lax.fori_loop(0, pre, functools.partial(step, "idle"), carry)
    carry = lax.fori_loop(pre, pre + full, functools.partial(step, "full"), carry)
    if rule.masks_inside_lengths or kv_len % MASK_TILE:
      carry = lax.fori_loop(pre + full, pre + count,
                            functools.partial(step, "partial"), carry)
    carry = lax.fori_loop(pre + count, num_steps,
                          functools.partial(step, "idle"), carry)
    acc, m, l, next_hp, _ = carry
    with jax.named_scope("epilogue"):
      pl.when((num_steps == 0) & (i > 0))(release_previous)

      online_softmax.finish(
          acc, m, l, o_smem=q_smem, lse_smem=sh.lse_smem.at[wg],
          out_scale=dropout.keep_scale)
      plgpu.commit_smem()
      flat_row = batch * q_len + first_row
      # An example's last row may end inside it: stored by exact count
      # (static, a multiple of 8). The row of an item without a second row
      # stores no o (its lse goes to the padding).
      last = q_len - (num_rows - 1) * rows
      whole = my_row < (num_rows if last == rows else num_rows - 1)
      if last < rows:
        @pl.when(my_row == num_rows - 1)
        def _():
          plgpu.copy_smem_to_gmem(q_smem.at[pl.ds(0, last)],
                                  o_ref.at[pl.ds(flat_row, last), head])
      @pl.when(whole)
      def _():
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[pl.ds(flat_row, rows), head])
      plgpu.copy_smem_to_gmem(sh.lse_smem.at[wg],
                              lse_ref.at[head, batch, pl.ds(first_row, rows)])
    return next_hp, next_plan

  lax.fori_loop(0, num_items, one_item,
                (jnp.int32(0), item_plan(0)))
  common.release_q_buffer(sh.q_free, num_items - 1)
  plgpu.wait_smem_to_gmem(0)


def _memory_warpgroup(refs, sh: _Shared, schedule: Schedule, *, q_len: int,
                      kv_len: int, group: int, slots: int):
  rows_ref, count_ref, full_ref, index_ref, q_ref, k_ref, v_ref = refs
  program, num_items = schedule.items_of_this_program()
  num_rows = index_ref.shape[2]

  def load(hp, tile, batch, kv_head):
    """K and V of key tile `tile` into the half slot at ring position `hp`
    (once both compute warpgroups released its previous tile). Keys past
    the example's end (next example / zeros) are masked."""
    slot = _ring_position(hp, slots)
    window = (pl.ds(batch * kv_len + tile * MASK_TILE, MASK_TILE), kv_head)
    for src, ring, ready, free, region in (
        (k_ref, sh.k_smem, sh.k_ready, sh.k_free, "k_free_wait"),
        (v_ref, sh.v_smem, sh.v_ready, sh.v_free, "v_free_wait")):
      with jax.named_scope(region):
        pl.when(hp >= slots)(lambda free=free: plgpu.barrier_wait(free.at[slot]))
      plgpu.copy_gmem_to_smem(src.at[window], ring.at[slot], ready.at[slot])

  def one_item(i, first_hp):
    q_tile, head, batch = schedule.item(program, i)
    kv_head = lax.div(head, jnp.int32(group))
    plan = _item_plan(rows_ref, count_ref, full_ref, index_ref, batch, head,
                      q_tile)
    buf = lax.rem(i, jnp.int32(2))

    with jax.named_scope("q_free_wait"):
      @pl.when(i >= 2)
      def _():
        plgpu.barrier_wait(sh.q_free.at[buf])
    for wg in range(COMPUTE_WARPGROUPS):
      # A row ending inside its example reads the next example's first rows
      # (their output is never stored) or, at the array's end, zeros; an
      # item without a second row reads its last row again (never stored).
      row = (batch * q_len
             + jnp.minimum(plan.rows[wg], num_rows - 1) * ROWS_PER_WARPGROUP)
      plgpu.copy_gmem_to_smem(
          q_ref.at[pl.ds(row, ROWS_PER_WARPGROUP), head],
          sh.q_smem.at[buf, wg],
          sh.q_ready.at[buf * COMPUTE_WARPGROUPS + wg])

    def one_step(t, carry):
      hp, entries = carry
      this = _step(plan, t, entries)
      # The step's first half slot: row A's tile, or row B's when A has none
      # at this step; the second (when two): row B's.
      load(hp, jnp.where(this.on[0], entries[0], entries[1]), batch, kv_head)
      pl.when(this.two)(lambda: load(hp + 1, entries[1], batch, kv_head))
      return (hp + 1 + this.two.astype(jnp.int32),
              _step_entries(index_ref, batch, head, plan, t + 1))

    hp, _ = lax.fori_loop(0, plan.steps, one_step, (first_hp, plan.first))
    return hp

  num_hp = lax.fori_loop(0, num_items, one_item, jnp.int32(0))
  # Wait for the releases no refill waited for (the last two q buffers, the
  # last `slots` half slots), so the program ends with every barrier phase seen.
  for back in (2, 1):
    item = num_items - back
    pl.when(item >= 0)(lambda item=item: plgpu.barrier_wait(
        sh.q_free.at[lax.rem(item, jnp.int32(2))]))
  for back in range(slots, 0, -1):
    hp = num_hp - back
    @pl.when(hp >= 0)
    def _():
      plgpu.barrier_wait(sh.k_free.at[_ring_position(hp, slots)])
      plgpu.barrier_wait(sh.v_free.at[_ring_position(hp, slots)])


def forward(q: jax.Array, k: jax.Array, v: jax.Array, lists: BlockLists, *,
            softmax_scale: float, rule: ElementRule, q_len: int, kv_len: int,
            dropout: dropout_bits.Dropout = dropout_bits.Dropout(),
            seeds: jax.Array | None = None, slots: int = DEFAULT_SLOTS,
            sort_rows: bool = True, num_programs: int | None = None,
            interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Block-sparse attention forward on flat sequences of equal length, at
  64x64 mask tiles.

  Args:
    q: `[B * q_len, H, D]`; k, v: `[B * kv_len, Hkv, D]`, `H % Hkv == 0`.
    lists: the forward lists at 64x64 mask tiles (`[Bm, Hm, nQ]` counts,
      full counts and rows longest first, `[Bm, Hm, nQ, nK]` indices;
      nQ = ceil(q_len / 64)).
    rule: how partial tiles mask elements (lengths, causal, mask_fn).
    q_len, kv_len: tokens per example, at least 128, multiples of 8.
    dropout, seeds: attention dropout, as `fwd.forward`.
    slots: 64-key half slots of the K/V ring (at least 2).
    sort_rows: pair rows of about the same tile count (`pair_rows`), items
      longest first; False: adjacent rows.
    num_programs: persistent programs (default: one per SM of the target).
    interpret: run in Mosaic GPU's interpreter on the CPU.
  Returns:
    o `[B * q_len, H, D]` in q's dtype and lse `[H, B * q_len]` fp32 (natural
    log, -inf for rows with no visible key), as the Triton forward.
  """
  tq, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[1]
  reason = unsupported(q.dtype, head_dim, (MASK_TILE, MASK_TILE), q_len, kv_len)
  if reason is not None:
    raise ValueError(f"the 64-tile Mosaic GPU forward cannot take {reason}")
  _check_slots(slots)
  if num_programs is not None and num_programs < 1:
    raise ValueError(f"num_programs must be at least 1, got {num_programs}")
  num_rows, num_cols = lists.index.shape[2:]
  if (num_rows, num_cols) != (pl.cdiv(q_len, MASK_TILE), pl.cdiv(kv_len, MASK_TILE)):
    raise ValueError(
        f"lists of {num_rows} x {num_cols} tiles do not match 64x64 tiles of "
        f"lengths {q_len}/{kv_len}")
  batch = tq // q_len
  seeds = common.dropout_seeds(dropout, seeds, batch)
  group = num_heads // num_kv_heads
  dtype = q.dtype
  num_q_tiles = pl.cdiv(q_len, ITEM_ROWS)     # items per (example, head)
  # Sorted rows run longest first already; adjacent causal ones last first.
  schedule = persistent_schedule(num_q_tiles, num_heads, batch, num_programs,
                                 causal=rule.causal,
                                 reverse=rule.causal and not sort_rows)
  rows = pair_rows(lists, sort_rows)

  def body(rows_ref, count_ref, full_ref, index_ref, *refs):
    seed_ref = refs[0] if dropout.active else None
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs[int(dropout.active):]
    wg = lax.axis_index("wg")

    def program(*smem):
      sh = _Shared(*smem)

      @pl.when(wg < COMPUTE_WARPGROUPS)
      def _():
        plgpu.set_max_registers(232, action="increase")
        _compute_warpgroup(
            wg, (rows_ref, count_ref, full_ref, index_ref, seed_ref, o_ref,
                 lse_ref), sh,
            schedule, scale=softmax_scale, rule=rule, q_len=q_len,
            kv_len=kv_len, slots=slots, dropout=dropout, interpret=interpret)

      @pl.when(wg == MEMORY_WARPGROUP)
      def _():
        plgpu.set_max_registers(40, action="decrease")
        _memory_warpgroup((rows_ref, count_ref, full_ref, index_ref, q_ref,
                           k_ref, v_ref), sh, schedule, q_len=q_len, kv_len=kv_len, group=group,
                          slots=slots)

    pl.run_scoped(
        program,
        *_shared_memory(head_dim, dtype, slots),
        collective_axes="wg",
    )

  o, lse = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((num_heads, batch, num_q_tiles * ITEM_ROWS),
                                     jnp.float32)),
      grid=(schedule.num_programs,),
      grid_names=("p",),
      num_threads=NUM_WARPGROUPS,
      thread_name="wg",
      compiler_params=_compiler_params(),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(rows, *lists.walked, *((seeds,) if dropout.active else ()), q, k, v)
  return o, lse[:, :, :q_len].reshape(num_heads, tq)
