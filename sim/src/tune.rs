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
//!    prefetch window, so its bound holds for every member.
//! 2. **Members** add the transfer knobs: schedule, prefetch depth, chunk size, copy
//!    streams, I/O queue depth. Groups are visited best bound first; a group whose
//!    bound cannot beat the best simulated plan is pruned whole. In a surviving group,
//!    members are ranked by the LP's time terms at the group's placement with the
//!    member's own bandwidths, and the best member for each (schedule, prefetch depth)
//!    is rounded to whole layers and simulated.
//!
//! The LP is written in GB and ms: badly scaled LPs are misreported as infeasible.

use good_lp::{microlp, variable, Expression, ProblemVariables, Solution, SolverModel, Variable};

use ferry_core::graph::Op;
use ferry_core::model::{Dtype, ModelSpec, WeightGroup};
use ferry_core::plan::{Policy, Schedule, Tier, TierCounts, Workload};
use ferry_core::profile::Profile;
use ferry_core::schedule::{pool_capacities, pool_specs};
use ferry_core::trace::Metrics;
use ferry_core::units::{format_bytes, MIB};

use crate::cost::{CostModel, Curve};
use crate::des::SimError;
use crate::predict::{predict, Extrapolation};

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
    pub weight_dtype: Dtype,
    pub kv_dtype: Dtype,
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

/// Schedule classes share a placement LP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Sequential,
    BatchMajor,
    LayerMajor,
}

impl Class {
    fn of(schedule: Schedule) -> Class {
        match schedule {
            Schedule::Sequential => Class::Sequential,
            Schedule::LayerPrefetch => Class::BatchMajor,
            Schedule::ZigzagBlock | Schedule::Pipelined => Class::LayerMajor,
        }
    }
}

#[derive(Debug, Clone)]
struct Group {
    micro_batch_size: u64,
    num_micro_batches: u64,
    host_attention: bool,
    host_compute: bool,
    pinned: bool,
    class: Class,
    schedules: Vec<Schedule>,
}

impl Group {
    fn batch(&self) -> u64 {
        self.micro_batch_size * self.num_micro_batches
    }
}

/// One member's transfer knobs.
#[derive(Debug, Clone, Copy)]
struct Member {
    schedule: Schedule,
    prefetch_depth: u64,
    chunk_bytes: u64,
    copy_streams: u32,
    io_queue_depth: u32,
}

/// Placement fractions chosen by a group's LP.
#[derive(Debug, Clone, Copy, Default)]
struct Fractions {
    attention: [f64; 3],
    mlp: [f64; 3],
    kv: [f64; 3],
}

/// Per-layer figures the LP is written in (GB and ms).
struct LayerFigures {
    layers: f64,
    attention_gb: f64,
    mlp_gb: f64,
    /// Full-sequence KV of one layer for the whole batch.
    kv_full_gb: f64,
    /// KV one decode step reads per layer for the whole batch, at the mean context.
    kv_read_gb: f64,
    /// Double buffer for streaming one micro-batch's KV of one layer.
    kv_buffer_gb: f64,
    /// Per layer, all micro-batches: [prefill, decode] ms.
    device_fused_ms: [f64; 2],
    device_split_ms: [f64; 2],
    host_core_ms: [f64; 2],
    host_layer_ms: [f64; 2],
    device_static_gb: f64,
    host_static_gb: f64,
    device_capacity_gb: f64,
    host_capacity_gb: f64,
    /// The offload disk's space, when known.
    disk_capacity_gb: Option<f64>,
    decode_steps: f64,
}

/// Bandwidths (GB/s) and prefetch window (layers) of one member, or the best case of a group.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    h2d_gbps: f64,
    disk_gbps: f64,
    window: f64,
}

pub fn tune(request: &TuneRequest, space: &KnobSpace) -> Result<TuneResult, TuneError> {
    let searcher = Searcher::new(request, space);
    searcher.run()
}

struct Searcher<'a> {
    request: &'a TuneRequest<'a>,
    space: &'a KnobSpace,
    cost: CostModel<'a>,
}

/// Prune when even the optimistic bound is this much worse than the best simulated plan
/// (the bound sums per-step maxima and uses mean context, so it can be a little off).
const BOUND_SLACK: f64 = 0.02;

/// The tuner searches one-stage plans, whose pools are the device's, then the host's.
const DEVICE_POOL: usize = 0;
const HOST_POOL: usize = 1;

/// Plans predicted within this fraction of the best count as tied (see `run`).
const NEAR_TIE: f64 = 0.005;

