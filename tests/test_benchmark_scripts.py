"""The GPU benchmark scripts must keep working between GPU runs.

Device time is scarce; a suite that crashes on the device wastes a whole call.
Their `--smoke` modes run the same code paths on tiny shapes (kernels
interpreted on a CPU), so CI runs them as subprocesses and checks their output.
The token-window path, which no smoke case takes, runs here on a tiny case.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from benchmarks import gpu_suite
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
  the memory checker is reported as not run where compute-sanitizer is absent
  (where it is there, memcheck is a GPU job of its own, minutes under the
  checker, not part of this smoke run). The autotune check really autotunes
  (interpreted, one tiny shape) and reads the cache back in a fresh process;
  the sweeps run both sweeps."""
  no_sanitizer = gpu_suite._sanitizer() is None
  extras = "smem,autotune,sweeps" + (",memcheck" if no_sanitizer else "")
  _run("benchmarks/gpu_suite.py", "--smoke", "--out", str(tmp_path), "--cases",
       "none", "--skip-correctness", "--extras", extras)
  extras = json.loads((tmp_path / "results.json").read_text())["extras"]
  assert extras["smem"]["status"] == "passed", extras["smem"]
  assert (tmp_path / "smem" / "output.log").exists()
  if no_sanitizer:
    assert extras["memcheck"]["status"].startswith("not run"), extras["memcheck"]

  assert extras["autotune"]["status"] == "passed", extras["autotune"]
  check = json.loads((tmp_path / "autotune" / "autotune_check.json").read_text())
  assert check["passed"] and not check["failures"], check["failures"]
  [shape] = check["shapes"]
  assert shape["implementations"] == {"forward": "triton", "backward": "triton"}
  assert shape["table_launch"] == {k: v["table"] for k, v in shape["kernels"].items()}
  assert shape["tuned_launch"] == {k: v["tuned"] for k, v in shape["kernels"].items()}
  for kernel in ("forward", "dkdv", "dq"):     # the table's config and one more
    assert len(shape["kernels"][kernel]["timings"]) == 2, shape["kernels"][kernel]
  restarted = check["restart"]["shapes"][shape["case"]]
  assert restarted["loaded"] and restarted["fwd_bwd_ms"] > 0, restarted
  assert check["restart"]["env"] == check["meta"]["cache"]
  rows = {row["kernel"]: row for row in check["table"]}
  assert set(rows) == {"forward", "dkdv", "dq", "fwd+bwd"}
  assert all(row["restart_loaded"] and row["tuned_ms"] > 0 for row in rows.values())

  assert extras["sweeps"]["status"] == "passed", extras["sweeps"]
  for name in ("block_size_sweep", "pattern_sweep"):
    sweep = json.loads((tmp_path / "sweeps" / f"{name}.json").read_text())
    ours = _ours_forward(sweep)
    assert ours and all(m["status"] == "ok" for m in ours), (name, ours)


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


def test_only_the_chosen_peers_are_timed():
  """`RunSettings.only_peers` (the suite's --peers) limits the peers a case
  times to those named; ours is timed as always."""
  case = Case("tiny_dense", batch=1, seq_len_q=128, heads=1, head_dim=32,
              block_size=64, backward=True)
  settings = RunSettings(backend="interpret", warmup=1, iters=2, max_seconds=1.0,
                         only_peers=("xla",))
  impls = {m.impl for m in CaseRun(case, settings, {}, lambda: 600.0).run()}
  assert impls == {"bsattn", "xla"}, impls


