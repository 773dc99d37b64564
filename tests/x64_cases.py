"""Kernels with `jax_enable_x64` on (run by `test_reliability.test_x64_session`
in a process started with `JAX_ENABLE_X64=1`; pytest does not collect this
module otherwise).

Under x64 a Python int or a bare `:` index becomes int64; every kernel keeps
its indices int32, in interpret mode and in the CUDA lowering of both
families. Each case must match the same call's fp32 reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsattn_jax import (block_sparse_attention, block_sparse_attn_func,
                        create_block_mask, masks)
from bsattn_jax.reference import block_sparse_reference
from conftest import rel_err
from pallas_kernels.mosaic_gpu import bwd as mosaic_bwd
from pallas_kernels.mosaic_gpu import fwd as mosaic_fwd
from test_cuda_lowering import MOSAIC_CALL, TRITON_CALL, _lower


@pytest.fixture(autouse=True)
def _x64_on():
  assert jax.config.jax_enable_x64, "run this module with JAX_ENABLE_X64=1"


def _qkv(b, s, h, hkv, d, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(kk, shape, jnp.float32).astype(dtype)
               for kk, shape in zip(keys, [(b, s, h, d), (b, s, hkv, d), (b, s, hkv, d)]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_padded_forward_and_gradients(dtype):
  q, k, v = _qkv(2, 150, 2, 1, 32, dtype)
  bm = create_block_mask(masks.sliding_window(30, 30), None, None, 150, 150,
                         block_size=(64, 64))
  call = lambda backend: (lambda q, k, v: block_sparse_attention(
      q, k, v, bm, is_causal=False, dropout_rate=0.1, dropout_rng=jax.random.key(1),
      backend=backend).astype(jnp.float32))
  out = call("auto")(q, k, v)
  ref = call("reference")(*(x.astype(jnp.float32) for x in (q, k, v)))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert out.dtype == jnp.float32 and rel_err(out, ref) < tol
  grads = jax.grad(lambda *x: jnp.sum(call("auto")(*x)), argnums=(0, 1, 2))(q, k, v)
  refs = jax.grad(lambda *x: jnp.sum(call("reference")(*x)), argnums=(0, 1, 2))(
      *(x.astype(jnp.float32) for x in (q, k, v)))
  for g, r in zip(grads, refs):
    assert rel_err(g, r) < tol


def test_packed_mixed_heads():
  lens = [70, 130]
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
  keys = jax.random.split(jax.random.key(2), 3)
  q, k, v = (jax.random.normal(kk, (200, 3, 32), jnp.float32) for kk in keys)
  types = jnp.asarray([0, 1, -1], jnp.int32)
  info = jnp.asarray([0, 0, 0, 0, 1, 1], jnp.int32)
  base = jnp.ones((2, 1, 3, 3), bool)
  run = lambda backend: block_sparse_attn_func(q, k, v, cu, cu, types, info, base,
                                               is_causal=True, backend=backend,
                                               m_block_dim=64, n_block_dim=64)[0]
  assert rel_err(run("auto"), run("reference")) < 1e-5


@pytest.mark.parametrize("seq_len", [256, 200])
def test_mosaic_kernels_interpreted(seq_len):
  """The Hopper forward and backward in Mosaic GPU's interpreter (200: the
  per-example views and padded statistics of a tail)."""
  q, k, v = _qkv(2, seq_len, 2, 1, 64, jnp.bfloat16)
  bm = create_block_mask(masks.sliding_window(60, 60), None, None, seq_len,
                         seq_len)
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  kw = dict(softmax_scale=0.125, rule=bm.element_rule, q_len=seq_len,
            kv_len=seq_len, num_programs=2, interpret=True)
  out, lse = mosaic_fwd.forward(flat(q), flat(k), flat(v), bm.kv_lists, **kw)
  upcast = lambda x: x.astype(jnp.float32)
  reference = lambda q, k, v: block_sparse_attention(
      q, k, v, bm, softmax_scale=0.125, backend="reference")
  ref, vjp = jax.vjp(reference, upcast(q), upcast(k), upcast(v))
  assert rel_err(out.reshape(q.shape), ref) < 2e-2
  do = q[:, ::-1]                      # a cotangent unlike the output
  grads = mosaic_bwd.backward(flat(q), flat(k), flat(v), out, lse, flat(do), None,
                              bm.kv_lists, bm.q_lists, **kw)
  for grad, ref_grad in zip(grads, vjp(upcast(do))):
    assert rel_err(grad.reshape(ref_grad.shape), ref_grad) < 2e-2


@pytest.mark.parametrize("d,dtype,seq_len,expect_mosaic", [
    (128, jnp.bfloat16, 512, True), (64, jnp.float16, 200, True),
    (64, jnp.float32, 512, False)])
def test_cuda_lowering_keeps_int32(d, dtype, seq_len, expect_mosaic):
  shape_q = jax.ShapeDtypeStruct((2, seq_len, 4, d), dtype)
  shape_kv = jax.ShapeDtypeStruct((2, seq_len, 2, d), dtype)

  def train(q, k, v):
    bm = create_block_mask(masks.chunked_causal(100), None, None, seq_len,
                           seq_len)
    loss = lambda q, k, v: jnp.sum(block_sparse_attention(
        q, k, v, bm, backend="pallas").astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  text = _lower(train, (shape_q, shape_kv, shape_kv))
  assert text.count(MOSAIC_CALL) == 3 * expect_mosaic   # forward, dK/dV, dQ
  assert text.count(TRITON_CALL) == 3 * (not expect_mosaic)


def test_mosaic_forward_dropout_keeps_int32():
  """Dropout in the Hopper forward: interpreted against the reference with
  the same bits, and lowered for an H100 (the hash stays int32)."""
  from pallas_kernels import dropout as dropout_bits
  q, k, v = _qkv(2, 256, 2, 1, 64, jnp.bfloat16)
  bm = create_block_mask(masks.causal, None, None, 256, 256)
  seeds = dropout_bits.example_seeds(jax.random.key(2), 2)
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  out, _ = mosaic_fwd.forward(
      flat(q), flat(k), flat(v), bm.kv_lists, softmax_scale=0.125,
      rule=bm.element_rule, q_len=256, kv_len=256,
      dropout=dropout_bits.Dropout(0.2), seeds=seeds, num_programs=2,
      interpret=True)
  upcast = lambda x: x.astype(jnp.float32)
  ref, _ = block_sparse_reference(upcast(q), upcast(k), upcast(v), bm,
                                  softmax_scale=0.125, dropout_rate=0.2,
                                  dropout_seeds=seeds)
  assert rel_err(out.reshape(q.shape), ref) < 2e-2

  shape = jax.ShapeDtypeStruct((2, 512, 2, 128), jnp.bfloat16)
  attn = lambda q, k, v: block_sparse_attention(
      q, k, v, is_causal=True, dropout_rate=0.1, dropout_rng=jax.random.key(0),
      backend="pallas")
  assert _lower(attn, (shape, shape, shape)).count(MOSAIC_CALL) == 1


def test_mosaic_backward_dropout_keeps_int32():
  """Dropout in the Hopper backward (dK/dV and dQ hash the forward's bits):
  interpreted against the reference's gradients with the same bits (a tail
  length: per-example views), and a training step lowered for an H100 (3
  Mosaic calls; the hash stays int32)."""
  from pallas_kernels import dropout as dropout_bits
  q, k, v = _qkv(2, 200, 4, 2, 64, jnp.bfloat16)
  bm = create_block_mask(masks.causal, None, None, 200, 200)
  seeds = dropout_bits.example_seeds(jax.random.key(4), 2)
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  kw = dict(softmax_scale=0.125, rule=bm.element_rule, q_len=200, kv_len=200,
            dropout=dropout_bits.Dropout(0.3), seeds=seeds, num_programs=2,
            interpret=True)
  out, lse = mosaic_fwd.forward(flat(q), flat(k), flat(v), bm.kv_lists, **kw)
  do = q[:, ::-1]                      # a cotangent unlike the output
  grads = mosaic_bwd.backward(flat(q), flat(k), flat(v), out, lse, flat(do),
                              None, bm.kv_lists, bm.q_lists, **kw)
  upcast = lambda x: x.astype(jnp.float32)
  _, vjp = jax.vjp(lambda q, k, v: block_sparse_reference(
      q, k, v, bm, softmax_scale=0.125, dropout_rate=0.3,
      dropout_seeds=seeds)[0], upcast(q), upcast(k), upcast(v))
  for grad, ref_grad in zip(grads, vjp(upcast(do))):
    assert rel_err(grad.reshape(ref_grad.shape), ref_grad) < 2e-2

  shape_q = jax.ShapeDtypeStruct((2, 456, 4, 128), jnp.float16)
  shape_kv = jax.ShapeDtypeStruct((2, 456, 2, 128), jnp.float16)

  def train(q, k, v):
    loss = lambda q, k, v: jnp.sum(block_sparse_attention(
        q, k, v, is_causal=True, dropout_rate=0.1,
        dropout_rng=jax.random.key(0), backend="pallas").astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  text = _lower(train, (shape_q, shape_kv, shape_kv))
  assert text.count(MOSAIC_CALL) == 3 and text.count(TRITON_CALL) == 0


def test_mosaic_block64_forward_keeps_int32():
  """The Hopper forward at 64x64 tiles (rows paired by tile count, dropout):
  interpreted against the reference with the same bits, and lowered for an
  H100."""
  from pallas_kernels import dropout as dropout_bits
  from pallas_kernels.mosaic_gpu import fwd_block64
  q, k, v = _qkv(2, 320, 2, 1, 64, jnp.bfloat16)
  bm = create_block_mask(masks.sliding_window(70, 70), None, None, 320, 320,
                         block_size=(64, 64))
  seeds = dropout_bits.example_seeds(jax.random.key(3), 2)
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  out, _ = fwd_block64.forward(
      flat(q), flat(k), flat(v), bm.kv_lists, softmax_scale=0.125,
      rule=bm.element_rule, q_len=320, kv_len=320,
      dropout=dropout_bits.Dropout(0.2), seeds=seeds, num_programs=2,
      interpret=True)
  upcast = lambda x: x.astype(jnp.float32)
  ref, _ = block_sparse_reference(upcast(q), upcast(k), upcast(v), bm,
                                  softmax_scale=0.125, dropout_rate=0.2,
                                  dropout_seeds=seeds)
  assert rel_err(out.reshape(q.shape), ref) < 2e-2

  shape_q = jax.ShapeDtypeStruct((2, 456, 4, 128), jnp.bfloat16)
  shape_kv = jax.ShapeDtypeStruct((2, 456, 2, 128), jnp.bfloat16)
  attn = lambda q, k, v: block_sparse_attention(
      q, k, v, block_size=(64, 64), is_causal=True, dropout_rate=0.1,
      dropout_rng=jax.random.key(0), backend="pallas")
  text = _lower(attn, (shape_q, shape_kv, shape_kv))
  assert text.count(MOSAIC_CALL) == 1 and text.count(TRITON_CALL) == 0
