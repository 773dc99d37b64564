"""Correctness at benchmark scale: is what we time the right answer?

Two checks per case, relative error `||ours - ref|| / ||ref||` in fp32:

- `slice_vs_reference`: a slice of the case (first 2 examples, 2 heads, full
  length, same mask) against `backend="reference"` computed in fp32: the
  output and, for backward cases, dq, dk, dv (same random cotangent).
- `full_vs_dense_peer` (dense, non-causal masks only): the full-size output and
  gradients against `jax.nn.dot_product_attention` (cuDNN on a GPU, XLA
  elsewhere) on the same bf16 inputs.

A check passes below 2e-2 for fp16/bf16 and 1e-5 for fp32 (DESIGN.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from benchmarks.case_runner import (ours_attend, prebuilt_mask, random_inputs,
                                    with_backward)
from benchmarks.cases import Case
from benchmarks.failures import short_reason
from bsattn_jax import block_sparse_attention

SLICE_BATCH = 2
SLICE_HEADS = 2


def tolerance(dtype: str) -> float:
  return 1e-5 if dtype == "float32" else 2e-2


def _rel_err(out, ref) -> float:
  out, ref = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def _outputs(attend, backward: bool):
  """jit of `(q, k, v, do, *extra) -> (out,)` or `(out, dq, dk, dv)`."""
  def run(q, k, v, do, *extra):
    out = attend(q, k, v, *extra)
    if not backward:
      return (out,)
    return (out,) + tuple(with_backward(attend)(q, k, v, do, *extra))
  return jax.jit(run)


def _compare(name: str, ours, ref, dtype: str, backward: bool) -> dict:
  labels = ("out", "dq", "dk", "dv") if backward else ("out",)
  errors = {label: _rel_err(a, b) for label, a, b in zip(labels, ours, ref)}
  return {"check": name, "rel_err": errors,
          "passed": all(e < tolerance(dtype) for e in errors.values())}


def _slice_case(case: Case) -> Case:
  """The case's first examples and heads; a pattern drawn per head is drawn
  for the sliced heads only."""
  heads = min(case.heads, SLICE_HEADS)
  pattern_args = tuple((name, min(value, heads) if name == "num_heads" else value)
                       for name, value in case.pattern_args)
  return dataclasses.replace(
      case, batch=min(case.batch, SLICE_BATCH), heads=heads,
      kv_heads=max(1, heads * case.hkv // case.heads), pattern_args=pattern_args)


def slice_vs_reference(case: Case, backend: str) -> dict:
  small = _slice_case(case)
  q, k, v, do = random_inputs(small, 1, seed=1)[0]
  block_mask = prebuilt_mask(small)
  ours = _outputs(ours_attend(small, backend), case.backward)(q, k, v, do, block_mask)

  def reference(q, k, v, block_mask):
    return block_sparse_attention(q, k, v, block_mask, softmax_scale=small.softmax_scale,
                                  is_causal=small.causal, backend="reference")

  f32 = lambda x: x.astype(jnp.float32)
  ref = _outputs(reference, case.backward)(f32(q), f32(k), f32(v), f32(do), block_mask)
  result = _compare("slice_vs_reference", ours, ref, case.dtype, case.backward)
  result["shape"] = small.describe()
  return result


def full_vs_dense_peer(case: Case, backend: str) -> dict:
  # cuDNN's backward refuses lengths such as 197 in JAX; XLA takes any length.
  on_gpu = jax.default_backend() == "gpu"
  implementation = "cudnn" if on_gpu and case.seq_len_q % 128 == 0 else "xla"
  q, k, v, do = random_inputs(case, 1, seed=2)[0]
  block_mask = prebuilt_mask(case)
  ours = _outputs(ours_attend(case, backend), case.backward)(q, k, v, do, block_mask)

  def dense(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, scale=case.softmax_scale,
                                        implementation=implementation)

  ref = _outputs(dense, case.backward)(q, k, v, do)
  result = _compare(f"full_vs_{implementation}", ours, ref, case.dtype, case.backward)
  result["shape"] = case.describe()
  return result


def check_case(case: Case, backend: str) -> list[dict]:
  """Both checks that apply to `case`; a check that crashes is a failed result."""
  checks = [slice_vs_reference]
  if case.pattern == "dense" and not case.causal:
    checks.append(full_vs_dense_peer)
  results = []
  for check in checks:
    try:
      result = check(case, backend)
    except Exception as e:
      result = {"check": check.__name__, "passed": False, "error": short_reason(e)}
    result["case"] = case.name
    results.append(result)
  return results
