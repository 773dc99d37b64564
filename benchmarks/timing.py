"""How a call is timed, and how its work is counted.

- `time_jax_pipelined`: back-to-back calls, one wait at the end, divided by the
  count, fastest of a few rounds of at least 50 ms each: the device time once
  host dispatch overlaps it (comparable to CUDA event timing, which is what
  `time_torch` reports). The benchmarks' headline.
- `time_jax`: median wall time of blocked calls (JAX dispatch is async, so every
  call's result is waited for inside its own timer): device time plus dispatch
  and synchronisation. Inputs can rotate among several pre-generated sets so a
  small problem is not timed with warm L2 (both JAX timers).
- `time_torch`: median of CUDA-event intervals, the L2 flushed before each call.
- `time_torch_back_to_back`: `time_jax_pipelined`'s method for torch calls,
  so a torch peer can also be compared under the same sustained load.
- `attention_flops` / `tflops`: effective work, 4*B*H*Sq*Sk*D*density for the
  forward and 3.5x that for forward + backward.

Every timer runs `warmup` calls first and times `iters` more (the pipelined
timer more, to fill its rounds), fewer when a call is so slow that they would
exceed `max_seconds` (never fewer than `MIN_ITERS`).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from typing import Any, Callable, Sequence

import jax

MIN_ITERS = 3
BACKWARD_FLOP_FACTOR = 3.5
L2_FLUSH_BYTES = 256 * 1024 * 1024


def _affordable_iters(seconds_per_call: float, iters: int,
                      max_seconds: float | None) -> int:
  if max_seconds is None or seconds_per_call <= 0:
    return iters
  return max(MIN_ITERS, min(iters, int(max_seconds / seconds_per_call)))


def _warm_up(call: Callable[[int], Any], warmup: int) -> float:
  """Run `call(i)` `warmup` times (at least once); seconds the last one took."""
  last = 0.0
  for i in range(max(1, warmup)):
    start = time.perf_counter()
    call(i)
    last = time.perf_counter() - start
  return last


def time_jax(fn: Callable, *args, warmup: int = 3, iters: int = 20,
             arg_sets: Sequence[tuple] | None = None,
             max_seconds: float | None = None) -> float:
  """Median milliseconds of `fn(*args)`, blocking on every call's result.

  Args:
    fn: a jitted (or AOT-compiled) function.
    args: its arguments; ignored when `arg_sets` is given.
    arg_sets: several argument tuples of the same shapes; call i uses set
      `i % len(arg_sets)` (rotating inputs defeats the L2 cache).
    max_seconds: cap on the timed loop's length (see module docstring).
  """
  sets = list(arg_sets) if arg_sets else [args]
  call = lambda i: jax.block_until_ready(fn(*sets[i % len(sets)]))
  per_call = _warm_up(call, warmup)
  times = []
  for i in range(_affordable_iters(per_call, iters, max_seconds)):
    start = time.perf_counter()
    call(i)
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def _back_to_back_ms(call: Callable[[int], Any], wait: Callable[[Any], Any], *,
                     warmup: int, iters: int, max_seconds: float | None,
                     rounds: int, min_round_seconds: float) -> float:
  """Milliseconds per call of `call(i)` issued back to back, `wait(last
  result)` once at the end of a round; the fastest of `rounds` rounds."""
  per_call = _warm_up(lambda i: wait(call(i)), warmup)
  wanted = max(iters, math.ceil(min_round_seconds / per_call) if per_call > 0 else iters)
  n = _affordable_iters(per_call, wanted, max_seconds)
  best = math.inf
  for _ in range(max(1, rounds)):
    start = time.perf_counter()
    out = None
    for i in range(n):
      out = call(i)
    wait(out)
    best = min(best, (time.perf_counter() - start) / n)
  return best * 1e3


def time_jax_pipelined(fn: Callable, *args, warmup: int = 3, iters: int = 20,
                       arg_sets: Sequence[tuple] | None = None,
                       max_seconds: float | None = None, rounds: int = 3,
                       min_round_seconds: float = 0.05) -> float:
  """Milliseconds per call of back-to-back calls, one wait at the end of a round.

  Arguments as `time_jax`. The device runs calls in order, so waiting for the
  last result waits for all of them. A round holds at least `iters` calls and
  enough to last `min_round_seconds` (within `max_seconds`): the first call's
  launch latency and the final wait, paid once per round, would otherwise
  weigh on a short kernel (20 calls of 0.2 ms last 4 ms; the launch and the
  wait take tens of microseconds). The fastest of `rounds` rounds
  is reported (the one least disturbed by the host or clock changes).
  """
  sets = list(arg_sets) if arg_sets else [args]
  return _back_to_back_ms(lambda i: fn(*sets[i % len(sets)]), jax.block_until_ready,
                          warmup=warmup, iters=iters, max_seconds=max_seconds,
                          rounds=rounds, min_round_seconds=min_round_seconds)


def time_torch_back_to_back(calls: Sequence[Callable[[], Any]], *, warmup: int = 3,
                            iters: int = 20, max_seconds: float | None = None,
                            rounds: int = 3, min_round_seconds: float = 0.05) -> float:
  """Milliseconds per call of torch calls issued back to back, rotating
  among `calls` (one per input set), one `torch.cuda.synchronize()` at the
  end of a round: `time_jax_pipelined`'s method, so a torch peer and a JAX
  call are timed alike (same sustained load and clocks, no L2 flush)."""
  import torch
  return _back_to_back_ms(lambda i: calls[i % len(calls)](),
                          lambda _: torch.cuda.synchronize(),
                          warmup=warmup, iters=iters, max_seconds=max_seconds,
                          rounds=rounds, min_round_seconds=min_round_seconds)


@functools.cache
def _torch_l2_flush_buffer():
  import torch
  return torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")


def time_torch(fn: Callable[[], Any], *, warmup: int = 3, iters: int = 20,
               max_seconds: float | None = None) -> float:
  """Median milliseconds of `fn()` on the current CUDA stream (CUDA events).

  The L2 cache is flushed (a 256 MiB memset) before each call, outside the
  events.
  """
  import torch

  def blocked(_):
    fn()
    torch.cuda.synchronize()

  per_call = _warm_up(blocked, warmup)
  n = _affordable_iters(per_call, iters, max_seconds)
  flush = _torch_l2_flush_buffer()
  starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
  ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
  for start, end in zip(starts, ends):
    flush.zero_()
    start.record()
    fn()
    end.record()
  torch.cuda.synchronize()
  return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def attention_flops(batch: int, heads: int, seq_len_q: int, seq_len_kv: int,
                    head_dim: int, density: float, backward: bool = False) -> float:
  """Effective FLOPs: 4*B*H*Sq*Sk*D*density (two matmuls), x3.5 with backward.

  `density` is the fraction of computed (query tile, key tile) pairs, partial
  tiles included (`BlockMask.density()`).
  """
  flops = 4.0 * batch * heads * seq_len_q * seq_len_kv * head_dim * density
  return flops * BACKWARD_FLOP_FACTOR if backward else flops


def tflops(flops: float, ms: float | None) -> float | None:
  """TFLOP/s of `flops` done in `ms` milliseconds (None when not timed)."""
  if not ms:
    return None
  return flops / (ms * 1e-3) / 1e12
