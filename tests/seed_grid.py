"""Block-Sparse-Attention's own correctness grid, ported: cases and the check.

The CUDA library tests `block_sparse_attn_func` over seqlen pairs, head dims,
MHA/MQA/GQA, causal, dropout, block-sparse densities, batch sizes and head
counts, with a third of the heads dense, a third block-sparse and a third
streaming, and random per-sequence lengths. Its criterion: the max abs error
of `out` against an fp32 reference is at most 2x (dq/dk/dv: 3x) the error of
the same reference computed in the input precision (or below 1e-3 of the
reference's largest entry). The expected token mask is built here in numpy
from the library's own semantics (its tests' mask generators), independently
of `bsattn_jax.head_mask_types`.

`tests/test_seed_api.py` runs a fixed, seeded sample on the CPU;
`SEED_GRID=full` (the GPU script) runs the whole grid.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from bsattn_jax import block_sparse_attn_func
from bsattn_jax.packed_layout import to_packed, to_padded
from bsattn_jax.reference import attention_reference
from pallas_kernels import dropout as dropout_bits

BLOCK = 128
SEQLENS = [(113, 203), (128, 217), (113, 211), (108, 256), (256, 512), (512, 256),
           (1024, 1024), (1023, 1024), (1024, 1023), (2048, 2048)]
HEAD_DIMS = [32, 64, 128]
MHA_TYPES = ["mha", "mqa", "gqa"]
CAUSAL = [True, False]
DROPOUT = [0.17, 0.0]
SPARSITY = [0.0, 0.1, 0.3, 0.7, 1.0]
BATCH = [1, 2]
NHEADS = [16, 32]
DTYPES = ["float16", "bfloat16"]
SINK_BLOCKS, LOCAL_BLOCKS = 1, 3


@dataclasses.dataclass(frozen=True)
class GridCase:
  seqlen_q: int
  seqlen_k: int
  d: int
  mha: str
  causal: bool
  p_dropout: float
  sparsity: float
  batch: int
  nheads: int
  dtype: str

  @property
  def id(self) -> str:
    return (f"{self.seqlen_q}x{self.seqlen_k}_d{self.d}_{self.mha}_"
            f"{'causal' if self.causal else 'full'}_p{self.p_dropout}_"
            f"s{self.sparsity}_b{self.batch}_h{self.nheads}_{self.dtype}")

  @property
  def nheads_k(self) -> int:
    return {"mha": self.nheads, "mqa": 1, "gqa": 2 if self.nheads < 16 else 8}[self.mha]


def full_grid() -> list[GridCase]:
  """Every case, in a fixed shuffled order: a run cut short by its time
  budget still samples every axis."""
  cases = [GridCase(sq, sk, d, mha, causal, p, s, b, h, dt)
           for (sq, sk), d, mha, causal, p, s, b, h, dt in itertools.product(
               SEQLENS, HEAD_DIMS, MHA_TYPES, CAUSAL, DROPOUT, SPARSITY, BATCH,
               NHEADS, DTYPES)]
  order = np.random.default_rng(0).permutation(len(cases))
  return [cases[i] for i in order]


def cpu_sample(count: int, seed: int = 0) -> list[GridCase]:
  """A seeded sample of the grid that interpret mode runs in seconds: short
  sequence pairs, 6 heads (two of each type), head dims 32/64."""
  rng = np.random.default_rng(seed)
  short = [p for p in SEQLENS if max(p) <= 256]
  cases = []
  for _ in range(count):
    sq, sk = short[rng.integers(len(short))]
    cases.append(GridCase(
        sq, sk, int(rng.choice([32, 64])), str(rng.choice(MHA_TYPES)),
        bool(rng.integers(2)), float(rng.choice(DROPOUT)),
        float(rng.choice(SPARSITY)), int(rng.choice(BATCH)), 6,
        str(rng.choice(DTYPES))))
  return cases


def _lengths(rng, max_len: int, batch: int) -> np.ndarray:
  """The library's random padding: lengths in [max_len - 20, max_len]."""
  return rng.integers(max(1, max_len - 20), max_len + 1, size=batch)


