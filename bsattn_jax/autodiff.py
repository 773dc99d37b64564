"""custom_vjp joining the forward and backward kernels on flat sequences.

Everything here works on the kernels' layout (`[T, heads, D]` rows plus the
per-example `seq_info`); `api.py` translates the user layouts into it. The
residuals are q, k, v, o and lse; the backward recomputes probabilities.
"""

from __future__ import annotations

import functools

import jax

from bsattn_jax.block_mask import BlockMask
from pallas_kernels import backward as backward_kernels
from pallas_kernels import forward as forward_kernel
from pallas_kernels import forward_hopper
from pallas_kernels import tiles
from pallas_kernels.tile_access import StaticSizes


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    seq_info: jax.Array, block_mask: BlockMask,
                    softmax_scale: float, static: StaticSizes,
                    kernels: str) -> tuple[jax.Array, jax.Array]:
  """Differentiable block-sparse attention on flat sequences.

  Args:
    q `[Tq, H, D]`, k/v `[Tk, Hkv, D]`, seq_info `[B, 8]` int32 (see
    `pallas_kernels.tile_access`), block_mask built for these sequences,
    static: spans and lengths every example shares (padded layout) as
    trace-time constants, None where they vary.
    kernels: 'pallas' (compiled; the Mosaic GPU forward on Hopper where it
    applies, Triton otherwise), 'triton' (compiled, Triton only) or
    'interpret' (the Triton kernels interpreted, any machine).
  Returns:
    o `[Tq, H, D]` and lse `[H, Tq]` fp32; both are differentiable (a cotangent
    on lse enters the backward through delta: ds = p * (dp - delta + dlse)).
  """
  return _forward(q, k, v, seq_info, block_mask, softmax_scale, static,
                  kernels)


def _forward(q, k, v, seq_info, block_mask, softmax_scale, static, kernels):
  if kernels == "pallas" and forward_hopper.applies(
      q.dtype, q.shape[-1], block_mask.tile, static):
    return forward_hopper.forward(
        q, k, v, block_mask.kv_count, block_mask.kv_full_count,
        block_mask.kv_index, softmax_scale=softmax_scale,
        causal=block_mask.is_causal, q_len=static.q_len, kv_len=static.kv_len)
  config = tiles.forward_config(q.shape[-1], q.dtype, block_mask.tile,
                                static.q_span)
  return forward_kernel.forward(
      q, k, v, seq_info, block_mask.kv_count, block_mask.kv_full_count,
      block_mask.kv_index, softmax_scale=softmax_scale,
      causal=block_mask.is_causal, mask_tile=block_mask.tile, config=config,
      static=static, interpret=kernels == "interpret")


def _flash_attention_fwd(q, k, v, seq_info, block_mask, softmax_scale,
                         static, kernels):
  o, lse = _forward(q, k, v, seq_info, block_mask, softmax_scale, static,
                    kernels)
  return (o, lse), (q, k, v, o, lse, seq_info, block_mask)


def _flash_attention_bwd(softmax_scale, static, kernels, residuals,
                         cotangents):
  q, k, v, o, lse, seq_info, block_mask = residuals
  do, dlse = cotangents
  head_dim, dtype, tile = q.shape[-1], q.dtype, block_mask.tile
  dq, dk, dv = backward_kernels.backward(
      q, k, v, o, lse, do, dlse, seq_info,
      block_mask.kv_count, block_mask.kv_full_count, block_mask.kv_index,
      block_mask.q_count, block_mask.q_full_count, block_mask.q_index,
      softmax_scale=softmax_scale, causal=block_mask.is_causal, mask_tile=tile,
      dkdv_config=tiles.dkdv_config(head_dim, dtype, tile),
      dq_config=tiles.dq_config(head_dim, dtype, tile), static=static,
      interpret=kernels == "interpret")
  return dq, dk, dv, None, None


flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)
