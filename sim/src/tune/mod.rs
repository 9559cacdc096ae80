//! Plan search: which placement, batching, schedule and transfer knobs give the best
//! predicted throughput (or latency) on this hardware.
//!
//! The space is searched in two levels:
//!
//! 1. **Groups** fix the knobs that change *where things go*: micro-batch size and
//!    count, host attention, llama.cpp-style host compute, pinned memory, and the
//!    schedule class (sequential / micro-batch-major / layer-major). For each group a
//!    linear program (good_lp + microlp, FlexGen's formulation extended with our
//!    knobs) chooses the fractions of attention weights, MLP weights and KV cache on
//!    device / host / disk that minimise a lower bound on the run time — per-step
//!    time ≥ each resource's busy time (≥ their sum for `sequential`) — under every
//!    memory constraint: resident weights and KV for the full sequence, hidden states,
//!    workspace, prefetch windows and staging buffers, and the profile's reserve. The
//!    group's LP uses the best bandwidth any of its members can reach and the smallest
//!    prefetch window, so its bound holds for every member. A group that cannot hold
//!    that window is bounded again with one layer in flight: a plan runs with less
//!    memory than its prefetch depth asks (its loads wait for memory), and such groups
//!    were once given up although their plans fit and ran fastest under tight budgets.
//! 2. **Members** add the transfer knobs: schedule, prefetch depth, chunk size, copy
//!    streams, I/O queue depth. Groups are visited best bound first; a group whose
//!    bound cannot beat the best simulated plan is pruned whole. In a surviving group,
//!    members are ranked by the LP's time terms at the group's placement with the
//!    member's own bandwidths, and the best member for each (schedule, prefetch depth)
//!    is rounded to whole layers and simulated.
//! 3. **Leaders** (plans within 15 % of the best) are offered variants, each simulated
//!    and kept when faster (or as fast, for the first): disk layers in free host RAM;
//!    more room to stream where resident layers leave less than two streamed layers of
//!    it (the LP's stream buffer shrinks with the fraction streamed, so it cannot see
//!    that cliff); a self-speculating draft's layers shared with the target (its device
//!    layers first); for a mixture of experts, experts kept on the device or read ahead.
//!
//! The LP is written in GB and ms: badly scaled LPs are misreported as infeasible.
//!
//! The pieces, one idea per file:
//!
//! - this file: the public API — the request, knob space, candidate and result types,
//!   [`tune`] and [`tune_and_compare`];
//! - `search`: groups and members, bounding, pruning, ranking and simulating (the `Searcher`);
//! - `lp`: the per-layer figures a group's LP is written in, the LP itself, and the
//!   member estimate taken from its time terms;
//! - `rates`: the bandwidths of the members' transfer knobs, looked up once per search;
//! - `rounding`: LP fractions to whole layers, and fitting them into memory;
//! - `room`, `shared_draft`, `hot`: the leaders' variants (room to stream; the draft's
//!   layers shared; experts kept or read ahead);
//! - `baselines`: the Accelerate-like, llama.cpp-like and FlexGen plans the search is compared with;
//! - `explain`: why nothing fits — which memory falls short, and by how much.

mod baselines;
mod explain;
mod hot;
mod lp;
mod rates;
mod room;
mod rounding;
mod search;
mod shared_draft;
mod speculative;
mod split;
mod stages;

use ferry_core::export::Engine;
use ferry_core::model::{Dtype, ModelSpec, WeightFormats};
use ferry_core::plan::{Policy, Schedule, Speculation, Workload};
use ferry_core::profile::Profile;
use ferry_core::trace::Metrics;
use ferry_core::units::MIB;
use rayon::prelude::*;

use crate::des::SimError;
use crate::predict::{predict_run_by, Extrapolation};

pub use self::baselines::{baselines, llama_cpp_largest_fit, llama_cpp_policy, Baseline};
use self::search::Searcher;
pub use self::search::NEAR_TIE;
pub use self::speculative::{tune_speculative, SpeculativeComparison, DRAFT_LENS};
pub use self::stages::{tune_pipeline, PipelineResult, PipelineStats, SplitBaseline};

