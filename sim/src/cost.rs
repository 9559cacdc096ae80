//! Durations from a `Profile`. Every number used here comes from the profile;
//! nothing is a constant buried in code.
//!
//! A transfer's *work* is its bytes plus its first-byte latency expressed in bytes
//! at the single-request rate; the simulator drains that work at a rate that
//! depends on what else runs on the link (see `des`). A compute task's work is its
//! nominal duration in ns — a measured table entry where the profile has one for
//! this operation, shape and size, else a roofline: the larger of FLOPs over
//! achievable FLOP/s and bytes over achievable bandwidth, plus a per-task overhead;
//! plus the profile's cost of freeing whatever memory the task releases. A task that
//! reads quantized weights is priced by the roofline at their real bytes with the
//! measured dequantization added to its FLOPs time (see `dequant`): the kernel table
//! was measured with float weights and does not describe it.

use ferry_core::graph::{Op, Payload, Place, Resource, Task, TaskGraph, TaskKind};
use ferry_core::model::{ModelSpec, WeightFormats};
use ferry_core::profile::{ComputeProfile, CurvePoint, KernelTiming, Profile, TransferCurve, FEW_ROWS};

use crate::dequant::{Dequantization, Quantized, Side};
use crate::engines::EngineCosts;
use ferry_core::export::Engine;

/// Which curve a transfer uses: of which host's disk, which device's link to its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Curve {
    DiskRead(u16),
    /// Disk reads while compute shares the CPU with the reading threads.
    DiskReadUnderCompute(u16),
    DiskWrite(u16),
    HostToDevicePinned(u16),
    HostToDevicePageable(u16),
    DeviceToHost(u16),
    /// A device→device link the profile has a curve for (index into `Profile::links`).
    Link(u16),
    /// Device→device without a link curve: down to the host and up again (see `peer_via_host`).
    PeerViaHost {
        from: u16,
        to: u16,
    },
}

/// What the simulator needs to know about one task's cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TaskCost {
    Transfer {
        curve: Curve,
        chunk_bytes: u64,
        /// Requests the transfer is split into.
        requests: u64,
        /// Bytes to move, including latency expressed as bytes.
        work_bytes: f64,
    },
    Compute {
        /// Duration when running alone, ns.
        nominal_ns: f64,
    },
}

/// The cost model of one profile and model shape.
pub struct CostModel<'a> {
    pub profile: &'a Profile,
    /// `hidden_size`x`intermediate_size`: the key measured kernel tables are stored under.
    shape: String,
    /// Device→device copies with no link curve (see `peer_via_host`), by (from, to),
    /// built on first use: one-device graphs never need them, and the tuner builds many
    /// models.
    peer_via_host: std::sync::OnceLock<std::collections::HashMap<(u16, u16), TransferCurve>>,
    /// The dequantization of the plan's quantized weights (`None`: float weights).
    dequant: Option<Dequantization>,
    /// A separate draft model's shape key and dequantization (speculative plans): its
    /// tasks are priced at its own shape.
    draft: Option<(String, Option<Dequantization>)>,
    /// What the engine running the plan costs beyond Ferry's own (`run_by`).
    engine: EngineCosts,
}

impl<'a> CostModel<'a> {
    /// The cost model of a plan whose weights are float.
    pub fn new(profile: &'a Profile, model: &ModelSpec) -> CostModel<'a> {
        CostModel {
            profile,
            shape: shape_key(model),
            peer_via_host: std::sync::OnceLock::new(),
            dequant: None,
            draft: None,
            engine: EngineCosts::of(None),
        }
    }

    /// This cost model for the plan as `engine` runs it (`None`: Ferry's engine).
    pub fn run_by(self, engine: Option<Engine>) -> CostModel<'a> {
        CostModel { engine: EngineCosts::of(engine), ..self }
    }

