"""Ferry's logits against llama.cpp's on the same GGUF file (not CI: needs
llama-cpp-python, which builds llama.cpp: `pip install llama-cpp-python==0.3.36`,
about 15 minutes on two cores).

For each model and storage it writes the file with `ferry synth --format gguf`,
runs the prompt `ferry run` draws (SplitMix64 from --seed, modulo the vocabulary) as
one prefill with `--logits`, has llama.cpp evaluate the same tokens, and compares the
last position's logits: the largest difference as a share of the largest logit, and
whether the top token agrees. Ferry's default 8-bit activations are llama.cpp's
numerics for the 32-value formats (its K-quants and IQ4_XS round x per 256 values
instead).

usage: python3 bench/llama_logits.py [FERRY_BINARY] [WORK_DIR]
       ONLY="q3_k_m q2_k" python3 bench/llama_logits.py ...   # those storages only
"""
import json
import os
import subprocess
import sys

import numpy as np
from llama_cpp import Llama

FERRY = sys.argv[1] if len(sys.argv) > 1 else "target/release/ferry"
WORK = sys.argv[2] if len(sys.argv) > 2 else "bench/work/llama-logits"
CASES = [
    # Float weights: no rounding of the activations on either side (the KV cache is
    # f16 in both), so what is left is the order of float operations.
    ("test-tiny", "f32"),
    ("test-tiny-qwen2-moe", "f32"),
    # (catalog model, storage): test-tiny-qwen2-moe's rows (64 and 128 values) are not
    # whole 256-value blocks, so its Q4_K_M file holds Q5_0 and Q8_0 (llama.cpp's fallback).
    ("test-tiny-qwen2-moe", "q4_k_m"),
    ("test-tiny-qwen2-moe", "q5_0"),
    ("test-tiny-qwen2-moe", "q8_0"),
    ("test-tiny", "q5_0"),
    ("test-tiny-moe", "q4_0"),
    # Q4_K, Q5_K and Q6_K on rows of whole 256-value blocks: llama.cpp's Q4_K_M and
    # Q5_K_M mixtures (llama.cpp rounds x per 256 values for K-quants, Ferry per 32).
    ("test-small", "q4_k_m"),
    ("test-small", "q5_k_m"),
    # Q3_K (llama.cpp's Q3_K_M mixture: with Q4_K, Q5_K and Q6_K) and Q2_K throughout.
    ("test-small", "q3_k_m"),
    ("test-small", "q2_k"),
    # IQ4_NL (x per 32 on both sides) and llama.cpp's IQ4_XS mixture (IQ4_XS, Q5_K and
    # Q6_K; llama.cpp rounds x per 256 for IQ4_XS); test-tiny's rows of 352 values hold
    # IQ4_NL in its IQ4_XS file (llama.cpp's fallback).
    ("test-small", "iq4_nl"),
    ("test-small", "iq4_xs_m"),
    ("test-tiny", "iq4_xs"),
    # Q4_1 and Q5_1 (a minimum per block; llama.cpp rounds x per 32 for them as Ferry
    # does), and the fallbacks of a Q5_K file and a Q3_K_M file on rows of 128 and 352
    # values: Q5_1, and Q4_0, Q5_0, Q5_1 and Q8_0.
    ("test-tiny", "q4_1"),
    ("test-tiny", "q5_1"),
    ("test-tiny", "q5_k"),
    ("test-tiny", "q3_k_m"),
    # Qwen2.5-0.5B's shape (rows of 896 values: Q5_1, Q5_0 and Q8_0 fallbacks; the
    # embedding table tied to the head, Q8_0 as llama.cpp stores it).
    ("qwen2.5-0.5b", "q5_k_m"),
    ("qwen2.5-0.5b", "q4_k_m"),
    # The lattice formats, every matrix in one (llama.cpp rounds x per 256 for them).
    ("test-small", "iq2_xxs"),
    ("test-small", "iq2_xs"),
    ("test-small", "iq2_s"),
    ("test-small", "iq3_xxs"),
    ("test-small", "iq3_s"),
    ("test-small", "iq1_s"),
    ("test-small", "iq1_m"),
]
# Rotary scalings: test-tiny with a scaled config.json, written as GGUF by Ferry
# (Llama 3.1's as a `rope_freqs` tensor, linear in the metadata), against llama.cpp
# reading the file. An original context of 16 puts the prompt's 24 positions past it.
SCALED = [
    ("llama3", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}),
    ("linear", {"rope_type": "linear", "factor": 4.0}),
]
PROMPT = 24
SEED = 1


def splitmix(seed):
    state = seed
    while True:
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        yield z ^ (z >> 31)


def ferry(*args):
    out = subprocess.run([FERRY, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"ferry {' '.join(args)} failed:\n{out.stderr}")
    return out


def main():
    os.makedirs(WORK, exist_ok=True)
    print("model                 storage  max |diff| / max |logit|  top token (ferry, llama.cpp)  llama.cpp's top-2 gap / max |logit|")
    cases = [(model, storage, None) for model, storage in CASES]
    cases += [("test-tiny", "f32", scaling) for scaling in SCALED]
    only = os.environ.get("ONLY", "").split()
    cases = [case for case in cases if not only or case[1] in only]
    for model, storage, scaling in cases:
        stem = os.path.join(WORK, f"{model}-{storage}" + (f"-{scaling[0]}" if scaling else ""))
        gguf = stem + ".gguf"
        source = model
        if scaling:
            # The model as a folder whose config.json carries the scaling, then that as GGUF.
            source = stem + "-folder"
            ferry("synth", "--model", model, "--dtype", "f32", "--seed", "11", "--out", source, "--force")
            config = json.load(open(os.path.join(source, "config.json")))
            config["rope_scaling"] = scaling[1]
            json.dump(config, open(os.path.join(source, "config.json"), "w"))
        ferry("synth", "--model", source, "--format", "gguf", "--dtype", storage, "--seed", "11", "--out", gguf,
              "--force")
        ferry("tune", "--gpu", "cpu", "--model", gguf, "--batch", "1", "--prompt-len", str(PROMPT), "--gen-len",
              "1", "--out", stem + ".yaml", "--force")
        ferry("run", "--model-dir", gguf, "--plan", stem + ".yaml", "--seed", str(SEED), "--logits", stem + ".npy",
              "--trace", stem + "-trace.json", "--force")
        ours = np.load(stem + ".npy")[0].astype(np.float64)
        rng = splitmix(SEED)
        tokens = [next(rng) % ours.shape[0] for _ in range(PROMPT)]
        # One token a batch: on this machine's AMX-capable CPU the 0.3.36 wheel built
        # natively crashes in llama_decode on batches of several tokens of these tiny
        # shapes; a token at a time takes the one-row products, as decoding does.
        llm = Llama(model_path=gguf, n_ctx=64, n_batch=1, n_ubatch=1, logits_all=True, verbose=False, n_threads=2)
        llm.eval(tokens)
        theirs = np.array(llm.scores[PROMPT - 1], dtype=np.float64)
        share = np.abs(ours - theirs).max() / np.abs(theirs).max()
        top2 = np.sort(theirs)[-2:]
        gap = (top2[1] - top2[0]) / np.abs(theirs).max()
        label = model + (f" {scaling[0]}" if scaling else "")
        print(f"{label:<21} {storage:<8} {share:>24.2e}  {int(ours.argmax()):>5}, {int(theirs.argmax()):<5}"
              f"{'':>16}{gap:.2e}")


main()
