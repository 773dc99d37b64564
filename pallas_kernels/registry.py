"""The kernel implementations, and which one takes a call.

Each implementation says whether it supports a call and, if not, why (the
reason is what a debug log prints). Forward and backward are chosen on their
own: the first implementation of the requested family that supports the call
runs. Families:

- 'pallas': every compiled implementation, fastest first (on Hopper the
  Mosaic GPU forward where it applies: at 128x128 mask tiles `mosaic_gpu`,
  at 64x64 ones `mosaic_gpu_block64`; the Mosaic GPU backward at either;
  then Triton);
- 'triton': the compiled Triton kernels only (any CUDA GPU);
- 'interpret': the Triton kernels in Pallas interpret mode (any machine).

`plan(call)` describes a call's launch without running it (which kernels, why
not the others, tiles, warps, stages, shared memory): what the debug log
(`bsattn_jax.set_debug`) prints.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import numpy as np

from pallas_kernels import target
from pallas_kernels.block_lists import BlockLists
from pallas_kernels.dropout import Dropout
from pallas_kernels.masking import ElementRule
from pallas_kernels.mosaic_gpu import bwd as mosaic_bwd
from pallas_kernels.mosaic_gpu import fwd as mosaic_fwd
from pallas_kernels.mosaic_gpu import fwd_block64 as mosaic_fwd64
from pallas_kernels.mosaic_gpu.common import COMPUTE_WARPGROUPS, ROWS_PER_WARPGROUP, TILE
from pallas_kernels.seq_info import SEED, StaticSizes
from pallas_kernels.triton import bwd as triton_bwd
from pallas_kernels.triton import configs as triton_configs
from pallas_kernels.triton import fwd as triton_fwd

FAMILIES = ("pallas", "triton", "interpret")

MAX_HEAD_DIM = triton_configs.SUPPORTED_HEAD_DIMS_MAX


class KernelCall(NamedTuple):
  """What decides which implementation can run (all static)."""

  dtype: np.dtype
  head_dim: int
  mask_tile: tuple[int, int]
  static: StaticSizes
  rule: ElementRule
  family: str
  dropout: Dropout = Dropout()


class KernelPlan(NamedTuple):
  """How one kernel launches for a call."""

  kernel: str                 # 'forward', 'dK/dV' or 'dQ'
  tile: tuple[int, int]       # (query rows, key rows) of a program's tile
  launch: str                 # warps and stages, or warpgroups
  smem_bytes: int             # shared memory per program (see `smem_note`)
  smem_note: str              # how smem_bytes was obtained


class Implementation(NamedTuple):
  """A kernel: `unsupported(call)` is None when it can run the call, else why
  not; `run` takes the arguments of its direction (see `forward`/`backward`);
  `kernels(call, compute_capability)` describes its launches."""

  name: str
  families: tuple[str, ...]
  unsupported: Callable[[KernelCall], str | None]
  run: Callable
  kernels: Callable[[KernelCall, int], tuple[KernelPlan, ...]]


def _mosaic_unsupported(module, call: KernelCall) -> str | None:
  """`module.unsupported_call` (a Mosaic GPU kernel module) on a registry call."""
  return module.unsupported_call(call.dtype, call.head_dim, call.mask_tile,
                                 call.static)


_mosaic_forward_unsupported = functools.partial(_mosaic_unsupported, mosaic_fwd)
_mosaic_forward64_unsupported = functools.partial(_mosaic_unsupported, mosaic_fwd64)
_mosaic_backward_unsupported = functools.partial(_mosaic_unsupported, mosaic_bwd)


def _run_mosaic_forward(module, q, k, v, seq_info, lists, *, call, softmax_scale):
  """`module.forward` (`mosaic_gpu.fwd` or `fwd_block64`) on a registry call.
  The padded layout at full length: every example in place, so of seq_info
  only the dropout seeds are needed."""
  seeds = seq_info[:, SEED] if call.dropout.active else None
  return module.forward(q, k, v, lists, softmax_scale=softmax_scale,
                        rule=call.rule, q_len=call.static.q_len,
                        kv_len=call.static.kv_len, dropout=call.dropout,
                        seeds=seeds)


_mosaic_forward = functools.partial(_run_mosaic_forward, mosaic_fwd)


def _mosaic_forward_kernels(call: KernelCall, capability: int
                            ) -> tuple[KernelPlan, ...]:
  del capability  # Hopper only
  launch = (f"{COMPUTE_WARPGROUPS} compute warpgroups x {ROWS_PER_WARPGROUP} rows "
            f"+ 1 memory warpgroup (TMA), {mosaic_fwd.DEFAULT_STAGES} K/V stages, "
            f"persistent")
  return (KernelPlan("forward", (TILE, TILE), launch,
                     mosaic_fwd.shared_memory_bytes(call.head_dim, call.dtype),
                     "exact allocation"),)


_mosaic_forward64 = functools.partial(_run_mosaic_forward, mosaic_fwd64)


def _mosaic_forward64_kernels(call: KernelCall, capability: int
                              ) -> tuple[KernelPlan, ...]:
  del capability  # Hopper only
  tile = mosaic_fwd64.MASK_TILE
  launch = (f"{COMPUTE_WARPGROUPS} compute warpgroups x {ROWS_PER_WARPGROUP} rows "
            f"(one {tile}-row mask tile each, walking its own list) + 1 memory "
            f"warpgroup (TMA), {mosaic_fwd64.DEFAULT_SLOTS} K/V half slots of "
            f"{tile} keys, persistent")
  return (KernelPlan("forward", (tile, tile), launch,
                     mosaic_fwd64.shared_memory_bytes(call.head_dim, call.dtype),
                     "exact allocation"),)


def _mosaic_backward(q, k, v, o, lse, do, dlse, seq_info, forward_lists,
                     backward_lists, *, call, softmax_scale):
  # As `_run_mosaic_forward`: of seq_info only the dropout seeds are needed.
  seeds = seq_info[:, SEED] if call.dropout.active else None
  return mosaic_bwd.backward(q, k, v, o, lse, do, dlse, forward_lists,
                             backward_lists, softmax_scale=softmax_scale,
                             rule=call.rule, q_len=call.static.q_len,
                             kv_len=call.static.kv_len, dropout=call.dropout,
                             seeds=seeds, mask_tile=call.mask_tile[0])


def _mosaic_backward_kernels(call: KernelCall, capability: int
                             ) -> tuple[KernelPlan, ...]:
  del capability  # Hopper only
  mask_tile = call.mask_tile[0]
  if mask_tile == TILE:
    rings = f"{mosaic_bwd.STAGES} stages"
  else:
    rings = (f"each walking its own {mask_tile}-row mask row, "
             f"{mosaic_bwd.STAGES} stages each")
  launch = (f"{COMPUTE_WARPGROUPS} compute warpgroups x {ROWS_PER_WARPGROUP} rows "
            f"+ 1 memory warpgroup (TMA), {rings}, persistent")
  return tuple(
      KernelPlan(label, (mask_tile, mask_tile), launch,
                 mosaic_bwd.shared_memory_bytes(kernel, call.head_dim, call.dtype,
                                                mask_tile, call.dropout.active,
                                                call.rule.causal),
                 "exact allocation")
      for kernel, label in (("dkdv", "dK/dV"), ("dq", "dQ")))


def _triton_config(kernel: str, call: KernelCall) -> triton_configs.KernelConfig:
  return triton_configs.launch_config(kernel, call.head_dim, call.dtype,
                                      call.mask_tile, call.static.q_span)


def _triton_plan(kernel: str, label: str, call: KernelCall, capability: int
                 ) -> KernelPlan:
  cfg = _triton_config(kernel, call)
  smem = triton_configs.smem_bytes(kernel, cfg, call.head_dim, call.dtype,
                                   capability)
  return KernelPlan(label, (cfg.block_q, cfg.block_kv),
                    f"{cfg.num_warps} warps, {cfg.num_stages} stages", smem,
                    f"model, sm{capability}")


def _triton_forward_kernels(call: KernelCall, capability: int
                            ) -> tuple[KernelPlan, ...]:
  return (_triton_plan("forward", "forward", call, capability),)


def _triton_backward_kernels(call: KernelCall, capability: int
                             ) -> tuple[KernelPlan, ...]:
  return (_triton_plan("dkdv", "dK/dV", call, capability),
          _triton_plan("dq", "dQ", call, capability))


def _triton_forward(q, k, v, seq_info, lists, *, call, softmax_scale):
  config = _triton_config("forward", call)
  return triton_fwd.forward(
      q, k, v, seq_info, lists, softmax_scale=softmax_scale, rule=call.rule,
      mask_tile=call.mask_tile, config=config, static=call.static,
      dropout=call.dropout, interpret=call.family == "interpret")


def _triton_backward(q, k, v, o, lse, do, dlse, seq_info, forward_lists,
                     backward_lists, *, call, softmax_scale):
  return triton_bwd.backward(
      q, k, v, o, lse, do, dlse, seq_info, forward_lists, backward_lists,
      softmax_scale=softmax_scale, rule=call.rule, mask_tile=call.mask_tile,
      dkdv_config=_triton_config("dkdv", call),
      dq_config=_triton_config("dq", call), static=call.static,
      dropout=call.dropout, interpret=call.family == "interpret")


def _always(call: KernelCall) -> None:
  del call


FORWARD = (
    Implementation("mosaic_gpu", ("pallas",), _mosaic_forward_unsupported,
                   _mosaic_forward, _mosaic_forward_kernels),
    Implementation("mosaic_gpu_block64", ("pallas",), _mosaic_forward64_unsupported,
                   _mosaic_forward64, _mosaic_forward64_kernels),
    Implementation("triton", FAMILIES, _always, _triton_forward,
                   _triton_forward_kernels),
)
BACKWARD = (
    Implementation("mosaic_gpu", ("pallas",), _mosaic_backward_unsupported,
                   _mosaic_backward, _mosaic_backward_kernels),
    Implementation("triton", FAMILIES, _always, _triton_backward,
                   _triton_backward_kernels),
)


def choose(implementations: tuple[Implementation, ...], call: KernelCall
           ) -> tuple[Implementation, dict[str, str]]:
  """The first implementation of the call's family that supports it, and why
  each one before it (or outside the family) was passed over."""
  if call.family not in FAMILIES:
    raise ValueError(f"kernel family must be one of {FAMILIES}, got {call.family!r}")
  passed_over = {}
  for impl in implementations:
    if call.family not in impl.families:
      passed_over[impl.name] = f"not in family {call.family!r}"
      continue
    reason = impl.unsupported(call)
    if reason is None:
      return impl, passed_over
    passed_over[impl.name] = reason
  raise NotImplementedError(f"no kernel supports this call: {passed_over}")


def forward(q: jax.Array, k: jax.Array, v: jax.Array, seq_info: jax.Array,
            lists: BlockLists, *, call: KernelCall, softmax_scale: float
            ) -> tuple[jax.Array, jax.Array]:
  """o `[Tq, H, D]` and lse `[H, Tq]` (fp32, natural log) on flat sequences."""
  impl, _ = choose(FORWARD, call)
  return impl.run(q, k, v, seq_info, lists, call=call, softmax_scale=softmax_scale)


def backward(q, k, v, o, lse, do, dlse, seq_info, forward_lists: BlockLists,
             backward_lists: BlockLists, *, call: KernelCall,
             softmax_scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv), shapes as q, k, v; dlse is lse's cotangent or None."""
  impl, _ = choose(BACKWARD, call)
  return impl.run(q, k, v, o, lse, do, dlse, seq_info, forward_lists,
                  backward_lists, call=call, softmax_scale=softmax_scale)


class DirectionPlan(NamedTuple):
  """The implementation one direction runs, why not each other one, and its
  kernels' launches."""

  implementation: str
  not_chosen: dict[str, str]
  kernels: tuple[KernelPlan, ...]


class LaunchPlan(NamedTuple):
  """A call's forward and backward launches, for the GPU it is traced for
  (None: no GPU; shared memory is then modelled for Hopper)."""

  forward: DirectionPlan
  backward: DirectionPlan
  gpu: target.Gpu | None


def _direction_plan(implementations: tuple[Implementation, ...],
                    call: KernelCall, capability: int) -> DirectionPlan:
  impl, passed_over = choose(implementations, call)
  later = {other.name: f"ranked below {impl.name}"
           for other in implementations[implementations.index(impl) + 1:]}
  return DirectionPlan(impl.name, {**passed_over, **later},
                       impl.kernels(call, capability))


def plan(call: KernelCall) -> LaunchPlan:
  """What `forward` and `backward` would launch for `call`, traced here."""
  gpu = target.traced_for()
  capability = gpu.compute_capability if gpu else target.HOPPER
  return LaunchPlan(_direction_plan(FORWARD, call, capability),
                    _direction_plan(BACKWARD, call, capability), gpu)
