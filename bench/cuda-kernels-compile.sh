#!/usr/bin/env bash
# Checks the cuda backend's kernels (engine/src/backend/cuda/kernels.cu) without a GPU
# or a CUDA toolkit; needs clang (apt-get install clang). Not part of CI.
#   1. compiles kernels.cu to PTX for sm_70, sm_80 and sm_86 with clang's CUDA front end
#      (-nocudainc -nocudalib; bench/cuda-kernels/ptx-prelude.h stands in for what
#      NVRTC provides built in), warnings as errors: the source is valid CUDA C++;
#   2. compiles it for the CPU (bench/cuda-kernels/host.cpp) and runs the engine's
#      emulation tests (engine/src/backend/cuda/emulated.rs): the backend's own
#      launches against the cpu kernels, dtype conversions bit for bit.
# What it cannot check: NVRTC itself, the GPU's math library, cuBLAS (bench/gpu-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
work=bench/work/cuda-kernels
mkdir -p "$work"
src=engine/src/backend/cuda/kernels.cu
clang=${CLANG:-clang++}

# clang 14 knows architectures up to sm_86; NVRTC compiles for the actual GPU at run time.
for arch in sm_70 sm_80 sm_86; do
  "$clang" -x cuda --cuda-device-only --cuda-gpu-arch=$arch -nocudainc -nocudalib -O2 -ffp-contract=off \
    -Wall -Wextra -Werror -include bench/cuda-kernels/ptx-prelude.h -S "$src" -o "$work/kernels-$arch.ptx"
  entries=$(grep -c '^\.visible \.entry' "$work/kernels-$arch.ptx")
  echo "PTX for $arch: $entries kernels ($work/kernels-$arch.ptx)"
done

"$clang" -std=c++20 -O1 -ffp-contract=off -Wall -Wextra -Werror -Wno-unused-function -shared -fPIC -pthread \
  bench/cuda-kernels/host.cpp -o "$work/libferry_kernels_host.so"
echo "host build: $work/libferry_kernels_host.so"
FERRY_CUDA_HOST_KERNELS="$PWD/$work/libferry_kernels_host.so" \
  cargo test -q -p ferry-engine --features cuda --lib backend::cuda::emulated -- --test-threads 1
