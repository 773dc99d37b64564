"""Train a small Flax (linen) ViT whose self-attention is block-sparse.

Every encoder layer calls `block_sparse_attention` with one global+local block
mask: block 0 (it holds the class token) sees and is seen by every block, and
each block sees its `--window` neighbours on either side. The `BlockMask` is
built once, before training, and passed as an argument to the jitted train step,
so every layer and every step reuses it.

The data is synthetic: random images whose labels come from a fixed random
linear teacher on the per-patch mean colours, so there is a real signal and the
loss can fall within a few dozen steps.

    python examples/vit_training.py                        # CPU-sized defaults
    python examples/vit_training.py --image-size 224 --patch-size 16 \
        --depth 6 --steps 100 --block-size 32              # 197 tokens
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from bsattn_jax import BlockMask, block_sparse_attention, masks


class SparseSelfAttention(nn.Module):
  """Multi-head self-attention restricted to a prebuilt BlockMask."""

  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, block_mask: BlockMask) -> jax.Array:
    width = x.shape[-1]
    head_dim = width // self.num_heads
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype,
                          name="qkv")(x)                   # [B, S, 3, H, D]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]     # [B, S, H, D] each
    out = block_sparse_attention(q, k, v, block_mask)      # [B, S, H, D]
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                           name="out")(out)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, block_mask: BlockMask) -> jax.Array:
    y = nn.LayerNorm(dtype=self.dtype)(x)
    x = x + SparseSelfAttention(self.num_heads, self.dtype)(y, block_mask)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype)(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype)(nn.gelu(y))
    return x + y


class ViT(nn.Module):
  """Patch embedding, class token, learned positions, `depth` encoder blocks."""

  num_classes: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, block_mask: BlockMask) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, name="patch_embed")(images)
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.width)                      # [B, patches, C]
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype),
                         x], axis=1)                          # [B, S, C], S = 1 + patches
    pos = self.param("pos_embed", nn.initializers.normal(0.02), x.shape[1:])
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dtype,
                       name=f"block{i}")(x, block_mask)
    x = nn.LayerNorm(dtype=self.dtype)(x[:, 0])
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(x)


def synthetic_data(key, num_examples: int, image_size: int, patch_size: int,
                   num_classes: int):
  """Random images; labels from a fixed linear teacher on per-patch mean colours."""
  k_img, k_teacher = jax.random.split(key)
  images = jax.random.normal(k_img, (num_examples, image_size, image_size, 3))
  g = image_size // patch_size
  patch_means = images.reshape(num_examples, g, patch_size, g, patch_size, 3
                               ).mean(axis=(2, 4)).reshape(num_examples, -1)
  teacher = jax.random.normal(k_teacher, (patch_means.shape[1], num_classes))
  labels = jnp.argmax(patch_means @ teacher, axis=-1)
  return images, labels


def main() -> int:
  on_gpu = jax.default_backend() == "gpu"
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image-size", type=int, default=224 if on_gpu else 64)
  parser.add_argument("--patch-size", type=int, default=16 if on_gpu else 8)
  parser.add_argument("--width", type=int, default=384 if on_gpu else 128)
  parser.add_argument("--heads", type=int, default=6 if on_gpu else 4)
  parser.add_argument("--depth", type=int, default=6 if on_gpu else 2)
  parser.add_argument("--block-size", type=int, default=32 if on_gpu else 16,
                      help="user block size (multiple of 16) of the block mask")
  parser.add_argument("--window", type=int, default=1,
                      help="local window in blocks on either side")
  parser.add_argument("--steps", type=int, default=100 if on_gpu else 30)
  parser.add_argument("--batch", type=int, default=64 if on_gpu else 16)
  parser.add_argument("--num-examples", type=int, default=4096 if on_gpu else 512)
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--lr", type=float, default=3e-4,
                      help="peak learning rate (linear warm-up over the first 10%% of steps)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                      default="bfloat16" if on_gpu else "float32",
                      help="compute dtype of the layers (params stay fp32)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.image_size % args.patch_size:
    parser.error("--image-size must be a multiple of --patch-size")
  if args.width % args.heads:
    parser.error("--width must be a multiple of --heads")

  seq_len = 1 + (args.image_size // args.patch_size) ** 2
  block = (args.block_size, args.block_size)
  n = masks.num_blocks(seq_len, args.block_size)
  # Built once; every layer of every step reuses it.
  block_mask = BlockMask.build(
      masks.global_local(n, n, num_global=1, window=args.window),
      seq_len_q=seq_len, block_size=block)
  print(f"JAX {jax.__version__} on {jax.default_backend()}; "
        f"{args.image_size}px images, {args.patch_size}px patches -> {seq_len} tokens; "
        f"block {args.block_size} ({n} x {n} blocks, tiles {block_mask.tile}), "
        f"density {float(block_mask.density()):.3f}")

  key = jax.random.PRNGKey(args.seed)
  k_data, k_init, k_perm = jax.random.split(key, 3)
  images, labels = synthetic_data(k_data, args.num_examples, args.image_size,
                                  args.patch_size, args.num_classes)
  model = ViT(num_classes=args.num_classes, patch_size=args.patch_size,
              width=args.width, depth=args.depth, num_heads=args.heads,
              mlp_dim=4 * args.width, dtype=jnp.dtype(args.dtype))
  params = model.init(k_init, images[:1], block_mask)["params"]
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f"ViT: depth {args.depth}, width {args.width}, {args.heads} heads "
        f"(head dim {args.width // args.heads}), {num_params / 1e6:.2f}M params, "
        f"compute {args.dtype}")

  warmup = max(1, args.steps // 10)
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, args.lr, warmup), optax.constant_schedule(args.lr)],
      boundaries=[warmup])
  optimizer = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, images, labels, block_mask):
    def loss_fn(params):
      logits = model.apply({"params": params}, images, block_mask)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  rng = np.random.default_rng(args.seed)
  t0 = time.perf_counter()
  # The bar shows on a terminal only (disable=None); the per-step lines always print.
  bar = tqdm(range(args.steps), desc="train", unit="step", disable=None)
  for step in bar:
    idx = rng.choice(args.num_examples, size=args.batch, replace=False)
    params, opt_state, loss = train_step(params, opt_state, images[idx],
                                         labels[idx], block_mask)
    loss = float(loss)
    losses.append(loss)
    bar.set_postfix(loss=f"{loss:.4f}")
    tqdm.write(f"step {step:4d}  loss {loss:.4f}", file=sys.stdout)
  bar.close()
  elapsed = time.perf_counter() - t0

  k = max(1, min(5, len(losses) // 4))
  first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
  fell = last < first
  print(f"{args.steps} steps in {elapsed:.1f} s (first step includes compilation)")
  print(f"mean loss of the first {k} steps {first:.4f}, of the last {k} steps "
        f"{last:.4f} (chance level ln({args.num_classes}) = "
        f"{np.log(args.num_classes):.4f}): the loss {'fell' if fell else 'did NOT fall'}")
  return 0 if fell else 1


if __name__ == "__main__":
  sys.exit(main())
