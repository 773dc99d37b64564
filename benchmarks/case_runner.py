"""Time bsattn_jax and its peers on one benchmark case, in this process.

For a case: build the user mask and, once, its `BlockMask` (the build is jitted
and timed on its own, as `mask_build`; a token-window case builds it from the
window with `token_window_mask`); draw random inputs (several sets when they
are small next to the L2 cache); compile every JAX implementation at once
(ours gets the prebuilt BlockMask as a jit argument, so its time is the
attention alone); time them; then the torch peers. A dense peer does not look at
the mask, so a shape it was already timed on in this run is reused, not re-run.

Modes: `fwd`; `fwd_bwd` (only for cases with `backward`): the vjp with a fixed
random cotangent, so the backward sees a real gradient, not a sum.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import bsattn_jax
from benchmarks import peers as peer_lib
from benchmarks.aot import Compiled, compile_all
from benchmarks.cases import Case, input_sets_for_l2, user_mask
from benchmarks.failures import short_reason
from benchmarks.timing import (attention_flops, tflops, time_jax,
                               time_jax_pipelined, time_torch,
                               time_torch_back_to_back)
from bsattn_jax import BlockMask, block_sparse_attention

OURS = "bsattn"
# Ours forced onto the Triton kernels: beside OURS on a GPU, where OURS may run
# the Mosaic GPU forward (Hopper), so both kernels are timed in the same run.
OURS_TRITON = "bsattn_triton"
MODES = ("fwd", "fwd_bwd")
MIN_SECONDS_TO_START_CASE = 25.0
MIN_SECONDS_TO_TIME = 5.0
MIN_SECONDS_FOR_FLEX = 45.0          # a torch.compile per case
TIME_BUDGET = "time budget"


@dataclasses.dataclass
class Measurement:
  """One implementation on one case in one mode (JSON-ready)."""

  case: str
  impl: str
  mode: str                    # "fwd", "fwd_bwd" or "mask_build"
  status: str                  # "ok", "failed" or "skipped"
  ms: float | None = None      # device time: JAX back-to-back calls, torch CUDA events
  ms_blocked: float | None = None     # JAX only: median of calls waited for one by one
  # torch only: back-to-back calls over the rotated input sets, one wait (the
  # method of JAX's `ms`, so a peer is also compared under the same load)
  ms_back_to_back: float | None = None
  tflops: float | None = None  # effective, from `ms` and the case's density
  compile_s: float | None = None
  density: float | None = None
  group: str = ""
  reason: str = ""             # why failed / skipped
  note: str = ""


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """How every case of a run is measured."""

  backend: str                 # ours: "pallas" (GPU) or "interpret" (CPU)
  warmup: int = 3
  iters: int = 20
  max_seconds: float = 3.0     # cap per timing loop
  peers: bool = True
  compile_workers: int = 8
  l2_bytes: int = 50 * 2**20   # H100
  # Which peers run (`peers.PEER_NAMES`); empty: all of them.
  only_peers: tuple[str, ...] = ()

  def wants(self, peer: str) -> bool:
    """Whether this run times `peer`."""
    return self.peers and (not self.only_peers or peer in self.only_peers)


def with_backward(attend: Callable) -> Callable:
  """`(q, k, v, do, *extra) -> (dq, dk, dv)` of `attend(q, k, v, *extra)`."""
  def fwd_bwd(q, k, v, do, *extra):
    _, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, *extra), q, k, v)
    return pullback(do)
  return fwd_bwd


def random_inputs(case: Case, num_sets: int, seed: int = 0) -> list[tuple]:
  """`num_sets` tuples (q, k, v, do), BTNH in the case's dtype."""
  q_shape = (case.batch, case.seq_len_q, case.heads, case.head_dim)
  kv_shape = (case.batch, case.sk, case.hkv, case.head_dim)
  sets = []
  for key in jax.random.split(jax.random.PRNGKey(seed), num_sets):
    kq, kk, kv, kdo = jax.random.split(key, 4)
    sets.append(tuple(jax.random.normal(k_, shape, case.jnp_dtype) for k_, shape in
                      ((kq, q_shape), (kk, kv_shape), (kv, kv_shape), (kdo, q_shape))))
  return sets


def jitted_mask_build(case: Case) -> Callable:
  """`user_mask -> BlockMask` for this case's lengths, block size and causality."""
  return jax.jit(functools.partial(
      BlockMask.build, seq_len_q=case.seq_len_q, seq_len_kv=case.sk,
      block_size=(case.block_size, case.block_size), is_causal=case.causal))


