"""Argument checks shared by the public entry points.

Every failure names the argument, what was expected and what was given; nothing
is broadcast or truncated silently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.tiles import SUPPORTED_HEAD_DIMS_MAX

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
  if not 1 <= head_dim <= SUPPORTED_HEAD_DIMS_MAX:
    raise ValueError(
        f"head dim must be in 1..{SUPPORTED_HEAD_DIMS_MAX}, got {head_dim}")
  heads, kv_heads = q.shape[-2], k.shape[-2]
  if kv_heads == 0 or heads % kv_heads:
    raise ValueError(
        f"number of kv heads must divide number of query heads (GQA/MQA), got "
        f"{kv_heads} kv heads for {heads} query heads")


def check_backend(backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_softmax_scale(softmax_scale) -> None:
  if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
    raise TypeError(
        f"softmax_scale must be a Python float or None, got {type(softmax_scale).__name__}")
