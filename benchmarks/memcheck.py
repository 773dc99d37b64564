"""A configuration matrix for NVIDIA's memory checker (compute-sanitizer).

Runs forward and backward of small calls that reach every kernel path: both
kernel families (forward and backward), sequence tails in the last tile, GQA, the packed layout
with uneven sequences, dropout, token rules, fp32/bf16. Run it under the
checker on a GPU:

    XLA_FLAGS=--xla_gpu_autotune_level=0 PYTHONPATH=. compute-sanitizer \\
        --tool memcheck --error-exitcode 3 python benchmarks/memcheck.py

A read or write out of bounds anywhere is a memcheck error (exit code 3).
Each case also checks its result against the fp32 reference, so a kernel that
ran without errors also computed the right thing.
"""

from __future__ import annotations

import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bsattn_jax import (block_sparse_attention, block_sparse_attn_func,
                        create_block_mask, masks)

PADDED = [
    # (B, Sq, Sk, H, Hkv, D, dtype, block, causal, rule); the newest kernel
    # path first (a checker run cut short by its budget still reaches it)
    (2, 197, 131, 4, 2, 64, jnp.bfloat16, (128, 128), True, None),       # Mosaic, row-major copies
    (2, 200, 328, 4, 2, 128, jnp.bfloat16, (128, 128), True, None),      # Mosaic, tails
    (3, 40, 136, 2, 1, 64, jnp.float16, (128, 128), False, None),        # Mosaic, < 1 tile
    (2, 256, 384, 4, 2, 64, jnp.bfloat16, (128, 128), True, None),       # Mosaic fwd + bwd
    (1, 197, 197, 2, 1, 64, jnp.bfloat16, (64, 64), False, None),        # Triton ViT tail
    (2, 300, 260, 2, 2, 80, jnp.float32, (64, 64), True, None),          # padded head dim
    (1, 384, 384, 2, 1, 128, jnp.bfloat16, (128, 128), False,
     masks.sliding_window(100, 150)),                                    # Mosaic + rule
    (2, 250, 250, 3, 1, 32, jnp.float16, (32, 32), False, masks.chunked_causal(50)),
    # the Mosaic forward at 64x64 tiles: tails, and 5 row tiles (the last
    # item has one row) with a rule
    (2, 200, 328, 4, 2, 128, jnp.bfloat16, (64, 64), True, None),
    (2, 320, 200, 4, 2, 64, jnp.float16, (64, 64), False,
     masks.sliding_window(100, 150)),
]
# With dropout (rate 0.2; each example's seed read by every kernel): the
# Mosaic forward and backward with tails (at D=64 also off the 8-row tiles),
# the Mosaic forward at 64x64 tiles.
PADDED_DROPOUT = [
    (3, 577, 197, 2, 1, 64, jnp.float16, (128, 128), False, None),
    (2, 200, 328, 4, 2, 128, jnp.bfloat16, (128, 128), True, None),
    (2, 136, 200, 2, 1, 64, jnp.float16, (64, 64), False, None),
]
DROPOUT_RATE = 0.2


def _rel(a, b) -> float:
  a, b = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (a, b))
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _worst_gradient_error(loss, q, k, v) -> float:
  """Largest relative error of the gradients of `loss(q, k, v, backend)` on
  the default backend against the fp32 reference. Both are jitted: run op
  by op, the reference compiled hundreds of small programs, each slow under
  the checker (a dropout case took minutes)."""
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  grads = grad(q, k, v, "auto")
  refs = grad(*(x.astype(jnp.float32) for x in (q, k, v)), "reference")
  return max(_rel(g, r) for g, r in zip(grads, refs))


def _padded_case(b, sq, sk, h, hkv, d, dtype, block, causal, rule,
                 dropout: float = 0.0) -> float:
  keys = jax.random.split(jax.random.key(sq + sk + d), 4)
  q = jax.random.normal(keys[0], (b, sq, h, d)).astype(dtype)
  k = jax.random.normal(keys[1], (b, sk, hkv, d)).astype(dtype)
  v = jax.random.normal(keys[2], (b, sk, hkv, d)).astype(dtype)
  mask = (create_block_mask(rule, None, None, sq, sk, block_size=block,
                            is_causal=causal) if rule else None)

  def loss(q, k, v, backend):
    out = block_sparse_attention(q, k, v, mask, block_size=block, is_causal=causal,
                                 dropout_rate=dropout, backend=backend,
                                 dropout_rng=jax.random.key(3) if dropout else None)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  return _worst_gradient_error(loss, q, k, v)


def _packed_case(dropout: float) -> float:
  lens = np.array([100, 37, 260, 1])
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
  keys = jax.random.split(jax.random.key(7), 3)
  t = int(cu[-1])
  q, k, v = (jax.random.normal(kk, (t, 3, 64)).astype(jnp.bfloat16) for kk in keys)
  types = jnp.asarray([0, 1, -1], jnp.int32)
  base = jnp.asarray(np.random.default_rng(0).random((4, 1, 3, 3)) < 0.6)
  info = jnp.asarray([0, 0, 0, 0, 1, 1], jnp.int32)
  rng = jax.random.key(1) if dropout else None

  def loss(q, k, v, backend):
    out = block_sparse_attn_func(q, k, v, cu, cu, types, info, base, 260, 260,
                                 dropout, is_causal=True, dropout_rng=rng,
                                 backend=backend)[0]
    return jnp.sum(out.astype(jnp.float32) ** 2)

  return _worst_gradient_error(loss, q, k, v)


def main() -> int:
  worst = 0.0
  # The two lists in turn, so a run cut short has checked the newest paths
  # (first in each list) with and without dropout.
  runs = [run for pair in itertools.zip_longest(
      [(case, 0.0) for case in PADDED],
      [(case, DROPOUT_RATE) for case in PADDED_DROPOUT]) for run in pair if run]
  for case, dropout in runs:
    err = _padded_case(*case, dropout=dropout)
    print(f"padded {case[:6]} {jnp.dtype(case[6]).name} block {case[7]} "
          f"causal={case[8]} rule={case[9]!r} dropout={dropout}: grad rel err "
          f"{err:.2e}", flush=True)
    worst = max(worst, err)
  for dropout in (0.0, 0.2):
    err = _packed_case(dropout)
    print(f"packed mixed heads dropout={dropout}: grad rel err {err:.2e}", flush=True)
    worst = max(worst, err)
  ok = worst < 2e-2
  print(f"{len(PADDED) + len(PADDED_DROPOUT) + 2} cases, worst relative error {worst:.2e}: "
        f"{'ok' if ok else 'FAIL'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
