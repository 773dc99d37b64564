"""Constants and backward statistics of the base-2 online softmax every kernel runs.

Scores are scaled by `softmax_scale * LOG2_E` so the kernels use exp2; the
log-sum-exp leaves the kernels in natural log (times `LN_2`).
"""

import jax
import jax.numpy as jnp

LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453


def probability_row_sums(p: jax.Array, p_rounded: jax.Array) -> jax.Array:
  """One tile's contribution to the softmax denominator l, per row of
  `p [rows, keys]` (fp32 probabilities; `p_rounded` as cast for P @ V).

  In fp16 the rounded probabilities are summed: o = (sum p_rounded V) / l is
  then a convex combination of V rows, so a row whose softmax is one-hot
  (logits in the thousands) gets exactly its V row. With the exact sum such
  a row's o sat one fp16 step off that row, fp16's output rounding did not
  bring it back, and the backward's delta = rowsum(dO o) then missed its dP
  by that step: an error landing whole in dS where the exact dS is 0 (dq
  and dk off by orders of magnitude). The lse from this l moves by at most
  fp16's 2^-11. bf16 keeps the exact sum: its coarser rounding would move
  the lse by up to 2^-8, and its output rounding returns such rows to their
  V row.
  """
  if p_rounded.dtype == jnp.float16:
    return p_rounded.astype(jnp.float32).sum(axis=1)
  return p.sum(axis=1)


def backward_statistics(o: jax.Array, do: jax.Array, lse: jax.Array,
                        dlse: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """lse2 `[H, Tq]` (log2 domain, +inf where no key) and delta `[H, Tq]`."""
  delta = jnp.einsum("thd,thd->ht", o.astype(jnp.float32), do.astype(jnp.float32))
  if dlse is not None:
    delta = delta - dlse
  return log2_lse(lse), delta


def log2_lse(lse: jax.Array) -> jax.Array:
  """The forward's natural-log lse in the log2 domain the kernels' exp2 takes,
  +inf where a row has no key (so its recomputed probabilities are 0)."""
  return jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2_E)
