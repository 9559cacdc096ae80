//! `Plan`: a self-contained description of one offloading run — which model, on
//! which hardware, for which workload, with which policy (placement, batching,
//! schedule, transfer knobs). Plans are what `ferry tune` writes, `ferry simulate`
//! predicts and `ferry run` executes.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::model::{Dtype, ModelSpec};
use crate::units::{bytes_serde, format_bytes};

/// A memory tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tier {
    Device,
    Host,
    Disk,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Host => "host",
            Tier::Disk => "disk",
        }
    }
}

/// How many layers keep something on each tier. Which layers go where is fixed by
/// `tier_of`: device layers are spread evenly through the stack, so streamed layers
/// alternate with resident ones and their loads overlap resident compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierCounts {
    pub device: u64,
    pub host: u64,
    pub disk: u64,
}

impl TierCounts {
    pub fn all(tier: Tier, layers: u64) -> TierCounts {
        match tier {
            Tier::Device => TierCounts { device: layers, host: 0, disk: 0 },
            Tier::Host => TierCounts { device: 0, host: layers, disk: 0 },
            Tier::Disk => TierCounts { device: 0, host: 0, disk: layers },
        }
    }

    pub fn total(&self) -> u64 {
        self.device + self.host + self.disk
    }

    /// The tier of `layer` (0-based) out of `total()` layers.
    pub fn tier_of(&self, layer: u64) -> Tier {
        let total = self.total();
        if spread_pick(layer, total, self.device) {
            return Tier::Device;
        }
        // Rank of this layer among the non-device layers, then spread host among those.
        let non_device_rank = layer - picks_before(layer, total, self.device);
        if spread_pick(non_device_rank, total - self.device, self.host) {
            Tier::Host
        } else {
            Tier::Disk
        }
    }

    pub fn describe(&self) -> String {
        format!("{} device / {} host / {} disk", self.device, self.host, self.disk)
    }
}

/// Whether item `index` of `total` is one of `count` evenly spread picks.
fn spread_pick(index: u64, total: u64, count: u64) -> bool {
    count > 0 && picks_before(index + 1, total, count) > picks_before(index, total, count)
}

/// Number of picks among items `0..index` when `count` of `total` are spread evenly.
fn picks_before(index: u64, total: u64, count: u64) -> u64 {
    (index * count).checked_div(total).unwrap_or(0)
}

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

/// The knobs a tuner turns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub schedule: Schedule,
    pub micro_batch_size: u64,
    pub num_micro_batches: u64,
    /// Layers whose weights may be loading ahead of the layer being computed.
    pub prefetch_depth: u64,
    pub attention_weights: TierCounts,
    pub mlp_weights: TierCounts,
    pub embeddings: Tier,
    pub head: Tier,
    /// Layers whose KV cache lives on each tier.
    pub kv_cache: TierCounts,
    /// Attention over host-resident KV runs on the host (FlexGen's CPU delegation).
    pub host_attention: bool,
    /// Layers whose attention and MLP weights are both on the host are computed by the
    /// host where they live (llama.cpp's split), instead of being copied to the device.
    /// Their KV cache must be on the host too.
    #[serde(default)]
    pub compute_host_layers_on_host: bool,
    pub weight_dtype: Dtype,
    pub kv_dtype: Dtype,
    /// Size of one transfer request.
    #[serde(with = "bytes_serde")]
    pub chunk_bytes: u64,
    /// Host↔device copies in flight at once.
    pub copy_streams: u32,
    /// Disk requests in flight at once.
    pub io_queue_depth: u32,
    /// Host memory page-locked for fast copies; host-resident weights inside it copy at
    /// the pinned rate, the rest at the pageable rate.
    #[serde(with = "bytes_serde")]
    pub pinned_host_bytes: u64,
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

