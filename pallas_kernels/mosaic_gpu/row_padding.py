"""Lengths that are not multiples of 8 on the Mosaic GPU kernels (ViT's 197,
577 and 1025 tokens).

The kernels' TMA copies into the 8-row tiled shared memory split the global
row axis into 8-row tiles, and Mosaic GPU refuses a row count that is not a
multiple of 8 (`common.unsupported_lengths`). Such a call runs the kernels on
a copy padded per example to the next multiple of 8 (at most 7 zero rows),
with an element rule that keeps the call's own lengths:

- keys past the true length never attend (the padded keys are zeros, inside
  the kernels' view, so TMA does not drop them as it does past the view);
- causal and `mask_fn` see the true lengths (bottom-right alignment uses
  `kv_len - q_len`, which padding can change);
- a padded query row's output, lse and gradients are sliced off; in the
  backward it has dO = 0, delta = 0 and lse2 = +inf, so it adds nothing to
  dK and dV.

The block lists are the call's own: padding never crosses a multiple of 64,
so both lengths keep their tile counts, and the tiles the padding touches
are already partial (the true length ends inside them), so the rule runs
there. Dropout's keep bits depend on positions within the example, which
padding keeps.

The copies cost one pass over q, k, v (and dO) and one over the outputs;
against the Triton kernels, which take any length, they are measured in
`benchmarks/` (the ViT cases).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.masking import ElementRule
from pallas_kernels.mosaic_gpu.common import ROW_TILE
from pallas_kernels.numerics import backward_statistics


def padded_length(seq_len: int) -> int:
  """The row count the kernels take for `seq_len` tokens per example."""
  return -(-seq_len // ROW_TILE) * ROW_TILE


def needs_padding(q_len: int, kv_len: int) -> bool:
  return padded_length(q_len) != q_len or padded_length(kv_len) != kv_len


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


def unpad_rows(x: jax.Array, seq_len: int) -> jax.Array:
  """The inverse of `pad_rows`."""
  padded = padded_length(seq_len)
  if padded == seq_len:
    return x
  heads = x.shape[0]
  return x.reshape(heads, -1, padded)[:, :, :seq_len].reshape(heads, -1)


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


def padded_rule(rule: ElementRule, q_len: int, kv_len: int) -> ElementRule:
  """The rule a padded call runs (see the module doc). It stays causal
  where padding keeps `kv_len - q_len` (self-attention): the kernels order
  causal work longest first; the test itself is `TrueLengths`'."""
  keeps_offset = padded_length(kv_len) - padded_length(q_len) == kv_len - q_len
  return ElementRule(causal=rule.causal and keeps_offset,
                     mask_fn=TrueLengths(rule, q_len, kv_len))


def forward(kernel, q: jax.Array, k: jax.Array, v: jax.Array, lists, *,
            rule: ElementRule, q_len: int, kv_len: int, **kwargs
            ) -> tuple[jax.Array, jax.Array]:
  """`kernel(q, k, v, lists, rule=, q_len=, kv_len=, **kwargs)` (a Mosaic
  forward taking lengths that are multiples of 8) at any lengths; o and lse
  as the kernel's, at the call's lengths."""
  if not needs_padding(q_len, kv_len):
    return kernel(q, k, v, lists, rule=rule, q_len=q_len, kv_len=kv_len, **kwargs)
  o, lse = kernel(pad_tokens(q, q_len), pad_tokens(k, kv_len),
                  pad_tokens(v, kv_len), lists,
                  rule=padded_rule(rule, q_len, kv_len),
                  q_len=padded_length(q_len), kv_len=padded_length(kv_len),
                  **kwargs)
  return unpad_tokens(o, q_len), unpad_rows(lse, q_len)


def backward(dkdv, dq, q, k, v, o, lse, do, dlse, forward_lists,
             backward_lists, *, rule: ElementRule, q_len: int, kv_len: int,
             **kwargs) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv) from the Mosaic `dkdv(q, k, v, do, lse2, delta, lists,
  rule=, q_len=, kv_len=, **kwargs)` and `dq(...)` kernels (lengths that are
  multiples of 8) at any lengths; the statistics come from the unpadded o
  and dO, and are padded with lse2 = +inf and delta = 0."""
  lse2, delta = backward_statistics(o, do, lse, dlse)
  if needs_padding(q_len, kv_len):
    q, do, k, v = (pad_tokens(q, q_len), pad_tokens(do, q_len),
                   pad_tokens(k, kv_len), pad_tokens(v, kv_len))
    lse2, delta = pad_rows(lse2, q_len, jnp.inf), pad_rows(delta, q_len, 0.0)
    kwargs.update(rule=padded_rule(rule, q_len, kv_len),
                  q_len=padded_length(q_len), kv_len=padded_length(kv_len))
  else:
    kwargs.update(rule=rule, q_len=q_len, kv_len=kv_len)
  grad_k, grad_v = dkdv(q, k, v, do, lse2, delta, backward_lists, **kwargs)
  grad_q = dq(q, k, v, do, lse2, delta, forward_lists, **kwargs)
  return (unpad_tokens(grad_q, q_len), unpad_tokens(grad_k, kv_len),
          unpad_tokens(grad_v, kv_len))
