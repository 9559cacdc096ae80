//! Runs a `TaskGraph` for real and records when every task ran.
//!
//! A scheduler (the calling thread) drives `ferry_core::dispatch::Dispatcher` — the
//! same dispatch code the simulator runs: on each resource, the ready task with the
//! lowest id starts when one of the resource's lanes is free and its memory fits the
//! pool budget; no task overtakes it on that resource. Each lane is a worker thread. Memory is accounted exactly as the graph says (acquired at start,
//! released at end), and the buffers behind it are allocated and freed by the tasks
//! themselves, so the process holds what the plan accounted for.
//!
//! Data moves the way the graph says: weights read from disk or copied from host
//! memory land in per-visit buffers that the visit's computes use; KV caches live
//! where the plan puts them and are loaded and stored by their tasks; the hidden
//! state of each micro-batch has a device copy and a host copy, and activation
//! copies move it between them. A missing or misplaced task therefore changes the
//! numbers, which the plan-invariance tests would catch.

//!
//! The code is split by concern: `scheduler` (the dispatch loop and one worker per
//! lane; knows tasks, resources and pools, nothing of the model), `weights` (weight
//! bytes in memory: reads, copies, row-block views), `kv` (the KV cache at every
//! tier, the scratch file for the disk tier), `forward` (the model's forward pass on
//! each micro-batch's activations, kept per place).

mod embed_rows;
mod experts;

pub use experts::ExpertUse;
mod forward;
mod kv;
mod remote;
mod scheduler;
mod speculate;
mod weights;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ferry_core::graph::{Place, Task, TaskGraph, NO_LAYER};
use ferry_core::model::{Dtype, ModelSpec, WeightGroup, WeightLayout};
use ferry_core::plan::{LayerPlacement, Policy, Schedule, Tier, Workload};
use ferry_core::trace::{Metrics, Trace, TraceSource};

use crate::backend::{Backend, DeviceBuffer};
use crate::io::{DiskFile, ReadPool};
use crate::kernels;
use crate::memory::{self, Buffer, Recycler};
use crate::weights::ModelFiles;
use crate::EngineError;

use crate::stages::{LocalView, Network};
use forward::MicroBatch;
use kv::KvFile;
use remote::NetView;
pub use speculate::SpeculationReport;
use speculate::{DraftState, Positions};
use weights::{group_code, Key, Loaded};

/// What to run and how.
pub struct RunOptions {
    /// Prompt token ids, one list of `prompt_len` per sequence of the batch.
    pub prompts: Vec<Vec<u32>>,
    /// Where the disk-resident KV cache file is created (and removed afterwards).
    pub scratch_dir: PathBuf,
    /// Accept buffered reads (dropped from the page cache afterwards) where the file
    /// system refuses O_DIRECT, instead of failing.
    pub allow_buffered_io: bool,
    /// Keep every step's logits (tests compare them across plans).
    pub keep_logits: bool,
    /// Called with (finished tasks, all tasks) as the run goes.
    pub progress: Option<Box<dyn Fn(usize, usize) + Send + Sync>>,
    /// A separate draft model's files, for a plan that speculates with one.
    pub draft_files: Option<ModelFiles>,
}

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub trace: Trace,
    pub metrics: Metrics,
    /// Generated token ids, `gen_len` per sequence.
    pub tokens: Vec<Vec<u32>>,
    /// logits[step][sequence] when `keep_logits`.
    #[serde(skip)]
    pub logits: Vec<Vec<Vec<f32>>>,
    /// Peak resident set of the process (VmHWM) at the end of the run.
    pub peak_rss_bytes: u64,
    /// Resident set before the model's memory was allocated: the fixed overhead.
    pub baseline_rss_bytes: u64,
    /// Speculative decoding: the measured acceptance and tokens per round.
    pub speculation: Option<SpeculationReport>,
    /// The graph as it ran, when that is not the one given: a speculative run stops
    /// once every sequence has its tokens (its trace and metrics are over this one).
    #[serde(skip)]
    pub graph_run: Option<TaskGraph>,
    /// Bytes the kernel read from storage for this process during the run (page-cache
    /// hits do not count), against the bytes disk tasks asked for.
    pub storage_read_bytes: u64,
    pub requested_read_bytes: u64,
    pub direct_io: bool,
    /// Reading the resident weights before the run, ns (not part of the metrics).
    pub setup_ns: u64,
    /// Streamed weights that landed in kept pages of recycled buffers, and in pages the
    /// kernel had to fault in and zero (new mappings, and the tails recycled buffers
    /// had handed back to stay within the budget), bytes.
    pub recycled_bytes: u64,
    pub newly_mapped_bytes: u64,
    /// A run over several machines: what each stage worker reported to the head.
    #[serde(skip)]
    pub stage_processes: Vec<crate::stages::wire::StageReport>,
    /// A mixture of experts: the experts each MoE layer computed with, per step and
    /// micro-batch (draft passes not counted).
    pub experts: Vec<ExpertUse>,
}

