"""Block-sparse attention sharded over a device mesh (`jax.shard_map`).

- Batch and heads shard with no communication inside attention: each device
  runs the kernels on its examples and heads, with the mask's batch / head
  rows cut to match (a mask shared by all keeps one row).
- The sequence shards as a ring (context parallelism, `ring_attention`):
  each device keeps its query chunk while the key/value chunks travel around
  the ring, and a ring step whose part of the mask is empty is skipped
  (`RingPlan`). A causal mask uses the zigzag token order
  (`ContextLayout`), done and undone inside, so the caller's sequence order
  is unchanged. Built from a concrete mask, the plan sends only the key/value
  tiles other devices use; under `jit` pass the `RingPlan` built outside as
  the mask, since a traced mask cannot size the transfers.

The mask is global (positions in the whole sequence) in every case.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, PartitionSpec as P

from bsattn_jax import input_checks
from bsattn_jax.api import block_sparse_attention, resolve_backend, resolve_mask
from bsattn_jax.block_mask import BlockMask
from bsattn_jax.ring_attention import ring_attention
from bsattn_jax.ring_plan import RingPlan, SentTiles
from pallas_kernels.block_lists import BlockLists


def _axis_size(mesh: Mesh, axis, arg: str) -> int:
  if axis is None:
    return 1
  if not isinstance(axis, str):
    raise TypeError(f"{arg} must be a mesh axis name (str) or None, got {axis!r}")
  if axis not in mesh.axis_names:
    raise ValueError(f"{arg}={axis!r} is not an axis of mesh (its axes: "
                     f"{tuple(mesh.axis_names)})")
  return int(mesh.shape[axis])


def _check_mesh_axes(mesh, axes: dict[str, str | None]) -> dict[str, int]:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  sizes = {arg: _axis_size(mesh, axis, arg) for arg, axis in axes.items()}
  named = [(arg, axis) for arg, axis in axes.items() if axis is not None]
  for n, (arg, axis) in enumerate(named):
    for other, other_axis in named[n + 1:]:
      if axis == other_axis:
        raise ValueError(f"{arg} and {other} are both {axis!r}; each mesh axis "
                         f"can shard one dimension")
  return sizes


def _check_divides(size: int, arg: str, axis, dims: dict[str, int]) -> None:
  for what, dim in dims.items():
    if dim % size:
      raise ValueError(f"{arg}={axis!r} has {size} devices, which must divide "
                       f"{what}, got {dim}")


def _check_mask_fn(block_mask: BlockMask, sizes: dict[str, int]) -> None:
  """A token rule sees the example and head index within a device's shard."""
  if block_mask.mask_fn is None:
    return
  reads = input_checks.check_mask_fn(block_mask.mask_fn)
  for read, arg, index in ((reads.batch, "batch_axis", "b"),
                           (reads.head, "head_axis", "h")):
    if read and sizes[arg] > 1:
      raise NotImplementedError(
          f"the BlockMask's mask_fn reads `{index}`, which the kernels give "
          f"within a device's shard; a mask_fn reading `{index}` cannot be "
          f"sharded over {arg}")


def _rows_spec(rows: int, axis) -> str | None:
  """Shard a mask axis along `axis` unless it is shared (size 1)."""
  return axis if rows > 1 else None


def _block_mask_specs(bm: BlockMask, batch_axis, head_axis) -> BlockMask:
  """PartitionSpecs of a BlockMask's leaves (its batch and head rows)."""
  lists = P(_rows_spec(bm.batch_size, batch_axis), _rows_spec(bm.num_heads, head_axis))
  lengths = lambda lens: P(_rows_spec(lens.shape[0], batch_axis))
  return dataclasses.replace(
      bm, kv_lists=BlockLists.alike(lists),
      q_lists=BlockLists.alike(lists), q_lens=lengths(bm.q_lens),
      kv_lens=lengths(bm.kv_lens))


def _ring_plan_specs(plan: RingPlan, batch_axis, head_axis, context_axis) -> RingPlan:
  """PartitionSpecs of a RingPlan's leaves: the device axis along the ring;
  the key owner's lengths stay whole (every device meets every owner)."""
  bm, hm = plan.active_tiles.shape[2:]
  lists = P(context_axis, None, _rows_spec(bm, batch_axis), _rows_spec(hm, head_axis))
  lengths_batch = _rows_spec(plan.q_lens.shape[1], batch_axis)
  sent = None
  if plan.sent is not None:
    sent = SentTiles(tiles=P(context_axis), kv_lists=BlockLists.alike(lists),
                     q_lists=BlockLists.alike(lists),
                     kv_lens=P(None, _rows_spec(plan.sent.kv_lens.shape[1], batch_axis)))
  return dataclasses.replace(
      plan, kv_lists=BlockLists.alike(lists),
      q_lists=BlockLists.alike(lists), active_tiles=lists,
      q_lens=P(context_axis, lengths_batch), kv_lens=P(None, lengths_batch),
      sent=sent)


