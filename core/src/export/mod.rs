//! Translating a plan into the settings of engines people already run: llama.cpp,
//! vLLM, Hugging Face Accelerate, FlexGen and prima.cpp. Each export gives the
//! closest settings in the engine's own terms and one line for every part of the
//! plan the engine cannot express. A plan of several stages becomes each engine's
//! own pipeline (llama.cpp's layer split and RPC servers, vLLM's pipeline parallelism
//! over Ray, prima.cpp's ring of ranks), with the commands of every node.
//!
//! This file holds what every target shares: the `Engine` enum, `Export`, `export()`
//! and helpers such as `streaming_knobs`; `stages` gives the stages as the nodes that
//! run them. Each target engine has its own file (`llama_cpp`, `vllm`, `accelerate`,
//! `flexgen`, `prima_cpp`) with a `settings` function.
//!
//! a new target engine = a new file here + a variant of `Engine` (the compiler then
//! asks for its arms in `Engine::name` and `export`; add it to `Engine::ALL` too).

mod accelerate;
mod flexgen;
mod llama_cpp;
mod prima_cpp;
mod stages;
mod vllm;

use serde::Serialize;

use crate::error::{CoreError, Result};
use crate::model::ModelSpec;
use crate::plan::{Plan, Schedule};
use crate::profile::Profile;
pub use stages::NodeCommand;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    LlamaCpp,
    Vllm,
    Accelerate,
    Flexgen,
    PrimaCpp,
}

impl Engine {
    pub const ALL: [Engine; 5] =
        [Engine::LlamaCpp, Engine::Vllm, Engine::Accelerate, Engine::Flexgen, Engine::PrimaCpp];

