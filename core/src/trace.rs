//! `Trace` (when each task ran) and `Metrics` (what people read). Simulator and
//! engine both produce a `Trace` over the same `TaskGraph`, and `Metrics::compute`
//! is the single definition of every figure Ferry reports, so predicted and
//! measured numbers mean exactly the same thing.

use serde::{Deserialize, Serialize};

use crate::graph::{Pool, Resource, TaskGraph, TaskId};

/// One task's execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub task: TaskId,
    /// Which of the resource's lanes ran it.
    pub lane: u32,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// Where a trace came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TraceSource {
    Predicted,
    Measured,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub source: TraceSource,
    /// One span per task, indexed like the graph's tasks.
    pub spans: Vec<Span>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceUsage {
    pub resource: Resource,
    /// Union of busy intervals, ns.
    pub busy_ns: u64,
    /// busy_ns ÷ total_ns.
    pub utilization: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolUsage {
    pub pool: Pool,
    pub capacity_bytes: u64,
    pub resident_bytes: u64,
    /// Resident bytes plus the most that tasks held at once.
    pub peak_bytes: u64,
}

/// Every reported figure, defined once (see DESIGN.md "Metrics, defined once").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub source: TraceSource,
    /// Wall time from the first task's start to the last task's end.
    pub total_ns: u64,
    /// End of the prefill's last task: the first token is sampled.
    pub time_to_first_token_ns: u64,
    /// Mean decode-step time after the first token (0 when gen_len is 1).
    pub time_per_output_token_ns: u64,
    pub generated_tokens: u64,
    /// batch × gen_len ÷ total time (prefill included, as FlexGen reports it).
    pub tokens_per_s: f64,
    pub resources: Vec<ResourceUsage>,
    pub pools: Vec<PoolUsage>,
    /// The resource with the highest utilization.
    pub bottleneck: Resource,
}

/// What a trace shows of the resources and pools besides its timing: per resource of
/// the graph (in order) the time its spans cover, overlaps counted once, and per pool
/// (in order) the most bytes tasks held in it at once beside its resident set — taken
/// at the end of each instant, so that at one instant releases count before
/// acquisitions and a task that starts and ends there holds nothing.
///
/// `of_trace` is the definition; the simulator keeps the same figures as its clock
/// advances (the time each resource has a task running; each pool's use as time moves
/// on) instead of sorting every span again, and is tested to give these exactly.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Usage {
    pub busy_ns: Vec<u64>,
    pub held_peak_bytes: Vec<u64>,
}

impl Usage {
    /// `graph`'s usage as `trace` ran it.
    pub fn of_trace(graph: &TaskGraph, trace: &Trace) -> Usage {
        Usage { busy_ns: busy_unions(graph, trace), held_peak_bytes: peaks_dynamic(graph, trace) }
    }
}

impl Metrics {
    /// Computes the metrics of a full trace of `graph` (every decode step present).
    pub fn compute(graph: &TaskGraph, trace: &Trace) -> Metrics {
        Metrics::compute_with(graph, trace, &Usage::of_trace(graph, trace))
    }

    /// `compute` with the trace's `usage` already known (the simulator keeps it).
    pub fn compute_with(graph: &TaskGraph, trace: &Trace, usage: &Usage) -> Metrics {
        let start = trace.spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
        let end = trace.spans.iter().map(|s| s.end_ns).max().unwrap_or(0);
        let total_ns = end - start;
        let step_ends = step_end_times(graph, trace);
        let ttft = step_ends.first().copied().unwrap_or(end) - start;
        let decode_ns = total_ns - ttft;
        let decode_steps = graph.gen_len.saturating_sub(1);
        let tpot = decode_ns.checked_div(decode_steps).unwrap_or(0);
        Metrics::assemble(graph, trace, usage, total_ns, ttft, tpot)
    }

