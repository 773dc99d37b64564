"""Sharded attention against one device: batch, heads and the context ring.

Outputs and gradients (loss `sum(out * cotangent)`) must match the
single-device `block_sparse_attention` within the fp32 tolerance; the ring's
plan (which tiles each device computes at each step, which steps it skips)
must match a brute-force evaluation of every token pair; the smoke modes of
`examples/sharded_vit.py` and `benchmarks/ring_scaling.py` must run.

The sharded cases need 8 devices: `tests/sharded_cases.py` holds them and
`test_sharded_cases_on_eight_devices` runs it in a child process with 8
simulated CPU devices (JAX reads that flag only when it starts).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsattn_jax import BlockMask, RingPlan, masks
from bsattn_jax.context_layout import ContextLayout
from conftest import token_mask_np

NUM_DEVICES = 8
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharded_cases_on_eight_devices():
  # The interpreted kernels make compiling, not running, the cost: XLA's
  # cheapest CPU code generation takes a quarter off it.
  flags = " ".join([os.environ.get("XLA_FLAGS", ""),
                    f"--xla_force_host_platform_device_count={NUM_DEVICES}",
                    "--xla_backend_optimization_level=0",
                    "--xla_llvm_disable_expensive_passes=true"])
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  proc = subprocess.run(
      [sys.executable, "-m", "pytest",
       os.path.join(REPO_ROOT, "tests", "sharded_cases.py"), "-q",
       "-p", "no:cacheprovider"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-3000:]



# --- The plan, by brute force -------------------------------------------------

def _device_tiles(num_tiles: int, devices: int, device: int, zigzag: bool) -> list[int]:
  """Global tiles a device holds: chunk i, or chunks i and 2N-1-i (zigzag)."""
  chunks = [device, 2 * devices - 1 - device] if zigzag else [device]
  per = num_tiles // (devices * len(chunks))
  return [c * per + t for c in chunks for t in range(per)]


def _per_tile(pairs: np.ndarray, tile: tuple[int, int], reduce) -> np.ndarray:
  """`[Bm, Hm, Sq, Sk]` bool -> `[Bm, Hm, nQ, nK]` by `reduce` over each tile."""
  bm, hm, sq, sk = pairs.shape
  t = pairs.reshape(bm, hm, sq // tile[0], tile[0], sk // tile[1], tile[1])
  return reduce(t, axis=(3, 5))


def _listed(lists, row_shape) -> np.ndarray:
  """Dense `[..., rows, cols]` bool of the listed tiles (numpy, from counts)."""
  count, index = np.asarray(lists.count), np.asarray(lists.index)
  dense = np.zeros(row_shape, bool)
  for pos in np.ndindex(count.shape):
    dense[pos][index[pos][:count[pos]]] = True
  return dense


PLAN_CASES = [
    # (devices, causal (zigzag), user mask builder at 8 x 8 blocks, lengths);
    # every case skips some steps.
    (4, False, lambda n: masks.local(n, n, 1), None),
    (8, False, lambda n: masks.global_local(n, n, 1, 0), None),
    (4, True, lambda n: masks.local(n, n, 1), None),
    (4, False, lambda n: masks.random(n, n, 0.3, seed=3, num_heads=2), (256, 130)),
    # Even key tiles only: each owner sends one of its two tiles (a partial
    # one, with the lengths).
    (4, False, lambda n: masks.local(n, n, 1) & (jnp.arange(n) % 2 == 0), (256, 130)),
]


@pytest.mark.parametrize("devices,causal,builder,lengths", PLAN_CASES)
def test_plan_lists_and_skipped_steps_match_brute_force(devices, causal, builder,
                                                        lengths):
  seq_len, block = 256, 32
  n = seq_len // block
  user = builder(n)
  lens = None if lengths is None else jnp.asarray(lengths, jnp.int32)
  bm = BlockMask.build(user, seq_len_q=seq_len, block_size=(block, block),
                       is_causal=causal, q_seqlens=lens, kv_seqlens=lens)
  plan = RingPlan.build(bm, devices)
  kv_lists, q_lists = jax.tree.map(np.asarray, (plan.kv_lists, plan.q_lists))

  allowed = token_mask_np(user, block=(block, block), sq=seq_len, sk=seq_len,
                          causal=causal, q_lens=lengths, kv_lens=lengths)
  batch = 1 if lengths is None else len(lengths)
  allowed = np.broadcast_to(allowed, (max(batch, allowed.shape[0]),) + allowed.shape[1:])
  visited = _per_tile(allowed, bm.tile, np.any)
  full_rows = _per_tile(allowed, bm.tile, np.all)           # dK/dV: every pair
  q_lens = np.asarray(lengths or [seq_len])[:, None, None, None]
  padded_row = np.arange(seq_len)[:, None] >= q_lens        # forward: real rows only
  full = _per_tile(allowed | padded_row, bm.tile, np.all)
  active = np.zeros((devices, devices), bool)
  for i in range(devices):
    for step in range(devices):
      j = (i - step) % devices
      rows = _device_tiles(n, devices, i, causal)
      cols = _device_tiles(n, devices, j, causal)
      sub = visited[:, :, rows][:, :, :, cols]
      got = _listed(jax.tree.map(lambda x: x[i, j], kv_lists), sub.shape)
      np.testing.assert_array_equal(got, sub, err_msg=f"device {i}, owner {j}")
      got_t = _listed(jax.tree.map(lambda x: x[i, j], q_lists),
                      np.swapaxes(sub, 2, 3).shape)
      np.testing.assert_array_equal(got_t, np.swapaxes(sub, 2, 3))
      pick = lambda tiles: tiles[:, :, rows][:, :, :, cols]
      np.testing.assert_array_equal(kv_lists.full_count[i, j],
                                    (sub & pick(full)).sum(-1))
      np.testing.assert_array_equal(q_lists.full_count[i, j],
                                    (sub & pick(full_rows)).sum(-2))
      active[i, step] = sub.any()
  np.testing.assert_array_equal(np.asarray(plan.step_active()), active)
  assert plan.skipped_steps() == int((~active).sum()) > 0
  _check_sent_tiles(plan, (visited, full, full_rows), n, devices, causal, lengths)


def _check_sent_tiles(plan: RingPlan, tiles_by_kind: tuple[np.ndarray, ...], n: int,
                      devices: int, causal: bool, lengths) -> None:
  """Each owner sends the key tiles other devices visit; the compacted lists
  are the pair's (visited, full, full_rows) tiles at those slots."""
  visited = tiles_by_kind[0]
  per_device = n // devices
  travelling = []
  for j in range(devices):
    cols = _device_tiles(n, devices, j, causal)
    used = np.zeros(per_device, bool)
    for i in set(range(devices)) - {j}:
      used |= visited[:, :, _device_tiles(n, devices, i, causal)][:, :, :, cols].any(axis=(0, 1, 2))
    travelling.append(np.flatnonzero(used))
  most = max(len(t) for t in travelling)
  assert plan.tiles_sent_per_step == most and plan.chunk_tiles == per_device
  if most == per_device:
    assert plan.sent is None
    return
  sent = jax.tree.map(np.asarray, plan.sent)
  tile = plan.tile[1]
  for j, tiles in enumerate(travelling):
    slots = np.full(most, per_device)
    slots[:len(tiles)] = tiles
    np.testing.assert_array_equal(sent.tiles[j], slots)
    real = [most * tile]          # without lengths every slot counts as real
    if lengths:                   # the real keys of the sent tiles (contiguous chunks)
      real = [sum(min(max(length - (j * per_device + t) * tile, 0), tile) for t in tiles)
              for length in lengths]
    np.testing.assert_array_equal(sent.kv_lens[j], real)
    for i in set(range(devices)) - {j}:
      rows = _device_tiles(n, devices, i, causal)
      cols = np.asarray(_device_tiles(n, devices, j, causal))[tiles]
      want, full, full_rows = (np.zeros(visited.shape[:2] + (len(rows), most), bool)
                               for _ in range(3))
      for grid, kind in zip((want, full, full_rows), tiles_by_kind):
        grid[..., :len(tiles)] = kind[:, :, rows][:, :, :, cols]
      kv_lists, q_lists = (jax.tree.map(lambda x: x[i, j], lists)
                           for lists in (sent.kv_lists, sent.q_lists))
      np.testing.assert_array_equal(_listed(kv_lists, want.shape), want)
      np.testing.assert_array_equal(_listed(q_lists, np.swapaxes(want, 2, 3).shape),
                                    np.swapaxes(want, 2, 3))
      np.testing.assert_array_equal(kv_lists.full_count, (want & full).sum(-1))
      np.testing.assert_array_equal(q_lists.full_count, (want & full_rows).sum(-2))


