#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels the GPU machine lacks for the
# tokamax peers. That machine (Python 3.12, x86-64, jax 0.11.2, no internet)
# already has absl-py, flax, jax, jaxtyping, numpy, opt-einsum, packaging,
# protobuf, tqdm and typing-extensions; tokamax's xprof import is served by
# benchmarks/stubs/xprof. Pins are kept low where a newer release would demand
# a newer typing-extensions than the image may have: pydantic 2.14 needs 4.16,
# typing-inspection 0.4.3 needs 4.15; these need 4.14.1 and 4.12.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(
  tokamax==0.0.17          # needs jax>=0.11.1
  einshape==1.0
  qwix==0.1.8
  immutabledict==4.3.1
  tensorboardx==2.6.5
  pydantic==2.12.5
  pydantic-core==2.41.5
  annotated-types==0.8.0
  typing-inspection==0.4.2
)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${wheels[@]}"
du -sh .whl
