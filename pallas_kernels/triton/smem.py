"""A model of the shared memory each Triton kernel allocates, checked before compile.

Triton decides the allocation itself (ptxas reports it only after a compile
that fails when it does not fit), so this is a model of what one program
keeps in shared memory, fitted to what the compiled kernels launch with on
Hopper (`benchmarks/smem_check.py` reads it from profiler traces; every
configuration of the launch table within 10%, most exactly):

- *resident* tiles, loaded once before the key (or query) loop and read by
  every step's matmuls: the forward's q; dK/dV's k and v; dQ's q and dO;
- *streamed* tiles, loaded at every step and pipelined `num_stages` deep: the
  forward's and dQ's k and v; dK/dV's q and dO plus their lse and delta rows
  (fp32);
- in 16-bit dK/dV on Hopper, the `block_q x block_kv` probabilities staged
  transposed as a tensor-core operand (dV = P^T dO, dK = dS^T Q reuse one
  buffer).

fp32 inputs differ (their products run without the 16-bit tensor-core
path): the forward keeps no q tile but converts its fp32 scores through
shared memory (`block_q x block_kv` plus a row of `block_q`), and dK/dV
keeps only k and v (its q and dO pass through registers). When dK/dV's two
fp32 accumulators need a whole thread's registers (`2 x block_kv x dim`
over the program's threads, at least 255 per thread: head dim 256 with 4
warps) they are counted in shared memory in place of the streamed tiles
(measured once, D=256 32x64x4x1: 192 KiB).

Each streamed tile gets `num_stages` buffers on Hopper and later (its copies
run `num_stages - 1` steps ahead, plus the buffer the tensor-core matmul
(wgmma) reads its operand from), and `max(1, num_stages - 1)` on older GPUs,
whose matmuls read operands from registers. Tiles are `rows x padded head
dim` in the input dtype (head dims run padded to a power of two, see
`configs.padded_head_dim`). The measurements are Hopper's: on older GPUs
the model keeps the fewer buffers above and leaves out the two
tensor-core-path terms (the staged probabilities and the accumulators in
shared memory), unmeasured there.
"""

from __future__ import annotations

import numpy as np

from pallas_kernels.target import HOPPER

KERNELS = ("forward", "dkdv", "dq")
LSE_BYTES = 4    # lse and delta rows are fp32
MAX_REGISTERS_PER_THREAD = 255


def stage_buffers(num_stages: int, compute_capability: int) -> int:
  """Shared-memory buffers of one streamed tile (see the module docstring)."""
  if compute_capability >= HOPPER:
    return max(1, num_stages)
  return max(1, num_stages - 1)


def pipeline_bytes(kernel: str, block_q: int, block_kv: int, padded_dim: int,
                   dtype, num_stages: int, compute_capability: int = HOPPER,
                   num_warps: int = 4) -> int:
  """Bytes of shared memory one program of `kernel` keeps (the model above).

  Args:
    kernel: 'forward', 'dkdv' or 'dq'.
    block_q, block_kv: the kernel tile's query and key rows.
    padded_dim: head dim as the kernel runs it (a power of two).
    dtype: q/k/v dtype.
    num_stages: Triton's software-pipelining depth.
    compute_capability: 90 for Hopper (and later), 80 for Ampere, ...
    num_warps: Triton's warps per program (where the accumulators fit).
  """
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
  itemsize = np.dtype(dtype).itemsize
  tile = lambda rows: rows * padded_dim * itemsize
  buffers = stage_buffers(num_stages, compute_capability)
  fp32 = itemsize == 4
  if kernel == "forward":
    if fp32:
      return buffers * 2 * tile(block_kv) + (block_q * block_kv + block_q) * 4
    return tile(block_q) + buffers * 2 * tile(block_kv)
  if kernel == "dq":
    return 2 * tile(block_q) + buffers * 2 * tile(block_kv)
  resident = 2 * tile(block_kv)
  accumulator_registers = 2 * block_kv * padded_dim // (32 * num_warps)
  hopper = compute_capability >= HOPPER
  if hopper and accumulator_registers >= MAX_REGISTERS_PER_THREAD:
    return resident + 2 * block_kv * padded_dim * 4
  if fp32:
    return resident
  streamed = 2 * tile(block_q) + 2 * block_q * LSE_BYTES
  staged = block_q * block_kv * itemsize if hopper else 0
  return resident + buffers * streamed + staged
