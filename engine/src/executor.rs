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

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Instant;

use ferry_core::dispatch::Dispatcher;
use ferry_core::graph::{Op, Payload, Place, Task, TaskGraph, TaskKind, NO_LAYER, WHOLE_GROUP};
use ferry_core::model::{Dtype, ModelSpec, WeightGroup};
use ferry_core::plan::{LayerPlacement, Policy, Schedule, Tier, Workload};
use ferry_core::schedule::weight_pieces;
use ferry_core::trace::{Metrics, Span, Trace, TraceSource};

use crate::backend::Backend;
use crate::io::{DiskFile, ReadPool};
use crate::kernels::{self, Matrix};
use crate::memory::{self, Buffer, Recycler};
use crate::weights::ModelFiles;
use crate::EngineError;

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
    /// Bytes the kernel read from storage for this process during the run (page-cache
    /// hits do not count), against the bytes disk tasks asked for.
    pub storage_read_bytes: u64,
    pub requested_read_bytes: u64,
    pub direct_io: bool,
    /// Reading the resident weights before the run, ns (not part of the metrics).
    pub setup_ns: u64,
    /// Streamed weights that landed in recycled buffers, and in newly mapped ones (whose
    /// pages the kernel had to fault in and zero), bytes.
    pub recycled_bytes: u64,
    pub newly_mapped_bytes: u64,
}

type Key = (u8, u32, u32, u32, u32); // (group, layer, step, first micro-batch, piece)

#[derive(Clone)]
struct View {
    buffer: usize,
    offset: usize,
    tensor: u32,
    row_start: usize,
    rows: usize,
    cols: usize,
}

/// Weight bytes in memory: buffers and where each tensor (or row block) is in them.
struct Loaded {
    buffers: Vec<Buffer>,
    views: Vec<View>,
    dtype: Dtype,
    /// Streamed weights go back to the recycler when freed (resident ones are unmapped).
    recycler: Option<Arc<Recycler>>,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Some(recycler) = &self.recycler {
            for buffer in self.buffers.drain(..) {
                recycler.give(buffer);
            }
        }
    }
}

impl Loaded {
    fn bytes(&self) -> usize {
        self.buffers.iter().map(Buffer::len).sum()
    }
}

/// One micro-batch's activations at one place: the hidden state and the attention
/// intermediates (q/k/v after the projections, the attention output).
#[derive(Default)]
struct Activations {
    hidden: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
}

/// Per micro-batch state: its activations at every place that has held them. Only
/// the graph's copy tasks move them between places.
#[derive(Default)]
struct MicroBatch {
    places: HashMap<Place, Activations>,
}

/// The part of a micro-batch's activations a copy after `after` moves.
fn activation_part(activations: &mut Activations, after: Option<Op>) -> &mut Vec<f32> {
    match after {
        Some(Op::AttnQkv) => &mut activations.qkv,
        Some(Op::AttnCore) => &mut activations.attn,
        _ => &mut activations.hidden,
    }
}

impl MicroBatch {
    fn at(&mut self, place: Place) -> &mut Activations {
        self.places.entry(place).or_default()
    }
}

fn group_code(group: WeightGroup) -> u8 {
    group as u8
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
    streamed: Mutex<HashMap<Key, Arc<Loaded>>>,
    staged: Mutex<HashMap<Key, Arc<Loaded>>>,
    /// Where every layer lives and runs.
    placements: Vec<LayerPlacement>,
    kv_device: Vec<Mutex<Option<Buffer>>>,
    kv_host: Vec<Mutex<Option<Buffer>>>,
    kv_loaded: Mutex<HashMap<(u32, u32, u32), Vec<u8>>>,
    kv_staged: Mutex<HashMap<(u32, u32, u32), Vec<u8>>>,
    kv_outbox: Mutex<HashMap<(u32, u32, u32), Vec<u8>>>,
    micro_batches: Vec<Mutex<MicroBatch>>,
    tokens: Mutex<Vec<Vec<u32>>>,
    logits: Mutex<Vec<Vec<Vec<f32>>>>,
    requested_read_bytes: Mutex<u64>,
    /// Per device: freed streamed-weight buffers kept mapped for its next loads (see
    /// `Recycler`), each within its own device's budget.
    recyclers: HashMap<u16, Arc<Recycler>>,
    /// Buffers the scheduler took from the recycler for weight reads it dispatched,
    /// by the read's key.
    reserved: Mutex<HashMap<Key, Buffer>>,
}

/// The disk-resident KV cache: one region per (layer, micro-batch), K then V, each
/// [sequence][position][kv_dim]. Read with direct I/O, written through the page cache.
struct KvFile {
    path: PathBuf,
    reader: Arc<DiskFile>,
    writer: File,
    region_bytes: u64,
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
    check_plan(graph, policy, workload, files, options)?;
    memory::tame_allocator();
    let baseline_rss_bytes = memory::rss_bytes().unwrap_or(0);
    let setup_start = Instant::now();
    let engine = Engine::new(graph, policy, workload, files, backend, options)?;
    let setup_ns = setup_start.elapsed().as_nanos() as u64;
    let read_before = memory::storage_read_bytes().unwrap_or(0);
    let spans = engine.execute_graph()?;
    let storage_read_bytes = memory::storage_read_bytes().unwrap_or(0).saturating_sub(read_before);
    let trace = Trace { source: TraceSource::Measured, spans };
    let metrics = Metrics::compute(graph, &trace);
    let direct_io = engine.disk_files.values().all(|f| f.direct);
    let requested_read_bytes = *lock(&engine.requested_read_bytes);
    let tokens = std::mem::take(&mut *lock(&engine.tokens));
    let logits = std::mem::take(&mut *lock(&engine.logits));
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
        storage_read_bytes,
        requested_read_bytes,
        direct_io,
        setup_ns,
        recycled_bytes,
        newly_mapped_bytes,
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
    if policy.weight_dtype != files.dtype {
        return Err(EngineError::Mismatch(format!(
            "the plan reads weights as {} but {} stores {}",
            policy.weight_dtype.name(),
            files.dir.display(),
            files.dtype.name()
        )));
    }
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
    if graph.steps.len() as u64 != workload.gen_len {
        return Err(EngineError::Internal("the engine runs full graphs (every decode step)".into()));
    }
    // The budget: nothing starts unless every pool can hold its resident set and each task.
    graph.check_fits()?;
    Ok(())
}

