"""Register spills of the Mosaic GPU kernels, as ptxas reports them (GPU).

Spills, more than instruction counts, decided the D=128 dK/dV kernel's speed
(`benchmarks/PERF_NOTES.md`, "Partial tiles' masks and dK/dV's registers"),
and ptxas says how many bytes each kernel spills before anything is timed.
For each configuration below this compiles one forward + backward with
Mosaic GPU's dumps on (`MOSAIC_GPU_DUMP_TO`, a scratch folder per
configuration, removed after reading: its pass logs take ~150 MB per kernel),
reads each kernel's `.ptxas` report and prints the bytes of spill stores and
loads and the stack frame per kernel. Writes spill_report.json.

  PYTHONPATH=. python benchmarks/spill_report.py --out $OUT
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp

from bsattn_jax import block_sparse_attention

SEQ_LEN = 1024
# head dim, causal, dropout rate, user block: the kernels' code paths at
# D=64 and D=128 (dK/dV's one-score-at-a-time path, its 64-row halves with
# dropout, the masked steps of causal masks, 64x64 mask tiles).
CONFIGS = (
    (128, False, 0.0, 128), (128, True, 0.0, 128), (128, False, 0.1, 128),
    (64, False, 0.0, 128), (64, True, 0.0, 128), (128, True, 0.0, 64),
)
_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                    r"(\d+) bytes spill loads")
_SUFFIX = "_mosaic_gpu_kernel"


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
  """kernel name -> {stack, spill_stores, spill_loads} (bytes) from ptxas's
  verbose report; the name without Mosaic GPU's symbol suffix."""
  found = {}
  names = list(_ENTRY.finditer(text))
  for i, entry in enumerate(names):
    end = names[i + 1].start() if i + 1 < len(names) else len(text)
    frame = _FRAME.search(text, entry.end(), end)
    if frame is None:
      raise ValueError(f"no stack frame line after {entry.group(0)!r}")
    name = entry.group(1).removesuffix(_SUFFIX)
    found[name] = dict(zip(("stack", "spill_stores", "spill_loads"),
                           map(int, frame.groups())))
  return found


def compile_config(head_dim: int, causal: bool, dropout: float,
                   block: int) -> None:
  """Compile (and run once) one forward + backward on the Mosaic kernels."""
  tiles = SEQ_LEN // block
  x = jax.random.normal(jax.random.key(0), (1, SEQ_LEN, 2, head_dim),
                        jnp.bfloat16)
  mask = jnp.ones((1, 1, tiles, tiles), bool)

  def loss(q, k, v):
    out = block_sparse_attention(
        q, k, v, mask, block_size=(block, block), is_causal=causal,
        dropout_rate=dropout,
        dropout_rng=jax.random.key(1) if dropout else None, backend="pallas")
    return jnp.sum(out.astype(jnp.float32))

  jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, x, x))


def report(config: tuple) -> dict[str, dict[str, int]]:
  """Each Mosaic kernel's ptxas numbers for one configuration."""
  scratch = tempfile.mkdtemp(prefix="spill_report_")
  os.environ["MOSAIC_GPU_DUMP_TO"] = scratch
  try:
    compile_config(*config)
    text = "".join(open(path).read()
                   for path in sorted(glob.glob(os.path.join(scratch, "*.ptxas"))))
  finally:
    del os.environ["MOSAIC_GPU_DUMP_TO"]
    shutil.rmtree(scratch, ignore_errors=True)
  if not text:
    raise RuntimeError(f"no ptxas report for {config}: are the Mosaic GPU "
                       "kernels running (a Hopper GPU)?")
  return parse_ptxas(text)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="bench_out")
  args = parser.parse_args(argv)
  rows = []
  print(f"{'D':>4} {'causal':>6} {'drop':>5} {'block':>5}  {'kernel':<12} "
        f"{'spill st':>8} {'spill ld':>8} {'stack':>6}")
  for config in CONFIGS:
    for kernel, numbers in report(config).items():
      rows.append(dict(zip(("head_dim", "causal", "dropout", "block"), config),
                       kernel=kernel, **numbers))
      head_dim, causal, dropout, block = config
      print(f"{head_dim:>4} {causal!s:>6} {dropout:>5} {block:>5}  {kernel:<12} "
            f"{numbers['spill_stores']:>8} {numbers['spill_loads']:>8} "
            f"{numbers['stack']:>6}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "spill_report.json"), "w") as f:
    json.dump(dict(device=str(jax.devices()[0]), seq_len=SEQ_LEN, rows=rows),
              f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
