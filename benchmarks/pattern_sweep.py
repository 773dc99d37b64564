"""The tutorial's pattern benchmark: every block pattern across densities.

Local window, global + local, strided, diagonals spread over the mask and
random blocks, each at block densities 0.05, 0.1, 0.25 and 0.5 (the
pattern's parameter reaching the closest density), plus the dense mask (1.0);
S=4096, B=2, H=16, D=128, bf16, block 128, forward, against the peers on the
same mask (cuDNN and XLA dense, FlexAttention with the same block mask,
tokamax dense). Writes pattern_sweep.json, .md (every measurement) and
pattern_sweep.png (forward time and effective TFLOP/s vs density).

  PYTHONPATH=. python benchmarks/pattern_sweep.py --out $OUT
  PYTHONPATH=. python benchmarks/pattern_sweep.py --patterns local,random --densities 0.1,0.5
  PYTHONPATH=. python benchmarks/pattern_sweep.py --smoke --out /tmp/sweep   # CPU
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks import report
from benchmarks.cases import (PATTERNS, SWEEP_DENSITIES, SWEEP_PATTERNS,
                              pattern_cases)
from benchmarks.sweep import add_run_flags, run_sweep, settings_from

NAME = "pattern_sweep"
SMOKE = dict(patterns=("strided", "random"), densities=(0.5,), seq_len=128,
             batch=1, heads=2, head_dim=32, block_size=32)


def _patterns(text: str) -> tuple[str, ...]:
  names = tuple(t.strip() for t in text.split(",") if t.strip())
  unknown = set(names) - set(PATTERNS)
  if unknown:
    raise argparse.ArgumentTypeError(
        f"unknown patterns {sorted(unknown)}; choose from {sorted(PATTERNS)}")
  return names


def _densities(text: str) -> tuple[float, ...]:
  values = tuple(float(t) for t in text.split(",") if t.strip())
  if not all(0.0 < d <= 1.0 for d in values):
    raise argparse.ArgumentTypeError(f"densities must be in (0, 1], got {values}")
  return values


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_run_flags(parser)
  parser.add_argument("--patterns", type=_patterns, default=SWEEP_PATTERNS,
                      help="comma-separated (default: " + ",".join(SWEEP_PATTERNS) + ")")
  parser.add_argument("--densities", type=_densities, default=SWEEP_DENSITIES,
                      help="target block densities (default 0.05,0.1,0.25,0.5)")
  parser.add_argument("--seq-len", type=int, default=4096)
  args = parser.parse_args(argv)
  if args.smoke:
    cases = pattern_cases(**SMOKE)
  else:
    cases = pattern_cases(args.patterns, args.densities, seq_len=args.seq_len)
  results = run_sweep(NAME, cases, settings_from(args), budget=args.budget,
                      out=args.out)
  drawn = report.plot_patterns(os.path.join(args.out, f"{NAME}.png"), results)
  print(f"{NAME}.png {'written' if drawn else 'not drawn (no bsattn point)'}; "
        f"outputs in {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
