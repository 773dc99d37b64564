"""Raw Pallas (Triton lowering) kernels for block-sparse attention.

They know nothing of Flax or user block sizes: they take flat `[T, heads, D]`
rows, per-example `seq_info` and BlockMask index arrays.
"""
