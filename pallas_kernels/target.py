"""The GPU a computation is traced for: its name, generation and shared memory.

Launch choices that depend on the GPU (whether a configuration fits its shared
memory, which tuned configurations apply) ask here. Under an abstract mesh with
a CUDA device kind (lowering for a GPU on a CPU machine) that kind decides;
otherwise the default device does. A CPU (interpret mode) is no GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

KIB = 1024
# Shared memory one block may use (opt-in maximum), by compute capability
# (CUDA programming guide, "Technical Specifications per Compute Capability").
SMEM_PER_BLOCK = {
    70: 96 * KIB, 75: 64 * KIB, 80: 163 * KIB, 86: 99 * KIB, 87: 163 * KIB,
    89: 99 * KIB, 90: 227 * KIB, 100: 227 * KIB, 103: 227 * KIB,
    120: 99 * KIB, 121: 99 * KIB,
}
AMPERE, HOPPER = 80, 90

# Device kinds (as JAX spells them) by compute capability, for abstract devices
# (a CPU machine lowering for CUDA has no real device to ask). Longer names
# first, so "A100" is not read as "A10".
_KINDS = (("GH200", 90), ("H100", 90), ("H200", 90), ("H800", 90), ("H20", 90),
          ("GB200", 100), ("B200", 100), ("GB300", 103), ("B300", 103),
          ("A100", 80), ("A800", 80), ("A30", 80), ("A10", 86), ("A40", 86),
          ("RTX 30", 86), ("L40", 89), ("L4", 89), ("RTX 40", 89),
          ("T4", 75), ("V100", 70))


class Gpu(NamedTuple):
  """A CUDA GPU: `compute_capability` as an int (9.0 -> 90), `smem_per_block`
  in bytes (None when the generation is not in `SMEM_PER_BLOCK`)."""

  name: str
  compute_capability: int
  smem_per_block: int | None

  def describe(self) -> str:
    limit = (f"{self.smem_per_block // KIB} KiB shared memory per block"
             if self.smem_per_block else "shared memory limit unknown")
    return f"{self.name} (sm{self.compute_capability}, {limit})"


def capability_of_kind(device_kind: str) -> int | None:
  """Compute capability of a device kind such as 'NVIDIA H100 80GB HBM3'."""
  for name, capability in _KINDS:
    if name in device_kind:
      return capability
  return None


def device_name() -> str:
  """The traced-for device's kind: the abstract mesh's, else the default
  device's ('cpu' on a CPU machine). Keys tuned configurations."""
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  if abstract is not None:
    return abstract.device_kind
  return jax.devices()[0].device_kind


def compiles_for_gpu() -> bool:
  """Whether the computation being traced compiles for a CUDA GPU (of any
  kind, known to the table or not)."""
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  if abstract is not None:
    return abstract.platform in ("cuda", "gpu")
  return jax.default_backend() == "gpu"


def num_sms(default: int) -> int:
  """Streaming multiprocessors of the traced-for GPU (`default` when unknown)."""
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  if abstract is not None:
    return int(abstract.num_cores)
  return int(getattr(jax.devices()[0], "core_count", 0) or default)


def traced_for() -> Gpu | None:
  """The GPU the computation being traced compiles for, or None (CPU)."""
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  if abstract is not None:
    if abstract.platform not in ("cuda", "gpu"):
      return None
    capability = capability_of_kind(abstract.device_kind)
    if capability is None:
      return None
    return Gpu(abstract.device_kind, capability, SMEM_PER_BLOCK.get(capability))
  return default_gpu()


def default_gpu() -> Gpu | None:
  """JAX's default device when it is a GPU (None on a CPU machine).

  The shared memory limit is the device's own when JAX reports it
  (`shared_memory_per_block_optin`), else the table's for its generation.
  """
  device = jax.devices()[0]
  if device.platform != "gpu":
    return None
  major, _, minor = str(getattr(device, "compute_capability", "")).partition(".")
  if not (major.isdigit() and minor.isdigit()):
    return None
  capability = int(major) * 10 + int(minor)
  smem = getattr(device, "shared_memory_per_block_optin", None)
  return Gpu(device.device_kind, capability,
             int(smem) if smem else SMEM_PER_BLOCK.get(capability))
