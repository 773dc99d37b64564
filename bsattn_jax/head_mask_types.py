"""Block-Sparse-Attention's per-head mask types, turned into one BlockMask.

The CUDA library gives each head a type: `0` dense, `-1` streaming (sink
blocks plus the most recent local blocks, from `streaming_info`), positive =
block-sparse. The entries equal to 1 are numbered in head order (1, 2, 3,
...), and a positive entry k reads head `k - 1` of `base_blockmask`. Here
every type becomes rows of one `[B, H, nM, nN]` block mask (and, for exact
streaming, a per-head token rule), so all types run in one kernel launch and
the kernels know nothing of head types.

Block streaming follows the library's tests: with causal masking, a
sequence's query block row i (from `start = max((len_q - len_k) // m, 0)`)
sees key blocks up to `ceil(max(len_k - len_q, 0) / n) + 1 + i - start`
(exclusive), the last `local` of them, and the first `sink`; without causal
masking every row sees the last `local` blocks of the padded block grid and
the first `sink`. Exact streaming is token-exact: the first `sink` tokens and
the last `local` tokens up to the query's bottom-right aligned diagonal
(`masks.sink_window` aligned bottom-right), and needs concrete head types and
`streaming_info`, which are compiled into the kernel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bsattn_jax.block_mask import BlockMask


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_int_vector(x, name: str, length: int, expected: str) -> None:
  if jnp.shape(x) != (length,):
    raise ValueError(f"{name} must have shape {expected} = ({length},), got "
                     f"{jnp.shape(x)}")
  if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
    raise TypeError(f"{name} must hold integers, got dtype {jnp.result_type(x)}")


def renumbered_head_types(head_mask_type, num_heads: int) -> jax.Array:
  """`[H]` int32 with the entries equal to 1 numbered 1, 2, 3, ... in head order."""
  _check_int_vector(head_mask_type, "head_mask_type", num_heads,
                    "[H] (one type per query head)")
  # Concrete types stay host values (numpy), so exact streaming can read them
  # at trace time; traced ones are renumbered in jnp.
  xp = np if _is_concrete(head_mask_type) else jnp
  types = xp.asarray(head_mask_type).astype(np.int32)
  ones = types == 1
  return xp.where(ones, xp.cumsum(ones).astype(np.int32), types)


def check_head_types(types: jax.Array, num_sparse_heads: int,
                     has_streaming_info: bool) -> None:
  """Concrete head types: -1, 0 or a base_blockmask head that exists."""
  if not _is_concrete(types):
    return
  values = np.asarray(types)
  bad = values[(values < -1)]
  if bad.size:
    raise ValueError(
        f"head_mask_type entries must be -1 (streaming), 0 (dense) or positive "
        f"(block-sparse), got {sorted(set(bad.tolist()))}")
  if values.max(initial=0) > num_sparse_heads:
    raise ValueError(
        f"head_mask_type refers to base_blockmask head {int(values.max()) - 1} "
        f"(entry {int(values.max())}), but base_blockmask has {num_sparse_heads} "
        f"heads (its axis 1); entries equal to 1 are numbered 1, 2, ... in head "
        f"order")
  if (values == -1).any() and not has_streaming_info:
    raise ValueError("head_mask_type has streaming heads (-1) but streaming_info is None")


def _streaming_blocks(sinks, locals_, q_lens, kv_lens, n_m, n_n, block_size,
                      is_causal) -> jax.Array:
  """`[B, H, nM, nN]` bool block streaming pattern (see the module docstring)."""
  m, n = block_size
  i = jnp.arange(n_m, dtype=jnp.int32)[None, None, :, None]
  j = jnp.arange(n_n, dtype=jnp.int32)[None, None, None, :]
  len_q = q_lens[:, None, None, None]
  len_k = kv_lens[:, None, None, None]
  sink = sinks[None, :, None, None]
  local = locals_[None, :, None, None]
  if is_causal:
    start = jnp.maximum((len_q - len_k) // m, 0)
    reach = (jnp.maximum(len_k - len_q, 0) + n - 1) // n + 1 + i - start
    row_ok = i >= start
  else:
    reach = jnp.full_like(i, n_n)
    row_ok = jnp.ones_like(i, dtype=jnp.bool_)
  recent = (j >= jnp.maximum(reach - local, 0)) & (j < jnp.minimum(reach, n_n))
  return row_ok & (recent | (j < sink))


@dataclasses.dataclass(frozen=True)
class StreamingHeads:
  """Token rule of exact streaming: head h keeps its first `sinks[h]` tokens
  and last `windows[h]` tokens (causally, up to the query's diagonal); heads
  that are not streaming (`windows[h] == 0`) are not restricted. Hashable:
  the per-head numbers are part of the compiled kernel."""

  sinks: tuple[int, ...]
  windows: tuple[int, ...]

  def __call__(self, b, h, q_idx, kv_idx):
    sink = jnp.int32(0)
    window = jnp.int32(0)
    for head, (s, w) in enumerate(zip(self.sinks, self.windows)):
      if w:
        sink = jnp.where(h == head, jnp.int32(s), sink)
        window = jnp.where(h == head, jnp.int32(w), window)
    streaming = window > 0
    allowed = (kv_idx <= q_idx) & ((kv_idx < sink) | (kv_idx > q_idx - window))
    return allowed | jnp.logical_not(streaming)

  def __repr__(self) -> str:
    return f"StreamingHeads(sinks={self.sinks}, windows={self.windows})"


def _streaming_info_pairs(streaming_info, num_heads: int) -> jax.Array:
  _check_int_vector(streaming_info, "streaming_info", 2 * num_heads,
                    "[2 * H] (sink and local sizes per head)")
  if not _is_concrete(streaming_info):
    return jnp.asarray(streaming_info, jnp.int32).reshape(num_heads, 2)
  info = np.asarray(streaming_info).astype(np.int32)
  if (info < 0).any():
    raise ValueError(f"streaming_info entries must be >= 0, got {info}")
  return info.reshape(num_heads, 2)


def head_type_block_mask(head_mask_type, streaming_info, base_blockmask, *,
                         num_heads: int, q_lens: jax.Array, kv_lens: jax.Array,
                         max_seqlen_q: int, max_seqlen_k: int,
                         block_size: tuple[int, int], is_causal: bool,
                         exact_streaming: bool) -> BlockMask:
  """The BlockMask of a mixed call (shapes in `block_sparse_attn_func`)."""
  batch = q_lens.shape[0]
  m, n = block_size
  n_m, n_n = -(-max_seqlen_q // m), -(-max_seqlen_k // n)
  types = renumbered_head_types(head_mask_type, num_heads)
  num_sparse = 0 if base_blockmask is None else jnp.shape(base_blockmask)[1]
  check_head_types(types, num_sparse, streaming_info is not None)
  if base_blockmask is not None and _is_concrete(types):
    ones = int((np.asarray(head_mask_type) == 1).sum())
    if ones != num_sparse:
      raise ValueError(
          f"base_blockmask.shape[1] = {num_sparse} must equal the number of "
          f"block-sparse heads (head_mask_type entries equal to 1): {ones}")
  kind = jnp.asarray(types)[None, :, None, None]

  blocks = jnp.ones((batch, num_heads, n_m, n_n), jnp.bool_)
  if base_blockmask is not None:
    base = jnp.asarray(base_blockmask)
    expected = (batch, num_sparse, n_m, n_n)
    if base.ndim != 4 or base.shape[0] != batch or base.shape[2:] != (n_m, n_n):
      raise ValueError(
          f"base_blockmask must have shape [B, num_sparse_heads, ceil(max_seqlen_q"
          f"/m_block_dim), ceil(max_seqlen_k/n_block_dim)] = {expected}, got "
          f"{base.shape}")
    picked = jnp.take(base != 0, jnp.clip(jnp.asarray(types) - 1, 0, num_sparse - 1),
                      axis=1)
    blocks = jnp.where(kind > 0, picked, blocks)

  def _build(blocks, rule):
    return BlockMask.build(
        blocks, seq_len_q=max_seqlen_q, seq_len_kv=max_seqlen_k,
        block_size=block_size, is_causal=is_causal, q_seqlens=q_lens,
        kv_seqlens=kv_lens, mask_fn=rule,
        num_heads=None if rule is None else num_heads,
        mask_fn_bottom_right=rule is not None)

  rule = None
  if streaming_info is not None:
    pairs = _streaming_info_pairs(streaming_info, num_heads)
    if exact_streaming:
      if not (_is_concrete(types) and _is_concrete(pairs)):
        raise ValueError(
            "exact_streaming needs concrete head_mask_type and streaming_info "
            "(their token windows are compiled into the kernel); pass them as "
            "static values, not traced arrays")
      is_stream = np.asarray(types) == -1
      host = np.asarray(pairs)
      if not is_stream.any():
        return _build(blocks, None)
      if (host[is_stream, 1] < 1).any():
        raise ValueError("exact streaming needs a local size >= 1 token per "
                         f"streaming head, got streaming_info {host.reshape(-1)}")
      rule = StreamingHeads(
          sinks=tuple(int(s) if t else 0 for s, t in zip(host[:, 0], is_stream)),
          windows=tuple(int(w) if t else 0 for w, t in zip(host[:, 1], is_stream)))
    else:
      pairs = jnp.asarray(pairs)
      streaming = _streaming_blocks(pairs[:, 0], pairs[:, 1], q_lens, kv_lens,
                                    n_m, n_n, block_size, is_causal)
      blocks = jnp.where(kind == -1, streaming, blocks)
  return _build(blocks, rule)
