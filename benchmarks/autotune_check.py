"""The autotuner on the GPU: never slower than the launch table, and cached
across a restart.

The bar: autotuned configurations are never slower than the table's default
for the same shape in the same run, and the cache survives a restart. For
each shape below:

1. `bsattn_jax.autotune` times the Triton forward, dK/dV and dQ kernels with
   a reduced candidate list (`--configs` per kernel, 8 by default: the
   table's config and its nearest neighbours in `tuning.default_candidates`,
   those differing in the fewest of tile rows, tile columns, warps and
   stages) and stores the winners in `<out>/autotune_cache.json`.
2. In the same process, forward + backward (the jitted vjp of
   `block_sparse_attention` with a random cotangent, the prebuilt BlockMask
   as an argument) is compiled twice: with an empty cache loaded
   (`bsattn_jax.load_autotune_cache` on `<out>/table_only_cache.json`: the
   launch table alone) and with the new cache loaded. The launch plan logged
   while tracing each (`bsattn_jax.set_debug`) must name the table's configs,
   then the winners; both executables are timed alternately
   (`time_jax_pipelined`, the fastest of 2 alternations).
3. A fresh process (this script with `--restart`, `BSATTN_AUTOTUNE_CACHE`
   pointing at the cache) imports bsattn_jax; the cache it read at import
   must hold every winner and its forward + backward's launch plan must name
   them; it times forward + backward again.

The shapes are ones where all three tuned kernels run on Triton (checked with
the launch plan, `pallas_kernels.registry.plan`): on Hopper, bf16/fp16 at
128- and 64-token blocks, D 64/128 and lengths that are multiples of 8
(any length at D=64) run the Mosaic GPU kernels, which the autotuner does
not tune. ViT-B/16 at 384 px (577 tokens) at 32-token blocks; head dim 256;
fp32.

Exit code 0 only if every shape ran on Triton, every tuned time (each kernel
alone as `autotune` timed it, and forward + backward) is at most the table's
time x 1.02 (TOLERANCE: timing noise; `autotune` times the table's config
too and keeps it unless another ran faster, so a winner loses only by
noise), and the restarted process loaded every winner. A shape skipped for
the time budget counts as a failure. Writes autotune_check.json and prints a
table: shape, kernel, table config, tuned config, table ms, tuned ms, ratio,
restart-loaded.

  PYTHONPATH=. python benchmarks/autotune_check.py --out $OUT             # GPU
  PYTHONPATH=. python benchmarks/autotune_check.py --smoke --out /tmp/at  # CPU, interpreted
  PYTHONPATH=. python benchmarks/gpu_suite.py --out $OUT --extras autotune

`--smoke`: one tiny shape, the kernels interpreted on the CPU, 2 configs per
kernel; every step runs, but the interpreted timings mean nothing for a GPU,
so they are reported and not held to the tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np

import bsattn_jax
from benchmarks import report
from benchmarks.case_runner import (jitted_mask_build, ours_attend,
                                    random_inputs, with_backward)
from benchmarks.cases import Case, select, user_mask
from benchmarks.failures import short_reason
from benchmarks.timing import time_jax_pipelined
from bsattn_jax import debug
from bsattn_jax.api import resolve_backend
from pallas_kernels import registry
from pallas_kernels import seq_info as seq_info_rows
from pallas_kernels.triton import autotune_cache, configs, tuning
from pallas_kernels.triton.configs import KERNELS, KernelConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1.02
NAME = "autotune_check"
CACHE_FILE = "autotune_cache.json"
TABLE_ONLY_FILE = "table_only_cache.json"
RESTART_SPEC_FILE = "restart_spec.json"
RESTART_RESULT_FILE = "restart.json"
SHAPE_MIN_S = 40.0        # left to start a shape: autotune, 2 compiles, timing
RESTART_RESERVE_S = 45.0  # kept for the restarted process
ALTERNATIONS = 2          # table, tuned, table, tuned: the fastest of each
FWD_BWD = "fwd+bwd"

_GLOBAL_LOCAL = (("num_global", 1), ("window", 1))
CASES = [
    # ViT-B/16 at 384 px at 32-token blocks (the Mosaic kernels take 64- and
    # 128-token ones).
    Case("vit_b_s577_block32", batch=32, seq_len_q=577, heads=12, head_dim=64,
         block_size=32, pattern="global_local", pattern_args=_GLOBAL_LOCAL,
         backward=True),
    # Head dim 256: the Mosaic kernels take 64 and 128.
    Case("d256_local_s4096", batch=2, seq_len_q=4096, heads=8, head_dim=256,
         pattern="local", pattern_args=(("target_density", 0.25),), backward=True),
    # fp32: the Mosaic kernels take fp16/bf16.
    Case("fp32_causal_s2048_d128", batch=2, seq_len_q=2048, heads=8,
         head_dim=128, dtype="float32", causal=True, backward=True),
]
SMOKE_CASES = [
    Case("smoke_fp32_s64_d16", batch=1, seq_len_q=64, heads=1, head_dim=16,
         dtype="float32", block_size=32, backward=True),
]
SMOKE_CONFIGS = 2


def find_case(name: str) -> Case:
  return next(c for c in CASES + SMOKE_CASES if c.name == name)


def nearby_candidates(kernel: str, table: KernelConfig, mask_tile: tuple[int, int],
                      count: int) -> list[KernelConfig]:
  """The table's config and the `count - 1` configs of the default sweep
  nearest to it: the fewest of (tile rows, tile columns, warps, stages)
  differing, the sweep's order among equals; clamped to the mask tile."""
  table = table.clamp_to(mask_tile)
  pool = [c for c in dict.fromkeys(c.clamp_to(mask_tile)
                                   for c in tuning.default_candidates(kernel))
          if c != table]
  fields = lambda c: dataclasses.astuple(c)
  distance = lambda c: sum(a != b for a, b in zip(fields(c), fields(table)))
  return [table] + sorted(pool, key=distance)[:max(0, count - 1)]