impl<'a> Engine<'a> {
    fn new(
        graph: &'a TaskGraph,
        policy: &'a Policy,
        workload: &'a Workload,
        files: &'a ModelFiles,
        backend: &'a dyn Backend,
        options: &'a RunOptions,
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
            for group in [WeightGroup::Attention, WeightGroup::Mlp] {
                for t in files.group(group, layer).tensors {
                    if !disk_files.contains_key(&t.file) {
                        disk_files
                            .insert(t.file.clone(), Arc::new(DiskFile::open(&t.file, options.allow_buffered_io)?));
                    }
                }
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
            streamed: Mutex::new(HashMap::new()),
            staged: Mutex::new(HashMap::new()),
            placements: policy.layer_placements(spec.num_layers),
            kv_device: (0..layers * micro_batches).map(|_| Mutex::new(None)).collect(),
            kv_host: (0..layers * micro_batches).map(|_| Mutex::new(None)).collect(),
            kv_loaded: Mutex::new(HashMap::new()),
            kv_staged: Mutex::new(HashMap::new()),
            kv_outbox: Mutex::new(HashMap::new()),
            micro_batches: (0..micro_batches).map(|_| Mutex::new(MicroBatch::default())).collect(),
            tokens: Mutex::new(vec![Vec::new(); workload.batch_size as usize]),
            logits: Mutex::new(Vec::new()),
            requested_read_bytes: Mutex::new(0),
            recyclers: policy.stage_list().iter().map(|s| (s.device, Arc::new(Recycler::new()))).collect(),
            reserved: Mutex::new(HashMap::new()),
        };
        // Resident weights: embeddings, head, and every group the plan keeps on the device
        // or the host (read once, before the clock starts).
        let mut resident = HashMap::new();
        resident.insert(
            (group_code(WeightGroup::Embeddings), NO_LAYER),
            Arc::new(engine.read_group(WeightGroup::Embeddings, 0, WHOLE_GROUP, None)?),
        );
        resident.insert(
            (group_code(WeightGroup::Head), NO_LAYER),
            Arc::new(engine.read_group(WeightGroup::Head, 0, WHOLE_GROUP, None)?),
        );
        for layer in 0..spec.num_layers {
            for group in [WeightGroup::Attention, WeightGroup::Mlp] {
                if engine.weight_tier(group, layer) != Tier::Disk {
                    resident.insert(
                        (group_code(group), layer as u32),
                        Arc::new(engine.read_group(group, layer, WHOLE_GROUP, None)?),
                    );
                }
            }
        }
        engine.resident = resident;
        *lock(&engine.requested_read_bytes) = 0;
        // Resident KV caches (mapped zero pages: they take memory as they fill).
        let kv_bytes = engine.kv_region_bytes() as usize;
        for layer in 0..spec.num_layers {
            let tier = engine.placements[layer as usize].kv;
            for j in 0..micro_batches {
                let slot = layer as usize * micro_batches + j;
                let target = match tier {
                    Tier::Device => &engine.kv_device[slot],
                    Tier::Host => &engine.kv_host[slot],
                    Tier::Disk => continue,
                };
                *lock(target) = Some(Buffer::new(kv_bytes).map_err(|e| EngineError::io(&files.dir, e))?);
            }
        }
        Ok(engine)
    }

    fn weight_tier(&self, group: WeightGroup, layer: u64) -> Tier {
        match group {
            WeightGroup::Attention => self.placements[layer as usize].attention,
            WeightGroup::Mlp => self.placements[layer as usize].mlp,
            WeightGroup::Embeddings => self.policy.embeddings,
            WeightGroup::Head => self.policy.head,
        }
    }

    /// The recycler of the device a layer's stage runs on.
    fn recycler(&self, layer: u32) -> &Arc<Recycler> {
        let device = self.placements.get(layer as usize).map_or(self.policy.first_device(), |p| p.device);
        &self.recyclers[&device]
    }

    fn layer_major(&self) -> bool {
        matches!(self.policy.schedule, Schedule::ZigzagBlock | Schedule::Pipelined)
    }

    fn first_j(&self, j: u32) -> u32 {
        if self.layer_major() {
            0
        } else {
            j
        }
    }

    fn kv_row_bytes(&self) -> usize {
        self.spec.kv_dim() as usize * kernels::element_bytes(self.policy.kv_dtype)
    }

    /// Bytes of one (layer, micro-batch) KV cache: K and V for every sequence and position.
    fn kv_region_bytes(&self) -> u64 {
        2 * self.policy.micro_batch_size * self.workload.max_context() * self.kv_row_bytes() as u64
    }

