"""Block-sparse attention backward for Hopper on Mosaic GPU: dK/dV and dQ kernels.

FlashAttention-2's split, as the Triton backward (`pallas_kernels/triton/bwd.py`):
deterministic, no atomics. Both kernels recompute
`p = exp2(s * scale * log2e - lse2)` from the forward's log-sum-exp and take
`delta = rowsum(do * o) - dlse`, which the dQ kernel computes (below).

dQ runs first and computes delta itself: its item holds the query tile's O
beside dO, each compute warpgroup sums `O * dO` over its rows once, and
stores delta for dK/dV to read. This spares an XLA pass over O and dO (6%
of ViT-B's forward + backward at 197 tokens) for one more tile load per item
and one more buffer (64 rows of D per warpgroup: 231480 bytes in all at
D=128, under Hopper's 232448).

Each kernel is a persistent program per SM with three warpgroups, as the
Mosaic forward (`fwd.py`):

- dK/dV: a work item is (128-row key tile, kv head, example). The two compute
  warpgroups own 64 key rows each, hold dK and dV in registers, and walk the
  transposed lists of every query head of the item's GQA group (the group's
  sum happens in registers). Per listed 128-row query tile:
  `S^T = K Q^T`, `P^T`, `dV += P^T dO`, `dP^T = V dO^T`,
  `dS^T = P^T (dP^T - delta)`, `dK += dS^T Q`. At D=64 S^T and dP^T run
  together and the exponentials overlap dP^T (`_score_pipeline`). At D=128
  dK, dV, S^T and dP^T (64 registers each) do not fit together: S^T runs
  first, P^T goes to shared memory in half precision (dV's product reads it
  there, dS^T reads it back), then dP^T (`_scores_in_turn`); there the two
  compute warpgroups take turns, so that one's register work runs beside
  the other's matmuls, except on causal masks (`_ping_pong`). Taking the
  128 query rows in two 64-row halves instead (S^T and dP^T 64 wide, both
  in registers) ran 1-6% slower (H200, `benchmarks/PERF_NOTES.md`); with
  dropout, whose keep bits need registers too, it still does.
- dQ: a work item is (128-row query tile, head, example); the compute
  warpgroups own 64 query rows each, take delta from their O and dO rows
  (minus dlse, when the lse has a cotangent) and walk the forward lists:
  `S = Q K^T`, `dP = dO V^T`, `dS = P (dP - delta)`, `dQ += dS K`.

The memory warpgroup loads an item's own tiles (K and V, or Q, dO and O with
their statistics) into one buffer per compute warpgroup, and the listed
tiles of the other side into a ring of `STAGES` slots. It issues an item's
first listed tile before it waits for the previous item's buffer to be
released, so that tile's load overlaps the previous item's end. At D<=64
a kernel releases its item buffers as soon as its last products are done
and stores its outputs through a staging buffer of its own, so the next
item's tiles load during that epilogue. dK/dV at D=128 does the same
through its P^T buffer (`_stage_through`: no shared memory of its own; H200,
local d=0.1 S8192 dK/dV 391 -> 373 µs, dense 3104 -> 3065); elsewhere at
D=128 the outputs leave through the item buffers (TMA stores). dQ there
releases its other item buffers first and loads its q buffer, which dq
leaves through, apart and last (`_lead_barriers`; local S8192 dQ 272.7 ->
267.5 µs), so dO, O and the statistics load, and delta is taken, during
that store.

Attention dropout (`pallas_kernels.dropout`: the keep bits Z of the Mosaic
and Triton forwards and the reference, from the `[B]` per-example seeds,
head, query and key position; r = 1 / (1 - rate)): `dV = (P Z r)^T dO`,
`dS = P (dP Z r - delta)`. Each step's keep bits are hashed once, while its
two score matmuls (S and dP, or their transposes) run, and serve both dP
and, in dK/dV, the half-precision P of dV (a 16-bit mask ANDed with its bits,
as the forward: `common.keep_mask`, `common.drop_half`). The query half of
the hash is computed once per item in dQ (its rows) and once per listed
query tile in dK/dV (its columns); each element costs five more
operations (`dropout.keep`). No
element is multiplied by r: delta comes in scaled by 1 - rate, so the
kernels compute dS / r, and r joins dQ's and dK's softmax scale and dV's
final scale (see `_views`).

At 64x64 mask tiles (64-multiple user blocks) the items are the same, but
each compute warpgroup's 64 rows are one mask row (dQ) or column (dK/dV)
with a list of its own, walked over a ring of 64-row tiles of its own (the
same shared memory: `_ring_ids`); the memory warpgroup loads both rings'
t-th tiles together, and the warpgroups meet only at item boundaries. An
odd number of mask rows leaves the last item's second warpgroup with an
empty list. H200, bf16, B=2 S=8192 H=16: random per-head masks at density
0.1 ran fwd+bwd in 1.09 ms at D=128 (1.10 ms at 128-token blocks; the
Triton backward took 1.76 ms), `benchmarks/PERF_NOTES.md`.

Scope, checked by `unsupported`: fp16/bf16, head dim 64 or 128, 128x128 or
64x64 mask tiles, the padded layout at full length, with or without dropout, any
length at D=64 and multiples of 8 at D=128 (`common.unsupported_lengths`);
anything else runs on the Triton backward.

Tails (a length that is not a multiple of 128), as the Mosaic forward: the
tokens are addressed through `[B, S, H, D]` views (`common.token_view`), so
TMA reads rows past an example's end as zeros and drops stores to them, and
lse2 and delta are padded per example to whole tiles with +inf and 0
(`common.vector_view`). A query row past the end then has q = dO = 0,
lse2 = +inf and delta = 0: p = exp2(0 - inf) = 0 and dS = 0, so it adds
nothing to dK and dV, and never NaN. A key row past the end has K = V = 0:
dQ masks it by element (`ElementRule`'s length test on partial tiles), and
in dK/dV it is the item's own row, whose dK and dV are never stored. So dK/dV
runs a tile that is partial only for a tail unmasked. Lengths that are
multiples of 128 keep the flat arrays and mask nothing for length. With
`interpret=True` the kernels run in Mosaic GPU's interpreter on the CPU (the
products with an operand in registers as plain dots, as in `fwd.py`).
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
from pallas_kernels.mosaic_gpu import common
from pallas_kernels.mosaic_gpu.common import (
    COMPUTE_WARPGROUPS, ROWS_PER_WARPGROUP, TILE, Schedule, align,
    persistent_schedule, flat_tokens, list_entry, token_rows, token_view,
    unsupported_lengths, unsupported_shape, vector_rows, vector_view)
from pallas_kernels.numerics import LOG2_E, log2_lse
from pallas_kernels.seq_info import StaticSizes

MEMORY_WARPGROUP = COMPUTE_WARPGROUPS
NUM_WARPGROUPS = COMPUTE_WARPGROUPS + 1
STAGES = 2
# Kernel names (their symbols end in "_mosaic_gpu"; the forward's is "body").
DKDV_KERNEL, DQ_KERNEL = "mosaic_dkdv", "mosaic_dq"
# The mask tiles the kernels walk (see the module doc).
MASK_TILES = (TILE, ROWS_PER_WARPGROUP)
# Registers per thread of (each compute warpgroup, the memory warpgroup),
# set by setmaxnreg from the launch's 168 per thread (65536 over 384
# threads, in steps of 8: 64512 in all, 2 x 128 x 232 + 128 x 40).
REGISTERS = (232, 40)
# dK/dV where its sub-steps take one score tile at a time (D=128): 128 x 24
# leaves the memory warpgroup enough, and the compute warpgroups' spills
# shrink (ptxas, causal: 280 -> 220 bytes of spill stores). H200, B2 S8192
# H16 D128 dense: 3318 -> 3135 µs; causal B1 S16384: 3602 -> 3500
# (`benchmarks/PERF_NOTES.md`).
REGISTERS_SCORES_IN_TURN = (240, 24)


def unsupported(dtype, head_dim: int, mask_tile: tuple[int, int],
                q_len: int | None, kv_len: int | None) -> str | None:
  """Why these kernels cannot take a call of this shape, or None if they can
  (mask tiles: `MASK_TILES`; lengths: `common.unsupported_lengths`)."""
  if tuple(mask_tile) not in [(tile, tile) for tile in MASK_TILES]:
    return (f"mask tile {tuple(mask_tile)} (takes 128x128 or 64x64: blocks "
            f"that are multiples of 64)")
  return (unsupported_shape(dtype, head_dim, mask_tile, q_len, kv_len,
                            tile=mask_tile[0])
          or unsupported_lengths(q_len, kv_len, head_dim, dtype))


def unsupported_call(dtype, head_dim: int, mask_tile: tuple[int, int],
                     static: StaticSizes) -> str | None:
  """`unsupported` for a call of the flat layout, plus the target (with or
  without dropout)."""
  return common.unsupported_call(unsupported, dtype, head_dim, mask_tile, static)


class _Shared(NamedTuple):
  """A program's shared memory and barriers: the item's own tiles (one per
  compute warpgroup), the ring of listed tiles, the outputs' staging
  buffer (`_staging`: at D<=64 only), and their barriers."""
  item: tuple        # per item tensor: [2 warpgroups, 64, D] or [2, 64] fp32
  # per listed tensor: [STAGES, 128, D] or [STAGES, 128] fp32, or one ring
  # per warpgroup at 64x64 mask tiles, [2, STAGES, 64, D] or [2, STAGES, 64]
  ring: tuple
  out: tuple         # () or the staging buffer: [2 warpgroups, 64, D]
  scores: tuple      # () or dK/dV's P^T (`_scores_in_turn`): [2, 64, 128]
  turn: tuple        # () or the compute warpgroups' ping-pong barrier
  # () or (ready [2 warpgroups], free): the first item buffer's own barriers
  # where the output leaves through it (`_lead_barriers`: dQ at D=128)
  lead: tuple
  item_ready: Any    # [2 warpgroups]: every item tensor of that half landed
  item_free: Any     # both warpgroups are done with the item buffers
  step_ready: Any    # [rings * STAGES]: every tensor of the ring's slot landed
  step_free: Any     # [rings * STAGES]: the ring's warpgroups are done with the slot


def _ring_ids(mask_tile: int) -> tuple:
  """The rings of listed tiles: one both compute warpgroups share at 128x128
  mask tiles (id None), one per warpgroup at 64x64 (ids 0, 1: each walks
  the list of its own 64-row mask row, or column for dK/dV)."""
  return (None,) if mask_tile == TILE else tuple(range(COMPUTE_WARPGROUPS))


def _slot_barrier(barrier, ring, slot):
  """A ring slot's barrier (`_Shared.step_ready` or `step_free`)."""
  return barrier.at[slot] if ring is None else barrier.at[ring * STAGES + slot]