def kernel_call(case: Case, block_mask: bsattn_jax.BlockMask,
                backend: str) -> registry.KernelCall:
  """The static call `block_sparse_attention` hands the kernels for `case`
  (what decides the implementation and the launch configs)."""
  static = seq_info_rows.padded_static(case.seq_len_q, case.sk,
                                       block_mask.ragged_q, block_mask.ragged_kv)
  return registry.KernelCall(
      dtype=np.dtype(case.dtype), head_dim=case.head_dim, mask_tile=block_mask.tile,
      static=static, rule=block_mask.element_rule, family=backend)


def implementations(call: registry.KernelCall) -> dict[str, str]:
  """The implementation the forward and the backward run for `call` on the
  GPU it is traced for (the launch plan)."""
  plan = registry.plan(call)
  return {"forward": plan.forward.implementation,
          "backward": plan.backward.implementation}


@dataclasses.dataclass
class Shape:
  """A case ready to run: its BlockMask, inputs and the kernels' static call."""

  case: Case
  block_mask: bsattn_jax.BlockMask
  mask: str
  args: tuple                   # (q, k, v, do, block_mask)
  call: registry.KernelCall

  @classmethod
  def build(cls, case: Case, backend: str) -> "Shape":
    blocks, mask = user_mask(case)
    block_mask = jitted_mask_build(case)(blocks)
    q, k, v, do = random_inputs(case, 1)[0]
    return cls(case, block_mask, mask, (q, k, v, do, block_mask),
               kernel_call(case, block_mask, backend))

  def table_configs(self) -> dict[str, KernelConfig]:
    c = self.call
    return {kernel: configs.table_config(kernel, c.head_dim, c.dtype, c.mask_tile,
                                         c.static.q_span)
            for kernel in KERNELS}

  def shape_class(self) -> str:
    c = self.call
    return autotune_cache.shape_class(c.head_dim, c.dtype, c.mask_tile,
                                      c.static.q_span)

  def implementations(self) -> dict[str, str]:
    return implementations(self.call)

  def compile_fwd_bwd(self, backend: str) -> tuple:
    """(executable, compile seconds, the configs it launches): the configs as
    the launch plan logged while tracing (`bsattn_jax.set_debug`) names them,
    `{kernel: 'BQxBKVxWARPSxSTAGES'}` (launch configs are chosen at trace)."""
    fn = jax.jit(with_backward(ours_attend(self.case, backend)))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(debug.logger.name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    bsattn_jax.set_debug(True)        # also forgets the plans logged before
    try:
      start = time.perf_counter()
      executable = fn.lower(*self.args).compile()
      seconds = time.perf_counter() - start
    finally:
      bsattn_jax.set_debug(None)
      logger.removeHandler(handler)
      logger.setLevel(level)
    return executable, seconds, traced_configs(
        "\n".join(r.getMessage() for r in records))


_PLAN_LINE = re.compile(r"(forward|dK/dV|dQ) kernel tile (\d+)x(\d+) .*?, "
                        r"(\d+) warps, (\d+) stages")
_PLAN_KERNELS = {"forward": "forward", "dK/dV": "dkdv", "dQ": "dq"}


def traced_configs(plan_log: str) -> dict[str, str]:
  """`{kernel: 'BQxBKVxWARPSxSTAGES'}` of the Triton kernels in a launch-plan
  log (`bsattn_jax.debug`: 'dK/dV kernel tile 64x64 (...), 4 warps, 2 stages')."""
  return {_PLAN_KERNELS[m[1]]: "x".join(m.groups()[1:])
          for m in _PLAN_LINE.finditer(plan_log)}


def time_alternately(executables: dict, args: tuple, timer: dict,
                     alternations: int) -> dict[str, float]:
  """ms of each executable: timed in turn, `alternations` times, the fastest."""
  best = {name: math.inf for name in executables}
  for _ in range(max(1, alternations)):
    for name, executable in executables.items():
      best[name] = min(best[name], time_jax_pipelined(executable, *args, **timer))
  return best


def _timer(args) -> dict:
  return dict(warmup=args.warmup, iters=args.iters, max_seconds=args.max_seconds)


def write_empty_cache(path: str) -> None:
  with open(path, "w") as f:
    json.dump({"version": autotune_cache.VERSION, "gpus": {}}, f)


def check_shape(case: Case, args, backend: str, cache_path: str,
                table_only_path: str) -> dict:
  """Autotune one shape, then time forward + backward with the table's and
  the tuned configs in this process. The row for autotune_check.json."""
  shape = Shape.build(case, backend)
  row = {"case": case.name, "shape": case.describe(), "mask": shape.mask,
         "density": float(shape.block_mask.density()),
         "tile": list(shape.block_mask.tile), "shape_class": shape.shape_class(),
         "implementations": shape.implementations()}
  others = {d: impl for d, impl in row["implementations"].items() if impl != "triton"}
  if others:
    row["error"] = (f"runs {others} here, not the Triton kernels the autotuner "
                    f"tunes: choose another shape")
    return row

  candidates = {kernel: nearby_candidates(kernel, cfg, shape.block_mask.tile,
                                          args.configs)
                for kernel, cfg in shape.table_configs().items()}
  row["candidates"] = {k: [c.name for c in v] for k, v in candidates.items()}
  q, k, v, _, block_mask = shape.args
  start = time.perf_counter()
  result = bsattn_jax.autotune(
      q, k, v, block_mask, is_causal=case.causal, softmax_scale=case.softmax_scale,
      candidates=candidates, cache_path=cache_path, iters=args.tune_iters,
      warmup=args.tune_warmup, interpret=backend == "interpret")
  row["autotune_s"] = time.perf_counter() - start
  row["gpu"] = result.gpu
  kernels = {}
  for kernel in KERNELS:
    timings = result.timings[kernel]
    default = next(t for t in timings if t.is_default)
    winner = next(t for t in timings if t.config == result.configs[kernel])
    kernels[kernel] = {
        "table": default.config.name, "tuned": winner.config.name,
        "table_ms": default.ms, "tuned_ms": winner.ms,
        "timings": [{"config": t.config.name, "ms": t.ms, "error": t.error}
                    for t in timings]}
  row["kernels"] = kernels

  # The table alone (an empty cache: `autotune` has put the winners in
  # memory), then the winners (the cache file); each executable's configs as
  # its trace planned them.
  bsattn_jax.load_autotune_cache(table_only_path)
  table_exe, table_compile_s, row["table_launch"] = shape.compile_fwd_bwd(backend)
  bsattn_jax.load_autotune_cache(cache_path)
  tuned_exe, tuned_compile_s, row["tuned_launch"] = shape.compile_fwd_bwd(backend)
  ms = time_alternately({"table": table_exe, "tuned": tuned_exe}, shape.args,
                        _timer(args), args.alternations)
  row["fwd_bwd"] = {"table_ms": ms["table"], "tuned_ms": ms["tuned"],
                    "table_compile_s": table_compile_s,
                    "tuned_compile_s": tuned_compile_s}
  return row


# --- the restarted process ---------------------------------------------------


def restart_check(spec_path: str) -> int:
  """In a fresh process: did the cache read at import give the winners?"""
  with open(spec_path) as f:
    spec = json.load(f)
  backend = resolve_backend("auto")
  result = {"cache_read": autotune_cache.default_path(),
            "env": os.environ.get(autotune_cache.ENV_VAR), "shapes": {}}
  for entry in spec["shapes"]:
    out = result["shapes"][entry["case"]] = {}
    try:
      shape = Shape.build(find_case(entry["case"]), backend)
      out["cached"] = {k: autotune_cache.lookup(k, shape.shape_class())
                       for k in KERNELS}
      executable, out["compile_s"], out["launch"] = shape.compile_fwd_bwd(backend)
      out["loaded"] = (out["cached"] == entry["tuned"]
                       and out["launch"] == entry["tuned"])
      timer = dict(warmup=spec["warmup"], iters=spec["iters"],
                   max_seconds=spec["max_seconds"])
      out["fwd_bwd_ms"] = time_alternately({"tuned": executable}, shape.args, timer,
                                           spec["alternations"])["tuned"]
    except Exception as e:  # recorded; the parent reports it
      out["error"] = short_reason(e)
    print(f"restart: {entry['case']}: {out}", flush=True)
  report.write_json(spec["result"], result)
  return 0


def run_restart(rows: list[dict], args, cache_path: str, seconds: float) -> dict:
  """This script with `--restart` in a new process, the cache at
  `$BSATTN_AUTOTUNE_CACHE`; its result (or why there is none)."""
  spec_path = os.path.join(args.out, RESTART_SPEC_FILE)
  result_path = os.path.join(args.out, RESTART_RESULT_FILE)
  if os.path.exists(result_path):
    os.remove(result_path)
  spec = {"result": result_path, "warmup": args.warmup, "iters": args.iters,
          "max_seconds": args.max_seconds, "alternations": args.alternations,
          "shapes": [{"case": r["case"],
                      "tuned": {k: r["kernels"][k]["tuned"] for k in KERNELS}}
                     for r in rows if "fwd_bwd" in r]}
  report.write_json(spec_path, spec)
  if not spec["shapes"]:
    return {"error": "no shape was tuned"}
  # No preallocation: this process may still hold most of the GPU's memory.
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
             PYTHONPATH=os.pathsep.join(
                 p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
  env[autotune_cache.ENV_VAR] = cache_path
  command = [sys.executable, os.path.abspath(__file__), "--restart", spec_path]
  start = time.perf_counter()
  try:
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=max(10.0, seconds))
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {seconds:.0f} s"}
  print(proc.stdout[-4000:], end="", flush=True)
  if proc.returncode != 0 or not os.path.exists(result_path):
    return {"error": f"exit code {proc.returncode}: "
                     f"{(proc.stderr.strip().splitlines() or [''])[-1][:300]}"}
  with open(result_path) as f:
    result = json.load(f)
  result["seconds"] = time.perf_counter() - start
  return result


# --- verdict and table -------------------------------------------------------


def _ratio(tuned: float | None, table: float | None) -> float | None:
  if not tuned or not table:
    return None
  return tuned / table


def table_rows(rows: list[dict], restart: dict) -> list[dict]:
  """One line per (shape, kernel) and per shape's forward + backward."""
  lines = []
  restarted = restart.get("shapes", {})
  for row in rows:
    if "error" in row or "fwd_bwd" not in row:
      lines.append({"shape": row["case"], "kernel": "-", "error": row.get(
          "error", "not run")})
      continue
    again = restarted.get(row["case"], {})
    for kernel, k in row["kernels"].items():
      lines.append({"shape": row["case"], "kernel": kernel, "table": k["table"],
                    "tuned": k["tuned"], "table_ms": k["table_ms"],
                    "tuned_ms": k["tuned_ms"],
                    "ratio": _ratio(k["tuned_ms"], k["table_ms"]),
                    "restart_loaded": bool(again.get("loaded"))
                    and again["launch"][kernel] == k["tuned"]})
    f = row["fwd_bwd"]
    lines.append({"shape": row["case"], "kernel": FWD_BWD, "table": "(above)",
                  "tuned": "(above)", "table_ms": f["table_ms"],
                  "tuned_ms": f["tuned_ms"],
                  "ratio": _ratio(f["tuned_ms"], f["table_ms"]),
                  "restart_loaded": bool(again.get("loaded")),
                  "restart_ms": again.get("fwd_bwd_ms")})
  return lines


def failures(rows: list[dict], restart: dict, lines: list[dict],
             tolerance: float, gate_times: bool) -> list[str]:
  """Why the check fails (empty: it passes)."""
  found = [f"{line['shape']}: {line['error']}" for line in lines if "error" in line]
  for row in rows:
    if "fwd_bwd" not in row:
      continue
    expected = {k: row["kernels"][k]["table"] for k in KERNELS}
    if not row["table_launch"] or not row["tuned_launch"]:
      found.append(f"{row['case']}: no launch plan naming the Triton configs was "
                   f"logged while tracing (has bsattn_jax.debug's format changed?)")
    elif row["table_launch"] != expected:
      found.append(f"{row['case']}: the table launches {row['table_launch']}, "
                   f"autotune timed {expected} as its default")
    winners = {k: row["kernels"][k]["tuned"] for k in KERNELS}
    if row["tuned_launch"] != winners:
      found.append(f"{row['case']}: with the cache loaded the table returns "
                   f"{row['tuned_launch']}, not the winners {winners}")
  if "error" in restart:
    found.append(f"restart: {restart['error']}")
  for name, again in restart.get("shapes", {}).items():
    if "error" in again:
      found.append(f"restart {name}: {again['error']}")
  for line in lines:
    if "error" in line:
      continue
    if not line["restart_loaded"]:
      found.append(f"{line['shape']} {line['kernel']}: the restarted process did "
                   f"not load the tuned config")
    if line["ratio"] is None:
      found.append(f"{line['shape']} {line['kernel']}: no time")
    elif gate_times and line["ratio"] > tolerance:
      found.append(f"{line['shape']} {line['kernel']}: tuned {line['tuned_ms']:.4f} "
                   f"ms > table {line['table_ms']:.4f} ms x {tolerance}")
  return found


def _progress(row: dict) -> str:
  if "error" in row:
    return f"error: {row['error']}"
  impls = row["implementations"]
  f = row["fwd_bwd"]
  tuned = ", ".join(f"{k} {row['kernels'][k]['tuned']}" for k in KERNELS)
  return (f"forward {impls['forward']}, backward {impls['backward']}; autotune "
          f"{row['autotune_s']:.1f} s: {tuned}; fwd+bwd table {f['table_ms']:.4f} "
          f"ms, tuned {f['tuned_ms']:.4f} ms")


def format_table(lines: list[dict]) -> str:
  ms = lambda x: "-" if x is None else f"{x:.4f}"
  header = (f"{'shape':<24} {'kernel':<8} {'table config':<13} {'tuned config':<13} "
            f"{'table ms':>9} {'tuned ms':>9} {'ratio':>6}  restart-loaded")
  out = [header, "-" * len(header)]
  for line in lines:
    if "error" in line:
      out.append(f"{line['shape']:<24} {line['error']}")
      continue
    ratio = "-" if line["ratio"] is None else f"{line['ratio']:.3f}"
    again = "yes" if line["restart_loaded"] else "NO"
    if line.get("restart_ms") is not None:
      again += f" (restart: {line['restart_ms']:.4f} ms)"
    out.append(f"{line['shape']:<24} {line['kernel']:<8} {line['table']:<13} "
               f"{line['tuned']:<13} {ms(line['table_ms']):>9} "
               f"{ms(line['tuned_ms']):>9} {ratio:>6}  {again}")
  return "\n".join(out)


# --- main --------------------------------------------------------------------


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
  parser.add_argument("--budget", type=float, default=200.0,
                      help="seconds for the whole check, the restart included")
  parser.add_argument("--smoke", action="store_true",
                      help="one tiny shape, kernels interpreted (a CPU check)")
  parser.add_argument("--cases", default=None,
                      help="comma-separated name globs/substrings of the shapes")
  parser.add_argument("--configs", type=int, default=8,
                      help="candidates per kernel, the table's included")
  parser.add_argument("--tune-warmup", type=int, default=3)
  parser.add_argument("--tune-iters", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3,
                      help="forward + backward timing")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--max-seconds", type=float, default=2.0)
  parser.add_argument("--alternations", type=int, default=ALTERNATIONS)
  parser.add_argument("--restart", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.smoke:
    args.configs = min(args.configs, SMOKE_CONFIGS)
    args.tune_warmup = args.tune_iters = args.warmup = args.alternations = 1
    args.iters, args.max_seconds = 2, 1.0
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.restart:
    return restart_check(args.restart)
  start = time.perf_counter()
  time_left = lambda: args.budget - (time.perf_counter() - start)
  os.makedirs(args.out, exist_ok=True)
  cache_path = os.path.abspath(os.path.join(args.out, CACHE_FILE))
  table_only_path = os.path.abspath(os.path.join(args.out, TABLE_ONLY_FILE))
  if os.path.exists(cache_path):
    os.remove(cache_path)
  write_empty_cache(table_only_path)
  bsattn_jax.load_autotune_cache(table_only_path)
  backend = resolve_backend("auto")
  cases = select(SMOKE_CASES if args.smoke else CASES, args.cases)
  devices = jax.devices()
  results = {"meta": {"device": f"{devices[0].device_kind} x{len(devices)}",
                      "jax": jax.__version__, "backend": backend,
                      "tolerance": TOLERANCE, "times_gated": not args.smoke,
                      "budget_s": args.budget, "argv": sys.argv[1:],
                      "cache": cache_path},
             "shapes": [], "restart": {}}
  out_json = os.path.join(args.out, f"{NAME}.json")
  for case in cases:
    if time_left() < SHAPE_MIN_S + RESTART_RESERVE_S:
      results["shapes"].append({"case": case.name, "error": "skipped: time budget"})
      continue
    print(f"{case.name}: {case.describe()}", flush=True)
    try:
      row = check_shape(case, args, backend, cache_path, table_only_path)
    except Exception as e:  # recorded as the shape's failure; the rest still run
      row = {"case": case.name, "error": short_reason(e)}
    results["shapes"].append(row)
    print(f"  {_progress(row)}", flush=True)
    report.write_json(out_json, results)
  results["restart"] = run_restart(results["shapes"], args, cache_path,
                                   time_left() - 5)
  lines = table_rows(results["shapes"], results["restart"])
  found = failures(results["shapes"], results["restart"], lines, TOLERANCE,
                   gate_times=not args.smoke)
  results.update(table=lines, failures=found, passed=not found,
                 wall_s=time.perf_counter() - start)
  report.write_json(out_json, results)
  print(format_table(lines))
  gate = (f"tuned <= table x {TOLERANCE} (timing noise)" if not args.smoke else
          "times not gated (--smoke: interpreted kernels)")
  print(f"\n{gate}; restart-loaded: a fresh process with "
        f"{autotune_cache.ENV_VAR}={cache_path} launches the tuned configs")
  print("PASSED" if not found else "FAILED:\n  " + "\n  ".join(found), flush=True)
  return 0 if not found else 1


if __name__ == "__main__":
  sys.exit(main())