/// Knob values the search tries.
#[derive(Debug, Clone)]
pub struct KnobSpace {
    pub schedules: Vec<Schedule>,
    pub micro_batch_sizes: Vec<u64>,
    pub micro_batch_counts: Vec<u64>,
    pub prefetch_depths: Vec<u64>,
    pub chunk_bytes: Vec<u64>,
    pub copy_streams: Vec<u32>,
    pub io_queue_depths: Vec<u32>,
    pub host_attention: Vec<bool>,
    pub host_compute: Vec<bool>,
    pub pinned: Vec<bool>,
    /// Offer the leading plans more room to stream: device weight layers moved off
    /// where the window does not fit beside them (`room`). FlexGen keeps its LP's placement.
    pub stream_room: bool,
    /// Leave the embedding table on disk in plans that stream (`embeddings: disk`, a
    /// lookup reading its rows). FlexGen reads a layer's weights whole; a pipeline's
    /// stages are priced with the table in memory.
    pub embeddings_on_disk: bool,
    /// Whose implementation runs the plans, at its own costs (`engines::EngineCosts`):
    /// FlexGen's for its baseline; `None`, Ferry's engine.
    pub engine: Option<Engine>,
}

impl KnobSpace {
    /// Everything Ferry knows how to run.
    pub fn full() -> KnobSpace {
        KnobSpace {
            schedules: Schedule::ALL.to_vec(),
            micro_batch_sizes: vec![1, 2, 4, 8, 16, 32, 64, 128],
            micro_batch_counts: vec![1, 2, 4, 8, 16],
            prefetch_depths: vec![1, 2, 3, 4],
            // Largest first: among members whose estimates tie, the coarser transfer wins.
            chunk_bytes: vec![
                256 * MIB,
                128 * MIB,
                64 * MIB,
                32 * MIB,
                16 * MIB,
                8 * MIB,
                4 * MIB,
                2 * MIB,
                MIB,
                MIB / 4,
            ],
            copy_streams: vec![1, 2, 4],
            io_queue_depths: vec![1, 4, 8],
            host_attention: vec![false, true],
            host_compute: vec![false, true],
            pinned: vec![false, true],
            stream_room: true,
            embeddings_on_disk: true,
            engine: None,
        }
    }

    /// FlexGen's policy space: its block schedule and LP placement, but none of the
    /// chunk, prefetch or stream knobs (one whole-tensor copy stream, one layer ahead).
    pub fn flexgen() -> KnobSpace {
        KnobSpace {
            schedules: vec![Schedule::ZigzagBlock],
            prefetch_depths: vec![1],
            chunk_bytes: vec![256 * MIB],
            copy_streams: vec![1],
            io_queue_depths: vec![1],
            host_compute: vec![false],
            pinned: vec![true],
            stream_room: false,
            embeddings_on_disk: false,
            engine: Some(Engine::Flexgen),
            ..KnobSpace::full()
        }
    }
}

/// The batch to plan for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchChoice {
    Fixed(u64),
    /// Any batch up to this size.
    Auto {
        max: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Generated tokens per second over the whole batch.
    Throughput,
    /// Time to finish one request (time to first token + generation).
    Latency,
}

#[derive(Debug, Clone)]
pub struct TuneRequest<'a> {
    pub model: &'a ModelSpec,
    pub profile: &'a Profile,
    pub prompt_len: u64,
    pub gen_len: u64,
    pub batch: BatchChoice,
    pub objective: Objective,
    /// How the weights are stored; the tuner never changes it (precision is the user's
    /// call: `ferry tune --weight-format` compares formats by tuning each).
    pub weight_format: WeightFormats,
    pub kv_dtype: Dtype,
    /// Plans speculate with this draft, draft length and assumed acceptance rate
    /// (`tune_speculative` searches the draft length).
    pub speculation: Option<Speculation>,
}

/// A simulated plan.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub policy: Policy,
    pub workload: Workload,
    pub metrics: Metrics,
    /// The LP lower bound of its group, ns (0 for baselines).
    pub bound_ns: u64,
}

impl Candidate {
    /// Larger is better, for either objective.
    pub fn score(&self, objective: Objective) -> f64 {
        match objective {
            Objective::Throughput => self.metrics.tokens_per_s,
            Objective::Latency => -(self.metrics.total_ns as f64),
        }
    }
}

