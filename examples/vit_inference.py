"""ViT inference throughput: dense vs block-sparse attention at 197, 577, 1025 tokens.

Restores the checkpoint written by `vit_train.py` (or, with `--fresh`, builds a
new ViT-B/16: width 768, 12 layers, 12 heads, 16 px patches) and, for each token
count (1 + a square number of patches: 197, 577 and 1025 are ViT-B/16 at 224,
384 and 512 px) and each attention kind, compiles the forward pass with
`jax.jit` ahead of time and times back-to-back batches. A restored model keeps
its patch size and runs at the image size that gives the token count, with its
position embeddings resized; its held-out accuracy at the trained size is
printed first as a check of the restore. Prints a table, writes
`inference.json` to `--out`.

    python examples/vit_inference.py --checkpoint runs/vit_train
    python examples/vit_inference.py --fresh --batch 64
    python examples/vit_inference.py --smoke      # tiny fresh model on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bsattn_jax import BlockMask
from vit_model import (ATTENTION_KINDS, ModelConfig, block_pattern,
                       grid_for_tokens, num_tokens)

SMOKE = dict(fresh=True, width=32, depth=1, heads=2, patch_size=4, channels=1,
             num_classes=10, tokens="17,37", batch=2, block_size=16, iters=2,
             warmup=1, dtype="float32")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="runs/vit_train",
                      help="output directory of vit_train.py")
  parser.add_argument("--fresh", action="store_true",
                      help="build a freshly initialized model from the flags below")
  parser.add_argument("--width", type=int, default=768, help="--fresh only")
  parser.add_argument("--depth", type=int, default=12, help="--fresh only")
  parser.add_argument("--heads", type=int, default=12, help="--fresh only")
  parser.add_argument("--patch-size", type=int, default=16, help="--fresh only")
  parser.add_argument("--channels", type=int, default=3, help="--fresh only")
  parser.add_argument("--num-classes", type=int, default=1000, help="--fresh only")
  parser.add_argument("--block-size", type=int, default=None,
                      help="block size of the patterns (default: the checkpoint's, "
                           "64 with --fresh)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                      default=None, help="default: the checkpoint's, bfloat16 with --fresh")
  parser.add_argument("--tokens", default="197,577,1025",
                      help="comma-separated token counts, each 1 + a square")
  parser.add_argument("--attention", default="dense,global_local",
                      help=f"comma-separated kinds from {ATTENTION_KINDS}")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=50, help="timed batches")
  parser.add_argument("--out", default="runs/vit_inference", help="output directory")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny fresh model and batch: checks the script on a CPU")
  pre, _ = parser.parse_known_args(argv)
  if pre.smoke:
    parser.set_defaults(**SMOKE)
  args = parser.parse_args(argv)
  args.tokens = [int(t) for t in args.tokens.split(",")]
  args.attention = args.attention.split(",")
  for kind in args.attention:
    if kind not in ATTENTION_KINDS:
      parser.error(f"--attention: {kind!r} is not one of {ATTENTION_KINDS}")
  for tokens in args.tokens:
    try:
      grid_for_tokens(tokens)
    except ValueError as e:
      parser.error(f"--tokens: {e}")
  return args


def restore(checkpoint: str, block_size: int | None, dtype: str | None):
  """(ModelConfig, params, data seed, eval size) from a vit_train.py output directory."""
  # Imported here: a --fresh run needs neither orbax nor scikit-learn.
  import orbax.checkpoint as ocp
  with open(os.path.join(checkpoint, "config.json")) as f:
    saved = json.load(f)
  model = dict(saved["model"], kinds=tuple(saved["model"]["kinds"]))
  model.update({k: v for k, v in (("block_size", block_size), ("dtype", dtype))
                if v is not None})
  config = ModelConfig(**model)
  sample = jnp.zeros((1, config.image_size, config.image_size, config.channels))
  abstract = jax.eval_shape(config.model().init, jax.random.PRNGKey(0), sample)["params"]
  params = ocp.StandardCheckpointer().restore(
      os.path.abspath(os.path.join(checkpoint, "checkpoint")), abstract)
  return config, params, saved["seed"], saved["eval_size"]


def resize_positions(params: dict, grid: int) -> dict:
  """Position embeddings for a `grid x grid` patch grid (class token's kept)."""
  pos = params["pos_embed"]                                  # [1 + g*g, C]
  old = grid_for_tokens(pos.shape[0])
  if old == grid:
    return params
  patches = pos[1:].reshape(old, old, -1)
  patches = jax.image.resize(patches, (grid, grid, pos.shape[-1]), method="bilinear")
  return dict(params, pos_embed=jnp.concatenate([pos[:1], patches.reshape(grid * grid, -1)]))


def held_out_accuracy(config: ModelConfig, params: dict, seed: int, eval_size: int) -> float:
  import digits_data  # needs scikit-learn, which --fresh runs do not
  _, _, x_test, y_test = digits_data.split(seed)
  if eval_size:
    x_test, y_test = x_test[:eval_size], y_test[:eval_size]
  images = digits_data.to_model_input(jnp.asarray(x_test), config.image_size)
  logits = jax.jit(config.model().apply)({"params": params}, images)
  return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == y_test))


