"""Which tokens each device of a context-parallel ring holds, and getting them there.

The sequence is cut into `num_devices * pieces` equal chunks. Contiguous
(`pieces = 1`): device i holds chunk i. Zigzag (`pieces = 2`, for causal
masks): device i holds chunks i and 2N-1-i, one from the cheap top of the
causal triangle and one from its expensive bottom, so every device has the
same work. Each device keeps its chunks in that order (its *local* rows).

`shard_map` hands device d the contiguous rows of chunks `d*P .. d*P+P-1`;
`to_ring` and `from_ring` move chunks between that and the ring layout inside
`shard_map`, one `lax.ppermute` per chunk slot (every device sends and
receives one chunk per slot).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class ContextLayout:
  """How `num_devices` devices share one sequence (see the module docstring)."""

  num_devices: int
  zigzag: bool

  @property
  def pieces(self) -> int:
    """Chunks per device."""
    return 2 if self.zigzag else 1

  def chunks(self) -> np.ndarray:
    """`[N, pieces]` the global chunk each device holds in each local slot."""
    n = self.num_devices
    device = np.arange(n)
    if self.zigzag:
      return np.stack([device, 2 * n - 1 - device], axis=1)
    return device[:, None]

  def tile_order(self, num_tiles: int) -> np.ndarray:
    """`[N, num_tiles // N]` global tile indices of each device's local tiles,
    in local order (`num_tiles` a multiple of N * pieces)."""
    per_chunk = num_tiles // (self.num_devices * self.pieces)
    tiles = self.chunks()[:, :, None] * per_chunk + np.arange(per_chunk)
    return tiles.reshape(self.num_devices, -1)

  def local_lengths(self, lengths: jax.Array, seq_len: int) -> jax.Array:
    """`[N, Bl]` int32 real tokens on each device for global real lengths `[Bl]`.

    They are a prefix of each device's local rows: a device's later chunk
    starts after its earlier one, so it holds real tokens only when the
    earlier one is all real.
    """
    chunk = seq_len // (self.num_devices * self.pieces)
    starts = jnp.asarray(self.chunks() * chunk, jnp.int32)[:, :, None]
    per_chunk = jnp.clip(lengths[None, None, :] - starts, 0, chunk)
    return jnp.sum(per_chunk, axis=1, dtype=jnp.int32)

  def to_ring(self, x: jax.Array, axis_name: str, seq_axis: int = 1) -> jax.Array:
    """This device's shard_map rows -> its ring rows (inside shard_map)."""
    if not self.zigzag:
      return x
    chunks = self.chunks()
    owner = np.empty(chunks.size, np.int64)
    owner[chunks.ravel()] = np.repeat(np.arange(self.num_devices), self.pieces)
    sent = jnp.split(x, self.pieces, axis=seq_axis)
    received = [
        lax.ppermute(part, axis_name,
                     [(d, int(owner[d * self.pieces + p])) for d in range(self.num_devices)])
        for p, part in enumerate(sent)]
    # Slot q of device i holds a chunk that arrived through permutation
    # (chunk mod pieces).
    arrived_by = jnp.asarray(chunks % self.pieces, jnp.int32)
    device = lax.axis_index(axis_name)
    return jnp.concatenate(
        [lax.select_n(arrived_by[device, q], *received) for q in range(self.pieces)],
        axis=seq_axis)

  def from_ring(self, x: jax.Array, axis_name: str, seq_axis: int = 1) -> jax.Array:
    """This device's ring rows -> its shard_map rows (inside shard_map)."""
    if not self.zigzag:
      return x
    chunks = self.chunks()
    slots = jnp.split(x, self.pieces, axis=seq_axis)
    # For each residue p, the local slot holding this device's chunk = p mod pieces.
    slot_of = np.argsort(chunks % self.pieces, axis=1)
    device = lax.axis_index(axis_name)
    slot_table = jnp.asarray(slot_of, jnp.int32)
    parts = []
    for p in range(self.pieces):
      dest = [(i, int(chunks[i, slot_of[i, p]]) // self.pieces)
              for i in range(self.num_devices)]
      parts.append(lax.ppermute(lax.select_n(slot_table[device, p], *slots),
                                axis_name, dest))
    return jnp.concatenate(parts, axis=seq_axis)
