#!/usr/bin/env bash
# Wall time of `ferry tune --gpu rtx3060 --model 13b` in a release build, with the
# search's candidate counts. Usage: bench/tune.sh [runs]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-15}
cargo build --release -q -p ferry
bin=target/release/ferry
"$bin" tune --gpu rtx3060 --model 13b --json 2>/dev/null > /tmp/ferry-tune-bench.json
python3 - "$bin" "$runs" <<'PY'
import json, subprocess, sys, time, statistics
binary, runs = sys.argv[1], int(sys.argv[2])
times = []
for _ in range(runs):
    start = time.perf_counter()
    subprocess.run([binary, "tune", "--gpu", "rtx3060", "--model", "13b"], check=True, capture_output=True)
    times.append(time.perf_counter() - start)
search = json.load(open("/tmp/ferry-tune-bench.json"))
stats = search["search"]
print(f"runs: {runs}; wall time median {statistics.median(times):.3f} s, min {min(times):.3f} s, max {max(times):.3f} s")
print(f"search only (inside the process): {search['search_seconds']:.3f} s")
print("candidates: " + ", ".join(f"{k} {v:,}" for k, v in stats.items()))
print(f"best: {search['metrics']['tokens_per_s']:.2f} tokens/s predicted")
PY
