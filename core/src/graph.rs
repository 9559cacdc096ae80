//! The task graph: the one data structure the simulator replays and the engine
//! executes. Every task names its resource, its work (bytes or FLOPs), the layer,
//! micro-batch and decode step it belongs to, its dependencies, and the memory it
//! acquires when it starts and releases when it ends.
//!
//! Invariants (checked by `TaskGraph::validate`): tasks are in program order, so
//! every dependency has a smaller id; a task's resource follows from its kind; the
//! memory a graph releases from a pool equals the memory it acquires there.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::model::WeightGroup;
use crate::units::format_bytes;

pub type TaskId = u32;

pub use crate::topology::{Place, Resource};

/// A memory pool: the memory of a place (a device's memory, a host's RAM).
pub type Pool = Place;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    DiskRead,
    DiskWrite,
    /// Bytes moved over a link (the task's resource names its two ends).
    Copy,
    Compute,
}

impl TaskKind {
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::DiskRead => "read",
            TaskKind::DiskWrite => "write",
            TaskKind::Copy => "copy",
            TaskKind::Compute => "compute",
        }
    }
}

/// A compute operation. `Attention` is the fused form of `AttnQkv` → `AttnCore` →
/// `AttnOut`, used when attention runs where the projections run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    Embed,
    Attention,
    AttnQkv,
    AttnCore,
    AttnOut,
    Mlp,
    /// A mixture of experts' router: the MLP's norm and each token's top-k experts,
    /// computed before the routed experts are read (`ExpertReads::Routed`).
    Route,
    /// Final norm, language-model head and greedy sampling.
    Head,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Embed => "embed",
            Op::Attention => "attention",
            Op::AttnQkv => "attn-qkv",
            Op::AttnCore => "attn-core",
            Op::AttnOut => "attn-out",
            Op::Mlp => "mlp",
            Op::Route => "route",
            Op::Head => "head",
        }
    }
}

/// What a task moves or computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Payload {
    Weights {
        group: WeightGroup,
    },
    KvCache,
    Activations,
    /// `draft`: an operation of the draft model (speculative decoding), on its own
    /// weights, KV cache and activations.
    ///
    /// `weights_off_device`: the weights it multiplies by are not kept on its device —
    /// streamed for the visit, or computed where the host keeps them. The cpu engine
    /// reorders only the weights its device keeps (`Backend::resident_order`), so these
    /// are multiplied in the file's row order, at that order's rates
    /// (`DequantRate::row_order`).
    Compute {
        op: Op,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        draft: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        weights_off_device: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemOp {
    pub pool: Pool,
    pub bytes: u64,
}

/// Marks "no layer" for embeddings and head tasks.
pub const NO_LAYER: u32 = u32::MAX;

/// Marks a weight transfer that moves its whole group (not one pipelined piece).
pub const WHOLE_GROUP: u16 = u16::MAX;

/// Marks the load of a mixture of experts' router part (the MLP's norm, router and
/// shared expert, `ModelSpec::router_tensors`), read ahead like a whole group.
pub const ROUTER_PART: u16 = u16::MAX - 1;

/// Marks the load of the experts a visit's tokens were routed to, read once every
/// micro-batch of the visit is routed: its `bytes` are the expected experts', its
/// acquisitions the most it may read.
pub const ROUTED_EXPERTS: u16 = u16::MAX - 2;

/// A task's dependencies, inline up to four: a graph has up to 160,000 tasks and the
/// tuner builds thousands of graphs; a heap allocation per task for its dependencies
/// and memory operations was a sixth of `ferry tune` (in `malloc` and `free`).
pub type Deps = smallvec::SmallVec<[TaskId; 4]>;
/// A task's memory acquisitions or releases, inline up to one.
pub type MemOps = smallvec::SmallVec<[MemOp; 1]>;

// A task stays within 128 bytes (see `Task::chunk_bytes`), its inline lists no larger
// than the vectors they replace.
const _: () = assert!(std::mem::size_of::<Task>() <= 128 && std::mem::size_of::<Deps>() <= 24);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub kind: TaskKind,
    /// Where it runs: a place's compute, a link, a disk.
    pub resource: Resource,
    pub payload: Payload,
    pub layer: u32,
    pub micro_batch: u32,
    /// 0 is the prefill; step s ≥ 1 generates token s + 1.
    pub step: u32,
    /// Bytes moved (transfers) or read from memory (compute).
    pub bytes: u64,
    pub flops: u64,
    /// Rows processed (sequences × new tokens), for compute tasks.
    pub tokens: u32,
    /// Attention context length after this step.
    pub context: u32,
    /// Request size for transfers, at most 4 GiB (`Task::request_bytes`): u32 keeps a
    /// task within 128 bytes, which the compiler copies inline; at 136 every push of a
    /// task into a graph was a call to `memcpy` (8 % of `ferry tune`).
    pub chunk_bytes: u32,
    /// Which piece of its weight group a pipelined transfer moves
    /// (`schedule::weight_pieces`), or `WHOLE_GROUP`.
    pub piece: u16,
    /// Host→device copies from page-locked memory.
    pub pinned: bool,
    pub deps: Deps,
    pub acquire: MemOps,
    pub release: MemOps,
}

