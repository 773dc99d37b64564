"""Data-parallel training of a block-sparse Flax ViT on every visible device.

The batch is sharded over a one-axis mesh ("data") of all devices;
parameters are replicated. Every attention layer calls
`sharded_block_sparse_attention(..., batch_axis="data")`: each device attends
its own examples with no communication inside attention. AdamW's state is
split over the devices (ZeRO stage 1): XLA reduce-scatters the gradients,
each device updates its share, and the parameters are all-gathered. One
global+local `BlockMask` (the class token's block sees and is seen by every
block) is built once and passed to every step.

    python examples/sharded_vit.py                    # all visible devices
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python examples/sharded_vit.py --smoke        # 8 simulated CPU devices

On a CPU the kernels run interpreted, which makes compiling the step the
slow part; `--backend reference` swaps in the pure-jnp attention (same
sharding, same step) for a check in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bsattn_jax import BlockMask, masks, sharded_block_sparse_attention


@dataclasses.dataclass(frozen=True)
class Config:
  """Model, mask and batch of a run (hashable: it keys the compiled step)."""

  image_size: int
  patch_size: int
  width: int
  heads: int
  depth: int
  block_size: int
  batch_per_device: int
  dtype: str
  window: int = 1
  num_classes: int = 10
  lr: float = 1e-3

  @property
  def seq_len(self) -> int:
    return 1 + (self.image_size // self.patch_size) ** 2


# ViT-B/16 at 384 px (577 tokens), 32 images per device.
GPU = Config(image_size=384, patch_size=16, width=768, heads=12, depth=12,
             block_size=64, batch_per_device=32, dtype="bfloat16")
CPU = Config(image_size=32, patch_size=8, width=64, heads=2, depth=2,
             block_size=16, batch_per_device=4, dtype="float32")
SMOKE = Config(image_size=16, patch_size=8, width=32, heads=2, depth=1,
               block_size=16, batch_per_device=2, dtype="float32")


class SelfAttention(nn.Module):
  """Multi-head self-attention through `attention(q, k, v, block_mask)`."""

  num_heads: int
  attention: Callable
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, block_mask: BlockMask) -> jax.Array:
    width = x.shape[-1]
    qkv = nn.DenseGeneral((3, self.num_heads, width // self.num_heads),
                          dtype=self.dtype, name="qkv")(x)       # [B, S, 3, H, D]
    out = self.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], block_mask)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class ViT(nn.Module):
  """Patch embedding, class token, learned positions, pre-norm encoder blocks."""

  config: Config
  attention: Callable

  @nn.compact
  def __call__(self, images: jax.Array, block_mask: BlockMask) -> jax.Array:
    c, dtype = self.config, jnp.dtype(self.config.dtype)
    x = nn.Conv(c.width, (c.patch_size,) * 2, strides=(c.patch_size,) * 2,
                padding="VALID", dtype=dtype)(images)
    x = x.reshape(x.shape[0], -1, c.width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.width)).astype(dtype), x], 1)
    x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:]).astype(dtype)
    for _ in range(c.depth):
      x = x + SelfAttention(c.heads, self.attention, dtype)(nn.LayerNorm(dtype=dtype)(x),
                                                            block_mask)
      y = nn.Dense(4 * c.width, dtype=dtype)(nn.LayerNorm(dtype=dtype)(x))
      x = x + nn.Dense(c.width, dtype=dtype)(nn.gelu(y))
    return nn.Dense(c.num_classes, dtype=jnp.float32)(nn.LayerNorm(dtype=dtype)(x[:, 0]))


class Training(NamedTuple):
  """A jitted data-parallel step and what it is called with."""

  step: Callable      # (params, opt_state, images, labels, block_mask) -> (params, opt_state, loss)
  params: Any
  opt_state: Any
  images: jax.Array   # [global batch, H, W, 3], sharded over "data"
  labels: jax.Array   # [global batch]
  block_mask: BlockMask


@functools.partial(jax.jit, static_argnums=(1, 2))
def synthetic_batch(key: jax.Array, config: Config, batch: int):
  """Random images; labels from a fixed random linear teacher on patch means."""
  k_img, k_teacher = jax.random.split(key)
  s, p = config.image_size, config.patch_size
  images = jax.random.normal(k_img, (batch, s, s, 3))
  means = images.reshape(batch, s // p, p, s // p, p, 3).mean(axis=(2, 4)).reshape(batch, -1)
  teacher = jax.random.normal(k_teacher, (means.shape[1], config.num_classes))
  return images, jnp.argmax(means @ teacher, axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: Config, key: jax.Array):
  """Parameters of the ViT (they do not depend on the attention function)."""
  shapes_only = ViT(config, attention=lambda q, k, v, block_mask: q)
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  return shapes_only.init(key, images, None)["params"]


def optimizer(config: Config) -> optax.GradientTransformation:
  return optax.adamw(config.lr, weight_decay=1e-4)


def split_over_data(mesh: Mesh, tree) -> Any:
  """A `NamedSharding` per leaf of `tree` (arrays or shapes): its largest
  axis that the "data" axis divides is split over it, else replicated.

  For the optimizer state (ZeRO stage 1): each device then updates its own
  share of the moments and parameters, so XLA turns the gradient all-reduce
  into a reduce-scatter and the updated parameters come back by an
  all-gather (the same bytes), and AdamW's pass over the state, replicated
  otherwise, is divided by the device count."""
  devices = mesh.shape["data"]

  def sharding(x):
    fits = [a for a in range(len(x.shape)) if x.shape[a] % devices == 0]
    if not fits:
      return NamedSharding(mesh, P())
    axis = max(fits, key=lambda a: x.shape[a])
    return NamedSharding(mesh, P(*[None] * axis, "data"))
  return jax.tree.map(sharding, tree)


@functools.cache
def optimizer_state_sharding(config: Config, mesh: Mesh, shard: bool) -> Any:
  """How the optimizer state is laid out: split over "data" or replicated
  (one per (config, mesh, layout): `train_step` and `make_training` share
  it, and its parameter shapes are traced once)."""
  if not shard:
    return NamedSharding(mesh, P())
  params = jax.eval_shape(init_params, config, jax.random.PRNGKey(0))
  return split_over_data(mesh, jax.eval_shape(optimizer(config).init, params))


@functools.cache
def train_step(config: Config, mesh: Mesh, backend: str = "auto",
               shard_optimizer_state: bool = True) -> Callable:
  """The jitted step `(params, opt_state, images, labels, block_mask) ->
  (params, opt_state, loss)`, batch sharded over `mesh`'s "data" axis, the
  optimizer state split over it too unless `shard_optimizer_state` is False
  (`split_over_data`); one per (config, mesh, backend, layout), so its
  callers share one compilation."""
  attention = functools.partial(sharded_block_sparse_attention, mesh=mesh,
                                batch_axis="data", backend=backend)
  model, adamw = ViT(config, attention), optimizer(config)

  def step(params, opt_state, images, labels, block_mask):
    def loss_fn(params):
      logits = model.apply({"params": params}, images, block_mask)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    if shard_optimizer_state:
      # Each device needs only its share of the summed gradients: a
      # reduce-scatter, where replicated gradients take an all-reduce.
      grads = jax.lax.with_sharding_constraint(grads, split_over_data(mesh, grads))
    updates, opt_state = adamw.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  replicated, by_example = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state = optimizer_state_sharding(config, mesh, shard_optimizer_state)
  return jax.jit(step, in_shardings=(replicated, state, by_example, by_example,
                                     replicated),
                 out_shardings=(replicated, state, replicated))


def make_training(config: Config, mesh: Mesh, params, images: jax.Array,
                  labels: jax.Array, backend: str = "auto",
                  shard_optimizer_state: bool = True) -> Training:
  """The step and its arguments laid out on `mesh` (batch over "data", the
  optimizer state as `train_step` says)."""
  n = masks.num_blocks(config.seq_len, config.block_size)
  block_mask = BlockMask.build(masks.global_local(n, n, 1, config.window),
                               seq_len_q=config.seq_len,
                               block_size=(config.block_size,) * 2)
  replicated, by_example = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params = jax.device_put(params, replicated)
  opt_state = jax.jit(optimizer(config).init, out_shardings=optimizer_state_sharding(
      config, mesh, shard_optimizer_state))(params)
  return Training(train_step(config, mesh, backend, shard_optimizer_state),
                  params, opt_state,
                  jax.device_put(images, by_example),
                  jax.device_put(labels, by_example), block_mask)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny settings (CPU, seconds)")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--batch-per-device", type=int, default=None)
  parser.add_argument("--backend", default="auto",
                      help="attention backend: auto, pallas, triton, interpret or "
                           "reference (pure jnp: the quickest check on a CPU)")
  parser.add_argument("--replicate-optimizer-state", action="store_true",
                      help="keep AdamW's state on every device (default: split "
                           "over the devices, ZeRO stage 1)")
  args = parser.parse_args(argv)
  config = SMOKE if args.smoke else GPU if jax.default_backend() == "gpu" else CPU
  if args.batch_per_device:
    config = dataclasses.replace(config, batch_per_device=args.batch_per_device)
  steps = args.steps or (3 if args.smoke else 30)

  mesh = Mesh(np.array(jax.devices()), ("data",))
  images, labels = synthetic_batch(jax.random.PRNGKey(1), config,
                                   config.batch_per_device * mesh.size)
  params = init_params(config, jax.random.PRNGKey(0))
  training = make_training(config, mesh, params, images, labels,
                           backend=args.backend,
                           shard_optimizer_state=not args.replicate_optimizer_state)
  global_batch = training.images.shape[0]
  print(f"{mesh.size} {jax.default_backend()} device(s); ViT depth {config.depth}, "
        f"width {config.width}, {config.seq_len} tokens; global batch {global_batch} "
        f"({config.batch_per_device} per device); BlockMask density "
        f"{float(training.block_mask.density()):.3f}")

  params, opt_state, losses = training.params, training.opt_state, []
  start = None
  for i in range(steps):
    params, opt_state, loss = training.step(params, opt_state, training.images,
                                            training.labels, training.block_mask)
    losses.append(float(loss))
    if i == 0:
      start = time.perf_counter()          # the first step compiled
    print(f"step {i:3d}  loss {losses[-1]:.4f}")
  if steps > 1:
    rate = (steps - 1) * global_batch / (time.perf_counter() - start)
    print(f"{rate:.1f} images/s over steps 1..{steps - 1}")
  ok = bool(np.all(np.isfinite(losses))) and losses[-1] < losses[0]
  print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}: "
        f"{'fell' if ok else 'did NOT fall'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
