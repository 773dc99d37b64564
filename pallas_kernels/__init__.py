"""Raw Pallas kernels for block-sparse attention.

`registry` chooses among the implementations; `triton/` holds the portable
family (forward, dK/dV and dQ on any CUDA GPU, and interpreted on a CPU),
`mosaic_gpu/` the Hopper family (warp-specialized forward, dK/dV and dQ).
Shared by both: `block_lists` (the index lists they walk), `seq_info` (where
each example lives in the flat rows), `masking` (the element rule of partial
tiles) and `numerics`. They know nothing of Flax or user block sizes.
"""

# Pallas imports its fuser lazily, during the first trace of a kernel, and that
# import registers a config value that is part of jit's cache key: the second
# call of every jitted function would miss the cache and compile again.
# Importing it before any trace keeps the key stable.
import jax.experimental.pallas.fuser  # noqa: F401
