//! Discrete-event replay of a `TaskGraph` on modelled resources and memory pools.
//!
//! Time is integer nanoseconds. Each resource has a number of lanes (copy streams,
//! I/O queue depth, one for compute). Transfers on one resource share its
//! bandwidth: with `n` tasks active, each drains its work at the link's aggregate
//! rate for the requests in flight, divided by `n` (processor sharing). Compute runs
//! at its nominal rate, slowed by the profile's interference factor while a
//! transfer competes for the same memory; disk reads follow the profile's
//! under-compute curve while compute shares the CPU with the reading threads, and
//! copies in opposite directions slow each other by the profile's duplex factor.
//!
//! Dispatch follows `ferry_core::dispatch` — the same code the engine's scheduler
//! runs: on each resource the ready task with the lowest id starts when a lane is
//! free and its memory fits; no task overtakes it on that resource.
//!
//! Tie-breaking at equal times is explicit: (1) time; (2) completions before
//! dispatches, so memory released at t is available to tasks starting at t;
//! (3) among completions, ascending task id; among dispatches, ascending task id.
//! The same graph and costs therefore always give the identical trace.

use ferry_core::dispatch::Dispatcher;
use ferry_core::graph::TaskGraph;
use ferry_core::trace::{Span, Trace, TraceSource};

use crate::cost::{CostModel, TaskCost};

/// Why a simulation could not finish.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    DoesNotFit(#[from] ferry_core::CoreError),
    /// Memory ran out with every running task waiting on another: the message names
    /// the pool, the task that cannot start and the shortfall.
    #[error("deadlock: {message}")]
    Deadlock { pool: String, message: String },
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

