"""Time launch configurations of the Triton kernels on one problem.

What `bsattn_jax.autotune` and `benchmarks/tune.py` share: the default sweep
of candidates, each kernel (forward, dK/dV, dQ) called alone with an explicit
`KernelConfig` on the kernels' flat layout, and the timer: calls issued back
to back with one wait at the end (the device time once dispatch overlaps it),
the fastest of a few rounds. Candidates compile concurrently (XLA compiles
without the GIL); one that fails to compile or run is a result, not an error.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import math
import time
from typing import Callable, NamedTuple

import jax

from pallas_kernels.block_lists import BlockLists
from pallas_kernels.masking import ElementRule
from pallas_kernels.seq_info import StaticSizes
from pallas_kernels.target import Gpu
from pallas_kernels.triton import bwd as triton_bwd
from pallas_kernels.triton import configs
from pallas_kernels.triton import fwd as triton_fwd
from pallas_kernels.triton.configs import KernelConfig

COMPILE_WORKERS = 8
MAX_REASON_CHARS = 300


class Problem(NamedTuple):
  """One attention problem in the kernels' flat layout.

  q, do `[Tq, H, D]`; k, v `[Tk, Hkv, D]`; seq_info `[B, 8]`; the forward
  (`kv_lists`) and transposed (`q_lists`) lists at `mask_tile`.
  """

  q: jax.Array
  k: jax.Array
  v: jax.Array
  do: jax.Array
  seq_info: jax.Array
  kv_lists: BlockLists
  q_lists: BlockLists
  rule: ElementRule
  mask_tile: tuple[int, int]
  static: StaticSizes
  softmax_scale: float

  def table_config(self, kernel: str) -> KernelConfig:
    """The shipped table's config of `kernel` for this problem."""
    return configs.table_config(kernel, self.q.shape[-1], self.q.dtype,
                                self.mask_tile, self.static.q_span)


class Timing(NamedTuple):
  """One candidate: milliseconds per call, or why it has none."""

  config: KernelConfig
  ms: float | None
  is_default: bool
  error: str = ""


def default_candidates(kernel: str) -> list[KernelConfig]:
  """The default sweep, at most 40 configs per kernel.

  forward: block_q {64, 128} x block_kv {32, 64, 128} x warps {4, 8} x stages
  {1..4}, less 8 warps on 32-wide key tiles. dK/dV (owns a key tile, streams
  query tiles) and dQ (owns a query tile, streams key tiles): the tile pairs
  below x warps {4, 8} x stages {1, 2, 3}.
  """
  if kernel == "forward":
    grid = itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3, 4))
    return [KernelConfig(*c) for c in grid if not (c[1] == 32 and c[2] == 8)]
  tile_pairs = {"dkdv": ((32, 64), (32, 128), (64, 64), (64, 128), (128, 64)),
                "dq": ((64, 32), (64, 64), (64, 128), (128, 32), (128, 64))}[kernel]
  return [KernelConfig(bq, bk, w, s) for (bq, bk), w, s in
          itertools.product(tile_pairs, (4, 8), (1, 2, 3))]


def backward_rows(problem: Problem, interpret: bool
                  ) -> tuple[jax.Array, jax.Array]:
  """lse2 and delta `[H, Tq]` for the backward kernels: the forward run once
  with the table's config."""
  o, lse = triton_fwd.forward(
      problem.q, problem.k, problem.v, problem.seq_info, problem.kv_lists,
      softmax_scale=problem.softmax_scale, rule=problem.rule,
      mask_tile=problem.mask_tile, config=problem.table_config("forward"),
      static=problem.static, interpret=interpret)
  return triton_bwd.backward_statistics(o, problem.do, lse, None)


