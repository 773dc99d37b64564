"""What the Block-Sparse-Attention-compatible API costs beside the padded one.

Three comparisons, each timed side by side in one process (device time, JAX
calls back to back):

- packed: `block_sparse_attn_func` on B sequences packed back to back vs
  `block_sparse_attention` on the same data padded (ViT-B: 197 tokens);
- dropout: forward+backward with `p_dropout=0.1` vs without;
- mixed: a third of the heads dense, a third block-sparse, a third block
  streaming in one call vs the same tiles given as one block-sparse mask.

    PYTHONPATH=. python benchmarks/seed_api_bench.py --out $OUT
    PYTHONPATH=. python benchmarks/seed_api_bench.py --smoke --out /tmp/x   # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import time_jax_pipelined
from bsattn_jax import block_sparse_attention, block_sparse_attn_func, masks
from bsattn_jax.head_mask_types import head_type_block_mask


def _inputs(batch, seq_len, heads, head_dim, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (batch * seq_len, heads, head_dim)
  q, k, v, do = (jax.random.normal(key, shape, jnp.float32).astype(dtype)
                 for key in keys)
  cu = jnp.arange(batch + 1, dtype=jnp.int32) * seq_len
  return q, k, v, do, cu


def _train(fn):
  """fwd+bwd of `fn(q, k, v) -> out` with a fixed cotangent."""
  def step(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)
  return jax.jit(step)


def _time(fn, *args, iters):
  return time_jax_pipelined(fn, *args, iters=iters)


def packed_vs_padded(batch, seq_len, heads, head_dim, dtype, iters) -> dict:
  q, k, v, do, cu = _inputs(batch, seq_len, heads, head_dim, dtype)
  types = jnp.zeros(heads, jnp.int32)
  packed = lambda q, k, v: block_sparse_attn_func(
      q, k, v, cu, cu, types, None, None, seq_len, seq_len)[0]
  pad = lambda x: x.reshape(batch, seq_len, heads, head_dim)
  padded = lambda q, k, v: block_sparse_attention(
      pad(q), pad(k), pad(v)).reshape(q.shape)
  row = dict(case=f"packed vs padded B={batch} S={seq_len} H={heads} D={head_dim}")
  for name, fn in (("packed", packed), ("padded", padded)):
    row[f"{name}_fwd_ms"] = _time(jax.jit(fn), q, k, v, iters=iters)
    row[f"{name}_fwd_bwd_ms"] = _time(_train(fn), q, k, v, do, iters=iters)
  row["ratio_fwd"] = row["packed_fwd_ms"] / row["padded_fwd_ms"]
  row["ratio_fwd_bwd"] = row["packed_fwd_bwd_ms"] / row["padded_fwd_bwd_ms"]
  return row


def dropout_cost(batch, seq_len, heads, head_dim, dtype, iters) -> dict:
  q, k, v, do, cu = _inputs(batch, seq_len, heads, head_dim, dtype)
  types = jnp.zeros(heads, jnp.int32)
  rng = jax.random.key(1)
  row = dict(case=f"dropout 0.1 B={batch} S={seq_len} H={heads} D={head_dim}")
  for name, rate in (("no_dropout", 0.0), ("dropout", 0.1)):
    fn = lambda q, k, v, rate=rate: block_sparse_attn_func(
        q, k, v, cu, cu, types, None, None, seq_len, seq_len, rate,
        dropout_rng=rng if rate else None)[0]
    row[f"{name}_fwd_ms"] = _time(jax.jit(fn), q, k, v, iters=iters)
    row[f"{name}_fwd_bwd_ms"] = _time(_train(fn), q, k, v, do, iters=iters)
  row["ratio_fwd"] = row["dropout_fwd_ms"] / row["no_dropout_fwd_ms"]
  row["ratio_fwd_bwd"] = row["dropout_fwd_bwd_ms"] / row["no_dropout_fwd_bwd_ms"]
  return row


def mixed_vs_one_mask(batch, seq_len, heads, head_dim, dtype, iters) -> dict:
  """Mixed head types vs the same tiles given as one block-sparse mask per
  head (`head_mask_type = ones(H)`), both through `block_sparse_attn_func`."""
  q, k, v, do, cu = _inputs(batch, seq_len, heads, head_dim, dtype)
  third = heads // 3
  types = np.asarray([0] * (heads - 2 * third) + [1] * third + [-1] * third, np.int32)
  n = masks.num_blocks(seq_len, 128)
  base = masks.random(n, n, 0.3, seed=2, num_heads=third, batch=batch)
  info = np.asarray([1, 3] * heads, np.int32)
  lens = jnp.full((batch,), seq_len, jnp.int32)
  tiles = head_type_block_mask(types, info, base, num_heads=heads, q_lens=lens,
                               kv_lens=lens, max_seqlen_q=seq_len,
                               max_seqlen_k=seq_len, block_size=(128, 128),
                               is_causal=True, exact_streaming=False).to_dense()
  calls = {
      "mixed": lambda q, k, v: block_sparse_attn_func(
          q, k, v, cu, cu, types, info, base, seq_len, seq_len, is_causal=True)[0],
      "one_mask": lambda q, k, v: block_sparse_attn_func(
          q, k, v, cu, cu, np.ones(heads, np.int32), None, tiles, seq_len, seq_len,
          is_causal=True)[0],
  }
  row = dict(case=f"mixed heads vs one mask B={batch} S={seq_len} H={heads} "
                  f"D={head_dim} causal", density=float(jnp.mean(tiles)))
  for name, fn in calls.items():
    row[f"{name}_fwd_ms"] = _time(jax.jit(fn), q, k, v, iters=iters)
    row[f"{name}_fwd_bwd_ms"] = _time(_train(fn), q, k, v, do, iters=iters)
  row["ratio_fwd"] = row["mixed_fwd_ms"] / row["one_mask_fwd_ms"]
  row["ratio_fwd_bwd"] = row["mixed_fwd_bwd_ms"] / row["one_mask_fwd_bwd_ms"]
  return row


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
  args = parser.parse_args(argv)
  if args.smoke:
    shapes = dict(packed=(2, 80, 2, 32), dropout=(1, 128, 2, 32), mixed=(1, 256, 3, 32))
    dtype, iters = jnp.float32, 2
  else:
    shapes = dict(packed=(256, 197, 12, 64), dropout=(2, 4096, 16, 128),
                  mixed=(2, 8192, 12, 128))
    dtype, iters = jnp.bfloat16, 20
  rows = [packed_vs_padded(*shapes["packed"], dtype, iters),
          dropout_cost(*shapes["packed"], dtype, iters),
          dropout_cost(*shapes["dropout"], dtype, iters),
          mixed_vs_one_mask(*shapes["mixed"], dtype, iters)]
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "seed_api_bench.json"), "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind, rows=rows), f, indent=1)
  print(f"seed-compatible API on {jax.devices()[0].device_kind} (ms, device time)")
  for r in rows:
    times = "  ".join(f"{k[:-3]} {v:.3f}" for k, v in r.items() if k.endswith("_ms"))
    print(f"{r['case']}: {times}  ratio fwd {r['ratio_fwd']:.3f} "
          f"fwd+bwd {r['ratio_fwd_bwd']:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
