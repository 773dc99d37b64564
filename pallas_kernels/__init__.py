"""Raw Pallas kernels for block-sparse attention.

`registry` chooses among the implementations; `triton/` holds the portable
family (forward, dK/dV and dQ on any CUDA GPU, and interpreted on a CPU),
`mosaic_gpu/` the Hopper family (the warp-specialized forward). Shared by
both: `block_lists` (the index lists they walk), `seq_info` (where each
example lives in the flat rows), `masking` (the element rule of partial
tiles) and `numerics`. They know nothing of Flax or user block sizes.
"""
