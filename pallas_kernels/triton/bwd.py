"""Block-sparse flash attention backward (Triton): a dK/dV kernel and a dQ kernel.

FlashAttention-2 style, no atomics, deterministic. Both recompute
`p = exp2(s * scale * log2e - lse2)` from the forward's log-sum-exp, with
`lse2 = lse * log2e` (and +inf for rows that saw no key, so their p is 0).

- dK/dV: grid `(key tile, kv head, example)`. A program owns one key tile and,
  for every query head of its GQA group, walks the query tiles of the
  transposed lists, so the group's sum happens in registers.
- dQ: grid `(query tile, head, example)`, walking the forward lists.

`delta = rowsum(do * o) - dlse` is one fused jnp pass before both kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dropout as dropout_bits
from pallas_kernels import seq_info as si
from pallas_kernels.block_lists import BlockLists
from pallas_kernels.masking import ElementRule
from pallas_kernels.numerics import LOG2_E, backward_statistics
from pallas_kernels.triton import io as ta
from pallas_kernels.triton.configs import KernelConfig


def _dkdv_kernel(seq_ref, count_ref, full_count_ref, index_ref,
                 q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref,
                 dk_ref, dv_ref, *, scale: float, rule: ElementRule,
                 head_dim: int, group: int, lists_per_head: bool, block_q: int,
                 block_kv: int, mask_tile: tuple[int, int],
                 static: si.StaticSizes, dropout: dropout_bits.Dropout):
  dp = k_ref.shape[-1]
  cols = ta.column_mask(head_dim, dp)
  qk_scale = scale * LOG2_E
  q_start, q_len = ta.example_extent(seq_ref, si.QUERY_COLUMNS, static.query())
  kt = ta.program_tile(seq_ref, si.KEY_COLUMNS, block_kv, mask_tile[1] // block_kv,
                       static.key())
  batch, kv_head = ta.rule_indices(rule, batch_axis=2, head_axis=1)
  if dropout.active:   # program ids are read here, outside the loops
    example_seed, first_head = seq_ref[si.SEED], pl.program_id(1) * group
  kv_rows = kt.start + kt.offset
  # Rows past the real length are loaded as they are (padding may hold
  # anything): every step that can meet them masks both p and ds.
  k = ta.load_rows(k_ref, kv_rows, block_kv, kt.in_span, cols)
  v = ta.load_rows(v_ref, kv_rows, block_kv, kt.in_span, cols)

  def head_loop(g, carry):
    list_head = g if lists_per_head else 0
    walk = ta.list_walk(count_ref, full_count_ref, index_ref, (list_head, kt.list_row),
                        mask_tile[0], block_q)
    if dropout.active:
      seed = dropout_bits.head_seed(example_seed, first_head + g)

    def step(masked, t, carry):
      dk, dv = carry
      q0 = walk.offset(t)
      q_pos = q0 + jnp.arange(block_q, dtype=jnp.int32)
      rows = q_pos < q_len if masked else None
      q = ta.load_rows(q_ref, q_start + q0, block_q, rows, cols, head=g)
      do = ta.load_rows(do_ref, q_start + q0, block_q, rows, cols, head=g)
      lse2 = ta.load_vector(lse2_ref, q_start + q0, block_q, rows, jnp.inf, head=g)
      delta = ta.load_vector(delta_ref, q_start + q0, block_q, rows, 0.0, head=g)
      s = ta.matmul_nt(q, k)
      p = jnp.exp2(s * qk_scale - lse2[:, None])
      if masked:
        head = None if kv_head is None else kv_head * group + g
        valid = rule(q_pos[:, None], kt.pos[None, :], q_len=q_len,
                     kv_len=kt.length, batch=batch, head=head)
        p = jnp.where(valid, p, 0.0)
      p_kept = p
      if dropout.active:   # dropped probabilities reach neither dV nor dP
        kept = dropout_bits.keep(dropout_bits.row_hashes(seed, q_pos[:, None]),
                                 kt.pos[None, :], dropout)
        p_kept = jnp.where(kept, p, 0.0) * dropout.keep_scale
      dv = dv + ta.matmul_tn(p_kept.astype(do.dtype), do)
      dpv = ta.matmul_nt(do, v)
      if dropout.active:
        dpv = jnp.where(kept, dpv, 0.0) * dropout.keep_scale
      ds = p * (dpv - delta[:, None])
      if masked:
        ds = jnp.where(valid, ds, 0.0)   # 0 * (garbage in padded V) is not 0
      dk = dk + ta.matmul_tn(ds.astype(q.dtype), q)
      return dk, dv

    carry = lax.fori_loop(0, walk.num_full, functools.partial(step, False), carry)
    return lax.fori_loop(walk.num_full, walk.num_all, functools.partial(step, True),
                         carry)

  zeros = jnp.zeros((block_kv, dp), jnp.float32)
  dk, dv = lax.fori_loop(0, group, head_loop, (zeros, zeros))
  ta.store_rows(dk_ref, kv_rows, (dk * scale).astype(dk_ref.dtype), kt.in_span, cols)
  ta.store_rows(dv_ref, kv_rows, dv.astype(dv_ref.dtype), kt.in_span, cols)


def _dq_kernel(seq_ref, count_ref, full_count_ref, index_ref,
               q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, dq_ref, *,
               scale: float, rule: ElementRule, head_dim: int, block_q: int,
               block_kv: int, mask_tile: tuple[int, int], static: si.StaticSizes,
               dropout: dropout_bits.Dropout):
  dp = q_ref.shape[-1]
  cols, qk_scale, kv_start, kv_len, qt, batch, head, drop_rows = ta.query_program(
      seq_ref, dp, head_dim, scale, rule, block_q, mask_tile, static, dropout)
  q_rows = qt.start + qt.offset
  q = ta.load_rows(q_ref, q_rows, block_q, qt.in_span, cols)
  do = ta.load_rows(do_ref, q_rows, block_q, qt.in_span, cols)
  lse2 = ta.load_vector(lse2_ref, q_rows, block_q, qt.in_span, jnp.inf)
  delta = ta.load_vector(delta_ref, q_rows, block_q, qt.in_span, 0.0)
  walk = ta.list_walk(count_ref, full_count_ref, index_ref, (qt.list_row,),
                      mask_tile[1], block_kv)

  def step(masked, t, dq):
    kv0 = walk.offset(t)
    kv_pos = kv0 + jnp.arange(block_kv, dtype=jnp.int32)
    rows = kv_pos < kv_len if masked else None
    k = ta.load_rows(k_ref, kv_start + kv0, block_kv, rows, cols)
    v = ta.load_rows(v_ref, kv_start + kv0, block_kv, rows, cols)
    s = ta.matmul_nt(q, k)
    p = jnp.exp2(s * qk_scale - lse2[:, None])
    if masked:
      valid = rule(qt.pos[:, None], kv_pos[None, :], q_len=qt.length,
                   kv_len=kv_len, batch=batch, head=head)
      p = jnp.where(valid, p, 0.0)
    dpv = ta.matmul_nt(do, v)
    if dropout.active:
      kept = dropout_bits.keep(drop_rows, kv_pos[None, :], dropout)
      dpv = jnp.where(kept, dpv, 0.0) * dropout.keep_scale
    ds = p * (dpv - delta[:, None])
    return dq + ta.matmul(ds.astype(k.dtype), k)

  dq = jnp.zeros((block_q, dp), jnp.float32)
  dq = lax.fori_loop(0, walk.num_full, functools.partial(step, False), dq)
  dq = lax.fori_loop(walk.num_full, walk.num_all, functools.partial(step, True), dq)
  dq = jnp.where((qt.pos < qt.length)[:, None], dq * scale, 0.0)  # padded rows: 0
  ta.store_rows(dq_ref, q_rows, dq.astype(dq_ref.dtype), qt.in_span, cols)


def dkdv(q, k, v, do, lse2, delta, seq_info, lists: BlockLists, *,
         softmax_scale: float, rule: ElementRule, mask_tile: tuple[int, int],
         config: KernelConfig, static: si.StaticSizes = si.StaticSizes(),
         dropout: dropout_bits.Dropout = dropout_bits.Dropout(),
         interpret: bool = False):
  """dK, dV `[Tk, Hkv, D]` (summed over each GQA group's query heads);
  `lists` are the transposed lists (per key mask tile, its query tiles)."""
  tq, tk, _, num_kv_heads, group, head_dim, dp, cfg = ta.launch_geometry(q, k, config, mask_tile)
  num_kv_tiles = lists.count.shape[2] * (mask_tile[1] // cfg.block_kv)
  lists_per_head = lists.count.shape[1] > 1

  batch_of = lambda j, h, b: b
  group_of = lambda j, h, b: h
  group_rows = pl.BlockSpec((tq, group, dp), lambda j, h, b: (0, h, 0))
  group_vec = pl.BlockSpec((group, tq), lambda j, h, b: (h, 0))
  kv_rows = ta.row_spec(tk, dp, group_of)
  kernel = functools.partial(
      _dkdv_kernel, scale=softmax_scale, rule=rule, head_dim=head_dim,
      group=group, lists_per_head=lists_per_head, block_q=cfg.block_q,
      block_kv=cfg.block_kv, mask_tile=mask_tile, static=static, dropout=dropout)
  return pl.pallas_call(
      kernel,
      grid=(num_kv_tiles, num_kv_heads, seq_info.shape[0]),
      in_specs=[
          ta.seq_info_spec(batch_of),
          *(ta.list_spec(x.shape, batch_of, group_of, group) for x in lists.walked),
          group_rows, kv_rows, kv_rows, group_rows, group_vec, group_vec,
      ],
      out_specs=[kv_rows, kv_rows],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=plgpu.CompilerParams(
          num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name="bsattn_dkdv",
  )(seq_info, *lists.walked, q, k, v, do, lse2, delta)


def dq(q, k, v, do, lse2, delta, seq_info, lists: BlockLists, *,
       softmax_scale: float, rule: ElementRule, mask_tile: tuple[int, int],
       config: KernelConfig, static: si.StaticSizes = si.StaticSizes(),
       dropout: dropout_bits.Dropout = dropout_bits.Dropout(),
       interpret: bool = False):
  """dQ `[Tq, H, D]`; `lists` are the forward lists."""
  tq, tk, num_heads, _, group, head_dim, dp, cfg = ta.launch_geometry(q, k, config, mask_tile)
  num_q_tiles = lists.count.shape[2] * (mask_tile[0] // cfg.block_q)

  q_rows = ta.row_spec(tq, dp, lambda i, h, b: h)
  head_vec = pl.BlockSpec((None, tq), lambda i, h, b: (h, 0))
  kernel = functools.partial(
      _dq_kernel, scale=softmax_scale, rule=rule, head_dim=head_dim,
      block_q=cfg.block_q, block_kv=cfg.block_kv, mask_tile=mask_tile,
      static=static, dropout=dropout)
  return pl.pallas_call(
      kernel,
      grid=(num_q_tiles, num_heads, seq_info.shape[0]),
      in_specs=ta.query_grid_specs(lists, tq, tk, dp, group)
      + [q_rows, head_vec, head_vec],
      out_specs=q_rows,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(
          num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name="bsattn_dq",
  )(seq_info, *lists.walked, q, k, v, do, lse2, delta)


def backward(q, k, v, o, lse, do, dlse, seq_info, forward_lists: BlockLists,
             backward_lists: BlockLists, *, softmax_scale: float,
             rule: ElementRule, mask_tile: tuple[int, int],
             dkdv_config: KernelConfig, dq_config: KernelConfig,
             static: si.StaticSizes = si.StaticSizes(),
             dropout: dropout_bits.Dropout = dropout_bits.Dropout(),
             interpret: bool = False):
  """Gradients (dq, dk, dv) of block-sparse attention; shapes as q, k, v.

  lse `[H, Tq]` and its cotangent dlse (or None) come from the forward;
  `backward_lists` are the transposed lists (dK/dV), `forward_lists` the
  forward ones (dQ).
  """
  lse2, delta = backward_statistics(o, do, lse, dlse)
  common = dict(softmax_scale=softmax_scale, rule=rule, mask_tile=mask_tile,
                static=static, dropout=dropout, interpret=interpret)
  dk, dv = dkdv(q, k, v, do, lse2, delta, seq_info, backward_lists,
                config=dkdv_config, **common)
  dq_ = dq(q, k, v, do, lse2, delta, seq_info, forward_lists, config=dq_config,
           **common)
  return dq_, dk, dv
