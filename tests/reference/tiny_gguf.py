"""A tiny llama-shaped GGUF file written by llama.cpp's own `gguf` package, for the
end-to-end GGUF tests: hidden 256, MLP 512, 2 layers, 4 heads (2 KV heads), 300
tokens. `q` writes Q4_K and Q6_K matrices (random blocks) as a Q4_K_M file mixes them;
`f` writes every matrix in f16. Norms are f32, as in every GGUF file.

Usage: python3 tiny_gguf.py OUT.gguf q|f
"""
import sys, numpy as np, gguf
from gguf.constants import GGMLQuantizationType as T, GGML_QUANT_SIZES
path, quant = sys.argv[1], sys.argv[2] == "q"
h, ffn, layers, heads, kv, vocab = 256, 512, 2, 4, 2, 300
w = gguf.GGUFWriter(path, "llama")
w.add_block_count(layers); w.add_context_length(512); w.add_embedding_length(h); w.add_feed_forward_length(ffn)
w.add_head_count(heads); w.add_head_count_kv(kv); w.add_layer_norm_rms_eps(1e-5); w.add_rope_freq_base(10000.0)
w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(vocab)])
rng = np.random.default_rng(1)
def mat(name, rows, cols, qtype):
    if quant and qtype != T.F16:
        e, b = GGML_QUANT_SIZES[qtype]
        w.add_tensor(name, rng.integers(0, 255, size=(rows, cols // e * b), dtype=np.uint8), raw_dtype=qtype)
    else:
        w.add_tensor(name, rng.standard_normal((rows, cols)).astype(np.float16))
mat("token_embd.weight", vocab, h, T.Q4_K)
for l in range(layers):
    w.add_tensor(f"blk.{l}.attn_norm.weight", np.ones(h, dtype=np.float32))
    mat(f"blk.{l}.attn_q.weight", h, h, T.Q4_K); mat(f"blk.{l}.attn_k.weight", kv*64, h, T.Q4_K)
    mat(f"blk.{l}.attn_v.weight", kv*64, h, T.Q6_K); mat(f"blk.{l}.attn_output.weight", h, h, T.Q4_K)
    w.add_tensor(f"blk.{l}.ffn_norm.weight", np.ones(h, dtype=np.float32))
    mat(f"blk.{l}.ffn_gate.weight", ffn, h, T.Q4_K); mat(f"blk.{l}.ffn_up.weight", ffn, h, T.Q4_K)
    mat(f"blk.{l}.ffn_down.weight", h, ffn, T.Q6_K)
w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
mat("output.weight", vocab, h, T.Q6_K)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
