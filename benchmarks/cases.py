"""The benchmark cases: shapes, dtype and the block pattern each one runs.

A case names a pattern builder from `bsattn_jax.masks` and its arguments; the
user-level block mask is built lazily by `user_mask` (a local window can be
given as a target density, and the window reaching the closest density is
chosen). A token sliding-window case (`token_window`) masks tokens, not
blocks: its `user_mask` is the blocks the window touches, which is what ours
visits; the token mask itself is built where it is run. Lists, in priority
order:

- `BENCHMARK_CASES`: the full GPU run (`required` ones make up `--quick`);
- `TUNING_CASES`: the launch-config sweeps of `tune.py`;
- `SMOKE_CASES` / `SMOKE_TUNING_CASES`: tiny shapes for a CPU run;
- `block_size_cases` / `pattern_cases`: the sweeps of `block_size_sweep.py`
  and `pattern_sweep.py` (every pattern can be asked for at a target
  density: the parameter reaching the closest one is chosen).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math

import jax
import jax.numpy as jnp
import numpy as np

from bsattn_jax import masks

DENSITY_SWEEP = "density_sweep"
BLOCK_SIZE_SWEEP = "block_size_sweep"
PATTERN_SWEEP = "pattern_sweep"
TOKEN_WINDOW = "token_window"


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark problem (padded BTNH layout, square user blocks)."""

  name: str
  batch: int
  seq_len_q: int
  heads: int
  head_dim: int
  seq_len_kv: int | None = None        # None: same as seq_len_q
  kv_heads: int | None = None          # None: same as heads
  dtype: str = "bfloat16"
  block_size: int = 128
  pattern: str = "dense"               # a key of PATTERNS, or TOKEN_WINDOW
  pattern_args: tuple[tuple[str, float], ...] = ()
  # (left, right): key kv is seen by query q when q - left <= kv <= q + right.
  token_window: tuple[int, int] | None = None
  causal: bool = False
  backward: bool = False               # also time forward + backward
  required: bool = True                # part of --quick
  group: str = ""                      # DENSITY_SWEEP: a point of the density plot

  def __post_init__(self) -> None:
    if (self.pattern == TOKEN_WINDOW) != (self.token_window is not None):
      raise ValueError(f"{self.name}: pattern {TOKEN_WINDOW!r} goes with a token_window")

  @property
  def sk(self) -> int:
    return self.seq_len_q if self.seq_len_kv is None else self.seq_len_kv

  @property
  def hkv(self) -> int:
    return self.heads if self.kv_heads is None else self.kv_heads

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def softmax_scale(self) -> float:
    return self.head_dim ** -0.5

  def shape_key(self) -> tuple:
    """What a mask-ignoring (dense) peer's time depends on."""
    return (self.batch, self.seq_len_q, self.sk, self.heads, self.hkv,
            self.head_dim, self.dtype, self.causal)

  def describe(self) -> str:
    return (f"B={self.batch} Sq={self.seq_len_q} Sk={self.sk} H={self.heads} "
            f"Hkv={self.hkv} D={self.head_dim} {self.dtype} block={self.block_size}"
            f"{' causal' if self.causal else ''}")


def _closest(candidates, density: float) -> tuple[jax.Array, str]:
  """Of (mask, description) candidates, the one whose block density is
  closest to `density` (the first of equals)."""
  return min(candidates, key=lambda c: abs(float(jnp.mean(c[0])) - density))


def _local_at_density(n_q: int, n_k: int, density: float) -> tuple[jax.Array, str]:
  """The `masks.local` band whose block density is closest to `density`."""
  def density_of(window):
    return float(jnp.mean(masks.local(n_q, n_k, window)))
  lo, hi = 0, max(n_q, n_k)            # density grows with the window
  while lo < hi:
    mid = (lo + hi) // 2
    if density_of(mid) < density:
      lo = mid + 1
    else:
      hi = mid
  window = min((w for w in (lo - 1, lo) if w >= 0),
               key=lambda w: abs(density_of(w) - density))
  return masks.local(n_q, n_k, window), f"local window={window}"