struct Engine<'a> {
    graph: &'a TaskGraph,
    policy: &'a Policy,
    workload: &'a Workload,
    files: &'a ModelFiles,
    spec: &'a ModelSpec,
    backend: &'a dyn Backend,
    options: &'a RunOptions,
    reader: ReadPool,
    disk_files: HashMap<PathBuf, Arc<DiskFile>>,
    kv_file: Option<KvFile>,
    resident: HashMap<(u8, u32), Arc<Loaded>>,
    /// Per routed layer: its hot experts (`Policy::hot_experts`), on its device for the run.
    hot_experts: HashMap<u32, Arc<Loaded>>,
    streamed: Mutex<HashMap<Key, Arc<Loaded>>>,
    staged: Mutex<HashMap<Key, Arc<Loaded>>>,
    /// Where every layer lives and runs.
    placements: Vec<LayerPlacement>,
    /// The bytes and format of every weight group in the plan's formats.
    layout: WeightLayout,
    /// Resident KV caches, one region per (layer, micro-batch), laid out as `kv_layout`.
    kv_device: Vec<Mutex<Option<DeviceBuffer>>>,
    kv_host: Vec<Mutex<Option<DeviceBuffer>>>,
    /// KV blocks on their way, by (layer, micro-batch, step): past positions arrived on
    /// the device (`loaded`) or in host memory (`staged`), new positions leaving (`outbox`).
    kv_loaded: Mutex<HashMap<(u32, u32, u32), DeviceBuffer>>,
    kv_staged: Mutex<HashMap<(u32, u32, u32), DeviceBuffer>>,
    kv_outbox: Mutex<HashMap<(u32, u32, u32), DeviceBuffer>>,
    micro_batches: Vec<Mutex<MicroBatch>>,
    tokens: Mutex<Vec<Vec<u32>>>,
    logits: Mutex<Vec<Vec<Vec<f32>>>>,
    requested_read_bytes: Mutex<u64>,
    /// The experts each MoE layer computed with (`RunReport::experts`).
    expert_use: Mutex<Vec<ExpertUse>>,
    /// Each routed (layer, step, micro-batch)'s routes, from its `Op::Route` task until
    /// its MLP takes them (a routed-experts read looks at the visit's).
    routes: Mutex<HashMap<(u32, u32, u32), experts::Routes>>,
    /// Per device: freed streamed-weight buffers kept mapped for its next loads (see
    /// `Recycler`), each within its own device's budget.
    recyclers: HashMap<u16, Arc<Recycler>>,
    /// Buffers the scheduler took from the recycler for weight reads it dispatched,
    /// by the read's key.
    reserved: Mutex<HashMap<Key, Buffer>>,
    /// Embedding rows read for a lookup, by (step, micro-batch) (`embeddings: disk`).
    embedding_rows: Mutex<HashMap<(u32, u32), embed_rows::EmbeddingRows>>,
    /// Speculative decoding: the draft's memory and the run's rounds.
    draft: Option<DraftState>,
    /// The last round that must run (speculation: once every micro-batch has its
    /// tokens); tasks of later rounds are skipped. `u32::MAX` until known.
    last_round: AtomicU32,
    /// A run over several machines: this process's connections and view of the graph.
    net: Option<NetView<'a>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `graph` (lowered from `policy` for `workload`) on the model in `files`.
pub fn run(
    graph: &TaskGraph,
    policy: &Policy,
    workload: &Workload,
    files: &ModelFiles,
    backend: &dyn Backend,
    options: &RunOptions,
) -> Result<RunReport, EngineError> {
    run_on(graph, policy, workload, files, backend, options, None, &mut || Ok(()))
}