def _ring_slot(ref, ring, slot):
  """A ring slot of one listed tensor."""
  return ref.at[slot] if ring is None else ref.at[ring, slot]


def _walked_row(count_refs: tuple, batch, head, tile, ring):
  """The list row that ring `ring` walks for item `tile` (the item's own at
  128-row tiles, its warpgroup's 64-row mask row else): (each of
  `count_refs`' entries there, the row to read its list from). An odd
  number of 64-row mask rows leaves the last item's second warpgroup
  without a row: counts 0 there (the list read from the last row)."""
  if ring is None:
    return tuple(list_entry(ref, batch, head, tile) for ref in count_refs), tile
  row = tile * COMPUTE_WARPGROUPS + ring
  num_rows = count_refs[0].shape[2]
  if num_rows % COMPUTE_WARPGROUPS == 0:
    return tuple(list_entry(ref, batch, head, row) for ref in count_refs), row
  inside = row < num_rows
  row = jnp.minimum(row, num_rows - 1)
  return tuple(jnp.where(inside, list_entry(ref, batch, head, row), 0)
               for ref in count_refs), row


def _dkdv_substep(head_dim: int, mask_tile: int, with_dropout: bool) -> int:
  """Query rows a dK/dV compute warpgroup takes at once (at most a mask
  tile): 128, so that S^T and dP^T are 128 wide (64 wide, their wgmma
  reads about as many shared-memory bytes as it has cycles of products);
  64 at D=128 with dropout, whose keep bits would not fit in registers
  beside the rest (`_one_score_at_a_time`)."""
  rows = ROWS_PER_WARPGROUP if head_dim > 64 and with_dropout else TILE
  return min(rows, mask_tile)


def _one_score_at_a_time(head_dim: int, sub: int) -> bool:
  """Whether a dK/dV sub-step computes S^T, then dP^T (`_scores_in_turn`),
  instead of both at once (`_score_pipeline`): at D=128 and 128 query rows,
  where dK, dV, S^T and dP^T (64 registers each) would not fit together."""
  return head_dim > 64 and sub == TILE


def _ping_pong(one_score_at_a_time: bool, causal: bool) -> bool:
  """Whether dK/dV's compute warpgroups take turns (one a meeting behind
  the other on the `turn` barrier, so that one's register work runs beside
  the other's matmuls): where its sub-steps take one score tile at a time
  (`_scores_in_turn`: D=128, 128x128 mask tiles, no dropout), not on
  causal masks.

  H200, bf16, B2 S8192 H16 D128 dense (`kernel_breakdown.py`, two A/B
  pairs in one call): dK/dV 3453-3487 -> 3280-3289 µs with turns. Causal
  B1 S16384 in the same call: 3659 -> 3742 µs, slower, also on a
  schedule that keeps its sequences' q/dO in L2 longer (3817 µs). Again
  with the staged epilogue (`_stage_through`): causal S16384 3316-3330 ->
  3229-3267 µs, but causal B2 S8192 1731 -> 1890, a loss that variants
  alternated in fresh processes did not reproduce (all three causal shapes
  within 0.5%, `benchmarks/PERF_NOTES.md`); causal keeps the lockstep. Turns
  around `_score_pipeline` (which already runs the exponentials beside
  dP) lost: dQ 2125 -> 2550 µs (D=128), 1380 -> 1671
  (D=64), 224 -> 249 at ViT-B; dK/dV at D=64 1726 -> 1703, but 234 -> 244
  at ViT-B (`benchmarks/PERF_NOTES.md`)."""
  return one_score_at_a_time and not causal


def _tile_spec(rows: int, head_dim: int, dtype, count: int, row_major: bool):
  return common.token_tiles((count, rows, head_dim), dtype, row_major)


def _split_views(sh: _Shared, buffers: tuple[tuple, ...]
                 ) -> tuple[_Shared, _Shared]:
  """The allocated buffers as the compute warpgroups read them, and as TMA
  copies go through them (`common.tile_views`: the two members of a union
  from `_tile_spec(..., row_major=True)`, else the buffer itself)."""
  def views(refs, specs, which):
    return tuple(common.tile_views(ref, isinstance(spec, plgpu.RefUnion))[which]
                 for ref, spec in zip(refs, specs))
  item_specs, ring_specs, out_specs, *_ = buffers
  return tuple(sh._replace(item=views(sh.item, item_specs, which),
                           ring=views(sh.ring, ring_specs, which),
                           out=views(sh.out, out_specs, which))
               for which in (0, 1))


def _shared_memory(item: tuple, ring: tuple, out: tuple, scores: tuple,
                   turn: tuple, lead: tuple, item_loads: int | None = None, *,
                   mask_tile: int = TILE) -> _Shared:
  """Allocation specs, as `pl.run_scoped` takes them; `item_loads`: the
  copies into a warpgroup's item buffers (default: one per buffer), which
  `item_ready` counts but the first buffer's where it has barriers of its
  own (`lead`)."""
  rings = len(_ring_ids(mask_tile))
  return _Shared(
      item=item, ring=ring, out=out, scores=scores, turn=turn, lead=lead,
      item_ready=plgpu.Barrier(num_arrivals=(item_loads or len(item)) - bool(lead),
                               num_barriers=COMPUTE_WARPGROUPS),
      item_free=plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),
      step_ready=plgpu.Barrier(num_arrivals=len(ring),
                               num_barriers=rings * STAGES),
      step_free=plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS // rings,
                              num_barriers=rings * STAGES),
  )


