"""BlockMask: a block pattern and token rule turned into the lists the kernels walk.

Built once (it is a pytree, so it can be built under `jit`, passed through `jit`
and reused across layers and steps). At *mask tile* granularity (`tile`: the
largest power of two dividing the user block, capped at 128) it holds:

- `kv_lists` (`pallas_kernels.block_lists.BlockLists`): for each query tile,
  how many key tiles are active (`count`), how many of those are *full*
  (`full_count`: every element attends, no element masking), and which
  (`index`: full tiles first, then partial ones, each ascending), and the
  query tiles in order of their counts (`longest_first`);
- `q_lists`: the transposed lists (for each key tile, its query tiles) that
  the dK/dV kernel walks;
- the real lengths (`q_lens`, `kv_lens`), `is_causal` and an optional token
  predicate `mask_fn(b, h, q_idx, kv_idx) -> bool`.

A tile is *empty* when no element in it attends (never visited), *partial*
when only some do (a sequence tail, the causal diagonal, `mask_fn` false
somewhere), *full* when all do. Kernels apply the element rule
(`pallas_kernels.masking.ElementRule`: lengths, causal, mask_fn) on partial
tiles only.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from bsattn_jax import input_checks
from pallas_kernels.block_lists import BlockLists, mask_tile_for_block
from pallas_kernels.masking import ElementRule, MaskFn

# Elements of the token rule evaluated at once while classifying tiles for a
# mask_fn (bounded memory: never one Sq x Sk array).
CLASSIFY_CHUNK_ELEMENTS = 1 << 22


def _lengths(seqlens, seq_len: int, name: str):
  """`[Bl]` int32 real lengths (Bl = 1 when every example has the full length)."""
  if seqlens is None:
    return jnp.full((1,), seq_len, jnp.int32)
  seqlens = jnp.asarray(seqlens)
  if seqlens.ndim != 1:
    raise ValueError(f"{name} must be a 1-D array [B] of lengths, got shape {seqlens.shape}")
  if not jnp.issubdtype(seqlens.dtype, jnp.integer):
    raise TypeError(f"{name} must hold integers, got dtype {seqlens.dtype}")
  if not isinstance(seqlens, jax.core.Tracer) and seqlens.size:
    host = np.asarray(seqlens)
    low, high = int(host.min()), int(host.max())
    if low < 0 or high > seq_len:
      raise ValueError(
          f"{name} must lie in [0, {seq_len}], got values from {low} to {high}")
  # Traced lengths cannot be checked here; clipping keeps every kernel access
  # inside its own example.
  return jnp.clip(seqlens.astype(jnp.int32), 0, seq_len)


def lists_from_tiles(active: jax.Array, full: jax.Array) -> BlockLists:
  """Per row of `[..., rows, cols]` bool tiles (visited, and run without
  element masking): count, full count, full-then-partial indices; and the
  rows by count, longest first."""
  n = active.shape[-1]
  col = jnp.arange(n, dtype=jnp.int32)
  key = jnp.where(active, jnp.where(full, col, n + col), 2 * n + col)
  index = jnp.sort(key, axis=-1) % n
  count = jnp.sum(active, axis=-1, dtype=jnp.int32)
  full_count = jnp.sum(active & full, axis=-1, dtype=jnp.int32)
  longest_first = jnp.argsort(-count, axis=-1, stable=True)
  return BlockLists(count, full_count, index.astype(jnp.int32),
                    longest_first.astype(jnp.int32))


def _classify_by_extent(q_lens, kv_lens, tq, tk, n_q, n_k, is_causal):
  """(any, full, full_rows) per tile from lengths and causality alone (exact,
  closed form): `[Bl, 1, nQ, nK]` bool."""
  q_len = q_lens[:, None, None, None]
  kv_len = kv_lens[:, None, None, None]
  q_lo = (jnp.arange(n_q, dtype=jnp.int32) * tq)[:, None]
  kv_lo = (jnp.arange(n_k, dtype=jnp.int32) * tk)[None, :]
  q_hi = jnp.minimum(q_lo + tq, q_len) - 1       # last real query row
  kv_hi = kv_lo + tk - 1
  any_ = (q_lo < q_len) & (kv_lo < kv_len)
  full = kv_hi < kv_len
  if is_causal:
    offset = kv_len - q_len
    any_ = any_ & (kv_lo <= q_hi + offset)
    full = full & (kv_hi <= q_lo + offset)
  # The dK/dV kernel also masks query rows past the real length (in a packed
  # layout they belong to the next sequence); the forward needs not.
  full_rows = full & (q_lo + tq <= q_len)
  return any_, full, full_rows


# Compiled once per rule and shape: an eager build then costs one dispatch,
# not one per row of tiles.
@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6, 7, 8))
def _classify_by_rule(rule: ElementRule, q_lens, kv_lens, batch: int,
                      heads: int, tq: int, tk: int, n_q: int, n_k: int):
  """(any, full, full_rows) per tile, `[batch, heads, nQ, nK]` bool, by
  evaluating the element rule on every element, one row of tiles at a time
  (a few rows per step, at most `CLASSIFY_CHUNK_ELEMENTS` elements)."""
  kv_idx = jnp.arange(n_k * tk, dtype=jnp.int32)[None, :]
  q_lens = jnp.broadcast_to(q_lens, (batch,))
  kv_lens = jnp.broadcast_to(kv_lens, (batch,))

  def one_row(item):
    b, h, row = item
    q_idx = row * tq + jnp.arange(tq, dtype=jnp.int32)[:, None]
    q_len, kv_len = q_lens[b], kv_lens[b]
    ok = rule(q_idx, kv_idx, q_len=q_len, kv_len=kv_len, batch=b, head=h)
    real_row = q_idx < q_len
    per_tile = lambda x: jnp.broadcast_to(x, (tq, n_k * tk)).reshape(tq, n_k, tk)
    any_ = jnp.any(per_tile(ok & real_row), axis=(0, 2))
    full = jnp.all(per_tile(ok | ~real_row), axis=(0, 2))
    full_rows = jnp.all(per_tile(ok & real_row), axis=(0, 2))
    return any_, full, full_rows

  b, h, row = jnp.meshgrid(jnp.arange(batch, dtype=jnp.int32),
                           jnp.arange(heads, dtype=jnp.int32),
                           jnp.arange(n_q, dtype=jnp.int32), indexing="ij")
  items = (b.ravel(), h.ravel(), row.ravel())
  rows_per_step = max(1, CLASSIFY_CHUNK_ELEMENTS // (tq * n_k * tk))
  out = jax.lax.map(one_row, items, batch_size=min(rows_per_step, b.size))
  return tuple(x.reshape(batch, heads, n_q, n_k) for x in out)


def _user_tiles(mask, block_size, tile, n_q, n_k):
  """The user block mask at mask-tile granularity, `[Bm, Hm, nQ, nK]` bool."""
  (m, n), (tq, tk) = block_size, tile
  user = mask != 0
  user = jnp.repeat(user, m // tq, axis=2)[:, :, :n_q]
  return jnp.repeat(user, n // tk, axis=3)[:, :, :, :n_k]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
  """Kernel-ready block sparsity (see the module docstring).

  Shapes (Bm in {1, B}, Hm in {1, H}: 1 means shared; nQ/nK = query/key mask
  tiles): `kv_lists` `[Bm, Hm, nQ]` counts and `[Bm, Hm, nQ, nK]` indices;
  `q_lists` `[Bm, Hm, nK]` and `[Bm, Hm, nK, nQ]`; `q_lens`, `kv_lens` `[Bl]`
  int32 with Bl in {1, B}.

  Compared with FlexAttention's `BlockMask`: there `kv_num_blocks` /
  `kv_indices` count and list the *partial* blocks only and `full_kv_*` the
  full ones; here `kv_lists.count` counts every active tile (full and
  partial), `full_count` the full ones, and one `index` array lists the full
  tiles first, then the partial ones. Causal masking here is bottom-right
  aligned (`is_causal`), while `bsattn_jax.masks.causal` as a `mask_fn` is
  FlexAttention's top-left `q_idx >= kv_idx`.
  """

  kv_lists: BlockLists
  q_lists: BlockLists
  q_lens: jax.Array
  kv_lens: jax.Array
  block_size: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  tile: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  seq_len_q: int = dataclasses.field(metadata=dict(static=True))
  seq_len_kv: int = dataclasses.field(metadata=dict(static=True))
  is_causal: bool = dataclasses.field(metadata=dict(static=True))
  # False when built without q_seqlens / kv_seqlens: every length is the
  # padded one, a trace-time constant the kernels mask against (faster).
  ragged_q: bool = dataclasses.field(metadata=dict(static=True))
  ragged_kv: bool = dataclasses.field(metadata=dict(static=True))
  mask_fn: MaskFn | None = dataclasses.field(default=None,
                                             metadata=dict(static=True))
  mask_fn_bottom_right: bool = dataclasses.field(default=False,
                                                 metadata=dict(static=True))

  @classmethod
  def build(cls, mask: jax.Array | None = None, *, seq_len_q: int,
            seq_len_kv: int | None = None, block_size: tuple[int, int] = (128, 128),
            is_causal: bool = False, q_seqlens: jax.Array | None = None,
            kv_seqlens: jax.Array | None = None, mask_fn: MaskFn | None = None,
            batch_size: int | None = None, num_heads: int | None = None,
            mask_fn_bottom_right: bool = False) -> "BlockMask":
    """Build the index lists from a user block mask and/or a token rule.

    Args:
      mask: `[B|1, H|1, nM, nN]` bool or int (nonzero = attend) at user block
        size, `nM = ceil(seq_len_q / m_block_dim)`, `nN = ceil(seq_len_kv /
        n_block_dim)`; None means every block.
      seq_len_q, seq_len_kv: (padded / maximum) sequence lengths.
      block_size: `(m_block_dim, n_block_dim)`, multiples of 16.
      is_causal: also apply a bottom-right aligned causal mask per element.
      q_seqlens, kv_seqlens: optional `[B]` int real lengths; tokens past them
        are neither attended to nor produce output.
      mask_fn: optional token predicate `mask_fn(b, h, q_idx, kv_idx) -> bool`
        (FlexAttention's `mask_mod`: int32 positions within the example that
        broadcast, b and h scalars) intersected with the block mask: a tile
        is visited iff some element in it passes every test. It must be
        jnp-traceable, hashable, and close over no arrays (the kernels trace
        it inside the GPU kernel); see `bsattn_jax.masks` for ready ones.
      batch_size, num_heads: list rows to build when `mask_fn` reads `b` /
        `h` (default: the mask's, or the lengths' batch).
      mask_fn_bottom_right: `mask_fn` sees query positions shifted by
        `kv_len - q_len` per example (its diagonal at the bottom-right
        corner, as `is_causal`'s); FlexAttention's convention is False.
    """
    m, n = input_checks.check_block_size(block_size)
    seq_len_kv = seq_len_q if seq_len_kv is None else seq_len_kv
    seq_len_q = input_checks.positive_int(seq_len_q, "seq_len_q")
    seq_len_kv = input_checks.positive_int(seq_len_kv, "seq_len_kv")
    n_m, n_n = math.ceil(seq_len_q / m), math.ceil(seq_len_kv / n)
    if mask is None:
      mask = jnp.ones((1, 1, n_m, n_n), jnp.bool_)
    mask = jnp.asarray(mask)
    if mask.ndim != 4:
      raise ValueError(
          f"mask must be 4-D [B|1, H|1, nM, nN], got shape {mask.shape}")
    if mask.shape[2:] != (n_m, n_n):
      raise ValueError(
          f"mask must have {n_m} x {n_n} blocks for seq_len_q={seq_len_q}, "
          f"seq_len_kv={seq_len_kv}, block_size=({m}, {n}); got {mask.shape[2]} x "
          f"{mask.shape[3]} (mask shape {mask.shape})")
    if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)
            or jnp.issubdtype(mask.dtype, jnp.floating)):
      raise TypeError(f"mask must be bool or numeric, got dtype {mask.dtype}")
    q_lens = _lengths(q_seqlens, seq_len_q, "q_seqlens")
    kv_lens = _lengths(kv_seqlens, seq_len_kv, "kv_seqlens")
    batches = {mask.shape[0], q_lens.shape[0], kv_lens.shape[0]} - {1}
    if len(batches) > 1:
      raise ValueError(
          f"batch sizes disagree: mask {mask.shape[0]}, q_seqlens {q_lens.shape[0]}, "
          f"kv_seqlens {kv_lens.shape[0]}")

    tile = tq, tk = mask_tile_for_block(m), mask_tile_for_block(n)
    n_q, n_k = math.ceil(seq_len_q / tq), math.ceil(seq_len_kv / tk)
    user = _user_tiles(mask, (m, n), tile, n_q, n_k)
    if mask_fn is None:
      any_, full, full_rows = _classify_by_extent(q_lens, kv_lens, tq, tk, n_q,
                                                  n_k, is_causal)
    else:
      reads = input_checks.check_mask_fn(mask_fn)
      batch = _rows_for(reads.batch, "b", "batch_size", batch_size,
                        max(batches | {1}))
      heads = _rows_for(reads.head, "h", "num_heads", num_heads, mask.shape[1])
      lengths_batch = max(q_lens.shape[0], kv_lens.shape[0])
      if lengths_batch not in (1, batch):
        if batch != 1:
          raise ValueError(
              f"batch_size={batch} does not match q_seqlens/kv_seqlens "
              f"({lengths_batch} entries)")
        batch = lengths_batch
      for name, rows, axis in (("batch_size", batch, 0), ("num_heads", heads, 1)):
        if rows > 1 and mask.shape[axis] not in (1, rows):
          raise ValueError(
              f"{name}={rows} does not match the mask's axis {axis} "
              f"(shape {mask.shape})")
      any_, full, full_rows = _classify_by_rule(
          ElementRule(is_causal, mask_fn, bool(mask_fn_bottom_right)), q_lens,
          kv_lens, batch, heads, tq, tk, n_q, n_k)
    active = user & any_
    full = jnp.broadcast_to(full, active.shape)
    full_rows = jnp.broadcast_to(full_rows, active.shape)
    return cls(kv_lists=lists_from_tiles(active, full),
               q_lists=lists_from_tiles(jnp.swapaxes(active, 2, 3),
                                        jnp.swapaxes(full_rows, 2, 3)),
               q_lens=q_lens, kv_lens=kv_lens, block_size=(m, n), tile=tile,
               seq_len_q=int(seq_len_q), seq_len_kv=int(seq_len_kv),
               is_causal=bool(is_causal), ragged_q=q_seqlens is not None,
               ragged_kv=kv_seqlens is not None, mask_fn=mask_fn,
               mask_fn_bottom_right=bool(mask_fn_bottom_right) and mask_fn is not None)

  @property
  def batch_size(self) -> int:
    """1 when the lists are shared by every example."""
    return self.kv_lists.count.shape[0]

  @property
  def num_heads(self) -> int:
    """1 when the lists are shared by every head."""
    return self.kv_lists.count.shape[1]

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """`(Bm, Hm, seq_len_q, seq_len_kv)` (Bm, Hm are 1 when shared)."""
    return self.batch_size, self.num_heads, self.seq_len_q, self.seq_len_kv

  @property
  def element_rule(self) -> ElementRule:
    """What partial tiles mask by element (causal, mask_fn; lengths always)."""
    return ElementRule(self.is_causal, self.mask_fn, self.mask_fn_bottom_right)

  def to_dense(self) -> jax.Array:
    """`[Bm, Hm, nQ, nK]` bool: which mask tiles are visited (from the lists)."""
    return _listed_tiles(self.kv_lists)

  def full_tiles(self) -> jax.Array:
    """`[Bm, Hm, nQ, nK]` bool: which visited tiles run without element masking."""
    return _listed_tiles(self.kv_lists, self.kv_lists.full_count)

  def full_tiles_backward(self) -> jax.Array:
    """`[Bm, Hm, nQ, nK]` bool: which visited tiles the dK/dV kernel runs
    without element masking (full, and every query row within its length)."""
    return jnp.swapaxes(_listed_tiles(self.q_lists, self.q_lists.full_count), 2, 3)

  def density(self) -> jax.Array:
    """Fraction of (query tile, key tile) pairs that are computed."""
    return jnp.mean(self.kv_lists.count.astype(jnp.float32)) / self.kv_lists.index.shape[-1]

  def sparsity(self) -> float:
    """Percentage of (query tile, key tile) pairs skipped (as FlexAttention's)."""
    return 100.0 * (1.0 - float(self.density()))

  def to_string(self, batch: int = 0, head: int = 0, *, max_tiles: int = 64) -> str:
    """The tile pattern of one (example, head) as text: '#' full, '+' partial
    (masked by element), '.' skipped; at most `max_tiles` rows and columns."""
    visited = np.asarray(self.to_dense())
    full = np.asarray(self.full_tiles())
    b, h = min(batch, visited.shape[0] - 1), min(head, visited.shape[1] - 1)
    grid = np.where(full[b, h], "#", np.where(visited[b, h], "+", "."))
    rows = ["".join(r[:max_tiles]) + ("..." if len(r) > max_tiles else "")
            for r in grid[:max_tiles]]
    if grid.shape[0] > max_tiles:
      rows.append("...")
    return "\n".join(rows)

  def __repr__(self) -> str:
    rule = getattr(self.mask_fn, "__name__", None) or repr(self.mask_fn)
    try:
      density = f"{float(self.density()):.3f}"
    except jax.errors.ConcretizationTypeError:
      density = "traced"
    return (f"BlockMask(shape={self.shape}, block_size={self.block_size}, "
            f"tile={self.tile}, is_causal={self.is_causal}, mask_fn={rule}, "
            f"ragged=({self.ragged_q}, {self.ragged_kv}), density={density})")


def _rows_for(reads: bool, arg: str, name: str, given: int | None,
              default: int) -> int:
  """List rows along batch or heads for a mask_fn: its own if it reads that index."""
  given = input_checks.positive_int(given, name, or_none=True)
  if not reads:
    return 1 if given is None else int(given)
  if given is None:
    if default == 1:
      raise ValueError(
          f"mask_fn reads `{arg}`, so the lists must be built per {arg}: pass "
          f"{name} (create_block_mask's {'B' if arg == 'b' else 'H'}), or a "
          f"mask with that axis")
    return default
  return int(given)


def _listed_tiles(lists: BlockLists, count: jax.Array | None = None) -> jax.Array:
  """Scatter the first `count` (default: all listed) indices of each row into
  a `[..., rows, cols]` bool grid."""
  n_k = lists.index.shape[-1]
  count = lists.count if count is None else count
  listed = jnp.arange(n_k, dtype=jnp.int32) < count[..., None]
  slots = jnp.where(listed, lists.index, n_k)          # unlisted -> spare column
  hits = jnp.zeros(slots.shape[:-1] + (n_k + 1,), jnp.bool_)
  hits = jnp.put_along_axis(hits, slots, True, axis=-1, inplace=False)
  return hits[..., :n_k]


def create_block_mask(mask_fn: MaskFn, B: int | None, H: int | None,
                      seq_len_q: int, seq_len_kv: int, *,
                      block_size: tuple[int, int] = (128, 128),
                      is_causal: bool = False,
                      q_seqlens: jax.Array | None = None,
                      kv_seqlens: jax.Array | None = None) -> BlockMask:
  """A `BlockMask` from a token predicate, as FlexAttention's `create_block_mask`.

  Args:
    mask_fn: `mask_fn(b, h, q_idx, kv_idx) -> bool` on int32 arrays that
      broadcast (FlexAttention's `mask_mod`); see `bsattn_jax.masks` for
      `causal`, `sliding_window`, `prefix_lm`, `chunked_causal`,
      `sink_window`, `and_masks`, `or_masks`. Positions are within the
      example (0 .. length-1).
    B, H: examples and heads to build lists for; None shares one list across
      the batch / heads (then `mask_fn` must not read `b` / `h`).
    seq_len_q, seq_len_kv: sequence lengths (padded / maximum).
    block_size: the tile granularity `(m, n)` of the lists (multiples of 16;
      128 x 128 is the fastest on Hopper).
    is_causal, q_seqlens, kv_seqlens: as `BlockMask.build`.
  Returns:
    A BlockMask that visits exactly the tiles where `mask_fn` (and the
    lengths and causality) hold somewhere, masking by element where they do
    not hold everywhere. Built tile row by tile row, in bounded memory (never
    one Sq x Sk array); runs under `jit` as well.
  """
  for name, value in (("B", B), ("H", H)):
    input_checks.positive_int(value, name, or_none=True)
  return BlockMask.build(None, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv,
                         block_size=block_size, is_causal=is_causal,
                         q_seqlens=q_seqlens, kv_seqlens=kv_seqlens,
                         mask_fn=mask_fn, batch_size=B, num_heads=H)