def _local(n_q, n_k, *, window=None, target_density=None):
  if target_density is not None:
    return _local_at_density(n_q, n_k, target_density)
  return masks.local(n_q, n_k, int(window)), f"local window={int(window)}"


def _global_local(n_q, n_k, *, num_global=1, window=None, target_density=None):
  if target_density is not None:
    return _closest((_global_local(n_q, n_k, num_global=num_global, window=w)
                     for w in range(max(n_q, n_k))), target_density)
  mask = masks.global_local(n_q, n_k, int(num_global), int(window))
  return mask, f"global_local num_global={int(num_global)} window={int(window)}"


def _strided(n_q, n_k, *, stride=None, target_density=None):
  if target_density is not None:
    return _closest((_strided(n_q, n_k, stride=s)
                     for s in range(1, max(n_q, n_k) + 1)), target_density)
  return masks.strided(n_q, n_k, int(stride)), f"strided stride={int(stride)}"


def _diagonal(n_q, n_k, *, num_diagonals=None, target_density=None):
  """`num_diagonals` block diagonals spread evenly over the whole mask
  (unlike `local`'s contiguous band)."""
  if target_density is not None:
    return _closest((_diagonal(n_q, n_k, num_diagonals=c)
                     for c in range(1, n_q + n_k)), target_density)
  offsets = sorted({int(round(o)) for o in
                    np.linspace(-(n_q - 1), n_k - 1, int(num_diagonals))})
  return (masks.diagonal(n_q, n_k, tuple(offsets)),
          f"diagonal {len(offsets)} offsets from {offsets[0]} to {offsets[-1]}")


def _random(n_q, n_k, *, density=None, target_density=None, seed=0,
            num_heads=1):
  """Blocks drawn independently with probability `density`; `num_heads` > 1:
  a pattern per head (`[1, H, nM, nN]`, H the case's heads)."""
  density = target_density if density is None else density
  heads = int(num_heads)
  return (masks.random(n_q, n_k, float(density), seed=int(seed), num_heads=heads),
          f"random p={float(density):.2f} seed={int(seed)}"
          + (f", per head ({heads})" if heads > 1 else ""))


PATTERNS = {
    "dense": lambda n_q, n_k: (masks.dense(n_q, n_k), "dense"),
    "local": _local,
    "global_local": _global_local,
    "strided": _strided,
    "diagonal": _diagonal,
    "random": _random,
}


def _token_window_blocks(case: Case) -> tuple[jax.Array, str]:
  left, right = case.token_window
  blocks = masks.from_predicate(
      lambda q, kv: (kv >= q - left) & (kv <= q + right), seq_len_q=case.seq_len_q,
      seq_len_kv=case.sk, block_size=(case.block_size, case.block_size))
  return blocks, f"token window ({left}, {right}), blocks touched"


def user_mask(case: Case) -> tuple[jax.Array, str]:
  """`[1, 1, nM, nN]` bool block mask at the case's block size, and its description."""
  if case.token_window is not None:
    return _token_window_blocks(case)
  n_q = masks.num_blocks(case.seq_len_q, case.block_size)
  n_k = masks.num_blocks(case.sk, case.block_size)
  return PATTERNS[case.pattern](n_q, n_k, **dict(case.pattern_args))


def _local_case(name, seq_len, density, **kw) -> Case:
  return Case(name, batch=kw.pop("batch", 2), seq_len_q=seq_len,
              heads=kw.pop("heads", 16), head_dim=kw.pop("head_dim", 128),
              pattern="local", pattern_args=(("target_density", density),), **kw)


def _block64_case(name, head_dim, causal=False) -> Case:
  """Every block (dense or causal) at 64-token blocks, B=2, S=8192, H=16."""
  return Case(name, batch=2, seq_len_q=8192, heads=16, head_dim=head_dim,
              block_size=64, causal=causal, backward=True, required=False)


def _random_heads_case(name, block_size, head_dim=128, **kw) -> Case:
  """Random blocks per head at density 0.1 (B=2, S=8192, H=16)."""
  return Case(name, batch=2, seq_len_q=8192, heads=16, head_dim=head_dim,
              block_size=block_size, pattern="random",
              pattern_args=(("density", 0.1), ("num_heads", 16)), **kw)


