"""Block-sparse attention inside Flax models (linen and nnx).

Flax's attention modules project q, k, v and then call `attention_fn(query,
key, value, ...)`. `make_attention_fn` returns such a function backed by
`block_sparse_attention`, so a stock `nn.MultiHeadDotProductAttention` or
`nnx.MultiHeadAttention` keeps its parameters (a checkpoint trained with stock
attention loads unchanged) and gains a block pattern. The modules
`BlockSparseMultiHeadAttention` (linen) and `BlockSparseMultiHeadAttentionNNX`
(nnx) take the pattern as an argument and add grouped-query attention.

The pattern is fixed per layer, not per call: Flax's call-time `mask` is a token
mask `[batch..., H, Sq, Sk]`, which the block kernels cannot apply, so passing
one is an error (a `BlockMask` is accepted there instead).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype

from bsattn_jax.api import block_sparse_attention
from bsattn_jax.block_mask import BlockMask

# A user block mask `[B|1, H|1, nM, nN]`, a prebuilt BlockMask, or None (dense).
BlockPattern = jax.Array | BlockMask | None
# The pattern, or a function of (seq_len_q, seq_len_kv) returning it, so that one
# model serves several sequence lengths (image resolutions).
MaskSpec = BlockPattern | Callable[[int, int], BlockPattern]

DEFAULT_BLOCK_SIZE = (128, 128)


def _attention_dropout(dropout_rate: float, deterministic: bool,
                       dropout_rng: jax.Array | None) -> dict[str, Any]:
  """Keyword arguments of `block_sparse_attention` that apply attention
  dropout: in the kernels, from `dropout_rng` (the module's 'dropout' rng)."""
  if dropout_rate == 0.0 or deterministic:
    return {}
  if dropout_rng is None:
    raise ValueError(
        f"dropout_rate={dropout_rate} with deterministic=False needs dropout_rng "
        f"(linen: pass rngs={{'dropout': key}} to apply; nnx: rngs with a "
        f"'dropout' stream)")
  return dict(dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def _check_block_pattern(pattern: BlockPattern, *, block_size, seq_len_q: int,
                         seq_len_kv: int, resizable: bool) -> None:
  """Fail early, naming `mask`, when the pattern cannot serve these lengths."""
  hint = ("" if resizable else "; to serve several sequence lengths pass mask as "
          "a function (seq_len_q, seq_len_kv) -> block mask")
  if isinstance(pattern, BlockMask):
    if block_size is not None and tuple(block_size) != pattern.block_size:
      raise ValueError(
          f"block_size={tuple(block_size)} does not match the BlockMask's "
          f"block_size={pattern.block_size}; leave block_size out with a BlockMask")
    if (pattern.seq_len_q, pattern.seq_len_kv) != (seq_len_q, seq_len_kv):
      raise ValueError(
          f"mask: the BlockMask was built for seq_len_q={pattern.seq_len_q}, "
          f"seq_len_kv={pattern.seq_len_kv}, but the attention has {seq_len_q} "
          f"query and {seq_len_kv} key tokens{hint}")
    return
  if not hasattr(pattern, "shape") or len(pattern.shape) != 4:
    raise TypeError(
        f"mask must be a 4-D block mask [B|1, H|1, nM, nN], a BlockMask, None, "
        f"or a function of (seq_len_q, seq_len_kv) returning one; got "
        f"{getattr(pattern, 'shape', type(pattern).__name__)}")
  m, n = DEFAULT_BLOCK_SIZE if block_size is None else block_size
  blocks = (math.ceil(seq_len_q / m), math.ceil(seq_len_kv / n))
  if tuple(pattern.shape[2:]) != blocks:
    raise ValueError(
        f"mask must have {blocks[0]} x {blocks[1]} blocks for seq_len_q="
        f"{seq_len_q}, seq_len_kv={seq_len_kv} and block_size=({m}, {n}); got "
        f"shape {tuple(pattern.shape)}{hint}")


def _block_mask(spec: MaskSpec, *, block_size, seq_len_q: int, seq_len_kv: int,
                is_causal: bool) -> BlockMask:
  """The kernels' BlockMask for these lengths.

  Runs eagerly even under `jit` (the pattern is a constant of the model), so the
  index lists are built once per compilation, not on every step.
  """
  with jax.ensure_compile_time_eval():
    pattern = spec(seq_len_q, seq_len_kv) if callable(spec) else spec
    if pattern is None:
      return BlockMask.build(None, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv,
                             block_size=block_size or DEFAULT_BLOCK_SIZE,
                             is_causal=is_causal)
    _check_block_pattern(pattern, block_size=block_size, seq_len_q=seq_len_q,
                         seq_len_kv=seq_len_kv, resizable=callable(spec))
    if isinstance(pattern, BlockMask):
      return pattern
    return BlockMask.build(pattern, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv,
                           block_size=block_size or DEFAULT_BLOCK_SIZE,
                           is_causal=is_causal)


def _check_unsupported(*, bias, mask, module, qk_attn_weights_einsum,
                       attn_weights_value_einsum, input_positions) -> None:
  """Reject what stock attention would apply but the block kernels cannot."""
  if bias is not None:
    raise ValueError(
        f"bias: the block-sparse kernels cannot add a token-level attention bias "
        f"(got shape {jnp.shape(bias)}); give the pattern as a block mask instead")
  if mask is not None and not isinstance(mask, BlockMask):
    raise ValueError(
        f"mask: the block-sparse kernels cannot apply a token-level attention "
        f"mask (got shape {jnp.shape(mask)}); give the pattern as a block mask "
        f"to make_attention_fn / the module's mask argument, pass a BlockMask "
        f"here, or use is_causal=True for a causal mask")
  if module is not None:
    raise ValueError(
        "sow_weights=True (module given): the block-sparse kernels never "
        "materialize the attention weights, so there are none to sow")
  if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
    raise ValueError(
        "qk_attn_weights_einsum / attn_weights_value_einsum: custom einsums "
        "cannot replace the kernels' matrix products; leave them None")
  if input_positions is not None:
    raise ValueError(
        "input_positions: rotary embeddings are not applied inside the "
        "block-sparse kernels; rotate query and key before attention")


def make_attention_fn(
    mask: MaskSpec = None, *,
    block_size: tuple[int, int] | None = None,
    softmax_scale: float | None = None,
    is_causal: bool = False,
    backend: str = "auto",
) -> Callable[..., jax.Array]:
  """An `attention_fn` for Flax attention modules that runs block-sparse attention.

  Usage: `nn.MultiHeadDotProductAttention(..., attention_fn=make_attention_fn(m))`
  or `nnx.MultiHeadAttention(..., attention_fn=make_attention_fn(m))`.

  Args:
    mask: user block mask `[B|1, H|1, ceil(Sq/m), ceil(Sk/n)]` (nonzero
      attends; `[1, H, ...]` for per-head patterns), a prebuilt `BlockMask`,
      None (dense), or a function `(seq_len_q, seq_len_kv) -> ` one of those,
      called at trace time with Python ints.
    block_size: user block `(m, n)` of an array mask; default (128, 128).
      With a `BlockMask` it must be left out or equal the mask's own.
    softmax_scale: default `1 / sqrt(head_dim)`, as in Flax.
    is_causal: causal attention on top of the block pattern (also taken per
      call, as nnx passes it). Bottom-right aligned like
      `block_sparse_attention`: Flax's causal mask when Sq == Sk.
    backend: as in `block_sparse_attention`.
  Returns:
    `attention_fn(query, key, value, ...) -> [batch..., Sq, H, D]` with
    query `[batch..., Sq, H, D]`, key/value `[batch..., Sk, Hkv, D]`,
    taking every argument Flax passes.
  """
  if isinstance(mask, BlockMask) and block_size is not None:
    _check_block_pattern(mask, block_size=block_size, seq_len_q=mask.seq_len_q,
                         seq_len_kv=mask.seq_len_kv, resizable=False)
  # The returned function's own `mask` and `is_causal` are Flax's call arguments.
  spec, outer_is_causal = mask, is_causal

  def attention_fn(
      query: jax.Array, key: jax.Array, value: jax.Array,
      bias: jax.Array | None = None,
      mask: jax.Array | BlockMask | None = None,
      broadcast_dropout: bool = True,
      dropout_rng: jax.Array | None = None,
      dropout_rate: float = 0.0,
      deterministic: bool = False,
      dtype: Any = None,
      precision: Any = None,
      module: Any = None,
      force_fp32_for_softmax: bool = False,
      qk_attn_weights_einsum: Callable[..., jax.Array] | None = None,
      attn_weights_value_einsum: Callable[..., jax.Array] | None = None,
      is_causal: bool = False,
      input_positions: jax.Array | None = None,
  ) -> jax.Array:
    """Flax's `dot_product_attention` signature; returns `[batch..., Sq, H, D]`.

    `precision`, `broadcast_dropout` and `force_fp32_for_softmax` are accepted
    for compatibility: the kernels always take the softmax and accumulate in
    fp32. A `BlockMask` as `mask` replaces the layer's pattern for this call.
    """
    del broadcast_dropout, precision, force_fp32_for_softmax
    _check_unsupported(bias=bias, mask=mask, module=module,
                       qk_attn_weights_einsum=qk_attn_weights_einsum,
                       attn_weights_value_einsum=attn_weights_value_einsum,
                       input_positions=input_positions)
    dropout = _attention_dropout(dropout_rate, deterministic, dropout_rng)
    query, key, value = promote_dtype(query, key, value, dtype=dtype)
    if query.ndim < 3:
      raise ValueError(
          f"query must be [batch..., Sq, H, D] (at least 3-D), got shape {query.shape}")
    if key.shape[:-3] != query.shape[:-3]:
      raise ValueError(
          f"query and key must share batch dims, got shapes {query.shape} and {key.shape}")
    causal = is_causal or outer_is_causal
    if isinstance(mask, BlockMask) and spec is not None:
      raise ValueError(
          "mask: a BlockMask was passed at call time but the attention function "
          "already has a pattern; give the pattern in one place only")
    block_mask = _block_mask(
        mask if mask is not None else spec, block_size=block_size,
        seq_len_q=query.shape[-3], seq_len_kv=key.shape[-3], is_causal=causal)
    batch_dims = query.shape[:-3]
    flat = lambda x: x.reshape(math.prod(batch_dims), *x.shape[-3:])
    out = block_sparse_attention(
        flat(query), flat(key), flat(value), block_mask,
        softmax_scale=softmax_scale, is_causal=causal, backend=backend, **dropout)
    return out.reshape(query.shape)

  return attention_fn


class BlockSparseMultiHeadAttention(nn.Module):
  """Linen multi-head attention restricted to a block pattern; GQA optional.

  Parameters are laid out as in `nn.MultiHeadDotProductAttention` (`query`,
  `key`, `value`, `out`), so stock checkpoints load when `num_kv_heads` is
  None. Shapes: inputs `[batch..., S, features]` -> `[batch..., Sq, out_features]`.

  Attributes:
    num_heads: query heads; `qkv_features` must be divisible by it.
    mask: block pattern for this layer (see `make_attention_fn`).
    block_size: user block `(m, n)` of an array mask.
    num_kv_heads: key/value heads (GQA); must divide `num_heads`. None: num_heads.
    decode: autoregressive caching is not supported; True is an error.
  """

  num_heads: int
  mask: MaskSpec = None
  block_size: tuple[int, int] | None = None
  num_kv_heads: int | None = None
  qkv_features: int | None = None
  out_features: int | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  precision: Any = None
  kernel_init: Callable[..., jax.Array] = nn.linear.default_kernel_init
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()
  use_bias: bool = True
  softmax_scale: float | None = None
  is_causal: bool = False
  backend: str = "auto"
  decode: bool = False

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None,
               inputs_v: jax.Array | None = None, *,
               mask: BlockMask | None = None, deterministic: bool | None = None,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """inputs_q `[batch..., Sq, F]`, inputs_k/v `[batch..., Sk, F]` (default:
    self-attention) -> `[batch..., Sq, out_features]`. `mask`: a `BlockMask`
    for this call only (token masks are an error)."""
    if self.decode:
      raise ValueError(
          "decode=True: autoregressive decoding with a cache is not supported "
          "by BlockSparseMultiHeadAttention")
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    num_kv_heads = self.num_kv_heads or self.num_heads
    if qkv_features % self.num_heads:
      raise ValueError(
          f"qkv_features ({qkv_features}) must be divisible by num_heads "
          f"({self.num_heads})")
    if self.num_heads % num_kv_heads:
      raise ValueError(
          f"num_kv_heads ({num_kv_heads}) must divide num_heads ({self.num_heads})")
    head_dim = qkv_features // self.num_heads

    def projection(heads: int, name: str) -> nn.DenseGeneral:
      return nn.DenseGeneral(
          (heads, head_dim), axis=-1, dtype=self.dtype,
          param_dtype=self.param_dtype, kernel_init=self.kernel_init,
          bias_init=self.bias_init, use_bias=self.use_bias,
          precision=self.precision, name=name)

    query = projection(self.num_heads, "query")(inputs_q)
    key = projection(num_kv_heads, "key")(inputs_k)
    value = projection(num_kv_heads, "value")(inputs_v)
    deterministic = (self.dropout_rate == 0.0 or nn.merge_param(
        "deterministic", self.deterministic, deterministic))
    if not deterministic and dropout_rng is None:
      dropout_rng = self.make_rng("dropout")
    attention = make_attention_fn(
        self.mask, block_size=self.block_size, softmax_scale=self.softmax_scale,
        is_causal=self.is_causal, backend=self.backend)
    x = attention(query, key, value, mask=mask, dropout_rng=dropout_rng,
                  dropout_rate=self.dropout_rate, deterministic=deterministic,
                  dtype=self.dtype)
    return nn.DenseGeneral(
        self.out_features or inputs_q.shape[-1], axis=(-2, -1),
        kernel_init=self.kernel_init, bias_init=self.bias_init,
        use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        precision=self.precision, name="out")(x)


class BlockSparseMultiHeadAttentionNNX(nnx.MultiHeadAttention):
  """`nnx.MultiHeadAttention` restricted to a block pattern; GQA optional.

  Same parameters as the stock module (stock checkpoints load), with the
  pattern given at construction (see `make_attention_fn` for `mask`).
  Shapes: inputs `[batch..., S, in_features]` -> `[batch..., Sq, out_features]`.
  """

  def __init__(
      self, num_heads: int, in_features: int, mask: MaskSpec = None, *,
      block_size: tuple[int, int] | None = None,
      num_kv_heads: int | None = None,
      qkv_features: int | None = None,
      out_features: int | None = None,
      in_kv_features: int | None = None,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      dropout_rate: float = 0.0,
      deterministic: bool | None = None,
      precision: Any = None,
      kernel_init: Callable[..., jax.Array] = nnx.nn.linear.default_kernel_init,
      bias_init: Callable[..., jax.Array] = nnx.initializers.zeros_init(),
      use_bias: bool = True,
      softmax_scale: float | None = None,
      is_causal: bool = False,
      backend: str = "auto",
      decode: bool = False,
      rngs: nnx.Rngs,
  ):
    if decode:
      raise ValueError(
          "decode=True: autoregressive decoding with a cache is not supported "
          "by BlockSparseMultiHeadAttentionNNX")
    super().__init__(
        num_heads, in_features, qkv_features=qkv_features,
        out_features=out_features, num_kv_heads=num_kv_heads,
        in_kv_features=in_kv_features, dtype=dtype, param_dtype=param_dtype,
        dropout_rate=dropout_rate, deterministic=deterministic,
        precision=precision, kernel_init=kernel_init, bias_init=bias_init,
        use_bias=use_bias, decode=False, rngs=rngs,
        attention_fn=make_attention_fn(
            mask, block_size=block_size, softmax_scale=softmax_scale,
            is_causal=is_causal, backend=backend))

  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None,
               inputs_v: jax.Array | None = None, *,
               mask: BlockMask | None = None, deterministic: bool | None = None,
               rngs: nnx.Rngs | None = None, decode: bool | None = None,
               is_causal: bool = False) -> jax.Array:
    """inputs_q `[batch..., Sq, F]`, inputs_k/v `[batch..., Sk, F]` (default:
    self-attention) -> `[batch..., Sq, out_features]`."""
    if decode:
      raise ValueError(
          "decode=True: autoregressive decoding with a cache is not supported "
          "by BlockSparseMultiHeadAttentionNNX")
    return super().__call__(inputs_q, inputs_k, inputs_v, mask=mask,
                            deterministic=deterministic, rngs=rngs,
                            decode=False, is_causal=is_causal)

  def init_cache(self, input_shape, dtype=jnp.float32) -> None:
    """Not supported: there is no decoding cache."""
    raise ValueError(
        "init_cache: autoregressive decoding with a cache is not supported by "
        "BlockSparseMultiHeadAttentionNNX")