def _staging(tile, head_dim: int) -> tuple:
  """The outputs' staging buffer (one `tile`), at D<=64 only, where it
  gained 4% (dK/dV, dense S8192) and 11% at ViT-B's 197 tokens (H200). At
  D=128 dQ has no room for it; dK/dV stages through its P^T buffer
  (`_stage_through`) where it has one, and its outputs leave through the
  item buffers where it has not (dropout)."""
  return (tile,) if head_dim <= 64 else ()


def _ring_spec(mask_tile: int, head_dim: int | None, dtype, row_major: bool):
  """One listed tensor's ring (`_Shared.ring`): token tiles of `head_dim`
  (`row_major`: with a row-major copy alias), or fp32 vectors (None). Either
  way the same bytes at both mask tiles."""
  rings = _ring_ids(mask_tile)
  shape = (STAGES, mask_tile) if rings == (None,) else (
      len(rings), STAGES, mask_tile)
  if head_dim is None:
    return plgpu.SMEM(shape, jnp.float32)
  return common.token_tiles((*shape, head_dim), dtype, row_major)


def _turn(turns: bool) -> tuple:
  """`_Shared.turn`: the ping-pong barrier where the warpgroups take turns."""
  return (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),) if turns else ()


def _lead_barriers(staged: bool) -> tuple:
  """`_Shared.lead`: where the output leaves through the first item buffer
  (no staging buffer), that buffer's own ready and free barriers, so that
  the others are released as soon as the last products are done and the
  next item's tiles load into them during the epilogue; the first buffer
  loads once the output's store has read it (`_dq_memory`)."""
  if staged:
    return ()
  return (plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS),
          plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS))


def _dq_buffers(head_dim: int, dtype, row_major: bool = False,
                mask_tile: int = TILE) -> tuple[tuple, ...]:
  """dQ: item = q, do, o (64 rows per warpgroup), lse2, delta (dlse in,
  delta out); ring = k, v (`row_major`: token tiles with a row-major copy
  alias); `_staging` for dq; no P^T buffer, no ping-pong barrier
  (`_ping_pong`); without staging, q's own barriers (`_lead_barriers`)."""
  rows = ROWS_PER_WARPGROUP
  vec = plgpu.SMEM((COMPUTE_WARPGROUPS, rows), jnp.float32)
  tile = _tile_spec(rows, head_dim, dtype, COMPUTE_WARPGROUPS, row_major)
  ring = _ring_spec(mask_tile, head_dim, dtype, row_major)
  staging = _staging(tile, head_dim)
  return ((tile, tile, tile, vec, vec), (ring, ring), staging, (), (),
          _lead_barriers(bool(staging)))


def _dkdv_buffers(head_dim: int, dtype, row_major: bool = False,
                  mask_tile: int = TILE, with_dropout: bool = False,
                  causal: bool = False) -> tuple[tuple, ...]:
  """dK/dV: item = k, v (64 rows per warpgroup); ring = q, do, lse2, delta;
  `_staging` for dK, then dV; P^T's buffer where the sub-steps take one
  score tile at a time (`_scores_in_turn`); the ping-pong barrier where
  the warpgroups take turns (`_ping_pong`, not on `causal` masks); no
  `_lead_barriers` (dK/dV stages its outputs where it has no staging
  buffer: `_stage_through`)."""
  scores_in_smem = _one_score_at_a_time(
      head_dim, _dkdv_substep(head_dim, mask_tile, with_dropout))
  tile = _tile_spec(ROWS_PER_WARPGROUP, head_dim, dtype, COMPUTE_WARPGROUPS,
                    row_major)
  ring = _ring_spec(mask_tile, head_dim, dtype, row_major)
  vec = _ring_spec(mask_tile, None, dtype, row_major)
  scores = ((_tile_spec(ROWS_PER_WARPGROUP, TILE, dtype, COMPUTE_WARPGROUPS,
                        False),) if scores_in_smem else ())
  return ((tile, tile), (ring, ring, vec, vec), _staging(tile, head_dim), scores,
          _turn(_ping_pong(scores_in_smem, causal)), ())


def shared_memory_bytes(kernel: str, head_dim: int, dtype,
                        mask_tile: int = TILE, dropout: bool = False,
                        causal: bool = False) -> int:
  """Dynamic shared memory of one program of `kernel` ('dkdv' or 'dq'), in
  bytes, counted as Pallas lays `_shared_memory` out: buffers rounded to
  `SMEM_ALIGNMENT`, then the barriers (no scratch for cross-warp row
  reductions, see `_compiler_params`); `dropout`: with attention dropout
  (dK/dV at D=128 then keeps P^T in registers: `_dkdv_substep`); `causal`:
  on a causal mask (no ping-pong barrier: `_ping_pong`)."""
  if kernel == "dkdv":
    buffers = _dkdv_buffers(head_dim, dtype, mask_tile=mask_tile,
                            with_dropout=dropout, causal=causal)
  else:
    buffers = _dq_buffers(head_dim, dtype, mask_tile=mask_tile)
  total = 0
  barriers = 0
  # The buffers, then the barriers `_shared_memory` adds after them.
  for spec in (*(spec for group in buffers for spec in group),
               *_shared_memory(*buffers, mask_tile=mask_tile)[len(buffers):]):
    if isinstance(spec, plgpu.Barrier):
      barriers += math.prod(spec.num_barriers) if spec.num_barriers else 1
    else:
      total += align(common.spec_bytes(spec), SMEM_ALIGNMENT)
  return total + barriers * MBARRIER_BYTES


def _compiler_params() -> plgpu.CompilerParams:
  """No cross-warp reduction scratch: the kernels reduce only along the rows
  of wgmma's layout (dQ's delta), which a warp does alone; the 2 KiB
  Pallas reserves by default would push dQ past Hopper's 227 KiB at D=128."""
  return plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0)


def _walk_and_load(sh: _Shared, i, first_steps: tuple, walks, load_item,
                   load_step):
  """The memory warpgroup's part of one item: its listed tiles into the
  rings and its own tiles into the item buffers, the latter once the
  previous item released them, after issuing the first listed tiles.

  `walks` are walked in order (dQ: one; dK/dV: one per query head of the
  GQA group); a walk holds one (ring, count, entry) per ring (`_ring_ids`),
  `entry(t)` the t-th listed tile, and the rings' t-th tiles load together;
  `load_step(entry, slot, ring)`. `first_steps`: each ring's step count
  before the item; returns them after it.
  """
  def item_load():
    pl.when(i >= 1)(lambda: plgpu.barrier_wait(sh.item_free))
    load_item()

  def one_walk(walk, carry):
    steps, loaded = carry
    counts = [count for _, count, _ in walk]
    longest = counts[0] if len(counts) == 1 else jnp.maximum(*counts)

    @pl.loop(0, longest)
    def _(t):
      for (ring, count, entry), step in zip(walk, steps):
        def load(ring=ring, entry=entry, step=step):
          global_step = step + t
          slot = lax.rem(global_step, jnp.int32(STAGES))
          pl.when(global_step >= STAGES)(lambda: plgpu.barrier_wait(
              _slot_barrier(sh.step_free, ring, slot)))
          load_step(entry(t), slot, ring)
        if len(walk) == 1:
          load()
        else:
          pl.when(t < count)(load)
      pl.when((t == 0) & jnp.logical_not(loaded))(item_load)
    return (tuple(step + count for step, count in zip(steps, counts)),
            loaded | (longest > 0))

  steps, loaded = first_steps, jnp.bool_(False)
  for walk in walks:
    steps, loaded = one_walk(walk, (steps, loaded))
  pl.when(jnp.logical_not(loaded))(item_load)
  return steps


