"""Compile many jitted functions ahead of time, several at once.

Compiling dominates a benchmark run (each Pallas kernel is a Triton compile);
XLA compiles without the GIL, so a thread pool overlaps them. Each job is a
jitted function and example arguments; the result is the compiled executable
(called with arguments of the same shapes) or the reason it failed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any, Callable

from benchmarks.failures import short_reason


@dataclasses.dataclass
class Compiled:
  """One job's outcome: `executable` or `error`, and the seconds it took."""

  executable: Callable | None
  seconds: float
  error: str = ""


def _compile(fn, args: tuple) -> Compiled:
  start = time.perf_counter()
  try:
    executable = fn.lower(*args).compile()
  except Exception as e:  # a config that does not fit is a result, not a crash
    return Compiled(None, time.perf_counter() - start, short_reason(e))
  return Compiled(executable, time.perf_counter() - start)


def compile_all(jobs: dict[Any, tuple[Callable, tuple]], workers: int = 8
                ) -> dict[Any, Compiled]:
  """`{key: (jitted_fn, example_args)}` -> `{key: Compiled}`.

  With `workers <= 1` the jobs compile one after another. Seconds per job are
  wall time inside its worker (inflated when workers share the CPUs).
  """
  if workers <= 1 or len(jobs) <= 1:
    return {key: _compile(fn, args) for key, (fn, args) in jobs.items()}
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    futures = {key: pool.submit(_compile, fn, args) for key, (fn, args) in jobs.items()}
    return {key: future.result() for key, future in futures.items()}
