"""Attention dropout without a stored mask: a counter-based hash per element.

Whether probability `(b, h, q, k)` is kept is a pure function of a per-example
32-bit seed (drawn from the user's key, carried in `seq_info`), the head, and
the query and key positions within the example. Every kernel (forward, dK/dV,
dQ) recomputes the same bits where it needs them, the reference rebuilds the
whole mask from the same functions, and the same key gives the same result on
any layout (padded or packed) and any kernel tile.

Per query row the hash is the `lowbias32` integer finalizer of the (example,
head) seed and the row; per element, the row's hash XORed with the key
position times an odd constant, then one more multiply, the top 31 bits
compared with the rate. Each element costs five integer operations (the
forward with dropout is bound by them), and the bits pass the checks a
dropout mask needs (tested in `tests/test_seed_api.py`: the kept fraction,
correlations along rows, columns and diagonals, 2x2 patterns). All in int32
arithmetic with logical shifts: wrapping multiplication is the same in XLA,
Triton and the interpreter.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_HEAD_MULTIPLIER = -1640531535     # 0x9E3779B1 as int32
_ROW_MULTIPLIER = -2048144777      # 0x85EBCA77 as int32
_KEY_MULTIPLIER = -1640531535      # 0x9E3779B1 as int32
_MIX_1 = 2146121005                # 0x7FEB352D
_MIX_2 = -2073254261               # 0x846CA68B as int32
_THRESHOLD_BITS = 31


class Dropout(NamedTuple):
  """The static part of dropout (hashable: a kernel compiles once per rate)."""

  rate: float = 0.0

  @property
  def active(self) -> bool:
    return self.rate > 0.0

  @property
  def threshold(self) -> int:
    """Kept iff the element's 31 hash bits are >= this (P = 1 - rate)."""
    return min(int(round(self.rate * 2**_THRESHOLD_BITS)), 2**_THRESHOLD_BITS - 1)

  @property
  def keep_scale(self) -> float:
    """Kept probabilities are scaled by 1 / (1 - rate)."""
    return 1.0 / (1.0 - self.rate)


def _shift_right(x: jax.Array, bits: int) -> jax.Array:
  return lax.shift_right_logical(x, jnp.full(jnp.shape(x), bits, jnp.int32))


def _mix(x: jax.Array) -> jax.Array:
  x = x ^ _shift_right(x, 16)
  x = x * _MIX_1
  x = x ^ _shift_right(x, 15)
  x = x * _MIX_2
  return x ^ _shift_right(x, 16)


def head_seed(example_seed: jax.Array, head) -> jax.Array:
  """int32 seed of one (example, head)."""
  return _mix(example_seed ^ (jnp.asarray(head, jnp.int32) * _HEAD_MULTIPLIER))


def row_hashes(seed: jax.Array, q_pos: jax.Array) -> jax.Array:
  """Per query row (positions within the example; any shape): computed once
  per row, so that each element costs only `keep`'s few operations."""
  return _mix(seed ^ (q_pos * _ROW_MULTIPLIER))


def keep(rows: jax.Array, kv_pos: jax.Array, dropout: Dropout) -> jax.Array:
  """Bool, broadcast of `rows` (from `row_hashes`) with key positions."""
  bits = _shift_right((rows ^ (kv_pos * _KEY_MULTIPLIER)) * _MIX_2,
                      32 - _THRESHOLD_BITS)
  return bits >= dropout.threshold


def example_seeds(key: jax.Array, batch: int) -> jax.Array:
  """`[B]` int32 per-example seeds drawn from a PRNG key."""
  bits = jax.random.bits(key, (batch,), jnp.uint32)
  return lax.bitcast_convert_type(bits, jnp.int32)


def keep_grid(seeds: jax.Array, heads: int, seq_len_q: int, seq_len_kv: int,
              dropout: Dropout) -> jax.Array:
  """`[B, H, Sq, Sk]` bool: the whole keep mask (for the reference)."""
  q_pos = jnp.arange(seq_len_q, dtype=jnp.int32)[:, None]
  kv_pos = jnp.arange(seq_len_kv, dtype=jnp.int32)[None, :]

  def one(seed, head):
    return keep(row_hashes(head_seed(seed, head), q_pos), kv_pos, dropout)

  per_head = jax.vmap(one, in_axes=(None, 0))
  return jax.vmap(per_head, in_axes=(0, None))(
      seeds, jnp.arange(heads, dtype=jnp.int32))
