"""Gradient check: the kernel's dq, dk, dv against autodiff through the reference.

For every combination of head dim (64, 80, 128), dtype (fp32, bf16), causal
(off, on) and head layout (MHA, GQA), and random block masks at several
densities, this computes the gradients of `<out, cotangent>` (random
cotangent) through `block_sparse_attention` (backend 'auto': the compiled kernel
on a GPU, the interpreted one on CPU) and through the pure-jnp reference in fp32
on the same (dtype-rounded) inputs, and prints `||g - g_ref|| / ||g_ref||` per
tensor. Tolerances: fp32 < 1e-5, bf16 < 2e-2. Exit code 1 if any check fails.

    python examples/grad_check.py
    python examples/grad_check.py --seq-len 1024 --batch 2 --heads 8 --ragged
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import jax
import jax.numpy as jnp

from bsattn_jax import BlockMask, block_sparse_attention, masks

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def rel_err(x: jax.Array, ref: jax.Array) -> float:
  x = x.astype(jnp.float32)
  ref = ref.astype(jnp.float32)
  ref_norm = jnp.linalg.norm(ref)
  # An all-zero reference gradient (e.g. an empty mask) must be matched exactly.
  denom = jnp.where(ref_norm > 0, ref_norm, 1.0)
  return float(jnp.linalg.norm(x - ref) / denom)


def grads_fn(backend: str):
  """jitted (q, k, v, cotangent, block_mask) -> (dq, dk, dv)."""

  def loss(q, k, v, cot, block_mask):
    out = block_sparse_attention(q, k, v, block_mask, backend=backend)
    return jnp.sum(out.astype(jnp.float32) * cot)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq-len", type=int, default=197,
                      help="query length (default 197: a ViT-B/16 sequence)")
  parser.add_argument("--kv-seq-len", type=int, default=None,
                      help="key/value length (default: --seq-len)")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4,
                      help="query heads; GQA cases use heads // 2 kv heads")
  parser.add_argument("--block-size", type=int, default=64,
                      help="user block size (multiple of 16)")
  parser.add_argument("--densities", type=float, nargs="+",
                      default=(0.1, 0.5, 1.0))
  parser.add_argument("--head-dims", type=int, nargs="+", default=(64, 80, 128))
  parser.add_argument("--dtypes", nargs="+", choices=tuple(TOLERANCE),
                      default=tuple(TOLERANCE))
  parser.add_argument("--ragged", action="store_true",
                      help="random real lengths per example (q_seqlens/kv_seqlens)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  seq_q = args.seq_len
  seq_kv = args.kv_seq_len or args.seq_len
  B, H = args.batch, args.heads
  kv_head_options = sorted({H, max(1, H // 2)}, reverse=True)
  block = (args.block_size, args.block_size)
  n_m, n_n = masks.num_blocks(seq_q, block[0]), masks.num_blocks(seq_kv, block[1])

  print(f"JAX {jax.__version__} on {jax.default_backend()}; "
        f"B={B} Sq={seq_q} Sk={seq_kv} H={H} block={block[0]} "
        f"({n_m} x {n_n} blocks){' ragged' if args.ragged else ''}")
  header = (f"{'dtype':<9}{'D':>4}{'causal':>7}{'H/Hkv':>7}{'density':>8}"
            f"{'dq':>10}{'dk':>10}{'dv':>10}   result")
  print(header)
  print("-" * len(header))

  kernel_grads = grads_fn("auto")
  reference_grads = grads_fn("reference")
  key = jax.random.PRNGKey(args.seed)
  failures = total = 0
  t_start = time.perf_counter()
  cases = itertools.product(args.dtypes, args.head_dims, (False, True),
                            kv_head_options)
  for case_id, (dtype_name, D, causal, Hkv) in enumerate(cases):
    dtype = jnp.dtype(dtype_name)
    tol = TOLERANCE[dtype_name]
    for density_id, density in enumerate(args.densities):
      key, kq, kk, kv, kc, kl = jax.random.split(key, 6)
      q = jax.random.normal(kq, (B, seq_q, H, D), jnp.float32).astype(dtype)
      k = jax.random.normal(kk, (B, seq_kv, Hkv, D), jnp.float32).astype(dtype)
      v = jax.random.normal(kv, (B, seq_kv, Hkv, D), jnp.float32).astype(dtype)
      cot = jax.random.normal(kc, (B, seq_q, H, D), jnp.float32)
      # A different random pattern per example and head.
      mask_seed = (args.seed * 1000 + case_id) * 100 + density_id
      mask = masks.random(n_m, n_n, density, seed=mask_seed, num_heads=H, batch=B)
      lengths = {}
      if args.ragged:
        kq_len, kkv_len = jax.random.split(kl)
        lengths = dict(
            q_seqlens=jax.random.randint(kq_len, (B,), 1, seq_q + 1),
            kv_seqlens=jax.random.randint(kkv_len, (B,), 1, seq_kv + 1))
      block_mask = BlockMask.build(mask, seq_len_q=seq_q, seq_len_kv=seq_kv,
                                   block_size=block, is_causal=causal, **lengths)

      got = kernel_grads(q, k, v, cot, block_mask)
      f32 = lambda x: x.astype(jnp.float32)
      want = reference_grads(f32(q), f32(k), f32(v), cot, block_mask)
      errs = [rel_err(g, w) for g, w in zip(got, want)]
      finite = all(bool(jnp.all(jnp.isfinite(g))) for g in got)
      ok = finite and max(errs) < tol
      total += 1
      failures += not ok
      verdict = "ok" if ok else ("FAIL (non-finite)" if not finite else
                                 f"FAIL (tol {tol:g})")
      print(f"{dtype_name:<9}{D:>4}{'yes' if causal else 'no':>7}"
            f"{f'{H}/{Hkv}':>7}{density:>8.2f}"
            + "".join(f"{e:>10.2e}" for e in errs) + f"   {verdict}", flush=True)

  elapsed = time.perf_counter() - t_start
  print(f"\n{total - failures} passed, {failures} failed "
        f"({elapsed:.1f} s; tolerances fp32 < 1e-5, bf16 < 2e-2)")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
