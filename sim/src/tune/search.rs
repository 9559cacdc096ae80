//! The two-level search itself: the groups (placement knobs) and their members (transfer
//! knobs), each group bounded by its LP, groups visited best bound first and pruned when
//! they cannot beat the best simulated plan, members ranked by the LP's time terms, and
//! the survivors rounded, fitted and simulated. Ends by choosing among near-ties and
//! summarising the simulated plans into a `TuneResult`.

use ferry_core::plan::{ExpertReads, Policy, Schedule, Workload};
use rayon::prelude::*;

use super::lp::{Fractions, LayerFigures, Transfer};
use super::{BatchChoice, Candidate, KnobSpace, Objective, SearchStats, TuneError, TuneRequest, TuneResult};
use crate::cost::CostModel;
use crate::des::SimError;
use crate::predict::{predict_run_by, Extrapolation, Prediction};

/// Schedule classes share a placement LP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    Sequential,
    BatchMajor,
    LayerMajor,
}

impl Class {
    pub(super) fn of(schedule: Schedule) -> Class {
        match schedule {
            Schedule::Sequential => Class::Sequential,
            Schedule::LayerPrefetch => Class::BatchMajor,
            Schedule::ZigzagBlock | Schedule::Pipelined => Class::LayerMajor,
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Group {
    pub(super) micro_batch_size: u64,
    pub(super) num_micro_batches: u64,
    pub(super) host_attention: bool,
    pub(super) host_compute: bool,
    pub(super) pinned: bool,
    pub(super) class: Class,
    pub(super) schedules: Vec<Schedule>,
    /// How a mixture of experts' streamed experts are read (both are searched).
    pub(super) expert_reads: ExpertReads,
}

impl Group {
    pub(super) fn batch(&self) -> u64 {
        self.micro_batch_size * self.num_micro_batches
    }
}

/// One member's transfer knobs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Member {
    pub(super) schedule: Schedule,
    pub(super) prefetch_depth: u64,
    pub(super) chunk_bytes: u64,
    pub(super) copy_streams: u32,
    pub(super) io_queue_depth: u32,
}

pub(super) struct Searcher<'a> {
    pub(super) request: &'a TuneRequest<'a>,
    pub(super) space: &'a KnobSpace,
    pub(super) cost: CostModel<'a>,
    /// The weights' bytes in the request's formats.
    pub(super) layout: ferry_core::model::WeightLayout,
    /// A mixture of experts: the first layer's MLP as router part and experts (what
    /// routed reads move; `None` for a dense model).
    pub(super) experts: Option<ferry_core::model::ExpertBytes>,
    /// Variants of the leading plans simulated so far (`SearchStats::refined`); counted
    /// from the threads that simulate them side by side.
    pub(super) refined: std::sync::atomic::AtomicU64,
    /// The request sizes searched (`searched_chunk_sizes`).
    chunk_sizes: Vec<u64>,
    /// The members' bandwidths, looked up once (`rates`).
    pub(super) rates: super::rates::MemberRates,
    /// Whether plans may leave the embedding table on disk: the space allows it and
    /// `Policy::validate`'s rules do (an untied head, no draft, rows stored one by one).
    pub(super) embeddings_may_stay_on_disk: bool,
}

/// Prune when even the optimistic bound is this much worse than the best simulated plan
/// (the bound sums per-step maxima and uses mean context, so it can be a little off).
const BOUND_SLACK: f64 = 0.02;

/// Plans predicted within this fraction of the best count as tied (see `rank_simulated`).
pub const NEAR_TIE: f64 = 0.005;

/// Simulated plans within this fraction of the best are offered host RAM for their
/// disk-tier layers (promotion has gained 12 % on a plan: 26.2 → 29.4 tokens/s;
/// each one offered costs a simulation).
const PROMOTE_WITHIN: f64 = 0.15;

/// Times a plan whose simulation runs out of memory is tried again with a layer less
/// on the device.
const RELAXATIONS: usize = 3;

/// A group whose LP has a solution: its members, the figures and placement of its LP,
/// and its bound.
struct Bounded {
    group: Group,
    members: Vec<Member>,
    figures: LayerFigures,
    fractions: Fractions,
    bound_ms: f64,
}

impl<'a> Searcher<'a> {
    pub(super) fn new(request: &'a TuneRequest<'a>, space: &'a KnobSpace) -> Searcher<'a> {
        let layout = ferry_core::model::WeightLayout::of(request.model, &request.weight_format);
        let cost = CostModel::for_formats(request.profile, request.model, &request.weight_format);
        let chunk_sizes = searched_chunk_sizes(request.profile, space);
        let rates = super::rates::MemberRates::new(&cost, &chunk_sizes, &space.copy_streams, &space.io_queue_depths);
        let embeddings_may_stay_on_disk = space.embeddings_on_disk
            && !request.model.tie_word_embeddings
            && request.speculation.is_none()
            && layout.token_embedding().rows_contiguous();
        Searcher {
            request,
            space,
            cost,
            rates,
            experts: layout.expert_bytes(request.model, 0),
            layout,
            refined: std::sync::atomic::AtomicU64::new(0),
            chunk_sizes,
            embeddings_may_stay_on_disk,
        }
    }

    pub(super) fn unified(&self) -> bool {
        self.request.profile.unified_memory
    }

    fn batch_configs(&self) -> Vec<(u64, u64)> {
        let mut configs = Vec::new();
        for &mb in &self.space.micro_batch_sizes {
            for &n in &self.space.micro_batch_counts {
                let ok = match self.request.batch {
                    BatchChoice::Fixed(b) => mb * n == b,
                    BatchChoice::Auto { max } => mb * n <= max,
                };
                if ok {
                    configs.push((mb, n));
                }
            }
        }
        if let BatchChoice::Fixed(b) = self.request.batch {
            if configs.is_empty() {
                // A batch the power-of-two lists miss: one micro-batch of that size.
                configs.push((b, 1));
            }
        }
        configs
    }

    fn groups(&self) -> Vec<Group> {
        // With unified memory there is no host tier, no copy to pin and no host side to delegate to.
        let only_false = |options: &[bool]| -> Vec<bool> {
            if self.unified() {
                vec![false]
            } else {
                options.to_vec()
            }
        };
        let (host_attention_options, host_compute_options, pinned_options) = (
            only_false(&self.space.host_attention),
            only_false(&self.space.host_compute),
            only_false(&self.space.pinned),
        );
        // Only a mixture of experts reads its MLP either way.
        let expert_reads: &[ExpertReads] = if self.request.model.num_experts > 0 {
            &[ExpertReads::Routed, ExpertReads::Whole]
        } else {
            &[ExpertReads::Routed]
        };
        let mut groups = Vec::new();
        for (mb, n) in self.batch_configs() {
            for &host_attention in &host_attention_options {
                for &host_compute in &host_compute_options {
                    for &pinned in &pinned_options {
                        // llama.cpp's split keeps KV beside each layer: no separate host attention.
                        if host_compute && host_attention {
                            continue;
                        }
                        for class in [Class::Sequential, Class::BatchMajor, Class::LayerMajor] {
                            let schedules: Vec<Schedule> =
                                self.space.schedules.iter().copied().filter(|s| Class::of(*s) == class).collect();
                            if schedules.is_empty() {
                                continue;
                            }
                            for &expert_reads in expert_reads {
                                groups.push(Group {
                                    micro_batch_size: mb,
                                    num_micro_batches: n,
                                    host_attention,
                                    host_compute,
                                    pinned,
                                    class,
                                    schedules: schedules.clone(),
                                    expert_reads,
                                });
                            }
                        }
                    }
                }
            }
        }
        groups
    }

    fn members(&self, group: &Group) -> Vec<Member> {
        let unified = self.unified();
        let streams: &[u32] = if unified { &[1] } else { &self.space.copy_streams };
        let mut members = Vec::new();
        for &schedule in &group.schedules {
            let depths: &[u64] = if schedule == Schedule::Sequential { &[0] } else { &self.space.prefetch_depths };
            for &prefetch_depth in depths {
                for &chunk_bytes in &self.chunk_sizes {
                    for &copy_streams in streams {
                        for &io_queue_depth in &self.space.io_queue_depths {
                            members.push(Member {
                                schedule,
                                prefetch_depth,
                                chunk_bytes,
                                copy_streams,
                                io_queue_depth,
                            });
                        }
                    }
                }
            }
        }
        members
    }

    fn member_transfer(&self, group: &Group, member: &Member) -> Transfer {
        Transfer {
            h2d_gbps: self.h2d_rate(group.pinned, member.chunk_bytes, member.copy_streams),
            disk_gbps: self.disk_rate(member.chunk_bytes, member.io_queue_depth),
            window: member.prefetch_depth as f64 + 1.0,
        }
    }

    /// The best transfer figures any member of the group reaches: valid for its bound.
    fn best_transfer(&self, group: &Group, members: &[Member]) -> Transfer {
        let mut best = Transfer { h2d_gbps: 0.0, disk_gbps: 0.0, window: f64::MAX };
        for member in members {
            let t = self.member_transfer(group, member);
            best.h2d_gbps = best.h2d_gbps.max(t.h2d_gbps);
            best.disk_gbps = best.disk_gbps.max(t.disk_gbps);
            best.window = best.window.min(t.window);
        }
        best
    }

    pub(super) fn workload(&self, group: &Group) -> Workload {
        Workload { batch_size: group.batch(), prompt_len: self.request.prompt_len, gen_len: self.request.gen_len }
    }

    pub(super) fn run(&self) -> Result<TuneResult, TuneError> {
        self.check_capacity()?;
        let mut stats = SearchStats::default();
        // Level 1: bound every group.
        let mut bounded = self.bound_groups(&mut stats);
        if bounded.is_empty() {
            return Err(TuneError::Impossible(self.explain_impossible()));
        }
        bounded.sort_by(|x, y| self.bound_score(y).total_cmp(&self.bound_score(x)));
        // Level 2: visit groups best bound first. Where no rounded plan runs, again with
        // plans whose streamed buffer misses the budget relaxed too (`simulate_member`).
        let bounded_stats = stats.clone();
        let mut simulated = self.visit_groups(&bounded, &mut stats, false);
        if simulated.is_empty() {
            stats = bounded_stats;
            simulated = self.visit_groups(&bounded, &mut stats, true);
        }
        if simulated.is_empty() {
            return Err(TuneError::Impossible(format!(
                "no rounded placement fits or runs without deadlock: {}",
                self.explain_impossible()
            )));
        }
        // The leaders' variants, each kept where it simulates faster. Room before the
        // draft's shared layers: room's chain moves device layers off one at a time,
        // which would undo a shared layer; sharing then puts the draft's layers back.
        let promoted = self.refine_leaders(simulated, |c| self.with_disk_layers_promoted(c));
        let roomier = self.refine_leaders(promoted, |c| self.with_room_to_stream(c));
        let shared = self.refine_leaders(roomier, |c| self.with_draft_shared(c));
        let heated = self.refine_leaders(shared, |c| self.with_kept_experts(c));
        stats.refined = self.refined.load(std::sync::atomic::Ordering::Relaxed);
        Ok(summarise(heated, stats, self.request.objective))
    }

    /// Solves every group's LP; the groups with a feasible placement, in search order.
    /// The groups are independent: their LPs are solved side by side (results in
    /// group order, so the search is the same on any number of cores).
    fn bound_groups(&self, stats: &mut SearchStats) -> Vec<Bounded> {
        let solved: Vec<(Option<Bounded>, u64, u64)> = self
            .groups()
            .into_par_iter()
            .map(|group| {
                let members = self.members(&group);
                let count = members.len() as u64;
                let figures = self.figures(&group);
                let best = self.best_transfer(&group, &members);
                // The window keeps room to prefetch, but a plan also runs with less (its
                // loads wait for memory under the dispatch rule): a group that cannot
                // hold the window is bounded again with one layer in flight before it
                // is given up.
                let mut solves = 1;
                let solved = self.solve(&group, &figures, best).or_else(|| {
                    solves += 1;
                    self.solve(&group, &figures, Transfer { window: best.window.min(1.0), ..best })
                });
                let bounded =
                    solved.map(|(fractions, bound_ms)| Bounded { group, members, figures, fractions, bound_ms });
                (bounded, count, solves)
            })
            .collect();
        let mut bounded: Vec<Bounded> = Vec::new();
        for (group, count, solves) in solved {
            stats.considered += count;
            stats.bounded += count;
            stats.lp_solves += solves;
            match group {
                Some(b) => bounded.push(b),
                None => stats.infeasible += count,
            }
        }
        bounded
    }

    /// Best achievable score by the bound: tokens/s (throughput) or −ms (latency).
    fn bound_score(&self, b: &Bounded) -> f64 {
        match self.request.objective {
            Objective::Throughput => b.group.batch() as f64 * self.request.gen_len as f64 / (b.bound_ms / 1000.0),
            Objective::Latency => -b.bound_ms,
        }
    }

    /// Simulates the surviving groups' best members, pruning every group whose bound
    /// cannot beat the best plan simulated so far.
    fn visit_groups(&self, bounded: &[Bounded], stats: &mut SearchStats, relax_misfits: bool) -> Vec<Candidate> {
        let objective = self.request.objective;
        let mut simulated: Vec<Candidate> = Vec::new();
        let mut best_score = f64::NEG_INFINITY;
        for b in bounded {
            let optimistic = self.bound_score(b);
            let beaten = match objective {
                Objective::Throughput => optimistic * (1.0 + BOUND_SLACK) <= best_score,
                Objective::Latency => optimistic * (1.0 - BOUND_SLACK) <= best_score,
            };
            if beaten {
                stats.pruned += b.members.len() as u64;
                continue;
            }
            for candidate in self.simulate_best_members(b, stats, relax_misfits) {
                best_score = best_score.max(candidate.score(objective));
                simulated.push(candidate);
            }
        }
        simulated
    }

    /// Ranks the group's members; simulates the best one per (schedule, prefetch depth).
    /// The simulations run side by side (each is independent; the candidates come back
    /// in rank order, so the search is the same on any number of cores).
    fn simulate_best_members(&self, b: &Bounded, stats: &mut SearchStats, relax_misfits: bool) -> Vec<Candidate> {
        let mut chosen: Vec<Member> = Vec::new();
        let workload = self.workload(&b.group);
        for index in self.rank_members(b) {
            let member = b.members[index];
            let key = (member.schedule, member.prefetch_depth);
            if chosen.iter().any(|m| (m.schedule, m.prefetch_depth) == key) {
                stats.ranked_out += 1;
                continue;
            }
            chosen.push(member);
        }
        stats.simulated += chosen.len() as u64;
        let outcomes: Vec<Option<Candidate>> =
            chosen.par_iter().map(|member| self.simulate_member(b, member, workload, relax_misfits)).collect();
        stats.rejected += outcomes.iter().filter(|c| c.is_none()).count() as u64;
        outcomes.into_iter().flatten().collect()
    }

    /// Member indices, best estimate first (ties in enumeration order).
    fn rank_members(&self, b: &Bounded) -> Vec<usize> {
        let mut ranked: Vec<(f64, usize)> = b
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| (self.estimate(&b.group, &b.figures, &b.fractions, self.member_transfer(&b.group, m)), i))
            .collect();
        ranked.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
        ranked.into_iter().map(|(_, index)| index).collect()
    }

