"""BlockMask: a user block mask turned into the index lists the kernels read.

Built once (it is a pytree, so it can be built under `jit`, passed through `jit`
and reused across layers and steps). It holds, at *mask tile* granularity
(`tile`: the largest power of two dividing the user block, capped at 128):

- forward lists: for each query tile, how many key tiles are active
  (`kv_count`), how many of those need no element masking (`kv_full_count`), and
  which (`kv_index`: full tiles first, then partial ones, each ascending);
- the transposed lists (`q_count`, `q_full_count`, `q_index`) for the dK/dV
  kernel, which walks the query tiles that touch one key tile;
- the real lengths (`q_lens`, `kv_lens`) the lists were built for.

A tile is *partial* when it holds a sequence tail or the causal diagonal (for
the transposed lists also a query tail); the kernels mask elements only there. Construction is jnp (a sort per row), never
materializes a token-level S x S array.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.tiles import mask_tile_for_block


def _check_block_size(block_size) -> tuple[int, int]:
  if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
      or not all(isinstance(b, (int, np.integer)) for b in block_size)):
    raise TypeError(
        f"block_size must be a pair of ints (m_block_dim, n_block_dim), got {block_size!r}")
  m, n = (int(b) for b in block_size)
  for name, b in (("m_block_dim", m), ("n_block_dim", n)):
    if b <= 0 or b % 16:
      raise ValueError(
          f"block_size {name} must be a positive multiple of 16 (16, 32, 64, 128, "
          f"192, 256, ...), got {b}")
  return m, n


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


def _sorted_lists(active: jax.Array, full: jax.Array):
  """Per row of `[..., rows, cols]` tiles: count, full count, full-then-partial indices."""
  n = active.shape[-1]
  col = jnp.arange(n, dtype=jnp.int32)
  key = jnp.where(active, jnp.where(full, col, n + col), 2 * n + col)
  index = jnp.sort(key, axis=-1) % n
  count = jnp.sum(active, axis=-1, dtype=jnp.int32)
  full_count = jnp.sum(active & full, axis=-1, dtype=jnp.int32)
  return count, full_count, index.astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
  """Kernel-ready block-sparsity structure (see module docstring).

  Shapes (Bm in {1, B}, Hm in {1, H}, nQ/nK = query/key mask tiles):
    kv_count, kv_full_count `[Bm, Hm, nQ]`, kv_index `[Bm, Hm, nQ, nK]`;
    q_count, q_full_count `[Bm, Hm, nK]`, q_index `[Bm, Hm, nK, nQ]`;
    q_lens, kv_lens `[Bl]` int32 with Bl in {1, B}.
  """

  kv_count: jax.Array
  kv_full_count: jax.Array
  kv_index: jax.Array
  q_count: jax.Array
  q_full_count: jax.Array
  q_index: jax.Array
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

  @classmethod
  def build(cls, mask: jax.Array | None = None, *, seq_len_q: int,
            seq_len_kv: int | None = None, block_size: tuple[int, int] = (128, 128),
            is_causal: bool = False, q_seqlens: jax.Array | None = None,
            kv_seqlens: jax.Array | None = None) -> "BlockMask":
    """Build the index lists from a user block mask.

    Args:
      mask: `[B|1, H|1, nM, nN]` bool or int (nonzero = attend) at user block
        size, `nM = ceil(seq_len_q / m_block_dim)`, `nN = ceil(seq_len_kv /
        n_block_dim)`; None means dense.
      seq_len_q, seq_len_kv: (padded / maximum) sequence lengths.
      block_size: `(m_block_dim, n_block_dim)`, multiples of 16.
      is_causal: also apply a bottom-right aligned causal mask per element.
      q_seqlens, kv_seqlens: optional `[B]` int real lengths; tokens past them
        are neither attended to nor produce output.
    """
    m, n = _check_block_size(block_size)
    seq_len_kv = seq_len_q if seq_len_kv is None else seq_len_kv
    for name, s in (("seq_len_q", seq_len_q), ("seq_len_kv", seq_len_kv)):
      if not isinstance(s, (int, np.integer)) or s <= 0:
        raise ValueError(f"{name} must be a positive int, got {s!r}")
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

    tq, tk = mask_tile_for_block(m), mask_tile_for_block(n)
    n_q, n_k = math.ceil(seq_len_q / tq), math.ceil(seq_len_kv / tk)
    user = mask != 0
    user = jnp.repeat(user, m // tq, axis=2)[:, :, :n_q]
    user = jnp.repeat(user, n // tk, axis=3)[:, :, :, :n_k]

    q_len = q_lens[:, None, None, None]
    kv_len = kv_lens[:, None, None, None]
    q_lo = (jnp.arange(n_q, dtype=jnp.int32) * tq)[:, None]
    kv_lo = (jnp.arange(n_k, dtype=jnp.int32) * tk)[None, :]
    q_hi = jnp.minimum(q_lo + tq, q_len) - 1       # last real query row
    kv_hi = kv_lo + tk - 1
    active = user & (q_lo < q_len) & (kv_lo < kv_len)
    full = kv_hi < kv_len
    if is_causal:
      offset = kv_len - q_len
      active = active & (kv_lo <= q_hi + offset)
      full = full & (kv_hi <= q_lo + offset)
    # The dK/dV kernel also masks query rows past the real length (in a packed
    # layout they belong to the next sequence); the forward needs not.
    full_rows = full & (q_lo + tq <= q_len)
    full = jnp.broadcast_to(full, active.shape)
    full_rows = jnp.broadcast_to(full_rows, active.shape)

    kv_count, kv_full_count, kv_index = _sorted_lists(active, full)
    q_count, q_full_count, q_index = _sorted_lists(
        jnp.swapaxes(active, 2, 3), jnp.swapaxes(full_rows, 2, 3))
    return cls(kv_count=kv_count, kv_full_count=kv_full_count, kv_index=kv_index,
               q_count=q_count, q_full_count=q_full_count, q_index=q_index,
               q_lens=q_lens, kv_lens=kv_lens, block_size=(m, n), tile=(tq, tk),
               seq_len_q=int(seq_len_q), seq_len_kv=int(seq_len_kv),
               is_causal=bool(is_causal), ragged_q=q_seqlens is not None,
               ragged_kv=kv_seqlens is not None)

  @property
  def batch_size(self) -> int:
    """1 when the lists are shared by every example."""
    return self.kv_count.shape[0]

  @property
  def num_heads(self) -> int:
    """1 when the lists are shared by every head."""
    return self.kv_count.shape[1]

  def tile_mask(self) -> jax.Array:
    """`[Bm, Hm, nQ, nK]` bool: which mask tiles are active (from the lists)."""
    n_k = self.kv_index.shape[-1]
    listed = jnp.arange(n_k, dtype=jnp.int32) < self.kv_count[..., None]
    slots = jnp.where(listed, self.kv_index, n_k)          # unlisted -> spare column
    hits = jnp.zeros(slots.shape[:-1] + (n_k + 1,), jnp.bool_)
    hits = jnp.put_along_axis(hits, slots, True, axis=-1, inplace=False)
    return hits[..., :n_k]

  def density(self) -> jax.Array:
    """Fraction of (query tile, key tile) pairs that are computed."""
    return jnp.mean(self.kv_count.astype(jnp.float32)) / self.kv_index.shape[-1]
