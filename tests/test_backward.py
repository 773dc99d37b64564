"""Backward pass: gradients of the kernel (custom_vjp) against the fp32 reference.

The loss is `sum(out * cotangent)` with a random cotangent, so every output
element carries its own weight. dK/dV of GQA/MQA are summed over each group by
the kernel and by autodiff of the reference (which repeats k/v). Queries that
see no key and keys that no query sees must get exactly zero gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bsattn_jax import block_sparse_attention, masks
from conftest import (Case, case_block_mask, case_token_mask, jitted_grad,
                      no_key_rows, random_qkv, rel_err, seqlens, tol_for,
                      unattended_keys, upcast, user_mask)
from pallas_kernels.mosaic_gpu.common import targets_hopper

BACKWARD_CASES = [
    # head dims x dtypes x block sizes, rotating the other axes
    Case(d=32, dtype="float32", block=(16, 16), hkv=1, causal=True, mask="local"),
    Case(b=2, h=4, hkv=2, d=64, dtype="bfloat16", block=(32, 32), causal=True,
         q_lens=(197, 120), kv_lens=(150, 197)),
    Case(d=80, dtype="float16", block=(64, 64), sq=260, sk=197, mask="global_local"),
    Case(d=96, dtype="float32", block=(192, 192), sq=400, sk=400, mask="strided"),
    Case(d=128, dtype="bfloat16", block=(128, 128), sq=300, sk=197, causal=True,
         mask="none"),
    Case(d=256, dtype="float16", block=(64, 128), h=2, hkv=1, mask="diagonal"),
    Case(d=256, dtype="float32", block=(32, 32), causal=True, mask="random:0.5:1H"),
    Case(d=64, dtype="float16", block=(128, 256), sq=577, sk=577, causal=True,
         mask="causal"),
    Case(d=128, dtype="float32", block=(256, 256), sq=577, sk=600, mask="predicate"),
    Case(d=32, dtype="bfloat16", block=(16, 16), sq=150, sk=230, mask="dense"),
    Case(d=96, dtype="float16", block=(32, 32), causal=True, mask="random:0.5:1H"),
    Case(d=80, dtype="bfloat16", block=(64, 64), h=4, hkv=1, causal=True),
    Case(d=64, dtype="float32", block=(192, 192), sq=577, sk=577, h=4, hkv=2,
         causal=True, mask="random:0.6:1H"),
    # GQA / MQA
    Case(b=2, h=4, hkv=1, block=(64, 64), mask="random:0.5:BH"),
    # on Hopper the Mosaic GPU kernels at 64x64 mask tiles (see
    # test_forward): an odd number of 64-row mask rows and columns, GQA;
    # 197 tokens (the Triton forward, the Mosaic backward's row-major
    # copies); more items than SMs
    Case(b=2, h=4, hkv=2, d=128, dtype="bfloat16", block=(64, 64), sq=256,
         sk=320, causal=True, mask="random:0.5:BH"),
    Case(b=2, h=4, hkv=2, d=128, dtype="bfloat16", block=(64, 64), sq=320,
         sk=448, mask="random:0.3:BH"),
    Case(b=2, h=4, hkv=2, d=64, dtype="float16", block=(64, 64), sq=197,
         sk=197, mask="local"),
    Case(b=2, h=8, hkv=8, d=64, dtype="bfloat16", block=(192, 192), sq=1152,
         sk=1152, causal=True, mask="none"),
    Case(h=4, hkv=2, block=(32, 64), sq=197, sk=260, causal=True, mask="random:0.5:1H"),
    Case(b=2, h=6, hkv=2, d=32, block=(64, 64), sq=150, sk=150, causal=True,
         q_lens=(150, 77), mask="random:0.5:BH"),
    # ragged lengths, including empty examples
    Case(b=2, q_lens=(197, 0), kv_lens=(100, 150), mask="random:0.5:11"),
    Case(b=2, dtype="bfloat16", block=(32, 32), causal=True, q_lens=(50, 197),
         kv_lens=(0, 197)),
    Case(b=2, block=(16, 16), hkv=1, q_lens=(1, 130), kv_lens=(197, 1), causal=True,
         mask="none"),
    Case(b=2, h=4, hkv=2, block=(64, 64), kv_lens=(60, 197), mask="random:0.5:B1"),
    # empty rows / columns, densities 0, 0.1, 1, mask dtypes
    Case(mask="empty_rows", block=(32, 32), h=4, hkv=2),
    Case(mask="empty_cols", block=(32, 64), causal=True, dtype="bfloat16"),
    Case(b=2, mask="random:0:11"),
    Case(b=2, h=4, hkv=2, block=(32, 32), mask="random:0.1:BH"),
    Case(mask="random:1:11", sq=197, sk=260, hkv=1),
    Case(mask="int", block=(16, 32), h=4, hkv=2, causal=True),
    Case(mask="float", block=(32, 32), causal=True),
    # short sequences: fewer query rows in the batch than one kernel tile, decode
    Case(sq=20, sk=577, dtype="bfloat16", block=(128, 128), causal=True, mask="none"),
    Case(b=2, sq=1, sk=300, block=(64, 64), causal=True, mask="none"),
    # shapes that run the Mosaic GPU kernels on Hopper (see test_forward),
    # forward and backward: tiles inside both lengths, tails, shorter than a
    # tile
    Case(b=2, h=4, hkv=2, d=128, dtype="bfloat16", block=(128, 128), sq=256,
         sk=256, causal=True, mask="random:0.7:BH"),
    Case(d=64, dtype="float16", block=(256, 256), sq=384, sk=256, causal=True,
         mask="none"),
    Case(b=2, d=128, dtype="bfloat16", block=(128, 128), sq=200, sk=328,
         causal=True, mask="random:0.7:BH"),
    Case(b=2, h=4, hkv=2, d=64, dtype="float16", block=(128, 128), sq=64,
         sk=136, mask="none"),
]


# 64x64 mask tiles (192-token blocks) at D=64: the Triton forward (faster
# there, `fwd_block64.ROUTED_HEAD_DIMS`) and the Mosaic backward.
_D64_BLOCK64_CASE = Case(b=2, h=4, hkv=2, d=64, dtype="bfloat16",
                         block=(192, 192), sq=576, sk=576, mask="none")

# Dropout on shapes the Mosaic GPU kernels take on a Hopper GPU, forward and
# backward (fp16/bf16, D 64/128, 128x128 mask tiles, lengths that are
# multiples of 8 or any at D=64, no seqlens): dense with GQA, causal MQA, sparse per
# example and head with lengths ending inside a tile, shorter than a tile,
# a token rule with partial tiles on both sides, more items than SMs.
_HOPPER_DROPOUT_CASES = [
    Case(b=2, h=4, hkv=2, d=64, dtype="bfloat16", block=(128, 128), sq=512,
         sk=512, mask="none"),
    Case(b=2, h=4, hkv=1, d=128, dtype="float16", block=(128, 128), sq=384,
         sk=384, causal=True, mask="none"),
    Case(b=2, d=128, dtype="bfloat16", block=(128, 128), sq=200, sk=328,
         causal=True, mask="random:0.7:BH"),
    Case(b=2, h=4, hkv=2, d=64, dtype="float16", block=(128, 128), sq=64,
         sk=136, mask="none"),
    Case(b=2, h=2, hkv=1, d=128, dtype="float16", block=(128, 128), sq=640,
         sk=640, mask="none", mask_fn=masks.sliding_window(100, 150)),
    Case(b=2, h=16, hkv=4, d=64, dtype="bfloat16", block=(128, 128), sq=2048,
         sk=1024, mask="random:0.3:BH"),
    # ViT's 197 tokens at D=64 (TMA copies through row-major aliases,
    # `common.row_major_copies`)
    Case(b=3, h=12, hkv=12, d=64, dtype="bfloat16", block=(128, 128), sq=197,
         sk=197, mask="none"),
    # 64x64 mask tiles: odd numbers of mask rows and columns, causal with
    # per-head random blocks
    Case(b=2, h=4, hkv=2, d=128, dtype="float16", block=(64, 64), sq=320,
         sk=448, causal=True, mask="random:0.5:BH"),
    _D64_BLOCK64_CASE,
]


_NOT_HOPPER = ("the Mosaic GPU backward runs only on a Hopper GPU; "
               "tests/test_hopper_interpret.py checks it interpreted and "
               "tests/test_cuda_lowering.py its dispatch on any machine")


def _check_dropout_grads(case, rate, seed, key, mosaic_forward: bool):
  """The gradients with dropout match autodiff of the fp32 reference with the
  same key (the same keep bits), are far from the reference's for another
  key and the same again for the same key. `mosaic_forward`: the forward is
  a Mosaic GPU kernel too (otherwise Triton's, whose keep bits the Mosaic
  backward must reproduce)."""
  k_in, k_cot = jax.random.split(key)
  q, k, v = random_qkv(k_in, case)
  cot = _cotangent(k_cot, case)
  mask = case_block_mask(case, user_mask(case, seed))

  def grad_of(backend):
    def loss(q, k, v, rng):
      out = block_sparse_attention(q, k, v, mask, block_size=case.block,
                                   is_causal=case.causal, dropout_rate=rate,
                                   dropout_rng=rng, backend=backend)
      return jnp.sum(out.astype(jnp.float32) * cot)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  run, reference = grad_of("auto"), grad_of("reference")
  rng = jax.random.key(5)
  text = run.lower(q, k, v, rng).as_text()
  # dK/dV and dQ are Mosaic GPU kernels; the forward is one too, or Triton's
  mosaic_calls = text.count("@mosaic_gpu_v2(")
  if mosaic_forward:
    assert mosaic_calls == 3 and "xla.gpu.triton" not in text
  else:
    assert mosaic_calls == 2 and text.count("xla.gpu.triton") == 1
  grads = run(q, k, v, rng)
  refs = reference(*upcast(q, k, v), rng)
  others = reference(*upcast(q, k, v), jax.random.key(6))
  tol = tol_for(case.dtype)
  for name, g, r, o, x in zip(("dq", "dk", "dv"), grads, refs, others, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype, name
    assert not np.isnan(np.asarray(g.astype(jnp.float32))).any(), f"{name} has NaN"
    err = rel_err(g, r)
    assert err < tol, f"{name} rel err {err:.3g} >= {tol}"
    assert rel_err(g, o) > 0.1, f"{name}: another key gives about the same"
  for a, b in zip(run(q, k, v, rng), grads):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(not targets_hopper(), reason=_NOT_HOPPER)
@pytest.mark.parametrize("rate", [0.1, 0.5])
@pytest.mark.parametrize("case", _HOPPER_DROPOUT_CASES, ids=lambda c: c.id)
def test_hopper_dropout_grads_match_reference(case, rate, seed, key):
  """With dropout, the training step on the kernels the registry picks on a
  Hopper GPU (all Mosaic GPU, but the routed D=64 64-tile forward) gives the
  reference's gradients for the same key."""
  _check_dropout_grads(case, rate, seed, key,
                       mosaic_forward=case is not _D64_BLOCK64_CASE)


