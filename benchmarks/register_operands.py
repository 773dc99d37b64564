"""Whether wgmma operands held in registers survive the Mosaic kernels' loops (SASS).

The 64-tile forward's QK matmul reads q from registers, loaded once per item
(`fwd_block64.Q_IN_REGISTERS_HEAD_DIMS`), so ptxas must leave those registers
alone through every step loop. At D=64, where QK and PV are both
`m64n64k16` with A in registers, ptxas (CUDA 13.0) gives P the registers
still holding q: every step after an item's first then computes its scores
from P, and on the GPU every output row was wrong. Nothing but the machine
code shows it (the PTX is right), so this reads it: for each configuration
it compiles one forward + backward (`spill_report.compile_config`, on the
GPU or `--deviceless`), assembles the forward kernels' PTX with ptxas,
disassembles it with nvdisasm, and finds every QK HGMMA whose A operand is
a register quad that its innermost loop writes only after the HGMMA: a
loop-invariant operand that the next iteration reads overwritten. Loops
are read off the listing's layout (a label, a later branch back to it).
Only QK's HGMMAs are checked (B = K^T, not transposed; PV's carry
`.tnspB`): PV's A is P, made anew at every step, and ptxas may lay a step
loop out rotated, P made at the end of an iteration for the next one,
which this reading cannot tell from an overwritten operand (the 64-tile
forward at D=64 since it runs without turns, passing its GPU tests). The
backward kernels are left out for the same reason (dK/dV at D=128 makes
operands for the next iteration by design). Writes
`register_operands.json`; exits 1 when any forward kernel has such a
write.

  PYTHONPATH=. python benchmarks/register_operands.py --out $OUT           # GPU
  PYTHONPATH=.:/tmp/cuda_plugin .venv/bin/python benchmarks/register_operands.py \\
      --deviceless --out /tmp/regs --q-registers-at 64,128                # D=64's fault

`--q-registers-at` sets the head dims whose QK reads q from registers (the
default: the kernel's own); `--configs` takes `D,causal,dropout,block`
tuples as `spill_report.CONFIGS`. ptxas and nvdisasm come from PATH or
/usr/local/cuda/bin (the deviceless setup: `spill_report`'s docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from benchmarks import spill_report
from pallas_kernels.mosaic_gpu import common, fwd_block64

# The 64-tile forward's code paths with q in registers: full tiles only,
# causal (full and partial loops), dropout; D=64 for `--q-registers-at 64`.
CONFIGS = ((128, False, 0.0, 64), (128, True, 0.0, 64), (128, False, 0.1, 64),
           (64, False, 0.0, 64), (64, True, 0.0, 64))
FORWARD_KERNEL_PREFIX = "body"         # dump names of fwd.py / fwd_block64.py
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")
_REGISTER_A_HGMMA = re.compile(r"^HGMMA\.\S+\s+R\d+,\s+R(\d+),")
_TRANSPOSED_B = ".tnspB"               # PV's HGMMAs (B = V), not QK's
# Guard predicate, opcode, an optional predicate result (SHFL's), the first
# general register.
_DESTINATION = re.compile(
    r"^(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)\s+(?:!?P[T\d]+,\s*)?R(\d+)\b")
# Opcodes whose first register is read, not written.
_NO_DESTINATION = ("ST", "RED", "BRA", "SYNCS", "HGMMA", "WARPGROUP", "BAR",
                   "ATOM", "EXIT", "RET", "CALL", "MEMBAR", "FENCE")


def _written(instruction: str) -> set[int]:
  """The registers an instruction writes (by its first operand and width)."""
  match = _DESTINATION.match(instruction)
  if match is None or match.group(1).startswith(_NO_DESTINATION):
    return set()
  opcode, first = match.group(1), int(match.group(2))
  width = 1
  if ".128" in opcode or re.search(r"\.M88\.4$", opcode):
    width = 4
  elif (".64" in opcode or ".WIDE" in opcode or opcode == "CS2R"
        or re.search(r"\.M88\.2$", opcode)):
    width = 2
  return set(range(first, first + width))


def parse_sass(sass: str) -> tuple[dict[str, int], list[str]]:
  """nvdisasm's listing as ({label: index of the next instruction},
  [instruction texts])."""
  labels, instructions = {}, []
  for line in sass.splitlines():
    label = _LABEL.match(line)
    if label:
      labels[label.group(1)] = len(instructions)
      continue
    instruction = _INSTRUCTION.match(line)
    if instruction:
      instructions.append(instruction.group(1))
  return labels, instructions


def clobbered_operands(sass: str) -> list[dict]:
  """Each QK HGMMA (no `.tnspB`) whose register A operand its innermost loop
  writes after it and not before it: {hgmma, write} pairs of instruction
  texts."""
  labels, instructions = parse_sass(sass)
  found = []
  for at, text in enumerate(instructions):
    hgmma = _REGISTER_A_HGMMA.match(text)
    if hgmma is None or _TRANSPOSED_B in text:
      continue
    quad = set(range(int(hgmma.group(1)), int(hgmma.group(1)) + 4))
    loops = [(labels[branch.group(1)], end)
             for end in range(at + 1, len(instructions))
             for branch in [_BRANCH.search(instructions[end])]
             if branch and labels.get(branch.group(1), len(instructions)) <= at]
    if not loops:
      continue
    # The innermost: the latest head, then the earliest back branch.
    start, end = min(loops, key=lambda loop: (-loop[0], loop[1]))
    if any(_written(instructions[k]) & quad for k in range(start, at)):
      continue                         # fresh each iteration
    for k in range(at + 1, end + 1):
      if _written(instructions[k]) & quad:
        found.append(dict(hgmma=text, write=instructions[k]))
        break
  return found


def _tool(name: str) -> str:
  path = shutil.which(name) or f"/usr/local/cuda/bin/{name}"
  if not os.path.exists(path):
    raise SystemExit(f"{name} not found on PATH or in /usr/local/cuda/bin")
  return path


def disassemble(ptx: str, ptxas: str, nvdisasm: str) -> str:
  """SASS of one kernel's PTX for sm_90a, as Mosaic GPU's ptxas would make it."""
  with tempfile.TemporaryDirectory(prefix="register_operands_") as scratch:
    source, binary = (os.path.join(scratch, name) for name in ("k.ptx", "k.cubin"))
    with open(source, "w") as f:
      f.write(ptx)
    subprocess.run([ptxas, "-arch=sm_90a", "-O3", source, "-o", binary],
                   check=True, capture_output=True)
    return subprocess.run([nvdisasm, "-c", binary], check=True,
                          capture_output=True, text=True).stdout


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="bench_out")
  parser.add_argument("--deviceless", action="store_true",
                      help="compile for a described H200 without a GPU")
  parser.add_argument("--configs", nargs="*", default=None,
                      help="D,causal,dropout,block tuples (default: CONFIGS)")
  parser.add_argument("--q-registers-at", default=None,
                      help="comma-separated head dims whose QK reads q from "
                           "registers (default: the kernel's own)")
  args = parser.parse_args(argv)
  configs = CONFIGS
  if args.configs:
    configs = [(int(d), bool(int(c)), float(p), int(b)) for d, c, p, b in
               (item.split(",") for item in args.configs)]
  # Every head dim the kernel takes, whether the registry routes it there.
  fwd_block64.ROUTED_HEAD_DIMS = common.HEAD_DIMS
  if args.q_registers_at:
    fwd_block64.Q_IN_REGISTERS_HEAD_DIMS = tuple(
        int(d) for d in args.q_registers_at.split(","))
  ptxas, nvdisasm = _tool("ptxas"), _tool("nvdisasm")
  target = spill_report.deviceless_target() if args.deviceless else None
  rows = []
  for config in configs:
    for name, ptx in spill_report.dumped(config, ".ptx", target).items():
      if not name.startswith(FORWARD_KERNEL_PREFIX) or "wgmma" not in ptx:
        continue
      sass = disassemble(ptx, ptxas, nvdisasm)
      register_a = sum(1 for text in parse_sass(sass)[1]
                       if _REGISTER_A_HGMMA.match(text))
      clobbered = clobbered_operands(sass)
      rows.append(dict(config=config, kernel=name, register_a_hgmmas=register_a,
                       clobbered=clobbered))
      print(f"{config!s:<28} {name:<18} HGMMAs with A in registers "
            f"{register_a:>3}, overwritten in their loop {len(clobbered):>2}")
      for item in clobbered:
        print(f"    {item['hgmma']}\n      overwritten by {item['write']}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "register_operands.json"), "w") as f:
    json.dump(dict(q_registers_at=fwd_block64.Q_IN_REGISTERS_HEAD_DIMS,
                   deviceless=args.deviceless, rows=rows), f, indent=1)
  return 1 if any(row["clobbered"] for row in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
