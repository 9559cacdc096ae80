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
    /// More resources than the simulator's bit sets hold (about 15 devices).
    #[error("the plan's graph has {0} resources; the simulator handles at most 64 (about 15 devices)")]
    TooManyResources(usize),
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

/// What the event loop needs to know of every resource, computed once per graph.
/// Sets of resources are bit masks (a graph has at most 64 resources), so deciding
/// whether anything slows a resource is one AND, whatever the number of devices.
struct ResourceTable {
    count: usize,
    lanes: Vec<u32>,
    /// Bit r: resource r moves bytes (a link or a disk), not compute.
    transfers: u64,
    /// Per transfer r: the compute resources whose work slows its reads.
    slowed_by_compute: Vec<u64>,
    /// Per compute resource r: the transfers that slow it, and by how much.
    slowed_by_transfers: Vec<u64>,
    slowdown: Vec<f64>,
    /// Per link: the opposite direction, whose copies slow it by the duplex factor.
    duplex_partner: Vec<Option<usize>>,
    duplex_slowdown: f64,
}

impl ResourceTable {
    fn new(graph: &TaskGraph, cost: &CostModel) -> Result<ResourceTable, SimError> {
        let resources: Vec<_> = graph.resources.iter().map(|r| r.resource).collect();
        let count = resources.len();
        if count > 64 {
            return Err(SimError::TooManyResources(count));
        }
        let mask = |f: &dyn Fn(usize) -> bool| (0..count).filter(|&i| f(i)).fold(0u64, |m, i| m | 1 << i);
        Ok(ResourceTable {
            count,
            lanes: graph.resources.iter().map(|r| r.lanes.max(1)).collect(),
            transfers: mask(&|i| resources[i].is_transfer()),
            slowed_by_compute: (0..count).map(|t| mask(&|c| cost.interferes(resources[t], resources[c]))).collect(),
            slowed_by_transfers: (0..count).map(|c| mask(&|t| cost.interferes(resources[t], resources[c]))).collect(),
            slowdown: resources.iter().map(|&r| cost.compute_slowdown(r)).collect(),
            duplex_partner: resources
                .iter()
                .map(|r| r.reverse().and_then(|back| resources.iter().position(|&o| o == back)))
                .collect(),
            duplex_slowdown: cost.profile.interference.copy_duplex_slowdown,
        })
    }

    /// Sets the rate of every active task for the current set of active tasks (`busy`:
    /// the resources that have some).
    fn set_rates(
        &self,
        busy: u64,
        active: &mut [Vec<Active>],
        costs: &[TaskCost],
        bandwidth_row: &[u32],
        bandwidth_tables: &[[Vec<f64>; 2]],
    ) {
        let transfer_active = busy & self.transfers;
        let compute_active = busy & !self.transfers;
        for r in bits(busy) {
            let n = active[r].len() as f64;
            if transfer_active & 1 << r != 0 {
                let requests: u64 = active[r]
                    .iter()
                    .map(|a| match costs[a.task as usize] {
                        TaskCost::Transfer { requests, .. } => requests,
                        TaskCost::Compute { .. } => 1,
                    })
                    .sum();
                let in_flight = requests.min(self.lanes[r] as u64) as usize;
                let contended = (compute_active & self.slowed_by_compute[r] != 0) as usize;
                let duplex = match self.duplex_partner[r] {
                    Some(other) if self.duplex_slowdown > 0.0 && transfer_active & 1 << other != 0 => {
                        1.0 + self.duplex_slowdown
                    }
                    _ => 1.0,
                };
                for a in active[r].iter_mut() {
                    let row = bandwidth_row[a.task as usize] as usize;
                    a.rate = bandwidth_tables[row][contended][in_flight - 1] / n / duplex;
                }
            } else {
                let slowed = self.slowdown[r] > 0.0 && transfer_active & self.slowed_by_transfers[r] != 0;
                let rate = if slowed { 1.0 / (1.0 + self.slowdown[r]) } else { 1.0 };
                for a in active[r].iter_mut() {
                    a.rate = rate;
                }
            }
        }
    }
}

/// The set bits of `mask`, lowest first.
fn bits(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (mask != 0).then(|| {
            let bit = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            bit
        })
    })
}

