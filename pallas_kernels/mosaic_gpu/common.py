"""What the Mosaic GPU (Hopper) kernels share: the target, the persistent
schedule of work items, list reads and the compute warpgroups' ping-pong."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

TILE = 128                 # rows of a work item's tile = rows per key step = mask tile
ROWS_PER_WARPGROUP = 64    # a wgmma's M
ROW_TILE = 8               # rows of the tiled shared-memory layout
COMPUTE_WARPGROUPS = 2
H100_SMS = 132

# Device kinds of compute capability 9.x, for lowering under an abstract mesh
# (a CPU machine checking the CUDA lowering has no real device to ask).
_HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")


def _abstract_device():
  """The abstract mesh's device (CUDA lowering on a CPU machine), or None."""
  return jax.sharding.get_abstract_mesh().abstract_device


def targets_hopper() -> bool:
  """Whether the computation being traced runs on a Hopper (sm90) GPU.

  Under an abstract mesh with a device kind (CUDA lowering on a CPU machine)
  that kind decides; otherwise the default device's compute capability.
  """
  device = _abstract_device()
  if device is not None:
    return (device.platform in ("cuda", "gpu")
            and any(kind in device.device_kind for kind in _HOPPER_KINDS))
  default = jax.devices()[0]
  capability = getattr(default, "compute_capability", None)
  return default.platform == "gpu" and str(capability).startswith("9.")


def num_sms() -> int:
  """Streaming multiprocessors of the target GPU (the persistent grid's size)."""
  device = _abstract_device()
  if device is not None:
    return int(device.num_cores)
  return int(getattr(jax.devices()[0], "core_count", 0) or H100_SMS)


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
