"""The tooling around the kernels: the launch-plan log, shared-memory
estimates, the launch table's fit to the GPU, and the autotune cache.

Shared-memory numbers are worked out by hand here from the kernels' tiles;
the Hopper forward's count is also compared with the size its kernel,
lowered for an H100 on this CPU, launches with. Autotuning runs interpreted
on a tiny shape.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.mosaic.gpu import dialect as mosaic_gpu_dialect
from jax.interpreters import mlir as jax_mlir
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

import bsattn_jax
from bsattn_jax import BlockMask, block_sparse_attention, masks
from pallas_kernels import target
from pallas_kernels.triton import autotune_cache, configs
from pallas_kernels.triton.configs import KERNELS, KernelConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIB = 1024


@pytest.fixture
def plan_log(caplog):
  """Debug on, the 'bsattn_jax' records captured; everything reset after."""
  bsattn_jax.set_debug(True)
  caplog.set_level(logging.INFO, logger="bsattn_jax")
  yield caplog
  bsattn_jax.set_debug(None)


@pytest.fixture
def fresh_cache():
  """The suite's (empty) autotune cache back in memory after the test."""
  yield
  autotune_cache.load()


def _plans(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.name == "bsattn_jax" and "launch plan" in r.getMessage()]


def _trace(fn, *args) -> None:
  """Trace (and so plan) a call without running the interpreted kernels."""
  jax.eval_shape(fn, *args)


def _qkv(seq_len: int, head_dim: int = 16):
  return jax.ShapeDtypeStruct((1, seq_len, 2, head_dim), jnp.float32)


# --- the launch-plan log -----------------------------------------------------


def test_plan_of_a_192_block_names_the_64_row_tile_and_factor_3(plan_log):
  bm = BlockMask.build(masks.local(2, 2, 0), seq_len_q=384, block_size=(192, 192),
                       is_causal=True)
  _trace(lambda q: block_sparse_attention(q, q, q, bm), _qkv(384))
  [plan] = _plans(plan_log)
  assert "user block 192x192 -> mask tile 64x64 (factor 3x3" in plan
  assert re.search(r"forward kernel tile 64x\d+ \(mask tile / kernel tile = 1x\d+, "
                   r"user block / kernel tile = 3x\d+\)", plan), plan
  assert "dK/dV kernel tile" in plan and "dQ kernel tile" in plan
  # Why the Hopper kernels are not chosen depends on where the test runs
  # (the family on a CPU, the dtype on a GPU): only that a reason is given.
  assert "forward: triton (not mosaic_gpu: " in plan
  assert "warps" in plan and "stages" in plan and "smem" in plan
  # 2 diagonal blocks of 3x3 tiles, causal: 12 tiles, the 6 diagonal ones partial.
  assert "12 of 36 mask tiles active (density 0.333), 6 partial" in plan


def test_plan_logged_once_per_static_call_also_under_jit(plan_log):
  attend = jax.jit(lambda q, mask: block_sparse_attention(q, q, q, mask,
                                                          block_size=(64, 64)))
  mask = jax.ShapeDtypeStruct((1, 1, 2, 2), jnp.bool_)
  _trace(attend, _qkv(128), mask)
  _trace(attend, _qkv(128), mask)
  _trace(lambda q, m: block_sparse_attention(q, q, q, m, block_size=(64, 64)),
         _qkv(128), mask)                    # same static call, another function
  assert len(_plans(plan_log)) == 1
  assert "mask: traced" in _plans(plan_log)[0]
  _trace(attend, _qkv(192), jax.ShapeDtypeStruct((1, 1, 3, 3), jnp.bool_))
  assert len(_plans(plan_log)) == 2


