"""The Mosaic forwards' lazy running maximum (`lazy_rescale`): a row's maximum
moves only when a tile raises it by more than HEADROOM (from D=128), and the
result is the softmax of the exact maximum.

The random-input tests rarely move a maximum after a row's first tile; here
the scores climb from key tile to key tile by chosen amounts, some above the
headroom and some below, so that rows rescale mid-row and also keep a stale
maximum while later tiles add to them. Run in Mosaic GPU's interpreter
(there the rescale always multiplies; the GPU skips the factors that are
exactly 1, which changes nothing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsattn_jax.block_mask import BlockMask
from bsattn_jax.reference import block_sparse_reference
from pallas_kernels.mosaic_gpu import fwd as mosaic_fwd
from pallas_kernels.mosaic_gpu import fwd_block64
from pallas_kernels.mosaic_gpu import lazy_rescale
from pallas_kernels.numerics import LOG2_E
from conftest import assert_output_close

NEG_INF = -np.inf
# Each key tile's score offset in log2 units (the same for every query):
# rises past the headroom (10, 19 -> 29), stays within it (4, 20, 21, 30)
# or falls below the maximum kept.
TILE_OFFSETS = (0.0, 10.0, 4.0, 19.0, 20.0, 29.0, 21.0, 30.0)


def test_running_max_moves_only_past_the_headroom():
  m = jnp.array([NEG_INF, 1.0, 1.0, 1.0, NEG_INF, 1.0], jnp.float32)
  tile = jnp.array([-3.0, 1.0 + lazy_rescale.HEADROOM, 9.5, 0.0, NEG_INF,
                    jnp.nan], jnp.float32)
  got = lazy_rescale.running_max(m, tile, head_dim=128)
  # No max yet: the tile's; exactly the headroom: kept; past it: moved;
  # lower: kept; still no key: -inf; NaN: kept (the NaN reaches l).
  np.testing.assert_array_equal(np.asarray(got),
                                [-3.0, 1.0, 9.5, 1.0, NEG_INF, 1.0])
  exact = lazy_rescale.running_max(m, tile, head_dim=64)
  np.testing.assert_array_equal(np.asarray(exact)[:5],
                                [-3.0, 9.0, 9.5, 1.0, NEG_INF])
  assert np.isnan(np.asarray(exact)[5])


def _climbing_inputs(dtype, tile: int, head_dim: int):
  """q, k, v of one example (B=1, 2 heads, 8 key tiles of `tile` keys):
  normal entries, plus a first coordinate that lifts every score of key
  tile j by about TILE_OFFSETS[j] (log2 units, after the softmax scale)."""
  keys = jax.random.split(jax.random.key(3), 3)
  seq = tile * len(TILE_OFFSETS)
  shape = (1, seq, 2, head_dim)
  q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys)
  lift = np.repeat(np.asarray(TILE_OFFSETS), tile) / (head_dim ** -0.5 * LOG2_E)
  q = q.at[..., 0].set(1.0)
  k = k.at[..., 0].add(jnp.asarray(lift, jnp.float32)[None, :, None])
  return tuple(x.astype(dtype) for x in (q, k, v))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tile,forward", [(128, mosaic_fwd.forward),
                                          (64, fwd_block64.forward)],
                         ids=["fwd", "fwd_block64"])
def test_climbing_scores_match_the_reference(tile, forward, dtype,
                                             deadlock_watchdog):
  q, k, v = _climbing_inputs(jnp.dtype(dtype), tile, 128)
  seq = q.shape[1]
  mask = BlockMask.build(None, seq_len_q=seq, seq_len_kv=seq,
                         block_size=(tile, tile))
  flat = lambda x: x.reshape(seq, *x.shape[2:])
  out, lse = forward(flat(q), flat(k), flat(v), mask.kv_lists,
                     softmax_scale=128 ** -0.5, rule=mask.element_rule,
                     q_len=seq, kv_len=seq, num_programs=2, interpret=True)
  ref_out, ref_lse = block_sparse_reference(
      *(x.astype(jnp.float32) for x in (q, k, v)), mask)
  lse = lse.reshape(2, 1, seq).transpose(1, 0, 2)
  assert_output_close(out.reshape(q.shape), lse, ref_out, ref_lse, dtype)
  # The climb is in the scores: every row's lse lies above the highest
  # tile's lift (30 log2 units), so the rows did rescale past the headroom.
  assert float(jnp.min(ref_lse)) > max(TILE_OFFSETS) / LOG2_E

