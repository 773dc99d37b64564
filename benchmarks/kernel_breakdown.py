"""Where a case's forward + backward (or `--forward`: its forward alone) spends
its device time, kernel by kernel.

The suite times whole calls; to decide what to make faster one needs each
launch's share: our kernels, and the XLA fusions around them (the backward's
`rowsum(dO * O)`, padding of the statistics, layout copies). This runs each
case's jitted forward + backward `--iters` times under `jax.profiler`, sums
every GPU kernel's duration by name and prints them, largest first, as
microseconds per call, with their total against the pipelined time of the
same call. Where the total falls short of the pipelined time the device sat
idle between launches; the idle stretches are summed by the pair of
launches around them (which kernel ended, which one started next), so the
launch that makes the device wait is named. Writes kernel_breakdown.json.

  PYTHONPATH=. python benchmarks/kernel_breakdown.py --out $OUT --cases vit_b_s197
  PYTHONPATH=. python benchmarks/kernel_breakdown.py --forward --out $OUT --cases block64
  PYTHONPATH=. python benchmarks/kernel_breakdown.py --smoke --out /tmp/kb   # CPU
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

import jax

from benchmarks.case_runner import (prebuilt_mask, random_inputs, ours_attend,
                                    with_backward)
from benchmarks.cases import BENCHMARK_CASES, SMOKE_CASES, select
from benchmarks.timing import time_jax_pipelined
from benchmarks.trace_events import gpu_events, gpu_lines

NAME_WIDTH = 60
GAP_NAME_WIDTH = 40
# Idle stretches shorter than this are the ordinary launch-to-launch spacing.
MIN_GAP_NS = 2_000


def kernel_times(trace_dir: str) -> dict[str, float]:
  """Total microseconds per GPU kernel name over the whole trace."""
  totals: dict[str, float] = collections.defaultdict(float)
  for event in gpu_events(trace_dir):
    totals[event.name] += event.duration_ns / 1e3
  return dict(totals)


def idle_gaps(trace_dir: str) -> dict[str, float]:
  """Total idle microseconds on each stream between consecutive launches,
  by "ended kernel -> next kernel"; stretches under MIN_GAP_NS are left out."""
  totals: dict[str, float] = collections.defaultdict(float)
  for line_name, events in gpu_lines(trace_dir):
    if not line_name.startswith("Stream"):
      continue
    events.sort(key=lambda e: e.start_ns)
    for before, after in zip(events, events[1:]):
      idle = after.start_ns - before.end_ns
      if idle >= MIN_GAP_NS:
        totals[f"{before.name[:GAP_NAME_WIDTH]} -> {after.name[:GAP_NAME_WIDTH]}"] += idle / 1e3
  return dict(totals)


def breakdown(case, backend: str, iters: int, forward_only: bool = False) -> dict:
  """Per-call microseconds of each kernel of `case`'s forward + backward (or
  of its forward alone)."""
  q, k, v, do = random_inputs(case, 1)[0]
  mask = prebuilt_mask(case)
  if forward_only:
    call, args = jax.jit(ours_attend(case, backend)), (q, k, v, mask)
  else:
    call, args = jax.jit(with_backward(ours_attend(case, backend))), (q, k, v, do, mask)
  jax.block_until_ready(call(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(iters):
        out = call(*args)
      jax.block_until_ready(out)
    per_call = {name: us / iters for name, us in kernel_times(trace_dir).items()}
    gaps = {pair: us / iters for pair, us in idle_gaps(trace_dir).items()}
  pipelined_ms = time_jax_pipelined(call, *args)
  return dict(case=case.name, backend=backend,
              mode="fwd" if forward_only else "fwd+bwd",
              pipelined_us=1e3 * pipelined_ms,
              kernels_us=dict(sorted(per_call.items(), key=lambda kv: -kv[1])),
              idle_us=dict(sorted(gaps.items(), key=lambda kv: -kv[1])))


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="bench_out")
  parser.add_argument("--cases", default="vit_b_s197",
                      help="comma-separated name globs/substrings of backward cases")
  parser.add_argument("--backends", default="pallas",
                      help="comma-separated block_sparse_attention backends")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--forward", action="store_true",
                      help="the forward call alone, not forward + backward")
  parser.add_argument("--smoke", action="store_true", help="CPU run of smoke_dense, interpreted")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  cases = [c for c in (select(SMOKE_CASES, "smoke_dense") if args.smoke
                       else select(BENCHMARK_CASES, args.cases)) if c.backward]
  if not cases:
    raise SystemExit(f"--cases {args.cases!r}: no backward case matches")
  backends = ["interpret"] if args.smoke else args.backends.split(",")
  rows = [breakdown(case, backend, 2 if args.smoke else args.iters, args.forward)
          for case in cases for backend in backends]
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "kernel_breakdown.json"), "w") as f:
    json.dump(dict(device=str(jax.devices()[0]), rows=rows), f, indent=1)
  for row in rows:
    total = sum(row["kernels_us"].values())
    print(f"\n{row['case']} [{row['backend']}] {row['mode']}: kernels {total:.1f} us, "
          f"pipelined {row['pipelined_us']:.1f} us")
    for name, us in row["kernels_us"].items():
      print(f"  {us:9.1f} us {100 * us / total if total else 0:5.1f}%  "
            f"{name[:NAME_WIDTH]}")
    print(f"  idle between launches: {sum(row['idle_us'].values()):.1f} us")
    for pair, us in list(row["idle_us"].items())[:8]:
      print(f"  {us:9.1f} us  {pair}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
