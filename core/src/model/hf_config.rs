//! Reading a Hugging Face `config.json` into a `ModelSpec`: every key typed and
//! range-checked, an error naming the file and the key for anything else.

use super::{Dtype, Family, ModelSpec, RopeScaling};
use crate::error::{CoreError, Result};

/// The largest sizes a `config.json` may give: far above any released model, low
/// enough that Ferry's parameter and byte arithmetic cannot overflow.
pub(super) const MAX_WIDTH: u64 = 1 << 20;
pub(super) const MAX_LAYERS: u64 = 1 << 14;
pub(super) const MAX_VOCAB: u64 = 1 << 24;
pub(super) const MAX_POSITIONS: u64 = 1 << 26;
pub(super) const MAX_EXPERTS: u64 = 1 << 12;

/// Typed access to a `config.json` object: a key of the wrong type or out of range is
/// an error naming the file and the key, never silently replaced by a default. A key
/// that is absent or `null` is absent.
struct HfConfig<'a> {
    map: &'a serde_json::Map<String, serde_json::Value>,
    origin: &'a str,
}

impl HfConfig<'_> {
    fn value(&self, key: &str) -> Option<&serde_json::Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, expected: &str) -> CoreError {
        let found = self.value(key).map(|v| v.to_string()).unwrap_or_default();
        let found: String =
            if found.chars().count() > 40 { found.chars().take(40).chain("...".chars()).collect() } else { found };
        CoreError::invalid(format!("{}: '{key}' must be {expected}, found {found}", self.origin))
    }

    /// An integer in `1..=max`.
    fn size(&self, key: &str, max: u64) -> Result<Option<u64>> {
        let Some(value) = self.value(key) else { return Ok(None) };
        match value.as_u64() {
            Some(n) if (1..=max).contains(&n) => Ok(Some(n)),
            _ => Err(self.wrong(key, &format!("an integer from 1 to {max}"))),
        }
    }

    fn need_size(&self, key: &str, max: u64) -> Result<u64> {
        self.size(key, max)?
            .ok_or_else(|| CoreError::invalid(format!("{}: missing integer field '{key}'", self.origin)))
    }

    /// A positive, finite number.
    fn positive(&self, key: &str) -> Result<Option<f64>> {
        let Some(value) = self.value(key) else { return Ok(None) };
        match value.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
            _ => Err(self.wrong(key, "a positive finite number")),
        }
    }

    fn flag(&self, key: &str) -> Result<Option<bool>> {
        let Some(value) = self.value(key) else { return Ok(None) };
        value.as_bool().map(Some).ok_or_else(|| self.wrong(key, "true or false"))
    }

    fn text(&self, key: &str) -> Result<Option<&str>> {
        let Some(value) = self.value(key) else { return Ok(None) };
        value.as_str().map(Some).ok_or_else(|| self.wrong(key, "a string"))
    }
}

