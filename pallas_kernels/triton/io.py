"""How the Triton kernels find, load and store their tiles.

Sequences are rows of a flat `[T, heads, D]` array, placed by `seq_info`
(`pallas_kernels.seq_info`). Mask index lists come as ordinary int32 inputs
(the Triton lowering has no scalar prefetch); a BlockSpec selects the
program's (batch, head) row and the kernel reads scalars from it.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dropout as dropout_bits
from pallas_kernels import seq_info as si
from pallas_kernels.block_lists import BlockLists
from pallas_kernels.masking import ElementRule
from pallas_kernels.numerics import LOG2_E
from pallas_kernels.seq_info import SEQ_INFO_WIDTH
from pallas_kernels.triton.configs import KernelConfig, padded_head_dim


def launch_geometry(q, k, config: KernelConfig, mask_tile: tuple[int, int]):
  """(Tq, Tk, H, Hkv, GQA group, D, padded D, config clamped to the mask tile)."""
  tq, num_heads, head_dim = q.shape
  tk, num_kv_heads, _ = k.shape
  return (tq, tk, num_heads, num_kv_heads, num_heads // num_kv_heads, head_dim,
          padded_head_dim(head_dim), config.clamp_to(mask_tile))


def row_spec(num_rows: int, padded_head_dim: int, head_index):
  """BlockSpec of one head's full `[T, D]` slab of a `[T, heads, D]` array."""
  return pl.BlockSpec(
      (num_rows, None, padded_head_dim), lambda *g: (0, head_index(*g), 0))


def list_spec(list_shape: tuple[int, ...], batch_index, head_index,
              heads_per_program: int | None = None):
  """BlockSpec selecting the index lists of one (batch, head) program.

  A list array is `[Bm, Hm, ...]` with Bm, Hm either full or 1 (shared);
  shared axes always read entry 0. With `heads_per_program` (the dK/dV kernel,
  which serves a whole GQA group) the head axis is kept: `head_index` then
  names the group, and the block holds its heads (or the one shared entry).
  """
  bm, hm, *rest = list_shape
  if heads_per_program is None:
    head_block = None
  else:
    head_block = heads_per_program if hm > 1 else 1
  def index_map(*g):
    b = batch_index(*g) if bm > 1 else 0
    h = head_index(*g) if hm > 1 else 0
    return (b, h) + (0,) * len(rest)
  return pl.BlockSpec((None, head_block, *rest), index_map)


def seq_info_spec(batch_index):
  return pl.BlockSpec((None, SEQ_INFO_WIDTH), lambda *g: (batch_index(*g), 0))


def query_grid_specs(lists: BlockLists, num_rows_q, num_rows_kv,
                     padded_head_dim, group):
  """In-specs shared by the kernels on a `(query tile, head, example)` grid:
  seq_info, the forward lists, and the q / k / v rows (k, v of the GQA group)."""
  batch_of = lambda i, h, b: b
  head_of = lambda i, h, b: h
  kv_head_of = lambda i, h, b: h // group
  return [
      seq_info_spec(batch_of),
      *(list_spec(x.shape, batch_of, head_of) for x in lists.walked),
      row_spec(num_rows_q, padded_head_dim, head_of),
      row_spec(num_rows_kv, padded_head_dim, kv_head_of),
      row_spec(num_rows_kv, padded_head_dim, kv_head_of),
  ]


def seq_value(seq_ref, column: int, static: int | None):
  """A seq_info entry of this program's example, or its trace-time constant."""
  return seq_ref[column] if static is None else static


def rule_indices(rule: ElementRule, *, batch_axis: int, head_axis: int):
  """(example, head) program ids for a rule's `mask_fn`; (None, None) when the
  rule has none (no program-id reads are traced then)."""
  if rule.mask_fn is None:
    return None, None
  return pl.program_id(batch_axis), pl.program_id(head_axis)


class ProgramTile(NamedTuple):
  """Where this program's own tile (query tile, or key tile for dK/dV) lives."""
  start: jax.Array      # first row of the example in the flat array
  length: jax.Array     # real tokens of the example
  offset: jax.Array     # first row of the tile within the example
  pos: jax.Array        # [block] positions of the tile's rows within the example
  in_span: jax.Array    # [block] rows the example owns (may be written)
  list_row: jax.Array   # row of the mask lists this tile reads


