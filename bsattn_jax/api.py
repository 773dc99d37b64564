"""Public entry points: translate user layouts to the kernels' flat layout.

The kernels see `[T, heads, D]` rows plus one `seq_info` row per example (where
its queries and keys start, how many are real, how many rows it owns, its
dropout seed). The padded layout `[B, S, H, D]` is the case `start = b * S`;
the packed layout of the CUDA library Block-Sparse-Attention
(`block_sparse_attn_func` and its streaming twins: `cu_seqlens`,
`head_mask_type`) is `start = cu_seqlens[b]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bsattn_jax import debug
from bsattn_jax import input_checks
from bsattn_jax import packed_layout
from bsattn_jax.autodiff import flash_attention
from bsattn_jax.block_mask import BlockMask
from bsattn_jax.head_mask_types import head_type_block_mask
from bsattn_jax.reference import attention_probabilities, block_sparse_reference, token_mask
from pallas_kernels import dropout as dropout_bits
from pallas_kernels import seq_info as seq_info_rows
from pallas_kernels.registry import KernelCall

# return_attn_probs materializes [B, H, Sq, Sk] fp32: a debugging aid only.
ATTN_PROBS_MAX_ELEMENTS = 1 << 28


def resolve_backend(backend: str) -> str:
  """'auto' is the compiled kernel on a GPU and the same kernel interpreted elsewhere."""
  input_checks.check_backend(backend)
  if backend != "auto":
    return backend
  return "pallas" if jax.default_backend() == "gpu" else "interpret"


def resolve_mask(mask, *, batch, heads, seq_len_q, seq_len_kv, block_size,
                 is_causal, q_seqlens, kv_seqlens) -> BlockMask:
  """The BlockMask a call runs with: `mask` built (a user block mask or None)
  or checked against the call's shapes (a BlockMask)."""
  for name, lens in (("q_seqlens", q_seqlens), ("kv_seqlens", kv_seqlens)):
    if lens is not None and jnp.shape(lens) != (batch,):
      raise ValueError(
          f"{name} must have shape [B] = ({batch},) (one length per example), "
          f"got {jnp.shape(lens)}")
  if not isinstance(mask, BlockMask):
    block_mask = BlockMask.build(
        mask, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv, block_size=block_size,
        is_causal=is_causal, q_seqlens=q_seqlens, kv_seqlens=kv_seqlens)
  else:
    if q_seqlens is not None or kv_seqlens is not None:
      raise ValueError(
          "q_seqlens/kv_seqlens must be given to BlockMask.build when mask is a "
          "BlockMask (its lists were built for its own lengths)")
    if is_causal and not mask.is_causal:
      raise ValueError(
          "is_causal=True but the BlockMask was built with is_causal=False; "
          "build it with is_causal=True")
    if (mask.seq_len_q, mask.seq_len_kv) != (seq_len_q, seq_len_kv):
      raise ValueError(
          f"BlockMask was built for seq_len_q={mask.seq_len_q}, seq_len_kv="
          f"{mask.seq_len_kv}, but q/k have {seq_len_q} and {seq_len_kv} tokens")
    block_mask = mask
  if block_mask.batch_size not in (1, batch):
    raise ValueError(
        f"mask batch dim must be 1 or {batch} (q's batch), got {block_mask.batch_size}")
  if block_mask.num_heads not in (1, heads):
    raise ValueError(
        f"mask head dim must be 1 or {heads} (q's heads), got {block_mask.num_heads}")
  if block_mask.q_lens.shape[0] not in (1, batch):
    raise ValueError(
        f"q_seqlens must have {batch} entries (q's batch), got {block_mask.q_lens.shape[0]}")
  return block_mask


def _dropout_seeds(dropout_rate, dropout_rng, batch: int, rate_name: str,
                   rng_name: str) -> tuple[dropout_bits.Dropout, jax.Array | None]:
  """The static dropout description and the per-example seeds `[B]` (or None)."""
  if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float, np.floating)):
    raise TypeError(f"{rate_name} must be a float in [0, 1), got {type(dropout_rate).__name__}")
  if not 0.0 <= float(dropout_rate) < 1.0:
    raise ValueError(f"{rate_name} must be in [0, 1), got {dropout_rate}")
  dropout = dropout_bits.Dropout(float(dropout_rate))
  if not dropout.active:
    return dropout, None
  if dropout_rng is None:
    raise ValueError(f"{rate_name}={dropout_rate} needs {rng_name} (a jax.random key): "
                     f"the dropout mask is a function of it, so the same key gives "
                     f"the same result")
  return dropout, dropout_bits.example_seeds(dropout_rng, batch)


