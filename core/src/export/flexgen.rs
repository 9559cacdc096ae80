//! FlexGen: `flexgen.flex_opt` arguments. The plan's per-layer placement becomes
//! FlexGen's `--percent` shares of weights and KV cache on each tier.

use crate::model::{Family, ModelSpec, WeightGroup};
use crate::plan::{Plan, Schedule, Tier};

/// The `flexgen.flex_opt` command line for `plan`; adds to `missing` what it cannot express.
pub(super) fn settings(plan: &Plan, model: &ModelSpec, missing: &mut Vec<String>) -> String {
    let p = &plan.policy;
    let layout = crate::model::WeightLayout::of(model, &p.weight_format);
    let placements = p.layer_placements(model.num_layers);
    let on = |tier: Tier| -> u64 {
        let mut bytes = 0;
        for (layer, place) in placements.iter().enumerate() {
            for group in WeightGroup::PER_LAYER.into_iter().filter(|&g| place.tier(g) == tier) {
                bytes += layout.bytes(group, layer as u64);
            }
        }
        bytes
    };
    let total = on(Tier::Device) + on(Tier::Host) + on(Tier::Disk);
    let share = |tier: Tier| 100.0 * on(tier) as f64 / total.max(1) as f64;
    let (wg, wc) = (share(Tier::Device).round(), share(Tier::Host).round());
    let layers = model.num_layers as f64;
    let cg = (100.0 * p.kv_cache.device as f64 / layers).round();
    let cc = (100.0 * p.kv_cache.host as f64 / layers).round();
    let mut args = vec![
        format!(
            "python -m flexgen.flex_opt --model {}",
            if model.family == Family::Opt { format!("facebook/{}", model.name) } else { "MODEL".into() }
        ),
        format!("--percent {wg} {wc} {cg} {cc} 100 0"),
        format!("--gpu-batch-size {}", p.micro_batch_size),
        format!("--num-gpu-batches {}", p.num_micro_batches),
        format!("--prompt-len {} --gen-len {}", plan.workload.prompt_len, plan.workload.gen_len),
        "--offload-dir ~/flexgen_offload_dir".to_string(),
    ];
    if p.host_attention {
        args.push("--cpu-cache-compute".to_string());
    }
    if p.pinned_host_bytes > 0 {
        args.push("--pin-weight 1".to_string());
    } else {
        args.push("--pin-weight 0".to_string());
    }
    if model.family != Family::Opt {
        missing.push(format!("FlexGen ships only OPT models; {} is {:?}", model.name, model.family));
    }
    missing.push("FlexGen places a fraction of every layer's tensors on each tier; the plan places whole weight groups per layer".to_string());
    if p.schedule != Schedule::ZigzagBlock {
        missing.push(format!("FlexGen runs only its zig-zag block schedule; the plan uses {}", p.schedule.name()));
    }
    if p.prefetch_depth > 1 {
        missing.push(format!("FlexGen prefetches one layer ahead; the plan prefetches {}", p.prefetch_depth));
    }
    if p.compute_host_layers_on_host {
        missing.push("FlexGen computes every layer on the GPU".to_string());
    }
    if p.stages.len() > 1 {
        missing.push(format!(
            "FlexGen runs on one GPU; the plan splits the layers over {} devices in stages (these shares are the totals)",
            p.stages.len()
        ));
    }
    missing.push(format!(
        "FlexGen has no transfer chunk size, copy-stream count or I/O queue depth (plan: {} chunks, {} streams, depth {})",
        crate::units::format_bytes(p.chunk_bytes),
        p.copy_streams,
        p.io_queue_depth
    ));
    args.join(" \\\n  ")
}

#[cfg(test)]
mod tests {
    use crate::export::fixtures::{plan, setup};
    use crate::export::{export, Engine};

    #[test]
    fn flexgen_percentages_follow_the_placement() {
        let (model, profile) = setup("opt-13b");
        let out = export(&plan(&model), &model, &profile, Engine::Flexgen);
        assert!(out.settings.contains("--model facebook/opt-13b"));
        assert!(out.settings.contains("--gpu-batch-size 4") && out.settings.contains("--num-gpu-batches 2"));
        assert!(
            out.settings.contains(" 0 100 100 0") && out.settings.contains("--cpu-cache-compute"),
            "{}",
            out.settings
        );
        assert!(!out.cannot_express.iter().any(|l| l.contains("ships only OPT")));
    }
}
