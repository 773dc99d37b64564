"""Every kernel configuration lowers to Triton for CUDA, on any machine.

Interpret mode accepts things the Triton lowering rejects (scalar prefetch,
non-power-of-two blocks, >3-D grids, ...), so CPU tests alone would pass a kernel
that cannot run on a GPU. Here each configuration of
`pallas_kernels/triton/configs.py` (and the Mosaic GPU kernels' scope, the
forward at 128x128 and at 64x64 mask tiles) is traced under an abstract CUDA device and lowered with
`lowering_platforms=("cuda",)`: the Triton IR must be produced (one custom call
for the forward, three for forward + backward), and each call must carry the
launch shape the table chose (grid, num_warps, num_stages). No GPU and no ptxas
are needed; each lowering takes well under a second.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from bsattn_jax import (block_sparse_attention, block_sparse_attn_func,
                        create_block_mask, masks)
from pallas_kernels.block_lists import mask_tile_for_block
from pallas_kernels.mosaic_gpu import fwd_block64
from pallas_kernels.triton import configs as tiles

TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALL = "@mosaic_gpu_v2("
H100 = ("NVIDIA H100 80GB HBM3", 132)
A100 = ("NVIDIA A100-SXM4-80GB", 108)

_LAUNCH = re.compile(
    r'grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32, '
    r'ir = "(?:[^"\\]|\\.)*", name = "(\w+)", num_stages = (\d+) : i32, '
    r'num_warps = (\d+) : i32')


def _lower(fn, args, device=H100) -> str:
  kind, cores = device
  dev = AbstractDevice(device_kind=kind, num_cores=cores, platform="cuda")
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  return lowered.as_text()


def _launches(text: str) -> dict[str, tuple[tuple[int, int, int], int, int]]:
  """kernel name -> ((grid), num_warps, num_stages) of every Triton call."""
  found = {}
  for m in _LAUNCH.finditer(text):
    gx, gy, gz, name, stages, warps = m.groups()
    assert name not in found, f"kernel {name} launched twice"
    found[name] = ((int(gx), int(gy), int(gz)), int(warps), int(stages))
  return found


def _check_config(b, sq, sk, h, hkv, d, dtype, block, *, causal=False,
                  ragged=False, mask_layout=(1, 1), device=H100, dropout=0.0):
  m, n = block
  nm, nn = math.ceil(sq / m), math.ceil(sk / n)
  args = [jax.ShapeDtypeStruct((b, sq, h, d), dtype),
          jax.ShapeDtypeStruct((b, sk, hkv, d), dtype),
          jax.ShapeDtypeStruct((b, sk, hkv, d), dtype),
          jax.ShapeDtypeStruct((*mask_layout, nm, nn), jnp.bool_)]
  if ragged:
    args += [jax.ShapeDtypeStruct((b,), jnp.int32)] * 2

  def attn(q, k, v, mask, q_lens=None, kv_lens=None):
    return block_sparse_attention(q, k, v, mask, block_size=block, is_causal=causal,
                                  q_seqlens=q_lens, kv_seqlens=kv_lens,
                                  dropout_rate=dropout,
                                  dropout_rng=jax.random.key(0) if dropout else None,
                                  backend="pallas")

  def train(q, k, v, *rest):
    loss = lambda q, k, v: jnp.sum(attn(q, k, v, *rest).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  tq, tk = mask_tile_for_block(m), mask_tile_for_block(n)
  # At 64x64 mask tiles (64-multiple blocks that are not 128-multiples) the
  # forward is the Mosaic GPU one of `fwd_block64`, for half precision, the
  # head dims routed there (D=128; D=64 too under `block64_forward_at_d64`)
  # and lengths >= 128 that are multiples of 8 (padded layout), with or
  # without dropout.
  on_row_tiles = sq % 8 == 0 and sk % 8 == 0
  mosaic_forward64 = (device == H100 and not ragged and (tq, tk) == (64, 64)
                      and min(sq, sk) >= 128 and on_row_tiles
                      and d in fwd_block64.ROUTED_HEAD_DIMS
                      and jnp.dtype(dtype).itemsize == 2)

  # The Mosaic GPU forward and backward (dK/dV and dQ) take over on Hopper
  # for half precision, D 64/128, 128x128 mask tiles (padded layout), with
  # or without dropout, at any length for D=64 (row-major TMA copies) and
  # multiples of 8 for D=128; the backward at 64x64 mask tiles too.
  mosaic_kernels = (device == H100 and not ragged and d in (64, 128)
                    and jnp.dtype(dtype).itemsize == 2
                    and (on_row_tiles or d == 64))
  mosaic_forward = mosaic_kernels and (tq, tk) == (128, 128)
  mosaic_backward = mosaic_kernels and (tq, tk) in ((128, 128), (64, 64))
  fwd_text = _lower(attn, args, device)
  train_text = _lower(train, args, device)

  any_mosaic_forward = mosaic_forward or mosaic_forward64
  assert fwd_text.count(MOSAIC_CALL) == int(any_mosaic_forward)
  assert train_text.count(MOSAIC_CALL) == (int(any_mosaic_forward)
                                           + 2 * mosaic_backward)
  assert fwd_text.count(TRITON_CALL) == int(not any_mosaic_forward)
  assert train_text.count(TRITON_CALL) == (int(not any_mosaic_forward)
                                           + 2 * (not mosaic_backward))

  nq, nk = math.ceil(sq / tq), math.ceil(sk / tk)
  fwd = tiles.forward_config(d, dtype, (tq, tk), sq)
  dkdv = tiles.dkdv_config(d, dtype, (tq, tk))
  dq = tiles.dq_config(d, dtype, (tq, tk))
  for cfg in (fwd, dkdv, dq):
    assert tq % cfg.block_q == 0 and tk % cfg.block_kv == 0
  expected = {
      "bsattn_forward": ((nq * tq // fwd.block_q, h, b), fwd.num_warps, fwd.num_stages),
      "bsattn_dkdv": ((nk * tk // dkdv.block_kv, hkv, b), dkdv.num_warps,
                      dkdv.num_stages),
      "bsattn_dq": ((nq * tq // dq.block_q, h, b), dq.num_warps, dq.num_stages),
  }
  if any_mosaic_forward:
    del expected["bsattn_forward"]
  else:
    assert _launches(fwd_text) == {"bsattn_forward": expected["bsattn_forward"]}
  if mosaic_backward:
    del expected["bsattn_dkdv"], expected["bsattn_dq"]
  assert _launches(train_text) == expected


HEAD_DIMS = (32, 64, 80, 96, 128, 256)
DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_head_dim_x_dtype_lowers(head_dim, dtype, causal):
  """Every (head dim, dtype) entry of the table at block 128, GQA and ragged."""
  _check_config(2, 300, 300, 4, 2, head_dim, dtype, (128, 128), causal=causal,
                ragged=causal)


@pytest.mark.parametrize("ragged", [False, True], ids=["padded", "ragged"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_long_sequence_entries_lower(head_dim, ragged):
  """The long-sequence forward entries (128-row tiles at D=64) and the static
  vs loaded length paths."""
  _check_config(1, 2 * tiles.LONG_SEQUENCE, 2 * tiles.LONG_SEQUENCE, 2, 2, head_dim,
                jnp.bfloat16, (128, 128), ragged=ragged)


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (48, 48), (64, 64), (128, 128),
                                   (192, 192), (256, 256), (64, 128), (128, 256),
                                   (256, 32)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_block_sizes_lower(block):
  """Every mask tile (16 .. 128, square and not) at D=64 bf16, causal, ragged."""
  _check_config(2, 400, 333, 4, 2, 64, jnp.bfloat16, block, causal=True, ragged=True)


@pytest.mark.parametrize("head_dim,dtype,block", [
    (256, jnp.float32, (16, 16)), (256, jnp.float32, (32, 32)),
    (128, jnp.float32, (16, 64)), (256, jnp.float16, (64, 64)),
    (32, jnp.float16, (16, 16)),
])
def test_small_tiles_with_large_configs_lower(head_dim, dtype, block):
  """Table entries clamped hardest by small mask tiles still lower."""
  _check_config(1, 200, 200, 2, 1, head_dim, dtype, block, causal=True)


@pytest.mark.parametrize("h,hkv,layout", [(8, 1, (1, 1)), (4, 4, (2, 4)),
                                          (4, 2, (1, 4)), (4, 2, (2, 1)),
                                          (6, 2, (2, 6)), (28, 4, (1, 1))],
                         ids=["mqa", "mha_mask_bh", "gqa_mask_h", "gqa_mask_b",
                              "group3_mask_bh", "group7"])
def test_heads_and_mask_layouts_lower(h, hkv, layout):
  """GQA/MQA with shared, per-head and per-batch lists (the dK/dV group specs)."""
  _check_config(2, 256, 384, h, hkv, 128, jnp.bfloat16, (64, 64), causal=True,
                ragged=True, mask_layout=layout)


@pytest.mark.parametrize("d,dtype,causal,h,hkv,sq,sk,layout", [
    (128, jnp.bfloat16, False, 4, 2, 512, 512, (1, 1)),
    (128, jnp.float16, True, 4, 1, 256, 640, (2, 4)),
    (64, jnp.bfloat16, True, 2, 2, 384, 256, (1, 2)),
    (64, jnp.float16, False, 6, 3, 256, 256, (2, 1)),
    (128, jnp.bfloat16, True, 4, 2, 200, 328, (1, 1)),
    (64, jnp.bfloat16, False, 2, 1, 576, 576, (1, 2)),
    (128, jnp.float16, False, 2, 2, 1000, 136, (2, 2)),
    # shorter than one tile, on one side or both
    (64, jnp.bfloat16, True, 4, 2, 64, 64, (1, 1)),
    (128, jnp.float16, False, 2, 1, 120, 256, (2, 2)),
    (64, jnp.float16, True, 2, 2, 256, 8, (1, 2)),
    (128, jnp.bfloat16, False, 4, 4, 8, 1000, (2, 4)),
])
def test_hopper_forward_lowers(d, dtype, causal, h, hkv, sq, sk, layout):
  """The Mosaic GPU kernels on Hopper (forward, dK/dV, dQ): both head dims
  and half dtypes, causal, GQA/MQA, Sq != Sk, lengths that end inside a tile
  or are shorter than one (the arrays are then viewed per example, `[B, S,
  H, D]`, so the TMA boxes end at each example's end: the lowering checks
  Mosaic GPU takes those views for every copy), shared / per-head /
  per-batch lists."""
  _check_config(2, sq, sk, h, hkv, d, dtype, (128, 128), causal=causal,
                mask_layout=layout)


@pytest.mark.parametrize("d,dtype,causal,h,hkv,sq,sk,layout,rate", [
    (64, jnp.bfloat16, False, 4, 2, 512, 512, (1, 1), 0.1),
    (128, jnp.float16, True, 4, 1, 256, 640, (2, 4), 0.5),
    (64, jnp.float16, True, 2, 2, 456, 136, (2, 1), 0.1),
    (128, jnp.bfloat16, False, 2, 1, 200, 328, (1, 2), 0.5),
    (64, jnp.bfloat16, True, 4, 2, 64, 40, (2, 4), 0.5),
    (128, jnp.float16, False, 6, 3, 1000, 136, (1, 1), 0.1),
])
def test_hopper_dropout_lowers(d, dtype, causal, h, hkv, sq, sk, layout, rate):
  """Dropout in the Mosaic GPU forward, dK/dV and dQ (the seeds as a kernel
  input, the hash on full and partial tiles; a training step is 3 Mosaic
  calls): both head dims and half dtypes, causal, GQA/MQA, lengths that end
  inside a tile or are shorter than one, per-head / per-batch lists."""
  _check_config(2, sq, sk, h, hkv, d, dtype, (128, 128), causal=causal,
                mask_layout=layout, dropout=rate)


def test_hopper_forward_takes_block_256():
  """A 256-wide user block is 128x128 mask tiles: still the Mosaic forward."""
  _check_config(1, 512, 512, 2, 1, 128, jnp.bfloat16, (256, 256))


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sq,sk,block", [
    (197, 197, 128), (577, 577, 128), (1025, 1025, 128), (130, 328, 128),
    (256, 100, 128), (197, 197, 64), (577, 330, 64), (1025, 1025, 192)])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["", "dropout"])
def test_lengths_off_the_8_row_tiles_on_hopper(sq, sk, block, dropout, d):
  """ViT's 197/577/1025 tokens and other lengths that are not multiples of 8:
  at D=64 the Mosaic kernels at 128x128 mask tiles take them (TMA copies
  through row-major aliases, `common.row_major_copies`); at D=128 they keep
  Triton: the copies into the 8-row tiled shared memory split the global
  row axis into 8-row tiles, which Mosaic GPU refuses for a row count that
  is not a multiple of 8 (see
  `test_mosaic_gpu_refuses_tiled_copies_of_odd_lengths`)."""
  _check_config(2, sq, sk, 2, 2, d, jnp.bfloat16, (block, block), causal=True,
                dropout=dropout)


def _tile_copy_kernel(seq_len: int, head_dim: int):
  """A TMA round trip of 64-row boxes of a `[2, S, 2, D]` array through the
  (8, 64)-tiled, 128B-swizzled shared memory of the Mosaic kernels."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  rows = 64

  def body(x_ref, o_ref):
    def scoped(smem, barrier):
      @pl.loop(0, pl.cdiv(seq_len, rows))
      def _(t):
        plgpu.copy_gmem_to_smem(x_ref.at[1, pl.ds(t * rows, rows), 1], smem,
                                barrier)
        plgpu.barrier_wait(barrier)
        plgpu.copy_smem_to_gmem(smem, o_ref.at[1, pl.ds(t * rows, rows), 1])
        plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(scoped, plgpu.SMEM(
        (rows, head_dim), jnp.bfloat16,
        transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))),
        plgpu.Barrier())

  shape = jax.ShapeDtypeStruct((2, seq_len, 2, head_dim), jnp.bfloat16)
  return plgpu.kernel(body, out_type=shape), shape