def _empty_result(q: jax.Array, return_lse: bool):
  """No query, head or key: zeros (and lse -inf), as for rows that see no key."""
  out = jnp.zeros(q.shape, q.dtype)
  if not return_lse:
    return out
  batch, seq_len_q, heads, _ = q.shape
  return out, jnp.full((batch, heads, seq_len_q), -jnp.inf, jnp.float32)


def _flat_attention(q, k, v, seq_info, block_mask: BlockMask, *, scale: float,
                    static: seq_info_rows.StaticSizes, backend: str,
                    dropout: dropout_bits.Dropout,
                    user_shapes: tuple[tuple[int, ...], tuple[int, ...]]):
  """o `[Tq, H, D]`, lse `[H, Tq]` of flat rows through the kernels;
  `user_shapes`: the caller's q and k shapes (for the debug log)."""
  call = KernelCall(
      dtype=np.dtype(q.dtype), head_dim=q.shape[-1], mask_tile=block_mask.tile,
      static=static, rule=block_mask.element_rule, family=backend,
      dropout=dropout)
  debug.log_plan(call, block_mask, *user_shapes)
  return flash_attention(q, k, v, seq_info, block_mask.kv_lists,
                         block_mask.q_lists, scale, call)


def block_sparse_attention(
    q: jax.Array, k: jax.Array, v: jax.Array,
    mask: jax.Array | BlockMask | None = None, *,
    block_size: tuple[int, int] = (128, 128),
    softmax_scale: float | None = None,
    is_causal: bool = False,
    q_seqlens: jax.Array | None = None,
    kv_seqlens: jax.Array | None = None,
    return_lse: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    backend: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Exact softmax attention restricted to a block pattern (padded BTNH layout).

  Args:
    q: `[B, Sq, H, D]`; k, v: `[B, Sk, Hkv, D]` with `H % Hkv == 0` (GQA/MQA).
      fp16, bf16 or fp32 (one dtype); D up to 256.
    mask: block mask `[B|1, H|1, ceil(Sq/m), ceil(Sk/n)]` (bool or int,
      nonzero = attend) at `block_size = (m, n)`, a prebuilt `BlockMask` (from
      `BlockMask.build` or `create_block_mask` for token-level rules; reuse
      it across layers and steps: building costs about as much as a sparse
      attention call), or None for dense.
    block_size: user block `(m_block_dim, n_block_dim)`, multiples of 16
      (16, 32, 64, 128, 192, 256, ...). Ignored when mask is a BlockMask.
    softmax_scale: defaults to `1 / sqrt(D)`.
    is_causal: bottom-right aligned causal mask on top of the block mask.
    q_seqlens, kv_seqlens: optional `[B]` int real lengths; padded query rows
      give zeros, padded keys are never attended.
    return_lse: also return the log-sum-exp `[B, H, Sq]` fp32 (natural log).
    dropout_rate: attention dropout in [0, 1): each probability is dropped
      with this chance and the kept ones scaled by 1 / (1 - rate); computed
      inside the kernels from `dropout_rng` (a `jax.random` key), forward and
      backward, with no mask stored. The lse is the one before dropout.
    backend: 'auto' ('pallas' on a GPU, 'interpret' elsewhere), 'pallas'
      (compiled kernels: on Hopper the Mosaic GPU forward where it applies,
      see `pallas_kernels.registry`, else Triton), 'triton' (compiled,
      Triton kernels only), 'interpret' (the Triton kernels interpreted on any
      machine) or 'reference' (pure jnp, materializes the mask).
  Returns:
    out `[B, Sq, H, D]` in q's dtype (and lse). Rows with no visible key are 0
    (lse -inf), never NaN. The backward is deterministic: the same inputs give
    bit-identical gradients.
  """
  input_checks.check_qkv(q, k, v, seq_axes=2)
  backend = resolve_backend(backend)
  batch, seq_len_q, heads, head_dim = q.shape
  seq_len_kv = k.shape[1]
  scale = input_checks.softmax_scale_value(softmax_scale, head_dim)
  if 0 in (batch, seq_len_q, heads, seq_len_kv):
    return _empty_result(q, return_lse)
  dropout, seeds = _dropout_seeds(dropout_rate, dropout_rng, batch,
                                  "dropout_rate", "dropout_rng")
  block_mask = resolve_mask(
      mask, batch=batch, heads=heads, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv,
      block_size=block_size, is_causal=is_causal, q_seqlens=q_seqlens,
      kv_seqlens=kv_seqlens)

  if backend == "reference":
    out, lse = block_sparse_reference(q, k, v, block_mask, softmax_scale=scale,
                                      dropout_rate=dropout.rate,
                                      dropout_seeds=seeds)
    out = out.astype(q.dtype)
    lse = lse.astype(jnp.float32)
  else:
    seq_info = seq_info_rows.padded(batch, seq_len_q, seq_len_kv,
                                    block_mask.q_lens, block_mask.kv_lens, seeds)
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    static = seq_info_rows.padded_static(seq_len_q, seq_len_kv, block_mask.ragged_q,
                                         block_mask.ragged_kv)
    out, lse = _flat_attention(flat(q), flat(k), flat(v), seq_info, block_mask,
                               scale=scale, static=static, backend=backend,
                               dropout=dropout, user_shapes=(q.shape, k.shape))
    out = out.reshape(q.shape)
    lse = lse.reshape(heads, batch, seq_len_q).transpose(1, 0, 2)
  return (out, lse) if return_lse else out


def _check_seed_block_dims(m_block_dim, n_block_dim) -> tuple[int, int]:
  """The CUDA library's block dims: multiples of 64 (128, 192, 256, ...)."""
  for name, b in (("m_block_dim", m_block_dim), ("n_block_dim", n_block_dim)):
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0 or b % 64:
      raise ValueError(f"{name} must be a positive multiple of 64 (64, 128, 192, "
                       f"256, ... as in Block-Sparse-Attention), got {b!r}")
  return int(m_block_dim), int(n_block_dim)


def block_sparse_attn_func(
    q: jax.Array, k: jax.Array, v: jax.Array,
    cu_seqlens_q: jax.Array, cu_seqlens_k: jax.Array,
    head_mask_type: jax.Array,
    streaming_info: jax.Array | None = None,
    base_blockmask: jax.Array | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    p_dropout: float = 0.0,
    deterministic: bool = False,
    softmax_scale: float | None = None,
    is_causal: bool = False,
    exact_streaming: bool = False,
    return_attn_probs: bool = False,
    *,
    m_block_dim: int = 128,
    n_block_dim: int = 128,
    dropout_rng: jax.Array | None = None,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Block-Sparse-Attention's `block_sparse_attn_func` on JAX arrays (packed layout).

  Positional order as in the CUDA library, so ported calls work unchanged.
  Every head type mixes in one call and one kernel launch.

  Args:
    q: `[Tq, H, D]`; k, v: `[Tk, Hkv, D]` (`H % Hkv == 0`): sequences packed
      back to back.
    cu_seqlens_q, cu_seqlens_k: `[B + 1]` int32 offsets of each sequence.
    head_mask_type: `[H]` int: 0 dense, -1 streaming, positive block-sparse
      (entries equal to 1 are numbered 1, 2, 3, ... in head order; entry k
      reads head k - 1 of `base_blockmask`).
    streaming_info: `[2 * H]` int: (sink, local) per head, in blocks of
      `n_block_dim` (block streaming) or in tokens (`exact_streaming`).
    base_blockmask: `[B, num_sparse_heads, ceil(max_seqlen_q / m_block_dim),
      ceil(max_seqlen_k / n_block_dim)]` bool/int, nonzero = attend.
    max_seqlen_q, max_seqlen_k: the longest sequence (static ints; read from
      concrete `cu_seqlens` when None, required under jit).
    p_dropout: attention dropout in [0, 1), with `dropout_rng` (a key).
    deterministic: accepted for compatibility; the backward here is always
      deterministic (no atomics), whatever it says.
    softmax_scale: defaults to `1 / sqrt(D)`.
    is_causal: bottom-right aligned causal mask per sequence.
    exact_streaming: streaming heads are token-exact (needs `is_causal`).
    return_attn_probs: also return the attention probabilities.
    m_block_dim, n_block_dim: block dims, multiples of 64 (128, 192, 256, ...).
    backend: as `block_sparse_attention`.
  Returns:
    `(out [Tq, H, D], lse [B, H, max_seqlen_q] fp32, attn_probs)`: lse is the
    natural log-sum-exp before dropout, -inf for rows with no visible key and
    for positions past a sequence's end; `attn_probs` is None unless
    `return_attn_probs`, then `[B, H, max_seqlen_q, max_seqlen_k]` fp32: the
    normalized probabilities of each sequence before dropout (0 outside the
    mask and past the sequence), materialized (limited to
    `ATTN_PROBS_MAX_ELEMENTS`, for debugging and tests).
  """
  del deterministic  # the backward is deterministic in every case
  input_checks.check_qkv(q, k, v, seq_axes=1)
  m, n = _check_seed_block_dims(m_block_dim, n_block_dim)
  if exact_streaming and not is_causal:
    raise ValueError("exact_streaming=True needs is_causal=True (as in the CUDA library)")
  backend = resolve_backend(backend)
  cu_q = packed_layout.check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
  cu_k = packed_layout.check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
  if cu_q.shape != cu_k.shape:
    raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length B + 1, "
                     f"got {cu_q.shape[0]} and {cu_k.shape[0]}")
  max_q = packed_layout.resolve_max_seqlen(max_seqlen_q, cu_q, "max_seqlen_q",
                                           "cu_seqlens_q")
  max_k = packed_layout.resolve_max_seqlen(max_seqlen_k, cu_k, "max_seqlen_k",
                                           "cu_seqlens_k")
  batch, heads, head_dim = cu_q.shape[0] - 1, q.shape[1], q.shape[2]
  scale = input_checks.softmax_scale_value(softmax_scale, head_dim)
  dropout, seeds = _dropout_seeds(p_dropout, dropout_rng, batch, "p_dropout",
                                  "dropout_rng")
  q_lens, kv_lens = packed_layout.lengths(cu_q), packed_layout.lengths(cu_k)
  block_mask = head_type_block_mask(
      head_mask_type, streaming_info, base_blockmask, num_heads=heads,
      q_lens=q_lens, kv_lens=kv_lens, max_seqlen_q=max_q, max_seqlen_k=max_k,
      block_size=(m, n), is_causal=is_causal, exact_streaming=exact_streaming)

  probs = None
  if return_attn_probs:
    size = batch * heads * max_q * max_k
    if size > ATTN_PROBS_MAX_ELEMENTS:
      raise ValueError(
          f"return_attn_probs would materialize B*H*max_seqlen_q*max_seqlen_k = "
          f"{size} fp32 values (limit {ATTN_PROBS_MAX_ELEMENTS}); it is a debugging "
          f"aid for small calls")
    padded = lambda x, cu, s: packed_layout.to_padded(x, cu, s)
    probs, _ = attention_probabilities(padded(q, cu_q, max_q),
                                       padded(k, cu_k, max_k),
                                       token_mask(block_mask), softmax_scale=scale)

  if backend == "reference":
    pad_q = packed_layout.to_padded(q, cu_q, max_q)
    out, lse = block_sparse_reference(
        pad_q, packed_layout.to_padded(k, cu_k, max_k),
        packed_layout.to_padded(v, cu_k, max_k), block_mask, softmax_scale=scale,
        dropout_rate=dropout.rate, dropout_seeds=seeds)
    out = packed_layout.to_packed(out.astype(q.dtype), cu_q, q.shape[0])
    return out, lse.astype(jnp.float32), probs

  seq_info = seq_info_rows.packed(cu_q, cu_k, seeds)
  out, lse = _flat_attention(q, k, v, seq_info, block_mask, scale=scale,
                             static=packed_layout.static_sizes(cu_q, cu_k, max_q, max_k),
                             backend=backend, dropout=dropout,
                             user_shapes=(q.shape, k.shape))
  return out, packed_layout.lse_padded(lse, cu_q, max_q), probs


def token_streaming_attn_func(
    q: jax.Array, k: jax.Array, v: jax.Array,
    cu_seqlens_q: jax.Array, cu_seqlens_k: jax.Array,
    head_mask_type: jax.Array, streaming_info: jax.Array,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
    deterministic: bool = False, softmax_scale: float | None = None,
    return_attn_probs: bool = False, *, backend: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """The CUDA library's `token_streaming_attn_func`: causal, token-exact
  streaming heads (`streaming_info` in tokens: sink, local) beside dense ones
  (`head_mask_type` 0 / -1); no dropout. Returns as `block_sparse_attn_func`."""
  return block_sparse_attn_func(
      q, k, v, cu_seqlens_q, cu_seqlens_k, head_mask_type, streaming_info, None,
      max_seqlen_q, max_seqlen_k, 0.0, deterministic, softmax_scale, True, True,
      return_attn_probs, backend=backend)


def block_streaming_attn_func(
    q: jax.Array, k: jax.Array, v: jax.Array,
    cu_seqlens_q: jax.Array, cu_seqlens_k: jax.Array,
    head_mask_type: jax.Array, streaming_info: jax.Array,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
    p_dropout: float = 0.0, deterministic: bool = False,
    softmax_scale: float | None = None, is_causal: bool = True,
    return_attn_probs: bool = False, *, dropout_rng: jax.Array | None = None,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """The CUDA library's `block_streaming_attn_func`: block streaming heads
  (`streaming_info` in 128-token blocks: sink, local) beside dense ones
  (`head_mask_type` 0 / -1). Returns as `block_sparse_attn_func`."""
  return block_sparse_attn_func(
      q, k, v, cu_seqlens_q, cu_seqlens_k, head_mask_type, streaming_info, None,
      max_seqlen_q, max_seqlen_k, p_dropout, deterministic, softmax_scale,
      is_causal, False, return_attn_probs, dropout_rng=dropout_rng,
      backend=backend)