    /// Builds metrics from the timing figures, a trace whose spans give the window, and
    /// its `usage` (the simulator uses this when it extrapolates decode steps).
    pub fn assemble(
        graph: &TaskGraph,
        trace: &Trace,
        usage: &Usage,
        total_ns: u64,
        ttft_ns: u64,
        tpot_ns: u64,
    ) -> Metrics {
        let generated_tokens = graph.batch_size * graph.gen_len;
        let tokens_per_s = if total_ns == 0 { 0.0 } else { generated_tokens as f64 * 1e9 / total_ns as f64 };
        let trace_start = trace.spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
        let trace_end = trace.spans.iter().map(|s| s.end_ns).max().unwrap_or(0);
        let window = (trace_end - trace_start).max(1);
        let resources: Vec<ResourceUsage> = graph
            .resources
            .iter()
            .zip(usage.busy_ns.iter().copied())
            .map(|(spec, busy_ns)| ResourceUsage {
                resource: spec.resource,
                busy_ns,
                utilization: busy_ns as f64 / window as f64,
            })
            .collect();
        let bottleneck = resources
            .iter()
            .max_by(|a, b| a.utilization.total_cmp(&b.utilization).then(b.resource.cmp(&a.resource)))
            .map_or(Resource::DEVICE_COMPUTE, |r| r.resource);
        let pools = graph
            .pools
            .iter()
            .zip(usage.held_peak_bytes.iter().copied())
            .map(|(spec, peak)| PoolUsage {
                pool: spec.pool,
                capacity_bytes: spec.capacity_bytes,
                resident_bytes: spec.resident_bytes(),
                peak_bytes: spec.resident_bytes() + peak,
            })
            .collect();
        Metrics {
            source: trace.source,
            total_ns,
            time_to_first_token_ns: ttft_ns,
            time_per_output_token_ns: tpot_ns,
            generated_tokens,
            tokens_per_s,
            resources,
            pools,
            bottleneck,
        }
    }

    /// Whether the run used several devices (names then carry their numbers).
    fn indexed(&self) -> bool {
        self.pools.iter().filter(|p| p.pool.is_device()).count() > 1
    }

    /// A resource's name for people ("device compute"; "device 1 compute" when the
    /// run used several devices).
    pub fn resource_label(&self, resource: Resource) -> String {
        resource.label(self.indexed())
    }

    pub fn pool_label(&self, pool: Pool) -> String {
        pool.label(self.indexed())
    }

    pub fn utilization(&self, resource: Resource) -> f64 {
        self.resources.iter().find(|r| r.resource == resource).map_or(0.0, |r| r.utilization)
    }

    pub fn pool(&self, pool: Pool) -> Option<&PoolUsage> {
        self.pools.iter().find(|p| p.pool == pool)
    }
}

/// End time of each step present in the trace, in step order (index 0 = prefill).
pub fn step_end_times(graph: &TaskGraph, trace: &Trace) -> Vec<u64> {
    let max_step = graph.tasks.iter().map(|t| t.step).max().unwrap_or(0) as usize;
    let mut ends = vec![0u64; max_step + 1];
    let mut present = vec![false; max_step + 1];
    for span in &trace.spans {
        let step = graph.tasks[span.task as usize].step as usize;
        ends[step] = ends[step].max(span.end_ns);
        present[step] = true;
    }
    ends.into_iter().zip(present).filter(|(_, p)| *p).map(|(e, _)| e).collect()
}

