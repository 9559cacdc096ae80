//! prima.cpp (llama.cpp over a ring of home devices): one `llama-cli` rank per stage,
//! ranks joined in a ring (`--next`), the head (rank 0, where the prompt enters)
//! giving every rank its layer window (`-lw`), each rank its GPU layers (`-ngl`).
//! Layers not on a GPU are read through mmap with prefetch advice (`--prefetch`).

use super::stages::{self, NodeCommand, StageView};
use super::streaming_knobs;
use crate::model::ModelSpec;
use crate::plan::Plan;
use crate::profile::Profile;

/// The `llama-cli` command of every rank (one command without stages); adds to
/// `missing` what prima.cpp cannot express.
pub(super) fn settings(
    plan: &Plan,
    model: &ModelSpec,
    profile: &Profile,
    nodes: &mut Vec<NodeCommand>,
    missing: &mut Vec<String>,
) -> String {
    let stages = stages::stages(plan, model, profile);
    let context = plan.workload.max_context();
    let world = stages.len();
    let windows: Vec<String> = stages.iter().map(|s| s.layers.to_string()).collect();
    for (rank, stage) in stages.iter().enumerate() {
        let mut args = vec![format!("llama-cli -m MODEL.gguf -c {context}")];
        if rank == 0 {
            args.push(format!("-n {} -p \"PROMPT\"", plan.workload.gen_len));
        }
        if world > 1 {
            let next = stages[(rank + 1) % world].host;
            args.push(format!(
                "--world {world} --rank {rank} --master {} --next {}",
                stages::address(stages[0].host),
                stages::address(next)
            ));
            if rank == 0 {
                args.push(format!("-lw \"{}\"", windows.join(",")));
            }
        }
        args.push("--prefetch".to_string());
        if !stage.cpu && stage.device_layers > 0 {
            args.push(format!("-ngl {}", stage.device_layers));
        }
        nodes.push(NodeCommand {
            node: stage.host,
            host: stage.host_name.clone(),
            role: if rank == 0 { "head" } else { "worker" },
            commands: args.join(" \\\n  "),
        });
    }
    cannot_express(plan, model, &stages, missing);
    if world == 1 {
        return nodes.pop().map(|n| n.commands).unwrap_or_default();
    }
    stages::script(nodes)
}

/// What a prima.cpp ring leaves out of the plan.
fn cannot_express(plan: &Plan, model: &ModelSpec, stages: &[StageView], missing: &mut Vec<String>) {
    let p = &plan.policy;
    for pair in stages.windows(2).filter(|w| w[0].host == w[1].host) {
        missing.push(format!(
            "prima.cpp runs one rank per machine; {} and {} share node {}",
            pair[0].describe(),
            pair[1].describe(),
            pair[0].host
        ));
    }
    if stages::revisits_a_node(stages) {
        missing
            .push("the plan's pipeline visits a node twice; a prima.cpp rank holds one window per round".to_string());
    }
    let (host, disk) = (p.attention_weights.host + p.mlp_weights.host, p.attention_weights.disk + p.mlp_weights.disk);
    if host > 0 && disk > 0 {
        missing.push(format!(
            "prima.cpp leaves every layer off the GPU to mmap and the page cache; the plan pins {host} weight groups in RAM and streams {disk} from disk"
        ));
    }
    if p.kv_cache.device < model.num_layers {
        missing.push(format!(
            "prima.cpp keeps each layer's KV cache where the layer runs; the plan keeps {} of {} layers' KV off the device",
            model.num_layers - p.kv_cache.device,
            model.num_layers
        ));
    }
    if plan.workload.batch_size > 1 {
        missing.push(format!(
            "prima.cpp's llama-cli decodes one sequence; the plan batches {} (micro-batches of {})",
            plan.workload.batch_size, p.micro_batch_size
        ));
    }
    if p.compute_host_layers_on_host {
        missing.push("prima.cpp computes off-GPU layers on the CPU, not streamed to the GPU".to_string());
    }
    streaming_knobs(plan, "prima.cpp", missing);
}

#[cfg(test)]
mod tests {
    use crate::export::fixtures::{plan, setup, staged};
    use crate::export::{export, Engine};

    #[test]
    fn one_stage_is_one_llama_cli() {
        let (model, profile) = setup("llama-2-7b");
        let out = export(&plan(&model), &model, &profile, Engine::PrimaCpp);
        assert!(out.settings.starts_with("llama-cli -m MODEL.gguf"), "{}", out.settings);
        assert!(!out.settings.contains("--world"));
        assert!(out.nodes.is_empty());
    }

    #[test]
    fn stages_over_three_machines_form_a_ring_with_the_plan_s_windows() {
        let (model, profile, p) = staged("edge-trio-wifi", "llama-2-7b", &[8, 16, 8]);
        let out = export(&p, &model, &profile, Engine::PrimaCpp);
        assert_eq!(out.nodes.len(), 3);
        let rank =
            |r: usize| &out.nodes.iter().find(|n| n.commands.contains(&format!("--rank {r} "))).unwrap().commands;
        assert!(rank(0).contains("--master NODE0_ADDR --next NODE1_ADDR"), "{}", rank(0));
        assert!(rank(0).contains("-lw \"8,16,8\""), "{}", rank(0));
        assert!(rank(1).contains("--next NODE2_ADDR") && rank(1).contains("-ngl 12"), "{}", rank(1));
        // The last rank closes the ring; the Raspberry Pi computes on its CPU: no -ngl.
        assert!(rank(2).contains("--next NODE0_ADDR") && !rank(2).contains("-ngl"), "{}", rank(2));
        assert!(out.cannot_express.iter().any(|l| l.contains("one sequence")), "{:?}", out.cannot_express);
    }

    #[test]
    fn two_stages_on_one_machine_are_named() {
        let (model, profile, p) = staged("desktop-3090-3060", "llama-2-13b", &[20, 20]);
        let out = export(&p, &model, &profile, Engine::PrimaCpp);
        assert!(out.cannot_express.iter().any(|l| l.contains("one rank per machine")), "{:?}", out.cannot_express);
    }
}
