"""The attentions we compare against, one builder per peer.

JAX peers return a `JaxPeer` whose `attend(q, k, v) -> out` is jitted and takes
the case's BTNH arrays; torch peers return a `TorchPeer` whose `attend` takes
torch BHSD tensors on the GPU. A peer that cannot run the case (no GPU, torch
missing, a shape it refuses) has `attend=None` and says why in `reason`.
Failures only a compile or a run reveals are caught by the caller.

Only FlexAttention sees the block mask; tokamax runs the dense pattern and
token windows (it masks tokens, not blocks); the other peers are dense (causal
when the case is) and serve as the speed of light for "skip nothing".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import math
import os
import sys
import time
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.cases import Case

TORCH_DEVICE = "cuda"                # a CPU check of the torch paths may set "cpu"
FLEX_BLOCK = 128
XLA_MAX_SCORE_BYTES = 16 * 2**30     # the XLA peer materializes fp32 scores
FLEX_EAGER_MASK_MAX_PAIRS = 2**28    # eager create_block_mask materializes Sq x Sk
MHA_SEQ_MULTIPLE = 128
# tokamax imports xprof for its own profiling helpers only; without xprof this
# folder's stand-in answers that import.
XPROF_STUB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stubs")


@dataclasses.dataclass(frozen=True)
class JaxPeer:
  """A JAX attention: `attend(q, k, v) -> out`, all `[B, S, H, D]`."""

  attend: Callable | None
  reason: str = ""             # why attend is None
  input_dtype: str | None = None   # inputs are cast to this outside the timing
  note: str = ""


@dataclasses.dataclass(frozen=True)
class TorchPeer:
  """A torch attention: `attend(q, k, v) -> out`, all `[B, H, S, D]` on CUDA."""

  attend: Callable | None
  reason: str = ""
  note: str = ""
  mask_build_ms: float | None = None   # FlexAttention's create_block_mask


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def cudnn_attention(case: Case) -> JaxPeer:
  """`jax.nn.dot_product_attention(implementation="cudnn")`, dense (or causal)."""
  if not _on_gpu():
    return JaxPeer(None, f"cuDNN needs a CUDA GPU (backend: {jax.default_backend()})")
  if case.dtype not in ("bfloat16", "float16"):
    return JaxPeer(None, f"cuDNN flash attention takes fp16/bf16, not {case.dtype}")
  attend = functools.partial(
      jax.nn.dot_product_attention, scale=case.softmax_scale,
      is_causal=case.causal, implementation="cudnn")
  return JaxPeer(jax.jit(attend))


def xla_attention(case: Case) -> JaxPeer:
  """`jax.nn.dot_product_attention(implementation="xla")`: materialized scores."""
  score_bytes = 4 * case.batch * case.heads * case.seq_len_q * case.sk
  if _on_gpu() and score_bytes > XLA_MAX_SCORE_BYTES:
    return JaxPeer(None, f"would materialize {score_bytes / 2**30:.0f} GiB of fp32 "
                         f"scores (limit {XLA_MAX_SCORE_BYTES / 2**30:.0f} GiB)")
  attend = functools.partial(
      jax.nn.dot_product_attention, scale=case.softmax_scale,
      is_causal=case.causal, implementation="xla")
  return JaxPeer(jax.jit(attend))


def pallas_triton_mha(case: Case) -> JaxPeer:
  """JAX's dense Pallas Triton flash attention (`pallas.ops.gpu.attention.mha`).

  It needs the length to be a multiple of its 128 blocks: other lengths are
  padded inside the timed call, with segment ids keeping padding out of the
  real rows' softmax. Default block sizes. Off the GPU it runs interpreted.
  """
  if case.hkv != case.heads:
    return JaxPeer(None, "mha has no GQA/MQA (needs as many kv heads as heads)")
  if case.seq_len_q != case.sk:
    return JaxPeer(None, "mha's segment ids need equal q and kv lengths")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention
  seq_len = case.seq_len_q
  padded = math.ceil(seq_len / MHA_SEQ_MULTIPLE) * MHA_SEQ_MULTIPLE
  interpret = not _on_gpu()
  run = functools.partial(pallas_attention.mha, sm_scale=case.softmax_scale,
                          causal=case.causal, interpret=interpret)

  def attend(q, k, v):
    if padded == seq_len:
      return run(q, k, v, segment_ids=None)
    pad = [(0, 0), (0, padded - seq_len), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    segment_ids = jnp.broadcast_to(
        (jnp.arange(padded) < seq_len).astype(jnp.int32), (case.batch, padded))
    return run(q, k, v, segment_ids=segment_ids)[:, :seq_len]

  notes = []
  if padded != seq_len:
    notes.append(f"padded {seq_len}->{padded} inside the timed call")
  if interpret:
    notes.append("interpret mode (no GPU)")
  return JaxPeer(jax.jit(attend), note="; ".join(notes))


def pallas_mosaic_attention(case: Case) -> JaxPeer:
  """JAX's Mosaic GPU (Hopper) flash attention (`pallas.ops.gpu.attention_mgpu`).

  Needs sm90, fp16/bf16, head dim a multiple of 64, lengths multiples of 128;
  it applies no softmax scale, so q is scaled inside the timed call. Its shared
  memory buffers are declared fp16, so it runs on fp16 inputs (same speed as
  bf16 on the tensor cores).
  """
  if not _on_gpu():
    return JaxPeer(None, "Mosaic GPU needs an NVIDIA Hopper GPU")
  capability = getattr(jax.devices()[0], "compute_capability", "")
  if not str(capability).startswith("9."):
    return JaxPeer(None, f"Mosaic GPU attention is Hopper-only (sm90), got sm{capability}")
  if case.dtype not in ("bfloat16", "float16"):
    return JaxPeer(None, f"Mosaic GPU attention takes fp16/bf16, not {case.dtype}")
  if case.head_dim % 64:
    return JaxPeer(None, f"head dim {case.head_dim} is not a multiple of 64")
  if case.seq_len_q % 128 or case.sk % 128:
    return JaxPeer(None, f"lengths {case.seq_len_q}/{case.sk} are not multiples of 128")
  from jax.experimental.pallas.ops.gpu import attention_mgpu
  config = attention_mgpu.TuningConfig(
      block_q=64, block_kv=128, max_concurrent_steps=2, causal=case.causal,
      compute_wgs_bwd=2, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64,
      block_kv_dq=64)
  scale = case.softmax_scale

  def attend(q, k, v):
    return attention_mgpu.attention((q * scale).astype(q.dtype), k, v, config)

  note = "fp16 inputs" if case.dtype != "float16" else ""
  return JaxPeer(jax.jit(attend), input_dtype="float16", note=note)


def _tokamax_or_reason():
  """(tokamax, "") when importable, else (None, why not)."""
  if importlib.util.find_spec("xprof") is None and XPROF_STUB_DIR not in sys.path:
    sys.path.append(XPROF_STUB_DIR)
  try:
    import tokamax
  except Exception as e:  # ImportError, or a dependency too old for it
    return None, f"tokamax not importable ({type(e).__name__}: {e})"
  return tokamax, ""


def tokamax_attention(case: Case, implementation: str) -> JaxPeer:
  """`tokamax.dot_product_attention(implementation=...)`: dense, causal or a token window.

  tokamax masks tokens, not tiles: it runs the dense pattern (`is_causal` when
  the case is causal) and a token sliding window (`local_window_size=(left,
  right)`, both ends inclusive, as `token_window`); a block pattern has no
  token form it takes. Its Mosaic GPU kernel turns a window into per-row key
  ranges and skips the tiles outside them; its Triton kernel receives the
  window as an `Sq x Sk` bool mask and computes every tile. Config: tokamax's
  own choice (its autotuning cache, else its heuristics).
  """
  if case.dtype not in ("bfloat16", "float16"):
    return JaxPeer(None, f"tokamax peer is timed on fp16/bf16, not {case.dtype}")
  if case.token_window is None and case.pattern != "dense":
    return JaxPeer(None, f"tokamax masks tokens; block pattern '{case.pattern}' "
                         "has no token form it takes")
  tokamax, reason = _tokamax_or_reason()
  if tokamax is None:
    return JaxPeer(None, reason)
  if not _on_gpu():
    return JaxPeer(None, f"tokamax's {implementation} kernel needs a CUDA GPU "
                         f"(backend: {jax.default_backend()})")
  attend = functools.partial(
      tokamax.dot_product_attention, scale=case.softmax_scale, is_causal=case.causal,
      local_window_size=case.token_window, implementation=implementation)
  note = ""
  if case.token_window is not None and implementation == "triton":
    note = "window as an Sq x Sk bool mask, every tile computed"
  return JaxPeer(jax.jit(attend), note=note)


JAX_PEERS = {
    "cudnn": cudnn_attention,
    "xla": xla_attention,
    "pallas_mha": pallas_triton_mha,
    "pallas_mgpu": pallas_mosaic_attention,
    "tokamax_mosaic": functools.partial(tokamax_attention, implementation="mosaic"),
    "tokamax_triton": functools.partial(tokamax_attention, implementation="triton"),
}
# Peers whose time depends on the mask, so never copied from a same-shape case.
MASK_AWARE_JAX_PEERS = frozenset({"tokamax_mosaic", "tokamax_triton"})
TORCH_PEERS = ("torch_sdpa", "flex")     # timed after the JAX ones
PEER_NAMES = (*JAX_PEERS, *TORCH_PEERS)


def peer_names_arg(text: str) -> tuple[str, ...]:
  """The `--peers` flag's value, comma-separated names of `PEER_NAMES`
  (empty: every peer runs), for argparse's `type=`."""
  names = tuple(name for name in text.split(",") if name)
  unknown = sorted(set(names) - set(PEER_NAMES))
  if unknown:
    raise argparse.ArgumentTypeError(
        f"unknown {unknown}; known: {list(PEER_NAMES)}")
  return names