def example_extent(seq_ref, columns: tuple[int, int, int],
                   static: tuple[int | None, int | None]):
  """(first row in the flat array, real length) of this program's example on one
  side; `columns` = seq_info's (start, len, span), `static` = (span, length)."""
  start_col, len_col, _ = columns
  return seq_ref[start_col], seq_value(seq_ref, len_col, static[1])


def program_tile(seq_ref, columns: tuple[int, int, int], block: int,
                 tiles_per_list_row: int,
                 static: tuple[int | None, int | None]) -> ProgramTile:
  """The tile of grid axis 0; `columns` = seq_info's (start, len, span) columns,
  `static` = (span, length) as trace-time constants or None (`StaticSizes`)."""
  tile = pl.program_id(0)
  offset = tile * block
  pos = offset + jnp.arange(block, dtype=jnp.int32)
  list_row, _ = split_step(tile, tiles_per_list_row)
  start, length = example_extent(seq_ref, columns, static)
  span = seq_value(seq_ref, columns[2], static[0])
  return ProgramTile(start, length, offset, pos, pos < span, list_row)


class QueryProgram(NamedTuple):
  """What a program on a `(query tile, head, example)` grid (the forward and
  dQ kernels) knows before its key loop."""
  cols: jax.Array | None      # real head-dim columns, or None
  qk_scale: float             # softmax scale folded into log2(e)
  kv_start: jax.Array         # first key row of the example
  kv_len: jax.Array           # real keys of the example
  tile: ProgramTile           # this program's query tile
  batch: jax.Array | None     # program ids for the rule's mask_fn
  head: jax.Array | None
  drop_rows: jax.Array | None  # per-row dropout hashes (dropout on)


def query_program(seq_ref, padded_head_dim: int, head_dim: int, scale: float,
                  rule: ElementRule, block_q: int, mask_tile: tuple[int, int],
                  static: si.StaticSizes,
                  dropout: dropout_bits.Dropout) -> QueryProgram:
  cols = column_mask(head_dim, padded_head_dim)
  kv_start, kv_len = example_extent(seq_ref, si.KEY_COLUMNS, static.key())
  qt = program_tile(seq_ref, si.QUERY_COLUMNS, block_q, mask_tile[0] // block_q,
                    static.query())
  batch, head = rule_indices(rule, batch_axis=2, head_axis=1)
  drop_rows = None
  if dropout.active:
    drop_rows = dropout_bits.row_hashes(
        dropout_bits.head_seed(seq_ref[si.SEED], pl.program_id(1)), qt.pos[:, None])
  return QueryProgram(cols, scale * LOG2_E, kv_start, kv_len, qt, batch, head,
                      drop_rows)


class ListWalk(NamedTuple):
  """A program's walk over one row of mask lists, in kernel tiles: steps
  `[0, num_full)` need no element masking, `[num_full, num_all)` do;
  `offset(step)` is the step's first row within the example."""
  num_full: jax.Array
  num_all: jax.Array
  offset: Callable


def list_walk(count_ref, full_count_ref, index_ref, list_index: tuple,
              mask_tile: int, block: int) -> ListWalk:
  """The walk over list row `list_index` when each listed mask tile of
  `mask_tile` rows is covered in kernel tiles of `block` rows."""
  steps_per_tile = mask_tile // block
  return ListWalk(
      full_count_ref[list_index] * steps_per_tile,
      count_ref[list_index] * steps_per_tile,
      functools.partial(listed_offset, index_ref, list_index,
                        steps_per_tile=steps_per_tile, mask_tile=mask_tile,
                        block=block))


def listed_offset(index_ref, list_index: tuple, step, steps_per_tile: int,
                  mask_tile: int, block: int):
  """Row offset of loop step `step` when a program walks its list of mask
  tiles in `steps_per_tile` kernel tiles each."""
  slot, sub = split_step(step, steps_per_tile)
  return index_ref[(*list_index, slot)] * mask_tile + sub * block


