//! `ferry synth`: a Hugging Face style folder (`config.json`, `model.safetensors`)
//! with deterministic random weights of any Llama-family catalog shape, for tests and
//! benchmarks. Each tensor's values depend only on the seed and the tensor's name.

use std::path::Path;

use ferry_core::model::{Dtype, Family, ModelSpec, WeightGroup};

use crate::EngineError;

/// Standard deviation of the random weights (Hugging Face's `initializer_range`).
const WEIGHT_STD: f64 = 0.02;

/// SplitMix64: small, fast, and reproducible across platforms.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn next_signed(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// FNV-1a of the tensor name, mixed with the seed: each tensor gets its own stream.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in name.bytes() {
        hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
    }
    hash ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The values of one synthetic tensor, in row-major order (norm weights near 1).
pub fn tensor_values(seed: u64, name: &str, elements: u64) -> impl Iterator<Item = f32> {
    let mut rng = SplitMix64::new(tensor_seed(seed, name));
    let is_norm = name.contains("norm");
    // Uniform with the given standard deviation: half-width std × √3.
    let scale = (WEIGHT_STD * 3f64.sqrt()) as f32;
    (0..elements).map(move |_| if is_norm { 1.0 + 0.1 * rng.next_signed() } else { scale * rng.next_signed() })
}

/// Every tensor of a Llama-family model, in file order.
pub fn tensor_list(model: &ModelSpec) -> Vec<(String, Vec<u64>)> {
    let mut list = Vec::new();
    let mut add = |specs: Vec<ferry_core::model::TensorSpec>| {
        for t in specs {
            let shape = if t.rows == 1 { vec![t.cols] } else { vec![t.rows, t.cols] };
            list.push((t.name, shape));
        }
    };
    add(model.group_tensors(WeightGroup::Embeddings, 0));
    for layer in 0..model.num_layers {
        add(model.group_tensors(WeightGroup::Attention, layer));
        add(model.group_tensors(WeightGroup::Mlp, layer));
    }
    add(model.group_tensors(WeightGroup::Head, 0));
    list
}

/// Whether Ferry's engine can run this architecture.
pub fn check_supported(model: &ModelSpec) -> Result<(), EngineError> {
    if model.family == Family::Opt {
        return Err(EngineError::Unsupported(format!(
            "{} ({:?}{}) is not supported by the engine yet: it runs Llama-family decoders (llama, mistral, \
             qwen2, qwen3) and mixtures of experts (Mixtral, Qwen3-MoE)",
            model.name,
            model.family,
            if model.num_experts > 0 { ", mixture of experts" } else { "" }
        )));
    }
    Ok(())
}

/// The `config.json` of a synthetic model.
pub fn config_json(model: &ModelSpec, dtype: Dtype) -> serde_json::Value {
    let (model_type, architecture) = match model.family {
        Family::Qwen3 if model.num_experts > 0 => ("qwen3_moe", "Qwen3MoeForCausalLM"),
        Family::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        Family::Qwen2 if model.num_experts > 0 => ("qwen2_moe", "Qwen2MoeForCausalLM"),
        _ if model.num_experts > 0 => ("mixtral", "MixtralForCausalLM"),
        Family::Mistral => ("mistral", "MistralForCausalLM"),
        Family::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        _ => ("llama", "LlamaForCausalLM"),
    };
    let mut config = serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.rms_norm_eps,
        "rope_theta": model.rope_theta,
        "tie_word_embeddings": model.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": match dtype { Dtype::F32 => "float32", Dtype::Bf16 => "bfloat16", _ => "float16" },
        "ferry_synthetic": {"source": model.name, "note": "random weights written by ferry synth"},
    });
    if let Some(head_dim) = model.head_dim {
        config["head_dim"] = head_dim.into();
    }
    if let Some(scaling) = &model.rope_scaling {
        // Serialised with its `type`; Hugging Face names it `rope_type` now.
        let mut value = serde_json::to_value(scaling).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            let kind = map.remove("type").unwrap_or_default();
            map.insert("rope_type".into(), kind);
        }
        config["rope_scaling"] = value;
    }
    match (model.num_experts, model.family) {
        (0, _) => {}
        (experts, Family::Qwen2 | Family::Qwen3) => {
            // Qwen-MoE's names: every layer sparse.
            config["num_experts"] = experts.into();
            config["num_experts_per_tok"] = model.experts_per_token.into();
            config["moe_intermediate_size"] = model.intermediate_size.into();
            config["norm_topk_prob"] = model.renormalize_top_k.into();
            config["decoder_sparse_step"] = 1.into();
            config["mlp_only_layers"] = serde_json::json!([]);
            if model.shared_expert_intermediate_size > 0 {
                config["shared_expert_intermediate_size"] = model.shared_expert_intermediate_size.into();
            }
        }
        (experts, _) => {
            config["num_local_experts"] = experts.into();
            config["num_experts_per_tok"] = model.experts_per_token.into();
        }
    }
    config
}