def test_silent_by_default_and_env_var_turns_it_on(caplog, monkeypatch):
  logger = logging.getLogger("bsattn_jax")
  handlers = list(logger.handlers)
  monkeypatch.delenv("BSATTN_DEBUG", raising=False)
  bsattn_jax.set_debug(None)
  caplog.set_level(logging.INFO, logger="bsattn_jax")
  _trace(lambda q: block_sparse_attention(q, q, q, block_size=(64, 64)), _qkv(64))
  assert not _plans(caplog) and logger.handlers == handlers
  assert not bsattn_jax.debug_enabled()
  monkeypatch.setenv("BSATTN_DEBUG", "1")          # read at every call
  _trace(lambda q: block_sparse_attention(q, q, q, block_size=(64, 64)), _qkv(64))
  assert len(_plans(caplog)) == 1
  with pytest.raises(TypeError, match="enabled must be True, False or None"):
    bsattn_jax.set_debug("yes")


# --- shared memory -----------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    # forward bf16 D=128, 128x64, 2 stages: q 128*128*2 + 2 stages of k, v 64*128*2.
    (dict(block_q=128, block_kv=64, head_dim=128), 32768 + 2 * (2 * 16384)),
    # Before Hopper the pipeline holds num_stages - 1 buffers per streamed tile.
    (dict(block_q=128, block_kv=64, head_dim=128, compute_capability=80),
     32768 + 1 * (2 * 16384)),
    # fp32, D=80 runs padded to 128: no q tile; 3 stages of k, v 32*128*4 and
    # the scores converted through shared memory, 64*32*4 plus a row 64*4.
    (dict(block_q=64, block_kv=32, head_dim=80, dtype=jnp.float32, num_stages=3),
     3 * (2 * 16384) + 8192 + 256),
    # dK/dV: resident k, v 64*128*2 each; streamed q, dO 64*128*2 and lse, delta
    # 64*4; P^T staged for the tensor cores 64*64*2.
    (dict(block_q=64, block_kv=64, head_dim=128, kernel="dkdv"),
     2 * 16384 + 2 * (2 * 16384 + 2 * 256) + 8192),
    # fp32 dK/dV keeps only k and v (32*128*4 each).
    (dict(block_q=64, block_kv=32, head_dim=128, kernel="dkdv", dtype=jnp.float32,
          num_stages=1), 2 * 16384),
    # D=256 with 4 warps: dK/dV's fp32 accumulators (2*64*256 over 128
    # threads: 256 registers each) in shared memory beside k and v.
    (dict(block_q=32, block_kv=64, head_dim=256, kernel="dkdv", num_stages=1),
     2 * 32768 + 2 * 65536),
    (dict(block_q=32, block_kv=64, head_dim=256, kernel="dkdv", num_stages=1,
          num_warps=8), 2 * 32768 + (2 * 16384 + 2 * 128) + 4096),
    # Hopper dK/dV D=128: k, v 2*64*128*2 each, rings of q, dO 2*128*128*2
    # and lse2, delta 2*128*4, P^T 2*64*128*2, 2 + 1 + 2 * 2 barriers and
    # the ping-pong's; none on a causal mask.
    (dict(block_q=128, block_kv=128, head_dim=128, kernel="dkdv",
          implementation="mosaic_gpu"),
     2 * 32768 + 2 * 65536 + 2 * 1024 + 32768 + 8 * 8),
    (dict(block_q=128, block_kv=128, head_dim=128, kernel="dkdv",
          implementation="mosaic_gpu", causal=True),
     2 * 32768 + 2 * 65536 + 2 * 1024 + 32768 + 7 * 8),
    # With dropout P^T stays in registers.
    (dict(block_q=128, block_kv=128, head_dim=128, kernel="dkdv",
          implementation="mosaic_gpu", dropout=True),
     2 * 32768 + 2 * 65536 + 2 * 1024 + 7 * 8),
    # dQ: resident q, dO 128*128*2; streamed k, v 128*128*2.
    (dict(block_q=128, block_kv=128, head_dim=128, kernel="dq"),
     2 * 32768 + 2 * (2 * 32768)),
    # Hopper forward D=128: q/o 2*2*64*128*2, K and V rings 2*128*128*2, lse
    # 2*64*4 rounded to 1 KiB, 2 KiB reduction scratch, 15 barriers of 8 bytes.
    (dict(block_q=128, block_kv=128, head_dim=128, implementation="mosaic_gpu"),
     3 * 65536 + 1024 + 2048 + 15 * 8),
    # D=64 with 3 stages: 4 + 2 + 4 * 3 + 1 = 19 barriers.
    (dict(block_q=128, block_kv=128, head_dim=64, num_stages=3,
          implementation="mosaic_gpu"),
     32768 + 2 * 49152 + 1024 + 2048 + 19 * 8),
    # Hopper forward at 64x64 mask tiles, D=128: q/o as above, K and V rings
    # of 4 half slots 4*64*128*2 (by default), 4 + 2 + 4 * 4 = 22 barriers
    # (no ping-pong barrier).
    (dict(block_q=64, block_kv=64, head_dim=128, implementation="mosaic_gpu"),
     3 * 65536 + 1024 + 2048 + 22 * 8),
    # D=64 with 6 half slots: 4 + 2 + 4 * 6 = 30 barriers.
    (dict(block_q=64, block_kv=64, head_dim=64, num_stages=6,
          implementation="mosaic_gpu"),
     32768 + 2 * 49152 + 1024 + 2048 + 30 * 8),
])
def test_smem_estimate_by_hand(args, expected):
  assert bsattn_jax.smem_estimate(**args) == expected