impl Policy {
    /// Checks the policy against a model and workload; the message says what to change.
    pub fn validate(&self, model: &ModelSpec, workload: &Workload, unified_memory: bool) -> Result<()> {
        let fail = |m: String| Err(CoreError::invalid(format!("plan: {m}")));
        let layers = model.num_layers;
        for (name, counts) in [
            ("attention_weights", &self.attention_weights),
            ("mlp_weights", &self.mlp_weights),
            ("kv_cache", &self.kv_cache),
        ] {
            if counts.total() != layers {
                return fail(format!(
                    "{name} places {} layers ({}) but {} has {layers}",
                    counts.total(),
                    counts.describe(),
                    model.name
                ));
            }
        }
        if self.micro_batch_size == 0 || self.num_micro_batches == 0 {
            return fail("micro_batch_size and num_micro_batches must be at least 1".into());
        }
        if self.micro_batch_size * self.num_micro_batches != workload.batch_size {
            return fail(format!(
                "micro_batch_size {} × num_micro_batches {} = {} but the workload's batch_size is {}",
                self.micro_batch_size,
                self.num_micro_batches,
                self.micro_batch_size * self.num_micro_batches,
                workload.batch_size
            ));
        }
        if workload.prompt_len == 0 || workload.gen_len == 0 {
            return fail("prompt_len and gen_len must be at least 1".into());
        }
        if self.chunk_bytes < 4096 {
            return fail(format!("chunk_bytes {} is below 4 KiB", self.chunk_bytes));
        }
        if self.copy_streams == 0 || self.io_queue_depth == 0 {
            return fail("copy_streams and io_queue_depth must be at least 1".into());
        }
        if matches!(self.embeddings, Tier::Disk) || matches!(self.head, Tier::Disk) {
            return fail("embeddings and head live on the device or the host, not on disk".into());
        }
        if unified_memory {
            let uses_host = self.attention_weights.host + self.mlp_weights.host + self.kv_cache.host > 0
                || self.embeddings == Tier::Host
                || self.head == Tier::Host;
            if uses_host || self.host_attention || self.compute_host_layers_on_host {
                return fail(
                    "this device shares memory with the host: place things on device or disk only, without host attention"
                        .into(),
                );
            }
        }
        if self.compute_host_layers_on_host {
            for layer in 0..layers {
                let host_layer = self.attention_weights.tier_of(layer) == Tier::Host
                    && self.mlp_weights.tier_of(layer) == Tier::Host;
                if host_layer && self.kv_cache.tier_of(layer) != Tier::Host {
                    return fail(format!(
                        "layer {layer} is computed on the host but its KV cache is on the {}; \
                         place the KV cache of host-computed layers on the host",
                        self.kv_cache.tier_of(layer).name()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether `layer` runs on the host (both weight groups there and the llama.cpp split on).
    pub fn layer_on_host(&self, layer: u64) -> bool {
        self.compute_host_layers_on_host
            && self.attention_weights.tier_of(layer) == Tier::Host
            && self.mlp_weights.tier_of(layer) == Tier::Host
    }

    /// The simplest plan: everything on the device, one micro-batch, sequential. A
    /// reference for tests and the plan the profiler times kernels with.
    pub fn all_on_device(layers: u64, micro_batch_size: u64, dtype: Dtype) -> Policy {
        Policy {
            schedule: Schedule::Sequential,
            micro_batch_size,
            num_micro_batches: 1,
            prefetch_depth: 1,
            attention_weights: TierCounts::all(Tier::Device, layers),
            mlp_weights: TierCounts::all(Tier::Device, layers),
            embeddings: Tier::Device,
            head: Tier::Device,
            kv_cache: TierCounts::all(Tier::Device, layers),
            host_attention: false,
            compute_host_layers_on_host: false,
            weight_dtype: dtype,
            kv_dtype: dtype,
            chunk_bytes: 1 << 20,
            copy_streams: 1,
            io_queue_depth: 1,
            pinned_host_bytes: 0,
        }
    }

    pub fn batch_size(&self) -> u64 {
        self.micro_batch_size * self.num_micro_batches
    }

    pub fn describe(&self) -> Vec<(String, String)> {
        vec![
            ("schedule".into(), self.schedule.name().into()),
            ("batch".into(), format!("{} × {} micro-batches", self.micro_batch_size, self.num_micro_batches)),
            ("attention weights".into(), self.attention_weights.describe()),
            ("MLP weights".into(), self.mlp_weights.describe()),
            ("embeddings / head".into(), format!("{} / {}", self.embeddings.name(), self.head.name())),
            ("KV cache".into(), self.kv_cache.describe()),
            ("attention on host".into(), if self.host_attention { "yes".into() } else { "no".into() }),
            ("prefetch depth".into(), format!("{} layers", self.prefetch_depth)),
            ("transfer chunk".into(), format_bytes(self.chunk_bytes)),
            ("copy streams / I/O depth".into(), format!("{} / {}", self.copy_streams, self.io_queue_depth)),
            ("pinned host memory".into(), format_bytes(self.pinned_host_bytes)),
            ("dtypes (weights / KV)".into(), format!("{} / {}", self.weight_dtype.name(), self.kv_dtype.name())),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_counts_spread_device_layers_evenly() {
        let counts = TierCounts { device: 2, host: 1, disk: 1 };
        let tiers: Vec<Tier> = (0..4).map(|l| counts.tier_of(l)).collect();
        assert_eq!(tiers.iter().filter(|t| **t == Tier::Device).count(), 2);
        assert_eq!(tiers.iter().filter(|t| **t == Tier::Host).count(), 1);
        assert_eq!(tiers.iter().filter(|t| **t == Tier::Disk).count(), 1);
        assert_ne!(tiers[0], tiers[1], "device layers alternate with streamed ones: {tiers:?}");
    }

    proptest::proptest! {
        #[test]
        fn tier_of_honours_the_counts(device in 0u64..50, host in 0u64..50, disk in 0u64..50) {
            let counts = TierCounts { device, host, disk };
            let mut seen = [0u64; 3];
            for layer in 0..counts.total() {
                seen[counts.tier_of(layer) as usize] += 1;
            }
            proptest::prop_assert_eq!(seen, [device, host, disk]);
        }
    }

    #[test]
    fn schedule_names_round_trip_and_suggest() {
        for s in Schedule::ALL {
            assert_eq!(Schedule::parse(s.name()).unwrap(), s);
        }
        let err = Schedule::parse("zigzag").unwrap_err().to_string();
        assert!(err.contains("zigzag-block"), "{err}");
    }
}
