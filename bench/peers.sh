#!/usr/bin/env bash
# Ferry against llama.cpp on the same GGUF files (issue 13's peer benchmark; not CI).
#
#   bench/peers.sh build     # llama.cpp from the llama-cpp-python source distribution
#                            # (its vendor/llama.cpp), CPU only, native flags:
#                            # ~15 min on two cores, once, into $PEERS (default bench/work/peers)
#   bench/peers.sh ram [N]   # TinyLlama shape (MODEL=NAME: another catalog shape, such as
#                            # the mixture of experts test-moe), Q4_0 and Q8_0 (ferry synth --format gguf;
#                            # FORMATS="q4_0 q4_k": others),
#                            # everything in RAM, prompt 64, 32 tokens, batch 1 and 8,
#                            # N alternated rounds (default 3): tokens/s of each
#   bench/peers.sh versus [N] # the ram plans run by this build, by FERRY_BEFORE=PATH (another
#                            # build of ferry) and by llama.cpp, alternated, N rounds: decode
#                            # at batch 1 and 8, and the batch-1 prefill of the 64-token
#                            # prompt (Ferry: 64 / time to first token; llama-bench's pp64)
#   bench/peers.sh budget [N] # the same files under a memory budget of a third of the
#                            # file (root: llama.cpp in a cgroup-v1 memory limit, which
#                            # counts its page cache, mmap and no repacking; Ferry with
#                            # its plan's budget), page cache dropped before every run,
#                            # the disk's ceiling (a quick `ferry profile`'s best direct-
#                            # read rate) measured before and after each round, and each
#                            # Ferry run's decoding reads against it (the disk bound);
#                            # PROFILE=FILE tunes Ferry's plans with that measured profile
#                            # (`ferry profile --backend cpu`) instead of datasheet figures
#   bench/peers.sh experts [N] # a mixture of experts (MODEL=test-moe) under the same
#                            # budget: the tuned plan reading only the routed experts
#                            # against the same plan reading whole layers of experts
#                            # (`expert_reads: whole`), page cache dropped before every
#                            # run; the decoding steps' bytes read per token (a run's
#                            # requested bytes less a prefill-only run's) and the rate
#                            # they amount to over the decoding time, beside the file's
#                            # direct-I/O rate (`dd`) around each round
#
# Ferry's figure is its measured decode rate (1 / time per output token, batch
# sequences per step), with its default activations (8-bit, as llama.cpp) and with
# --activations f32; llama.cpp's is llama-bench's tg32 (batch 1) and
# llama-batched-bench's decode rate with 8 parallel sequences after a 64-token prompt.
# Both use every core. Needs: cmake (pip install cmake), a C++17 compiler, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS:-$PWD/bench/work/peers}
VERSION=0.3.36
FERRY=${FERRY:-$PWD/target/release/ferry}
MODEL=${MODEL:-tinyllama-1.1b}
STEM=${MODEL%-1.1b} # the files' names: tinyllama-q4_0.gguf, test-moe-q4_0.gguf
FORMATS=${FORMATS:-q4_0 q8_0} # the files' block formats (also q4_k, q6_k)
mkdir -p "$PEERS"

build() {
  local tarball="$PEERS/llama_cpp_python-$VERSION.tar.gz"
  if [ ! -f "$tarball" ]; then
    python3 - "$tarball" "$VERSION" <<'PY'
import json, sys, urllib.parse, urllib.request
out, version = sys.argv[1], sys.argv[2]
index = "https://pypi.org/pypi/llama-cpp-python/json"
project = json.load(urllib.request.urlopen(index))
files = project.get("releases", {}).get(version) or (project["urls"] if project["info"]["version"] == version else [])
sdist = [f for f in files if f["packagetype"] == "sdist"][0]
urllib.request.urlretrieve(urllib.parse.urljoin(index, sdist["url"]), out)
PY
  fi
  tar -xzf "$tarball" -C "$PEERS"
  local src="$PEERS/llama_cpp_python-$VERSION/vendor/llama.cpp"
  cmake -S "$src" -B "$PEERS/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF > "$PEERS/cmake.log"
  cmake --build "$PEERS/build" --target llama-bench llama-batched-bench -j "$(nproc)" > "$PEERS/build.log"
  ls "$PEERS/build/bin"
}

ferry_rate() { # model plan [run options] -> tokens/s (batch sequences per step / time per output token)
  "$FERRY" run --model-dir "$1" --plan "$2" "${@:3}" --json 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); m=d['metrics']; print(round(len(d['tokens'])*1e9/m['time_per_output_token_ns'],2))"
}

