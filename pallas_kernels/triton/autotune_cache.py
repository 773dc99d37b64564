"""Tuned launch configurations on disk, per GPU and shape class.

`bsattn_jax.autotune` times candidate configurations of the Triton kernels on
one shape and stores the winners here; the launch table
(`pallas_kernels/triton/configs.py`) asks here first, for the device the
computation is traced for, and falls back to its shipped entries. The file is
JSON, readable and editable by hand:

  {"version": 1,
   "gpus": {"NVIDIA H100 80GB HBM3": {
     "d128-bfloat16-tile128x128-s8192": {
       "forward": {"config": "128x64x4x2", "ms": 0.311,
                   "default": "128x64x4x2", "default_ms": 0.311}, ...}}}}

A shape class is the head dim, dtype, mask tile and the query length rounded
up to a power of two (`varlen` when examples differ in length). The file lives
at `$BSATTN_AUTOTUNE_CACHE`, else `~/.cache/bsattn_jax/autotune.json`, and is
read when this module is imported (again with `load`).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings

import numpy as np

from pallas_kernels import target

ENV_VAR = "BSATTN_AUTOTUNE_CACHE"
VERSION = 1
MIN_SEQ_CLASS = 16

_entries: dict[str, dict[str, dict[str, dict]]] = {}


def default_path() -> str:
  """`$BSATTN_AUTOTUNE_CACHE`, else `~/.cache/bsattn_jax/autotune.json`."""
  return os.environ.get(ENV_VAR) or os.path.join(
      os.path.expanduser("~"), ".cache", "bsattn_jax", "autotune.json")


def seq_len_class(seq_len: int | None) -> str:
  """'s256' for 197 query rows (the next power of two), 'varlen' for None."""
  if seq_len is None:
    return "varlen"
  return f"s{max(MIN_SEQ_CLASS, 1 << (int(seq_len) - 1).bit_length())}"


def shape_class(head_dim: int, dtype, mask_tile: tuple[int, int],
                seq_len: int | None) -> str:
  """The key tuned configurations are stored under, e.g.
  'd128-bfloat16-tile128x128-s8192'."""
  m, n = mask_tile
  return (f"d{head_dim}-{np.dtype(dtype).name}-tile{m}x{n}-"
          f"{seq_len_class(seq_len)}")


def _read(path: str) -> dict:
  """The file's `gpus` table ({} when there is no file)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    data = json.load(f)
  if not isinstance(data, dict) or data.get("version") != VERSION:
    raise ValueError(f"autotune cache {path} must be a JSON object with "
                     f"version {VERSION}, got {str(data)[:80]!r}")
  return data.get("gpus", {})


def load(path: str | None = None) -> None:
  """Replace the configurations in memory with those of `path` (default:
  `default_path()`)."""
  _entries.clear()
  _entries.update(_read(path or default_path()))


def lookup(kernel: str, shape: str) -> str | None:
  """The tuned config name ('128x64x4x2') of `kernel` for `shape` on the
  traced-for device, or None."""
  entry = _entries.get(target.device_name(), {}).get(shape, {}).get(kernel)
  return entry["config"] if entry else None


def store(gpu: str, shape: str, kernels: dict[str, dict],
          path: str | None = None) -> str:
  """Record `{kernel: {"config": name, ...}}` for (`gpu`, `shape`) in memory
  and in the file at `path` (merged with what it holds); returns the path."""
  path = path or default_path()
  on_disk = _read(path)
  on_disk.setdefault(gpu, {}).setdefault(shape, {}).update(kernels)
  _entries.setdefault(gpu, {}).setdefault(shape, {}).update(kernels)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  # Written beside the target and renamed: a reader never sees half a file.
  with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp",
                                   delete=False) as f:
    json.dump({"version": VERSION, "gpus": on_disk}, f, indent=1, sort_keys=True)
  os.replace(f.name, path)
  return path


try:
  load()
except (OSError, ValueError) as e:   # a broken file must not stop the import
  warnings.warn(f"bsattn_jax: ignoring the autotune cache: {e}")