def _list_walk(count_ref, index_ref, batch, head, tile, ring, entry):
  """One ring's (ring, count, entry) of a walk (`_walk_and_load`) over the
  lists of `(batch, head)` for item `tile`; `entry(listed tile index)` is
  what a step loads."""
  (count,), row = _walked_row((count_ref,), batch, head, tile, ring)
  return (ring, count,
          lambda t: entry(list_entry(index_ref, batch, head, row, t)))


def _drain(sh: _Shared, num_items, num_steps: tuple, mask_tile: int):
  """The memory warpgroup waits for the releases no load waited for (the last
  item buffer, each ring's last `STAGES` slots): every barrier phase is
  observed."""
  pl.when(num_items >= 1)(lambda: plgpu.barrier_wait(sh.item_free))
  if sh.lead:
    pl.when(num_items >= 1)(lambda: plgpu.barrier_wait(sh.lead[1]))
  for ring, steps in zip(_ring_ids(mask_tile), num_steps):
    for back in range(STAGES, 0, -1):
      step = steps - back
      pl.when(step >= 0)(lambda ring=ring, step=step: plgpu.barrier_wait(
          _slot_barrier(sh.step_free, ring, lax.rem(step, jnp.int32(STAGES)))))


def _release(sh: _Shared):
  """This warpgroup's output stores have read the item buffers."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  plgpu.barrier_arrive(sh.item_free)


def _store_and_release(sh: _Shared, copies: _Shared, wg, outputs):
  """Stores each `(value, gmem destination)` of `outputs` and releases the
  item buffers. With a staging buffer the item buffers are released first
  (the memory warpgroup then loads the next item's while this one's outputs
  leave one after the other); without one, output i leaves through item
  buffer i, which is released once the stores have read it."""
  if sh.out:
    _release(sh)    # stores from the item buffers (dQ's delta) have read them
    _store_one_by_one(sh.out[0].at[wg], copies.out[0].at[wg], outputs)
    return
  for buffer, (value, _) in zip(sh.item, outputs):
    buffer.at[wg][...] = value
  plgpu.commit_smem()
  for buffer, (_, dst) in zip(copies.item, outputs):
    plgpu.copy_smem_to_gmem(buffer.at[wg], dst, commit_group=False)
  plgpu.commit_smem_to_gmem_group()
  _release(sh)


def _store_through_lead(sh: _Shared, copies: _Shared, wg, output):
  """Releases the item buffers but the first, which `output` (a `(value,
  gmem destination)`) then leaves through, and releases that one once the
  store has read it (`_lead_barriers`)."""
  _release(sh)     # stores from the item buffers (dQ's delta) have read them
  value, dst = output
  sh.item[0].at[wg][...] = value
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(copies.item[0].at[wg], dst)
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  plgpu.barrier_arrive(sh.lead[1])


def _store_one_by_one(staging, staging_copies, outputs):
  """Stores each `(value, gmem destination)` of `outputs` through one
  staging buffer (`staging_copies`: the view TMA copies go through), each
  once the previous store has read it."""
  for value, dst in outputs:
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    staging[...] = value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(staging_copies, dst)


def _stage_through(sh: _Shared, staging, outputs):
  """Releases the item buffers at once (the item's products are done with
  them) and stores `outputs` through `staging` (`_store_one_by_one`), so
  the next item's tiles load during the epilogue."""
  plgpu.barrier_arrive(sh.item_free)
  _store_one_by_one(staging, staging, outputs)


def _score_pipeline(a_ref, b_ref, c_ref, d_ref, accs: tuple, *, shape,
                    after_s, after_dp, during=None, interpret: bool) -> tuple:
  """One step's matmuls, overlapped with its register work: `S = a b^T` and
  `dP = c d^T` are issued together; `after_s(s, extra)` runs once S is done,
  while dP still runs, and returns a state; `after_dp(state, dp, extra)`
  runs once dP is done and returns the step's products, each
  `(index into accs, a in registers, b_ref)`: `accs[index] += a @ b`, all
  issued before the one wait. `extra` is the result of `during()` (register
  work such as the dropout mask, run while S and dP do; None without).
  Returns the accumulators.

  The exponentials so run beside dP instead of after it (the products stay
  together: issuing dV's before dS was computed made dK/dV slower,
  `benchmarks/PERF_NOTES.md`; the compute warpgroups taking turns around
  these steps made them slower too, see `_ping_pong`). Mosaic GPU's
  interpreter has no wgmma with an operand in registers: plain dots there,
  in the same order.
  """
  if interpret:
    def body(s_acc, dp_acc):
      plgpu.wgmma(s_acc, a_ref, b_ref.transpose((1, 0)))
      plgpu.wgmma(dp_acc, c_ref, d_ref.transpose((1, 0)))
      return s_acc[...], dp_acc[...]
    s, dp = pl.run_scoped(body, *[plgpu.ACC(shape, jnp.float32)] * 2)
    extra = None if during is None else during()
    accs = list(accs)
    for index, a, b_ref_ in after_dp(after_s(s, extra), dp, extra):
      accs[index] = accs[index] + jnp.dot(a, b_ref_[...],
                                          preferred_element_type=jnp.float32)
    return tuple(accs)

  def body(acc_refs):
    def scoped(s_acc, dp_acc):
      plgpu.wgmma(s_acc, a_ref, b_ref.transpose((1, 0)))
      plgpu.wgmma(dp_acc, c_ref, d_ref.transpose((1, 0)))
      # The barrier keeps `during` ahead of the wait for S.
      extra = None if during is None else lax.optimization_barrier(during())
      # wgmma groups complete in order: S is done once only dP is in flight.
      state = after_s(plgpu.wgmma_accumulator_load(s_acc, wait_n=1), extra)
      dp = plgpu.wgmma_accumulator_load(dp_acc, wait_n=0)
      for index, a, b in after_dp(state, dp, extra):
        plgpu.wgmma(acc_refs[index], a, b)
    pl.run_scoped(scoped, *[plgpu.ACC(shape, jnp.float32)] * 2)
  return pl.run_state(body)(tuple(plgpu.ACC.init(acc) for acc in accs))


def _scores_in_turn(k_smem, q_ref, v_smem, do_ref, p_smem, dk, dv, *, shape,
                    probabilities, score_grads, meet=None, interpret: bool):
  """One dK/dV sub-step with one score tile in registers at a time: `S^T =
  K Q^T`; `probabilities(s_t)` gives P^T in half precision, which goes to
  `p_smem`; `dV += P^T dO` (from there) and `dP^T = V dO^T` run together;
  `score_grads(p_t, dp_t)` gives dS^T (P^T read back); `dK += dS^T Q`.
  Returns (dk, dv). So S^T and dP^T are never in registers together, and
  P^T's registers are free while dP^T runs.

  With `meet` (the ping-pong barrier's meeting; one warpgroup runs a
  meeting behind the other, see `_dkdv_compute`) the compute warpgroups take
  turns: each meets after issuing S^T, after P^T, after issuing dV's and
  dP^T's products and after dS^T, so that one's register work runs beside
  the other's matmuls, as in the forward."""
  dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
  turns = meet is not None
  meet = meet or (lambda: None)

  def score(acc_ref, a_ref, b_ref):
    plgpu.wgmma(acc_ref, a_ref, b_ref.transpose((1, 0)))
    meet()
    return (acc_ref[...] if interpret
            else plgpu.wgmma_accumulator_load(acc_ref, wait_n=0))

  def p_to_smem():
    p_smem[...] = probabilities(pl.run_scoped(
        functools.partial(score, a_ref=k_smem, b_ref=q_ref),
        plgpu.ACC(shape, jnp.float32)))
    plgpu.commit_smem()     # the wgmma below reads it
    meet()

  def grads_then_meet(dp_t):
    ds_t = score_grads(p_from_smem(), dp_t)
    if turns:
      # The barrier keeps dS^T ahead of the meeting (the scheduler would
      # otherwise sink part of it past the wait).
      ds_t = lax.optimization_barrier(ds_t)
    meet()
    return ds_t

  def p_from_smem():
    return plgpu.load(p_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32)

  if interpret:
    p_to_smem()
    dv = dv + dot(p_smem[...], do_ref[...])
    dp_t = pl.run_scoped(functools.partial(score, a_ref=v_smem, b_ref=do_ref),
                         plgpu.ACC(shape, jnp.float32))
    return dk + dot(grads_then_meet(dp_t), q_ref[...]), dv

  def body(acc_refs):
    dk_acc, dv_acc = acc_refs
    p_to_smem()

    def grads(dp_acc):
      plgpu.wgmma(dv_acc, p_smem, do_ref)
      dp_t = score(dp_acc, v_smem, do_ref)
      plgpu.wgmma(dk_acc, grads_then_meet(dp_t), q_ref)
    pl.run_scoped(grads, plgpu.ACC(shape, jnp.float32))
  return pl.run_state(body)((plgpu.ACC.init(dk), plgpu.ACC.init(dv)))


