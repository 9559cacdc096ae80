//! Pipeline plans over the devices of a cluster: which devices, in which order, hold
//! which contiguous layers, each stage with its own offload plan over its device,
//! its host and its disk.
//!
//! For each group of pipeline knobs (micro-batch size and count, schedule class):
//!
//! 1. every device gets the one-device LP's per-layer figures on its own machine
//!    (`Profile::single_device`: its compute, its host's memory and disk), and a
//!    stage's cost for k layers is the best of its offload plans — k + 1 ways to keep
//!    layers resident, the KV cache and streamed weights filling the device, then the
//!    host (shared by the devices on it), then the disk — priced like the LP: each
//!    phase takes the longest of compute, copies and disk reads, plus the activations
//!    crossing in from the previous stage;
//! 2. `split::best_split` places the layers exactly over each device order (orders of
//!    distinct device kinds, up to five devices; else the cluster's own order);
//! 3. the best estimates (and the best of every batch size) are assembled into plans
//!    and simulated, the winner stepped fully; an even split and llama.cpp's split in
//!    proportion to device memory, with the winner's knobs, are simulated beside it;
//! 4. where the winner parks KV in host memory (PipeMax's offload of the micro-batches
//!    not active on a stage), the same search with every stage's KV cache on its device
//!    and the even split so are simulated too: what the offload buys.

mod compare;
mod price;

use ferry_core::plan::{Policy, Schedule, Stage, Tier, TierCounts, Workload};
use ferry_core::profile::Profile;

use super::search::Searcher;
use super::split::best_split;
use super::{BatchChoice, Candidate, KnobSpace, Objective, TuneError, TuneRequest};
use crate::cost::CostModel;
use crate::predict::{predict, Extrapolation};
use compare::{nothing_fits, split_baselines};
use price::{device_terms, relaxed, stage_plan, DeviceTerms};

/// Transfer knobs every pipeline plan uses: the single-device search tunes them finely;
/// here they are fixed at values that serve streaming well (and the simulation, not the
/// estimate, decides between plans). Prefetch depth is searched: a small device may
/// have room for two streamed layers and not three.
const PREFETCH_DEPTHS: [u64; 2] = [1, 2];
const CHUNK_BYTES: u64 = 64 << 20;
const COPY_STREAMS: u32 = 2;
const IO_QUEUE_DEPTH: u32 = 8;
/// Plans simulated after the estimate ranks them.
const SIMULATED: usize = 6;
/// Times an estimate that misses its memory in simulation is relaxed and tried again.
const RELAXATIONS: usize = 3;
/// Device orders are searched up to this many devices (5! = 120 orders).
const MAX_ORDERED_DEVICES: usize = 5;

/// A split compared with the tuned one.
#[derive(Debug, Clone)]
pub struct SplitBaseline {
    pub name: &'static str,
    /// Layers per device, in device order.
    pub layers: Vec<u64>,
    pub outcome: Result<Candidate, String>,
}

/// What the pipeline search did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PipelineStats {
    pub groups: u64,
    pub orders: u64,
    /// Stage offload plans priced (device, layers, position).
    pub stage_plans: u64,
    pub simulated: u64,
    /// Whether device orders were searched (else the cluster's order was kept).
    pub orders_searched: bool,
}

#[derive(Debug, Clone)]
pub struct PipelineResult {
    pub best: Candidate,
    /// The estimate the search ranked the winner by, ms for the whole run.
    pub estimate_ms: f64,
    pub baselines: Vec<SplitBaseline>,
    /// The split that beat the searched plans in simulation and so became the plan.
    pub adopted: Option<&'static str>,
    pub stats: PipelineStats,
}

/// The pipeline knobs of one group.
#[derive(Debug, Clone, Copy)]
struct Knobs {
    micro_batch_size: u64,
    num_micro_batches: u64,
    schedule: Schedule,
    prefetch_depth: u64,
}

/// One stage's offload plan: layers per tier (device, host, disk) for its weights
/// (attention and MLP alike) and its KV cache, and its busy time.
#[derive(Debug, Clone, Copy)]
struct StagePlan {
    weights: [u64; 3],
    kv: [u64; 3],
    busy_ms: f64,
}

