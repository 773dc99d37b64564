"""Ring attention on one device of a context-parallel ring (runs inside shard_map).

Forward: N steps. At step s the device attends its query chunk to the
key/value chunk of device (i - s) mod N, which came from its left neighbour;
the chunk for step s + 1 is sent on before step s's kernel runs, so the
transfer overlaps the computation. Each step's (o, lse) merges into the
running result by log-sum-exp. A step without an active tile
(`RingPlan.active_tiles`) runs no kernel and leaves the result untouched.

Backward: the same ring again. Given the merged output and lse, each step's
backward kernels give exact partial gradients (`p = exp(s - lse)` are the
final probabilities, `delta = rowsum(do * o)` the final one). dQ sums on the
device; the dK/dV sums travel with their K/V chunk (in fp32) and take one
more hop after the last step, which brings them to the chunk's owner. Every
transfer carries data a later step needs (step 0 and the last step are
peeled off the loop for that).

Compacted chunks (`RingPlan.sent`): step 0 reads the device's own chunk whole,
and what leaves is the compacted copy of the tiles other devices use; every
later step runs on that copy with lists numbered by its slots. The dK/dV sums
travel in the same slots, starting from the owner's step-0 sums of those
tiles; back home they replace those tiles of the owner's step-0 sums (the
tiles that never left keep theirs, zero where no query attends).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bsattn_jax.ring_plan import RingPlan
from pallas_kernels import registry
from pallas_kernels import seq_info as seq_info_rows
from pallas_kernels.masking import ElementRule


class RingCall(NamedTuple):
  """The static part of a ring (hashable)."""

  axis_name: str
  num_devices: int
  softmax_scale: float
  kernel: registry.KernelCall               # on a whole chunk
  sent_kernel: registry.KernelCall | None   # on a compacted one (RingPlan.sent)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, plan: RingPlan, *,
                   axis_name: str, softmax_scale: float, family: str) -> jax.Array:
  """Attention of this device's query chunk to the whole ring's keys.

  Args:
    q: `[B, Cq, H, D]`; k, v: `[B, Ck, Hkv, D]`: this device's rows in ring
      order (`ContextLayout`).
    plan: this device's slice of the `RingPlan` (device axis of size 1), as
      shard_map hands it over.
    axis_name: the mesh axis the ring runs along.
    family: kernel family ('pallas', 'triton' or 'interpret').
  Returns:
    out `[B, Cq, H, D]` in q's dtype.
  """
  # One element rule serves every step: a causal diagonal lies in step 0
  # (the device's own chunks), and with a causal mask every tile of a later
  # step is full or empty, so its causal test never runs (see `ring_plan`).
  kernel = lambda kv_rows: registry.KernelCall(
      dtype=np.dtype(q.dtype), head_dim=q.shape[-1], mask_tile=plan.tile,
      static=seq_info_rows.padded_static(plan.chunk_q, kv_rows, plan.ragged_q,
                                         plan.ragged_kv),
      rule=ElementRule(causal=plan.is_causal), family=family)
  sent_kernel = None
  if plan.sent is not None:
    sent_kernel = kernel(plan.tiles_sent_per_step * plan.tile[1])
  ring = RingCall(axis_name, plan.num_devices, float(softmax_scale),
                  kernel(plan.chunk_kv), sent_kernel)
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  return _ring(flat(q), flat(k), flat(v), plan, ring).reshape(q.shape)


def _send(x, ring: RingCall):
  """Every device passes `x` (a pytree) to its right neighbour."""
  perm = [(d, (d + 1) % ring.num_devices) for d in range(ring.num_devices)]
  return jax.tree.map(lambda a: lax.ppermute(a, ring.axis_name, perm), x)


def _compact(x, plan: RingPlan):
  """This device's rows `[B * Ck, ...]` (a pytree of them) -> the tiles it
  sends, `[B * M * tile, ...]` (empty slots zero); unchanged when the whole
  chunk travels."""
  if plan.sent is None:
    return x
  def one(a):
    tiles = a.reshape(-1, plan.chunk_tiles, plan.tile[1], *a.shape[1:])
    sent = jnp.take(tiles, plan.sent.tiles[0], axis=1, mode="fill", fill_value=0)
    return sent.reshape(-1, *a.shape[1:])
  return jax.tree.map(one, x)


def _expand(home, sent, plan: RingPlan):
  """`home` (whole-chunk rows) with the sent tiles' rows replaced by `sent`;
  `sent` itself when the whole chunk travelled."""
  if plan.sent is None:
    return sent
  def one(h, s):
    tiles = h.reshape(-1, plan.chunk_tiles, plan.tile[1], *h.shape[1:])
    slots = s.reshape(tiles.shape[0], -1, *tiles.shape[2:])
    return tiles.at[:, plan.sent.tiles[0]].set(slots, mode="drop").reshape(h.shape)
  return jax.tree.map(one, home, sent)


def _schedule(plan: RingPlan, ring: RingCall) -> tuple[jax.Array, jax.Array]:
  """`[N]` owner of the keys visiting at each step, and whether it has work."""
  device = lax.axis_index(ring.axis_name)
  owners = (device - jnp.arange(ring.num_devices, dtype=jnp.int32)) % ring.num_devices
  active = jnp.sum(plan.active_tiles[0][owners], axis=(1, 2)) > 0
  return owners, active


def _pair(plan: RingPlan, ring: RingCall, owner: jax.Array, num_rows: int,
          sent: bool):
  """(kernel call, seq_info, forward lists, backward lists) of this device's
  queries against `owner`'s keys: the whole chunk, or its compacted copy
  (`sent`)."""
  batch = num_rows // plan.chunk_q
  pick = lambda lists: jax.tree.map(lambda x: x[0, owner], lists)
  if not sent:
    seq_info = seq_info_rows.padded(batch, plan.chunk_q, plan.chunk_kv,
                                    plan.q_lens[0], plan.kv_lens[owner])
    return ring.kernel, seq_info, pick(plan.kv_lists), pick(plan.q_lists)
  seq_info = seq_info_rows.padded(batch, plan.chunk_q,
                                  plan.tiles_sent_per_step * plan.tile[1],
                                  plan.q_lens[0], plan.sent.kv_lens[owner])
  return (ring.sent_kernel, seq_info, pick(plan.sent.kv_lists),
          pick(plan.sent.q_lists))


def _merge(acc, part):
  """Two partial attentions over disjoint keys -> their union (fp32)."""
  (o_a, lse_a), (o_b, lse_b) = acc, part
  top = jnp.maximum(lse_a, lse_b)
  top = jnp.where(jnp.isfinite(top), top, 0.0)        # rows that saw no key yet
  w_a, w_b = jnp.exp(lse_a - top), jnp.exp(lse_b - top)
  total = w_a + w_b
  seen = total > 0
  lse = jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
  scale = lambda w: (w / jnp.where(seen, total, 1.0)).T[:, :, None]   # [H, T] -> [T, H, 1]
  return o_a * scale(w_a) + o_b.astype(jnp.float32) * scale(w_b), lse


def _steps(plan: RingPlan, ring: RingCall) -> int:
  """Ring steps to run: one (the own chunk) when nothing travels."""
  return ring.num_devices if plan.tiles_sent_per_step else 1


def _ring_forward(q, k, v, plan: RingPlan, ring: RingCall):
  owners, active = _schedule(plan, ring)
  compacted = plan.sent is not None

  def attend(s, kv, acc, sent):
    call, seq_info, kv_lists, _ = _pair(plan, ring, owners[s], q.shape[0], sent)
    run = lambda kv, acc: _merge(acc, registry.forward(
        q, *kv, seq_info, kv_lists, call=call, softmax_scale=ring.softmax_scale))
    return lax.cond(active[s], run, lambda kv, acc: acc, kv, acc)

  def step(s, state):
    kv, acc = state
    upcoming = _send(kv, ring)     # in flight while this step computes
    return upcoming, attend(s, kv, acc, compacted)

  # Steps 0 .. N-2 pass their chunk on; the last one has nobody to feed.
  # A compacted ring runs step 0 (the whole own chunk) outside the loop.
  acc = (jnp.zeros(q.shape, jnp.float32),
         jnp.full((q.shape[1], q.shape[0]), -jnp.inf, jnp.float32))
  state, first = ((k, v), acc), 0
  if compacted:
    state = (_send(_compact((k, v), plan), ring), attend(0, (k, v), acc, False))
    first = 1
  steps = _steps(plan, ring)
  if steps - 1 > first:
    state = lax.fori_loop(first, steps - 1, step, state)
  kv, acc = state
  o, lse = attend(steps - 1, kv, acc, compacted)
  return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, plan: RingPlan, ring: RingCall) -> jax.Array:
  """Flat rows: q `[Tq, H, D]`, k/v `[Tk, Hkv, D]` -> out `[Tq, H, D]`."""
  return _ring_forward(q, k, v, plan, ring)[0]


def _ring_fwd(q, k, v, plan, ring):
  o, lse = _ring_forward(q, k, v, plan, ring)
  return o, (q, k, v, o, lse, plan)


def _ring_bwd(ring: RingCall, residuals, do):
  q, k, v, o, lse, plan = residuals
  owners, active = _schedule(plan, ring)
  compacted = plan.sent is not None

  def add(s, kv, sums, sent):
    call, seq_info, kv_lists, q_lists = _pair(plan, ring, owners[s], q.shape[0], sent)
    run = lambda kv: registry.backward(
        q, *kv, o, lse, do, None, seq_info, kv_lists, q_lists, call=call,
        softmax_scale=ring.softmax_scale)
    added = lambda kv, sums: tuple(a + g.astype(jnp.float32)
                                   for a, g in zip(sums, run(kv)))
    return lax.cond(active[s], added, lambda kv, sums: sums, kv, sums)

  def step(s, state):
    kv, (dq, dk, dv) = state
    upcoming = _send(kv, ring)
    # The dK/dV sums of the chunk in hand come from the left neighbour, which
    # added its share at the previous step; the hop overlaps this step's kernels.
    dk, dv = _send((dk, dv), ring)
    return upcoming, add(s, kv, (dq, dk, dv), compacted)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  steps = _steps(plan, ring)
  # Step 0 (own chunk, nothing received yet) and the last step (nothing left
  # to pass on) are peeled off, so no transfer is wasted.
  upcoming = _send(_compact((k, v), plan), ring) if steps > 1 else None
  dq, dk, dv = home = add(0, (k, v), (zeros(q), zeros(k), zeros(v)), False)
  if steps > 1:
    state = (upcoming, (dq, *_compact((dk, dv), plan)))
    if steps > 2:
      state = lax.fori_loop(1, steps - 1, step, state)
    kv, (dq, dk, dv) = state
    dq, dk, dv = add(steps - 1, kv, (dq, *_send((dk, dv), ring)), compacted)
    # Home: to the chunk's owner.
    dk, dv = _expand(home[1:], _send((dk, dv), ring), plan)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)