def torch_synchronize(torch) -> None:
  """Wait for the torch device (a no-op off CUDA)."""
  if TORCH_DEVICE == "cuda":
    torch.cuda.synchronize()


def torch_cuda_or_reason():
  """(torch, "") when torch with CUDA is importable, else (None, why not)."""
  try:
    import torch
  except Exception as e:  # ImportError, or a CUDA library clash at import
    return None, f"torch not importable ({type(e).__name__}: {e})"
  if not torch.cuda.is_available():
    return None, "torch sees no CUDA device"
  return torch, ""


def torch_sdpa(case: Case) -> TorchPeer:
  """`torch.nn.functional.scaled_dot_product_attention`, dense (or causal)."""
  torch, reason = torch_cuda_or_reason()
  if torch is None:
    return TorchPeer(None, reason)
  import torch.nn.functional as F
  gqa = case.hkv != case.heads

  def attend(q, k, v):
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=case.causal, scale=case.softmax_scale, enable_gqa=gqa)

  return TorchPeer(attend)


@functools.cache
def _compiled_flex_attention():
  import torch
  from torch.nn.attention.flex_attention import flex_attention
  dynamo_config = torch._dynamo.config
  for name in ("recompile_limit", "cache_size_limit"):   # one compile per case
    if hasattr(dynamo_config, name):
      setattr(dynamo_config, name, 256)
  return torch.compile(flex_attention, dynamic=False)


