"""Block-sparse flash attention for JAX on NVIDIA GPUs (Pallas: Triton kernels, a Mosaic GPU forward on Hopper)."""

from bsattn_jax import masks
from bsattn_jax.api import (block_sparse_attention, block_sparse_attn_func,
                            block_streaming_attn_func, token_streaming_attn_func)
from bsattn_jax.autotune import AutotuneResult, autotune, load_autotune_cache
from bsattn_jax.block_mask import BlockMask, create_block_mask
from bsattn_jax.debug import debug_enabled, set_debug
from bsattn_jax.reference import (attention_probabilities, attention_reference,
                                  block_sparse_reference)
from bsattn_jax.ring_plan import RingPlan
from bsattn_jax.sharding import sharded_block_sparse_attention
from bsattn_jax.smem import SmemCheck, check_smem, smem_estimate

__all__ = [
    "AutotuneResult",
    "BlockMask",
    "RingPlan",
    "SmemCheck",
    "attention_probabilities",
    "attention_reference",
    "autotune",
    "block_sparse_attention",
    "block_sparse_attn_func",
    "block_sparse_reference",
    "block_streaming_attn_func",
    "check_smem",
    "create_block_mask",
    "debug_enabled",
    "load_autotune_cache",
    "masks",
    "set_debug",
    "sharded_block_sparse_attention",
    "smem_estimate",
    "token_streaming_attn_func",
]
