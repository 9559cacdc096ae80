//! Hugging Face Accelerate: a `device_map` naming every module of the model (OPT and
//! Llama-style names) and a `max_memory`, for `from_pretrained`.

use super::streaming_knobs;
use crate::model::{Family, ModelSpec};
use crate::plan::{Plan, Tier};
use crate::profile::Profile;
use crate::units::GIB;

/// The `max_memory` and `device_map` for `plan`; adds to `missing` what they cannot express.
pub(super) fn settings(plan: &Plan, model: &ModelSpec, profile: &Profile, missing: &mut Vec<String>) -> String {
    let p = &plan.policy;
    let device = if profile.unified_memory { "\"cpu\"".to_string() } else { "0".to_string() };
    let host = "\"cpu\"".to_string();
    let place = |tier: Tier| match tier {
        Tier::Device => device.clone(),
        Tier::Host => host.clone(),
        Tier::Disk => "\"disk\"".to_string(),
    };
    let (prefix, attention, mlp, norm_in, norm_post, embed, final_norm) = if model.family == Family::Opt {
        (
            "model.decoder.layers",
            "self_attn",
            "fc1",
            "self_attn_layer_norm",
            "final_layer_norm",
            "model.decoder.embed_tokens",
            "model.decoder.final_layer_norm",
        )
    } else {
        (
            "model.layers",
            "self_attn",
            "mlp",
            "input_layernorm",
            "post_attention_layernorm",
            "model.embed_tokens",
            "model.norm",
        )
    };
    let mut entries = vec![format!("  \"{embed}\": {}", place(p.embeddings))];
    for layer in 0..model.num_layers {
        let a = place(p.attention_weights.tier_of(layer));
        let m = place(p.mlp_weights.tier_of(layer));
        entries.push(format!("  \"{prefix}.{layer}.{norm_in}\": {a}"));
        entries.push(format!("  \"{prefix}.{layer}.{attention}\": {a}"));
        entries.push(format!("  \"{prefix}.{layer}.{norm_post}\": {m}"));
        entries.push(format!("  \"{prefix}.{layer}.{mlp}\": {m}"));
        if model.family == Family::Opt {
            entries.push(format!("  \"{prefix}.{layer}.fc2\": {m}"));
        }
    }
    entries.push(format!("  \"{final_norm}\": {}", place(p.head)));
    entries.push(format!("  \"lm_head\": {}", place(p.head)));
    let device_gib = profile.device_memory_bytes as f64 * (1.0 - profile.memory_reserve_fraction) / GIB as f64;
    let host_gib = profile.host_memory_bytes as f64 * (1.0 - profile.memory_reserve_fraction) / GIB as f64;
    let max_memory = if profile.unified_memory {
        format!("{{\"cpu\": \"{device_gib:.1}GiB\"}}")
    } else {
        format!("{{0: \"{device_gib:.1}GiB\", \"cpu\": \"{host_gib:.1}GiB\"}}")
    };
    if p.kv_cache.device < model.num_layers {
        missing.push("Accelerate keeps the KV cache on the execution device; the plan offloads part of it".to_string());
    }
    if p.host_attention || p.compute_host_layers_on_host {
        missing.push(
            "Accelerate computes every module on the execution device; no host attention or host-computed layers"
                .to_string(),
        );
    }
    if p.num_micro_batches > 1 {
        missing.push(format!(
            "Accelerate has no micro-batch schedule ({} × {} in the plan)",
            p.micro_batch_size, p.num_micro_batches
        ));
    }
    if p.pinned_host_bytes > 0 {
        missing.push("Accelerate copies from pageable memory; the plan pins host weights".to_string());
    }
    streaming_knobs(plan, "Accelerate", missing);
    format!(
        "# from_pretrained(..., device_map=device_map, max_memory=max_memory, offload_folder=\"offload\")\nmax_memory = {max_memory}\ndevice_map = {{\n{}\n}}",
        entries.join(",\n")
    )
}

#[cfg(test)]
mod tests {
    use crate::export::fixtures::{plan, setup};
    use crate::export::{export, Engine};

    #[test]
    fn accelerate_device_map_names_every_layer() {
        let (model, profile) = setup("llama-2-7b");
        let out = export(&plan(&model), &model, &profile, Engine::Accelerate);
        for layer in 0..model.num_layers {
            assert!(out.settings.contains(&format!("\"model.layers.{layer}.mlp\"")));
        }
        assert!(out.settings.contains("\"disk\"") && out.settings.contains("max_memory"));
    }
}
