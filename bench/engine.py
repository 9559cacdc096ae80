#!/usr/bin/env python3
"""End-to-end engine benchmark (issue "Engine"): TinyLlama shape, bf16 (~2.2 GB),
a 512 MiB RAM budget on the cpu backend, prompt 64, 32 new tokens. For each batch it
tunes a plan, drops the page cache, runs it, and compares measured tokens/s with the
I/O bound: bytes streamed per step over the disk bandwidth measured in the same run
(direct I/O reads of the model file, 8 MiB requests, 1 and 4 in flight).

Usage: python3 bench/engine.py [--work DIR] [--batches 1,8,auto]
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRY = os.path.join(ROOT, "target", "release", "ferry")


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def drop_caches():
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def disk_bandwidth(path, in_flight, block=8 << 20, limit=2 << 30):
    """GB/s reading `limit` bytes of `path` with O_DIRECT, `in_flight` readers."""
    size = min(os.path.getsize(path) // block * block, limit)
    per = size // in_flight // block * block
    done = []

    def reader(offset):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        import mmap
        buf = mmap.mmap(-1, block)
        read = 0
        while read < per:
            n = os.preadv(fd, [buf], offset + read)
            if n <= 0:
                break
            read += n
        os.close(fd)
        done.append(read)

    drop_caches()
    start = time.perf_counter()
    threads = [threading.Thread(target=reader, args=(i * per,)) for i in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start) / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=os.path.join(ROOT, "bench", "work"))
    parser.add_argument("--batches", default="1,8,auto")
    parser.add_argument("--budget", default="512MiB")
    args = parser.parse_args()
    sh("cargo", "build", "--release", "-q", "-p", "ferry", cwd=ROOT)
    model = os.path.join(args.work, "tinyllama-bf16")
    if not os.path.exists(os.path.join(model, "model.safetensors")):
        print("synthesizing tinyllama-1.1b (bf16) ...", file=sys.stderr)
        sh(FERRY, "synth", "--model", "tinyllama-1.1b", "--dtype", "bf16", "--out", model, "--force")
    weights = os.path.join(model, "model.safetensors")
    cache_ok = drop_caches()
    rows = []
    for batch in args.batches.split(","):
        plan = os.path.join(args.work, f"plan-{batch}.yaml")
        tune = [FERRY, "tune", "--gpu", "cpu", "--host", "ferry-ci-vm", "--device-mem", args.budget, "--model", model,
                "--prompt-len", "64", "--gen-len", "32", "--out", plan, "--force", "--json"]
        tune += ["--batch", batch] if batch != "auto" else ["--batch", "auto"]
        tuned = json.loads(sh(*tune).stdout)
        # The disk's speed drifts from minute to minute here: measure it right before
        # and right after the run and use the mean (the spread is reported).
        before = (disk_bandwidth(weights, 1), disk_bandwidth(weights, 4))
        drop_caches()
        out = json.loads(sh(FERRY, "run", "--model-dir", model, "--plan", plan, "--json").stdout)
        after = (disk_bandwidth(weights, 1), disk_bandwidth(weights, 4))
        bw1 = (before[0] + after[0]) / 2
        bw4 = (before[1] + after[1]) / 2
        m = out["metrics"]
        policy = tuned["plan"]["policy"]
        bs = tuned["plan"]["workload"]["batch_size"]
        steps = tuned["plan"]["workload"]["gen_len"]
        per_step = out["requested_read_bytes"] / steps
        qd = policy["io_queue_depth"]
        bw = bw4 if qd >= 4 else bw1
        bound = bs / (per_step / (bw * 1e9))
        rows.append({
            "batch": bs, "schedule": policy["schedule"], "io_depth": qd, "chunk": policy["chunk_bytes"],
            "tokens_per_s": m["tokens_per_s"], "predicted": out["predicted_tokens_per_s"],
            "ttft_s": m["time_to_first_token_ns"] / 1e9, "tpot_s": m["time_per_output_token_ns"] / 1e9,
            "streamed_per_step_gb": per_step / 1e9, "disk_gbps_qd1": bw1, "disk_gbps_qd4": bw4, "io_bound_tps": bound,
            "disk_gbps_before": before, "disk_gbps_after": after,
            "fraction_of_bound": m["tokens_per_s"] / bound, "peak_rss_mib": out["peak_rss_bytes"] / 2**20,
            "storage_read_gb": out["storage_read_bytes"] / 1e9, "direct_io": out["direct_io"],
        })
        r = rows[-1]
        print(f"batch {bs:>3} {r['schedule']:<14} measured {r['tokens_per_s']:.3f} tok/s (predicted {r['predicted']:.3f}); "
              f"I/O bound {bound:.3f} (streamed {r['streamed_per_step_gb']:.2f} GB/step at {bw:.2f} GB/s, before/after {before[1 if qd >= 4 else 0]:.2f}/{after[1 if qd >= 4 else 0]:.2f}) -> {100*r['fraction_of_bound']:.0f} %; "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB; {r['storage_read_gb']:.2f} GB from storage", flush=True)
    if not cache_ok:
        print("warning: could not drop the page cache (not root?): disk figures may be RAM figures", file=sys.stderr)
    json.dump(rows, open(os.path.join(args.work, "engine-bench.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