def time_forward(config: ModelConfig, kind: str, params: dict, images: jax.Array,
                 warmup: int, iters: int) -> dict:
  """Compile time and steady-state time of one batch (calls back to back)."""
  model = config.model((kind,) * config.depth)
  start = time.perf_counter()
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, images).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(forward(params, images))
  start = time.perf_counter()
  for _ in range(iters):
    logits = forward(params, images)
  jax.block_until_ready(logits)
  batch_s = (time.perf_counter() - start) / iters
  return dict(compile_s=compile_s, ms_per_batch=batch_s * 1e3,
              images_per_s=images.shape[0] / batch_s)


def density(config: ModelConfig, kind: str, tokens: int) -> float | None:
  """Fraction of (query, key) tiles computed; None for Flax's own attention."""
  if kind == "reference":
    return None
  b = config.block_size
  bm = BlockMask.build(block_pattern(kind, tokens, tokens, block=b),
                       seq_len_q=tokens, block_size=(b, b))
  return float(bm.density())


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  key = jax.random.PRNGKey(args.seed)
  if args.fresh:
    config = ModelConfig(image_size=0, patch_size=args.patch_size, width=args.width,
                         depth=args.depth, heads=args.heads,
                         block_size=args.block_size or 64, kinds=("dense",) * args.depth,
                         dtype=args.dtype or "bfloat16", num_classes=args.num_classes,
                         channels=args.channels)
    trained = None
    print(f"fresh ViT: width {config.width}, depth {config.depth}, {config.heads} heads, "
          f"{config.patch_size}px patches, {config.dtype}")
  else:
    config, trained, seed, eval_size = restore(args.checkpoint, args.block_size, args.dtype)
    accuracy = held_out_accuracy(config, trained, seed, eval_size)
    print(f"restored {args.checkpoint}: width {config.width}, depth {config.depth}, "
          f"{config.heads} heads, attention {', '.join(config.kinds)}; held-out accuracy "
          f"at {config.image_size}px "
          f"({num_tokens(config.image_size, config.patch_size)} tokens): {accuracy * 100:.2f}%")
  print(f"JAX {jax.__version__} on {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}); batch {args.batch}, {args.iters} timed batches")

  rows = []
  for tokens in args.tokens:
    grid = grid_for_tokens(tokens)
    image_size = grid * config.patch_size
    images = jax.random.normal(
        key, (args.batch, image_size, image_size, config.channels), jnp.dtype(config.dtype))
    if trained is None:
      sample = images[:1]
      params = jax.jit(config.model().init)(key, sample)["params"]
    else:
      params = resize_positions(trained, grid)
    for kind in args.attention:
      row = dict(tokens=tokens, image_size=image_size, attention=kind,
                 density=density(config, kind, tokens),
                 **time_forward(config, kind, params, images, args.warmup, args.iters))
      rows.append(row)
      print(f"  {tokens} tokens, {kind}: {row['images_per_s']:.1f} images/s, "
            f"compile {row['compile_s']:.1f} s", flush=True)

  result = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                jax=jax.__version__, batch=args.batch, iters=args.iters,
                restored=None if args.fresh else os.path.abspath(args.checkpoint),
                model=dict(width=config.width, depth=config.depth, heads=config.heads,
                           patch_size=config.patch_size, block_size=config.block_size,
                           dtype=config.dtype),
                rows=rows)
  with open(os.path.join(out, "inference.json"), "w") as f:
    json.dump(result, f, indent=1)

  print(f"\nwrote {os.path.join(out, 'inference.json')}")
  header = ("tokens", "px", "attention", "density", "compile s", "ms/batch",
            "images/s", "vs dense")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    dense = next((r for r in rows if r["tokens"] == row["tokens"]
                  and r["attention"] == "dense"), None)
    speedup = f"{row['images_per_s'] / dense['images_per_s']:.2f}x" if dense else "-"
    dens = "-" if row["density"] is None else f"{row['density']:.2f}"
    print(f"| {row['tokens']} | {row['image_size']} | {row['attention']} | {dens} | "
          f"{row['compile_s']:.1f} | {row['ms_per_batch']:.2f} | "
          f"{row['images_per_s']:.1f} | {speedup} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
