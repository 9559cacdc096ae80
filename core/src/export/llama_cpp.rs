//! llama.cpp: `llama-server` arguments. Every layer is offloaded with `-ngl`, then
//! the tensors the plan keeps off the device are sent back to the CPU with `-ot`.
//! A plan of several stages becomes llama.cpp's layer split: `--device` in the
//! pipeline's order with `--tensor-split` in layers, and an `rpc-server` for every
//! device on another node (llama.cpp's RPC backend).

use super::stages::{self, NodeCommand, StageView};
use super::streaming_knobs;
use crate::model::ModelSpec;
use crate::plan::{Plan, Tier};
use crate::profile::Profile;

/// The port of the `rpc-server` serving a node's device `local` (one server per device).
const RPC_PORT: u16 = 50052;

/// The `llama-server` command line for `plan` (and, over several nodes, each node's
/// commands in `nodes`); adds to `missing` what it cannot express.
pub(super) fn settings(
    plan: &Plan,
    model: &ModelSpec,
    profile: &Profile,
    nodes: &mut Vec<NodeCommand>,
    missing: &mut Vec<String>,
) -> String {
    let stages = stages::stages(plan, model, profile);
    let mut args = server_args(plan, model, missing);
    if stages.len() > 1 {
        args.extend(split_args(&stages, nodes, missing));
    }
    let server = args.join(" \\\n  ");
    if nodes.is_empty() {
        return server;
    }
    // RPC devices' names have changed between llama.cpp releases: check them first.
    let check = "# --device names as `llama-server --rpc ... --list-devices` prints them";
    nodes.push(NodeCommand {
        node: stages[0].host,
        host: stages[0].host_name.clone(),
        role: "head",
        commands: format!("{check}\n{server}"),
    });
    stages::script(nodes)
}

