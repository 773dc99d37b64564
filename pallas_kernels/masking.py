"""The one element rule: which (query, key) pairs of a partial tile attend.

Three things can mask an element, and they meet here for every kernel (Triton
forward, dK/dV and dQ, the Mosaic GPU forward), for the classification of
tiles when a `BlockMask` is built, and for the reference's token mask:

- lengths: a key past its example's real length never attends;
- causal: query i sees key j iff j <= i + kv_len - q_len (bottom-right
  aligned per example, as FlashAttention-2);
- `mask_fn(b, h, q_idx, kv_idx) -> bool`: a token predicate in FlexAttention's
  `mask_mod` convention, on int32 positions within the example that broadcast
  against each other (b and h are scalars: example and query head). With
  `mask_fn_bottom_right` the query positions it sees are shifted by
  `kv_len - q_len`, so its diagonal meets the bottom-right corner as causal's
  does (the CUDA library's exact streaming).

Kernels apply the rule on partial tiles only; full tiles run unmasked.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

MaskFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class ElementRule(NamedTuple):
  """The static part of the rule (hashable: a kernel compiles once per rule)."""

  causal: bool = False
  mask_fn: MaskFn | None = None
  mask_fn_bottom_right: bool = False

  def __call__(self, q_pos, kv_pos, *, q_len, kv_len, batch, head,
               check_kv_len: bool = True) -> jax.Array:
    """Bool array of the pairs that attend (broadcasts like q_pos with kv_pos).

    Skip the length test with `check_kv_len=False` where every key is inside
    its example. At least one test must apply.
    """
    tests = []
    if check_kv_len:
      tests.append(kv_pos < kv_len)
    if self.causal:
      tests.append(kv_pos <= q_pos + (kv_len - q_len))
    if self.mask_fn is not None:
      # A predicate may ignore a position (or both): give it the tile's shape.
      shape = jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(kv_pos))
      q_seen = q_pos + (kv_len - q_len) if self.mask_fn_bottom_right else q_pos
      allowed = self.mask_fn(batch, head, q_seen, kv_pos)
      if jnp.shape(allowed) != shape:
        allowed = jnp.broadcast_to(allowed, shape)
      tests.append(allowed)
    if not tests:
      raise ValueError("ElementRule: no length, causal or mask_fn test applies")
    valid = tests[0]
    for test in tests[1:]:
      valid = valid & test
    return valid

  @property
  def masks_inside_lengths(self) -> bool:
    """Whether tiles inside both lengths can still be partial."""
    return self.causal or self.mask_fn is not None
