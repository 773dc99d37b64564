"""Shared-memory estimates against what the compiled kernels launch with (GPU).

`bsattn_jax.smem_estimate` models what Triton's pipeliner allocates (and
counts the Hopper kernels' allocation exactly); only a GPU run shows what the
compiled kernels really take. For calls that together launch every entry of
the Triton launch table (head dims 64/128/256, fp16/bf16 and fp32, 128- and
64-wide blocks, short and long sequences) and, on Hopper, the Mosaic GPU
forward (at 128- and 64-wide blocks), dK/dV and dQ, this runs forward + backward
once under `jax.profiler`, reads each
kernel launch's static and dynamic shared memory from the trace (the GPU
tracer's kernel details), and compares them with the estimate for the config
the launch table chose. Writes smem_check.json, prints a table, and exits 1
when an estimate is more than 10% off (the bar the estimates are held to).

  PYTHONPATH=. python benchmarks/smem_check.py --out $OUT
  PYTHONPATH=. python benchmarks/smem_check.py --smoke --out /tmp/smem  # CPU: no launches to read
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from benchmarks.trace_events import gpu_events
from bsattn_jax import block_sparse_attention
from pallas_kernels import target
from pallas_kernels.block_lists import mask_tile_for_block
from pallas_kernels.mosaic_gpu import bwd as mosaic_bwd
from pallas_kernels.mosaic_gpu import fwd as mosaic_fwd
from pallas_kernels.mosaic_gpu.common import HEAD_DIMS as MOSAIC_HEAD_DIMS
from pallas_kernels.mosaic_gpu import fwd_block64 as mosaic_fwd64
from pallas_kernels.triton import configs

TOLERANCE = 0.10
# Kernel names in the trace: the Triton calls' `name`s, and the Mosaic GPU
# kernels (symbols ending in "_mosaic_gpu": the backward's named, the
# forward's "body").
TRITON_KERNELS = {"bsattn_forward": "forward", "bsattn_dkdv": "dkdv",
                  "bsattn_dq": "dq"}
MOSAIC_BACKWARD_KERNELS = {mosaic_bwd.DKDV_KERNEL: "mosaic_dkdv",
                           mosaic_bwd.DQ_KERNEL: "mosaic_dq"}
MOSAIC_MARK = "mosaic_gpu"
LONG = 4096


def calls(smoke: bool) -> list[dict]:
  """The (head dim, dtype, block, length, backend) calls to profile."""
  if smoke:
    return [dict(head_dim=32, dtype="float32", block=64, seq_len=128,
                 backend="interpret")]
  result = []
  for head_dim in (64, 128, 256):
    for dtype in ("bfloat16", "float32"):
      for block in (128, 64):
        lengths = (1024, LONG) if (head_dim, dtype, block) == (64, "bfloat16", 128) \
            else (1024,)
        for seq_len in lengths:
          result.append(dict(head_dim=head_dim, dtype=dtype, block=block,
                             seq_len=seq_len, backend="triton"))
  for head_dim in MOSAIC_HEAD_DIMS:
    for block in (128, 64):
      result.append(dict(head_dim=head_dim, dtype="bfloat16", block=block,
                         seq_len=1024, backend="pallas"))
  return result


def launches(trace_dir: str) -> list[tuple[str, int | None, list[str]]]:
  """(kernel name, static + dynamic shared memory bytes or None, its stat
  names) of every GPU kernel launch in the trace."""
  found = []
  for event in gpu_events(trace_dir):
    stats = list(event.stats)
    text = " ".join(str(value) for _, value in stats)
    sizes = [re.search(rf"{kind}_shared:(\d+)", text)
             for kind in ("static", "dynamic")]
    used = sum(int(m.group(1)) for m in sizes if m) if any(sizes) else None
    found.append((event.name, used, [name for name, _ in stats]))
  return found


def _kernel_of(name: str) -> str | None:
  for mark, kernel in {**TRITON_KERNELS, **MOSAIC_BACKWARD_KERNELS}.items():
    if mark in name:
      return kernel
  return "mosaic_forward" if MOSAIC_MARK in name else None


def estimate(kernel: str, call: dict, gpu: target.Gpu | None) -> tuple[int, str]:
  """(bytes, config) the library expects for `kernel` in `call`."""
  dtype, head_dim = jnp.dtype(call["dtype"]), call["head_dim"]
  if kernel == "mosaic_forward" and call["block"] % 128:
    return mosaic_fwd64.shared_memory_bytes(head_dim, dtype), "64x64 ws"
  if kernel == "mosaic_forward":
    return mosaic_fwd.shared_memory_bytes(head_dim, dtype), "128x128 ws"
  if kernel in MOSAIC_BACKWARD_KERNELS.values():
    return (mosaic_bwd.shared_memory_bytes(kernel.removeprefix("mosaic_"),
                                           head_dim, dtype), "128x128 ws")
  tile = (mask_tile_for_block(call["block"]),) * 2
  capability = gpu.compute_capability if gpu else target.HOPPER
  cfg = configs.launch_config(kernel, head_dim, dtype, tile, call["seq_len"])
  return configs.smem_bytes(kernel, cfg, head_dim, dtype, capability), cfg.name


def profile_call(call: dict, trace_dir: str) -> list[tuple[str, int | None, list[str]]]:
  """Forward + backward of `call` once (compiled first), traced."""
  shape = (1, call["seq_len"], 2, call["head_dim"])
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(key, shape, jnp.dtype(call["dtype"])) for key in keys)
  block = (call["block"],) * 2

  def loss(q, k, v):
    out = block_sparse_attention(q, k, v, block_size=block, backend=call["backend"])
    return jnp.sum(out.astype(jnp.float32))
  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  jax.block_until_ready(step(q, k, v))
  with jax.profiler.trace(trace_dir):
    jax.block_until_ready(step(q, k, v))
  return launches(trace_dir)


def check(call: dict, gpu: target.Gpu | None) -> list[dict]:
  """One row per kernel launched by `call`: estimate, measured, deviation."""
  with tempfile.TemporaryDirectory() as trace_dir:
    measured = profile_call(call, trace_dir)
  rows = []
  for name, used, stat_names in measured:
    kernel = _kernel_of(name)
    if kernel is None:
      continue
    bytes_, config = estimate(kernel, call, gpu)
    row = dict(call, kernel=kernel, config=config, estimate=bytes_, measured=used,
               deviation=(bytes_ - used) / used if used else None)
    if used is None:   # what the trace offers instead, to adapt the parser
      row["stats"] = stat_names
    rows.append(row)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="bench_out")
  parser.add_argument("--smoke", action="store_true", help="tiny CPU run")
  parser.add_argument("--budget", type=float, default=540.0, help="seconds")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  gpu = target.default_gpu()
  rows, skipped = [], []
  for call in calls(args.smoke):
    if time.perf_counter() - start > args.budget:
      skipped.append(call)
      continue
    try:
      rows += check(call, gpu)
    except Exception as e:  # one call failing must not hide the others
      rows.append(dict(call, kernel="?", error=f"{type(e).__name__}: {e}"[:300]))
  off = [r for r in rows if r.get("deviation") is not None
         and abs(r["deviation"]) > TOLERANCE]
  summary = dict(device=gpu.describe() if gpu else "no GPU", rows=rows,
                 skipped=skipped, tolerance=TOLERANCE, off=len(off))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "smem_check.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"shared memory per program on {summary['device']}: estimate vs launch")
  print(f"{'kernel':15s} {'D':>4} {'dtype':9s} {'block':>5} {'S':>5} {'config':11s} "
        f"{'estimate':>9} {'measured':>9} {'dev':>6}")
  for r in rows:
    if "error" in r:
      print(f"{r['kernel']:15s} {r['head_dim']:>4} {r['dtype']:9s} failed: {r['error']}")
      continue
    dev = f"{100 * r['deviation']:+.0f}%" if r["deviation"] is not None else "-"
    print(f"{r['kernel']:15s} {r['head_dim']:>4} {r['dtype']:9s} {r['block']:>5} "
          f"{r['seq_len']:>5} {r['config']:11s} {r['estimate']:>9} "
          f"{str(r['measured']):>9} {dev:>6}")
  if not any(r.get("measured") for r in rows):
    print("no kernel launch reported its shared memory (no GPU, or the trace "
          "names it differently: see 'stats' in smem_check.json)")
  print(f"{len(off)} estimate(s) off by more than {TOLERANCE:.0%}; "
        f"{len(skipped)} call(s) skipped for time")
  return 1 if off else 0


if __name__ == "__main__":
  sys.exit(main())