def _hopper_mesh() -> AbstractMesh:
  dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                       platform="cuda")
  return AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)


def _lowered_mosaic_smem(head_dim: int, block=(128, 128), dropout: float = 0.0,
                         causal: bool = False) -> list[tuple[str, int]]:
  """(kernel symbol, dynamic shared memory) of the Hopper kernels of a
  training step lowered for an H100 here, in launch order (forward, dK/dV,
  dQ)."""
  mesh = _hopper_mesh()
  x = jax.ShapeDtypeStruct((1, 256, 2, head_dim), jnp.bfloat16)
  loss = lambda q: jnp.sum(block_sparse_attention(
      q, q, q, block_size=block, is_causal=causal, dropout_rate=dropout,
      dropout_rng=jax.random.key(0) if dropout else None,
      backend="pallas").astype(jnp.float32))
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(jax.grad(loss)).trace(x).lower(lowering_platforms=("cuda",))
  calls = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          if (inner.name == "stablehlo.custom_call"
              and "mosaic_gpu" in str(inner.attributes["call_target_name"])):
            calls.append(inner)
          walk(inner)
  walk(lowered.compiler_ir("stablehlo").operation)
  ir = jax_mlir.ir
  sizes = []
  for call in calls:
    config = ir.DictAttr(call.attributes["mhlo.backend_config"])
    module = ir.StringAttr(config["module"]).value_bytes
    context = jax_mlir.make_ir_context()
    context.allow_unregistered_dialects = True
    with context:
      mosaic_gpu_dialect.register_dialect(context)
      text = str(ir.Module.parse(module))
    # gpu.launch's last operand is the dynamic shared memory size.
    launch = re.search(r'"stable_mosaic_gpu\.gpu\.launch"\(([^)]*)\)', text)
    operand = launch.group(1).split(",")[-1].strip()
    size = re.search(re.escape(operand) + r' = "stable_mosaic_gpu\.arith\.constant"'
                     r'\(\) \{value = (\d+) : i32\}', text)
    [symbol] = re.findall(r'sym_name = "(\w+_mosaic_gpu)"', text)
    sizes.append((symbol, int(size.group(1))))
  return sizes


