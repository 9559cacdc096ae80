//! Model shapes and the memory/compute arithmetic every other part relies on:
//! parameter counts, bytes per weight group, KV-cache and activation bytes, FLOPs.

use serde::{Deserialize, Serialize};

mod experts;
mod format;
mod gguf_metadata;
mod hf_config;
mod layout;
mod rope;
mod routing;
mod validate;

pub use format::{WeightFormat, WeightFormats, DEFAULT_GROUP_SIZE, MAX_GROUP_SIZE, PLANNABLE_BLOCKS};
pub use gguf_metadata::{float_dtype, from_gguf, gguf_name, group_of, GroupBytes};
pub use hf_config::from_hf_config;
pub use layout::{ExpertBytes, GroupSize, SharedLayout, WeightLayout};
pub use rope::{check_divisors as check_rope_divisors, frequencies as rope_frequencies, RopeScaling};
pub use routing::ExpertPopularity;

/// Query rows per block when the engine computes attention scores (see
/// `ModelSpec::attention_scratch_bytes`).
pub const ATTENTION_QUERY_BLOCK: u64 = 64;

/// Architecture family; decides how parameters are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    /// Qwen3 and Qwen3-MoE: Llama-shaped with per-head RMSNorms on queries and keys and
    /// a head width of its own (`ModelSpec::head_dim`).
    Qwen3,
    Mixtral,
    Opt,
}

impl Family {
    /// Llama-shaped decoders (RMSNorm, RoPE, GQA, SwiGLU) that Ferry's engine runs.
    pub fn is_llama_like(self) -> bool {
        !matches!(self, Family::Opt)
    }
}

/// Element type of stored weights or cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    Int8,
    Int4,
}

impl Dtype {
    pub fn bits(self) -> u64 {
        match self {
            Dtype::F32 => 32,
            Dtype::F16 | Dtype::Bf16 => 16,
            Dtype::Int8 => 8,
            Dtype::Int4 => 4,
        }
    }

    /// Bytes of `count` elements, rounded up to a whole byte.
    pub fn bytes_of(self, count: u64) -> u64 {
        (count * self.bits()).div_ceil(8)
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "fp32",
            Dtype::F16 => "fp16",
            Dtype::Bf16 => "bf16",
            Dtype::Int8 => "int8",
            Dtype::Int4 => "int4",
        }
    }
}

/// The weight groups a layer's tensors fall into; each can be placed on its own tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightGroup {
    /// q, k, v, o projections and the input norm.
    Attention,
    /// gate/up/down (or fc1/fc2, or all experts and the router) and the post-attention norm.
    Mlp,
    /// Token (and positional) embeddings.
    Embeddings,
    /// Final norm and language-model head.
    Head,
}

impl WeightGroup {
    /// The groups every layer has, each placed on its own tier and loaded by its own
    /// transfer. Lowering, memory accounting and the engine iterate over this list,
    /// so a new per-layer group (an MoE router, experts, a shared expert) is a variant
    /// here, its tensors (`ModelSpec::group_tensors`), its parameters, its tier in
    /// `LayerPlacement::tier` and its compute — the schedulers do not change.
    pub const PER_LAYER: [WeightGroup; 2] = [WeightGroup::Attention, WeightGroup::Mlp];

    /// How reports name the group ("resident MLP weights").
    pub fn name(self) -> &'static str {
        match self {
            WeightGroup::Attention => "attention",
            WeightGroup::Mlp => "MLP",
            WeightGroup::Embeddings => "embeddings",
            WeightGroup::Head => "head",
        }
    }

    /// Position of a per-layer group in `PER_LAYER` (`None` for embeddings and head).
    pub fn layer_slot(self) -> Option<usize> {
        WeightGroup::PER_LAYER.iter().position(|&g| g == self)
    }
}

