//! Lowering: a plan's policy, a model and a workload become a `TaskGraph` — the
//! graph the simulator replays and the engine executes.
//!
//! Program order is the order of compute: for each round (`Round`; step 0 = the
//! prefill, then one decode step per generated token), the layer
//! *visits* in schedule order — micro-batch-major for `sequential` and
//! `layer-prefetch` (each micro-batch walks every layer, reloading streamed weights),
//! layer-major for `zigzag-block` and `pipelined` (each layer serves every
//! micro-batch before the next). Loads are emitted just before the visit that uses
//! them; *gates* (dependencies) bound how far they run ahead:
//!
//! * weight loads of visit `v` wait for visit `v − prefetch_depth − 1` to finish;
//!   `sequential` goes further: every task waits for the one emitted before it, so
//!   nothing overlaps at all (Accelerate's hooks);
//! * KV loads of micro-batch `j` wait for the attention of `j − 2` in the same visit
//!   (double buffering), the first two for the weight gate;
//! * a task's memory is acquired when it starts and released when it ends; streamed
//!   weights are released by their last consumer;
//! * a KV load of (layer, micro-batch) waits for the previous store of the same cache
//!   (data, not just a gate: the engine reads what that store wrote);
//! * the task that frees a visit's streamed weights waits for every other consumer of
//!   them (micro-batches can otherwise finish out of order under the dispatch rule).
//!
//! Where the hidden state of each micro-batch lives (device or host) is tracked, and
//! an activation copy is emitted whenever the next operation runs on the other side.
//!
//! A mixture of experts read as routed (`experts`) changes a visit's order: every
//! micro-batch's attention and routing first, then one read of the experts they chose,
//! then their MLPs (the read cannot start before the routes exist).
//!
//! The lowering is split in five: `builder` (program order, gates, weight loads,
//! where each micro-batch's hidden state is), `attention` (attention with the KV
//! cache at any tier, fused or around host attention), `experts` (routed expert
//! reads), `draft` (a speculative round's draft passes), `resources` (the pools and
//! resources a graph gets, one per place).

mod attention;
mod builder;
mod draft;
mod ends;
mod experts;
mod resources;

use crate::error::{CoreError, Result};
use crate::graph::{fits_beside_resident, Place, PoolSpec, Round, TaskGraph};
use crate::model::{GroupSize, ModelSpec, TensorSpec, WeightFormat, WeightGroup};
use crate::plan::{Policy, Workload};
use crate::profile::Profile;

use builder::Builder;

/// About how many tasks one weight-group transfer is split into by the `pipelined`
/// schedule: finer tasks add events, not overlap.
pub const MAX_PIPELINE_PIECES: u64 = 16;

/// A piece of a weight group moved by one pipelined task: rows `row_start ..
/// row_start + rows` of the group's tensor number `tensor` (see
/// `ModelSpec::group_tensors`), or, where `tensors` is above 1, the whole tensors
/// `tensor .. tensor + tensors` (a mixture of experts' projections, each smaller than
/// a piece, packed together; `row_start` and `rows` are then 0). The simulator needs
/// only the bytes; the engine multiplies by each row block as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub tensor: u32,
    pub tensors: u32,
    pub row_start: u64,
    pub rows: u64,
    pub bytes: u64,
}

/// The pieces of one weight group for a `pipelined` transfer with `chunk_bytes`
/// requests, every tensor in the float `dtype` (what the executor reads today): each
/// tensor is cut into row blocks of about max(chunk, group ÷ 16) bytes (every layer
/// has the same shapes).
pub fn weight_pieces(
    model: &ModelSpec,
    group: WeightGroup,
    dtype: crate::model::Dtype,
    chunk_bytes: u64,
) -> Vec<Piece> {
    let tensors = model.group_shapes(group);
    let packed_from = packed_from(model, group, tensors.len());
    cut_pieces(&tensors, chunk_bytes, packed_from, |_, rows, cols| dtype.bytes_of(rows * cols), |_| 1)
}

