//! A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks each token's
//! `k` experts, each expert (a SwiGLU MLP) multiplies the tokens routed to it once per
//! step, and its output joins each token's sum with that token's routing weight. A
//! shared expert (Qwen2-MoE) then adds every token's own output, scaled by a sigmoid
//! gate.
//!
//! Determinism across plans: a token's output is summed over its experts in
//! ascending expert order, and each expert's products give a row the same bits
//! whatever rows sit beside it within a kernel (`kernels::Rows`). In a decoding step
//! every routed expert takes the few-row kernels (`Engine::expert_rows`), so neither
//! the micro-batching nor a speculative verification's extra rows can change a token
//! there; in the prefill an expert's row count, and with it its kernel, follows the
//! micro-batching.

use ferry_core::graph::{Place, Task};
use ferry_core::model::{ExpertPopularity, ModelSpec, WeightGroup};
use rayon::prelude::*;

use std::collections::HashMap;
use std::sync::Arc;

use super::speculate::is_draft;
use super::weights::{GroupPart, Lands, Loaded};
use super::{lock, Engine, RunReport};
use crate::backend::DeviceBuffer;
use crate::kernels::Rows;
use crate::EngineError;

/// The router among an MoE group's tensors (`ModelSpec::router_tensors`: the norm, then it).
const ROUTER_TENSOR: u32 = ModelSpec::ROUTER_TENSOR as u32;

/// Each token's chosen experts and their weights, one entry per row.
pub(super) type Routes = Vec<Vec<(usize, f32)>>;

/// Each token's experts with their weights: the `k` largest router logits (ties to
/// the lower expert), weighted by their share of a softmax over every expert, or with
/// `renormalize` by a softmax over those `k` alone — Mixtral's softmax over all experts
/// renormalised over the chosen ones, which is the same number. The weights are
/// computed in f64 and rounded once.
pub(super) fn route(logits: &[f32], experts: usize, k: usize, renormalize: bool) -> Routes {
    logits
        .chunks_exact(experts)
        .map(|row| {
            let mut order: Vec<usize> = (0..experts).collect();
            // NaN sorts last (a non-finite hidden state is reported where it arose).
            order
                .sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or_else(|| row[a].is_nan().cmp(&row[b].is_nan())));
            // The softmax's shift: the largest logit (chosen first: NaN sorts last).
            let top = row[order[0]] as f64;
            let over_all: f64 = if renormalize { 0.0 } else { row.iter().map(|&x| (x as f64 - top).exp()).sum() };
            order.truncate(k);
            order.sort_unstable();
            let exp: Vec<f64> = order.iter().map(|&e| (row[e] as f64 - top).exp()).collect();
            let sum: f64 = if renormalize { exp.iter().sum() } else { over_all };
            order.iter().zip(&exp).map(|(&e, &x)| (e, (x / sum) as f32)).collect()
        })
        .collect()
}

/// The rows routed to one expert (ascending) and their weights.
pub(super) type ExpertRows = (Vec<usize>, Vec<f32>);

/// Per expert, the rows routed to it and their weights.
pub(super) fn group_by_expert(routes: &[Vec<(usize, f32)>], experts: usize) -> Vec<ExpertRows> {
    let mut groups = vec![(Vec::new(), Vec::new()); experts];
    for (row, choices) in routes.iter().enumerate() {
        for &(expert, weight) in choices {
            groups[expert].0.push(row);
            groups[expert].1.push(weight);
        }
    }
    groups
}

/// The experts one MoE layer's tokens of one micro-batch were routed to in one step.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExpertUse {
    pub step: u32,
    pub layer: u32,
    pub micro_batch: u32,
    /// Tokens routed (rows of the micro-batch in this step).
    pub tokens: u32,
    /// The distinct experts they were routed to, ascending.
    pub experts: Vec<u16>,
    /// Tokens routed to each of `experts`.
    pub routed: Vec<u32>,
}

impl RunReport {
    /// Mean distinct experts per (MoE layer, micro-batch) in the prefill (`prefill`)
    /// or in the decoding steps; `None` for a dense model.
    pub fn mean_experts(&self, prefill: bool) -> Option<f64> {
        let used: Vec<usize> =
            self.experts.iter().filter(|u| (u.step == 0) == prefill).map(|u| u.experts.len()).collect();
        (!used.is_empty()).then(|| used.iter().sum::<usize>() as f64 / used.len() as f64)
    }

