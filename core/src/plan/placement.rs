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

/// Which layers a stage keeps on its device (`Policy::device_layers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceLayers {
    /// Spread evenly through the stack, the last of each share resident: streamed
    /// layers alternate with resident ones and their loads overlap resident compute.
    #[default]
    Spread,
    /// The first ones: a self-speculating draft runs the target's first layers, and
    /// shares those the target keeps on the device instead of holding its own copy.
    First,
}

impl DeviceLayers {
    pub fn is_spread(&self) -> bool {
        *self == DeviceLayers::Spread
    }
}

/// How many layers keep something on each tier. Which layers go where is fixed by
/// `tier_in`: device layers are spread evenly through the stack (or are the first
/// ones, `DeviceLayers::First`); host layers are spread among the rest.
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

    /// The tier of `layer` (0-based) out of `total()` layers, device layers spread.
    pub fn tier_of(&self, layer: u64) -> Tier {
        self.tier_in(layer, DeviceLayers::Spread)
    }

    /// The tier of `layer` (0-based) out of `total()` layers with device layers
    /// arranged as `device_layers` says.
    pub fn tier_in(&self, layer: u64, device_layers: DeviceLayers) -> Tier {
        let total = self.total();
        let (on_device, device_before) = match device_layers {
            DeviceLayers::Spread => (spread_pick(layer, total, self.device), picks_before(layer, total, self.device)),
            DeviceLayers::First => (layer < self.device, layer.min(self.device)),
        };
        if on_device {
            return Tier::Device;
        }
        // Rank of this layer among the non-device layers, then spread host among those.
        let non_device_rank = layer - device_before;
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
    /// stage is number `index` of its policy, whose device layers are arranged as
    /// `device_layers` says.
    pub fn placement(&self, index: u16, local: u64, device_layers: DeviceLayers) -> LayerPlacement {
        LayerPlacement {
            stage: index,
            device: self.device,
            attention: self.attention_weights.tier_in(local, device_layers),
            mlp: self.mlp_weights.tier_in(local, device_layers),
            kv: self.kv_cache.tier_in(local, device_layers),
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

    #[test]
    fn first_device_layers_are_the_first_and_host_layers_spread_over_the_rest() {
        let counts = TierCounts { device: 2, host: 2, disk: 4 };
        let tiers: Vec<Tier> = (0..8).map(|l| counts.tier_in(l, DeviceLayers::First)).collect();
        use Tier::{Device as V, Disk as D, Host as H};
        assert_eq!(tiers, [V, V, D, D, H, D, D, H].to_vec());
        assert_eq!(counts.tier_in(5, DeviceLayers::Spread), counts.tier_of(5));
    }

    proptest::proptest! {
        #[test]
        fn tier_in_honours_the_counts(device in 0u64..50, host in 0u64..50, disk in 0u64..50, first: bool) {
            let counts = TierCounts { device, host, disk };
            let arrangement = if first { DeviceLayers::First } else { DeviceLayers::Spread };
            let mut seen = [0u64; 3];
            for layer in 0..counts.total() {
                seen[counts.tier_in(layer, arrangement) as usize] += 1;
            }
            proptest::prop_assert_eq!(seen, [device, host, disk]);
        }
    }
}
