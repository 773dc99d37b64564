"""Where the Hopper forward's time goes: its named regions, per warpgroup.

Runs `pallas_kernels.mosaic_gpu.fwd.forward` once with Mosaic GPU's on-device
profiler (each warpgroup stamps the SM clock at the start and end of every
named region into shared memory; the trace is dumped after the call), then
prints, per warpgroup role (compute / memory) and region: how often it ran per
program, its mean length in cycles, and its share of the program's span; the
time outside every region; and, for the compute warpgroups, the span per item
against the step regions inside it (what an item costs beyond its key tiles).

GPU only (Hopper). Example, the local-window case of the suite:
  PYTHONPATH=. python benchmarks/profile_hopper.py --out $OUT --seq 8192 --window 3
Writes `profile_summary.json` and `trace_head.json` (the first `--keep`
programs, Perfetto/chrome://tracing format) under `--out`.

Profiling adds ~12 cycles per region boundary and holds 512 regions per
warpgroup (later ones are dropped): dense S=8192 has more steps per program
than that, so profile sparse cases or short sequences.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import tempfile

COMPUTE_ROLE = "compute"
MEMORY_ROLE = "memory"
STEP_REGIONS = ("qk", "softmax", "turn", "pv")
ITEM_END_REGION = "epilogue"


def _role(trace_index: int, warpgroups: int) -> str:
  """Warpgroups 0..n-2 of a program compute, the last one issues copies."""
  return MEMORY_ROLE if trace_index % warpgroups == warpgroups - 1 else COMPUTE_ROLE


def traces_of(events: list[dict]) -> dict[tuple[int, int], list[dict]]:
  """Events grouped by (pid, tid) = (SM, warpgroup trace), in recorded order."""
  grouped = collections.defaultdict(list)
  for event in events:
    grouped[(event["pid"], event["tid"])].append(event)
  return grouped


def regions_of(trace: list[dict]) -> list[tuple[str, float, float]]:
  """(name, start, end) of every closed region of one trace, in cycles.

  The dump's timestamps are (start time + cycles) / 1e3, so differences times
  1e3 are SM clock cycles.
  """
  open_regions, closed = [], []
  for event in trace:
    cycles = event["ts"] * 1e3
    if event["ph"] == "B":
      open_regions.append((event["name"], cycles))
    elif open_regions:
      name, start = open_regions.pop()
      closed.append((name, start, cycles))
  return closed


def summarize(events: list[dict], warpgroups: int = 3) -> dict:
  """Per role: region counts per trace, mean cycles, share of span; item costs.

  Args:
    events: the dumped trace's `traceEvents`.
    warpgroups: warpgroups per program (the last is the memory warpgroup).
  """
  per_role = collections.defaultdict(lambda: {
      "spans": [], "outside": [], "regions": collections.defaultdict(list),
      "items": [], "steps_per_item": [], "step_cycles": []})
  for (_, tid), trace in traces_of(events).items():
    regions = regions_of(trace)
    if not regions:
      continue
    role = per_role[_role(tid - 1, warpgroups)]
    span = max(end for _, _, end in regions) - min(start for _, start, _ in regions)
    role["spans"].append(span)
    role["outside"].append(span - sum(end - start for _, start, end in regions))
    for name, start, end in regions:
      role["regions"][name].append(end - start)
    _item_costs(regions, role)

  summary = {}
  for name, role in per_role.items():
    num_traces = len(role["spans"])
    mean_span = statistics.fmean(role["spans"])
    summary[name] = {
        "traces": num_traces,
        "mean_span_cycles": mean_span,
        "outside_share": statistics.fmean(role["outside"]) / mean_span,
        "regions": {
            region: {"per_trace": len(cycles) / num_traces,
                     "mean_cycles": statistics.fmean(cycles),
                     "share": sum(cycles) / num_traces / mean_span}
            for region, cycles in sorted(role["regions"].items())},
    }
    if role["items"]:
      step = statistics.median(role["step_cycles"])
      item = statistics.fmean(role["items"])
      steps = statistics.fmean(role["steps_per_item"])
      summary[name]["items"] = {
          "mean_item_cycles": item, "mean_steps_per_item": steps,
          "median_step_cycles": step,
          "mean_cycles_beyond_steps": item - steps * step}
  return summary


def _item_costs(regions, role) -> None:
  """Items of a compute trace: from one item's end to the next (the first
  item from the trace's start), and the steps (qk..pv) inside each."""
  ends = [end for name, _, end in regions if name == ITEM_END_REGION]
  if not ends:
    return
  starts = [min(start for _, start, _ in regions)] + ends[:-1]
  step_starts = sorted(start for name, start, _ in regions if name == STEP_REGIONS[0])
  pv_ends = sorted(end for name, _, end in regions if name == STEP_REGIONS[-1])
  role["step_cycles"].extend(end - start for start, end in zip(step_starts, pv_ends))
  for start, end in zip(starts, ends):
    role["items"].append(end - start)
    role["steps_per_item"].append(sum(start <= s < end for s in step_starts))


