"""ViT-B/16 at 384 px: training step and inference, Flax attention vs block-sparse.

One ViT (examples/vit_model.py; 577 tokens, 12 layers, width 768, 12 heads,
bf16 compute, fp32 params) with three attentions:
  reference     Flax's default attention (`nn.MultiHeadDotProductAttention`)
  dense         `BlockSparseMultiHeadAttention` with an all-ones block mask
  global_local  the same layer with a global+local block mask
For each: a training step (forward, backward, optax AdamW update; jitted, params
and optimizer state donated) and an inference forward pass, both compiled ahead
of time, warmed up, then timed as back-to-back calls with one
`jax.block_until_ready` at the end. Prints a table last; writes `vit_step.json`.

    PYTHONPATH=. python benchmarks/vit_step.py --out $OUT
    PYTHONPATH=. python benchmarks/vit_step.py --smoke --out /tmp/vit_step_smoke
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

from examples.vit_model import ModelConfig, num_tokens

ATTENTIONS = ("reference", "dense", "global_local")
SMOKE = dict(image_size=16, patch_size=4, batch=2, depth=1, width=32, heads=2,
             num_classes=10, block_size=16, warmup=1, steps=2, dtype="float32")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image-size", type=int, default=384)
  parser.add_argument("--patch-size", type=int, default=16)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--depth", type=int, default=12)
  parser.add_argument("--width", type=int, default=768)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--num-classes", type=int, default=1000)
  parser.add_argument("--block-size", type=int, default=64)
  parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                      default="bfloat16")
  parser.add_argument("--attention", default=",".join(ATTENTIONS),
                      help=f"comma-separated subset of {ATTENTIONS}")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10, help="timed calls")
  parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
  parser.add_argument("--smoke", action="store_true",
                      help="tiny model, 2 steps: checks the script on a CPU")
  pre, _ = parser.parse_known_args(argv)
  if pre.smoke:
    parser.set_defaults(**SMOKE)
  args = parser.parse_args(argv)
  args.attention = args.attention.split(",")
  unknown = set(args.attention) - set(ATTENTIONS)
  if unknown:
    parser.error(f"--attention: {sorted(unknown)} not in {ATTENTIONS}")
  return args


def time_calls(fn, state, warmup: int, steps: int):
  """Mean seconds per call of `state = fn(state)`, calls back to back."""
  for _ in range(warmup):
    state = jax.block_until_ready(fn(state))
  start = time.perf_counter()
  for _ in range(steps):
    state = fn(state)
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / steps, state


def measure(config: ModelConfig, kind: str, args: argparse.Namespace) -> dict:
  model = config.model((kind,) * config.depth)
  k_init, k_images, k_labels = jax.random.split(jax.random.PRNGKey(0), 3)
  images = jax.random.normal(
      k_images, (args.batch, config.image_size, config.image_size, config.channels),
      jnp.dtype(config.dtype))
  labels = jax.random.randint(k_labels, (args.batch,), 0, config.num_classes)
  params = jax.jit(model.init)(k_init, images[:1])["params"]
  optimizer = optax.adamw(1e-4, weight_decay=0.05)
  opt_state = optimizer.init(params)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state, images, labels):
    params, opt_state = state

    def loss_fn(params):
      logits = model.apply({"params": params}, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  start = time.perf_counter()
  compiled_step = train_step.lower((params, opt_state), images, labels).compile()
  step_compile_s = time.perf_counter() - start
  step_s, (params, _) = time_calls(lambda s: compiled_step(s, images, labels),
                                   (params, opt_state), args.warmup, args.steps)

  start = time.perf_counter()
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, images).compile()
  forward_compile_s = time.perf_counter() - start
  # The state threaded through is the logits; the inputs stay the same.
  forward_s, _ = time_calls(lambda _: forward(params, images), None,
                            args.warmup, args.steps)
  return dict(attention=kind, train_step_ms=step_s * 1e3,
              train_images_per_s=args.batch / step_s,
              train_compile_s=step_compile_s, forward_ms=forward_s * 1e3,
              infer_images_per_s=args.batch / forward_s,
              forward_compile_s=forward_compile_s)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  config = ModelConfig(image_size=args.image_size, patch_size=args.patch_size,
                       width=args.width, depth=args.depth, heads=args.heads,
                       block_size=args.block_size, kinds=("dense",) * args.depth,
                       dtype=args.dtype, num_classes=args.num_classes, channels=3)
  tokens = num_tokens(args.image_size, args.patch_size)
  device = jax.devices()[0].device_kind
  print(f"JAX {jax.__version__} on {jax.default_backend()} ({device}); ViT "
        f"{args.image_size}px/{args.patch_size} -> {tokens} tokens, batch {args.batch}, "
        f"depth {args.depth}, width {args.width}, {args.heads} heads, {args.dtype}, "
        f"block {args.block_size}; {args.warmup} warm-up + {args.steps} timed calls")
  rows = []
  for kind in args.attention:
    rows.append(measure(config, kind, args))
    print(f"  {kind}: train step {rows[-1]['train_step_ms']:.2f} ms, inference "
          f"{rows[-1]['infer_images_per_s']:.1f} images/s", flush=True)
    with open(os.path.join(args.out, "vit_step.json"), "w") as f:
      json.dump(dict(device=device, jax=jax.__version__, tokens=tokens,
                     args=vars(args), rows=rows), f, indent=1)

  base = next((r for r in rows if r["attention"] == "reference"), rows[0])
  header = ("attention", "train step ms", "train img/s", "vs " + base["attention"],
            "infer ms/batch", "infer img/s", "vs " + base["attention"],
            "compile s (train/infer)")
  print(f"\nwrote {os.path.join(args.out, 'vit_step.json')}")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    print(f"| {r['attention']} | {r['train_step_ms']:.2f} | {r['train_images_per_s']:.1f} | "
          f"{base['train_step_ms'] / r['train_step_ms']:.2f}x | {r['forward_ms']:.2f} | "
          f"{r['infer_images_per_s']:.1f} | {base['forward_ms'] / r['forward_ms']:.2f}x | "
          f"{r['train_compile_s']:.1f} / {r['forward_compile_s']:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
