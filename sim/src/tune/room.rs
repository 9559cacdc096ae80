//! Room to stream for the leading plans. Under a tight budget the weights a plan keeps on
//! the device can leave less room than its prefetch window for the layers in flight;
//! the simulated loads then wait for memory, and a layer's read no longer overlaps the
//! layer before. The LP cannot see that cliff: its stream buffer is the window times the
//! *fraction* streamed, so it keeps a few layers resident that cost the stream more than
//! they save. (Seen with a self-speculating draft at 512 MiB: four resident attention
//! layers left 1.0 layers of room and simulated at 9.58 tokens/s; streaming every layer
//! left 1.9 and simulated at 10.18.) Each leading plan that streams weights beside
//! device-resident ones is offered the same plan with device weight layers moved off
//! (MLP first, as `relaxed` moves them) until the room first holds one and two
//! streamed layers, and with none left; each is simulated and the fastest is kept.

use ferry_core::model::WeightGroup;
use ferry_core::plan::Policy;
use ferry_core::schedule::pool_specs;

use super::search::Searcher;
use super::{Candidate, DEVICE_POOL};

impl Searcher<'_> {
    /// The fastest of `candidate` and its variants with device weight layers moved off
    /// (`candidate` itself where the knob space leaves placement to the LP: FlexGen's).
    pub(super) fn with_room_to_stream(&self, candidate: Candidate) -> Candidate {
        if !self.space.stream_room {
            return candidate;
        }
        let mut best = candidate;
        for policy in self.roomier_policies(&best.policy, &best.workload) {
            if let Ok(Some(better)) = self.offer(&best, policy) {
                best = better;
            }
        }
        best
    }

    /// The policies to offer: along the chain of one device weight layer fewer at a time,
    /// the first whose device room holds one and two streamed layers (at most the
    /// prefetch window), and the end of the chain (no weight layer resident). Empty for a
    /// plan whose room holds its window already, that streams no weights, keeps none on
    /// the device, or computes host layers where they are (moving a layer there moves
    /// its compute, not its stream).
    fn roomier_policies(&self, policy: &Policy, workload: &ferry_core::plan::Workload) -> Vec<Policy> {
        let layers = self.request.model.num_layers;
        let device_weights = |p: &Policy| p.attention_weights.device + p.mlp_weights.device;
        let streams = policy.attention_weights.device < layers || policy.mlp_weights.device < layers;
        if policy.compute_host_layers_on_host || !streams || device_weights(policy) == 0 {
            return Vec::new();
        }
        let layer_bytes = self.layout.mean_bytes(WeightGroup::Attention) + self.layout.mean_bytes(WeightGroup::Mlp);
        let room = |p: &Policy| {
            let pools = pool_specs(p, self.request.model, workload, self.request.profile);
            pools[DEVICE_POOL].capacity_bytes.saturating_sub(pools[DEVICE_POOL].resident_bytes())
        };
        // Two layers of room let each layer's read overlap the layer before; a deeper
        // window only smooths the reads out, and offering it would cost a simulation
        // for nearly every leader (plans fill the budget to the brim).
        let window = (policy.prefetch_depth + 1).min(2);
        let mut held = room(policy) / layer_bytes.max(1);
        if held >= window {
            // The room is there already: a layer more streamed would only read more.
            return Vec::new();
        }
        let mut offered = Vec::new();
        let mut current = policy.clone();
        while device_weights(&current) > 0 {
            // `relaxed` moves weights before KV, so the chain never moves a KV layer.
            let Some(next) = self.relaxed(current.clone()) else { break };
            current = next;
            let now_held = room(&current) / layer_bytes.max(1);
            if now_held > held && held < window {
                offered.push(current.clone());
            }
            held = held.max(now_held);
        }
        if offered.last() != Some(&current) {
            offered.push(current);
        }
        offered
    }
}
