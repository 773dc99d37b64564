"""The tutorial's block-size benchmark: user block sizes at ViT lengths.

The ViT pattern (`global_local`: block 0 global, a band of one block on each
side) at user blocks 64..512 and 197, 577, 1025 and 4096 tokens (ViT-B
heads: 12 of 64, bf16, a batch of about 32k tokens), forward, against the
peers on the same mask (cuDNN and XLA dense, FlexAttention with the same
block mask, tokamax dense). Larger blocks mean coarser patterns: fewer,
fuller tiles, a higher density. Writes block_size_sweep.json, .md (every
measurement) and block_size_sweep.png (bsattn's speedup over cuDNN and over
FlexAttention vs block size, a line per length).

  PYTHONPATH=. python benchmarks/block_size_sweep.py --out $OUT
  PYTHONPATH=. python benchmarks/block_size_sweep.py --block-sizes 64,128 --seq-lens 577
  PYTHONPATH=. python benchmarks/block_size_sweep.py --smoke --out /tmp/sweep   # CPU
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks import report
from benchmarks.cases import SWEEP_BLOCK_SIZES, SWEEP_SEQ_LENS, block_size_cases
from benchmarks.sweep import add_run_flags, run_sweep, settings_from

NAME = "block_size_sweep"
SMOKE = dict(block_sizes=(32, 64), seq_lens=(100,), heads=2, head_dim=32, tokens=100)


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(t) for t in text.split(",") if t.strip())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_run_flags(parser)
  parser.add_argument("--block-sizes", type=_ints, default=SWEEP_BLOCK_SIZES,
                      help="user block sizes, multiples of 16 (default 64,128,256,512)")
  parser.add_argument("--seq-lens", type=_ints, default=SWEEP_SEQ_LENS,
                      help="sequence lengths (default 197,577,1025,4096)")
  args = parser.parse_args(argv)
  if args.smoke:
    cases = block_size_cases(**SMOKE)
  else:
    cases = block_size_cases(args.block_sizes, args.seq_lens)
  results = run_sweep(NAME, cases, settings_from(args), budget=args.budget,
                      out=args.out)
  drawn = report.plot_block_sizes(os.path.join(args.out, f"{NAME}.png"), results)
  print(f"{NAME}.png {'written' if drawn else 'not drawn (no ratio to plot)'}; "
        f"outputs in {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