/// Searches pipeline plans over the request's cluster (see the module docs).
pub fn tune_pipeline(request: &TuneRequest, space: &KnobSpace) -> Result<PipelineResult, TuneError> {
    if request.speculation.is_some() {
        return Err(TuneError::Impossible(
            "speculative decoding is planned on one device; tune a cluster without --draft".into(),
        ));
    }
    let profile = request.profile;
    let count = profile.device_count();
    let singles: Vec<Profile> = (0..count as u16).map(|d| profile.single_device(d)).collect();
    let requests: Vec<TuneRequest> =
        singles.iter().map(|p| TuneRequest { profile: p, speculation: None, ..request.clone() }).collect();
    // Stages are priced and assembled with the embedding table in memory.
    let space = &KnobSpace { embeddings_on_disk: false, ..space.clone() };
    let searchers: Vec<Searcher> = requests.iter().map(|r| Searcher::new(r, space)).collect();
    let (best, estimate_ms, stats) = search(request, space, &searchers, KvCache::MayOffload)?;
    let mut baselines = split_baselines(request, &best, &searchers, KvCache::MayOffload);
    // PipeMax's question: what parking the KV cache in host memory buys. The same
    // search with every stage's cache on its device (as engines without KV offload
    // run), and the even split so (vLLM's pipeline), each at the batch it can hold.
    if best.policy.kv_cache.device < request.model.num_layers {
        match search(request, space, &searchers, KvCache::OnDevice) {
            Ok((resident, _, _)) => {
                let even = split_baselines(request, &resident, &searchers, KvCache::OnDevice);
                baselines.push(SplitBaseline {
                    name: "ferry, KV kept on the devices",
                    layers: layers_per_device(&resident.policy, count),
                    outcome: Ok(resident),
                });
                baselines.extend(even.into_iter().filter(|b| b.name.starts_with("even")));
            }
            Err(e) => baselines.push(SplitBaseline {
                name: "ferry, KV kept on the devices",
                layers: vec![0; count],
                outcome: Err(e.to_string()),
            }),
        }
    }
    // The estimate ranks splits; the simulation has the last word: a compared split
    // that simulates better is the plan (as `tune_and_compare` does with baselines).
    let mut best = best;
    let mut adopted = None;
    for baseline in &baselines {
        if let Ok(c) = &baseline.outcome {
            if c.score(request.objective) > best.score(request.objective) {
                best = c.clone();
                adopted = Some(baseline.name);
            }
        }
    }
    Ok(PipelineResult { best, estimate_ms, baselines, adopted, stats })
}

/// Where a stage may keep its KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KvCache {
    /// On the device as far as it fits, the rest in host memory, then on disk.
    MayOffload,
    /// All on the device: a stage that cannot hold it does not fit.
    OnDevice,
}

/// The search proper: every knob group and device order priced and split, the best
/// estimates simulated, the winner stepped fully, with the estimate it ranked by.
fn search(
    request: &TuneRequest,
    space: &KnobSpace,
    searchers: &[Searcher],
    kv: KvCache,
) -> Result<(Candidate, f64, PipelineStats), TuneError> {
    let profile = request.profile;
    let count = profile.device_count();
    let orders = device_orders(profile);
    let cluster = CostModel::new(profile, request.model);
    let mut stats = PipelineStats { orders_searched: count <= MAX_ORDERED_DEVICES, ..PipelineStats::default() };
    let mut ranked: Vec<Estimated> = Vec::new();
    for knobs in knob_groups(request, space) {
        stats.groups += 1;
        let terms: Vec<DeviceTerms> =
            (0..count).map(|d| device_terms(request, &cluster, &searchers[d], d as u16, knobs, kv)).collect();
        // Stage plans by (device, layers, first, last): shared by every order.
        let mut memo = std::collections::HashMap::new();
        for order in &orders {
            stats.orders += 1;
            if let Some(estimated) = split_order(request, knobs, order, &terms, &mut memo, &mut stats) {
                ranked.push(estimated);
            }
        }
    }
    if ranked.is_empty() {
        // Priced at the smallest micro-batch the request allows (batch 1 when free).
        let groups = knob_groups(request, space);
        let smallest =
            groups.iter().copied().min_by_key(|k| (k.micro_batch_size, k.num_micro_batches)).unwrap_or(Knobs {
                micro_batch_size: 1,
                num_micro_batches: 1,
                schedule: Schedule::Pipelined,
                prefetch_depth: 1,
            });
        let terms: Vec<DeviceTerms> =
            (0..count).map(|d| device_terms(request, &cluster, &searchers[d], d as u16, smallest, kv)).collect();
        return Err(TuneError::Impossible(nothing_fits(request, smallest, &terms)));
    }
    ranked.sort_by(|a, b| a.score.total_cmp(&b.score));
    // The best estimates, and the best estimate of every batch size: the estimate can
    // misjudge a whole batch size (streamed weights at a long context), and a batch the
    // estimate ranks lower may simulate faster.
    let mut batches = std::collections::HashSet::new();
    let chosen = ranked.iter().enumerate().filter(|(i, e)| {
        let batch = e.knobs.micro_batch_size * e.knobs.num_micro_batches;
        batches.insert(batch) || *i < SIMULATED
    });
    let mut best: Option<(Candidate, f64)> = None;
    let mut first_error: Option<String> = None;
    for (_, e) in chosen {
        let policy = assemble(request, e.knobs, &e.devices, &e.plans, &e.layers);
        stats.simulated += 1;
        let candidate = match simulate(request, policy, Extrapolation::Sampled) {
            Ok(candidate) => candidate,
            Err(error) => {
                // The estimate's memory is approximate (buffers in flight): a plan that
                // misses by a little fits with one layer's cache or weights less on
                // each device.
                let mut plans = e.plans.clone();
                let mut fitted = None;
                for _ in 0..RELAXATIONS {
                    plans = plans.iter().map(relaxed).collect();
                    stats.simulated += 1;
                    let policy = assemble(request, e.knobs, &e.devices, &plans, &e.layers);
                    if let Ok(candidate) = simulate(request, policy, Extrapolation::Sampled) {
                        fitted = Some(candidate);
                        break;
                    }
                }
                match fitted {
                    Some(candidate) => candidate,
                    None => {
                        first_error.get_or_insert(error);
                        continue;
                    }
                }
            }
        };
        let estimate = e.time_ms;
        if best.as_ref().is_none_or(|(b, _)| candidate.score(request.objective) > b.score(request.objective)) {
            best = Some((candidate, estimate));
        }
    }
    let Some((best, estimate_ms)) = best else {
        return Err(TuneError::Impossible(format!(
            "{} estimated pipeline plans were assembled, but none fits its pools in simulation; the best \
             estimate's: {}",
            stats.simulated,
            first_error.unwrap_or_default()
        )));
    };
    let best = simulate(request, best.policy, Extrapolation::Full)
        .map_err(|e| TuneError::Impossible(format!("the best pipeline plan failed its full simulation: {e}")))?;
    Ok((best, estimate_ms, stats))
}

