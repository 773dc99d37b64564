"""Bad inputs raise ValueError/TypeError whose message names the argument.

Nothing may be broadcast or truncated silently: each call below would otherwise
run (or crash deep inside jnp with a message that names nothing of the user's).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsattn_jax import BlockMask, block_sparse_attention

B, S, H, HKV, D = 2, 64, 4, 2, 32


def _qkv(b=B, sq=S, sk=S, h=H, hkv=HKV, d=D, dk=None, dtype=jnp.float32,
         kdtype=None, vdtype=None):
  rng = np.random.default_rng(0)
  mk = lambda shape, dt: jnp.asarray(rng.standard_normal(shape), dt)
  q = mk((b, sq, h, d), dtype)
  k = mk((b, sk, hkv, d if dk is None else dk), kdtype or dtype)
  v = mk((b, sk, hkv, d if dk is None else dk), vdtype or dtype)
  return q, k, v


def _mask(shape):
  return jnp.ones(shape, jnp.bool_)


def _block_mask(**kw):
  args = dict(seq_len_q=S, block_size=(16, 16))
  args.update(kw)
  return BlockMask.build(None, **args)


q, k, v = _qkv()

# (id, thunk, argument name the message must contain)
BAD_CALLS = [
    ("q_ndim", lambda: block_sparse_attention(q[0], k, v), "q"),
    ("k_ndim", lambda: block_sparse_attention(q, k[None], v), "k"),
    ("v_ndim", lambda: block_sparse_attention(q, k, v[0]), "v"),
    ("q_not_array", lambda: block_sparse_attention(np.asarray(q).tolist(), k, v), "q"),
    ("dtype_mismatch", lambda: block_sparse_attention(*_qkv(kdtype=jnp.bfloat16)), "dtype"),
    ("v_dtype_mismatch", lambda: block_sparse_attention(*_qkv(vdtype=jnp.float16)), "dtype"),
    ("int_dtype", lambda: block_sparse_attention(*_qkv(dtype=jnp.int32)), "q"),
    ("float64_dtype", lambda: block_sparse_attention(
        *(x.astype(np.float64) for x in map(np.asarray, _qkv()))), "q"),
    ("head_dim_mismatch", lambda: block_sparse_attention(*_qkv(dk=64)), "head dim"),
    ("k_v_shape_mismatch", lambda: block_sparse_attention(q, k, v[:, :32]), "k and v"),
    ("head_dim_too_large", lambda: block_sparse_attention(*_qkv(d=320)), "head dim"),
    ("kv_heads_not_dividing", lambda: block_sparse_attention(*_qkv(h=4, hkv=3)),
     "kv heads"),
    ("zero_kv_heads", lambda: block_sparse_attention(*_qkv(hkv=0)), "kv heads"),
    ("batch_mismatch", lambda: block_sparse_attention(q, k[:1], v[:1]), "batch"),
    ("block_not_multiple_of_16", lambda: block_sparse_attention(q, k, v, block_size=(24, 16)),
     "block_size"),
    ("block_n_not_multiple_of_16",
     lambda: block_sparse_attention(q, k, v, block_size=(16, 40)), "n_block_dim"),
    ("block_zero", lambda: block_sparse_attention(q, k, v, block_size=(0, 16)), "block_size"),
    ("block_not_pair", lambda: block_sparse_attention(q, k, v, block_size=64), "block_size"),
    ("block_triple", lambda: block_sparse_attention(q, k, v, block_size=(16, 16, 16)),
     "block_size"),
    ("block_float", lambda: block_sparse_attention(q, k, v, block_size=(16.0, 16.0)),
     "block_size"),
    ("mask_wrong_block_counts",
     lambda: block_sparse_attention(q, k, v, _mask((1, 1, 4, 3)), block_size=(16, 16)),
     "mask"),
    ("mask_wrong_ndim",
     lambda: block_sparse_attention(q, k, v, _mask((4, 4)), block_size=(16, 16)), "mask"),
    ("mask_three_heads_for_four",
     lambda: block_sparse_attention(q, k, v, _mask((1, 3, 4, 4)), block_size=(16, 16)),
     "mask head"),
    ("mask_kv_heads_for_q_heads",
     lambda: block_sparse_attention(q, k, v, _mask((1, HKV, 4, 4)), block_size=(16, 16)),
     "mask head"),
    ("mask_wrong_batch",
     lambda: block_sparse_attention(q, k, v, _mask((3, 1, 4, 4)), block_size=(16, 16)),
     "mask batch"),
    ("mask_complex_dtype",
     lambda: block_sparse_attention(q, k, v, jnp.ones((1, 1, 4, 4), jnp.complex64),
                                    block_size=(16, 16)), "mask"),
    ("block_mask_other_length",
     lambda: block_sparse_attention(q, k, v, _block_mask(seq_len_q=128)), "BlockMask"),
    ("block_mask_other_kv_length",
     lambda: block_sparse_attention(q, k, v, _block_mask(seq_len_kv=80)), "seq_len_kv"),
    ("causal_with_non_causal_block_mask",
     lambda: block_sparse_attention(q, k, v, _block_mask(), is_causal=True), "is_causal"),
    ("q_seqlens_with_block_mask",
     lambda: block_sparse_attention(q, k, v, _block_mask(), q_seqlens=jnp.array([3, 4])),
     "q_seqlens"),
    ("kv_seqlens_with_block_mask",
     lambda: block_sparse_attention(q, k, v, _block_mask(), kv_seqlens=jnp.array([3, 4])),
     "kv_seqlens"),
    ("block_mask_batch_too_big",
     lambda: block_sparse_attention(q[:1], k[:1], v[:1],
                                    _block_mask(q_seqlens=jnp.array([3, 4]))), "batch"),
    ("bad_backend", lambda: block_sparse_attention(q, k, v, backend="cuda"), "backend"),
    ("softmax_scale_string", lambda: block_sparse_attention(q, k, v, softmax_scale="0.1"),
     "softmax_scale"),
    ("softmax_scale_array",
     lambda: block_sparse_attention(q, k, v, softmax_scale=jnp.ones(2)),
     "softmax_scale"),
    ("softmax_scale_nan",
     lambda: block_sparse_attention(q, k, v, softmax_scale=float("nan")),
     "softmax_scale"),
    ("softmax_scale_inf",
     lambda: block_sparse_attention(q, k, v, softmax_scale=-np.inf), "softmax_scale"),
    ("softmax_scale_zero",
     lambda: block_sparse_attention(q, k, v, softmax_scale=0.0), "softmax_scale"),
    ("softmax_scale_traced",
     lambda: jax.jit(lambda s: block_sparse_attention(q, k, v, softmax_scale=s))(0.1),
     "softmax_scale"),
    ("pallas_backend_on_cpu",
     lambda: block_sparse_attention(q, k, v, backend="pallas"), "backend='pallas'"),
    ("q_seqlens_2d",
     lambda: block_sparse_attention(q, k, v, q_seqlens=jnp.array([[3, 4]])), "q_seqlens"),
    ("q_seqlens_float",
     lambda: block_sparse_attention(q, k, v, q_seqlens=jnp.array([3.0, 4.0])), "q_seqlens"),
    ("kv_seqlens_2d",
     lambda: block_sparse_attention(q, k, v, kv_seqlens=jnp.array([[3], [4]])), "kv_seqlens"),
    ("q_seqlens_too_long",
     lambda: block_sparse_attention(q, k, v, q_seqlens=jnp.array([3, 4, 5])), "q_seqlens"),
    ("q_seqlens_one_entry_for_two_examples",
     lambda: block_sparse_attention(q, k, v, q_seqlens=jnp.array([3])), "q_seqlens"),
    ("kv_seqlens_too_long",
     lambda: block_sparse_attention(q, k, v, kv_seqlens=jnp.array([3, 4, 5])), "kv_seqlens"),
    ("seqlens_disagree",
     lambda: block_sparse_attention(q, k, v, q_seqlens=jnp.array([3, 4, 5]),
                                    kv_seqlens=jnp.array([3, 4])), "q_seqlens"),
    ("q_seqlens_too_large",
     lambda: block_sparse_attention(q, k, v, q_seqlens=jnp.array([3, S + 1])), "q_seqlens"),
    ("kv_seqlens_negative",
     lambda: block_sparse_attention(q, k, v, kv_seqlens=jnp.array([-1, 4])), "kv_seqlens"),
    ("build_bad_seq_len", lambda: BlockMask.build(None, seq_len_q=0), "seq_len_q"),
    ("build_bad_seq_len_kv", lambda: BlockMask.build(None, seq_len_q=64, seq_len_kv=-1),
     "seq_len_kv"),
]


# Bad only where the call runs on a CPU (a GPU runs the compiled kernels).
_CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu",
                               reason="backend='pallas' is valid on a GPU")


@pytest.mark.parametrize("thunk,name", [
    pytest.param(*c[1:], id=c[0],
                 marks=[_CPU_ONLY] if c[0] == "pallas_backend_on_cpu" else [])
    for c in BAD_CALLS])
def test_bad_input_raises_naming_the_argument(thunk, name):
  with pytest.raises((ValueError, TypeError)) as info:
    thunk()
  assert re.search(re.escape(name), str(info.value)), (
      f"message does not name {name!r}: {info.value}")


def test_valid_call_with_the_same_arrays_runs():
  """The arrays above are fine by themselves: the errors come from the one bad part."""
  mask = _mask((1, H, 4, 4))
  out = block_sparse_attention(q, k, v, mask, block_size=(16, 16),
                               q_seqlens=jnp.array([3, 64]), backend="reference")
  assert out.shape == q.shape
  assert not np.isnan(np.asarray(out)).any()


@pytest.mark.parametrize("shape_q,shape_kv", [
    ((0, 64, 2, 32), (0, 64, 2, 32)),     # no example
    ((2, 0, 2, 32), (2, 64, 2, 32)),      # no query
    ((2, 64, 0, 32), (2, 64, 1, 32)),     # no query head
    ((2, 64, 2, 32), (2, 0, 2, 32)),      # no key: every row sees nothing
])
def test_empty_dimensions_give_empty_or_zero_results(shape_q, shape_kv):
  q = jnp.ones(shape_q)
  kv = jnp.ones(shape_kv)
  out, lse = block_sparse_attention(q, kv, kv, return_lse=True)
  assert out.shape == q.shape and lse.shape == (shape_q[0], shape_q[2], shape_q[1])
  assert not np.asarray(out).any() and np.isneginf(np.asarray(lse)).all()


def test_numpy_and_concrete_scalar_scales_are_accepted(key):
  q = jax.random.normal(key, (1, 64, 2, 32))
  ref = block_sparse_attention(q, q, q, softmax_scale=0.25, backend="reference")
  for scale in (np.float32(0.25), jnp.float32(0.25), np.float64(0.25)):
    out = block_sparse_attention(q, q, q, softmax_scale=scale, backend="reference")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
