"""The packed (varlen) layout: sequences back to back, found by `cu_seqlens`.

`q [Tq, H, D]` holds sequence b in rows `cu_seqlens_q[b] .. cu_seqlens_q[b+1]`
(likewise k, v). The kernels read this layout directly; this module checks
the offsets and converts to and from the padded layout `[B, max_seqlen, ...]`
where a result is padded per sequence (lse, attention probabilities, the
reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bsattn_jax import input_checks
from pallas_kernels.seq_info import StaticSizes, padded_static


def _concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_cu_seqlens(cu_seqlens, name: str, num_tokens: int) -> jax.Array:
  """`[B + 1]` int32 offsets: from 0, non-decreasing, ending at the array's
  length (checked when concrete; under jit only dtype and shape)."""
  if not hasattr(cu_seqlens, "dtype") or not hasattr(cu_seqlens, "shape"):
    raise TypeError(f"{name} must be an int32 array [B + 1], got {type(cu_seqlens).__name__}")
  if cu_seqlens.dtype != jnp.int32:
    raise TypeError(f"{name} must be int32 (as the CUDA library's), got {cu_seqlens.dtype}")
  if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
    raise ValueError(f"{name} must be 1-D [B + 1] with B >= 1, got shape {cu_seqlens.shape}")
  if _concrete(cu_seqlens):
    host = np.asarray(cu_seqlens)
    if host[0] != 0:
      raise ValueError(f"{name} must start at 0, got {host[0]}")
    steps = np.diff(host)
    if (steps < 0).any():
      first = int(np.argmax(steps < 0))
      raise ValueError(f"{name} must be non-decreasing, got {host[first]} then "
                       f"{host[first + 1]} at entries {first}, {first + 1}")
    if host[-1] != num_tokens:
      raise ValueError(f"{name} must end at the packed array's length {num_tokens} "
                       f"(past it or short of it), got {host[-1]}")
  return jnp.asarray(cu_seqlens)


def lengths(cu_seqlens: jax.Array) -> jax.Array:
  """`[B]` int32 sequence lengths."""
  return cu_seqlens[1:] - cu_seqlens[:-1]


def resolve_max_seqlen(max_seqlen, cu_seqlens: jax.Array, name: str,
                       cu_name: str) -> int:
  """The static longest-sequence length: given, or read from concrete offsets."""
  concrete = _concrete(cu_seqlens)
  longest = int(np.max(np.diff(np.asarray(cu_seqlens)))) if concrete else None
  if max_seqlen is None:
    if not concrete:
      raise ValueError(
          f"{name} is required under jit ({cu_name} is traced, so the longest "
          f"sequence is not known at trace time); pass it as a Python int")
    return max(longest, 1)
  max_seqlen = input_checks.positive_int(max_seqlen, name)
  if longest is not None and longest > max_seqlen:
    raise ValueError(f"{name}={max_seqlen} is below the longest sequence in "
                     f"{cu_name} ({longest})")
  return int(max_seqlen)


def static_sizes(cu_q: jax.Array, cu_k: jax.Array, max_seqlen_q: int,
                 max_seqlen_k: int) -> StaticSizes:
  """What the kernels may treat as trace-time constants. Concrete offsets of
  sequences that all have the longest length are the padded layout (`start =
  b * S`): the kernels then compare against constant lengths (faster, and the
  Hopper forward applies); otherwise every size is read per sequence."""
  if _concrete(cu_q) and _concrete(cu_k):
    q_lens, k_lens = np.diff(np.asarray(cu_q)), np.diff(np.asarray(cu_k))
    if (q_lens == max_seqlen_q).all() and (k_lens == max_seqlen_k).all():
      return padded_static(max_seqlen_q, max_seqlen_k, False, False)
  return StaticSizes()


def _rows(cu_seqlens: jax.Array, max_seqlen: int):
  """`[B, max_seqlen]` flat row of each padded position, and which are real."""
  pos = jnp.arange(max_seqlen, dtype=jnp.int32)[None, :]
  real = pos < lengths(cu_seqlens)[:, None]
  return cu_seqlens[:-1, None] + pos, real


def to_padded(x: jax.Array, cu_seqlens: jax.Array, max_seqlen: int,
              fill=0.0) -> jax.Array:
  """`[T, ...]` packed rows -> `[B, max_seqlen, ...]` (padding = `fill`)."""
  rows, real = _rows(cu_seqlens, max_seqlen)
  picked = x[jnp.clip(rows, 0, x.shape[0] - 1)]
  real = real.reshape(real.shape + (1,) * (x.ndim - 1))
  return jnp.where(real, picked, jnp.asarray(fill, x.dtype))


def to_packed(x: jax.Array, cu_seqlens: jax.Array, num_tokens: int) -> jax.Array:
  """`[B, max_seqlen, ...]` -> `[T, ...]` (each packed row from its sequence)."""
  t = jnp.arange(num_tokens, dtype=jnp.int32)
  seq = jnp.searchsorted(cu_seqlens, t, side="right").astype(jnp.int32) - 1
  seq = jnp.clip(seq, 0, x.shape[0] - 1)
  pos = jnp.clip(t - cu_seqlens[seq], 0, x.shape[1] - 1)
  return x[seq, pos]


def lse_padded(lse: jax.Array, cu_seqlens: jax.Array, max_seqlen: int) -> jax.Array:
  """`[H, Tq]` kernel lse -> `[B, H, max_seqlen]` (-inf past each sequence)."""
  per_seq = to_padded(lse.T, cu_seqlens, max_seqlen, fill=-jnp.inf)   # [B, S, H]
  return per_seq.transpose(0, 2, 1)
