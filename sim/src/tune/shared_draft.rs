//! A self-speculating draft's layers shared with the target. The draft runs the
//! target's first L layers; it shares the weights of each one the target keeps on the
//! device and holds its own copy of the others. Device layers are spread through the
//! stack by default (`DeviceLayers::Spread`), so the first ones are rarely among them
//! and the draft's copy costs memory the target could have used: in TinyLlama's shape
//! a one-layer copy is 84 MiB, a tenth of a 512 MiB budget. Each leading speculative
//! plan is offered the same plan with its device layers first and at least L of them
//! (taken from the disk, then the host): the copy's memory then holds target layers,
//! which the target no longer streams. It is simulated and kept when faster.

use ferry_core::plan::{DeviceLayers, Draft, Policy, TierCounts};

use super::search::Searcher;
use super::Candidate;

impl Searcher<'_> {
    /// `candidate`, or its variant with the first L layers' weights on the device when
    /// that simulates faster (L: a self-speculating draft's layers). Plans without such
    /// a draft, over several stages, computing host layers where they are, or already
    /// arranged so are left as they are.
    pub(super) fn with_draft_shared(&self, candidate: Candidate) -> Candidate {
        let draft_layers = match self.request.speculation.as_ref().map(|s| s.draft) {
            Some(Draft::SelfLayers { layers }) => layers,
            _ => return candidate,
        };
        let policy = &candidate.policy;
        if policy.device_layers == DeviceLayers::First
            || !policy.stages.is_empty()
            || policy.compute_host_layers_on_host
        {
            return candidate;
        }
        let shared = Policy {
            device_layers: DeviceLayers::First,
            attention_weights: at_least_on_device(policy.attention_weights, draft_layers),
            mlp_weights: at_least_on_device(policy.mlp_weights, draft_layers),
            ..policy.clone()
        };
        match self.offer(&candidate, shared) {
            Ok(Some(faster)) => faster,
            _ => candidate,
        }
    }
}

/// `counts` with at least `layers` on the device, taken from the disk first.
fn at_least_on_device(counts: TierCounts, layers: u64) -> TierCounts {
    let missing = layers.min(counts.total()).saturating_sub(counts.device);
    let from_disk = missing.min(counts.disk);
    let from_host = missing - from_disk;
    TierCounts { device: counts.device + missing, host: counts.host - from_host, disk: counts.disk - from_disk }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_layers_come_from_the_disk_first() {
        let counts = TierCounts { device: 0, host: 1, disk: 1 };
        assert_eq!(at_least_on_device(counts, 1), TierCounts { device: 1, host: 1, disk: 0 });
        assert_eq!(at_least_on_device(counts, 2), TierCounts { device: 2, host: 0, disk: 0 });
        assert_eq!(at_least_on_device(counts, 5), TierCounts { device: 2, host: 0, disk: 0 });
        let resident = TierCounts { device: 3, host: 0, disk: 1 };
        assert_eq!(at_least_on_device(resident, 2), resident);
    }
}
