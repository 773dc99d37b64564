"""What each device computes at each step of a context-parallel ring.

At ring step s, device i holds its own query chunk and the key/value chunk of
device j = (i - s) mod N. Its work is the global BlockMask's tiles of (i's
query tiles, j's key tiles), listed in local tile indices. A `RingPlan` keeps
these lists for every pair (i, j), cut from the global mask's tiles once; a
pair without an active tile is a ring step that device skips.

Why local lists are exact: the kernels mask elements only on partial tiles,
with positions local to the chunks. Lengths are handed to them per device
(`ContextLayout.local_lengths`: real tokens are a prefix of each device's
rows); a causal mask has its partial tiles on the diagonal, inside a device's
own chunks (step 0, where local and global positions differ by the same shift
on both sides), and every tile of a later step is full or empty. A token rule
(`mask_fn`) would need global positions inside the kernels, so it is refused.

What travels: a chunk's key/value tiles that no other device uses need not
leave their owner. When the mask is concrete at build time (not a `jit`
argument: then pass the built plan instead), the plan lists, per owner, the
tiles some other device uses (`SentTiles`); they leave as one compacted buffer
of `tiles_sent_per_step` tiles, the most any owner sends, and the lists of
every later step walk that buffer's slots. When that is the whole chunk
(dense, causal) or the mask is traced, the whole chunk travels as it is.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bsattn_jax import input_checks
from bsattn_jax.block_mask import BlockMask, lists_from_tiles
from bsattn_jax.context_layout import ContextLayout
from pallas_kernels.block_lists import BlockLists


def _check_splits(mask: BlockMask, layout: ContextLayout) -> None:
  parts = layout.num_devices * layout.pieces
  order = "zigzag" if layout.zigzag else "contiguous"
  for side, seq_len, tile in (("query length seq_len_q (q.shape[1])",
                               mask.seq_len_q, mask.tile[0]),
                              ("key length seq_len_kv (k.shape[1])",
                               mask.seq_len_kv, mask.tile[1])):
    if seq_len % (parts * tile):
      raise ValueError(
          f"context parallelism over {layout.num_devices} devices (the "
          f"context_axis size; {order} chunks, {parts} in all) needs the "
          f"{side} to be a multiple of {parts} x {tile} (chunks x mask tile, "
          f"so every device's chunk is whole tiles), got {seq_len}. Pad the "
          f"sequence: with is_causal the padded keys follow every real query, "
          f"otherwise build the BlockMask with q_seqlens / kv_seqlens")


def _check_mask(mask: BlockMask) -> None:
  if not isinstance(mask, BlockMask):
    raise TypeError(f"mask must be a BlockMask, got {type(mask).__name__}")
  if mask.mask_fn is not None:
    raise NotImplementedError(
        "a BlockMask with a token rule (mask_fn) is not supported under "
        "context parallelism: the kernels evaluate mask_fn at positions local "
        "to each device's chunks. Express the pattern as a block mask, or "
        "shard only the batch and heads")
  if mask.is_causal and mask.seq_len_q != mask.seq_len_kv:
    raise ValueError(
        f"a causal mask under context parallelism needs equal query and key "
        f"lengths, got seq_len_q={mask.seq_len_q}, seq_len_kv={mask.seq_len_kv}")
  if mask.is_causal and (mask.ragged_q or mask.ragged_kv):
    raise NotImplementedError(
        "a causal BlockMask with q_seqlens / kv_seqlens is not supported under "
        "context parallelism; pad every example to the same length instead "
        "(causal: padded keys come after every real query)")


def _by_device_pair(tiles: jax.Array, q_order: np.ndarray,
                    kv_order: np.ndarray) -> jax.Array:
  """`[Bm, Hm, nQ, nK]` -> `[N, N, Bm, Hm, nQl, nKl]`: device i's query tiles
  against device j's key tiles, in local order."""
  n = q_order.shape[0]
  picked = jnp.take(jnp.take(tiles, q_order.ravel(), axis=2), kv_order.ravel(), axis=3)
  bm, hm = tiles.shape[:2]
  picked = picked.reshape(bm, hm, n, q_order.shape[1], n, kv_order.shape[1])
  return picked.transpose(2, 4, 0, 1, 3, 5)


