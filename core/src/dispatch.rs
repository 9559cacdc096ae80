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
//! `Dispatcher` keeps that state; the simulator drives it from its event loop, the
//! engine from its scheduler thread.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::graph::{Pool, TaskGraph, TaskId};
use crate::units::format_bytes;

/// Dispatch state over one graph. Resources and pools are indexed by their position
/// in the graph's lists (`TaskGraph::resource_index`, `pool_index`), looked up once.
pub struct Dispatcher<'g> {
    graph: &'g TaskGraph,
    remaining_deps: Vec<u32>,
    dependent_start: Vec<u32>,
    dependents: Vec<u32>,
    /// Resource index of every task.
    resource_of: Vec<u32>,
    /// Ready queue of every task: one per resource, except that a resource whose tasks
    /// acquire memory in several pools (one disk serving several devices) gets one
    /// queue per pool and one for tasks that acquire none.
    queue_of: Vec<u32>,
    queues: Vec<QueueInfo>,
    /// Scratch for `dispatch`: which queues and resources are blocked this round.
    blocked: Vec<bool>,
    resource_blocked: Vec<bool>,
    /// Every task's acquisitions and releases as (pool index, bytes), task by task.
    acquire: MemoryOps,
    release: MemoryOps,
    ready: Vec<BinaryHeap<Reverse<TaskId>>>,
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

