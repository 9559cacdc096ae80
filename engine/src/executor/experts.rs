//! A mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks each token's `k` experts, each
//! expert (a SwiGLU MLP) multiplies the tokens routed to it once per step, and its
//! output joins each token's sum with that token's routing weight.
//!
//! Determinism across plans: a token's output is summed over its experts in
//! ascending expert order, and each expert's products give a row the same bits
//! whatever rows sit beside it (`kernels`' invariant), so grouping tokens into
//! different micro-batches cannot change a token.

use ferry_core::graph::{Place, Task};
use ferry_core::model::{ExpertPopularity, ModelSpec, WeightGroup};
use rayon::prelude::*;

use super::speculate::is_draft;
use super::{lock, Engine, RunReport};
use crate::backend::DeviceBuffer;
use crate::EngineError;

/// The router among an MoE group's tensors (`ModelSpec::ROUTER_TENSORS`: the norm, then it).
const ROUTER_TENSOR: u32 = 1;

/// Each token's chosen experts and their weights, one entry per row.
pub(super) type Routes = Vec<Vec<(usize, f32)>>;

/// Each token's experts with their weights: the `k` largest router logits (ties to
/// the lower expert), weighted by a softmax over those `k` alone — Mixtral's softmax
/// over all experts renormalised over the chosen ones, which is the same number.
/// The weights are computed in f64 and rounded once.
pub(super) fn route(logits: &[f32], experts: usize, k: usize) -> Routes {
    logits
        .chunks_exact(experts)
        .map(|row| {
            let mut order: Vec<usize> = (0..experts).collect();
            // NaN sorts last (a non-finite hidden state is reported where it arose).
            order
                .sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or_else(|| row[a].is_nan().cmp(&row[b].is_nan())));
            order.truncate(k);
            order.sort_unstable();
            let top = order.iter().map(|&e| row[e] as f64).fold(f64::NEG_INFINITY, f64::max);
            let exp: Vec<f64> = order.iter().map(|&e| (row[e] as f64 - top).exp()).collect();
            let sum: f64 = exp.iter().sum();
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
        let logits = self.project(weights, ROUTER_TENSOR, normed, rows, experts, side)?;
        Ok(route(&self.backend.download_f32(&logits)?, experts, k))
    }

    /// The distinct experts the micro-batches of `task`'s visit were routed to in its
    /// layer and step, ascending (what a routed read brings in).
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
            let first = ModelSpec::expert_tensors(*expert).start as u32;
            let mut x = self.activation(side, rows.len() * h)?;
            self.backend.gather_rows(&normed, h, rows, &mut x)?;
            let mut gate = self.project(&weights, first, &x, rows.len(), ffn, side)?;
            let up = self.project(&weights, first + 2, &x, rows.len(), ffn, side)?;
            drop(x);
            self.backend.silu_mul(&mut gate, &up)?;
            drop(up);
            self.project(&weights, first + 1, &gate, rows.len(), h, side)
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
        drop(normed);
        self.add_to_hidden(task, side, &out, "mlp")?;
        if !is_draft(task) {
            self.release_weights_if_last(task, WeightGroup::Mlp);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_takes_the_top_k_and_renormalises_their_softmax() {
        let logits = [0.1f32, 2.0, -1.0, 1.0, /* row 2 */ 3.0, 3.0, 0.0, 5.0];
        let routes = route(&logits, 4, 2);
        let (a, b) = (2.0f64.exp(), 1.0f64.exp());
        assert_eq!(routes[0], vec![(1, (a / (a + b)) as f32), (3, (b / (a + b)) as f32)]);
        // A tie for second place goes to the lower expert; the pair comes back in expert order.
        let (a, b) = (5.0f64.exp(), 3.0f64.exp());
        assert_eq!(routes[1], vec![(0, (b / (a + b)) as f32), (3, (a / (a + b)) as f32)]);
        // k = E: every expert, weights the full softmax.
        let all = route(&logits[..4], 4, 4);
        assert_eq!(all[0].len(), 4);
        assert!((all[0].iter().map(|&(_, w)| w as f64).sum::<f64>() - 1.0).abs() < 1e-6);
        // NaN never wins a place over a number.
        let with_nan = route(&[f32::NAN, 1.0, 0.5], 3, 2);
        assert_eq!(with_nan[0].iter().map(|&(e, _)| e).collect::<Vec<_>>(), vec![1, 2]);
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
