"""The online softmax's output rescale, skipped where it would multiply by 1.

Each step of a forward multiplies its output accumulator by
`alpha = exp2(m_old - m_new)` per row: 64 multiplies per thread at
D=128 (a 64-row tile), whatever the key tile's width. At 64-key tiles
that is an eighth of the step's instructions, and `fwd_block64` is close
to issue-bound (`benchmarks/PERF_NOTES.md`).

So from `MIN_HEAD_DIM` on, a row keeps the maximum it has until a tile
raises it by more than `HEADROOM` (log2 units): the probabilities
`exp2(s - m)` of a row then stay below `2**HEADROOM`, which fp32 sums and
half-precision P take without loss (their relative precision does not
depend on the magnitude), and the result `acc / l`, `lse = m + log2(l)` is
the same for any `m` the row used throughout. Once a row's maximum
settles, its alpha is exactly 1, and `rescale_rows` skips the multiplies
in every thread whose rows all have alpha 1 (a per-thread branch, below
Pallas' warpgroup-level arrays, through `plgpu.inline_mgpu`). Multiplying
by 1 changes nothing, NaN and inf included, so skipping it is exact. In
fp16, where l sums the rounded probabilities
(`numerics.probability_row_sums`), the lse moves within fp16's rounding,
as it does between any two kernels' maxima.

H200, bf16, B2 S8192 H16 D128, forward kernel µs (`kernel_breakdown.py`,
two A/B pairs in one call): 64-key tiles, random per-head masks d=0.1,
292-293 -> 283-286; 128-key tiles: dense 1612-1615 -> 1572-1574, causal
B1 S16384 1647-1649 -> 1595-1596, random d=0.1 235 -> 229-232
(`benchmarks/PERF_NOTES.md`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, scf, vector
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

# A row's maximum moves once a tile's exceeds it by more than this (log2
# units): its probabilities then stay below 2**8.
HEADROOM = 8.0
# The head dims from which the lazy maximum and the skipped rescale pay. At
# D=64 a rescale is half as many multiplies, and the branch still splits
# the step's code. H200, bf16, D=64 forward with them: ViT-B S197 0.156 ->
# 0.167 ms, ViT-L S577 0.139 -> 0.153, S1025 0.209 -> 0.231 (torch SDPA's
# unchanged in the same runs), and long rows lose as much (dense B2 S8192
# 1.16 -> 1.31 ms), so D=64 keeps the exact running maximum at every length.
MIN_HEAD_DIM = 128


def running_max(m, tile_max, head_dim: int):
  """The maximum a row uses from this step on. From `MIN_HEAD_DIM`: `m`,
  unless `tile_max` exceeds it by more than `HEADROOM`, then the new running
  maximum; a row with no maximum yet (-inf) takes the tile's, and a NaN
  tile maximum keeps `m` (the NaN then reaches the row's sum, as with an
  exact maximum). Below it: the exact running maximum."""
  grown = jnp.maximum(m, tile_max)
  if head_dim < MIN_HEAD_DIM:
    return grown
  return jnp.where(tile_max > m + HEADROOM, grown, m)


def rescale_rows(acc, alpha, *, interpret: bool):
  """`acc * alpha[:, None]` for a WGMMA-layout accumulator `acc` [rows, D]
  (fp32) and its row factors `alpha` [rows]; on the GPU from `MIN_HEAD_DIM`
  a thread whose factors are all exactly 1 skips its multiplies."""
  if interpret or acc.shape[1] < MIN_HEAD_DIM:
    return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)),
      return_type=plgpu.ShapeDtypeStruct(acc.shape, jnp.float32,
                                         layout=plgpu.Layout.WGMMA))
  def skip_ones(_, acc, alpha):
    factors = alpha.broadcast_in_dim(acc.shape, (0,), acc.layout)
    one = arith.constant(ir.F32Type.get(), 1.0)
    needed = None
    for reg in alpha.registers.flat:
      for lane in range(ir.VectorType(reg.type).shape[0]):
        value = vector.extract(reg, dynamic_position=[],
                               static_position=[lane])
        differs = arith.cmpf(arith.CmpFPredicate.UNE, value, one)
        needed = differs if needed is None else arith.ori(needed, differs)
    registers = list(acc.registers.flat)
    branch = scf.IfOp(needed, [r.type for r in registers], has_else=True)
    with ir.InsertionPoint(branch.then_block):
      scaled = acc * factors
      scf.yield_(list(scaled.registers.flat))
    with ir.InsertionPoint(branch.else_block):
      scf.yield_(registers)
    return mgpu.FragmentedArray(
        _registers=np.asarray(list(branch.results), dtype=object).reshape(
            acc.registers.shape),
        _layout=acc.layout, _is_signed=None)

  return skip_ones(acc, alpha)
