#!/usr/bin/env bash
# The cuda backend on a machine with an NVIDIA GPU, in one go (nothing here runs in CI):
#   1. the engine's cuda-vs-cpu test (engine/tests/cuda_backend.rs) with FERRY_REQUIRE_GPU=1,
#      so a GPU that fails to open is a failure rather than a skip: f32/bf16/f16 weights,
#      GPU-resident, disk-streamed and discrete-GPU plans (host attention, copies both
#      ways), bf16/f16 KV; identical tokens, logits within 1e-4 of the largest;
#   2. `ferry run --backend cuda` against `--backend cpu` on the same plan for a
#      synthesized test-small (f32 and bf16): identical tokens, both timings printed;
#   3. `ferry profile --backend cuda --quick` (the profiler's GEMMs and copies).
# Needs: the NVIDIA driver, cuBLAS and NVRTC of CUDA 12 or 13 (found under /usr/local,
# /opt or /usr/lib by bench/cuda-libs.sh, or on LD_LIBRARY_PATH), python3.
#
# Where the GPU machine cannot build (no crates offline), build here and pass the binaries:
#   FERRY=path/to/ferry CUDA_TEST=path/to/cuda_backend-<hash> bench/gpu-check.sh
# (cargo test --release -p ferry-engine --features cuda --test cuda_backend --no-run
# prints the test binary's path). Output and logs go to bench/work/gpu-check/.
set -euo pipefail
cd "$(dirname "$0")/.."
work=bench/work/gpu-check
rm -rf "$work" && mkdir -p "$work"
status=0

echo "== the machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "(no nvidia-smi)"
echo "== CUDA libraries"
source bench/cuda-libs.sh

echo "== 1. engine test: cuda backend vs cpu backend"
if [[ -n "${CUDA_TEST:-}" ]]; then
  FERRY_REQUIRE_GPU=1 "$CUDA_TEST" --nocapture --test-threads 1 || status=1
else
  FERRY_REQUIRE_GPU=1 cargo test --release -q -p ferry-engine --features cuda --test cuda_backend \
    -- --nocapture --test-threads 1 || status=1
fi

if [[ -z "${FERRY:-}" ]]; then
  cargo build --release -q -p ferry
  FERRY=target/release/ferry
fi

echo "== 2. ferry run --backend cuda vs --backend cpu"
compare() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
cpu, cuda = (json.load(open(p)) for p in sys.argv[1:3])
same = cpu["tokens"] == cuda["tokens"]
rate = lambda r: f'{r["metrics"]["tokens_per_s"]:.1f} tok/s, {r["metrics"]["total_ns"] / 1e6:.0f} ms'
print(f"   tokens identical: {same}; cpu {rate(cpu)}; cuda {rate(cuda)}")
if not same:
    for s, (a, b) in enumerate(zip(cpu["tokens"], cuda["tokens"])):
        if a != b:
            first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            print(f"   sequence {s} differs from token {first}: cpu {a[first:first+4]} cuda {b[first:first+4]}")
sys.exit(0 if same else 1)
EOF
}
for dtype in f32 bf16; do
  model="$work/small-$dtype"
  "$FERRY" synth --model test-small --dtype "$dtype" --out "$model" --force >/dev/null
  "$FERRY" tune --gpu cpu --host ferry-ci-vm --device-mem 256MiB --model "$model" --prompt-len 32 --gen-len 16 \
    --batch 4 --out "$work/plan-$dtype.yaml" --force >/dev/null
  ran=0
  for backend in cpu cuda; do
    # The cuda backend's numerics are f32 activations over widened weights: the cpu
    # backend's --activations f32 (its default rounds x to bf16 over bf16 weights).
    numerics=(); [[ $backend == cpu ]] && numerics=(--activations f32)
    if "$FERRY" run --model-dir "$model" --plan "$work/plan-$dtype.yaml" --backend "$backend" "${numerics[@]}" --json \
      --trace "$work/trace-$dtype-$backend.json" --force >"$work/run-$dtype-$backend.json" \
      2>"$work/run-$dtype-$backend.log"; then
      ran=$((ran + 1))
    else
      echo "   test-small $dtype on $backend failed:"; sed 's/^/     /' "$work/run-$dtype-$backend.log"; status=1
    fi
  done
  if [[ $ran == 2 ]]; then
    echo "  test-small $dtype:"
    compare "$work/run-$dtype-cpu.json" "$work/run-$dtype-cuda.json" || status=1
  fi
done

echo "== 3. ferry profile --backend cuda --quick"
"$FERRY" profile --backend cuda --quick --model "$work/small-f32" --scratch-dir "$work" \
  --out "$work/profile-cuda.yaml" --force || status=1

echo "== done: $([[ $status == 0 ]] && echo PASS || echo FAIL) (logs in $work)"
exit $status
