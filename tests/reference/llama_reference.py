#!/usr/bin/env python3
"""An independent reference for Ferry's engine: a Llama-family forward pass in numpy
(float64), written from the Hugging Face Llama definition, not from Ferry's code, with
Mixtral's, Qwen3-MoE's or Qwen2-MoE's sparse mixture-of-experts block (Qwen2-MoE's with
its shared expert and its weights not renormalised) where the model has one.

It reads a model folder written by `ferry synth` (config.json + model.safetensors in
f32), or a GGUF file (any tensor types llama.cpp's `gguf` package decodes; the query
and key rows of a `llama` file put back in Hugging Face's order), runs greedy
generation for the prompts in a JSON file, and writes every step's logits. The engine's test (engine/tests/reference.rs) synthesizes the same model and
compares its logits with the committed output.

    ferry synth --model test-tiny --dtype f32 --seed 11 --out /tmp/tiny
    python3 tests/reference/llama_reference.py /tmp/tiny tests/reference/prompts.json \
        tests/reference/test-tiny-seed11-golden.json

With `--activations q8` after the paths, every product with a Q8_0, Q4_0, Q5_0, IQ4_NL, Q4_1 or Q5_1 weight first
rounds its input the way llama.cpp does (blocks of 32 values, scale max|x| / 127,
values rounded to the nearest step, half away from zero; computed in float32 like the
engine), then multiplies in float64. With `--activations bf16` it does the same, and every
product with a weight stored in bf16 first rounds its input to the nearest bf16 (ties to
even, from the float32 value), as llama.cpp does for bf16 files (the engine's default).
"""
import json
import struct
import sys

import numpy as np


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(data[start:end], dtype="<u2").astype(np.uint32) << 16
            values = bits.view(np.float32)
            BF16_INPUTS.add(name)
        else:
            assert info["dtype"] == "F32", "the reference reads f32 and bf16 models"
            values = np.frombuffer(data[start:end], dtype="<f4")
        tensors[name] = values.reshape(info["shape"]).astype(np.float64)
    return tensors


GGUF_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "ffn_gate_inp": "block_sparse_moe.gate", "attn_q_norm": "self_attn.q_norm",
              "attn_k_norm": "self_attn.k_norm", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
              "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
              "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
# A layer's experts: one 3-D tensor per projection, expert e its e-th slice.
GGUF_EXPERTS = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}