    /// Rounds the group's placement for `member`, fits it and simulates it; `None` when
    /// the rounded placement does not fit or the simulation fails (deadlock) even with
    /// `RELAXATIONS` more layers off the device. With `relax_misfits`, a plan whose
    /// streamed buffer is larger than what its resident set leaves is relaxed too.
    fn simulate_member(
        &self,
        b: &Bounded,
        member: &Member,
        workload: Workload,
        relax_misfits: bool,
    ) -> Option<Candidate> {
        let policy = self.policy_for(&b.group, &b.fractions, member);
        let mut policy = self.fit(policy, &workload)?;
        for attempt in 0..=RELAXATIONS {
            match self.predict(&policy, &workload) {
                Ok(prediction) => {
                    let bound_ns = (b.bound_ms * 1e6) as u64;
                    let candidate = Candidate { policy, workload, metrics: prediction.metrics, bound_ns };
                    return Some(candidate);
                }
                // `fit` counts the resident sets only; the buffers of the weights in
                // flight come on top, so a plan that misses by a little fits with a
                // layer less on the device: one that deadlocks, or (when asked, once:
                // a layer frees a streamed buffer's worth, and each try costs a
                // lowering) one whose streamed buffer is larger than what the resident
                // set leaves.
                Err(crate::des::SimError::Deadlock { .. }) => {
                    policy = self.fit(self.relaxed(policy)?, &workload)?;
                }
                Err(crate::des::SimError::DoesNotFit(_)) if relax_misfits && attempt == 0 => {
                    policy = self.fit(self.relaxed(policy)?, &workload)?;
                }
                Err(_) => return None,
            }
        }
        None
    }
}

impl Searcher<'_> {
    /// `candidates` with `refine` applied to the leaders: the plans within
    /// `PROMOTE_WITHIN` of the best (each refinement is another simulation or a few, and
    /// a plan far behind does not win by it). Side by side; the order is kept.
    fn refine_leaders(
        &self,
        candidates: Vec<Candidate>,
        refine: impl Fn(Candidate) -> Candidate + Sync + Send,
    ) -> Vec<Candidate> {
        let objective = self.request.objective;
        let best = candidates.iter().map(|c| c.score(objective)).fold(f64::NEG_INFINITY, f64::max);
        candidates
            .into_par_iter()
            .map(|c| if within(c.score(objective), best, objective, PROMOTE_WITHIN) { refine(c) } else { c })
            .collect()
    }