    /// The cost model of `policy`'s plan: its weight formats, and a separate draft's
    /// shape and formats when it speculates with one.
    pub fn for_policy(profile: &'a Profile, model: &ModelSpec, policy: &ferry_core::plan::Policy) -> CostModel<'a> {
        let mut cost = CostModel::for_formats(profile, model, &policy.weight_format);
        if let Some(speculation) = policy.speculation.as_ref().filter(|s| !s.is_self()) {
            let draft = speculation.draft_model(model);
            let formats = speculation.draft_formats(&policy.weight_format);
            cost.draft = Some((shape_key(&draft), Dequantization::new(profile, &draft, &formats)));
        }
        cost
    }

    /// The cost model of a plan storing its weights in `formats`.
    pub fn for_formats(profile: &'a Profile, model: &ModelSpec, formats: &WeightFormats) -> CostModel<'a> {
        CostModel { dequant: Dequantization::new(profile, model, formats), ..CostModel::new(profile, model) }
    }

    /// What quantized weights add to an `op` task of `layer` (`None`: the mean layer)
    /// over `rows` rows on the host or the device, when it reads any (see `compute_ns`);
    /// `row_order`: weights not kept on the device (`Task::weights_off_device`).
    pub fn quantized(
        &self,
        on_host: bool,
        op: Op,
        layer: Option<u64>,
        rows: u64,
        row_order: bool,
    ) -> Option<Quantized> {
        let side = if on_host { Side::Host } else { Side::Device };
        self.dequant.as_ref()?.task(side, op, layer, rows, row_order)
    }

    pub fn curve(&self, curve: Curve) -> &TransferCurve {
        let profile = self.profile;
        match curve {
            Curve::DiskRead(h) => profile.host(h).disk_read,
            Curve::DiskReadUnderCompute(h) => {
                let host = profile.host(h);
                host.disk_read_under_compute.unwrap_or(host.disk_read)
            }
            Curve::DiskWrite(h) => profile.host(h).disk_write,
            Curve::HostToDevicePinned(d) => profile.device(d).host_to_device,
            Curve::HostToDevicePageable(d) => profile.device(d).host_to_device_pageable,
            Curve::DeviceToHost(d) => profile.device(d).device_to_host,
            Curve::Link(index) => &profile.links[index as usize].curve,
            Curve::PeerViaHost { from, to } => {
                let curves = self.peer_via_host.get_or_init(|| peer_curves(profile));
                &curves[&(from, to)]
            }
        }
    }

    /// The curve a copy over `from → to` follows.
    fn link_curve(&self, from: Place, to: Place, pinned: bool) -> Curve {
        match (from, to) {
            (Place::Host(_), Place::Device(d)) if pinned => Curve::HostToDevicePinned(d),
            (Place::Host(_), Place::Device(d)) => Curve::HostToDevicePageable(d),
            (Place::Device(d), Place::Host(_)) => Curve::DeviceToHost(d),
            (Place::Device(a), Place::Device(b)) => {
                match self.profile.links.iter().position(|l| l.from == from && l.to == to) {
                    Some(index) => Curve::Link(index as u16),
                    None => Curve::PeerViaHost { from: a, to: b },
                }
            }
            // Host to host (not lowered today): the first host's pageable copy.
            (Place::Host(_), Place::Host(_)) => Curve::HostToDevicePageable(0),
        }
    }

    /// Aggregate bytes/ns of `curve` at this request size with `in_flight` requests.
    pub fn bandwidth(&self, curve: Curve, chunk_bytes: u64, in_flight: u32) -> f64 {
        self.curve(curve).bytes_per_ns(chunk_bytes, in_flight).max(1e-12)
    }

    /// The curve `curve`'s transfers follow while a compute task that interferes with
    /// them runs (see `interferes`).
    pub fn under_compute(&self, curve: Curve) -> Curve {
        match curve {
            Curve::DiskRead(h) => Curve::DiskReadUnderCompute(h),
            other => other,
        }
    }

    /// A task's cost, its products taking the kernel for its own rows (outside a graph
    /// there is no round to say otherwise: see `kernel_tokens`).
    pub fn task_cost(&self, task: &Task) -> TaskCost {
        self.task_cost_with(task, task.tokens as u64, &mut |curve, chunk| self.bandwidth(curve, chunk, 1))
    }

    /// `task_cost` with the rows whose kernel a compute task's products take, and the
    /// single-request bandwidth supplied by the caller (memoised over a whole graph:
    /// interpolating a curve per task would dominate setup).
    fn task_cost_with(
        &self,
        task: &Task,
        kernel_tokens: u64,
        single_stream: &mut dyn FnMut(Curve, u64) -> f64,
    ) -> TaskCost {
        let host_of_disk = |resource| match resource {
            Resource::Disk { host } => host,
            _ => 0,
        };
        let curve = match (task.kind, task.resource) {
            (TaskKind::DiskRead, resource) => Curve::DiskRead(host_of_disk(resource)),
            (TaskKind::DiskWrite, resource) => Curve::DiskWrite(host_of_disk(resource)),
            (_, Resource::Link { from, to }) => self.link_curve(from, to, task.pinned),
            (_, Resource::Compute { at: Place::Device(d) }) => {
                return self.compute_cost(task, kernel_tokens, self.profile.device(d).compute, false)
            }
            (_, Resource::Compute { at: Place::Host(h) }) => {
                return self.compute_cost(task, kernel_tokens, self.profile.host(h).compute, true)
            }
            (_, Resource::Disk { .. }) => unreachable!("a disk runs reads and writes only (TaskGraph::validate)"),
        };
        let chunk_bytes = (task.chunk_bytes as u64).max(1);
        let latency_ns = self.curve(curve).latency_ns as f64;
        TaskCost::Transfer {
            curve,
            chunk_bytes,
            requests: task.bytes.div_ceil(chunk_bytes).max(1),
            work_bytes: task.bytes as f64 + latency_ns * single_stream(curve, chunk_bytes),
        }
    }

    fn compute_cost(&self, task: &Task, kernel_tokens: u64, compute: &ComputeProfile, on_host: bool) -> TaskCost {
        let (op, weights_off_device) = match task.payload {
            Payload::Compute { op, weights_off_device, .. } => (op, weights_off_device),
            _ => (Op::Mlp, false),
        };
        let layer = (task.layer != ferry_core::graph::NO_LAYER).then_some(task.layer as u64);
        let (tokens, context) = (task.tokens as u64, task.context as u64);
        let side = if on_host { Side::Host } else { Side::Device };
        let nominal_ns = match (&self.draft, task.payload) {
            // Another engine's attention over a host cache runs its own kernels, not
            // those the table timed: the roofline at the bytes it moves.
            _ if on_host && op == Op::AttnCore && !self.engine.host_attention_as_ferry() => {
                roofline_ns(compute, task.flops, self.engine.host_attention_bytes(task.bytes), None)
            }
            // A separate draft's task: its own shape in the kernel table, its own formats.
            (Some((shape, dequant)), Payload::Compute { draft: true, .. }) => {
                let quantized = dequant.as_ref().and_then(|d| d.task(side, op, layer.or(Some(0)), tokens, false));
                let rows = (tokens, kernel_tokens, context);
                self.compute_ns_at(shape, compute, op, (task.flops, task.bytes), rows, quantized)
            }
            _ => {
                let quantized = self.quantized(on_host, op, layer.or(Some(0)), tokens, weights_off_device);
                let rows = (tokens, kernel_tokens, context);
                self.compute_ns_at(&self.shape, compute, op, (task.flops, task.bytes), rows, quantized)
            }
        };
        // Memory the task frees (streamed weights, a loaded cache) is returned to the
        // system by the task itself.
        let released_bytes: u64 = task.release.iter().map(|m| m.bytes).sum();
        let release_ns = compute.release_ns_per_mib * released_bytes as f64 / (1u64 << 20) as f64;
        // The lane idles while the engine's scheduler hears of the task before and
        // dispatches this one: the simulator counts it as the task's own time.
        let handoff_ns = self.engine.handoff_ns(compute.handoff_ns);
        TaskCost::Compute { nominal_ns: nominal_ns + release_ns + handoff_ns }
    }

    /// Nominal duration of one compute operation: the profile's measured table where it
    /// has this operation and shape (for `quantized` weights, a table measured over
    /// their format), else the roofline plus the per-task overhead. With `quantized`
    /// weights the roofline is at their real bytes, their decoding and their products'
    /// own rate added to the FLOPs time — decoding and multiply-adds share the cores
    /// while memory streams beside both.
    #[allow(clippy::too_many_arguments)]
    pub fn compute_ns(
        &self,
        compute: &ComputeProfile,
        op: Op,
        flops: u64,
        bytes: u64,
        tokens: u64,
        context: u64,
        quantized: Option<Quantized>,
    ) -> f64 {
        self.compute_ns_at(&self.shape, compute, op, (flops, bytes), (tokens, tokens, context), quantized)
    }

    /// `compute_ns` with the kernel table read at `shape`, for `tokens` rows taking the
    /// kernel of `kernel_tokens` (`table_ns`).
    fn compute_ns_at(
        &self,
        shape: &str,
        compute: &ComputeProfile,
        op: Op,
        (flops, bytes): (u64, u64),
        (tokens, kernel_tokens, context): (u64, u64, u64),
        quantized: Option<Quantized>,
    ) -> f64 {
        // Float entries price float weights; quantized formats, the entries measured
        // over each of them (looked up only where there is a table: a datasheet profile
        // has none, and a name per task was 3 % of a search).
        let table = |format: Option<&str>| {
            let entry = TableKey { op: op.name(), shape, format, context };
            table_ns(&compute.table, entry, tokens, kernel_tokens)
        };
        let tabled = match quantized {
            _ if compute.table.is_empty() => None,
            None => table(None),
            Some(q) => q.shares.list().and_then(|shares| {
                let each = shares.map(|(format, share)| table(Some(&format.name())).map(|ns| share * ns));
                // The table times resident weights; those in the file's row order run
                // that order's kernels.
                Some(each.sum::<Option<f64>>()? + q.row_order_ns)
            }),
        };
        tabled.unwrap_or_else(|| roofline_ns(compute, flops, bytes as f64, quantized))
    }

    /// Compute on `resource` runs at 1 / (1 + slowdown) while one of these transfers runs.
    pub fn compute_slowdown(&self, resource: Resource) -> f64 {
        match resource {
            Resource::Compute { at: Place::Device(d) } => self.profile.device(d).compute_slowdown,
            Resource::Compute { at: Place::Host(h) } => self.profile.host(h).compute_slowdown,
            _ => 0.0,
        }
    }

    /// Whether a transfer on `transfer` competes with compute on `compute` for memory
    /// (and, for disk reads, for the CPU the reading threads need). Transfers on another
    /// host never do.
    pub fn interferes(&self, transfer: Resource, compute: Resource) -> bool {
        let profile = self.profile;
        // Whether the transfer reads or writes the memory of host `h` (or of a device on it).
        let touches_host = |h: u16| match transfer {
            Resource::Link { from, to } => profile.host_of(from) == h || profile.host_of(to) == h,
            Resource::Disk { host } => host == h,
            Resource::Compute { .. } => false,
        };
        match compute {
            // A device's memory is busy with copies into or out of it; on unified memory
            // the device shares its host's memory, and its disk's reads land in it.
            Resource::Compute { at: device @ Place::Device(d) } => {
                if profile.device(d).unified_memory {
                    touches_host(profile.host_of(device))
                } else {
                    matches!(transfer, Resource::Link { .. }) && transfer.touches(device)
                }
            }
            Resource::Compute { at: Place::Host(h) } => touches_host(h),
            _ => false,
        }
    }

    pub fn graph_costs(&self, graph: &TaskGraph) -> Vec<TaskCost> {
        let mut costs = Vec::new();
        self.graph_costs_into(graph, &mut costs);
        costs
    }

    /// `graph_costs` into `costs` (cleared first), so a caller that simulates many
    /// graphs reuses one buffer instead of allocating one per graph.
    pub fn graph_costs_into(&self, graph: &TaskGraph, costs: &mut Vec<TaskCost>) {
        let mut memo: Vec<((Curve, u64), f64)> = Vec::new();
        let mut single_stream = |curve: Curve, chunk: u64| match memo.iter().find(|(k, _)| *k == (curve, chunk)) {
            Some((_, bandwidth)) => *bandwidth,
            None => {
                let bandwidth = self.bandwidth(curve, chunk, 1);
                memo.push(((curve, chunk), bandwidth));
                bandwidth
            }
        };
        costs.clear();
        costs.extend(graph.tasks.iter().map(|t| self.task_cost_with(t, kernel_tokens(graph, t), &mut single_stream)));
    }
}

/// The rows whose kernel a task's products take, as the engine chooses them
/// (`Engine::product_rows`): a speculative verification's target tasks multiply
/// `drafted + 1` rows per sequence with plain decoding's kernel, that of one row per
/// sequence, so that speculation cannot change a token; every other task its own rows.
/// The larger of FLOPs over achievable FLOP/s and bytes over achievable bandwidth,
/// plus the per-task overhead.
fn roofline_ns(compute: &ComputeProfile, flops: u64, bytes: f64, quantized: Option<Quantized>) -> f64 {
    let flops_ns = flops as f64 / compute.flops_per_s() * 1e9;
    let bytes_ns = bytes / (compute.memory_bytes_per_s * compute.memory_efficiency) * 1e9;
    // A format's products may run faster than the float peak (`extra_ns` < 0).
    let arithmetic_ns = (flops_ns + quantized.map_or(0.0, |q| q.extra_ns + q.row_order_ns)).max(0.0);
    compute.task_overhead_ns as f64 + arithmetic_ns.max(bytes_ns)
}

fn kernel_tokens(graph: &TaskGraph, task: &Task) -> u64 {
    let drafted = graph.rounds.get(task.step as usize).map_or(0, |r| r.drafted as u64);
    match task.payload {
        Payload::Compute { draft: false, .. } if task.step > 0 && drafted > 0 => task.tokens as u64 / (drafted + 1),
        _ => task.tokens as u64,
    }
}

/// Which kernel table entries price a task: operation, model shape, weight format
/// (`None`: float weights) and context.
#[derive(Clone, Copy)]
struct TableKey<'a> {
    op: &'a str,
    shape: &'a str,
    format: Option<&'a str>,
    context: u64,
}

/// A measured duration for `tokens` rows taking the kernel of `kernel_tokens`. Where
/// that is the few-row kernels' and the rows are more than one pass of them
/// (`FEW_ROWS`), the product makes a pass per `FEW_ROWS` rows: priced as that many
/// entries of `FEW_ROWS` rows and one of the rest, not as the table's entry at
/// `tokens`, which was measured on the GEMM or the AMX tiles.
fn table_ns(table: &[KernelTiming], key: TableKey, tokens: u64, kernel_tokens: u64) -> Option<f64> {
    let lookup = |rows| lookup_table(table, key.op, key.shape, key.format, rows, key.context);
    if kernel_tokens > FEW_ROWS || tokens <= FEW_ROWS {
        return lookup(tokens);
    }
    let (passes, rest) = (tokens / FEW_ROWS, tokens % FEW_ROWS);
    let rest_ns = if rest > 0 { lookup(rest)? } else { 0.0 };
    Some(passes as f64 * lookup(FEW_ROWS)? + rest_ns)
}

/// Every device→device copy the profile has no link curve for (see `peer_via_host`).
fn peer_curves(profile: &Profile) -> std::collections::HashMap<(u16, u16), TransferCurve> {
    let count = profile.device_count() as u16;
    let mut curves = std::collections::HashMap::new();
    for from in 0..count {
        for to in (0..count).filter(|&to| to != from) {
            curves.insert((from, to), peer_via_host(profile, from, to));
        }
    }
    curves
}

/// A device→device copy the profile has no curve for. Two unified devices on one host
/// share its memory, so it is a memcpy there: the host→device curve, which on such
/// machines is a measured (or datasheet) memcpy. Otherwise the bytes go down to the
/// host and up again: at each point the two legs' times add (1 / (1/down + 1/up)).
/// Latency: both legs'. (Devices on different hosts are joined by the cluster's
/// network, a link curve, never this.)
fn peer_via_host(profile: &Profile, from: u16, to: u16) -> TransferCurve {
    let (source, target) = (profile.device(from), profile.device(to));
    let up = target.host_to_device;
    if source.unified_memory && target.unified_memory && source.host == target.host {
        return up.clone();
    }
    let down = source.device_to_host;
    let points = up
        .points
        .iter()
        .map(|p| {
            let down_gbps = down.bytes_per_ns(p.chunk_bytes, p.concurrency).max(1e-12);
            let gbps = 1.0 / (1.0 / p.gbps.max(1e-12) + 1.0 / down_gbps);
            CurvePoint { chunk_bytes: p.chunk_bytes, concurrency: p.concurrency, gbps, spread: None }
        })
        .collect();
    TransferCurve { latency_ns: up.latency_ns + down.latency_ns, points }
}

pub fn shape_key(model: &ModelSpec) -> String {
    format!("{}x{}", model.hidden_size, model.intermediate_size)
}

/// A measured duration for (op, shape) at `tokens` rows and `context`: the entries of
/// the nearest context length whose measured rows reach `tokens` (else come nearest
/// it), linear interpolation in tokens between them, proportional scaling beyond the
/// largest.
fn lookup_table(
    table: &[KernelTiming],
    op: &str,
    shape: &str,
    format: Option<&str>,
    tokens: u64,
    context: u64,
) -> Option<f64> {
    let mut entries: Vec<_> =
        table.iter().filter(|e| e.op == op && e.shape == shape && e.format.as_deref() == format).collect();
    if entries.is_empty() {
        return None;
    }
    // A table holds decoding rows at several contexts and prefill rows at one: a
    // prefill priced from a decoding context would scale one row's cost linearly to
    // hundreds (twice the real cost), so prefer a context measured around `tokens`.
    // The distance from `tokens` to the rows measured at context `c` (0 inside them).
    let outside = |c: u64| {
        let rows = entries.iter().filter(|e| e.context == c).map(|e| e.tokens);
        let (low, high) = rows.fold((u64::MAX, 0), |(l, h), t| (l.min(t), h.max(t)));
        low.saturating_sub(tokens).max(tokens.saturating_sub(high))
    };
    let nearest_context = entries.iter().map(|e| e.context).min_by_key(|&c| (outside(c), c.abs_diff(context)))?;
    entries.retain(|e| e.context == nearest_context);
    entries.sort_by_key(|e| e.tokens);
    let position = entries.iter().position(|e| e.tokens >= tokens);
    let ns = match position {
        // Below the smallest measured size a kernel costs at least what that size did.
        Some(0) => entries[0].ns as f64,
        Some(i) => {
            let (a, b) = (entries[i - 1], entries[i]);
            let t = (tokens - a.tokens) as f64 / (b.tokens - a.tokens).max(1) as f64;
            a.ns as f64 + (b.ns as f64 - a.ns as f64) * t
        }
        None => {
            let last = entries[entries.len() - 1];
            last.ns as f64 * tokens as f64 / last.tokens.max(1) as f64
        }
    };
    Some(ns)
}

#[cfg(test)]
mod table_tests {
    use super::{lookup_table, table_ns, TableKey};
    use ferry_core::profile::KernelTiming;

