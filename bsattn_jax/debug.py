"""The launch-plan log: what a call runs, on which tiles, and why.

With `BSATTN_DEBUG=1` in the environment (read at every call) or after
`set_debug(True)`, every `block_sparse_attention` / `block_sparse_attn_func`
call logs its plan once per distinct static call (shapes, dtype, mask tile,
lengths known at trace time, element rule, kernel family): the kernels chosen
for the forward and the backward and why not the others
(`pallas_kernels.registry.plan`), the user block, mask tile and each kernel's
tile with the factors between them, warps and stages (or warpgroups), the
mask's active and partial tiles and density (when its lists are concrete;
'traced' under `jit`), and shared memory against the GPU's limit. The plan is
logged while tracing, so a jitted call logs when it compiles.

The log goes to the `logging` logger 'bsattn_jax' at INFO. When debugging is
on and no handler is configured (on it or above it), the library adds one
that writes to stderr; it is otherwise silent.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
import numpy as np

from pallas_kernels import registry
from pallas_kernels.target import KIB, SMEM_PER_BLOCK, AMPERE, HOPPER

ENV_VAR = "BSATTN_DEBUG"
logger = logging.getLogger("bsattn_jax")

_override: bool | None = None
_logged: set = set()


def set_debug(enabled: bool | None) -> None:
  """Turn the launch-plan log on (True) or off (False); None follows
  `BSATTN_DEBUG` again. Every call re-logs its plan after a change."""
  global _override
  if enabled is not None and not isinstance(enabled, bool):
    raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
  _override = enabled
  _logged.clear()


def debug_enabled() -> bool:
  """`set_debug`'s setting, else whether `BSATTN_DEBUG` is 1/true/yes/on."""
  if _override is not None:
    return _override
  return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def _ensure_output() -> None:
  if not logger.hasHandlers():
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.addHandler(handler)
  if logger.level == logging.NOTSET:
    logger.setLevel(logging.INFO)


def _factor(outer: tuple[int, int], inner: tuple[int, int]) -> str:
  return f"{outer[0] // inner[0]}x{outer[1] // inner[1]}"


def _smem(kernel: registry.KernelPlan, gpu) -> str:
  used = f"smem {kernel.smem_bytes / KIB:.1f} KiB ({kernel.smem_note})"
  if gpu is None or gpu.smem_per_block is None:
    return used
  fits = kernel.smem_bytes <= gpu.smem_per_block
  return f"{used}: {'fits' if fits else 'EXCEEDS the limit'}"


def _target(gpu) -> str:
  if gpu is None:
    return (f"no GPU (shared memory per block: sm80 {SMEM_PER_BLOCK[AMPERE] // KIB} "
            f"KiB, sm90 {SMEM_PER_BLOCK[HOPPER] // KIB} KiB)")
  return gpu.describe()


def _direction(label: str, direction: registry.DirectionPlan, block, tile,
               gpu) -> list[str]:
  others = "; ".join(f"not {name}: {why}"
                     for name, why in direction.not_chosen.items())
  lines = [f"  {label}: {direction.implementation}" + (f" ({others})" if others else "")]
  for k in direction.kernels:
    lines.append(
        f"    {k.kernel} kernel tile {k.tile[0]}x{k.tile[1]} (mask tile / kernel "
        f"tile = {_factor(tile, k.tile)}, user block / kernel tile = "
        f"{_factor(block, k.tile)}), {k.launch}, {_smem(k, gpu)}")
  return lines


def _mask_line(block_mask) -> str:
  lists = block_mask.kv_lists
  if any(isinstance(x, jax.core.Tracer) for x in lists):
    return "  mask: traced (lists built under jit: tile counts unknown here)"
  count = np.asarray(lists.count, np.int64)
  active, full = int(count.sum()), int(np.asarray(lists.full_count).sum())
  total = count.size * lists.index.shape[-1]
  density = active / total if total else 0.0
  return (f"  mask: {active} of {total} mask tiles active (density {density:.3f}), "
          f"{active - full} partial (masked by element), {full} full; causal="
          f"{block_mask.is_causal}, mask_fn="
          f"{getattr(block_mask.mask_fn, '__name__', block_mask.mask_fn)}")


def log_plan(call: registry.KernelCall, block_mask, q_shape: tuple[int, ...],
             kv_shape: tuple[int, ...]) -> None:
  """Log `call`'s launch plan once per distinct static call (when enabled).

  `q_shape` / `kv_shape`: the caller's q and k shapes (its layout).
  """
  if not debug_enabled():
    return
  key = (call, block_mask.block_size, tuple(q_shape), tuple(kv_shape))
  if key in _logged:
    return
  _logged.add(key)
  plan = registry.plan(call)
  block, tile = block_mask.block_size, block_mask.tile
  gpu = plan.gpu
  lines = [
      f"launch plan: q {list(q_shape)}, k/v {list(kv_shape)} {call.dtype.name}, "
      f"family {call.family!r}, {_target(gpu)}",
      f"  user block {block[0]}x{block[1]} -> mask tile {tile[0]}x{tile[1]} "
      f"(factor {_factor(block, tile)}: each user block is "
      f"{_factor(block, tile)} mask tiles)",
      *_direction("forward", plan.forward, block, tile, gpu),
      *_direction("backward", plan.backward, block, tile, gpu),
      _mask_line(block_mask),
  ]
  _ensure_output()
  logger.info("\n".join(lines))
