"""How much shared memory a kernel configuration needs, and where it fits.

`smem_estimate` answers for one program of a kernel: for the Triton kernels
from a model of Triton's software pipeline (`pallas_kernels/triton/smem.py`:
resident tiles plus `num_stages` buffers of the streamed ones on Hopper, one
fewer elsewhere), for the Hopper forward exactly what it allocates
(`pallas_kernels/mosaic_gpu/fwd.py`, and `fwd_block64.py` at 64x64 tiles).
`check_smem` compares it with what one block may use on Ampere (sm80),
Hopper (sm90) and this machine's GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from bsattn_jax import input_checks
from pallas_kernels import target
from pallas_kernels.mosaic_gpu import bwd as mosaic_bwd
from pallas_kernels.mosaic_gpu import fwd as mosaic_fwd
from pallas_kernels.mosaic_gpu import fwd_block64 as mosaic_fwd64
from pallas_kernels.mosaic_gpu.common import TILE
from pallas_kernels.triton import configs
from pallas_kernels.triton.configs import KERNELS, SUPPORTED_HEAD_DIMS_MAX

IMPLEMENTATIONS = ("triton", "mosaic_gpu")
DTYPES = (np.dtype(jnp.float16), np.dtype(jnp.bfloat16), np.dtype(jnp.float32))
DEFAULT_STAGES = 2


def _positive(value, name: str, power_of_two: bool = False) -> int:
  value = input_checks.positive_int(value, name)
  if power_of_two and value & (value - 1):
    raise ValueError(f"{name} must be a power of two (a kernel tile), got {value}")
  return int(value)


def smem_estimate(block_q: int, block_kv: int, head_dim: int, *,
                  dtype=jnp.bfloat16, num_stages: int | None = None,
                  implementation: str = "triton", kernel: str = "forward",
                  compute_capability: int = target.HOPPER, num_warps: int = 4,
                  dropout: bool = False, causal: bool = False) -> int:
  """Bytes of shared memory one program of a kernel allocates.

  Args:
    block_q, block_kv: the kernel tile's query and key rows (powers of two;
      128 x 128 for 'mosaic_gpu', or 64 x 64 for its kernels at 64x64 mask
      tiles: the forward `fwd_block64`, 64 query rows per compute
      warpgroup, 64-key tiles; the backward with one ring of 64-row tiles
      per compute warpgroup).
    head_dim: 1..256 (Triton runs it padded to a power of two; 'mosaic_gpu'
      takes 64 or 128).
    dtype: q/k/v dtype.
    num_stages: pipeline depth (Triton's `num_stages`; the Hopper forward's
      K/V ring slots, at 64 x 64 its 64-key half slots; the Hopper backward
      has a fixed ring of `mosaic_gpu.bwd.STAGES` slots and ignores it).
      None: 2, or at 64 x 64 on 'mosaic_gpu' the kernel's default 4
      (`fwd_block64.DEFAULT_SLOTS`).
    implementation: 'triton' (a model, see the module docstring) or
      'mosaic_gpu' (the Hopper kernels' exact allocation; forward: its q/o
      buffers `2 x 2 x 64 x D`, K and V rings `stages x 128 x D` (at 64 x
      64: `slots x 64 x D`), lse `2 x 64` fp32, reduction scratch, 8 bytes
      per barrier; backward: the item's own tiles `2 x 64 x D` twice, a ring
      of the listed side, and at D=128 dK/dV's P^T `2 x 64 x 128`, which
      it leaves out with `dropout`).
    kernel: 'forward', 'dkdv' or 'dq'.
    compute_capability: 90 (Hopper, the default) or 80 (Ampere) etc.: the
      Triton pipeline keeps one buffer fewer per streamed tile before Hopper.
    num_warps: Triton's warps per program (whether dK/dV's accumulators fit
      in registers); the Mosaic GPU kernels ignore it.
    dropout: whether the call has attention dropout (only the Mosaic GPU
      dK/dV kernel's allocation depends on it).
    causal: whether the mask is causal (the Mosaic GPU dK/dV kernel at
      D=128 then runs without its ping-pong barrier: 8 bytes less).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
  for name, flag in (("dropout", dropout), ("causal", causal)):
    if not isinstance(flag, bool):
      raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
  block_q = _positive(block_q, "block_q", power_of_two=True)
  block_kv = _positive(block_kv, "block_kv", power_of_two=True)
  head_dim = _positive(head_dim, "head_dim")
  if head_dim > SUPPORTED_HEAD_DIMS_MAX:
    raise ValueError(f"head_dim must be in 1..{SUPPORTED_HEAD_DIMS_MAX}, got {head_dim}")
  block64 = (implementation == "mosaic_gpu" and kernel == "forward"
             and (block_q, block_kv) == (mosaic_fwd64.MASK_TILE,) * 2)
  if num_stages is None:
    num_stages = mosaic_fwd64.DEFAULT_SLOTS if block64 else DEFAULT_STAGES
  num_stages = _positive(num_stages, "num_stages")
  compute_capability = _positive(compute_capability, "compute_capability")
  num_warps = _positive(num_warps, "num_warps", power_of_two=True)
  if np.dtype(dtype) not in DTYPES:
    raise TypeError(f"dtype must be float16, bfloat16 or float32, got {np.dtype(dtype)}")
  if implementation == "triton":
    cfg = configs.KernelConfig(block_q, block_kv, num_warps, num_stages)
    return configs.smem_bytes(kernel, cfg, head_dim, dtype, compute_capability)
  family = (mosaic_fwd64 if block64 else mosaic_fwd if kernel == "forward"
            else mosaic_bwd)
  reason = family.unsupported(dtype, head_dim, (block_q, block_kv), TILE, TILE)
  if compute_capability != target.HOPPER:
    reason = f"compute capability {compute_capability} (Hopper, 90, only)"
  if reason is not None:
    raise ValueError(f"the mosaic_gpu {kernel} cannot take {reason}")
  if block64:
    return mosaic_fwd64.shared_memory_bytes(head_dim, dtype, num_stages)
  if kernel == "forward":
    return mosaic_fwd.shared_memory_bytes(head_dim, dtype, num_stages)
  return mosaic_bwd.shared_memory_bytes(kernel, head_dim, dtype, block_q,
                                        dropout, causal)


class SmemCheck(NamedTuple):
  """Where a configuration fits. `*_bytes` are the estimates for that GPU
  (None: the implementation does not run there), `*_limit` what one block
  may use; `device` is this machine's GPU, or 'no GPU'."""

  sm80_bytes: int | None
  sm80_limit: int
  sm90_bytes: int
  sm90_limit: int
  device: str
  device_bytes: int | None
  device_limit: int | None

  @property
  def fits_sm80(self) -> bool:
    return self.sm80_bytes is not None and self.sm80_bytes <= self.sm80_limit

  @property
  def fits_sm90(self) -> bool:
    return self.sm90_bytes <= self.sm90_limit

  @property
  def fits_device(self) -> bool | None:
    """None when there is no GPU (or its limit or the estimate is unknown)."""
    if self.device_bytes is None or self.device_limit is None:
      return None
    return self.device_bytes <= self.device_limit

  def __str__(self) -> str:
    kib = lambda n: "-" if n is None else f"{n / target.KIB:.1f} KiB"
    verdict = lambda fits: {True: "fits", False: "does NOT fit", None: "unknown"}[fits]
    device = (f"{self.device}: {kib(self.device_bytes)} of "
              f"{kib(self.device_limit)}, {verdict(self.fits_device)}"
              if self.device_bytes is not None or self.device_limit is not None
              else self.device)
    return (f"sm80: {kib(self.sm80_bytes)} of {kib(self.sm80_limit)}, "
            f"{verdict(self.fits_sm80)}; sm90: {kib(self.sm90_bytes)} of "
            f"{kib(self.sm90_limit)}, {verdict(self.fits_sm90)}; {device}")


def check_smem(block_q: int, block_kv: int, head_dim: int, *,
               dtype=jnp.bfloat16, num_stages: int | None = None,
               implementation: str = "triton", kernel: str = "forward",
               dropout: bool = False, causal: bool = False) -> SmemCheck:
  """Whether a configuration fits sm80 (163 KiB per block), sm90 (227 KiB)
  and this machine's GPU (its reported limit; 'no GPU' on a CPU machine).
  Arguments as `smem_estimate`."""
  estimate = lambda capability: smem_estimate(
      block_q, block_kv, head_dim, dtype=dtype, num_stages=num_stages,
      implementation=implementation, kernel=kernel, compute_capability=capability,
      dropout=dropout, causal=causal)
  sm90 = estimate(target.HOPPER)
  sm80 = estimate(target.AMPERE) if implementation == "triton" else None
  gpu = target.default_gpu()
  device_bytes = None
  if gpu is not None and (implementation == "triton"
                          or gpu.compute_capability == target.HOPPER):
    device_bytes = estimate(gpu.compute_capability)
  return SmemCheck(
      sm80, target.SMEM_PER_BLOCK[target.AMPERE], sm90,
      target.SMEM_PER_BLOCK[target.HOPPER],
      gpu.describe() if gpu else "no GPU", device_bytes,
      gpu.smem_per_block if gpu else None)
