"""The GPU benchmark scripts must keep working between GPU runs.

Device time is scarce; a suite that crashes on the device wastes a whole call.
Their `--smoke` modes run the same code paths on tiny shapes (kernels
interpreted on a CPU), so CI runs them as subprocesses and checks their output.
"""

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_tune_smoke_times_every_kernel(tmp_path):
  _run("benchmarks/tune.py", "--smoke", "--out", str(tmp_path),
       "--forward-configs", "64x64x4x2", "--dkdv-configs", "64x64x4x2",
       "--dq-configs", "64x64x4x2")
  tuning = json.loads((tmp_path / "tuning.json").read_text())
  kernels = next(iter(tuning.values()))["kernels"]
  assert set(kernels) == {"forward", "dkdv", "dq"}
  for rows in kernels.values():
    assert rows and all(row["status"] == "ok" and row["ms"] > 0 for row in rows), rows
