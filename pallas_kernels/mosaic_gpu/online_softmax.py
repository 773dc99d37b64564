"""The Mosaic GPU forwards' online softmax, in base 2.

`fwd.py` (128-key tiles) and `fwd_block64.py` (64-key tiles) run the same
softmax, whatever the key tile's width: an item starts from
`initial_state`, each key tile's step between its QK and PV matmuls is
`softmax_tile`, and `finish` leaves the item's o and lse in shared memory.
Scores arrive raw (fp32, WGMMA layout); the running maximum is kept scaled,
in log2 units, by `lazy_rescale` (lazy from D=128, exact below), and P
leaves in half precision for the PV matmul.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu import common, lazy_rescale
from pallas_kernels.numerics import LN_2, probability_row_sums


def initial_state(rows: int, head_dim: int):
  """`(acc, m, l)` before an item's first key tile: acc `[rows, D]` fp32
  zeros in the WGMMA layout, m = -inf and l = 0 `[rows]` in its row layout."""
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  acc = plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32),
                          plgpu.Layout.WGMMA)
  m = plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32), row_layout)
  l = plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row_layout)
  return acc, m, l


def softmax_tile(s, acc, m, l, *, qk_scale: float, dtype, valid=None,
                 keep=None, interpret: bool):
  """The online softmax's step over one score tile.

  Args:
    s: `[rows, keys]` fp32 raw scores of the tile (q @ k^T).
    acc: `[rows, D]` fp32 output accumulator; m, l: `[rows]` fp32 running
      maximum (scaled, log2 units; -inf before any visible key) and sum.
    qk_scale: the softmax scale times log2(e).
    dtype: the half-precision dtype of P.
    valid: `[rows, keys]` bool, the elements a partial tile keeps; None for
      a full tile (every element visible, no select).
    keep: dropout's 16-bit keep masks (`common.keep_mask`), or None.
    interpret: the kernel runs in Mosaic GPU's interpreter.
  Returns:
    `(acc, m, l, p16)`: acc rescaled to the new maximum, the new maximum and
    sum, and P in `dtype` (with dropout the kept probabilities, unscaled;
    the sum keeps all), behind an optimization barrier: the scheduler would
    otherwise sink part of the softmax past the caller's next barrier wait.
  """
  head_dim = acc.shape[1]
  by_row = lambda x: lax.broadcast_in_dim(x, s.shape, [0])
  if valid is not None:
    s = jnp.where(valid, s * qk_scale, -jnp.inf)
    m_new = lazy_rescale.running_max(m, s.max(axis=1), head_dim)
    # A row with no visible key so far keeps m = -inf; exp2 against 0
    # then gives p = 0 instead of NaN.
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp2(s - by_row(m_use))
  else:
    # The row's largest scaled score (its smallest raw one for a negative
    # scale).
    extreme = s.min(axis=1) if qk_scale < 0 else s.max(axis=1)
    m_new = lazy_rescale.running_max(m, extreme * qk_scale, head_dim)
    m_use = m_new
    p = jnp.exp2(s * qk_scale - by_row(m_use))
  alpha = jnp.exp2(m - m_use)
  acc = lazy_rescale.rescale_rows(acc, alpha, interpret=interpret)
  p16 = p.astype(dtype)
  l = l * alpha + probability_row_sums(p, p16)
  if keep is not None:
    # Bitwise: exactly p where kept and +0 where dropped, as the Triton
    # forward's select.
    p16 = common.drop_half(p16, keep)
  return lax.optimization_barrier((acc, m_new, l, p16))


def finish(acc, m, l, *, o_smem, lse_smem, out_scale: float = 1.0) -> None:
  """An item's output rows and their lse, from its final `(acc, m, l)`, into
  shared memory for the TMA stores.

  o = acc * out_scale / l in `o_smem`'s dtype (`out_scale`: dropout's
  1 / (1 - rate), 1 without dropout, folded into the row's 1 / l) into
  `o_smem` `[rows, D]`, the natural-log lse = m ln 2 + ln l into `lse_smem`
  `[rows]`. A row with no visible key gets o = 0 (its acc is 0) and
  lse = -inf; NaN scores keep the row NaN (a NaN l), as in the Triton
  forward.
  """
  has_keys = (m != -jnp.inf) | jnp.isnan(l)
  l_safe = jnp.where(has_keys, l, 1.0)
  acc = acc * lax.broadcast_in_dim(out_scale / l_safe, acc.shape, [0])
  o_smem[...] = acc.astype(o_smem.dtype)
  lse_smem[...] = jnp.where(has_keys, m * LN_2 + jnp.log(l_safe), -jnp.inf)
