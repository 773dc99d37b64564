"""GPU events of a `jax.profiler` trace directory.

The shared-memory check reads each kernel launch's shared memory from these
events and the kernel breakdown their durations; both walk the same planes.
"""

from __future__ import annotations

import glob
import os
from typing import Iterator

from jax.profiler import ProfileData


def gpu_events(trace_dir: str) -> Iterator:
  """Every event (kernel launches, copies) on a GPU plane of the trace's
  `.xplane.pb` files; each has `name`, `duration_ns` and `stats`."""
  for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
    for plane in ProfileData.from_file(path).planes:
      if not plane.name.startswith("/device:GPU"):
        continue
      for line in plane.lines:
        yield from line.events