@pytest.mark.parametrize("dropout,causal", [(0.0, False), (0.1, False),
                                            (0.0, True)],
                         ids=["plain", "dropout", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mosaic_estimate_is_what_the_lowered_kernel_launches_with(head_dim,
                                                                  dropout,
                                                                  causal):
  """The forward, dQ and dK/dV kernels of a training step on Hopper (dQ runs
  first: it computes delta for dK/dV), under the symbols
  `benchmarks/smem_check.py` reads from profiler traces (dK/dV at D=128
  keeps P^T in registers with dropout: 32 KiB less; on a causal mask it has
  no ping-pong barrier)."""
  assert _lowered_mosaic_smem(head_dim, dropout=dropout, causal=causal) == [
      (symbol, bsattn_jax.smem_estimate(128, 128, head_dim,
                                        implementation="mosaic_gpu", kernel=kernel,
                                        dropout=dropout > 0, causal=causal))
      for symbol, kernel in (("body_mosaic_gpu", "forward"),
                             ("mosaic_dq_mosaic_gpu", "dq"),
                             ("mosaic_dkdv_mosaic_gpu", "dkdv"))]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_block64_estimate_is_what_the_lowered_kernel_launches_with(
    head_dim, block64_forward_at_d64):
  """The Hopper forward and backward at 64x64 mask tiles."""
  assert _lowered_mosaic_smem(head_dim, block=(64, 64)) == [
      (symbol, bsattn_jax.smem_estimate(64, 64, head_dim,
                                        implementation="mosaic_gpu", kernel=kernel))
      for symbol, kernel in (("body_mosaic_gpu", "forward"),
                             ("mosaic_dq_mosaic_gpu", "dq"),
                             ("mosaic_dkdv_mosaic_gpu", "dkdv"))]


def test_plan_on_hopper_names_the_64_tile_mosaic_forward(plan_log):
  """Traced for an H100, 64x64 mask tiles plan the Mosaic forward of
  `fwd_block64` with its exact shared memory, and the Mosaic backward."""
  shape = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
  with jax.sharding.use_abstract_mesh(_hopper_mesh()):
    _trace(lambda q: block_sparse_attention(q, q, q, block_size=(64, 64),
                                            backend="pallas"), shape)
  [plan] = _plans(plan_log)
  assert "forward: mosaic_gpu_block64 (not mosaic_gpu: mask tile (64, 64)" in plan
  assert "not triton: ranked below mosaic_gpu_block64" in plan
  smem = bsattn_jax.smem_estimate(64, 64, 128, implementation="mosaic_gpu")
  assert ("forward kernel tile 64x64 (mask tile / kernel tile = 1x1, user block "
          "/ kernel tile = 1x1), 2 compute warpgroups x 64 rows") in plan
  assert f"smem {smem / KIB:.1f} KiB (exact allocation): fits" in plan
  assert "backward: mosaic_gpu (not triton: ranked below mosaic_gpu)" in plan
  assert "dK/dV kernel tile 64x64" in plan and "dQ kernel tile 64x64" in plan
  assert "each walking its own 64-row mask row" in plan


def test_plan_on_hopper_sends_d64_64_tiles_to_the_triton_forward(plan_log):
  """At D=64 the registry routes 64x64 mask tiles to the Triton forward
  (faster there), and says why; the backward stays on Mosaic GPU."""
  shape = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)
  with jax.sharding.use_abstract_mesh(_hopper_mesh()):
    _trace(lambda q: block_sparse_attention(q, q, q, block_size=(64, 64),
                                            backend="pallas"), shape)
  [plan] = _plans(plan_log)
  assert ("forward: triton (not mosaic_gpu: mask tile (64, 64) (takes (128, "
          "128)") in plan
  assert ("not mosaic_gpu_block64: head dim 64 (the Triton forward is faster "
          "at 64x64 tiles; routed here: (128,))") in plan
  assert "backward: mosaic_gpu (not triton: ranked below mosaic_gpu)" in plan


def test_plan_on_hopper_with_dropout_names_the_mosaic_backward(plan_log):
  """Traced for an H100 with dropout, a 128-block call plans the Mosaic
  forward and the Mosaic backward (dK/dV and dQ), Triton ranked below."""
  shape = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
  with jax.sharding.use_abstract_mesh(_hopper_mesh()):
    _trace(lambda q: block_sparse_attention(
        q, q, q, dropout_rate=0.1, dropout_rng=jax.random.key(0),
        backend="pallas"), shape)
  [plan] = _plans(plan_log)
  assert "forward: mosaic_gpu (not mosaic_gpu_block64: ranked below" in plan
  assert "backward: mosaic_gpu (not triton: ranked below mosaic_gpu)" in plan
  assert "dK/dV kernel tile 128x128" in plan and "dQ kernel tile 128x128" in plan


def test_check_smem_reports_each_gpu():
  small = bsattn_jax.check_smem(64, 64, 64)
  assert small.fits_sm80 and small.fits_sm90
  assert small.sm80_limit == 163 * KIB and small.sm90_limit == 227 * KIB
  if jax.default_backend() == "gpu":     # the device's own limit, which it fits
    assert small.device.startswith(jax.devices()[0].device_kind), small.device
    assert small.fits_device is True
  else:
    assert small.device == "no GPU" and small.fits_device is None
  assert "sm90: 40.0 KiB of 227.0 KiB, fits" in str(small)
  # 128 + 4 * 2 * 128 rows of 256 fp32: 1.1 MiB on Hopper, 0.9 MiB before.
  big = bsattn_jax.check_smem(128, 128, 256, dtype=jnp.float32, num_stages=4)
  assert not big.fits_sm80 and not big.fits_sm90
  hopper_only = bsattn_jax.check_smem(128, 128, 128, implementation="mosaic_gpu")
  assert hopper_only.fits_sm90 and not hopper_only.fits_sm80
  assert hopper_only.sm80_bytes is None
  with_dropout = bsattn_jax.check_smem(128, 128, 128, implementation="mosaic_gpu",
                                       kernel="dkdv", dropout=True)
  assert with_dropout.sm90_bytes == bsattn_jax.smem_estimate(
      128, 128, 128, implementation="mosaic_gpu", kernel="dkdv", dropout=True)
  assert with_dropout.sm90_bytes < bsattn_jax.check_smem(
      128, 128, 128, implementation="mosaic_gpu", kernel="dkdv").sm90_bytes
  with pytest.raises(ValueError, match="block_q must be a power of two"):
    bsattn_jax.smem_estimate(96, 64, 64)
  with pytest.raises(ValueError, match="mosaic_gpu forward cannot take head dim 80"):
    bsattn_jax.smem_estimate(128, 128, 80, implementation="mosaic_gpu")
  with pytest.raises(TypeError, match="dropout must be a bool, got float"):
    bsattn_jax.smem_estimate(128, 128, 128, dropout=0.1)
  with pytest.raises(TypeError, match="causal must be a bool, got int"):
    bsattn_jax.check_smem(128, 128, 128, causal=1)


MASK_TILES = [(m, n) for m in (16, 32, 64, 128) for n in (16, 32, 64, 128)]


@pytest.mark.parametrize("capability", [target.AMPERE, target.HOPPER])
def test_every_table_entry_fits_sm80_and_sm90_unchanged(capability):
  gpu = target.Gpu(f"sm{capability}", capability, target.SMEM_PER_BLOCK[capability])
  for head_dim in (16, 32, 64, 80, 128, 256):
    for dtype in (jnp.float16, jnp.bfloat16, jnp.float32):
      for tile in MASK_TILES:
        for seq_len in (None, 197, 8192):
          for kernel in KERNELS:
            cfg = configs.table_config(kernel, head_dim, dtype, tile, seq_len)
            need = configs.smem_bytes(kernel, cfg, head_dim, dtype, capability)
            assert need <= gpu.smem_per_block, (kernel, head_dim, dtype, tile, cfg)
            assert configs.fit_to_gpu(kernel, cfg, head_dim, dtype, gpu) == cfg


def test_launch_table_sheds_stages_or_refuses_what_cannot_fit():
  a100 = target.Gpu("A100", 80, target.SMEM_PER_BLOCK[80])
  # D=128 bf16: q 32 KiB + (stages - 1) x 64 KiB of k and v on an A100.
  deep = KernelConfig(128, 128, 8, 4)
  assert configs.fit_to_gpu("forward", deep, 128, jnp.bfloat16, a100).num_stages == 3
  huge = KernelConfig(256, 256, 8, 2)
  with pytest.raises(ValueError, match="needs ~.* bytes of shared memory even with 1"):
    configs.fit_to_gpu("forward", huge, 256, jnp.float32, a100)
  assert configs.fit_to_gpu("forward", huge, 256, jnp.float32, None) == huge


# --- autotuning --------------------------------------------------------------


def test_cache_entries_of_the_current_device_only(tmp_path, fresh_cache):
  shape = autotune_cache.shape_class(64, jnp.bfloat16, (64, 64), 197)
  assert shape == "d64-bfloat16-tile64x64-s256"
  table = configs.table_config("forward", 64, jnp.bfloat16, (64, 64), 197)
  path = str(tmp_path / "cache.json")
  autotune_cache.store("NVIDIA H100 80GB HBM3", shape,
                       {"forward": {"config": "32x16x4x1"}}, path)
  assert configs.forward_config(64, jnp.bfloat16, (64, 64), 197) == table
  autotune_cache.store(target.device_name(), shape,
                       {"forward": {"config": "32x16x4x1"}}, path)
  assert configs.forward_config(64, jnp.bfloat16, (64, 64), 200) == KernelConfig(
      32, 16, 4, 1)                           # 200 rows: the same length class
  assert configs.forward_config(64, jnp.bfloat16, (64, 64), 4096) == (
      configs.table_config("forward", 64, jnp.bfloat16, (64, 64), 4096))
  assert set(json.loads(open(path).read())["gpus"]) == {
      "NVIDIA H100 80GB HBM3", target.device_name()}


def test_autotune_caches_the_winner_across_a_restart(tmp_path, fresh_cache):
  path = str(tmp_path / "autotune.json")
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 64, 1, 16), jnp.float32)
  default = configs.table_config("forward", 16, jnp.float32, (32, 32), 64)
  result = bsattn_jax.autotune(q, q, q, None, block_size=(32, 32),
                               candidates={"forward": ["16x16x4x1"]},
                               cache_path=path, iters=1, warmup=1, interpret=True)
  assert result.shape_class == "d16-float32-tile32x32-s64"
  timed = {t.config: t for t in result.timings["forward"]}
  assert set(timed) == {default, KernelConfig(16, 16, 4, 1)}
  assert timed[default].is_default and all(t.ms > 0 for t in timed.values())
  winner = result.configs["forward"]
  assert timed[winner].ms <= timed[default].ms      # never slower than the table
  entry = json.loads(open(path).read())["gpus"][target.device_name()][
      result.shape_class]["forward"]
  assert entry["config"] == winner.name and entry["default"] == default.name
  # A fresh process reads the file at import; its launch table returns the winner.
  code = ("import jax.numpy as jnp; from pallas_kernels.triton import configs; "
          "print(configs.forward_config(16, jnp.float32, (32, 32), 64).name)")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, BSATTN_AUTOTUNE_CACHE=path)
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split()[-1] == winner.name
  autotune_cache.load()
  assert configs.forward_config(16, jnp.float32, (32, 32), 64) == default
  bsattn_jax.load_autotune_cache(path)
  assert configs.forward_config(16, jnp.float32, (32, 32), 64) == winner


@pytest.mark.skipif(jax.default_backend() == "gpu",
                    reason="on a GPU interpret=False times the compiled kernels")
def test_autotune_without_a_gpu_needs_interpret():
  q = jnp.zeros((1, 64, 1, 16), jnp.float32)
  with pytest.raises(ValueError, match="interpret=False times the compiled kernels"):
    bsattn_jax.autotune(q, q, q)


def test_autotune_refuses_unknown_kernels():
  q = jnp.zeros((1, 64, 1, 16), jnp.float32)
  with pytest.raises(ValueError, match="candidates keys must be among"):
    bsattn_jax.autotune(q, q, q, candidates={"fwd": []}, interpret=True)