def _vit_case(name, seq_len, pattern, **pattern_args) -> Case:
  return Case(name, batch=32, seq_len_q=seq_len, heads=12, head_dim=64,
              pattern=pattern, pattern_args=tuple(pattern_args.items()))


BENCHMARK_CASES = [
    Case("dense_s8192_d128", batch=2, seq_len_q=8192, heads=16, head_dim=128,
         backward=True, group=DENSITY_SWEEP),
    _local_case("local_d0.1_s8192", 8192, 0.1, backward=True, group=DENSITY_SWEEP),
    Case("vit_b_s197", batch=256, seq_len_q=197, heads=12, head_dim=64, backward=True),
    # ViT-L/16 (16 heads of 64) at 384 and 512 px, dense.
    Case("vit_l_s577", batch=32, seq_len_q=577, heads=16, head_dim=64, backward=True),
    Case("vit_l_s1025", batch=16, seq_len_q=1025, heads=16, head_dim=64,
         backward=True),
    Case("dense_s8192_d64", batch=2, seq_len_q=8192, heads=16, head_dim=64,
         backward=True),
    _local_case("local_d0.1_s16384", 16384, 0.1),
    _vit_case("vit_global_local_s577", 577, "global_local", num_global=1, window=1),
    _vit_case("vit_global_local_s1025", 1025, "global_local", num_global=1, window=1),
    _vit_case("vit_strided_s577", 577, "strided", stride=2),
    _vit_case("vit_strided_s1025", 1025, "strided", stride=2),
    _local_case("long_local_d0.05_s65536", 65536, 0.05, batch=1),
    # A token window and the block band visiting the same 9 tiles per query tile.
    Case("window448_8k", batch=2, seq_len_q=8192, heads=16, head_dim=128,
         pattern=TOKEN_WINDOW, token_window=(448, 448), backward=True, required=False),
    Case("local4_8k", batch=2, seq_len_q=8192, heads=16, head_dim=128,
         pattern="local", pattern_args=(("window", 4),), backward=True,
         required=False),
    _local_case("local_d0.05_s8192", 8192, 0.05, group=DENSITY_SWEEP, required=False),
    _local_case("local_d0.25_s8192", 8192, 0.25, group=DENSITY_SWEEP, required=False),
    _local_case("local_d0.5_s8192", 8192, 0.5, group=DENSITY_SWEEP, required=False),
    Case("causal_s8192_d128", batch=2, seq_len_q=8192, heads=16, head_dim=128,
         causal=True, backward=True, required=False),
    Case("causal_s16384_d128", batch=1, seq_len_q=16384, heads=16, head_dim=128,
         causal=True, backward=True, required=False),
    # 64-token blocks (64x64 mask tiles: the Hopper forward of
    # `fwd_block64` and the Mosaic backward at 64x64 tiles) against the same
    # patterns at 128-token blocks; `--cases block64,block128`. Per-head random masks at
    # density 0.1 are the case it is for; dense, causal and a local band
    # (rows sharing their tiles) check it against the Triton forward (ours
    # with backend='triton' is timed next to it) where it should not lose.
    _random_heads_case("random_heads_d0.1_s8192_block64", 64, backward=True,
                       required=False),
    _random_heads_case("random_heads_d0.1_s8192_block128", 128, backward=True,
                       required=False),
    _random_heads_case("random_heads_d0.1_s8192_d64_block64", 64, head_dim=64,
                       backward=True, required=False),
    _random_heads_case("random_heads_d0.1_s8192_d64_block128", 128, head_dim=64,
                       backward=True, required=False),
    _block64_case("dense_s8192_d128_block64", 128),
    _block64_case("causal_s8192_d128_block64", 128, causal=True),
    _local_case("local_d0.1_s8192_block64", 8192, 0.1, block_size=64,
                backward=True, required=False),
    # D=64 at 64-token blocks: where the Triton forward at 64x64 tiles is
    # the 64-tile forward's closest rival.
    _block64_case("dense_s8192_d64_block64", 64),
    _block64_case("causal_s8192_d64_block64", 64, causal=True),
    _local_case("local_d0.1_s8192_d64_block64", 8192, 0.1, block_size=64,
                head_dim=64, backward=True, required=False),
]

