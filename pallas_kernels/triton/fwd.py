"""Block-sparse flash attention forward (Triton): one pallas_call producing `o` and `lse`.

Grid `(query tile, head, example)`, query tiles fastest so programs that run
together share one head's K/V in L2. A program loads its query tile once, then
walks only the key tiles its list names: first the *full* ones (no element
masking in the loop), then the *partial* ones (sequence tail, causal diagonal,
a token predicate that holds only somewhere), masked by
`pallas_kernels.masking.ElementRule`. Online softmax runs in fp32 in base 2 with the softmax scale folded into log2(e).
A key length known at trace time that ends a few rows into its last kernel
tile (ViT: 197 = 3 x 64 + 5) has that tile run as a narrower step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dropout as dropout_bits
from pallas_kernels import seq_info as si
from pallas_kernels.block_lists import BlockLists
from pallas_kernels.masking import ElementRule
from pallas_kernels.numerics import LN_2, probability_row_sums
from pallas_kernels.triton import io as ta
from pallas_kernels.triton.configs import KernelConfig

MIN_DOT_WIDTH = 16     # tl.dot's smallest operand dimension


def _forward_kernel(seq_ref, count_ref, full_count_ref, index_ref,
                    q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                    scale: float, rule: ElementRule, head_dim: int,
                    block_q: int, block_kv: int, mask_tile: tuple[int, int],
                    static: si.StaticSizes, dropout: dropout_bits.Dropout):
  dp = q_ref.shape[-1]
  cols, qk_scale, kv_start, kv_len, qt, batch, head, drop_rows = ta.query_program(
      seq_ref, dp, head_dim, scale, rule, block_q, mask_tile, static, dropout)
  q = ta.load_rows(q_ref, qt.start + qt.offset, block_q, qt.in_span, cols)

  walk = ta.list_walk(count_ref, full_count_ref, index_ref, (qt.list_row,),
                      mask_tile[1], block_kv)
  last = jnp.maximum(walk.num_all - 1, 0)

  def step(masked, width, t, carry):
    # The next tile's offset is read one step ahead so its index load is off
    # the critical path of this step's K/V loads.
    kv0, acc, m, l = carry
    next_kv0 = walk.offset(jnp.minimum(t + 1, last))
    kv_pos = kv0 + jnp.arange(width, dtype=jnp.int32)
    kv_in = kv_pos < kv_len if masked else None
    k = ta.load_rows(k_ref, kv_start + kv0, width, kv_in, cols)
    s = ta.matmul_nt(q, k)
    if masked:
      valid = rule(qt.pos[:, None], kv_pos[None, :], q_len=qt.length,
                   kv_len=kv_len, batch=batch, head=head)
      s = jnp.where(valid, s * qk_scale, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # row fully masked so far
      p = jnp.exp2(s - m_ref[:, None])
    else:
      # The row's largest scaled score: its smallest raw one when the scale
      # is negative.
      extreme = jnp.min(s, axis=1) if qk_scale < 0 else jnp.max(s, axis=1)
      m_new = jnp.maximum(m, extreme * qk_scale)
      m_ref = m_new
      p = jnp.exp2(s * qk_scale - m_ref[:, None])
    alpha = jnp.exp2(m - m_ref)
    v = ta.load_rows(v_ref, kv_start + kv0, width, kv_in, cols)
    p_rounded = p.astype(v.dtype)
    l = l * alpha + probability_row_sums(p, p_rounded)
    if dropout.active:   # the sum l keeps every probability; acc the kept ones
      p_rounded = jnp.where(
          dropout_bits.keep(drop_rows, kv_pos[None, :], dropout), p_rounded, 0)
    acc = acc * alpha[:, None] + ta.matmul(p_rounded, v)
    return next_kv0, acc, m_new, l

  carry = (walk.offset(0),
           jnp.zeros((block_q, dp), jnp.float32),
           jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  carry = lax.fori_loop(0, walk.num_full, functools.partial(step, False, block_kv),
                        carry)
  # The example's last key tile, when listed, is the last partial step (lists
  # ascend): with a narrow tail it runs `tail.width` wide after the loop.
  tail = narrow_tail(static.kv_len, block_kv)
  partial_end = walk.num_all
  if tail is not None:
    has_tail = ((walk.num_all > walk.num_full)
                & (walk.offset(last) == tail.start)).astype(jnp.int32)
    partial_end = walk.num_all - has_tail
  carry = lax.fori_loop(walk.num_full, partial_end,
                        functools.partial(step, True, block_kv), carry)
  if tail is not None:
    carry = lax.cond(
        has_tail > 0,
        lambda c: step(True, tail.width, last, (jnp.int32(tail.start), *c[1:])),
        lambda c: c, carry)
  _, acc, m, l = carry

  # A row saw a key iff its running max left -inf; a NaN score (a NaN or inf
  # in q or k) keeps the row NaN, as in the reference, not an empty row.
  # NaN l: a NaN score reached the row. On the GPU the running max ignores
  # NaN (Triton's max is IEEE maxNum), so m alone can stay -inf for a row
  # whose every score is NaN.
  has_keys = ((m != -jnp.inf) | jnp.isnan(l)) & (qt.pos < qt.length)
  l_safe = jnp.where(has_keys, l, 1.0)
  o = jnp.where(has_keys[:, None], acc / l_safe[:, None], 0.0)
  if dropout.active:
    o = o * dropout.keep_scale
  lse = jnp.where(has_keys, (m + jnp.log2(l_safe)) * LN_2, -jnp.inf)
  ta.store_rows(o_ref, qt.start + qt.offset, o.astype(o_ref.dtype), qt.in_span, cols)
  ta.store_vector(lse_ref, qt.start + qt.offset, lse, qt.in_span)


class NarrowTail(NamedTuple):
  start: int    # first key of the example's last kernel tile
  width: int    # keys that step covers (a power of two, >= 16 for tl.dot)


def narrow_tail(kv_len: int | None, block_kv: int) -> NarrowTail | None:
  """The narrower last key step for a static key length, if one saves work.

  197 keys with 64-wide tiles: the last tile holds 5 keys; a 16-wide step does
  its matmuls and loads at a quarter of the width.
  """
  if kv_len is None or kv_len % block_kv == 0:
    return None
  rest = kv_len % block_kv
  width = max(MIN_DOT_WIDTH, 1 << (rest - 1).bit_length())
  return NarrowTail(kv_len - rest, width) if width < block_kv else None


def forward(q: jax.Array, k: jax.Array, v: jax.Array, seq_info: jax.Array,
            lists: BlockLists, *, softmax_scale: float, rule: ElementRule,
            mask_tile: tuple[int, int], config: KernelConfig,
            static: si.StaticSizes = si.StaticSizes(),
            dropout: dropout_bits.Dropout = dropout_bits.Dropout(),
            interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Block-sparse attention forward on flat sequences.

  Args:
    q: `[Tq, H, D]`; k, v: `[Tk, Hkv, D]` with `H % Hkv == 0`.
    seq_info: `[B, 8]` int32 per-example (start, len, span) for q and kv.
    lists: the forward lists (per query mask tile: active / full key tiles
      and their indices, full ones first), `[Bm, Hm, nQ(, nK)]`.
    rule: how partial tiles mask elements (lengths, causal, mask_fn).
    dropout: attention dropout (rate; seeds in seq_info's SEED column).
    mask_tile: `(rows, cols)` of one mask tile; config tiles divide it.
    static: spans and lengths every example shares (padded layout), None
      where they differ (packed, ragged); constants are faster.
  Returns:
    o `[Tq, H, D]` in q's dtype and lse `[H, Tq]` fp32 (natural log, -inf for
    rows with no visible key).
  """
  tq, tk, num_heads, _, group, head_dim, dp, cfg = ta.launch_geometry(
      q, k, config, mask_tile)
  num_q_tiles = lists.count.shape[2] * (mask_tile[0] // cfg.block_q)

  kernel = functools.partial(
      _forward_kernel, scale=softmax_scale, rule=rule, head_dim=head_dim,
      block_q=cfg.block_q, block_kv=cfg.block_kv, mask_tile=mask_tile,
      static=static, dropout=dropout)
  return pl.pallas_call(
      kernel,
      grid=(num_q_tiles, num_heads, seq_info.shape[0]),
      in_specs=ta.query_grid_specs(lists, tq, tk, dp, group),
      out_specs=[
          ta.row_spec(tq, dp, lambda i, h, b: h),
          pl.BlockSpec((None, tq), lambda i, h, b: (h, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct(q.shape, q.dtype),
          jax.ShapeDtypeStruct((num_heads, tq), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(
          num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name="bsattn_forward",
  )(seq_info, *lists.walked, q, k, v)
