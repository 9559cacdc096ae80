//! Routed expert reads (`ExpertReads::Routed`): a mixture of experts whose MLP streams
//! reads its router part ahead like any group, routes each micro-batch of the visit
//! (`Op::Route`, after its attention), and only then reads the experts they chose —
//! one read for the visit, so an expert two micro-batches share is read once. The
//! read's `bytes` are the experts the visit's tokens are expected to touch (uniform
//! routing, or the plan's measured routing: `ModelSpec::expected_experts`, what the
//! simulator moves); it holds the most the visit's tokens could choose
//! (`ModelSpec::most_experts`, the largest experts: what the engine may need, so the
//! pools stay a true bound). Its requests are at most one projection of one expert
//! (`ExpertBytes::largest_tensor`).

use super::builder::{Builder, LoadPart, Loaded};
use crate::graph::{Op, TaskId, ROUTED_EXPERTS, ROUTER_PART};
use crate::model::{ExpertBytes, WeightGroup};

impl Builder<'_> {
    /// Whether `layer`'s experts are read as routed: a mixture of experts whose MLP
    /// streams to its device, under a policy that routes reads.
    pub(super) fn routes_experts(&self, layer: u32) -> bool {
        self.policy.routes_experts(self.model, &self.placements[layer as usize])
    }

    /// Bytes of `layer`'s hot experts, kept on its device (0 unless its experts are
    /// read as routed and the policy keeps some).
    pub(super) fn hot_expert_bytes(&self, layer: u32) -> u64 {
        if self.policy.hot_experts == 0 || !self.routes_experts(layer) {
            return 0;
        }
        self.expert_bytes(layer).of(&self.model.hot_experts(layer as u64, self.policy.hot_experts))
    }

    fn expert_bytes(&self, layer: u32) -> &ExpertBytes {
        &self.expert_bytes[(layer as usize).min(self.expert_bytes.len() - 1)]
    }

    /// The router part's load for a visit, gated like any weight load, with the
    /// layer's prefetched experts (`Policy::prefetched_experts`).
    pub(super) fn load_router(&mut self, layer: u32, step: u32, first_j: u32, gate: &[TaskId]) -> Loaded {
        let (hot, count) = (self.policy.hot_experts, self.policy.prefetched_experts);
        let sizes = self.expert_bytes(layer);
        let router = sizes.router + sizes.of(&self.model.prefetched_experts(layer as u64, hot, count));
        let part = LoadPart::contiguous(ROUTER_PART, router);
        self.load_parts(WeightGroup::Mlp, (layer, step, first_j), gate, &[part])
    }

    /// Micro-batch `j`'s routing after its attention: the MLP's norm and router on the
    /// device, with the router part loaded.
    pub(super) fn route(&mut self, step: u32, layer: u32, j: u32, attn_done: TaskId, router: &[TaskId]) -> TaskId {
        let side = self.device_of(layer);
        let hidden = self.hidden_on(side, j, step, layer);
        let rows = self.rows();
        let flops = 2 * rows * self.model.hidden_size * self.model.num_experts;
        // The norm and the router; the shared expert read ahead with them is the MLP's.
        let sizes = self.expert_bytes(layer);
        let bytes = sizes.router - sizes.shared;
        let mut task = self.compute_task(side, Op::Route, (layer, j, step), flops, bytes);
        task.deps.push(attn_done);
        task.deps.extend(hidden.filter(|&h| h != attn_done));
        task.deps.extend_from_slice(router);
        self.push(task)
    }

    /// The read of the experts the visit's micro-batches were routed to, after every
    /// route of the visit (`routes`), less the layer's hot experts (`Policy::hot_experts`),
    /// which stay on the device, and its prefetched ones, read with the router part.
    pub(super) fn load_routed_experts(&mut self, layer: u32, step: u32, first_j: u32, routes: &[TaskId]) -> Loaded {
        let tokens = self.rows() * routes.len() as u64;
        let hot = self.policy.hot_experts + self.policy.prefetched_experts;
        let cold = self.model.num_experts - hot.min(self.model.num_experts);
        let model = self.model;
        let expected = *self.cold_experts.entry(tokens).or_insert_with(|| model.expected_cold_experts(tokens, hot));
        let sizes = self.expert_bytes(layer);
        let part = LoadPart {
            piece: ROUTED_EXPERTS,
            bytes: sizes.expected(expected),
            held_bytes: sizes.most(self.model.most_experts(tokens).min(cold)),
            largest_request: sizes.largest_tensor,
        };
        self.load_parts(WeightGroup::Mlp, (layer, step, first_j), routes, &[part])
    }
}