/// `run`, as one of the processes of a run over several machines when `network` is
/// given: this process's tasks only, `ready` called once its resident weights are
/// read (the handshake: the clock starts when it returns). The head's report covers
/// every process; a worker's, its own tasks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_on(
    graph: &TaskGraph,
    policy: &Policy,
    workload: &Workload,
    files: &ModelFiles,
    backend: &dyn Backend,
    options: &RunOptions,
    network: Option<&Network>,
    ready: &mut dyn FnMut() -> Result<(), EngineError>,
) -> Result<RunReport, EngineError> {
    check_plan(graph, policy, workload, files, options)?;
    let view = network.map(|n| LocalView::new(graph, &n.ownership)).transpose()?;
    let net = network.zip(view.as_ref()).map(|(network, view)| NetView { network, view });
    let local_graph = view.as_ref().map_or(graph, |v| &v.graph);
    memory::tame_allocator();
    let baseline_rss_bytes = memory::rss_bytes().unwrap_or(0);
    let setup_start = Instant::now();
    let engine = Engine::new(local_graph, policy, workload, files, backend, options, net)?;
    let setup_ns = setup_start.elapsed().as_nanos() as u64;
    ready()?;
    let read_before = memory::storage_read_bytes().unwrap_or(0);
    let executed = engine.execute_graph(baseline_rss_bytes, setup_ns)?;
    let mut spans = executed.spans;
    if network.is_some() {
        remote::merge_stage_reports(graph, &mut spans, &executed.reports, &executed.arrivals);
    }
    let storage_read_bytes = memory::storage_read_bytes().unwrap_or(0).saturating_sub(read_before);
    let graph_run = engine.graph_run()?;
    if let Some(run) = &graph_run {
        spans.truncate(run.tasks.len());
    }
    let trace = Trace { source: TraceSource::Measured, spans };
    let metrics = Metrics::compute(graph_run.as_ref().unwrap_or(graph), &trace);
    let speculation = graph_run.as_ref().and_then(|g| engine.speculation_report(g.rounds.len() as u32 - 1));
    let direct_io = engine.disk_files.values().all(|f| f.direct);
    let requested_read_bytes = *lock(&engine.requested_read_bytes);
    let tokens = std::mem::take(&mut *lock(&engine.tokens));
    let gathers_tokens = network.is_none_or(Network::is_head);
    if let Some(check) = tokens.iter().find(|t| gathers_tokens && t.len() as u64 != workload.gen_len) {
        return Err(EngineError::Internal(format!(
            "the run produced {} tokens for a sequence, not {}",
            check.len(),
            workload.gen_len
        )));
    }
    let logits = std::mem::take(&mut *lock(&engine.logits));
    let mut experts = std::mem::take(&mut *lock(&engine.expert_use));
    experts.sort_by_key(|u| (u.step, u.layer, u.micro_batch));
    let (recycled_bytes, newly_mapped_bytes) =
        engine.recyclers.values().map(|r| r.counters()).fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    drop(engine);
    Ok(RunReport {
        trace,
        metrics,
        tokens,
        logits,
        peak_rss_bytes: memory::peak_rss_bytes().unwrap_or(0),
        baseline_rss_bytes,
        speculation,
        graph_run,
        storage_read_bytes,
        requested_read_bytes,
        direct_io,
        setup_ns,
        recycled_bytes,
        newly_mapped_bytes,
        stage_processes: executed.reports,
        experts,
    })
}

/// Refuses, before anything starts, a plan that cannot run on these files.
fn check_plan(
    graph: &TaskGraph,
    policy: &Policy,
    workload: &Workload,
    files: &ModelFiles,
    options: &RunOptions,
) -> Result<(), EngineError> {
    let spec = &files.spec;
    policy.validate(spec, workload, false)?;
    check_formats(policy, files)?;
    if !matches!(policy.kv_dtype, Dtype::F32 | Dtype::F16 | Dtype::Bf16) {
        return Err(EngineError::Unsupported(format!(
            "KV cache dtype {} is not supported by the engine",
            policy.kv_dtype.name()
        )));
    }
    if options.prompts.len() as u64 != workload.batch_size
        || options.prompts.iter().any(|p| p.len() as u64 != workload.prompt_len)
    {
        return Err(EngineError::Mismatch(format!(
            "expected {} prompts of {} tokens",
            workload.batch_size, workload.prompt_len
        )));
    }
    if let Some(bad) = options.prompts.iter().flatten().find(|&&t| t as u64 >= spec.vocab_size) {
        return Err(EngineError::Mismatch(format!("token id {bad} is outside the vocabulary of {}", spec.vocab_size)));
    }
    if workload.max_context() > spec.max_position_embeddings {
        return Err(EngineError::Mismatch(format!(
            "prompt + generation = {} tokens exceeds the model's {} positions",
            workload.max_context(),
            spec.max_position_embeddings
        )));
    }
    check_rounds(graph, policy)?;
    // The budget: nothing starts unless every pool can hold its resident set and each task.
    graph.check_fits()?;
    Ok(())
}