    /// Reads one weight group (or one pipelined piece of it) from disk.
    /// Reads a weight group (or one piece of it). With `recycle` (the read's key) the
    /// bytes land in a recycled buffer (the one the scheduler reserved for this read, or
    /// any that fits) and return to the recycler when freed.
    fn read_group(
        &self,
        group: WeightGroup,
        layer: u64,
        piece: u32,
        recycle: Option<Key>,
    ) -> Result<Loaded, EngineError> {
        let location = self.files.group(group, layer);
        let tensors = self.spec.group_tensors(group, layer);
        let dtype = location.dtype;
        // (tensor index, row_start, rows, cols, file, start, end)
        let mut parts = Vec::new();
        if piece == WHOLE_GROUP {
            for (i, (t, loc)) in tensors.iter().zip(&location.tensors).enumerate() {
                parts.push((i as u32, 0, t.rows as usize, t.cols as usize, loc.file.clone(), loc.start, loc.end));
            }
        } else {
            let p = weight_pieces(self.spec, group, layer, dtype, self.policy.chunk_bytes)
                .get(piece as usize)
                .copied()
                .ok_or_else(|| EngineError::Internal(format!("piece {piece} out of range")))?;
            let t = &tensors[p.tensor as usize];
            let loc = &location.tensors[p.tensor as usize];
            let row_bytes = dtype.bytes_of(t.cols);
            let start = loc.start + p.row_start * row_bytes;
            parts.push((
                p.tensor,
                p.row_start as usize,
                p.rows as usize,
                t.cols as usize,
                loc.file.clone(),
                start,
                start + p.bytes,
            ));
        }
        // Merge byte ranges that touch (a group's tensors are usually adjacent in the file).
        let mut loaded = Loaded {
            buffers: Vec::new(),
            views: Vec::new(),
            dtype,
            recycler: recycle.map(|_| Arc::clone(self.recycler(layer as u32))),
        };
        let mut reserved = recycle.and_then(|key| lock(&self.reserved).remove(&key));
        let mut index = 0;
        while index < parts.len() {
            let file = parts[index].4.clone();
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            let mut members: Vec<(usize, usize)> = Vec::new(); // (part index, range index)
            let mut end = index;
            while end < parts.len() && parts[end].4 == file {
                let (s, e) = (parts[end].5, parts[end].6);
                match ranges.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => ranges.push((s, e)),
                }
                members.push((end, ranges.len() - 1));
                end += 1;
            }
            let disk = self
                .disk_files
                .get(&file)
                .ok_or_else(|| EngineError::Internal(format!("{} not open", file.display())))?;
            let allocate = |len: usize| match (recycle, reserved.take()) {
                (None, _) => Buffer::new(len),
                (Some(_), Some(buffer)) if buffer.mapped_len() >= len => Ok(buffer.with_len(len)),
                (Some(_), other) => {
                    // A reserved buffer too small for the merged ranges: unmap it first, so
                    // the new one does not come on top of it.
                    drop(other);
                    self.recycler(layer as u32).take(len)
                }
            };
            let (buffer, starts) = self.reader.read_ranges_into(disk, &ranges, self.policy.chunk_bytes, allocate)?;
            *lock(&self.requested_read_bytes) += ranges.iter().map(|(s, e)| e - s).sum::<u64>();
            let buffer_index = loaded.buffers.len();
            for (part, range) in members {
                let (tensor, row_start, rows, cols, _, start, _) = &parts[part];
                let offset = starts[range] + (start - ranges[range].0) as usize;
                loaded.views.push(View {
                    buffer: buffer_index,
                    offset,
                    tensor: *tensor,
                    row_start: *row_start,
                    rows: *rows,
                    cols: *cols,
                });
            }
            loaded.buffers.push(buffer);
            index = end;
        }
        Ok(loaded)
    }

    /// The loaded weights a compute of (group, layer) at (step, micro-batch) uses.
    fn weights(&self, group: WeightGroup, layer: u32, step: u32, j: u32) -> Result<Vec<Arc<Loaded>>, EngineError> {
        if let Some(resident) = self.resident.get(&(group_code(group), layer)) {
            if self.weight_tier(group, layer as u64) == Tier::Device || self.policy.layer_on_host(layer as u64) {
                return Ok(vec![Arc::clone(resident)]);
            }
        }
        let first = self.first_j(j);
        let streamed = lock(&self.streamed);
        let mut pieces: Vec<(u32, Arc<Loaded>)> = streamed
            .iter()
            .filter(|(k, _)| k.0 == group_code(group) && k.1 == layer && k.2 == step && k.3 == first)
            .map(|(k, v)| (k.4, Arc::clone(v)))
            .collect();
        if pieces.is_empty() {
            return Err(EngineError::Internal(format!(
                "weights of layer {layer} {group:?} step {step} were not loaded"
            )));
        }
        pieces.sort_by_key(|(piece, _)| *piece);
        Ok(pieces.into_iter().map(|(_, l)| l).collect())
    }

    fn resident_group(&self, group: WeightGroup) -> Arc<Loaded> {
        Arc::clone(&self.resident[&(group_code(group), NO_LAYER)])
    }

    /// Row blocks of tensor `tensor` across the loaded pieces.
    fn matrix<'l>(loaded: &'l [Arc<Loaded>], tensor: u32) -> Vec<(usize, Matrix<'l>)> {
        let mut blocks = Vec::new();
        for l in loaded {
            for v in l.views.iter().filter(|v| v.tensor == tensor) {
                let bytes = l.dtype.bytes_of((v.rows * v.cols) as u64) as usize;
                let data = &l.buffers[v.buffer].as_slice()[v.offset..v.offset + bytes];
                blocks.push((v.row_start, Matrix { bytes: data, dtype: l.dtype, rows: v.rows, cols: v.cols }));
            }
        }
        blocks
    }

    fn vector(loaded: &[Arc<Loaded>], tensor: u32) -> Vec<f32> {
        let blocks = Engine::matrix(loaded, tensor);
        let cols = blocks.first().map_or(0, |b| b.1.cols);
        let mut out = vec![0.0; cols];
        if let Some((_, m)) = blocks.first() {
            kernels::to_f32(m.dtype, m.bytes, &mut out);
        }
        out
    }

    /// out (m × n) = x · Wᵀ for tensor `tensor` split in row blocks.
    fn project(loaded: &[Arc<Loaded>], tensor: u32, x: &[f32], m: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        Engine::project_into(loaded, tensor, x, m, n, &mut out);
        out
    }

    fn project_into(loaded: &[Arc<Loaded>], tensor: u32, x: &[f32], m: usize, n: usize, out: &mut [f32]) {
        for (row_start, matrix) in Engine::matrix(loaded, tensor) {
            kernels::linear(x, m, matrix, out, n, row_start);
        }
    }

    // ---- scheduling -------------------------------------------------------------

    fn execute_graph(&self) -> Result<Vec<Span>, EngineError> {
        let graph = self.graph;
        let count = graph.tasks.len();
        let mut dispatcher = Dispatcher::new(graph);
        let mut spans = vec![Span { task: 0, lane: 0, start_ns: 0, end_ns: 0 }; count];
        let mut failure: Option<EngineError> = None;
        let clock = Instant::now();

        std::thread::scope(|scope| {
            let (done_tx, done_rx) = mpsc::channel::<(u32, u32, u64, u64, Result<(), EngineError>)>();
            // One worker thread per lane of every resource, indexed like the graph's list.
            let mut senders: Vec<Vec<mpsc::Sender<u32>>> = Vec::new();
            for spec in &graph.resources {
                let mut lanes = Vec::new();
                for lane in 0..spec.lanes.max(1) {
                    let (tx, rx) = mpsc::channel::<u32>();
                    lanes.push(tx);
                    let done = done_tx.clone();
                    std::thread::Builder::new()
                        .name(format!("ferry-{}-{lane}", graph.resource_label(spec.resource)))
                        .spawn_scoped(scope, move || {
                            while let Ok(id) = rx.recv() {
                                let start = clock.elapsed().as_nanos() as u64;
                                let result = self.execute(id);
                                let end = clock.elapsed().as_nanos() as u64;
                                if done.send((id, lane, start, end, result)).is_err() {
                                    return;
                                }
                            }
                        })
                        .expect("spawn a worker");
                }
                senders.push(lanes);
            }
            drop(done_tx);
            // Freed weight buffers may be kept mapped only while their device's pool has
            // room for them beside everything the graph accounts.
            let budgets = DeviceBudgets::new(graph, &self.recyclers);
            let resource_of: Vec<usize> = (0..count as u32).map(|id| dispatcher.resource_of(id)).collect();
            budgets.refresh(&dispatcher);
            while !dispatcher.is_finished() {
                if failure.is_none() {
                    let mut room = budgets.room(&dispatcher);
                    dispatcher.dispatch(|id, lane| {
                        let task = &graph.tasks[id as usize];
                        // A weight read takes a kept buffer before the limit shrinks by its
                        // bytes; the rest are unmapped now if they no longer fit.
                        if let (TaskKind::DiskRead, Payload::Weights { group }) = (task.kind, task.payload) {
                            if !Engine::lands_on_host(task) {
                                if let Some(buffer) = self.recycler(task.layer).take_kept(task.bytes as usize) {
                                    lock(&self.reserved).insert(self.key(task, group), buffer);
                                }
                            }
                        }
                        budgets.acquired(task, &mut room);
                        let r = resource_of[id as usize];
                        if senders[r][lane as usize].send(id).is_err() {
                            failure.get_or_insert(EngineError::Internal("a worker stopped".into()));
                        }
                    });
                }
                if dispatcher.running() == 0 {
                    if failure.is_none() {
                        failure = Some(EngineError::Deadlock(dispatcher.stall().message));
                    }
                    break;
                }
                let Ok((id, lane, start, end, result)) = done_rx.recv() else {
                    failure.get_or_insert(EngineError::Internal("workers vanished".into()));
                    break;
                };
                spans[id as usize] = Span { task: id, lane, start_ns: start, end_ns: end };
                dispatcher.complete(id, lane);
                budgets.refresh(&dispatcher);
                if let Err(e) = result {
                    failure.get_or_insert(e);
                }
                let finished = dispatcher.finished();
                if let Some(progress) = &self.options.progress {
                    if finished.is_multiple_of(64) || finished == count {
                        progress(finished, count);
                    }
                }
            }
            // Dropping the senders ends the workers.
            drop(senders);
        });
        match failure {
            Some(e) => Err(e),
            None => Ok(spans),
        }
    }

    // ---- tasks ------------------------------------------------------------------

    fn execute(&self, id: u32) -> Result<(), EngineError> {
        let task = &self.graph.tasks[id as usize];
        let to_device = task.link_ends().is_some_and(|(_, to)| to.is_device());
        match (task.kind, task.payload) {
            (TaskKind::DiskRead, Payload::Weights { group }) => self.load_weights_from_disk(task, group),
            (TaskKind::Copy, Payload::Weights { group }) if to_device => self.copy_weights_to_device(task, group),
            (TaskKind::DiskRead, Payload::KvCache) => self.read_kv(task),
            (TaskKind::Copy, Payload::KvCache) if to_device => self.copy_kv_to_device(task),
            (TaskKind::Copy, Payload::KvCache) => self.store_kv_to_host(task),
            (TaskKind::DiskWrite, Payload::KvCache) => self.write_kv(task),
            (TaskKind::Copy, Payload::Activations) => self.copy_activations(task),
            (TaskKind::Compute, Payload::Compute { op }) => match task.compute_place() {
                Some(place) => self.compute(task, op, place),
                None => Err(EngineError::Internal(format!("compute task {} has no place", task.label()))),
            },
            (kind, payload) => Err(EngineError::Internal(format!("no executor for {kind:?} of {payload:?}"))),
        }
    }

    fn key(&self, task: &Task, group: WeightGroup) -> Key {
        (group_code(group), task.layer, task.step, task.micro_batch, task.piece)
    }

    /// Where a disk read's bytes go follows from the pool it acquires: device memory
    /// (unified memory: ready for compute) or host staging (a copy follows).
    fn lands_on_host(task: &Task) -> bool {
        task.acquire.iter().any(|m| !m.pool.is_device())
    }

    fn load_weights_from_disk(&self, task: &Task, group: WeightGroup) -> Result<(), EngineError> {
        let on_host = Engine::lands_on_host(task);
        let recycle = (!on_host).then(|| self.key(task, group));
        let loaded = Arc::new(self.read_group(group, task.layer as u64, task.piece, recycle)?);
        let target = if on_host { &self.staged } else { &self.streamed };
        lock(target).insert(self.key(task, group), loaded);
        Ok(())
    }

    fn copy_weights_to_device(&self, task: &Task, group: WeightGroup) -> Result<(), EngineError> {
        let key = self.key(task, group);
        let source: Arc<Loaded> = match lock(&self.staged).remove(&key) {
            Some(staged) => staged,
            None => {
                // Host-resident weights: copy the whole group or this piece of it.
                let whole = Arc::clone(self.resident.get(&(group_code(group), task.layer)).ok_or_else(|| {
                    EngineError::Internal(format!("layer {} {group:?} is neither staged nor host-resident", task.layer))
                })?);
                if task.piece == WHOLE_GROUP {
                    whole
                } else {
                    let p = weight_pieces(self.spec, group, task.layer as u64, whole.dtype, self.policy.chunk_bytes)
                        [task.piece as usize];
                    let view = whole.views.iter().find(|v| v.tensor == p.tensor).expect("tensor view");
                    let row_bytes = whole.dtype.bytes_of(view.cols as u64) as usize;
                    let start = view.offset + p.row_start as usize * row_bytes;
                    let recycler = self.recycler(task.layer);
                    let mut buffer =
                        recycler.take(p.bytes as usize).map_err(|e| EngineError::io(&self.files.dir, e))?;
                    self.backend.copy(
                        buffer.as_mut_slice(),
                        &whole.buffers[view.buffer].as_slice()[start..start + p.bytes as usize],
                    );
                    let loaded = Loaded {
                        recycler: Some(Arc::clone(recycler)),
                        buffers: vec![buffer],
                        views: vec![View {
                            buffer: 0,
                            offset: 0,
                            tensor: p.tensor,
                            row_start: p.row_start as usize,
                            rows: p.rows as usize,
                            cols: view.cols,
                        }],
                        dtype: whole.dtype,
                    };
                    lock(&self.streamed).insert(key, Arc::new(loaded));
                    return Ok(());
                }
            }
        };
        // Copy every buffer to new device memory (on the cpu backend: a memcpy).
        let mut buffers = Vec::new();
        let recycler = self.recycler(task.layer);
        for b in &source.buffers {
            let mut copy = recycler.take(b.len()).map_err(|e| EngineError::io(&self.files.dir, e))?;
            self.backend.copy(copy.as_mut_slice(), b.as_slice());
            buffers.push(copy);
        }
        let views = source.views.clone();
        let loaded = Loaded { buffers, views, dtype: source.dtype, recycler: Some(Arc::clone(recycler)) };
        debug_assert!(loaded.bytes() >= source.bytes());
        lock(&self.streamed).insert(key, Arc::new(loaded));
        Ok(())
    }

    fn kv_slot(&self, layer: u32, j: u32) -> usize {
        layer as usize * self.policy.num_micro_batches as usize + j as usize
    }

    fn new_tokens(&self, step: u32) -> usize {
        if step == 0 {
            self.workload.prompt_len as usize
        } else {
            1
        }
    }

    fn past(&self, step: u32) -> usize {
        if step == 0 {
            0
        } else {
            self.workload.prompt_len as usize + step as usize - 1
        }
    }

    /// Copies positions `0..past` of every sequence out of a KV region (K then V).
    fn gather_past(&self, region: &[u8], past: usize) -> Vec<u8> {
        let row = self.kv_row_bytes();
        let mb = self.policy.micro_batch_size as usize;
        let max = self.workload.max_context() as usize;
        let mut out = Vec::with_capacity(2 * mb * past * row);
        for half in 0..2 {
            for seq in 0..mb {
                let start = (half * mb + seq) * max * row;
                out.extend_from_slice(&region[start..start + past * row]);
            }
        }
        out
    }

    /// Writes new KV rows (K then V, [seq][new]) into a region at positions past..past+new.
    fn scatter_new(&self, region: &mut [u8], new_kv: &[u8], past: usize, new: usize) {
        let row = self.kv_row_bytes();
        let mb = self.policy.micro_batch_size as usize;
        let max = self.workload.max_context() as usize;
        for half in 0..2 {
            for seq in 0..mb {
                let dst = ((half * mb + seq) * max + past) * row;
                let src = (half * mb + seq) * new * row;
                region[dst..dst + new * row].copy_from_slice(&new_kv[src..src + new * row]);
            }
        }
    }

    fn read_kv(&self, task: &Task) -> Result<(), EngineError> {
        let kv = self.kv_file.as_ref().ok_or_else(|| EngineError::Internal("no KV file".into()))?;
        let past = self.past(task.step);
        let row = self.kv_row_bytes() as u64;
        let mb = self.policy.micro_batch_size;
        let max = self.workload.max_context();
        let base = kv.region_offset(self.kv_slot(task.layer, task.micro_batch));
        let ranges: Vec<(u64, u64)> = (0..2 * mb)
            .map(|i| {
                let start = base + i * max * row;
                (start, start + past as u64 * row)
            })
            .collect();
        let (buffer, starts) = self.reader.read_ranges(&kv.reader, &ranges, self.policy.chunk_bytes)?;
        *lock(&self.requested_read_bytes) += ranges.iter().map(|(s, e)| e - s).sum::<u64>();
        let mut bytes = Vec::with_capacity((2 * mb * past as u64 * row) as usize);
        for (i, &(s, e)) in ranges.iter().enumerate() {
            bytes.extend_from_slice(&buffer.as_slice()[starts[i]..starts[i] + (e - s) as usize]);
        }
        let key = (task.layer, task.micro_batch, task.step);
        // Staged in host memory (for host attention or a copy), or already in device memory.
        if Engine::lands_on_host(task) {
            lock(&self.kv_staged).insert(key, bytes);
        } else {
            lock(&self.kv_loaded).insert(key, bytes);
        }
        Ok(())
    }

    fn copy_kv_to_device(&self, task: &Task) -> Result<(), EngineError> {
        let key = (task.layer, task.micro_batch, task.step);
        let source = match lock(&self.kv_staged).remove(&key) {
            Some(staged) => staged,
            None => {
                let slot = lock(&self.kv_host[self.kv_slot(task.layer, task.micro_batch)]);
                let region = slot.as_ref().ok_or_else(|| EngineError::Internal("host KV missing".into()))?;
                self.gather_past(region.as_slice(), self.past(task.step))
            }
        };
        let mut device = vec![0u8; source.len()];
        self.backend.copy(&mut device, &source);
        lock(&self.kv_loaded).insert(key, device);
        Ok(())
    }

    fn store_kv_to_host(&self, task: &Task) -> Result<(), EngineError> {
        let key = (task.layer, task.micro_batch, task.step);
        let new_kv =
            lock(&self.kv_outbox).remove(&key).ok_or_else(|| EngineError::Internal("no new KV to store".into()))?;
        let mut host = vec![0u8; new_kv.len()];
        self.backend.copy(&mut host, &new_kv);
        if self.placements[task.layer as usize].kv == Tier::Host {
            let mut slot = lock(&self.kv_host[self.kv_slot(task.layer, task.micro_batch)]);
            let region = slot.as_mut().ok_or_else(|| EngineError::Internal("host KV missing".into()))?;
            self.scatter_new(region.as_mut_slice(), &host, self.past(task.step), self.new_tokens(task.step));
        } else {
            // On its way to disk.
            lock(&self.kv_outbox).insert(key, host);
        }
        Ok(())
    }

    fn write_kv(&self, task: &Task) -> Result<(), EngineError> {
        let kv = self.kv_file.as_ref().ok_or_else(|| EngineError::Internal("no KV file".into()))?;
        let key = (task.layer, task.micro_batch, task.step);
        let new_kv =
            lock(&self.kv_outbox).remove(&key).ok_or_else(|| EngineError::Internal("no new KV to write".into()))?;
        let row = self.kv_row_bytes() as u64;
        let mb = self.policy.micro_batch_size;
        let max = self.workload.max_context();
        let new = self.new_tokens(task.step) as u64;
        let past = self.past(task.step) as u64;
        let base = kv.region_offset(self.kv_slot(task.layer, task.micro_batch));
        for i in 0..2 * mb {
            let offset = base + (i * max + past) * row;
            let src = &new_kv[(i * new * row) as usize..((i + 1) * new * row) as usize];
            kv.writer.write_all_at(src, offset).map_err(|e| EngineError::io(&kv.path, e))?;
        }
        Ok(())
    }

    /// Moves a micro-batch's activations from one place to another over the task's
    /// link. What moves follows from the task before it: q/k/v after AttnQkv, the
    /// attention output after AttnCore, otherwise the hidden state.
    fn copy_activations(&self, task: &Task) -> Result<(), EngineError> {
        let (from, to) =
            task.link_ends().ok_or_else(|| EngineError::Internal(format!("copy {} has no link", task.label())))?;
        let producer = task.deps.first().map(|&d| &self.graph.tasks[d as usize]);
        let after = producer.and_then(|p| match p.payload {
            Payload::Compute { op } => Some(op),
            _ => None,
        });
        let mut state = lock(&self.micro_batches[task.micro_batch as usize]);
        // Taken out while copying, so source and destination are borrowed apart.
        let mut source = state.places.remove(&from).unwrap_or_default();
        let src = activation_part(&mut source, after);
        let dst = activation_part(state.at(to), after);
        dst.resize(src.len(), 0.0);
        self.backend.copy_f32(dst, src);
        state.places.insert(from, source);
        Ok(())
    }

    fn compute(&self, task: &Task, op: Op, side: Place) -> Result<(), EngineError> {
        match op {
            Op::Embed => self.embed(task, side),
            Op::Head => self.head(task, side),
            Op::Attention => {
                self.attn_qkv(task, side)?;
                self.attn_core(task, side)?;
                self.attn_out(task, side)
            }
            Op::AttnQkv => self.attn_qkv(task, side),
            Op::AttnCore => self.attn_core(task, side),
            Op::AttnOut => self.attn_out(task, side),
            Op::Mlp => self.mlp(task, side),
        }
    }

    fn sequences(&self, j: u32) -> std::ops::Range<usize> {
        let mb = self.policy.micro_batch_size as usize;
        j as usize * mb..(j as usize + 1) * mb
    }

    fn embed(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let h = self.spec.hidden_size as usize;
        let new = self.new_tokens(task.step);
        let table = self.resident_group(WeightGroup::Embeddings);
        let blocks = Engine::matrix(std::slice::from_ref(&table), 0);
        let (_, matrix) = blocks.first().ok_or_else(|| EngineError::Internal("no embeddings".into()))?;
        let row_bytes = kernels::element_bytes(matrix.dtype) * h;
        let tokens = lock(&self.tokens);
        let mut hidden = vec![0.0f32; self.policy.micro_batch_size as usize * new * h];
        for (i, seq) in self.sequences(task.micro_batch).enumerate() {
            for t in 0..new {
                let token =
                    if task.step == 0 { self.options.prompts[seq][t] } else { tokens[seq][task.step as usize - 1] }
                        as usize;
                let src = &matrix.bytes[token * row_bytes..(token + 1) * row_bytes];
                kernels::to_f32(matrix.dtype, src, &mut hidden[(i * new + t) * h..(i * new + t + 1) * h]);
            }
        }
        drop(tokens);
        lock(&self.micro_batches[task.micro_batch as usize]).at(side).hidden = hidden;
        Ok(())
    }

    fn head(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let h = self.spec.hidden_size as usize;
        let vocab = self.spec.vocab_size as usize;
        let new = self.new_tokens(task.step);
        let mb = self.policy.micro_batch_size as usize;
        let head = self.resident_group(WeightGroup::Head);
        let norm = Engine::vector(std::slice::from_ref(&head), 0);
        let last_rows: Vec<f32> = {
            let mut state = lock(&self.micro_batches[task.micro_batch as usize]);
            let hidden = &state.at(side).hidden;
            (0..mb).flat_map(|i| hidden[((i + 1) * new - 1) * h..(i + 1) * new * h].iter().copied()).collect()
        };
        let mut normed = vec![0.0; mb * h];
        kernels::rms_norm(&last_rows, &norm, self.spec.rms_norm_eps as f32, &mut normed);
        let logits = if self.spec.tie_word_embeddings {
            Engine::project(std::slice::from_ref(&self.resident_group(WeightGroup::Embeddings)), 0, &normed, mb, vocab)
        } else {
            Engine::project(std::slice::from_ref(&head), 1, &normed, mb, vocab)
        };
        let mut tokens = lock(&self.tokens);
        let mut all_logits = lock(&self.logits);
        if self.options.keep_logits && all_logits.len() <= task.step as usize {
            all_logits.resize(task.step as usize + 1, vec![Vec::new(); self.workload.batch_size as usize]);
        }
        for (i, seq) in self.sequences(task.micro_batch).enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            tokens[seq].push(kernels::argmax(row));
            if self.options.keep_logits {
                all_logits[task.step as usize][seq] = row.to_vec();
            }
        }
        Ok(())
    }

    fn positions(&self, step: u32) -> Vec<usize> {
        let past = self.past(step);
        let new = self.new_tokens(step);
        (0..self.policy.micro_batch_size as usize).flat_map(|_| (0..new).map(move |t| past + t)).collect()
    }

    /// RMSNorm of the side's hidden state, read in place (no copy of the hidden state).
    fn normed_hidden(&self, j: u32, side: Place, weight: &[f32], rows: usize) -> Vec<f32> {
        let mut state = lock(&self.micro_batches[j as usize]);
        let hidden = &state.at(side).hidden;
        let mut normed = vec![0.0; rows * self.spec.hidden_size as usize];
        kernels::rms_norm(hidden, weight, self.spec.rms_norm_eps as f32, &mut normed);
        normed
    }

    /// Adds `delta` to the side's hidden state (the residual connection).
    fn add_to_hidden(&self, j: u32, side: Place, delta: &[f32]) {
        let mut state = lock(&self.micro_batches[j as usize]);
        let hidden = &mut state.at(side).hidden;
        for (x, d) in hidden.iter_mut().zip(delta) {
            *x += d;
        }
    }

    /// Norm, q/k/v projections and rotary embedding into the side's `qkv` buffer,
    /// laid out as [q: rows × h][k: rows × kv][v: rows × kv].
    fn attn_qkv(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let spec = self.spec;
        let (h, kv, d) = (spec.hidden_size as usize, spec.kv_dim() as usize, spec.head_dim() as usize);
        let rows = self.policy.micro_batch_size as usize * self.new_tokens(task.step);
        let weights = self.weights(WeightGroup::Attention, task.layer, task.step, task.micro_batch)?;
        let normed = self.normed_hidden(task.micro_batch, side, &Engine::vector(&weights, 0), rows);
        // Tensor order: norm, q, [q bias], k, [k bias], v, [v bias], o.
        let bias = spec.qkv_bias;
        let (q_t, k_t, v_t) = if bias { (1, 3, 5) } else { (1, 2, 3) };
        let mut qkv = vec![0.0f32; rows * (h + 2 * kv)];
        {
            let (q, rest) = qkv.split_at_mut(rows * h);
            let (k, v) = rest.split_at_mut(rows * kv);
            Engine::project_into(&weights, q_t, &normed, rows, h, q);
            Engine::project_into(&weights, k_t, &normed, rows, kv, k);
            Engine::project_into(&weights, v_t, &normed, rows, kv, v);
            if bias {
                kernels::add_bias(q, &Engine::vector(&weights, 2), h, 0);
                kernels::add_bias(k, &Engine::vector(&weights, 4), kv, 0);
                kernels::add_bias(v, &Engine::vector(&weights, 6), kv, 0);
            }
            let positions = self.positions(task.step);
            kernels::rope(q, spec.num_heads as usize, d, &positions, spec.rope_theta as f32);
            kernels::rope(k, spec.num_kv_heads as usize, d, &positions, spec.rope_theta as f32);
        }
        drop(normed);
        lock(&self.micro_batches[task.micro_batch as usize]).at(side).qkv = qkv;
        Ok(())
    }

    /// Attention over the cache where the plan keeps it; appends the new keys and values.
    fn attn_core(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let spec = self.spec;
        let (h, kv, d) = (spec.hidden_size as usize, spec.kv_dim() as usize, spec.head_dim() as usize);
        let mb = self.policy.micro_batch_size as usize;
        let new = self.new_tokens(task.step);
        let past = self.past(task.step);
        let rows = mb * new;
        let kv_dtype = self.policy.kv_dtype;
        let row_bytes = self.kv_row_bytes();
        // Consumed here: taking it keeps no copy alive between steps.
        let qkv = { std::mem::take(&mut lock(&self.micro_batches[task.micro_batch as usize]).at(side).qkv) };
        let (q, rest) = qkv.split_at(rows * h);
        let (k_new, v_new) = rest.split_at(rows * kv);
        // New K and V in the cache dtype: [K: seq × new][V: seq × new].
        let mut new_kv = vec![0u8; 2 * rows * row_bytes];
        kernels::from_f32(kv_dtype, k_new, &mut new_kv[..rows * row_bytes]);
        kernels::from_f32(kv_dtype, v_new, &mut new_kv[rows * row_bytes..]);
        let key = (task.layer, task.micro_batch, task.step);
        let tier = self.placements[task.layer as usize].kv;
        let max = self.workload.max_context() as usize;
        // The whole visible cache as bytes: [K: seq × (past + new)][V: ...].
        let visible = past + new;
        let mut cache = vec![0u8; 2 * mb * visible * row_bytes];
        let mut place = |half: usize, seq: usize, pos: usize, bytes: &[u8]| {
            let at = ((half * mb + seq) * visible + pos) * row_bytes;
            cache[at..at + bytes.len()].copy_from_slice(bytes);
        };
        // Where the cache lives decides where past rows come from and where new rows go.
        let resident_region = match (tier, side) {
            (Tier::Device, _) => Some(&self.kv_device),
            (Tier::Host, Place::Host(_)) => Some(&self.kv_host),
            _ => None,
        };
        if let Some(regions) = resident_region {
            let mut slot = lock(&regions[self.kv_slot(task.layer, task.micro_batch)]);
            let region = slot.as_mut().ok_or_else(|| EngineError::Internal("KV region missing".into()))?;
            self.scatter_new(region.as_mut_slice(), &new_kv, past, new);
            let bytes = region.as_slice();
            for half in 0..2 {
                for seq in 0..mb {
                    let start = (half * mb + seq) * max * row_bytes;
                    place(half, seq, 0, &bytes[start..start + visible * row_bytes]);
                }
            }
        } else {
            let past_bytes = if past == 0 {
                Vec::new()
            } else if !side.is_device() {
                lock(&self.kv_staged)
                    .remove(&key)
                    .ok_or_else(|| EngineError::Internal(format!("KV of layer {} not staged", task.layer)))?
            } else {
                lock(&self.kv_loaded)
                    .remove(&key)
                    .ok_or_else(|| EngineError::Internal(format!("KV of layer {} not loaded", task.layer)))?
            };
            for half in 0..2 {
                for seq in 0..mb {
                    let p = (half * mb + seq) * past * row_bytes;
                    place(half, seq, 0, &past_bytes[p..p + past * row_bytes]);
                    let n = (half * mb + seq) * new * row_bytes;
                    place(half, seq, past, &new_kv[n..n + new * row_bytes]);
                }
            }
            lock(&self.kv_outbox).insert(key, new_kv);
        }
        let mut out = vec![0.0f32; rows * h];
        let elements = visible * kv;
        let mut keys = vec![0.0f32; elements];
        let mut values = vec![0.0f32; elements];
        for seq in 0..mb {
            let k_at = seq * visible * row_bytes;
            let v_at = (mb + seq) * visible * row_bytes;
            kernels::to_f32(kv_dtype, &cache[k_at..k_at + visible * row_bytes], &mut keys);
            kernels::to_f32(kv_dtype, &cache[v_at..v_at + visible * row_bytes], &mut values);
            kernels::attention(
                &q[seq * new * h..(seq + 1) * new * h],
                &keys,
                &values,
                past,
                new,
                spec.num_heads as usize,
                spec.num_kv_heads as usize,
                d,
                &mut out[seq * new * h..(seq + 1) * new * h],
            );
        }
        lock(&self.micro_batches[task.micro_batch as usize]).at(side).attn = out;
        Ok(())
    }

    /// Output projection and residual.
    fn attn_out(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let spec = self.spec;
        let h = spec.hidden_size as usize;
        let rows = self.policy.micro_batch_size as usize * self.new_tokens(task.step);
        let weights = self.weights(WeightGroup::Attention, task.layer, task.step, task.micro_batch)?;
        let o_tensor = if spec.qkv_bias { 7 } else { 4 };
        let attn = { std::mem::take(&mut lock(&self.micro_batches[task.micro_batch as usize]).at(side).attn) };
        let projected = Engine::project(&weights, o_tensor, &attn, rows, h);
        drop(attn);
        self.add_to_hidden(task.micro_batch, side, &projected);
        self.release_weights_if_last(task, WeightGroup::Attention);
        Ok(())
    }

    fn mlp(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let spec = self.spec;
        let (h, ffn) = (spec.hidden_size as usize, spec.intermediate_size as usize);
        let rows = self.policy.micro_batch_size as usize * self.new_tokens(task.step);
        let weights = self.weights(WeightGroup::Mlp, task.layer, task.step, task.micro_batch)?;
        let normed = self.normed_hidden(task.micro_batch, side, &Engine::vector(&weights, 0), rows);
        let mut gate = Engine::project(&weights, 1, &normed, rows, ffn);
        let up = Engine::project(&weights, 2, &normed, rows, ffn);
        drop(normed);
        kernels::silu_mul(&mut gate, &up);
        drop(up);
        let down = Engine::project(&weights, 3, &gate, rows, h);
        drop(gate);
        self.add_to_hidden(task.micro_batch, side, &down);
        self.release_weights_if_last(task, WeightGroup::Mlp);
        Ok(())
    }

    /// Frees a visit's streamed weights after their last consumer, as the graph's
    /// release says (the last micro-batch of a layer-major visit; every visit otherwise).
    fn release_weights_if_last(&self, task: &Task, group: WeightGroup) {
        let last = !self.layer_major() || task.micro_batch as u64 == self.policy.num_micro_batches - 1;
        if !last {
            return;
        }
        let first = self.first_j(task.micro_batch);
        lock(&self.streamed)
            .retain(|k, _| !(k.0 == group_code(group) && k.1 == task.layer && k.2 == task.step && k.3 == first));
    }
}