    pub fn name(self) -> &'static str {
        match self {
            Engine::LlamaCpp => "llama.cpp",
            Engine::Vllm => "vllm",
            Engine::Accelerate => "accelerate",
            Engine::Flexgen => "flexgen",
            Engine::PrimaCpp => "prima.cpp",
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
    /// Over several machines, what each runs (also in `settings`, workers first).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeCommand>,
}

pub fn export(plan: &Plan, model: &ModelSpec, profile: &Profile, engine: Engine) -> Export {
    let mut missing = Vec::new();
    let mut nodes = Vec::new();
    let mut settings = match engine {
        Engine::LlamaCpp => llama_cpp::settings(plan, model, profile, &mut nodes, &mut missing),
        Engine::Vllm => vllm::settings(plan, model, profile, &mut nodes, &mut missing),
        Engine::Accelerate => accelerate::settings(plan, model, profile, &mut missing),
        Engine::Flexgen => flexgen::settings(plan, model, &mut missing),
        Engine::PrimaCpp => prima_cpp::settings(plan, model, profile, &mut nodes, &mut missing),
    };
    let speculation = speculation_settings(plan, engine, &mut missing);
    settings.push_str(&speculation);
    // The draft runs where requests enter: on the head (last in the script).
    if let Some(head) = nodes.iter_mut().find(|n| n.role == "head") {
        head.commands.push_str(&speculation);
    }
    if plan.policy.weight_format.uniform_float().is_none() {
        missing.push(format!(
            "these settings do not carry the plan's weight format ({}); give the engine weights stored that way",
            plan.policy.weight_format.describe()
        ));
    }
    let stages = stages::stages(plan, model, profile);
    if let [only] = stages.as_slice() {
        if only.device != 0 {
            // The plan leaves the machine's other devices out: say where this runs.
            settings = format!(
                "# on node {} ({}), its device {} ({})\n{settings}",
                only.host, only.host_name, only.local_device, only.device_name
            );
        }
    }
    Export { engine, settings, cannot_express: missing, nodes }
}

/// What a target engine does with the plan's draft. A separate draft model maps onto
/// each engine's own speculation (llama.cpp's `-md`, vLLM's speculative config,
/// transformers' `assistant_model`); a self-speculating one only onto transformers'
/// `assistant_early_exit` (made for LayerSkip-trained models). FlexGen has none.
/// Returns lines to add to the settings.
fn speculation_settings(plan: &Plan, engine: Engine, missing: &mut Vec<String>) -> String {
    use crate::plan::Draft;
    let Some(speculation) = &plan.policy.speculation else { return String::new() };
    let k = speculation.draft_len;
    let model = plan.models.draft.as_deref().unwrap_or("DRAFT");
    let layers = match speculation.draft {
        Draft::SelfLayers { layers } => layers,
        Draft::Model => {
            return match engine {
                Engine::LlamaCpp => format!(" \\\n  -md {model} --draft-max {k} --draft-min {k} -ngld 99"),
                Engine::Vllm => {
                    format!(" \\\n  --speculative-config '{{\"model\": \"{model}\", \"num_speculative_tokens\": {k}}}'")
                }
                Engine::Accelerate => format!(
                    "\n# speculation: model.generate(..., do_sample=False, \
                     assistant_model=AutoModelForCausalLM.from_pretrained(\"{model}\"), num_assistant_tokens={k}, \
                     num_assistant_tokens_schedule=\"constant\")"
                ),
                Engine::Flexgen => {
                    missing.push(format!("FlexGen has no speculative decoding; the plan drafts {k} tokens per round"));
                    String::new()
                }
                Engine::PrimaCpp => {
                    missing.push(format!(
                        "prima.cpp's ring has no draft model; the plan drafts {k} tokens per round with {model}"
                    ));
                    String::new()
                }
            }
        }
    };
    let draft = format!("the plan drafts {k} tokens per round with the model's own first {layers} layers");
    match engine {
        Engine::Accelerate => {
            missing.push(format!(
                "transformers' early-exit assistant suits models trained for early exit (LayerSkip); {draft} and \
                 verifies greedily, as generate does with do_sample=False"
            ));
            return format!(
                "\n# speculation: model.generate(..., do_sample=False, assistant_early_exit={layers}, \
                 num_assistant_tokens={k}, num_assistant_tokens_schedule=\"constant\")"
            );
        }
        Engine::LlamaCpp => missing.push(format!(
            "llama.cpp speculates only with a separate draft model (-md DRAFT.gguf --draft-max {k} -ngld 99); {draft}"
        )),
        Engine::Vllm => missing.push(format!(
            "vLLM speculates with a separate draft or learned heads (--speculative-config '{{\"model\": \"DRAFT\", \
             \"num_speculative_tokens\": {k}}}'); {draft}"
        )),
        Engine::Flexgen => missing.push(format!("FlexGen has no speculative decoding; {draft}")),
        Engine::PrimaCpp => missing.push(format!("prima.cpp's ring has no speculative decoding; {draft}")),
    }
    String::new()
}

/// Layers whose experts the plan streams to the device reading only those each step
/// routes to (`ExpertReads::Routed`): what no target engine does from host memory.
fn routed_expert_layers(plan: &Plan, model: &ModelSpec) -> u64 {
    let p = &plan.policy;
    p.layer_placements(model.num_layers).iter().filter(|place| p.routes_experts(model, place)).count() as u64
}

/// ", keeping N hot experts of each on the device" (and ", reading M ahead") where
/// the plan does.
fn hot_experts_clause(plan: &Plan) -> String {
    let p = &plan.policy;
    let mut clause = String::new();
    if p.hot_experts > 0 {
        clause += &format!(", keeping {} hot experts of each on the device", p.hot_experts);
    }
    if p.prefetched_experts > 0 {
        clause += &format!(", reading the next {} most popular ahead of routing", p.prefetched_experts);
    }
    clause
}

/// Adds the lines for the streaming knobs a target without them cannot express:
/// schedule and prefetch depth, chunk size, copy streams and I/O queue depth.
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

#[cfg(test)]
mod speculation_tests {
    use super::fixtures::{plan, setup};
    use super::*;
    use crate::plan::{Draft, Speculation};