impl<'g> Dispatcher<'g> {
    pub fn new(graph: &'g TaskGraph) -> Dispatcher<'g> {
        let count = graph.tasks.len();
        let remaining_deps: Vec<u32> = graph.tasks.iter().map(|t| t.deps.len() as u32).collect();
        // Dependents in compressed form.
        let mut dependent_start = vec![0u32; count + 1];
        for task in &graph.tasks {
            for &dep in &task.deps {
                dependent_start[dep as usize + 1] += 1;
            }
        }
        for i in 0..count {
            dependent_start[i + 1] += dependent_start[i];
        }
        let mut fill = dependent_start.clone();
        let mut dependents = vec![0u32; dependent_start[count] as usize];
        for (id, task) in graph.tasks.iter().enumerate() {
            for &dep in &task.deps {
                dependents[fill[dep as usize] as usize] = id as u32;
                fill[dep as usize] += 1;
            }
        }
        let resource_of = graph.task_resource_indices();
        let acquire = MemoryOps::new(graph, |t| &t.acquire);
        let release = MemoryOps::new(graph, |t| &t.release);
        // Pools each resource's tasks acquire in: split a resource's queue only if several.
        let first_pool = |id: usize| acquire.of(id as TaskId).first().map_or(u32::MAX, |&(p, _)| p);
        let mut pools_of: Vec<Vec<u32>> = vec![Vec::new(); graph.resources.len()];
        for id in 0..count {
            let (r, p) = (resource_of[id] as usize, first_pool(id));
            if p != u32::MAX && !pools_of[r].contains(&p) {
                pools_of[r].push(p);
            }
        }
        let mut queue_keys: Vec<(u32, u32)> = Vec::new();
        let queue_of: Vec<u32> = (0..count)
            .map(|id| {
                let r = resource_of[id];
                let split = pools_of[r as usize].len() > 1;
                let key = (r, if split { first_pool(id) } else { SHARED });
                match queue_keys.iter().position(|k| *k == key) {
                    Some(q) => q as u32,
                    None => {
                        queue_keys.push(key);
                        queue_keys.len() as u32 - 1
                    }
                }
            })
            .collect();
        let mut ready: Vec<BinaryHeap<Reverse<TaskId>>> = vec![BinaryHeap::new(); queue_keys.len()];
        for (id, &deps) in remaining_deps.iter().enumerate() {
            if deps == 0 {
                ready[queue_of[id] as usize].push(Reverse(id as TaskId));
            }
        }
        let lanes: Vec<usize> = graph.resources.iter().map(|r| r.lanes.max(1) as usize).collect();
        Dispatcher {
            graph,
            remaining_deps,
            dependent_start,
            dependents,
            resource_of,
            queue_of,
            queues: queue_keys
                .iter()
                .map(|&(r, p)| QueueInfo { resource: r, acquires_only_its_pool: p != SHARED && p != u32::MAX })
                .collect(),
            blocked: vec![false; queue_keys.len()],
            resource_blocked: vec![false; graph.resources.len()],
            acquire,
            release,
            ready,
            lane_busy: lanes.iter().map(|&n| vec![false; n]).collect(),
            free_lanes: lanes,
            running: 0,
            capacity: graph.pools.iter().map(|p| p.capacity_bytes).collect(),
            used: graph.pools.iter().map(|p| p.resident_bytes()).collect(),
            finished: 0,
        }
    }

    /// The resource index (position in the graph's `resources`) of `task`.
    pub fn resource_of(&self, task: TaskId) -> usize {
        self.resource_of[task as usize] as usize
    }

    /// Starts every task the rule allows now, lowest id first; `start(task, lane)` is
    /// called for each, after its memory has been acquired.
    pub fn dispatch(&mut self, mut start: impl FnMut(TaskId, u32)) {
        // A queue is blocked once its head did not fit; a resource once any of its
        // queues is, which blocks its other queues except those of another pool.
        self.blocked.fill(false);
        self.resource_blocked.fill(false);
        loop {
            let mut best: Option<(TaskId, usize)> = None;
            for (q, queue) in self.ready.iter().enumerate() {
                let info = self.queues[q];
                let r = info.resource as usize;
                if self.blocked[q]
                    || self.free_lanes[r] == 0
                    || (self.resource_blocked[r] && !info.acquires_only_its_pool)
                {
                    continue;
                }
                if let Some(&Reverse(id)) = queue.peek() {
                    if best.is_none_or(|(b, _)| id < b) {
                        best = Some((id, q));
                    }
                }
            }
            let Some((id, q)) = best else { return };
            let r = self.queues[q].resource as usize;
            let acquire = self.acquire.of(id);
            let fits = acquire.iter().all(|&(p, bytes)| self.used[p as usize] + bytes <= self.capacity[p as usize]);
            if !fits {
                self.blocked[q] = true;
                self.resource_blocked[r] = true;
                continue;
            }
            self.ready[q].pop();
            for &(p, bytes) in acquire {
                self.used[p as usize] += bytes;
            }
            let lane = self.lane_busy[r].iter().position(|b| !b).unwrap_or(0);
            self.lane_busy[r][lane] = true;
            self.free_lanes[r] -= 1;
            self.running += 1;
            start(id, lane as u32);
        }
    }

    /// Records that `task`, which ran on `lane`, ended: frees the lane and the memory it
    /// releases, and readies the dependents it was the last dependency of.
    pub fn complete(&mut self, task: TaskId, lane: u32) {
        let r = self.resource_of[task as usize] as usize;
        self.lane_busy[r][lane as usize] = false;
        self.free_lanes[r] += 1;
        self.running -= 1;
        self.finished += 1;
        for &(p, bytes) in self.release.of(task) {
            self.used[p as usize] -= bytes;
        }
        let (from, to) =
            (self.dependent_start[task as usize] as usize, self.dependent_start[task as usize + 1] as usize);
        for &dependent in &self.dependents[from..to] {
            self.remaining_deps[dependent as usize] -= 1;
            if self.remaining_deps[dependent as usize] == 0 {
                self.ready[self.queue_of[dependent as usize] as usize].push(Reverse(dependent));
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

/// Queue key of tasks on a resource that is not split by pool.
const SHARED: u32 = u32::MAX - 1;

/// A ready queue's resource, and whether its tasks all acquire in one pool of a
/// resource split by pool (they may then pass a blocked queue of another pool).
#[derive(Clone, Copy)]
struct QueueInfo {
    resource: u32,
    acquires_only_its_pool: bool,
}

/// Memory operations of every task in compressed form: task `t`'s are
/// `ops[start[t]..start[t + 1]]`, with pools as indices.
struct MemoryOps {
    start: Vec<u32>,
    ops: Vec<(u32, u64)>,
}

impl MemoryOps {
    fn new(graph: &TaskGraph, of: impl Fn(&crate::graph::Task) -> &Vec<crate::graph::MemOp>) -> MemoryOps {
        let mut start = Vec::with_capacity(graph.tasks.len() + 1);
        let mut ops = Vec::new();
        let keys = graph.pool_keys();
        let index = |pool: crate::graph::Pool| keys.iter().position(|&k| k == pool.key()).unwrap_or(usize::MAX) as u32;
        start.push(0);
        for task in &graph.tasks {
            ops.extend(of(task).iter().map(|m| (index(m.pool), m.bytes)));
            start.push(ops.len() as u32);
        }
        MemoryOps { start, ops }
    }

    fn of(&self, task: TaskId) -> &[(u32, u64)] {
        &self.ops[self.start[task as usize] as usize..self.start[task as usize + 1] as usize]
    }
}