    /// `policy`'s sampled prediction, as the space's engine runs it.
    pub(super) fn predict(&self, policy: &Policy, workload: &Workload) -> Result<Prediction, SimError> {
        let request = self.request;
        predict_run_by(self.space.engine, policy, request.model, workload, request.profile, Extrapolation::Sampled)
    }

    /// `policy` simulated: `Some` when faster than `base`, `None` when not, `Err` when
    /// its simulation fails (it runs out of memory).
    pub(super) fn offer(&self, base: &Candidate, policy: Policy) -> Result<Option<Candidate>, ()> {
        let offered = self.variant(base, policy).ok_or(())?;
        let objective = self.request.objective;
        Ok((offered.score(objective) > base.score(objective)).then_some(offered))
    }

    /// `base` with `policy` instead, simulated (counted as a refinement); `None` when its
    /// simulation fails (it runs out of memory).
    fn variant(&self, base: &Candidate, policy: Policy) -> Option<Candidate> {
        self.refined.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = self.predict(&policy, &base.workload).ok()?;
        Some(Candidate { policy, metrics: p.metrics, ..base.clone() })
    }

    /// `candidate` with its disk-tier layers in host RAM where they fit, then (unified
    /// memory) its remaining disk-tier KV cache traded for attention weights, each kept
    /// where the plan is predicted as fast (within `NEAR_TIE`); else `candidate` itself.
    /// Ties go to the cache off the disk: its small reads and writes wait behind the
    /// weight stream's large requests in the disk's queue, which the simulator's shared
    /// disk does not see (a batch-8 Q4_0 plan decoded 1.34× faster with it traded,
    /// BENCHMARKS.md).
    fn with_disk_layers_promoted(&self, candidate: Candidate) -> Candidate {
        let in_flight = in_flight_bytes(&candidate, self.unified());
        let promoted = self.promoted(&candidate.policy, &candidate.workload, in_flight);
        let promoted = self.fastest_if_as_fast(candidate, promoted.into_iter().collect());
        let in_flight = in_flight_bytes(&promoted, self.unified());
        let traded = self.kv_for_attention(&promoted.policy, &promoted.workload, in_flight);
        self.fastest_if_as_fast(promoted, traded)
    }