@pytest.mark.skipif(not targets_hopper(), reason=_NOT_HOPPER)
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_hopper_dropout_grads_with_the_64_tile_forward_at_d64(
    rate, seed, key, block64_forward_at_d64):
  """The same at D=64 with the 64-tile Mosaic forward routed in: a training
  step with no Triton kernel."""
  _check_dropout_grads(_D64_BLOCK64_CASE, rate, seed, key, mosaic_forward=True)


def _loss(fn, cot):
  """`loss(q, k, v, lens) = sum(fn(q, k, v, lens) * cot)`."""
  def loss(q, k, v, lens):
    return jnp.sum(fn(q, k, v, lens).astype(jnp.float32) * cot)
  return loss


def _attn(case: Case, mask, **extra):
  """`fn(q, k, v, lens)`, lens = (q_seqlens, kv_seqlens) passed as (traced) args."""
  def fn(q, k, v, lens):
    q_lens, kv_lens = lens
    return block_sparse_attention(q, k, v, mask, block_size=case.block,
                                  is_causal=case.causal, q_seqlens=q_lens,
                                  kv_seqlens=kv_lens, **extra)
  return fn


def _cotangent(key, case: Case):
  return jax.random.normal(key, (case.b, case.sq, case.h, case.d), jnp.float32)


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: c.id)
def test_grad_matches_reference(case, seed, key):
  k_in, k_cot = jax.random.split(key)
  q, k, v = random_qkv(k_in, case)
  cot = _cotangent(k_cot, case)
  mask = user_mask(case, seed)
  q_lens, kv_lens = seqlens(case)
  static = dict(block_size=case.block, is_causal=case.causal)
  grads = jitted_grad(**static)(q, k, v, cot, mask, q_lens, kv_lens)
  ref = jitted_grad(backend="reference", **static)(*upcast(q, k, v), cot, mask,
                                                   q_lens, kv_lens)
  tol = tol_for(case.dtype)
  for name, g, r, x in zip(("dq", "dk", "dv"), grads, ref, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype, name
    g_np = np.asarray(g.astype(jnp.float32))
    assert not np.isnan(g_np).any(), f"{name} has NaN"
    err = rel_err(g, r)
    assert err < tol, f"{name} rel err {err:.3g} >= {tol}"

  allowed = case_token_mask(case, mask)
  dq, dk, dv = (np.asarray(g.astype(jnp.float32)) for g in grads)
  no_keys = no_key_rows(allowed, case.b, case.h)                  # [B, H, Sq]
  assert np.all(dq.transpose(0, 2, 1, 3)[no_keys] == 0.0), "dq of key-less rows"
  unseen = unattended_keys(allowed, case.b, case.h, case.hkv)     # [B, Hkv, Sk]
  assert np.all(dk.transpose(0, 2, 1, 3)[unseen] == 0.0), "dk of unseen keys"
  assert np.all(dv.transpose(0, 2, 1, 3)[unseen] == 0.0), "dv of unseen keys"


def _tiny_case():
  return Case(b=1, sq=48, sk=48, h=2, hkv=1, d=16, block=(16, 16), causal=True,
              mask="random:0.7:1H")


def test_check_grads_numerically(seed, key):
  """Reverse-mode gradients agree with finite differences (fp32, x64 off)."""
  case = _tiny_case()
  q, k, v = random_qkv(key, case)
  mask = user_mask(case, seed)
  attn = jax.jit(_attn(case, mask))
  f = lambda q, k, v: attn(q, k, v, (None, None))
  tols = dict(order=1, modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-2)
  check_grads(f, (q, k, v), **tols)

  # The same check rejects a gradient that is 5% off: the tolerance has teeth.
  @jax.custom_vjp
  def skewed(q, k, v):
    return f(q, k, v)

  def skewed_fwd(q, k, v):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp

  def skewed_bwd(vjp, g):
    return tuple(x * 1.05 for x in vjp(g))

  skewed.defvjp(skewed_fwd, skewed_bwd)
  with pytest.raises(AssertionError):
    check_grads(skewed, (q, k, v), **tols)


def _gqa_ragged_case():
  return Case(b=2, h=4, hkv=2, sq=197, sk=197, block=(32, 32), causal=True,
              q_lens=(150, 197), kv_lens=(120, 190), mask="random:0.6:BH")


def test_gradients_are_deterministic(seed, key):
  """No atomics: two runs of the gradient are bit-identical."""
  case = _gqa_ragged_case()
  k_in, k_cot = jax.random.split(key)
  q, k, v = random_qkv(k_in, case)
  grad = jax.jit(jax.grad(_loss(_attn(case, user_mask(case, seed)),
                                _cotangent(k_cot, case)), argnums=(0, 1, 2)))
  lens = seqlens(case)
  first = [np.asarray(g) for g in grad(q, k, v, lens)]
  second = [np.asarray(g) for g in grad(q, k, v, lens)]
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grad_through_lse(seed, key, dtype):
  """A loss that uses the returned lse too gets the reference gradient."""
  case = Case(b=2, h=4, hkv=2, dtype=dtype, block=(32, 32), causal=True,
              q_lens=(197, 90), kv_lens=(150, 197), mask="empty_rows")
  k_in, k_cot, k_lse = jax.random.split(key, 3)
  q, k, v = random_qkv(k_in, case)
  cot = _cotangent(k_cot, case)
  cot_lse = 3.0 * jax.random.normal(k_lse, (case.b, case.h, case.sq), jnp.float32)
  mask = user_mask(case, seed)

  def loss_of(**extra):
    fn = _attn(case, mask, return_lse=True, **extra)
    def loss(q, k, v, lens):
      out, lse = fn(q, k, v, lens)
      lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
      return jnp.sum(out.astype(jnp.float32) * cot) + jnp.sum(lse * cot_lse)
    return loss

  grad_of = lambda loss: jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  lens = seqlens(case)
  grads = grad_of(loss_of())(q, k, v, lens)
  ref = grad_of(loss_of(backend="reference"))(*upcast(q, k, v), lens)
  no_lse = grad_of(_loss(_attn(case, mask), cot))(q, k, v, lens)
  tol = tol_for(dtype)
  for name, g, r, n in zip(("dq", "dk", "dv"), grads, ref, no_lse):
    assert not np.isnan(np.asarray(g.astype(jnp.float32))).any(), name
    err = rel_err(g, r)
    assert err < tol, f"{name} rel err {err:.3g} >= {tol}"
  # The lse term really contributes (to dq and dk; dv does not depend on lse).
  assert rel_err(no_lse[0], ref[0]) > 0.1
  assert rel_err(no_lse[1], ref[1]) > 0.1


def test_value_and_grad_vjp_and_jit_agree(seed, key):
  """value_and_grad, jax.vjp and jit(grad) give the plain jax.grad answer."""
  case = _gqa_ragged_case()
  k_in, k_cot = jax.random.split(key)
  q, k, v = random_qkv(k_in, case)
  cot = _cotangent(k_cot, case)
  lens = seqlens(case)
  fn = _attn(case, user_mask(case, seed))
  loss = _loss(fn, cot)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, lens)

  value, vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v, lens)
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, lens), q, k, v)
  vjp_grads = vjp(cot.astype(out.dtype))
  jit_grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, lens)

  assert abs(float(value) - float(loss(q, k, v, lens))) <= 1e-5 * abs(float(value))
  for g, a, b, c in zip(grads, vg, vjp_grads, jit_grads):
    assert rel_err(a, c) < 1e-6
    np.testing.assert_array_equal(np.asarray(b), np.asarray(g))
    assert rel_err(c, g) < 1e-6