def _drop_f32(x, mask):
  """fp32 `x` where `mask` (`common.keep_mask`) keeps, 0 where it drops."""
  return jnp.where(mask != 0, x, 0.0)


def _row_delta(o_smem, do_smem, delta_smem, dropout: dropout_bits.Dropout, *,
               has_dlse: bool):
  """`rowsum(O * dO) - dlse` of a warpgroup's 64 rows, scaled by 1 - rate
  with dropout (see `_views`), also left in `delta_smem` (which holds dlse
  on entry when `has_dlse`)."""
  tile_layout = plgpu.Layout.WGMMA
  o = plgpu.load(o_smem, layout=tile_layout).astype(jnp.float32)
  do = plgpu.load(do_smem, layout=tile_layout).astype(jnp.float32)
  delta = jnp.sum(o * do, axis=1)
  if has_dlse:
    delta = delta - plgpu.load(delta_smem, layout=tile_layout.reduce(1))
  if dropout.active:
    delta = delta * (1.0 - dropout.rate)
  delta_smem[...] = delta
  return delta


def _warpgroup_ring(sh: _Shared, wg, mask_tile: int) -> tuple[tuple, Any]:
  """A compute warpgroup's ring (its listed tensors, `[STAGES, mask_tile,
  ...]` each) and the ring's id (`_ring_ids`)."""
  if _ring_ids(mask_tile) == (None,):
    return sh.ring, None
  return tuple(ref.at[wg] for ref in sh.ring), wg


def _dq_compute(wg, refs, sh: _Shared, copies: _Shared, schedule: Schedule, *,
                scale: float, rule: ElementRule, q_len: int, kv_len: int,
                mask_tile: int, dropout: dropout_bits.Dropout, has_dlse: bool,
                interpret: bool):
  count_ref, full_ref, index_ref, seed_ref, dq_ref, delta_ref = refs
  rows = ROWS_PER_WARPGROUP
  keys = mask_tile     # per step
  dtype = dq_ref.dtype
  head_dim = dq_ref.shape[-1]
  qk_scale = scale * LOG2_E
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  by_row = lambda x: lax.broadcast_in_dim(x, (rows, keys), [0])
  q_item, do_item, o_item, lse_item, delta_item = sh.item
  (k_ring, v_ring), ring = _warpgroup_ring(sh, wg, mask_tile)
  q_smem, do_smem = q_item.at[wg], do_item.at[wg]
  program, num_items = schedule.items_of_this_program()

  def one_item(i, first_step):
    q_tile, head, batch = schedule.item(program, i)
    (num_all, num_full), row = _walked_row((count_ref, full_ref), batch, head,
                                           q_tile, ring)
    first_row = q_tile * TILE + wg * rows

    def first_key(t):
      return list_entry(index_ref, batch, head, row, t) * keys

    drop_rows = None
    if dropout.active:
      # Each row's half of the dropout hash, once per item, while the
      # item's tiles load.
      drop_rows = common.query_hashes(
          dropout_bits.head_seed(seed_ref[batch], head), first_row, rows,
          row_layout)
    plgpu.barrier_wait(sh.item_ready.at[wg])
    lse2 = plgpu.load(lse_item.at[wg], layout=row_layout)
    delta = _row_delta(o_item.at[wg], do_smem, delta_item.at[wg], dropout,
                       has_dlse=has_dlse)
    # dK/dV reads it (rows past the example's end: O = dO = 0, and dlse is
    # padded with 0, so their delta is 0 as its padding expects).
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(
        delta_item.at[wg], vector_rows(delta_ref, q_len, head, batch, first_row,
                                       rows))
    if sh.lead:
      plgpu.barrier_wait(sh.lead[0].at[wg])     # q, loaded apart

    def step(masked: bool, t, carry):
      dq, *ahead = carry
      slot = lax.rem(first_step + t, jnp.int32(STAGES))
      if dropout.active:
        # Every tile's first key is needed right after its matmuls are
        # issued: each step reads the next step's (clamped to the item's
        # last), so the load's latency hides behind this step.
        kv_first, = ahead
        ahead = [first_key(jnp.minimum(t + 1, num_all - 1))]
      elif masked:
        kv_first = first_key(t)
      plgpu.barrier_wait(_slot_barrier(sh.step_ready, ring, slot))

      def probabilities(s, keep):
        del keep
        p = jnp.exp2(s * qk_scale - by_row(lse2))
        if not masked:
          return p, None
        # Keys past the example's end (zeros) are masked here.
        valid = common.partial_tile_mask(
            rule, first_row, kv_first, (rows, keys), q_len=q_len,
            kv_len=kv_len, batch=batch, head=head)
        return p, valid

      def score_grads(state, dp, keep):
        p, valid = state
        if keep is not None:
          # dP of the kept probabilities (their 1 / (1 - rate) is folded
          # into delta here and dQ's scale at the end, see `_views`).
          dp = _drop_f32(dp, keep)
        ds = p * (dp - by_row(delta))
        if valid is not None:
          ds = jnp.where(valid, ds, 0.0)    # 0 * NaN in a masked dP is not 0
        return ((0, ds.astype(dtype), k_ring.at[slot]),)

      # With dropout the tile's keep bits are hashed while QK^T and dO V^T
      # run.
      (dq,) = _score_pipeline(
          q_smem, k_ring.at[slot], do_smem, v_ring.at[slot], (dq,),
          shape=(rows, keys), after_s=probabilities, after_dp=score_grads,
          during=(lambda: common.keep_mask(drop_rows, kv_first, (rows, keys),
                                           dropout)) if dropout.active else None,
          interpret=interpret)
      plgpu.barrier_arrive(_slot_barrier(sh.step_free, ring, slot))
      return (dq, *ahead)

    dq = plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32),
                           plgpu.Layout.WGMMA)
    # With dropout the carry holds the next step's first key (see `step`).
    carry = (dq, *((first_key(0),) if dropout.active else ()))
    carry = lax.fori_loop(0, num_full, functools.partial(step, False), carry)
    if rule.masks_inside_lengths or kv_len % keys:
      carry = lax.fori_loop(num_full, num_all, functools.partial(step, True),
                            carry)
    dq = (carry[0] * (scale * dropout.keep_scale)).astype(dtype)
    # Rows past the example's end are dropped (a [B, S, H, D] view then).
    dq_rows = token_rows(dq_ref, q_len, batch, first_row, rows, head)
    if sh.lead:
      _store_through_lead(sh, copies, wg, (dq, dq_rows))
    else:
      _store_and_release(sh, copies, wg, [(dq, dq_rows)])
    return first_step + num_all

  lax.fori_loop(0, num_items, one_item, jnp.int32(0))
  plgpu.wait_smem_to_gmem(0)


