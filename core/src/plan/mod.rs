//! `Plan`: a self-contained description of one offloading run — which model, on
//! which hardware, for which workload, with which policy (placement, batching,
//! schedule, transfer knobs). Plans are what `ferry tune` writes, `ferry simulate`
//! predicts and `ferry run` executes.
//!
//! This file holds the plan itself and what it names besides the policy (`Models`,
//! `Schedule`, `Workload`, `HardwareRef`, `DeviceRef`, `PredictionNote`). Where layers live is in
//! `placement` (`Tier`, `TierCounts`, `Stage`, `LayerPlacement`), the tuner's knobs and
//! their checks in `policy` (`Policy`). Everything is re-exported here, so callers
//! name it `plan::X`.

mod ends;
mod experts;
mod placement;
mod policy;
pub mod speculation;

pub use experts::ExpertReads;
pub use placement::{DeviceLayers, LayerPlacement, Stage, Tier, TierCounts};
pub use policy::Policy;
pub use speculation::{Draft, Speculation};

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// The order in which layers, micro-batches and loads are issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Load a layer, then compute it; nothing overlaps (what Accelerate does).
    Sequential,
    /// The next `prefetch_depth` layers load while the current one computes (FlexInfer).
    LayerPrefetch,
    /// FlexGen's block schedule: each layer's weights serve every micro-batch before
    /// the next layer; KV loads and stores of neighbouring micro-batches overlap.
    ZigzagBlock,
    /// PIPO's fine-grained pipeline: weight, KV-load, KV-store and compute streams run
    /// concurrently; transfers are split into `chunk_bytes` tasks.
    Pipelined,
}

impl Schedule {
    pub const ALL: [Schedule; 4] =
        [Schedule::Sequential, Schedule::LayerPrefetch, Schedule::ZigzagBlock, Schedule::Pipelined];

    pub fn name(self) -> &'static str {
        match self {
            Schedule::Sequential => "sequential",
            Schedule::LayerPrefetch => "layer-prefetch",
            Schedule::ZigzagBlock => "zigzag-block",
            Schedule::Pipelined => "pipelined",
        }
    }

    pub fn parse(text: &str) -> Result<Schedule> {
        Schedule::ALL.into_iter().find(|s| s.name() == text).ok_or_else(|| CoreError::UnknownName {
            kind: "schedule",
            name: text.to_string(),
            suggestions: crate::catalog::closest_names(text, Schedule::ALL.iter().map(|s| s.name()), 2),
        })
    }
}

/// What the run computes: batch × (prompt, then generated tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub batch_size: u64,
    pub prompt_len: u64,
    /// Tokens generated per sequence, the first one by the prefill.
    pub gen_len: u64,
}

impl Workload {
    pub fn max_context(&self) -> u64 {
        self.prompt_len + self.gen_len
    }
}

/// Where the hardware of a plan comes from: catalog names or a measured profile.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// An offload disk preset replacing the host preset's disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// A profile file (relative paths are relative to the plan file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Override of the device memory (the RAM budget on the cpu backend).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::units::opt_bytes_serde")]
    pub device_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::units::opt_bytes_serde")]
    pub host_memory: Option<u64>,
    /// A machine of several devices or a cluster of machines: a catalog name
    /// (`8x-rtx4090`) or a cluster file. Instead of `gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// With `gpu` naming several devices (`rtx3060-laptop-6gb,jetson-agx-orin-64gb`): the
    /// link preset joining them (`1gbe`); each on its own default host, or all in one
    /// `host` (then the link joins them directly, and may be left out: through the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Several devices of the profile's kind, each with its own memory (the RAM budget
    /// on the cpu backend). Absent: one device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceRef>,
}

/// One device of a plan's machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRef {
    /// Device memory; absent: the profile's (or `device_memory`).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::units::opt_bytes_serde")]
    pub memory: Option<u64>,
}

/// A prediction stored beside a plan by `ferry tune`, for people reading the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionNote {
    pub tokens_per_s: f64,
    pub time_to_first_token_s: f64,
    pub time_per_output_token_s: f64,
    /// `datasheet` or `measured`: where the profile's numbers came from.
    pub profile: String,
    /// Tokens/s with every resource at the slowest and at the fastest rate the
    /// profile's runs achieved (`Profile::drift`); absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s_interval: Option<[f64; 2]>,
}

/// The models of a plan, by the role each plays: the `target` (the model whose tokens
/// the run produces) and, for speculative decoding with a separate model, the `draft`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Models {
    /// Catalog model name, or a path to a Hugging Face folder / config.json (relative
    /// paths are relative to the plan file).
    pub target: String,
    /// A separate draft model for speculative decoding (the policy's speculation says
    /// `draft: {kind: model}`), named like the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft: Option<String>,
    /// A mixture of experts' measured routing (`ferry run --routing-out`), a YAML file
    /// relative to the plan file: the simulator counts the experts a step touches from
    /// it instead of uniform routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<String>,
}