    /// The fastest of `policies` that runs in simulation where it is predicted as fast
    /// as `base` (within `NEAR_TIE`) or faster (the first of equals); else `base`.
    fn fastest_if_as_fast(&self, base: Candidate, policies: Vec<Policy>) -> Candidate {
        let objective = self.request.objective;
        let mut fastest: Option<Candidate> = None;
        for policy in policies {
            let Some(offered) = self.variant(&base, policy) else { continue };
            if fastest.as_ref().is_none_or(|f| offered.score(objective) > f.score(objective)) {
                fastest = Some(offered);
            }
        }
        match fastest {
            Some(offered) if near_tie(offered.score(objective), base.score(objective), objective) => offered,
            _ => base,
        }
    }
}

/// The most the simulated plan's tasks held at once beside the resident set in host
/// memory, or on unified memory in the device's.
pub(super) fn in_flight_bytes(candidate: &Candidate, unified: bool) -> u64 {
    let pool = candidate.metrics.pools.iter().find(|p| p.pool.is_device() == unified);
    pool.map_or(0, |p| p.peak_bytes.saturating_sub(p.resident_bytes))
}

/// Whether `score` is within `NEAR_TIE` of `best` (or better).
fn near_tie(score: f64, best: f64, objective: Objective) -> bool {
    within(score, best, objective, NEAR_TIE)
}

