//! A model's shape checked before any arithmetic trusts it: sizes positive and
//! consistent, the mixture-of-experts fields of the families that have them, finite
//! norms and rotary figures, and a parameter count that cannot overflow.

use super::{Family, ModelSpec, MAX_PARAMS};
use crate::error::{CoreError, Result};

impl ModelSpec {
    /// Checks the shape is self-consistent before any arithmetic trusts it.
    pub fn validate(&self) -> Result<()> {
        let fail = |what: &str| Err(CoreError::invalid(format!("model '{}': {what}", self.name)));
        if self.hidden_size == 0 || self.num_layers == 0 || self.num_heads == 0 {
            return fail("hidden_size, num_layers and num_heads must be positive");
        }
        match self.head_dim {
            None if !self.hidden_size.is_multiple_of(self.num_heads) => {
                return fail("hidden_size must be a multiple of num_heads (or head_dim given)");
            }
            Some(d) if d == 0 || d > 1 << 16 => return fail("head_dim must be between 1 and 65536"),
            _ => {}
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return fail("num_heads must be a multiple of num_kv_heads");
        }
        if self.intermediate_size == 0 || self.vocab_size == 0 {
            return fail("intermediate_size and vocab_size must be positive");
        }
        if self.num_experts == 0 && self.shared_expert_intermediate_size > 0 {
            return fail("a shared expert (shared_expert_intermediate_size) needs routed experts (num_experts)");
        }
        // Only Qwen's mixtures of experts have the names (and Hugging Face classes) for
        // a shared expert or weights left unnormalised; Mixtral's never do.
        let qwen = matches!(self.family, Family::Qwen2 | Family::Qwen3);
        if !qwen && (self.shared_expert_intermediate_size > 0 || !self.renormalize_top_k) {
            return fail("a shared expert, or top-k weights not renormalised, are modelled for the qwen2 and qwen3 families only");
        }
        if self.num_experts > 0 && (self.experts_per_token == 0 || self.experts_per_token > self.num_experts) {
            return fail(&format!(
                "{} experts per token (num_experts_per_tok) of {} experts: it must be between 1 and the number of experts",
                self.experts_per_token, self.num_experts
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return fail("rms_norm_eps must be a positive finite number");
        }
        if self.family.is_llama_like() && !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return fail("rope_theta must be a positive finite number");
        }
        if let Some(scaling) = &self.rope_scaling {
            scaling.check().map_err(|e| CoreError::invalid(format!("model '{}': rope_scaling: {e}", self.name)))?;
        }
        // An upper bound of the parameter count, in 128 bits (each factor below 2^30, so
        // the bound itself cannot overflow), so `params()` cannot overflow.
        let sizes = [
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
            self.vocab_size,
            self.max_position_embeddings,
            self.num_experts.max(1),
            self.shared_expert_intermediate_size,
        ];
        let too_large = "the shape is implausibly large (more than 2^48 parameters)";
        if sizes.iter().any(|&x| x > 1 << 30) {
            return fail(too_large);
        }
        let [h, ffn, layers, vocab, positions, experts, shared] = sizes.map(u128::from);
        let per_layer = 8 * h * h + 8 * h + experts * (3 * h * ffn + 2 * h) + 3 * h * shared + h;
        let bound = layers * per_layer + 2 * vocab * h + (positions + 2) * h + 2 * h;
        if bound > MAX_PARAMS {
            return fail(too_large);
        }
        Ok(())
    }
}