def _dq_memory(refs, sh: _Shared, copies: _Shared, schedule: Schedule, *,
               q_len: int, kv_len: int, group: int, mask_tile: int):
  count_ref, index_ref, q_ref, k_ref, v_ref, do_ref, o_ref, lse2_ref, *dlse_ref = refs
  program, num_items = schedule.items_of_this_program()
  rows = ROWS_PER_WARPGROUP

  def one_item(i, first_steps):
    q_tile, head, batch = schedule.item(program, i)
    kv_head = lax.div(head, jnp.int32(group))

    def load_item():
      sources = [
          (token_rows(q_ref, q_len, batch, first, rows, head),
           token_rows(do_ref, q_len, batch, first, rows, head),
           token_rows(o_ref, q_len, batch, first, rows, head),
           vector_rows(lse2_ref, q_len, head, batch, first, rows),
           *(vector_rows(ref, q_len, head, batch, first, rows)
             for ref in dlse_ref))
          for first in (q_tile * TILE + wg * rows
                        for wg in range(COMPUTE_WARPGROUPS))]
      # With no dlse the delta buffer is only written (zip stops short).
      # With `sh.lead` q loads last, once dq's store has read its buffer.
      lead = 1 if sh.lead else 0
      for wg, srcs in enumerate(sources):
        for src, dst in zip(srcs[lead:], copies.item[lead:]):
          plgpu.copy_gmem_to_smem(src, dst.at[wg], sh.item_ready.at[wg])
      if sh.lead:
        ready, free = sh.lead
        pl.when(i >= 1)(lambda: plgpu.barrier_wait(free))
        for wg, srcs in enumerate(sources):
          plgpu.copy_gmem_to_smem(srcs[0], copies.item[0].at[wg], ready.at[wg])

    def load_step(kv_tile, slot, ring):
      for src, dst in zip((k_ref, v_ref), copies.ring):
        plgpu.copy_gmem_to_smem(
            token_rows(src, kv_len, batch, kv_tile * mask_tile, mask_tile,
                       kv_head),
            _ring_slot(dst, ring, slot),
            _slot_barrier(sh.step_ready, ring, slot))

    walk = tuple(_list_walk(count_ref, index_ref, batch, head, q_tile, ring,
                            lambda kv_tile: kv_tile)
                 for ring in _ring_ids(mask_tile))
    return _walk_and_load(sh, i, first_steps, (walk,), load_item, load_step)

  num_steps = lax.fori_loop(0, num_items, one_item,
                            (jnp.int32(0),) * len(_ring_ids(mask_tile)))
  _drain(sh, num_items, num_steps, mask_tile)


def _dkdv_compute(wg, refs, sh: _Shared, copies: _Shared, schedule: Schedule,
                  *, scale: float,
                  rule: ElementRule, q_len: int, kv_len: int, group: int,
                  mask_tile: int, dropout: dropout_bits.Dropout,
                  interpret: bool):
  count_ref, full_ref, index_ref, seed_ref, dk_ref, dv_ref = refs
  rows = ROWS_PER_WARPGROUP
  dtype = dk_ref.dtype
  head_dim = dk_ref.shape[-1]
  qk_scale = scale * LOG2_E
  col_layout = plgpu.Layout.WGMMA.reduce(0)
  sub = _dkdv_substep(head_dim, mask_tile, dropout.active)
  by_col = lambda x: lax.broadcast_in_dim(x, (rows, sub), [1])
  k_item, v_item = sh.item
  (q_ring, do_ring, lse_ring, delta_ring), ring = _warpgroup_ring(
      sh, wg, mask_tile)
  k_smem, v_smem = k_item.at[wg], v_item.at[wg]
  program, num_items = schedule.items_of_this_program()
  meet = functools.partial(common.rendezvous, *sh.turn) if sh.turn else None

  def one_item(i, first_step):
    kv_tile, kv_head, batch = schedule.item(program, i)
    first_kv = kv_tile * TILE + wg * rows
    example_seed = seed_ref[batch] if dropout.active else None
    plgpu.barrier_wait(sh.item_ready.at[wg])
    if sh.scores:
      # The previous item's dV left through the P^T buffer: its store has
      # read it before this item's first P^T goes there.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def one_head(g, carry):
      step_index, dk, dv = carry
      head = kv_head * group + g
      (num_all, num_full), row = _walked_row((count_ref, full_ref), batch,
                                             head, kv_tile, ring)
      if dropout.active:
        seed = dropout_bits.head_seed(example_seed, head)

      def first_query(t):
        return list_entry(index_ref, batch, head, row, t) * mask_tile

      def keep_mask(q_first):
        """The keep bits of a transposed tile (key rows of this
        warpgroup, `sub` query columns from `q_first`): one hash per query
        column, then a few operations per element, as `common.keep_mask`."""
        hashes = common.query_hashes(seed, q_first, sub, col_layout)
        return common.keep_mask(hashes, first_kv, (rows, sub), dropout,
                                query_axis=1)

      def step(masked: bool, t, carry):
        dk, dv, *ahead = carry
        slot = lax.rem(step_index + t, jnp.int32(STAGES))
        if dropout.active:
          # As in dQ: each step reads the next step's first query, so the
          # load's latency hides behind this step.
          q_first, = ahead
          ahead = [first_query(jnp.minimum(t + 1, num_all - 1))]
        elif masked:
          q_first = first_query(t)
        plgpu.barrier_wait(_slot_barrier(sh.step_ready, ring, slot))
        for first in range(0, mask_tile, sub):
          part = pl.ds(first, sub)
          q_part, do_part = q_ring.at[slot, part], do_ring.at[slot, part]

          # The closures run inside this iteration, so they see this
          # sub-step's `part` and `first`.
          def valid_mask():
            kv_pos, q_pos = common.tile_positions(first_kv, q_first + first,
                                                  (rows, sub))
            return rule(q_pos, kv_pos, q_len=q_len, kv_len=kv_len,
                        batch=batch, head=head, check_kv_len=False)

          def exp_scores(s_t, valid):
            lse2 = plgpu.load(lse_ring.at[slot, part], layout=col_layout)
            p_t = jnp.exp2(s_t * qk_scale - by_col(lse2))
            return p_t if valid is None else jnp.where(valid, p_t, 0.0)

          def grad_scores(p_t, dp_t, valid):
            delta = plgpu.load(delta_ring.at[slot, part], layout=col_layout)
            ds_t = p_t * (dp_t - by_col(delta))
            if valid is not None:
              ds_t = jnp.where(valid, ds_t, 0.0)   # 0 * NaN in a masked dP is not 0
            return ds_t.astype(dtype)

          if sh.scores:     # allocated where `_one_score_at_a_time`
            assert not dropout.active     # `_dkdv_substep`
            # The mask is recomputed for dS^T rather than held beside dP^T.
            dk, dv = _scores_in_turn(
                k_smem, q_part, v_smem, do_part, sh.scores[0].at[wg], dk, dv,
                shape=(rows, sub), meet=meet,
                probabilities=lambda s_t: exp_scores(
                    s_t, valid_mask() if masked else None).astype(dtype),
                score_grads=lambda p_t, dp_t: grad_scores(
                    p_t, dp_t, valid_mask() if masked else None),
                interpret=interpret)
            continue

          def probabilities(s_t, keep):
            valid = valid_mask() if masked else None
            p_t = exp_scores(s_t, valid)
            p16 = p_t.astype(dtype)
            if keep is not None:
              # dV takes the kept probabilities (1 / (1 - rate): at the end).
              p16 = common.drop_half(p16, keep)
            return p_t, p16, valid

          def score_grads(state, dp_t, keep):
            p_t, p16, valid = state
            if keep is not None:
              # dP^T of the kept probabilities (their 1 / (1 - rate) is
              # folded into delta here and dK's scale at the end).
              dp_t = _drop_f32(dp_t, keep)
            return ((1, p16, do_part),
                    (0, grad_scores(p_t, dp_t, valid), q_part))

          # With dropout the keep bits, once for both dV and dP^T, are
          # hashed while S^T and dP^T run.
          dk, dv = _score_pipeline(
              k_smem, q_part, v_smem, do_part,
              (dk, dv), shape=(rows, sub), after_s=probabilities,
              after_dp=score_grads,
              during=functools.partial(keep_mask, q_first + first)
              if dropout.active else None,
              interpret=interpret)
        plgpu.barrier_arrive(_slot_barrier(sh.step_free, ring, slot))
        return (dk, dv, *ahead)

      # Ping-pong (`_scores_in_turn`): warpgroup 1 walks the head's list one
      # meeting behind, and warpgroup 0 makes up that meeting after its
      # last step, so the two are even again between walks (also around a
      # walk without steps, and at the item's end, where their epilogues
      # release the item buffers).
      if meet is not None:
        pl.when((wg == 1) & (num_all > 0))(meet)
      # With dropout the carry holds the next step's first query (see `step`).
      carry = (dk, dv, *((first_query(0),) if dropout.active else ()))
      carry = lax.fori_loop(0, num_full, functools.partial(step, False), carry)
      if rule.masks_inside_lengths:
        carry = lax.fori_loop(num_full, num_all, functools.partial(step, True),
                              carry)
      elif q_len % mask_tile or kv_len % mask_tile:
        # Tiles partial only for a tail need no mask (see the module doc).
        carry = lax.fori_loop(num_full, num_all, functools.partial(step, False),
                              carry)
      if meet is not None:
        pl.when((wg == 0) & (num_all > 0))(meet)
      return (step_index + num_all, *carry[:2])

    zeros = plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32),
                              plgpu.Layout.WGMMA)
    step_index, dk, dv = lax.fori_loop(0, group, one_head,
                                       (first_step, zeros, zeros))
    # Dropout's 1 / (1 - rate) of the kept
    # probabilities (1.0 without). Rows past the example's end are dropped
    # (a [B, S, H, D] view then).
    outputs = [
        (value.astype(dtype),
         token_rows(ref, kv_len, batch, first_kv, rows, kv_head))
        for value, ref in (
            (dk * (scale * dropout.keep_scale), dk_ref),
            (dv * dropout.keep_scale if dropout.active else dv, dv_ref))]
    if sh.scores:
      _stage_through(sh, sh.scores[0].at[wg], outputs)
    else:
      _store_and_release(sh, copies, wg, outputs)
    return step_index

  lax.fori_loop(0, num_items, one_item, jnp.int32(0))
  plgpu.wait_smem_to_gmem(0)


