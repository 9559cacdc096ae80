//! Experts kept or read ahead for the leading plans: a mixture of experts whose MLPs
//! stream as routed reads can keep each such layer's most popular experts on the device
//! (`Policy::hot_experts`), so that a step reads only the others, and read the next most
//! popular ones ahead with the router part (`Policy::prefetched_experts`), so that their
//! read overlaps the layers before. The LP prices neither; device memory a simulated plan
//! leaves unused and the simulation do. Each leading plan is offered as many hot experts
//! per routed layer as that memory holds, then k and 2k prefetched ones (k: experts per
//! token), each simulated and kept when faster.

use ferry_core::graph::Place;
use ferry_core::plan::Policy;

use super::search::Searcher;
use super::Candidate;

impl Searcher<'_> {
    /// `candidate` with the most hot experts its unused device memory holds (half as
    /// many when that runs out of memory), then with k or 2k prefetched experts, each
    /// kept only when faster.
    pub(super) fn with_kept_experts(&self, candidate: Candidate) -> Candidate {
        let request = self.request;
        let Some(sizes) = &self.experts else { return candidate };
        let policy = &candidate.policy;
        if !policy.expert_reads.is_routed() || policy.hot_experts + policy.prefetched_experts > 0 {
            return candidate;
        }
        let routed_layers = policy
            .layer_placements(request.model.num_layers)
            .iter()
            .filter(|place| policy.routes_experts(request.model, place))
            .count() as u64;
        let device = candidate.metrics.pools.iter().find(|p| p.pool == Place::DEVICE);
        let (Some(device), true) = (device, routed_layers > 0) else { return candidate };
        let free = device.capacity_bytes.saturating_sub(device.peak_bytes);
        let experts = request.model.num_experts;
        let mut hot = (free / (routed_layers * sizes.most(1).max(1))).min(experts);
        let mut best = candidate;
        for _ in 0..2 {
            if hot == 0 {
                break;
            }
            match self.offer(&best, Policy { hot_experts: hot, ..best.policy.clone() }) {
                Ok(better) => {
                    best = better.unwrap_or(best);
                    break;
                }
                Err(()) => hot /= 2,
            }
        }
        let k = request.model.experts_per_token;
        let left = experts - best.policy.hot_experts;
        for count in [k, 2 * k] {
            if count > left {
                break;
            }
            if let Ok(Some(better)) = self.offer(&best, Policy { prefetched_experts: count, ..best.policy.clone() }) {
                best = better;
            }
        }
        best
    }
}