def _travelling_tiles(mask: BlockMask, q_order: np.ndarray,
                      kv_order: np.ndarray) -> np.ndarray | None:
  """`[N, nKl]` bool: the key tiles of each owner that another device uses
  (for some example and head), or None when the mask is traced (under `jit`
  the tile count, a shape, cannot depend on it)."""
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(mask)):
    return None
  with jax.ensure_compile_time_eval():   # eager even while a caller traces
    used = np.asarray(jnp.any(mask.to_dense(), axis=(0, 1)))
  n, per_device = kv_order.shape
  by_pair = used[q_order.ravel()][:, kv_order.ravel()].reshape(
      n, q_order.shape[1], n, per_device).any(axis=1)          # [i, j, nKl]
  by_pair[np.arange(n), np.arange(n)] = False     # a device reads its own chunk whole
  return by_pair.any(axis=0)


class SentTiles(NamedTuple):
  """The compacted key/value chunks that travel the ring (`RingPlan.sent`).

  Owner j sends its key tiles `tiles[j]` (local indices, ascending, then
  `nKl` for empty slots, which hold zeros), M = `tiles_sent_per_step` slots.
  `kv_lists` / `q_lists` are device i's lists against owner j's compacted
  chunk, numbered by slot (rows i == j unused: a device reads its own chunk
  whole); `kv_lens` the real keys of each compacted chunk (a prefix).
  Shapes: `tiles` `[N, M]` int32; `kv_lists` `[N, N, Bm, Hm, nQl]` counts and
  `[..., nQl, M]` indices; `q_lists` `[N, N, Bm, Hm, M]` and `[..., M, nQl]`;
  `kv_lens` `[N, Bl]`.
  """

  tiles: jax.Array
  kv_lists: BlockLists
  q_lists: BlockLists
  kv_lens: jax.Array