/// Per resource of the graph (in order), the time its spans cover, overlaps counted
/// once. One pass over the spans sorts them into their resources.
fn busy_unions(graph: &TaskGraph, trace: &Trace) -> Vec<u64> {
    let resource_of = graph.task_resource_indices();
    let mut intervals: Vec<Vec<(u64, u64)>> = vec![Vec::new(); graph.resources.len()];
    for s in trace.spans.iter().filter(|s| s.end_ns > s.start_ns) {
        if let Some(list) = intervals.get_mut(resource_of[s.task as usize] as usize) {
            list.push((s.start_ns, s.end_ns));
        }
    }
    intervals
        .into_iter()
        .map(|mut list| {
            list.sort_unstable();
            let mut busy = 0;
            let mut current: Option<(u64, u64)> = None;
            for (start, end) in list {
                match current {
                    Some((cs, ce)) if start <= ce => current = Some((cs, ce.max(end))),
                    Some((cs, ce)) => {
                        busy += ce - cs;
                        current = Some((start, end));
                    }
                    None => current = Some((start, end)),
                }
            }
            busy + current.map_or(0, |(s, e)| e - s)
        })
        .collect()
}

/// Per pool of the graph (in order), the most bytes tasks held in it at once. Releases
/// at an instant are applied before acquisitions at the same instant, as both the
/// simulator and the engine do. One pass over the spans sorts the events into pools.
fn peaks_dynamic(graph: &TaskGraph, trace: &Trace) -> Vec<u64> {
    let mut events: Vec<Vec<(u64, u8, u64)>> = vec![Vec::new(); graph.pools.len()];
    let index_of = |pool: Pool| graph.pools.iter().position(|p| p.pool == pool);
    for span in &trace.spans {
        let task = &graph.tasks[span.task as usize];
        let ops =
            task.acquire.iter().map(|m| (m, span.start_ns, 1)).chain(task.release.iter().map(|m| (m, span.end_ns, 0)));
        for (m, at, is_acquire) in ops {
            if let Some(list) = index_of(m.pool).and_then(|i| events.get_mut(i)) {
                list.push((at, is_acquire, m.bytes));
            }
        }
    }
    events
        .into_iter()
        .map(|mut list| {
            list.sort_unstable();
            let (mut held, mut peak) = (0i128, 0i128);
            for (_, is_acquire, bytes) in list {
                if is_acquire == 1 {
                    held += bytes as i128;
                } else {
                    held -= bytes as i128;
                }
                peak = peak.max(held);
            }
            peak.max(0) as u64
        })
        .collect()
}

/// Chrome trace-event JSON (opens in Perfetto or chrome://tracing): one process per
/// trace, one track (thread) per resource lane, one complete event per task.
pub fn chrome_trace(graph: &TaskGraph, trace: &Trace) -> serde_json::Value {
    let mut events = Vec::new();
    let mut tracks: Vec<(Resource, u32)> = Vec::new();
    for span in &trace.spans {
        let task = &graph.tasks[span.task as usize];
        let track = (task.resource(), span.lane);
        let tid = match tracks.iter().position(|t| *t == track) {
            Some(i) => i,
            None => {
                tracks.push(track);
                tracks.len() - 1
            }
        };
        events.push(serde_json::json!({
            "name": task.label(),
            "cat": task.kind.name(),
            "ph": "X",
            "pid": 1,
            "tid": tid,
            "ts": span.start_ns as f64 / 1000.0,
            "dur": (span.end_ns - span.start_ns) as f64 / 1000.0,
            "args": {
                "task": span.task,
                "bytes": task.bytes,
                "flops": task.flops,
                "layer": if task.layer == crate::graph::NO_LAYER { None } else { Some(task.layer) },
                "micro_batch": task.micro_batch,
                "step": task.step,
            }
        }));
    }
    for (tid, (resource, lane)) in tracks.iter().enumerate() {
        let lanes = graph.lanes(*resource);
        let label = graph.resource_label(*resource);
        let name = if lanes > 1 { format!("{label} #{lane}") } else { label };
        events
            .push(serde_json::json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}));
        events.push(serde_json::json!({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid, "args": {"sort_index": graph.resource_index(*resource) * 100 + *lane as usize}}));
    }
    let process = match trace.source {
        TraceSource::Predicted => "ferry (predicted)",
        TraceSource::Measured => "ferry (measured)",
    };
    events.push(serde_json::json!({"name": "process_name", "ph": "M", "pid": 1, "args": {"name": process}}));
    serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" })
}