    #[test]
    fn a_self_speculating_plan_says_what_each_engine_does_with_its_draft() {
        let (model, profile) = setup("llama-2-7b");
        let mut plan = plan(&model);
        let plain: Vec<Export> = Engine::ALL.iter().map(|&e| export(&plan, &model, &profile, e)).collect();
        plan.policy.speculation = Some(Speculation {
            draft: Draft::SelfLayers { layers: 4 },
            draft_len: 5,
            acceptance_rate: 0.6,
            draft_spec: None,
        });
        for (engine, before) in Engine::ALL.into_iter().zip(plain) {
            let out = export(&plan, &model, &profile, engine);
            let added: Vec<&String> =
                out.cannot_express.iter().filter(|l| !before.cannot_express.contains(l)).collect();
            assert_eq!(added.len(), 1, "{engine:?}: {added:?}");
            assert!(added[0].contains("first 4 layers") && added[0].contains('5'), "{engine:?}: {}", added[0]);
            if engine == Engine::Accelerate {
                assert!(out.settings.contains("assistant_early_exit=4, num_assistant_tokens=5"), "{}", out.settings);
            } else {
                assert_eq!(out.settings, before.settings, "{engine:?}");
            }
        }
    }
}

/// A plan and a machine for the per-engine tests.
#[cfg(test)]
mod fixtures {
    use super::*;
    use crate::catalog::Catalog;
    use crate::plan::{HardwareRef, Policy, Tier, TierCounts, Workload};
    use crate::units::MIB;

    pub(super) fn plan(model: &ModelSpec) -> Plan {
        let layers = model.num_layers;
        Plan {
            models: crate::plan::Models::target(model.name.clone()),
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
                device_layers: Default::default(),
                host_attention: true,
                compute_host_layers_on_host: false,
                expert_reads: Default::default(),
                hot_experts: 0,
                prefetched_experts: 0,
                weight_format: crate::model::WeightFormats::uniform(crate::model::WeightFormat::F16),
                weight_dtype: crate::model::Dtype::F16,
                kv_dtype: crate::model::Dtype::F16,
                chunk_bytes: 16 * MIB,
                copy_streams: 2,
                io_queue_depth: 4,
                pinned_host_bytes: 1 << 30,
                stages: Vec::new(),
                speculation: None,
            },
            predicted: None,
        }
    }

    /// A plan over `cluster`'s first devices, stage `i` holding `layers[i]` layers: all
    /// attention and three quarters of the MLP on the device, the rest on the host.
    pub(super) fn staged(cluster: &str, name: &str, layers: &[u64]) -> (ModelSpec, Profile, Plan) {
        use crate::plan::Stage;
        let catalog = Catalog::builtin().unwrap();
        let model = catalog.model(name).unwrap().value;
        let hardware = HardwareRef { cluster: Some(cluster.into()), ..HardwareRef::default() };
        let (profile, _) = crate::resolve::resolve_hardware(&catalog, &hardware, std::path::Path::new(".")).unwrap();
        let mut p = plan(&model);
        p.hardware = hardware;
        p.policy.stages = layers
            .iter()
            .enumerate()
            .map(|(i, &n)| Stage {
                device: i as u16,
                attention_weights: TierCounts { device: n, host: 0, disk: 0 },
                mlp_weights: TierCounts { device: n - n / 4, host: n / 4, disk: 0 },
                kv_cache: TierCounts { device: n, host: 0, disk: 0 },
            })
            .collect();
        let sum = |pick: fn(&Stage) -> TierCounts| {
            p.policy.stages.iter().map(pick).fold(TierCounts { device: 0, host: 0, disk: 0 }, |a, b| TierCounts {
                device: a.device + b.device,
                host: a.host + b.host,
                disk: a.disk + b.disk,
            })
        };
        let (attention, mlp, kv) = (sum(|s| s.attention_weights), sum(|s| s.mlp_weights), sum(|s| s.kv_cache));
        p.policy.attention_weights = attention;
        p.policy.mlp_weights = mlp;
        p.policy.kv_cache = kv;
        p.policy.host_attention = false;
        p.policy.validate(&model, &p.workload, false).unwrap();
        (model, profile, p)
    }

    pub(super) fn setup(name: &str) -> (ModelSpec, Profile) {
        let catalog = Catalog::builtin().unwrap();
        let gpu = catalog.gpu("rtx3060").unwrap().value;
        let host = catalog.host("desktop-pcie4").unwrap().value;
        (catalog.model(name).unwrap().value, Profile::from_datasheet(&crate::hardware::Hardware { gpu, host }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_engine_suggests() {
        let err = Engine::parse("llamacpp").unwrap_err().to_string();
        assert!(err.contains("llama.cpp"), "{err}");
    }
}
