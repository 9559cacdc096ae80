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

use std::cell::Cell;

use ferry_core::dispatch::{DispatchTables, Dispatcher};
use ferry_core::graph::TaskGraph;
use ferry_core::trace::{Span, Trace, TraceSource, Usage};

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
    /// The trace's `Usage`, kept as the clock advanced (equal to `Usage::of_trace`).
    pub usage: Usage,
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
    /// Transfers: the task's row in `BandwidthTables`; copied here at start so setting
    /// rates reads nothing but the active list.
    bandwidth_row: u32,
    /// Requests the task keeps in flight, capped at its resource's lanes (the sum over
    /// a resource is capped there too, so capping each term first changes nothing).
    requests: u32,
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
    /// the resources that have some) and when each completes at that rate from `time`;
    /// returns the earliest completion.
    fn set_rates_and_finish(
        &self,
        busy: u64,
        time: u64,
        active: &mut [Vec<Active>],
        bandwidth: &BandwidthTables,
    ) -> u64 {
        let transfer_active = busy & self.transfers;
        let compute_active = busy & !self.transfers;
        let mut next = u64::MAX;
        for r in bits(busy) {
            let list = &mut active[r];
            if transfer_active & 1 << r != 0 {
                let requests: u64 = list.iter().map(|a| a.requests as u64).sum();
                let in_flight = requests.min(self.lanes[r] as u64) as usize;
                let contended = compute_active & self.slowed_by_compute[r] != 0;
                let duplex = match self.duplex_partner[r] {
                    Some(other) if self.duplex_slowdown > 0.0 && transfer_active & 1 << other != 0 => {
                        1.0 + self.duplex_slowdown
                    }
                    _ => 1.0,
                };
                // Dividing by 1 is exact: skipping it leaves every rate bit-identical and
                // saves a division (the loop's dearest instruction) per active task.
                let n = list.len() as f64;
                for a in list.iter_mut() {
                    let mut rate = bandwidth.rate(a.bandwidth_row, contended, in_flight);
                    if n != 1.0 {
                        rate /= n;
                    }
                    if duplex != 1.0 {
                        rate /= duplex;
                    }
                    a.rate = rate;
                    a.finish_ns = time + ceil_ns(a.remaining, rate);
                    next = next.min(a.finish_ns);
                }
            } else {
                let slowed = self.slowdown[r] > 0.0 && transfer_active & self.slowed_by_transfers[r] != 0;
                let rate = if slowed { 1.0 / (1.0 + self.slowdown[r]) } else { 1.0 };
                for a in list.iter_mut() {
                    a.rate = rate;
                    a.finish_ns = time + ceil_ns(a.remaining, rate);
                    next = next.min(a.finish_ns);
                }
            }
        }
        next
    }
}

