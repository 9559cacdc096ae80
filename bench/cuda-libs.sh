# Sourced by bench/gpu-check.sh and bench/gpu-lease.sh: cudarc (built for CUDA 12.8)
# looks for libcublas.so, libcublas.so.12, ...; a machine with only CUDA 13's libraries
# (libcublas.so.13, as on the H200 machines lent here) gets unversioned links to the
# newest ones found, in a folder put first on LD_LIBRARY_PATH. The driver API and
# cuBLAS keep their CUDA 12 entry points, so Ferry runs against them unchanged.
links=/tmp/ferry-cuda-libs
mkdir -p "$links"
dirs=""
for lib in cublas cublasLt nvrtc; do
  found=$(timeout 60 find /usr/local /opt /usr/lib /usr/lib64 -name "lib$lib.so*" \( -type f -o -type l \) 2>/dev/null \
    | grep -v stub | sort -V | tail -1 || true)
  echo "lib$lib: ${found:-not found}"
  if [[ -n "$found" ]]; then
    ln -sf "$(readlink -f "$found")" "$links/lib$lib.so"
    dirs="$dirs:$(dirname "$(readlink -f "$found")")"
  fi
done
export LD_LIBRARY_PATH="$links$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