impl<'a> Searcher<'a> {
    fn new(request: &'a TuneRequest<'a>, space: &'a KnobSpace) -> Searcher<'a> {
        Searcher { request, space, cost: CostModel::new(request.profile, request.model) }
    }

    fn unified(&self) -> bool {
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
                            groups.push(Group {
                                micro_batch_size: mb,
                                num_micro_batches: n,
                                host_attention,
                                host_compute,
                                pinned,
                                class,
                                schedules,
                            });
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
                for &chunk_bytes in &self.space.chunk_bytes {
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

    fn h2d_curve(&self, pinned: bool) -> Curve {
        if pinned {
            Curve::HostToDevicePinned
        } else {
            Curve::HostToDevicePageable
        }
    }

    fn member_transfer(&self, group: &Group, member: &Member) -> Transfer {
        Transfer {
            h2d_gbps: self.cost.bandwidth(self.h2d_curve(group.pinned), member.chunk_bytes, member.copy_streams),
            disk_gbps: self.cost.bandwidth(Curve::DiskRead, member.chunk_bytes, member.io_queue_depth),
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

    fn figures(&self, group: &Group) -> LayerFigures {
        let request = self.request;
        let model = request.model;
        let profile = request.profile;
        let wd = request.weight_dtype;
        let batch = group.batch();
        let mb = group.micro_batch_size;
        let nmb = group.num_micro_batches as f64;
        let max_context = request.prompt_len + request.gen_len;
        let kv_token = model.kv_bytes_per_token_per_layer(request.kv_dtype) as f64;
        let mean_past = request.prompt_len as f64 + (request.gen_len as f64 - 2.0).max(0.0) / 2.0;
        let (qkv_params, out_params) = model.attention_split_params();
        let attention_bytes = model.group_bytes(WeightGroup::Attention, wd);
        let qkv_bytes = attention_bytes * qkv_params / model.params().attention_per_layer.max(1);
        let dev = &profile.device_compute;
        let host = &profile.host_compute;
        let mut device_fused_ms = [0.0; 2];
        let mut device_split_ms = [0.0; 2];
        let mut host_core_ms = [0.0; 2];
        let mut host_layer_ms = [0.0; 2];
        for (phase, (new_tokens, context)) in
            [(request.prompt_len, request.prompt_len), (1, (mean_past + 1.0).round() as u64)].into_iter().enumerate()
        {
            let rows = mb * new_tokens;
            let core_flops = mb * model.attention_core_flops(new_tokens, context);
            let kv_bytes = (kv_token * (mb * context) as f64) as u64;
            let qkv_flops = 2 * rows * qkv_params;
            let out_flops = 2 * rows * out_params;
            let mlp_flops = model.projection_flops(WeightGroup::Mlp, rows);
            let mlp_bytes = model.mlp_bytes_read(rows, wd);
            let c = &self.cost;
            let fused = c.compute_ns(
                dev,
                Op::Attention,
                qkv_flops + core_flops + out_flops,
                attention_bytes + kv_bytes,
                rows,
                context,
            );
            let mlp = c.compute_ns(dev, Op::Mlp, mlp_flops, mlp_bytes, rows, context);
            let split = c.compute_ns(dev, Op::AttnQkv, qkv_flops, qkv_bytes, rows, context)
                + c.compute_ns(dev, Op::AttnOut, out_flops, attention_bytes - qkv_bytes, rows, context);
            device_fused_ms[phase] = nmb * (fused + mlp) / 1e6;
            device_split_ms[phase] = nmb * (split + mlp) / 1e6;
            host_core_ms[phase] = nmb * c.compute_ns(host, Op::AttnCore, core_flops, kv_bytes, rows, context) / 1e6;
            host_layer_ms[phase] = nmb
                * (c.compute_ns(
                    host,
                    Op::Attention,
                    qkv_flops + core_flops + out_flops,
                    attention_bytes + kv_bytes,
                    rows,
                    context,
                ) + c.compute_ns(host, Op::Mlp, mlp_flops, mlp_bytes, rows, context))
                / 1e6;
        }
        // Static memory: the same resident items the lowering puts in the pools, with no weights or KV.
        let probe = self.policy_for(
            group,
            &Fractions { attention: [0.0, 0.0, 1.0], mlp: [0.0, 0.0, 1.0], kv: [0.0, 0.0, 1.0] },
            &Member {
                schedule: group.schedules[0],
                prefetch_depth: 1,
                chunk_bytes: 64 * MIB,
                copy_streams: 1,
                io_queue_depth: 1,
            },
        );
        let workload = self.workload(group);
        let pools = pool_specs(&probe, model, &workload, profile);
        let (device_capacity, host_capacity) = pool_capacities(profile);
        let gb = |b: u64| b as f64 / 1e9;
        LayerFigures {
            layers: model.num_layers as f64,
            attention_gb: gb(attention_bytes),
            mlp_gb: gb(model.group_bytes(WeightGroup::Mlp, wd)),
            kv_full_gb: kv_token * (batch * max_context) as f64 / 1e9,
            kv_read_gb: kv_token * batch as f64 * mean_past / 1e9,
            kv_buffer_gb: 2.0 * kv_token * (mb * max_context) as f64 / 1e9,
            device_fused_ms,
            device_split_ms,
            host_core_ms,
            host_layer_ms,
            device_static_gb: gb(pools[DEVICE_POOL].resident_bytes()),
            host_static_gb: gb(pools[HOST_POOL].resident_bytes()),
            device_capacity_gb: gb(device_capacity),
            host_capacity_gb: gb(host_capacity),
            disk_capacity_gb: profile.disk_capacity_bytes.map(gb),
            decode_steps: request.gen_len.saturating_sub(1) as f64,
        }
    }

    fn workload(&self, group: &Group) -> Workload {
        Workload { batch_size: group.batch(), prompt_len: self.request.prompt_len, gen_len: self.request.gen_len }
    }

    /// Solves the group's placement LP; `None` when no placement fits.
    fn solve(&self, group: &Group, f: &LayerFigures, transfer: Transfer) -> Option<(Fractions, f64)> {
        let unified = self.unified();
        let mut vars = ProblemVariables::new();
        let mut fractions = |host_allowed: bool| -> [Variable; 3] {
            [
                vars.add(variable().min(0.0).max(1.0)),
                vars.add(variable().min(0.0).max(if host_allowed { 1.0 } else { 0.0 })),
                vars.add(variable().min(0.0).max(1.0)),
            ]
        };
        let a = fractions(!unified);
        let m = fractions(!unified);
        let kv = fractions(!unified);
        let prefill = vars.add(variable().min(0.0));
        let decode = vars.add(variable().min(0.0));
        let objective: Expression = Expression::from(prefill) + f.decode_steps * decode;
        let mut problem = vars.minimise(objective.clone()).using(microlp);
        for set in [&a, &m, &kv] {
            problem = problem.with((set[0] + set[1] + set[2]).eq(1.0));
        }
        let l = f.layers;
        let visits = match group.class {
            Class::LayerMajor => 1.0,
            _ => group.num_micro_batches as f64,
        };
        if group.host_compute {
            // Whole layers: both groups share a tier; KV of host layers on the host, the rest on the device.
            for i in 0..3 {
                problem = problem.with((a[i] - m[i]).eq(0.0));
            }
            problem = problem.with((kv[1] - a[1]).eq(0.0)).with(Expression::from(kv[2]).eq(0.0));
        }
        let ha = if group.host_attention { 1.0 } else { 0.0 };
        for (phase, time) in [(0usize, prefill), (1, decode)] {
            // Weight bytes streamed to the device in this phase (GB); KV only in decode.
            let (streamed, from_disk, device_ms, host_ms): (Expression, Expression, Expression, Expression) =
                if group.host_compute {
                    (
                        visits * l * (f.attention_gb + f.mlp_gb) * a[2],
                        visits * l * (f.attention_gb + f.mlp_gb) * a[2],
                        l * f.device_fused_ms[phase] * (a[0] + a[2]),
                        l * f.host_layer_ms[phase] * a[1],
                    )
                } else {
                    let kv_offloaded: Expression = kv[1] + kv[2];
                    let kv_h2d = if phase == 1 && !group.host_attention {
                        l * f.kv_read_gb * kv_offloaded.clone()
                    } else {
                        Expression::from(0.0)
                    };
                    let kv_disk = if phase == 1 { l * f.kv_read_gb * kv[2] } else { Expression::from(0.0) };
                    let split =
                        if group.host_attention { f.device_split_ms[phase] - f.device_fused_ms[phase] } else { 0.0 };
                    (
                        visits * l * (f.attention_gb * (a[1] + a[2]) + f.mlp_gb * (m[1] + m[2])) + kv_h2d,
                        visits * l * (f.attention_gb * a[2] + f.mlp_gb * m[2]) + kv_disk,
                        l * f.device_fused_ms[phase] + l * split * kv_offloaded.clone(),
                        l * f.host_core_ms[phase] * ha * kv_offloaded,
                    )
                };
            // GB ÷ GB/s = s → ×1000 for ms. On unified memory disk reads land on the device: no copy.
            let h2d_ms: Expression =
                if unified { Expression::from(0.0) } else { streamed * (1000.0 / transfer.h2d_gbps) };
            let disk_ms: Expression = from_disk * (1000.0 / transfer.disk_gbps);
            if group.class == Class::Sequential {
                problem = problem.with(Expression::from(time).geq(device_ms + host_ms + h2d_ms + disk_ms));
            } else {
                problem = problem
                    .with(Expression::from(time).geq(device_ms))
                    .with(Expression::from(time).geq(host_ms))
                    .with(Expression::from(time).geq(h2d_ms))
                    .with(Expression::from(time).geq(disk_ms));
            }
        }
        // Memory (GB).
        let window = transfer.window;
        let device_weights = l * (f.attention_gb * a[0] + f.mlp_gb * m[0]);
        let stream_buffers = window * (f.attention_gb * (a[1] + a[2]) + f.mlp_gb * (m[1] + m[2]));
        let kv_buffers = if group.host_attention || group.host_compute {
            Expression::from(0.0)
        } else {
            f.kv_buffer_gb * (kv[1] + kv[2])
        };
        let device_kv = l * f.kv_full_gb * kv[0];
        problem = problem.with(
            (device_weights + stream_buffers + kv_buffers + device_kv).leq(f.device_capacity_gb - f.device_static_gb),
        );
        if !unified {
            let host_weights = l * (f.attention_gb * a[1] + f.mlp_gb * m[1]);
            let staging = window * (f.attention_gb * a[2] + f.mlp_gb * m[2]);
            let host_kv = l * f.kv_full_gb * kv[1];
            problem = problem.with((host_weights + staging + host_kv).leq(f.host_capacity_gb - f.host_static_gb));
        }
        if let Some(disk_gb) = f.disk_capacity_gb {
            let disk_weights = l * (f.attention_gb * a[2] + f.mlp_gb * m[2]);
            problem = problem.with((disk_weights + l * f.kv_full_gb * kv[2]).leq(disk_gb));
        }
        let solution = problem.solve().ok()?;
        let value = |v: Variable| solution.value(v).clamp(0.0, 1.0);
        let fr = Fractions {
            attention: [value(a[0]), value(a[1]), value(a[2])],
            mlp: [value(m[0]), value(m[1]), value(m[2])],
            kv: [value(kv[0]), value(kv[1]), value(kv[2])],
        };
        Some((fr, solution.eval(&objective)))
    }

    /// The LP's time terms at fixed fractions with a member's bandwidths: an estimate used
    /// to rank a group's members (ms).
    fn estimate(&self, group: &Group, f: &LayerFigures, fr: &Fractions, transfer: Transfer) -> f64 {
        let l = f.layers;
        let visits = if group.class == Class::LayerMajor { 1.0 } else { group.num_micro_batches as f64 };
        let offloaded = fr.kv[1] + fr.kv[2];
        let mut total = 0.0;
        for phase in 0..2 {
            let streamed = visits
                * l
                * (f.attention_gb * (fr.attention[1] + fr.attention[2]) + f.mlp_gb * (fr.mlp[1] + fr.mlp[2]))
                + if phase == 1 && !group.host_attention { l * f.kv_read_gb * offloaded } else { 0.0 };
            let from_disk = visits * l * (f.attention_gb * fr.attention[2] + f.mlp_gb * fr.mlp[2])
                + if phase == 1 { l * f.kv_read_gb * fr.kv[2] } else { 0.0 };
            let h2d = if self.unified() { 0.0 } else { streamed * 1000.0 / transfer.h2d_gbps };
            let disk = from_disk * 1000.0 / transfer.disk_gbps;
            let device = l * f.device_fused_ms[phase];
            let host = if group.host_attention { l * f.host_core_ms[phase] * offloaded } else { 0.0 };
            let step = if group.class == Class::Sequential {
                device + host + h2d + disk
            } else {
                device.max(host).max(h2d).max(disk)
            };
            total += if phase == 0 { step } else { step * f.decode_steps };
        }
        total
    }

    /// Rounds fractions to whole layers and builds the policy.
    fn policy_for(&self, group: &Group, fr: &Fractions, member: &Member) -> Policy {
        let layers = self.request.model.num_layers;
        let unified = self.unified();
        let (embeddings, head) = if unified { (Tier::Device, Tier::Device) } else { (Tier::Host, Tier::Device) };
        let pinned_host_bytes = if group.pinned { self.request.profile.max_pinned_bytes } else { 0 };
        Policy {
            schedule: member.schedule,
            micro_batch_size: group.micro_batch_size,
            num_micro_batches: group.num_micro_batches,
            prefetch_depth: member.prefetch_depth,
            attention_weights: round_counts(fr.attention, layers),
            mlp_weights: round_counts(fr.mlp, layers),
            embeddings,
            head,
            kv_cache: round_counts(fr.kv, layers),
            host_attention: group.host_attention,
            compute_host_layers_on_host: group.host_compute,
            weight_dtype: self.request.weight_dtype,
            kv_dtype: self.request.kv_dtype,
            chunk_bytes: member.chunk_bytes,
            copy_streams: member.copy_streams,
            io_queue_depth: member.io_queue_depth,
            pinned_host_bytes,
            stages: Vec::new(),
        }
    }

    /// Moves device layers off the device (MLP first, then attention, then KV) until the
    /// resident sets fit; `None` if nothing fits.
    fn fit(&self, mut policy: Policy, workload: &Workload) -> Option<Policy> {
        let request = self.request;
        // Embeddings are a cheap lookup: keep them on the host unless nothing else streams.
        let layers = request.model.num_layers;
        if policy.attention_weights.device == layers
            && policy.mlp_weights.device == layers
            && policy.kv_cache.device == layers
        {
            policy.embeddings = Tier::Device;
            let pools = pool_specs(&policy, request.model, workload, request.profile);
            if pools[DEVICE_POOL].resident_bytes() > pools[DEVICE_POOL].capacity_bytes && !self.unified() {
                policy.embeddings = Tier::Host;
            }
        }
        let spill = if self.unified() { Tier::Disk } else { Tier::Host };
        for _ in 0..(3 * request.model.num_layers + 2) {
            let pools = pool_specs(&policy, request.model, workload, request.profile);
            let device = &pools[DEVICE_POOL];
            let host = &pools[HOST_POOL];
            let device_ok = device.resident_bytes() <= device.capacity_bytes;
            let host_ok = host.resident_bytes() <= host.capacity_bytes;
            if device_ok && host_ok {
                return Some(policy);
            }
            if !device_ok {
                if !shift(&mut policy.mlp_weights, Tier::Device, spill)
                    && !shift(&mut policy.attention_weights, Tier::Device, spill)
                    && !shift(&mut policy.kv_cache, Tier::Device, spill)
                {
                    return None;
                }
            } else if !shift(&mut policy.mlp_weights, Tier::Host, Tier::Disk)
                && !shift(&mut policy.attention_weights, Tier::Host, Tier::Disk)
                && !shift(&mut policy.kv_cache, Tier::Host, Tier::Disk)
            {
                return None;
            }
            if policy.compute_host_layers_on_host {
                // Keep whole layers together for the llama.cpp split.
                policy.attention_weights = policy.mlp_weights;
                policy.kv_cache = TierCounts {
                    device: policy.mlp_weights.device + policy.mlp_weights.disk,
                    host: policy.mlp_weights.host,
                    disk: 0,
                };
            }
        }
        None
    }

    /// Fails when the weights alone exceed every tier together.
    fn check_capacity(&self) -> Result<(), TuneError> {
        let request = self.request;
        let Some(disk) = request.profile.disk_capacity_bytes else { return Ok(()) };
        let (device, host) = pool_capacities(request.profile);
        let room = device + if self.unified() { 0 } else { host } + disk;
        let weights = request.model.total_bytes(request.weight_dtype);
        if weights > room {
            return Err(TuneError::Impossible(format!(
                "the model does not fit even on disk: its weights need {} but device, host and disk hold {} together (short by {})",
                format_bytes(weights),
                format_bytes(room),
                format_bytes(weights - room)
            )));
        }
        Ok(())
    }

    fn run(&self) -> Result<TuneResult, TuneError> {
        self.check_capacity()?;
        let mut stats = SearchStats::default();
        // Level 1: bound every group.
        struct Bounded {
            group: Group,
            members: Vec<Member>,
            figures: LayerFigures,
            fractions: Fractions,
            bound_ms: f64,
        }
        let mut bounded: Vec<Bounded> = Vec::new();
        for group in self.groups() {
            let members = self.members(&group);
            stats.considered += members.len() as u64;
            stats.bounded += members.len() as u64;
            stats.lp_solves += 1;
            let figures = self.figures(&group);
            let best = self.best_transfer(&group, &members);
            match self.solve(&group, &figures, best) {
                Some((fractions, bound_ms)) => bounded.push(Bounded { group, members, figures, fractions, bound_ms }),
                None => stats.infeasible += members.len() as u64,
            }
        }
        if bounded.is_empty() {
            return Err(TuneError::Impossible(self.explain_impossible()));
        }
        let objective = self.request.objective;
        let gen = self.request.gen_len as f64;
        // Best achievable score by the bound: tokens/s (throughput) or −ms (latency).
        let bound_score = |b: &Bounded| match objective {
            Objective::Throughput => b.group.batch() as f64 * gen / (b.bound_ms / 1000.0),
            Objective::Latency => -b.bound_ms,
        };
        bounded.sort_by(|x, y| bound_score(y).total_cmp(&bound_score(x)));

        // Level 2: visit groups best bound first.
        let mut simulated: Vec<Candidate> = Vec::new();
        let mut best_score = f64::NEG_INFINITY;
        for b in &bounded {
            let optimistic = bound_score(b);
            let beaten = match objective {
                Objective::Throughput => optimistic * (1.0 + BOUND_SLACK) <= best_score,
                Objective::Latency => optimistic * (1.0 - BOUND_SLACK) <= best_score,
            };
            if beaten {
                stats.pruned += b.members.len() as u64;
                continue;
            }
            // Rank members; simulate the best one per (schedule, prefetch depth).
            let mut ranked: Vec<(f64, usize)> = b
                .members
                .iter()
                .enumerate()
                .map(|(i, m)| (self.estimate(&b.group, &b.figures, &b.fractions, self.member_transfer(&b.group, m)), i))
                .collect();
            ranked.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
            let mut chosen: Vec<(Schedule, u64)> = Vec::new();
            let workload = self.workload(&b.group);
            for (_, index) in ranked {
                let member = b.members[index];
                let key = (member.schedule, member.prefetch_depth);
                if chosen.contains(&key) {
                    stats.ranked_out += 1;
                    continue;
                }
                chosen.push(key);
                stats.simulated += 1;
                let policy = self.policy_for(&b.group, &b.fractions, &member);
                let Some(policy) = self.fit(policy, &workload) else {
                    stats.rejected += 1;
                    continue;
                };
                match predict(&policy, self.request.model, &workload, self.request.profile, Extrapolation::Sampled) {
                    Ok(prediction) => {
                        let candidate = Candidate {
                            policy,
                            workload,
                            metrics: prediction.metrics,
                            bound_ns: (b.bound_ms * 1e6) as u64,
                        };
                        best_score = best_score.max(candidate.score(objective));
                        simulated.push(candidate);
                    }
                    Err(_) => stats.rejected += 1,
                }
            }
        }
        if simulated.is_empty() {
            return Err(TuneError::Impossible(format!(
                "no rounded placement fits or runs without deadlock: {}",
                self.explain_impossible()
            )));
        }
        simulated.sort_by(|x, y| y.score(objective).total_cmp(&x.score(objective)));
        // Among plans within NEAR_TIE of the best, take the simplest: fewest micro-batches
        // (each one streams the layer's weights through memory again), then the shallowest
        // prefetch. Prediction error is far larger than such differences.
        let best_score = simulated[0].score(objective);
        let near = |c: &Candidate| match objective {
            Objective::Throughput => c.score(objective) >= best_score * (1.0 - NEAR_TIE),
            Objective::Latency => c.score(objective) >= best_score * (1.0 + NEAR_TIE),
        };
        if let Some(simplest) = (0..simulated.len())
            .filter(|&i| near(&simulated[i]))
            .min_by_key(|&i| (simulated[i].policy.num_micro_batches, simulated[i].policy.prefetch_depth, i))
        {
            let chosen = simulated.remove(simplest);
            simulated.insert(0, chosen);
        }
        let mut by_batch: Vec<(u64, f64)> = Vec::new();
        for c in &simulated {
            match by_batch.iter_mut().find(|(batch, _)| *batch == c.workload.batch_size) {
                Some(entry) => entry.1 = entry.1.max(c.metrics.tokens_per_s),
                None => by_batch.push((c.workload.batch_size, c.metrics.tokens_per_s)),
            }
        }
        by_batch.sort_by_key(|(batch, _)| *batch);
        let mut top: Vec<Candidate> = Vec::new();
        for c in simulated {
            if !top.iter().any(|t| t.policy == c.policy) {
                top.push(c);
            }
        }
        Ok(TuneResult { best: top[0].clone(), top, stats, by_batch })
    }

    /// Says which memory constraint makes every configuration infeasible, and by how much.
    fn explain_impossible(&self) -> String {
        let request = self.request;
        let model = request.model;
        let (device_capacity, host_capacity) = pool_capacities(request.profile);
        // The smallest working set: batch 1, everything streamed, one layer in flight.
        let group = Group {
            micro_batch_size: 1,
            num_micro_batches: 1,
            host_attention: false,
            host_compute: false,
            pinned: false,
            class: Class::Sequential,
            schedules: vec![Schedule::Sequential],
        };
        let all_disk = Fractions { attention: [0.0, 0.0, 1.0], mlp: [0.0, 0.0, 1.0], kv: [0.0, 0.0, 1.0] };
        let member = Member {
            schedule: Schedule::Sequential,
            prefetch_depth: 0,
            chunk_bytes: MIB,
            copy_streams: 1,
            io_queue_depth: 1,
        };
        let mut policy = self.policy_for(&group, &all_disk, &member);
        // The KV cache streams too: from the host on a discrete GPU, from disk on unified memory.
        policy.kv_cache = TierCounts::all(if self.unified() { Tier::Disk } else { Tier::Host }, model.num_layers);
        let workload = Workload { batch_size: 1, prompt_len: request.prompt_len, gen_len: request.gen_len };
        let pools = pool_specs(&policy, model, &workload, request.profile);
        let layer = model
            .group_bytes(WeightGroup::Mlp, request.weight_dtype)
            .max(model.group_bytes(WeightGroup::Attention, request.weight_dtype));
        let device_need = pools[DEVICE_POOL].resident_bytes() + layer;
        if device_need > device_capacity {
            let detail: Vec<String> = pools[DEVICE_POOL]
                .resident
                .iter()
                .filter(|(_, b)| *b > 0)
                .map(|(what, b)| format!("{what} {}", format_bytes(*b)))
                .chain(std::iter::once(format!("one streamed weight group {}", format_bytes(layer))))
                .collect();
            return format!(
                "device memory: even at batch 1 with every weight streamed, the working set needs {} but the usable budget is {} (short by {}): {}",
                format_bytes(device_need),
                format_bytes(device_capacity),
                format_bytes(device_need - device_capacity),
                detail.join(", ")
            );
        }
        let host_need = pools[HOST_POOL].resident_bytes() + layer;
        if !self.unified() && host_need > host_capacity {
            return format!(
                "host memory: the staging buffers and host-resident items need {} but the usable budget is {} (short by {})",
                format_bytes(host_need),
                format_bytes(host_capacity),
                format_bytes(host_need - host_capacity)
            );
        }
        format!(
            "no batch in the search fits: at the requested batch the KV cache ({} per sequence) or the working set exceeds the {} device and {} host budgets; try a smaller --batch, --prompt-len or --gen-len",
            format_bytes(model.kv_bytes_per_token_per_layer(request.kv_dtype) * model.num_layers * (request.prompt_len + request.gen_len)),
            format_bytes(device_capacity),
            format_bytes(host_capacity)
        )
    }
}

/// Moves one layer from `from` to `to`; false if none is left on `from`.
fn shift(counts: &mut TierCounts, from: Tier, to: Tier) -> bool {
    fn slot(counts: &mut TierCounts, tier: Tier) -> &mut u64 {
        match tier {
            Tier::Device => &mut counts.device,
            Tier::Host => &mut counts.host,
            Tier::Disk => &mut counts.disk,
        }
    }
    if *slot(counts, from) == 0 {
        return false;
    }
    *slot(counts, from) -= 1;
    *slot(counts, to) += 1;
    true
}

/// Fractions (device, host, disk) to whole layers: device rounded down (so the LP's
/// memory bound still holds), host to nearest, disk the rest. A fraction within 1e-6
/// of 1 counts as whole, so a model that fits stays entirely on the device.
fn round_counts(fractions: [f64; 3], layers: u64) -> TierCounts {
    let l = layers as f64;
    let device = ((fractions[0] * l) + 1e-6).floor().min(l) as u64;
    let host = ((fractions[1] * l).round() as u64).min(layers - device);
    TierCounts { device, host, disk: layers - device - host }
}

/// A baseline policy simulated on the same hardware, or why it cannot run there.
#[derive(Debug, Clone)]
pub struct Baseline {
    pub name: &'static str,
    pub description: &'static str,
    pub outcome: Result<Candidate, String>,
}

/// The baselines of the comparison, at `batch`: Accelerate-like (sequential, greedy
/// device-first whole layers, KV on the device, pageable copies), llama.cpp-like (as
/// many whole layers on the device as fit, the rest computed by the host where they
/// live), and FlexGen (its block schedule and LP placement, without chunk, prefetch or
/// stream knobs).
///
/// A baseline that cannot run at `batch` is tried at halved batches, so the
/// comparison still says what it reaches on this hardware (its candidate's workload
/// tells the batch it ran at).
pub fn baselines(request: &TuneRequest, batch: u64) -> Vec<Baseline> {
    let batches: Vec<u64> = std::iter::successors(Some(batch), |b| (*b > 1).then_some(b / 2)).collect();
    let first_fit = |run: &dyn Fn(u64) -> Result<Candidate, String>| -> Result<Candidate, String> {
        let mut first_error = None;
        for &b in &batches {
            match run(b) {
                Ok(c) => return Ok(c),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_default())
    };
    let greedy = |host_compute: bool| {
        first_fit(&|b: u64| {
            let fixed = TuneRequest { batch: BatchChoice::Fixed(b), ..request.clone() };
            Searcher::new(&fixed, &NO_KNOBS).greedy(b, host_compute)
        })
    };
    let flexgen = first_fit(&|b: u64| {
        let fixed = TuneRequest { batch: BatchChoice::Fixed(b), ..request.clone() };
        tune(&fixed, &KnobSpace::flexgen()).map(|r| r.best).map_err(|e| e.to_string())
    });
    vec![
        Baseline {
            name: "accelerate",
            description: "Accelerate-like: sequential, greedy device-first whole layers, KV on device",
            outcome: greedy(false),
        },
        Baseline {
            name: "llama.cpp",
            description: "llama.cpp-like: whole layers on the device as fit, the rest computed on the host",
            outcome: greedy(true),
        },
        Baseline {
            name: "flexgen",
            description: "FlexGen: zig-zag block schedule, LP placement, no chunk/prefetch/stream knobs",
            outcome: flexgen,
        },
    ]
}

/// Knob space of the greedy baselines (they set every knob themselves).
static NO_KNOBS: std::sync::LazyLock<KnobSpace> = std::sync::LazyLock::new(KnobSpace::full);

impl Searcher<'_> {
    /// Greedy whole-layer placement: as many layers on the device as fit beside the
    /// KV cache (device KV for device-computed layers), the rest on the host, then disk.
    fn greedy(&self, batch: u64, host_compute: bool) -> Result<Candidate, String> {
        let request = self.request;
        let layers = request.model.num_layers;
        let unified = self.unified();
        let workload = Workload { batch_size: batch, prompt_len: request.prompt_len, gen_len: request.gen_len };
        let group = Group {
            micro_batch_size: batch,
            num_micro_batches: 1,
            host_attention: false,
            host_compute: host_compute && !unified,
            pinned: false,
            class: Class::Sequential,
            schedules: vec![Schedule::Sequential],
        };
        // One copy per weight group (no chunking knob); mmap-style small reads on unified memory.
        let member = Member {
            schedule: Schedule::Sequential,
            prefetch_depth: 0,
            chunk_bytes: if unified { MIB } else { 256 * MIB },
            copy_streams: 1,
            io_queue_depth: 1,
        };
        let mut last_error = None;
        for device_layers in (0..=layers).rev() {
            let rest = layers - device_layers;
            for host_layers in (0..=if unified { 0 } else { rest }).rev() {
                let weights = TierCounts { device: device_layers, host: host_layers, disk: rest - host_layers };
                if group.host_compute && weights.disk > 0 {
                    continue; // llama.cpp computes non-offloaded layers from RAM
                }
                let kv = if group.host_compute {
                    TierCounts { device: device_layers, host: host_layers, disk: 0 }
                } else {
                    TierCounts::all(Tier::Device, layers)
                };
                let mut policy = self.policy_for(&group, &Fractions::default(), &member);
                policy.attention_weights = weights;
                policy.mlp_weights = weights;
                policy.kv_cache = kv;
                if !unified {
                    policy.embeddings = Tier::Device;
                }
                let pools = pool_specs(&policy, request.model, &workload, request.profile);
                if pools.iter().any(|p| p.resident_bytes() > p.capacity_bytes) {
                    continue;
                }
                // Resident sets fit; the streamed layer's buffer may still not: then keep fewer layers.
                match predict(&policy, request.model, &workload, request.profile, Extrapolation::Sampled) {
                    Ok(p) => return Ok(Candidate { policy, workload, metrics: p.metrics, bound_ns: 0 }),
                    Err(e) => last_error = Some(e.to_string()),
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            format!("does not fit at batch {batch}: its KV cache stays on the device and the layers that do not fit must fit in host RAM")
        }))
    }
}

/// A search and its comparison with the baselines.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub result: TuneResult,
    pub baselines: Vec<Baseline>,
    /// The baseline that beat every searched plan and so became the plan, if any.
    pub adopted_baseline: Option<&'static str>,
}

/// Searches, simulates the baselines at the winner's batch, and makes sure the plan
/// returned is never worse in simulation than any baseline.
///
/// The search ranks with sampled extrapolation; the winner and the baselines are then
/// simulated step by step, so the figures reported are those `ferry simulate` gives.
pub fn tune_and_compare(request: &TuneRequest, space: &KnobSpace) -> Result<Comparison, TuneError> {
    let mut result = tune(request, space)?;
    let exact = |c: &Candidate| -> Result<Candidate, SimError> {
        let p = predict(&c.policy, request.model, &c.workload, request.profile, Extrapolation::Full)?;
        Ok(Candidate { metrics: p.metrics, ..c.clone() })
    };
    result.best = exact(&result.best)?;
    result.top[0] = result.best.clone();
    let mut baselines = baselines(request, result.best.workload.batch_size);
    for baseline in &mut baselines {
        if let Ok(c) = &baseline.outcome {
            baseline.outcome = exact(c).map_err(|e| e.to_string());
        }
    }
    let mut adopted_baseline = None;
    for baseline in &baselines {
        if let Ok(candidate) = &baseline.outcome {
            if candidate.score(request.objective) > result.best.score(request.objective) {
                result.top.insert(0, candidate.clone());
                result.best = candidate.clone();
                adopted_baseline = Some(baseline.name);
            }
        }
    }
    Ok(Comparison { result, baselines, adopted_baseline })
}
