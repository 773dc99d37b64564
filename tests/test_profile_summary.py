"""The Hopper profile summary (benchmarks/profile_hopper.py) on a hand-made trace."""

import json

import numpy as np
import pytest

from benchmarks.profile_hopper import format_summary, regions_of, summarize


def _trace(pid, tid, regions):
  """Dump-format events of `(name, start_cycle, end_cycle)` regions."""
  events = []
  for name, start, end in regions:
    events.append({"name": name, "ph": "B", "ts": start / 1e3, "pid": pid, "tid": tid})
    events.append({"name": name, "ph": "E", "ts": end / 1e3, "pid": pid, "tid": tid})
  return events


def _step(t0):
  """One key tile: qk 20, softmax 20, turn 5, pv 20 cycles (65 from t0)."""
  return [("qk", t0, t0 + 20), ("softmax", t0 + 20, t0 + 40),
          ("turn", t0 + 40, t0 + 45), ("pv", t0 + 45, t0 + 65)]


# Item 1: item_start [0, 10), two steps [10, 140), epilogue [140, 170).
# Item 2: 30 cycles idle, item_start [200, 210), one step [210, 275),
# epilogue [275, 300).
_COMPUTE = ([("item_start", 0, 10)] + _step(10) + _step(75) + [("epilogue", 140, 170)]
            + [("item_start", 200, 210)] + _step(210) + [("epilogue", 275, 300)])
_MEMORY = [("q_free_wait", 0, 4), ("k_free_wait", 50, 150), ("v_free_wait", 150, 200)]


def _events():
  # tid = 1 + trace index: traces 0, 1 compute, 2 memory (one program, SM 7)
  return (_trace(8, 1, _COMPUTE) + _trace(8, 2, _COMPUTE) + _trace(8, 3, _MEMORY))


def test_regions_pair_begin_and_end_in_cycles():
  regions = regions_of(_trace(1, 1, [("a", 100, 250), ("b", 250, 260)]))
  assert regions == [("a", pytest.approx(100), pytest.approx(250)),
                     ("b", pytest.approx(250), pytest.approx(260))]


def test_summary_of_a_hand_made_trace():
  summary = summarize(_events())
  compute, memory = summary["compute"], summary["memory"]
  assert compute["traces"] == 2 and memory["traces"] == 1
  assert compute["mean_span_cycles"] == pytest.approx(300)
  # 30 idle cycles between the items are outside every region
  assert compute["outside_share"] == pytest.approx(30 / 300)
  assert compute["regions"]["qk"]["per_trace"] == 3
  assert compute["regions"]["softmax"]["mean_cycles"] == pytest.approx(20)
  assert compute["regions"]["epilogue"]["mean_cycles"] == pytest.approx(27.5)
  assert compute["regions"]["turn"]["share"] == pytest.approx(15 / 300)
  items = compute["items"]
  # items run [0, 170) and [170, 300): 150 cycles on average, 1.5 steps of 65
  assert items["mean_item_cycles"] == pytest.approx(150)
  assert items["mean_steps_per_item"] == pytest.approx(1.5)
  assert items["median_step_cycles"] == pytest.approx(65)
  assert items["mean_cycles_beyond_steps"] == pytest.approx(150 - 1.5 * 65)
  assert memory["mean_span_cycles"] == pytest.approx(200)
  assert memory["outside_share"] == pytest.approx((200 - 154) / 200)
  assert "items" not in memory


def test_format_names_every_region_and_converts_at_the_given_clock():
  text = format_summary(summarize(_events()), ghz=1.5)
  for region in ("item_start", "qk", "softmax", "turn", "pv", "epilogue",
                 "q_free_wait", "k_free_wait", "v_free_wait"):
    assert region in text
  # 300 cycles at 1.5 GHz = 0.2 us
  assert "(0.200 us)" in text


def test_summary_reads_the_profilers_own_dump(tmp_path):
  """A buffer laid out as the kernel leaves it, dumped by Mosaic GPU's own
  `ProfilerSpec.dump`, summarizes to the regions written into it."""
  profiler = pytest.importorskip("jax.experimental.mosaic.gpu.profiler")
  entries = 80
  spec = profiler.ProfilerSpec(entries, dump_path=str(tmp_path))
  warpgroups, programs = 3, 2
  buffer = np.zeros((programs, warpgroups, entries), np.uint32)
  regions = {0: _COMPUTE, 1: _COMPUTE, 2: _MEMORY}
  for program in range(programs):
    for wg, wg_regions in regions.items():
      # Each recorded event costs the kernel ~12 cycles; the dump takes that
      # back out (it estimates the cost from the closest pair of events).
      words, cost = [], 0
      for name, start, end in wg_regions:
        tag = spec.intern_name(name)
        words += [tag, 1000 + start + cost, tag | profiler.ProfilerSpec.EXIT,
                  1000 + end + cost + 12]
        cost += 24
      header = [5_000_000 + program, 40 + program, len(words)]   # start ns, SM, count
      buffer[program, wg, :3 + len(words)] = header + words
  path = tmp_path / "trace.json"
  with open(path, "w") as f:
    spec.dump(buffer.reshape(-1), f, grid=(programs,), block=(128 * warpgroups,))
  with open(path) as f:
    events = json.load(f)["traceEvents"]
  summary = summarize(events, warpgroups=warpgroups)
  assert summary["compute"]["traces"] == 2 * programs
  assert summary["memory"]["traces"] == programs
  # within a cycle per recorded event of the regions written
  assert summary["compute"]["mean_span_cycles"] == pytest.approx(300, abs=32)
  assert summary["compute"]["regions"]["softmax"]["mean_cycles"] == pytest.approx(20, abs=2)
  assert summary["compute"]["regions"]["qk"]["per_trace"] == 3
  assert summary["compute"]["items"]["mean_steps_per_item"] == pytest.approx(1.5)