/// `(remaining / rate).ceil() as u64`, bit for bit, without the division when the rate
/// is 1 (dividing by 1 is exact) and, for the durations that occur (positive, under
/// 2^63 ns), without `f64::ceil`, which without SSE4.1 in the target is a call to a
/// software routine: the truncated integer, plus one when truncating lost a fraction,
/// is the same integer. Anything else (NaN, negative, huge) takes `ceil` itself.
fn ceil_ns(remaining: f64, rate: f64) -> u64 {
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    let ns = if rate == 1.0 { remaining } else { remaining / rate };
    if ns > 0.0 && ns < TWO_POW_63 {
        let whole = ns as i64;
        (whole + ((whole as f64) < ns) as i64) as u64
    } else {
        ns.ceil() as u64
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
/// computed once so the event loop only indexes: per task its row, per row the rates
/// alone and while interfering compute runs, in one flat table (one bounds check, no
/// pointer to follow).
struct BandwidthTables {
    /// Per task: its row (`u32::MAX` for compute).
    row_of: Vec<u32>,
    /// Row-major: row, then contended (0 alone, 1 under compute), then requests in
    /// flight − 1.
    bytes_per_ns: Vec<f64>,
    max_lanes: usize,
}

impl BandwidthTables {
    /// `row_of`: a buffer to reuse (cleared first).
    fn new(graph: &TaskGraph, cost: &CostModel, costs: &[TaskCost], mut row_of: Vec<u32>) -> BandwidthTables {
        let max_lanes = graph.resources.iter().map(|r| r.lanes).max().unwrap_or(1).max(1);
        // A graph uses a handful of distinct (curve, request size) pairs: a linear search beats hashing.
        let mut table_keys: Vec<(crate::cost::Curve, u64)> = Vec::new();
        let mut bytes_per_ns: Vec<f64> = Vec::new();
        row_of.clear();
        row_of.extend(costs.iter().map(|c| match *c {
            TaskCost::Transfer { curve, chunk_bytes, .. } => {
                let key = (curve, chunk_bytes);
                match table_keys.iter().position(|k| *k == key) {
                    Some(i) => i as u32,
                    None => {
                        table_keys.push(key);
                        for curve in [curve, cost.under_compute(curve)] {
                            bytes_per_ns.extend((1..=max_lanes).map(|n| cost.bandwidth(curve, chunk_bytes, n)));
                        }
                        table_keys.len() as u32 - 1
                    }
                }
            }
            TaskCost::Compute { .. } => u32::MAX,
        }));
        BandwidthTables { row_of, bytes_per_ns, max_lanes: max_lanes as usize }
    }

    /// Aggregate bytes/ns of `row` with `in_flight` (≥ 1) requests in flight.
    fn rate(&self, row: u32, contended: bool, in_flight: usize) -> f64 {
        self.bytes_per_ns[(row as usize * 2 + contended as usize) * self.max_lanes + in_flight - 1]
    }
}

/// The simulator's tables over tasks, kept per thread between simulations: the tuner
/// replays thousands of graphs, and allocating these afresh each time cost page faults
/// (the allocator returns large freed blocks to the system and faults them in again).
/// Holds the memory of the largest graph the thread simulated.
#[derive(Default)]
struct Workspace {
    costs: Vec<TaskCost>,
    bandwidth_rows: Vec<u32>,
    dispatch: DispatchTables,
    active: Vec<Vec<Active>>,
    completed: Vec<(u32, u32)>,
}

thread_local! {
    static WORKSPACE: Cell<Workspace> = Cell::default();
}

/// Replays `graph` with the durations of `cost`.
pub fn simulate(graph: &TaskGraph, cost: &CostModel) -> Result<SimOutput, SimError> {
    graph.check_fits()?;
    let mut workspace = WORKSPACE.take();
    let result = replay(graph, cost, &mut workspace);
    WORKSPACE.set(workspace);
    result
}

/// The event loop of `simulate`, over the thread's reused tables.
fn replay(graph: &TaskGraph, cost: &CostModel, workspace: &mut Workspace) -> Result<SimOutput, SimError> {
    let costs = &mut workspace.costs;
    cost.graph_costs_into(graph, costs);
    let bandwidth = BandwidthTables::new(graph, cost, costs, std::mem::take(&mut workspace.bandwidth_rows));
    let table = ResourceTable::new(graph, cost)?;
    let mut dispatcher = Dispatcher::with_tables(graph, std::mem::take(&mut workspace.dispatch));
    let active = &mut workspace.active;
    active.iter_mut().for_each(Vec::clear);
    active.resize_with(table.count, Vec::new);
    let completed = &mut workspace.completed;
    let mut spans = vec![Span { task: 0, lane: 0, start_ns: 0, end_ns: 0 }; graph.tasks.len()];
    let mut time: u64 = 0;
    let mut events: u64 = 0;
    let resident: Vec<u64> = graph.pools.iter().map(|p| p.resident_bytes()).collect();
    let mut usage = Usage { busy_ns: vec![0; table.count], held_peak_bytes: vec![0; resident.len()] };

    // Bit r: resource r has active tasks. Kept as tasks start and end, so every step
    // below visits only busy resources, in ascending order (as iteration order fixes
    // float rounding, the order is part of determinism).
    let mut busy: u64 = 0;
    while !dispatcher.is_finished() {
        dispatcher.dispatch(|id, lane, resource| {
            let (remaining, requests) = match costs[id as usize] {
                TaskCost::Transfer { work_bytes, requests, .. } => (work_bytes, requests),
                TaskCost::Compute { nominal_ns } => (nominal_ns, 1),
            };
            let requests = requests.min(table.lanes[resource] as u64) as u32;
            let bandwidth_row = bandwidth.row_of[id as usize];
            active[resource].push(Active {
                task: id,
                lane,
                remaining,
                rate: 1.0,
                finish_ns: 0,
                bandwidth_row,
                requests,
            });
            busy |= 1 << resource;
            spans[id as usize] = Span { task: id, lane, start_ns: time, end_ns: time };
            events += 1;
        });

        if busy == 0 {
            let stall = dispatcher.stall();
            return Err(SimError::Deadlock { pool: graph.pool_label(stall.pool), message: stall.message });
        }
        let next = table.set_rates_and_finish(busy, time, active, &bandwidth);
        if next > time {
            // The instant `time` is over (tasks that start and end in it have ended):
            // what the pools hold now is what they hold until `next`.
            note_held(&mut usage, dispatcher.used_bytes(), &resident);
            for r in bits(busy) {
                usage.busy_ns[r] += next - time;
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
        for &(id, lane) in completed.iter() {
            spans[id as usize].end_ns = time;
            dispatcher.complete(id, lane);
            events += 1;
        }
    }
    note_held(&mut usage, dispatcher.used_bytes(), &resident);
    workspace.dispatch = dispatcher.into_tables();
    workspace.bandwidth_rows = bandwidth.row_of;
    Ok(SimOutput { trace: Trace { source: TraceSource::Predicted, spans }, usage, events })
}

/// Raises each pool's peak to what tasks hold in it now beside its resident set.
fn note_held(usage: &mut Usage, used: &[u64], resident: &[u64]) {
    for ((peak, &used), &resident) in usage.held_peak_bytes.iter_mut().zip(used).zip(resident) {
        *peak = (*peak).max(used.saturating_sub(resident));
    }
}