    fn entry(tokens: u64, context: u64, ns: u64) -> KernelTiming {
        KernelTiming { op: "mlp".into(), shape: "s".into(), tokens, context, ns, format: None }
    }

    /// A profile's table: decoding rows (1–16) at contexts 33 and 37, prefill rows
    /// (32–512) at context 32, as `ferry profile --model` measures it.
    fn table() -> Vec<KernelTiming> {
        let mut table = vec![entry(1, 37, 1_000), entry(1, 33, 900), entry(16, 33, 8_000)];
        table.extend([32, 128, 512].map(|t| entry(t, 32, 10_000 * t / 32)));
        table
    }

    #[test]
    fn a_prefill_at_another_context_reads_the_prefill_rows_not_a_decoding_row_scaled() {
        // 192 rows at context 96: between the prefill rows measured at 128 and 512.
        let ns = lookup_table(&table(), "mlp", "s", None, 192, 96).unwrap();
        assert!((ns - 60_000.0).abs() < 1.0, "{ns}");
        // Decoding keeps the nearest decoding context.
        assert_eq!(lookup_table(&table(), "mlp", "s", None, 1, 40).unwrap(), 1_000.0);
        assert_eq!(lookup_table(&table(), "mlp", "s", None, 1, 34).unwrap(), 900.0);
        // Beyond every measured size: proportional to the largest.
        assert_eq!(lookup_table(&table(), "mlp", "s", None, 1024, 96).unwrap(), 320_000.0);
    }

    /// A speculative verification of 4 sequences × 4 positions takes plain decoding's
    /// few-row kernels: two passes of 8 rows, not the 16-row entry measured on the
    /// GEMM; 12 rows are a pass of 8 and one of 4. Rows that take their own kernel, and
    /// the few-row kernels at up to 8 rows, read the table as before.
    #[test]
    fn rows_taking_the_few_row_kernels_are_priced_a_pass_per_eight() {
        let mut table = vec![entry(4, 33, 4_000), entry(8, 33, 9_000), entry(16, 33, 12_000)];
        table.push(entry(64, 32, 30_000));
        let key = TableKey { op: "mlp", shape: "s", format: None, context: 34 };
        assert_eq!(table_ns(&table, key, 16, 4), Some(18_000.0));
        assert_eq!(table_ns(&table, key, 12, 4), Some(13_000.0));
        assert_eq!(table_ns(&table, key, 16, 16), Some(12_000.0));
        assert_eq!(table_ns(&table, key, 8, 2), Some(9_000.0));
        assert_eq!(table_ns(&table, key, 64, 64), Some(30_000.0));
    }
}