ferry_prefill() { # model plan -> prompt tokens/s of the prefill (batch · prompt / time to first token)
  "$FERRY" run --model-dir "$1" --plan "$2" --gen-len 1 --json 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); print(round(len(d['tokens'])*64e9/d['metrics']['time_to_first_token_ns'],2))"
}

prepare() { # builds Ferry and writes the GGUF files it does not find
  cargo build --release -q -p ferry
  for q in $FORMATS; do
    local file="$PEERS/$STEM-$q.gguf"
    [ -f "$file" ] || "$FERRY" synth --model "$MODEL" --format gguf --dtype $q --out "$file" > /dev/null
  done
}

ram_plans() { # builds Ferry, writes missing files, tunes the in-RAM plans (batch 1 and 8)
  prepare
  for q in $FORMATS; do
    for b in 1 8; do
      "$FERRY" tune --gpu cpu --device-mem 8GiB --host ferry-ci-vm --model "$PEERS/$STEM-$q.gguf" --batch $b \
        --prompt-len 64 --gen-len 32 --out "$PEERS/plan-$STEM-$q-b$b.yaml" --force > /dev/null
    done
  done
}

ram() {
  local rounds=${1:-3} bin="$PEERS/build/bin"
  ram_plans
  for round in $(seq "$rounds"); do
    for q in $FORMATS; do
      local file="$PEERS/$STEM-$q.gguf"
      local ferry1 ferry8 exact1 exact8 llama1 llama8
      ferry1=$(ferry_rate "$file" "$PEERS/plan-$STEM-$q-b1.yaml")
      exact1=$(ferry_rate "$file" "$PEERS/plan-$STEM-$q-b1.yaml" --activations f32)
      llama1=$("$bin/llama-bench" -m "$file" -p 0 -n 32 -r 1 -o json 2>/dev/null |
        python3 -c "import json,sys; print(round(json.load(sys.stdin)[0]['avg_ts'],2))")
      ferry8=$(ferry_rate "$file" "$PEERS/plan-$STEM-$q-b8.yaml")
      exact8=$(ferry_rate "$file" "$PEERS/plan-$STEM-$q-b8.yaml" --activations f32)
      llama8=$("$bin/llama-batched-bench" -m "$file" -c 2048 -b 512 -npp 64 -ntg 32 -npl 8 --output-format jsonl 2>/dev/null |
        python3 -c "import json,sys; print(round([json.loads(l) for l in sys.stdin if l.startswith('{')][-1]['speed_tg'],2))")
      echo "round $round $q: batch 1 ferry $ferry1 (f32 activations $exact1) llama.cpp $llama1 tokens/s;" \
        "batch 8 ferry $ferry8 (f32 activations $exact8) llama.cpp $llama8 tokens/s"
    done
  done
}

disk_rate() { # file -> GB/s of direct 8 MiB reads of it
  dd if="$1" of=/dev/null bs=8M iflag=direct 2>&1 | tail -1 |
    python3 -c "import re,sys; t=sys.stdin.read(); b=int(t.split()[0]); s=float(re.search(r'([0-9.]+) s,', t).group(1)); print(round(b/s/1e9,2))"
}

in_cgroup() { # limit-bytes command... : runs the command in a fresh memory cgroup (v1)
  local group=/sys/fs/cgroup/memory/ferry-peers
  [ -d "$group" ] || mkdir "$group"
  echo "$1" > "$group/memory.limit_in_bytes"
  shift
  bash -c 'echo $$ > '"$group"'/cgroup.procs && exec "$@"' bash "$@"
}

