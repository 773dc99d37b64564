"""The GPU benchmark scripts must keep working between GPU runs.

Device time is scarce; a suite that crashes on the device wastes a whole call.
Their `--smoke` modes run the same code paths on tiny shapes (kernels
interpreted on a CPU), so CI runs them as subprocesses and checks their output.
The token-window path, which no smoke case takes, runs here on a tiny case.
"""

import json
import os
import shutil
import subprocess
import sys

from benchmarks.case_runner import MIN_SECONDS_FOR_FLEX, CaseRun, RunSettings
from benchmarks.cases import TOKEN_WINDOW, Case

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKAMAX_PEERS = ("tokamax_mosaic", "tokamax_triton")


def _run(script: str, *args: str) -> None:
  # On a GPU the test process already holds most of the memory; the child must
  # not try to preallocate its own share.
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *args],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_gpu_suite_smoke_measures_and_checks(tmp_path):
  _run("benchmarks/gpu_suite.py", "--smoke", "--out", str(tmp_path),
       "--cases", "smoke_dense")
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["correctness"], "no correctness check ran"
  assert all(check["passed"] for check in results["correctness"]), results["correctness"]
  ours = {m["mode"]: m for m in results["measurements"] if m["impl"] == "bsattn"}
  for mode in ("mask_build", "fwd", "fwd_bwd"):
    assert ours[mode]["status"] == "ok" and ours[mode]["ms"] > 0, ours.get(mode)
  assert (tmp_path / "results.md").read_text().count("smoke_dense") >= 2
  tokamax = {(m["impl"], m["mode"]): m for m in results["measurements"]
             if m["impl"] in TOKAMAX_PEERS}
  assert set(tokamax) == {(impl, mode) for impl in TOKAMAX_PEERS
                          for mode in ("fwd", "fwd_bwd")}
  assert all(m["status"] == "ok" or m["reason"] for m in tokamax.values()), tokamax


def test_gpu_suite_runs_extras_and_says_what_it_could_not_run(tmp_path):
  """`--extras` runs each check in its own process and records its outcome;
  the memory checker is reported as not run where compute-sanitizer is absent."""
  _run("benchmarks/gpu_suite.py", "--smoke", "--out", str(tmp_path), "--cases",
       "none", "--skip-correctness", "--extras", "smem,memcheck")
  extras = json.loads((tmp_path / "results.json").read_text())["extras"]
  assert extras["smem"]["status"] == "passed", extras["smem"]
  assert (tmp_path / "smem" / "output.log").exists()
  if shutil.which("compute-sanitizer") is None:
    assert extras["memcheck"]["status"].startswith("not run"), extras["memcheck"]
  else:
    assert extras["memcheck"]["status"] == "passed", extras["memcheck"]


def test_token_window_case_times_peers_and_accounts_for_ours():
  """Ours runs the token window (its build timed); peers run too, or say why not."""
  case = Case("tiny_window", batch=1, seq_len_q=256, heads=2, head_dim=64,
              block_size=64, pattern=TOKEN_WINDOW, token_window=(40, 40))
  settings = RunSettings(backend="interpret", warmup=1, iters=2, max_seconds=1.0)
  # Just under flex's share of time: on a GPU, no torch.compile in the tests.
  run = CaseRun(case, settings, {}, lambda: MIN_SECONDS_FOR_FLEX - 1)
  by_impl = {(m.impl, m.mode): m for m in run.run()}
  ours = by_impl[("bsattn", "fwd")]
  assert ours.status == "ok" and by_impl[("bsattn", "mask_build")].status == "ok"
  assert by_impl[("xla", "fwd")].status == "ok"
  tokamax = [by_impl[(impl, "fwd")] for impl in TOKAMAX_PEERS]
  assert all(m.status == "ok" or m.reason for m in tokamax), tokamax


def test_tune_smoke_times_every_kernel(tmp_path):
  _run("benchmarks/tune.py", "--smoke", "--out", str(tmp_path),
       "--forward-configs", "64x64x4x2", "--dkdv-configs", "64x64x4x2",
       "--dq-configs", "64x64x4x2")
  tuning = json.loads((tmp_path / "tuning.json").read_text())
  kernels = next(iter(tuning.values()))["kernels"]
  assert set(kernels) == {"forward", "dkdv", "dq"}
  for rows in kernels.values():
    assert rows and all(row["status"] == "ok" and row["ms"] > 0 for row in rows), rows


def test_mask_build_smoke(tmp_path):
  _run("benchmarks/mask_build.py", "--smoke", "--out", str(tmp_path))
  rows = json.loads((tmp_path / "mask_build.json").read_text())["rows"]
  assert rows and all(r["ms"] > 0 and 0 < r["density"] <= 1 for r in rows), rows