def load_gguf(path):
    """The config and the weights (float64, Hugging Face names and row order) of a GGUF file."""
    from gguf import GGUFReader, quants

    reader = GGUFReader(path)

    def field(key):
        part = reader.fields[key].parts[-1]
        return str(bytes(part), "utf-8") if part.dtype == np.uint8 else part[0].item()

    arch = field("general.architecture")
    cfg = {
        "hidden_size": field(f"{arch}.embedding_length"),
        "num_attention_heads": field(f"{arch}.attention.head_count"),
        "num_key_value_heads": field(f"{arch}.attention.head_count_kv"),
        "num_hidden_layers": field(f"{arch}.block_count"),
        "rms_norm_eps": field(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": field(f"{arch}.rope.freq_base"),
    }
    if f"{arch}.expert_count" in reader.fields:
        cfg["num_local_experts"] = field(f"{arch}.expert_count")
        cfg["num_experts_per_tok"] = field(f"{arch}.expert_used_count")
        # llama.cpp renormalises every architecture's top k but Qwen2-MoE's.
        norm_key = f"{arch}.expert_weights_norm"
        cfg["norm_topk_prob"] = bool(field(norm_key)) if norm_key in reader.fields else arch != "qwen2moe"
    if reader.fields.get(f"{arch}.rope.scaling.type") and field(f"{arch}.rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": field(f"{arch}.rope.scaling.factor")}
    if f"{arch}.attention.key_length" in reader.fields:
        cfg["head_dim"] = field(f"{arch}.attention.key_length")
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    w = {}
    QUANTIZED_INPUTS.clear()
    for t in reader.tensors:
        base, kind = t.name.rsplit(".", 1)
        if base == "rope_freqs":
            # llama.cpp's per-frequency divisors (Llama 3.1's scaling as its converter writes it).
            cfg["rope_freqs"] = np.asarray(t.data, dtype=np.float64)
            continue
        shape = [int(d) for d in reversed(t.shape.tolist())]
        values = quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
        if base.startswith("blk."):
            _, layer, short = base.split(".")
            if short in GGUF_EXPERTS:
                for e, expert in enumerate(values):
                    hf = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{GGUF_EXPERTS[short]}.{kind}"
                    w[hf] = expert
                    if t.tensor_type.name in ROUNDED_INPUT_TYPES:
                        QUANTIZED_INPUTS.add(hf)
                continue
            hf = f"model.layers.{layer}.{GGUF_NAMES[short]}.{kind}"
        else:
            hf = f"{names[base]}.{kind}"
        if arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
            rows, cols = values.shape
            # Stored row 2i + j of a head is Hugging Face row j * head_dim / 2 + i.
            values = values.reshape(rows // head_dim, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        w[hf] = values
        if t.tensor_type.name in ROUNDED_INPUT_TYPES:
            QUANTIZED_INPUTS.add(hf)
        if t.tensor_type.name == "BF16":
            BF16_INPUTS.add(hf)
    cfg["tie_word_embeddings"] = "lm_head.weight" not in w
    return cfg, w


# Weights whose products round their input to 8 bits (`--activations q8` and `bf16`).
QUANTIZED_INPUTS = set()
# Weights stored in bf16, whose products round their input to bf16 (`--activations bf16`).
BF16_INPUTS = set()
# The types llama.cpp multiplies by activations in Q8_0 blocks of 32.
ROUNDED_INPUT_TYPES = ("Q8_0", "Q4_0", "Q5_0", "IQ4_NL", "Q4_1", "Q5_1")
ACTIVATIONS = {"mode": "f32"}


def quantize_rows(x):
    """x rounded to llama.cpp's Q8_0 activation blocks, as float64."""
    x32 = np.asarray(x, dtype=np.float32)
    blocks = x32.reshape(*x32.shape[:-1], -1, 32)
    d = (np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inverse = np.where(d > 0, np.float32(1) / np.where(d > 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    scaled = blocks * inverse
    q = np.clip(np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5)), -127, 127)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x32.shape)


def round_bf16(x):
    """x (via float32) rounded to the nearest bf16, ties to even, as float64."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    return rounded.view(np.float32).astype(np.float64)


def matmul(x, w, name):
    """x @ w[name].T, with x rounded (8 bits, bf16) where the engine does so."""
    if ACTIVATIONS["mode"] in ("q8", "bf16") and name in QUANTIZED_INPUTS:
        x = quantize_rows(x)
    if ACTIVATIONS["mode"] == "bf16" and name in BF16_INPUTS:
        x = round_bf16(x)
    return x @ w[name].T


def projection(w, prefix, x):
    """x @ weight.T, plus the bias where the model has one (Qwen2's q, k and v)."""
    out = matmul(x, w, f"{prefix}.weight")
    bias = w.get(f"{prefix}.bias")
    return out if bias is None else out + bias


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_frequencies(cfg, d):
    """Hugging Face's inv_freq, with its `linear` and `llama3` rope_scaling
    (`_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`), and a GGUF
    file's `rope_freqs` divisors as llama.cpp applies them."""
    inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, d, 2) / d)
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = np.where(medium, smoothed, scaled)
    elif kind not in (None, "default"):
        raise SystemExit(f"rope_scaling {kind} is not in this reference")
    if "rope_freqs" in cfg:
        inv_freq = inv_freq / cfg["rope_freqs"]
    return inv_freq


def rope(x, positions, cfg):
    # x: [tokens, heads, head_dim]; Hugging Face's rotate-half layout.
    d = x.shape[-1]
    inv_freq = rope_frequencies(cfg, d)
    angles = np.outer(positions, inv_freq)  # [tokens, d/2]
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)[:, None, :]
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * cos + rotated * sin


def swiglu(w, prefix, names, xn):
    gate_name, up_name, down_name = names
    gate = matmul(xn, w, f"{prefix}.{gate_name}.weight")
    up = matmul(xn, w, f"{prefix}.{up_name}.weight")
    return matmul(gate / (1.0 + np.exp(-gate)) * up, w, f"{prefix}.{down_name}.weight")


