"""Block-sparse attention forward for Hopper on Mosaic GPU (warp-specialized, TMA).

The Triton forward (`pallas_kernels/triton/fwd.py`) runs every step of its key loop in the same
warps, and each program pays its own pipeline fill and drain (~7 us, a third of
a local-window forward at S=8192). Here the work is split over three
warpgroups of a persistent program (one per SM, looping over work items =
(128-row query tile, head, example)):

- two *compute* warpgroups own 64 query rows each and walk the item's key list;
  a shared barrier makes them take turns, so one's softmax overlaps the other's
  matmuls on the tensor cores (the FlashAttention-3 ping-pong);
- one *memory* warpgroup reads the same lists and issues TMA copies: each
  item's q into one of two buffers, then its listed K and V tiles into a ring of
  `stages` shared-memory slots. It runs ahead across item boundaries, so the next
  item's q and first K/V tiles land while the compute warpgroups finish the
  current item and write its o.

An item's o goes out through its q buffer (TMA store); the compute warpgroups
wait for that store to leave shared memory only at the next item's first
matmul, and read each item's key counts one item ahead, so little of an item's
end stays on the critical path (a local window at S=8192 has ~7 key tiles per
item: the per-item cost shows).

Both compute warpgroups consume every slot, so a slot is refilled once both have
released it. Full tiles run with no element mask; partial ones (the causal
diagonal, a token predicate that holds only somewhere, a key tail) are masked
by `pallas_kernels.masking.ElementRule`. Attention dropout
(`pallas_kernels.dropout`, the Triton kernels' and the reference's bits) is
applied to p before the P @ V matmul on full and partial tiles alike: each
compute warpgroup hashes its rows once per item (the example's seed, read
one item ahead from a `[B]` seed array, the head and the query position)
and each element costs a few integer operations of row hash and key
position (`dropout.keep`), hashed while the tile's QK matmul runs and
applied to p's half-precision bits as a mask; the row sum l keeps every
probability and the 1 / (1 - rate) scale is folded into the epilogue's
1 / l. The hash is integer ALU work in the softmax warpgroups: with a
full second finalizer per element (11 int32 operations) it cost about as
much as the rest of a step on an H200 (dense S=8192 D=128: 0.84 ms without
dropout, about 1.5 ms with); `dropout.keep` now takes 5. Scope, checked by
`unsupported`: fp16/bf16, head dim 64 or 128, 128x128 mask tiles, the
padded layout without per-example lengths, any length at D=64 (TMA copies
through a row-major alias of the tiles, `common.row_major_copies`) and
multiples of 8 at D=128. A length that is not a multiple of 128 is addressed
through `[B, S, H, D]` views (`common.token_view`), so TMA zero-fills the
rows a tail tile reads past its example's end (keys there are masked by
`ElementRule`'s length test, such queries are computed on zeros) and drops
the rows of o stored there; lengths that are multiples of 128 keep the flat
arrays and no tile is masked for length. Anything else runs on the Triton
forward. With `interpret=True` the kernel runs in Mosaic GPU's interpreter
on the CPU (warpgroups as threads, barriers and copies as on the GPU), which
is how the tests check its schedule and synchronization without a GPU; the
GPU checks the compiled kernel's numerics.
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
from jax.experimental.mosaic.gpu import profiler as mgpu_profiler
from jax.experimental.mosaic.gpu.utils import MBARRIER_BYTES, WARPGROUP_SIZE
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import dropout as dropout_bits
from pallas_kernels.block_lists import BlockLists
from pallas_kernels.masking import ElementRule
from pallas_kernels.mosaic_gpu import common, online_softmax
from pallas_kernels.mosaic_gpu.common import (
    COMPUTE_WARPGROUPS, ROWS_PER_WARPGROUP, TILE, Schedule, align,
    persistent_schedule, flat_tokens, list_entry, rendezvous, token_rows,
    token_view, unsupported_lengths, unsupported_shape)
from pallas_kernels.numerics import LOG2_E
from pallas_kernels.seq_info import StaticSizes

MEMORY_WARPGROUP = COMPUTE_WARPGROUPS
NUM_WARPGROUPS = COMPUTE_WARPGROUPS + 1
DEFAULT_STAGES = 2
# Regions a profiled call records per warpgroup (each takes 16 bytes of shared
# memory; 512 leave room beside the D=128 buffers).
PROFILE_RANGES = 512


def unsupported(dtype, head_dim: int, mask_tile: tuple[int, int],
                q_len: int | None, kv_len: int | None) -> str | None:
  """Why this kernel cannot take a call of this shape, or None if it can.

  Lengths: any at D=64, multiples of 8 at D=128
  (`common.unsupported_lengths`).
  """
  return (unsupported_shape(dtype, head_dim, mask_tile, q_len, kv_len)
          or unsupported_lengths(q_len, kv_len, head_dim, dtype))


def unsupported_call(dtype, head_dim: int, mask_tile: tuple[int, int],
                     static: StaticSizes) -> str | None:
  """`unsupported` for a call of the flat layout, plus the target GPU: every
  example at its full padded length, traced for a Hopper GPU."""
  return common.unsupported_call(unsupported, dtype, head_dim, mask_tile, static)


class _Shared(NamedTuple):
  """A program's shared memory and barriers (allocation specs in
  `_shared_memory`, the references inside the kernel)."""
  q_smem: Any     # [2 buffers, 2 warpgroups, 64, D]: q of an item, then its o
  k_smem: Any     # [stages, 128, D]
  v_smem: Any     # [stages, 128, D]
  lse_smem: Any   # [2 warpgroups, 64] fp32
  q_ready: Any    # [2 buffers * 2 warpgroups]: TMA of a q half landed
  q_free: Any     # [2 buffers]: both warpgroups' o of that buffer left for HBM
  k_ready: Any    # [stages]
  v_ready: Any    # [stages]
  k_free: Any     # [stages]: both compute warpgroups are done with the slot
  v_free: Any     # [stages]
  turn: Any       # the compute warpgroups' ping-pong


class _CopyViews(NamedTuple):
  """The views TMA copies of q (and o), k and v go through (`common.tile_views`)."""
  q: Any
  k: Any
  v: Any


def _split_views(sh: _Shared, row_major: bool) -> tuple[_Shared, _CopyViews]:
  """The allocated buffers as wgmma reads them, and their copy views."""
  (q, q_copy), (k, k_copy), (v, v_copy) = (
      common.tile_views(ref, row_major)
      for ref in (sh.q_smem, sh.k_smem, sh.v_smem))
  return sh._replace(q_smem=q, k_smem=k, v_smem=v), _CopyViews(q_copy, k_copy, v_copy)


def _shared_memory(head_dim: int, dtype, stages: int, row_major: bool) -> _Shared:
  """What a program allocates in shared memory, as `pl.run_scoped` takes it
  (`row_major`: token tiles with a row-major copy alias, `common.token_tiles`)."""
  kv_ring = common.token_tiles((stages, TILE, head_dim), dtype, row_major)
  return _Shared(
      q_smem=common.token_tiles(
          (2, COMPUTE_WARPGROUPS, ROWS_PER_WARPGROUP, head_dim), dtype, row_major),
      k_smem=kv_ring,
      v_smem=kv_ring,
      lse_smem=plgpu.SMEM((COMPUTE_WARPGROUPS, ROWS_PER_WARPGROUP), jnp.float32),
      q_ready=plgpu.Barrier(num_barriers=2 * COMPUTE_WARPGROUPS),
      q_free=plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=2),
      k_ready=plgpu.Barrier(num_barriers=stages),
      v_ready=plgpu.Barrier(num_barriers=stages),
      k_free=plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),
      v_free=plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),
      turn=plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),
  )


def _compiler_params(profile_dir: str) -> plgpu.CompilerParams:
  return plgpu.CompilerParams(
      approx_math=True, profile_space=PROFILE_RANGES if profile_dir else 0,
      profile_dir=profile_dir, profile_bounds_check=bool(profile_dir))


def shared_memory_bytes(head_dim: int, dtype, stages: int = DEFAULT_STAGES,
                        profile_dir: str = "") -> int:
  """Dynamic shared memory one program of `forward` launches with, in bytes.

  Counted as Pallas lays `_shared_memory` out: each buffer rounded up to
  `SMEM_ALIGNMENT`, plus the scratch the softmax's cross-warp row reductions
  reserve (the compiler params' `reduction_scratch_bytes`), then
  `MBARRIER_BYTES` per barrier and, when profiling, the profiler's event
  buffer of every warpgroup (8-byte aligned). `tests/test_debug_and_tuning.py`
  checks it against the size in the kernel lowered for an H100.
  """
  params = _compiler_params(profile_dir)
  scratch = align(params.reduction_scratch_bytes, SMEM_ALIGNMENT)
  barriers = 0
  for spec in _shared_memory(head_dim, dtype, stages, row_major=False):
    if isinstance(spec, plgpu.Barrier):
      barriers += math.prod(spec.num_barriers)
    else:
      scratch += align(common.spec_bytes(spec), SMEM_ALIGNMENT)
  total = scratch + barriers * MBARRIER_BYTES
  if params.profile_space:
    # Each profiled region is two events of two 32-bit entries.
    spec = mgpu_profiler.ProfilerSpec(params.profile_space * 2 * 2)
    total = align(total, 8) + spec.smem_bytes(
        block=(NUM_WARPGROUPS * WARPGROUP_SIZE, 1, 1))
  return total


def _compute_warpgroup(wg, refs, sh: _Shared, copies: _CopyViews,
                       schedule: Schedule, *,
                       scale: float, rule: ElementRule, q_len: int, kv_len: int,
                       stages: int, dropout: dropout_bits.Dropout,
                       interpret: bool):
  count_ref, full_ref, index_ref, seed_ref, o_ref, lse_ref = refs
  rows = ROWS_PER_WARPGROUP
  dtype = o_ref.dtype
  head_dim = o_ref.shape[-1]
  qk_scale = scale * LOG2_E
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  program, num_items = schedule.items_of_this_program()

  def key_counts(i):
    """(listed, full) key tiles of item `i` (clamped to the last item), and
    with dropout its example's seed."""
    q_tile, head, batch = schedule.item(program, jnp.minimum(i, num_items - 1))
    counts = (list_entry(count_ref, batch, head, q_tile),
              list_entry(full_ref, batch, head, q_tile))
    return counts + ((seed_ref[batch],) if dropout.active else ())

  def one_item(i, carry):
    first_step, (num_all, num_full, *seed), met = carry
    q_tile, head, batch = schedule.item(program, i)
    # Read the next item's counts (and seed) now: the load's latency hides
    # behind this item.
    next_counts = key_counts(i + 1)
    first_row = q_tile * TILE + wg * rows          # within the example
    drop_rows = None
    if dropout.active:
      # Each row's half of the dropout hash, once per item (two rows per
      # thread); an element then costs a few operations (`common.keep_mask`).
      drop_rows = common.query_hashes(dropout_bits.head_seed(seed[0], head),
                                      first_row, rows, row_layout)
    buf = lax.rem(i, jnp.int32(2))
    q_smem = sh.q_smem.at[buf, wg]
    with jax.named_scope("item_start"):
      plgpu.barrier_wait(sh.q_ready.at[buf * COMPUTE_WARPGROUPS + wg])

    # The previous item's stores are waited for at this item's first QK
    # matmul (or before its epilogue, if it has no key), not right after they
    # were issued: by then the copy engine is long done.
    release_previous = lambda: common.release_q_buffer(sh.q_free, i - 1)

    acc, m, l = online_softmax.initial_state(rows, head_dim)

    with jax.named_scope("item_start"):
      @pl.when(num_all > 0)
      def _():
        plgpu.barrier_wait(sh.k_ready.at[lax.rem(first_step, jnp.int32(stages))])
    # Warpgroup 1 starts the item one meeting behind, so the two alternate;
    # warpgroup 0 makes up that meeting after the item's epilogue. The offset
    # does not run on into an item without keys: a warpgroup waiting on the
    # other there could not release its q buffer, which the item after may
    # need. (`met`: warpgroup 1 made this meeting at the end of the previous
    # item, see `met_next`.)
    pl.when((wg == 1) & (num_all > 0) & jnp.logical_not(met))(
        functools.partial(rendezvous, sh.turn))

    def first_key(t):
      return list_entry(index_ref, batch, head, q_tile, t) * TILE

    def step(masked: bool, t, carry):
      acc, m, l, *kv_carry = carry
      slot = lax.rem(first_step + t, jnp.int32(stages))
      if dropout.active:
        # Every tile's first key is needed right after its QK matmul is
        # issued: each step reads the next step's (clamped to the item's
        # last) so the global-memory load's latency hides behind this step.
        kv_first, = kv_carry
        kv_carry = [first_key(jnp.minimum(t + 1, num_all - 1))]
      else:
        # A partial tile's position is read before its QK matmul, so the
        # global-memory load's latency hides behind the matmul.
        kv_first = first_key(t) if masked else None

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, sh.k_smem.at[slot].transpose((1, 0)))
        keep = None
        if dropout.active:
          # The tile's dropout mask is hashed while the matmul runs (the
          # barrier keeps it ahead of the waits below).
          keep = lax.optimization_barrier(keep_mask(kv_first))
        pl.when((t == 0) & (i > 0))(release_previous)
        rendezvous(sh.turn)
        return acc_ref[...], keep
      with jax.named_scope("qk"):
        s, keep = pl.run_scoped(qk, plgpu.ACC((rows, TILE), jnp.float32))
        plgpu.barrier_arrive(sh.k_free.at[slot])
      with jax.named_scope("softmax"):
        acc, m_new, l, p16 = softmax(masked, kv_first, s, acc, m, l, keep)
      with jax.named_scope("turn"):
        plgpu.barrier_arrive(sh.turn)
        plgpu.barrier_wait(sh.v_ready.at[slot])
        plgpu.barrier_wait(sh.turn)

      def wait_next_keys():
        @pl.when(t + 1 < num_all)
        def _():
          next_slot = lax.rem(first_step + t + 1, jnp.int32(stages))
          plgpu.barrier_wait(sh.k_ready.at[next_slot])

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
        plgpu.barrier_arrive(sh.v_free.at[slot])
      return acc, m_new, l, *kv_carry

    def keep_mask(kv_first):
      """The dropout mask of the tile starting at key `kv_first`, as 16-bit
      masks to AND with p's half-precision bits (`common.keep_mask`)."""
      return common.keep_mask(drop_rows, kv_first, (rows, TILE), dropout)

    def softmax(masked, kv_first, s, acc, m, l, keep):
      """The online softmax of the score tile starting at key `kv_first`
      (`online_softmax.softmax_tile`), masked by element when the tile is
      partial."""
      valid = None
      if masked:
        valid = common.partial_tile_mask(
            rule, first_row, kv_first, (rows, TILE), q_len=q_len,
            kv_len=kv_len, batch=batch, head=head)
      return online_softmax.softmax_tile(
          s, acc, m, l, qk_scale=qk_scale, dtype=dtype, valid=valid,
          keep=keep, interpret=interpret)

    # With dropout the carry holds the next step's first key (see `step`).
    carry = (acc, m, l, *((first_key(0),) if dropout.active else ()))
    carry = lax.fori_loop(0, num_full, functools.partial(step, False), carry)
    if rule.masks_inside_lengths or kv_len % TILE:
      carry = lax.fori_loop(num_full, num_all, functools.partial(step, True),
                            carry)
    acc, m, l, *_ = carry
    # Between two items with keys, warpgroup 1 makes the next item's opening
    # meeting before its epilogue, which then runs beside warpgroup 0's first
    # softmax of the next item. Safe only then: this item's first QK released
    # the q buffer warpgroup 0 waits for next, and warpgroup 0 meets at the
    # next item's first QK. Were the next item keyless, warpgroup 0 would
    # wait for the q of the item after it, whose buffer warpgroup 1 releases
    # only after this meeting.
    met_next = (num_all > 0) & (next_counts[0] > 0) & (i + 1 < num_items)
    pl.when((wg == 1) & met_next)(functools.partial(rendezvous, sh.turn))
    with jax.named_scope("epilogue"):
      pl.when((num_all == 0) & (i > 0))(release_previous)

      online_softmax.finish(
          acc, m, l, o_smem=q_smem, lse_smem=sh.lse_smem.at[wg],
          out_scale=dropout.keep_scale)
      plgpu.commit_smem()
      # Rows of a tail tile past the example's end are dropped by TMA (o is
      # a [B, S, H, D] view when q_len is not a multiple of 128).
      plgpu.copy_smem_to_gmem(
          copies.q.at[buf, wg],
          token_rows(o_ref, q_len, batch, first_row, rows, head))
      plgpu.copy_smem_to_gmem(sh.lse_smem.at[wg],
                              lse_ref.at[head, batch, pl.ds(first_row, rows)])
    # Warpgroup 0's closing meeting comes after its epilogue, which so runs
    # beside warpgroup 1's last softmax.
    pl.when((wg == 0) & (num_all > 0))(functools.partial(rendezvous, sh.turn))
    return first_step + num_all, next_counts, met_next

  lax.fori_loop(0, num_items, one_item,
                (jnp.int32(0), key_counts(0), jnp.bool_(False)))
  common.release_q_buffer(sh.q_free, num_items - 1)
  plgpu.wait_smem_to_gmem(0)