def test_seed_api_bench_smoke(tmp_path):
  _run("benchmarks/seed_api_bench.py", "--smoke", "--out", str(tmp_path))
  rows = json.loads((tmp_path / "seed_api_bench.json").read_text())["rows"]
  assert len(rows) == 4 and all(r["ratio_fwd"] > 0 and r["ratio_fwd_bwd"] > 0
                                for r in rows), rows


def test_memcheck_matrix_cases_run_and_check_themselves():
  """The memory checker's matrix (benchmarks/memcheck.py) stays runnable: its
  packed case (uneven sequences, mixed head types, dropout) on the CPU."""
  from benchmarks import memcheck
  assert memcheck._packed_case(0.2) < 2e-2   # bf16 inputs


def _ours_forward(results: dict) -> list[dict]:
  return [m for m in results["measurements"]
          if m["impl"] == "bsattn" and m["mode"] == "fwd"]


def test_block_size_sweep_smoke(tmp_path):
  _run("benchmarks/block_size_sweep.py", "--smoke", "--out", str(tmp_path))
  results = json.loads((tmp_path / "block_size_sweep.json").read_text())
  blocks = {c["params"]["block_size"] for c in results["cases"]}
  assert blocks == {32, 64}, blocks
  ours = _ours_forward(results)
  assert len(ours) == 2 and all(m["status"] == "ok" and m["ms"] > 0 for m in ours)
  assert (tmp_path / "block_size_sweep.png").stat().st_size > 0
  assert "block64_s100" in (tmp_path / "block_size_sweep.md").read_text()


def test_pattern_sweep_smoke(tmp_path):
  _run("benchmarks/pattern_sweep.py", "--smoke", "--out", str(tmp_path))
  results = json.loads((tmp_path / "pattern_sweep.json").read_text())
  patterns = {c["params"]["pattern"] for c in results["cases"]}
  assert patterns == {"dense", "strided", "random"}, patterns
  assert all(m["status"] == "ok" for m in _ours_forward(results))
  assert (tmp_path / "pattern_sweep.png").stat().st_size > 0


def test_smem_check_names_each_hopper_kernel():
  """Trace names map to their kernels (the Mosaic symbols are `<name>_mosaic_gpu`),
  and each Mosaic kernel is held to its own estimate."""
  import jax.numpy as jnp
  from benchmarks import smem_check
  from pallas_kernels.mosaic_gpu import bwd, fwd
  assert smem_check._kernel_of("body_mosaic_gpu") == "mosaic_forward"
  assert smem_check._kernel_of(f"{bwd.DKDV_KERNEL}_mosaic_gpu") == "mosaic_dkdv"
  assert smem_check._kernel_of(f"{bwd.DQ_KERNEL}_mosaic_gpu") == "mosaic_dq"
  assert smem_check._kernel_of("bsattn_dkdv") == "dkdv"
  call = dict(head_dim=128, dtype="bfloat16", block=128, seq_len=1024)
  assert smem_check.estimate("mosaic_forward", call, None)[0] == \
      fwd.shared_memory_bytes(128, jnp.bfloat16)
  for kernel in ("dkdv", "dq"):
    assert smem_check.estimate(f"mosaic_{kernel}", call, None)[0] == \
        bwd.shared_memory_bytes(kernel, 128, jnp.bfloat16)


def test_smem_check_smoke_runs_without_a_gpu(tmp_path):
  _run("benchmarks/smem_check.py", "--smoke", "--out", str(tmp_path))
  summary = json.loads((tmp_path / "smem_check.json").read_text())
  assert summary["off"] == 0 and not summary["skipped"], summary


def test_block64_ab_smoke(tmp_path):
  """The A/B of the Hopper forward at 64x64 tiles runs every variant (here
  fwd_block64 in Mosaic GPU's interpreter, the API variants on Triton in
  interpret mode) and checks their outputs."""
  _run("benchmarks/block64_ab.py", "--smoke", "--out", str(tmp_path))
  rows = json.loads((tmp_path / "block64_ab.json").read_text())["rows"]
  assert {r["variant"] for r in rows} >= {
      "mosaic128", "mosaic64", "triton64", "mosaic64 sort_rows=False",
      "mosaic64 slots=2", "mosaic64 slots=6"}
  assert all("error" not in r and r["ms"] > 0 for r in rows), rows
  assert all(r["rel_err_vs_triton64"] < 2e-2 for r in rows if r["tile"] == [64, 64])
