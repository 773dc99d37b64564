"""Run a sweep of benchmark cases within a time budget, with a progress bar.

What `block_size_sweep.py` and `pattern_sweep.py` share: each case goes
through `case_runner.CaseRun` (ours and every peer in this process, dense
peers timed once per shape), a tqdm bar shows the cases done and the time
left, and the results (in `report.py`'s format, each case with its
parameters) are written as `<name>.json` and `<name>.md` after every case, so
a run cut short still leaves them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import sys
import time

import jax
from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

from benchmarks import peers as peer_lib
from benchmarks import report
from benchmarks.case_runner import CaseRun, RunSettings
from benchmarks.cases import Case
from bsattn_jax.api import resolve_backend


def add_run_flags(parser: argparse.ArgumentParser) -> None:
  """Flags every sweep takes."""
  parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"),
                      help="output directory (default $OUT or bench_out)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes, kernels interpreted (a CPU check)")
  parser.add_argument("--budget", type=float, default=540.0,
                      help="seconds for the whole sweep; cases that no longer "
                           "fit are recorded as skipped")
  parser.add_argument("--no-peers", action="store_true", help="time only bsattn")
  parser.add_argument("--peers", type=peer_lib.peer_names_arg, default=(),
                      help="comma-separated peers to time (default: all)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--max-seconds", type=float, default=3.0,
                      help="cap on one timing loop")
  parser.add_argument("--compile-workers", type=int, default=8)


def settings_from(args) -> RunSettings:
  return RunSettings(
      backend=resolve_backend("auto"), warmup=1 if args.smoke else args.warmup,
      iters=2 if args.smoke else args.iters,
      max_seconds=1.0 if args.smoke else args.max_seconds,
      peers=not args.no_peers, compile_workers=args.compile_workers,
      only_peers=args.peers)


def _write(out: str, name: str, results: dict) -> None:
  report.write_json(os.path.join(out, f"{name}.json"), results)
  with open(os.path.join(out, f"{name}.md"), "w") as f:
    f.write(report.markdown(results))


def run_sweep(name: str, cases: list[Case], settings: RunSettings, *,
              budget: float, out: str) -> dict:
  """Every case through `CaseRun`; the results dict (`report.py`'s format,
  plus each case's parameters under `params`)."""
  start = time.perf_counter()
  time_left = lambda: budget - (time.perf_counter() - start)
  os.makedirs(out, exist_ok=True)
  devices = jax.devices()
  results = {"meta": {"mode": name, "argv": sys.argv[1:],
                      "device": f"{devices[0].device_kind} x{len(devices)}",
                      "platform": jax.default_backend(), "jax": jax.__version__,
                      "started": datetime.datetime.now().isoformat(timespec="seconds"),
                      "settings": dataclasses.asdict(settings)},
             "cases": [], "measurements": [], "errors": []}
  dense_cache = {}
  # Progress lines go through tqdm, so they print above the bar.
  with contextlib.redirect_stdout(DummyTqdmFile(sys.stdout)):
    bar = tqdm(cases, desc=name, unit="case", file=sys.__stdout__,
               dynamic_ncols=True, mininterval=1.0)
    for case in bar:
      bar.set_postfix_str(f"{case.name}, {max(0.0, time_left()):.0f} s left")
      case_run = CaseRun(case, settings, dense_cache, time_left)
      print(case.describe())
      try:
        case_run.run()
      except Exception as e:  # keep the sweep going; the case says what failed
        results["errors"].append({"case": case.name,
                                  "error": f"{type(e).__name__}: {e}"[:500]})
      finally:
        results["cases"].append({**case_run.info, "params": dataclasses.asdict(case)})
        results["measurements"] += [dataclasses.asdict(m)
                                    for m in case_run.measurements]
        results["meta"]["wall_s"] = time.perf_counter() - start
        _write(out, name, results)
  return results
