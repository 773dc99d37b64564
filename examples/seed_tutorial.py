"""Block-Sparse-Attention's ViT tutorial, on JAX arrays.

Each section is a step of the CUDA library's ViT tutorial, written with this
library's `block_sparse_attn_func` (same positional order, packed
`cu_seqlens` layout, `head_mask_type`, `base_blockmask`, block dims):

1. ViT-B/16 at 224 px: 197 tokens, 128 x 128 blocks, every head block-sparse
   with its own mask (`head_mask_type = ones(H)`, one `base_blockmask` head per
   attention head);
2. the same with 192 x 192 blocks;
3. higher resolutions: 384 px (577 tokens) and 512 px (1025 tokens);
4. local window, global + local and strided patterns, with a benchmark table
   (dense vs sparse time per call);
5. the dense-vs-sparse correctness check: an all-ones block mask equals dense
   attention at block sizes 128, 256, 384 and 512.

On a GPU it runs the compiled kernels at the tutorial's sizes (batch 32,
12 heads, bf16); on a CPU the interpreted kernels at small sizes (batch 1,
2 heads, fp32), so the times there say nothing about speed.

    python examples/seed_tutorial.py            # GPU or CPU defaults
    python examples/seed_tutorial.py --batch 2 --heads 4
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bsattn_jax import block_sparse_attn_func, masks

HEAD_DIM = 64
RESOLUTIONS = {224: 197, 384: 577, 512: 1025}     # ViT-B/16: 1 + (px / 16)^2 tokens


def packed_inputs(batch: int, seq_len: int, heads: int, dtype, seed: int = 0):
  """q, k, v `[B * S, H, D]` packed back to back, and `cu_seqlens` `[B + 1]`."""
  keys = jax.random.split(jax.random.key(seed), 3)
  shape = (batch * seq_len, heads, HEAD_DIM)
  q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
  cu_seqlens = jnp.arange(batch + 1, dtype=jnp.int32) * seq_len
  return q, k, v, cu_seqlens


def per_head_mask(pattern: jax.Array, batch: int, heads: int) -> jax.Array:
  """`[B, H, nM, nN]`: one base_blockmask head per attention head."""
  return jnp.broadcast_to(pattern[0, 0], (batch, heads) + pattern.shape[2:])


def attend(q, k, v, cu, base, block, heads, seq_len):
  """The tutorial's call: every head block-sparse with its own mask."""
  out, _, _ = block_sparse_attn_func(
      q, k, v, cu, cu, jnp.ones(heads, jnp.int32), None, base, seq_len, seq_len,
      0.0, False, None, False, False, False, m_block_dim=block, n_block_dim=block)
  return out


def dense(q, k, v, cu, heads, seq_len):
  out, _, _ = block_sparse_attn_func(q, k, v, cu, cu, jnp.zeros(heads, jnp.int32),
                                     None, None, seq_len, seq_len)
  return out