/// The plan's weight formats must be what the files hold, tensor by tensor: the
/// engine reads the bytes as stored (it does not convert or quantize), and lowering
/// priced and cut transfers by the plan's formats.
fn check_formats(policy: &Policy, files: &ModelFiles) -> Result<(), EngineError> {
    let spec = &files.spec;
    let planned = WeightLayout::of(spec, &policy.weight_format);
    let mut groups = vec![(WeightGroup::Embeddings, 0), (WeightGroup::Head, 0)];
    for layer in 0..spec.num_layers {
        groups.extend(WeightGroup::PER_LAYER.map(|g| (g, layer)));
    }
    for (group, layer) in groups {
        let stored = files.group(group, layer);
        let tensors = spec.group_tensors(group, layer);
        let formats = planned.group(group, layer).tensors.iter();
        for ((tensor, held), &plan) in tensors.iter().zip(&stored.tensors).zip(formats) {
            if plan != held.format {
                return Err(EngineError::Mismatch(format!(
                    "the plan stores '{}' as {} but {} holds it as {}; plan the weights as the files store them \
                     (`ferry tune --weight-format {}`)",
                    tensor.name,
                    plan.name(),
                    files.dir.display(),
                    held.format.name(),
                    files.formats.describe()
                )));
            }
        }
    }
    Ok(())
}

/// The engine runs complete graphs (every round). Plain decoding: each round's
/// positions follow the previous round's, and each yields one token per sequence from
/// its last row. Speculative decoding: every round a run may need (`Steps::Bound`),
/// each verifying the plan's draft length; a round's positions and tokens are known
/// only when it runs.
fn check_rounds(graph: &TaskGraph, policy: &Policy) -> Result<(), EngineError> {
    if !graph.is_complete() {
        return Err(EngineError::Internal(
            "the engine runs complete graphs (every round of the generation), not sampled ones".into(),
        ));
    }
    if let Some(speculation) = &policy.speculation {
        let k = speculation.draft_len;
        if let Some(round) = graph.rounds[1..].iter().find(|r| r.drafted != k || r.rows != k + 1 || r.tokens != 1) {
            return Err(EngineError::Internal(format!(
                "round {} verifies {} draft tokens over {} positions yielding {}; a speculative run needs every \
                 round the run may need (`Steps::Bound`), each verifying the plan's {k}",
                round.step, round.drafted, round.rows, round.tokens
            )));
        }
        return Ok(());
    }
    let mut next_position = 0;
    for round in &graph.rounds {
        if round.past != next_position || round.tokens != 1 || round.drafted != 0 {
            return Err(EngineError::Unsupported(format!(
                "round {} processes positions {}..{} and yields {} token(s); the engine decodes one token per \
                 round after the positions before it (rounds yielding several tokens need the plan's \
                 speculation section)",
                round.step,
                round.past,
                round.context(),
                round.tokens
            )));
        }
        next_position = round.context();
    }
    Ok(())
}

