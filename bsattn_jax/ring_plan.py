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
"""

from __future__ import annotations

import dataclasses

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RingPlan:
  """Per (device i, key owner j) tile lists of a context-parallel ring.

  Shapes (N devices; Bm, Hm as the global mask's; nQl, nKl tiles per
  device): `kv_lists` `[N, N, Bm, Hm, nQl]` counts and `[..., nQl, nKl]`
  indices (forward and dQ), `q_lists` transposed (dK/dV), `active_tiles`
  `[N, N, Bm, Hm]` int32 tiles to compute, `q_lens` / `kv_lens` `[N, Bl]`
  real tokens on each device.
  """

  kv_lists: BlockLists
  q_lists: BlockLists
  active_tiles: jax.Array
  q_lens: jax.Array
  kv_lens: jax.Array
  layout: ContextLayout = dataclasses.field(metadata=dict(static=True))
  tile: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  chunk_q: int = dataclasses.field(metadata=dict(static=True))
  chunk_kv: int = dataclasses.field(metadata=dict(static=True))
  is_causal: bool = dataclasses.field(metadata=dict(static=True))
  ragged_q: bool = dataclasses.field(metadata=dict(static=True))
  ragged_kv: bool = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def build(cls, mask: BlockMask, num_devices: int) -> "RingPlan":
    """Cut a global `BlockMask` into the ring's per-(device, step) lists.

    Args:
      mask: the BlockMask of the whole sequence (global positions). A causal
        one puts the tokens in zigzag order (balanced work), any other in
        contiguous chunks.
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
    transposed = lambda x: jnp.swapaxes(x, -1, -2)
    return cls(
        kv_lists=lists_from_tiles(active_pairs, pairs(mask.full_tiles())),
        q_lists=lists_from_tiles(transposed(active_pairs),
                                 transposed(pairs(mask.full_tiles_backward()))),
        active_tiles=jnp.sum(active_pairs, axis=(-2, -1), dtype=jnp.int32),
        q_lens=layout.local_lengths(mask.q_lens, mask.seq_len_q),
        kv_lens=layout.local_lengths(mask.kv_lens, mask.seq_len_kv),
        layout=layout, tile=mask.tile,
        chunk_q=mask.seq_len_q // layout.num_devices,
        chunk_kv=mask.seq_len_kv // layout.num_devices,
        is_causal=mask.is_causal, ragged_q=mask.ragged_q,
        ragged_kv=mask.ragged_kv)

  @property
  def num_devices(self) -> int:
    return self.layout.num_devices

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