/// The first tensor of a group from which whole tensors smaller than a piece are packed
/// together: a mixture of experts' expert projections (hundreds per layer, which would
/// otherwise make a piece each — 386 transfer tasks a layer for Qwen3-30B-A3B where
/// about `MAX_PIPELINE_PIECES` are meant). Dense groups have a few tensors and are cut
/// tensor by tensor, as they always were (the figures of existing plans stay).
fn packed_from(model: &ModelSpec, group: WeightGroup, count: usize) -> usize {
    if group == WeightGroup::Mlp && model.num_experts > 0 {
        model.router_tensors().end
    } else {
        count
    }
}

/// The pieces of one weight group stored as `size` says (each tensor in its own format,
/// `GroupSize::tensors`): row blocks of about max(chunk, group ÷ 16) bytes that cut a
/// quantized tensor only between whole rows (whole blocks) and a group-wise one only
/// between whole groups of rows. For float formats, exactly `weight_pieces`.
pub fn format_pieces(model: &ModelSpec, group: WeightGroup, size: &GroupSize, chunk_bytes: u64) -> Vec<Piece> {
    let tensors = model.group_shapes(group);
    let format = |index: usize| size.tensors.get(index).copied().unwrap_or(WeightFormat::F32);
    let packed_from = packed_from(model, group, tensors.len());
    let bytes = |i: usize, rows, cols| format(i).bytes(rows, cols);
    cut_pieces(&tensors, chunk_bytes, packed_from, bytes, |i| format(i).row_unit())
}

/// Cuts tensors into row blocks: `bytes(tensor, rows, cols)` prices rows of a tensor,
/// `unit(tensor)` is the row count a cut must be a multiple of. From tensor
/// `packed_from` on, neighbouring whole tensors smaller than 1/`MAX_PIPELINE_PIECES`
/// of the group share a piece of at most that.
fn cut_pieces(
    tensors: &[TensorSpec],
    chunk_bytes: u64,
    packed_from: usize,
    bytes: impl Fn(usize, u64, u64) -> u64,
    unit: impl Fn(usize) -> u64,
) -> Vec<Piece> {
    let total: u64 = tensors.iter().enumerate().map(|(i, t)| bytes(i, t.rows, t.cols)).sum();
    let share = total.div_ceil(MAX_PIPELINE_PIECES).max(1);
    let target = chunk_bytes.max(share);
    let mut pieces: Vec<Piece> = Vec::new();
    // Whether the last piece is whole tensors that a next small one may join.
    let mut packing = false;
    for (index, tensor) in tensors.iter().enumerate() {
        let whole = bytes(index, tensor.rows, tensor.cols);
        // Packed up to a 1/MAX_PIPELINE_PIECES share of the group, not up to the chunk:
        // packing bounds the count of pieces and leaves tensors of a share or more
        // (Mixtral's 33 MB projections in Q4_K) the pieces they were.
        if index >= packed_from && whole < share {
            match pieces.last_mut() {
                Some(last) if packing && last.bytes + whole <= share => {
                    last.tensors += 1;
                    last.bytes += whole;
                }
                _ => {
                    pieces.push(Piece { tensor: index as u32, tensors: 1, row_start: 0, rows: 0, bytes: whole });
                    packing = true;
                }
            }
            continue;
        }
        packing = false;
        let unit_rows = unit(index).max(1);
        let unit_bytes = bytes(index, unit_rows, tensor.cols).max(1);
        let rows_per_piece = (target / unit_bytes).max(1) * unit_rows;
        let mut row = 0;
        while row < tensor.rows {
            let rows = rows_per_piece.min(tensor.rows - row);
            let bytes = bytes(index, rows, tensor.cols);
            pieces.push(Piece { tensor: index as u32, tensors: 1, row_start: row, rows, bytes });
            row += rows;
        }
    }
    // A packed piece of a single tensor is that tensor's rows like any other.
    for p in pieces.iter_mut().filter(|p| p.tensors == 1 && p.rows == 0) {
        p.rows = tensors[p.tensor as usize].rows;
    }
    pieces
}