/// A decoder-only transformer described by shape alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub family: Family,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_layers: u64,
    pub num_heads: u64,
    pub num_kv_heads: u64,
    pub vocab_size: u64,
    pub max_position_embeddings: u64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Experts per MoE layer (0 for a dense model).
    #[serde(default)]
    pub num_experts: u64,
    #[serde(default)]
    pub experts_per_token: u64,
    /// Width of a mixture of experts' shared expert, a SwiGLU MLP every token passes
    /// through beside its routed experts, its output scaled by a sigmoid gate (Qwen2-MoE's
    /// `shared_expert_intermediate_size`); 0 for none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shared_expert_intermediate_size: u64,
    /// Whether each token's top-k routing weights are renormalised to sum to 1 (Mixtral
    /// always; Qwen-MoE's `norm_topk_prob`). Without it a token's experts are weighted by
    /// their share of the softmax over every expert.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub renormalize_top_k: bool,
    /// Biases on q, k, v (Qwen2).
    #[serde(default)]
    pub qkv_bias: bool,
    /// Width of one attention head when it is not hidden_size / num_heads (Qwen3: 128
    /// with a hidden size of 2048 and 32 heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<u64>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// A checkpoint's long-context change to the rotary frequencies (Llama 3.1's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// A GGUF file's `rope_freqs` tensor: each frequency's divisor, read with the file's
    /// weights (llama.cpp's converter writes Llama 3.1's scaling so). Never in a catalog file.
    #[serde(skip)]
    pub rope_divisors: Option<std::sync::Arc<[f32]>>,
    /// Stored weight type of the released checkpoint.
    #[serde(default = "default_dtype")]
    pub dtype: Dtype,
    pub source: String,
    /// The bytes of each group as the model's file stores them, when that is not
    /// `dtype` throughout (a GGUF file's mix of types); what `WeightFormats::stored`
    /// plans with. Never in a catalog file.
    #[serde(skip)]
    pub stored: Option<SharedLayout>,
    /// A mixture of experts' measured routing (`ExpertPopularity`), when a plan names
    /// one: what `expected_experts` counts with instead of uniform routing.
    #[serde(skip)]
    pub routing: Option<std::sync::Arc<ExpertPopularity>>,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}
fn yes() -> bool {
    true
}
fn is_true(x: &bool) -> bool {
    *x
}
fn default_rms_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_dtype() -> Dtype {
    Dtype::F16
}

/// One stored tensor of a weight group: its Hugging Face name and 2-D shape
/// (rows × cols; vectors are one row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorSpec {
    pub name: String,
    pub rows: u64,
    pub cols: u64,
}

impl TensorSpec {
    pub fn elements(&self) -> u64 {
        self.rows * self.cols
    }

    /// Whether a quantizer stores this tensor quantized: matrices, except the MoE router
    /// and learned position embeddings, which llama.cpp keeps in their float type
    /// (`tensor_allows_quantization`: `ffn_gate_inp`, `LLM_TENSOR_POS_EMBD`). Vectors
    /// (norms, biases) are never quantized.
    pub fn quantizable(&self) -> bool {
        let router = self.name.ends_with("block_sparse_moe.gate.weight") || self.name.ends_with("mlp.gate.weight");
        self.rows > 1 && !router && !self.name.contains("embed_positions")
    }
}

/// Parameter counts of one model, by group.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ParamCounts {
    pub attention_per_layer: u64,
    pub mlp_per_layer: u64,
    pub norms_per_layer: u64,
    pub embeddings: u64,
    pub head: u64,
    pub total: u64,
}

