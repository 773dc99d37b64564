"""Block-sparse attention forward for Hopper on Mosaic GPU (warp-specialized, TMA).

The Triton forward (`forward.py`) runs every step of its key loop in the same
warps: address math, loads, two matmuls and the softmax take turns. Here one
program (thread block) owns a 128-row query tile of one head and splits the work
over three warpgroups:

- two *compute* warpgroups own 64 query rows each and walk the tile's key list;
  a shared barrier makes them take turns, so one's softmax overlaps the other's
  matmuls on the tensor cores (the FlashAttention-3 ping-pong);
- one *memory* warpgroup reads the same list and issues TMA copies of the listed
  K and V tiles into a ring of `stages` shared-memory slots, running ahead of the
  compute warpgroups by up to `stages` tiles.

Both compute warpgroups consume every slot, so a slot is refilled once both have
released it. Full tiles run with no element mask; partial ones (the causal
diagonal) are masked by position. Scope, checked by `supports`: fp16/bf16, head
dim 64 or 128, 128x128 mask tiles, every example's query and key length a
multiple of 128 (padded layout, no per-example lengths); anything else runs on
the Triton forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.tile_access import LN_2, LOG2_E, StaticSizes

TILE = 128                 # query rows per program = key rows per step = mask tile
ROWS_PER_WARPGROUP = 64    # a wgmma's M
COMPUTE_WARPGROUPS = 2
MEMORY_WARPGROUP = COMPUTE_WARPGROUPS
HEAD_DIMS = (64, 128)
DEFAULT_STAGES = 2


# Device kinds of compute capability 9.x, for lowering under an abstract mesh
# (a CPU machine checking the CUDA lowering has no real device to ask).
_HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")


def supports(dtype, head_dim: int, mask_tile: tuple[int, int],
             q_len: int | None, kv_len: int | None) -> bool:
  """Whether this kernel covers the call (else the Triton forward runs)."""
  return (np.dtype(dtype) in (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))
          and head_dim in HEAD_DIMS
          and tuple(mask_tile) == (TILE, TILE)
          and q_len is not None and kv_len is not None
          and q_len % TILE == 0 and kv_len % TILE == 0)


def targets_hopper() -> bool:
  """Whether the computation being traced runs on a Hopper (sm90) GPU.

  Under an abstract mesh with a device kind (CUDA lowering on a CPU machine)
  that kind decides; otherwise the default device's compute capability.
  """
  device = jax.sharding.get_abstract_mesh().abstract_device
  if device is not None:
    return (device.platform in ("cuda", "gpu")
            and any(kind in device.device_kind for kind in _HOPPER_KINDS))
  default = jax.devices()[0]
  capability = getattr(default, "compute_capability", None)
  return default.platform == "gpu" and str(capability).startswith("9.")


def applies(dtype, head_dim: int, mask_tile: tuple[int, int],
            static: StaticSizes) -> bool:
  """Whether a compiled forward of this shape runs here: in scope, on Hopper,
  and every example laid out at its full length (the padded layout)."""
  return (static.q_len is not None and static.q_len == static.q_span
          and static.kv_len is not None and static.kv_len == static.kv_span
          and supports(dtype, head_dim, mask_tile, static.q_len, static.kv_len)
          and targets_hopper())


def _list_entry(ref, batch, head, *rest):
  """Entry of a `[Bm, Hm, ...]` list array; axes of size 1 are shared."""
  bm, hm = ref.shape[:2]
  return ref[(batch if bm > 1 else 0, head if hm > 1 else 0, *rest)]


def _rendezvous(turn):
  """Both compute warpgroups meet here; alternating meetings order their matmuls."""
  plgpu.barrier_arrive(turn)
  plgpu.barrier_wait(turn)


def _compute_warpgroup(wg, refs, smem, *, scale: float, causal: bool,
                       q_len: int, kv_len: int, stages: int):
  (count_ref, full_ref, index_ref, q_ref, o_ref, lse_ref) = refs
  (qo_smem, k_smem, v_smem, lse_smem, k_ready, v_ready, q_ready, k_free,
   v_free, turn) = smem
  q_tile, head, batch = (lax.axis_index("q"), lax.axis_index("h"),
                         lax.axis_index("b"))
  num_all = _list_entry(count_ref, batch, head, q_tile)
  num_full = _list_entry(full_ref, batch, head, q_tile)
  dtype = q_ref.dtype
  head_dim = q_ref.shape[-1]
  rows = ROWS_PER_WARPGROUP
  first_row = q_tile * TILE + wg * rows          # within the example
  flat_row = batch * q_len + first_row
  qk_scale = scale * LOG2_E

  q_smem = qo_smem.at[wg]
  plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(flat_row, rows), head], q_smem,
                          q_ready.at[wg])
  plgpu.barrier_wait(q_ready.at[wg])

  row_layout = plgpu.Layout.WGMMA.reduce(1)
  acc = plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32),
                          plgpu.Layout.WGMMA)
  m = plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32), row_layout)
  l = plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row_layout)
  by_row = lambda x, shape: lax.broadcast_in_dim(x, shape, [0])

  @pl.when(num_all > 0)
  def _():
    plgpu.barrier_wait(k_ready.at[0])

  # Warpgroup 1 starts one meeting behind, so the two alternate from here on.
  pl.when(wg == 1)(functools.partial(_rendezvous, turn))

  def step(masked: bool, t, carry):
    acc, m, l = carry
    slot = lax.rem(t, stages)

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
      _rendezvous(turn)
      return acc_ref[...]
    s = pl.run_scoped(qk, plgpu.ACC((rows, TILE), jnp.float32))
    plgpu.barrier_arrive(k_free.at[slot])

    if masked:
      kv_first = _list_entry(index_ref, batch, head, q_tile, t) * TILE
      q_pos = first_row + plgpu.broadcasted_iota(
          jnp.int32, (rows, TILE), 0, layout=plgpu.Layout.WGMMA)
      kv_pos = kv_first + plgpu.broadcasted_iota(
          jnp.int32, (rows, TILE), 1, layout=plgpu.Layout.WGMMA)
      valid = kv_pos <= q_pos + (kv_len - q_len)
      s = jnp.where(valid, s * qk_scale, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1))
      # A row with no visible key so far keeps m = -inf; exp2 against 0 then
      # gives p = 0 instead of NaN.
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp2(s - by_row(m_use, s.shape))
    else:
      m_new = jnp.maximum(m, s.max(axis=1) * qk_scale)
      m_use = m_new
      p = jnp.exp2(s * qk_scale - by_row(m_use, s.shape))
    alpha = jnp.exp2(m - m_use)
    acc = acc * by_row(alpha, acc.shape)
    l = l * alpha + p.sum(axis=1)
    p16 = p.astype(dtype)
    # Keep the softmax ahead of the meeting below (the scheduler would
    # otherwise sink part of it past the wait).
    acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
    plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(v_ready.at[slot])
    plgpu.barrier_wait(turn)

    def pv(acc_ref):
      plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
      @pl.when(t + 1 < num_all)
      def _():
        plgpu.barrier_wait(k_ready.at[lax.rem(t + 1, stages)])
    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(v_free.at[slot])
    return acc, m_new, l

  carry = lax.fori_loop(0, num_full, functools.partial(step, False), (acc, m, l))
  if causal:
    carry = lax.fori_loop(num_full, num_all, functools.partial(step, True), carry)
  acc, m, l = carry
  pl.when(wg == 0)(functools.partial(_rendezvous, turn))

  has_keys = l > 0.0
  l_safe = jnp.where(has_keys, l, 1.0)
  acc = acc / by_row(l_safe, acc.shape)          # rows with no key: acc is 0
  q_smem[...] = acc.astype(dtype)
  lse_smem.at[wg][...] = jnp.where(has_keys, m * LN_2 + jnp.log(l_safe),
                                   -jnp.inf)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, o_ref.at[pl.ds(flat_row, rows), head])
  plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[head, pl.ds(flat_row, rows)])
  plgpu.wait_smem_to_gmem(0)


def _memory_warpgroup(refs, smem, *, kv_len: int, group: int, stages: int):
  count_ref, index_ref, k_ref, v_ref = refs
  (_, k_smem, v_smem, _, k_ready, v_ready, _, k_free, v_free, _) = smem
  q_tile, head, batch = (lax.axis_index("q"), lax.axis_index("h"),
                         lax.axis_index("b"))
  kv_head = lax.div(head, group)
  num_all = _list_entry(count_ref, batch, head, q_tile)

  @pl.loop(0, num_all)
  def _(t):
    slot = lax.rem(t, stages)
    row = batch * kv_len + _list_entry(index_ref, batch, head, q_tile, t) * TILE
    window = (pl.ds(row, TILE), kv_head)
    refill = t >= stages
    @pl.when(refill)
    def _():
      plgpu.barrier_wait(k_free.at[slot])
    plgpu.copy_gmem_to_smem(k_ref.at[window], k_smem.at[slot], k_ready.at[slot])
    @pl.when(refill)
    def _():
      plgpu.barrier_wait(v_free.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[window], v_smem.at[slot], v_ready.at[slot])


def forward(q: jax.Array, k: jax.Array, v: jax.Array, kv_count: jax.Array,
            kv_full_count: jax.Array, kv_index: jax.Array, *,
            softmax_scale: float, causal: bool, q_len: int, kv_len: int,
            stages: int = DEFAULT_STAGES,
            interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Block-sparse attention forward on flat sequences of equal length.

  Args:
    q: `[B * q_len, H, D]`; k, v: `[B * kv_len, Hkv, D]`, `H % Hkv == 0`.
    kv_count, kv_full_count, kv_index: the BlockMask forward lists at 128x128
      mask tiles (`[Bm, Hm, nQ]`, `[Bm, Hm, nQ]`, `[Bm, Hm, nQ, nK]`).
    q_len, kv_len: tokens per example, multiples of 128 (`supports`).
    stages: K/V tiles in flight (shared-memory ring slots).
    interpret: run on the CPU in Mosaic GPU's interpreter (tests).
  Returns:
    o `[B * q_len, H, D]` in q's dtype and lse `[H, B * q_len]` fp32 (natural
    log, -inf for rows with no visible key), as the Triton forward.
  """
  tq, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[1]
  if not supports(q.dtype, head_dim, (TILE, TILE), q_len, kv_len):
    raise ValueError(
        f"forward_hopper covers fp16/bf16, head dim in {HEAD_DIMS} and lengths "
        f"that are multiples of {TILE}; got dtype={q.dtype}, head_dim={head_dim}, "
        f"q_len={q_len}, kv_len={kv_len}")
  batch = tq // q_len
  group = num_heads // num_kv_heads
  dtype = q.dtype

  def body(count_ref, full_ref, index_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    wg = lax.axis_index("wg")

    def program(*smem):
      @pl.when(wg < COMPUTE_WARPGROUPS)
      def _():
        plgpu.set_max_registers(232, action="increase")
        _compute_warpgroup(
            wg, (count_ref, full_ref, index_ref, q_ref, o_ref, lse_ref), smem,
            scale=softmax_scale, causal=causal, q_len=q_len, kv_len=kv_len,
            stages=stages)

      @pl.when(wg == MEMORY_WARPGROUP)
      def _():
        plgpu.set_max_registers(40, action="decrease")
        _memory_warpgroup((count_ref, index_ref, k_ref, v_ref), smem,
                          kv_len=kv_len, group=group, stages=stages)

    pl.run_scoped(
        program,
        plgpu.SMEM((COMPUTE_WARPGROUPS, ROWS_PER_WARPGROUP, head_dim), dtype,
                   transforms=swizzled),                      # q, then o
        plgpu.SMEM((stages, TILE, head_dim), dtype, transforms=swizzled),  # k
        plgpu.SMEM((stages, TILE, head_dim), dtype, transforms=swizzled),  # v
        plgpu.SMEM((COMPUTE_WARPGROUPS, ROWS_PER_WARPGROUP), jnp.float32),  # lse
        plgpu.Barrier(num_barriers=stages),                   # k tile landed
        plgpu.Barrier(num_barriers=stages),                   # v tile landed
        plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS),       # q landed
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),       # turn
        collective_axes="wg",
    )

  return plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((num_heads, tq), jnp.float32)),
      grid=(q_len // TILE, num_heads, batch),
      grid_names=("q", "h", "b"),
      num_threads=COMPUTE_WARPGROUPS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(kv_count, kv_full_count, kv_index, q, k, v)