def _memory_warpgroup(refs, sh: _Shared, copies: _CopyViews, schedule: Schedule,
                      *, q_len: int, kv_len: int, group: int, stages: int):
  count_ref, index_ref, q_ref, k_ref, v_ref = refs
  program, num_items = schedule.items_of_this_program()

  def one_item(i, first_step):
    q_tile, head, batch = schedule.item(program, i)
    kv_head = lax.div(head, jnp.int32(group))
    num_all = list_entry(count_ref, batch, head, q_tile)
    buf = lax.rem(i, jnp.int32(2))

    with jax.named_scope("q_free_wait"):
      @pl.when(i >= 2)
      def _():
        plgpu.barrier_wait(sh.q_free.at[buf])
    for wg in range(COMPUTE_WARPGROUPS):
      # Rows of a tail tile past the example's end read as zeros (q is a
      # [B, S, H, D] view when q_len is not a multiple of 128); their output
      # is never stored.
      first_row = q_tile * TILE + wg * ROWS_PER_WARPGROUP
      plgpu.copy_gmem_to_smem(
          token_rows(q_ref, q_len, batch, first_row, ROWS_PER_WARPGROUP, head),
          copies.q.at[buf, wg],
          sh.q_ready.at[buf * COMPUTE_WARPGROUPS + wg])

    @pl.loop(0, num_all)
    def _(t):
      step = first_step + t
      slot = lax.rem(step, jnp.int32(stages))
      # Keys past the example's end read as zeros and are masked.
      first_key = list_entry(index_ref, batch, head, q_tile, t) * TILE
      refill = step >= stages
      for src, ring, ready, free, region in (
          (k_ref, copies.k, sh.k_ready, sh.k_free, "k_free_wait"),
          (v_ref, copies.v, sh.v_ready, sh.v_free, "v_free_wait")):
        with jax.named_scope(region):
          pl.when(refill)(lambda free=free: plgpu.barrier_wait(free.at[slot]))
        plgpu.copy_gmem_to_smem(
            token_rows(src, kv_len, batch, first_key, TILE, kv_head),
            ring.at[slot], ready.at[slot])
    return first_step + num_all

  num_steps = lax.fori_loop(0, num_items, one_item, jnp.int32(0))
  # Wait for the releases no refill waited for (the last two q buffers, the
  # last `stages` slots), so the program ends with every barrier phase seen.
  for back in (2, 1):
    item = num_items - back
    pl.when(item >= 0)(lambda item=item: plgpu.barrier_wait(
        sh.q_free.at[lax.rem(item, jnp.int32(2))]))
  for back in range(stages, 0, -1):
    step = num_steps - back
    @pl.when(step >= 0)
    def _():
      plgpu.barrier_wait(sh.k_free.at[lax.rem(step, jnp.int32(stages))])
      plgpu.barrier_wait(sh.v_free.at[lax.rem(step, jnp.int32(stages))])


