"""Block-pattern builders: user-level block masks `[1, 1, nM, nN]` (bool).

Each builder returns a jnp bool array at *user block* granularity, ready for
`block_sparse_attention(..., mask=...)` or `BlockMask.build`. Combine patterns
with `|` and `&`; give per-head patterns by concatenating along axis 1.
`num_blocks(seq_len, block)` gives nM / nN.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def num_blocks(seq_len: int, block: int) -> int:
  """Blocks needed to cover `seq_len` tokens (the last one may be partial)."""
  return math.ceil(seq_len / block)


def _check_counts(num_q_blocks: int, num_kv_blocks: int) -> None:
  for name, n in (("num_q_blocks", num_q_blocks), ("num_kv_blocks", num_kv_blocks)):
    if not isinstance(n, (int, np.integer)) or n <= 0:
      raise ValueError(f"{name} must be a positive int, got {n!r}")


def _grid(num_q_blocks: int, num_kv_blocks: int):
  _check_counts(num_q_blocks, num_kv_blocks)
  i = jnp.arange(num_q_blocks)[:, None]
  j = jnp.arange(num_kv_blocks)[None, :]
  return i, j


def _as_mask(pattern: jax.Array) -> jax.Array:
  return pattern[None, None]


def dense(num_q_blocks: int, num_kv_blocks: int) -> jax.Array:
  """Every block attends everywhere."""
  i, j = _grid(num_q_blocks, num_kv_blocks)
  return _as_mask(jnp.ones((i.shape[0], j.shape[1]), jnp.bool_))


def local(num_q_blocks: int, num_kv_blocks: int, window: int) -> jax.Array:
  """Banded: query block i sees key blocks j with |i - j| <= window."""
  if window < 0:
    raise ValueError(f"window must be >= 0, got {window}")
  i, j = _grid(num_q_blocks, num_kv_blocks)
  return _as_mask(jnp.abs(i - j) <= window)


def global_local(num_q_blocks: int, num_kv_blocks: int, num_global: int,
                 window: int) -> jax.Array:
  """Local band plus `num_global` leading blocks that see and are seen by all.

  The ViT recipe: the first block holds the class token.
  """
  if num_global < 0:
    raise ValueError(f"num_global must be >= 0, got {num_global}")
  i, j = _grid(num_q_blocks, num_kv_blocks)
  return local(num_q_blocks, num_kv_blocks, window) | _as_mask(
      (i < num_global) | (j < num_global))


def strided(num_q_blocks: int, num_kv_blocks: int, stride: int) -> jax.Array:
  """Query block i sees key blocks j with (i - j) divisible by `stride`."""
  if stride <= 0:
    raise ValueError(f"stride must be > 0, got {stride}")
  i, j = _grid(num_q_blocks, num_kv_blocks)
  return _as_mask((i - j) % stride == 0)


def diagonal(num_q_blocks: int, num_kv_blocks: int,
             offsets: tuple[int, ...] = (0,)) -> jax.Array:
  """Only the block diagonals `j - i in offsets` (0 = main diagonal)."""
  i, j = _grid(num_q_blocks, num_kv_blocks)
  hit = jnp.zeros((i.shape[0], j.shape[1]), jnp.bool_)
  for offset in offsets:
    hit = hit | (j - i == offset)
  return _as_mask(hit)


def causal(num_q_blocks: int, num_kv_blocks: int) -> jax.Array:
  """Block lower-triangular, aligned at the bottom-right corner (j <= i + nN - nM).

  Block-level only; pass `is_causal=True` for the exact token-level mask.
  """
  i, j = _grid(num_q_blocks, num_kv_blocks)
  return _as_mask(j <= i + (num_kv_blocks - num_q_blocks))


def random(num_q_blocks: int, num_kv_blocks: int, density: float, *, seed: int,
           num_heads: int = 1, batch: int = 1) -> jax.Array:
  """Each block active with probability `density`, `[batch, num_heads, nM, nN]`."""
  _check_counts(num_q_blocks, num_kv_blocks)
  if not 0.0 <= density <= 1.0:
    raise ValueError(f"density must be in [0, 1], got {density}")
  key = jax.random.PRNGKey(seed)
  shape = (batch, num_heads, num_q_blocks, num_kv_blocks)
  return jax.random.uniform(key, shape) < density


def from_predicate(predicate: Callable[[jax.Array, jax.Array], jax.Array], *,
                   seq_len_q: int, seq_len_kv: int,
                   block_size: tuple[int, int]) -> jax.Array:
  """A block is active when `predicate(q_idx, kv_idx)` holds for any token pair in it.

  `predicate` takes broadcastable int32 token positions and returns bools (e.g.
  `lambda q, k: abs(q - k) < 256`). It is evaluated one query block at a time
  (`[m, Sk]` at once), so no `Sq x Sk` array is built.
  """
  m, n = block_size
  n_m, n_n = num_blocks(seq_len_q, m), num_blocks(seq_len_kv, n)
  kv_idx = jnp.arange(n_n * n, dtype=jnp.int32)[None, :]
  kv_real = kv_idx < seq_len_kv

  def one_row(row):
    q_idx = (row * m + jnp.arange(m, dtype=jnp.int32))[:, None]
    hits = jnp.asarray(predicate(q_idx, kv_idx), jnp.bool_)
    hits = jnp.broadcast_to(hits, (m, n_n * n)) & kv_real & (q_idx < seq_len_q)
    return jnp.any(hits.reshape(m, n_n, n), axis=(0, 2))

  return _as_mask(jax.lax.map(one_row, jnp.arange(n_m, dtype=jnp.int32)))