@pytest.mark.parametrize("seq_len", [200, 197, 577])
def test_mosaic_gpu_refuses_tiled_copies_of_odd_lengths(seq_len):
  """What bounds the Mosaic kernels' lengths, in this JAX: a per-example
  TMA box that ends past its example lowers when the row count is a
  multiple of 8 (the hardware zero-fills and drops what lies past it), and
  Mosaic GPU refuses it otherwise (its GMEM tiling of the row axis)."""
  kernel, shape = _tile_copy_kernel(seq_len, 64)
  if seq_len % 8 == 0:
    assert MOSAIC_CALL in _lower(kernel, (shape,))
  else:
    with pytest.raises(ValueError, match="multiple of its tiling 8"):
      _lower(kernel, (shape,))


def test_triton_backend_keeps_triton_forward_on_hopper():
  """backend='triton' opts out of the Mosaic GPU forward."""
  shape = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
  attn = lambda q, k, v: block_sparse_attention(q, k, v, backend="triton")
  text = _lower(attn, (shape, shape, shape))
  assert text.count(MOSAIC_CALL) == 0 and text.count(TRITON_CALL) == 1


@pytest.mark.parametrize("causal", [False, True])
def test_lowers_for_a100(causal):
  """The same kernels lower for an Ampere device kind (D=128 bf16)."""
  _check_config(2, 512, 512, 8, 2, 128, jnp.bfloat16, (128, 128), causal=causal,
                ragged=causal, device=A100)


