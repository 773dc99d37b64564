"""Shared helpers for the bsattn_jax test suite.

The truth is always an fp32 computation on the (upcast) inputs: the library's
`backend="reference"` and, independently of any BlockMask code, a token mask
built here in numpy straight from the user's block mask. Inputs are fresh random
normals drawn from a per-test seed (derived from the test id, so a failure
reproduces), never zeros.
"""

from __future__ import annotations

import atexit
import dataclasses
import faulthandler
import functools
import gc
import importlib.util
import math
import os
import shutil
import tempfile
import zlib


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:   # its parent package is missing
    return False


def _cpu_only_machine() -> bool:
  return not any(_installed(name) for name in (
      "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
      "jax_plugins.xla_cuda13"))


# On a machine without a GPU the kernels run interpreted, and compiling the
# interpreted kernels is most of the suite's time: XLA's cheapest CPU code
# generation takes about 40% off it. Set before JAX starts (it reads the
# flags once); child processes of the tests inherit it.
if _cpu_only_machine():
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [
      os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
      "--xla_llvm_disable_expensive_passes=true"]))

# The launch table reads tuned configs from the autotune cache at import: the
# suite runs with an empty one of its own, whatever the machine has tuned.
_AUTOTUNE_DIR = tempfile.mkdtemp(prefix="bsattn_tests_")
atexit.register(shutil.rmtree, _AUTOTUNE_DIR, ignore_errors=True)
os.environ["BSATTN_AUTOTUNE_CACHE"] = os.path.join(_AUTOTUNE_DIR,
                                                   "autotune.json")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsattn_jax import BlockMask, block_sparse_attention, masks
from bsattn_jax.reference import attention_reference
from pallas_kernels import dropout as dropout_bits
from pallas_kernels import registry
from pallas_kernels import seq_info as si

F32_TOL = 1e-5
HALF_TOL = 2e-2


def tol_for(dtype) -> float:
  """Relative-error budget of an output in `dtype` against the fp32 reference."""
  return F32_TOL if np.dtype(dtype) == np.float32 else HALF_TOL


def rel_err(out, ref) -> float:
  """||out - ref|| / ||ref|| in fp32 (0 when both are exactly zero)."""
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  assert out.shape == ref.shape, (out.shape, ref.shape)
  num = np.linalg.norm(out - ref)
  den = np.linalg.norm(ref)
  if den == 0.0:
    return 0.0 if num == 0.0 else math.inf
  return float(num / den)


def assert_output_close(out, lse, ref_out, ref_lse, dtype) -> None:
  """A kernel's o and lse against the reference: no NaN (interpret mode fills
  unwritten output with NaN), o within the dtype's relative-error budget, lse
  as `assert_lse_close`."""
  out_np = np.asarray(jnp.asarray(out, jnp.float32))
  assert not np.isnan(out_np).any(), "kernel output has NaN (unwritten element?)"
  tol = tol_for(dtype)
  err = rel_err(out, ref_out)
  assert err < tol, f"out rel err {err:.3g} >= {tol}"
  assert_lse_close(lse, ref_lse, tol)


def assert_lse_close(lse, ref_lse, tol: float) -> None:
  """-inf at exactly the same places; finite entries within `tol` (relative)."""
  lse, ref_lse = np.asarray(lse, np.float32), np.asarray(ref_lse, np.float32)
  assert lse.shape == ref_lse.shape, (lse.shape, ref_lse.shape)
  assert not np.isnan(lse).any(), "lse has NaN"
  assert not np.isposinf(lse).any(), "lse has +inf"
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse),
                                err_msg="lse -inf positions differ")
  finite = np.isfinite(ref_lse)
  if finite.any():
    err = rel_err(lse[finite], ref_lse[finite])
    assert err < tol, f"lse rel err {err:.3g} >= {tol}"


@functools.lru_cache(maxsize=None)
def jitted_attention(**static):
  """`block_sparse_attention` under jit: (q, k, v, mask, q_seqlens, kv_seqlens).

  Tests run the library under jit so that a GPU compiles one executable per case
  instead of one per eager op; `static` are the keyword arguments that are not
  arrays (block_size, is_causal, return_lse, backend, softmax_scale).
  """
  def attention(q, k, v, mask, q_seqlens, kv_seqlens):
    return block_sparse_attention(q, k, v, mask, q_seqlens=q_seqlens,
                                  kv_seqlens=kv_seqlens, **static)
  return jax.jit(attention)


