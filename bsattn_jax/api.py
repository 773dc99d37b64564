"""Public entry points: translate user layouts to the kernels' flat layout.

The kernels see `[T, heads, D]` rows plus one `seq_info` row per example (where
its queries and keys start, how many are real, how many rows it owns). The
padded layout `[B, S, H, D]` is the special case `start = b * S`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import numpy as np

from bsattn_jax import input_checks
from bsattn_jax.autodiff import flash_attention
from bsattn_jax.block_mask import BlockMask
from bsattn_jax.reference import block_sparse_reference
from pallas_kernels import seq_info as seq_info_rows
from pallas_kernels.registry import KernelCall


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


def block_sparse_attention(
    q: jax.Array, k: jax.Array, v: jax.Array,
    mask: jax.Array | BlockMask | None = None, *,
    block_size: tuple[int, int] = (128, 128),
    softmax_scale: float | None = None,
    is_causal: bool = False,
    q_seqlens: jax.Array | None = None,
    kv_seqlens: jax.Array | None = None,
    return_lse: bool = False,
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
    backend: 'auto' ('pallas' on a GPU, 'interpret' elsewhere), 'pallas'
      (compiled kernels: on Hopper the Mosaic GPU forward where it applies,
      see `pallas_kernels.registry`, else Triton), 'triton' (compiled,
      Triton kernels only), 'interpret' (the Triton kernels interpreted on any
      machine) or 'reference' (pure jnp, materializes the mask).
  Returns:
    out `[B, Sq, H, D]` in q's dtype (and lse). Rows with no visible key are 0
    (lse -inf), never NaN.
  """
  input_checks.check_qkv(q, k, v, seq_axes=2)
  input_checks.check_softmax_scale(softmax_scale)
  backend = resolve_backend(backend)
  batch, seq_len_q, heads, head_dim = q.shape
  seq_len_kv = k.shape[1]
  scale = float(head_dim ** -0.5 if softmax_scale is None else softmax_scale)
  block_mask = resolve_mask(
      mask, batch=batch, heads=heads, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv,
      block_size=block_size, is_causal=is_causal, q_seqlens=q_seqlens,
      kv_seqlens=kv_seqlens)

  if backend == "reference":
    out, lse = block_sparse_reference(q, k, v, block_mask, softmax_scale=scale)
    out = out.astype(q.dtype)
    lse = lse.astype(jnp.float32)
  else:
    seq_info = seq_info_rows.padded(batch, seq_len_q, seq_len_kv,
                                    block_mask.q_lens, block_mask.kv_lens)
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    call = KernelCall(
        dtype=np.dtype(q.dtype), head_dim=head_dim, mask_tile=block_mask.tile,
        static=seq_info_rows.padded_static(seq_len_q, seq_len_kv,
                                           block_mask.ragged_q,
                                           block_mask.ragged_kv),
        rule=block_mask.element_rule, family=backend)
    out, lse = flash_attention(flat(q), flat(k), flat(v), seq_info,
                               block_mask.kv_lists, block_mask.q_lists, scale,
                               call)
    out = out.reshape(q.shape)
    lse = lse.reshape(heads, batch, seq_len_q).transpose(1, 0, 2)
  return (out, lse) if return_lse else out
