"""Constants and backward statistics of the base-2 online softmax every kernel runs.

Scores are scaled by `softmax_scale * LOG2_E` so the kernels use exp2; the
log-sum-exp leaves the kernels in natural log (times `LN_2`).
"""

import jax
import jax.numpy as jnp

LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453


def backward_statistics(o: jax.Array, do: jax.Array, lse: jax.Array,
                        dlse: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """lse2 `[H, Tq]` (log2 domain, +inf where no key) and delta `[H, Tq]`."""
  delta = jnp.einsum("thd,thd->ht", o.astype(jnp.float32), do.astype(jnp.float32))
  if dlse is not None:
    delta = delta - dlse
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2_E)
  return lse2, delta
