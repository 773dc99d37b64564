"""The one benchmark command for the GPU machine: tests, correctness, timings.

  PYTHONPATH=. python benchmarks/gpu_suite.py --out $OUT            # everything
  PYTHONPATH=. python benchmarks/gpu_suite.py --out $OUT --quick    # required cases
  PYTHONPATH=. .venv/bin/python benchmarks/gpu_suite.py --smoke --out /tmp/bench_smoke

Steps, each guarded (a failure is recorded and the next step runs):
  1. GPU tests: pytest in a subprocess, first, before this process touches the
     GPU (JAX takes 75% of its memory at first use).
  2. Device info (JAX and torch), and JAX's dispatch overhead.
  3. Correctness at benchmark scale (`correctness.py`) on the backward cases.
  4. The benchmark cases (`case_runner.py`): ours and every peer (`--peers
     cudnn,tokamax_mosaic`: those alone; `--no-peers`: none).
  5. `--tune`: launch-config sweeps (`tune.py`) with the time left.
  6. `--extras`: the other GPU checks, each a subprocess with its own time
     limit and output folder under --out (`EXTRAS`: the shared-memory check,
     compute-sanitizer's memcheck when the machine has it, the seed-API and
     ViT benchmarks, ViT inference, the A/B of the Hopper forward at 64x64
     tiles, each kernel's share of a fwd+bwd call, the autotuner against the
     launch table and across a restart, the block-size and pattern sweeps).
  7. results.json and results.md after every step (so a killed run still leaves
     them), density.png at the end, suite.log (everything printed), pytest.log,
     tuning.json; the SUMMARY table is the last thing printed.
A global budget (`--budget`, default 540 s) is checked before every case and
measurement; what does not fit is reported as skipped, not lost.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import shutil
import signal
import importlib.util
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from benchmarks import peers as peer_lib
from benchmarks import report
from benchmarks.case_runner import CaseRun, RunSettings
from benchmarks.cases import (BENCHMARK_CASES, SMOKE_CASES, SMOKE_TUNING_CASES,
                              TUNING_CASES, select)
from benchmarks.correctness import check_case
from benchmarks.timing import time_jax
from benchmarks.tune import add_candidate_flags, candidates_from, run_tuning
from bsattn_jax.api import resolve_backend

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINAL_RESERVE_S = 15.0      # kept for the plot, the report and the summary
TEST_LOG_TAIL_LINES = 25
# A test running longer than this gets every thread's stack dumped into
# pytest.log (pytest's faulthandler), so a kernel that hangs is named there
# even when the whole run then times out.
TEST_STACK_DUMP_S = 240
# Failures before the GPU tests stop: a few, so one failing test does not
# hide the others' results, but a broken kernel does not spend the budget.
TEST_MAX_FAILURES = 10


class Tee:
  """A text stream writing to several streams (the console and suite.log)."""

  def __init__(self, *streams):
    self.streams = streams

  def write(self, text):
    for s in self.streams:
      s.write(text)
      s.flush()
    return len(text)

  def flush(self):
    for s in self.streams:
      s.flush()


class Deadline:
  """Seconds left of the run's budget."""

  def __init__(self, seconds: float):
    self.start = time.perf_counter()
    self.end = self.start + seconds

  def left(self) -> float:
    return self.end - time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start


def _child_env(**extra: str) -> dict:
  """This process's environment, with the repository first on PYTHONPATH."""
  return dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p), **extra)


def _run_logged(command: list[str], env: dict, seconds: float, log_path: str
                ) -> tuple[int, bool, list[str]]:
  """Runs `command` from the repository root for at most `seconds` (then kills
  it and everything it started), writes its whole output to `log_path`,
  prints the last lines. Returns its exit code, whether it timed out, and
  the output's non-empty lines."""
  proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
  try:
    output, _ = proc.communicate(timeout=seconds)
    timed_out = False
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate()
    timed_out = True
  with open(log_path, "w") as f:
    f.write(output)
  lines = [line for line in output.splitlines() if line.strip()]
  print("\n".join(lines[-TEST_LOG_TAIL_LINES:]), flush=True)
  return proc.returncode, timed_out, lines


