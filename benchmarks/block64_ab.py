"""The Hopper forward at 64x64 mask tiles (`fwd_block64`) against its references.

On one mask pattern and shape, forward only, device time
(`time_jax_pipelined`, inputs rotated past the L2) and effective TFLOP/s
(4·B·H·S²·D·density, the density of each run's own mask tiles):

- `mosaic128`: the pattern at 128-token blocks, `backend="pallas"` (the 128
  Mosaic forward on Hopper): the bar, fwd_block64 should reach 0.85x of it;
- `mosaic64`: at 64-token blocks, `backend="pallas"` (fwd_block64 on
  Hopper, its defaults; routed there at D=64 too for this comparison,
  where users get the Triton forward: `fwd_block64.ROUTED_HEAD_DIMS`);
- `triton64`: at 64-token blocks, `backend="triton"` (what ran before);
- `mosaic64 sort_rows=False / slots=N`: fwd_block64 called directly with
  adjacent row pairs / another ring depth (A/B of its two knobs).

Each variant's output is checked against the Triton forward on the same
mask (relative error < 2e-2). Writes block64_ab.json and prints a table with
each variant's ratio to `mosaic128`.

  PYTHONPATH=. python benchmarks/block64_ab.py --out $OUT                  # random per head, d=0.1
  PYTHONPATH=. python benchmarks/block64_ab.py --out $OUT --pattern dense --head-dim 64
  PYTHONPATH=. python benchmarks/block64_ab.py --smoke --out /tmp/ab       # CPU, interpreted
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import attention_flops, tflops, time_jax_pipelined
from bsattn_jax import BlockMask, block_sparse_attention, masks
from pallas_kernels.mosaic_gpu import common, fwd_block64

PATTERNS = ("random_heads", "dense", "causal", "local")
TOLERANCE = 2e-2


def user_mask(pattern: str, n: int, heads: int, density: float):
  """`[1, H|1, n, n]` bool blocks of `pattern` (causal: dense blocks, the
  causal rule set by the caller)."""
  if pattern == "random_heads":
    return masks.random(n, n, density, seed=0, num_heads=heads)
  if pattern == "local":       # the band of the density closest to `density`
    window = min(range(n), key=lambda w: abs(
        float(jnp.mean(masks.local(n, n, w))) - density))
    return masks.local(n, n, window)
  return masks.dense(n, n)


def build(args, block: int) -> BlockMask:
  n = -(-args.seq_len // block)
  return BlockMask.build(user_mask(args.pattern, n, args.heads, args.density),
                         seq_len_q=args.seq_len, block_size=(block, block),
                         is_causal=args.pattern == "causal")


def variants(args, backend: str) -> dict:
  """name -> (jitted `(q, k, v) -> o` on [B, S, H, D], its BlockMask)."""
  mask64, mask128 = build(args, 64), build(args, 128)
  scale = args.head_dim ** -0.5
  result = {}

  def api(mask, chosen_backend):
    return jax.jit(lambda q, k, v: block_sparse_attention(
        q, k, v, mask, softmax_scale=scale, backend=chosen_backend))

  result["mosaic128"] = (api(mask128, backend), mask128)
  result["mosaic64"] = (api(mask64, backend), mask64)
  result["triton64"] = (api(mask64, "interpret" if args.smoke else "triton"),
                        mask64)
  knobs = [dict(sort_rows=False)] + [dict(slots=s) for s in args.slots]
  for knob in knobs:
    name = "mosaic64 " + " ".join(f"{k}={v}" for k, v in knob.items())
    extra = dict(interpret=True, num_programs=2) if args.smoke else {}

    def direct(q, k, v, knob=knob, extra=extra):
      flat = lambda x: x.reshape(-1, *x.shape[2:])
      o, _ = fwd_block64.forward(
          flat(q), flat(k), flat(v), mask64.kv_lists, softmax_scale=scale,
          rule=mask64.element_rule, q_len=args.seq_len, kv_len=args.seq_len,
          **knob, **extra)
      return o.reshape(q.shape)
    result[name] = (jax.jit(direct), mask64)
  return result


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="bench_out")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes, kernels interpreted (a CPU check)")
  parser.add_argument("--pattern", choices=PATTERNS, default="random_heads")
  parser.add_argument("--density", type=float, default=0.1)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq-len", type=int, default=8192)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
  parser.add_argument("--slots", type=lambda s: [int(x) for x in s.split(",") if x],
                      default=None, help="ring depths to try besides the default "
                      "(default: 2, and 6 at D=64)")
  parser.add_argument("--iters", type=int, default=20)
  args = parser.parse_args(argv)
  if args.smoke:
    args.batch, args.seq_len, args.heads, args.head_dim = 1, 256, 2, 64
    args.density, args.iters = max(args.density, 0.3), 2
  if args.slots is None:
    args.slots = [2] + ([6] if args.head_dim == 64 else [])
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  fwd_block64.ROUTED_HEAD_DIMS = common.HEAD_DIMS
  backend = "interpret" if args.smoke else "pallas"
  shape = (args.batch, args.seq_len, args.heads, args.head_dim)
  dtype = jnp.dtype(args.dtype)
  sets = []
  for key in jax.random.split(jax.random.key(0), 1 if args.smoke else 3):
    sets.append(tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype)
                      for k in jax.random.split(key, 3)))
  rows = []
  outputs = {}
  for name, (fn, mask) in variants(args, backend).items():
    density = float(mask.density())
    row = dict(variant=name, tile=list(mask.tile), density=density)
    try:
      start = time.perf_counter()
      outputs[name] = np.asarray(jax.block_until_ready(fn(*sets[0])), np.float32)
      row["compile_s"] = time.perf_counter() - start
      ms = time_jax_pipelined(fn, arg_sets=sets, iters=args.iters, warmup=2)
      flops = attention_flops(args.batch, args.heads, args.seq_len, args.seq_len,
                              args.head_dim, density)
      row.update(ms=ms, tflops=tflops(flops, ms))
    except Exception as e:  # one variant failing must not hide the others
      row["error"] = f"{type(e).__name__}: {e}"[:300]
    rows.append(row)
  reference = outputs.get("triton64")
  for row in rows:
    out = outputs.get(row["variant"])
    if reference is not None and out is not None and row["tile"] == [64, 64]:
      row["rel_err_vs_triton64"] = float(
          np.linalg.norm(out - reference) / max(np.linalg.norm(reference), 1e-30))
  bar = next((r.get("tflops") for r in rows if r["variant"] == "mosaic128"), None)
  for row in rows:
    if bar and row.get("tflops"):
      row["x_mosaic128"] = row["tflops"] / bar
  os.makedirs(args.out, exist_ok=True)
  summary = dict(args=vars(args), device=str(jax.devices()[0].device_kind),
                 rows=rows)
  with open(os.path.join(args.out, "block64_ab.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"{args.pattern} density {args.density} B={args.batch} S={args.seq_len} "
        f"H={args.heads} D={args.head_dim} {args.dtype} on {summary['device']}")
  print(f"{'variant':28s} {'tile':>7} {'density':>8} {'ms':>8} {'TFLOP/s':>8} "
        f"{'x128':>6} {'err':>8}")
  failed = False
  for r in rows:
    if "error" in r:
      failed = True
      print(f"{r['variant']:28s} failed: {r['error']}")
      continue
    err = r.get("rel_err_vs_triton64")
    failed |= err is not None and not err < TOLERANCE
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    print(f"{r['variant']:28s} {'x'.join(map(str, r['tile'])):>7} "
          f"{r['density']:8.3f} {r['ms']:8.3f} {fmt(r.get('tflops'), '.1f'):>8} "
          f"{fmt(r.get('x_mosaic128'), '.3f'):>6} {fmt(err, '.1e'):>8}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
