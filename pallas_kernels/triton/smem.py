"""A model of the shared memory each Triton kernel allocates, checked before compile.

Triton decides the allocation itself (ptxas reports it only after a compile
that fails when it does not fit), so this is a model of what its software
pipeliner keeps in shared memory for one program:

- *resident* tiles, loaded once before the key (or query) loop and read by
  every step's matmuls: the forward's q; dK/dV's k and v; dQ's q and dO;
- *streamed* tiles, loaded at every step and pipelined `num_stages` deep: the
  forward's and dQ's k and v; dK/dV's q and dO plus their lse and delta rows
  (fp32).

Each streamed tile gets `num_stages` buffers on Hopper and later (its copies
run `num_stages - 1` steps ahead, plus the buffer the tensor-core matmul
(wgmma) reads its operand from), and `max(1, num_stages - 1)` on older GPUs,
whose matmuls read operands from registers. Tiles are `rows x padded head dim`
in the input dtype (head dims run padded to a power of two, see
`configs.padded_head_dim`).

Assumptions: resident tiles are counted on every generation (on Hopper wgmma
reads them from shared memory; elsewhere they may live in registers, so the
model is an upper bound there); the scratch Triton uses for layout
conversions and reductions is not counted (its blocks' row reductions stay
within a warp); tiles narrower than 64 rows, which Hopper runs on the older
matmul, are modelled as Hopper ones (an upper bound). `benchmarks/smem_check.py`
compares the model with what the compiled kernels launch with, on a GPU.
"""

from __future__ import annotations

import numpy as np

from pallas_kernels.target import HOPPER

KERNELS = ("forward", "dkdv", "dq")
LSE_BYTES = 4    # lse and delta rows are fp32


def stage_buffers(num_stages: int, compute_capability: int) -> int:
  """Shared-memory buffers of one streamed tile (see the module docstring)."""
  if compute_capability >= HOPPER:
    return max(1, num_stages)
  return max(1, num_stages - 1)


def pipeline_bytes(kernel: str, block_q: int, block_kv: int, padded_dim: int,
                   dtype, num_stages: int, compute_capability: int = HOPPER) -> int:
  """Bytes of shared memory one program of `kernel` keeps (the model above).

  Args:
    kernel: 'forward', 'dkdv' or 'dq'.
    block_q, block_kv: the kernel tile's query and key rows.
    padded_dim: head dim as the kernel runs it (a power of two).
    dtype: q/k/v dtype.
    num_stages: Triton's software-pipelining depth.
    compute_capability: 90 for Hopper (and later), 80 for Ampere, ...
  """
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
  tile = lambda rows: rows * padded_dim * np.dtype(dtype).itemsize
  if kernel == "forward":
    resident, streamed = tile(block_q), 2 * tile(block_kv)
  elif kernel == "dkdv":
    resident = 2 * tile(block_kv)
    streamed = 2 * tile(block_q) + 2 * block_q * LSE_BYTES
  else:
    resident, streamed = 2 * tile(block_q), 2 * tile(block_kv)
  return resident + stage_buffers(num_stages, compute_capability) * streamed
