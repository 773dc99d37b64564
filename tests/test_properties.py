"""Property-based tests: the kernels (interpret mode) against the reference
over drawn shapes, head dims, GQA groups, block sizes, densities, token rules,
lengths, dtypes and scales, forward and backward.

The number of examples is bounded so CI stays fast, and the drawing is seeded
so every CI run draws the same examples; failures found (by any run, also
with more examples: `HYPOTHESIS_PROFILE=explore`) are saved in
`tests/hypothesis_db` and replayed first on every later run.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, example, given, seed, settings, strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from bsattn_jax import BlockMask, block_sparse_attention, masks
from conftest import rel_err, tol_for

_DATABASE = DirectoryBasedExampleDatabase(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "hypothesis_db"))
settings.register_profile("bsattn", max_examples=6, deadline=None,
                          database=_DATABASE, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", parent=settings.get_profile("bsattn"),
                          max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "bsattn"))

RULES = [None, masks.causal, masks.sliding_window(17, 5), masks.prefix_lm(40),
         masks.chunked_causal(33), masks.sink_window(3, 25),
         masks.or_masks(masks.sliding_window(0, 30), masks.prefix_lm(10))]


@st.composite
def problems(draw):
  kv_heads = draw(st.sampled_from([1, 2]))
  group = draw(st.sampled_from([1, 2, 3]))
  block = draw(st.sampled_from([(16, 16), (32, 32), (64, 64), (32, 64), (48, 48),
                                (64, 128)]))
  batch = draw(st.integers(1, 2))
  seq_len_q, seq_len_kv = draw(st.integers(1, 160)), draw(st.integers(1, 160))
  lengths = draw(st.booleans())
  return dict(
      batch=batch, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv,
      heads=kv_heads * group, kv_heads=kv_heads,
      head_dim=draw(st.sampled_from([8, 16, 32, 48, 64])),
      block=block, density=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
      causal=draw(st.booleans()), rule=draw(st.sampled_from(RULES)),
      q_lens=[draw(st.integers(0, seq_len_q)) for _ in range(batch)] if lengths else None,
      kv_lens=[draw(st.integers(0, seq_len_kv)) for _ in range(batch)] if lengths else None,
      dtype=draw(st.sampled_from(["float32", "bfloat16"])),
      scale=draw(st.sampled_from([None, 0.3, -0.7, 2.0])),
      seed=draw(st.integers(0, 2**16)))


def _block_mask(p) -> BlockMask:
  m, n = p["block"]
  n_m, n_n = -(-p["seq_len_q"] // m), -(-p["seq_len_kv"] // n)
  blocks = masks.random(n_m, n_n, p["density"], seed=p["seed"],
                        num_heads=p["heads"], batch=p["batch"])
  lens = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  return BlockMask.build(blocks, seq_len_q=p["seq_len_q"], seq_len_kv=p["seq_len_kv"],
                         block_size=p["block"], is_causal=p["causal"],
                         q_seqlens=lens(p["q_lens"]), kv_seqlens=lens(p["kv_lens"]),
                         mask_fn=p["rule"])


def _inputs(p):
  keys = jax.random.split(jax.random.key(p["seed"]), 4)
  dtype = jnp.dtype(p["dtype"])
  b, h, hkv, d = p["batch"], p["heads"], p["kv_heads"], p["head_dim"]
  q = jax.random.normal(keys[0], (b, p["seq_len_q"], h, d)).astype(dtype)
  k = jax.random.normal(keys[1], (b, p["seq_len_kv"], hkv, d)).astype(dtype)
  v = jax.random.normal(keys[2], (b, p["seq_len_kv"], hkv, d)).astype(dtype)
  cot = jax.random.normal(keys[3], q.shape)
  return q, k, v, cot


def _run(p, backend, q, k, v, cot):
  bm = _block_mask(p)
  def loss(q, k, v):
    out, lse = block_sparse_attention(q, k, v, bm, softmax_scale=p["scale"],
                                      return_lse=True, backend=backend)
    return jnp.sum(out.astype(jnp.float32) * cot), (out, lse)
  (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                              has_aux=True)(q, k, v)
  return out, lse, grads


# Past failures, kept as explicit examples (the database holds the ones found
# since, until they pass).
PAST_FAILURES = [
    # A per-example block mask with a rule that reads neither b nor h.
    dict(batch=2, seq_len_q=1, seq_len_kv=1, heads=1, kv_heads=1, head_dim=8,
         block=(16, 16), density=0.0, causal=False, rule=masks.causal, q_lens=None,
         kv_lens=None, dtype="float32", scale=None, seed=0),
]


def _with_past_failures(test):
  for case in PAST_FAILURES:
    test = example(case)(test)
  return test


@seed(20261130)
@_with_past_failures
@given(problems())
def test_kernels_match_the_reference(p):
  q, k, v, cot = _inputs(p)
  out, lse, grads = _run(p, "auto", q, k, v, cot)
  ref_out, ref_lse, ref_grads = _run(p, "reference",
                                     *(x.astype(jnp.float32) for x in (q, k, v)), cot)
  tol = tol_for(p["dtype"])
  assert not np.isnan(np.asarray(out.astype(jnp.float32))).any()
  assert rel_err(out, ref_out) < tol
  lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  finite = np.isfinite(ref_lse)
  if finite.any():
    assert rel_err(lse[finite], ref_lse[finite]) < tol
  for g, r in zip(grads, ref_grads):
    assert not np.isnan(np.asarray(g.astype(jnp.float32))).any()
    assert rel_err(g, r) < tol