def run_tests(test_args: str, budget_s: float, out_dir: str, workers: int) -> dict:
  """pytest in a subprocess with a time limit; full output to pytest.log.

  On the GPU the tests are bound by kernel compilation (~15 s a test, on the
  CPU), so with pytest-xdist installed they run in `workers` processes that
  share the GPU (no memory preallocation). Each test's outcome is printed as
  it finishes (`-v`), so a run cut short still shows which tests passed, and
  the slowest tests are listed at the end. XLA's autotuning is off for them:
  the tests check results, not XLA's speed.
  """
  command = [sys.executable, "-m", "pytest", *shlex.split(test_args), "-v",
             f"--maxfail={TEST_MAX_FAILURES}",
             "--durations=15", "-p", "no:cacheprovider",
             "-o", f"faulthandler_timeout={TEST_STACK_DUMP_S}"]
  env = _child_env(XLA_FLAGS=" ".join(
      f for f in (os.environ.get("XLA_FLAGS", ""), "--xla_gpu_autotune_level=0") if f))
  if workers > 1 and importlib.util.find_spec("xdist") is not None:
    command += ["-n", str(workers)]
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  start = time.perf_counter()
  budget_s = max(1.0, budget_s)
  returncode, timed_out, lines = _run_logged(
      command, env, budget_s, os.path.join(out_dir, "pytest.log"))
  if timed_out:
    status = f"timed out after {budget_s:.0f} s (partial output in pytest.log)"
  else:
    status = {0: "passed", 5: "no tests collected"}.get(
        returncode, "failed" if returncode == 1 else "error")
  return {"command": " ".join(command[1:]), "status": status,
          "returncode": returncode, "seconds": time.perf_counter() - start,
          "summary": lines[-1] if lines and returncode >= 0 else ""}


# name -> (command after the interpreter, seconds): run by `--extras`; `{out}`
# is the extra's own folder, `{budget}` 90% of its seconds (fewer when the
# run's budget has less left), so it can finish before it is killed.
EXTRAS = {
    "smem": ("benchmarks/smem_check.py --out {out} --budget {budget}", 150),
    "spills": ("benchmarks/spill_report.py --out {out}", 150),
    # Under the checker each case compiles slowly (about a minute): the
    # whole matrix needs a call of its own.
    "memcheck": ("benchmarks/memcheck.py", 540),
    "seed_api": ("benchmarks/seed_api_bench.py --out {out}", 180),
    "vit_inference": ("examples/vit_inference.py --fresh --out {out}", 240),
    "vit_step": ("benchmarks/vit_step.py --attention reference,global_local "
                 "--warmup 2 --steps 5 --out {out}", 300),
    "block64_ab": ("benchmarks/block64_ab.py --out {out}", 240),
    "breakdown": ("benchmarks/kernel_breakdown.py --out {out} --cases "
                  "vit_b_s197,vit_l_s577,dense_s8192_d64 --backends pallas,triton", 180),
    "autotune": ("benchmarks/autotune_check.py --out {out} --budget {budget}", 240),
    "sweeps": ("benchmarks/sweeps.py --out {out} --budget {budget}", 300),
}


def _sanitizer() -> str | None:
  """compute-sanitizer's path, if this machine has it."""
  return shutil.which("compute-sanitizer") or next(
      (p for p in ("/usr/local/cuda/bin/compute-sanitizer",
                   "/usr/local/cuda/compute-sanitizer/compute-sanitizer")
       if os.path.exists(p)), None)


