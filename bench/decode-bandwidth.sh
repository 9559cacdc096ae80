#!/usr/bin/env bash
# Batch-1 decoding from RAM against the memory's read rate, alternated in one run
# (issue 12's goal: decoding at >= 80 % of the measured memory bandwidth).
#
#   bench/decode-bandwidth.sh MODEL_DIR PLAN [ROUNDS]
#
# Each round measures the memory's read rate (`ferry profile --quick`, its "memory's
# read rate"), then runs PLAN (a resident batch-1 plan) and takes its time per output
# token; the bytes a decoding step reads are every layer's weights and the head
# (`ferry show model`'s "all N layers" + "final norm + head" in the plan's format).
set -euo pipefail
model=${1:?model folder}; plan=${2:?resident batch-1 plan}; rounds=${3:-3}
bin=${FERRY:-target/release/ferry}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
step_bytes=$(python3 - "$model" <<'PY'
import json, sys, os
# Bytes of every tensor but the embedding table, from the safetensors headers.
folder = sys.argv[1]; total = 0
for name in sorted(os.listdir(folder)):
    if not name.endswith(".safetensors"): continue
    with open(os.path.join(folder, name), "rb") as f:
        n = int.from_bytes(f.read(8), "little"); header = json.loads(f.read(n))
    for key, t in header.items():
        if key == "__metadata__" or "embed_tokens" in key: continue
        total += t["data_offsets"][1] - t["data_offsets"][0]
print(total)
PY
)
echo "bytes per decoding step: $step_bytes"
for round in $(seq "$rounds"); do
  read_gbps=$("$bin" profile --backend cpu --quick --scratch-dir "$work" --out "$work/p.yaml" --force 2>/dev/null \
    | sed -n 's/.*memory.s read rate (\([0-9.]*\) GB\/s).*/\1/p')
  tpot_ns=$("$bin" run --model-dir "$model" --plan "$plan" --json 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["metrics"]["time_per_output_token_ns"])')
  python3 -c "
b, t, r = $step_bytes, $tpot_ns, $read_gbps
d = b / t
print(f'round $round: memory read {r:.2f} GB/s; decoding {t/1e6:.1f} ms per token = {d:.2f} GB/s = {d/r*100:.0f} % of the read rate')"
done
