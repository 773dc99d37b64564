"""Sweep the launch configs (tiles, warps, stages) of each Pallas kernel.

Calls the Triton forward, dK/dV and dQ kernels directly with explicit
`KernelConfig`s on flat inputs built as `bsattn_jax/api.py` builds them, through
`pallas_kernels.triton.tuning` (the candidates and calls `bsattn_jax.autotune`
uses too), so what is timed is one kernel alone. All candidates of a (case,
kernel) compile at once (a config that does not compile, e.g. out of shared
memory, is reported as failed), then each is timed. Prints a ranked table per
case and kernel; writes `tuning.json`.

TFLOP/s count each kernel's own matmuls: forward 2 (4*B*H*Sq*Sk*D*density
FLOPs), dK/dV 4 (2x that), dQ 3 (1.5x).

  PYTHONPATH=. python benchmarks/tune.py --out bench_out
  PYTHONPATH=. python benchmarks/tune.py --kernels forward --cases dense_s8192_d128 \\
      --forward-configs 128x64x8x3,128x64x4x2
  PYTHONPATH=. python benchmarks/tune.py --smoke --out /tmp/tune_smoke   # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

from benchmarks.aot import compile_all
from benchmarks.case_runner import jitted_mask_build, random_inputs
from benchmarks.cases import SMOKE_TUNING_CASES, TUNING_CASES, Case, select, user_mask
from benchmarks.failures import short_reason
from benchmarks.timing import attention_flops, tflops, time_jax_pipelined
from bsattn_jax.api import resolve_backend
from pallas_kernels import seq_info as seq_info_rows
from pallas_kernels.seq_info import StaticSizes
from pallas_kernels.triton import tuning
from pallas_kernels.triton.configs import KERNELS, KernelConfig

FLOP_FACTOR = {"forward": 1.0, "dkdv": 2.0, "dq": 1.5}

SMOKE_CONFIGS = {
    "forward": "128x64x4x3,64x32x4x2",
    "dkdv": "64x128x8x2,32x64x4x1",
    "dq": "128x64x8x2,64x32x4x1",
}


def padded_sizes(case: Case) -> StaticSizes:
  """The trace-time sizes `block_sparse_attention` passes for this padded case."""
  return StaticSizes(case.seq_len_q, case.sk, case.seq_len_q, case.sk)


def parse_configs(text: str) -> list[KernelConfig]:
  """'128x64x8x3,64x64x4x2' (block_q x block_kv x warps x stages) -> configs."""
  return [KernelConfig.parse(item) for item in text.split(",") if item.strip()]


def kernel_inputs(case: Case, interpret: bool) -> dict:
  """The case as a `tuning.Problem` (flat `[T, H, D]` q/k/v/do, seq_info, the
  BlockMask's lists), lse2/delta for the backward kernels (`rows`: the
  forward run once with the table's config), and the BlockMask."""
  q, k, v, do = random_inputs(case, 1)[0]
  block_mask = jitted_mask_build(case)(user_mask(case)[0])
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  problem = tuning.Problem(
      q=flat(q), k=flat(k), v=flat(v), do=flat(do),
      seq_info=seq_info_rows.padded(case.batch, case.seq_len_q, case.sk,
                                    block_mask.q_lens, block_mask.kv_lens),
      kv_lists=block_mask.kv_lists, q_lists=block_mask.q_lists,
      rule=block_mask.element_rule, mask_tile=block_mask.tile,
      static=padded_sizes(case), softmax_scale=case.softmax_scale)
  return dict(problem=problem, rows=tuning.backward_rows(problem, interpret),
              block_mask=block_mask)


def sweep(case: Case, kernel: str, candidates: list[KernelConfig], inputs: dict, *,
          interpret: bool, warmup: int, iters: int, max_seconds: float,
          workers: int, time_left: Callable[[], float]) -> list[dict]:
  """Rows `{config, status, ms, tflops, is_default, reason}`, fastest first."""
  bm, problem = inputs["block_mask"], inputs["problem"]
  default = problem.table_config(kernel)
  configs = list(dict.fromkeys(c.clamp_to(bm.tile) for c in candidates))
  calls = {cfg: tuning.kernel_call(kernel, problem, cfg, inputs["rows"], interpret)
           for cfg in configs}
  compiled = compile_all(calls, workers)
  flops = FLOP_FACTOR[kernel] * attention_flops(
      case.batch, case.heads, case.seq_len_q, case.sk, case.head_dim,
      float(bm.density()))
  rows = []
  for cfg in configs:
    row = dict(config=cfg.name, is_default=cfg == default,
               compile_s=round(compiled[cfg].seconds, 2))
    executable = compiled[cfg].executable
    if executable is None:
      row.update(status="failed", reason=compiled[cfg].error)
    elif time_left() < 2:
      row.update(status="skipped", reason="time budget")
    else:
      try:
        ms = time_jax_pipelined(executable, *calls[cfg][1], warmup=warmup, iters=iters,
                      max_seconds=max_seconds)
        row.update(status="ok", ms=ms, tflops=tflops(flops, ms))
      except Exception as e:
        row.update(status="failed", reason=short_reason(e))
    rows.append(row)
  return sorted(rows, key=lambda r: (r["status"] != "ok", r.get("ms") or 0.0))


def format_table(case: Case, kernel: str, rows: list[dict]) -> str:
  """Ranked table of one sweep; failures listed under it."""
  default_ms = next((r["ms"] for r in rows if r["is_default"] and r["status"] == "ok"),
                    None)
  lines = [f"{kernel} on {case.name} ({case.describe()})",
           f"  {'rank':>4}  {'config (bq x bkv x warps x stages)':34s} {'ms':>9} "
           f"{'TFLOP/s':>8} {'vs default':>10}"]
  ok = [r for r in rows if r["status"] == "ok"]
  for rank, r in enumerate(ok, 1):
    speedup = f"{default_ms / r['ms']:.2f}x" if default_ms else "-"
    mark = "  (default)" if r["is_default"] else ""
    lines.append(f"  {rank:>4}  {r['config']:34s} {r['ms']:9.3f} {r['tflops']:8.1f} "
                 f"{speedup:>10}{mark}")
  lines += [f"  {r['status']}: {r['config']}: {r.get('reason', '')}"
            for r in rows if r["status"] != "ok"]
  return "\n".join(lines)


def run_tuning(cases: list[Case], kernels: list[str],
               candidates: dict[str, list[KernelConfig]], *, interpret: bool,
               warmup: int = 3, iters: int = 20, max_seconds: float = 2.0,
               workers: int = 8, time_left: Callable[[], float] = lambda: 1e9
               ) -> dict:
  """Sweep every kernel on every case; `{case: {shape, density, kernels: {kernel: rows}}}`."""
  results = {}
  for case in cases:
    entry = results[case.name] = {"shape": case.describe(), "kernels": {}}
    if time_left() < 20:
      entry["skipped"] = "time budget"
      continue
    try:
      inputs = kernel_inputs(case, interpret)
    except Exception as e:
      entry["error"] = short_reason(e)
      print(f"tuning {case.name}: inputs failed: {entry['error']}", flush=True)
      continue
    entry["density"] = float(inputs["block_mask"].density())
    for kernel in kernels:
      if time_left() < 15:
        entry["kernels"][kernel] = [{"status": "skipped", "reason": "time budget"}]
        continue
      rows = sweep(case, kernel, candidates[kernel], inputs, interpret=interpret,
                   warmup=warmup, iters=iters, max_seconds=max_seconds,
                   workers=workers, time_left=time_left)
      entry["kernels"][kernel] = rows
      print(format_table(case, kernel, rows), flush=True)
    del inputs
  return results


def best_configs(results: dict) -> list[str]:
  """One line per (case, kernel): the fastest config and its gain over the default."""
  lines = []
  for case_name, entry in results.items():
    for kernel, rows in entry.get("kernels", {}).items():
      ok = [r for r in rows if r.get("status") == "ok"]
      if not ok:
        continue
      default = next((r for r in ok if r["is_default"]), None)
      gain = f" ({default['ms'] / ok[0]['ms']:.2f}x default)" if default else ""
      lines.append(f"{case_name:24s} {kernel:8s} best {ok[0]['config']:14s} "
                   f"{ok[0]['ms']:.3f} ms{gain}")
  return lines


def add_candidate_flags(parser: argparse.ArgumentParser) -> None:
  for kernel in KERNELS:
    parser.add_argument(f"--{kernel}-configs", default=None,
                        help=f"{kernel} configs BQxBKVxWARPSxSTAGES,... "
                             "(default: the built-in sweep)")


def candidates_from(args, smoke: bool) -> dict[str, list[KernelConfig]]:
  result = {}
  for kernel in KERNELS:
    text = getattr(args, f"{kernel}_configs") or (SMOKE_CONFIGS[kernel] if smoke else None)
    result[kernel] = parse_configs(text) if text else tuning.default_candidates(kernel)
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="bench_out", help="directory for tuning.json")
  parser.add_argument("--smoke", action="store_true", help="tiny CPU case, interpreted")
  parser.add_argument("--cases", default=None, help="comma-separated name globs")
  parser.add_argument("--kernels", default=",".join(KERNELS))
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--budget", type=float, default=540.0, help="seconds in all")
  parser.add_argument("--compile-workers", type=int, default=8)
  add_candidate_flags(parser)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
  unknown = set(kernels) - set(KERNELS)
  if unknown:
    parser.error(f"unknown kernels {sorted(unknown)}; choose from {KERNELS}")
  try:
    candidates = candidates_from(args, args.smoke)
  except ValueError as e:
    parser.error(str(e))
  cases = select(SMOKE_TUNING_CASES if args.smoke else TUNING_CASES, args.cases)
  interpret = resolve_backend("auto") == "interpret"
  results = run_tuning(
      cases, kernels, candidates, interpret=interpret,
      warmup=1 if args.smoke else args.warmup, iters=2 if args.smoke else args.iters,
      workers=args.compile_workers,
      time_left=lambda: args.budget - (time.perf_counter() - start))
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "tuning.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  print("\n".join(["", "best configs:"] + best_configs(results) + [f"wrote {path}"]),
        flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
