//! Discrete-event replay of a `TaskGraph` on modelled resources and memory pools.
//!
//! Time is integer nanoseconds. Each resource has a number of lanes (copy streams,
//! I/O queue depth, one for compute). Transfers on one resource share its
//! bandwidth: with `n` tasks active, each drains its work at the link's aggregate
//! rate for the requests in flight, divided by `n` (processor sharing). Compute runs
//! at its nominal rate, slowed by the profile's interference factor while a
//! transfer competes for the same memory.
//!
//! Dispatch rule — shared with the engine, so both run the graph the same way: on
//! each resource, the ready task with the **lowest id** (program order) is next; it
//! starts when a lane is free and its memory fits its pool, otherwise that resource
//! waits (no task overtakes it on the same resource). Across resources, candidates
//! are tried in ascending task id.
//!
//! Tie-breaking at equal times is explicit: (1) time; (2) completions before
//! dispatches, so memory released at t is available to tasks starting at t;
//! (3) among completions, ascending task id; among dispatches, ascending task id.
//! The same graph and costs therefore always give the identical trace.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use ferry_core::graph::{Pool, Resource, TaskGraph};
use ferry_core::trace::{Span, Trace, TraceSource};
use ferry_core::units::format_bytes;

use crate::cost::{CostModel, TaskCost};

/// Why a simulation could not finish.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    DoesNotFit(#[from] ferry_core::CoreError),
    /// Memory ran out with every running task waiting on another: the message names
    /// the pool, the task that cannot start and the shortfall.
    #[error("deadlock: {message}")]
    Deadlock { pool: &'static str, message: String },
}

/// A simulated trace and how many events it took.
#[derive(Debug, Clone)]
pub struct SimOutput {
    pub trace: Trace,
    /// Task starts plus task completions.
    pub events: u64,
}

#[derive(Clone, Copy)]
struct Active {
    task: u32,
    lane: u32,
    /// Work left: bytes for transfers, nominal ns for compute.
    remaining: f64,
    /// Work per ns at the current state.
    rate: f64,
    /// When it completes at the current rate.
    finish_ns: u64,
}

const RESOURCES: usize = Resource::ALL.len();