/// Which decode rounds to lower. The prefill (step 0) is always included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Steps {
    /// Every round: one per generated token after the first; with speculation, the
    /// expected number of rounds (`expected_decode_rounds`, rounded up), each at the
    /// expected context.
    All,
    /// Only these rounds of `All`, ascending; used to extrapolate long generations.
    Only(Vec<u32>),
    /// Every round a run may need, each at the largest context it may reach: what the
    /// engine executes (with speculation it stops once every sequence has its tokens,
    /// and a round's real positions are known only when it runs). Plain decoding: `All`.
    Bound,
}

/// Decode rounds after the prefill, as `Steps::All` lowers them.
pub fn decode_rounds(policy: &Policy, workload: &Workload) -> u32 {
    expected_decode_rounds(policy, workload).ceil() as u32
}

/// The expected number of decode rounds after the prefill: one per token, or with
/// speculation the expected rounds until every sequence has its tokens
/// (`plan::speculation::expected_rounds`).
pub fn expected_decode_rounds(policy: &Policy, workload: &Workload) -> f64 {
    let tokens = workload.gen_len.saturating_sub(1);
    match &policy.speculation {
        None => tokens as f64,
        Some(s) => s.expected_rounds(tokens, workload.batch_size),
    }
}

/// The rounds `steps` lowers.
fn rounds(policy: &Policy, workload: &Workload, steps: &Steps) -> Result<Vec<Round>> {
    let Some(speculation) = &policy.speculation else {
        let decode: Vec<u32> = match steps {
            Steps::All | Steps::Bound => (1..workload.gen_len as u32).collect(),
            Steps::Only(list) => checked_sample(list, workload.gen_len.saturating_sub(1) as u32)?,
        };
        return Ok(std::iter::once(0).chain(decode).map(|step| Round::decoding(workload, step)).collect());
    };
    let prompt = workload.prompt_len as u32;
    let tokens = workload.gen_len.saturating_sub(1) as u32;
    let k = speculation.draft_len;
    let verify = |step: u32, past: u32, tokens: u32| Round { step, past, rows: k + 1, tokens, drafted: k };
    let mut out = vec![Round::decoding(workload, 0)];
    if let Steps::Bound = steps {
        // Round r starts after at most (r − 1)(k + 1) accepted tokens, and a micro-batch
        // that has its tokens stays where it is (so never past prompt + gen_len − 2).
        for step in 1..=tokens {
            let accepted = ((step - 1) as u64 * (k + 1) as u64).min(tokens.saturating_sub(1) as u64) as u32;
            out.push(verify(step, prompt + accepted, 1));
        }
        return Ok(out);
    }
    // The expected rounds share the tokens evenly; each starts where they leave it.
    let count = decode_rounds(policy, workload);
    let before = |r: u32| (r as u64 * tokens as u64 / count.max(1) as u64) as u32;
    let all: Vec<u32> = (1..=count).collect();
    let wanted = match steps {
        Steps::Only(list) => checked_sample(list, count)?,
        _ => all,
    };
    out.extend(wanted.into_iter().map(|r| verify(r, prompt + before(r - 1), before(r) - before(r - 1))));
    Ok(out)
}

fn checked_sample(list: &[u32], rounds: u32) -> Result<Vec<u32>> {
    if list.windows(2).any(|w| w[0] >= w[1]) || list.iter().any(|&s| s == 0 || s > rounds) {
        return Err(CoreError::invalid(format!("sampled decode rounds must be ascending and within 1..={rounds}")));
    }
    Ok(list.to_vec())
}

/// Memory capacities the graph's pools get: the profile's memory less its reserve
/// (device 0 and the host).
pub fn pool_capacities(profile: &Profile) -> (u64, u64) {
    (pool_capacity(profile, Place::DEVICE), pool_capacity(profile, Place::HOST))
}

/// The capacity of one place's pool: its memory less its reserve (a device's kind's;
/// a host keeps the profile's).
pub fn pool_capacity(profile: &Profile, place: Place) -> u64 {
    let (bytes, reserve) = match place {
        Place::Device(d) => (profile.device_memory(d), profile.device(d).memory_reserve_fraction),
        Place::Host(h) => (profile.host(h).memory_bytes, profile.memory_reserve_fraction),
    };
    (bytes as f64 * (1.0 - reserve)) as u64
}