def run_extra(name: str, out_dir: str, budget_s: float, smoke: bool) -> dict:
  """One of `EXTRAS` in a subprocess (memcheck under compute-sanitizer, with
  XLA's autotuning off so the checker sees only the kernels' launches;
  `smoke`: the scripts' tiny CPU sizes)."""
  template, limit = EXTRAS[name]
  seconds = max(1.0, min(limit, budget_s))
  folder = os.path.join(out_dir, name)
  os.makedirs(folder, exist_ok=True)
  command = [sys.executable, *shlex.split(template.format(
      out=folder, budget=int(seconds * 0.9)))]
  if smoke and name != "memcheck":
    command.append("--smoke")
  env = _child_env(XLA_PYTHON_CLIENT_PREALLOCATE="false")
  if name == "memcheck":
    sanitizer = _sanitizer()
    if sanitizer is None:
      return {"status": "not run: compute-sanitizer is not on this machine"}
    command = [sanitizer, "--tool", "memcheck", "--error-exitcode", "3", *command]
    env["XLA_FLAGS"] = "--xla_gpu_autotune_level=0"
  start = time.perf_counter()
  returncode, timed_out, lines = _run_logged(
      command, env, seconds, os.path.join(folder, "output.log"))
  status = (f"timed out after {seconds:.0f} s" if timed_out else
            "passed" if returncode == 0 else f"exit code {returncode}")
  return {"command": " ".join(command), "status": status,
          "seconds": time.perf_counter() - start,
          "tail": lines[-TEST_LOG_TAIL_LINES:]}