def test_float_user_mask_does_not_break_grad(seed, key):
  """A float32 block mask (traced under jit) gives the bool mask's gradients."""
  case = Case(h=4, hkv=2, block=(32, 32), causal=True, mask="float")
  k_in, k_cot = jax.random.split(key)
  q, k, v = random_qkv(k_in, case)
  cot = _cotangent(k_cot, case)
  fmask = user_mask(case, seed)
  assert fmask.dtype == jnp.float32

  def loss(q, k, v, mask):
    out = block_sparse_attention(q, k, v, mask, block_size=case.block, is_causal=True)
    return jnp.sum(out * cot)

  g_float = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, fmask)
  g_bool = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, fmask != 0)
  for a, b in zip(g_float[:3], g_bool):
    assert not np.isnan(np.asarray(a)).any()
    assert rel_err(a, b) < 1e-6
  # The mask only selects tiles: its own gradient is zero.
  assert g_float[3].shape == fmask.shape
  assert np.all(np.asarray(g_float[3]) == 0.0)


@pytest.mark.parametrize("fill", ["random", "nan"])
def test_packed_examples_are_isolated(seed, key, fill):
  """Padding and other examples never leak into an example's outputs or grads.

  (1) Changing example 0's tokens beyond its lengths leaves every real output and
  every real-token gradient bit-identical. (2) Changing example 1 entirely leaves
  example 0's outputs and gradients bit-identical.
  """
  case = Case(b=2, h=4, hkv=2, sq=197, sk=197, block=(64, 64), causal=True,
              q_lens=(150, 197), kv_lens=(101, 180), mask="random:0.7:1H")
  k_in, k_cot, k_new = jax.random.split(key, 3)
  q, k, v = random_qkv(k_in, case)
  cot = _cotangent(k_cot, case)
  fn = _attn(case, user_mask(case, seed))
  loss = _loss(fn, cot)
  lens = seqlens(case)

  @jax.jit
  def out_and_grads(q, k, v, lens):
    return (fn(q, k, v, lens), *jax.grad(loss, argnums=(0, 1, 2))(q, k, v, lens))

  def run(q, k, v):
    return [np.asarray(x.astype(jnp.float32)) for x in out_and_grads(q, k, v, lens)]

  base = run(q, k, v)
  nq, nk = case.q_lens[0], case.kv_lens[0]
  new_q, new_k, new_v = random_qkv(k_new, case)
  if fill == "nan":
    new_q, new_k, new_v = (jnp.full_like(x, jnp.nan) for x in (q, k, v))

  # (1) example 0's padded region
  changed = run(q.at[0, nq:].set(new_q[0, nq:]),
                k.at[0, nk:].set(new_k[0, nk:]),
                v.at[0, nk:].set(new_v[0, nk:]))
  out, dq, dk, dv = changed
  np.testing.assert_array_equal(out, base[0])
  assert not np.isnan(out).any()
  np.testing.assert_array_equal(dq[0, :nq], base[1][0, :nq])
  np.testing.assert_array_equal(dk[0, :nk], base[2][0, :nk])
  np.testing.assert_array_equal(dv[0, :nk], base[3][0, :nk])
  for now, before in zip(changed[1:], base[1:]):
    np.testing.assert_array_equal(now[1], before[1])
  # Padded keys are never attended: their dk/dv are exactly 0.
  assert np.all(dk[0, nk:] == 0.0) and np.all(dv[0, nk:] == 0.0)

  # (2) example 1, every token
  changed = run(q.at[1].set(new_q[1]), k.at[1].set(new_k[1]), v.at[1].set(new_v[1]))
  for now, before in zip(changed, base):
    np.testing.assert_array_equal(now[0], before[0])
