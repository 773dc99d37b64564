"""Never a silently wrong answer: non-finite inputs, extreme scales,
determinism across processes, poisoned neighbours, and x64 mode.

The x64 cases need `jax_enable_x64` from the start of a process:
`tests/x64_cases.py` holds them and `test_x64_session` runs that module in a
child process with `JAX_ENABLE_X64=1`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsattn_jax import block_sparse_attention, block_sparse_attn_func, masks
from conftest import rel_err

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK = masks.local(4, 4, 1)
BLOCK = (64, 64)


def _qkv(key, b=2, s=200, h=2, hkv=1, d=32, scale=1.0):
  keys = jax.random.split(key, 3)
  q = jax.random.normal(keys[0], (b, s, h, d)) * scale
  k = jax.random.normal(keys[1], (b, s, hkv, d)) * scale
  v = jax.random.normal(keys[2], (b, s, hkv, d))
  return q, k, v


def _both(q, k, v, **kw):
  """(kernel, reference) outputs and lse of the same call."""
  run = lambda backend: block_sparse_attention(q, k, v, MASK, block_size=BLOCK,
                                               return_lse=True, backend=backend, **kw)
  return run("auto"), run("reference")


@pytest.mark.parametrize("where,value", [("q", np.nan), ("k", np.nan), ("v", np.nan),
                                         ("k", np.inf), ("q", -np.inf)])
def test_non_finite_inputs_reach_exactly_the_rows_that_attend_them(key, where, value):
  q, k, v = _qkv(key)
  x = dict(q=q, k=k, v=v)
  x[where] = x[where].at[1, 70, 0, 3].set(value)
  (out, lse), (ref, ref_lse) = _both(x["q"], x["k"], x["v"])
  out, ref = np.asarray(out), np.asarray(ref)
  np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
  # A row hit by a +inf logit has lse +inf in the reference, NaN here: both
  # non-finite; rows that see nothing are -inf in both.
  lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  assert np.isnan(ref).any(), "the case must produce NaN somewhere"
  finite = np.isfinite(ref)
  assert np.abs(out[finite] - ref[finite]).max() < 1e-5


def test_nan_in_q_gives_nan_gradients_where_it_is_used_only(key):
  """A NaN in q row 10 (head 1) makes that dq row NaN and the dk/dv of the keys
  it attends (blocks 0 and 1: keys 0..127) NaN; every other gradient stays
  finite. (Autodiff through the reference would also spread it through the
  zero probabilities of keys the row does not attend.)"""
  q, k, v = _qkv(key)
  q = q.at[0, 10, 1, 0].set(jnp.nan)
  dq, dk, dv = jax.grad(lambda q, k, v: jnp.sum(block_sparse_attention(
      q, k, v, MASK, block_size=BLOCK)), argnums=(0, 1, 2))(q, k, v)
  want_dq = np.zeros(dq.shape, bool)
  want_dq[0, 10, 1, :] = True
  np.testing.assert_array_equal(np.isnan(np.asarray(dq)), want_dq)
  want_kv = np.zeros(dk.shape, bool)
  want_kv[0, :128, 0, :] = True
  np.testing.assert_array_equal(np.isnan(np.asarray(dk)), want_kv)
  np.testing.assert_array_equal(np.isnan(np.asarray(dv)), want_kv)


@pytest.mark.parametrize("scale", [-0.5, -3.0, 2.0])
def test_any_finite_scale_with_large_logits(key, scale):
  """Negative scales included: the running max is of the scaled scores."""
  q, k, v = _qkv(key, scale=5.0)
  (out, lse), (ref, ref_lse) = _both(q, k, v, softmax_scale=scale)
  assert np.isfinite(np.asarray(out)).all()
  assert rel_err(out, ref) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
  grad = lambda backend: jax.grad(lambda q: jnp.sum(block_sparse_attention(
      q, k, v, MASK, block_size=BLOCK, softmax_scale=scale, backend=backend)))(q)
  assert rel_err(grad("auto"), grad("reference")) < 1e-4


def test_poisoned_neighbours_never_reach_a_packed_sequence(key):
  """NaN everywhere outside sequence 1 of a packed batch: its output and
  gradients are finite and bit-identical to those with clean neighbours."""
  lens = [90, 130, 70]
  cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
  t = int(cu[-1])
  keys = jax.random.split(key, 4)
  q, k, v, cot = (jax.random.normal(kk, (t, 2, 32)) for kk in keys)
  mine = slice(90, 220)
  poison = lambda x: jnp.full_like(x, jnp.nan).at[mine].set(x[mine])
  types = jnp.asarray([0, -1], jnp.int32)
  info = jnp.asarray([0, 0, 1, 1], jnp.int32)

  @jax.jit
  def run(q, k, v):
    f = lambda q, k, v: block_sparse_attn_func(q, k, v, cu, cu, types, info,
                                               None, 130, 130, is_causal=True)[0]
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(cot))

  clean = [x[mine] for x in run(q, k, v)]
  dirty = [x[mine] for x in run(poison(q), poison(k), poison(v))]
  chex.assert_tree_all_finite(dirty)
  chex.assert_trees_all_equal(clean, dirty)


_DIGEST_SCRIPT = """
import hashlib, jax, jax.numpy as jnp, numpy as np
from bsattn_jax import block_sparse_attention, create_block_mask, masks
keys = jax.random.split(jax.random.key(11), 4)
q, k, v, cot = (jax.random.normal(kk, (2, 200, 2, 32)) for kk in keys)
bm = create_block_mask(masks.sliding_window(40, 40), None, None, 200, 200,
                       block_size=(64, 64))