def format_summary(summary: dict, ghz: float | None) -> str:
  """A plain-text table of `summarize`'s result (us at `ghz`, when given)."""
  to_us = (lambda c: f"{c / ghz / 1e3:8.3f}") if ghz else (lambda c: "       -")
  lines = []
  for role, data in summary.items():
    lines.append(f"{role} warpgroups: {data['traces']} traces, mean span "
                 f"{data['mean_span_cycles']:.0f} cycles ({to_us(data['mean_span_cycles']).strip()} us), "
                 f"outside any region {data['outside_share']:.1%}")
    lines.append(f"  {'region':<14}{'per trace':>10}{'mean cyc':>10}{'mean us':>9}{'share':>8}")
    for region, r in data["regions"].items():
      lines.append(f"  {region:<14}{r['per_trace']:>10.1f}{r['mean_cycles']:>10.0f}"
                   f"{to_us(r['mean_cycles']):>9}{r['share']:>8.1%}")
    if "items" in data:
      it = data["items"]
      lines.append(f"  items: {it['mean_item_cycles']:.0f} cycles each, "
                   f"{it['mean_steps_per_item']:.2f} steps of {it['median_step_cycles']:.0f}"
                   f" (median); beyond the steps: {it['mean_cycles_beyond_steps']:.0f} cycles"
                   f" ({to_us(it['mean_cycles_beyond_steps']).strip()} us) per item")
  return "\n".join(lines)


def _run(args) -> int:
  import jax
  import jax.numpy as jnp
  from benchmarks.timing import time_jax_pipelined
  from bsattn_jax import masks
  from bsattn_jax.block_mask import BlockMask
  from pallas_kernels.mosaic_gpu import fwd as mosaic_fwd

  s, d, b, h = args.seq, args.head_dim, args.batch, args.heads
  n = -(-s // 128)
  causal = args.pattern == "causal"
  user_mask = masks.local(n, n, args.window) if args.pattern == "local" else None
  mask = BlockMask.build(user_mask, seq_len_q=s, is_causal=causal)
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (b * s, h, d), jnp.bfloat16) for key in keys)
  trace_dir = tempfile.mkdtemp(prefix="bsattn_profile_")

  def call(profile_dir):
    return jax.jit(lambda q, k, v, m: mosaic_fwd.forward(
        q, k, v, m.kv_lists, softmax_scale=d**-0.5, rule=m.element_rule,
        q_len=s, kv_len=s, profile_dir=profile_dir))

  plain_ms = time_jax_pipelined(call(""), q, k, v, mask, iters=50)
  jax.block_until_ready(call(trace_dir)(q, k, v, mask))
  jax.effects_barrier()                        # the dump is a host callback
  files = glob.glob(os.path.join(trace_dir, "*trace.json"))
  if not files:
    print(f"no trace written to {trace_dir}", file=sys.stderr)
    return 1
  with open(files[0]) as f:
    events = json.load(f)["traceEvents"]
  summary = summarize(events)
  span = max(data["mean_span_cycles"] for data in summary.values())
  ghz = span / (plain_ms * 1e6)          # cycles per ns, from the unprofiled call
  print(f"{args.pattern} B={b} S={s} H={h} D={d} density={float(mask.density()):.3f}: "
        f"{plain_ms:.4f} ms unprofiled; mean program span {span:.0f} cycles "
        f"-> {ghz:.2f} GHz if the span were the whole call")
  print(format_summary(summary, ghz))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "profile_summary.json"), "w") as f:
    json.dump({"case": vars(args), "unprofiled_ms": plain_ms, "summary": summary}, f,
              indent=1)
  head = [e for e in events if e["pid"] <= args.keep]
  with open(os.path.join(args.out, "trace_head.json"), "w") as f:
    json.dump({"displayTimeUnit": "ns", "traceEvents": head}, f)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "profile_out"))
  parser.add_argument("--seq", type=int, default=8192)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
  parser.add_argument("--pattern", default="local", choices=("local", "dense", "causal"))
  parser.add_argument("--window", type=int, default=3, help="local: blocks each side")
  parser.add_argument("--keep", type=int, default=4,
                      help="SMs whose events go into trace_head.json")
  return _run(parser.parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