/// Reads a Hugging Face `config.json` (llama, mistral, qwen2, qwen2_moe, qwen3, qwen3_moe,
/// mixtral, opt).
pub fn from_hf_config(text: &str, origin: &str, name: &str) -> Result<ModelSpec> {
    let value: serde_json::Value = crate::yaml::from_json_str(text, origin)?;
    let map = value
        .as_object()
        .ok_or_else(|| CoreError::invalid(format!("{origin}: a config.json must be a JSON object")))?;
    let config = HfConfig { map, origin };
    let model_type = config.text("model_type")?.unwrap_or("");
    let family = match model_type {
        "llama" => Family::Llama,
        "mistral" => Family::Mistral,
        "qwen2" | "qwen2_moe" => Family::Qwen2,
        "qwen3" | "qwen3_moe" => Family::Qwen3,
        "mixtral" => Family::Mixtral,
        "opt" => Family::Opt,
        other => {
            return Err(CoreError::invalid(format!(
                "{origin}: unsupported model_type '{other}' (Ferry reads llama, mistral, qwen2, qwen2_moe, qwen3, \
                 qwen3_moe, mixtral and opt)"
            )))
        }
    };
    let dtype = match config.text("torch_dtype")? {
        Some("float32" | "float") => Dtype::F32,
        Some("bfloat16") => Dtype::Bf16,
        Some("float16" | "half") | None => Dtype::F16,
        Some(other) => {
            return Err(CoreError::invalid(format!(
                "{origin}: unsupported torch_dtype '{other}' (Ferry reads float32, float16 and bfloat16)"
            )))
        }
    };
    let spec = if family == Family::Opt {
        let hidden = config.need_size("hidden_size", MAX_WIDTH)?;
        let heads = config.need_size("num_attention_heads", MAX_WIDTH)?;
        // OPT always ties its head to the embeddings; a config that says so is fine.
        config.flag("tie_word_embeddings")?;
        ModelSpec {
            name: name.to_string(),
            family,
            hidden_size: hidden,
            intermediate_size: config.need_size("ffn_dim", MAX_WIDTH)?,
            num_layers: config.need_size("num_hidden_layers", MAX_LAYERS)?,
            num_heads: heads,
            num_kv_heads: heads,
            vocab_size: config.need_size("vocab_size", MAX_VOCAB)?,
            max_position_embeddings: config.need_size("max_position_embeddings", MAX_POSITIONS)?,
            tie_word_embeddings: true,
            num_experts: 0,
            experts_per_token: 0,
            shared_expert_intermediate_size: 0,
            renormalize_top_k: true,
            qkv_bias: true,
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 0.0,
            rope_scaling: None,
            rope_divisors: None,
            dtype,
            source: origin.to_string(),
            stored: None,
            routing: None,
        }
    } else {
        match config.text("hidden_act")? {
            Some("silu" | "swish") | None => {}
            Some(other) => {
                return Err(CoreError::invalid(format!(
                    "{origin}: unsupported hidden_act '{other}' ({model_type} models use silu)"
                )))
            }
        }
        let heads = config.need_size("num_attention_heads", MAX_WIDTH)?;
        // Mixtral counts its experts in `num_local_experts`, Qwen in `num_experts`.
        let experts_key = if config.value("num_local_experts").is_some() { "num_local_experts" } else { "num_experts" };
        let experts = match config.value(experts_key).and_then(|v| v.as_u64()) {
            Some(0) => 0,
            _ => config.size(experts_key, MAX_EXPERTS)?.unwrap_or(0),
        };
        if experts > 0 {
            check_every_layer_sparse(&config, origin)?;
        }
        // Mixtral always renormalises its top-k weights; Qwen-MoE does when told to (the
        // default of its Hugging Face configs is not to).
        let renormalize_top_k = family == Family::Mixtral || config.flag("norm_topk_prob")?.unwrap_or(false);
        let shared_expert = match config.size("shared_expert_intermediate_size", MAX_WIDTH)? {
            Some(width) if experts > 0 => width,
            Some(_) => {
                return Err(CoreError::invalid(format!(
                    "{origin}: 'shared_expert_intermediate_size' is given but the model has no experts \
                     ({experts_key})"
                )))
            }
            None => 0,
        };
        let hidden = config.need_size("hidden_size", MAX_WIDTH)?;
        // Qwen-MoE's experts have their own width; its dense `intermediate_size` is unused
        // when every layer is sparse.
        let ffn = match config.size("moe_intermediate_size", MAX_WIDTH)? {
            Some(width) if experts > 0 => width,
            _ => config.need_size("intermediate_size", MAX_WIDTH)?,
        };
        let head_dim = ModelSpec::own_head_dim(config.size("head_dim", MAX_WIDTH)?, hidden, heads);
        // Llama's optional biases (on q, k, v and o, or on the MLP's three projections)
        // are not Qwen2's q, k and v biases: refused, not run without them.
        for key in ["attention_bias", "mlp_bias"] {
            if family != Family::Qwen2 && config.flag(key)?.unwrap_or(false) {
                return Err(CoreError::invalid(format!(
                    "{origin}: '{key}': true is not implemented for {model_type} models (their projections' \
                     biases); Ferry runs them without biases only"
                )));
            }
        }
        let positions = config.size("max_position_embeddings", MAX_POSITIONS)?.unwrap_or(4096);
        let experts_per_token = match config.value("num_experts_per_tok").and_then(|v| v.as_u64()) {
            Some(0) => 0,
            _ => config.size("num_experts_per_tok", MAX_EXPERTS)?.unwrap_or(0),
        };
        ModelSpec {
            name: name.to_string(),
            family,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_layers: config.need_size("num_hidden_layers", MAX_LAYERS)?,
            num_heads: heads,
            num_kv_heads: config.size("num_key_value_heads", MAX_WIDTH)?.unwrap_or(heads),
            vocab_size: config.need_size("vocab_size", MAX_VOCAB)?,
            max_position_embeddings: positions.min(sliding_window(&config, family)?.unwrap_or(u64::MAX)),
            tie_word_embeddings: config.flag("tie_word_embeddings")?.unwrap_or(false),
            num_experts: experts,
            experts_per_token,
            shared_expert_intermediate_size: shared_expert,
            renormalize_top_k: renormalize_top_k || experts == 0,
            qkv_bias: family == Family::Qwen2,
            head_dim,
            rms_norm_eps: config.positive("rms_norm_eps")?.unwrap_or(1e-5),
            rope_theta: config.positive("rope_theta")?.unwrap_or(10000.0),
            rope_scaling: match config.value("rope_scaling") {
                Some(value) => RopeScaling::from_hf(value, origin)?,
                None => None,
            },
            rope_divisors: None,
            dtype,
            source: origin.to_string(),
            stored: None,
            routing: None,
        }
    };
    spec.validate().map_err(|e| CoreError::invalid(format!("{origin}: {e}")))?;
    Ok(spec)
}