/// Layers per device of a staged policy, in device order (0 for devices left out).
fn layers_per_device(policy: &Policy, devices: usize) -> Vec<u64> {
    let mut out = vec![0; devices];
    for stage in &policy.stages {
        out[stage.device as usize] += stage.layers();
    }
    out
}

/// A split the estimate priced: its knobs, used devices in stage order with their
/// plans and layers, the pipeline time and the score it is ranked by (lower is better).
struct Estimated {
    score: f64,
    time_ms: f64,
    knobs: Knobs,
    devices: Vec<u16>,
    plans: Vec<StagePlan>,
    layers: Vec<u64>,
}

type StageMemo = std::collections::HashMap<(usize, u64, bool, bool), Option<StagePlan>>;

/// The best split over one device order (`split::best_split`), with each used stage's plan.
fn split_order(
    request: &TuneRequest,
    knobs: Knobs,
    order: &[u16],
    terms: &[DeviceTerms],
    memo: &mut StageMemo,
    stats: &mut PipelineStats,
) -> Option<Estimated> {
    let layers = request.model.num_layers;
    let key = |i: usize, start: u64, take: u64| (order[i] as usize, take, start == 0, start + take == layers);
    let mut cost = |i: usize, start: u64, take: u64| {
        let k = key(i, start, take);
        let plan = *memo.entry(k).or_insert_with(|| {
            stats.stage_plans += 1;
            stage_plan(&terms[k.0], take, k.2, k.3)
        });
        plan.map(|p| p.busy_ms)
    };
    let (split, time_ms) = best_split(order.len(), layers, knobs.num_micro_batches, &mut cost)?;
    let (mut devices, mut plans, mut taken) = (Vec::new(), Vec::new(), Vec::new());
    let mut start = 0;
    for (i, &take) in split.iter().enumerate() {
        if take > 0 {
            devices.push(order[i]);
            plans.push(memo[&key(i, start, take)].expect("the split's stages were priced"));
            taken.push(take);
        }
        start += take;
    }
    let batch = (knobs.micro_batch_size * knobs.num_micro_batches) as f64;
    let score = match request.objective {
        Objective::Throughput => time_ms / batch,
        Objective::Latency => time_ms,
    };
    Some(Estimated { score, time_ms, knobs, devices, plans, layers: taken })
}