/// The pools a policy's graph would get (capacity and resident set), without building
/// the tasks: what a search needs to check a placement fits before simulating it.
pub fn pool_specs(policy: &Policy, model: &ModelSpec, workload: &Workload, profile: &Profile) -> Vec<PoolSpec> {
    Builder::new(policy, model, workload, profile).pools()
}

/// Refuses more pinned host memory than the head's host can pin: the builder would
/// pin weights past what the machine has, and the prediction would count on them.
fn check_pinned(policy: &Policy, profile: &Profile) -> Result<()> {
    let host = profile.host(profile.device(policy.first_device()).host);
    if policy.pinned_host_bytes <= host.max_pinned_bytes {
        return Ok(());
    }
    let fmt = crate::units::format_bytes;
    Err(crate::error::CoreError::invalid(format!(
        "pinned_host_bytes {} is more than host {} can pin ({} of its {} of RAM): lower it to at most {}",
        fmt(policy.pinned_host_bytes),
        host.name,
        fmt(host.max_pinned_bytes),
        fmt(host.memory_bytes),
        fmt(host.max_pinned_bytes)
    )))
}

/// Lowers a policy into a task graph. Fails when the policy does not fit the model.
pub fn lower(
    policy: &Policy,
    model: &ModelSpec,
    workload: &Workload,
    profile: &Profile,
    steps: &Steps,
) -> Result<TaskGraph> {
    lower_with(policy, model, workload, profile, steps, false)
}

/// `lower`, refusing a graph that cannot fit (`TaskGraph::check_fits`' error) as soon
/// as its prefill shows it, before the decode rounds are lowered: for a caller that
/// would refuse it anyway (the simulator). The tuner meets many such plans (on
/// Qwen3-235B, 158 of the 256 it simulates), and lowering their decode rounds was most
/// of what they cost it. A graph whose misfit shows only in a later round (a growing
/// KV cache) is lowered whole, as by `lower`.
pub fn lower_if_fits(
    policy: &Policy,
    model: &ModelSpec,
    workload: &Workload,
    profile: &Profile,
    steps: &Steps,
) -> Result<TaskGraph> {
    lower_with(policy, model, workload, profile, steps, true)
}

fn lower_with(
    policy: &Policy,
    model: &ModelSpec,
    workload: &Workload,
    profile: &Profile,
    steps: &Steps,
    refuse_misfit_prefill: bool,
) -> Result<TaskGraph> {
    policy.validate(model, workload, profile.unified_memory)?;
    let rounds = rounds(policy, workload, steps)?;
    crate::resolve::check_devices(policy, profile)?;
    check_pinned(policy, profile)?;
    let mut builder = Builder::new(policy, model, workload, profile);
    // Decode rounds have the same tasks, and the prefill about as many: once the
    // prefill is lowered the rest are reserved at its size, and again at the first
    // decode round's where that is larger, which saves the vector's regrowth copies
    // (the tuner pays them on every candidate it simulates).
    let mut before = 0;
    for (index, &round) in rounds.iter().enumerate() {
        builder.round(round);
        // A prefill task that cannot fit beside the resident set fails the graph
        // whatever the decode rounds hold.
        if refuse_misfit_prefill && index == 0 && rounds.len() > 1 {
            let pools = builder.pools();
            if !fits_beside_resident(&pools, &builder.tasks) {
                return Err(misfit_of_prefill(builder, pools, workload, round));
            }
        }
        if index < 2 {
            let per_round = builder.tasks.len() - before;
            builder.tasks.reserve((per_round * (rounds.len() - index - 1)).min(1 << 24));
        }
        before = builder.tasks.len();
    }
    let graph = TaskGraph {
        pools: builder.pools(),
        resources: builder.resources(),
        tasks: builder.tasks,
        batch_size: workload.batch_size,
        prompt_len: workload.prompt_len,
        gen_len: workload.gen_len,
        rounds,
    };
    graph.validate()?;
    Ok(graph)
}

