"""What the Mosaic GPU (Hopper) kernels share: the target, the persistent
schedule of work items, list reads and the compute warpgroups' ping-pong."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import target

TILE = 128                 # rows of a work item's tile = rows per key step = mask tile
ROWS_PER_WARPGROUP = 64    # a wgmma's M
ROW_TILE = 8               # rows of the tiled shared-memory layout
COMPUTE_WARPGROUPS = 2
H100_SMS = 132

def targets_hopper() -> bool:
  """Whether the computation being traced runs on a Hopper (sm90) GPU (the
  abstract mesh's device kind when lowering on a CPU machine)."""
  gpu = target.traced_for()
  return gpu is not None and gpu.compute_capability // 10 == 9


def num_sms() -> int:
  """Streaming multiprocessors of the target GPU (the persistent grid's size)."""
  return target.num_sms(default=H100_SMS)


class Schedule(NamedTuple):
  """Which (tile, head, example) work items a persistent program runs.

  Item `w` of `num_items` is tile `w % nq` of head `(w // nq) % H` of
  example `w // (nq * H)`; program `p` of `num_programs` runs items p, p + P,
  p + 2P, ...: programs running at the same time work on neighbouring tiles
  of one head, which share its K/V in L2. With `longest_first` (causal
  masks, whose later query tiles see more keys) tiles run last to first, so
  the long items are not left for the end.
  """
  num_q_tiles: int
  num_heads: int
  num_items: int
  num_programs: int
  longest_first: bool

  def items_of_this_program(self):
    program = lax.axis_index("p")
    return program, pl.cdiv(jnp.int32(self.num_items) - program,
                            jnp.int32(self.num_programs))

  def item(self, program, i):
    w = program + i * self.num_programs
    q_tile = lax.rem(w, jnp.int32(self.num_q_tiles))
    if self.longest_first:
      q_tile = self.num_q_tiles - 1 - q_tile
    rest = lax.div(w, jnp.int32(self.num_q_tiles))
    heads = jnp.int32(self.num_heads)      # int32 operands also under x64
    return q_tile, lax.rem(rest, heads), lax.div(rest, heads)


def list_entry(ref, batch, head, *rest):
  """Entry of a `[Bm, Hm, ...]` list array; axes of size 1 are shared."""
  bm, hm = ref.shape[:2]
  return ref[(batch if bm > 1 else 0, head if hm > 1 else 0, *rest)]


def rendezvous(turn):
  """Both compute warpgroups meet here; alternating meetings order their matmuls."""
  plgpu.barrier_arrive(turn)
  plgpu.barrier_wait(turn)
