"""A Flax (linen) Vision Transformer whose attention is chosen per layer.

Shared by `vit_train.py`, `vit_inference.py` and `benchmarks/vit_step.py`.
Patch embedding, class token, learned position embeddings, pre-norm encoder
blocks, an MLP head on the class token. Every layer's attention submodule is
named `attention` and has the stock parameter layout, so one checkpoint serves
every attention kind (stock Flax attention or a block pattern).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bsattn_jax import masks
from bsattn_jax.flax import BlockSparseMultiHeadAttention

# "reference" is Flax's own attention; the others are block patterns.
ATTENTION_KINDS = ("dense", "global_local", "local", "strided", "reference")
SPARSE_KINDS = ("global_local", "local", "strided")


def block_pattern(kind: str, seq_len_q: int, seq_len_kv: int, *,
                  block: int) -> jax.Array:
  """`[1, 1, nM, nN]` bool pattern of `kind` for these lengths at `block` tokens.

  Block 0 holds the class token; global+local lets it see and be seen by all.
  """
  n_q, n_kv = masks.num_blocks(seq_len_q, block), masks.num_blocks(seq_len_kv, block)
  if kind == "dense":
    return masks.dense(n_q, n_kv)
  if kind == "global_local":
    return masks.global_local(n_q, n_kv, num_global=1, window=1)
  if kind == "local":
    return masks.local(n_q, n_kv, window=1)
  if kind == "strided":
    return masks.strided(n_q, n_kv, stride=2)
  raise ValueError(f"kind must be one of {ATTENTION_KINDS[:-1]}, got {kind!r}")


def layer_kinds(kind: str, depth: int, per_layer: bool) -> tuple[str, ...]:
  """The attention kind of each layer.

  With `per_layer`, layers cycle through the three sparse patterns starting at
  `kind` (local, strided, global+local, ...), so neighbouring layers differ.
  """
  if not per_layer:
    return (kind,) * depth
  if kind not in SPARSE_KINDS:
    raise ValueError(
        f"per-layer patterns need a sparse kind {SPARSE_KINDS}, got {kind!r}")
  start = SPARSE_KINDS.index(kind)
  return tuple(SPARSE_KINDS[(start + i) % len(SPARSE_KINDS)] for i in range(depth))


class EncoderBlock(nn.Module):
  """Pre-norm block: x + attention(LN(x)), then x + MLP(LN(x)). x `[B, S, C]`.

  `dropout` applies to the attention output and in the MLP (not inside attention).
  """

  heads: int
  mlp_dim: int
  kind: str
  block: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    drop = nn.Dropout(self.dropout, deterministic=not train)
    if self.kind == "reference":
      attention = nn.MultiHeadDotProductAttention(
          self.heads, dtype=self.dtype, name="attention")
    else:
      # A function of the lengths: the same model runs at any resolution.
      pattern = functools.partial(block_pattern, self.kind, block=self.block)
      attention = BlockSparseMultiHeadAttention(
          self.heads, mask=pattern, block_size=(self.block, self.block),
          dtype=self.dtype, name="attention")
    x = x + drop(attention(nn.LayerNorm(dtype=self.dtype, name="norm1")(x)))
    y = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp1")(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp2")(drop(nn.gelu(y)))
    return x + drop(y)


class ViT(nn.Module):
  """images `[B, H, W, C]` -> logits `[B, num_classes]` (fp32).

  `kinds` gives each layer's attention (see `layer_kinds`); `block` is the user
  block size of the block patterns. With `train=True` and `dropout > 0`, apply
  needs a 'dropout' rng.
  """

  num_classes: int
  patch_size: int
  width: int
  heads: int
  kinds: tuple[str, ...]
  block: int = 64
  mlp_ratio: int = 4
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, name="patch_embed")(images)
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.width)                      # [B, patches, C]
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate(
        [jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), x.shape[1:])
    x = x + pos.astype(x.dtype)                               # [B, S, C]
    for i, kind in enumerate(self.kinds):
      x = EncoderBlock(self.heads, self.mlp_ratio * self.width, kind, self.block,
                       self.dropout, self.dtype, name=f"block{i}")(x, train)
    x = nn.LayerNorm(dtype=self.dtype, name="norm")(x[:, 0])
    # A zero head starts every class at the same logit (loss ln(num_classes)).
    return nn.Dense(self.num_classes, dtype=jnp.float32,
                    kernel_init=nn.initializers.zeros, name="head")(x)


def num_tokens(image_size: int, patch_size: int) -> int:
  """Class token plus (image_size / patch_size)^2 patches."""
  return 1 + (image_size // patch_size) ** 2


def grid_for_tokens(tokens: int) -> int:
  """Patches per side for `tokens` = 1 + side^2 (197 -> 14, 577 -> 24, 1025 -> 32)."""
  side = math.isqrt(tokens - 1)
  if tokens < 2 or side * side != tokens - 1:
    raise ValueError(f"tokens must be 1 + a square (197, 577, 1025, ...), got {tokens}")
  return side


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A ViT's hyperparameters; `vit_train.py` writes them next to its checkpoint."""

  image_size: int
  patch_size: int
  width: int
  depth: int
  heads: int
  block_size: int
  kinds: tuple[str, ...]
  dtype: str
  num_classes: int
  channels: int
  dropout: float = 0.0

  def model(self, kinds: tuple[str, ...] | None = None) -> ViT:
    """The ViT, optionally with other per-layer attention kinds (same params)."""
    return ViT(num_classes=self.num_classes, patch_size=self.patch_size,
               width=self.width, heads=self.heads, kinds=kinds or self.kinds,
               block=self.block_size, dropout=self.dropout,
               dtype=jnp.dtype(self.dtype))