def test_plan_sizes_transfers_from_a_concrete_mask_only():
  bm = BlockMask.build(masks.local(16, 16, 1), seq_len_q=256, block_size=(16, 16))
  assert RingPlan.build(bm, 4).tiles_sent_per_step == 2        # of 4 per device
  closed_over = jax.eval_shape(lambda _: RingPlan.build(bm, 4), 0)   # while tracing
  assert closed_over.tiles_sent_per_step == 2
  traced = jax.eval_shape(lambda m: RingPlan.build(m, 4), bm)
  assert traced.sent is None and traced.tiles_sent_per_step == 4
  assert RingPlan.build(bm, 1).tiles_sent_per_step == 0


def test_plan_local_lengths_are_a_prefix_of_each_device():
  layout = ContextLayout(4, zigzag=True)            # chunks of 32 tokens
  lens = layout.local_lengths(jnp.asarray([256, 200, 100, 0], jnp.int32), 256)
  # Device i holds chunks i and 7-i; real tokens: 0..len-1 of the sequence.
  expected = [[sum(min(max(length - c * 32, 0), 32) for c in (i, 7 - i))
               for length in (256, 200, 100, 0)] for i in range(4)]
  np.testing.assert_array_equal(np.asarray(lens), expected)


# --- Sharded cases (8 devices) ----------------------------------------------