def _base_blockmask(rng, n_row, n_col, batch, heads, sparsity, causal) -> np.ndarray:
  """The library's `generate_base_sparsity_mask`: per block row, a `sparsity`
  fraction of the (causally available) columns, at least one."""
  mask = np.zeros((batch, heads, n_row, n_col), bool)
  for b, h in itertools.product(range(batch), range(heads)):
    if sparsity == 1.0:
      mask[b, h] = True
    elif sparsity > 0.0:
      for i in range(n_row):
        available = max(0, n_col - i) if causal else n_col
        ones = max(1, int(sparsity * available))
        mask[b, h, n_row - i - 1, rng.permutation(available)[:ones]] = True
  return mask


def _streaming_blocks(len_q, len_k, n_row, n_col, causal) -> np.ndarray:
  """The library's `generate_streaming_mask` for one sequence and head."""
  mask = np.zeros((n_row, n_col), bool)
  start = max((len_q - len_k) // BLOCK, 0) if causal else 0
  for i in range(start, n_row):
    reach = (-(-max(len_k - len_q, 0) // BLOCK) + 1 + i - start) if causal else n_col
    mask[i, min(max(reach - LOCAL_BLOCKS, 0), n_col):min(reach, n_col)] = True
    mask[i, :SINK_BLOCKS] = True
  return mask


def expected_token_mask(types, base, q_lens, k_lens, max_q, max_k, causal):
  """`[B, H, max_q, max_k]` bool from head types, base mask, streaming,
  lengths and bottom-right causality."""
  batch, heads = len(q_lens), len(types)
  n_row, n_col = -(-max_q // BLOCK), -(-max_k // BLOCK)
  sparse_index = np.cumsum(np.asarray(types) == 1)
  out = np.zeros((batch, heads, max_q, max_k), bool)
  q = np.arange(max_q)[:, None]
  k = np.arange(max_k)[None, :]
  for b, h in itertools.product(range(batch), range(heads)):
    if types[h] == 0:
      blocks = np.ones((n_row, n_col), bool)
    elif types[h] == 1:
      blocks = base[b, sparse_index[h] - 1]
    else:
      blocks = _streaming_blocks(q_lens[b], k_lens[b], n_row, n_col, causal)
    tokens = np.repeat(np.repeat(blocks, BLOCK, 0), BLOCK, 1)[:max_q, :max_k]
    ok = tokens & (q < q_lens[b]) & (k < k_lens[b])
    if causal:
      ok &= k <= q + k_lens[b] - q_lens[b]
    out[b, h] = ok
  return out


def _low_precision_reference(q, k, v, allowed, keep, rate, scale):
  """The reference in the input precision: scores and probabilities rounded
  to it, softmax in fp32 (as the library's `upcast=False` reference)."""
  dtype = q.dtype
  group = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, group, axis=2)
  v = jnp.repeat(v, group, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, (k * scale).astype(dtype),
                 preferred_element_type=jnp.float32).astype(dtype).astype(jnp.float32)
  s = jnp.where(allowed, s, -jnp.inf)
  row_max = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  probs = (p / jnp.where(denom > 0, denom, 1.0)).astype(dtype)
  if keep is not None:
    probs = jnp.where(keep, probs, 0).astype(dtype)
    v = (v * (1.0 / (1.0 - rate))).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v,
                    preferred_element_type=jnp.float32).astype(dtype)


def _check(name, got, ref, low, factor) -> None:
  """The library's criterion (`modified_check`)."""
  got, ref, low = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (got, ref, low))
  assert not np.isnan(got).any(), f"{name} has NaN"
  err = np.abs(got - ref).max()
  bound = np.abs(low - ref).max()
  floor = 1e-3 * np.abs(ref).max()
  assert err <= factor * bound or err <= floor, (
      f"{name}: max abs err {err:.3g} > {factor} x {bound:.3g} (input-precision "
      f"reference) and > {floor:.3g}")


def run_case(case: GridCase, seed: int) -> None:
  """One grid case: kernels vs fp32 and input-precision references, fwd+bwd."""
  rng = np.random.default_rng(seed)
  dtype = jnp.dtype(case.dtype)
  q_lens = _lengths(rng, case.seqlen_q, case.batch)
  k_lens = _lengths(rng, case.seqlen_k, case.batch)
  max_q, max_k = int(q_lens.max()), int(k_lens.max())
  cu_q = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
  cu_k = jnp.asarray(np.concatenate([[0], np.cumsum(k_lens)]), jnp.int32)
  n_stream = n_sparse = case.nheads // 3
  types = [0] * (case.nheads - n_stream - n_sparse) + [1] * n_sparse + [-1] * n_stream
  n_row, n_col = -(-max_q // BLOCK), -(-max_k // BLOCK)
  base = _base_blockmask(rng, n_row, n_col, case.batch, n_sparse, case.sparsity,
                         case.causal)
  streaming = jnp.asarray([SINK_BLOCKS, LOCAL_BLOCKS] * case.nheads, jnp.int32)

  keys = jax.random.split(jax.random.key(seed), 5)
  tq, tk = int(q_lens.sum()), int(k_lens.sum())
  q = jax.random.normal(keys[0], (tq, case.nheads, case.d)).astype(dtype)
  k = jax.random.normal(keys[1], (tk, case.nheads_k, case.d)).astype(dtype)
  v = jax.random.normal(keys[2], (tk, case.nheads_k, case.d)).astype(dtype)
  cot = jax.random.normal(keys[3], (tq, case.nheads, case.d))
  rng_key = keys[4] if case.p_dropout else None
  scale = case.d ** -0.5

  def kernel_loss(q, k, v):
    out, _, _ = block_sparse_attn_func(
        q, k, v, cu_q, cu_k, jnp.asarray(types, jnp.int32), streaming,
        jnp.asarray(base), max_q, max_k, case.p_dropout, is_causal=case.causal,
        dropout_rng=rng_key)
    return jnp.sum(out.astype(jnp.float32) * cot), out

  (_, out), grads = jax.jit(jax.value_and_grad(kernel_loss, argnums=(0, 1, 2),
                                               has_aux=True))(q, k, v)

  allowed = jnp.asarray(expected_token_mask(types, base, q_lens, k_lens, max_q,
                                            max_k, case.causal))
  keep = None
  if case.p_dropout:
    keep = dropout_bits.keep_grid(dropout_bits.example_seeds(rng_key, case.batch),
                                  case.nheads, max_q, max_k,
                                  dropout_bits.Dropout(case.p_dropout))
  padded = lambda x, cu, s: to_padded(x, cu, s)
  cot_pad = padded(cot, cu_q, max_q)

  def reference_loss(low_precision, q, k, v):
    qp, kp, vp = padded(q, cu_q, max_q), padded(k, cu_k, max_k), padded(v, cu_k, max_k)
    if low_precision:
      out = _low_precision_reference(qp, kp, vp, allowed, keep, case.p_dropout, scale)
    else:
      out, _ = attention_reference(qp, kp, vp, allowed, softmax_scale=scale,
                                   dropout_keep=keep, dropout_rate=case.p_dropout)
    return jnp.sum(out.astype(jnp.float32) * cot_pad), to_packed(out, cu_q, tq)

  refs = {}
  for low in (False, True):
    inputs = (q, k, v) if low else tuple(x.astype(jnp.float32) for x in (q, k, v))
    fn = jax.jit(jax.value_and_grad(lambda *x, low=low: reference_loss(low, *x),
                                    argnums=(0, 1, 2), has_aux=True))
    (_, ref_out), ref_grads = fn(*inputs)
    refs[low] = (ref_out, ref_grads)
  _check("out", out, refs[False][0], refs[True][0], 2)
  for name, g, r, lo in zip(("dq", "dk", "dv"), grads, refs[False][1], refs[True][1]):
    _check(name, g, r, lo, 3)
