//! A model's shape from a GGUF header: llama.cpp's metadata keys (`{arch}.block_count`,
//! `{arch}.embedding_length`, …) mapped onto `ModelSpec` with the same ranges as a
//! `config.json`, and the file's bytes per weight group by the tensor types it really
//! holds (a Q4_K_M file mixes Q4_K, Q6_K and F32 tensors).

use std::collections::BTreeMap;

use super::hf_config::{MAX_EXPERTS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH};
use super::{Dtype, Family, GroupSize, ModelSpec, RopeScaling, WeightFormat, WeightGroup, WeightLayout};
use crate::error::{CoreError, Result};
use crate::gguf::{GgufHeader, Value};

/// The shape a GGUF header describes, with the file's own bytes per group and layer
/// (`ModelSpec::stored`: what a plan's `stored` format means for this file). `dtype` is
/// the file's float type when every matrix is F32, F16 or BF16 (else F16, the type
/// tensors a quantizer leaves alone are usually in).
pub fn from_gguf(header: &GgufHeader, name: &str) -> Result<ModelSpec> {
    let origin = header.path.display().to_string();
    let bad = |message: String| CoreError::invalid(format!("{origin}: {message}"));
    let arch = header.architecture()?;
    let family = match arch {
        "llama" => Family::Llama,
        "mistral" => Family::Mistral,
        "qwen2" | "qwen2moe" => Family::Qwen2,
        "qwen3" | "qwen3moe" => Family::Qwen3,
        other => {
            return Err(bad(format!(
                "architecture '{other}' is not one Ferry reads (llama, mistral, qwen2, qwen2moe, qwen3, qwen3moe)"
            )))
        }
    };
    let size = |key: &str, max: u64| -> Result<Option<u64>> {
        let full = format!("{arch}.{key}");
        match header.get(&full) {
            None => Ok(None),
            Some(_) => match header.uint(&full)? {
                v if (1..=max).contains(&v) => Ok(Some(v)),
                v => Err(bad(format!("`{full}` = {v} is outside 1..={max}"))),
            },
        }
    };
    let need = |key: &str, max: u64| -> Result<u64> {
        size(key, max)?.ok_or_else(|| bad(format!("metadata `{arch}.{key}` is missing")))
    };
    let positive = |key: &str| -> Result<Option<f64>> {
        let full = format!("{arch}.{key}");
        match header.get(&full) {
            None => Ok(None),
            Some(Value::Float(v)) if v.is_finite() && *v > 0.0 => Ok(Some(*v)),
            Some(other) => Err(bad(format!("`{full}` = {other:?} is not a positive number"))),
        }
    };
    let heads = need("attention.head_count", MAX_WIDTH)?;
    let embeddings = header.tensors.iter().find(|t| t.name == "token_embd.weight");
    let vocab = match header.get("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => tokens.len() as u64,
        _ => embeddings.and_then(|t| t.dims.get(1).copied()).unwrap_or(0),
    };
    if !(1..=MAX_VOCAB).contains(&vocab) {
        return Err(bad(format!("the vocabulary has {vocab} tokens (tokenizer.ggml.tokens or token_embd.weight)")));
    }
    let hidden = need("embedding_length", MAX_WIDTH)?;
    let experts = size("expert_count", MAX_EXPERTS)?.unwrap_or(0);
    // Qwen3-MoE gives its experts' width apart from the (unused) dense one.
    let ffn = match size("expert_feed_forward_length", MAX_WIDTH)? {
        Some(width) if experts > 0 => width,
        _ => need("feed_forward_length", MAX_WIDTH)?,
    };
    let head_dim = ModelSpec::own_head_dim(size("attention.key_length", MAX_WIDTH)?, hidden, heads);
    let shared_expert =
        if experts > 0 { size("expert_shared_feed_forward_length", MAX_WIDTH)?.unwrap_or(0) } else { 0 };
    // llama.cpp weighs Qwen2-MoE's chosen experts by their share of the whole softmax and
    // renormalises the others' (Mixtral, Qwen3-MoE), unless the file says otherwise.
    let renormalize_top_k = match header.get(&format!("{arch}.expert_weights_norm")) {
        Some(Value::Bool(norm)) => *norm,
        Some(other) => return Err(bad(format!("`{arch}.expert_weights_norm` = {other:?} is not true or false"))),
        None => arch != "qwen2moe",
    };
    // llama.cpp's rope scaling keys; Llama 3.1's comes as the `rope_freqs` tensor instead,
    // which the engine reads with the weights (`ModelSpec::rope_divisors`).
    let rope_scaling = match header.get(&format!("{arch}.rope.scaling.type")) {
        None => None,
        Some(Value::String(kind)) if kind == "none" => None,
        Some(Value::String(kind)) if kind == "linear" => match positive("rope.scaling.factor")? {
            Some(factor) => Some(RopeScaling::Linear { factor }),
            None => {
                return Err(bad(format!(
                    "`{arch}.rope.scaling.type` is linear but `{arch}.rope.scaling.factor` is missing"
                )))
            }
        },
        Some(other) => {
            return Err(bad(format!(
                "`{arch}.rope.scaling.type` = {other:?} is not implemented (Ferry runs linear scaling and a \
                 `rope_freqs` tensor); computing without it would give another model's outputs"
            )))
        }
    };
    let spec = ModelSpec {
        name: name.to_string(),
        family,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_layers: need("block_count", MAX_LAYERS)?,
        num_heads: heads,
        num_kv_heads: size("attention.head_count_kv", MAX_WIDTH)?.unwrap_or(heads),
        vocab_size: vocab,
        max_position_embeddings: size("context_length", MAX_POSITIONS)?.unwrap_or(4096),
        // llama.cpp writes no `output.weight` when the head is the embeddings.
        tie_word_embeddings: !header.tensors.iter().any(|t| t.name == "output.weight"),
        num_experts: experts,
        experts_per_token: size("expert_used_count", MAX_EXPERTS)?.unwrap_or(0),
        shared_expert_intermediate_size: shared_expert,
        renormalize_top_k: renormalize_top_k || experts == 0,
        qkv_bias: header.tensors.iter().any(|t| t.name.ends_with("attn_q.bias")),
        head_dim,
        rms_norm_eps: positive("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        rope_theta: positive("rope.freq_base")?.unwrap_or(10000.0),
        rope_scaling,
        rope_divisors: None,
        dtype: float_dtype(header).unwrap_or(Dtype::F16),
        source: origin.clone(),
        stored: None,
        routing: None,
    };
    spec.validate().map_err(|e| bad(e.to_string()))?;
    let stored = stored_layout(header, &spec).map_err(bad)?;
    Ok(ModelSpec { stored: Some(std::sync::Arc::new(stored)), ..spec })
}

/// The file's bytes per group and layer: every tensor of the shape (`group_tensors`)
/// found under its llama.cpp name and priced in its own ggml type (tensors of no group
/// Ferry knows, such as `rope_freqs`, are left out as `GroupBytes::other`).
fn stored_layout(header: &GgufHeader, spec: &ModelSpec) -> std::result::Result<WeightLayout, String> {
    let by_name: std::collections::HashMap<&str, &crate::gguf::TensorInfo> =
        header.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let group_size = |group: WeightGroup, layer: u64| -> std::result::Result<GroupSize, String> {
        let mut size = GroupSize::default();
        for tensor in spec.group_tensors(group, layer) {
            let name = gguf_name(&tensor.name).ok_or_else(|| format!("no llama.cpp name for {}", tensor.name))?;
            let info = by_name.get(name.as_str()).ok_or_else(|| {
                format!("the file has no tensor `{name}` ({}, which its metadata implies)", tensor.name)
            })?;
            let format = match info.ggml_type.name {
                "F32" => WeightFormat::F32,
                "F16" => WeightFormat::F16,
                "BF16" => WeightFormat::Bf16,
                _ => WeightFormat::Block(info.ggml_type),
            };
            // Experts are one 3-D tensor per layer in a GGUF file: each expert is a slice.
            let experts = if name.contains("_exps.") { spec.num_experts.max(1) } else { 1 };
            if info.elements() != tensor.elements() * experts || info.dims[0] != tensor.cols {
                return Err(format!(
                    "tensor `{name}` has shape {:?} but the metadata implies {} × {}",
                    info.dims, tensor.rows, tensor.cols
                ));
            }
            size.add(format, format.bytes(tensor.rows, tensor.cols));
        }
        Ok(size)
    };
    let mut layers = Vec::with_capacity(spec.num_layers as usize);
    for layer in 0..spec.num_layers {
        layers.push([group_size(WeightGroup::Attention, layer)?, group_size(WeightGroup::Mlp, layer)?]);
    }
    if layers.windows(2).all(|w| w[0] == w[1]) {
        layers.truncate(1);
    }
    let embeddings = group_size(WeightGroup::Embeddings, 0)?;
    let token_embedding = embeddings.tensors.first().copied().unwrap_or(WeightFormat::F32);
    let head = group_size(WeightGroup::Head, 0)?;
    Ok(WeightLayout::from_parts(layers, spec.num_layers, embeddings, head, token_embedding, spec.hidden_size))
}

/// llama.cpp's name of a tensor Ferry names as Hugging Face does (experts: the
/// layer's one 3-D tensor they are slices of).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let (layer, tensor) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let mapped = match tensor {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "block_sparse_moe.gate.weight" | "mlp.gate.weight" => "ffn_gate_inp.weight",
        "mlp.shared_expert.gate_proj.weight" => "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight" => "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight" => "ffn_down_shexp.weight",
        "mlp.shared_expert_gate.weight" => "ffn_gate_inp_shexp.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        t if t.starts_with("self_attn.") => {
            let (projection, kind) = t.strip_prefix("self_attn.")?.split_once('.')?;
            let short = match projection {
                "q_proj" => "attn_q",
                "k_proj" => "attn_k",
                "v_proj" => "attn_v",
                "o_proj" => "attn_output",
                _ => return None,
            };
            return Some(format!("blk.{layer}.{short}.{kind}"));
        }
        t if t.starts_with("block_sparse_moe.experts.") || t.starts_with("mlp.experts.") => {
            match t.rsplit('.').nth(1)? {
                "w1" | "gate_proj" => "ffn_gate_exps.weight",
                "w2" | "down_proj" => "ffn_down_exps.weight",
                "w3" | "up_proj" => "ffn_up_exps.weight",
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

/// The one float type of every matrix in the file, if it has one (norms are F32 in
/// any GGUF file and do not count).
pub fn float_dtype(header: &GgufHeader) -> Option<Dtype> {
    let mut types = header.tensors.iter().filter(|t| t.dims.len() > 1).map(|t| t.ggml_type.name);
    let first = types.next()?;
    let dtype = match first {
        "F32" => Dtype::F32,
        "F16" => Dtype::F16,
        "BF16" => Dtype::Bf16,
        _ => return None,
    };
    types.all(|t| t == first).then_some(dtype)
}

/// A file's bytes in each weight group, with the tensor types each holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupBytes {
    /// Per group: total bytes (all layers for per-layer groups) and bytes per type name.
    pub groups: BTreeMap<WeightGroup, (u64, BTreeMap<&'static str, u64>)>,
    /// Tensors that belong to no group Ferry knows, by name.
    pub other: Vec<String>,
}

impl GroupBytes {
    pub fn of(header: &GgufHeader) -> GroupBytes {
        let mut out = GroupBytes::default();
        for t in &header.tensors {
            let Some(group) = group_of(&t.name) else {
                out.other.push(t.name.clone());
                continue;
            };
            let bytes = t.end - t.start;
            let entry = out.groups.entry(group).or_default();
            entry.0 += bytes;
            *entry.1.entry(t.ggml_type.name).or_default() += bytes;
        }
        out
    }
}

/// The weight group of a tensor by llama.cpp's names.
pub fn group_of(name: &str) -> Option<WeightGroup> {
    if name.starts_with("token_embd.") {
        return Some(WeightGroup::Embeddings);
    }
    if name.starts_with("output.") || name.starts_with("output_norm.") {
        return Some(WeightGroup::Head);
    }
    let rest = name.strip_prefix("blk.")?;
    let (_, tensor) = rest.split_once('.')?;
    if tensor.starts_with("attn_") {
        Some(WeightGroup::Attention)
    } else if tensor.starts_with("ffn_") {
        // Experts and the router count with the MLP, as in `WeightGroup::Mlp`.
        Some(WeightGroup::Mlp)
    } else {
        None
    }
}
