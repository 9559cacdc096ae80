//! A mixture of experts' plan knobs: how a streamed MLP's experts are read
//! (`ExpertReads`), and the experts a routed layer keeps on its device or reads ahead
//! (`Policy::hot_experts`, `Policy::prefetched_experts`), with their checks.

use serde::{Deserialize, Serialize};

use super::{LayerPlacement, Policy, Tier};
use crate::error::{CoreError, Result};
use crate::model::{ModelSpec, WeightGroup};

/// How a mixture of experts' streamed MLP is read (dense models ignore it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExpertReads {
    /// The router part ahead of time like any group; the experts once every
    /// micro-batch of the visit is routed, only those chosen: k/E of the bytes for one
    /// token, but a read that cannot start before the layer's attention ends.
    #[default]
    Routed,
    /// Every expert of the layer ahead of time, as a dense MLP is read.
    Whole,
}

impl ExpertReads {
    pub fn is_routed(&self) -> bool {
        *self == ExpertReads::Routed
    }

    pub fn name(self) -> &'static str {
        match self {
            ExpertReads::Routed => "routed",
            ExpertReads::Whole => "whole",
        }
    }
}

impl Policy {
    /// Whether a layer placed at `place` reads its experts as routed: a mixture of
    /// experts whose MLP streams to its device (not kept there, nor computed where it
    /// lives on the host) under `expert_reads: routed`. The one definition the
    /// lowering, the engine, the tuner and the exports share.
    pub fn routes_experts(&self, model: &ModelSpec, place: &LayerPlacement) -> bool {
        let on_host = place.computed_on_host(WeightGroup::Mlp, self.compute_host_layers_on_host);
        model.num_experts > 0
            && self.expert_reads.is_routed()
            && place.tier(WeightGroup::Mlp) != Tier::Device
            && !on_host
    }

    /// `hot_experts` and `prefetched_experts`: experts the model has, under routed reads.
    pub(super) fn validate_kept_experts(&self, model: &ModelSpec) -> Result<()> {
        let fail = |m: String| Err(CoreError::invalid(format!("plan: {m}")));
        let (hot, prefetched) = (self.hot_experts, self.prefetched_experts);
        if hot + prefetched == 0 {
            return Ok(());
        }
        let what = format!("hot_experts {hot} and prefetched_experts {prefetched}");
        if model.num_experts == 0 {
            return fail(format!("{what}: {} has no experts", model.name));
        }
        if hot + prefetched > model.num_experts {
            return fail(format!(
                "{what} are more than the {} experts of a layer of {}",
                model.num_experts, model.name
            ));
        }
        if !self.expert_reads.is_routed() {
            return fail(format!(
                "{what} spare routed reads; with expert_reads: whole every expert is read anyway (drop one of them)"
            ));
        }
        Ok(())
    }
}
