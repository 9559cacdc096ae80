#!/usr/bin/env python3
"""Two-stage plans over TCP, predicted against measured.

Each plan runs as two `ferry` processes (the head and a stage worker it starts) joined
over loopback, each with its own memory budget and one compute thread, so the pair
stands for two one-core machines. The link is loopback as it is, or shaped with `tc`
(a token bucket on `lo`: needs root) to 1 Gbit/s or 100 Mbit/s. For every link the
machine is profiled once (`ferry profile --quick --as-nodes 2`, which measures that
link between two processes), then two sets of plans run (`ferry run --json`) beside
their prediction, with the disk's read rate re-measured around each run
(`--recheck-disk`: this machine's disk drifts by tens of percent):

- resident: every stage's weights and KV cache in its budget, the layers split 3/7,
  5/5 and 7/3, batches 4 and 8 (two micro-batches), prompts 32 and 96;
- tuned: `ferry tune` over budgets (equal and unequal), batches and prompts; these
  stream weights or KV from disk when the budget is small, and both processes read
  the same disk here (two machines would each have their own), so they are reported
  apart.

Usage: bench/stages.py [--links none,1gbit,100mbit] [--rounds 1]
Writes bench/work/stages/results.json and prints a table and the error statistics.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "bench", "work", "stages")
BIN = os.path.join(ROOT, "target", "release", "ferry")
MODEL = "test-small"
# (device 0 budget, device 1 budget): equal budgets split evenly, unequal ones not.
BUDGETS = [("128MiB", "128MiB"), ("64MiB", "64MiB"), ("128MiB", "48MiB")]
BATCHES = [4, 8]
PROMPTS = [32, 96]
GEN = 16


def run(args, **kw):
    return subprocess.run(args, check=True, text=True, capture_output=True, **kw)


def shape(link):
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
    if link != "none":
        # The bucket must hold a whole loopback packet (64 KiB) or tbf drops it.
        run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", link, "burst", "256kb", "latency", "200ms"])


def profile_for(link):
    path = os.path.join(WORK, f"two-{link}.yaml")
    run([BIN, "profile", "--backend", "cpu", "--quick", "--model", MODEL, "--as-nodes", "2",
         "--scratch-dir", WORK, "--out", path, "--force"], cwd=WORK)
    return path


def with_budgets(profile, budgets, link):
    """The profile with each device's memory set (the plan keeps them)."""
    text = open(profile).read()
    path = os.path.join(WORK, f"two-{link}-{budgets[0]}-{budgets[1]}.yaml")
    out, device = [], 0
    for line in text.splitlines():
        if line.strip().startswith("memory_bytes:") and out and out[-1].strip().startswith("- host:"):
            line = line.split("memory_bytes:")[0] + f"memory_bytes: {budgets[device]}"
            device += 1
        out.append(line)
    if device != 2:
        sys.exit(f"{profile}: expected two devices, found {device}")
    open(path, "w").write("\n".join(out) + "\n")
    return path


SPLITS = [[3, 7], [5, 5], [7, 3]]


def resident_plan(model, profile, layers, batch, prompt):
    """Every stage's weights and KV cache on its device, two micro-batches."""
    stages = "".join(
        f"    - {{device: {d}, attention_weights: {{device: {n}, host: 0, disk: 0}}, "
        f"mlp_weights: {{device: {n}, host: 0, disk: 0}}, kv_cache: {{device: {n}, host: 0, disk: 0}}}}\n"
        for d, n in enumerate(layers))
    return f"""models: {{target: {model}}}
hardware: {{profile: {profile}, device_memory: 192MiB}}
workload: {{batch_size: {batch}, prompt_len: {prompt}, gen_len: {GEN}}}
policy:
  schedule: layer-prefetch
  micro_batch_size: {batch // 2}
  num_micro_batches: 2
  prefetch_depth: 1
  embeddings: device
  head: device
  host_attention: false
  weight_format: bf16
  kv_dtype: f16
  chunk_bytes: 64MiB
  copy_streams: 1
  io_queue_depth: 8
  pinned_host_bytes: 0
  stages:
{stages}"""


def measure(plan, model, kind, link, budgets, batch, prompt, layers, rounds):
    rows = []
    for _ in range(rounds):
        out = json.loads(run([BIN, "run", "--model-dir", model, "--plan", plan, "--json", "--recheck-disk"]).stdout)
        measured, predicted = out["metrics"]["tokens_per_s"], out["predicted_tokens_per_s"]
        row = dict(kind=kind, link=link, budgets=list(budgets), batch=batch, prompt=prompt, layers=layers,
                   measured=measured, predicted=predicted, error=(predicted - measured) / measured)
        rows.append(row)
        print(f"{link:8} {kind:8} {budgets[0]:>6}+{budgets[1]:<6} batch {batch} prompt {prompt:3} split {layers}: "
              f"measured {measured:7.2f} predicted {predicted:7.2f} tokens/s ({row['error']:+.1%})", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--links", default="none,1gbit,100mbit")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    os.makedirs(WORK, exist_ok=True)
    run(["cargo", "build", "--release", "-q", "-p", "ferry"], cwd=ROOT)
    model = os.path.join(WORK, "small")
    if not os.path.exists(os.path.join(model, "config.json")):
        run([BIN, "synth", "--model", MODEL, "--out", model])
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    os.environ.update(env)
    rows = []
    try:
        for link in args.links.split(","):
            shape(link)
            base = profile_for(link)
            for layers in SPLITS:
                for batch in BATCHES:
                    for prompt in PROMPTS:
                        plan = os.path.join(WORK, "resident.yaml")
                        open(plan, "w").write(resident_plan(model, base, layers, batch, prompt))
                        rows.extend(measure(plan, model, "resident", link, ("192MiB", "192MiB"), batch, prompt,
                                            layers, args.rounds))
            for budgets in BUDGETS:
                profile = with_budgets(base, budgets, link)
                for batch in BATCHES:
                    for prompt in PROMPTS:
                        plan = os.path.join(WORK, "plan.yaml")
                        tune = subprocess.run([BIN, "tune", "--profile", profile, "--model", model, "--batch",
                                               str(batch), "--prompt-len", str(prompt), "--gen-len", str(GEN),
                                               "--out", plan, "--force", "--json"], text=True, capture_output=True)
                        if tune.returncode != 0:
                            print(f"{link:8} tuned {budgets} batch {batch} prompt {prompt}: no plan: "
                                  f"{tune.stderr.strip()[:160]}", flush=True)
                            continue
                        tuned = json.loads(tune.stdout)
                        layers = [sum(s["attention_weights"][t] for t in ("device", "host", "disk"))
                                  for s in tuned["plan"]["policy"]["stages"]]
                        rows.extend(measure(plan, model, "tuned", link, budgets, batch, prompt, layers, args.rounds))
    finally:
        shape("none")
    json.dump(rows, open(os.path.join(WORK, "results.json"), "w"), indent=1)
    for kind in ("resident", "tuned"):
        errors = [abs(r["error"]) for r in rows if r["kind"] == kind]
        if not errors:
            continue
        print(f"\n{kind}: {len(errors)} runs, median |error| {statistics.median(errors):.1%}, "
              f"mean {statistics.mean(errors):.1%}, max {max(errors):.1%}")
        for link in args.links.split(","):
            e = [abs(r["error"]) for r in rows if r["link"] == link and r["kind"] == kind]
            if e:
                print(f"  {link}: median |error| {statistics.median(e):.1%} over {len(e)} runs")


if __name__ == "__main__":
    main()
