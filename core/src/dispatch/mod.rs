//! The dispatch rule — the one piece of scheduling the simulator and the engine must
//! share to run a graph the same way. On each resource, the ready task with the
//! **lowest id** (program order) starts next, when one of the resource's lanes is free
//! and the memory it acquires fits its pool; otherwise no later task on that resource
//! that acquires memory in the same pool, or none at all, overtakes it. Tasks that
//! acquire memory in *another* pool may: with several devices one disk serves them
//! all, and a read for a full device must not hold back the reads another device
//! needs to make progress (that would deadlock a pipeline of stages). With one device
//! every task on a resource acquires in the same pool (or none), so this is exactly
//! "no task overtakes it". Across resources, candidates are tried in ascending id.
//! Memory is acquired when a task starts and released when it ends.
//!
//! A task that overtakes tasks earlier in program order — on its own resource or on
//! another — may not take the memory they have yet to acquire in the same pool: it
//! starts only if, after it, the pool still holds every earlier pending acquisition
//! (`pending`). Without that reservation a copy whose source is ready (host-resident
//! weights for a later layer) could take the room of an earlier copy still waiting on
//! its disk read; the later layer's compute waits for the earlier layer's, which waits
//! for its copy: a deadlock. With it, whatever fits when the graph runs in program order
//! still runs, and a later task still overtakes where there is room for both.
//!
//! Why: every acquisition keeps "held + what tasks before j have yet to take ≤
//! capacity" true for every started task j (an earlier task's acquisition moves bytes
//! from one term to the other; a later one is checked against a larger set). When
//! nothing runs, let R be the lowest unfinished task: all before it have finished, so
//! it is ready; if a task after it has started, the invariant for that task leaves R's
//! bytes free, and if none has, the pools hold what program order holds before R. R
//! starts either way (tested on random graphs: `a_graph_that_fits_in_program_order_
//! never_deadlocks`).
//!
//! `Dispatcher` keeps that state; the simulator drives it from its event loop, the
//! engine from its scheduler thread.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::graph::{Pool, TaskGraph, TaskId};
use crate::units::format_bytes;

mod pending;

use pending::{PendingAcquires, PendingTables};

/// Dispatch state over one graph. Resources and pools are indexed by their position
/// in the graph's lists (`TaskGraph::resource_index`, `pool_index`), looked up once.
pub struct Dispatcher<'g> {
    graph: &'g TaskGraph,
    remaining_deps: Vec<u32>,
    dependent_start: Vec<u32>,
    dependents: Vec<u32>,
    /// Ready queue of every task: one per resource, except that a resource whose tasks
    /// acquire memory in several pools (one disk serving several devices) gets one
    /// queue per pool and one for tasks that acquire none.
    queue_of: Vec<u32>,
    queues: Vec<QueueInfo>,
    /// Pool index by place, without a search (see `PoolSlots`).
    pool_slots: PoolSlots,
    pending: PendingAcquires,
    ready: Vec<BinaryHeap<Reverse<TaskId>>>,
    /// The lowest id in each ready queue (`TaskId::MAX` when empty), kept beside the
    /// heaps so choosing the next task reads one small array.
    heads: Vec<TaskId>,
    lane_busy: Vec<Vec<bool>>,
    free_lanes: Vec<usize>,
    running: usize,
    capacity: Vec<u64>,
    used: Vec<u64>,
    finished: usize,
}

/// Why nothing can start although tasks remain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    pub pool: Pool,
    pub message: String,
}

/// The dispatcher's tables over tasks (dependencies, dependents, ready queue). A
/// caller that runs many graphs — the simulator replays thousands for the tuner —
/// passes them from one dispatcher to the next (`with_tables`, `into_tables`), so a run
/// reuses their memory instead of allocating, and faulting in, a megabyte per graph.
#[derive(Default)]
pub struct DispatchTables {
    remaining_deps: Vec<u32>,
    dependent_start: Vec<u32>,
    dependents: Vec<u32>,
    queue_of: Vec<u32>,
    pending: PendingTables,
}

