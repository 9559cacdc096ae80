//! vLLM: `vllm serve` arguments. Offloaded weights become `--cpu-offload-gb`; vLLM
//! has no disk tier, no KV offload and no host compute. A plan of several stages
//! becomes pipeline parallelism (`--pipeline-parallel-size`, the plan's layer counts
//! in `VLLM_PP_LAYER_PARTITION`), over Ray when the stages span several nodes.

use super::stages::{self, NodeCommand, StageView};
use super::streaming_knobs;
use crate::model::ModelSpec;
use crate::plan::{Plan, Tier};
use crate::profile::Profile;
use crate::units::GIB;

/// The port of the Ray head (Ray's default).
const RAY_PORT: u16 = 6379;

/// The `vllm serve` command line for `plan` (and, over several nodes, each node's
/// commands in `nodes`); adds to `missing` what it cannot express.
pub(super) fn settings(
    plan: &Plan,
    model: &ModelSpec,
    profile: &Profile,
    nodes: &mut Vec<NodeCommand>,
    missing: &mut Vec<String>,
) -> String {
    let p = &plan.policy;
    let stages = stages::stages(plan, model, profile);
    // --cpu-offload-gb is per GPU: the stage that offloads most sets it.
    let offload_gib = stages.iter().map(|s| s.offloaded_weight_bytes).max().unwrap_or(0) as f64 / GIB as f64;
    let reserve = stages.iter().map(|s| profile.device(s.device).memory_reserve_fraction).fold(0.0, f64::max);
    let mut args = vec![
        "vllm serve MODEL".to_string(),
        format!("--cpu-offload-gb {:.1}", offload_gib.ceil()),
        format!("--max-num-seqs {}", plan.workload.batch_size),
        format!("--gpu-memory-utilization {:.2}", 1.0 - reserve),
        format!("--max-model-len {}", plan.workload.max_context()),
        format!(
            "--dtype {}",
            // The plan's float type; quantized weights take vLLM's half precision.
            match p.weight_format.uniform_float() {
                Some(crate::model::Dtype::Bf16) => "bfloat16",
                Some(crate::model::Dtype::F32) => "float32",
                _ => "float16",
            }
        ),
    ];
    if p.attention_weights.disk + p.mlp_weights.disk > 0 || p.embeddings == Tier::Disk {
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
    let routed = super::routed_expert_layers(plan, model);
    if routed > 0 {
        missing.push(format!(
            "vLLM offloads weights by the layer, not by the routed expert; the plan streams to the device only the \
             experts each step routes to ({routed} layers' experts){}",
            super::hot_experts_clause(plan)
        ));
    }
    if p.num_micro_batches > 1 {
        missing.push("vLLM schedules sequences itself; the plan's micro-batches have no setting".to_string());
    }
    streaming_knobs(plan, "vLLM", missing);
    if stages.len() == 1 {
        return args.join(" \\\n  ");
    }
    let serve = pipeline(&stages, &mut args, nodes, missing);
    if nodes.is_empty() {
        return serve;
    }
    nodes.push(NodeCommand {
        node: stages[0].host,
        host: stages[0].host_name.clone(),
        role: "head",
        commands: format!("ray start --head --port {RAY_PORT}\n# once every worker has joined (ray status):\n{serve}"),
    });
    stages::script(nodes)
}

/// Pipeline parallelism over the stages: the `vllm serve` line (with the layer
/// partition before it) and, over several nodes, the Ray workers' commands.
fn pipeline(
    stages: &[StageView],
    args: &mut Vec<String>,
    nodes: &mut Vec<NodeCommand>,
    missing: &mut Vec<String>,
) -> String {
    let partition: Vec<String> = stages.iter().map(|s| s.layers.to_string()).collect();
    args.push(format!("--pipeline-parallel-size {}", stages.len()));
    args.push("--tensor-parallel-size 1".to_string());
    let machine = stages::nodes(stages);
    if machine.len() > 1 {
        args.push("--distributed-executor-backend ray".to_string());
        let head = stages::address(stages[0].host);
        for node in machine.iter().skip(1) {
            nodes.push(NodeCommand {
                node: node.host,
                host: node.host_name.clone(),
                role: "worker",
                commands: format!("ray start --address {head}:{RAY_PORT}"),
            });
        }
        let order: Vec<String> = stages.iter().map(|s| format!("node {}", s.host)).collect();
        missing.push(format!(
            "vLLM (with Ray), not the plan, decides which node's GPU takes each pipeline rank (the head's first); the plan orders the stages {}",
            order.join(" → ")
        ));
    }
    let offloads: Vec<u64> = stages.iter().map(|s| s.offloaded_weight_bytes).collect();
    if offloads.iter().any(|&b| b != offloads[0]) {
        let each: Vec<String> = offloads.iter().map(|&b| format!("{:.1}", b as f64 / GIB as f64)).collect();
        missing.push(format!(
            "--cpu-offload-gb is one figure for every GPU; the plan offloads {} GiB on its stages",
            each.join(", ")
        ));
    }
    for stage in stages.iter().filter(|s| s.cpu) {
        missing.push(format!("vLLM runs a pipeline over GPUs only; {} computes on a CPU", stage.describe()));
    }
    format!("VLLM_PP_LAYER_PARTITION={} {}", partition.join(","), args.join(" \\\n  "))
}

#[cfg(test)]
mod tests {
    use crate::export::fixtures::{plan, setup, staged};
    use crate::export::stages::stages;
    use crate::export::{export, Engine};
    use crate::units::GIB;

    #[test]
    fn vllm_counts_offloaded_weights() {
        let (model, profile) = setup("llama-2-7b");
        let p = plan(&model);
        let out = export(&p, &model, &profile, Engine::Vllm);
        let gib = stages(&p, &model, &profile)[0].offloaded_weight_bytes as f64 / GIB as f64;
        assert!(out.settings.contains(&format!("--cpu-offload-gb {:.1}", gib.ceil())), "{}", out.settings);
        assert!(out.settings.contains("--max-num-seqs 8"));
        assert!(out.cannot_express.iter().any(|l| l.contains("disk")));
        assert!(!out.settings.contains("pipeline"));
        // The plan's float type, and half precision for block-quantized weights.
        for (format, dtype) in [("f32", "float32"), ("bf16", "bfloat16"), ("f16", "float16"), ("q4_k", "float16")] {
            let mut p = plan(&model);
            p.policy.set_weight_format(crate::model::WeightFormats::uniform(
                crate::model::WeightFormat::parse(format).unwrap(),
            ));
            let out = export(&p, &model, &profile, Engine::Vllm);
            assert!(out.settings.contains(&format!("--dtype {dtype}")), "{format}: {}", out.settings);
        }
    }

    #[test]
    fn stages_become_pipeline_parallelism_with_the_plan_s_layer_partition() {
        let (model, profile, p) = staged("8x-rtx4090", "llama-2-70b", &[10, 10, 10, 10, 10, 10, 10, 10]);
        let out = export(&p, &model, &profile, Engine::Vllm);
        assert!(
            out.settings.starts_with("VLLM_PP_LAYER_PARTITION=10,10,10,10,10,10,10,10 vllm serve"),
            "{}",
            out.settings
        );
        assert!(out.settings.contains("--pipeline-parallel-size 8"));
        assert!(!out.settings.contains("ray"), "one server needs no Ray: {}", out.settings);
        assert!(out.nodes.is_empty());
        // Every stage offloads the same share, so one --cpu-offload-gb says it all.
        assert!(!out.cannot_express.iter().any(|l| l.contains("one figure")), "{:?}", out.cannot_express);
    }

    #[test]
    fn stages_on_several_nodes_join_a_ray_cluster() {
        let (model, profile, p) = staged("laptop-orin-1gbe", "llama-2-13b", &[8, 32]);
        let out = export(&p, &model, &profile, Engine::Vllm);
        let worker = out.nodes.iter().find(|n| n.role == "worker").unwrap();
        assert_eq!(worker.commands, "ray start --address NODE0_ADDR:6379");
        let head = out.nodes.iter().find(|n| n.role == "head").unwrap();
        assert!(head.commands.starts_with("ray start --head"), "{}", head.commands);
        assert!(head.commands.contains("VLLM_PP_LAYER_PARTITION=8,32 vllm serve"), "{}", head.commands);
        assert!(head.commands.contains("--distributed-executor-backend ray"));
        assert!(out.cannot_express.iter().any(|l| l.contains("one figure")), "{:?}", out.cannot_express);
        assert!(out.cannot_express.iter().any(|l| l.contains("node 0 → node 1")), "{:?}", out.cannot_express);
    }
}