/// Replays `graph` with the durations of `cost`.
pub fn simulate(graph: &TaskGraph, cost: &CostModel) -> Result<SimOutput, SimError> {
    graph.check_fits()?;
    let costs = cost.graph_costs(graph);
    let task_count = graph.tasks.len();

    // Dependents in compressed form, and the count of unfinished dependencies.
    let mut remaining_deps: Vec<u32> = graph.tasks.iter().map(|t| t.deps.len() as u32).collect();
    let mut dependent_start = vec![0u32; task_count + 1];
    for task in &graph.tasks {
        for &dep in &task.deps {
            dependent_start[dep as usize + 1] += 1;
        }
    }
    for i in 0..task_count {
        dependent_start[i + 1] += dependent_start[i];
    }
    let mut fill = dependent_start.clone();
    let mut dependents = vec![0u32; dependent_start[task_count] as usize];
    for (id, task) in graph.tasks.iter().enumerate() {
        for &dep in &task.deps {
            dependents[fill[dep as usize] as usize] = id as u32;
            fill[dep as usize] += 1;
        }
    }

    // Bandwidth of every (curve, request size) the graph uses, by requests in flight,
    // computed once: the event loop only indexes.
    let max_lanes = graph.resources.iter().map(|r| r.lanes).max().unwrap_or(1).max(1);
    // A graph uses a handful of distinct (curve, request size) pairs: a linear search beats hashing.
    let mut table_keys: Vec<(crate::cost::Curve, u64)> = Vec::new();
    let mut bandwidth_tables: Vec<Vec<f64>> = Vec::new();
    let bandwidth_row: Vec<u32> = costs
        .iter()
        .map(|c| match *c {
            TaskCost::Transfer { curve, chunk_bytes, .. } => {
                let key = (curve, chunk_bytes);
                match table_keys.iter().position(|k| *k == key) {
                    Some(i) => i as u32,
                    None => {
                        table_keys.push(key);
                        bandwidth_tables.push((1..=max_lanes).map(|n| cost.bandwidth(curve, chunk_bytes, n)).collect());
                        bandwidth_tables.len() as u32 - 1
                    }
                }
            }
            TaskCost::Compute { .. } => u32::MAX,
        })
        .collect();

    let resource_of: Vec<usize> = graph.tasks.iter().map(|t| t.resource().index()).collect();
    let lanes: [u32; RESOURCES] = std::array::from_fn(|r| graph.lanes(Resource::ALL[r]).max(1));
    let mut ready: [BinaryHeap<Reverse<u32>>; RESOURCES] = Default::default();
    let mut active: [Vec<Active>; RESOURCES] = Default::default();
    let mut lane_busy: [Vec<bool>; RESOURCES] = std::array::from_fn(|r| vec![false; lanes[r] as usize]);
    let capacity: [u64; 2] = std::array::from_fn(|p| graph.pools[p].capacity_bytes);
    let mut used: [u64; 2] = std::array::from_fn(|p| graph.pools[p].resident_bytes());
    let slowdown: [f64; RESOURCES] = std::array::from_fn(|r| cost.compute_slowdown(Resource::ALL[r]));
    let interferes: [[bool; RESOURCES]; RESOURCES] =
        std::array::from_fn(|c| std::array::from_fn(|t| cost.interferes(Resource::ALL[t], Resource::ALL[c])));

    for (id, deps) in remaining_deps.iter().enumerate() {
        if *deps == 0 {
            ready[resource_of[id]].push(Reverse(id as u32));
        }
    }

    let mut spans = vec![Span { task: 0, lane: 0, start_ns: 0, end_ns: 0 }; task_count];
    let mut time: u64 = 0;
    let mut finished = 0usize;
    let mut events: u64 = 0;
    let mut completed: Vec<u32> = Vec::new();

    while finished < task_count {
        // Dispatch: lowest-id candidate first across resources; a resource whose head
        // does not fit its pool waits.
        let mut blocked = [false; RESOURCES];
        loop {
            let mut best: Option<(u32, usize)> = None;
            for r in 0..RESOURCES {
                if blocked[r] || active[r].len() as u32 >= lanes[r] {
                    continue;
                }
                if let Some(&Reverse(id)) = ready[r].peek() {
                    if best.is_none_or(|(b, _)| id < b) {
                        best = Some((id, r));
                    }
                }
            }
            let Some((id, r)) = best else { break };
            let task = &graph.tasks[id as usize];
            let fits = task.acquire.iter().all(|m| used[m.pool.index()] + m.bytes <= capacity[m.pool.index()]);
            if !fits {
                blocked[r] = true;
                continue;
            }
            ready[r].pop();
            for m in &task.acquire {
                used[m.pool.index()] += m.bytes;
            }
            let lane = lane_busy[r].iter().position(|b| !b).unwrap_or(0);
            lane_busy[r][lane] = true;
            let remaining = match costs[id as usize] {
                TaskCost::Transfer { work_bytes, .. } => work_bytes,
                TaskCost::Compute { nominal_ns } => nominal_ns,
            };
            active[r].push(Active { task: id, lane: lane as u32, remaining, rate: 1.0, finish_ns: 0 });
            spans[id as usize] = Span { task: id, lane: lane as u32, start_ns: time, end_ns: time };
            events += 1;
        }

        if active.iter().all(Vec::is_empty) {
            return Err(deadlock(graph, &ready, &used));
        }

        // Rates for the current set of active tasks.
        let transfer_active: [bool; RESOURCES] =
            std::array::from_fn(|r| Resource::ALL[r].is_transfer() && !active[r].is_empty());
        for r in 0..RESOURCES {
            let n = active[r].len();
            if n == 0 {
                continue;
            }
            if Resource::ALL[r].is_transfer() {
                let requests: u64 = active[r]
                    .iter()
                    .map(|a| match costs[a.task as usize] {
                        TaskCost::Transfer { requests, .. } => requests,
                        TaskCost::Compute { .. } => 1,
                    })
                    .sum();
                let in_flight = requests.min(lanes[r] as u64) as u32;
                for a in active[r].iter_mut() {
                    let row = bandwidth_row[a.task as usize] as usize;
                    a.rate = bandwidth_tables[row][in_flight as usize - 1] / n as f64;
                }
            } else {
                let slowed = slowdown[r] > 0.0 && (0..RESOURCES).any(|t| transfer_active[t] && interferes[r][t]);
                let rate = if slowed { 1.0 / (1.0 + slowdown[r]) } else { 1.0 };
                for a in active[r].iter_mut() {
                    a.rate = rate;
                }
            }
        }

        // Next completion.
        let mut next = u64::MAX;
        for a in active.iter_mut().flatten() {
            a.finish_ns = time + (a.remaining / a.rate).ceil() as u64;
            next = next.min(a.finish_ns);
        }
        let elapsed = (next - time) as f64;
        completed.clear();
        for r in 0..RESOURCES {
            let mut i = 0;
            while i < active[r].len() {
                let a = &mut active[r][i];
                if a.finish_ns == next {
                    completed.push(a.task);
                    lane_busy[r][a.lane as usize] = false;
                    active[r].swap_remove(i);
                } else {
                    a.remaining -= a.rate * elapsed;
                    i += 1;
                }
            }
        }
        time = next;
        completed.sort_unstable();
        for &id in &completed {
            let task = &graph.tasks[id as usize];
            spans[id as usize].end_ns = time;
            for m in &task.release {
                used[m.pool.index()] -= m.bytes;
            }
            let (from, to) = (dependent_start[id as usize] as usize, dependent_start[id as usize + 1] as usize);
            for &dependent in &dependents[from..to] {
                remaining_deps[dependent as usize] -= 1;
                if remaining_deps[dependent as usize] == 0 {
                    ready[resource_of[dependent as usize]].push(Reverse(dependent));
                }
            }
            finished += 1;
            events += 1;
        }
        // Keep the active lists in id order so iteration (and float rounding) is deterministic.
        for list in active.iter_mut().filter(|l| l.len() > 1) {
            list.sort_unstable_by_key(|a| a.task);
        }
    }
    Ok(SimOutput { trace: Trace { source: TraceSource::Predicted, spans }, events })
}