# --- Token-level masks: ours on a token sliding window -----------------------
# `bsattn_jax.create_block_mask` (FlexAttention's `mask_fn(b, h, q_idx,
# kv_idx)` signature) and `bsattn_jax.masks.sliding_window` come with token-
# level masks; on a build without them a token-window case times the peers
# only and reports ours as skipped.


def token_window_mask(case: Case) -> BlockMask:
  """Ours' BlockMask of the case's token window, shared by every example and head."""
  left, right = case.token_window
  return bsattn_jax.create_block_mask(
      bsattn_jax.masks.sliding_window(left, right), None, None, case.seq_len_q,
      case.sk, block_size=(case.block_size, case.block_size))


def prebuilt_mask(case: Case) -> BlockMask:
  """The BlockMask ours runs the case with (built eagerly, untimed)."""
  if case.token_window is not None:
    return token_window_mask(case)
  return jitted_mask_build(case)(user_mask(case)[0])


def ours_attend(case: Case, backend: str) -> Callable:
  """`(q, k, v, block_mask) -> out` with a prebuilt BlockMask."""
  def attend(q, k, v, block_mask):
    return block_sparse_attention(q, k, v, block_mask, softmax_scale=case.softmax_scale,
                                  is_causal=case.causal, backend=backend)
  return attend


