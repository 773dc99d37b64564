"""Pure-jnp attention with a materialized token mask: the truth for every test.

Deliberately simple and quadratic in memory; never used on the fast path.
Softmax runs in fp32 (fp64 when the inputs are fp64 and x64 is on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bsattn_jax.block_mask import BlockMask
from pallas_kernels import dropout as dropout_bits


def token_mask(block_mask: BlockMask) -> jax.Array:
  """`[Bm, Hm, Sq, Sk]` bool: which (query, key) pairs a BlockMask allows.

  A pair is allowed when its tile is visited, the query is within its
  example's real length, and the element rule holds (key within its length,
  causal if set, mask_fn if set), as the kernels decide it.
  """
  tq, tk = block_mask.tile
  sq, sk = block_mask.seq_len_q, block_mask.seq_len_kv
  tiles = block_mask.to_dense()
  visited = jnp.repeat(jnp.repeat(tiles, tq, axis=2), tk, axis=3)[:, :, :sq, :sk]
  batch = max(visited.shape[0], block_mask.q_lens.shape[0],
              block_mask.kv_lens.shape[0])
  q_lens = jnp.broadcast_to(block_mask.q_lens, (batch,))
  kv_lens = jnp.broadcast_to(block_mask.kv_lens, (batch,))
  q_pos = jnp.arange(sq, dtype=jnp.int32)[:, None]
  kv_pos = jnp.arange(sk, dtype=jnp.int32)[None, :]
  rule = block_mask.element_rule

  def one(b, h):
    ok = rule(q_pos, kv_pos, q_len=q_lens[b], kv_len=kv_lens[b], batch=b, head=h)
    return ok & (q_pos < q_lens[b])

  heads = jnp.arange(visited.shape[1], dtype=jnp.int32)
  per_example = jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None))
  return visited & per_example(jnp.arange(batch, dtype=jnp.int32), heads)


def attention_probabilities(q: jax.Array, k: jax.Array,
                            allowed: jax.Array | None = None, *,
                            softmax_scale: float | None = None
                            ) -> tuple[jax.Array, jax.Array]:
  """Softmax probabilities `[B, H, Sq, Sk]` and lse `[B, H, Sq]` (fp32, or fp64
  for fp64 inputs); shapes and arguments as `attention_reference`. Rows with
  no allowed key give probabilities 0 and lse -inf."""
  compute = jnp.promote_types(q.dtype, jnp.float32)
  q, k = q.astype(compute), k.astype(compute)
  k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                 precision=jax.lax.Precision.HIGHEST) * scale
  if allowed is not None:
    s = jnp.where(allowed, s, -jnp.inf)
  row_max = jnp.max(s, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(s - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  has_keys = denom != 0   # NaN scores keep the row NaN (lse too), as in the kernels
  probs = p / jnp.where(has_keys, denom, 1.0)
  lse = jnp.where(has_keys, jnp.log(jnp.where(has_keys, denom, 1.0)) + row_max,
                  -jnp.inf)[..., 0]
  return probs, lse


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                        allowed: jax.Array | None = None, *,
                        softmax_scale: float | None = None,
                        dropout_keep: jax.Array | None = None,
                        dropout_rate: float = 0.0
                        ) -> tuple[jax.Array, jax.Array]:
  """Masked softmax attention.

  Args:
    q: `[B, Sq, H, D]`; k, v: `[B, Sk, Hkv, D]`, `H % Hkv == 0`.
    allowed: `[B|1, H|1, Sq, Sk]` bool, or None for dense.
    softmax_scale: defaults to `1 / sqrt(D)`.
    dropout_keep: `[B|1, H|1, Sq, Sk]` bool, which probabilities survive
      dropout at `dropout_rate` (kept ones are scaled by 1 / (1 - rate));
      the log-sum-exp is the one before dropout.
  Returns:
    out `[B, Sq, H, D]` (fp32, or fp64 for fp64 inputs) and lse `[B, H, Sq]`
    (natural log). Rows with no allowed key give out = 0, lse = -inf.
  """
  probs, lse = attention_probabilities(q, k, allowed, softmax_scale=softmax_scale)
  if dropout_keep is not None:
    probs = jnp.where(dropout_keep, probs / (1.0 - dropout_rate), 0.0)
  v = v.astype(probs.dtype)
  v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
  finite = jnp.isfinite(v)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, jnp.where(finite, v, 0.0),
                   precision=jax.lax.Precision.HIGHEST)
  return _with_non_finite_values(out, v, finite, allowed, probs.shape), lse


def _with_non_finite_values(out, v, finite, allowed, probs_shape):
  """A NaN or inf in v reaches exactly the rows that attend its key (a plain
  product would also spread a NaN through the zero probabilities of keys a
  row does not attend): NaN for a NaN or both signs of inf, else that inf."""
  attends = (jnp.ones(probs_shape, v.dtype) if allowed is None
             else jnp.broadcast_to(allowed, probs_shape).astype(v.dtype))
  reach = lambda hit: jnp.einsum("bhqk,bkhd->bqhd", attends, hit.astype(v.dtype)) > 0
  nan = reach(jnp.isnan(v))
  pos, neg = reach(v == jnp.inf), reach(v == -jnp.inf)
  out = jnp.where(pos, jnp.inf, jnp.where(neg, -jnp.inf, out))
  return jnp.where(nan | (pos & neg), jnp.nan, out)


def block_sparse_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                           block_mask: BlockMask, *,
                           softmax_scale: float | None = None,
                           dropout_rate: float = 0.0,
                           dropout_seeds: jax.Array | None = None
                           ) -> tuple[jax.Array, jax.Array]:
  """`attention_reference` restricted to what `block_mask` allows (shapes as
  there); with `dropout_rate > 0`, the kernels' dropout mask rebuilt from the
  per-example seeds `[B]` (`pallas_kernels.dropout.example_seeds`)."""
  keep = None
  if dropout_rate > 0.0:
    keep = dropout_bits.keep_grid(dropout_seeds, q.shape[2], q.shape[1],
                                  k.shape[1], dropout_bits.Dropout(dropout_rate))
  return attention_reference(q, k, v, token_mask(block_mask),
                             softmax_scale=softmax_scale, dropout_keep=keep,
                             dropout_rate=dropout_rate)