/// Whether `score` is within the fraction `margin` of `best` (or better).
fn within(score: f64, best: f64, objective: Objective, margin: f64) -> bool {
    match objective {
        Objective::Throughput => score >= best * (1.0 - margin),
        // Latency scores are negative milliseconds.
        Objective::Latency => score >= best * (1.0 + margin),
    }
}

/// The result from the simulated plans: best first, the chosen plan at the head.
fn summarise(mut simulated: Vec<Candidate>, stats: SearchStats, objective: Objective) -> TuneResult {
    rank_simulated(&mut simulated, objective);
    let by_batch = best_by_batch(&simulated);
    let mut top: Vec<Candidate> = Vec::new();
    for c in simulated {
        if !top.iter().any(|t| t.policy == c.policy) {
            top.push(c);
        }
    }
    TuneResult { best: top[0].clone(), top, stats, by_batch }
}

/// Sorts best first, then moves the simplest near-best plan to the head.
fn rank_simulated(simulated: &mut Vec<Candidate>, objective: Objective) {
    simulated.sort_by(|x, y| y.score(objective).total_cmp(&x.score(objective)));
    // Among plans within NEAR_TIE of the best, take the simplest: fewest micro-batches
    // (each one streams the layer's weights through memory again), then the shallowest
    // prefetch. Prediction error is far larger than such differences.
    let best_score = simulated[0].score(objective);
    let near = |c: &Candidate| near_tie(c.score(objective), best_score, objective);
    if let Some(simplest) = (0..simulated.len())
        .filter(|&i| near(&simulated[i]))
        .min_by_key(|&i| (simulated[i].policy.num_micro_batches, simulated[i].policy.prefetch_depth, i))
    {
        let chosen = simulated.remove(simplest);
        simulated.insert(0, chosen);
    }
}

