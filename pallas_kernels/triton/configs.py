"""Tile, warp and pipeline-depth choice for every Triton kernel, in one table.

A kernel tile must divide the mask tile (the granularity of the BlockMask index
lists), so the chosen sizes are clamped to it. Entries are keyed by head dim and
dtype; the compute capability decides nothing yet (Hopper is the tuned target,
other GPUs get the same shapes, which are valid everywhere Triton runs).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """One kernel's launch shape.

  block_q / block_kv: rows of the query / key tile a program works on.
  num_warps / num_stages: Triton's warps per program and software-pipelining depth.
  """

  block_q: int
  block_kv: int
  num_warps: int
  num_stages: int

  def clamp_to(self, mask_tile: tuple[int, int]) -> "KernelConfig":
    """The same config with tiles no larger than the mask tile (which they divide)."""
    return dataclasses.replace(
        self,
        block_q=min(self.block_q, mask_tile[0]),
        block_kv=min(self.block_kv, mask_tile[1]),
    )


MIN_TILE = 16
SUPPORTED_HEAD_DIMS_MAX = 256


def padded_head_dim(head_dim: int) -> int:
  """Head dims that are not a power of two run padded (Triton tiles must be)."""
  return max(MIN_TILE, 1 << (int(head_dim) - 1).bit_length())


def _is_half(dtype) -> bool:
  return np.dtype(dtype).itemsize == 2


LONG_SEQUENCE = 2048


def forward_config(head_dim: int, dtype, mask_tile: tuple[int, int],
                   seq_len_q: int | None = None) -> KernelConfig:
  """Forward kernel launch shape for this head dim / dtype / mask tile.

  `seq_len_q`: the query rows per example when every example has the same
  (padded layout), else None. H100 bf16 sweeps (benchmarks/tune.py, device
  time): D=128 with 128x64 tiles, 4 warps, 2 stages: as fast as 128x128 with
  8 warps on the dense mask (S=8192: 2.40 ms, ~457 TFLOP/s) and 8% faster on
  a local one (d=0.1: 0.31 ms): its smaller footprint fits two programs per
  SM, so one's prologue/epilogue overlaps the other's loop. D=64 on long
  sequences with 128x128 tiles and 4 warps (dense 1.05x, local within 3% of the best); on
  short ones (ViT, S=197) with 64x64 tiles, whose 4x more programs fill the
  GPU (128x128 ran 1.2x slower there). Masks with narrower tiles get 64x64.
  """
  dp = padded_head_dim(head_dim)
  long_rows = seq_len_q is not None and seq_len_q >= LONG_SEQUENCE
  if not _is_half(dtype):
    cfg = KernelConfig(64, 32, 4, 2) if dp <= 128 else KernelConfig(32, 32, 4, 1)
  elif dp <= 64 and long_rows and min(mask_tile) >= 128:
    cfg = KernelConfig(128, 128, 4, 3)
  elif dp <= 64:
    cfg = KernelConfig(64, 64, 4, 3)
  elif dp <= 128 and min(mask_tile) >= 128:
    cfg = KernelConfig(128, 64, 4, 2)
  elif dp <= 128:
    cfg = KernelConfig(64, 64, 4, 3)
  else:
    cfg = KernelConfig(64, 64, 4, 2)
  return cfg.clamp_to(mask_tile)


def dkdv_config(head_dim: int, dtype, mask_tile: tuple[int, int]) -> KernelConfig:
  """dK/dV kernel: a program owns a key tile and streams query tiles past it.

  H100 bf16 D=128 S=8192 sweep: 64x64, 4 warps, 2 stages led both the dense and
  the local d=0.1 mask (wider key tiles spill: 64x128 ran 3.5x slower).
  """
  dp = padded_head_dim(head_dim)
  if not _is_half(dtype):
    cfg = KernelConfig(32, 64, 4, 1) if dp <= 128 else KernelConfig(16, 32, 4, 1)
  elif dp <= 128:
    cfg = KernelConfig(64, 64, 4, 2)
  else:
    cfg = KernelConfig(32, 64, 4, 1)
  return cfg.clamp_to(mask_tile)


def dq_config(head_dim: int, dtype, mask_tile: tuple[int, int]) -> KernelConfig:
  """dQ kernel: a program owns a query tile and streams key tiles past it.

  H100 bf16 S=8192 sweep: D=128 128x128 with 8 warps, 2 stages led on the dense
  mask (1.13x the 128x32 tiles it replaced) and the local one; D=64 64x32 with
  4 warps led on the local mask (1.24x).
  """
  dp = padded_head_dim(head_dim)
  if not _is_half(dtype):
    cfg = KernelConfig(64, 32, 4, 1) if dp <= 128 else KernelConfig(32, 16, 4, 1)
  elif dp <= 64:
    cfg = KernelConfig(64, 32, 4, 2)
  elif dp <= 128:
    cfg = KernelConfig(128, 128, 8, 2)
  else:
    cfg = KernelConfig(64, 32, 4, 1)
  return cfg.clamp_to(mask_tile)
