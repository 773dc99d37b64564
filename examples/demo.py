"""bsattn_jax in one screen: ViT-style block masks, a jitted kernel call, a check.

For 197 tokens (224px / 16px patches + class token) and 577 tokens (384px / 16px
+ class token), head dim 64, this builds three block patterns (global+local,
strided, diagonal), turns each into a BlockMask once, runs
`block_sparse_attention` under `jax.jit` (backend 'auto': the compiled Pallas
kernel on a GPU, the same kernel interpreted on CPU) and compares it with the
pure-jnp reference. It ends with a gradient check against the reference.

    python examples/demo.py            # small shapes on CPU, larger on GPU
    python examples/demo.py --batch 4 --heads 8
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bsattn_jax import BlockMask, block_sparse_attention, masks

HEAD_DIM = 64
# (tokens, user block size): 197 tokens in 32-blocks (7 x 7 blocks), 577 tokens
# in 64-blocks (10 x 10 blocks). The last block of each is a partial one.
CONFIGS = ((197, (32, 32)), (577, (64, 64)))


def patterns(n: int) -> dict[str, jax.Array]:
  """Three ViT-style block patterns over an n x n block grid, `[1, 1, n, n]` bool."""
  return {
      # Block 0 holds the class token: it sees, and is seen by, every block.
      "global+local": masks.global_local(n, n, num_global=1, window=1),
      "strided": masks.strided(n, n, stride=3),
      "diagonal": masks.diagonal(n, n, offsets=(-1, 0, 1)),
  }


def ascii_pattern(mask: jax.Array) -> list[str]:
  """Rows of '#' (attend) and '.' (skip) for a `[1, 1, nM, nN]` block mask."""
  grid = np.asarray(mask[0, 0])
  return ["".join("#" if x else "." for x in row) for row in grid]


def rel_err(x: jax.Array, ref: jax.Array) -> float:
  x = jnp.asarray(x, jnp.float32)
  ref = jnp.asarray(ref, jnp.float32)
  return float(jnp.linalg.norm(x - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def main() -> int:
  on_gpu = jax.default_backend() == "gpu"
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8 if on_gpu else 2)
  parser.add_argument("--heads", type=int, default=12 if on_gpu else 4)
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                      default="bfloat16" if on_gpu else "float32")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  B, H, D = args.batch, args.heads, HEAD_DIM

  print(f"JAX {jax.__version__} on {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}); kernel "
        f"{'compiled (Pallas: Triton, Mosaic GPU forward on Hopper)' if on_gpu else 'interpreted (CPU)'}")
  print(f"q, k, v: [B={B}, S, H={H}, D={D}] {dtype.name}; tolerance {tol:g}\n")

  # One jitted function serves every mask of a given size: the BlockMask is a
  # pytree argument, so a new pattern with the same shapes does not recompile.
  attend = jax.jit(block_sparse_attention)
  attend_ref = jax.jit(lambda q, k, v, bm: block_sparse_attention(
      q, k, v, bm, backend="reference"))

  failures = 0
  key = jax.random.PRNGKey(0)
  for seq_len, block_size in CONFIGS:
    key, kq, kk, kv = jax.random.split(key, 4)
    q, k, v = (jax.random.normal(x, (B, seq_len, H, D), jnp.float32)
               for x in (kq, kk, kv))
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    n = masks.num_blocks(seq_len, block_size[0])
    print(f"== {seq_len} tokens, block {block_size[0]}x{block_size[1]} "
          f"({n} x {n} blocks) ==")
    for name, mask in patterns(n).items():
      block_mask = BlockMask.build(mask, seq_len_q=seq_len, block_size=block_size)
      out = jax.block_until_ready(attend(q, k, v, block_mask))  # compiles once per shape
      times = []
      for _ in range(3):
        t0 = time.perf_counter()
        out = jax.block_until_ready(attend(q, k, v, block_mask))
        times.append(time.perf_counter() - t0)
      ms = sorted(times)[1] * 1e3                                # median of 3
      ref = attend_ref(q32, k32, v32, block_mask)
      err = rel_err(out, ref)
      ok = err < tol
      failures += not ok
      density = float(block_mask.density())
      pattern = ascii_pattern(mask)
      print(f"{name:<13} density {density:5.3f}  rel err {err:.2e} "
            f"{'ok' if ok else 'FAIL'}  {ms:8.2f} ms/call")
      for row in pattern:
        print(f"    {row}")
    print()

  # Gradient check: d/d(q, k, v) of <out, cotangent> through the kernel's
  # custom VJP vs autodiff through the reference, on the 577-token global+local mask.
  seq_len, block_size = CONFIGS[-1]
  n = masks.num_blocks(seq_len, block_size[0])
  block_mask = BlockMask.build(patterns(n)["global+local"], seq_len_q=seq_len,
                               block_size=block_size)
  key, kc = jax.random.split(key)
  cot = jax.random.normal(kc, q.shape, jnp.float32)

  def loss(q, k, v, backend):
    out = block_sparse_attention(q, k, v, block_mask, backend=backend)
    return jnp.sum(out.astype(jnp.float32) * cot)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  got = grads(q, k, v, "auto")
  want = grads(q32, k32, v32, "reference")
  errs = [rel_err(g, w) for g, w in zip(got, want)]
  ok = max(errs) < tol
  failures += not ok
  print(f"grad check ({seq_len} tokens, global+local): "
        + "  ".join(f"{n} {e:.2e}" for n, e in zip(("dq", "dk", "dv"), errs))
        + f"  {'ok' if ok else 'FAIL'}")

  print("\nall checks passed" if not failures else f"\n{failures} check(s) FAILED")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
