"""Cost of building a BlockMask from a token rule: time and memory.

`create_block_mask` classifies every tile by evaluating the rule element by
element, one row of tiles at a time. This times the jitted build (device time,
calls back to back) and reads the compiled build's memory from XLA's memory
analysis, for a sliding window at long sequence lengths. The lengths are
passed as traced arguments, so XLA cannot fold the build into a constant.

    PYTHONPATH=. python benchmarks/mask_build.py --out $OUT
    PYTHONPATH=. python benchmarks/mask_build.py --smoke --out /tmp/x   # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

from benchmarks.timing import time_jax_pipelined
from bsattn_jax import create_block_mask, masks

FULL = ((32768, 448), (32768, 4096), (131072, 448))
SMOKE = ((1024, 100),)


def measure(seq_len: int, window: int, block: int = 128) -> dict:
  """ms per build and its memory for `sliding_window(window, window)`."""
  rule = masks.sliding_window(window, window)

  def build(q_lens, kv_lens):
    return create_block_mask(rule, None, None, seq_len, seq_len,
                             block_size=(block, block), q_seqlens=q_lens,
                             kv_seqlens=kv_lens)

  lens = jnp.full((1,), seq_len, jnp.int32)
  jitted = jax.jit(build)
  compiled = jitted.lower(lens, lens).compile()
  stats = compiled.memory_analysis()
  ms = time_jax_pipelined(jitted, lens, lens, iters=10)
  bm = jitted(lens, lens)
  row = dict(seq_len=seq_len, window=window, block=block, ms=ms,
             density=float(bm.density()))
  if stats is not None:
    row.update(temp_bytes=int(stats.temp_size_in_bytes),
               output_bytes=int(stats.output_size_in_bytes))
  return row


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
  args = parser.parse_args(argv)
  rows = [measure(s, w) for s, w in (SMOKE if args.smoke else FULL)]
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "mask_build.json"), "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind, rows=rows), f, indent=1)
  print(f"create_block_mask on {jax.devices()[0].device_kind} (jitted, device time)")
  print(f"{'S':>7} {'window':>7} {'ms':>8} {'temp MiB':>9} {'out MiB':>8} {'density':>8}")
  for r in rows:
    print(f"{r['seq_len']:>7} {r['window']:>7} {r['ms']:>8.3f} "
          f"{r.get('temp_bytes', 0) / 2**20:>9.1f} "
          f"{r.get('output_bytes', 0) / 2**20:>8.1f} {r['density']:>8.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