def _dkdv_memory(refs, sh: _Shared, copies: _Shared, schedule: Schedule, *,
                 q_len: int, kv_len: int, group: int, mask_tile: int):
  count_ref, index_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref = refs
  program, num_items = schedule.items_of_this_program()
  rows = ROWS_PER_WARPGROUP

  def one_item(i, first_steps):
    kv_tile, kv_head, batch = schedule.item(program, i)

    def load_item():
      for wg in range(COMPUTE_WARPGROUPS):
        first = kv_tile * TILE + wg * rows
        for src, dst in zip((k_ref, v_ref), copies.item):
          plgpu.copy_gmem_to_smem(
              token_rows(src, kv_len, batch, first, rows, kv_head),
              dst.at[wg], sh.item_ready.at[wg])

    # The GQA group's lists are walked in a static loop (groups are small).
    def walk(head):
      return tuple(_list_walk(count_ref, index_ref, batch, head, kv_tile, ring,
                              lambda q_tile, head=head: (head, q_tile))
                   for ring in _ring_ids(mask_tile))
    walks = [walk(kv_head * group + g) for g in range(group)]

    def load_step(entry, slot, ring):
      head, q_tile = entry
      first = q_tile * mask_tile
      for src, dst in zip(
          (token_rows(q_ref, q_len, batch, first, mask_tile, head),
           token_rows(do_ref, q_len, batch, first, mask_tile, head),
           vector_rows(lse2_ref, q_len, head, batch, first, mask_tile),
           vector_rows(delta_ref, q_len, head, batch, first, mask_tile)),
          copies.ring):
        plgpu.copy_gmem_to_smem(src, _ring_slot(dst, ring, slot),
                                _slot_barrier(sh.step_ready, ring, slot))

    return _walk_and_load(sh, i, first_steps, walks, load_item, load_step)

  num_steps = lax.fori_loop(0, num_items, one_item,
                            (jnp.int32(0),) * len(_ring_ids(mask_tile)))
  _drain(sh, num_items, num_steps, mask_tile)


def _launch(name: str, compute, memory, buffers, out_type, num_programs: int,
            interpret: bool, item_loads: int | None = None,
            mask_tile: int = TILE, registers: tuple[int, int] = REGISTERS):
  """A persistent kernel of two compute warpgroups and a memory warpgroup;
  `name` becomes its symbol (`<name>_mosaic_gpu`, what profiler traces show);
  `item_loads` and `mask_tile` as `_shared_memory`'s; `registers` per
  thread of a compute and of the memory warpgroup."""
  def kernel(*refs):
    wg = lax.axis_index("wg")

    def program(*smem):
      sh, copies = _split_views(_Shared(*smem), buffers)

      @pl.when(wg < COMPUTE_WARPGROUPS)
      def _():
        plgpu.set_max_registers(registers[0], action="increase")
        compute(wg, refs, sh, copies)

      @pl.when(wg == MEMORY_WARPGROUP)
      def _():
        plgpu.set_max_registers(registers[1], action="decrease")
        memory(refs, sh, copies)

    pl.run_scoped(program, *_shared_memory(*buffers, item_loads,
                                           mask_tile=mask_tile),
                  collective_axes="wg")

  kernel.__name__ = kernel.__qualname__ = name
  return plgpu.kernel(
      kernel, out_type=out_type, grid=(num_programs,), grid_names=("p",),
      num_threads=NUM_WARPGROUPS, thread_name="wg",
      compiler_params=_compiler_params(),
      interpret=plgpu.InterpretGPUParams() if interpret else None)


def _check(q, k, q_len: int, kv_len: int, num_programs: int | None,
           mask_tile: int, lists: BlockLists, rows_len: int, cols_len: int):
  """The call's scope and arguments; `lists` walk rows of `rows_len` tokens
  against columns of `cols_len`."""
  reason = unsupported(q.dtype, q.shape[-1], (mask_tile, mask_tile), q_len,
                       kv_len)
  if reason is not None:
    raise ValueError(f"the Mosaic GPU backward cannot take {reason}")
  tiles = (pl.cdiv(rows_len, mask_tile), pl.cdiv(cols_len, mask_tile))
  if (lists.count.shape[2], lists.index.shape[3]) != tiles:
    raise ValueError(
        f"lists of {lists.count.shape[2]} rows x {lists.index.shape[3]} "
        f"columns do not match {mask_tile}x{mask_tile} tiles of "
        f"{rows_len} x {cols_len} tokens (expected {tiles[0]} x {tiles[1]})")
  if num_programs is not None and num_programs < 1:
    raise ValueError(f"num_programs must be at least 1, got {num_programs}")
  if q.shape[1] % k.shape[1]:
    raise ValueError(f"query heads {q.shape[1]} are not a multiple of kv heads "
                     f"{k.shape[1]}")


def _views(q, k, v, do, lse2, q_len: int, kv_len: int):
  """The kernels' token and lse2 operands (see the module doc: flat where a
  length is a multiple of 128, per example with tails else).

  With dropout, the dQ kernel scales delta by 1 - rate: the kernels take
  `dS = P (dP Z - delta (1 - rate))`, which is the `P (dP Z r - delta)` of
  the kept probabilities (`Z` the keep bits, `r = 1 / (1 - rate)`) over r,
  and put that r into dQ's and dK's final scale (and dV's), so that no
  element is multiplied by it.
  """
  return (token_view(q, q_len), token_view(k, kv_len), token_view(v, kv_len),
          token_view(do, q_len), vector_view(lse2, q_len, jnp.inf))