def _check_plan(plan: RingPlan, *, devices: int, batch: int, heads: int,
                seq_len_q: int, seq_len_kv: int, is_causal: bool) -> None:
  """A RingPlan given as the mask must be the call's: same ring and shapes."""
  if plan.num_devices != devices:
    raise ValueError(f"the RingPlan was built for {plan.num_devices} devices, "
                     f"but context_axis has {devices}")
  built = (plan.chunk_q * devices, plan.chunk_kv * devices)
  if built != (seq_len_q, seq_len_kv):
    raise ValueError(f"the RingPlan was built for seq_len_q={built[0]}, "
                     f"seq_len_kv={built[1]}, but q/k have {seq_len_q} and "
                     f"{seq_len_kv} tokens")
  if is_causal and not plan.is_causal:
    raise ValueError("is_causal=True but the RingPlan's mask has is_causal=False; "
                     "build it from a causal BlockMask")
  rows = (("batch", plan.active_tiles.shape[2], batch, "B"),
          ("head", plan.active_tiles.shape[3], heads, "H"),
          ("q_seqlens", plan.q_lens.shape[1], batch, "B"),
          ("kv_seqlens", plan.kv_lens.shape[1], batch, "B"))
  for what, got, want, dim in rows:
    if got not in (1, want):
      raise ValueError(f"the RingPlan's {what} rows must be 1 or {want} "
                       f"(q's {dim}), got {got}")


def sharded_block_sparse_attention(
    q: jax.Array, k: jax.Array, v: jax.Array,
    mask: jax.Array | BlockMask | None = None, *,
    mesh: Mesh,
    batch_axis: str | None = None,
    head_axis: str | None = None,
    context_axis: str | None = None,
    block_size: tuple[int, int] = (128, 128),
    is_causal: bool = False,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> jax.Array:
  """`block_sparse_attention` over a mesh: batch, heads and/or sequence sharded.

  Args:
    q: `[B, Sq, H, D]`; k, v: `[B, Sk, Hkv, D]` (`H % Hkv == 0`), any
      sharding (they are resharded to the layout below if needed).
    mask: the global mask: a block mask `[B|1, H|1, nM, nN]` at
      `block_size`, a `BlockMask` (e.g. from `create_block_mask`) of the
      whole sequence, or None (dense). With `context_axis`, also a
      `RingPlan` built from such a mask for this ring: built outside `jit`
      and passed in, it keeps the transfers to the tiles other devices use
      (a mask traced under `jit` sends whole chunks).
    mesh: the devices; on several hosts, the global mesh (see the README).
    batch_axis: mesh axis sharding B (it must divide B).
    head_axis: mesh axis sharding the heads (it must divide H and Hkv).
    context_axis: mesh axis sharding the sequence as a ring (context
      parallelism). Each device's chunk must be whole mask tiles: Sq and Sk
      multiples of devices x tile (2 x devices x tile with a causal mask).
      Not with a `mask_fn` token rule, nor a causal mask with per-example
      lengths.
    block_size, is_causal, softmax_scale, backend: as `block_sparse_attention`
      (backend 'reference' does not run a ring).
  Returns:
    out `[B, Sq, H, D]` in q's dtype, sharded as (batch_axis, context_axis,
    head_axis, None).
  """
  input_checks.check_qkv(q, k, v, seq_axes=2)
  scale = input_checks.softmax_scale_value(softmax_scale, q.shape[-1])
  backend = resolve_backend(backend)
  sizes = _check_mesh_axes(mesh, {"batch_axis": batch_axis, "head_axis": head_axis,
                                  "context_axis": context_axis})
  batch, seq_len_q, heads, head_dim = q.shape
  seq_len_kv, kv_heads = k.shape[1], k.shape[2]
  _check_divides(sizes["batch_axis"], "batch_axis", batch_axis,
                 {"the batch size B (q.shape[0])": batch})
  _check_divides(sizes["head_axis"], "head_axis", head_axis,
                 {"the query heads H (q.shape[2])": heads,
                  "the key/value heads Hkv (k.shape[2])": kv_heads})
  if isinstance(mask, RingPlan):
    if context_axis is None:
      raise ValueError("a RingPlan mask runs a ring: give context_axis, or pass "
                       "its BlockMask")
    _check_plan(mask, devices=sizes["context_axis"], batch=batch, heads=heads,
                seq_len_q=seq_len_q, seq_len_kv=seq_len_kv, is_causal=is_causal)
  else:
    block_mask = resolve_mask(
        mask, batch=batch, heads=heads, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv,
        block_size=block_size, is_causal=is_causal, q_seqlens=None, kv_seqlens=None)
    _check_mask_fn(block_mask, sizes)
  data_spec = P(batch_axis, context_axis, head_axis, None)

  if context_axis is None:
    def local(q, k, v, bm):
      return block_sparse_attention(q, k, v, bm, softmax_scale=scale, backend=backend)
    mask_arg = block_mask
    mask_specs = _block_mask_specs(block_mask, batch_axis, head_axis)
  else:
    if backend == "reference":
      raise ValueError("backend='reference' does not run a ring; with "
                       "context_axis use 'auto', 'pallas', 'triton' or 'interpret'")
    mask_arg = mask if isinstance(mask, RingPlan) else RingPlan.build(
        block_mask, sizes["context_axis"])
    mask_specs = _ring_plan_specs(mask_arg, batch_axis, head_axis, context_axis)
    layout = mask_arg.layout

    def local(q, k, v, plan):
      q, k, v = (layout.to_ring(x, context_axis) for x in (q, k, v))
      out = ring_attention(q, k, v, plan, axis_name=context_axis,
                           softmax_scale=scale, family=backend)
      return layout.from_ring(out, context_axis)

  run = jax.shard_map(local, mesh=mesh,
                      in_specs=(data_spec, data_spec, data_spec, mask_specs),
                      out_specs=data_spec, check_vma=False)
  return run(q, k, v, mask_arg)
