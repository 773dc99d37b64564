"""custom_vjp joining the forward and backward kernels on flat sequences.

Everything here works on the kernels' layout (`[T, heads, D]` rows plus the
per-example `seq_info`); `api.py` translates the user layouts into it. The
forward and backward implementations are chosen independently by
`pallas_kernels.registry`. The residuals are q, k, v, o and lse; the backward
recomputes probabilities.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import registry
from pallas_kernels.block_lists import BlockLists


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    seq_info: jax.Array, kv_lists: BlockLists,
                    q_lists: BlockLists, softmax_scale: float,
                    call: registry.KernelCall) -> tuple[jax.Array, jax.Array]:
  """Differentiable block-sparse attention on flat sequences.

  Args:
    q `[Tq, H, D]`, k/v `[Tk, Hkv, D]`, seq_info `[B, 8]` int32 (see
    `pallas_kernels.seq_info`), the BlockMask's forward (`kv_lists`) and
    transposed (`q_lists`) lists built for these sequences, and the static
    description of the call (dtype, head dim, mask tile, sizes known at trace
    time, element rule, kernel family).
  Returns:
    o `[Tq, H, D]` and lse `[H, Tq]` fp32; both are differentiable (a cotangent
    on lse enters the backward through delta: ds = p * (dp - delta + dlse)).
  """
  return registry.forward(q, k, v, seq_info, kv_lists, call=call,
                          softmax_scale=softmax_scale)


def _flash_attention_fwd(q, k, v, seq_info, kv_lists, q_lists, softmax_scale,
                         call):
  o, lse = registry.forward(q, k, v, seq_info, kv_lists, call=call,
                            softmax_scale=softmax_scale)
  return (o, lse), (q, k, v, o, lse, seq_info, kv_lists, q_lists)


def _flash_attention_bwd(softmax_scale, call, residuals, cotangents):
  q, k, v, o, lse, seq_info, kv_lists, q_lists = residuals
  do, dlse = cotangents
  dq, dk, dv = registry.backward(q, k, v, o, lse, do, dlse, seq_info, kv_lists,
                                 q_lists, call=call, softmax_scale=softmax_scale)
  return dq, dk, dv, None, None, None


flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)
