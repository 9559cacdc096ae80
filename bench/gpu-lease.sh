#!/usr/bin/env bash
# One short lease of a GPU machine that cannot build Ferry (no crates there): binaries
# built elsewhere, then the checks in order of value, each under its own time limit, so
# that a failure early on still leaves the later figures.
#   1. bench/gpu-check.sh: cuda vs cpu engine test, `ferry run` both backends, quick profile;
#   2. `ferry profile --backend cuda --quick` with the kernel table of MODEL's shape;
#   3. `ferry validate --backend cuda` on MODEL with that profile (predicted vs measured).
# Build first, here: `bench/gpu-lease.sh --build` puts ferry and the engine's cuda test
# binary in .gpu/ (git-ignored). On the GPU machine: `bench/gpu-lease.sh` (LEASE_OUT=folder
# for the results; default bench/work/gpu-lease). MODEL is a catalog model synthesized
# there (default tinyllama-1.1b, bf16); PLANS how many plans validate runs (default 6);
# SKIP_CHECK=1 leaves out step 1, TEST_ONLY=1 runs only its engine test; PROFILE=file
# validates with that profile instead of measuring one.
# CUDA 13's libraries are linked under the names cudarc looks for (bench/cuda-libs.sh).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--build" ]]; then
  set -e
  cargo build --release -q -p ferry
  test_bin=$(cargo test --release -q -p ferry-engine --features cuda --test cuda_backend --no-run \
    --message-format=json 2>/dev/null | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda_backend" and m.get("executable"):
        print(m["executable"])')
  mkdir -p .gpu
  cp target/release/ferry .gpu/ferry
  cp "$test_bin" .gpu/cuda_backend
  ls -la .gpu
  exit 0
fi

out=${LEASE_OUT:-bench/work/gpu-lease}
model=${MODEL:-tinyllama-1.1b}
plans=${PLANS:-6}
mkdir -p "$out"
ferry=$PWD/.gpu/ferry
work=bench/work/gpu-lease-models
mkdir -p "$work"
step() { echo; echo "== $* ($(date +%T))"; }

step "the machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,pcie.link.gen.current,pcie.link.width.current \
  --format=csv || echo "(no nvidia-smi)"
echo "cpus $(nproc); $(free -g | awk '/Mem:/ {print $2 " GiB RAM"}'); disk: $(df -h . | tail -1)"
lsblk -d -o NAME,SIZE,ROTA,MODEL 2>/dev/null | head -5

step "CUDA libraries"
source bench/cuda-libs.sh
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

if [[ -n "${TEST_ONLY:-}" ]]; then
  step "1. the engine's cuda test only"
  FERRY_REQUIRE_GPU=1 timeout 120 .gpu/cuda_backend --test-threads 1 2>&1 | tee "$out/cuda-test.log" | tail -25
elif [[ -z "${SKIP_CHECK:-}" ]]; then
  step "1. bench/gpu-check.sh"
  FERRY=$ferry CUDA_TEST=$PWD/.gpu/cuda_backend timeout 150 bench/gpu-check.sh 2>&1 | tee "$out/gpu-check.log"
  cp bench/work/gpu-check/*.yaml bench/work/gpu-check/*.json bench/work/gpu-check/*.log "$out/" 2>/dev/null
fi

"$ferry" synth --model "$model" --dtype bf16 --out "$work/$model" --force | tail -2
if [[ -n "${PROFILE:-}" ]]; then
  step "2. the profile given: $PROFILE"
  cp "$PROFILE" "$out/profile-cuda-$model.yaml"
else
  step "2. ferry profile --backend cuda --quick --model $model"
  timeout 150 "$ferry" profile --backend cuda --quick --model "$work/$model" --scratch-dir "$work" \
    --out "$out/profile-cuda-$model.yaml" --force 2>&1 | tee "$out/profile.log"
fi

step "3. ferry validate --backend cuda on $model, $plans plans"
if [[ -f "$out/profile-cuda-$model.yaml" ]]; then
  timeout 180 "$ferry" validate --backend cuda --model-dir "$work/$model" --profile "$out/profile-cuda-$model.yaml" \
    --plans "$plans" --report "$out/validation" --json --force >"$out/validation.json" 2>"$out/validation.log"
  echo "validate exit $?"
  tail -20 "$out/validation.log"
  python3 - "$out/validation.json" <<'EOF'
import json, sys
try:
    v = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no validation result: {e}")
for p in v.get("plans", []):
    print(f"{p['predicted_tokens_per_s']:8.2f} predicted {p['measured_tokens_per_s']:8.2f} measured {p['signed_error_pct']:+7.1f}% {p['replayed_error_pct']:+6.1f}% replayed  {p['plan']}")
    rates = ", ".join(f"{json.dumps(r)} {x:.2f}" for r, x in p["achieved_rates"])
    print(f"          achieved/profile: {rates}")
print({k: v[k] for k in v if k != "plans"})
EOF
fi
step "done"