/// Bandwidth of every (curve, request size) the graph uses, by requests in flight,
/// computed once so the event loop only indexes: per task its row (`u32::MAX` for
/// compute), per row the rates alone and while interfering compute runs.
#[allow(clippy::type_complexity)]
fn bandwidth_tables(graph: &TaskGraph, cost: &CostModel, costs: &[TaskCost]) -> (Vec<u32>, Vec<[Vec<f64>; 2]>) {
    let max_lanes = graph.resources.iter().map(|r| r.lanes).max().unwrap_or(1).max(1);
    // A graph uses a handful of distinct (curve, request size) pairs: a linear search beats hashing.
    let mut table_keys: Vec<(crate::cost::Curve, u64)> = Vec::new();
    let mut tables: Vec<[Vec<f64>; 2]> = Vec::new();
    let rows = costs
        .iter()
        .map(|c| match *c {
            TaskCost::Transfer { curve, chunk_bytes, .. } => {
                let key = (curve, chunk_bytes);
                match table_keys.iter().position(|k| *k == key) {
                    Some(i) => i as u32,
                    None => {
                        table_keys.push(key);
                        let table = |curve| (1..=max_lanes).map(|n| cost.bandwidth(curve, chunk_bytes, n)).collect();
                        tables.push([table(curve), table(cost.under_compute(curve))]);
                        tables.len() as u32 - 1
                    }
                }
            }
            TaskCost::Compute { .. } => u32::MAX,
        })
        .collect();
    (rows, tables)
}

/// Replays `graph` with the durations of `cost`.
pub fn simulate(graph: &TaskGraph, cost: &CostModel) -> Result<SimOutput, SimError> {
    graph.check_fits()?;
    let costs = cost.graph_costs(graph);
    let task_count = graph.tasks.len();

    let (bandwidth_row, bandwidth_tables) = bandwidth_tables(graph, cost, &costs);

    let table = ResourceTable::new(graph, cost)?;
    let mut dispatcher = Dispatcher::new(graph);
    let mut active: Vec<Vec<Active>> = vec![Vec::new(); table.count];
    let mut spans = vec![Span { task: 0, lane: 0, start_ns: 0, end_ns: 0 }; task_count];
    let mut time: u64 = 0;
    let mut events: u64 = 0;
    let mut completed: Vec<(u32, u32)> = Vec::new();

    // Bit r: resource r has active tasks. Kept as tasks start and end, so every step
    // below visits only busy resources, in ascending order (as iteration order fixes
    // float rounding, the order is part of determinism).
    let mut busy: u64 = 0;
    while !dispatcher.is_finished() {
        dispatcher.dispatch(|id, lane, resource| {
            let remaining = match costs[id as usize] {
                TaskCost::Transfer { work_bytes, .. } => work_bytes,
                TaskCost::Compute { nominal_ns } => nominal_ns,
            };
            active[resource].push(Active { task: id, lane, remaining, rate: 1.0, finish_ns: 0 });
            busy |= 1 << resource;
            spans[id as usize] = Span { task: id, lane, start_ns: time, end_ns: time };
            events += 1;
        });

        if busy == 0 {
            let stall = dispatcher.stall();
            return Err(SimError::Deadlock { pool: graph.pool_label(stall.pool), message: stall.message });
        }
        table.set_rates(busy, &mut active, &costs, &bandwidth_row, &bandwidth_tables);

        // Next completion.
        let mut next = u64::MAX;
        for r in bits(busy) {
            for a in active[r].iter_mut() {
                a.finish_ns = time + (a.remaining / a.rate).ceil() as u64;
                next = next.min(a.finish_ns);
            }
        }
        let elapsed = (next - time) as f64;
        completed.clear();
        for r in bits(busy) {
            let list = &mut active[r];
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
            if list.is_empty() {
                busy &= !(1 << r);
            } else if list.len() > 1 {
                // Keep the active lists in id order so iteration (and float rounding) is
                // deterministic.
                list.sort_unstable_by_key(|a| a.task);
            }
        }
        time = next;
        completed.sort_unstable();
        for &(id, lane) in &completed {
            spans[id as usize].end_ns = time;
            dispatcher.complete(id, lane);
            events += 1;
        }
    }
    Ok(SimOutput { trace: Trace { source: TraceSource::Predicted, spans }, events })
}
