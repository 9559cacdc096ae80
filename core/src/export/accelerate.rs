//! Hugging Face Accelerate: a `device_map` naming every module of the model (OPT and
//! Llama-style names) and a `max_memory`, for `from_pretrained`. Stages on one
//! machine's GPUs map their layers to those GPUs (Accelerate runs them in turn, one
//! at a time: naive pipeline, no micro-batches in flight).

use super::stages::{self, StageView};
use super::streaming_knobs;
use crate::model::{Family, ModelSpec};
use crate::plan::{Plan, Tier};
use crate::profile::Profile;
use crate::units::GIB;

/// The `max_memory` and `device_map` for `plan`; adds to `missing` what they cannot express.
pub(super) fn settings(plan: &Plan, model: &ModelSpec, profile: &Profile, missing: &mut Vec<String>) -> String {
    let p = &plan.policy;
    let stages = stages::stages(plan, model, profile);
    let placements = p.layer_placements(model.num_layers);
    // A stage's GPU as Accelerate names it: its index on the machine's node, "cpu" for
    // unified memory or a CPU device.
    let gpu = |stage: &StageView| {
        if profile.device(stage.device).unified_memory || stage.cpu {
            "\"cpu\"".to_string()
        } else {
            stage.local_device.to_string()
        }
    };
    let place = |tier: Tier, stage: &StageView| match tier {
        Tier::Device => gpu(stage),
        Tier::Host => "\"cpu\"".to_string(),
        Tier::Disk => "\"disk\"".to_string(),
    };
    let (first, last) = (&stages[0], &stages[stages.len() - 1]);
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
    let mut entries = vec![format!("  \"{embed}\": {}", place(p.embeddings, first))];
    for (layer, at) in placements.iter().enumerate() {
        let stage = stages.iter().find(|s| s.index == at.stage as usize).unwrap_or(first);
        let a = place(at.attention, stage);
        let m = place(at.mlp, stage);
        entries.push(format!("  \"{prefix}.{layer}.{norm_in}\": {a}"));
        entries.push(format!("  \"{prefix}.{layer}.{attention}\": {a}"));
        entries.push(format!("  \"{prefix}.{layer}.{norm_post}\": {m}"));
        entries.push(format!("  \"{prefix}.{layer}.{mlp}\": {m}"));
        if model.family == Family::Opt {
            entries.push(format!("  \"{prefix}.{layer}.fc2\": {m}"));
        }
    }
    entries.push(format!("  \"{final_norm}\": {}", place(p.head, last)));
    entries.push(format!("  \"lm_head\": {}", place(p.head, last)));
    let max_memory = max_memory(profile, &stages);
    for stage in stages.iter().filter(|s| s.host != first.host) {
        missing.push(format!(
            "Accelerate runs in one process on one machine; {} is on another node (its layers are mapped as if its GPU were local)",
            stage.describe()
        ));
    }
    if stages.len() > 1 {
        missing.push(format!(
            "Accelerate runs the {} stages one after another with no micro-batches in flight between them",
            stages.len()
        ));
    }
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
    if p.embeddings == Tier::Disk {
        missing.push(
            "Accelerate loads a disk-offloaded embedding table whole for each forward pass; the plan reads only the \
             looked-up rows"
                .to_string(),
        );
    }
    streaming_knobs(plan, "Accelerate", missing);
    format!(
        "# from_pretrained(..., device_map=device_map, max_memory=max_memory, offload_folder=\"offload\")\nmax_memory = {max_memory}\ndevice_map = {{\n{}\n}}",
        entries.join(",\n")
    )
}

/// `max_memory`: each GPU the stages use (less its reserve) and the host's RAM.
fn max_memory(profile: &Profile, stages: &[StageView]) -> String {
    let gib = |bytes: u64, reserve: f64| bytes as f64 * (1.0 - reserve) / GIB as f64;
    let host_gib = gib(profile.host_memory_bytes, profile.memory_reserve_fraction);
    let mut entries = Vec::new();
    for stage in stages {
        let device = profile.device(stage.device);
        if device.unified_memory || stage.cpu {
            // The device's memory is the host's: one "cpu" budget, the device's.
            return format!("{{\"cpu\": \"{:.1}GiB\"}}", gib(device.memory_bytes, device.memory_reserve_fraction));
        }
        let entry =
            format!("{}: \"{:.1}GiB\"", stage.local_device, gib(device.memory_bytes, device.memory_reserve_fraction));
        if !entries.contains(&entry) {
            entries.push(entry);
        }
    }
    entries.push(format!("\"cpu\": \"{host_gib:.1}GiB\""));
    format!("{{{}}}", entries.join(", "))
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

    #[test]
    fn stages_on_one_machine_map_their_layers_to_their_gpus() {
        let (model, profile, p) = crate::export::fixtures::staged("desktop-3090-3060", "llama-2-13b", &[30, 10]);
        let out = export(&p, &model, &profile, Engine::Accelerate);
        assert!(out.settings.contains("\"model.layers.29.self_attn\": 0"), "{}", out.settings);
        assert!(out.settings.contains("\"model.layers.30.self_attn\": 1"), "{}", out.settings);
        assert!(out.settings.contains("\"lm_head\": 1"), "{}", out.settings);
        assert!(out.settings.contains("max_memory = {0: \"") && out.settings.contains(", 1: \""), "{}", out.settings);
        assert!(!out.cannot_express.iter().any(|l| l.contains("another node")));
    }
}
