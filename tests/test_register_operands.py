"""`benchmarks/register_operands.py` finds loop-invariant wgmma operands that
their loop overwrites, and only those (on SASS listings in nvdisasm's form)."""

from __future__ import annotations

import pytest

from benchmarks import register_operands


def _listing(*lines: str) -> str:
  """nvdisasm-style lines: labels as they are, instructions numbered."""
  out = []
  for number, line in enumerate(lines):
    out.append(line if line.startswith(".L_x") else
               f"        /*{number * 16:04x}*/                   {line} ;")
  return "\n".join(out)


def _step_loop(write_in_softmax: str) -> str:
  """q loaded before the loop; QK reads it, the softmax writes
  `write_in_softmax`, P is packed and read by PV, then the loop branches back."""
  return _listing(
      "LDSM.16.M88.4 R92, [R6]",
      ".L_x_28:",
      "HGMMA.64x64x16.F32.BF16 R24, R92, gdesc[UR8], RZ, !UPT",
      "WARPGROUP.DEPBAR.LE gsb0, 0x0",
      write_in_softmax,
      "F2FP.BF16.F32.PACK_AB R60, R25, R24",
      "HGMMA.64x64x16.F32.BF16 R56, R60, gdesc[UR10].tnspB, R56, gsb0",
      "ISETP.NE.U32.AND P2, PT, R106, RZ, PT",
      "@P2 BRA `(.L_x_28)",
  )


@pytest.mark.parametrize("write", [
    "MUFU.EX2 R93, R24",                      # inside q's quad R92-R95
    "SHFL.BFLY PT, R95, R23, 0x1, 0x1f",      # a predicate result first
    "LDSM.16.M88.4 R90, [R7]",                # four registers from R90
])
def test_an_invariant_operand_overwritten_in_its_loop_is_found(write):
  found = register_operands.clobbered_operands(_step_loop(write))
  assert found == [dict(hgmma="HGMMA.64x64x16.F32.BF16 R24, R92, gdesc[UR8], RZ, !UPT",
                        write=write)]


@pytest.mark.parametrize("write", [
    "MUFU.EX2 R96, R24",                      # just past the quad
    "STS [R92], R93",                         # reads q's registers, writes none
    "ISETP.GE.AND P0, PT, R92, RZ, PT",       # writes a predicate
    "LDSM.16.M88.4 R88, [R7]",                # R88-R91 only
])
def test_untouched_operands_and_fresh_ones_pass(write):
  # PV's P (R60) is written before PV in every iteration: fresh, not flagged.
  assert register_operands.clobbered_operands(_step_loop(write)) == []


def test_pv_in_a_rotated_loop_is_not_checked():
  # P for the next step's PV is made at the end of the iteration (ptxas's
  # rotated layout): PV's operand is written after PV, by design.
  listing = _listing(
      "F2FP.BF16.F32.PACK_AB R60, R25, R24",
      ".L_x_28:",
      "HGMMA.64x64x16.F32.BF16 R56, R60, gdesc[UR10].tnspB, R56, gsb0",
      "HGMMA.64x64x16.F32.BF16 R24, R92, gdesc[UR8], RZ, !UPT",
      "WARPGROUP.DEPBAR.LE gsb0, 0x0",
      "F2FP.BF16.F32.PACK_AB R60, R25, R24",
      "@P2 BRA `(.L_x_28)",
  )
  assert register_operands.clobbered_operands(listing) == []


def test_an_hgmma_outside_any_loop_is_not_checked():
  listing = _listing("HGMMA.64x64x16.F32.BF16 R24, R92, gdesc[UR8], RZ, !UPT",
                     "MUFU.EX2 R92, R24", "EXIT")
  assert register_operands.clobbered_operands(listing) == []


def test_only_the_innermost_loop_counts():
  # q for the next item is loaded at the end of the item loop, after the
  # step loop: a write of the outer loop, not of the step loop that reads q.
  listing = _listing(
      "LDSM.16.M88.4 R92, [R6]",
      ".L_x_1:",
      ".L_x_2:",
      "HGMMA.64x64x16.F32.BF16 R24, R92, gdesc[UR8], RZ, !UPT",
      "MUFU.EX2 R30, R24",
      "@P2 BRA `(.L_x_2)",
      "LDSM.16.M88.4 R92, [R7]",
      "@P3 BRA `(.L_x_1)",
  )
  assert register_operands.clobbered_operands(listing) == []
