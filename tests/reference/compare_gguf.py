"""Checks a GGUF file written by `ferry synth --format gguf` against the safetensors
model `ferry synth` writes with the same seed, reading the GGUF file with llama.cpp's
own `gguf` package: every tensor present under llama.cpp's name, query and key rows
in llama.cpp's interleaved order, values equal to the float model within the storage
format's rounding.

usage: compare_gguf.py FILE.gguf model.safetensors HEAD_DIM STORAGE
"""
import json
import re
import struct
import sys

import numpy as np
from gguf import GGUFReader
from gguf import quants

NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
FIXED = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
# Largest error allowed, as a fraction of the largest magnitude in the tensor: half a
# step of the format's finest levels, with room for how its scales are stored.
STEP = {"q8_0": 1 / 127, "q4_0": 1 / 7, "q5_0": 1 / 15, "q4_k": 2 / 15, "q5_k": 2 / 31, "q6_k": 1 / 31,
        # IQ4_NL's grid: its widest gap (24 of 127), with room for a fitted scale.
        "iq4_nl": 1 / 7, "q4_1": 1 / 7, "q5_1": 1 / 15}
# llama.cpp's quantizer stores a K-quant's matrices whose rows are not whole 256-value
# blocks in these types (`llama_tensor_get_type`, src/llama-quant.cpp).
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q3_k": "q4_0", "q2_k": "q4_0", "iq4_xs": "iq4_nl"}


def safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        assert e["dtype"] == "F32", e
        a, b = e["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=np.float32).reshape(e["shape"])
    return out


def gguf_name(hf):
    if hf in FIXED:
        return FIXED[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    return f"blk.{m.group(1)}.{NAMES[m.group(2)]}.{m.group(3)}"


def main():
    gguf_path, st_path, head_dim, storage = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    reader = GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    reference = safetensors(st_path)
    assert len(tensors) == len(reference), (len(tensors), len(reference))
    for hf, want in reference.items():
        t = tensors[gguf_name(hf)]
        got = quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(want.shape)
        if hf.endswith(("q_proj.weight", "k_proj.weight")):
            rows, cols = want.shape
            heads = rows // head_dim
            # Undo llama.cpp's order: stored row 2i + j is row j * head_dim / 2 + i.
            got = got.reshape(heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        want = want.astype(np.float64)
        err = np.abs(got - want).max()
        if want.ndim == 1 or storage == "f32":
            assert err == 0, (hf, err)
        elif storage == "f16":
            assert np.array_equal(got, want.astype(np.float16).astype(np.float64)), hf
        else:
            stored = FALLBACK.get(storage, storage) if want.shape[-1] % 256 else storage
            assert t.tensor_type.name.lower() == stored, (hf, t.tensor_type.name, stored)
            bound = STEP[stored] * np.abs(want).max()
            assert err <= bound, (hf, t.tensor_type.name, err, bound)
    print("ok", len(reference), "tensors")


main()
