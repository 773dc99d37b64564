"""GPU events of a `jax.profiler` trace directory.

The shared-memory check reads each kernel launch's shared memory from these
events and the kernel breakdown their durations and the idle time between
them; all walk the same planes.
"""

from __future__ import annotations

import glob
import os
from typing import Iterator

from jax.profiler import ProfileData


def gpu_lines(trace_dir: str) -> Iterator[tuple[str, list]]:
  """(line name, its events) of every line on a GPU plane of the trace's
  `.xplane.pb` files: one line per CUDA stream, plus any summary lines the
  profiler adds."""
  for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
    for plane in ProfileData.from_file(path).planes:
      if plane.name.startswith("/device:GPU"):
        for line in plane.lines:
          yield line.name, list(line.events)


def gpu_events(trace_dir: str) -> Iterator:
  """Every event (kernel launches, copies) on a GPU plane of the trace; each
  has `name`, `start_ns`, `duration_ns` and `stats`."""
  for _, events in gpu_lines(trace_dir):
    yield from events