/// The single-machine arguments: offload, `-ot` rules, batch and context, KV.
fn server_args(plan: &Plan, model: &ModelSpec, missing: &mut Vec<String>) -> Vec<String> {
    let p = &plan.policy;
    let layers = model.num_layers;
    // Offload every layer (-ngl), then send the tensors the plan keeps off the device to the CPU (-ot).
    let mut cpu_attention = Vec::new();
    let mut cpu_mlp = Vec::new();
    let mut disk_layers = 0;
    for (layer, place) in p.layer_placements(layers).iter().enumerate() {
        if place.attention != Tier::Device {
            cpu_attention.push(layer.to_string());
        }
        if place.mlp != Tier::Device {
            cpu_mlp.push(layer.to_string());
        }
        if place.attention == Tier::Disk || place.mlp == Tier::Disk {
            disk_layers += 1;
        }
    }
    let mut args = vec!["llama-server -m MODEL.gguf".to_string(), format!("-ngl {}", layers + 1)];
    let regex = |ids: &[String], part: &str| format!("-ot \"blk\\.({})\\.{part}_.*=CPU\"", ids.join("|"));
    if !cpu_attention.is_empty() {
        args.push(regex(&cpu_attention, "attn"));
    }
    if !cpu_mlp.is_empty() && model.num_experts > 0 {
        // A mixture of experts: the experts of those layers, and the shared expert
        // where there is one, as the plan keeps it with them (llama.cpp keeps the
        // router and norms beside them on the device, a few KiB).
        let tensors = if model.shared_expert_intermediate_size > 0 { "(exps|shexp)" } else { "exps" };
        args.push(format!("-ot \"blk\\.({})\\.ffn_.*_{tensors}\\.=CPU\"", cpu_mlp.join("|")));
    } else if !cpu_mlp.is_empty() {
        args.push(regex(&cpu_mlp, "ffn"));
    }
    // llama.cpp keeps token embeddings on the CPU anyway, mapped from the file, so a
    // lookup pages in only its rows (what `embeddings: disk` does); only the head needs a rule.
    if p.head != Tier::Device {
        args.push("-ot \"output.*=CPU\"".to_string());
    }
    let batch = plan.workload.batch_size;
    let tokens = p.micro_batch_size * plan.workload.prompt_len;
    args.push(format!("-np {batch}"));
    args.push(format!("-c {}", batch * plan.workload.max_context()));
    args.push(format!("-b {}", tokens.max(1)));
    args.push(format!("-ub {}", tokens.clamp(1, 512)));
    let kv = p.kv_cache;
    if kv.device < layers {
        if p.host_attention || p.compute_host_layers_on_host {
            args.push("-nkvo".to_string());
            if kv.device > 0 {
                missing.push(format!("llama.cpp keeps the KV cache all on the device or all on the host (-nkvo); the plan splits it ({})", kv.describe()));
            }
        } else {
            missing.push(format!(
                "llama.cpp cannot stream host-resident KV to the device for attention; the plan keeps {} of {layers} layers' KV off the device",
                layers - kv.device
            ));
        }
    }
    let routed = super::routed_expert_layers(plan, model);
    if routed > 0 {
        missing.push(format!(
            "llama.cpp computes CPU-placed experts on the CPU; the plan streams to the device only the experts each \
             step routes to ({routed} layers' experts){}",
            super::hot_experts_clause(plan)
        ));
    }
    let streamed_mlp = !cpu_mlp.is_empty() && routed == 0;
    if !p.compute_host_layers_on_host && (!cpu_attention.is_empty() || streamed_mlp) {
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
    args
}

/// The layer split over the stages' devices: `--rpc` servers for the devices on other
/// nodes (their commands go to `nodes`), `--device` in the pipeline's order and
/// `--tensor-split` in layers. llama.cpp gives layer `il` to the first device whose
/// cumulative share exceeds `il / (n_layer + 1)` (with `-ngl n_layer + 1`), so shares
/// in layers, the head counted on the last device, place exactly the plan's ranges.
fn split_args(stages: &[StageView], nodes: &mut Vec<NodeCommand>, missing: &mut Vec<String>) -> Vec<String> {
    let head = stages[0].host;
    let mut devices = Vec::new();
    let mut shares = Vec::new();
    let mut rpc = Vec::new();
    for stage in stages {
        let name = if stage.host == head {
            if stage.cpu {
                missing.push(format!(
                    "llama.cpp splits layers over accelerators; {} computes on the head's CPU (its layers go there with -ot instead)",
                    stage.describe()
                ));
                continue;
            }
            format!("CUDA{}", stage.local_device)
        } else {
            let endpoint = format!("{}:{}", stages::address(stage.host), RPC_PORT + stage.local_device);
            add_rpc_server(nodes, stage);
            rpc.push(endpoint.clone());
            if stage.layers > stage.device_layers {
                missing.push(format!(
                    "llama.cpp's -ot sends CPU-placed tensors to the head's CPU, not to node {}'s RAM; {} keeps {} layers off its device",
                    stage.host,
                    stage.describe(),
                    stage.layers - stage.device_layers
                ));
            }
            format!("RPC[{endpoint}]")
        };
        devices.push(name);
        shares.push(stage.layers);
    }
    if let Some(last) = shares.last_mut() {
        *last += 1;
    }
    let mut args = Vec::new();
    if !rpc.is_empty() {
        args.push(format!("--rpc {}", rpc.join(",")));
    }
    let shares: Vec<String> = shares.iter().map(u64::to_string).collect();
    args.push("--split-mode layer".to_string());
    args.push(format!("--device {}", devices.join(",")));
    args.push(format!("--tensor-split {}", shares.join(",")));
    args
}

/// The `rpc-server` for `stage`'s device on its node: one server per device, each
/// seeing only its own card.
fn add_rpc_server(nodes: &mut Vec<NodeCommand>, stage: &StageView) {
    let port = RPC_PORT + stage.local_device;
    let command = if stage.cpu {
        format!("rpc-server -H 0.0.0.0 -p {port}   # a CPU build of llama.cpp with -DGGML_RPC=ON")
    } else {
        format!("CUDA_VISIBLE_DEVICES={} rpc-server -H 0.0.0.0 -p {port}", stage.local_device)
    };
    match nodes.iter_mut().find(|n| n.node == stage.host) {
        Some(node) => {
            node.commands.push('\n');
            node.commands.push_str(&command);
        }
        None => nodes.push(NodeCommand {
            node: stage.host,
            host: stage.host_name.clone(),
            role: "worker",
            commands: command,
        }),
    }
}

#[cfg(test)]
mod tests {
    use crate::export::fixtures::{plan, setup, staged};
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
        assert!(out.nodes.is_empty());
    }

    /// A mixture of experts with some layers' MLPs on the host: exactly those layers'
    /// experts go to the CPU; attention and KV stay on the device.
    #[test]
    fn llama_cpp_keeps_the_plan_s_host_experts_on_the_cpu() {
        for (name, tensors) in [("mixtral-8x7b", "exps"), ("qwen1.5-moe-a2.7b", "(exps|shexp)")] {
            host_experts_go_to_the_cpu(name, tensors);
        }
    }

    /// `name`'s plan with 10 layers' MLPs on the device: the others' `tensors` go to
    /// the CPU (a shared expert with them, as the plan keeps it in their group).
    fn host_experts_go_to_the_cpu(name: &str, tensors: &str) {
        let (model, profile) = setup(name);
        let mut p = plan(&model);
        let layers = model.num_layers;
        p.policy.compute_host_layers_on_host = true;
        p.policy.host_attention = false;
        p.policy.attention_weights = crate::plan::TierCounts::all(Tier::Device, layers);
        p.policy.kv_cache = crate::plan::TierCounts::all(Tier::Device, layers);
        p.policy.mlp_weights = crate::plan::TierCounts { device: 10, host: layers - 10, disk: 0 };
        let out = export(&p, &model, &profile, Engine::LlamaCpp);
        let host: Vec<String> =
            (0..layers).filter(|&l| p.policy.mlp_weights.tier_of(l) == Tier::Host).map(|l| l.to_string()).collect();
        assert_eq!(host.len() as u64, layers - 10);
        let rule = format!("blk\\.({})\\.ffn_.*_{tensors}\\.=CPU", host.join("|"));
        assert!(out.settings.contains(&rule), "{}", out.settings);
        assert!(!out.settings.contains("attn_") && !out.settings.contains("-nkvo"), "{}", out.settings);
    }

    /// llama.cpp's rule (llama-model.cpp, `get_layer_buft_list`): with `-ngl n+1`,
    /// layer `il` goes to the first device whose cumulative share of the split
    /// exceeds `il / (n + 1)`.
    fn llama_cpp_device_of(layer: u64, layers: u64, split: &[u64]) -> usize {
        let total: u64 = split.iter().sum();
        let mut cumulative = 0.0;
        let x = layer as f32 / (layers + 1) as f32;
        for (device, share) in split.iter().enumerate() {
            cumulative += *share as f32 / total as f32;
            if cumulative > x {
                return device;
            }
        }
        split.len() - 1
    }

    #[test]
    fn the_tensor_split_places_every_stage_s_layers_on_its_device_under_llama_cpp_s_rule() {
        let (model, profile, p) = staged("desktop-3090-3060", "llama-2-13b", &[27, 13]);
        let out = export(&p, &model, &profile, Engine::LlamaCpp);
        assert!(out.settings.contains("--device CUDA0,CUDA1"), "{}", out.settings);
        let split = out.settings.split("--tensor-split ").nth(1).unwrap().split_whitespace().next().unwrap();
        let split: Vec<u64> = split.split(',').map(|s| s.parse().unwrap()).collect();
        assert_eq!(split, vec![27, 14]);
        for layer in 0..model.num_layers {
            let want = if layer < 27 { 0 } else { 1 };
            assert_eq!(llama_cpp_device_of(layer, model.num_layers, &split), want, "layer {layer}");
        }
        // The head (layer index n) lands on the last stage's device.
        assert_eq!(llama_cpp_device_of(model.num_layers, model.num_layers, &split), 1);
        assert!(out.nodes.is_empty(), "one machine needs no per-node commands");
        assert!(!out.cannot_express.iter().any(|l| l.contains("stages")), "{:?}", out.cannot_express);
    }

    #[test]
    fn a_stage_on_another_node_gets_an_rpc_server_and_the_head_connects_to_it() {
        let (model, profile, p) = staged("laptop-orin-1gbe", "llama-2-13b", &[10, 30]);
        let out = export(&p, &model, &profile, Engine::LlamaCpp);
        assert_eq!(out.nodes.len(), 2, "{:?}", out.nodes);
        let worker = out.nodes.iter().find(|n| n.role == "worker").unwrap();
        assert_eq!(worker.node, 1);
        assert!(worker.commands.contains("rpc-server -H 0.0.0.0 -p 50052"), "{}", worker.commands);
        let head = out.nodes.iter().find(|n| n.role == "head").unwrap();
        assert!(head.commands.contains("--rpc NODE1_ADDR:50052"), "{}", head.commands);
        assert!(head.commands.contains("--device CUDA0,RPC[NODE1_ADDR:50052]"), "{}", head.commands);
        assert!(head.commands.contains("--tensor-split 10,31"), "{}", head.commands);
        // Workers come first in the script: they must listen before the head connects.
        assert!(out.settings.find("rpc-server").unwrap() < out.settings.find("llama-server").unwrap());
    }
}
