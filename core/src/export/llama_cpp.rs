//! llama.cpp: `llama-server` arguments. Every layer is offloaded with `-ngl`, then
//! the tensors the plan keeps off the device are sent back to the CPU with `-ot`.

use super::streaming_knobs;
use crate::model::ModelSpec;
use crate::plan::{Plan, Tier};

/// The `llama-server` command line for `plan`; adds to `missing` what it cannot express.
pub(super) fn settings(plan: &Plan, model: &ModelSpec, missing: &mut Vec<String>) -> String {
    let p = &plan.policy;
    let layers = model.num_layers;
    // Offload every layer (-ngl), then send the tensors the plan keeps off the device to the CPU (-ot).
    let mut cpu_attention = Vec::new();
    let mut cpu_mlp = Vec::new();
    let mut disk_layers = 0;
    for layer in 0..layers {
        let attention = p.attention_weights.tier_of(layer);
        let mlp = p.mlp_weights.tier_of(layer);
        if attention != Tier::Device {
            cpu_attention.push(layer.to_string());
        }
        if mlp != Tier::Device {
            cpu_mlp.push(layer.to_string());
        }
        if attention == Tier::Disk || mlp == Tier::Disk {
            disk_layers += 1;
        }
    }
    let mut args = vec!["llama-server -m MODEL.gguf".to_string(), format!("-ngl {}", layers + 1)];
    let regex = |ids: &[String], part: &str| format!("-ot \"blk\\.({})\\.{part}_.*=CPU\"", ids.join("|"));
    if !cpu_attention.is_empty() {
        args.push(regex(&cpu_attention, "attn"));
    }
    if !cpu_mlp.is_empty() {
        args.push(regex(&cpu_mlp, "ffn"));
    }
    // llama.cpp keeps token embeddings on the CPU anyway; only the head needs a rule.
    if p.head != Tier::Device {
        args.push("-ot \"output.*=CPU\"".to_string());
    }
    let batch = plan.workload.batch_size;
    let tokens = p.micro_batch_size * plan.workload.prompt_len;
    args.push(format!("-np {batch}"));
    args.push(format!("-c {}", batch * plan.workload.max_context()));
    args.push(format!("-b {}", tokens.max(1)));
    args.push(format!("-ub {}", tokens.clamp(1, 512)));
    if p.kv_cache.device < layers {
        if p.host_attention || p.compute_host_layers_on_host {
            args.push("-nkvo".to_string());
            if p.kv_cache.device > 0 {
                missing.push(format!("llama.cpp keeps the KV cache all on the device or all on the host (-nkvo); the plan splits it ({})", p.kv_cache.describe()));
            }
        } else {
            missing.push(format!(
                "llama.cpp cannot stream host-resident KV to the device for attention; the plan keeps {} of {layers} layers' KV off the device",
                layers - p.kv_cache.device
            ));
        }
    }
    if !p.compute_host_layers_on_host && (!cpu_attention.is_empty() || !cpu_mlp.is_empty()) {
        missing.push(
            "llama.cpp computes CPU-placed tensors on the CPU (large batches may be offloaded per operation); the plan streams them to the device instead"
                .to_string(),
        );
    }
    if disk_layers > 0 {
        missing.push(format!("llama.cpp reads disk-placed weights through mmap and the page cache, with no prefetch; {disk_layers} layers are on disk in the plan"));
    }
    if p.num_micro_batches > 1 {
        missing.push(format!(
            "llama.cpp has no micro-batch schedule ({} × {} in the plan)",
            p.micro_batch_size, p.num_micro_batches
        ));
    }
    streaming_knobs(plan, "llama.cpp", missing);
    args.join(" \\\n  ")
}

#[cfg(test)]
mod tests {
    use crate::export::fixtures::{plan, setup};
    use crate::export::{export, Engine};
    use crate::plan::Tier;

    #[test]
    fn llama_cpp_offloads_exactly_the_host_layers() {
        let (model, profile) = setup("llama-2-7b");
        let p = plan(&model);
        let out = export(&p, &model, &profile, Engine::LlamaCpp);
        assert!(out.settings.contains("-ngl 33"));
        let attention_cpu: Vec<String> = (0..model.num_layers)
            .filter(|&l| p.policy.attention_weights.tier_of(l) != Tier::Device)
            .map(|l| l.to_string())
            .collect();
        assert!(
            out.settings.contains(&format!("blk\\.({})\\.attn_.*=CPU", attention_cpu.join("|"))),
            "{}",
            out.settings
        );
        assert!(out.settings.contains("-nkvo") && out.settings.contains("-np 8"));
        assert!(out.cannot_express.iter().any(|l| l.contains("mmap")));
        assert!(out.cannot_express.iter().any(|l| l.contains("micro-batch")));
    }
}