class CaseRun:
  """Measurements of one case; `run()` fills `self.measurements`."""

  def __init__(self, case: Case, settings: RunSettings, dense_cache: dict,
               time_left: Callable[[], float]):
    self.case, self.settings = case, settings
    self.dense_cache, self.time_left = dense_cache, time_left
    self.measurements: list[Measurement] = []
    self.info: dict = {"case": case.name, "shape": case.describe()}

  def _flops(self, mode: str) -> float:
    c = self.case
    return attention_flops(c.batch, c.heads, c.seq_len_q, c.sk, c.head_dim,
                           self.info["density"], backward=mode == "fwd_bwd")

  def _add(self, impl, mode, status, **fields) -> Measurement:
    m = Measurement(self.case.name, impl, mode, status,
                    density=self.info.get("density"), group=self.case.group, **fields)
    if m.ms is not None and mode in MODES:
      m.tflops = tflops(self._flops(mode), m.ms)
    self.measurements.append(m)
    print(_line(m), flush=True)
    return m

  def _reuse(self, impl: str, mode: str) -> bool:
    """Copy a dense peer's result from a case of the same shape, if there is one."""
    if impl in peer_lib.MASK_AWARE_JAX_PEERS:
      return False
    earlier = self.dense_cache.get((impl, mode, self.case.shape_key()))
    if earlier is None:
      return False
    note = f"timed on {earlier.case} (same shape, mask ignored)"
    self._add(impl, mode, earlier.status, ms=earlier.ms,
              ms_blocked=earlier.ms_blocked,
              ms_back_to_back=earlier.ms_back_to_back, reason=earlier.reason,
              note="; ".join(n for n in (earlier.note, note) if n))
    return True

  def _remember(self, m: Measurement) -> None:
    if m.impl in peer_lib.MASK_AWARE_JAX_PEERS:
      return
    if m.reason != TIME_BUDGET:          # a later case may still have time
      self.dense_cache[(m.impl, m.mode, self.case.shape_key())] = m

  def run(self) -> list[Measurement]:
    case = self.case
    if self.time_left() < MIN_SECONDS_TO_START_CASE:
      self._add(OURS, "fwd", "skipped", reason=TIME_BUDGET)
      return self.measurements
    mask, self.info["mask"] = user_mask(case)
    if case.token_window is not None:
      block_mask = self._build_token_window(mask)
    else:
      block_mask = self._build_block_mask(mask)
      if block_mask is None:
        return self.measurements
    num_sets = input_sets_for_l2(case, self.settings.l2_bytes)
    self.info["input_sets"] = num_sets
    inputs = random_inputs(case, num_sets)
    self._run_jax(block_mask, inputs)
    del inputs
    if any(self.settings.wants(name) for name in peer_lib.TORCH_PEERS):
      self._run_torch(np.asarray(mask), num_sets)
    return self.measurements

  def _build_block_mask(self, mask) -> BlockMask | None:
    """Ours' BlockMask from the user block mask, the jitted build timed."""
    case = self.case
    build = compile_all({OURS: (jitted_mask_build(case), (mask,))}, workers=1)[OURS]
    if build.executable is None:
      self._add(OURS, "mask_build", "failed", reason=build.error, compile_s=build.seconds)
      return None
    block_mask = build.executable(mask)
    self.info["density"] = float(block_mask.density())
    self.info["tile"] = list(block_mask.tile)
    self._time_jax(OURS, "mask_build", build, [(mask,)], "")
    return block_mask

  def _build_token_window(self, blocks) -> BlockMask | None:
    """Ours' BlockMask of a token window, its eager build timed; None if ours can't.

    `blocks` are the blocks the window touches: the density every
    implementation is credited with when ours has no BlockMask to count.
    """
    case = self.case
    self.info["density"] = float(jnp.mean(blocks))
    modes = MODES if case.backward else ("fwd",)
    s = self.settings
    build = lambda: token_window_mask(case)
    start = time.perf_counter()
    try:
      block_mask = jax.block_until_ready(build())
      first_s = time.perf_counter() - start
      ms = time_jax(build, warmup=s.warmup, iters=s.iters, max_seconds=s.max_seconds)
    except Exception as e:
      for mode in ("mask_build",) + modes:
        self._add(OURS, mode, "failed", reason=short_reason(e))
      return None
    self.info["density"] = float(block_mask.density())
    self.info["tile"] = list(block_mask.tile)
    self._add(OURS, "mask_build", "ok", ms=ms, compile_s=first_s,
              note="eager create_block_mask, blocked wall time")
    return block_mask

  # --- JAX: ours and the JAX peers, compiled together -----------------------

  def _jax_jobs(self, block_mask, inputs):
    """`{(impl, mode): (jitted, arg_sets, note)}` of everything to time.

    Ours only with a `block_mask` (None: ours cannot run the case).
    """
    case, modes = self.case, MODES if self.case.backward else ("fwd",)
    jobs = {}
    if block_mask is not None:
      attend = ours_attend(case, self.settings.backend)
      jobs[(OURS, "fwd")] = (jax.jit(attend),
                             [s[:3] + (block_mask,) for s in inputs], "")
      if case.backward:
        jobs[(OURS, "fwd_bwd")] = (jax.jit(with_backward(attend)),
                                   [s + (block_mask,) for s in inputs], "")
      if self.settings.backend == "pallas":
        triton = ours_attend(case, "triton")
        jobs[(OURS_TRITON, "fwd")] = (jax.jit(triton), jobs[(OURS, "fwd")][1],
                                      "backend='triton'")
        if case.backward:
          jobs[(OURS_TRITON, "fwd_bwd")] = (jax.jit(with_backward(triton)),
                                            jobs[(OURS, "fwd_bwd")][1],
                                            "backend='triton'")
    for name, builder in peer_lib.JAX_PEERS.items():
      if not self.settings.wants(name):
        continue
      todo = [mode for mode in modes if not self._reuse(name, mode)]
      if not todo:
        continue
      peer = builder(case)
      if peer.attend is None:
        for mode in todo:
          self._remember(self._add(name, mode, "skipped", reason=peer.reason))
        continue
      cast = ((lambda x: x.astype(peer.input_dtype)) if peer.input_dtype
              else (lambda x: x))
      peer_inputs = [tuple(cast(x) for x in s) for s in inputs]
      for mode in todo:
        fn = peer.attend if mode == "fwd" else jax.jit(with_backward(peer.attend))
        arg_sets = [s[:3] for s in peer_inputs] if mode == "fwd" else peer_inputs
        jobs[(name, mode)] = (fn, arg_sets, peer.note)
    return jobs

  def _run_jax(self, block_mask, inputs) -> None:
    jobs = self._jax_jobs(block_mask, inputs)
    compiled = compile_all({key: (fn, arg_sets[0]) for key, (fn, arg_sets, _) in
                            jobs.items()}, self.settings.compile_workers)
    for (impl, mode), (_, arg_sets, note) in jobs.items():
      m = self._time_jax(impl, mode, compiled[(impl, mode)], arg_sets, note)
      if impl not in (OURS, OURS_TRITON):
        self._remember(m)

  def _time_jax(self, impl, mode, compiled: Compiled, arg_sets, note) -> Measurement:
    s = self.settings
    common = dict(compile_s=compiled.seconds, note=note)
    if compiled.executable is None:
      return self._add(impl, mode, "failed", reason=compiled.error, **common)
    if self.time_left() < MIN_SECONDS_TO_TIME:
      return self._add(impl, mode, "skipped", reason=TIME_BUDGET, **common)
    timer = dict(arg_sets=arg_sets, warmup=s.warmup, iters=s.iters,
                 max_seconds=s.max_seconds)
    try:
      ms = time_jax_pipelined(compiled.executable, **timer)
      ms_blocked = time_jax(compiled.executable, **timer)
    except Exception as e:  # e.g. a launch that needs more shared memory
      return self._add(impl, mode, "failed", reason=short_reason(e), **common)
    return self._add(impl, mode, "ok", ms=ms, ms_blocked=ms_blocked, **common)

  # --- torch: SDPA (dense) and FlexAttention (same block mask) --------------

  def _run_torch(self, mask: np.ndarray, num_sets: int) -> None:
    case, modes = self.case, MODES if self.case.backward else ("fwd",)
    torch, reason = peer_lib.torch_cuda_or_reason()
    if torch is None:
      for impl in filter(self.settings.wants, peer_lib.TORCH_PEERS):
        for mode in modes:
          self._add(impl, mode, "skipped", reason=reason)
      return
    shape_q = (case.batch, case.heads, case.seq_len_q, case.head_dim)
    shape_kv = (case.batch, case.hkv, case.sk, case.head_dim)
    dtype = getattr(torch, case.dtype)
    new = lambda shape: torch.randn(shape, dtype=dtype, device=peer_lib.TORCH_DEVICE)
    # (q, k, v, do) sets rotated as ours are (the first also the flushed timing's)
    sets = [(new(shape_q), new(shape_kv), new(shape_kv), new(shape_q))
            for _ in range(num_sets)]

    sdpa_modes = [mode for mode in modes if not self._reuse("torch_sdpa", mode)]
    if sdpa_modes and self.settings.wants("torch_sdpa"):
      self._time_torch_peer("torch_sdpa", lambda: peer_lib.torch_sdpa(case),
                            sdpa_modes, sets, dense=True)
    if self.settings.wants("flex"):
      if self.time_left() < MIN_SECONDS_FOR_FLEX:
        for mode in modes:
          self._add("flex", mode, "skipped", reason=TIME_BUDGET)
      else:
        self._time_torch_peer("flex", lambda: peer_lib.torch_flex_attention(case, mask),
                              modes, sets, dense=False)
    del sets
    torch.cuda.empty_cache()

  def _time_torch_peer(self, impl, build_peer, modes, sets, dense: bool) -> None:
    import torch
    try:
      peer = build_peer()
    except Exception as e:
      for mode in modes:
        self._add(impl, mode, "failed", reason=short_reason(e))
      return
    if peer.mask_build_ms is not None:
      self._add(impl, "mask_build", "ok", ms=peer.mask_build_ms)
    for mode in modes:
      calls = ([_torch_call(peer.attend, tensors, mode) for tensors in sets]
               if peer.attend else None)
      if calls is None:
        m = self._add(impl, mode, "skipped", reason=peer.reason)
      elif self.time_left() < MIN_SECONDS_TO_TIME:
        m = self._add(impl, mode, "skipped", reason=TIME_BUDGET)
      else:
        m = self._time_torch_call(impl, mode, calls, peer.note)
        torch.cuda.empty_cache()
      if dense:
        self._remember(m)

  def _time_torch_call(self, impl, mode, calls, note) -> Measurement:
    """`ms`: CUDA events with the L2 flushed before each call of the first
    set; `ms_back_to_back`: all sets' calls back to back."""
    import torch
    s = self.settings
    timer = dict(warmup=s.warmup, iters=s.iters, max_seconds=s.max_seconds)
    start = time.perf_counter()
    try:
      calls[0]()                         # compiles (FlexAttention)
      peer_lib.torch_synchronize(torch)
      compile_s = time.perf_counter() - start
      ms = time_torch(calls[0], **timer)
      ms_back_to_back = time_torch_back_to_back(calls, **timer)
    except Exception as e:
      return self._add(impl, mode, "failed", reason=short_reason(e), note=note,
                       compile_s=time.perf_counter() - start)
    return self._add(impl, mode, "ok", ms=ms, ms_back_to_back=ms_back_to_back,
                     compile_s=compile_s, note=note)


def _torch_call(attend, tensors, mode):
  """A no-argument call of `attend` for `mode` (fwd_bwd: out.backward(do))."""
  q, k, v, do = tensors
  if mode == "fwd":
    import torch

    def forward():
      with torch.no_grad():
        return attend(q, k, v)
    return forward
  qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

  def forward_backward():
    qg.grad = kg.grad = vg.grad = None
    attend(qg, kg, vg).backward(do)
  return forward_backward


def _line(m: Measurement) -> str:
  """One progress line per measurement."""
  if m.status != "ok":
    return f"  {m.impl:14s} {m.mode:10s} {m.status}: {m.reason}"
  tf = f"{m.tflops:7.1f} TFLOP/s" if m.tflops is not None else ""
  second = ""
  if m.ms_blocked is not None:
    second = f" (blocked {m.ms_blocked:.3f})"
  elif m.ms_back_to_back is not None:
    second = f" (back to back {m.ms_back_to_back:.3f})"
  return f"  {m.impl:14s} {m.mode:10s} {m.ms:9.3f} ms{second} {tf} {m.note}".rstrip()
