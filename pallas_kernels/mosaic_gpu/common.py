"""What the Mosaic GPU (Hopper) kernels share: the target, the persistent
schedule of work items, list reads, the compute warpgroups' ping-pong and
the dropout bits in registers."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import dropout as dropout_bits
from pallas_kernels import target
from pallas_kernels.seq_info import StaticSizes

TILE = 128                 # rows of a work item's tile = rows per key step = mask tile
ROWS_PER_WARPGROUP = 64    # a wgmma's M
ROW_TILE = 8               # rows of the tiled shared-memory layout
COMPUTE_WARPGROUPS = 2
H100_SMS = 132
HEAD_DIMS = (64, 128)

SWIZZLE = 128                                  # bytes: one row of a tile
TILED = (plgpu.TilingTransform((ROW_TILE, 64)), plgpu.SwizzleTransform(SWIZZLE))


def row_major_copies(head_dim: int, dtype) -> bool:
  """Whether token tiles of this head dim can travel by TMA through a
  row-major alias of their shared memory, at any row offset.

  wgmma takes shared memory tiled in (8, 64) blocks, 128-byte swizzled, and
  Mosaic GPU lowers a TMA copy into such a tile by splitting the global row
  axis into 8-row tiles: the array's row count and the box's first row must
  then be multiples of 8. When a row is exactly one 128-byte swizzle span
  (D=64 in 16 bits), the tiled layout and the row-major 128-byte swizzled
  layout are the same bytes, so the copy can go through a row-major alias
  (`token_tiles`), which TMA writes at any row offset; wgmma reads the
  tiled alias.
  """
  return head_dim * np.dtype(dtype).itemsize == SWIZZLE


def copies_through_alias(head_dim: int, dtype, interpret: bool) -> bool:
  """Whether a kernel allocates its token tiles with a row-major copy alias
  (`token_tiles`): where `row_major_copies` holds, except in Mosaic GPU's
  interpreter, which keeps union members apart (interpreted kernels copy
  into the tiled buffer itself, which lays out nothing and takes any
  offset)."""
  return row_major_copies(head_dim, dtype) and not interpret


def token_tiles(shape: tuple[int, ...], dtype, row_major: bool):
  """Shared memory for token tiles `[..., rows, D]`: tiled and swizzled for
  wgmma; with `row_major` a union of it and its row-major alias (see
  `row_major_copies`, `copies_through_alias`; `tile_views` splits them
  inside the kernel)."""
  tiled = plgpu.SMEM(shape, dtype, transforms=TILED)
  if not row_major:
    return tiled
  return plgpu.RefUnion(tiled, plgpu.SMEM(
      shape, dtype, transforms=(plgpu.SwizzleTransform(SWIZZLE),)))


def tile_views(ref, row_major: bool) -> tuple:
  """(the view wgmma reads, the view TMA copies go through) of a
  `token_tiles(..., row_major)` buffer inside the kernel."""
  if row_major:
    tiled, untiled = ref
    return tiled, untiled
  return ref, ref


def spec_bytes(spec) -> int:
  """Bytes of a shared-memory spec (a union: its largest member)."""
  if isinstance(spec, plgpu.RefUnion):
    return max(spec_bytes(member) for member in spec.refs)
  return math.prod(spec.shape) * np.dtype(spec.dtype).itemsize


def unsupported_lengths(q_len: int | None, kv_len: int | None, head_dim: int,
                        dtype) -> str | None:
  """Why the Mosaic kernels do not take these per-example lengths, or None.

  Any length where token tiles travel row-major (D=64, `row_major_copies`);
  else multiples of 8: the copies into the 8-row tiled shared memory split
  the global row axis into (S / 8, 8) tiles, and Mosaic GPU refuses a row
  count or a first row that is not a multiple of 8
  (`jax.experimental.mosaic.gpu.launch_context.TileTransform`). A length
  that is not a multiple of `TILE` is addressed through a `[B, S, H, D]`
  view (see `token_view`), where TMA zero-fills what a box reads past the
  example's end and drops what it stores there.

  Tried for D=64 before row-major copies (H200, bf16, fwd+bwd ms, one
  process): copies padded per example to the next multiple of 8, with the
  padded keys masked, cost more than the Mosaic kernels saved at ViT-B's 197
  tokens (1.100 against 1.037 for Triton); the row-major copies need none
  (0.680, `benchmarks/PERF_NOTES.md`).
  """
  if q_len is None or kv_len is None:
    return "per-example lengths (takes the padded layout at full length)"
  if row_major_copies(head_dim, dtype):
    return None
  if q_len % ROW_TILE or kv_len % ROW_TILE:
    return (f"lengths {q_len}/{kv_len} at head dim {head_dim} (takes "
            f"multiples of {ROW_TILE}: TMA copies into the {ROW_TILE}-row "
            f"tiled shared memory; any length at D=64)")
  return None


def token_view(x, seq_len: int):
  """How the kernels address flat `[B * S, H, D]` tokens: as they are when
  `S` is a multiple of `TILE` (every tile lies inside its example), else as
  `[B, S, H, D]` (a free reshape), so each TMA box is bounded by its own
  example: rows past its end read as zeros and stores to them are dropped."""
  if seq_len % TILE == 0:
    return x
  return x.reshape(x.shape[0] // seq_len, seq_len, *x.shape[1:])


def flat_tokens(x):
  """The flat `[B * S, H, D]` layout of a `token_view` (4-D or flat)."""
  return x.reshape(-1, *x.shape[-2:]) if x.ndim == 4 else x


def token_rows(ref, seq_len: int, batch, start, size: int, head):
  """Rows `start .. start + size` of example `batch`, head `head`, of a
  `token_view` ref (flat `[B * S, H, D]` or `[B, S, H, D]`)."""
  if len(ref.shape) == 4:
    return ref.at[batch, pl.ds(start, size), head]
  return ref.at[pl.ds(batch * seq_len + start, size), head]


def vector_view(x, seq_len: int, fill: float):
  """A per-row statistic `[H, B * S]` (fp32) as the kernels read it: as it
  is when `S` is a multiple of `TILE`, else `[H, B, S']` with each example
  padded with `fill` to whole tiles (every 128-row read stays inside its
  example; the padding is what the kernels see for rows past its end)."""
  if seq_len % TILE == 0:
    return x
  heads, total = x.shape
  padded = -(-seq_len // TILE) * TILE
  x = x.reshape(heads, total // seq_len, seq_len)
  return jnp.pad(x, ((0, 0), (0, 0), (0, padded - seq_len)),
                 constant_values=fill)


def vector_rows(ref, seq_len: int, head, batch, start, size: int):
  """Rows `start .. start + size` of example `batch` of a `vector_view` ref."""
  if len(ref.shape) == 3:
    return ref.at[head, batch, pl.ds(start, size)]
  return ref.at[head, pl.ds(batch * seq_len + start, size)]


def targets_hopper() -> bool:
  """Whether the computation being traced runs on a Hopper (sm90) GPU (the
  abstract mesh's device kind when lowering on a CPU machine)."""
  gpu = target.traced_for()
  return gpu is not None and gpu.compute_capability // 10 == 9


def unsupported_shape(dtype, head_dim: int, mask_tile: tuple[int, int],
                      q_len: int | None, kv_len: int | None, *, tile: int = TILE,
                      blocks: str = "128-multiple blocks") -> str | None:
  """What no Mosaic GPU kernel takes (dtype, head dim, a mask tile other than
  `tile` x `tile`, which user `blocks` give, per-example lengths), or None;
  each kernel then adds its own rule on the lengths."""
  if np.dtype(dtype) not in (np.dtype(jnp.float16), np.dtype(jnp.bfloat16)):
    return f"dtype {np.dtype(dtype).name} (takes float16/bfloat16)"
  if head_dim not in HEAD_DIMS:
    return f"head dim {head_dim} (takes {HEAD_DIMS})"
  if tuple(mask_tile) != (tile, tile):
    return f"mask tile {tuple(mask_tile)} (takes {(tile, tile)}: {blocks})"
  if q_len is None or kv_len is None:
    return "per-example lengths (takes the padded layout at full length)"
  return None


def unsupported_call(unsupported: Callable[..., str | None], dtype, head_dim: int,
                     mask_tile: tuple[int, int], static: StaticSizes) -> str | None:
  """A kernel's `unsupported(dtype, head_dim, mask_tile, q_len, kv_len)` for a
  call of the flat layout, plus the layout and the target: every example at
  its full padded length, traced for a Hopper GPU."""
  if not static.padded_full_length:
    return "ragged or packed sequences (takes the padded layout at full length)"
  reason = unsupported(dtype, head_dim, mask_tile, static.q_len, static.kv_len)
  if reason is None and not targets_hopper():
    reason = "target is not a Hopper (sm90) GPU"
  return reason


def align(size: int, alignment: int) -> int:
  """`size` rounded up to a multiple of `alignment` (shared-memory layout)."""
  return -(-size // alignment) * alignment


def num_sms() -> int:
  """Streaming multiprocessors of the target GPU (the persistent grid's size)."""
  return target.num_sms(default=H100_SMS)


class Schedule(NamedTuple):
  """Which (tile, head, example) work items a persistent program runs.

  Items run in rounds of `num_programs`, one per program: round r holds
  items rP .. rP + P - 1, so items that run at the same time are neighbours
  in the item order.

  - By default item `w` is tile `w % nq` of head `(w // nq) % H` of example
    `w // (nq * H)`: programs running at the same time work on neighbouring
    tiles of one head, which share its K/V in L2; program p runs items p,
    p + P, p + 2P, ...
  - `reverse`: tiles run last to first (causal forward and dQ, whose later
    query tiles see more keys: the long items are not left for the end).
  - `balanced` (causal masks, `persistent_schedule`): every (example, head)
    sequence is interleaved tile by tile (item `w` is tile `w // S` of
    sequence `w % S`), so item lengths fall steadily along the order, and
    odd rounds hand their items out in reverse program order (program p
    takes item rP + P - 1 - p), so a program that took one of the longer
    items of a round takes one of the shorter of the next.

  Balanced, every program runs the same number of tiles within 1% at the
  benchmark shapes (`tests/test_hopper_interpret.py`). Program p running
  every P-th item instead got up to 8-10% more tiles than the mean (B1
  S16384 with 8 sequences interleaved, the previous rule; 57% with none),
  and the kernel's time followed the busiest program (H200: 0.91, 1.27,
  1.08, 1.00 ms forward for B2 S8192 causal at 1, 2, 4, 8 sequences
  interleaved, whose busiest programs had 1.08, 1.56, 1.29, 1.16 times the
  mean).
  """
  num_q_tiles: int
  num_heads: int
  num_items: int
  num_programs: int
  reverse: bool = False
  balanced: bool = False

  def items_of_this_program(self):
    program = lax.axis_index("p")
    programs = jnp.int32(self.num_programs)
    rounds, rest = divmod(self.num_items, self.num_programs)
    # The last round, partial, reaches programs 0 .. rest - 1, or the last
    # `rest` programs when it is an odd round of a balanced schedule.
    if self.balanced and rounds % 2:
      in_last = program >= programs - rest
    else:
      in_last = program < rest
    return program, jnp.int32(rounds) + in_last.astype(jnp.int32)

  def item(self, program, i):
    tiles = jnp.int32(self.num_q_tiles)
    heads = jnp.int32(self.num_heads)      # int32 operands also under x64
    if self.balanced:
      position = jnp.where(lax.rem(i, jnp.int32(2)) == 1,
                           jnp.int32(self.num_programs - 1) - program, program)
      w = position + i * self.num_programs
      sequences = jnp.int32(self.num_items // self.num_q_tiles)
      tile, sequence = lax.div(w, sequences), lax.rem(w, sequences)
    else:
      w = program + i * self.num_programs
      tile, sequence = lax.rem(w, tiles), lax.div(w, tiles)
    if self.reverse:
      tile = tiles - 1 - tile
    return tile, lax.rem(sequence, heads), lax.div(sequence, heads)


def persistent_schedule(num_tiles: int, num_heads: int, batch: int,
                        num_programs: int | None, *, causal: bool,
                        reverse: bool) -> Schedule:
  """The schedule of `num_tiles` items per (example, head) over at most
  `num_programs` programs (default: one per SM); balanced for causal masks
  (see `Schedule`)."""
  num_items = num_tiles * num_heads * batch
  programs = min(num_items, num_programs or num_sms())
  return Schedule(num_tiles, num_heads, num_items, programs, reverse,
                  balanced=causal)


def list_entry(ref, batch, head, *rest):
  """Entry of a `[Bm, Hm, ...]` list array; axes of size 1 are shared."""
  bm, hm = ref.shape[:2]
  return ref[(batch if bm > 1 else 0, head if hm > 1 else 0, *rest)]


def release_q_buffer(q_free, item):
  """Item `item`'s o and lse stores (a forward's epilogue) have read shared
  memory: its q buffer (of two, `q_free` their barriers) may take the q of
  the item two later, and the lse buffer the next item's lse."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  plgpu.barrier_arrive(q_free.at[lax.rem(item, jnp.int32(2))])


def rendezvous(turn):
  """Both compute warpgroups meet here; alternating meetings order their matmuls."""
  plgpu.barrier_arrive(turn)
  plgpu.barrier_wait(turn)


def dropout_seeds(dropout: dropout_bits.Dropout, seeds, batch: int):
  """The `[B]` int32 per-example seeds a kernel takes with dropout (None
  without); raises unless there is one per example."""
  if not dropout.active:
    return None
  if seeds is None or seeds.shape != (batch,):
    raise ValueError(f"dropout needs seeds of shape ({batch},) (one per "
                     f"example), got {None if seeds is None else seeds.shape}")
  return seeds.astype(jnp.int32)


def tile_positions(first_row, first_col, shape: tuple[int, int]):
  """The row and column positions of a WGMMA-layout tile of `shape` whose
  first element is (`first_row`, `first_col`): two int32 arrays of `shape`.

  Each is an iota along one axis (a vector in the reduced layout, as many
  values per thread as the thread holds rows or columns) broadcast over the
  other, so a partial tile's element mask costs one comparison per element
  beside a few dozen index computations per thread; a full-tile iota per
  axis computes every element's index, and cost the causal backward 3-5%
  (`benchmarks/PERF_NOTES.md`). Both vectors pass an optimization barrier
  (no instructions): a rule may ignore one of them (a length test reads
  only the columns), and Mosaic GPU's layout inference finds no layout for
  an iota whose uses were all removed."""
  rows, cols = shape
  row_pos = first_row + plgpu.broadcasted_iota(
      jnp.int32, (rows,), 0, layout=plgpu.Layout.WGMMA.reduce(1))
  col_pos = first_col + plgpu.broadcasted_iota(
      jnp.int32, (cols,), 0, layout=plgpu.Layout.WGMMA.reduce(0))
  row_pos, col_pos = lax.optimization_barrier((row_pos, col_pos))
  return (lax.broadcast_in_dim(row_pos, shape, [0]),
          lax.broadcast_in_dim(col_pos, shape, [1]))


def partial_tile_mask(rule, first_row, first_col, shape: tuple[int, int], *,
                      q_len: int, kv_len: int, batch, head):
  """The elements of a query-by-key tile of `shape` starting at (`first_row`,
  `first_col`) that `rule` (an `ElementRule`) lets attend: bool, `shape`,
  WGMMA layout. Key lengths are tested only where `kv_len` is not a multiple
  of the tile's width: only then can a key tile run past its example's end
  (into the next example's keys, or zeros)."""
  q_pos, kv_pos = tile_positions(first_row, first_col, shape)
  return rule(q_pos, kv_pos, q_len=q_len, kv_len=kv_len, batch=batch,
              head=head, check_kv_len=kv_len % shape[1] != 0)


def query_hashes(head_seed, first_query, size: int, layout):
  """The dropout hashes of queries `first_query .. first_query + size` of one
  (example, head) (`head_seed` from `dropout.head_seed`), a vector of
  `layout` (a reduced WGMMA layout: queries along the tile's rows, or its
  columns in a transposed tile). One finalizer per query, so that each element
  costs a few more operations (`keep_mask`)."""
  q_pos = first_query + plgpu.broadcasted_iota(jnp.int32, (size,), 0,
                                               layout=layout)
  return dropout_bits.row_hashes(head_seed, q_pos)


def keep_mask(hashes, first_key, shape: tuple[int, int],
              dropout: dropout_bits.Dropout, query_axis: int = 0):
  """The dropout mask of a WGMMA-layout tile of `shape` whose queries (with
  `hashes`, from `query_hashes`) lie along `query_axis` and whose keys run
  from `first_key` along the other axis, as 16-bit masks (all ones where
  kept, 0 where dropped; see `drop_half`): `dropout.keep` of each element's
  query hash and key position, the bits of the Triton kernels and the
  reference."""
  per_query = lax.broadcast_in_dim(hashes, shape, [query_axis])
  kv_pos = first_key + plgpu.broadcasted_iota(jnp.int32, shape, 1 - query_axis,
                                              layout=plgpu.Layout.WGMMA)
  kept = dropout_bits.keep(per_query, kv_pos, dropout)
  return jnp.where(kept, jnp.int16(-1), jnp.int16(0))


def drop_half(x, mask):
  """Half-precision `x` where `mask` (from `keep_mask`) keeps and +0 where
  it drops, bitwise: exactly `where(kept, x, 0)`."""
  return lax.bitcast_convert_type(
      lax.bitcast_convert_type(x, jnp.int16) & mask, x.dtype)