/// Best predicted tokens/s at each batch size, by batch.
fn best_by_batch(simulated: &[Candidate]) -> Vec<(u64, f64)> {
    let mut by_batch: Vec<(u64, f64)> = Vec::new();
    for c in simulated {
        match by_batch.iter_mut().find(|(batch, _)| *batch == c.workload.batch_size) {
            Some(entry) => entry.1 = entry.1.max(c.metrics.tokens_per_s),
            None => by_batch.push((c.workload.batch_size, c.metrics.tokens_per_s)),
        }
    }
    by_batch.sort_by_key(|(batch, _)| *batch);
    by_batch
}

/// The request sizes a search tries: `space`'s, and with a measured profile none past
/// the largest size its transfer curves measured. Beyond it a curve holds its last
/// rate, so every larger size ties with it, and ties go to the coarser transfer
/// (`KnobSpace::full`) — a request size nothing measured, which on this project's VM ran
/// no faster and was predicted worse, a KV read queued behind 256 MiB requests waiting
/// for them (BENCHMARKS.md, "Small reads behind a weight stream").
fn searched_chunk_sizes(profile: &ferry_core::profile::Profile, space: &KnobSpace) -> Vec<u64> {
    if !profile.is_measured() {
        return space.chunk_bytes.clone();
    }
    let mut curves = vec![&profile.disk_read];
    if !profile.unified_memory {
        curves.extend([&profile.host_to_device, &profile.host_to_device_pageable]);
    }
    let largest = curves.iter().flat_map(|c| c.points.iter().map(|p| p.chunk_bytes)).max().unwrap_or(u64::MAX);
    let measured: Vec<u64> = space.chunk_bytes.iter().copied().filter(|&c| c <= largest).collect();
    if measured.is_empty() {
        // Every size searched lies past the curves: the smallest is the least guess.
        space.chunk_bytes.iter().copied().min().into_iter().collect()
    } else {
        measured
    }
}