def _per_head_and_example(b, h, q_idx, kv_idx):
  """Reads both scalars: a window widening with the head and the example."""
  return jnp.abs(q_idx - kv_idx) <= 100 + 50 * h + 30 * b


TOKEN_RULES = [
    masks.causal, masks.sliding_window(448, 448), masks.prefix_lm(300),
    masks.chunked_causal(200), masks.sink_window(4, 250),
    masks.and_masks(masks.chunked_causal(256), masks.sliding_window(100, 0)),
    masks.or_masks(masks.prefix_lm(64), masks.sliding_window(64, 64)),
    _per_head_and_example,
]


@pytest.mark.parametrize("rule", TOKEN_RULES, ids=lambda r: getattr(r, "__name__", repr(r)))
@pytest.mark.parametrize("d,dtype,block,sq", [
    (128, jnp.bfloat16, (128, 128), 512),   # Mosaic GPU kernels on Hopper
    (64, jnp.float16, (64, 64), 333),       # Triton forward, Mosaic backward
    (64, jnp.float16, (128, 128), 197),     # Mosaic kernels, row-major copies
])
def test_token_rules_lower(rule, d, dtype, block, sq):
  """Every ready predicate (and one reading b and h) lowers inside both
  forward families and both backwards, with lists per example and head
  (the Triton forward takes 333 tokens at 64x64 tiles: not a multiple of
  8; the Mosaic backward copies D=64 rows row-major)."""
  b, h, hkv = 2, 4, 2
  shape_q = jax.ShapeDtypeStruct((b, sq, h, d), dtype)
  shape_kv = jax.ShapeDtypeStruct((b, sq, hkv, d), dtype)

  def train(q, k, v):
    bm = create_block_mask(rule, b, h, sq, sq, block_size=block)
    loss = lambda q, k, v: jnp.sum(block_sparse_attention(
        q, k, v, bm, backend="pallas").astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  text = _lower(train, (shape_q, shape_kv, shape_kv))
  mosaic_forward = block == (128, 128)   # (197 at D=64: row-major copies)
  assert text.count(MOSAIC_CALL) == 2 + mosaic_forward
  assert text.count(TRITON_CALL) == int(not mosaic_forward)


@pytest.mark.parametrize("device", [H100, A100], ids=["h100", "a100"])
@pytest.mark.parametrize("d,dtype", [(64, jnp.bfloat16), (128, jnp.float16),
                                     (80, jnp.float32)])
def test_dropout_lowers(d, dtype, device):
  """Dropout in the forward, dK/dV and dQ (on Hopper the Mosaic GPU kernels
  for half precision at D 64/128, else Triton)."""
  q = jax.ShapeDtypeStruct((2, 512, 4, d), dtype)
  kv = jax.ShapeDtypeStruct((2, 512, 2, d), dtype)

  def train(q, k, v):
    loss = lambda q, k, v: jnp.sum(block_sparse_attention(
        q, k, v, is_causal=True, dropout_rate=0.1, dropout_rng=jax.random.key(0),
        backend="pallas").astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  text = _lower(train, (q, kv, kv), device)
  mosaic = device == H100 and jnp.dtype(dtype).itemsize == 2
  assert text.count(MOSAIC_CALL) == 3 * mosaic
  assert text.count(TRITON_CALL) == 3 * (not mosaic)


@pytest.mark.parametrize("exact", [False, True], ids=["block_streaming", "exact_streaming"])
def test_packed_head_types_lower(exact):
  """The packed layout (per-sequence rows read from seq_info) with mixed
  head types, dropout and, for exact streaming, the bottom-right token rule."""
  heads, d = 6, 64
  q = jax.ShapeDtypeStruct((700, heads, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((900, 2, d), jnp.bfloat16)
  cu = jax.ShapeDtypeStruct((4,), jnp.int32)
  types = np.asarray([0, 0, 1, 1, -1, -1], np.int32)
  info = np.asarray([0, 0] * 4 + [2, 100] * 2, np.int32)

  def train(q, k, v, cu_q, cu_k):
    base = jnp.ones((3, 2, 3, 3), bool)
    def loss(q, k, v):
      out, _, _ = block_sparse_attn_func(
          q, k, v, cu_q, cu_k, types, info, base, 300, 300,
          0.0 if exact else 0.1, is_causal=True, exact_streaming=exact,
          dropout_rng=None if exact else jax.random.key(0), backend="pallas")
      return jnp.sum(out.astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  text = _lower(train, (q, kv, kv, cu, cu))
  assert text.count(MOSAIC_CALL) == 0 and text.count(TRITON_CALL) == 3


# --- the Mosaic GPU forward at 64x64 mask tiles (`fwd_block64`) ---------------


@pytest.mark.parametrize("d,dtype,causal,h,hkv,sq,sk,layout", [
    (128, jnp.bfloat16, False, 4, 2, 512, 512, (2, 4)),
    (64, jnp.float16, True, 4, 1, 256, 640, (1, 4)),
    (64, jnp.bfloat16, True, 2, 2, 200, 328, (1, 1)),
    (128, jnp.float16, False, 2, 1, 320, 456, (2, 1)),
    (128, jnp.bfloat16, True, 6, 3, 1000, 136, (2, 6)),
    (64, jnp.bfloat16, False, 2, 2, 576, 576, (1, 2)),
])
def test_hopper_block64_forward_lowers(d, dtype, causal, h, hkv, sq, sk, layout,
                                      block64_forward_at_d64):
  """The Mosaic GPU forward and backward at 64x64 mask tiles on Hopper:
  both head dims and half dtypes, causal, GQA/MQA, Sq != Sk, lengths that
  end inside a tile, an odd number of 64-row tiles (the last item has one
  row), shared / per-head / per-batch lists."""
  _check_config(2, sq, sk, h, hkv, d, dtype, (64, 64), causal=causal,
                mask_layout=layout)


@pytest.mark.parametrize("d,dtype,causal,layout,rate", [
    (64, jnp.bfloat16, False, (2, 4), 0.1),
    (128, jnp.float16, True, (1, 1), 0.5),
])
def test_hopper_block64_forward_dropout_lowers(d, dtype, causal, layout, rate,
                                              block64_forward_at_d64):
  """Dropout in the Mosaic GPU forward and backward at 64x64 mask tiles."""
  _check_config(2, 456, 328, 4, 2, d, dtype, (64, 64), causal=causal,
                mask_layout=layout, dropout=rate)


@pytest.mark.parametrize("block,sq,sk,device", [
    ((192, 192), 576, 576, H100),    # 64x64 mask tiles: the Mosaic kernels
    ((64, 128), 512, 512, H100),     # 64x128 tiles: Triton
    ((64, 64), 120, 256, H100),      # shorter than an item: Triton forward
    ((64, 64), 512, 512, A100),      # not Hopper: Triton
], ids=["192x192", "64x128", "short", "a100"])
def test_block64_forward_scope(block, sq, sk, device):
  """Which 64-wide blocks take the Mosaic kernels at 64x64 tiles (the
  backward takes the short case too)."""
  _check_config(2, sq, sk, 4, 2, 128, jnp.bfloat16, block, causal=True,
                device=device)


@pytest.mark.parametrize("rule", TOKEN_RULES, ids=lambda r: getattr(r, "__name__", repr(r)))
def test_token_rules_lower_in_the_block64_forward(rule, block64_forward_at_d64):
  """Every ready predicate (and one reading b and h) lowers inside the
  Mosaic GPU forward and backward at 64x64 tiles, with lists per example
  and head."""
  b, h, hkv, sq, d = 2, 4, 2, 512, 64
  shape_q = jax.ShapeDtypeStruct((b, sq, h, d), jnp.bfloat16)
  shape_kv = jax.ShapeDtypeStruct((b, sq, hkv, d), jnp.bfloat16)

  def train(q, k, v):
    bm = create_block_mask(rule, b, h, sq, sq, block_size=(64, 64))
    loss = lambda q, k, v: jnp.sum(block_sparse_attention(
        q, k, v, bm, backend="pallas").astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  text = _lower(train, (shape_q, shape_kv, shape_kv))
  assert text.count(MOSAIC_CALL) == 3 and text.count(TRITON_CALL) == 0
