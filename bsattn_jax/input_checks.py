"""Argument checks shared by the public entry points.

Every failure names the argument, what was expected and what was given; nothing
is broadcast or truncated silently.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import target
from pallas_kernels.registry import MAX_HEAD_DIM

FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
BACKENDS = ("auto", "pallas", "triton", "interpret", "reference")


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, *, seq_axes: int) -> None:
  """q `[..., H, D]`, k/v `[..., Hkv, D]` with `seq_axes` leading axes (2 padded, 1 varlen)."""
  ndim = seq_axes + 2
  layout = "[B, S, H, D]" if seq_axes == 2 else "[T, H, D]"
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != ndim:
      raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {x.shape}")
    if x.dtype not in FLOAT_DTYPES:
      raise TypeError(
          f"{name} must be float16, bfloat16 or float32, got dtype {x.dtype}")
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(
        f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
  if seq_axes == 2 and q.shape[0] != k.shape[0]:
    raise ValueError(
        f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
  head_dim = q.shape[-1]
  if k.shape[-1] != head_dim:
    raise ValueError(
        f"q and k must have the same head dim, got {head_dim} and {k.shape[-1]}")
  if not 1 <= head_dim <= MAX_HEAD_DIM:
    raise ValueError(
        f"head dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
  heads, kv_heads = q.shape[-2], k.shape[-2]
  if kv_heads == 0 or heads % kv_heads:
    raise ValueError(
        f"number of kv heads must divide number of query heads (GQA/MQA), got "
        f"{kv_heads} kv heads for {heads} query heads")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def positive_int(value, name: str, *, or_none: bool = False) -> int | None:
  """`value` as an int >= 1 (None passes when `or_none`); bools are refused."""
  if or_none and value is None:
    return None
  if not _is_int(value) or value < 1:
    raise ValueError(f"{name} must be a positive int{' or None' if or_none else ''}, "
                     f"got {value!r}")
  return int(value)


def non_negative_int(value, name: str) -> int:
  """`value` as an int >= 0; bools are refused."""
  if not _is_int(value) or value < 0:
    raise ValueError(f"{name} must be a non-negative int, got {value!r}")
  return int(value)


def check_backend(backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend in ("pallas", "triton") and not target.compiles_for_gpu():
    raise ValueError(
        f"backend={backend!r} compiles the kernels for a CUDA GPU, but JAX's "
        f"default backend is {jax.default_backend()!r}; use backend='interpret' "
        f"(the same kernels interpreted) or 'auto'")


def softmax_scale_value(softmax_scale, head_dim: int) -> float:
  """The scale as a Python float: `1 / sqrt(head_dim)` for None, else any
  finite nonzero number (Python or numpy scalar, concrete 0-d array). It is a
  compile-time constant of the kernels, so a traced value is refused."""
  if softmax_scale is None:
    return float(head_dim ** -0.5)
  if isinstance(softmax_scale, jax.core.Tracer):
    raise TypeError("softmax_scale must be a static number (it is compiled into "
                    "the kernels), got a traced value; pass it as a Python float")
  numeric = (isinstance(softmax_scale, (int, float, np.number, np.ndarray, jax.Array))
             and not isinstance(softmax_scale, bool))
  if not numeric or jnp.ndim(softmax_scale) != 0 or not (
      jnp.issubdtype(jnp.result_type(softmax_scale), jnp.floating)
      or jnp.issubdtype(jnp.result_type(softmax_scale), jnp.integer)):
    raise TypeError(f"softmax_scale must be a real number or None, got "
                    f"{type(softmax_scale).__name__}")
  value = float(softmax_scale)
  if not np.isfinite(value) or value == 0.0:
    raise ValueError(f"softmax_scale must be finite and nonzero, got {value}")
  return value


def check_block_size(block_size) -> tuple[int, int]:
  """`(m_block_dim, n_block_dim)`, each a positive multiple of 16."""
  if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
      or not all(isinstance(b, (int, np.integer)) for b in block_size)):
    raise TypeError(
        f"block_size must be a pair of ints (m_block_dim, n_block_dim), got {block_size!r}")
  m, n = (int(b) for b in block_size)
  for name, b in (("m_block_dim", m), ("n_block_dim", n)):
    if b <= 0 or b % 16:
      raise ValueError(
          f"block_size {name} must be a positive multiple of 16 (16, 32, 64, 128, "
          f"192, 256, ...), got {b}")
  return m, n


class MaskFnReads(NamedTuple):
  """Which of its scalar arguments a mask_fn reads."""
  batch: bool
  head: bool


def check_mask_fn(mask_fn) -> MaskFnReads:
  """A token predicate the kernels can trace: callable, hashable (it is part
  of a compiled kernel's identity), `(b, h, q_idx, kv_idx) -> bool` on int32
  arrays that broadcast, closing over no arrays (a kernel cannot read them)."""
  if not callable(mask_fn):
    raise TypeError(f"mask_fn must be callable (b, h, q_idx, kv_idx) -> bool, "
                    f"got {type(mask_fn).__name__}")
  try:
    hash(mask_fn)
  except TypeError as e:
    raise TypeError(f"mask_fn must be hashable (it keys the compiled kernel), "
                    f"got an unhashable {type(mask_fn).__name__}") from e
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  try:
    closed = jax.make_jaxpr(mask_fn)(
        scalar, scalar, jax.ShapeDtypeStruct((2, 1), jnp.int32),
        jax.ShapeDtypeStruct((1, 3), jnp.int32))
  except Exception as e:  # the user's function failed: say where
    raise TypeError(
        f"mask_fn must be jnp-traceable as mask_fn(b, h, q_idx, kv_idx) with "
        f"int32 scalars b, h and int32 arrays q_idx [Q, 1], kv_idx [1, K]; "
        f"tracing it raised {type(e).__name__}: {e}") from e
  if closed.consts:
    shapes = ", ".join(f"{jnp.shape(c)} {jnp.result_type(c)}" for c in closed.consts)
    raise ValueError(
        f"mask_fn closes over arrays ({shapes}): the kernels evaluate mask_fn "
        f"inside the GPU kernel, which cannot read captured arrays (traced or "
        f"not). Capture Python numbers instead (e.g. masks.sliding_window(256, "
        f"0)), or express an array-dependent pattern as a block mask")
  (out,) = closed.out_avals
  if out.dtype != jnp.bool_:
    raise TypeError(f"mask_fn must return bool, got {out.dtype}")
  try:
    np.broadcast_shapes(out.shape, (2, 3))
  except ValueError as e:
    raise ValueError(
        f"mask_fn's result must broadcast against q_idx [Q, 1] and kv_idx "
        f"[1, K]; for [2, 1] and [1, 3] it returned shape {out.shape}") from e
  jaxpr = closed.jaxpr
  used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  used |= {id(v) for v in jaxpr.outvars}
  b_var, h_var = jaxpr.invars[:2]
  return MaskFnReads(batch=id(b_var) in used, head=id(h_var) in used)
