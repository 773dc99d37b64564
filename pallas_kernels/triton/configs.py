"""Tile, warp and pipeline-depth choice for every Triton kernel, in one table.

A kernel tile must divide the mask tile (the granularity of the BlockMask index
lists), so the chosen sizes are clamped to it. Entries are keyed by head dim and
dtype; the GPU only bounds the pipeline depth (below): Hopper is the tuned
target, other GPUs get the same shapes, which fit everywhere from Ampere on.

What a kernel launches with (`launch_config`): the autotuned configuration of
the traced-for GPU and shape class when `bsattn_jax.autotune` stored one
(`autotune_cache`), else the table's; then, when compiling for a GPU, its
pipeline is made shallower until the shared-memory model (`smem.py`) fits the
GPU, so a configuration that cannot fit is refused before compiling.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pallas_kernels import target
from pallas_kernels.triton import autotune_cache
from pallas_kernels.triton import smem
from pallas_kernels.triton.smem import KERNELS


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

  @property
  def name(self) -> str:
    """'128x64x4x2': block_q x block_kv x warps x stages."""
    return f"{self.block_q}x{self.block_kv}x{self.num_warps}x{self.num_stages}"

  @classmethod
  def parse(cls, text: str) -> "KernelConfig":
    """The config named `text` ('128x64x4x2', as `name` writes it)."""
    parts = text.strip().lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise ValueError(f"a launch config is BLOCKQxBLOCKKVxWARPSxSTAGES of "
                       f"positive ints, e.g. 128x64x4x2; got {text!r}")
    return cls(*map(int, parts))


MIN_TILE = 16
SUPPORTED_HEAD_DIMS_MAX = 256


def padded_head_dim(head_dim: int) -> int:
  """Head dims that are not a power of two run padded (Triton tiles must be)."""
  return max(MIN_TILE, 1 << (int(head_dim) - 1).bit_length())


def _is_half(dtype) -> bool:
  return np.dtype(dtype).itemsize == 2


LONG_SEQUENCE = 2048


def _forward_table(head_dim: int, dtype, mask_tile: tuple[int, int],
                   seq_len_q: int | None) -> KernelConfig:
  """Forward kernel: a program owns a query tile and streams key tiles past it.

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


def _dkdv_table(head_dim: int, dtype, mask_tile: tuple[int, int],
                seq_len_q: int | None) -> KernelConfig:
  """dK/dV kernel: a program owns a key tile and streams query tiles past it.

  H100 bf16 D=128 S=8192 sweep: 64x64, 4 warps, 2 stages led both the dense and
  the local d=0.1 mask (wider key tiles spill: 64x128 ran 3.5x slower).
  """
  del seq_len_q  # one entry for every length
  dp = padded_head_dim(head_dim)
  if not _is_half(dtype):
    cfg = KernelConfig(32, 64, 4, 1) if dp <= 128 else KernelConfig(16, 32, 4, 1)
  elif dp <= 128:
    cfg = KernelConfig(64, 64, 4, 2)
  else:
    cfg = KernelConfig(32, 64, 4, 1)
  return cfg.clamp_to(mask_tile)


def _dq_table(head_dim: int, dtype, mask_tile: tuple[int, int],
              seq_len_q: int | None) -> KernelConfig:
  """dQ kernel: a program owns a query tile and streams key tiles past it.

  H100 bf16 S=8192 sweep: D=128 128x128 with 8 warps, 2 stages led on the dense
  mask (1.13x the 128x32 tiles it replaced) and the local one; D=64 64x32 with
  4 warps led on the local mask (1.24x).
  """
  del seq_len_q  # one entry for every length
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


_TABLES = {"forward": _forward_table, "dkdv": _dkdv_table, "dq": _dq_table}


def _check_kernel(kernel: str) -> None:
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def table_config(kernel: str, head_dim: int, dtype, mask_tile: tuple[int, int],
                 seq_len_q: int | None = None) -> KernelConfig:
  """The shipped table's launch shape of `kernel` ('forward', 'dkdv', 'dq'),
  clamped to the mask tile. `seq_len_q`: the query rows per example when
  every example has the same (padded layout), else None."""
  _check_kernel(kernel)
  return _TABLES[kernel](head_dim, dtype, mask_tile, seq_len_q)


def smem_bytes(kernel: str, config: KernelConfig, head_dim: int, dtype,
               compute_capability: int = target.HOPPER) -> int:
  """Shared memory one program of `kernel` takes with `config` (`smem.py`'s model)."""
  return smem.pipeline_bytes(kernel, config.block_q, config.block_kv,
                             padded_head_dim(head_dim), dtype, config.num_stages,
                             compute_capability, config.num_warps)


def fit_to_gpu(kernel: str, config: KernelConfig, head_dim: int, dtype,
               gpu: target.Gpu | None) -> KernelConfig:
  """`config` with as many pipeline stages as fit `gpu`'s shared memory.

  Unchanged when there is no GPU (interpret mode) or its limit is unknown; a
  config that does not fit even unpipelined is refused here, before compiling.
  """
  if gpu is None or gpu.smem_per_block is None:
    return config
  fits = lambda c: smem_bytes(kernel, c, head_dim, dtype,
                              gpu.compute_capability) <= gpu.smem_per_block
  fitted = config
  while not fits(fitted) and fitted.num_stages > 1:
    fitted = dataclasses.replace(fitted, num_stages=fitted.num_stages - 1)
  if not fits(fitted):
    need = smem_bytes(kernel, fitted, head_dim, dtype, gpu.compute_capability)
    raise ValueError(
        f"{kernel} launch config {config.name} (head dim {head_dim}, "
        f"{np.dtype(dtype).name}) needs ~{need} bytes of shared memory even with "
        f"1 stage; the {gpu.describe()} has {gpu.smem_per_block}")
  return fitted


def launch_config(kernel: str, head_dim: int, dtype, mask_tile: tuple[int, int],
                  seq_len_q: int | None = None) -> KernelConfig:
  """What `kernel` launches with: the autotuned config of the traced-for
  device and this shape class if there is one, else the table's; fitted to
  the GPU's shared memory (see the module docstring)."""
  _check_kernel(kernel)
  tuned = autotune_cache.lookup(
      kernel, autotune_cache.shape_class(head_dim, dtype, mask_tile, seq_len_q))
  config = (KernelConfig.parse(tuned).clamp_to(mask_tile) if tuned
            else table_config(kernel, head_dim, dtype, mask_tile, seq_len_q))
  return fit_to_gpu(kernel, config, head_dim, dtype, target.traced_for())


def forward_config(head_dim: int, dtype, mask_tile: tuple[int, int],
                   seq_len_q: int | None = None) -> KernelConfig:
  """The forward kernel's launch shape (`launch_config`)."""
  return launch_config("forward", head_dim, dtype, mask_tile, seq_len_q)


def dkdv_config(head_dim: int, dtype, mask_tile: tuple[int, int],
                seq_len_q: int | None = None) -> KernelConfig:
  """The dK/dV kernel's launch shape (`launch_config`)."""
  return launch_config("dkdv", head_dim, dtype, mask_tile, seq_len_q)


def dq_config(head_dim: int, dtype, mask_tile: tuple[int, int],
              seq_len_q: int | None = None) -> KernelConfig:
  """The dQ kernel's launch shape (`launch_config`)."""
  return launch_config("dq", head_dim, dtype, mask_tile, seq_len_q)