budget() {
  local rounds=${1:-3} bin="$PEERS/build/bin"
  prepare
  for q in $FORMATS; do
    local file="$PEERS/$STEM-$q.gguf"
    local third=$(( $(stat -c %s "$file") / 3 ))
    local hardware=(--gpu cpu --host ferry-ci-vm)
    [ -z "${PROFILE:-}" ] || hardware=(--profile "$PROFILE")
    for b in 1 8; do
      "$FERRY" tune "${hardware[@]}" --device-mem "$third" --model "$file" --batch $b --prompt-len 64 \
        --gen-len 32 --out "$PEERS/budget-$STEM-$q-b$b.yaml" --force > /dev/null
    done
  done
  for round in $(seq "$rounds"); do
    for q in $FORMATS; do
      local file="$PEERS/$STEM-$q.gguf" third
      third=$(( $(stat -c %s "$file") / 3 ))
      local before after llama1 llama8 ferry1 ferry8 prefill1 prefill8
      before=$(disk_ceiling)
      sync; echo 3 > /proc/sys/vm/drop_caches
      ferry1=$(ferry_figures "$file" "$PEERS/budget-$STEM-$q-b1.yaml")
      sync; echo 3 > /proc/sys/vm/drop_caches
      prefill1=$(ferry_figures "$file" "$PEERS/budget-$STEM-$q-b1.yaml" --gen-len 1)
      sync; echo 3 > /proc/sys/vm/drop_caches
      llama1=$(in_cgroup "$third" "$bin/llama-bench" -m "$file" -p 0 -n 32 -r 1 --repack 0 -lm mmap -o json 2>/dev/null |
        python3 -c "import json,sys; print(round(json.load(sys.stdin)[0]['avg_ts'],2))")
      sync; echo 3 > /proc/sys/vm/drop_caches
      ferry8=$(ferry_figures "$file" "$PEERS/budget-$STEM-$q-b8.yaml")
      sync; echo 3 > /proc/sys/vm/drop_caches
      prefill8=$(ferry_figures "$file" "$PEERS/budget-$STEM-$q-b8.yaml" --gen-len 1)
      sync; echo 3 > /proc/sys/vm/drop_caches
      llama8=$(in_cgroup "$third" "$bin/llama-batched-bench" -m "$file" -c 2048 -b 512 -npp 64 -ntg 32 -npl 8 -nr \
        --output-format jsonl 2>/dev/null |
        python3 -c "import json,sys; print(round([json.loads(l) for l in sys.stdin if l.startswith('{')][-1]['speed_tg'],2))")
      after=$(disk_ceiling)
      echo "round $round $q, budget $((third >> 20)) MiB; the disk's ceiling $before / $after GB/s"
      budget_line 1 "$llama1" "$before" "$after" $ferry1 $prefill1
      budget_line 8 "$llama8" "$before" "$after" $ferry8 $prefill8
    done
  done
}

disk_ceiling() { # -> GB/s: the best direct-read rate a quick `ferry profile` measures (the
  # engine's own read path, several requests in flight; `dd` keeps one in flight)
  local out; out=$(mktemp --suffix .yaml)
  "$FERRY" profile --backend cpu --quick --scratch-dir "$PEERS" --out "$out" --force > /dev/null 2>&1
  python3 -c "import sys,yaml; print(round(max(p['gbps'] for p in yaml.safe_load(open(sys.argv[1]))['disk_read']['points']),2))" "$out"
  rm -f "$out"
}

budget_line() { # batch llama-rate ceiling-before ceiling-after (run figures) (prefill-only figures)
  python3 - "$@" <<'PY'
import sys
batch, llama, before, after = int(sys.argv[1]), float(sys.argv[2] or 0), float(sys.argv[3]), float(sys.argv[4])
rate, total_bytes, tpot = float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
prefill_bytes = int(sys.argv[9])
if rate <= 0 or llama <= 0:
    print(f"  batch {batch}: a run failed (ferry {rate}, llama.cpp {llama} tokens/s)")
    sys.exit()
steps = 31  # decoding steps after the prefill's token
per_step = (total_bytes - prefill_bytes) / steps
ceiling = max(before, after)
# The disk bound: a step's reads at the ceiling, nothing else.
bound = ceiling * 1e9 / per_step * batch if per_step > 0 else float("inf")
print(f"  batch {batch}: ferry {rate} tokens/s ({rate / llama:.2f}x llama.cpp's {llama}), "
      f"reads {per_step / 2**20:.1f} MiB per step at {per_step / tpot:.2f} GB/s over the decoding time: "
      f"{rate / bound:.0%} of the disk bound ({bound:.2f} tokens/s at {ceiling} GB/s)")
PY
}

ferry_figures() { # model plan [run options] -> "tokens/s requested-bytes ns-per-token" ("0 0 0": the run failed)
  { "$FERRY" run --model-dir "$1" --plan "$2" "${@:3}" --json 2>/dev/null || true; } |
    python3 -c "
import json, sys
try:
    d = json.load(sys.stdin)
except ValueError:
    print(0, 0, 0)
    sys.exit()
m = d['metrics']; t = m['time_per_output_token_ns']
print(round(len(d['tokens'])*1e9/t,2) if t else 0, d['requested_read_bytes'], t)"
}

