"""Opt-in autotuning of the Triton kernels' launch configurations for a shape.

`autotune` times candidate configurations (tiles, warps, pipeline stages) of
the forward, dK/dV and dQ kernels on one call's shape on this GPU and stores
the winners in the autotune cache (JSON keyed by GPU name and shape class:
head dim, dtype, mask tile, query length rounded up to a power of two; see
`pallas_kernels/triton/autotune_cache.py`). The launch table reads the cache
first, in this process and (the file is read at import) in later ones. The
shipped table stays the default: its config is always timed too and is kept
unless another one ran faster in the same run, so tuning never makes a shape
slower than it was in that run.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax

from bsattn_jax import input_checks
from bsattn_jax.api import resolve_mask
from bsattn_jax.block_mask import BlockMask
from pallas_kernels import seq_info as seq_info_rows
from pallas_kernels import target
from pallas_kernels.triton import autotune_cache
from pallas_kernels.triton import tuning
from pallas_kernels.triton.configs import KERNELS, KernelConfig


class AutotuneResult(NamedTuple):
  """What `autotune` found and stored.

  configs: the winner per tuned kernel ('forward', 'dkdv', 'dq').
  timings: per tuned kernel, every candidate's time (ms; None with the
    reason when it did not compile or run), fastest first.
  """

  gpu: str
  shape_class: str
  configs: dict[str, KernelConfig]
  timings: dict[str, list[tuning.Timing]]
  cache_path: str


def _candidates(candidates) -> dict[str, list[KernelConfig]]:
  """`{kernel: configs}` to time; None means the default sweep of every kernel."""
  if candidates is None:
    return {kernel: tuning.default_candidates(kernel) for kernel in KERNELS}
  if not isinstance(candidates, Mapping):
    raise TypeError(f"candidates must be None or a mapping from kernel "
                    f"({', '.join(KERNELS)}) to configs, got "
                    f"{type(candidates).__name__}")
  result = {}
  for kernel, configs in candidates.items():
    if kernel not in KERNELS:
      raise ValueError(f"candidates keys must be among {KERNELS}, got {kernel!r}")
    if isinstance(configs, str) or not isinstance(configs, Sequence):
      raise TypeError(f"candidates[{kernel!r}] must be a list of KernelConfig or "
                      f"'BQxBKVxWARPSxSTAGES' strings, got {configs!r}")
    result[kernel] = [c if isinstance(c, KernelConfig) else KernelConfig.parse(c)
                      for c in configs]
  return result


def autotune(q: jax.Array, k: jax.Array, v: jax.Array,
             mask: jax.Array | BlockMask | None = None, *,
             block_size: tuple[int, int] = (128, 128), is_causal: bool = False,
             softmax_scale: float | None = None,
             candidates: Mapping[str, Sequence[KernelConfig | str]] | None = None,
             cache_path: str | None = None, iters: int = 20, warmup: int = 3,
             interpret: bool = False) -> AutotuneResult:
  """Time launch configurations for this call's shape; cache the fastest.

  Args:
    q: `[B, Sq, H, D]`; k, v: `[B, Sk, Hkv, D]`; mask, block_size, is_causal,
      softmax_scale: as `block_sparse_attention` (the mask's density shapes
      the timings; the result applies to every mask of the shape class).
    candidates: `{kernel: [KernelConfig or '128x64x4x2', ...]}` for some of
      'forward', 'dkdv', 'dq' (only those are tuned; the others keep the
      table's config), or None: the default sweep of all three (40 forward
      configs, 30 each for dK/dV and dQ; see `tuning.default_candidates`). The table's config is always timed as well.
    cache_path: the JSON file to store in (default: `$BSATTN_AUTOTUNE_CACHE`,
      else `~/.cache/bsattn_jax/autotune.json`; what the library reads at
      import).
    iters, warmup: calls per timing round (fastest of 3 rounds) and before.
    interpret: time the interpreted kernels on any machine (for tests: the
      timings mean nothing for a GPU, and are stored under the CPU's name).
  Returns:
    An `AutotuneResult`: the winners, every timing, where they were stored.
  """
  if not interpret and jax.default_backend() != "gpu":
    raise ValueError(
        f"interpret=False times the compiled kernels and needs a CUDA GPU; the "
        f"default backend is {jax.default_backend()!r} (interpret=True times the "
        f"interpreted kernels, for tests)")
  input_checks.check_qkv(q, k, v, seq_axes=2)
  iters = input_checks.positive_int(iters, "iters")
  warmup = input_checks.positive_int(warmup, "warmup")
  wanted = _candidates(candidates)
  batch, seq_len_q, heads, head_dim = q.shape
  seq_len_kv = k.shape[1]
  block_mask = resolve_mask(
      mask, batch=batch, heads=heads, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv,
      block_size=block_size, is_causal=is_causal, q_seqlens=None, kv_seqlens=None)
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  static = seq_info_rows.padded_static(seq_len_q, seq_len_kv, block_mask.ragged_q,
                                       block_mask.ragged_kv)
  problem = tuning.Problem(
      q=flat(q), k=flat(k), v=flat(v),
      do=flat(jax.random.normal(jax.random.PRNGKey(0), q.shape, q.dtype)),
      seq_info=seq_info_rows.padded(batch, seq_len_q, seq_len_kv,
                                    block_mask.q_lens, block_mask.kv_lens),
      kv_lists=block_mask.kv_lists, q_lists=block_mask.q_lists,
      rule=block_mask.element_rule, mask_tile=block_mask.tile, static=static,
      softmax_scale=input_checks.softmax_scale_value(softmax_scale, head_dim))
  rows = (tuning.backward_rows(problem, interpret)
          if {"dkdv", "dq"} & set(wanted) else None)
  gpu = target.traced_for()
  winners, timings, entries = {}, {}, {}
  for kernel, configs in wanted.items():
    best, times = tuning.tune_kernel(kernel, problem, configs, gpu=gpu,
                                     warmup=warmup, iters=iters,
                                     interpret=interpret, rows=rows)
    winners[kernel], timings[kernel] = best, times
    ms = {t.config: t.ms for t in times}
    default = next(t.config for t in times if t.is_default)
    entries[kernel] = {"config": best.name, "ms": ms[best],
                       "default": default.name, "default_ms": ms[default]}
  name = target.device_name()
  shape = autotune_cache.shape_class(head_dim, q.dtype, block_mask.tile,
                                     static.q_span)
  path = autotune_cache.store(name, shape, entries, cache_path)
  return AutotuneResult(name, shape, winners, timings, path)


def load_autotune_cache(path: str | None = None) -> None:
  """Re-read the autotune cache (default: `$BSATTN_AUTOTUNE_CACHE`, else
  `~/.cache/bsattn_jax/autotune.json`), replacing the configs in memory.

  Calls traced afterwards use them; functions already jitted keep theirs.
  """
  autotune_cache.load(path)