def time_call(fn, *args, repeats: int) -> float:
  """ms per call of a jitted function (median of `repeats`, after a warm-up)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def ascii_rows(pattern: jax.Array) -> list[str]:
  return ["".join("#" if x else "." for x in row) for row in np.asarray(pattern[0, 0])]


def max_abs(a, b) -> float:
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def section_vit_b(args, dtype, block: int) -> None:
  seq_len = RESOLUTIONS[224]
  n = masks.num_blocks(seq_len, block)
  print(f"== ViT-B/16 224px: {seq_len} tokens, {block}x{block} blocks, "
        f"{n}x{n} block grid, head_mask_type = ones({args.heads}) ==")
  q, k, v, cu = packed_inputs(args.batch, seq_len, args.heads, dtype)
  # Each head its own mask: even heads block-diagonal, odd heads global+local.
  even = masks.local(n, n, 0)
  odd = masks.global_local(n, n, num_global=1, window=0)
  heads = jnp.concatenate([even if h % 2 == 0 else odd for h in range(args.heads)],
                          axis=1)
  base = jnp.broadcast_to(heads, (args.batch,) + heads.shape[1:])
  print(f"q/k/v {tuple(q.shape)} {jnp.dtype(dtype).name}, cu_seqlens "
        f"{np.asarray(cu)[:4].tolist()}..., base_blockmask {tuple(base.shape)}, "
        f"density {float(jnp.mean(base)):.3f}")
  for name, pattern in (("even heads", even), ("odd heads", odd)):
    print(f"  {name}: " + " | ".join(ascii_rows(pattern)))
  out = jax.jit(attend, static_argnums=(5, 6, 7))(q, k, v, cu, base, block,
                                                 args.heads, seq_len)
  print(f"output {tuple(out.shape)}, mean |out| {float(jnp.mean(jnp.abs(out))):.4f}, "
        f"finite: {bool(jnp.isfinite(out).all())}\n")


def section_resolutions(args, dtype) -> None:
  print("== Higher resolutions (global + local, 128x128 blocks) ==")
  print(f"{'image':>6} {'tokens':>7} {'blocks':>7} {'density':>8}")
  for px, seq_len in RESOLUTIONS.items():
    n = masks.num_blocks(seq_len, 128)
    pattern = masks.global_local(n, n, num_global=1, window=1)
    print(f"{px:>5}px {seq_len:>7} {n:>3}x{n:<3} {float(jnp.mean(pattern)):>8.3f}")
  print()


def section_patterns(args, dtype) -> None:
  seq_len = args.pattern_tokens
  n = masks.num_blocks(seq_len, 128)
  patterns = {
      "local window": masks.local(n, n, 1),
      "global+local": masks.global_local(n, n, num_global=1, window=1),
      "strided": masks.strided(n, n, 2),
  }
  q, k, v, cu = packed_inputs(args.batch, seq_len, args.heads, dtype, seed=1)
  run = jax.jit(attend, static_argnums=(5, 6, 7))
  dense_ms = time_call(jax.jit(dense, static_argnums=(4, 5)), q, k, v, cu,
                       args.heads, seq_len, repeats=args.repeats)
  print(f"== Patterns at {seq_len} tokens, 128x128 blocks (B={args.batch}, "
        f"H={args.heads}, {jnp.dtype(dtype).name}) ==")
  print(f"{'pattern':<14} {'density':>8} {'ms':>9} {'speedup':>8}")
  print(f"{'dense':<14} {1.0:>8.3f} {dense_ms:>9.3f} {1.0:>8.2f}")
  for name, pattern in patterns.items():
    base = per_head_mask(pattern, args.batch, args.heads)
    ms = time_call(run, q, k, v, cu, base, 128, args.heads, seq_len,
                   repeats=args.repeats)
    print(f"{name:<14} {float(jnp.mean(pattern)):>8.3f} {ms:>9.3f} "
          f"{dense_ms / ms:>8.2f}")
  print()


def section_correctness(args, dtype) -> bool:
  seq_len = args.pattern_tokens
  q, k, v, cu = packed_inputs(args.batch, seq_len, args.heads, dtype, seed=2)
  want = dense(q, k, v, cu, args.heads, seq_len)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  print(f"== Dense vs all-ones block mask at {seq_len} tokens (max abs diff) ==")
  ok = True
  for block in (128, 256, 384, 512):
    n = masks.num_blocks(seq_len, block)
    base = per_head_mask(masks.dense(n, n), args.batch, args.heads)
    got = attend(q, k, v, cu, base, block, args.heads, seq_len)
    diff = max_abs(got, want)
    ok &= diff <= tol
    print(f"block {block:>3}: {diff:.2e} {'ok' if diff <= tol else 'FAIL'}")
  print()
  return ok


def main(argv=None) -> int:
  on_gpu = jax.default_backend() == "gpu"
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32 if on_gpu else 1)
  parser.add_argument("--heads", type=int, default=12 if on_gpu else 2)
  parser.add_argument("--pattern-tokens", type=int, default=1025 if on_gpu else 577,
                      help="tokens of the pattern benchmark and correctness check")
  parser.add_argument("--repeats", type=int, default=20 if on_gpu else 2)
  args = parser.parse_args(argv)
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({'compiled kernels' if on_gpu else 'interpreted kernels: times are not speeds'})\n")
  section_vit_b(args, dtype, 128)
  section_vit_b(args, dtype, 192)
  section_resolutions(args, dtype)
  section_patterns(args, dtype)
  ok = section_correctness(args, dtype)
  print("all checks passed" if ok else "a check FAILED")
  return 0 if ok else 1


if __name__ == "__main__":
  raise SystemExit(main())