impl<'a> Engine<'a> {
    pub(super) fn new(
        graph: &'a TaskGraph,
        policy: &'a Policy,
        workload: &'a Workload,
        files: &'a ModelFiles,
        backend: &'a dyn Backend,
        options: &'a RunOptions,
        net: Option<NetView<'a>>,
    ) -> Result<Engine<'a>, EngineError> {
        let spec = &files.spec;
        let layers = spec.num_layers as usize;
        let micro_batches = policy.num_micro_batches as usize;
        let mut disk_files = HashMap::new();
        for group in [WeightGroup::Embeddings, WeightGroup::Head] {
            for t in files.group(group, 0).tensors {
                disk_files
                    .entry(t.file.clone())
                    .or_insert(Arc::new(DiskFile::open(&t.file, options.allow_buffered_io)?));
            }
        }
        for layer in 0..spec.num_layers {
            for group in WeightGroup::PER_LAYER {
                for t in files.group(group, layer).tensors {
                    if !disk_files.contains_key(&t.file) {
                        disk_files
                            .insert(t.file.clone(), Arc::new(DiskFile::open(&t.file, options.allow_buffered_io)?));
                    }
                }
            }
        }
        // A separate draft's files are read like the target's (before the clock starts).
        for file in options.draft_files.iter().flat_map(ModelFiles::paths) {
            if let std::collections::hash_map::Entry::Vacant(slot) = disk_files.entry(file) {
                let opened = DiskFile::open(slot.key(), options.allow_buffered_io)?;
                slot.insert(Arc::new(opened));
            }
        }
        let kv_file =
            if policy.kv_cache.disk > 0 { Some(KvFile::create(spec, policy, workload, options)?) } else { None };
        let mut engine = Engine {
            graph,
            policy,
            workload,
            files,
            spec,
            backend,
            options,
            reader: ReadPool::new(policy.io_queue_depth as usize),
            disk_files,
            kv_file,
            resident: HashMap::new(),
            hot_experts: HashMap::new(),
            streamed: Mutex::new(HashMap::new()),
            staged: Mutex::new(HashMap::new()),
            placements: policy.layer_placements(spec.num_layers),
            layout: WeightLayout::of(spec, &policy.weight_format),
            kv_device: (0..layers * micro_batches).map(|_| Mutex::new(None)).collect(),
            kv_host: (0..layers * micro_batches).map(|_| Mutex::new(None)).collect(),
            kv_loaded: Mutex::new(HashMap::new()),
            kv_staged: Mutex::new(HashMap::new()),
            kv_outbox: Mutex::new(HashMap::new()),
            micro_batches: (0..micro_batches).map(|_| Mutex::new(MicroBatch::default())).collect(),
            tokens: Mutex::new(vec![Vec::new(); workload.batch_size as usize]),
            logits: Mutex::new(Vec::new()),
            requested_read_bytes: Mutex::new(0),
            expert_use: Mutex::new(Vec::new()),
            routes: Mutex::new(HashMap::new()),
            recyclers: policy.stage_list().iter().map(|s| (s.device, Arc::new(Recycler::new()))).collect(),
            reserved: Mutex::new(HashMap::new()),
            embedding_rows: Mutex::new(HashMap::new()),
            draft: None,
            last_round: AtomicU32::new(u32::MAX),
            net,
        };
        engine.resident = engine.read_resident()?;
        engine.hot_experts = engine.read_hot_experts()?;
        if let Some(speculation) = &policy.speculation {
            engine.draft = Some(engine.draft_state(speculation)?);
        }
        *lock(&engine.requested_read_bytes) = 0;
        // Resident KV caches (mapped zero pages: they take memory as they fill).
        let kv_bytes = engine.kv_region_bytes() as usize;
        for layer in 0..spec.num_layers {
            if !engine.is_local(engine.layer_device(layer as u32)) {
                continue;
            }
            let tier = engine.placements[layer as usize].kv;
            for j in 0..micro_batches {
                let slot = layer as usize * micro_batches + j;
                let (target, place) = match tier {
                    Tier::Device => (&engine.kv_device[slot], Place::Device(engine.placements[layer as usize].device)),
                    Tier::Host => (&engine.kv_host[slot], Place::HOST),
                    Tier::Disk => continue,
                };
                *lock(target) = Some(backend.allocate(place, kv_bytes)?);
            }
        }
        Ok(engine)
    }

    /// The graph as it ran, when a speculative run stopped early: the rounds up to the
    /// last that ran, each yielding what the last sequence to finish gained in it.
    fn graph_run(&self) -> Result<Option<TaskGraph>, EngineError> {
        let Some(draft) = &self.draft else { return Ok(None) };
        let finished = lock(&draft.finished_at).clone();
        let Some(last) = finished.iter().map(|f| f.unwrap_or(u32::MAX)).max() else { return Ok(None) };
        if last == u32::MAX {
            return Err(EngineError::Internal("a speculative run ended before every sequence had its tokens".into()));
        }
        // The slowest sequence gained something in every round up to the last.
        let by_sequence = lock(&draft.yielded_by_round);
        let yielded = by_sequence.iter().max_by_key(|gains| gains.len()).cloned().unwrap_or_default();
        Ok(Some(self.graph.truncated(last, &yielded)?))
    }

    /// Marks rounds after `step` unneeded once every micro-batch has its tokens.
    pub(super) fn note_round_done(&self, step: u32) {
        if self.finished_after(step) {
            self.last_round.fetch_min(step, Ordering::SeqCst);
        }
    }

    /// Whether a task belongs to a round after the last one the run needs.
    pub(super) fn skipped(&self, task: &Task) -> bool {
        task.step > self.last_round.load(Ordering::SeqCst)
    }

    pub(super) fn weight_tier(&self, group: WeightGroup, layer: u64) -> Tier {
        match group {
            WeightGroup::Embeddings => self.policy.embeddings,
            WeightGroup::Head => self.policy.head,
            layer_group => self.placements[layer as usize].tier(layer_group),
        }
    }

    /// The device a layer's stage runs on.
    pub(super) fn layer_device(&self, layer: u32) -> Place {
        let device = self.placements.get(layer as usize).map_or(self.policy.first_device(), |p| p.device);
        Place::Device(device)
    }

    /// Where a group the plan keeps resident lives: its tier's place (embeddings on the
    /// first stage's device, the head on the last's, a layer's groups on its stage's).
    fn resident_place(&self, group: WeightGroup, layer: u32) -> Place {
        let tier = self.weight_tier(group, if layer == NO_LAYER { 0 } else { layer as u64 });
        match (tier, group) {
            (Tier::Device, WeightGroup::Embeddings) => Place::Device(self.policy.first_device()),
            (Tier::Device, WeightGroup::Head) => Place::Device(self.policy.last_device()),
            (Tier::Device, _) => self.layer_device(layer),
            _ => Place::HOST,
        }
    }

    /// The recycler of the device a layer's stage runs on.
    pub(super) fn recycler(&self, layer: u32) -> &Arc<Recycler> {
        let device = self.placements.get(layer as usize).map_or(self.policy.first_device(), |p| p.device);
        &self.recyclers[&device]
    }

    pub(super) fn layer_major(&self) -> bool {
        matches!(self.policy.schedule, Schedule::ZigzagBlock | Schedule::Pipelined)
    }

    pub(super) fn first_j(&self, j: u32) -> u32 {
        if self.layer_major() {
            0
        } else {
            j
        }
    }

    pub(super) fn kv_row_bytes(&self) -> usize {
        self.spec.kv_dim() as usize * kernels::element_bytes(self.policy.kv_dtype)
    }

    /// Bytes of one (layer, micro-batch) KV cache: K and V for every sequence and position.
    pub(super) fn kv_region_bytes(&self) -> u64 {
        2 * self.policy.micro_batch_size * self.policy.kv_positions(self.workload) * self.kv_row_bytes() as u64
    }

    pub(super) fn key(&self, task: &Task, group: WeightGroup) -> Key {
        (group_code(group), task.layer, task.step, task.micro_batch, task.piece.into())
    }

    /// Where a disk read's bytes go follows from the pool it acquires: device memory
    /// (unified memory: ready for compute) or host staging (a copy follows).
    pub(super) fn lands_on_host(task: &Task) -> bool {
        task.acquire.iter().any(|m| !m.pool.is_device())
    }

    pub(super) fn kv_slot(&self, layer: u32, j: u32) -> usize {
        layer as usize * self.policy.num_micro_batches as usize + j as usize
    }

    /// Earlier positions per sequence a KV load of round `step` carries: the round's
    /// (with speculation, the most the round may need; it reads what it does).
    pub(super) fn loaded_past(&self, step: u32) -> usize {
        self.graph.rounds[step as usize].past as usize
    }

    pub(super) fn sequences(&self, j: u32) -> std::ops::Range<usize> {
        let mb = self.policy.micro_batch_size as usize;
        j as usize * mb..(j as usize + 1) * mb
    }

    /// Each row's position: sequence i processes `at.new` after `at.pasts[i]`.
    pub(super) fn positions(&self, at: &Positions) -> Vec<usize> {
        at.pasts.iter().flat_map(|&past| (0..at.new).map(move |t| past + t)).collect()
    }
}
