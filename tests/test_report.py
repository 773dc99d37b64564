"""The report's speed ratios: against a peer's flushed-L2 time and against
its back-to-back time, each from its own measurement field."""

import dataclasses

from benchmarks import report
from benchmarks.case_runner import Measurement


def _results():
  ours = Measurement(case="local", impl="bsattn", mode="fwd_bwd", status="ok",
                     ms=0.8, ms_blocked=0.9, tflops=400.0)
  flex = Measurement(case="local", impl="flex", mode="fwd_bwd", status="ok",
                     ms=1.2, ms_back_to_back=1.4)
  return dict(measurements=[dataclasses.asdict(m) for m in (ours, flex)])


def test_summary_gives_both_flex_ratios():
  row = next(line for line in report.summary(_results()).splitlines()
             if line.startswith("local"))
  # case, mode, ms, TFLOP/s, then one ratio per base
  columns = dict(zip((label for _, label in report.SUMMARY_BASES), row.split()[4:]))
  assert columns["x flex"] == "1.50"       # 1.2 / 0.8
  assert columns["x flx-bb"] == "1.75"     # 1.4 / 0.8
  assert columns["x cuDNN"] == "-"


def test_markdown_lists_the_back_to_back_time():
  text = report.markdown(_results())
  flex_row = next(line for line in text.splitlines() if "| flex |" in line)
  assert "| 1.200 |  | 1.400 |" in flex_row
