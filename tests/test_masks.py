"""Pattern builders: exact block patterns on small sizes, checked against numpy."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from bsattn_jax import masks

NM, NN = 7, 9          # deliberately non-square


def _grid(nm=NM, nn=NN):
  return np.arange(nm)[:, None], np.arange(nn)[None, :]


def _check(pattern, expected):
  """`[1, 1, nM, nN]` bool equal to the numpy pattern."""
  assert pattern.shape == (1, 1) + expected.shape
  assert pattern.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(pattern)[0, 0], expected)


def test_dense():
  _check(masks.dense(NM, NN), np.ones((NM, NN), bool))


@pytest.mark.parametrize("window", [0, 1, 3])
def test_local(window):
  i, j = _grid()
  _check(masks.local(NM, NN, window), np.abs(i - j) <= window)


@pytest.mark.parametrize("num_global,window", [(1, 1), (2, 0), (0, 2)])
def test_global_local(num_global, window):
  i, j = _grid()
  expected = (np.abs(i - j) <= window) | (i < num_global) | (j < num_global)
  _check(masks.global_local(NM, NN, num_global, window), expected)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_strided(stride):
  i, j = _grid()
  _check(masks.strided(NM, NN, stride), (i - j) % stride == 0)


def test_strided_small_by_hand():
  expected = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]], bool)
  _check(masks.strided(3, 4, 2), expected)


@pytest.mark.parametrize("offsets", [(0,), (0, 2), (-1, 1, 5)])
def test_diagonal(offsets):
  i, j = _grid()
  expected = np.zeros((NM, NN), bool)
  for o in offsets:
    expected |= (j - i) == o
  _check(masks.diagonal(NM, NN, offsets), expected)


@pytest.mark.parametrize("nm,nn", [(4, 4), (3, 5), (5, 3)])
def test_causal_is_bottom_right_aligned(nm, nn):
  expected = np.tril(np.ones((nm, nn), bool), k=nn - nm)
  _check(masks.block_causal(nm, nn), expected)
  # The last query block sees every key block.
  assert np.asarray(masks.block_causal(nm, nn))[0, 0, -1].all()


def test_random_shape_density_and_seed():
  shape_args = dict(num_heads=3, batch=2)
  a = masks.random(40, 50, 0.3, seed=11, **shape_args)
  assert a.shape == (2, 3, 40, 50) and a.dtype == jnp.bool_
  assert abs(float(jnp.mean(a)) - 0.3) < 0.03
  np.testing.assert_array_equal(np.asarray(a),
                                np.asarray(masks.random(40, 50, 0.3, seed=11, **shape_args)))
  assert not np.array_equal(np.asarray(a),
                            np.asarray(masks.random(40, 50, 0.3, seed=12, **shape_args)))
  # Heads and batches get different patterns.
  assert not np.array_equal(np.asarray(a[0, 0]), np.asarray(a[0, 1]))
  assert not np.array_equal(np.asarray(a[0, 0]), np.asarray(a[1, 0]))
  assert masks.random(6, 8, 0.5, seed=0).shape == (1, 1, 6, 8)
  assert not np.asarray(masks.random(6, 8, 0.0, seed=0)).any()
  assert np.asarray(masks.random(6, 8, 1.0, seed=0)).all()


def _predicate_brute_force(pred, sq, sk, block):
  m, n = block
  nm, nn = math.ceil(sq / m), math.ceil(sk / n)
  out = np.zeros((nm, nn), bool)
  for qi in range(sq):
    for ki in range(sk):
      if pred(qi, ki):
        out[qi // m, ki // n] = True
  return out


@pytest.mark.parametrize("name,pred", [
    ("band", lambda q, k: abs(q - k) < 20),
    ("segments", lambda q, k: q // 50 == k // 50),
    ("sink_or_causal_window", lambda q, k: (k < 3) | ((k <= q) & (q - k < 10))),
    ("never", lambda q, k: q < 0),
])
@pytest.mark.parametrize("sq,sk,block", [(100, 70, (32, 16)), (64, 130, (16, 48))])
def test_from_predicate_is_block_any(name, pred, sq, sk, block):
  """A block is on iff some real token pair in it satisfies the predicate.

  Tokens past the sequence end never count (the last blocks are partial).
  """
  got = masks.from_predicate(lambda q, k: pred(q, k), seq_len_q=sq, seq_len_kv=sk,
                             block_size=block)
  _check(got, _predicate_brute_force(pred, sq, sk, block))


def test_from_predicate_ignores_padding_tokens():
  """A predicate true only past the sequence end leaves the last blocks off."""
  got = masks.from_predicate(lambda q, k: (q >= 90) | (k >= 90), seq_len_q=90,
                             seq_len_kv=90, block_size=(64, 64))
  _check(got, np.zeros((2, 2), bool))


@pytest.mark.parametrize("seq_len,block,expected", [(197, 64, 4), (256, 128, 2),
                                                    (1, 16, 1), (577, 192, 4)])
def test_num_blocks(seq_len, block, expected):
  assert masks.num_blocks(seq_len, block) == expected


def test_builders_combine_with_operators():
  combined = masks.local(NM, NN, 0) | masks.strided(NM, NN, 3)
  i, j = _grid()
  _check(combined, (i == j) | ((i - j) % 3 == 0))
  _check(masks.block_causal(NM, NN) & masks.local(NM, NN, 1),
         (j <= i + NN - NM) & (np.abs(i - j) <= 1))


@pytest.mark.parametrize("call,name", [
    (lambda: masks.local(4, 4, -1), "window"),
    (lambda: masks.global_local(4, 4, -1, 1), "num_global"),
    (lambda: masks.strided(4, 4, 0), "stride"),
    (lambda: masks.random(4, 4, 1.5, seed=0), "density"),
    (lambda: masks.dense(0, 4), "num_q_blocks"),
    (lambda: masks.block_causal(4, 0), "num_kv_blocks"),
])
def test_builder_argument_errors(call, name):
  with pytest.raises(ValueError, match=name):
    call()
