//! A model's shape from a GGUF header: llama.cpp's metadata keys (`{arch}.block_count`,
//! `{arch}.embedding_length`, …) mapped onto `ModelSpec` with the same ranges as a
//! `config.json`, and the file's bytes per weight group by the tensor types it really
//! holds (a Q4_K_M file mixes Q4_K, Q6_K and F32 tensors).

use std::collections::BTreeMap;

use super::hf_config::{MAX_EXPERTS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH};
use super::{Dtype, Family, ModelSpec, WeightGroup};
use crate::error::{CoreError, Result};
use crate::gguf::{GgufHeader, Value};

/// The shape a GGUF header describes. `dtype` is the file's float type when every
/// matrix is F32, F16 or BF16; a file with quantized tensors is described by
/// `GroupBytes`, and planning it waits for quantized formats.
pub fn from_gguf(header: &GgufHeader, name: &str) -> Result<ModelSpec> {
    let origin = header.path.display().to_string();
    let bad = |message: String| CoreError::invalid(format!("{origin}: {message}"));
    let arch = header.architecture()?;
    let family = match arch {
        "llama" => Family::Llama,
        "mistral" => Family::Mistral,
        "qwen2" => Family::Qwen2,
        other => return Err(bad(format!("architecture '{other}' is not one Ferry reads (llama, mistral, qwen2)"))),
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
    let spec = ModelSpec {
        name: name.to_string(),
        family,
        hidden_size: need("embedding_length", MAX_WIDTH)?,
        intermediate_size: need("feed_forward_length", MAX_WIDTH)?,
        num_layers: need("block_count", MAX_LAYERS)?,
        num_heads: heads,
        num_kv_heads: size("attention.head_count_kv", MAX_WIDTH)?.unwrap_or(heads),
        vocab_size: vocab,
        max_position_embeddings: size("context_length", MAX_POSITIONS)?.unwrap_or(4096),
        // llama.cpp writes no `output.weight` when the head is the embeddings.
        tie_word_embeddings: !header.tensors.iter().any(|t| t.name == "output.weight"),
        num_experts: size("expert_count", MAX_EXPERTS)?.unwrap_or(0),
        experts_per_token: size("expert_used_count", MAX_EXPERTS)?.unwrap_or(0),
        qkv_bias: header.tensors.iter().any(|t| t.name.ends_with("attn_q.bias")),
        rms_norm_eps: positive("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        rope_theta: positive("rope.freq_base")?.unwrap_or(10000.0),
        dtype: float_dtype(header).unwrap_or(Dtype::F16),
        source: origin.clone(),
    };
    spec.validate().map_err(|e| bad(e.to_string()))?;
    Ok(spec)
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
