"""Masks of two kinds: block patterns and token predicates.

Block patterns (`dense`, `local`, `global_local`, `strided`, `diagonal`,
`block_causal`, `random`, `from_predicate`) return a jnp bool array
`[1, 1, nM, nN]` at *user block* granularity, ready for
`block_sparse_attention(..., mask=...)` or `BlockMask.build`. Combine them
with `|` and `&`; give per-head patterns by concatenating along axis 1.
`num_blocks(seq_len, block)` gives nM / nN.

Token predicates (`causal`, `sliding_window`, `prefix_lm`, `chunked_causal`,
`sink_window`, `and_masks`, `or_masks`) follow FlexAttention's `mask_mod`
convention, `mask_fn(b, h, q_idx, kv_idx) -> bool` on int32 positions within
the example, for `create_block_mask` and `BlockMask.build(mask_fn=...)`. They
are hashable values: two equal rules share one compiled kernel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from bsattn_jax import input_checks


def num_blocks(seq_len: int, block: int) -> int:
  """Blocks needed to cover `seq_len` tokens (the last one may be partial)."""
  return math.ceil(seq_len / block)


def _check_counts(num_q_blocks: int, num_kv_blocks: int) -> None:
  input_checks.positive_int(num_q_blocks, "num_q_blocks")
  input_checks.positive_int(num_kv_blocks, "num_kv_blocks")


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


def block_causal(num_q_blocks: int, num_kv_blocks: int) -> jax.Array:
  """Block lower-triangular, aligned at the bottom-right corner (j <= i + nN - nM).

  Block-level only; pass `is_causal=True` (or the token predicate `causal`)
  for the exact token-level mask.
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


# --- Token predicates -------------------------------------------------------


def causal(b: jax.Array, h: jax.Array, q_idx: jax.Array,
           kv_idx: jax.Array) -> jax.Array:
  """Query i sees keys j <= i (top-left aligned, as FlexAttention's causal
  mask_mod; `is_causal=True` is the bottom-right aligned one)."""
  del b, h
  return kv_idx <= q_idx


@dataclasses.dataclass(frozen=True)
class TokenRule:
  """A named token predicate with its parameters: hashable and comparable by
  value, so equal rules built twice share one compiled kernel."""

  name: str
  predicate: Callable  # module-level (params..., b, h, q_idx, kv_idx) -> bool
  params: tuple

  def __call__(self, b, h, q_idx, kv_idx):
    return self.predicate(*self.params, b, h, q_idx, kv_idx)

  def __repr__(self) -> str:
    names = (getattr(p, "__name__", None) or repr(p) for p in self.params)
    return f"{self.name}({', '.join(names)})"


def _sliding_window(left, right, b, h, q_idx, kv_idx):
  return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)


def sliding_window(left: int, right: int) -> TokenRule:
  """Query i sees keys i - left .. i + right (inclusive): `left + right + 1`
  keys away from the sequence ends; `sliding_window(w, 0)` is causal local
  attention over the last w + 1 tokens."""
  return TokenRule("sliding_window", _sliding_window,
                   (input_checks.non_negative_int(left, "left"),
                    input_checks.non_negative_int(right, "right")))


def _prefix_lm(prefix_len, b, h, q_idx, kv_idx):
  return (kv_idx < prefix_len) | (kv_idx <= q_idx)


def prefix_lm(prefix_len: int) -> TokenRule:
  """Bidirectional over the first `prefix_len` tokens, causal after them."""
  return TokenRule("prefix_lm", _prefix_lm,
                   (input_checks.non_negative_int(prefix_len, "prefix_len"),))


def _chunked_causal(chunk, b, h, q_idx, kv_idx):
  # Positions are non-negative: truncating division is floor division. The
  # divisor takes the positions' dtype (a Python int is int64 under x64).
  chunk = jnp.asarray(chunk, jnp.result_type(q_idx))
  return (lax.div(q_idx, chunk) == lax.div(kv_idx, chunk)) & (kv_idx <= q_idx)


def chunked_causal(chunk: int) -> TokenRule:
  """Causal within consecutive chunks of `chunk` tokens, nothing across them."""
  return TokenRule("chunked_causal", _chunked_causal,
                   (input_checks.positive_int(chunk, "chunk"),))


def _sink_window(sink, window, b, h, q_idx, kv_idx):
  return (kv_idx <= q_idx) & ((kv_idx < sink) | (kv_idx > q_idx - window))


def sink_window(sink: int, window: int) -> TokenRule:
  """Streaming attention: query i sees the first `sink` tokens and the
  `window` most recent ones (keys i - window + 1 .. i), causally."""
  return TokenRule("sink_window", _sink_window,
                   (input_checks.non_negative_int(sink, "sink"),
                    input_checks.non_negative_int(window, "window")))


def _check_rules(name: str, fns: tuple) -> tuple:
  if not fns:
    raise ValueError(f"{name} needs at least one mask_fn")
  for i, fn in enumerate(fns):
    if not callable(fn):
      raise TypeError(f"{name} argument {i} must be a mask_fn, got {type(fn).__name__}")
  return fns


def _all_of(*fns_and_args):
  *fns, b, h, q_idx, kv_idx = fns_and_args
  out = fns[0](b, h, q_idx, kv_idx)
  for fn in fns[1:]:
    out = out & fn(b, h, q_idx, kv_idx)
  return out


def _any_of(*fns_and_args):
  *fns, b, h, q_idx, kv_idx = fns_and_args
  out = fns[0](b, h, q_idx, kv_idx)
  for fn in fns[1:]:
    out = out | fn(b, h, q_idx, kv_idx)
  return out


def and_masks(*mask_fns: Callable) -> TokenRule:
  """True where every mask_fn is (their intersection)."""
  return TokenRule("and_masks", _all_of, _check_rules("and_masks", mask_fns))


def or_masks(*mask_fns: Callable) -> TokenRule:
  """True where any mask_fn is (their union)."""
  return TokenRule("or_masks", _any_of, _check_rules("or_masks", mask_fns))