def kernel_call(kernel: str, problem: Problem, config: KernelConfig,
                rows: tuple[jax.Array, jax.Array] | None, interpret: bool
                ) -> tuple[Callable, tuple]:
  """(jitted kernel with `config` baked in, its arguments); `rows` are
  `backward_rows` (unused by the forward)."""
  common = dict(softmax_scale=problem.softmax_scale, rule=problem.rule,
                mask_tile=problem.mask_tile, config=config,
                static=problem.static, interpret=interpret)
  qkv = (problem.q, problem.k, problem.v)
  if kernel == "forward":
    return (jax.jit(functools.partial(triton_fwd.forward, **common)),
            qkv + (problem.seq_info, problem.kv_lists))
  fn = functools.partial(getattr(triton_bwd, kernel), **common)
  lists = problem.q_lists if kernel == "dkdv" else problem.kv_lists
  return jax.jit(fn), qkv + (problem.do, *rows, problem.seq_info, lists)


def time_call(fn: Callable, args: tuple, *, warmup: int = 3, iters: int = 20,
              rounds: int = 3) -> float:
  """Milliseconds per call of `fn(*args)`: `iters` calls back to back and one
  wait, the fastest of `rounds` rounds, after `warmup` calls."""
  for _ in range(max(1, warmup)):
    jax.block_until_ready(fn(*args))
  best = math.inf
  for _ in range(max(1, rounds)):
    start = time.perf_counter()
    out = None
    for _ in range(max(1, iters)):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / max(1, iters))
  return best * 1e3


def _reason(error: Exception) -> str:
  """An exception as one line: compile errors run to pages of IR, and the
  line naming an exhausted resource (or else the first) tells configs apart."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  resource = [line for line in lines
              if "shared memory" in line.lower() or "resource" in line.lower()]
  text = (resource or lines or [""])[0]
  return f"{type(error).__name__}: {text}"[:MAX_REASON_CHARS]


def _compile(fn, args):
  try:
    return fn.lower(*args).compile(), ""
  except Exception as e:  # a config that does not compile is a result
    return None, _reason(e)


def tune_kernel(kernel: str, problem: Problem, candidates: list[KernelConfig],
                *, gpu: Gpu | None, warmup: int, iters: int, interpret: bool,
                rows: tuple[jax.Array, jax.Array] | None = None
                ) -> tuple[KernelConfig, list[Timing]]:
  """Time `kernel`'s candidates and the table's default on `problem`.

  Candidates are clamped to the mask tile and given as many stages as fit
  `gpu`'s shared memory. Returns the winner, the default unless a candidate
  ran faster in this run, and every timing, fastest first.
  """
  head_dim, dtype = problem.q.shape[-1], problem.q.dtype
  default = configs.fit_to_gpu(kernel, problem.table_config(kernel), head_dim,
                               dtype, gpu)
  timings, runnable = [], []
  for cfg in dict.fromkeys([default] + [c.clamp_to(problem.mask_tile)
                                        for c in candidates]):
    try:
      fitted = configs.fit_to_gpu(kernel, cfg, head_dim, dtype, gpu)
    except ValueError as e:
      timings.append(Timing(cfg, None, False, _reason(e)))
      continue
    if fitted not in runnable:
      runnable.append(fitted)
  calls = {cfg: kernel_call(kernel, problem, cfg, rows, interpret)
           for cfg in runnable}
  with concurrent.futures.ThreadPoolExecutor(COMPILE_WORKERS) as pool:
    compiled = dict(zip(calls, pool.map(lambda c: _compile(*c), calls.values())))
  for cfg, (executable, error) in compiled.items():
    ms = None
    if executable is not None:
      try:
        ms = time_call(executable, calls[cfg][1], warmup=warmup, iters=iters)
      except Exception as e:  # e.g. a launch the GPU refuses
        error = _reason(e)
    timings.append(Timing(cfg, ms, cfg == default, error))
  timings.sort(key=lambda t: (t.ms is None, t.ms or 0.0))
  timed = {t.config: t.ms for t in timings if t.ms is not None}
  best = timings[0].config if timed else default
  if default in timed and timed[best] >= timed[default]:
    best = default
  return best, timings
