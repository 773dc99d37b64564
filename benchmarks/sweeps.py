"""Both tutorial sweeps in one process, sharing one budget.

What `gpu_suite.py --extras sweeps` runs: `block_size_sweep.py` (the ViT
pattern at user blocks 64..512 and 197..4096 tokens: 16 cases), then
`pattern_sweep.py` (every pattern at densities 0.05..0.5 and dense, S=4096:
21 cases), each with its peers (cuDNN, XLA, FlexAttention, ...) and its
outputs (.json, .md, .png) in --out. The first gets the share of the budget
its cases make of the total, the second what is left then (what the first
did not use included); cases that no longer fit are recorded as skipped in
their sweep's JSON.

Compiling dominates a case (ours, the JAX peers, a torch.compile of
FlexAttention per case), so the timing loops are shorter than the sweeps'
own defaults: --warmup 2 --iters 10 --max-seconds 1 (the pipelined timer
still fills rounds of at least 50 ms).

  PYTHONPATH=. python benchmarks/sweeps.py --out $OUT --budget 270
  PYTHONPATH=. python benchmarks/sweeps.py --smoke --out /tmp/sweeps   # CPU

Exit code 0 when both sweeps ran to the end (skipped cases included), 1 when
one raised.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from benchmarks import block_size_sweep, pattern_sweep
from benchmarks import peers as peer_lib
from benchmarks.cases import block_size_cases, pattern_cases

SWEEPS = (block_size_sweep, pattern_sweep)


def case_counts(smoke: bool) -> list[int]:
  """Cases of each sweep in `SWEEPS` at its defaults (or smoke sizes)."""
  if smoke:
    return [len(block_size_cases(**block_size_sweep.SMOKE)),
            len(pattern_cases(**pattern_sweep.SMOKE))]
  return [len(block_size_cases()), len(pattern_cases())]


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
  parser.add_argument("--budget", type=float, default=300.0,
                      help="seconds for both sweeps")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes, kernels interpreted (a CPU check)")
  parser.add_argument("--no-peers", action="store_true", help="time only bsattn")
  parser.add_argument("--peers", type=peer_lib.peer_names_arg, default=(),
                      help="comma-separated peers to time (default: all)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--max-seconds", type=float, default=1.0)
  parser.add_argument("--compile-workers", type=int, default=8)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  start = time.perf_counter()
  counts = case_counts(args.smoke)
  common = ["--out", args.out, "--warmup", str(args.warmup), "--iters",
            str(args.iters), "--max-seconds", str(args.max_seconds),
            "--compile-workers", str(args.compile_workers)]
  common += ["--no-peers"] * args.no_peers + ["--smoke"] * args.smoke
  common += ["--peers", ",".join(args.peers)] * bool(args.peers)
  failed = []
  for i, sweep in enumerate(SWEEPS):
    left = args.budget - (time.perf_counter() - start)
    share = left * counts[i] / sum(counts[i:])
    print(f"=== {sweep.NAME}: {counts[i]} cases, {share:.0f} s of the "
          f"{left:.0f} s left ===", flush=True)
    try:
      code = sweep.main(common + ["--budget", f"{share:.1f}"])
    except Exception:  # the other sweep still runs
      traceback.print_exc()
      code = 1
    if code:
      failed.append(sweep.NAME)
  print(f"sweeps: {time.perf_counter() - start:.0f} s; "
        f"{'failed: ' + ', '.join(failed) if failed else 'both ran'}; "
        f"outputs in {args.out}", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