impl Task {
    pub fn resource(&self) -> Resource {
        self.resource
    }

    /// A request size as stored in `chunk_bytes`: requests beyond 4 GiB are priced as
    /// 4 GiB ones (every measured curve is flat long before).
    pub fn request_bytes(bytes: u64) -> u32 {
        bytes.min(u32::MAX as u64) as u32
    }

    /// A copy's source and destination.
    pub fn link_ends(&self) -> Option<(Place, Place)> {
        match self.resource {
            Resource::Link { from, to } => Some((from, to)),
            _ => None,
        }
    }

    /// Where a compute task runs.
    pub fn compute_place(&self) -> Option<Place> {
        match self.resource {
            Resource::Compute { at } => Some(at),
            _ => None,
        }
    }

    /// A short human label: `h2d L7 attention weights`, `compute L7 mlp mb2`.
    pub fn label(&self) -> String {
        let layer = if self.layer == NO_LAYER { String::new() } else { format!(" L{}", self.layer) };
        let what = match self.payload {
            Payload::Weights { .. } if self.piece == ROUTER_PART => "router".to_string(),
            Payload::Weights { .. } if self.piece == ROUTED_EXPERTS => "routed experts".to_string(),
            Payload::Weights { group } => format!("{group:?} weights").to_lowercase(),
            Payload::KvCache => "kv".to_string(),
            Payload::Activations => "activations".to_string(),
            Payload::Compute { op, draft: false, .. } => op.name().to_string(),
            Payload::Compute { op, draft: true, .. } => format!("draft {}", op.name()),
        };
        let kind = match self.resource {
            Resource::Link { from: Place::Host(_), to: Place::Device(0) } => "h2d".to_string(),
            Resource::Link { from: Place::Device(0), to: Place::Host(_) } => "d2h".to_string(),
            Resource::Link { from: Place::Host(_), to: Place::Device(n) } => format!("h2d{n}"),
            Resource::Link { from: Place::Device(n), to: Place::Host(_) } => format!("d{n}2h"),
            Resource::Link { from: Place::Device(a), to: Place::Device(b) } => format!("d{a}2d{b}"),
            _ => self.kind.name().to_string(),
        };
        format!("{kind}{layer} {what} mb{} s{}", self.micro_batch, self.step)
    }
}

/// A table slot for the resources of machines with up to 16 devices on host 0: the
/// disk, the host's compute, and each device's compute and links to and from the host.
fn resource_slot(resource: Resource) -> Option<usize> {
    match resource {
        Resource::Disk { host: 0 } => Some(0),
        Resource::Compute { at: Place::Host(0) } => Some(1),
        Resource::Compute { at: Place::Device(d) } if d < 16 => Some(2 + d as usize),
        Resource::Link { from: Place::Host(0), to: Place::Device(d) } if d < 16 => Some(18 + d as usize),
        Resource::Link { from: Place::Device(d), to: Place::Host(0) } if d < 16 => Some(34 + d as usize),
        _ => None,
    }
}

/// Whether every pool's resident set fits its capacity and every task's acquisition
/// fits beside it: `TaskGraph::check_fits`'s test, on any tasks (`lower` applies it to
/// the prefill's before lowering the rest).
pub fn fits_beside_resident(pools: &[PoolSpec], tasks: &[Task]) -> bool {
    let mut free: Vec<(Pool, u64)> = Vec::with_capacity(pools.len());
    for spec in pools {
        match spec.capacity_bytes.checked_sub(spec.resident_bytes()) {
            Some(bytes) => free.push((spec.pool, bytes)),
            None => return false,
        }
    }
    tasks.iter().all(|t| t.acquire.iter().all(|m| free.iter().all(|&(pool, bytes)| pool != m.pool || m.bytes <= bytes)))
}

