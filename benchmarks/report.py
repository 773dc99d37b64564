"""Turn a run's results into results.json, results.md, plots and a summary.

`results` is one JSON-ready dict: `meta`, `tests`, `correctness` (list),
`cases` (per-case mask and density), `measurements` (list of
`case_runner.Measurement` dicts) and `tuning`. Ratios are speed ratios on the
same case and mode: `x cuDNN = cuDNN ms / impl ms` (above 1: faster than cuDNN).
"""

from __future__ import annotations

import json
import os

from benchmarks.cases import DENSITY_SWEEP
from benchmarks.tune import best_configs

IMPL_ORDER = ("bsattn", "bsattn_triton", "cudnn", "xla", "pallas_mha", "pallas_mgpu",
              "tokamax_mosaic", "tokamax_triton", "torch_sdpa", "flex")
MODE_ORDER = ("fwd", "fwd_bwd", "mask_build")
RATIO_BASES = (("cudnn", "x cuDNN"), ("pallas_mha", "x mha"))
# A torch peer's back-to-back time (`Measurement.ms_back_to_back`) is a base of
# its own: the impl's name with this suffix.
BACK_TO_BACK = ":b2b"
SUMMARY_BASES = (("cudnn", "x cuDNN"), ("pallas_mha", "x mha"), ("pallas_mgpu", "x mgpu"),
                 ("flex", "x flex"), ("flex" + BACK_TO_BACK, "x flx-bb"),
                 ("tokamax_mosaic", "x tk-mos"),
                 ("tokamax_triton", "x tk-trt"), ("bsattn_triton", "x triton"))


def _sorted(measurements: list[dict]) -> list[dict]:
  case_order = {}
  for m in measurements:
    case_order.setdefault(m["case"], len(case_order))
  rank = lambda seq, x: seq.index(x) if x in seq else len(seq)
  return sorted(measurements, key=lambda m: (case_order[m["case"]],
                                             rank(MODE_ORDER, m["mode"]),
                                             rank(IMPL_ORDER, m["impl"])))


def _ms_by_impl(measurements: list[dict]) -> dict:
  """`{(case, mode, impl): ms}` of the successful measurements, and
  `(case, mode, impl + BACK_TO_BACK)` for a torch peer's back-to-back ms."""
  table = {}
  for m in measurements:
    if m["status"] != "ok":
      continue
    for suffix, ms in (("", m["ms"]), (BACK_TO_BACK, m.get("ms_back_to_back"))):
      if ms:
        table[(m["case"], m["mode"], m["impl"] + suffix)] = ms
  return table


def speed_ratio(ms_table: dict, m: dict, base: str) -> float | None:
  """How many times faster `m` is than `base` on its case and mode."""
  base_ms = ms_table.get((m["case"], m["mode"], base))
  if not base_ms or m["status"] != "ok" or not m["ms"] or m["mode"] == "mask_build":
    return None
  return base_ms / m["ms"]


def _fmt(x, spec: str) -> str:
  return "" if x is None else format(x, spec)


def markdown(results: dict) -> str:
  """The human-readable report."""
  meta = results.get("meta", {})
  lines = ["# bsattn_jax benchmarks", "",
           f"Device: {meta.get('device', '?')}; jax {meta.get('jax', '?')}; "
           f"torch {meta.get('torch', '-')}; mode: {meta.get('mode', '?')}; "
           f"started {meta.get('started', '?')}, {meta.get('wall_s', 0):.0f} s.", "",
           "ms: device time (JAX: mean of back-to-back calls with one wait, so host "
           "dispatch overlaps the GPU; torch: CUDA events, L2 flushed); blocked: "
           "median JAX call waited for one by one (adds dispatch and sync); "
           "back to back: torch calls timed as JAX's ms (x flx-bb: against "
           "FlexAttention's). "
           "TFLOP/s: effective, "
           "4·B·H·Sq·Sk·D·density (x3.5 fwd+bwd), the same FLOPs for every impl "
           "of a case. x cuDNN / x mha: speed relative to that peer (>1 faster).", ""]
  tests = results.get("tests")
  if tests:
    lines += ["## Tests", "", f"`{tests.get('command', '')}`: {tests.get('status', '')} "
              f"(rc {tests.get('returncode')}, {tests.get('seconds', 0):.0f} s) "
              f"{tests.get('summary', '')}", ""]
  checks = results.get("correctness") or []
  if checks:
    lines += ["## Correctness (relative error)", "",
              "| case | check | out | dq | dk | dv | passed | shape / error |",
              "|---|---|---|---|---|---|---|---|"]
    for c in checks:
      err = c.get("rel_err", {})
      cells = [_fmt(err.get(k), ".2e") for k in ("out", "dq", "dk", "dv")]
      lines.append(f"| {c['case']} | {c['check']} | " + " | ".join(cells) +
                   f" | {'yes' if c.get('passed') else 'NO'} | "
                   f"{c.get('error') or c.get('shape', '')} |")
    lines.append("")
  cases = results.get("cases") or []
  if cases:
    lines += ["## Cases", "", "| case | shape | mask | density |", "|---|---|---|---|"]
    lines += [f"| {c['case']} | {c['shape']} | {c.get('mask', '')} | "
              f"{_fmt(c.get('density'), '.3f')} |" for c in cases]
    lines.append("")
  measurements = _sorted(results.get("measurements") or [])
  if measurements:
    ms_table = _ms_by_impl(measurements)
    lines += ["## Timings", "",
              "| case | mode | impl | ms | blocked ms | back-to-back ms | TFLOP/s "
              "| x cuDNN | x mha | compile s | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in measurements:
      ratios = [_fmt(speed_ratio(ms_table, m, base), ".2f") for base, _ in RATIO_BASES]
      note = m["note"] if m["status"] == "ok" else f"{m['status']}: {m['reason']}"
      if m["status"] == "ok" and m["reason"]:
        note = f"{note}; {m['reason']}"
      lines.append(
          f"| {m['case']} | {m['mode']} | {m['impl']} | {_fmt(m['ms'], '.3f')} | "
          f"{_fmt(m['ms_blocked'], '.3f')} | "
          f"{_fmt(m.get('ms_back_to_back'), '.3f')} | {_fmt(m['tflops'], '.1f')} | "
          f"{ratios[0]} | {ratios[1]} | {_fmt(m['compile_s'], '.1f')} | "
          f"{note.replace('|', '/')} |")
    lines.append("")
  tuning = results.get("tuning")
  if tuning:
    lines += ["## Tuning (best launch config per case and kernel)", "", "```"]
    lines += best_configs(tuning) + ["```", "", "Full tables: tuning.json."]
  return "\n".join(lines) + "\n"


def write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, default=str)


