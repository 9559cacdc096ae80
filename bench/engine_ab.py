#!/usr/bin/env python3
"""Side-by-side A/B of engine builds or settings on the same plans (BENCHMARKS.md
"Engine: compute priority and buffer recycling"). Runs every variant on every plan,
round-robin, dropping the page cache before each run, and prints the median measured
tokens/s per variant with its ratio to the first variant. Interleaving keeps a disk
that drifts from minute to minute from favouring one variant.

Usage:
  python3 bench/engine_ab.py --model-dir DIR --plan PLAN.yaml [--plan ...] \\
      --variant old=/path/to/old/ferry --variant new=target/release/ferry \\
      --variant nice0=FERRY_COMPUTE_NICE=0:target/release/ferry [--rounds 3] [--gen-len 8]
A variant is LABEL=[ENV=VALUE,...:]BINARY.
"""
import argparse
import json
import os
import statistics
import subprocess


def drop_caches():
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        pass


def parse_variant(text):
    label, rest = text.split("=", 1)
    env = {}
    if ":" in rest:
        settings, rest = rest.rsplit(":", 1)
        for setting in settings.split(","):
            key, value = setting.split("=", 1)
            env[key] = value
    return label, env, rest


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--plan", action="append", required=True)
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gen-len", type=int, default=8)
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    results = {(plan, label): [] for plan in args.plan for label, _, _ in variants}
    for round_index in range(args.rounds):
        for plan in args.plan:
            for label, env, binary in variants:
                drop_caches()
                out = subprocess.run(
                    [binary, "run", "--model-dir", args.model_dir, "--plan", plan, "--gen-len", str(args.gen_len), "--json"],
                    check=True, capture_output=True, text=True, env={**os.environ, **env},
                )
                rate = json.loads(out.stdout)["metrics"]["tokens_per_s"]
                results[(plan, label)].append(rate)
                print(f"round {round_index + 1} {os.path.basename(plan)} {label}: {rate:.3f} tokens/s", flush=True)
    print()
    print("| plan | " + " | ".join(label for label, _, _ in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for plan in args.plan:
        base = statistics.median(results[(plan, variants[0][0])])
        cells = []
        for label, _, _ in variants:
            median = statistics.median(results[(plan, label)])
            runs = ", ".join(f"{r:.3f}" for r in results[(plan, label)])
            cells.append(f"{median:.3f} ({median / base:.2f}×; {runs})")
        print(f"| {os.path.basename(plan)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