/// A pool's capacity and what stays resident in it for the whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub pool: Pool,
    pub capacity_bytes: u64,
    /// (what, bytes) held for the whole run: resident weights, resident KV, workspace.
    pub resident: Vec<(String, u64)>,
}

impl PoolSpec {
    pub fn resident_bytes(&self) -> u64 {
        self.resident.iter().map(|(_, b)| b).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceSpec {
    pub resource: Resource,
    /// Tasks that may run on it at once (copy streams, I/O queue depth).
    pub lanes: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskGraph {
    pub tasks: Vec<Task>,
    pub pools: Vec<PoolSpec>,
    pub resources: Vec<ResourceSpec>,
    pub batch_size: u64,
    pub prompt_len: u64,
    pub gen_len: u64,
    /// The decoding rounds present in the graph, by ascending step (a sampled graph
    /// holds the prefill and some decode steps, not all).
    pub rounds: Vec<Round>,
}

/// One decoding round: every sequence processes `rows` new positions after `past`
/// earlier ones and ends it with `tokens` more generated tokens. The prefill processes
/// the prompt and yields the first token; a plain decode step processes the last
/// token and yields the next. A speculative verification would process a draft's
/// guesses and yield those accepted plus one, so tokens per round are data, not 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    /// The tasks' `step`: 0 is the prefill.
    pub step: u32,
    pub past: u32,
    pub rows: u32,
    pub tokens: u32,
    /// Draft tokens per sequence this round verifies (speculative decoding): the
    /// draft's passes come first, then the target processes `drafted + 1` positions.
    /// 0 for plain decoding.
    #[serde(default)]
    pub drafted: u32,
}

impl Round {
    /// Round `step` of plain decoding: the prefill (step 0), then one token per step.
    pub fn decoding(workload: &crate::plan::Workload, step: u32) -> Round {
        let prompt = workload.prompt_len as u32;
        if step == 0 {
            Round { step, past: 0, rows: prompt, tokens: 1, drafted: 0 }
        } else {
            Round { step, past: prompt + step - 1, rows: 1, tokens: 1, drafted: 0 }
        }
    }

    /// Attention context at the end of the round.
    pub fn context(&self) -> u32 {
        self.past + self.rows
    }
}

impl TaskGraph {
    /// The round a task's `step` belongs to.
    pub fn round(&self, step: u32) -> Option<&Round> {
        self.rounds.binary_search_by_key(&step, |r| r.step).ok().map(|i| &self.rounds[i])
    }

    /// Whether the graph holds every round of its generation (steps 0, 1, … with
    /// `gen_len` tokens in all), as a run needs; a sampled graph does not.
    pub fn is_complete(&self) -> bool {
        let contiguous = self.rounds.iter().enumerate().all(|(i, r)| r.step as usize == i);
        let tokens: u64 = self.rounds.iter().map(|r| r.tokens as u64).sum();
        contiguous && tokens == self.gen_len
    }

    /// The pool of `place`; every place a task acquires memory in has one.
    pub fn pool(&self, pool: Pool) -> &PoolSpec {
        &self.pools[self.pool_index(pool)]
    }

    /// Position of `pool` in `pools` (a graph lists each place once).
    pub fn pool_index(&self, pool: Pool) -> usize {
        self.pools.iter().position(|p| p.pool == pool).unwrap_or(usize::MAX)
    }

    /// Position of `resource` in `resources`.
    pub fn resource_index(&self, resource: Resource) -> usize {
        self.resources.iter().position(|r| r.resource == resource).unwrap_or(usize::MAX)
    }

    /// Every task's resource index (`u32::MAX` for a resource the graph lacks),
    /// computed in one pass with integer keys: simulator, dispatcher and metrics need
    /// it for every task of every candidate plan.
    pub fn task_resource_indices(&self) -> Vec<u32> {
        let mut indices = Vec::new();
        self.task_resource_indices_into(&mut indices);
        indices
    }

    /// `task_resource_indices` into `indices` (cleared first), for callers that keep
    /// one buffer over many graphs.
    pub fn task_resource_indices_into(&self, indices: &mut Vec<u32>) {
        // The resources of up to 16 devices have a slot in a table; others are searched.
        let mut table = [u32::MAX; 50];
        for (index, spec) in self.resources.iter().enumerate() {
            if let Some(slot) = resource_slot(spec.resource) {
                table[slot] = index as u32;
            }
        }
        let keys: Vec<u64> = self.resources.iter().map(|r| r.resource.key()).collect();
        indices.clear();
        indices.extend(self.tasks.iter().map(|t| match resource_slot(t.resource).map(|slot| table[slot]) {
            Some(index) if index != u32::MAX => index,
            _ => {
                let key = t.resource.key();
                keys.iter().position(|&k| k == key).map_or(u32::MAX, |i| i as u32)
            }
        }));
    }

    /// Integer keys of the pools, in order (see `Place::key`).
    pub fn pool_keys(&self) -> Vec<u32> {
        self.pools.iter().map(|p| p.pool.key()).collect()
    }

    pub fn lanes(&self, resource: Resource) -> u32 {
        self.resources.iter().find(|r| r.resource == resource).map_or(1, |r| r.lanes)
    }

    /// Devices with a pool in this graph.
    pub fn device_count(&self) -> usize {
        self.pools.iter().filter(|p| p.pool.is_device()).count()
    }

    /// A resource's name for people: indices only when the graph has several devices.
    pub fn resource_label(&self, resource: Resource) -> String {
        resource.label(self.device_count() > 1)
    }

    /// A pool's name for people, like `resource_label`.
    pub fn pool_label(&self, pool: Pool) -> String {
        pool.label(self.device_count() > 1)
    }

    /// Checks the structural invariants; a failure here is a bug in the lowering.
    pub fn validate(&self) -> Result<()> {
        self.validate_rounds()?;
        let resource_of = self.task_resource_indices();
        let pool_keys = self.pool_keys();
        // One pass: program order, rounds, resources, and the bytes each pool acquires
        // and releases. Rounds are lowered one after another, so tasks' steps ascend.
        let mut balance = vec![(0u64, 0u64); self.pools.len()];
        let mut round = 0;
        for (id, task) in self.tasks.iter().enumerate() {
            while round < self.rounds.len() && self.rounds[round].step < task.step {
                round += 1;
            }
            if self.rounds.get(round).is_none_or(|r| r.step != task.step) {
                return Err(CoreError::invalid(format!(
                    "task {id} ({}) belongs to step {}, which is not among the graph's rounds or comes out of order",
                    task.label(),
                    task.step
                )));
            }
            if let Some(dep) = task.deps.iter().find(|&&d| d as usize >= id) {
                return Err(CoreError::invalid(format!("task {id} ({}) depends on later task {dep}", task.label())));
            }
            if resource_of[id] == u32::MAX {
                return Err(CoreError::invalid(format!(
                    "task {id} ({}) runs on a resource the graph lacks",
                    task.label()
                )));
            }
            for (ops, acquired) in [(&task.acquire, true), (&task.release, false)] {
                for m in ops {
                    let Some(slot) = pool_keys.iter().position(|&k| k == m.pool.key()) else {
                        return Err(CoreError::invalid(format!(
                            "task {id} ({}) uses memory of {}, which has no pool",
                            task.label(),
                            m.pool.token()
                        )));
                    };
                    if acquired {
                        balance[slot].0 += m.bytes;
                    } else {
                        balance[slot].1 += m.bytes;
                    }
                }
            }
        }
        for (pool, (acquired, released)) in self.pools.iter().map(|p| p.pool).zip(balance) {
            if acquired != released {
                return Err(CoreError::invalid(format!(
                    "{} pool: tasks acquire {} but release {}",
                    self.pool_label(pool),
                    format_bytes(acquired),
                    format_bytes(released)
                )));
            }
        }
        Ok(())
    }

    /// The graph up to round `last_step`, its rounds yielding `tokens` (per round from
    /// the prefill on): what a speculative run executed once every sequence had its
    /// tokens. Tasks are in program order and steps ascend, so the rounds kept are a
    /// prefix of the tasks.
    pub fn truncated(&self, last_step: u32, tokens: &[u32]) -> Result<TaskGraph> {
        let kept_tasks = self.tasks.iter().take_while(|t| t.step <= last_step).count();
        let mut rounds: Vec<Round> = self.rounds.iter().take_while(|r| r.step <= last_step).copied().collect();
        if rounds.len() != tokens.len() {
            return Err(CoreError::invalid(format!(
                "{} rounds up to step {last_step} but {} token counts",
                rounds.len(),
                tokens.len()
            )));
        }
        for (round, &yielded) in rounds.iter_mut().zip(tokens) {
            round.tokens = yielded;
        }
        let graph = TaskGraph { tasks: self.tasks[..kept_tasks].to_vec(), rounds, ..self.clone_shell() };
        graph.validate()?;
        Ok(graph)
    }

    /// The graph without tasks or rounds (pools, resources, workload).
    fn clone_shell(&self) -> TaskGraph {
        TaskGraph {
            tasks: Vec::new(),
            pools: self.pools.clone(),
            resources: self.resources.clone(),
            batch_size: self.batch_size,
            prompt_len: self.prompt_len,
            gen_len: self.gen_len,
            rounds: Vec::new(),
        }
    }

    /// Rounds ascend by step from the prefill, and each processes and yields something.
    fn validate_rounds(&self) -> Result<()> {
        if self.rounds.first().is_none_or(|r| r.step != 0) {
            return Err(CoreError::invalid("a task graph starts with its prefill round (step 0)"));
        }
        if self.rounds.windows(2).any(|w| w[0].step >= w[1].step) {
            return Err(CoreError::invalid("a task graph's rounds must ascend by step"));
        }
        if let Some(r) = self.rounds.iter().find(|r| r.rows == 0 || r.tokens == 0) {
            return Err(CoreError::invalid(format!(
                "round {} processes {} positions and yields {} tokens; both must be at least 1",
                r.step, r.rows, r.tokens
            )));
        }
        Ok(())
    }

    /// Fails when the resident set alone, or any single task, exceeds its pool: such a
    /// graph could never run. The message names the pool and the shortfall.
    pub fn check_fits(&self) -> Result<()> {
        if self.fits_everywhere() {
            return Ok(());
        }
        for spec in &self.pools {
            let resident = spec.resident_bytes();
            if resident > spec.capacity_bytes {
                let detail: Vec<String> = spec
                    .resident
                    .iter()
                    .filter(|(_, b)| *b > 0)
                    .map(|(what, b)| format!("{what} {}", format_bytes(*b)))
                    .collect();
                return Err(CoreError::invalid(format!(
                    "{} memory: the resident set needs {} but the budget is {} (short by {}): {}",
                    self.pool_label(spec.pool),
                    format_bytes(resident),
                    format_bytes(spec.capacity_bytes),
                    format_bytes(resident - spec.capacity_bytes),
                    detail.join(", ")
                )));
            }
            let free = spec.capacity_bytes - resident;
            // The largest amount one task holds at once must fit beside the resident set.
            if let Some(task) = self
                .tasks
                .iter()
                .filter(|t| t.acquire.iter().any(|m| m.pool == spec.pool && m.bytes > free))
                .max_by_key(|t| t.acquire.iter().map(|m| m.bytes).sum::<u64>())
            {
                let need: u64 = task.acquire.iter().filter(|m| m.pool == spec.pool).map(|m| m.bytes).sum();
                return Err(CoreError::invalid(format!(
                    "{} memory: task '{}' needs {} but only {} is left beside the resident set (short by {})",
                    self.pool_label(spec.pool),
                    task.label(),
                    format_bytes(need),
                    format_bytes(free),
                    format_bytes(need - free)
                )));
            }
        }
        Ok(())
    }

    /// Whether `check_fits` passes, in one pass over the tasks for all pools (it makes
    /// one per pool): the simulator checks every candidate plan's graph. The full check
    /// runs only to name what does not fit.
    fn fits_everywhere(&self) -> bool {
        fits_beside_resident(&self.pools, &self.tasks)
    }

    /// Total bytes moved per task kind, for checks that the graph moves what the plan needs.
    pub fn bytes_by_kind(&self, kind: TaskKind) -> u64 {
        self.tasks.iter().filter(|t| t.kind == kind).map(|t| t.bytes).sum()
    }
}