@functools.lru_cache(maxsize=None)
def jitted_grad(**static):
  """jit(grad) of `sum(out * cot)` w.r.t. q, k, v: (q, k, v, cot, mask, q_seqlens, kv_seqlens)."""
  def loss(q, k, v, cot, mask, q_seqlens, kv_seqlens):
    out = block_sparse_attention(q, k, v, mask, q_seqlens=q_seqlens,
                                 kv_seqlens=kv_seqlens, **static)
    return jnp.sum(out.astype(jnp.float32) * cot)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


@pytest.fixture
def block64_forward_at_d64(monkeypatch):
  """Route D=64 at 64x64 mask tiles to the 64-tile Mosaic forward, as D=128
  (the registry sends D=64 to the Triton forward, faster there), so its
  tests cover the kernel at both head dims. jit caches are cleared on both
  sides of the change: a program traced under one routing is not reused
  under the other."""
  from pallas_kernels.mosaic_gpu import common, fwd_block64

  def clear():
    jax.clear_caches()
    jitted_attention.cache_clear()
    jitted_grad.cache_clear()
  clear()
  monkeypatch.setattr(fwd_block64, "ROUTED_HEAD_DIMS", common.HEAD_DIMS)
  yield
  clear()


def seed_of(request) -> int:
  return zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF


@pytest.fixture
def seed(request) -> int:
  """A per-test integer seed (stable across runs, different between tests)."""
  return seed_of(request)


@pytest.fixture
def key(request) -> jax.Array:
  """A per-test PRNG key."""
  return jax.random.PRNGKey(seed_of(request))


# The Mosaic GPU interpreter runs warpgroups as threads: a deadlocked kernel
# never returns. Its tests take this fixture.
DEADLOCK_SECONDS = 300


def _terminal_stderr(config):
  """A stream on the terminal's stderr, past pytest's output capture."""
  capture = getattr(config.pluginmanager.getplugin("capturemanager"),
                    "_global_capturing", None)
  fd = getattr(getattr(capture, "err", None), "targetfd_save", 2)
  return os.fdopen(os.dup(fd), "w")


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
  """Drop JAX's compiled programs after each test module. XLA:CPU maps each
  program's machine code into about three memory regions and keeps them
  while JAX's caches hold the program. Without this a pytest-xdist worker's
  regions climbed by about 5000 a minute towards Linux's default limit of
  65530 per process (`vm.max_map_count`), and in three of three full runs
  LLVM crashed mid-compile in a test that passes alone; with it, no run
  has crashed and the busiest worker peaked near 26000."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture
def deadlock_watchdog(request):
  """Dump every thread's stack to the terminal and exit if the test runs
  longer than DEADLOCK_SECONDS (a deadlocked kernel never returns)."""
  stream = _terminal_stderr(request.config)
  faulthandler.dump_traceback_later(DEADLOCK_SECONDS, exit=True, file=stream)
  yield
  faulthandler.cancel_dump_traceback_later()
  stream.close()


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention problem: shapes, dtype, blocking, mask recipe and lengths.

  mask: 'none' | a builder name ('dense', 'local', 'global_local', 'strided',
    'diagonal', 'causal', 'predicate') | 'random:<density>:<layout>' with layout
    in {'11', '1H', 'B1', 'BH'} (which of batch/head the mask varies over) |
    'empty_rows' | 'empty_cols' | 'int' (int32 mask, nonzero = attend) |
    'float' (float32 0/1 mask).
  mask_fn: a token predicate `(b, h, q_idx, kv_idx) -> bool` applied on top
    (the lists are then built per example and head, see `case_block_mask`).
  """

  b: int = 1
  sq: int = 197
  sk: int = 197
  h: int = 2
  hkv: int = 2
  d: int = 64
  dtype: str = "float32"
  block: tuple[int, int] = (64, 64)
  causal: bool = False
  mask: str = "random:0.5:1H"
  q_lens: tuple[int, ...] | None = None
  kv_lens: tuple[int, ...] | None = None
  mask_fn: object = None

  @property
  def id(self) -> str:
    parts = [f"b{self.b}", f"s{self.sq}x{self.sk}", f"h{self.h}kv{self.hkv}",
             f"d{self.d}", self.dtype.replace("float", "f").replace("bf", "bf"),
             f"blk{self.block[0]}x{self.block[1]}", self.mask.replace(":", "")]
    if self.causal:
      parts.append("causal")
    if self.q_lens is not None:
      parts.append("ql" + "-".join(map(str, self.q_lens)))
    if self.kv_lens is not None:
      parts.append("kl" + "-".join(map(str, self.kv_lens)))
    if self.mask_fn is not None:
      parts.append(getattr(self.mask_fn, "__name__", None) or repr(self.mask_fn))
    return "_".join(parts)

  @property
  def jdtype(self):
    return jnp.dtype(self.dtype)

  @property
  def num_blocks(self) -> tuple[int, int]:
    return math.ceil(self.sq / self.block[0]), math.ceil(self.sk / self.block[1])


