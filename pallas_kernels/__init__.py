"""Raw Pallas kernels for block-sparse attention.

Triton lowering: `forward`, `backward` (any CUDA GPU, and interpreted on CPU).
Mosaic GPU lowering: `forward_hopper`, the forward on Hopper for the shapes it
covers. They know nothing of Flax or user block sizes: they take flat
`[T, heads, D]` rows, per-example `seq_info` and BlockMask index arrays.
"""
