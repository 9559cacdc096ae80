#!/usr/bin/env bash
# Speculative decoding against the same target without it, side by side: TinyLlama's
# shape in bf16 streamed from disk under a RAM budget, a self-speculating draft of its
# first layer. Random weights make acceptance meaningless unless the pair agrees for a
# reason, so the model is synthesized with its later layers damped (their o_proj and
# down_proj scaled by DAMPING): they perturb what the first layer computes. Every
# figure is printed beside the acceptance rate the run measured. Predictions use the
# disk's read rate re-measured around each run (`ferry run --recheck-disk`).
#
# Usage: bench/speculation.sh [rounds] [budget] [batch]   (defaults: 3 512MiB 1)
# Env: DAMPING (0.05), PROMPT (64), GEN (64), DRAFT (1: layers of the draft).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
budget=${2:-512MiB}
batch=${3:-1}
damping=${DAMPING:-0.05}
prompt=${PROMPT:-64}
gen=${GEN:-64}
draft=${DRAFT:-1}
work=bench/work/speculation
mkdir -p "$work"
cargo build --release -q -p ferry
bin=$PWD/target/release/ferry
model=$work/tl-damped-$damping
if [ ! -f "$model/config.json" ]; then
  "$bin" synth --model tinyllama-1.1b --dtype bf16 --out "$model" --damp-from "$draft" --damping "$damping"
fi
profile=$work/profile.yaml
if [ ! -f "$profile" ]; then
  "$bin" profile --backend cpu --quick --model "$model" --scratch-dir "$work" --out "$profile"
fi
common=(--profile "$profile" --model "$model" --device-mem "$budget" --batch "$batch" --prompt-len "$prompt" --gen-len "$gen")
"$bin" tune "${common[@]}" --out "$work/plain.yaml" --force > /dev/null
# The search needs an acceptance rate: a first run measures it on the one-token-draft
# plan, and the plan is tuned again at the rate measured.
"$bin" tune "${common[@]}" --draft "self:$draft" --acceptance 0.5 --out "$work/spec.yaml" --force > /dev/null
if ! grep -q speculation: "$work/spec.yaml"; then
  echo "at α = 0.5 the tuner keeps no draft; measuring with draft length 4" >&2
  "$bin" tune "${common[@]}" --draft "self:$draft" --draft-len 4 --acceptance 0.99 --out "$work/spec.yaml" --force > /dev/null
fi
alpha=$("$bin" run --model-dir "$model" --plan "$work/spec.yaml" --scratch-dir "$work" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["speculation"]["acceptance_rate"])')
echo "acceptance measured on the first plan: $alpha"
"$bin" tune "${common[@]}" --draft "self:$draft" --acceptance "$alpha" --out "$work/spec.yaml" --force | tail -14
python3 - "$bin" "$model" "$work" "$rounds" <<'PY'
import json, subprocess, sys, statistics
binary, model, work, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def run(plan):
    out = subprocess.run([binary, "run", "--model-dir", model, "--plan", f"{work}/{plan}.yaml", "--scratch-dir", work, "--json", "--recheck-disk"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)
results = {"plain": [], "spec": []}
for _ in range(rounds):
    for plan in ("plain", "spec"):
        results[plan].append(run(plan))
# Each plan's runs must agree among themselves (the engine is deterministic), and the
# speculative plan's tokens must be those of the same plan decoding plainly: the
# verification takes plain decoding's kernels (ARCHITECTURE, invariants). Against the
# tuned plain plan they can differ only where its micro-batching gives the prefill
# other kernels (another summation order at a near-tie).
for plan, rs in results.items():
    assert all(r["tokens"] == rs[0]["tokens"] for r in rs), f"{plan}: runs of one plan differ"
text = open(f"{work}/spec.yaml").read()
start, end = text.index("  speculation:"), text.index("predicted:")
with open(f"{work}/spec-plainly.yaml", "w") as f:
    f.write(text[:start] + text[end:])
plainly = run("spec-plainly")["tokens"]
reference, speculated = results["plain"][0]["tokens"], results["spec"][0]["tokens"]
assert plainly == speculated, "speculation changed the tokens of its own plan decoding plainly"
differing = [(s, next(i for i, (x, y) in enumerate(zip(a, b)) if x != y))
             for s, (a, b) in enumerate(zip(reference, speculated)) if a != b]
same = "tokens identical to the same plan decoding plainly" + (
    ", and to the plain plan's" if not differing else
    f"; the plain plan's differ in {len(differing)} of {len(reference)} sequences (sequence, first token: "
    f"{differing}), its prefill micro-batched otherwise")
plain = statistics.median(r["metrics"]["tokens_per_s"] for r in results["plain"])
spec = statistics.median(r["metrics"]["tokens_per_s"] for r in results["spec"])
alphas = [r["speculation"]["acceptance_rate"] for r in results["spec"]]
per_round = [r["speculation"]["tokens_per_round"] for r in results["spec"]]
pred_plain = statistics.median(r["predicted_tokens_per_s"] for r in results["plain"])
pred_spec = statistics.median(r["predicted_tokens_per_s_at_measured_acceptance"] for r in results["spec"])
plan = open(f"{work}/spec.yaml").read()
k = int(plan.split("draft_len: ")[1].split()[0])
a = statistics.median(alphas)
formula = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
factors = [r["disk_factor"] for rs in results.values() for r in rs]
print(f"rounds: {rounds}, alternated; {same}; disk at {min(factors):.2f}–{max(factors):.2f}× the profile's rate around the runs (predictions use it)")
print(f"without a draft: {plain:.3f} tok/s measured, {pred_plain:.3f} predicted ({(pred_plain/plain-1)*100:+.1f} %)")
print(f"self-speculation (draft {k} tokens): {spec:.3f} tok/s measured, {pred_spec:.3f} predicted at the measured α ({(pred_spec/spec-1)*100:+.1f} %)")
print(f"measured α {min(alphas):.3f}–{max(alphas):.3f} (median {a:.3f}); tokens per round {statistics.median(per_round):.2f} measured, {formula:.2f} by the formula")
print(f"speed-up {spec/plain:.2f}× measured, {pred_spec/pred_plain:.2f}× predicted")
PY