def random_qkv(key, case: Case):
  """q `[B, Sq, H, D]`, k/v `[B, Sk, Hkv, D]` standard normals in the case's dtype."""
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (case.b, case.sq, case.h, case.d), jnp.float32)
  k = jax.random.normal(kk, (case.b, case.sk, case.hkv, case.d), jnp.float32)
  v = jax.random.normal(kv, (case.b, case.sk, case.hkv, case.d), jnp.float32)
  return tuple(x.astype(case.jdtype) for x in (q, k, v))


def upcast(*xs):
  return tuple(x.astype(jnp.float32) for x in xs)


# The key of the per-example dropout seeds in the Hopper interpreter tests.
DROPOUT_KEY = 11


def padded_dropout_call(case, mask: BlockMask, family: str):
  """(seeds, seq_info, registry call) of a padded dropout call of `case`
  (any case with b, sq, sk, d, dtype and dropout) on `family`'s kernels:
  per-example seeds from DROPOUT_KEY in seq_info's SEED column."""
  seeds = dropout_bits.example_seeds(jax.random.key(DROPOUT_KEY), case.b)
  info = si.padded(case.b, case.sq, case.sk, jnp.int32(case.sq),
                   jnp.int32(case.sk), seeds)
  call = registry.KernelCall(
      jnp.dtype(case.dtype), case.d, mask.tile,
      si.padded_static(case.sq, case.sk, False, False), mask.element_rule,
      family, dropout_bits.Dropout(case.dropout))
  return seeds, info, call


def user_mask(case: Case, seed: int):
  """The case's user block mask `[B|1, H|1, nM, nN]` (a jnp array) or None."""
  n_m, n_n = case.num_blocks
  m, n = case.block
  spec = case.mask
  rng = np.random.default_rng(seed)
  if spec == "none":
    return None
  if spec == "dense":
    return masks.dense(n_m, n_n)
  if spec == "local":
    return masks.local(n_m, n_n, 1)
  if spec == "global_local":
    return masks.global_local(n_m, n_n, 1, 1)
  if spec == "strided":
    return masks.strided(n_m, n_n, 3)
  if spec == "diagonal":
    return masks.diagonal(n_m, n_n, (0, -2, 1))
  if spec == "causal":
    return masks.block_causal(n_m, n_n)
  if spec == "predicate":
    return masks.from_predicate(lambda qi, ki: jnp.abs(qi - ki) < 150,
                                seq_len_q=case.sq, seq_len_kv=case.sk,
                                block_size=case.block)
  if spec.startswith("random:"):
    _, density, layout = spec.split(":")
    return masks.random(n_m, n_n, float(density), seed=seed,
                        batch=case.b if layout[0] == "B" else 1,
                        num_heads=case.h if layout[1] == "H" else 1)
  if spec in ("empty_rows", "empty_cols"):
    base = rng.random((1, case.h, n_m, n_n)) < 0.6
    if spec == "empty_rows":
      base[:, :, ::2, :] = False           # every other query block sees nothing
    else:
      base[:, :, :, 1::2] = False          # every other key block is never seen
    return jnp.asarray(base)
  if spec == "int":
    vals = rng.choice(np.array([0, 0, 1, 2, -3], np.int32), size=(1, case.h, n_m, n_n))
    return jnp.asarray(vals)
  if spec == "float":
    return jnp.asarray((rng.random((1, 1, n_m, n_n)) < 0.5).astype(np.float32))
  raise ValueError(f"unknown mask spec {spec!r}")


