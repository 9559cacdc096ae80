//! Translating a plan into the settings of engines people already run: llama.cpp,
//! vLLM, Hugging Face Accelerate and FlexGen. Each export gives the closest settings
//! in the engine's own terms and one line for every part of the plan the engine
//! cannot express.

use serde::Serialize;

use crate::error::{CoreError, Result};
use crate::model::{Family, ModelSpec, WeightGroup};
use crate::plan::{Plan, Schedule, Tier};
use crate::profile::Profile;
use crate::units::GIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    LlamaCpp,
    Vllm,
    Accelerate,
    Flexgen,
}

impl Engine {
    pub const ALL: [Engine; 4] = [Engine::LlamaCpp, Engine::Vllm, Engine::Accelerate, Engine::Flexgen];

    pub fn name(self) -> &'static str {
        match self {
            Engine::LlamaCpp => "llama.cpp",
            Engine::Vllm => "vllm",
            Engine::Accelerate => "accelerate",
            Engine::Flexgen => "flexgen",
        }
    }

    pub fn parse(text: &str) -> Result<Engine> {
        Engine::ALL.into_iter().find(|e| e.name() == text.to_ascii_lowercase()).ok_or_else(|| CoreError::UnknownName {
            kind: "engine",
            name: text.to_string(),
            suggestions: crate::catalog::closest_names(text, Engine::ALL.iter().map(|e| e.name()), 2),
        })
    }
}

/// The closest settings in one engine, and what they leave out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Export {
    pub engine: Engine,
    /// A command line, or a document (Accelerate's device_map), ready to paste.
    pub settings: String,
    /// Parts of the plan the engine cannot express, one sentence each.
    pub cannot_express: Vec<String>,
}

pub fn export(plan: &Plan, model: &ModelSpec, profile: &Profile, engine: Engine) -> Export {
    let mut missing = Vec::new();
    let settings = match engine {
        Engine::LlamaCpp => llama_cpp(plan, model, &mut missing),
        Engine::Vllm => vllm(plan, model, profile, &mut missing),
        Engine::Accelerate => accelerate(plan, model, profile, &mut missing),
        Engine::Flexgen => flexgen(plan, model, &mut missing),
    };
    if plan.policy.stages.len() > 1 {
        // The per-layer settings above follow the totals; the split over devices is lost.
        missing.push(format!(
            "the plan splits the layers over {} devices in stages; these settings place them as if on one device",
            plan.policy.stages.len()
        ));
    }
    Export { engine, settings, cannot_express: missing }
}

fn streaming_knobs(plan: &Plan, engine: &str, missing: &mut Vec<String>) {
    let p = &plan.policy;
    if p.schedule != Schedule::Sequential {
        missing.push(format!(
            "{engine} has no {} schedule or prefetch depth ({} layers ahead)",
            p.schedule.name(),
            p.prefetch_depth
        ));
    }
    missing.push(format!(
        "{engine} has no transfer chunk size, copy-stream count or I/O queue depth (plan: {} chunks, {} streams, depth {})",
        crate::units::format_bytes(p.chunk_bytes),
        p.copy_streams,
        p.io_queue_depth
    ));
}

fn llama_cpp(plan: &Plan, model: &ModelSpec, missing: &mut Vec<String>) -> String {
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

fn offloaded_weight_bytes(plan: &Plan, model: &ModelSpec) -> u64 {
    let p = &plan.policy;
    let off = |counts: &crate::plan::TierCounts, group| {
        (counts.host + counts.disk) * model.group_bytes(group, p.weight_dtype)
    };
    off(&p.attention_weights, WeightGroup::Attention) + off(&p.mlp_weights, WeightGroup::Mlp)
}

fn vllm(plan: &Plan, model: &ModelSpec, profile: &Profile, missing: &mut Vec<String>) -> String {
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

fn accelerate(plan: &Plan, model: &ModelSpec, profile: &Profile, missing: &mut Vec<String>) -> String {
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

fn flexgen(plan: &Plan, model: &ModelSpec, missing: &mut Vec<String>) -> String {
    let p = &plan.policy;
    let wd = p.weight_dtype;
    let layer_groups = [(WeightGroup::Attention, &p.attention_weights), (WeightGroup::Mlp, &p.mlp_weights)];
    let total: u64 = layer_groups.iter().map(|(g, c)| c.total() * model.group_bytes(*g, wd)).sum();
    let share = |tier: fn(&crate::plan::TierCounts) -> u64| -> f64 {
        let bytes: u64 = layer_groups.iter().map(|(g, c)| tier(c) * model.group_bytes(*g, wd)).sum();
        100.0 * bytes as f64 / total.max(1) as f64
    };
    let (wg, wc) = (share(|c| c.device).round(), share(|c| c.host).round());
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
    use super::*;
    use crate::catalog::Catalog;
    use crate::plan::{HardwareRef, Policy, TierCounts, Workload};
    use crate::units::MIB;

    fn plan(model: &ModelSpec) -> Plan {
        let layers = model.num_layers;
        Plan {
            model: model.name.clone(),
            hardware: HardwareRef { gpu: Some("rtx3060".into()), ..HardwareRef::default() },
            workload: Workload { batch_size: 8, prompt_len: 128, gen_len: 16 },
            policy: Policy {
                schedule: Schedule::ZigzagBlock,
                micro_batch_size: 4,
                num_micro_batches: 2,
                prefetch_depth: 2,
                attention_weights: TierCounts { device: layers / 2, host: layers - layers / 2, disk: 0 },
                mlp_weights: TierCounts { device: 0, host: layers - 2, disk: 2 },
                embeddings: Tier::Host,
                head: Tier::Device,
                kv_cache: TierCounts { device: 0, host: layers, disk: 0 },
                host_attention: true,
                compute_host_layers_on_host: false,
                weight_dtype: crate::model::Dtype::F16,
                kv_dtype: crate::model::Dtype::F16,
                chunk_bytes: 16 * MIB,
                copy_streams: 2,
                io_queue_depth: 4,
                pinned_host_bytes: 1 << 30,
                stages: Vec::new(),
            },
            predicted: None,
        }
    }

    fn setup(name: &str) -> (ModelSpec, Profile) {
        let catalog = Catalog::builtin().unwrap();
        let gpu = catalog.gpu("rtx3060").unwrap().value;
        let host = catalog.host("desktop-pcie4").unwrap().value;
        (catalog.model(name).unwrap().value, Profile::from_datasheet(&crate::hardware::Hardware { gpu, host }))
    }

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

    #[test]
    fn unknown_engine_suggests() {
        let err = Engine::parse("llamacpp").unwrap_err().to_string();
        assert!(err.contains("llama.cpp"), "{err}");
    }
}