impl Models {
    pub fn target(name: impl Into<String>) -> Models {
        Models { target: name.into(), draft: None, routing: None }
    }
}

/// A complete, self-contained plan file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PlanFile")]
pub struct Plan {
    pub models: Models,
    pub hardware: HardwareRef,
    pub workload: Workload,
    pub policy: Policy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<PredictionNote>,
}

/// A plan as written in a file: `model: NAME` (what plans written before model roles
/// say, and still the short way to write a one-model plan) means `models: {target:
/// NAME}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    models: Option<Models>,
    hardware: HardwareRef,
    workload: Workload,
    policy: Policy,
    #[serde(default)]
    predicted: Option<PredictionNote>,
}

impl TryFrom<PlanFile> for Plan {
    type Error = String;

    fn try_from(file: PlanFile) -> std::result::Result<Plan, String> {
        let models = match (file.model, file.models) {
            (Some(name), None) => Models::target(name),
            (None, Some(models)) => models,
            (Some(_), Some(_)) => return Err("give either `model: NAME` or `models: {target: NAME}`, not both".into()),
            (None, None) => return Err("missing field `models` (e.g. `models: {target: 13b}`)".into()),
        };
        Ok(Plan {
            models,
            hardware: file.hardware,
            workload: file.workload,
            policy: file.policy,
            predicted: file.predicted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_names_round_trip_and_suggest() {
        for s in Schedule::ALL {
            assert_eq!(Schedule::parse(s.name()).unwrap(), s);
        }
        let err = Schedule::parse("zigzag").unwrap_err().to_string();
        assert!(err.contains("zigzag-block"), "{err}");
    }

    const REST: &str = "hardware: {gpu: rtx3060}
workload: {batch_size: 1, prompt_len: 8, gen_len: 4}
policy:
  schedule: sequential
  micro_batch_size: 1
  num_micro_batches: 1
  prefetch_depth: 0
  attention_weights: {device: 40, host: 0, disk: 0}
  mlp_weights: {device: 40, host: 0, disk: 0}
  embeddings: device
  head: device
  kv_cache: {device: 40, host: 0, disk: 0}
  host_attention: false
  weight_dtype: f16
  kv_dtype: f16
  chunk_bytes: 4MiB
  copy_streams: 1
  io_queue_depth: 1
  pinned_host_bytes: 0B
";

    fn parse(head: &str) -> std::result::Result<Plan, String> {
        crate::yaml::from_yaml_str(&format!("{head}{REST}"), "plan.yaml").map_err(|e| e.to_string())
    }

    #[test]
    fn model_shorthand_means_the_target_role() {
        let short = parse("model: 13b\n").unwrap();
        let roles = parse("models: {target: 13b}\n").unwrap();
        assert_eq!(short, roles);
        assert_eq!(short.models.target, "13b");
        // Written back in the role form, which reads back the same.
        let text = crate::yaml::to_yaml_string(&short).unwrap();
        assert!(text.starts_with("models:\n  target: 13b\n"), "{text}");
        assert_eq!(crate::yaml::from_yaml_str::<Plan>(&text, "again.yaml").unwrap(), short);
    }

    #[test]
    fn device_layers_are_spread_unless_the_plan_says_first() {
        let spread = parse("model: 13b\n").unwrap();
        assert_eq!(spread.policy.device_layers, DeviceLayers::Spread);
        // Plans written before the field read and write the same.
        assert!(!crate::yaml::to_yaml_string(&spread).unwrap().contains("device_layers"));
        let first = crate::yaml::from_yaml_str::<Plan>(
            &format!("model: 13b\n{}", REST.replace("  host_attention:", "  device_layers: first\n  host_attention:")),
            "plan.yaml",
        )
        .unwrap();
        assert_eq!(first.policy.device_layers, DeviceLayers::First);
        let text = crate::yaml::to_yaml_string(&first).unwrap();
        assert!(text.contains("device_layers: first"), "{text}");
        assert_eq!(crate::yaml::from_yaml_str::<Plan>(&text, "again.yaml").unwrap(), first);
        let wrong = crate::yaml::from_yaml_str::<Plan>(
            &format!("model: 13b\n{}", REST.replace("  host_attention:", "  device_layers: last\n  host_attention:")),
            "plan.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(wrong.contains("spread") && wrong.contains("first"), "{wrong}");
    }

    #[test]
    fn model_roles_are_checked() {
        let both = parse("model: 13b\nmodels: {target: 7b}\n").unwrap_err();
        assert!(both.contains("not both"), "{both}");
        let none = parse("").unwrap_err();
        assert!(none.contains("models"), "{none}");
        let unknown = parse("models: {target: 13b, drafter: 1b}\n").unwrap_err();
        assert!(unknown.contains("drafter") && unknown.contains("target"), "{unknown}");
    }
}
