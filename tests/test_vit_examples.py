"""The ViT examples and the ViT step benchmark run end to end (tiny, on a CPU).

They are meant for a GPU, where a crash wastes a device call; their `--smoke`
settings run the same code paths in seconds with the kernels interpreted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> str:
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *args],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_vit_train_then_inference_restores_its_checkpoint(tmp_path):
  train_out = tmp_path / "train"
  stdout = _run("examples/vit_train.py", "--smoke", "--depth", "2",
                "--attention", "local", "--mask-per-layer", "--out", str(train_out))
  summary = stdout.strip().splitlines()[-1]
  assert summary.startswith("summary: attention=local (per layer) tokens=17"), summary
  assert "held-out accuracy" in summary and "mean step" in summary
  metrics = json.loads((train_out / "metrics.json").read_text())
  assert metrics["model"]["kinds"] == ["local", "strided"]
  assert len(metrics["losses"]) == 4 and metrics["eval_steps"] == [2, 4]
  assert 0.0 <= metrics["held_out_accuracy"] <= 1.0 and metrics["mean_step_ms"] > 0
  assert (train_out / "curves.png").stat().st_size > 0
  assert (train_out / "checkpoint").is_dir()

  infer_out = tmp_path / "infer"
  stdout = _run("examples/vit_inference.py", "--checkpoint", str(train_out),
                "--tokens", "37", "--batch", "2", "--iters", "2", "--warmup", "1",
                "--out", str(infer_out))
  # The restored model scores what training reported on the same held-out images.
  assert f"{metrics['held_out_accuracy'] * 100:.2f}%" in stdout.splitlines()[0]
  result = json.loads((infer_out / "inference.json").read_text())
  # Trained at 17 tokens, run at 37: the position embeddings were resized.
  assert [(r["tokens"], r["attention"]) for r in result["rows"]] == [
      (37, "dense"), (37, "global_local")]
  assert all(r["images_per_s"] > 0 and r["compile_s"] > 0 for r in result["rows"])
  assert stdout.strip().splitlines()[-1].startswith("| 37 | 24 | global_local |")


def test_vit_inference_fresh_model(tmp_path):
  stdout = _run("examples/vit_inference.py", "--smoke", "--tokens", "17",
                "--out", str(tmp_path))
  result = json.loads((tmp_path / "inference.json").read_text())
  assert result["restored"] is None
  assert [r["attention"] for r in result["rows"]] == ["dense", "global_local"]
  assert "| tokens | px | attention |" in stdout


def test_vit_step_benchmark_smoke(tmp_path):
  stdout = _run("benchmarks/vit_step.py", "--smoke", "--out", str(tmp_path))
  result = json.loads((tmp_path / "vit_step.json").read_text())
  assert [r["attention"] for r in result["rows"]] == ["reference", "dense", "global_local"]
  for row in result["rows"]:
    assert row["train_step_ms"] > 0 and row["infer_images_per_s"] > 0, row
  lines = stdout.strip().splitlines()
  assert lines[-5].startswith("| attention | train step ms |")
  assert lines[-1].startswith("| global_local |")