/// What the search did, for people and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SearchStats {
    /// Discrete configurations enumerated (every member of every group).
    pub considered: u64,
    /// Linear programs solved (one per group).
    pub lp_solves: u64,
    /// Configurations covered by an LP lower bound (their group's).
    pub bounded: u64,
    /// Configurations whose group LP was infeasible: they cannot fit in memory.
    pub infeasible: u64,
    /// Configurations whose group bound could not beat the best simulated plan.
    pub pruned: u64,
    /// Configurations in surviving groups not simulated because a sibling with the same
    /// schedule and prefetch depth ranked better on the LP's time terms.
    pub ranked_out: u64,
    /// Configurations rounded to a concrete placement and simulated.
    pub simulated: u64,
    /// Simulated configurations whose rounded placement did not fit or deadlocked.
    pub rejected: u64,
    /// Variants of the leading plans simulated: disk layers in free host RAM, more
    /// room to stream, a draft's layers shared, experts kept on the device or read ahead.
    pub refined: u64,
}

#[derive(Debug, Clone)]
pub struct TuneResult {
    pub best: Candidate,
    /// The best simulated candidates, best first (distinct policies).
    pub top: Vec<Candidate>,
    pub stats: SearchStats,
    /// Best predicted tokens/s found at each batch size.
    pub by_batch: Vec<(u64, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error("{0}")]
    Impossible(String),
    #[error(transparent)]
    Sim(#[from] SimError),
}

/// The tuner searches one-stage plans, whose pools are the device's, then the host's.
const DEVICE_POOL: usize = 0;
const HOST_POOL: usize = 1;

/// Searches `space` for the plan `request` runs best with (see the module docs).
pub fn tune(request: &TuneRequest, space: &KnobSpace) -> Result<TuneResult, TuneError> {
    let searcher = Searcher::new(request, space);
    searcher.run()
}

/// A search and its comparison with the baselines.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub result: TuneResult,
    pub baselines: Vec<Baseline>,
    /// The baseline that beat every searched plan and so became the plan, if any.
    pub adopted_baseline: Option<&'static str>,
    /// Why the plan keeps layers on disk, when it does (see `Searcher::why_on_disk`).
    pub disk_note: Option<String>,
}

/// Searches, simulates the baselines at the winner's batch, and makes sure the plan
/// returned is never worse in simulation than any baseline of a schedule in `space`.
///
/// The search ranks with sampled extrapolation; the winner and the baselines are then
/// simulated step by step, so the figures reported are those `ferry simulate` gives.
pub fn tune_and_compare(request: &TuneRequest, space: &KnobSpace) -> Result<Comparison, TuneError> {
    let mut result = tune(request, space)?;
    let exact = |c: &Candidate, engine: Option<Engine>| -> Result<Candidate, SimError> {
        let p = predict_run_by(engine, &c.policy, request.model, &c.workload, request.profile, Extrapolation::Full)?;
        Ok(Candidate { metrics: p.metrics, ..c.clone() })
    };
    let mut baselines = baselines(request, result.best.workload.batch_size);
    // The winner's and the baselines' step-by-step simulations, side by side.
    let (best, exact_baselines) = rayon::join(
        || exact(&result.best, space.engine),
        || {
            baselines
                .par_iter()
                .map(|b| b.outcome.as_ref().ok().map(|c| exact(c, b.engine).map_err(|e| e.to_string())))
                .collect::<Vec<_>>()
        },
    );
    result.best = best?;
    result.top[0] = result.best.clone();
    for (baseline, exact) in baselines.iter_mut().zip(exact_baselines) {
        if let Some(outcome) = exact {
            baseline.outcome = outcome;
        }
    }
    let mut adopted_baseline = None;
    for baseline in &baselines {
        if let Ok(candidate) = &baseline.outcome {
            // A baseline outside the space asked for (`--schedule`) is compared, not adopted.
            let allowed = space.schedules.contains(&candidate.policy.schedule);
            if allowed && candidate.score(request.objective) > result.best.score(request.objective) {
                // Priced as the plan's own engine runs it, which is no slower.
                let candidate =
                    if baseline.engine == space.engine { candidate.clone() } else { exact(candidate, space.engine)? };
                result.top.insert(0, candidate.clone());
                result.best = candidate;
                adopted_baseline = Some(baseline.name);
            }
        }
    }
    let disk_note = Searcher::new(request, space).why_on_disk(&result.best);
    Ok(Comparison { result, baselines, adopted_baseline, disk_note })
}
