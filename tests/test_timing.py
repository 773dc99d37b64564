"""The pipelined timers' rounds (JAX's and torch's): long enough to hide the
per-round costs, the fastest one reported."""

import sys
import time
import types

import jax.numpy as jnp

from benchmarks.timing import time_jax_pipelined, time_torch_back_to_back

CALL_SECONDS = 0.002


def _sleeping_call(log):
  def call(x):
    log.append(x)
    time.sleep(CALL_SECONDS)
    return jnp.asarray(x)
  return call


def test_rounds_fill_the_minimum_duration_and_report_the_per_call_time():
  log = []
  ms = time_jax_pipelined(_sleeping_call(log), 1.0, warmup=2, iters=5, rounds=3,
                          min_round_seconds=0.04)
  timed = len(log) - 2
  assert timed % 3 == 0
  per_round = timed // 3
  # 0.04 s of 2 ms calls: up to 20 per round (fewer when the warm-up call
  # ran long on a busy machine), more than `iters`.
  assert 5 < per_round <= 20
  assert CALL_SECONDS * 1e3 <= ms < 5 * CALL_SECONDS * 1e3


def test_max_seconds_caps_a_round():
  log = []
  time_jax_pipelined(_sleeping_call(log), 1.0, warmup=1, iters=5, rounds=2,
                     min_round_seconds=1.0, max_seconds=0.02)
  per_round = (len(log) - 1) // 2
  assert 3 <= per_round <= 10


def test_fastest_round_is_reported():
  slow = 0.05   # far from CALL_SECONDS, so a busy machine cannot blur them
  delays = iter([0.0] + [slow] * 10 + [CALL_SECONDS] * 10 + [slow] * 10)

  def call(x):
    time.sleep(next(delays))
    return jnp.asarray(x)

  ms = time_jax_pipelined(call, 1.0, warmup=1, iters=10, rounds=3,
                          min_round_seconds=0.0)
  assert CALL_SECONDS * 1e3 <= ms < 0.5 * slow * 1e3


def test_torch_back_to_back_rotates_the_calls_and_waits_once_a_round(monkeypatch):
  """Torch calls are timed as JAX's: every input set's call in turn, one
  device wait at the end of each round (a stub stands in for torch)."""
  log = []
  stub = types.ModuleType("torch")
  stub.cuda = types.SimpleNamespace(synchronize=lambda: log.append("wait"))
  monkeypatch.setitem(sys.modules, "torch", stub)

  def call_of(name):
    def call():
      log.append(name)
      time.sleep(CALL_SECONDS)
    return call

  ms = time_torch_back_to_back([call_of("a"), call_of("b")], warmup=2, iters=4,
                               rounds=2, min_round_seconds=0.0)
  calls = [x for x in log if x != "wait"]
  assert calls[:2] == ["a", "b"] and log[1] == "wait"      # warm-up: waited each
  timed = log[4:]
  assert timed == ["a", "b", "a", "b", "wait"] * 2
  assert CALL_SECONDS * 1e3 <= ms < 5 * CALL_SECONDS * 1e3
