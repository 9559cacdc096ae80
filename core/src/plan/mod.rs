//! `Plan`: a self-contained description of one offloading run — which model, on
//! which hardware, for which workload, with which policy (placement, batching,
//! schedule, transfer knobs). Plans are what `ferry tune` writes, `ferry simulate`
//! predicts and `ferry run` executes.
//!
//! This file holds the plan itself and what it names besides the policy (`Schedule`,
//! `Workload`, `HardwareRef`, `DeviceRef`, `PredictionNote`). Where layers live is in
//! `placement` (`Tier`, `TierCounts`, `Stage`, `LayerPlacement`), the tuner's knobs and
//! their checks in `policy` (`Policy`). Everything is re-exported here, so callers
//! name it `plan::X`.

mod placement;
mod policy;

pub use placement::{LayerPlacement, Stage, Tier, TierCounts};
pub use policy::Policy;

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
}

/// A complete, self-contained plan file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Catalog model name, or a path to a Hugging Face folder / config.json.
    pub model: String,
    pub hardware: HardwareRef,
    pub workload: Workload,
    pub policy: Policy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<PredictionNote>,
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
}