/// Layers from `from_layer` on add their attention and MLP outputs to the residual
/// stream scaled by `factor` (their `o_proj` and `down_proj` weights are): a model whose
/// later layers are small perturbations of what its first layers compute, so that those
/// first layers predict most of its tokens — the honest way to make a self-speculating
/// draft agree with a random model for a reason.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Damping {
    pub from_layer: u64,
    pub factor: f32,
}

impl Damping {
    /// The factor for tensor `name` (1 for every tensor it does not touch).
    pub fn factor_for(damping: Option<Damping>, name: &str) -> f32 {
        let Some(d) = damping else { return 1.0 };
        let layer = name.strip_prefix("model.layers.").and_then(|rest| rest.split('.').next()?.parse::<u64>().ok());
        let output = name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight");
        match layer {
            Some(layer) if output && layer >= d.from_layer => d.factor,
            _ => 1.0,
        }
    }
}

/// Writes the folder. Refuses a non-empty folder unless `force`. `progress(bytes_done,
/// bytes_total)` is called as tensors are written.
pub fn synthesize(
    model: &ModelSpec,
    dtype: Dtype,
    seed: u64,
    out: &Path,
    force: bool,
    progress: impl FnMut(u64, u64),
) -> Result<(), EngineError> {
    synthesize_damped(model, dtype, seed, None, out, force, progress)
}

/// `synthesize` with the later layers damped (`Damping`).
pub fn synthesize_damped(
    model: &ModelSpec,
    dtype: Dtype,
    seed: u64,
    damping: Option<Damping>,
    out: &Path,
    force: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), EngineError> {
    if let Some(d) = damping {
        if !d.factor.is_finite() || d.factor < 0.0 || d.from_layer >= model.num_layers {
            return Err(EngineError::Refused(format!(
                "damping: layers from {} of {}'s {} by {}: give a layer below {} and a finite factor ≥ 0",
                d.from_layer, model.name, model.num_layers, d.factor, model.num_layers
            )));
        }
    }
    check_supported(model)?;
    if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::Bf16) {
        return Err(EngineError::Unsupported("synth writes f32, f16 or bf16".into()));
    }
    ferry_core::atomic::refuse_symlink(out)?;
    if out.exists() {
        let non_empty = std::fs::read_dir(out).map_err(|e| EngineError::io(out, e))?.next().is_some();
        if non_empty && !force {
            return Err(EngineError::Refused(format!("{} is not empty; pass --force to overwrite it", out.display())));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| EngineError::io(out, e))?;
    // config.json is what makes the folder a model: an old one goes first and the new
    // one is written last, so a synth that fails or is killed midway never leaves a
    // config.json beside weights of another shape or a missing safetensors file.
    let config_path = out.join("config.json");
    if force {
        match std::fs::remove_file(&config_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(EngineError::io(&config_path, e)),
            _ => {}
        }
    }
    let list = tensor_list(model);
    let total: u64 = list.iter().map(|(_, s)| dtype.bytes_of(s.iter().product())).sum();
    let tensors: Vec<(String, Dtype, Vec<u64>)> = list.iter().map(|(n, s)| (n.clone(), dtype, s.clone())).collect();
    let mut done = 0u64;
    let mut buffer: Vec<u8> = Vec::with_capacity(4 << 20);
    crate::safetensors::write(&out.join("model.safetensors"), force, &tensors, |index, writer| {
        let (name, shape) = &list[index];
        let elements: u64 = shape.iter().product();
        let factor = Damping::factor_for(damping, name);
        let mut values = tensor_values(seed, name, elements).map(move |v| v * factor);
        let mut left = elements;
        while left > 0 {
            let n = left.min(1 << 20);
            buffer.clear();
            encode(values.by_ref().take(n as usize), dtype, &mut buffer);
            std::io::Write::write_all(writer, &buffer)?;
            left -= n;
            done += dtype.bytes_of(n);
            progress(done, total);
        }
        Ok(())
    })?;
    let config = serde_json::to_string_pretty(&config_json(model, dtype)).expect("config serializes");
    ferry_core::atomic::write_atomic(&config_path, config.as_bytes(), force)?;
    Ok(())
}

/// Appends values in `dtype`'s little-endian encoding.
pub fn encode(values: impl Iterator<Item = f32>, dtype: Dtype, out: &mut Vec<u8>) {
    match dtype {
        Dtype::F32 => values.for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => values.for_each(|v| out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())),
        _ => values.for_each(|v| out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())),
    }
}
