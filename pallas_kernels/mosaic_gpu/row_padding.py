"""Lengths that are not multiples of 8 on the Mosaic GPU backward (ViT's 197,
577 and 1025 tokens).

The kernels' TMA copies into the 8-row tiled shared memory split the global
row axis into 8-row tiles, and Mosaic GPU refuses a row count that is not a
multiple of 8 (`common.require_row_tiles`). Such a call runs the dK/dV and
dQ kernels on copies padded per example to the next multiple of 8 (at most
7 zero rows), with an element rule that keeps the call's own lengths:

- keys past the true length never attend (the padded keys are zeros inside
  the kernels' view, so TMA does not drop them as it does past the view);
- causal and `mask_fn` see the true lengths (bottom-right alignment uses
  `kv_len - q_len`, which padding can change);
- a padded query row has dO = 0, delta = 0 and lse2 = +inf, so it adds
  nothing to dK and dV; its dQ, and the padded keys' dK and dV, are sliced
  off.

The block lists are the call's own: padding never crosses a multiple of 64,
so both lengths keep their tile counts, and the tiles the padding touches
are already partial (the true length ends inside them), so the rule runs
there. Dropout's keep bits depend on positions within the example, which
padding keeps.

The copies (q, k, v, dO in; dq, dk, dv out) are part of the measured time.
On an H200 (bf16, D=64, Triton forward, fwd+bwd ms, padded Mosaic backward
/ Triton backward) they pay at ViT-L's lengths (B32 S577 0.779 / 0.894, B16
S1025 1.047 / 1.342) but not at ViT-B's (B256 S197 1.100 / 1.037), so the
registry takes the padded backward from 512 tokens
(`bwd.PADDED_MIN_LENGTH`). In the forward the copies cost more than the
Mosaic kernel saves (S197 0.348 / 0.221 ms), so those lengths keep the
Triton forward (`common.unsupported_lengths`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.masking import ElementRule
from pallas_kernels.mosaic_gpu.common import ROW_TILE, row_major_copies
from pallas_kernels.numerics import backward_statistics


def padded_length(seq_len: int) -> int:
  """The row count the kernels take for `seq_len` tokens per example."""
  return -(-seq_len // ROW_TILE) * ROW_TILE


def needs_padding(q_len: int, kv_len: int, head_dim: int, dtype) -> bool:
  """Whether the kernels need padded copies: a length off the 8-row tiles,
  at a head dim whose copies cannot go row-major (`common.row_major_copies`)."""
  return ((padded_length(q_len) != q_len or padded_length(kv_len) != kv_len)
          and not row_major_copies(head_dim, dtype))


def pad_tokens(x: jax.Array, seq_len: int) -> jax.Array:
  """Flat `[B * seq_len, H, D]` tokens as `[B * padded_length, H, D]`."""
  pad = padded_length(seq_len) - seq_len
  if not pad:
    return x
  per_example = x.reshape(-1, seq_len, *x.shape[1:])
  per_example = jnp.pad(per_example, ((0, 0), (0, pad), (0, 0), (0, 0)))
  return per_example.reshape(-1, *x.shape[1:])


def unpad_tokens(x: jax.Array, seq_len: int) -> jax.Array:
  """The inverse of `pad_tokens`: each example's first `seq_len` rows."""
  padded = padded_length(seq_len)
  if padded == seq_len:
    return x
  return x.reshape(-1, padded, *x.shape[1:])[:, :seq_len].reshape(-1, *x.shape[1:])


def pad_rows(x: jax.Array, seq_len: int, fill: float) -> jax.Array:
  """A per-row statistic `[H, B * seq_len]` padded per example with `fill`."""
  pad = padded_length(seq_len) - seq_len
  if not pad:
    return x
  heads = x.shape[0]
  x = jnp.pad(x.reshape(heads, -1, seq_len), ((0, 0), (0, 0), (0, pad)),
              constant_values=fill)
  return x.reshape(heads, -1)


@dataclasses.dataclass(frozen=True)
class TrueLengths:
  """A `mask_fn` for the padded call: keys before `kv_len`, and the call's
  own rule (causal, mask_fn) at its true lengths. Frozen, so equal rules
  hash alike and a kernel compiles once per rule."""

  rule: ElementRule
  q_len: int
  kv_len: int

  def __call__(self, batch, head, q_pos, kv_pos):
    valid = kv_pos < self.kv_len
    if self.rule.masks_inside_lengths:
      valid = valid & self.rule(q_pos, kv_pos, q_len=self.q_len,
                                kv_len=self.kv_len, batch=batch, head=head,
                                check_kv_len=False)
    return valid


def keeps_offset(q_len: int, kv_len: int) -> bool:
  """Whether padding keeps `kv_len - q_len` (self-attention does), which is
  all that causal and a bottom-right `mask_fn` read of the lengths."""
  return padded_length(kv_len) - padded_length(q_len) == kv_len - q_len


def padded_rule(rule: ElementRule, q_len: int, kv_len: int) -> ElementRule:
  """The rule dQ runs on a padded call (see the module doc). It stays
  causal where padding keeps the offset: the kernels order causal work
  longest first; the test itself is `TrueLengths`'."""
  return ElementRule(causal=rule.causal and keeps_offset(q_len, kv_len),
                     mask_fn=TrueLengths(rule, q_len, kv_len))


def backward(dkdv, dq, q, k, v, o, lse, do, dlse, forward_lists,
             backward_lists, *, rule: ElementRule, q_len: int, kv_len: int,
             **kwargs) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv) from the Mosaic `dkdv(q, k, v, do, lse2, delta, lists,
  rule=, q_len=, kv_len=, **kwargs)` and `dq(...)` kernels (lengths that are
  multiples of 8) at any lengths; the statistics come from the unpadded o
  and dO, and are padded with lse2 = +inf and delta = 0.

  dK/dV keeps the call's rule where padding keeps the offset: a padded key
  is its item's own row, whose dK and dV are sliced off, and a padded query
  has p = 0, so the padding needs no mask there (tiles partial only for it
  then run unmasked, as the kernels' own tails do).
  """
  lse2, delta = backward_statistics(o, do, lse, dlse)
  if not needs_padding(q_len, kv_len, q.shape[-1], q.dtype):
    kw = dict(kwargs, rule=rule, q_len=q_len, kv_len=kv_len)
    grad_k, grad_v = dkdv(q, k, v, do, lse2, delta, backward_lists, **kw)
    return dq(q, k, v, do, lse2, delta, forward_lists, **kw), grad_k, grad_v
  args = (pad_tokens(q, q_len), pad_tokens(k, kv_len), pad_tokens(v, kv_len),
          pad_tokens(do, q_len), pad_rows(lse2, q_len, jnp.inf),
          pad_rows(delta, q_len, 0.0))
  kw = dict(kwargs, q_len=padded_length(q_len), kv_len=padded_length(kv_len))
  padded = padded_rule(rule, q_len, kv_len)
  grad_k, grad_v = dkdv(*args, backward_lists,
                        rule=rule if keeps_offset(q_len, kv_len) else padded, **kw)
  grad_q = dq(*args, forward_lists, rule=padded, **kw)
  return (unpad_tokens(grad_q, q_len), unpad_tokens(grad_k, kv_len),
          unpad_tokens(grad_v, kv_len))