def write_results(out_dir: str, results: dict) -> None:
  """results.json and results.md (cheap: called after every step)."""
  os.makedirs(out_dir, exist_ok=True)
  write_json(os.path.join(out_dir, "results.json"), results)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(markdown(results))


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _label_density_axes(ax_time, ax_rate, *, fontsize: int, ncol: int) -> None:
  """Labels, grid and legend of a (time, throughput) vs density figure."""
  ax_time.set(xlabel="block density", ylabel="forward ms", yscale="log",
              title="Forward time vs density")
  ax_rate.set(xlabel="block density", ylabel="effective TFLOP/s",
              title="Effective throughput vs density")
  for ax in (ax_time, ax_rate):
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=fontsize, ncol=ncol)


def plot_density(path: str, measurements: list[dict]) -> bool:
  """Forward time and effective TFLOP/s vs density over the density-sweep cases.

  Returns False (and draws nothing) when the sweep has no successful point.
  """
  points = [m for m in measurements if m["group"] == DENSITY_SWEEP
            and m["mode"] == "fwd" and m["status"] == "ok" and m["density"] is not None]
  if not points:
    return False
  plt = _pyplot()
  fig, (ax_time, ax_rate) = plt.subplots(1, 2, figsize=(12, 4.5))
  for impl in IMPL_ORDER:
    series = sorted((m["density"], m["ms"], m["tflops"]) for m in points
                    if m["impl"] == impl)
    if not series:
      continue
    density, ms, rate = zip(*series)
    style = dict(marker="o", linewidth=2.5 if impl == "bsattn" else 1.2,
                 linestyle="-" if impl in ("bsattn", "flex") else "--", label=impl)
    ax_time.plot(density, ms, **style)
    ax_rate.plot(density, rate, **style)
  _label_density_axes(ax_time, ax_rate, fontsize=8, ncol=1)
  fig.suptitle("Density sweep, forward (dense peers ignore the mask, so their "
               "effective rate falls with density)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def _forward_points(results: dict) -> list[tuple[dict, dict]]:
  """(case params, measurement) of every successful forward measurement."""
  params = {c["case"]: c.get("params", {}) for c in results.get("cases") or []}
  return [(params.get(m["case"], {}), m) for m in results.get("measurements") or []
          if m["mode"] == "fwd" and m["status"] == "ok" and m["ms"]]


DENSE_BASELINES = ("cudnn", "xla")


def plot_patterns(path: str, results: dict) -> bool:
  """Forward time and effective TFLOP/s vs density, a color per pattern:
  bsattn solid, FlexAttention dashed (the dense mask is every pattern's
  density-1 point); the dense peers, which ignore the mask, in gray.

  Returns False (and draws nothing) without a successful bsattn point.
  """
  points = [(p, m) for p, m in _forward_points(results) if m["density"] is not None]
  if not any(m["impl"] == "bsattn" for _, m in points):
    return False
  plt = _pyplot()
  fig, (ax_time, ax_rate) = plt.subplots(1, 2, figsize=(13, 4.8))
  patterns = sorted({p.get("pattern") for p, _ in points} - {"dense", None})
  colors = plt.get_cmap("tab10")
  for i, pattern in enumerate(patterns):
    for impl, style in (("bsattn", "-"), ("flex", "--")):
      series = sorted((m["density"], m["ms"], m["tflops"]) for p, m in points
                      if m["impl"] == impl and p.get("pattern") in (pattern, "dense"))
      if series:
        density, ms, rate = zip(*series)
        label = f"{impl} {pattern}"
        for ax, y in ((ax_time, ms), (ax_rate, rate)):
          ax.plot(density, y, style, marker="o", color=colors(i), label=label)
  for j, impl in enumerate(DENSE_BASELINES):
    series = sorted({(m["density"], m["ms"], m["tflops"]) for _, m in points
                     if m["impl"] == impl})
    if series:
      density, ms, rate = zip(*series)
      for ax, y in ((ax_time, ms), (ax_rate, rate)):
        ax.plot(density, y, ":", color=str(0.3 + 0.3 * j), label=f"{impl} (dense)")
  _label_density_axes(ax_time, ax_rate, fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_block_sizes(path: str, results: dict) -> bool:
  """Forward speedup vs user block size, a line per sequence length: bsattn
  over the dense baseline (cuDNN, else XLA) and over FlexAttention (same
  mask). Returns False (and draws nothing) when no ratio can be formed."""
  points = _forward_points(results)
  ms = {(m["case"], m["impl"]): m["ms"] for _, m in points}
  baseline = next((b for b in DENSE_BASELINES
                   if any(impl == b for _, impl in ms)), None)
  panels = [(b, f"bsattn speedup over {b}") for b in (baseline, "flex") if b]
  rows = {}
  for p, m in points:
    if m["impl"] != "bsattn":
      continue
    for base, _ in panels:
      if (m["case"], base) in ms:
        rows.setdefault((base, p.get("seq_len_q")), []).append(
            (p.get("block_size"), ms[(m["case"], base)] / m["ms"]))
  panels = [(base, title) for base, title in panels
            if any(row_base == base for row_base, _ in rows)]
  if not panels:
    return False
  plt = _pyplot()
  from matplotlib.ticker import ScalarFormatter
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8),
                           squeeze=False)
  for ax, (base, title) in zip(axes[0], panels):
    for (row_base, seq_len), series in sorted(rows.items()):
      if row_base == base:
        blocks, speedup = zip(*sorted(series))
        ax.plot(blocks, speedup, marker="o", label=f"S={seq_len}")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set(xlabel="user block size", ylabel="speedup (>1: bsattn faster)",
           title=title)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({p.get("block_size") for p, _ in points}))
    ax.get_xaxis().set_major_formatter(ScalarFormatter())
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def summary(results: dict) -> str:
  """A short table for the end of the log: ours per case and mode, and ratios."""
  measurements = _sorted(results.get("measurements") or [])
  ms_table = _ms_by_impl(measurements)
  lines = ["", "=" * 78, "SUMMARY  (x = speed relative to the peer, >1 = faster)",
           f"{'case':26s} {'mode':8s} {'bsattn ms':>10} {'TFLOP/s':>8} "
           + " ".join(f"{label:>8}" for _, label in SUMMARY_BASES)]
  for m in measurements:
    if m["impl"] != "bsattn" or m["mode"] == "mask_build":
      continue
    if m["status"] != "ok":
      lines.append(f"{m['case']:26s} {m['mode']:8s} {m['status']}: {m['reason'][:40]}")
      continue
    ratios = [_fmt(speed_ratio(ms_table, m, base), ".2f") or "-"
              for base, _ in SUMMARY_BASES]
    lines.append(f"{m['case']:26s} {m['mode']:8s} {m['ms']:10.3f} "
                 f"{_fmt(m['tflops'], '.1f'):>8} " + " ".join(f"{r:>8}" for r in ratios))
  checks = results.get("correctness") or []
  if checks:
    failed = [f"{c['case']}:{c['check']}" for c in checks if not c.get("passed")]
    lines.append(f"correctness: {len(checks) - len(failed)}/{len(checks)} passed"
                 + (f"; FAILED {', '.join(failed)}" if failed else ""))
  tests = results.get("tests")
  if tests:
    lines.append(f"tests: {tests.get('status')} {tests.get('summary', '')}".rstrip())
  for name, extra in (results.get("extras") or {}).items():
    lines.append(f"extra {name}: {extra.get('status')}")
  broken = sorted({f"{m['impl']}:{m['mode']}" for m in measurements
                   if m["status"] == "failed"})
  if broken:
    lines.append(f"failed measurements: {', '.join(broken)} (see results.md)")
  if results.get("tuning"):
    lines += ["tuning:"] + best_configs(results["tuning"])
  lines.append(f"wall {results.get('meta', {}).get('wall_s', 0):.0f} s")
  return "\n".join(lines)
