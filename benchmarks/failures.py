"""How a failed compile or run is recorded: one short line, not a traceback."""

from __future__ import annotations

MAX_REASON_CHARS = 300


def short_reason(error: BaseException) -> str:
  """`Type: first meaningful line of the message`, at most 300 characters.

  XLA and Triton errors carry pages of IR; the first non-empty line (or the
  one naming the resource that ran out) is what tells a config apart.
  """
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  telling = [line for line in lines
             if any(w in line.lower() for w in ("shared memory", "out of memory",
                                                 "resource", "not supported"))]
  text = (telling or lines or [""])[0]
  return f"{type(error).__name__}: {text}"[:MAX_REASON_CHARS]