/// The device pools' budgets as the recyclers see them: each device's kept buffers
/// may use only what its pool has free beside the graph's accounting.
struct DeviceBudgets<'e> {
    /// (device, pool capacity, recycler) for every device with a pool.
    devices: Vec<(Place, u64, &'e Arc<Recycler>)>,
}

impl<'e> DeviceBudgets<'e> {
    fn new(graph: &TaskGraph, recyclers: &'e HashMap<u16, Arc<Recycler>>) -> DeviceBudgets<'e> {
        let devices = graph
            .pools
            .iter()
            .filter_map(|p| match p.pool {
                Place::Device(d) => recyclers.get(&d).map(|r| (p.pool, p.capacity_bytes, r)),
                Place::Host(_) => None,
            })
            .collect();
        DeviceBudgets { devices }
    }

    /// Free bytes of every device pool now.
    fn room(&self, dispatcher: &Dispatcher) -> Vec<u64> {
        self.devices.iter().map(|(place, capacity, _)| capacity.saturating_sub(dispatcher.used(*place))).collect()
    }

    /// Sets every recycler's limit to its pool's free bytes.
    fn refresh(&self, dispatcher: &Dispatcher) {
        for ((_, _, recycler), room) in self.devices.iter().zip(self.room(dispatcher)) {
            recycler.set_limit(room);
        }
    }

    /// A task just started: its device acquisitions shrink the room of their pools.
    fn acquired(&self, task: &Task, room: &mut [u64]) {
        for m in &task.acquire {
            if let Some(i) = self.devices.iter().position(|(place, _, _)| *place == m.pool) {
                room[i] = room[i].saturating_sub(m.bytes);
                self.devices[i].2.set_limit(room[i]);
            }
        }
    }
}

impl KvFile {
    fn create(
        spec: &ModelSpec,
        policy: &Policy,
        workload: &Workload,
        options: &RunOptions,
    ) -> Result<KvFile, EngineError> {
        let row = spec.kv_dim() * (policy.kv_dtype.bits() / 8);
        let region_bytes = (2 * policy.micro_batch_size * workload.max_context() * row).div_ceil(4096) * 4096;
        let regions = spec.num_layers * policy.num_micro_batches;
        std::fs::create_dir_all(&options.scratch_dir).map_err(|e| EngineError::io(&options.scratch_dir, e))?;
        let path = options.scratch_dir.join(format!("ferry-kv-{}-{}.bin", std::process::id(), regions));
        let writer = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| EngineError::io(&path, e))?;
        writer.set_len(regions * region_bytes).map_err(|e| EngineError::io(&path, e))?;
        let reader = Arc::new(DiskFile::open(&path, options.allow_buffered_io)?);
        Ok(KvFile { path, reader, writer, region_bytes })
    }

    fn region_offset(&self, slot: usize) -> u64 {
        slot as u64 * self.region_bytes
    }
}

impl Drop for KvFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