def _flex_mask_from_block_lists(table, mask_mod, seq_len_q: int, seq_len_kv: int):
  """FlexAttention BlockMask straight from a `[Bm, Hm, nM, nN]` block table.

  Every active block is a *full* block (the kernel calls no mask_mod inside
  it): exact for a block-level mask on block-aligned lengths without
  causality, and the mask is never evaluated per token (at 64k x 64k that
  would not fit). `mask_mod` is kept for FlexAttention's unfused fallback,
  which applies only the mask_mod.
  """
  import torch
  from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
  counts = table.sum(dim=-1, dtype=torch.int32)
  order = torch.argsort((~table).to(torch.int8), dim=-1, stable=True)
  indices = order.to(torch.int32).contiguous()          # active blocks first
  # No partial blocks. Their (unread) index tensor must not alias the full
  # one: torch.compile dedups aliased inputs and the kernel build breaks.
  return FlexBlockMask.from_kv_blocks(
      torch.zeros_like(counts), torch.zeros_like(indices), counts, indices,
      BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(seq_len_q, seq_len_kv))


def torch_flex_attention(case: Case, block_mask: np.ndarray) -> TorchPeer:
  """torch FlexAttention (`torch.compile`d) with the case's mask.

  `block_mask` is the user mask `[Bm, Hm, nM, nN]` at the case's block size
  m. The mask_mod looks it up at `[b, h, q_idx // m, kv_idx // m]` or, for a
  token-window case, is the window itself (`q - left <= kv <= q + right`); it
  requires `q_idx >= kv_idx` for causal cases. FlexAttention runs its own
  128-token blocks: with other user blocks, those its mask_mod cuts are
  partial. `create_block_mask` runs once, here, with the mask's own
  batch/head dims (1 or None = shared, FlexAttention broadcasts), and is
  timed as the peer's mask build. Eager `create_block_mask` materializes the
  token grid, so above 2^28 token pairs the FlexAttention BlockMask of a
  block mask at 128-token blocks is made from the block lists instead (same
  blocks).
  """
  torch, reason = torch_cuda_or_reason()
  if torch is None:
    return TorchPeer(None, reason)
  from torch.nn.attention.flex_attention import create_block_mask
  table = torch.as_tensor(np.array(block_mask, dtype=bool), device=TORCH_DEVICE)
  if case.token_window is not None:
    left, right = case.token_window
    mask_batch = mask_heads = None
    allowed_at = lambda b, h, q_idx, kv_idx: ((kv_idx >= q_idx - left)
                                              & (kv_idx <= q_idx + right))
  else:
    mask_batch, mask_heads = table.shape[:2]
    pick_b = (lambda b: b) if mask_batch > 1 else (lambda b: 0)
    pick_h = (lambda h: h) if mask_heads > 1 else (lambda h: 0)
    allowed_at = lambda b, h, q_idx, kv_idx: table[
        pick_b(b), pick_h(h), q_idx // case.block_size, kv_idx // case.block_size]

  def mask_mod(b, h, q_idx, kv_idx):
    allowed = allowed_at(b, h, q_idx, kv_idx)
    return allowed & (q_idx >= kv_idx) if case.causal else allowed

  note = ""
  if case.seq_len_q * case.sk <= FLEX_EAGER_MASK_MAX_PAIRS:
    build = functools.partial(create_block_mask, mask_mod, mask_batch, mask_heads,
                              case.seq_len_q, case.sk, device=TORCH_DEVICE,
                              BLOCK_SIZE=FLEX_BLOCK)
  elif (case.token_window is not None or case.causal or case.block_size != FLEX_BLOCK
        or case.seq_len_q % FLEX_BLOCK or case.sk % FLEX_BLOCK):
    return TorchPeer(None, "token grid too large for eager create_block_mask, and "
                           f"the mask is not {FLEX_BLOCK}-block-aligned for building "
                           "from lists")
  else:
    build = functools.partial(_flex_mask_from_block_lists, table, mask_mod,
                              case.seq_len_q, case.sk)
    note = "flex BlockMask built from the block lists (S x S too large for eager)"
  build()                        # warm-up: first-call allocations
  torch_synchronize(torch)
  start = time.perf_counter()
  flex_mask = build()
  torch_synchronize(torch)
  build_ms = (time.perf_counter() - start) * 1e3
  flex = _compiled_flex_attention()
  gqa = case.hkv != case.heads

  def attend(q, k, v):
    return flex(q, k, v, block_mask=flex_mask, scale=case.softmax_scale,
                enable_gqa=gqa)

  return TorchPeer(attend, note=note, mask_build_ms=build_ms)