/// The attention window of a model that attends only to its last `sliding_window`
/// positions (Mistral's; Qwen's where `use_sliding_window` is true). The engine
/// attends to every position, which is the same computation up to the window's
/// length, so a model read from a config is capped to it: longer runs are refused
/// as past the model's positions, not computed differently.
fn sliding_window(config: &HfConfig, family: Family) -> Result<Option<u64>> {
    let applies = match family {
        Family::Mistral | Family::Mixtral => true,
        Family::Qwen2 | Family::Qwen3 => config.flag("use_sliding_window")?.unwrap_or(false),
        _ => false,
    };
    if !applies {
        return Ok(None);
    }
    config.size("sliding_window", MAX_POSITIONS)
}

/// Ferry models a mixture of experts whose every layer is sparse: Qwen-MoE's
/// `decoder_sparse_step` above 1 or `mlp_only_layers` would mix dense layers in.
fn check_every_layer_sparse(config: &HfConfig, origin: &str) -> Result<()> {
    let unsupported = |what: &str| {
        Err(CoreError::invalid(format!(
            "{origin}: {what}; Ferry models mixtures of experts whose every layer is sparse"
        )))
    };
    if config.size("decoder_sparse_step", MAX_LAYERS)?.is_some_and(|step| step > 1) {
        return unsupported("decoder_sparse_step above 1 makes some layers dense");
    }
    if config.value("mlp_only_layers").and_then(|v| v.as_array()).is_some_and(|layers| !layers.is_empty()) {
        return unsupported("mlp_only_layers makes some layers dense");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> serde_json::Map<String, serde_json::Value> {
        let text = r#"{"model_type": "llama", "hidden_size": 128, "intermediate_size": 352,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": false, "hidden_act": "silu",
            "torch_dtype": "float32"}"#;
        serde_json::from_str(text).unwrap()
    }

    fn parse_with(key: &str, value: serde_json::Value) -> Result<ModelSpec> {
        let mut config = tiny_config();
        config.insert(key.to_string(), value);
        from_hf_config(&serde_json::Value::Object(config).to_string(), "m/config.json", "m")
    }

    #[test]
    fn config_values_of_the_wrong_type_are_errors_naming_the_key() {
        use serde_json::json;
        let cases = [
            ("rope_theta", json!("128")),
            ("rms_norm_eps", json!({})),
            ("hidden_act", json!(64)),
            ("tie_word_embeddings", json!(256)),
            ("hidden_size", json!("128")),
            ("num_key_value_heads", json!(2.5)),
            ("max_position_embeddings", json!([256])),
            ("torch_dtype", json!(16)),
            ("model_type", json!(1)),
        ];
        for (key, value) in cases {
            let err = parse_with(key, value.clone()).unwrap_err().to_string();
            assert!(err.starts_with("m/config.json: ") && err.contains(&format!("'{key}'")), "{key}={value}: {err}");
        }
        // Absent or null optional keys take their defaults.
        let spec = parse_with("num_key_value_heads", json!(null)).unwrap();
        assert_eq!(spec.num_kv_heads, 4);
        let spec = parse_with("rope_theta", json!(null)).unwrap();
        assert_eq!(spec.rope_theta, 10000.0);
    }

    #[test]
    fn config_values_out_of_range_are_errors() {
        use serde_json::json;
        let cases = [
            ("rope_theta", json!(0)),
            ("rope_theta", json!(-10000.0)),
            ("rms_norm_eps", json!(-1)),
            ("rms_norm_eps", json!(0.0)),
            ("hidden_size", json!(0)),
            ("hidden_size", json!(-128)),
            ("num_hidden_layers", json!(1u64 << 40)),
            ("vocab_size", json!(u64::MAX)),
            ("max_position_embeddings", json!(0)),
            ("hidden_act", json!("gelu")),
            ("torch_dtype", json!("int3")),
        ];
        for (key, value) in cases {
            let err = parse_with(key, value.clone()).unwrap_err().to_string();
            assert!(err.contains(key), "{key}={value}: {err}");
        }
        parse_with("rms_norm_eps", json!(1e-6)).unwrap();
        // Sizes that fit each bound but together would overflow the parameter count.
        let mut config = tiny_config();
        for key in ["hidden_size", "intermediate_size"] {
            config.insert(key.into(), json!(1u64 << 20));
        }
        config.insert("num_hidden_layers".into(), json!(1u64 << 14));
        let err = from_hf_config(&serde_json::Value::Object(config).to_string(), "m/config.json", "m")
            .unwrap_err()
            .to_string();
        assert!(err.contains("implausibly large"), "{err}");
    }

    /// Qwen3-30B-A3B's config.json (the keys that matter): experts counted in
    /// `num_experts`, their width in `moe_intermediate_size`, a head width of its own.
    #[test]
    fn qwen3_moe_configs_read_as_their_published_shape() {
        let text = r#"{"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
            "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
            "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
            "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "tie_word_embeddings": false, "hidden_act": "silu",
            "torch_dtype": "bfloat16"}"#;
        let spec = from_hf_config(text, "q/config.json", "q").unwrap();
        let catalog = crate::catalog::Catalog::builtin().unwrap().model("qwen3-30b-a3b").unwrap().value;
        assert_eq!((spec.family, spec.intermediate_size, spec.head_dim), (Family::Qwen3, 768, Some(128)));
        assert_eq!((spec.num_experts, spec.experts_per_token), (128, 8));
        assert_eq!(spec.params(), catalog.params());
        assert!(spec.renormalize_top_k && spec.shared_expert_intermediate_size == 0);
        // Weights left as the softmax gave them where the config says so (or says nothing).
        for (from, to) in [("\"norm_topk_prob\": true", "\"norm_topk_prob\": false"), ("\"norm_topk_prob\": true,", "")]
        {
            assert!(!from_hf_config(&text.replace(from, to), "q/config.json", "q").unwrap().renormalize_top_k);
        }
        // Dense layers mixed in are refused by name.
        for (from, to, what) in [
            ("\"decoder_sparse_step\": 1", "\"decoder_sparse_step\": 2", "decoder_sparse_step"),
            ("\"mlp_only_layers\": []", "\"mlp_only_layers\": [0, 5]", "mlp_only_layers"),
        ] {
            let err = from_hf_config(&text.replace(from, to), "q/config.json", "q").unwrap_err().to_string();
            assert!(err.starts_with("q/config.json: ") && err.contains(what), "{what}: {err}");
        }
    }

    /// Qwen1.5-MoE-A2.7B's config.json: a shared expert beside 60 routed ones, weights
    /// not renormalised, biases on q, k and v — 14.3 B parameters, 2.7 B active.
    #[test]
    fn qwen2_moe_configs_read_with_their_shared_expert() {
        let text = r#"{"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24,
            "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936,
            "max_position_embeddings": 8192, "num_experts": 60, "num_experts_per_tok": 4,
            "norm_topk_prob": false, "decoder_sparse_step": 1, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "tie_word_embeddings": false, "hidden_act": "silu",
            "torch_dtype": "bfloat16"}"#;
        let spec = from_hf_config(text, "q/config.json", "q").unwrap();
        let catalog = crate::catalog::Catalog::builtin().unwrap().model("qwen1.5-moe-a2.7b").unwrap().value;
        assert_eq!(
            (spec.family, spec.intermediate_size, spec.shared_expert_intermediate_size),
            (Family::Qwen2, 1408, 5632)
        );
        assert!(spec.qkv_bias && !spec.renormalize_top_k);
        assert_eq!(spec.params(), catalog.params());
        let (total, active) = (spec.params().total as f64 / 1e9, spec.active_params() as f64 / 1e9);
        assert!((total - 14.3).abs() < 0.05 && (active - 2.7).abs() < 0.05, "{total} B, {active} B active");
        // A shared expert without routed ones is refused, naming the key.
        let dense = text.replace("\"num_experts\": 60,", "");
        let err = from_hf_config(&dense, "q/config.json", "q").unwrap_err().to_string();
        assert!(err.contains("shared_expert_intermediate_size"), "{err}");
    }
}