experts() {
  local rounds=${1:-3}
  prepare
  for q in $FORMATS; do
    local file="$PEERS/$STEM-$q.gguf"
    local third=$(( $(stat -c %s "$file") / 3 ))
    for b in 1 8; do
      local plan="$PEERS/experts-$STEM-$q-b$b.yaml"
      "$FERRY" tune --gpu cpu --host ferry-ci-vm --device-mem "$third" --model "$file" --batch $b --prompt-len 64 \
        --gen-len 32 --out "$plan" --force > /dev/null 2>&1
      grep -q "^  expert_reads: whole" "$plan" && { echo "the tuner chose whole reads for $plan"; exit 1; }
      # Whole layers read every expert: the kept and read-ahead experts go with them.
      sed -e 's/^  compute_host_layers_on_host: \(.*\)$/  compute_host_layers_on_host: \1\n  expert_reads: whole/' \
        -e '/^  hot_experts:/d' -e '/^  prefetched_experts:/d' "$plan" \
        > "$PEERS/experts-$STEM-$q-b$b-whole.yaml"
    done
  done
  for round in $(seq "$rounds"); do
    for q in $FORMATS; do
      local file="$PEERS/$STEM-$q.gguf" rate
      rate=$(disk_rate "$file")
      for b in 1 8; do
        local plan="$PEERS/experts-$STEM-$q-b$b.yaml" routed whole prefill
        sync; echo 3 > /proc/sys/vm/drop_caches
        routed=$(ferry_figures "$file" "$plan")
        sync; echo 3 > /proc/sys/vm/drop_caches
        whole=$(ferry_figures "$file" "${plan%.yaml}-whole.yaml")
        sync; echo 3 > /proc/sys/vm/drop_caches
        prefill=$(ferry_figures "$file" "$plan" --gen-len 1)
        python3 - "$q" "$b" "$rate" $routed $whole $prefill <<'PY'
import sys
q, b, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
routed_ts, routed_bytes, routed_tpot = float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
whole_ts, whole_bytes = float(sys.argv[7]), int(sys.argv[8])
prefill_bytes = int(sys.argv[11])
steps = 31  # decoding steps after the prefill's token
per_step = (routed_bytes - prefill_bytes) / steps
achieved = per_step / routed_tpot  # bytes per ns = GB/s while decoding, reads and compute together
# The same plan reading whole layers can need more memory than the budget holds.
whole = (f"whole {whole_ts} tokens/s ({routed_ts / whole_ts:.2f}x)" if whole_ts else "whole reads do not fit the budget")
whole_reads = f"{(whole_bytes - prefill_bytes) / steps / b / 2**20:.2f}" if whole_ts else "-"
print(f"{q} batch {b}: routed {routed_ts} tokens/s, {whole}; "
      f"decoding reads {per_step / b / 2**20:.2f} MiB per token (whole: {whole_reads}), "
      f"{achieved:.2f} GB/s over the decoding time (dd before the round: {rate} GB/s)")
PY
      done
    done
    echo "round $round done; disk after: $(disk_rate "$PEERS/$STEM-q4_0.gguf") GB/s"
  done
}

versus() { # the ram plans run by Ferry, by FERRY_BEFORE (another build) and by llama.cpp, alternated
  local rounds=${1:-3} bin="$PEERS/build/bin" before=${FERRY_BEFORE:?FERRY_BEFORE=path of the other ferry binary}
  ram_plans
  for round in $(seq "$rounds"); do
    for q in $FORMATS; do
      local file="$PEERS/$STEM-$q.gguf" now earlier llama
      for b in 1 8; do
        now=$(ferry_rate "$file" "$PEERS/plan-$STEM-$q-b$b.yaml")
        earlier=$(FERRY=$before ferry_rate "$file" "$PEERS/plan-$STEM-$q-b$b.yaml")
        if [ $b = 1 ]; then
          llama=$("$bin/llama-bench" -m "$file" -p 0 -n 32 -r 1 -o json 2>/dev/null |
            python3 -c "import json,sys; print(round(json.load(sys.stdin)[0]['avg_ts'],2))")
        else
          llama=$("$bin/llama-batched-bench" -m "$file" -c 2048 -b 512 -npp 64 -ntg 32 -npl 8 --output-format jsonl 2>/dev/null |
            python3 -c "import json,sys; print(round([json.loads(l) for l in sys.stdin if l.startswith('{')][-1]['speed_tg'],2))")
        fi
        echo "round $round $q b$b: ferry $now, before $earlier, llama.cpp $llama tokens/s"
      done
      now=$(ferry_prefill "$file" "$PEERS/plan-$STEM-$q-b1.yaml")
      earlier=$(FERRY=$before ferry_prefill "$file" "$PEERS/plan-$STEM-$q-b1.yaml")
      llama=$("$bin/llama-bench" -m "$file" -p 64 -n 0 -r 1 -o json 2>/dev/null |
        python3 -c "import json,sys; print(round(json.load(sys.stdin)[0]['avg_ts'],2))")
      echo "round $round $q prefill 64: ferry $now, before $earlier, llama.cpp $llama tokens/s"
    done
  done
}

case "${1:-}" in
  build) build ;;
  ram) ram "${2:-3}" ;;
  versus) versus "${2:-3}" ;;
  budget) budget "${2:-3}" ;;
  experts) experts "${2:-3}" ;;
  *) sed -n '2,34p' "$0"; exit 2 ;;
esac