/// Micro-batch configurations and schedule classes the pipeline search tries.
fn knob_groups(request: &TuneRequest, space: &KnobSpace) -> Vec<Knobs> {
    let mut groups = Vec::new();
    for &mb in &space.micro_batch_sizes {
        for &n in &space.micro_batch_counts {
            let fits = match request.batch {
                BatchChoice::Fixed(b) => mb * n == b,
                BatchChoice::Auto { max } => mb * n <= max,
            };
            if !fits {
                continue;
            }
            for schedule in [Schedule::LayerPrefetch, Schedule::Pipelined] {
                for prefetch_depth in PREFETCH_DEPTHS {
                    if space.schedules.contains(&schedule) && space.prefetch_depths.contains(&prefetch_depth) {
                        groups.push(Knobs { micro_batch_size: mb, num_micro_batches: n, schedule, prefetch_depth });
                    }
                }
            }
        }
    }
    if let (BatchChoice::Fixed(b), true) = (request.batch, groups.is_empty()) {
        let schedule = Schedule::Pipelined;
        groups.push(Knobs { micro_batch_size: b, num_micro_batches: 1, schedule, prefetch_depth: 1 });
    }
    groups
}

/// Device orders to search: every order of distinct device kinds (same kind, memory and
/// host count as one), or the cluster's own order past `MAX_ORDERED_DEVICES`.
fn device_orders(profile: &Profile) -> Vec<Vec<u16>> {
    let count = profile.device_count() as u16;
    let identity: Vec<u16> = (0..count).collect();
    if count as usize > MAX_ORDERED_DEVICES {
        return vec![identity];
    }
    let signature = |order: &[u16]| -> Vec<(String, u64, u16)> {
        order
            .iter()
            .map(|&d| (profile.device(d).name.to_string(), profile.device(d).memory_bytes, profile.device(d).host))
            .collect()
    };
    let mut orders: Vec<Vec<u16>> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    permutations(&identity, &mut Vec::new(), &mut |order| {
        if seen.insert(signature(order)) {
            orders.push(order.to_vec());
        }
    });
    orders
}

fn permutations(rest: &[u16], prefix: &mut Vec<u16>, visit: &mut dyn FnMut(&[u16])) {
    if rest.is_empty() {
        return visit(prefix);
    }
    for i in 0..rest.len() {
        let mut remaining = rest.to_vec();
        prefix.push(remaining.remove(i));
        permutations(&remaining, prefix, visit);
        prefix.pop();
    }
}

/// The plan of a split: knobs, each used device's stage, totals over the stages.
fn assemble(request: &TuneRequest, knobs: Knobs, devices: &[u16], plans: &[StagePlan], layers: &[u64]) -> Policy {
    let counts = |c: [u64; 3]| TierCounts { device: c[0], host: c[1], disk: c[2] };
    let stages: Vec<Stage> = devices
        .iter()
        .zip(plans)
        .map(|(&device, p)| Stage {
            device,
            attention_weights: counts(p.weights),
            mlp_weights: counts(p.weights),
            kv_cache: counts(p.kv),
        })
        .collect();
    debug_assert!(stages.iter().zip(layers).all(|(s, &l)| s.layers() == l));
    let total = |pick: fn(&Stage) -> TierCounts| {
        stages.iter().map(pick).fold(TierCounts { device: 0, host: 0, disk: 0 }, |a, b| TierCounts {
            device: a.device + b.device,
            host: a.host + b.host,
            disk: a.disk + b.disk,
        })
    };
    let first_unified = request.profile.device(devices[0]).unified_memory;
    let any_unified = devices.iter().any(|&d| request.profile.device(d).unified_memory);
    let mut policy = Policy::all_on_device(request.model.num_layers, knobs.micro_batch_size, request.kv_dtype);
    policy.schedule = knobs.schedule;
    policy.num_micro_batches = knobs.num_micro_batches;
    policy.prefetch_depth = knobs.prefetch_depth;
    policy.attention_weights = total(|s| s.attention_weights);
    policy.mlp_weights = total(|s| s.mlp_weights);
    policy.kv_cache = total(|s| s.kv_cache);
    policy.embeddings = if first_unified { Tier::Device } else { Tier::Host };
    policy.head = Tier::Device;
    policy.chunk_bytes = CHUNK_BYTES;
    policy.copy_streams = if any_unified { 1 } else { COPY_STREAMS };
    policy.io_queue_depth = IO_QUEUE_DEPTH;
    let host = request.profile.device(devices[0]).host;
    policy.pinned_host_bytes = if any_unified { 0 } else { request.profile.host(host).max_pinned_bytes };
    policy.set_weight_format(request.weight_format.clone());
    policy.stages = stages;
    policy
}

fn simulate(request: &TuneRequest, policy: Policy, mode: Extrapolation) -> Result<Candidate, String> {
    let workload =
        Workload { batch_size: policy.batch_size(), prompt_len: request.prompt_len, gen_len: request.gen_len };
    let prediction = predict(&policy, request.model, &workload, request.profile, mode).map_err(|e| e.to_string())?;
    Ok(Candidate { policy, workload, metrics: prediction.metrics, bound_ns: 0 })
}