impl ModelSpec {
    pub fn head_dim(&self) -> u64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_heads)
    }

    /// Each rotary pair's frequency (`rope::frequencies`): θ^(−2i/head_dim), scaled as
    /// the checkpoint says.
    pub fn rope_frequencies(&self) -> Vec<f32> {
        rope::frequencies(
            self.rope_theta,
            self.head_dim() as usize,
            self.rope_scaling.as_ref(),
            self.rope_divisors.as_deref(),
        )
    }

    /// A head width a config or file gives, kept only where it is not the implied
    /// hidden / heads (so a model without one of its own stays `None`).
    pub(super) fn own_head_dim(given: Option<u64>, hidden: u64, heads: u64) -> Option<u64> {
        given.filter(|&d| d * heads != hidden || !hidden.is_multiple_of(heads))
    }

    /// Width of the queries (and of the attention output): heads × head width, the
    /// hidden size unless the model sets its own head width.
    pub fn q_dim(&self) -> u64 {
        self.num_heads * self.head_dim()
    }

    pub fn kv_dim(&self) -> u64 {
        self.num_kv_heads * self.head_dim()
    }

    /// Parameter counts by group, following each family's tensor layout.
    pub fn params(&self) -> ParamCounts {
        let h = self.hidden_size;
        let ffn = self.intermediate_size;
        let (attention, mlp, norms, embeddings, head) = match self.family {
            Family::Opt => {
                // q, k, v, out projections with biases; fc1/fc2 with biases; two LayerNorms (weight+bias).
                let attention = 4 * h * h + 4 * h;
                let mlp = 2 * h * ffn + ffn + h;
                let norms = 4 * h;
                // OPT stores max_position + 2 learned positions (an offset of 2), and ties its head.
                let embeddings = self.vocab_size * h + (self.max_position_embeddings + 2) * h;
                let head = 2 * h; // final LayerNorm; the projection is tied to the embeddings
                (attention, mlp, norms, embeddings, head)
            }
            _ => {
                let (q, kv) = (self.q_dim(), self.kv_dim());
                let bias = if self.qkv_bias { q + 2 * kv } else { 0 };
                let qk_norms = if self.family == Family::Qwen3 { 2 * self.head_dim() } else { 0 };
                let attention = 2 * h * q + 2 * h * kv + bias + qk_norms;
                let dense_mlp = 3 * h * ffn;
                let mlp = if self.num_experts > 0 {
                    self.num_experts * dense_mlp + h * self.num_experts + self.shared_expert_params()
                } else {
                    dense_mlp
                };
                let norms = 2 * h;
                let embeddings = self.vocab_size * h;
                let projection = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
                (attention, mlp, norms, embeddings, projection + h)
            }
        };
        let total = self.num_layers * (attention + mlp + norms) + embeddings + head;
        ParamCounts {
            attention_per_layer: attention,
            mlp_per_layer: mlp,
            norms_per_layer: norms,
            embeddings,
            head,
            total,
        }
    }

    /// The tensors of one weight group of `layer` (ignored for embeddings and head), in
    /// the order Ferry stores and reads them. Their elements add up to the group's
    /// parameters.
    pub fn group_tensors(&self, group: WeightGroup, layer: u64) -> Vec<TensorSpec> {
        self.tensor_list(group, layer, true)
    }

    /// `group_tensors` of layer 0 with the experts' names left empty: for arithmetic
    /// that runs per lowered graph (a hundred experts per layer make their names
    /// costly; the other names say which tensors stay unquantized, `quantizable`).
    pub fn group_shapes(&self, group: WeightGroup) -> Vec<TensorSpec> {
        self.tensor_list(group, 0, false)
    }

    fn tensor_list(&self, group: WeightGroup, layer: u64, name_experts: bool) -> Vec<TensorSpec> {
        let h = self.hidden_size;
        let kv = self.kv_dim();
        let ffn = self.intermediate_size;
        macro_rules! t {
            ($rows:expr, $cols:expr, $($name:tt)+) => {
                TensorSpec { name: format!($($name)+), rows: $rows, cols: $cols }
            };
        }
        macro_rules! expert {
            ($rows:expr, $cols:expr, $($name:tt)+) => {
                TensorSpec {
                    name: if name_experts { format!($($name)+) } else { String::new() },
                    rows: $rows,
                    cols: $cols,
                }
            };
        }
        if self.family == Family::Opt {
            let p = format!("model.decoder.layers.{layer}");
            return match group {
                WeightGroup::Attention => {
                    let mut v =
                        vec![t!(1, h, "{p}.self_attn_layer_norm.weight"), t!(1, h, "{p}.self_attn_layer_norm.bias")];
                    for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                        v.push(t!(h, h, "{p}.self_attn.{proj}.weight"));
                        v.push(t!(1, h, "{p}.self_attn.{proj}.bias"));
                    }
                    v
                }
                WeightGroup::Mlp => vec![
                    t!(1, h, "{p}.final_layer_norm.weight"),
                    t!(1, h, "{p}.final_layer_norm.bias"),
                    t!(ffn, h, "{p}.fc1.weight"),
                    t!(1, ffn, "{p}.fc1.bias"),
                    t!(h, ffn, "{p}.fc2.weight"),
                    t!(1, h, "{p}.fc2.bias"),
                ],
                WeightGroup::Embeddings => vec![
                    t!(self.vocab_size, h, "model.decoder.embed_tokens.weight"),
                    t!(self.max_position_embeddings + 2, h, "model.decoder.embed_positions.weight"),
                ],
                WeightGroup::Head => vec![
                    t!(1, h, "model.decoder.final_layer_norm.weight"),
                    t!(1, h, "model.decoder.final_layer_norm.bias"),
                ],
            };
        }
        let p = format!("model.layers.{layer}");
        let q = self.q_dim();
        match group {
            WeightGroup::Attention => {
                let mut v = vec![t!(1, h, "{p}.input_layernorm.weight"), t!(q, h, "{p}.self_attn.q_proj.weight")];
                if self.qkv_bias {
                    v.push(t!(1, q, "{p}.self_attn.q_proj.bias"));
                }
                v.push(t!(kv, h, "{p}.self_attn.k_proj.weight"));
                if self.qkv_bias {
                    v.push(t!(1, kv, "{p}.self_attn.k_proj.bias"));
                }
                v.push(t!(kv, h, "{p}.self_attn.v_proj.weight"));
                if self.qkv_bias {
                    v.push(t!(1, kv, "{p}.self_attn.v_proj.bias"));
                }
                v.push(t!(h, q, "{p}.self_attn.o_proj.weight"));
                if self.family == Family::Qwen3 {
                    let d = self.head_dim();
                    v.push(t!(1, d, "{p}.self_attn.q_norm.weight"));
                    v.push(t!(1, d, "{p}.self_attn.k_norm.weight"));
                }
                v
            }
            WeightGroup::Mlp => {
                // The norm, the router, a shared expert's four and three per expert.
                let mut v = Vec::with_capacity(6 + 3 * self.num_experts as usize);
                v.push(t!(1, h, "{p}.post_attention_layernorm.weight"));
                if self.num_experts > 0 {
                    // Router, the shared expert if any (`router_tensors`), then each
                    // expert's gate, down and up projections (Mixtral's w1, w2, w3;
                    // Qwen's names in that order too).
                    let (block, [gate, down, up]) = if matches!(self.family, Family::Qwen2 | Family::Qwen3) {
                        ("mlp", ["gate_proj", "down_proj", "up_proj"])
                    } else {
                        ("block_sparse_moe", ["w1", "w2", "w3"])
                    };
                    v.push(t!(self.num_experts, h, "{p}.{block}.gate.weight"));
                    let shared = self.shared_expert_intermediate_size;
                    if shared > 0 {
                        v.push(t!(shared, h, "{p}.mlp.shared_expert.gate_proj.weight"));
                        v.push(t!(h, shared, "{p}.mlp.shared_expert.down_proj.weight"));
                        v.push(t!(shared, h, "{p}.mlp.shared_expert.up_proj.weight"));
                        v.push(t!(1, h, "{p}.mlp.shared_expert_gate.weight"));
                    }
                    for e in 0..self.num_experts {
                        v.push(expert!(ffn, h, "{p}.{block}.experts.{e}.{gate}.weight"));
                        v.push(expert!(h, ffn, "{p}.{block}.experts.{e}.{down}.weight"));
                        v.push(expert!(ffn, h, "{p}.{block}.experts.{e}.{up}.weight"));
                    }
                } else {
                    v.push(t!(ffn, h, "{p}.mlp.gate_proj.weight"));
                    v.push(t!(ffn, h, "{p}.mlp.up_proj.weight"));
                    v.push(t!(h, ffn, "{p}.mlp.down_proj.weight"));
                }
                v
            }
            WeightGroup::Embeddings => vec![t!(self.vocab_size, h, "model.embed_tokens.weight")],
            WeightGroup::Head => {
                let mut v = vec![t!(1, h, "model.norm.weight")];
                if !self.tie_word_embeddings {
                    v.push(t!(self.vocab_size, h, "lm_head.weight"));
                }
                v
            }
        }
    }

    /// Bytes of one group of one layer (norms go with the group they precede) with every
    /// tensor in the float `dtype`; plans read `WeightLayout`, which equals this for a
    /// float format (tested) and prices other formats exactly.
    pub fn group_bytes(&self, group: WeightGroup, dtype: Dtype) -> u64 {
        let p = self.params();
        let half_norms = p.norms_per_layer / 2;
        let count = match group {
            WeightGroup::Attention => p.attention_per_layer + half_norms,
            WeightGroup::Mlp => p.mlp_per_layer + (p.norms_per_layer - half_norms),
            WeightGroup::Embeddings => p.embeddings,
            WeightGroup::Head => p.head,
        };
        dtype.bytes_of(count)
    }

    pub fn layer_bytes(&self, dtype: Dtype) -> u64 {
        self.group_bytes(WeightGroup::Attention, dtype) + self.group_bytes(WeightGroup::Mlp, dtype)
    }

    pub fn total_bytes(&self, dtype: Dtype) -> u64 {
        self.num_layers * self.layer_bytes(dtype)
            + self.group_bytes(WeightGroup::Embeddings, dtype)
            + self.group_bytes(WeightGroup::Head, dtype)
    }

    /// KV-cache bytes for one token in one layer: keys and values of the KV heads only
    /// (grouped-query attention stores fewer heads than it queries).
    pub fn kv_bytes_per_token_per_layer(&self, dtype: Dtype) -> u64 {
        dtype.bytes_of(2 * self.kv_dim())
    }

    /// Hidden-state bytes per token passed between layers (f32 on the engine).
    pub fn activation_bytes_per_token(&self) -> u64 {
        4 * self.hidden_size
    }

    /// Largest intermediate inside a layer per token, in f32: the MLP's gate and up
    /// outputs together, or q/k/v together. A mixture of experts runs one expert at a
    /// time and also holds, per token, its input gathered for that expert, the expert's
    /// output, the layer's output it is summed into and the router's logits.
    pub fn workspace_bytes_per_token(&self) -> u64 {
        let routing = if self.num_experts > 0 { 3 * self.hidden_size + self.num_experts } else { 0 };
        let mlp = 2 * self.intermediate_size.max(self.shared_expert_intermediate_size) + routing;
        let qkv = self.q_dim() + 2 * self.kv_dim();
        4 * mlp.max(qkv) + 4 * self.hidden_size
    }

    /// Scratch for attention scores. The engine computes attention for one sequence at a
    /// time, all heads, in blocks of at most `ATTENTION_QUERY_BLOCK` query rows, so the
    /// score buffer is bounded by this, whatever the prompt length.
    pub fn attention_scratch_bytes(&self, rows: u64, max_context: u64) -> u64 {
        4 * self.num_heads * max_context * rows.min(ATTENTION_QUERY_BLOCK)
    }

    /// Parameters of the q, k, v projections (with biases) and of the output projection.
    pub fn attention_split_params(&self) -> (u64, u64) {
        let out = self.hidden_size * self.q_dim() + if self.family == Family::Opt { self.hidden_size } else { 0 };
        (self.params().attention_per_layer - out, out)
    }

    /// Matrix-multiply FLOPs of one layer's projections for `tokens` tokens
    /// (MoE: only the experts each token is routed to).
    pub fn projection_flops(&self, group: WeightGroup, tokens: u64) -> u64 {
        let p = self.params();
        let params = match group {
            WeightGroup::Attention => p.attention_per_layer,
            WeightGroup::Mlp => {
                if self.num_experts > 0 {
                    self.experts_per_token * self.expert_params()
                        + self.hidden_size * self.num_experts
                        + self.shared_expert_params()
                } else {
                    p.mlp_per_layer
                }
            }
            WeightGroup::Embeddings => 0,
            WeightGroup::Head => self.vocab_size * self.hidden_size,
        };
        2 * params * tokens
    }

    /// FLOPs of attention itself (scores and weighted sum) for `new_tokens` queries over
    /// a cache that ends at `context` positions (causal in prefill).
    pub fn attention_core_flops(&self, new_tokens: u64, context: u64) -> u64 {
        // Each query at position p attends to p + 1 keys; summed over the new tokens.
        let first = context - new_tokens + 1;
        let keys_total = (first + context) * new_tokens / 2;
        4 * self.q_dim() * keys_total
    }
}

/// At most 2^48 parameters (about 281 trillion), so bytes and FLOPs fit in 64 bits.
const MAX_PARAMS: u128 = 1 << 48;

#[cfg(test)]
mod tests;
