"""Register spills of the Mosaic GPU kernels, as ptxas reports them.

Spills, more than instruction counts, decided the D=128 dK/dV kernel's speed
(`benchmarks/PERF_NOTES.md`, "Partial tiles' masks and dK/dV's registers"),
and ptxas says how many bytes each kernel spills before anything is timed.
For each configuration below this compiles one forward + backward with
Mosaic GPU's dumps on (`MOSAIC_GPU_DUMP_TO`, a scratch folder per
configuration, removed after reading: its pass logs take ~150 MB per kernel),
reads each kernel's `.ptxas` report and prints the bytes of spill stores and
loads and the stack frame per kernel. Writes spill_report.json.

  PYTHONPATH=. python benchmarks/spill_report.py --out $OUT              # GPU
  PYTHONPATH=. python benchmarks/spill_report.py --deviceless --out /tmp/s

Without a GPU (`--deviceless`): XLA compiles for a described H200 (a
deviceless topology of JAX's CUDA plugin) and Mosaic GPU runs ptxas as on
the GPU machine, so a variant's spills can be read before any device time
is spent (they matched the H200's own report byte for byte). It needs the
CUDA plugin of the installed JAX, without its CUDA libraries, and a CUDA
toolkit's `ptxas` on PATH (tested with CUDA 13.0):

  .venv/bin/pip install --no-deps --target /tmp/cuda_plugin \
      jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2
  PYTHONPATH=.:/tmp/cuda_plugin .venv/bin/python benchmarks/spill_report.py \
      --deviceless --out /tmp/spills

`--select D,causal` compiles only the configurations of that head dim and
causality (e.g. `128,1`): a few seconds each; `--shape batch,tokens,heads`
compiles at a benchmark case's shape (ptxas spills differently at other
shapes, which are constants of the kernels). The kernels are compiled,
not run, so this says nothing of their speed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, SingleDeviceSharding

from bsattn_jax import block_sparse_attention, masks

# (batch, tokens, heads) of the compiled calls. ptxas's spills depend on
# the shapes too (they are constants of the kernels): `--shape` compiles a
# benchmark case's own, e.g. 1,16384,16 for causal_s16384_d128.
SHAPE = (1, 1024, 2)
# head dim, causal, dropout rate, user block: the kernels' code paths at
# D=64 and D=128 (dK/dV's one-score-at-a-time path, its 64-row halves with
# dropout, the masked steps of causal masks, 64x64 mask tiles).
CONFIGS = (
    (128, False, 0.0, 128), (128, True, 0.0, 128), (128, False, 0.1, 128),
    (64, False, 0.0, 128), (64, True, 0.0, 128), (128, True, 0.0, 64),
)
_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                    r"(\d+) bytes spill loads")
_SUFFIX = "_mosaic_gpu_kernel"
# What XLA needs to know of the GPU it compiles for without one (`--deviceless`):
# an H200's limits, as CUDA reports them (a GpuTargetConfigProto in text form).
DEVICELESS_KIND = "NVIDIA H200"
DEVICELESS_SMS = 132
DEVICELESS_TARGET = f"""
gpu_device_info {{
  threads_per_block_limit: 1024  threads_per_warp: 32
  shared_memory_per_block: 49152  shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448  threads_per_core_limit: 2048
  core_count: {DEVICELESS_SMS}  fpus_per_core: 128
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000  l2_cache_size: 52428800
  clock_rate_ghz: 1.98  device_memory_size: 150754820096
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{DEVICELESS_KIND}"
"""


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
  """kernel name -> {stack, spill_stores, spill_loads} (bytes) from ptxas's
  verbose report; the name without Mosaic GPU's symbol suffix."""
  found = {}
  names = list(_ENTRY.finditer(text))
  for i, entry in enumerate(names):
    end = names[i + 1].start() if i + 1 < len(names) else len(text)
    frame = _FRAME.search(text, entry.end(), end)
    if frame is None:
      raise ValueError(f"no stack frame line after {entry.group(0)!r}")
    name = entry.group(1).removesuffix(_SUFFIX)
    found[name] = dict(zip(("stack", "spill_stores", "spill_loads"),
                           map(int, frame.groups())))
  return found


def deviceless_target() -> SingleDeviceSharding:
  """A device of a deviceless H200 topology (`--deviceless`), to compile for."""
  # Without a GPU the plugin finds none of the CUDA libraries it checks;
  # only its compiler is used.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  from jax.experimental import topologies
  try:
    topology = topologies.get_topology_desc(
        topology_name="1x1x1", platform="cuda", topology="1x1x1",
        target_config=DEVICELESS_TARGET)
  except Exception as error:    # the plugin is absent or failed to load
    raise RuntimeError(
        "--deviceless needs JAX's CUDA plugin (see this module's docstring): "
        f"{error}") from error
  return SingleDeviceSharding(topology.devices[0])


def compile_config(head_dim: int, causal: bool, dropout: float, block: int,
                   target: SingleDeviceSharding | None = None,
                   shape: tuple[int, int, int] = SHAPE) -> None:
  """Compile one forward + backward on the Mosaic kernels: for `target`
  (`deviceless_target`), else on the local GPU, where it also runs once;
  `shape` (batch, tokens, heads)."""
  batch, seq_len, heads = shape
  tiles = masks.num_blocks(seq_len, block)

  def grads(q, k, v, mask, key):
    def loss(q, k, v):
      out = block_sparse_attention(
          q, k, v, mask, block_size=(block, block), is_causal=causal,
          dropout_rate=dropout, dropout_rng=key if dropout else None,
          backend="pallas")
      return jnp.sum(out.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  if target is None:
    x = jax.random.normal(jax.random.key(0), (batch, seq_len, heads, head_dim),
                          jnp.bfloat16)
    jax.block_until_ready(jax.jit(grads)(
        x, x, x, jnp.ones((1, 1, tiles, tiles), bool), jax.random.key(1)))
    return
  args = [jax.ShapeDtypeStruct(dims, dtype, sharding=target) for dims, dtype in (
      *[((batch, seq_len, heads, head_dim), jnp.bfloat16)] * 3,
      ((1, 1, tiles, tiles), jnp.bool_), ((), jax.random.key(0).dtype))]
  # The abstract mesh tells the kernels' wrappers which GPU they trace for.
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                      abstract_device=AbstractDevice(
                          device_kind=DEVICELESS_KIND,
                          num_cores=DEVICELESS_SMS, platform="cuda"))
  with jax.sharding.use_abstract_mesh(mesh):
    traced = jax.jit(grads).trace(*args)
  traced.lower(lowering_platforms=("cuda",)).compile()


def dumped(config: tuple, suffix: str, target: SingleDeviceSharding | None = None,
           shape: tuple[int, int, int] = SHAPE) -> dict[str, str]:
  """{file name: text} of the Mosaic GPU dumps ending in `suffix` (`.ptxas`,
  `.ptx`) of one configuration's compile, in file-name order."""
  scratch = tempfile.mkdtemp(prefix="mosaic_dump_")
  os.environ["MOSAIC_GPU_DUMP_TO"] = scratch
  try:
    compile_config(*config, target=target, shape=shape)
    files = {os.path.basename(path): open(path).read() for path in
             sorted(glob.glob(os.path.join(scratch, "*" + suffix)))}
  finally:
    del os.environ["MOSAIC_GPU_DUMP_TO"]
    shutil.rmtree(scratch, ignore_errors=True)
  if not files:
    raise RuntimeError(f"no {suffix} dump for {config}: are the Mosaic GPU "
                       "kernels compiled (a Hopper GPU, or --deviceless)?")
  return files


def report(config: tuple, target: SingleDeviceSharding | None = None,
           shape: tuple[int, int, int] = SHAPE) -> dict[str, dict[str, int]]:
  """Each Mosaic kernel's ptxas numbers for one configuration."""
  return parse_ptxas("".join(dumped(config, ".ptxas", target, shape).values()))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="bench_out")
  parser.add_argument("--deviceless", action="store_true",
                      help="compile for a described H200 without a GPU")
  parser.add_argument("--select", default=None,
                      help="'D,causal' (e.g. 128,1): only those configurations")
  parser.add_argument("--shape", default=",".join(map(str, SHAPE)),
                      help="'batch,tokens,heads' of the compiled calls")
  args = parser.parse_args(argv)
  shape = tuple(int(part) for part in args.shape.split(","))
  if len(shape) != 3:
    parser.error(f"--shape takes batch,tokens,heads, got {args.shape!r}")
  configs = CONFIGS
  if args.select:
    head_dim, causal = (int(part) for part in args.select.split(","))
    configs = [c for c in CONFIGS if c[:2] == (head_dim, bool(causal))]
  target = None
  if args.deviceless:
    target = deviceless_target()
  rows = []
  print(f"{'D':>4} {'causal':>6} {'drop':>5} {'block':>5}  {'kernel':<12} "
        f"{'spill st':>8} {'spill ld':>8} {'stack':>6}")
  for config in configs:
    for kernel, numbers in report(config, target, shape).items():
      rows.append(dict(zip(("head_dim", "causal", "dropout", "block"), config),
                       kernel=kernel, **numbers))
      head_dim, causal, dropout, block = config
      print(f"{head_dim:>4} {causal!s:>6} {dropout:>5} {block:>5}  {kernel:<12} "
            f"{numbers['spill_stores']:>8} {numbers['spill_loads']:>8} "
            f"{numbers['stack']:>6}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "spill_report.json"), "w") as f:
    device = (f"{DEVICELESS_KIND} (deviceless)" if target is not None
              else str(jax.devices()[0]))
    json.dump(dict(device=device, shape=shape, rows=rows),
              f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
