"""Block-sparse flash attention for JAX on NVIDIA GPUs (Pallas: Triton kernels, a Mosaic GPU forward on Hopper)."""

from bsattn_jax import masks
from bsattn_jax.api import (block_sparse_attention, block_sparse_attn_func,
                            block_streaming_attn_func, token_streaming_attn_func)
from bsattn_jax.block_mask import BlockMask, create_block_mask
from bsattn_jax.reference import (attention_probabilities, attention_reference,
                                  block_sparse_reference)
from bsattn_jax.ring_plan import RingPlan
from bsattn_jax.sharding import sharded_block_sparse_attention

__all__ = [
    "BlockMask",
    "RingPlan",
    "attention_probabilities",
    "attention_reference",
    "block_sparse_attention",
    "block_sparse_attn_func",
    "block_sparse_reference",
    "block_streaming_attn_func",
    "create_block_mask",
    "masks",
    "sharded_block_sparse_attention",
    "token_streaming_attn_func",
]