/// Explains a stall: the lowest-id ready task whose memory does not fit.
fn deadlock(graph: &TaskGraph, ready: &[BinaryHeap<Reverse<u32>>; RESOURCES], used: &[u64; 2]) -> SimError {
    let head = ready.iter().filter_map(|h| h.peek().map(|Reverse(id)| *id)).min();
    let Some(id) = head else {
        return SimError::DoesNotFit(ferry_core::CoreError::invalid(
            "the task graph stalled with no task ready: a dependency can never finish (a bug in the lowering)",
        ));
    };
    let task = &graph.tasks[id as usize];
    let pool = task
        .acquire
        .iter()
        .find(|m| used[m.pool.index()] + m.bytes > graph.pools[m.pool.index()].capacity_bytes)
        .map_or(Pool::Device, |m| m.pool);
    let spec = graph.pool(pool);
    let need: u64 = task.acquire.iter().filter(|m| m.pool == pool).map(|m| m.bytes).sum();
    let in_use = used[pool.index()];
    let free = spec.capacity_bytes.saturating_sub(in_use);
    let message = format!(
        "{pool} memory is exhausted — task '{task}' needs {need} but only {free} is free (capacity {capacity}, \
         {resident} resident, {held} held by tasks waiting on each other); lower the prefetch depth, the \
         micro-batch size or the chunk size, or give the {pool} pool {short} more",
        pool = pool.name(),
        task = task.label(),
        need = format_bytes(need),
        free = format_bytes(free),
        capacity = format_bytes(spec.capacity_bytes),
        resident = format_bytes(spec.resident_bytes()),
        held = format_bytes(in_use - spec.resident_bytes()),
        short = format_bytes(need.saturating_sub(free)),
    );
    SimError::Deadlock { pool: pool.name(), message }
}