TUNING_CASES = [
    Case("dense_s8192_d128", batch=2, seq_len_q=8192, heads=16, head_dim=128),
    _local_case("local_d0.1_s8192", 8192, 0.1),
    Case("dense_s8192_d64", batch=2, seq_len_q=8192, heads=16, head_dim=64),
    _local_case("local_d0.1_s8192_d64", 8192, 0.1, head_dim=64),
    Case("vit_b_s197", batch=256, seq_len_q=197, heads=12, head_dim=64),
]

_SMOKE = dict(batch=1, heads=2, head_dim=64, block_size=64)
SMOKE_CASES = [
    Case("smoke_dense", seq_len_q=256, backward=True, group=DENSITY_SWEEP, **_SMOKE),
    _local_case("smoke_local_d0.25", 256, 0.25, backward=True, group=DENSITY_SWEEP,
                **_SMOKE),
    Case("smoke_vit_global_local", batch=2, seq_len_q=200, heads=2, head_dim=32,
         block_size=64, pattern="global_local",
         pattern_args=(("num_global", 1), ("window", 0)), backward=True),
    Case("smoke_causal", seq_len_q=256, causal=True, required=False, **_SMOKE),
]

SMOKE_TUNING_CASES = [
    Case("smoke_tune_dense", batch=1, seq_len_q=256, heads=2, head_dim=64),
]


# ViT shapes (B, 12 heads of 64) with the batch holding about this many tokens.
SWEEP_TOKENS = 32768
SWEEP_BLOCK_SIZES = (64, 128, 256, 512)
SWEEP_SEQ_LENS = (197, 577, 1025, 4096)
SWEEP_PATTERNS = ("local", "global_local", "strided", "diagonal", "random")
SWEEP_DENSITIES = (0.05, 0.1, 0.25, 0.5)


def block_size_cases(block_sizes=SWEEP_BLOCK_SIZES, seq_lens=SWEEP_SEQ_LENS, *,
                     heads: int = 12, head_dim: int = 64,
                     tokens: int = SWEEP_TOKENS) -> list[Case]:
  """The ViT pattern (global + local: block 0 global, a band of one block on
  either side) at every user block size and length, forward only."""
  return [Case(f"block{b}_s{s}", batch=max(1, tokens // s), seq_len_q=s,
               heads=heads, head_dim=head_dim, block_size=b, pattern="global_local",
               pattern_args=(("num_global", 1), ("window", 1)),
               group=BLOCK_SIZE_SWEEP)
          for s in seq_lens for b in block_sizes]


def pattern_cases(patterns=SWEEP_PATTERNS, densities=SWEEP_DENSITIES, *,
                  seq_len: int = 4096, batch: int = 2, heads: int = 16,
                  head_dim: int = 128, block_size: int = 128) -> list[Case]:
  """Every pattern at every target density (forward), plus the dense mask
  (density 1.0) once."""
  common = dict(batch=batch, seq_len_q=seq_len, heads=heads, head_dim=head_dim,
                block_size=block_size, group=PATTERN_SWEEP)
  cases = [Case(f"dense_s{seq_len}", **common)]
  for pattern in patterns:
    for density in densities:
      cases.append(Case(f"{pattern}_d{density:g}_s{seq_len}", pattern=pattern,
                        pattern_args=(("target_density", density),), **common))
  return cases


def select(cases: list[Case], patterns: str | None) -> list[Case]:
  """Cases whose name matches one of the comma-separated globs or substrings."""
  if not patterns:
    return list(cases)
  wanted = [p.strip() for p in patterns.split(",") if p.strip()]
  return [c for c in cases
          if any(fnmatch.fnmatch(c.name, p) or p in c.name for p in wanted)]


def input_sets_for_l2(case: Case, l2_bytes: int, max_sets: int = 4) -> int:
  """How many input sets to rotate so one pass over them spans 2x the L2 cache."""
  itemsize = case.jnp_dtype.itemsize
  set_bytes = itemsize * case.batch * case.head_dim * (
      2 * case.seq_len_q * case.heads + 2 * case.sk * case.hkv)   # q, do, k, v
  return max(1, min(max_sets, math.ceil(2 * l2_bytes / set_bytes)))