    /// The run's routing: per MoE layer, the share of its tokens routed to each expert
    /// (every step; `None` for a dense model or a run without MoE layers).
    pub fn expert_popularity(&self, spec: &ModelSpec) -> Option<ExpertPopularity> {
        if self.experts.is_empty() || spec.num_experts == 0 {
            return None;
        }
        let mut counts = vec![(0u64, vec![0u64; spec.num_experts as usize]); spec.num_layers as usize];
        for used in &self.experts {
            let (tokens, routed) = &mut counts[used.layer as usize];
            *tokens += used.tokens as u64;
            for (&expert, &n) in used.experts.iter().zip(&used.routed) {
                routed[expert as usize] += n as u64;
            }
        }
        Some(ExpertPopularity::from_counts(&spec.name, spec.experts_per_token, &counts))
    }
}

impl Engine<'_> {
    /// Routes one micro-batch's tokens of one layer: the MLP's norm and router, each
    /// token's top k. Kept for the routed-experts read and the MLP (`Op::Route`).
    pub(super) fn route_tokens(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let weights = self.layer_weights(task, WeightGroup::Mlp)?;
        let rows = self.policy.micro_batch_size as usize * self.positions_of(task)?.new;
        let normed = self.normed_hidden(task, side, Engine::tensor(&weights, 0)?, rows)?;
        let routes = self.routes_of(task, side, &weights, &normed, rows)?;
        lock(&self.routes).insert((task.layer, task.step, task.micro_batch), routes);
        Ok(())
    }

    /// The router's logits over the `rows` normed rows and each row's top k.
    fn routes_of(
        &self,
        task: &Task,
        side: Place,
        weights: &[std::sync::Arc<super::weights::Loaded>],
        normed: &crate::backend::DeviceBuffer,
        rows: usize,
    ) -> Result<Routes, EngineError> {
        let spec = self.spec_of(task);
        let (experts, k) = (spec.num_experts as usize, spec.experts_per_token as usize);
        let logits = self.project(weights, ROUTER_TENSOR, normed, self.product_rows(task, rows), experts, side)?;
        Ok(route(&self.backend.download_f32(&logits)?, experts, k, spec.renormalize_top_k))
    }

    /// Whether `layer`'s experts are read as routed: its MLP streams to its device
    /// (`schedule::experts`' `routes_experts`, for the engine's placements).
    fn routes_experts(&self, layer: u32) -> bool {
        self.placements.get(layer as usize).is_some_and(|place| self.policy.routes_experts(self.spec, place))
    }

    /// Every routed layer's hot experts (`Policy::hot_experts`), read onto its device
    /// before the run, as the plan's resident weights are.
    pub(super) fn read_hot_experts(&self) -> Result<HashMap<u32, Arc<Loaded>>, EngineError> {
        let mut hot = HashMap::new();
        if self.policy.hot_experts == 0 {
            return Ok(hot);
        }
        for layer in 0..self.spec.num_layers as u32 {
            if !self.routes_experts(layer) || !self.holds_group(WeightGroup::Mlp, layer) {
                continue;
            }
            let experts = self.spec.hot_experts(layer as u64, self.policy.hot_experts);
            let tensors = GroupPart::Tensors(experts.iter().flat_map(|&e| self.spec.expert_tensors(e)).collect());
            let place = self.layer_device(layer);
            hot.insert(
                layer,
                Arc::new(self.read_group(WeightGroup::Mlp, layer as u64, &tensors, place, Lands::Resident)?),
            );
        }
        Ok(hot)
    }

    /// What a router part's read brings in: the router part's tensors and the layer's
    /// prefetched experts' (`Policy::prefetched_experts`).
    pub(super) fn router_part_tensors(&self, task: &Task) -> Vec<usize> {
        let spec = self.spec_of(task);
        let (hot, count) = (self.policy.hot_experts, self.policy.prefetched_experts);
        let prefetched =
            if is_draft(task) { Vec::new() } else { spec.prefetched_experts(task.layer as u64, hot, count) };
        spec.router_tensors().chain(prefetched.into_iter().flat_map(|e| spec.expert_tensors(e))).collect()
    }

    /// The hot experts kept on `layer`'s device, if any.
    pub(super) fn hot_loaded(&self, layer: u32) -> Option<Arc<Loaded>> {
        self.hot_experts.get(&layer).cloned()
    }

    /// The distinct experts the micro-batches of `task`'s visit were routed to in its
    /// layer and step that its device does not keep (`Policy::hot_experts`), ascending:
    /// what a routed read brings in.
    pub(super) fn visit_experts(&self, task: &Task) -> Result<Vec<usize>, EngineError> {
        let visit = if self.layer_major() {
            0..self.policy.num_micro_batches as u32
        } else {
            task.micro_batch..task.micro_batch + 1
        };
        let routes = lock(&self.routes);
        let mut used = vec![false; self.spec.num_experts as usize];
        for j in visit {
            let rows = routes.get(&(task.layer, task.step, j)).ok_or_else(|| {
                EngineError::Internal(format!("{}: micro-batch {j} was not routed before the read", task.label()))
            })?;
            for &(expert, _) in rows.iter().flatten() {
                used[expert] = true;
            }
        }
        if self.hot_experts.contains_key(&task.layer) {
            for e in self.spec.hot_experts(task.layer as u64, self.policy.hot_experts) {
                used[e] = false;
            }
        }
        let (hot, count) = (self.policy.hot_experts, self.policy.prefetched_experts);
        for e in self.spec.prefetched_experts(task.layer as u64, hot, count) {
            used[e] = false;
        }
        Ok(used.iter().enumerate().filter(|(_, &u)| u).map(|(e, _)| e).collect())
    }

    /// The MoE MLP of one layer and its residual: norm, router (or the routes its
    /// `Op::Route` task kept), the routed experts.
    pub(super) fn moe_mlp(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let spec = self.spec_of(task);
        let (h, ffn) = (spec.hidden_size as usize, spec.intermediate_size as usize);
        let rows = self.policy.micro_batch_size as usize * self.positions_of(task)?.new;
        let weights = self.layer_weights(task, WeightGroup::Mlp)?;
        // The norm again where a route task routed these rows: a few rows of h values,
        // cheaper than keeping every routed micro-batch's normed rows until its MLP.
        let normed = self.normed_hidden(task, side, Engine::tensor(&weights, 0)?, rows)?;
        let kept =
            if is_draft(task) { None } else { lock(&self.routes).remove(&(task.layer, task.step, task.micro_batch)) };
        let routes = match kept {
            Some(routes) => routes,
            None => self.routes_of(task, side, &weights, &normed, rows)?,
        };
        let groups = group_by_expert(&routes, spec.num_experts as usize);
        if !is_draft(task) {
            let chosen = groups.iter().enumerate().filter(|(_, g)| !g.0.is_empty());
            let (experts, routed) = chosen.map(|(e, g)| (e as u16, g.0.len() as u32)).unzip();
            let (step, layer, micro_batch, tokens) = (task.step, task.layer, task.micro_batch, rows as u32);
            lock(&self.expert_use).push(ExpertUse { step, layer, micro_batch, tokens, experts, routed });
        }
        let chosen: Vec<(usize, ExpertRows)> =
            groups.into_iter().enumerate().filter(|(_, (rows, _))| !rows.is_empty()).collect();
        let expert_output = |(expert, (rows, _)): &(usize, ExpertRows)| {
            let first = spec.expert_tensors(*expert).start as u32;
            let mut x = self.activation(side, rows.len() * h)?;
            self.backend.gather_rows(&normed, h, rows, &mut x)?;
            self.swiglu(&weights, first, &x, self.expert_rows(task, rows.len()), (ffn, h), side)
        };
        // Where the CPU computes, the chosen experts run side by side on the compute
        // threads: a decoding step's few rows make each product too small to split
        // well (three parallel passes per expert, each mostly hand-over), while one
        // expert per thread keeps every thread busy; a product inside still splits
        // when a thread is idle. Each expert's output is the same bits either way
        // (the products do not depend on the threads), and they are summed in expert
        // order below, so the tokens are too.
        let outputs: Vec<Result<DeviceBuffer, EngineError>> = if self.backend.host_addressable(side) {
            crate::kernels::in_pool(|| chosen.par_iter().map(expert_output).collect())
        } else {
            chosen.iter().map(expert_output).collect()
        };
        let mut out = self.activation(side, rows * h)?;
        for ((_, (rows, scales)), down) in chosen.iter().zip(outputs) {
            self.backend.add_scaled_rows(&mut out, h, rows, scales, &down?)?;
        }
        if let Some(shared) = spec.shared_expert_tensors() {
            self.add_shared_expert(task, side, &weights, &normed, rows, shared.start as u32, &mut out)?;
        }
        drop(normed);
        self.add_to_hidden(task, side, &out, "mlp")?;
        if !is_draft(task) {
            self.release_weights_if_last(task, WeightGroup::Mlp);
        }
        Ok(())
    }
}