def _sent_tiles(travelling: np.ndarray, count: int, active: jax.Array,
                full: jax.Array, full_backward: jax.Array, kv_lens: jax.Array,
                tile_kv: int, ragged_kv: bool) -> SentTiles:
  """Each owner's travelling tiles in `count` slots, and the per-pair tiles
  (`[N, N, Bm, Hm, nQl, nKl]`) renumbered to them."""
  n, chunk_tiles = travelling.shape
  order = np.argsort(~travelling, axis=1, kind="stable")[:, :count]
  tiles = np.where(np.take_along_axis(travelling, order, axis=1), order,
                   chunk_tiles).astype(np.int32)
  slots = jnp.asarray(tiles)[None, :, None, None, None, :]

  def by_slot(pairs: jax.Array) -> jax.Array:
    spare = jnp.pad(pairs, [(0, 0)] * (pairs.ndim - 1) + [(0, 1)])  # empty slot
    return jnp.take_along_axis(spare, jnp.broadcast_to(
        slots, pairs.shape[:-1] + (count,)), axis=-1)

  transposed = lambda x: jnp.swapaxes(x, -1, -2)
  if ragged_kv:
    starts = jnp.asarray(tiles * tile_kv)[:, None, :]
    lens = jnp.sum(jnp.clip(kv_lens[:, :, None] - starts, 0, tile_kv), axis=-1,
                   dtype=jnp.int32)
  else:
    # Every slot counts as real (empty ones are never listed), so the kernels
    # keep a constant length.
    lens = jnp.full((n, 1), count * tile_kv, jnp.int32)
  return SentTiles(
      tiles=jnp.asarray(tiles),
      kv_lists=lists_from_tiles(by_slot(active), by_slot(full)),
      q_lists=lists_from_tiles(transposed(by_slot(active)),
                               transposed(by_slot(full_backward))),
      kv_lens=lens)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RingPlan:
  """Per (device i, key owner j) tile lists of a context-parallel ring.

  Shapes (N devices; Bm, Hm as the global mask's; nQl, nKl tiles per
  device): `kv_lists` `[N, N, Bm, Hm, nQl]` counts and `[..., nQl, nKl]`
  indices (forward and dQ), `q_lists` transposed (dK/dV), `active_tiles`
  `[N, N, Bm, Hm]` int32 tiles to compute, `q_lens` / `kv_lens` `[N, Bl]`
  real tokens on each device. `sent`: the compacted chunks that travel (see
  the module docstring), None when whole chunks (or none) travel;
  `tiles_sent_per_step` the key tiles each ring transfer carries (0: nothing
  travels, on one device or when no device uses another's keys).
  """

  kv_lists: BlockLists
  q_lists: BlockLists
  active_tiles: jax.Array
  q_lens: jax.Array
  kv_lens: jax.Array
  sent: SentTiles | None
  layout: ContextLayout = dataclasses.field(metadata=dict(static=True))
  tile: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  chunk_q: int = dataclasses.field(metadata=dict(static=True))
  chunk_kv: int = dataclasses.field(metadata=dict(static=True))
  is_causal: bool = dataclasses.field(metadata=dict(static=True))
  ragged_q: bool = dataclasses.field(metadata=dict(static=True))
  ragged_kv: bool = dataclasses.field(metadata=dict(static=True))
  tiles_sent_per_step: int = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def build(cls, mask: BlockMask, num_devices: int) -> "RingPlan":
    """Cut a global `BlockMask` into the ring's per-(device, step) lists.

    Args:
      mask: the BlockMask of the whole sequence (global positions). A causal
        one puts the tokens in zigzag order (balanced work), any other in
        contiguous chunks. Concrete (built outside `jit`, or closed over),
        it lets each transfer carry only the tiles other devices use.
      num_devices: devices in the ring (the size of the context mesh axis).
    """
    _check_mask(mask)
    num_devices = input_checks.positive_int(num_devices, "num_devices")
    layout = ContextLayout(num_devices, zigzag=mask.is_causal)
    _check_splits(mask, layout)
    active = mask.to_dense()
    n_q, n_k = active.shape[2:]
    q_order, kv_order = layout.tile_order(n_q), layout.tile_order(n_k)
    pairs = lambda tiles: _by_device_pair(tiles, q_order, kv_order)
    active_pairs = pairs(active)
    full, full_backward = pairs(mask.full_tiles()), pairs(mask.full_tiles_backward())
    transposed = lambda x: jnp.swapaxes(x, -1, -2)
    kv_lens = layout.local_lengths(mask.kv_lens, mask.seq_len_kv)
    chunk_tiles = kv_order.shape[1]
    travelling = _travelling_tiles(mask, q_order, kv_order)
    if travelling is None:
      tiles_sent = chunk_tiles if num_devices > 1 else 0
    else:
      tiles_sent = int(travelling.sum(axis=1).max())
    sent = None
    if 0 < tiles_sent < chunk_tiles:
      sent = _sent_tiles(travelling, tiles_sent, active_pairs, full,
                         full_backward, kv_lens, mask.tile[1], mask.ragged_kv)
    return cls(
        kv_lists=lists_from_tiles(active_pairs, full),
        q_lists=lists_from_tiles(transposed(active_pairs), transposed(full_backward)),
        active_tiles=jnp.sum(active_pairs, axis=(-2, -1), dtype=jnp.int32),
        q_lens=layout.local_lengths(mask.q_lens, mask.seq_len_q),
        kv_lens=kv_lens, sent=sent, layout=layout, tile=mask.tile,
        chunk_q=mask.seq_len_q // layout.num_devices,
        chunk_kv=mask.seq_len_kv // layout.num_devices,
        is_causal=mask.is_causal, ragged_q=mask.ragged_q,
        ragged_kv=mask.ragged_kv, tiles_sent_per_step=tiles_sent)

  @property
  def num_devices(self) -> int:
    return self.layout.num_devices

  @property
  def chunk_tiles(self) -> int:
    """Key tiles of one device's chunk."""
    return self.chunk_kv // self.tile[1]

  def step_active(self) -> jax.Array:
    """`[N devices, N steps]` bool: whether device i has any tile to compute
    at ring step s (for some example and head)."""
    pair_active = jnp.sum(self.active_tiles, axis=(2, 3)) > 0      # [i, j]
    device = np.arange(self.num_devices)[:, None]
    owner = (device - np.arange(self.num_devices)[None, :]) % self.num_devices
    return jnp.take_along_axis(pair_active, jnp.asarray(owner), axis=1)

  def skipped_steps(self) -> int:
    """Ring steps (device, step) that compute nothing: out of N x N."""
    return int(jnp.sum(~self.step_active()))
