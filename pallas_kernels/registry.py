"""The kernel implementations, and which one takes a call.

Each implementation says whether it supports a call and, if not, why (the
reason is what a debug log prints). Forward and backward are chosen on their
own: the first implementation of the requested family that supports the call
runs. Families:

- 'pallas': every compiled implementation, fastest first (the Mosaic GPU
  forward on Hopper where it applies, then Triton);
- 'triton': the compiled Triton kernels only (any CUDA GPU);
- 'interpret': the Triton kernels in Pallas interpret mode (any machine).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import numpy as np

from pallas_kernels.block_lists import BlockLists
from pallas_kernels.dropout import Dropout
from pallas_kernels.masking import ElementRule
from pallas_kernels.mosaic_gpu import fwd as mosaic_fwd
from pallas_kernels.seq_info import StaticSizes
from pallas_kernels.triton import bwd as triton_bwd
from pallas_kernels.triton import configs as triton_configs
from pallas_kernels.triton import fwd as triton_fwd

FAMILIES = ("pallas", "triton", "interpret")


def targets_gpu() -> bool:
  """Whether the computation being traced compiles for a CUDA GPU: the default
  device is one, or an abstract mesh names a CUDA device (lowering for a GPU
  on a CPU machine)."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  if device is not None:
    return device.platform in ("cuda", "gpu")
  return jax.default_backend() == "gpu"
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


class Implementation(NamedTuple):
  """A kernel: `unsupported(call)` is None when it can run the call, else why
  not; `run` takes the arguments of its direction (see `forward`/`backward`)."""

  name: str
  families: tuple[str, ...]
  unsupported: Callable[[KernelCall], str | None]
  run: Callable


def _mosaic_forward_unsupported(call: KernelCall) -> str | None:
  if call.dropout.active:
    return "attention dropout (not in this kernel yet)"
  return mosaic_fwd.unsupported_call(call.dtype, call.head_dim, call.mask_tile,
                                     call.static)


def _mosaic_forward(q, k, v, seq_info, lists, *, call, softmax_scale):
  del seq_info  # the padded layout at full length: every example in place
  return mosaic_fwd.forward(q, k, v, lists, softmax_scale=softmax_scale,
                            rule=call.rule, q_len=call.static.q_len,
                            kv_len=call.static.kv_len)


def _triton_forward(q, k, v, seq_info, lists, *, call, softmax_scale):
  config = triton_configs.forward_config(call.head_dim, call.dtype,
                                         call.mask_tile, call.static.q_span)
  return triton_fwd.forward(
      q, k, v, seq_info, lists, softmax_scale=softmax_scale, rule=call.rule,
      mask_tile=call.mask_tile, config=config, static=call.static,
      dropout=call.dropout, interpret=call.family == "interpret")


def _triton_backward(q, k, v, o, lse, do, dlse, seq_info, forward_lists,
                     backward_lists, *, call, softmax_scale):
  args = (call.head_dim, call.dtype, call.mask_tile)
  return triton_bwd.backward(
      q, k, v, o, lse, do, dlse, seq_info, forward_lists, backward_lists,
      softmax_scale=softmax_scale, rule=call.rule, mask_tile=call.mask_tile,
      dkdv_config=triton_configs.dkdv_config(*args),
      dq_config=triton_configs.dq_config(*args), static=call.static,
      dropout=call.dropout, interpret=call.family == "interpret")


def _always(call: KernelCall) -> None:
  del call


FORWARD = (
    Implementation("mosaic_gpu", ("pallas",), _mosaic_forward_unsupported,
                   _mosaic_forward),
    Implementation("triton", FAMILIES, _always, _triton_forward),
)
BACKWARD = (
    Implementation("triton", FAMILIES, _always, _triton_backward),
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