def _split_refs(refs, dropout: dropout_bits.Dropout, num_outputs: int):
  """The kernel's refs as (count, full, index), the seeds (None without
  dropout: they are an input only with it), the inputs and the outputs."""
  lists, rest = refs[:3], refs[3:]
  seed_ref = rest[0] if dropout.active else None
  rest = rest[int(dropout.active):]
  return lists, seed_ref, rest[:-num_outputs], rest[-num_outputs:]


def dq(q, k, v, o, do, lse2, dlse, lists: BlockLists, *, softmax_scale: float,
       rule: ElementRule, q_len: int, kv_len: int,
       dropout: dropout_bits.Dropout = dropout_bits.Dropout(),
       seeds: jax.Array | None = None, num_programs: int | None = None,
       mask_tile: int = TILE, interpret: bool = False
       ) -> tuple[jax.Array, jax.Array]:
  """dQ `[B * q_len, H, D]` and delta as `dkdv` reads it (`vector_view`
  layout, scaled by 1 - rate with dropout), walking the forward lists
  (`[Bm, Hm, nQ]` counts, `[Bm, Hm, nQ, nK]` indices at `mask_tile`-square
  tiles, one of `MASK_TILES`); lse2 `[H, Tq]` fp32 (`numerics.log2_lse`)
  and dlse `[H, Tq]` or None; dropout and its `[B]` seeds as the forward's
  (`fwd.forward`)."""
  _check(q, k, q_len, kv_len, num_programs, mask_tile, lists, q_len, kv_len)
  seeds = common.dropout_seeds(dropout, seeds, q.shape[0] // q_len)
  tq, num_heads, head_dim = q.shape
  group = num_heads // k.shape[1]
  # Causal: later query tiles see more keys, so they run first.
  schedule = persistent_schedule(pl.cdiv(q_len, TILE), num_heads, tq // q_len,
                                 num_programs, causal=rule.causal,
                                 reverse=rule.causal)

  has_dlse = dlse is not None

  def compute(wg, refs, sh, copies):
    (count, full, index), seed_ref, _, outputs = _split_refs(refs, dropout, 2)
    _dq_compute(wg, (count, full, index, seed_ref, *outputs), sh, copies,
                schedule, scale=softmax_scale, rule=rule, q_len=q_len,
                kv_len=kv_len, mask_tile=mask_tile, dropout=dropout,
                has_dlse=has_dlse, interpret=interpret)

  def memory(refs, sh, copies):
    (count, _, index), _, inputs, _ = _split_refs(refs, dropout, 2)
    _dq_memory((count, index, *inputs), sh, copies, schedule, q_len=q_len,
               kv_len=kv_len, group=group, mask_tile=mask_tile)

  q_view, k_view, v_view, do_view, lse2_view = _views(q, k, v, do, lse2, q_len,
                                                      kv_len)
  operands = (q_view, k_view, v_view, do_view, token_view(o, q_len), lse2_view,
              *((vector_view(dlse, q_len, 0.0),) if has_dlse else ()))
  buffers = _dq_buffers(head_dim, q.dtype,
                        common.copies_through_alias(head_dim, q.dtype, interpret),
                        mask_tile)
  out_type = (jax.ShapeDtypeStruct(q_view.shape, q.dtype),
              jax.ShapeDtypeStruct(lse2_view.shape, jnp.float32))
  # One load per item buffer, but the delta buffer's only with dlse.
  item_loads = len(buffers[0]) - (not has_dlse)
  dq_view, delta = _launch(DQ_KERNEL, compute, memory, buffers, out_type,
                           schedule.num_programs, interpret,
                           item_loads=item_loads, mask_tile=mask_tile)(
      *lists.walked, *((seeds,) if dropout.active else ()), *operands)
  return flat_tokens(dq_view), delta


def dkdv(q, k, v, do, lse2, delta, lists: BlockLists, *, softmax_scale: float,
         rule: ElementRule, q_len: int, kv_len: int,
         dropout: dropout_bits.Dropout = dropout_bits.Dropout(),
         seeds: jax.Array | None = None,
         num_programs: int | None = None, mask_tile: int = TILE,
         interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """dK, dV `[B * kv_len, Hkv, D]` (summed over each GQA group's query
  heads), walking the transposed lists (`[Bm, Hm, nK]` counts,
  `[Bm, Hm, nK, nQ]` indices); delta as `dq` returns it; dropout, seeds
  and `mask_tile` as in `dq`."""
  _check(q, k, q_len, kv_len, num_programs, mask_tile, lists, kv_len, q_len)
  seeds = common.dropout_seeds(dropout, seeds, q.shape[0] // q_len)
  tk, num_kv_heads, head_dim = k.shape
  group = q.shape[1] // num_kv_heads
  # Causal: earlier key tiles are seen by more queries and already run first.
  schedule = persistent_schedule(pl.cdiv(kv_len, TILE), num_kv_heads,
                                 tk // kv_len, num_programs,
                                 causal=rule.causal, reverse=False)

  def compute(wg, refs, sh, copies):
    (count, full, index), seed_ref, _, (dk_ref, dv_ref) = _split_refs(
        refs, dropout, 2)
    _dkdv_compute(wg, (count, full, index, seed_ref, dk_ref, dv_ref), sh, copies,
                  schedule, scale=softmax_scale, rule=rule, q_len=q_len,
                  kv_len=kv_len, group=group, mask_tile=mask_tile,
                  dropout=dropout, interpret=interpret)

  def memory(refs, sh, copies):
    (count, _, index), _, inputs, _ = _split_refs(refs, dropout, 2)
    _dkdv_memory((count, index, *inputs), sh, copies, schedule, q_len=q_len,
                 kv_len=kv_len, group=group, mask_tile=mask_tile)

  operands = (*_views(q, k, v, do, lse2, q_len, kv_len), delta)
  out = jax.ShapeDtypeStruct(operands[1].shape, k.dtype)
  buffers = _dkdv_buffers(
      head_dim, k.dtype,
      common.copies_through_alias(head_dim, k.dtype, interpret), mask_tile,
      dropout.active, rule.causal)
  # P^T's buffer is allocated where the sub-steps take one score tile at a
  # time (the decision `_dkdv_buffers` made), as `_dkdv_compute` tests it.
  _, _, _, scores, *_ = buffers
  dk, dv = _launch(DKDV_KERNEL, compute, memory, buffers, (out, out),
                   schedule.num_programs, interpret, mask_tile=mask_tile,
                   registers=REGISTERS_SCORES_IN_TURN if scores else REGISTERS)(
      *lists.walked, *((seeds,) if dropout.active else ()), *operands)
  return flat_tokens(dk), flat_tokens(dv)


def backward(q, k, v, o, lse, do, dlse, forward_lists: BlockLists,
             backward_lists: BlockLists, *, softmax_scale: float,
             rule: ElementRule, q_len: int, kv_len: int,
             dropout: dropout_bits.Dropout = dropout_bits.Dropout(),
             seeds: jax.Array | None = None,
             num_programs: int | None = None, mask_tile: int = TILE,
             interpret: bool = False):
  """Gradients (dq, dk, dv) on flat sequences of equal length, shapes as q,
  k, v; lse `[H, Tq]` and its cotangent dlse (or None) from the forward;
  dropout and its `[B]` seeds as the forward's (the same keep bits); the
  lists at `mask_tile`-square tiles (one of `MASK_TILES`)."""
  lse2 = log2_lse(lse)
  kw = dict(softmax_scale=softmax_scale, rule=rule, q_len=q_len,
            kv_len=kv_len, dropout=dropout, seeds=seeds,
            num_programs=num_programs, mask_tile=mask_tile,
            interpret=interpret)
  dq_, delta = dq(q, k, v, o, do, lse2, dlse, forward_lists, **kw)
  dk, dv = dkdv(q, k, v, do, lse2, delta, backward_lists, **kw)
  return dq_, dk, dv