def seqlens(case: Case):
  q_lens = None if case.q_lens is None else jnp.asarray(case.q_lens, jnp.int32)
  kv_lens = None if case.kv_lens is None else jnp.asarray(case.kv_lens, jnp.int32)
  return q_lens, kv_lens


def token_mask_np(mask, *, block, sq, sk, causal, q_lens=None, kv_lens=None):
  """`[B|1, H|1, Sq, Sk]` bool allowed (query, key) pairs, from the user block mask.

  Independent of BlockMask: user blocks expanded to tokens, lengths applied per
  example, bottom-right aligned causal per example.
  """
  m, n = block
  if mask is None:
    mask = np.ones((1, 1, math.ceil(sq / m), math.ceil(sk / n)), bool)
  mask = np.asarray(mask) != 0
  tok = np.repeat(np.repeat(mask, m, axis=2), n, axis=3)[:, :, :sq, :sk]
  ql = np.asarray([sq] if q_lens is None else q_lens, np.int64)[:, None, None, None]
  kl = np.asarray([sk] if kv_lens is None else kv_lens, np.int64)[:, None, None, None]
  qpos = np.arange(sq)[:, None]
  kpos = np.arange(sk)[None, :]
  allowed = tok & (qpos < ql) & (kpos < kl)
  if causal:
    allowed = allowed & (kpos <= qpos + kl - ql)
  return allowed


def case_token_mask(case: Case, mask) -> np.ndarray:
  allowed = token_mask_np(mask, block=case.block, sq=case.sq, sk=case.sk,
                          causal=case.causal, q_lens=case.q_lens,
                          kv_lens=case.kv_lens)
  if case.mask_fn is not None:
    allowed = allowed & predicate_grid(case.mask_fn, case.b, case.h, case.sq, case.sk)
  return allowed


def predicate_grid(mask_fn, batch: int, heads: int, sq: int, sk: int) -> np.ndarray:
  """`[B, H, Sq, Sk]` bool: a token predicate evaluated on every element."""
  q_idx = jnp.arange(sq, dtype=jnp.int32)[:, None]
  kv_idx = jnp.arange(sk, dtype=jnp.int32)[None, :]
  return np.stack([np.stack([
      np.broadcast_to(np.asarray(mask_fn(jnp.int32(b), jnp.int32(h), q_idx, kv_idx)),
                      (sq, sk)) for h in range(heads)]) for b in range(batch)])


def case_block_mask(case: Case, mask):
  """What a case passes as `mask`: the user block mask, or with a mask_fn a
  BlockMask built per example and head (lengths and causality included)."""
  if case.mask_fn is None:
    return mask
  q_lens, kv_lens = seqlens(case)
  return BlockMask.build(mask, seq_len_q=case.sq, seq_len_kv=case.sk,
                         block_size=case.block, is_causal=case.causal,
                         q_seqlens=q_lens, kv_seqlens=kv_lens,
                         mask_fn=case.mask_fn, batch_size=case.b,
                         num_heads=case.h)


def independent_reference(q, k, v, allowed):
  """fp32 attention on the upcast inputs with a numpy token mask."""
  q, k, v = upcast(q, k, v)
  return jax.jit(attention_reference)(q, k, v, jnp.asarray(allowed))


def no_key_rows(allowed: np.ndarray, batch: int, heads: int) -> np.ndarray:
  """`[B, H, Sq]` True where a query row may attend to no key at all."""
  return np.broadcast_to(~allowed.any(-1), (batch, heads, allowed.shape[2]))


def unattended_keys(allowed: np.ndarray, batch: int, heads: int, kv_heads: int):
  """`[B, Hkv, Sk]` True where no query of the kv head's group attends the key."""
  full = np.broadcast_to(allowed, (batch, heads) + allowed.shape[2:])
  seen = full.any(axis=2)                                     # [B, H, Sk]
  seen = seen.reshape(batch, kv_heads, heads // kv_heads, -1).any(axis=2)
  return ~seen