/// `check_fits`' error for a graph of the prefill alone (`round`), whose tasks
/// `fits_beside_resident` found not to fit `pools`.
fn misfit_of_prefill(builder: Builder, pools: Vec<PoolSpec>, workload: &Workload, round: Round) -> CoreError {
    let graph = TaskGraph {
        pools,
        resources: builder.resources(),
        tasks: builder.tasks,
        batch_size: workload.batch_size,
        prompt_len: workload.prompt_len,
        gen_len: workload.gen_len,
        rounds: vec![round],
    };
    match graph.check_fits() {
        Err(error) => error,
        Ok(()) => CoreError::invalid("the prefill's tasks do not fit beside the resident set"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::hardware::Hardware;
    use crate::model::Dtype;

    /// A catalog model and the datasheet profile of the cpu device on the CI host.
    fn on_cpu(model: &str) -> (ModelSpec, Profile) {
        let catalog = Catalog::builtin().unwrap();
        let profile = Profile::from_datasheet(&Hardware {
            gpu: catalog.gpu("cpu").unwrap().value,
            host: catalog.host("ferry-ci-vm").unwrap().value,
        });
        (catalog.model(model).unwrap().value, profile)
    }

    fn tiny_graph(workload: &Workload, steps: &Steps) -> TaskGraph {
        let (model, profile) = on_cpu("test-tiny");
        let policy = Policy::all_on_device(model.num_layers, 1, Dtype::F32);
        lower(&policy, &model, workload, &profile, steps).unwrap()
    }

    #[test]
    fn plain_decoding_is_a_prefill_then_one_token_per_round() {
        let workload = Workload { batch_size: 1, prompt_len: 5, gen_len: 4 };
        let graph = tiny_graph(&workload, &Steps::All);
        let rounds: Vec<(u32, u32, u32, u32)> =
            graph.rounds.iter().map(|r| (r.step, r.past, r.rows, r.tokens)).collect();
        assert_eq!(rounds, [(0, 0, 5, 1), (1, 5, 1, 1), (2, 6, 1, 1), (3, 7, 1, 1)]);
        assert!(graph.is_complete());
        // Compute tasks carry their round's rows and context.
        let last = graph.tasks.iter().rev().find(|t| t.kind == crate::graph::TaskKind::Compute).unwrap();
        assert_eq!((last.step, last.tokens, last.context), (3, 1, 8));
        let long = Workload { gen_len: 40, ..workload };
        let sampled = tiny_graph(&long, &Steps::Only(vec![1, 2, 30]));
        assert_eq!(sampled.rounds.iter().map(|r| r.step).collect::<Vec<_>>(), [0, 1, 2, 30]);
        assert!(!sampled.is_complete());
        assert_eq!(sampled.round(30).map(|r| r.past), Some(34));
        assert!(sampled.round(3).is_none());
    }

    #[test]
    fn graphs_whose_rounds_disagree_with_their_tasks_are_refused() {
        let workload = Workload { batch_size: 1, prompt_len: 5, gen_len: 3 };
        let mut graph = tiny_graph(&workload, &Steps::All);
        graph.rounds.remove(1);
        let err = graph.validate().unwrap_err().to_string();
        assert!(err.contains("step 1") && err.contains("not among the graph's rounds"), "{err}");
        let mut graph = tiny_graph(&workload, &Steps::All);
        graph.rounds[2].tokens = 0;
        let err = graph.validate().unwrap_err().to_string();
        assert!(err.contains("round 2") && err.contains("at least 1"), "{err}");
        let mut graph = tiny_graph(&workload, &Steps::All);
        graph.rounds.swap(1, 2);
        assert!(graph.validate().unwrap_err().to_string().contains("ascend"));
    }

    /// More pinned host memory than the host can pin is refused, naming the most it can.
    #[test]
    fn pinning_more_than_the_host_can_is_refused() {
        let (model, profile) = on_cpu("test-tiny");
        let workload = Workload { batch_size: 1, prompt_len: 4, gen_len: 2 };
        let mut policy = Policy::all_on_device(model.num_layers, 1, Dtype::F32);
        policy.pinned_host_bytes = profile.host(0).max_pinned_bytes;
        assert!(lower(&policy, &model, &workload, &profile, &Steps::All).is_ok());
        policy.pinned_host_bytes += 1;
        let err = lower(&policy, &model, &workload, &profile, &Steps::All).unwrap_err().to_string();
        assert!(err.contains("pinned_host_bytes") && err.contains("lower it to at most"), "{err}");
    }

    /// A mixture of experts with its MLPs on disk, layer-major over two micro-batches:
    /// each visit reads the router part ahead, routes both micro-batches, then reads
    /// the expected experts once (holding the most their tokens could choose), and only
    /// then computes the MLPs; `expert_reads: whole` reads whole layers ahead as before.
    #[test]
    fn routed_visits_route_every_micro_batch_before_reading_the_chosen_experts() {
        use crate::graph::{Op, Payload, TaskKind, ROUTED_EXPERTS, ROUTER_PART};
        use crate::plan::{ExpertReads, Schedule, TierCounts};
        let (model, profile) = on_cpu("test-tiny-moe");
        let mut policy = Policy::all_on_device(model.num_layers, 1, Dtype::F32);
        policy.schedule = Schedule::ZigzagBlock;
        policy.num_micro_batches = 2;
        policy.mlp_weights = TierCounts { device: 0, host: 0, disk: model.num_layers };
        let workload = Workload { batch_size: 2, prompt_len: 3, gen_len: 2 };
        let graph = lower(&policy, &model, &workload, &profile, &Steps::All).unwrap();
        let sizes = crate::model::WeightLayout::of(&model, &policy.weight_format).expert_bytes(&model, 0).unwrap();
        let of_visit = |step: u32| graph.tasks.iter().enumerate().filter(move |(_, t)| t.layer == 0 && t.step == step);
        for (step, tokens) in [(0u32, 2 * 3u64), (1, 2)] {
            let position = |what: &dyn Fn(&crate::graph::Task) -> bool| -> Vec<usize> {
                of_visit(step).filter(|(_, t)| what(t)).map(|(i, _)| i).collect()
            };
            let router = position(&|t| t.kind == TaskKind::DiskRead && t.piece == ROUTER_PART);
            let routes = position(&|t| matches!(t.payload, Payload::Compute { op: Op::Route, draft: false, .. }));
            let experts = position(&|t| t.kind == TaskKind::DiskRead && t.piece == ROUTED_EXPERTS);
            let mlps = position(&|t| matches!(t.payload, Payload::Compute { op: Op::Mlp, draft: false, .. }));
            assert_eq!((router.len(), routes.len(), experts.len(), mlps.len()), (1, 2, 1, 2), "step {step}");
            let read = &graph.tasks[experts[0]];
            assert!(routes.iter().all(|r| read.deps.contains(&(*r as u32))), "the read waits for every route");
            assert!(mlps.iter().all(|m| graph.tasks[*m].deps.contains(&(experts[0] as u32))));
            assert_eq!(graph.tasks[router[0]].bytes, sizes.router);
            assert_eq!(read.bytes, sizes.expected(model.expected_experts(tokens)));
            assert_eq!(read.acquire[0].bytes, sizes.most(model.most_experts(tokens)));
            assert!(read.bytes < read.acquire[0].bytes);
        }
        // A decoding step's two tokens choose at most 2 × 2 of the 8 experts: the read
        // holds half a layer's experts, not all.
        let decoding = graph.tasks.iter().find(|t| t.step == 1 && t.piece == ROUTED_EXPERTS).unwrap();
        assert_eq!(decoding.acquire[0].bytes, 4 * sizes.experts[0]);
        policy.expert_reads = ExpertReads::Whole;
        let whole = lower(&policy, &model, &workload, &profile, &Steps::All).unwrap();
        assert!(whole.tasks.iter().all(|t| !matches!(t.payload, Payload::Compute { op: Op::Route, draft: false, .. })));
        let reads: Vec<_> = whole.tasks.iter().filter(|t| t.kind == TaskKind::DiskRead && t.layer == 0).collect();
        assert!(reads.iter().all(|t| t.bytes == sizes.router + sizes.experts.iter().sum::<u64>()));
        // Hot experts: resident on the device for every routed layer, read no more,
        // and a routed read holds the most of the rest the tokens could choose.
        policy.expert_reads = ExpertReads::Routed;
        policy.hot_experts = 6;
        let hot = lower(&policy, &model, &workload, &profile, &Steps::All).unwrap();
        let device = hot.pools.iter().find(|p| p.pool == crate::graph::Place::DEVICE).unwrap();
        let kept = device.resident.iter().find(|(what, _)| what == "hot experts").unwrap().1;
        assert_eq!(kept, model.num_layers * 6 * sizes.experts[0]);
        let decoding = hot.tasks.iter().find(|t| t.step == 1 && t.piece == ROUTED_EXPERTS).unwrap();
        assert_eq!(decoding.acquire[0].bytes, 2 * sizes.experts[0], "at most the 2 experts left");
        assert_eq!(decoding.bytes, sizes.expected(model.expected_cold_experts(2, 6)));
        // Refused: more than there are, or beside whole-layer reads.
        let big = Policy { hot_experts: 9, ..policy.clone() };
        assert!(lower(&big, &model, &workload, &profile, &Steps::All)
            .unwrap_err()
            .to_string()
            .contains("hot_experts 9"));
        let whole = Policy { hot_experts: 2, expert_reads: ExpertReads::Whole, ..policy.clone() };
        assert!(lower(&whole, &model, &workload, &profile, &Steps::All)
            .unwrap_err()
            .to_string()
            .contains("expert_reads: whole"));
        // Two more read ahead with the router part: the routed read leaves them out too.
        let ahead = Policy { prefetched_experts: 2, ..policy.clone() };
        let graph = lower(&ahead, &model, &workload, &profile, &Steps::All).unwrap();
        let router = graph.tasks.iter().find(|t| t.step == 1 && t.piece == ROUTER_PART).unwrap();
        assert_eq!(router.bytes, sizes.router + 2 * sizes.experts[0]);
        let decoding = graph.tasks.iter().find(|t| t.step == 1 && t.piece == ROUTED_EXPERTS).unwrap();
        assert_eq!(decoding.bytes, sizes.expected(model.expected_cold_experts(2, 8)));
        assert_eq!(decoding.acquire[0].bytes, 0, "every expert is hot or read ahead");
        let over = Policy { prefetched_experts: 3, ..policy.clone() };
        let err = lower(&over, &model, &workload, &profile, &Steps::All).unwrap_err().to_string();
        assert!(err.contains("more than the 8"), "{err}");
    }

    /// `lower_if_fits` refuses a prefill task that cannot fit beside the resident set
    /// before the decode rounds are built, with `check_fits`' message; a budget one
    /// byte larger lowers every round; `lower` lowers the misfit whole.
    #[test]
    fn a_prefill_that_cannot_fit_is_refused_before_its_decode_rounds() {
        use crate::graph::TaskKind;
        use crate::plan::TierCounts;
        let (model, mut profile) = on_cpu("test-tiny");
        let workload = Workload { batch_size: 1, prompt_len: 8, gen_len: 4 };
        let mut policy = Policy::all_on_device(model.num_layers, 1, Dtype::F32);
        policy.mlp_weights = TierCounts { device: 0, host: 0, disk: model.num_layers };
        let graph = lower(&policy, &model, &workload, &profile, &Steps::All).unwrap();
        let device = graph.pools.iter().find(|p| p.pool == Place::DEVICE).unwrap();
        let largest = graph
            .tasks
            .iter()
            .flat_map(|t| t.acquire.iter().filter(|m| m.pool == Place::DEVICE).map(|m| m.bytes))
            .max()
            .unwrap();
        assert!(graph.tasks.iter().any(|t| t.kind == TaskKind::DiskRead && t.step > 0), "decode reads its MLPs");
        // Just enough beside the resident set: every round is lowered.
        profile.device_memory_bytes = device.resident_bytes() + largest;
        let graph = lower_if_fits(&policy, &model, &workload, &profile, &Steps::All).unwrap();
        assert_eq!(graph.rounds.len(), 4);
        graph.check_fits().unwrap();
        // A byte less: refused, naming a task of the prefill.
        profile.device_memory_bytes -= 1;
        let err = lower_if_fits(&policy, &model, &workload, &profile, &Steps::All).unwrap_err().to_string();
        assert!(err.contains("left beside the resident set (short by 1 B)") && err.contains(" s0'"), "{err}");
        let whole = lower(&policy, &model, &workload, &profile, &Steps::All).unwrap();
        assert_eq!(whole.rounds.len(), 4);
        assert!(whole.check_fits().unwrap_err().to_string().contains("short by 1 B"));
    }

    #[test]
    fn embeddings_on_disk_read_each_lookups_rows_before_it_and_are_not_resident() {
        use crate::graph::{MemOp, Op, Payload, TaskKind};
        use crate::plan::Tier;
        let (model, profile) = on_cpu("test-tiny");
        let workload = Workload { batch_size: 2, prompt_len: 8, gen_len: 3 };
        let mut policy = Policy::all_on_device(model.num_layers, 2, Dtype::F32);
        policy.embeddings = Tier::Disk;
        let graph = lower(&policy, &model, &workload, &profile, &Steps::All).unwrap();
        let device = graph.pools.iter().find(|p| p.pool == Place::DEVICE).unwrap();
        assert_eq!(device.resident.iter().find(|(what, _)| what == "embeddings").unwrap().1, 0);
        // f32 rows of 128 values: 512 bytes, a page around each on average.
        let per_row = 512 - 1 + 4096;
        let embeds: Vec<_> = graph
            .tasks
            .iter()
            .filter(|t| matches!(t.payload, Payload::Compute { op: Op::Embed, draft: false, .. }))
            .collect();
        assert_eq!(embeds.len(), 3, "one lookup a round");
        for embed in embeds {
            let read = embed.deps.iter().map(|&d| &graph.tasks[d as usize]).find(|t| t.kind == TaskKind::DiskRead);
            let read = read.expect("each lookup waits for its rows");
            let rows = if embed.step == 0 { 16 } else { 2 };
            assert_eq!((read.bytes, read.chunk_bytes as u64), (rows * per_row, per_row), "step {}", embed.step);
            // It holds the pages and the rows gathered from them until the lookup.
            assert_eq!(read.acquire[0], MemOp { pool: Place::DEVICE, bytes: read.bytes + rows * 512 });
            assert!(embed.release.contains(&read.acquire[0]), "the lookup frees the rows");
            // The rows are read once the tokens are known: after the round before's head.
            assert_eq!(read.deps.as_slice(), &embed.deps[..embed.deps.len() - 1]);
        }
        // A prompt whose rows would read more than the table reads the table, as one range
        // in the plan's requests.
        let long = Workload { prompt_len: 64, ..workload };
        let graph = lower(&policy, &model, &long, &profile, &Steps::All).unwrap();
        let read = graph.tasks.iter().find(|t| t.kind == TaskKind::DiskRead && t.step == 0).unwrap();
        assert_eq!((read.bytes, read.chunk_bytes as u64), (512 * 512, (512 * 512).min(policy.chunk_bytes)));
        // Refused where a lookup cannot read rows alone: a tied head, the head itself.
        let mut tied = model.clone();
        tied.tie_word_embeddings = true;
        let err = lower(&policy, &tied, &workload, &profile, &Steps::All).unwrap_err().to_string();
        assert!(err.contains("ties its head"), "{err}");
        let head = Policy { head: Tier::Disk, embeddings: Tier::Device, ..policy };
        let err = lower(&head, &model, &workload, &profile, &Steps::All).unwrap_err().to_string();
        assert!(err.contains("head lives on the device or the host"), "{err}");
    }
}