def device_info() -> dict:
  """JAX (and torch, when importable) devices and versions; JAX dispatch cost."""
  devices = jax.devices()
  info = {"device": f"{devices[0].device_kind} x{len(devices)}",
          "platform": jax.default_backend(), "jax": jax.__version__,
          "jax_devices": [str(d) for d in devices]}
  tiny = jnp.ones((8,), jnp.float32)
  info["jax_dispatch_ms"] = time_jax(jax.jit(lambda x: x + 1), tiny, iters=50)
  try:
    import torch
    info["torch"] = torch.__version__
    if torch.cuda.is_available():
      info["torch_device"] = torch.cuda.get_device_name()
  except Exception as e:  # ImportError, or a CUDA library clash at import
    info["torch"] = f"not importable ({type(e).__name__}: {e})"
  return info


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"),
                      help="output directory (default $OUT or bench_out)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny cases for a CPU check (kernels interpreted)")
  parser.add_argument("--quick", action="store_true",
                      help="required cases only (their forward; fwd+bwd of the 3)")
  parser.add_argument("--cases", default=None,
                      help="comma-separated name globs/substrings ('none': no cases)")
  parser.add_argument("--no-peers", action="store_true", help="time only bsattn")
  parser.add_argument("--peers", type=peer_lib.peer_names_arg, default=(),
                      help="comma-separated peers to time (default: all), of "
                           f"{', '.join(peer_lib.PEER_NAMES)}")
  parser.add_argument("--tests", default=None,
                      help="pytest arguments (default 'tests'; smoke: no tests)")
  parser.add_argument("--skip-tests", action="store_true")
  parser.add_argument("--test-budget", type=float, default=120.0, help="seconds")
  parser.add_argument("--test-workers", type=int, default=14,
                      help="pytest-xdist processes when xdist is installed (1 = serial)")
  parser.add_argument("--skip-correctness", action="store_true")
  parser.add_argument("--tune", action="store_true", help="sweep launch configs last")
  parser.add_argument("--tune-budget", type=float, default=180.0, help="seconds")
  parser.add_argument("--extras", default="",
                      help=f"comma-separated, run after the cases: {', '.join(EXTRAS)}")
  parser.add_argument("--budget", type=float, default=540.0,
                      help="seconds for the whole run (the machine allows 600)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--max-seconds", type=float, default=3.0,
                      help="cap on one timing loop (slow calls get fewer iters)")
  parser.add_argument("--compile-workers", type=int, default=8,
                      help="threads compiling at once (1: one at a time)")
  add_candidate_flags(parser)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  extras = [name for name in args.extras.split(",") if name]
  unknown = sorted(set(extras) - set(EXTRAS))
  if unknown:
    raise SystemExit(f"--extras: unknown {unknown}; known: {sorted(EXTRAS)}")
  clock = Deadline(args.budget)
  time_left = lambda: clock.left() - FINAL_RESERVE_S
  os.makedirs(args.out, exist_ok=True)
  log = open(os.path.join(args.out, "suite.log"), "w")
  sys.stdout, sys.stderr = Tee(sys.__stdout__, log), Tee(sys.__stderr__, log)
  mode = "smoke" if args.smoke else "quick" if args.quick else "full"
  results = {"meta": {"mode": mode, "argv": sys.argv[1:],
                      "started": datetime.datetime.now().isoformat(timespec="seconds")},
             "tests": None, "correctness": [], "cases": [], "measurements": [],
             "tuning": None, "errors": []}

  def step(name, fn):
    print(f"\n=== {name} ({clock.elapsed():.0f} s elapsed) ===", flush=True)
    try:
      fn()
    except Exception as e:
      traceback.print_exc()
      results["errors"].append({"step": name, "error": f"{type(e).__name__}: {e}"[:500]})
    results["meta"]["wall_s"] = clock.elapsed()
    report.write_results(args.out, results)

  test_args = args.tests or ("" if args.smoke else "tests")  # smoke: only if asked
  if test_args and not args.skip_tests:
    step("tests", lambda: results.__setitem__(
        "tests", run_tests(test_args, min(args.test_budget, time_left()), args.out,
                           args.test_workers)))
  step("device", lambda: results["meta"].update(device_info()))
  print(results["meta"], flush=True)

  backend = resolve_backend("auto")
  settings = RunSettings(
      backend=backend, warmup=1 if args.smoke else args.warmup,
      iters=2 if args.smoke else args.iters,
      max_seconds=1.0 if args.smoke else args.max_seconds,
      peers=not args.no_peers, compile_workers=args.compile_workers,
      only_peers=args.peers)
  results["meta"]["settings"] = dataclasses.asdict(settings)
  cases = SMOKE_CASES if args.smoke else BENCHMARK_CASES
  cases = select([c for c in cases if c.required or not args.quick], args.cases)

  if not args.skip_correctness:
    for case in [c for c in cases if c.backward]:
      if time_left() < 30:
        results["errors"].append({"step": f"correctness {case.name}",
                                  "error": "skipped: time budget"})
        continue
      step(f"correctness {case.name}",
           lambda case=case: _record_checks(results, check_case(case, backend)))

  dense_cache = {}
  for case in cases:
    def run_one(case=case):
      case_run = CaseRun(case, settings, dense_cache, time_left)
      print(case.describe(), flush=True)
      try:
        case_run.run()
      finally:   # keep what was measured before a crash
        print(f"  mask: {case_run.info.get('mask')}, density "
              f"{case_run.info.get('density', float('nan')):.3f}", flush=True)
        results["cases"].append(case_run.info)
        results["measurements"] += [dataclasses.asdict(m) for m in case_run.measurements]
    step(f"case {case.name}", run_one)

  if args.tune:
    tune_end = time.perf_counter() + min(args.tune_budget, time_left())
    tune_cases = SMOKE_TUNING_CASES if args.smoke else TUNING_CASES
    step("tuning", lambda: results.__setitem__("tuning", run_tuning(
        tune_cases, ["forward", "dkdv", "dq"], candidates_from(args, args.smoke),
        interpret=backend == "interpret", warmup=settings.warmup,
        iters=settings.iters, workers=args.compile_workers,
        time_left=lambda: tune_end - time.perf_counter())))
    if results["tuning"]:
      report.write_json(os.path.join(args.out, "tuning.json"), results["tuning"])

  for name in extras:
    step(f"extra {name}", lambda name=name: results.setdefault("extras", {}).__setitem__(
        name, run_extra(name, args.out, time_left(), args.smoke)))

  def finish():
    drawn = report.plot_density(os.path.join(args.out, "density.png"),
                                results["measurements"])
    print(f"density.png {'written' if drawn else 'not drawn (no sweep points)'}; "
          f"outputs in {args.out}", flush=True)
  step("report", finish)
  print(report.summary(results), flush=True)
  return 0


def _record_checks(results: dict, checks: list[dict]) -> None:
  results["correctness"] += checks
  for c in checks:
    errors = ", ".join(f"{k} {v:.2e}" for k, v in c.get("rel_err", {}).items())
    print(f"  {c['check']}: {'ok' if c.get('passed') else 'FAILED'} "
          f"{errors or c.get('error', '')}", flush=True)


if __name__ == "__main__":
  code = main()
  sys.stdout.flush()
  sys.stderr.flush()
  # Skip interpreter teardown: torch.compile's worker pool can stall it, and
  # nothing should print after the summary.
  os._exit(code)