def mixture_of_experts(cfg, w, p, xn):
    """Mixtral's sparse MoE block (Qwen3-MoE's with norm_topk_prob is the same): softmax
    over every expert's router logit, the top k kept and renormalised to sum to 1, each
    token's experts' outputs summed with those weights (Hugging Face's
    MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock). Tensors under either's names.
    Qwen2MoeSparseMoeBlock: the top k keep their softmax weights unless norm_topk_prob,
    and a shared expert's output, scaled by the sigmoid of its gate, is added last."""
    experts = cfg.get("num_local_experts", cfg.get("num_experts"))
    k = cfg["num_experts_per_tok"]
    mixtral = f"{p}.block_sparse_moe.gate.weight" in w
    block = "block_sparse_moe" if mixtral else "mlp"
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    logits = matmul(xn, w, f"{p}.{block}.gate.weight")
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.zeros_like(xn)
    renormalise = cfg.get("norm_topk_prob", mixtral)
    for t in range(len(xn)):
        chosen = np.argsort(-probs[t], kind="stable")[:k]
        weights = probs[t, chosen] / probs[t, chosen].sum() if renormalise else probs[t, chosen]
        for e, weight in zip(chosen, weights):
            out[t] += weight * swiglu(w, f"{p}.{block}.experts.{e}", names, xn[t:t + 1])[0]
    prefix, first = f"{p}.{block}.experts.", f".{names[0]}.weight"
    assert experts == sum(1 for name in w if name.startswith(prefix) and name.endswith(first))
    if f"{p}.mlp.shared_expert_gate.weight" in w:
        shared = swiglu(w, f"{p}.mlp.shared_expert", ("gate_proj", "up_proj", "down_proj"), xn)
        gate = matmul(xn, w, f"{p}.mlp.shared_expert_gate.weight")
        out += shared / (1.0 + np.exp(-gate.reshape(len(xn), 1)))
    return out


def forward(cfg, w, tokens, cache, start):
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    eps = cfg["rms_norm_eps"]
    x = w["model.embed_tokens.weight"][tokens]
    positions = np.arange(start, start + len(tokens))
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        xn = rms_norm(x, w[f"{p}.input_layernorm.weight"], eps)
        q = projection(w, f"{p}.self_attn.q_proj", xn).reshape(len(tokens), heads, d)
        k = projection(w, f"{p}.self_attn.k_proj", xn).reshape(len(tokens), kv_heads, d)
        v = projection(w, f"{p}.self_attn.v_proj", xn).reshape(len(tokens), kv_heads, d)
        if f"{p}.self_attn.q_norm.weight" in w:
            # Qwen3: an RMSNorm over each head of q and k before the rotation.
            q = rms_norm(q, w[f"{p}.self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[f"{p}.self_attn.k_norm.weight"], eps)
        q = rope(q, positions, cfg)
        k = rope(k, positions, cfg)
        keys, values = cache.setdefault(layer, (np.zeros((0, kv_heads, d)), np.zeros((0, kv_heads, d))))
        keys = np.concatenate([keys, k])
        values = np.concatenate([values, v])
        cache[layer] = (keys, values)
        group = heads // kv_heads
        out = np.zeros((len(tokens), heads, d))
        for t in range(len(tokens)):
            visible = start + t + 1
            for head in range(heads):
                kh = head // group
                scores = keys[:visible, kh] @ q[t, head] / np.sqrt(d)
                probs = np.exp(scores - scores.max())
                probs /= probs.sum()
                out[t, head] = probs @ values[:visible, kh]
        x = x + matmul(out.reshape(len(tokens), heads * d), w, f"{p}.self_attn.o_proj.weight")
        xn = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], eps)
        if f"{p}.block_sparse_moe.gate.weight" in w or f"{p}.mlp.gate.weight" in w:
            x = x + mixture_of_experts(cfg, w, p, xn)
        else:
            x = x + swiglu(w, f"{p}.mlp", ("gate_proj", "up_proj", "down_proj"), xn)
    last = rms_norm(x[-1], w["model.norm.weight"], eps)
    head = "model.embed_tokens.weight" if cfg["tie_word_embeddings"] else "lm_head.weight"
    return matmul(last[None, :], w, head)[0]


def main():
    model_dir, prompts_path, out_path = sys.argv[1:4]
    if len(sys.argv) == 6 and sys.argv[4] == "--activations" and sys.argv[5] in ("q8", "bf16", "f32"):
        ACTIVATIONS["mode"] = sys.argv[5]
    elif sys.argv[4:]:
        sys.exit(f"unknown arguments {sys.argv[4:]}: the only option is --activations q8|bf16|f32")
    if model_dir.endswith(".gguf"):
        cfg, w = load_gguf(model_dir)
    else:
        cfg = json.load(open(f"{model_dir}/config.json"))
        w = load_safetensors(f"{model_dir}/model.safetensors")
    spec = json.load(open(prompts_path))
    result = {"gen_len": spec["gen_len"], "sequences": []}
    for prompt in spec["prompts"]:
        cache = {}
        logits_per_step = []
        tokens = list(prompt)
        logits = forward(cfg, w, np.array(tokens), cache, 0)
        for step in range(spec["gen_len"]):
            logits_per_step.append([float(v) for v in logits])
            token = int(np.argmax(logits))
            tokens.append(token)
            if step + 1 < spec["gen_len"]:
                logits = forward(cfg, w, np.array([token]), cache, len(tokens) - 1)
        result["sequences"].append({"tokens": tokens[len(prompt):], "logits": logits_per_step})
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main()