def test_suite_refuses_unknown_peers(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "benchmarks/gpu_suite.py"),
       "--smoke", "--out", str(tmp_path), "--peers", "cudnn,nopeer"],
      cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=REPO_ROOT),
      capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "argument --peers: unknown ['nopeer']" in result.stderr, result.stderr


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
  packed case (uneven sequences, mixed head types, dropout) and a padded one
  with dropout, on the CPU."""
  from benchmarks import memcheck
  assert memcheck._packed_case(0.2) < 2e-2   # bf16 inputs
  assert memcheck._padded_case(*memcheck.PADDED_DROPOUT[1],
                               dropout=memcheck.DROPOUT_RATE) < 2e-2


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


def test_autotune_check_shapes_run_triton_on_hopper():
  """The autotune check's shapes launch the Triton forward, dK/dV and dQ
  (the kernels the autotuner tunes) when traced for a Hopper GPU."""
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType
  from benchmarks import autotune_check
  from benchmarks.case_runner import jitted_mask_build
  from benchmarks.cases import user_mask
  hopper = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=
                        AbstractDevice(device_kind="NVIDIA H200", num_cores=132,
                                       platform="cuda"))
  for case in autotune_check.CASES:
    block_mask = jitted_mask_build(case)(user_mask(case)[0])
    call = autotune_check.kernel_call(case, block_mask, "pallas")
    with jax.sharding.use_abstract_mesh(hopper):
      assert autotune_check.implementations(call) == {
          "forward": "triton", "backward": "triton"}, case.name


def test_autotune_check_candidates_and_verdict():
  """Candidates: the table's config first, then its nearest neighbours in the
  default sweep, clamped to the mask tile. The verdict fails a tuned time
  over the table's x tolerance (unless times are not gated) and a config the
  restarted process did not load."""
  from benchmarks import autotune_check as ac
  from pallas_kernels.triton.configs import KernelConfig
  table = KernelConfig(64, 64, 4, 3)
  found = ac.nearby_candidates("forward", table, (64, 64), 8)
  assert found[0] == table and len(found) == len(set(found)) == 8
  assert all(c.block_q <= 64 and c.block_kv <= 64 for c in found)
  assert {KernelConfig(64, 32, 4, 3), KernelConfig(64, 64, 8, 3),
          KernelConfig(64, 64, 4, 2)} < set(found)      # one field away

  kernels = {k: {"table": "64x64x4x2", "tuned": "64x64x4x2", "table_ms": 1.0,
                 "tuned_ms": 1.0} for k in ("forward", "dkdv", "dq")}
  row = {"case": "s", "kernels": kernels, "fwd_bwd": {"table_ms": 2.0, "tuned_ms": 2.1},
         "table_launch": {k: "64x64x4x2" for k in kernels},
         "tuned_launch": {k: "64x64x4x2" for k in kernels}}
  restart = {"shapes": {"s": {"loaded": True, "fwd_bwd_ms": 2.0,
                              "launch": {k: "64x64x4x2" for k in kernels}}}}
  lines = ac.table_rows([row], restart)
  assert [line["kernel"] for line in lines] == ["forward", "dkdv", "dq", "fwd+bwd"]
  [slow] = ac.failures([row], restart, lines, 1.02, gate_times=True)
  assert "s fwd+bwd: tuned 2.1000 ms > table 2.0000 ms x 1.02" in slow
  assert ac.failures([row], restart, lines, 1.02, gate_times=False) == []
  assert ac.failures([row], restart, lines, 1.1, gate_times=True) == []
  restart["shapes"]["s"]["loaded"] = False
  lines = ac.table_rows([row], restart)
  assert len(ac.failures([row], restart, lines, 1.1, gate_times=True)) == 4


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


def test_spill_report_reads_ptxas_reports():
  """Each kernel's spill bytes come from its own report (a warning line
  before one of them, Mosaic GPU's symbol suffix dropped), and a report
  without its stack frame line is an error, not a silent zero."""
  from benchmarks import spill_report
  text = (
      "ptxas warning : Registers are spilled to local memory in function "
      "'mosaic_dkdv_mosaic_gpu_kernel', 280 bytes spill stores, 404 bytes spill loads\n"
      "ptxas info    : Compiling entry function 'mosaic_dkdv_mosaic_gpu_kernel' for 'sm_90a'\n"
      "ptxas info    : Function properties for mosaic_dkdv_mosaic_gpu_kernel\n"
      "    288 bytes stack frame, 280 bytes spill stores, 404 bytes spill loads\n"
      "ptxas info    : Used 168 registers, used 16 barriers, 288 bytes cumulative stack size\n"
      "ptxas info    : Compiling entry function 'body_mosaic_gpu_kernel' for 'sm_90a'\n"
      "ptxas info    : Function properties for body_mosaic_gpu_kernel\n"
      "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
  assert spill_report.parse_ptxas(text) == {
      "mosaic_dkdv": dict(stack=288, spill_stores=280, spill_loads=404),
      "body": dict(stack=0, spill_stores=0, spill_loads=0)}
  with pytest.raises(ValueError, match="no stack frame"):
    spill_report.parse_ptxas(
        "ptxas info : Compiling entry function 'body_mosaic_gpu_kernel' for 'sm_90a'\n")


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


def test_kernel_breakdown_smoke(tmp_path):
  """The per-kernel profile runs a backward case end to end (on a CPU the trace
  has no GPU kernels, so only the call's own timing is there to check)."""
  _run("benchmarks/kernel_breakdown.py", "--smoke", "--out", str(tmp_path))
  rows = json.loads((tmp_path / "kernel_breakdown.json").read_text())["rows"]
  assert [(r["case"], r["backend"]) for r in rows] == [("smoke_dense", "interpret")]
  assert rows[0]["pipelined_us"] > 0