/// Replays `graph` with the durations of `cost`.
pub fn simulate(graph: &TaskGraph, cost: &CostModel) -> Result<SimOutput, SimError> {
    graph.check_fits()?;
    let costs = cost.graph_costs(graph);
    let task_count = graph.tasks.len();

    // Bandwidth of every (curve, request size) the graph uses, by requests in flight,
    // computed once: the event loop only indexes.
    let max_lanes = graph.resources.iter().map(|r| r.lanes).max().unwrap_or(1).max(1);
    // A graph uses a handful of distinct (curve, request size) pairs: a linear search beats hashing.
    let mut table_keys: Vec<(crate::cost::Curve, u64)> = Vec::new();
    // Per key: bandwidth by requests in flight alone, and while interfering compute runs.
    let mut bandwidth_tables: Vec<[Vec<f64>; 2]> = Vec::new();
    let bandwidth_row: Vec<u32> = costs
        .iter()
        .map(|c| match *c {
            TaskCost::Transfer { curve, chunk_bytes, .. } => {
                let key = (curve, chunk_bytes);
                match table_keys.iter().position(|k| *k == key) {
                    Some(i) => i as u32,
                    None => {
                        table_keys.push(key);
                        let table = |curve| (1..=max_lanes).map(|n| cost.bandwidth(curve, chunk_bytes, n)).collect();
                        bandwidth_tables.push([table(curve), table(cost.under_compute(curve))]);
                        bandwidth_tables.len() as u32 - 1
                    }
                }
            }
            TaskCost::Compute { .. } => u32::MAX,
        })
        .collect();

    // Resources are indexed by their position in the graph's list.
    let resources: Vec<_> = graph.resources.iter().map(|r| r.resource).collect();
    let count = resources.len();
    let mut dispatcher = Dispatcher::new(graph);
    let resource_of: Vec<usize> = (0..task_count as u32).map(|id| dispatcher.resource_of(id)).collect();
    let lanes: Vec<u32> = graph.resources.iter().map(|r| r.lanes.max(1)).collect();
    let is_transfer: Vec<bool> = resources.iter().map(|r| r.is_transfer()).collect();
    let mut active: Vec<Vec<Active>> = vec![Vec::new(); count];
    let slowdown: Vec<f64> = resources.iter().map(|&r| cost.compute_slowdown(r)).collect();
    // interferes[c * count + t]: a transfer on t slows compute on c (and c's compute
    // slows t's reads). Flat: the event loop reads it for every pair.
    let interferes: Vec<bool> =
        resources.iter().flat_map(|&c| resources.iter().map(move |&t| cost.interferes(t, c))).collect();

    // Copies in opposite directions over one link slow each other when it is not fully duplex.
    let duplex_slowdown = cost.profile.interference.copy_duplex_slowdown;
    let duplex_partner: Vec<Option<usize>> =
        resources.iter().map(|r| r.reverse().and_then(|back| resources.iter().position(|&o| o == back))).collect();

    let mut spans = vec![Span { task: 0, lane: 0, start_ns: 0, end_ns: 0 }; task_count];
    let mut time: u64 = 0;
    let mut events: u64 = 0;
    let mut completed: Vec<(u32, u32)> = Vec::new();
    let mut transfer_active = vec![false; count];
    let mut compute_active = vec![false; count];

    while !dispatcher.is_finished() {
        dispatcher.dispatch(|id, lane| {
            let remaining = match costs[id as usize] {
                TaskCost::Transfer { work_bytes, .. } => work_bytes,
                TaskCost::Compute { nominal_ns } => nominal_ns,
            };
            active[resource_of[id as usize]].push(Active { task: id, lane, remaining, rate: 1.0, finish_ns: 0 });
            spans[id as usize] = Span { task: id, lane, start_ns: time, end_ns: time };
            events += 1;
        });

        if active.iter().all(Vec::is_empty) {
            let stall = dispatcher.stall();
            return Err(SimError::Deadlock { pool: graph.pool_label(stall.pool), message: stall.message });
        }

        // Rates for the current set of active tasks.
        for r in 0..count {
            transfer_active[r] = is_transfer[r] && !active[r].is_empty();
            compute_active[r] = !is_transfer[r] && !active[r].is_empty();
        }
        for r in 0..count {
            let n = active[r].len();
            if n == 0 {
                continue;
            }
            if is_transfer[r] {
                let requests: u64 = active[r]
                    .iter()
                    .map(|a| match costs[a.task as usize] {
                        TaskCost::Transfer { requests, .. } => requests,
                        TaskCost::Compute { .. } => 1,
                    })
                    .sum();
                let in_flight = requests.min(lanes[r] as u64) as u32;
                let contended = (0..count).any(|c| compute_active[c] && interferes[c * count + r]) as usize;
                let duplex = match duplex_partner[r] {
                    Some(other) if duplex_slowdown > 0.0 && transfer_active[other] => 1.0 + duplex_slowdown,
                    _ => 1.0,
                };
                for a in active[r].iter_mut() {
                    let row = bandwidth_row[a.task as usize] as usize;
                    a.rate = bandwidth_tables[row][contended][in_flight as usize - 1] / n as f64 / duplex;
                }
            } else {
                let slowed =
                    slowdown[r] > 0.0 && (0..count).any(|t| transfer_active[t] && interferes[r * count + t]);
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
        for list in active.iter_mut() {
            let mut i = 0;
            while i < list.len() {
                let a = &mut list[i];
                if a.finish_ns == next {
                    completed.push((a.task, a.lane));
                    list.swap_remove(i);
                } else {
                    a.remaining -= a.rate * elapsed;
                    i += 1;
                }
            }
        }
        time = next;
        completed.sort_unstable();
        for &(id, lane) in &completed {
            spans[id as usize].end_ns = time;
            dispatcher.complete(id, lane);
            events += 1;
        }
        // Keep the active lists in id order so iteration (and float rounding) is deterministic.
        for list in active.iter_mut().filter(|l| l.len() > 1) {
            list.sort_unstable_by_key(|a| a.task);
        }
    }
    Ok(SimOutput { trace: Trace { source: TraceSource::Predicted, spans }, events })
}
