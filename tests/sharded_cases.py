"""The sharded cases of `test_sharding.py`, on 8 devices (simulated CPU devices).

JAX simulates several CPU devices (`--xla_force_host_platform_device_count`)
only if the flag is set before it starts, and a pytest process running the
whole suite has started it already; so `test_sharding.py` runs this module in
a child process with the flag set. The module's name keeps pytest from
collecting it in the parent.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from benchmarks import ring_scaling
from bsattn_jax import (BlockMask, RingPlan, block_sparse_attention, masks,
                        sharded_block_sparse_attention)
from bsattn_jax.context_layout import ContextLayout
from conftest import F32_TOL, rel_err
from examples import sharded_vit

NUM_DEVICES = 8
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(autouse=True)
def _eight_devices():
  assert jax.device_count() >= NUM_DEVICES, (
      f"run this module with {NUM_DEVICES} devices (test_sharding.py does)")


def _mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> Mesh:
  devices = np.array(jax.devices()[:math.prod(shape)]).reshape(shape)
  return Mesh(devices, names)


def _qkv(seed: int, b: int, s: int, h: int, hkv: int, d: int = 16, sk: int | None = None):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  sk = s if sk is None else sk
  return (jax.random.normal(kq, (b, s, h, d), jnp.float32),
          jax.random.normal(kk, (b, sk, hkv, d), jnp.float32),
          jax.random.normal(kv, (b, sk, hkv, d), jnp.float32))


def _out_and_grads(attention, q, k, v, mask):
  """Output and dq, dk, dv of `attention(q, k, v, mask)` (jitted, the mask an
  argument) for one fixed cotangent."""
  cot = jax.random.normal(jax.random.PRNGKey(7), q.shape, q.dtype)

  def f(q, k, v, mask):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask), q, k, v)
    return (out, *vjp(cot))
  return jax.jit(f)(q, k, v, mask)


def _assert_all_close(got, want) -> None:
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    err = rel_err(a, b)
    assert err < F32_TOL, f"{name} rel err {err:.3g} >= {F32_TOL}"


def _assert_matches_one_device(q, k, v, mask, *, mesh, block, causal=False, **axes):
  """Output and dq, dk, dv of the sharded call against the single-device
  `block_sparse_attention`."""
  got = _out_and_grads(functools.partial(
      sharded_block_sparse_attention, mesh=mesh, block_size=block,
      is_causal=causal, backend="interpret", **axes), q, k, v, mask)
  want = _out_and_grads(functools.partial(
      block_sparse_attention, block_size=block, is_causal=causal,
      backend="reference"), q, k, v, mask)
  _assert_all_close(got, want)


def test_batch_and_head_sharding_with_per_example_and_per_head_masks():
  b, s, h, hkv, block = 4, 100, 4, 2, 32      # S=100: a tail in the last block
  q, k, v = _qkv(0, b, s, h, hkv)
  n = math.ceil(s / block)
  lens = jnp.asarray([100, 77, 33, 64], jnp.int32)
  bm = BlockMask.build(masks.random(n, n, 0.5, seed=1, batch=b, num_heads=h),
                       seq_len_q=s, block_size=(block, block), is_causal=True,
                       q_seqlens=lens, kv_seqlens=lens)
  _assert_matches_one_device(q, k, v, bm, mesh=_mesh((4, 2), ("data", "model")),
                             block=(block, block), causal=True,
                             batch_axis="data", head_axis="model")


def test_context_ring_cross_attention_skips_steps_and_keeps_lengths():
  b, sq, sk, block = 2, 256, 128, (32, 16)   # 4 ring devices: 2 query, 2 key tiles each
  n = sq // block[0]
  lens_q, lens_kv = (256, 200), (128, 71)
  bm = BlockMask.build(masks.local(n, n, 1), seq_len_q=sq, seq_len_kv=sk,
                       block_size=block, q_seqlens=jnp.asarray(lens_q, jnp.int32),
                       kv_seqlens=jnp.asarray(lens_kv, jnp.int32))
  # Each device's tiles meet its own and its neighbours' key tiles: of 4 x 4
  # steps, 4 + 2 x 3 have work.
  assert RingPlan.build(bm, 4).skipped_steps() == 16 - 10
  q, k, v = _qkv(1, b, sq, 2, 1, sk=sk)
  _assert_matches_one_device(q, k, v, bm, mesh=_mesh((2, 4), ("data", "ctx")),
                             block=block, batch_axis="data", context_axis="ctx")


def test_batch_head_and_context_together_causal_gqa():
  b, s, h, hkv, block = 2, 128, 4, 2, 32     # context: 2 devices x 2 chunks x 32
  q, k, v = _qkv(3, b, s, h, hkv)
  n = s // block
  per_example_and_head = masks.random(n, n, 0.6, seed=4, batch=b, num_heads=h)
  _assert_matches_one_device(q, k, v, per_example_and_head,
                             mesh=_mesh((2, 2, 2), ("data", "model", "ctx")),
                             block=(block, block), causal=True, batch_axis="data",
                             head_axis="model", context_axis="ctx")


def _ring_transfers(q, k, v, plan: RingPlan, mesh: Mesh, **axes) -> set[int]:
  """Key tiles per ring transfer (K/V chunks and dK/dV sums: every
  `ppermute` of flat rows) in the traced forward and backward."""
  def rows(jaxpr) -> list[int]:
    found = [var.aval.shape[0] for eqn in jaxpr.eqns if eqn.primitive.name == "ppermute"
             for var in eqn.invars if var.aval.ndim == 3]  # not zigzag's [B, S, H, D]
    return found + [r for sub in jex_core.subjaxprs(jaxpr) for r in rows(sub)]

  attention = functools.partial(sharded_block_sparse_attention, mesh=mesh,
                                context_axis="ctx", backend="interpret", **axes)
  def f(q, k, v, plan):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, plan), q, k, v)
    return out, vjp(out)
  found = rows(jax.make_jaxpr(f)(q, k, v, plan).jaxpr)
  assert found, "no ring transfer traced"
  local_batch = q.shape[0] // (mesh.shape["data"] if "batch_axis" in axes else 1)
  return {r // (local_batch * plan.tile[1]) for r in found}


def _band_with_holes(n: int) -> jax.Array:
  """A local band; key tiles 2, 6, 10, ... attended by no query (poisoned)."""
  return masks.local(n, n, 1) & (jnp.arange(n) % 4 != 2)


def _random_with_holes(n: int, heads: int) -> jax.Array:
  """Random per-head tiles; key tiles 2, 6, 10, ... attended by no query."""
  return (masks.random(n, n, 0.4, seed=11, num_heads=heads)
          & (jnp.arange(n) % 4 != 2))


@pytest.mark.parametrize("pattern", ["band", "random"])
@pytest.mark.parametrize("devices", [2, 4, 8])
def test_ring_sends_only_used_tiles(devices, pattern):
  b, s, h, block = 2, 512, 4, 16               # 32 key tiles: 4 to 16 per device
  n = s // block
  if pattern == "band":   # lengths: example 1 ends inside a travelling tile
    lens = jnp.asarray([512, 390], jnp.int32)
    bm = BlockMask.build(_band_with_holes(n), seq_len_q=s, block_size=(block, block),
                         q_seqlens=lens, kv_seqlens=lens)
  else:                   # a mask per head
    bm = BlockMask.build(_random_with_holes(n, h), seq_len_q=s, block_size=(block, block))
  q, k, v = _qkv(11, b, s, h, 2)               # GQA
  # Below 8 ring devices, 2 more shard the examples (band) or heads (random).
  axes, rows = {}, 1
  if devices < 8:
    axes, rows = {"batch_axis" if pattern == "band" else "head_axis": "data"}, 2
  mesh = _mesh((rows, devices), ("data", "ctx"))
  plan = RingPlan.build(bm, devices)
  assert 0 < plan.tiles_sent_per_step < plan.chunk_tiles, plan.tiles_sent_per_step
  # Key tiles no query attends hold NaN: read by any kernel, they would
  # poison the result. The reference runs on the clean keys.
  unused = ~np.asarray(bm.to_dense()).any(axis=(0, 1, 2))
  assert unused.any()
  poisoned = jnp.asarray(np.repeat(unused, bm.tile[1]))[None, :, None, None]
  k_bad, v_bad = (jnp.where(poisoned, jnp.nan, x) for x in (k, v))
  got = _out_and_grads(functools.partial(
      sharded_block_sparse_attention, mesh=mesh, context_axis="ctx",
      backend="interpret", **axes), q, k_bad, v_bad, plan)
  want = _out_and_grads(functools.partial(block_sparse_attention, backend="reference"),
                        q, k, v, bm)
  _assert_all_close(got, want)
  sent = _ring_transfers(q, k_bad, v_bad, plan, mesh, **axes)
  assert sent == {plan.tiles_sent_per_step}


@pytest.mark.parametrize("devices,causal", [(8, False), (4, True)])
def test_dense_and_causal_rings_send_whole_chunks(devices, causal):
  b, s, block = 1, 256, 16
  bm = BlockMask.build(None, seq_len_q=s, block_size=(block, block), is_causal=causal)
  plan = RingPlan.build(bm, devices)
  assert plan.sent is None and plan.tiles_sent_per_step == plan.chunk_tiles
  q, k, v = _qkv(13, b, s, 2, 2)
  assert _ring_transfers(q, k, v, plan, _mesh((devices,), ("ctx",))) == {plan.chunk_tiles}


def test_zigzag_layout_round_trip():
  layout = ContextLayout(4, zigzag=True)
  tokens = jnp.arange(8 * 3, dtype=jnp.float32).reshape(1, 24)   # chunks of 3
  spec = P(None, "ctx")
  run = jax.jit(jax.shard_map(
      lambda x: (layout.to_ring(x, "ctx"), layout.from_ring(layout.to_ring(x, "ctx"), "ctx")),
      mesh=_mesh((4,), ("ctx",)), in_specs=spec, out_specs=(spec, spec)))
  ring, back = run(tokens)
  chunks = [c for i in range(4) for c in (i, 7 - i)]
  expected = np.concatenate([np.arange(3 * c, 3 * c + 3) for c in chunks])
  np.testing.assert_array_equal(np.asarray(ring)[0], expected)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(tokens))


def _with_rule(rule, heads: int = 1) -> BlockMask:
  """A BlockMask carrying a token rule (its lists are not the rule's: every
  call below fails on the rule before any list is read)."""
  bm = BlockMask.build(jnp.ones((1, heads, 8, 8), bool), seq_len_q=256,
                       block_size=(32, 32))
  return dataclasses.replace(bm, mask_fn=rule)


def _bad_calls():
  q, k, v = _qkv(5, 2, 256, 4, 2)
  mesh = _mesh((2, 4), ("data", "ctx"))
  call = functools.partial(sharded_block_sparse_attention, q, k, v, mesh=mesh,
                           block_size=(32, 32))
  rule = masks.sliding_window(16, 16)
  per_head = lambda b_, h_, qi, ki: jnp.abs(qi - ki) <= 8 * (h_ + 1)
  plan = lambda devices, seq_len=256: RingPlan.build(
      BlockMask.build(None, seq_len_q=seq_len, block_size=(32, 32)), devices)
  return [
      (lambda: call(batch_axis="rows"), ValueError, "batch_axis='rows' is not an axis"),
      (lambda: call(batch_axis="ctx", context_axis="ctx"), ValueError,
       "both 'ctx'"),
      (lambda: call(head_axis="ctx"), ValueError,
       "head_axis='ctx' has 4 devices, which must divide the key/value heads"),
      (lambda: sharded_block_sparse_attention(q[:1], k[:1], v[:1], mesh=mesh,
                                              batch_axis="data"),
       ValueError, "must divide the batch size B"),
      (lambda: call(context_axis="ctx", block_size=(128, 128)), ValueError,
       "query length seq_len_q (q.shape[1]) to be a multiple of 4 x 128"),
      (lambda: call(context_axis="ctx", is_causal=True, block_size=(64, 64)),
       ValueError, "multiple of 8 x 64"),
      (lambda: call(_with_rule(rule), context_axis="ctx"), NotImplementedError,
       "mask_fn"),
      (lambda: call(_with_rule(per_head, heads=4), head_axis="data"),
       NotImplementedError, "reads `h`"),
      (lambda: call(context_axis="ctx", backend="reference"), ValueError,
       "backend='reference'"),
      (lambda: sharded_block_sparse_attention(q, k[:, :128], v[:, :128], mesh=mesh,
                                              context_axis="ctx", is_causal=True,
                                              block_size=(32, 32)),
       ValueError, "needs equal query and key lengths"),
      (lambda: sharded_block_sparse_attention(q, k, v, mesh="ctx"), TypeError,
       "mesh must be a jax.sharding.Mesh"),
      (lambda: call(plan(4)), ValueError, "a RingPlan mask runs a ring: give context_axis"),
      (lambda: call(plan(2), context_axis="ctx"), ValueError,
       "the RingPlan was built for 2 devices, but context_axis has 4"),
      (lambda: call(plan(4, 128), context_axis="ctx"), ValueError,
       "built for seq_len_q=128, seq_len_kv=128, but q/k have 256 and 256 tokens"),
      (lambda: call(plan(4), context_axis="ctx", is_causal=True), ValueError,
       "is_causal=True but the RingPlan's mask has is_causal=False"),
  ]


def test_bad_arguments_are_named():
  for call, error, message in _bad_calls():
    with pytest.raises(error, match=re.escape(message)):
      call()


def test_sharded_vit_smoke_trains():
  assert sharded_vit.main(["--smoke", "--backend", "reference"]) == 0


def test_ring_scaling_smoke_reports_ring_and_vit(tmp_path):
  assert ring_scaling.main(["--smoke", "--masks", "local", "--out", str(tmp_path)]) == 0
  results = json.loads((tmp_path / "ring_scaling.json").read_text())
  assert results["devices"] == NUM_DEVICES
  (row,) = results["attention"]
  # A band of one tile on 8 devices of two tiles each: only step 0 has work,
  # and nothing travels.
  assert (row["skipped_steps"], row["ring_steps"]) == (56, 64)
  assert (row["tiles_sent_per_step"], row["chunk_tiles"]) == (0, 2)
  assert row["fwd_bytes_per_step"] == row["bwd_bytes_per_step"] == 0
  for mode in ("fwd", "fwd_bwd"):
    assert row[mode]["ring_ms"] > 0 and row[mode]["one_device_ms"] > 0, row
    assert row[mode]["max_rel_err_vs_one_device"] < F32_TOL, row
  assert results["vit"]["all"]["devices"] == NUM_DEVICES
  assert results["vit"]["throughput_ratio"] > 0