def forward(q: jax.Array, k: jax.Array, v: jax.Array, lists: BlockLists, *,
            softmax_scale: float, rule: ElementRule, q_len: int, kv_len: int,
            dropout: dropout_bits.Dropout = dropout_bits.Dropout(),
            seeds: jax.Array | None = None,
            stages: int = DEFAULT_STAGES, num_programs: int | None = None,
            interpret: bool = False, profile_dir: str = ""
            ) -> tuple[jax.Array, jax.Array]:
  """Block-sparse attention forward on flat sequences of equal length.

  Args:
    q: `[B * q_len, H, D]`; k, v: `[B * kv_len, Hkv, D]`, `H % Hkv == 0`.
    lists: the forward lists at 128x128 mask tiles (`[Bm, Hm, nQ]` counts,
      `[Bm, Hm, nQ, nK]` indices).
    rule: how partial tiles mask elements (lengths, causal, mask_fn).
    q_len, kv_len: tokens per example (multiples of 8 at D=128).
    dropout: attention dropout (`pallas_kernels.dropout`: the same keep bits
      as the Triton kernels and the reference; the lse is the one before
      dropout).
    seeds: `[B]` int32 per-example dropout seeds (seq_info's SEED column);
      needed when dropout is active, else unused.
    stages: K/V tiles in flight (shared-memory ring slots).
    num_programs: persistent programs (default: one per SM of the target).
    interpret: run in Mosaic GPU's interpreter on the CPU (tests: every
      barrier, copy and item of the schedule as on the GPU, with the P @ V
      product as a plain dot, since the interpreter has no wgmma with a
      register operand).
    profile_dir: when set, each call writes a trace of the named regions
      (`item_start`, `qk`, `softmax`, `turn`, `pv`, `epilogue`; the memory
      warpgroup's `*_wait`) per warpgroup and program into this directory
      (Mosaic GPU's on-device profiler, SM clock cycles; the first
      `PROFILE_RANGES` regions of each warpgroup). For finding where time
      goes (`benchmarks/profile_hopper.py`), not for production.
  Returns:
    o `[B * q_len, H, D]` in q's dtype and lse `[H, B * q_len]` fp32 (natural
    log, -inf for rows with no visible key), as the Triton forward.
  """
  tq, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[1]
  reason = unsupported(q.dtype, head_dim, (TILE, TILE), q_len, kv_len)
  if reason is not None:
    raise ValueError(f"the Mosaic GPU forward cannot take {reason}")
  if num_programs is not None and num_programs < 1:
    raise ValueError(f"num_programs must be at least 1, got {num_programs}")
  batch = tq // q_len
  seeds = common.dropout_seeds(dropout, seeds, batch)
  group = num_heads // num_kv_heads
  dtype = q.dtype
  num_q_tiles = pl.cdiv(q_len, TILE)
  schedule = persistent_schedule(num_q_tiles, num_heads, batch, num_programs,
                                 causal=rule.causal, reverse=rule.causal)

  # Token tiles travel through a row-major alias where they can (any row
  # offset: any length at D=64).
  row_major = common.copies_through_alias(head_dim, dtype, interpret)

  def body(count_ref, full_ref, index_ref, *refs):
    # The seeds are an input only with dropout.
    seed_ref = refs[0] if dropout.active else None
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs[int(dropout.active):]
    wg = lax.axis_index("wg")

    def program(*smem):
      sh, copies = _split_views(_Shared(*smem), row_major)

      @pl.when(wg < COMPUTE_WARPGROUPS)
      def _():
        plgpu.set_max_registers(232, action="increase")
        _compute_warpgroup(
            wg, (count_ref, full_ref, index_ref, seed_ref, o_ref, lse_ref), sh,
            copies, schedule, scale=softmax_scale, rule=rule, q_len=q_len,
            kv_len=kv_len, stages=stages, dropout=dropout,
            interpret=interpret)

      @pl.when(wg == MEMORY_WARPGROUP)
      def _():
        plgpu.set_max_registers(40, action="decrease")
        _memory_warpgroup((count_ref, index_ref, q_ref, k_ref, v_ref), sh,
                          copies, schedule, q_len=q_len, kv_len=kv_len,
                          group=group, stages=stages)

    pl.run_scoped(
        program,
        *_shared_memory(head_dim, dtype, stages, row_major),
        collective_axes="wg",
    )

  # Lengths that are not multiples of 128: [B, S, H, D] views, whose TMA
  # boxes end at each example's end.
  q_view = token_view(q, q_len)
  # lse rows are padded to whole tiles per example (a TMA copy of 32-bit
  # values needs 16-byte multiples, so exact-count stores are out) and
  # sliced back below.
  o, lse = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct(q_view.shape, dtype),
                jax.ShapeDtypeStruct((num_heads, batch, num_q_tiles * TILE),
                                     jnp.float32)),
      grid=(schedule.num_programs,),
      grid_names=("p",),
      num_threads=NUM_WARPGROUPS,
      thread_name="wg",
      compiler_params=_compiler_params(profile_dir),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*lists.walked, *((seeds,) if dropout.active else ()), q_view,
    token_view(k, kv_len), token_view(v, kv_len))
  return flat_tokens(o), lse[:, :, :q_len].reshape(num_heads, tq)