def split_step(step, sub_steps: int):
  """(listed tile slot, sub-tile) of loop step `step` when each listed mask tile
  is walked in `sub_steps` kernel tiles (a power of two: shifts, not division)."""
  step = jnp.asarray(step, jnp.int32)   # a Python int is int64 under x64
  if sub_steps == 1:
    return step, 0
  shift = jnp.int32(sub_steps.bit_length() - 1)   # int32 also under jax_enable_x64
  return (jax.lax.shift_right_logical(step, shift),
          jax.lax.bitwise_and(step, jnp.int32(sub_steps - 1)))


def column_mask(head_dim: int, padded_head_dim: int):
  """`[1, Dp]` mask of real head-dim columns, or None when none are padding."""
  if head_dim == padded_head_dim:
    return None
  return (jnp.arange(padded_head_dim, dtype=jnp.int32) < head_dim)[None, :]


def load_rows(ref, start, num_rows: int, valid_rows, col_mask, other=0.0,
              head=None):
  """Load `num_rows` rows from `start`; rows where valid_rows is False read `other`.

  valid_rows None means every row is in bounds (a full tile), the fast path.
  `head` picks one head of a `[T, heads, Dp]` ref (the dK/dV kernel's group).
  """
  if head is None:
    window = ref.at[pl.ds(start, num_rows), :]
  else:
    window = ref.at[pl.ds(start, num_rows), head, :]
  if valid_rows is None and ref.shape[0] < num_rows:
    # Only reachable in a loop that never runs (the array is shorter than one
    # tile); a masked load keeps it traceable in interpret mode.
    valid_rows = start + jnp.arange(num_rows, dtype=jnp.int32) < ref.shape[0]
  if valid_rows is None and col_mask is None:
    return window[...]
  if valid_rows is None:
    mask = col_mask
  elif col_mask is None:
    mask = valid_rows[:, None]
  else:
    mask = valid_rows[:, None] & col_mask
  return plgpu.load(window, mask=mask, other=other)


def store_rows(ref, start, value, valid_rows, col_mask):
  """Store a `[rows, Dp]` tile, writing only valid rows and real columns."""
  mask = valid_rows[:, None]
  if col_mask is not None:
    mask = mask & col_mask
  # Column window as an int32 slice: a bare `:` indexes with int64 under
  # jax_enable_x64, which interpret mode cannot mix with the int32 start.
  columns = pl.ds(jnp.int32(0), value.shape[1])
  plgpu.store(ref.at[pl.ds(start, value.shape[0]), columns], value, mask=mask)


def load_vector(ref, start, num: int, valid, other, head=None):
  """Load a `[num]` slice of a per-row vector (lse, delta), masked by `valid`
  (None: every row in bounds); `head` picks a row of a `[heads, T]` ref."""
  if valid is None and ref.shape[-1] < num:
    valid = start + jnp.arange(num, dtype=jnp.int32) < ref.shape[-1]
  window = ref.at[pl.ds(start, num)] if head is None else ref.at[head, pl.ds(start, num)]
  if valid is None:
    return window[...]
  return plgpu.load(window, mask=valid, other=other)


def store_vector(ref, start, value, valid):
  plgpu.store(ref.at[pl.ds(start, value.shape[0])], value, mask=valid)


# The Triton lowering maps DEFAULT precision to TF32 for fp32 operands (~3e-4
# relative error); HIGHEST keeps fp32 exact and changes nothing for fp16/bf16.
_EXACT = jax.lax.Precision.HIGHEST


def _contract(a, b, dims):
  return jax.lax.dot_general(a, b, (dims, ((), ())), precision=_EXACT,
                             preferred_element_type=jnp.float32)


def matmul_nt(a, b):
  """a @ b.T with fp32 accumulation."""
  return _contract(a, b, ((1,), (1,)))


def matmul_tn(a, b):
  """a.T @ b with fp32 accumulation."""
  return _contract(a, b, ((0,), (0,)))


def matmul(a, b):
  """a @ b with fp32 accumulation."""
  return _contract(a, b, ((1,), (0,)))
