"""Where each example's tokens live in the kernels' flat `[T, heads, D]` rows.

Example `b` owns rows `start .. start + span` of the flat array; the first
`length` of them are real tokens. One int32 row per example,
`seq_info[b] = (q_start, q_len, q_span, kv_start, kv_len, kv_span, seed, 0)`
(`seed`: the example's dropout seed, `pallas_kernels.dropout`):

- padded layout `[B, S, H, D]` flattened: `start = b * S`, `span = S`,
  `length` = the example's real length (S unless per-example lengths are given);
- packed layout (`cu_seqlens`): `start = cu[b]`, `span = length = cu[b+1] - cu[b]`.

`StaticSizes` carries what every example shares as trace-time constants: a
row mask compared against a constant keeps Triton's fast path.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

SEQ_INFO_WIDTH = 8
Q_START, Q_LEN, Q_SPAN, KV_START, KV_LEN, KV_SPAN, SEED = range(7)
QUERY_COLUMNS = (Q_START, Q_LEN, Q_SPAN)
KEY_COLUMNS = (KV_START, KV_LEN, KV_SPAN)


class StaticSizes(NamedTuple):
  """Per-example sizes every example shares, known at trace time; None where
  they differ per example and are read from `seq_info`.

  The padded layout knows both spans, and both lengths when no seqlens are
  given. A row mask compared against a constant keeps Triton's fast path; one
  compared against a value loaded from memory made the H100 forward 1.45x
  slower (dense S=8192, D=128).
  """
  q_span: int | None = None
  kv_span: int | None = None
  q_len: int | None = None
  kv_len: int | None = None

  def query(self) -> tuple[int | None, int | None]:
    return self.q_span, self.q_len

  def key(self) -> tuple[int | None, int | None]:
    return self.kv_span, self.kv_len

  @property
  def padded_full_length(self) -> bool:
    """Every example has its full padded length on both sides (no ragged tails)."""
    return (self.q_len is not None and self.q_len == self.q_span
            and self.kv_len is not None and self.kv_len == self.kv_span)


def _rows(columns: list[jax.Array], seeds: jax.Array | None) -> jax.Array:
  batch = columns[0].shape[0]
  if seeds is not None:
    columns = columns + [seeds]
  columns = columns + [jnp.zeros((batch,), jnp.int32)] * (SEQ_INFO_WIDTH - len(columns))
  return jnp.stack([c.astype(jnp.int32) for c in columns], axis=1)


def padded(batch: int, seq_len_q: int, seq_len_kv: int, q_lens: jax.Array,
           kv_lens: jax.Array, seeds: jax.Array | None = None) -> jax.Array:
  """`[B, 8]` rows of the flattened padded layout; lengths `[B]` or `[1]`,
  per-example dropout seeds `[B]` (or None: no dropout)."""
  b = jnp.arange(batch, dtype=jnp.int32)
  full = lambda n: jnp.full((batch,), n, jnp.int32)
  return _rows([b * seq_len_q, jnp.broadcast_to(q_lens, (batch,)), full(seq_len_q),
                b * seq_len_kv, jnp.broadcast_to(kv_lens, (batch,)), full(seq_len_kv)],
               seeds)


def padded_static(seq_len_q: int, seq_len_kv: int, ragged_q: bool,
                  ragged_kv: bool) -> StaticSizes:
  """Trace-time sizes of the padded layout (lengths unknown where ragged)."""
  return StaticSizes(q_span=seq_len_q, kv_span=seq_len_kv,
                     q_len=None if ragged_q else seq_len_q,
                     kv_len=None if ragged_kv else seq_len_kv)


def packed(cu_seqlens_q: jax.Array, cu_seqlens_k: jax.Array,
           seeds: jax.Array | None = None) -> jax.Array:
  """`[B, 8]` rows of the packed layout from `[B + 1]` cumulative lengths
  (and per-example dropout seeds `[B]`, or None)."""
  q_start, k_start = cu_seqlens_q[:-1], cu_seqlens_k[:-1]
  q_len = cu_seqlens_q[1:] - q_start
  k_len = cu_seqlens_k[1:] - k_start
  return _rows([q_start, q_len, q_len, k_start, k_len, k_len], seeds)
