//! Where layers live: memory tiers, how many layers keep something on each tier and
//! which ones (spread evenly through the stack), stages of consecutive layers on one
//! device, and the resulting placement of one layer.

use serde::{Deserialize, Serialize};

use crate::model::WeightGroup;

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

/// A run of consecutive layers on one device, with its own placement over that
/// device, its host and its disk. Stages follow each other in layer order: the first
/// stage holds layers 0.., the next the layers after it, and the hidden state crosses
/// a link between their devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Index into the machine's devices.
    pub device: u16,
    pub attention_weights: TierCounts,
    pub mlp_weights: TierCounts,
    pub kv_cache: TierCounts,
}

impl Stage {
    pub fn layers(&self) -> u64 {
        self.attention_weights.total()
    }

    /// Where this stage's layer number `local` (0-based within the stage) lives; the
    /// stage is number `index` of its policy.
    pub fn placement(&self, index: u16, local: u64) -> LayerPlacement {
        LayerPlacement {
            stage: index,
            device: self.device,
            attention: self.attention_weights.tier_of(local),
            mlp: self.mlp_weights.tier_of(local),
            kv: self.kv_cache.tier_of(local),
        }
    }
}

/// Where one layer lives and runs: its stage's device and the tier of each thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerPlacement {
    pub stage: u16,
    pub device: u16,
    pub attention: Tier,
    pub mlp: Tier,
    pub kv: Tier,
}

impl LayerPlacement {
    /// Where a layer placed beyond every stage goes (a policy that places too few
    /// layers fails validation; callers that skipped it get this, not a panic).
    pub const UNPLACED: LayerPlacement =
        LayerPlacement { stage: 0, device: 0, attention: Tier::Disk, mlp: Tier::Disk, kv: Tier::Disk };

    /// The tier of one of the layer's weight groups (`WeightGroup::PER_LAYER`);
    /// embeddings and head are placed by the policy, not per layer.
    pub fn tier(&self, group: WeightGroup) -> Tier {
        match group {
            WeightGroup::Attention => self.attention,
            WeightGroup::Mlp => self.mlp,
            WeightGroup::Embeddings | WeightGroup::Head => Tier::Disk,
        }
    }

    /// Whether `group` of the layer is computed on the host where its weights live
    /// (llama.cpp's split, when the policy turns it on: a tensor placed on the CPU is
    /// computed there). Attention on the host computes over a host KV cache; an MLP on
    /// the host beside attention on the device is llama.cpp's `--n-cpu-moe` for a
    /// mixture of experts.
    pub fn computed_on_host(&self, group: WeightGroup, split_enabled: bool) -> bool {
        split_enabled && self.tier(group) == Tier::Host
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
}