impl<'g> Dispatcher<'g> {
    pub fn new(graph: &'g TaskGraph) -> Dispatcher<'g> {
        Dispatcher::with_tables(graph, DispatchTables::default())
    }

    /// `new`, filling `tables` (whatever they held) instead of allocating its own.
    pub fn with_tables(graph: &'g TaskGraph, tables: DispatchTables) -> Dispatcher<'g> {
        let DispatchTables { mut remaining_deps, mut dependent_start, mut dependents, mut queue_of, pending } = tables;
        dependents_of(graph, &mut remaining_deps, &mut dependent_start, &mut dependents);
        let pool_slots = PoolSlots::new(graph);
        let pending = PendingAcquires::new(graph, &pool_slots, pending);
        let queue_keys = queues(graph, &pool_slots, &mut queue_of);
        let mut ready: Vec<BinaryHeap<Reverse<TaskId>>> = vec![BinaryHeap::new(); queue_keys.len()];
        for (id, &deps) in remaining_deps.iter().enumerate() {
            if deps == 0 {
                ready[queue_of[id] as usize].push(Reverse(id as TaskId));
            }
        }
        let lanes: Vec<usize> = graph.resources.iter().map(|r| r.lanes.max(1) as usize).collect();
        let heads = ready.iter().map(|h| h.peek().map_or(TaskId::MAX, |r| r.0)).collect();
        Dispatcher {
            graph,
            remaining_deps,
            dependent_start,
            dependents,
            queue_of,
            queues: queue_keys
                .iter()
                .map(|&(r, p)| QueueInfo { resource: r, acquires_only_its_pool: p != SHARED && p != u32::MAX })
                .collect(),
            pool_slots,
            pending,
            ready,
            heads,
            lane_busy: lanes.iter().map(|&n| vec![false; n]).collect(),
            free_lanes: lanes,
            running: 0,
            capacity: graph.pools.iter().map(|p| p.capacity_bytes).collect(),
            used: graph.pools.iter().map(|p| p.resident_bytes()).collect(),
            finished: 0,
        }
    }

    /// Gives back the tables over tasks, for the next graph's `with_tables`.
    pub fn into_tables(self) -> DispatchTables {
        DispatchTables {
            remaining_deps: self.remaining_deps,
            dependent_start: self.dependent_start,
            dependents: self.dependents,
            queue_of: self.queue_of,
            pending: self.pending.into_tables(),
        }
    }

    /// Starts every task the rule allows now, lowest id first; `start(task, lane,
    /// resource index)` is called for each, after its memory has been acquired.
    pub fn dispatch(&mut self, mut start: impl FnMut(TaskId, u32, usize)) {
        // A queue is blocked once its head did not fit; a resource once any of its
        // queues is, which blocks its other queues except those of another pool. Bit
        // sets of 128; queues and resources past 127 share the last bit, which only
        // makes the rule stricter (they block each other, as one queue would).
        let (mut blocked, mut resource_blocked) = (0u128, 0u128);
        loop {
            // The lowest head among the queues that may start a task now.
            let (mut best_id, mut best_q) = (TaskId::MAX, usize::MAX);
            for (q, (&head, info)) in self.heads.iter().zip(&self.queues).enumerate() {
                // Nothing is blocked on most calls: test that before shifting 128 bits.
                if head >= best_id || (blocked != 0 && blocked >> q.min(127) & 1 != 0) {
                    continue;
                }
                let r = info.resource as usize;
                if self.free_lanes[r] == 0
                    || (resource_blocked != 0
                        && resource_blocked >> r.min(127) & 1 != 0
                        && !info.acquires_only_its_pool)
                {
                    continue;
                }
                (best_id, best_q) = (head, q);
            }
            if best_q == usize::MAX {
                return;
            }
            let (id, q) = (best_id, best_q);
            let r = self.queues[q].resource as usize;
            let acquire = &self.graph.tasks[id as usize].acquire;
            let slots = &self.pool_slots;
            let fits = acquire.iter().all(|m| {
                let p = slots.index(m.pool);
                // All the task takes in this pool (a task rarely acquires twice in one).
                let bytes: u64 = acquire.iter().filter(|o| o.pool == m.pool).map(|o| o.bytes).sum();
                self.used[p] + bytes + self.pending.before(p, id) <= self.capacity[p]
            });
            if !fits {
                blocked |= 1 << q.min(127);
                resource_blocked |= 1 << r.min(127);
                continue;
            }
            self.ready[q].pop();
            self.heads[q] = self.ready[q].peek().map_or(TaskId::MAX, |r| r.0);
            for m in acquire {
                let p = slots.index(m.pool);
                self.used[p] += m.bytes;
                self.pending.started(p, id);
            }
            let lane = self.lane_busy[r].iter().position(|b| !b).unwrap_or(0);
            self.lane_busy[r][lane] = true;
            self.free_lanes[r] -= 1;
            self.running += 1;
            start(id, lane as u32, r);
        }
    }

    /// Records that `task`, which ran on `lane`, ended: frees the lane and the memory it
    /// releases, and readies the dependents it was the last dependency of.
    pub fn complete(&mut self, task: TaskId, lane: u32) {
        let r = self.queues[self.queue_of[task as usize] as usize].resource as usize;
        self.lane_busy[r][lane as usize] = false;
        self.free_lanes[r] += 1;
        self.running -= 1;
        self.finished += 1;
        for m in &self.graph.tasks[task as usize].release {
            self.used[self.pool_slots.index(m.pool)] -= m.bytes;
        }
        let (from, to) =
            (self.dependent_start[task as usize] as usize, self.dependent_start[task as usize + 1] as usize);
        for &dependent in &self.dependents[from..to] {
            self.remaining_deps[dependent as usize] -= 1;
            if self.remaining_deps[dependent as usize] == 0 {
                let q = self.queue_of[dependent as usize] as usize;
                self.ready[q].push(Reverse(dependent));
                self.heads[q] = self.heads[q].min(dependent);
            }
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finished == self.graph.tasks.len()
    }

    pub fn running(&self) -> usize {
        self.running
    }

    pub fn finished(&self) -> usize {
        self.finished
    }

    /// Bytes held in each pool now (resident set included), indexed like the graph's pools.
    pub fn used_bytes(&self) -> &[u64] {
        &self.used
    }

    /// Bytes held in `pool` now (resident set included).
    pub fn used(&self, pool: Pool) -> u64 {
        self.used.get(self.graph.pool_index(pool)).copied().unwrap_or(0)
    }

    /// Explains why nothing runs although tasks remain: the lowest-id ready task and the
    /// pool it does not fit, with the shortfall.
    pub fn stall(&self) -> Stall {
        let head = self.ready.iter().filter_map(|h| h.peek().map(|Reverse(id)| *id)).min();
        let Some(id) = head else {
            return Stall {
                pool: Pool::DEVICE,
                message:
                    "the task graph stalled with no task ready: a dependency can never finish (a bug in the lowering)"
                        .into(),
            };
        };
        let graph = self.graph;
        let task = &graph.tasks[id as usize];
        let pool = task
            .acquire
            .iter()
            .find(|m| {
                let p = graph.pool_index(m.pool);
                self.used[p] + m.bytes > self.capacity[p]
            })
            .map_or(Pool::DEVICE, |m| m.pool);
        let spec = graph.pool(pool);
        let need: u64 = task.acquire.iter().filter(|m| m.pool == pool).map(|m| m.bytes).sum();
        let in_use = self.used(pool);
        let free = spec.capacity_bytes.saturating_sub(in_use);
        let message = format!(
            "{pool} memory is exhausted — task '{task}' needs {need} but only {free} is free (capacity {capacity}, \
             {resident} resident, {held} held by tasks waiting on each other); lower the prefetch depth, the \
             micro-batch size or the chunk size, or give the {pool} pool {short} more",
            pool = graph.pool_label(pool),
            task = task.label(),
            need = format_bytes(need),
            free = format_bytes(free),
            capacity = format_bytes(spec.capacity_bytes),
            resident = format_bytes(spec.resident_bytes()),
            held = format_bytes(in_use.saturating_sub(spec.resident_bytes())),
            short = format_bytes(need.saturating_sub(free)),
        );
        Stall { pool, message }
    }
}

/// Every task's count of dependencies, and its dependents in compressed form: those
/// of task d are `dependents[dependent_start[d]..dependent_start[d + 1]]`, ascending.
fn dependents_of(
    graph: &TaskGraph,
    remaining_deps: &mut Vec<u32>,
    dependent_start: &mut Vec<u32>,
    dependents: &mut Vec<u32>,
) {
    let count = graph.tasks.len();
    remaining_deps.clear();
    dependent_start.clear();
    dependent_start.resize(count + 1, 0);
    for task in &graph.tasks {
        remaining_deps.push(task.deps.len() as u32);
        for &dep in &task.deps {
            dependent_start[dep as usize] += 1;
        }
    }
    // Running sums: entry d becomes the end of d's run (the last entry, the total).
    let mut total = 0;
    for entry in dependent_start.iter_mut() {
        total += *entry;
        *entry = total;
    }
    dependents.clear();
    dependents.resize(total as usize, 0);
    // Filling from the last task back moves each entry from the end of its run to its
    // start, and leaves every run in ascending order — no second table of positions.
    for (id, task) in graph.tasks.iter().enumerate().rev() {
        for &dep in task.deps.iter().rev() {
            dependent_start[dep as usize] -= 1;
            dependents[dependent_start[dep as usize] as usize] = id as u32;
        }
    }
}

/// Queue key of tasks on a resource that is not split by pool.
const SHARED: u32 = u32::MAX - 1;

/// A ready queue's resource, and whether its tasks all acquire in one pool of a
/// resource split by pool (they may then pass a blocked queue of another pool).
#[derive(Clone, Copy)]
struct QueueInfo {
    resource: u32,
    acquires_only_its_pool: bool,
}

/// Pool index by place in O(1): the first 63 devices by number and host 0 have a
/// slot; any other place is searched (no machine has one yet). The dispatcher looks
/// pools up for every memory operation of every task.
struct PoolSlots {
    slots: [u8; 64],
    keys: Vec<u32>,
}

impl PoolSlots {
    fn new(graph: &TaskGraph) -> PoolSlots {
        let mut slots = [u8::MAX; 64];
        for (index, pool) in graph.pools.iter().enumerate() {
            if let Some(slot) = PoolSlots::slot(pool.pool) {
                slots[slot] = index.min(254) as u8;
            }
        }
        PoolSlots { slots, keys: graph.pool_keys() }
    }

    fn slot(place: Pool) -> Option<usize> {
        match place {
            crate::graph::Place::Device(n) if n < 63 => Some(n as usize),
            crate::graph::Place::Host(0) => Some(63),
            _ => None,
        }
    }

    /// The pool's index in the graph's list (a graph that validated has every pool
    /// its tasks use).
    #[inline]
    fn index(&self, place: Pool) -> usize {
        match PoolSlots::slot(place).map(|s| self.slots[s]) {
            Some(index) if index != u8::MAX => index as usize,
            _ => self.keys.iter().position(|&k| k == place.key()).unwrap_or(0),
        }
    }
}

/// Every task's ready queue (into `queue_of`), and each queue's (resource, pool or
/// `SHARED`): one queue per resource, split by pool on resources whose tasks acquire in
/// several pools (only graphs over several devices have such resources: one disk
/// serving them all).
fn queues(graph: &TaskGraph, pools: &PoolSlots, queue_of: &mut Vec<u32>) -> Vec<(u32, u32)> {
    // Each task's resource first; on a resource split by pool it becomes its queue below.
    graph.task_resource_indices_into(queue_of);
    let resources = graph.resources.len();
    if graph.device_count() <= 1 {
        // One device: no resource serves two devices' pools; one queue per resource,
        // without reading every task's memory operations.
        return (0..resources as u32).map(|r| (r, SHARED)).collect();
    }
    let slots = graph.pools.len() + 1; // per resource: no pool, then each pool
    let first_slot = |id: usize| graph.tasks[id].acquire.first().map_or(0, |m| pools.index(m.pool) + 1);
    let mut pools_used = vec![0u64; resources];
    for (id, &r) in queue_of.iter().enumerate() {
        let slot = first_slot(id);
        if slot > 0 {
            pools_used[r as usize] |= 1 << (slot - 1).min(63);
        }
    }
    let mut queue_index = vec![u32::MAX; resources * slots];
    let mut keys: Vec<(u32, u32)> = Vec::new();
    for (id, queue) in queue_of.iter_mut().enumerate() {
        let r = *queue;
        let split = pools_used[r as usize].count_ones() > 1;
        let slot = if split { first_slot(id) } else { 0 };
        let index = &mut queue_index[r as usize * slots + slot];
        if *index == u32::MAX {
            *index = keys.len() as u32;
            let pool = if !split {
                SHARED
            } else if slot == 0 {
                u32::MAX
            } else {
                slot as u32 - 1
            };
            keys.push((r, pool));
        }
        *queue = *index;
    }
    keys
}