impl Engine<'_> {
    /// A SwiGLU MLP whose gate, down and up projections are the group's tensors
    /// `first`, `first + 1` and `first + 2`, over `rows` rows of `x`: (intermediate
    /// width, hidden size) wide.
    fn swiglu(
        &self,
        weights: &[std::sync::Arc<super::weights::Loaded>],
        first: u32,
        x: &DeviceBuffer,
        rows: Rows,
        (width, h): (usize, usize),
        side: Place,
    ) -> Result<DeviceBuffer, EngineError> {
        let mut gate = self.project(weights, first, x, rows, width, side)?;
        let up = self.project(weights, first + 2, x, rows, width, side)?;
        self.backend.silu_mul(&mut gate, &up)?;
        drop(up);
        self.project(weights, first + 1, &gate, rows, h, side)
    }

    /// The shared expert over every row of `normed` (its tensors from `first`: gate,
    /// down and up projections, then its gate's row), each row's output scaled by the
    /// sigmoid of its gate and added to `out` after the routed experts (Hugging Face's
    /// Qwen2MoeSparseMoeBlock adds it last too).
    #[allow(clippy::too_many_arguments)]
    fn add_shared_expert(
        &self,
        task: &Task,
        side: Place,
        weights: &[std::sync::Arc<super::weights::Loaded>],
        normed: &DeviceBuffer,
        rows: usize,
        first: u32,
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError> {
        let spec = self.spec_of(task);
        let (h, width) = (spec.hidden_size as usize, spec.shared_expert_intermediate_size as usize);
        let down = self.swiglu(weights, first, normed, self.product_rows(task, rows), (width, h), side)?;
        let gate = self.project(weights, first + 3, normed, self.product_rows(task, rows), 1, side)?;
        let scales: Vec<f32> =
            self.backend.download_f32(&gate)?.iter().map(|&x| (1.0 / (1.0 + (-(x as f64)).exp())) as f32).collect();
        let every_row: Vec<usize> = (0..rows).collect();
        self.backend.add_scaled_rows(out, h, &every_row, &scales, &down)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_takes_the_top_k_and_renormalises_their_softmax() {
        let logits = [0.1f32, 2.0, -1.0, 1.0, /* row 2 */ 3.0, 3.0, 0.0, 5.0];
        let routes = route(&logits, 4, 2, true);
        let (a, b) = (2.0f64.exp(), 1.0f64.exp());
        assert_eq!(routes[0], vec![(1, (a / (a + b)) as f32), (3, (b / (a + b)) as f32)]);
        // A tie for second place goes to the lower expert; the pair comes back in expert order.
        let (a, b) = (5.0f64.exp(), 3.0f64.exp());
        assert_eq!(routes[1], vec![(0, (b / (a + b)) as f32), (3, (a / (a + b)) as f32)]);
        // k = E: every expert, weights the full softmax.
        let all = route(&logits[..4], 4, 4, true);
        assert_eq!(all[0].len(), 4);
        assert!((all[0].iter().map(|&(_, w)| w as f64).sum::<f64>() - 1.0).abs() < 1e-6);
        // NaN never wins a place over a number.
        let with_nan = route(&[f32::NAN, 1.0, 0.5], 3, 2, true);
        assert_eq!(with_nan[0].iter().map(|&(e, _)| e).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn without_renormalising_the_chosen_keep_their_share_of_the_whole_softmax() {
        let logits = [0.1f32, 2.0, -1.0, 1.0];
        let all: f64 = logits.iter().map(|&x| (x as f64 - 2.0).exp()).sum();
        let routes = route(&logits, 4, 2, false);
        assert_eq!(routes[0], vec![(1, (1.0 / all) as f32), (3, ((-1.0f64).exp() / all) as f32)]);
        assert!(routes[0].iter().map(|&(_, w)| w).sum::<f32>() < 1.0);
        // The same experts as with renormalising, only the weights differ.
        let renormalised = route(&logits, 4, 2, true);
        assert_eq!(
            routes[0].iter().map(|r| r.0).collect::<Vec<_>>(),
            renormalised[0].iter().map(|r| r.0).collect::<Vec<_>>()
        );
    }

    #[test]
    fn tokens_group_by_expert_in_row_order() {
        let routes = vec![vec![(0, 0.5), (2, 0.5)], vec![(2, 0.9), (3, 0.1)], vec![(0, 0.3), (3, 0.7)]];
        let groups = group_by_expert(&routes, 4);
        assert_eq!(groups[0], (vec![0, 2], vec![0.5, 0.3]));
        assert_eq!(groups[1], (vec![], vec![]));
        assert_eq!(groups[2], (vec![0, 1], vec![0.5, 0.9]));
        assert_eq!(groups[3], (vec![1, 2], vec![0.1, 0.7]));
    }
}