f = lambda q, k, v: block_sparse_attention(q, k, v, bm, dropout_rate=0.2,
                                           dropout_rng=jax.random.key(3))
out, vjp = jax.vjp(f, q, k, v)
digest = hashlib.sha256()
for x in (out, *vjp(cot)):
  digest.update(np.asarray(x).tobytes())
print(digest.hexdigest())
"""


def test_results_are_bit_identical_across_processes():
  """Forward and backward (with a token rule and dropout) hash the same in
  two separate processes."""
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  digests = [subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
             for _ in range(2)]
  for proc in digests:
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert digests[0].stdout.split()[-1] == digests[1].stdout.split()[-1]


def test_x64_session():
  """The x64 cases, in a process started with jax_enable_x64."""
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu",
             JAX_ENABLE_X64="1")
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", os.path.join(REPO_ROOT, "tests", "x64_cases.py"),
       "-q", "-p", "no:cacheprovider"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_saturated_softmax_has_no_gradient_in_q_and_k(key, dtype):
  """Logits ~1e4 where every row's softmax is exactly one-hot in fp32 (each
  query is a copy of one key: the runner-up logit is thousands below): the
  output row is exactly that V row, and dq, dk are exactly 0 in the reference
  (dS = P * (dP - delta) with P one-hot). The kernels' dq, dk hold only fp32
  rounding, far below one fp16 rounding of o. Before the fp16 forwards summed
  the probabilities as rounded for P @ V (`numerics.probability_row_sums`),
  o was off by ~one fp16 step, and delta = rowsum(do * o) put ~5e-5 of the
  unit below into every dq and dk row (relative error 10..1e4 in mixed
  cases). On a Hopper GPU this runs the Mosaic GPU kernels, elsewhere the
  Triton ones."""
  b, s, h, d = 1, 128, 2, 64
  keys = jax.random.split(key, 4)
  k = (jax.random.normal(keys[0], (b, s, h, d)) * 30).astype(dtype)
  pick = jax.random.permutation(keys[1], s)
  q = k[:, pick]
  v = jax.random.normal(keys[2], (b, s, h, d)).astype(dtype)
  cot = jax.random.normal(keys[3], (b, s, h, d)).astype(dtype)
  f32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  logits = np.einsum("bqhd,bkhd->bhqk", f32(q), f32(k)) / np.sqrt(d)
  top2 = np.sort(logits, axis=-1)[..., -2:]
  assert np.abs(logits).max() > 5e3 and (top2[..., 1] - top2[..., 0]).min() > 200

  f = lambda q, k, v: block_sparse_attention(q, k, v, None, block_size=BLOCK)
  out, vjp = jax.vjp(f, q, k, v)
  dq, dk, _ = vjp(cot)
  np.testing.assert_array_equal(f32(out), f32(v[:, pick]))
  # One term of dq_i = scale * sum_j dS_ij k_j is at most this unit (and of
  # dk_j = scale * sum_i dS_ij q_i, q rows being k rows).
  unit = (np.linalg.norm(f32(cot), axis=-1).max() * np.linalg.norm(f32(v), axis=-1).max()
          * np.linalg.norm(f32(k), axis=-1).max() / np.sqrt(d))
  for g in (dq, dk):
    assert np.isfinite(f32(g)).all()
    assert np.linalg.norm(f32(g), axis=-1).max() < 1e-6 * unit
