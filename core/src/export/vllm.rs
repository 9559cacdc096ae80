//! vLLM: `vllm serve` arguments. Offloaded weights become `--cpu-offload-gb`; vLLM
//! has no disk tier, no KV offload and no host compute.

use super::streaming_knobs;
use crate::model::{ModelSpec, WeightGroup};
use crate::plan::Plan;
use crate::profile::Profile;
use crate::units::GIB;

/// Bytes of attention and MLP weights the plan keeps on the host or on disk.
fn offloaded_weight_bytes(plan: &Plan, model: &ModelSpec) -> u64 {
    let p = &plan.policy;
    let layout = crate::model::WeightLayout::of(model, &p.weight_format);
    let mut bytes = 0;
    for (layer, place) in p.layer_placements(model.num_layers).iter().enumerate() {
        for group in WeightGroup::PER_LAYER {
            if place.tier(group) != crate::plan::Tier::Device {
                bytes += layout.bytes(group, layer as u64);
            }
        }
    }
    bytes
}

/// The `vllm serve` command line for `plan`; adds to `missing` what it cannot express.
pub(super) fn settings(plan: &Plan, model: &ModelSpec, profile: &Profile, missing: &mut Vec<String>) -> String {
    let p = &plan.policy;
    let offload_gib = offloaded_weight_bytes(plan, model) as f64 / GIB as f64;
    let utilization = 1.0 - profile.memory_reserve_fraction;
    let args = [
        "vllm serve MODEL".to_string(),
        format!("--cpu-offload-gb {:.1}", offload_gib.ceil()),
        format!("--max-num-seqs {}", plan.workload.batch_size),
        format!("--gpu-memory-utilization {utilization:.2}"),
        format!("--max-model-len {}", plan.workload.max_context()),
        format!("--dtype {}", if p.weight_dtype == crate::model::Dtype::Bf16 { "bfloat16" } else { "float16" }),
    ];
    if p.attention_weights.disk + p.mlp_weights.disk > 0 {
        missing.push(
            "vLLM cannot offload weights to disk; --cpu-offload-gb counts the disk-placed weights as host RAM"
                .to_string(),
        );
    }
    if p.kv_cache.device < model.num_layers {
        missing.push("vLLM keeps the KV cache on the GPU (swap space is only for preempted sequences); the plan offloads part of it".to_string());
    }
    if p.host_attention || p.compute_host_layers_on_host {
        missing.push("vLLM runs no attention or layers on the CPU".to_string());
    }
    if p.num_micro_batches > 1 {
        missing.push("vLLM schedules sequences itself; the plan's micro-batches have no setting".to_string());
    }
    streaming_knobs(plan, "vLLM", missing);
    args.join(" \\\n  ")
}

#[cfg(test)]
mod tests {
    use super::offloaded_weight_bytes;
    use crate::export::fixtures::{plan, setup};
    use crate::export::{export, Engine};
    use crate::units::GIB;

    #[test]
    fn vllm_counts_offloaded_weights() {
        let (model, profile) = setup("llama-2-7b");
        let p = plan(&model);
        let out = export(&p, &model, &profile, Engine::Vllm);
        let gib = offloaded_weight_bytes(&p, &model) as f64 / GIB as f64;
        assert!(out.settings.contains(&format!("--cpu-offload-gb {:.1}", gib.ceil())), "{}", out.settings);
        assert!(out.settings.contains("--max-num-seqs 8"));
        assert!(out.cannot_express.iter().any(|l| l.contains("disk")));
    }
}
