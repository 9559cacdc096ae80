//! Hot experts for the leading plans: a mixture of experts whose MLPs stream as routed
//! reads can keep each such layer's most popular experts on the device
//! (`Policy::hot_experts`), so that a step reads only the others. The LP does not price
//! the knob; device memory a simulated plan leaves unused does. Each leading plan is
//! offered as many hot experts per routed layer as that memory holds, simulated, and
//! kept when it is faster.

use ferry_core::graph::Place;
use ferry_core::model::WeightGroup;
use ferry_core::plan::Tier;
use rayon::prelude::*;

use super::search::Searcher;
use super::Candidate;
use crate::predict::{predict, Extrapolation};

impl Searcher<'_> {
    /// `candidates` with hot experts where they make a plan faster (each offered
    /// side by side; the order is kept). Only the plans within `within` of the best are
    /// offered: each offer is a simulation.
    pub(super) fn heat_leaders(
        &self,
        candidates: Vec<Candidate>,
        leading: impl Fn(&Candidate) -> bool + Sync,
    ) -> Vec<Candidate> {
        if self.experts.is_none() {
            return candidates;
        }
        candidates.into_par_iter().map(|c| if leading(&c) { self.with_hot_experts(c) } else { c }).collect()
    }

    /// `candidate` with the most hot experts its unused device memory holds, or (when
    /// that is not faster, or no expert fits) `candidate` itself. A plan whose
    /// simulation runs out of memory is offered half as many, once.
    fn with_hot_experts(&self, candidate: Candidate) -> Candidate {
        let request = self.request;
        let Some(sizes) = &self.experts else { return candidate };
        let policy = &candidate.policy;
        if !policy.expert_reads.is_routed() || policy.hot_experts > 0 {
            return candidate;
        }
        let split = policy.compute_host_layers_on_host;
        let routed_layers = policy
            .layer_placements(request.model.num_layers)
            .iter()
            .filter(|p| p.tier(WeightGroup::Mlp) != Tier::Device && !p.computed_on_host(WeightGroup::Mlp, split))
            .count() as u64;
        let device = candidate.metrics.pools.iter().find(|p| p.pool == Place::DEVICE);
        let (Some(device), true) = (device, routed_layers > 0) else { return candidate };
        let free = device.capacity_bytes.saturating_sub(device.peak_bytes);
        let per_layer = sizes.most(1).max(1);
        let mut hot = (free / (routed_layers * per_layer)).min(request.model.num_experts);
        let objective = request.objective;
        for _ in 0..2 {
            if hot == 0 {
                break;
            }
            let mut heated = policy.clone();
            heated.hot_experts = hot;
            match predict(&heated, request.model, &candidate.workload, request.profile, Extrapolation::Sampled) {
                Ok(p) => {
                    let offered = Candidate { policy: heated, metrics: p.metrics, ..candidate.clone() };
                    return if offered.score(objective) > candidate.score(objective) { offered } else { candidate };
                }
                Err(_) => hot /= 2,
            }
        }
        candidate
    }
}
