"""Scaling over devices: the context-parallel ring, and data-parallel ViT training.

Attention: B=1, H=16, D=128, S=131072, bf16, block 128, three masks (a local
band at density ~0.05, causal, dense). Times the forward and forward+backward
of `sharded_block_sparse_attention` with the sequence sharded over every
visible device (`context_axis`) and of `block_sparse_attention` on one
device; reports both, the throughput ratio (one-device ms / ring ms), the
ring steps the mask lets devices skip, the bytes each ring transfer carries
(only the key/value tiles other devices use travel) and the ring's error
against the single-device result. ViT: the data-parallel training step of
`examples/sharded_vit.py` (same batch per device) on every device and on
one, in images/s. `--smoke` runs tiny shapes with the kernels interpreted
(the ViT with the pure-jnp attention).

    PYTHONPATH=. python benchmarks/ring_scaling.py --out $OUT       # GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        PYTHONPATH=. python benchmarks/ring_scaling.py --smoke --out /tmp/ring
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from benchmarks.case_runner import with_backward
from benchmarks.timing import attention_flops, tflops, time_jax_pipelined
from bsattn_jax import (BlockMask, RingPlan, block_sparse_attention, masks,
                        sharded_block_sparse_attention)
from examples import sharded_vit

MASKS = ("local", "causal", "dense")
MODES = ("fwd", "fwd_bwd")
LOCAL_DENSITY = 0.05


@dataclasses.dataclass(frozen=True)
class Shapes:
  batch: int
  heads: int
  head_dim: int
  seq_len: int
  block: int
  dtype: str


FULL = Shapes(batch=1, heads=16, head_dim=128, seq_len=131072, block=128, dtype="bfloat16")
SMOKE = Shapes(batch=1, heads=2, head_dim=16, seq_len=256, block=16, dtype="float32")


@dataclasses.dataclass(frozen=True)
class Timing:
  warmup: int
  iters: int
  rounds: int
  max_seconds: float


FULL_TIMING = Timing(warmup=2, iters=5, rounds=2, max_seconds=3.0)
SMOKE_TIMING = Timing(warmup=1, iters=1, rounds=1, max_seconds=0.1)


def block_mask_for(name: str, shapes: Shapes) -> BlockMask:
  """The case's global mask: a local band at density ~0.05, causal, or dense."""
  n = shapes.seq_len // shapes.block
  user = None
  if name == "local":
    user = masks.local(n, n, max(0, round((LOCAL_DENSITY * n - 1) / 2)))
  return BlockMask.build(user, seq_len_q=shapes.seq_len,
                         block_size=(shapes.block, shapes.block),
                         is_causal=name == "causal")


def bytes_per_step(plan: RingPlan, shapes: Shapes) -> dict[str, int]:
  """Bytes one device sends per ring step: K and V tiles in the forward; in
  the backward also the fp32 dK/dV sums that travel with them."""
  rows = shapes.batch * plan.tiles_sent_per_step * plan.tile[1]
  per_tensor = rows * shapes.heads * shapes.head_dim        # Hkv = H here
  kv = 2 * per_tensor * jnp.dtype(shapes.dtype).itemsize
  return dict(fwd=kv, bwd=kv + 2 * per_tensor * 4)


def _time(fn, args, timing: Timing) -> float:
  return time_jax_pipelined(fn, *args, warmup=timing.warmup, iters=timing.iters,
                            rounds=timing.rounds, max_seconds=timing.max_seconds)


def _rel_err(a, b) -> float:
  a, b = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (a, b))
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def attention_case(name: str, shapes: Shapes, modes, mesh: Mesh, backend: str,
                   timing: Timing) -> dict:
  """Ring on every device of `mesh` (axis "ctx") vs one device, per mode."""
  block_mask = block_mask_for(name, shapes)
  devices = mesh.shape["ctx"]
  build = lambda: RingPlan.build(block_mask, devices)
  plan = build()
  dtype = jnp.dtype(shapes.dtype)
  shape = (shapes.batch, shapes.seq_len, shapes.heads, shapes.head_dim)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, do = (jax.random.normal(key, shape, dtype) for key in keys)
  on_ring = NamedSharding(mesh, P(None, "ctx"))
  on_one = jax.devices()[0]
  ring = lambda q, k, v, plan: sharded_block_sparse_attention(
      q, k, v, plan, mesh=mesh, context_axis="ctx", backend=backend)
  one = lambda q, k, v, bm: block_sparse_attention(q, k, v, bm, backend=backend)

  sent = bytes_per_step(plan, shapes)
  row = dict(mask=name, density=float(block_mask.density()), devices=devices,
             ring_steps=devices * devices, skipped_steps=plan.skipped_steps(),
             tiles_sent_per_step=plan.tiles_sent_per_step,
             chunk_tiles=plan.chunk_tiles, fwd_bytes_per_step=sent["fwd"],
             bwd_bytes_per_step=sent["bwd"],
             # From the concrete mask, once per mask (host work included).
             plan_ms=_time(build, (), timing))
  for mode in modes:
    wrap = (lambda f: f) if mode == "fwd" else with_backward
    extra = () if mode == "fwd" else (do,)
    # The plan is an argument (as a model's mask), built outside jit where
    # the mask is concrete: a traced mask could not size the transfers.
    ring_args = (*jax.device_put((q, k, v, *extra), on_ring),
                 jax.device_put(plan, NamedSharding(mesh, P())))
    one_args = jax.device_put((q, k, v, *extra, block_mask), on_one)
    ring_fn, one_fn = jax.jit(wrap(ring)), jax.jit(wrap(one))
    ring_ms = _time(ring_fn, ring_args, timing)
    one_ms = _time(one_fn, one_args, timing)
    errors = [_rel_err(a, b) for a, b in
              zip(jax.tree.leaves(ring_fn(*ring_args)), jax.tree.leaves(one_fn(*one_args)))]
    flops = attention_flops(shapes.batch, shapes.heads, shapes.seq_len,
                            shapes.seq_len, shapes.head_dim, row["density"],
                            backward=mode == "fwd_bwd")
    row[mode] = dict(ring_ms=ring_ms, one_device_ms=one_ms,
                     throughput_ratio=one_ms / ring_ms,
                     efficiency=one_ms / ring_ms / devices,
                     ring_tflops=tflops(flops, ring_ms),
                     max_rel_err_vs_one_device=max(errors))
  return row


COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather")


def _collectives(compiled) -> dict:
  """How many of each collective a compiled step runs (which layout of the
  optimizer state turned the all-reduce into what)."""
  text = compiled.as_text()
  return {name: len(re.findall(re.escape(name) + r"(?:-start)?\(", text))
          for name in COLLECTIVES}


def vit_case(config: sharded_vit.Config, timing: Timing, backend: str) -> dict:
  """images/s of the data-parallel step on one device and on every device,
  there with AdamW's state split over the devices (the example's default)
  and replicated."""
  params = sharded_vit.init_params(config, jax.random.PRNGKey(0))
  images, labels = sharded_vit.synthetic_batch(
      jax.random.PRNGKey(1), config, config.batch_per_device * jax.device_count())
  rates = {}
  for label, devices, shard in (("one", jax.devices()[:1], True),
                                ("all", jax.devices(), True),
                                ("all_replicated_state", jax.devices(), False)):
    mesh = Mesh(np.array(devices), ("data",))
    batch = config.batch_per_device * len(devices)
    t = sharded_vit.make_training(config, mesh, params, images[:batch],
                                  labels[:batch], backend=backend,
                                  shard_optimizer_state=shard)
    args = (t.params, t.opt_state, t.images, t.labels, t.block_mask)
    # Compiled once: timed, and read for its collectives.
    compiled = t.step.lower(*args).compile()
    ms = _time(compiled, args, timing)
    rates[label] = dict(devices=len(devices), global_batch=int(t.images.shape[0]),
                        sharded_optimizer_state=shard, step_ms=ms,
                        images_per_s=t.images.shape[0] / (ms * 1e-3),
                        collectives=_collectives(compiled))
  one = rates["one"]["images_per_s"]
  return dict(config=dataclasses.asdict(config), **rates,
              throughput_ratio=rates["all"]["images_per_s"] / one,
              throughput_ratio_replicated_state=(
                  rates["all_replicated_state"]["images_per_s"] / one))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes, kernels interpreted (CPU, simulated devices)")
  parser.add_argument("--masks", default=",".join(MASKS),
                      help=f"comma-separated subset of {MASKS}; 'none' skips attention")
  parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {MODES}")
  parser.add_argument("--no-vit", action="store_true", help="skip the ViT step")
  args = parser.parse_args(argv)
  chosen = [] if args.masks == "none" else args.masks.split(",")
  modes = args.modes.split(",")
  for value, allowed, flag in ((chosen, MASKS, "--masks"), (modes, MODES, "--modes")):
    if not set(value) <= set(allowed):
      parser.error(f"{flag} takes a subset of {allowed}, got {value}")
  shapes, timing = (SMOKE, SMOKE_TIMING) if args.smoke else (FULL, FULL_TIMING)
  backend = "interpret" if args.smoke else "auto"
  mesh = Mesh(np.array(jax.devices()), ("ctx",))

  results = dict(jax=jax.__version__, backend=jax.default_backend(),
                 device_kind=jax.devices()[0].device_kind, devices=mesh.size,
                 shapes=dataclasses.asdict(shapes), attention=[], vit=None)
  start = time.perf_counter()
  for name in chosen:
    row = attention_case(name, shapes, modes, mesh, backend, timing)
    results["attention"].append(row)
    for mode in modes:
      r = row[mode]
      mib = lambda key: row[key] / 2**20
      print(f"{name:6s} d={row['density']:.3f} {mode:7s} ring x{row['devices']} "
            f"{r['ring_ms']:9.3f} ms, one device {r['one_device_ms']:9.3f} ms: "
            f"ratio {r['throughput_ratio']:.2f} (efficiency {r['efficiency']:.2f}), "
            f"skipped {row['skipped_steps']}/{row['ring_steps']} steps, sent "
            f"{mib('fwd_bytes_per_step'):.1f}/{mib('bwd_bytes_per_step'):.1f} MiB "
            f"per fwd/bwd step ({row['tiles_sent_per_step']} of "
            f"{row['chunk_tiles']} tiles), err {r['max_rel_err_vs_one_device']:.1e}",
            flush=True)
  if not args.no_vit:
    config = sharded_vit.SMOKE if args.smoke else sharded_vit.GPU
    # Interpreted kernels would make the smoke's ViT steps its slowest part;
    # tests/test_sharding.py runs them under batch sharding.
    vit = results["vit"] = vit_case(config, timing,
                                    "reference" if args.smoke else backend)
    print(f"ViT step: {vit['all']['images_per_s']:.1f} images/s on {vit['all']['devices']} "
          f"devices, {vit['one']['images_per_s']:.1f} on one: ratio "
          f"{vit['throughput_ratio']:.2f} (optimizer state replicated: "
          f"{vit['all_replicated_state']['images_per_s']:.1f}, ratio "
          f"{vit['throughput_ratio_replicated_state']:.2f}); collectives "
          f"{vit['all']['collectives']} / {vit['all_replicated_state']['collectives']}",
          flush=True)
  results["seconds"] = time.perf_counter() - start
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "ring_scaling.json"), "w") as f:
    json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
