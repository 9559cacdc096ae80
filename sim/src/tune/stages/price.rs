//! Pricing a stage of k layers on one device: the device's terms (the one-device LP's
//! per-layer figures, its links, its share of its host) and the best offload plan of
//! the stage's layers over its device, its host and its disk, priced like the LP.

use ferry_core::model::WeightGroup;
use ferry_core::topology::Place;

use super::{Knobs, KvCache, StagePlan, CHUNK_BYTES, COPY_STREAMS, IO_QUEUE_DEPTH};
use crate::cost::{CostModel, Curve};
use crate::tune::lp::LayerFigures;
use crate::tune::search::{Class, Group, Searcher};
use crate::tune::TuneRequest;

/// What pricing a stage on one device needs besides the LP's figures.
pub(super) struct DeviceTerms {
    pub(super) figures: LayerFigures,
    pub(super) unified: bool,
    pub(super) embeddings_gb: f64,
    pub(super) head_gb: f64,
    /// The head's compute, [prefill, decode] ms (all micro-batches).
    pub(super) head_ms: [f64; 2],
    /// The activations crossing into this device from the slowest other, [prefill, decode] ms.
    pub(super) link_in_ms: [f64; 2],
    pub(super) h2d_gbps: f64,
    pub(super) disk_gbps: f64,
    /// This device's share of its host's memory, GB.
    pub(super) host_share_gb: f64,
    /// Reloads of a streamed layer per step: 1 layer-major, one per micro-batch batch-major.
    pub(super) reloads: f64,
    /// Streamed layers in device memory at once: the one computing and those prefetched.
    pub(super) window_layers: f64,
    pub(super) kv: KvCache,
}

/// `cluster` prices the links between devices: built once per search, as its
/// device→device curves are derived on first use and cost more than the rest of this.
pub(super) fn device_terms(
    request: &TuneRequest,
    cluster: &CostModel,
    searcher: &Searcher,
    device: u16,
    knobs: Knobs,
    kv: KvCache,
) -> DeviceTerms {
    let profile = request.profile;
    let view = profile.device(device);
    let group = Group {
        micro_batch_size: knobs.micro_batch_size,
        num_micro_batches: knobs.num_micro_batches,
        host_attention: false,
        host_compute: false,
        pinned: !view.unified_memory,
        class: Class::of(knobs.schedule),
        schedules: vec![knobs.schedule],
        expert_reads: ferry_core::plan::ExpertReads::Routed,
    };
    let figures = searcher.figures(&group);
    let layout = &searcher.layout;
    let gb = |b: u64| b as f64 / 1e9;
    let cost = &searcher.cost;
    let model = request.model;
    let m = knobs.num_micro_batches as f64;
    let head_ms = [request.prompt_len, 1].map(|new_tokens| {
        let rows = knobs.micro_batch_size * new_tokens;
        let flops = model.projection_flops(WeightGroup::Head, knobs.micro_batch_size);
        let bytes = layout.bytes(WeightGroup::Head, 0);
        m * cost.compute_ns(view.compute, ferry_core::graph::Op::Head, flops, bytes, rows, 0, None) / 1e6
    });
    let link_in_ms = [request.prompt_len, 1].map(|new_tokens| {
        let bytes = knobs.micro_batch_size * new_tokens * model.activation_bytes_per_token();
        let slowest = (0..profile.device_count() as u16)
            .filter(|&d| d != device)
            .map(|d| {
                let link = ferry_core::graph::Resource::link(Place::Device(d), Place::Device(device));
                let task = activation_task(link, bytes);
                match cluster.task_cost(&task) {
                    crate::cost::TaskCost::Transfer { curve, chunk_bytes, work_bytes, .. } => {
                        work_bytes / cluster.bandwidth(curve, chunk_bytes, 1)
                    }
                    crate::cost::TaskCost::Compute { nominal_ns } => nominal_ns,
                }
            })
            .fold(0.0, f64::max);
        m * slowest / 1e6
    });
    let devices_on_host = (0..profile.device_count() as u16).filter(|&d| profile.device(d).host == view.host).count();
    let curve = if view.unified_memory { Curve::HostToDevicePageable(0) } else { Curve::HostToDevicePinned(0) };
    DeviceTerms {
        unified: view.unified_memory,
        embeddings_gb: gb(layout.bytes(WeightGroup::Embeddings, 0)),
        head_gb: gb(layout.bytes(WeightGroup::Head, 0)),
        head_ms,
        link_in_ms,
        h2d_gbps: cost.bandwidth(curve, CHUNK_BYTES, COPY_STREAMS),
        disk_gbps: cost.bandwidth(Curve::DiskRead(0), CHUNK_BYTES, IO_QUEUE_DEPTH),
        host_share_gb: figures.host_capacity_gb / devices_on_host as f64,
        reloads: if Class::of(knobs.schedule) == Class::BatchMajor { m } else { 1.0 },
        window_layers: (knobs.prefetch_depth + 1) as f64,
        kv,
        figures,
    }
}

/// A copy of the hidden state over `link`, as the lowering emits it.
fn activation_task(link: ferry_core::graph::Resource, bytes: u64) -> ferry_core::graph::Task {
    use ferry_core::graph::{Payload, Task, TaskKind};
    Task {
        kind: TaskKind::Copy,
        resource: link,
        payload: Payload::Activations,
        layer: 0,
        micro_batch: 0,
        step: 0,
        bytes,
        flops: 0,
        tokens: 0,
        context: 0,
        chunk_bytes: Task::request_bytes(bytes.max(1)),
        piece: 0,
        pinned: true,
        deps: Default::default(),
        acquire: Default::default(),
        release: Default::default(),
    }
}

/// The best offload plan of `layers` layers on a device: each count of resident layers,
/// the KV cache on the device as far as the rest of its memory goes, everything else on
/// the host (its share) and then the disk. `None`: not even the streaming buffers fit.
pub(super) fn stage_plan(t: &DeviceTerms, layers: u64, first: bool, last: bool) -> Option<StagePlan> {
    let f = &t.figures;
    let layer_gb = f.attention_gb + f.mlp_gb;
    let k = layers as f64;
    // The one-device probe keeps the head on the device, and the embeddings there too on
    // unified memory (on the host otherwise): a stage keeps only its own ends.
    let device_static = f.device_static_gb
        - if last { 0.0 } else { t.head_gb }
        - if t.unified && !first { t.embeddings_gb } else { 0.0 };
    let host_static = if t.unified || first { f.host_static_gb } else { f.host_static_gb - t.embeddings_gb };
    let device_free = f.device_capacity_gb - device_static;
    let host_free = if t.unified { 0.0 } else { (t.host_share_gb - host_static.max(0.0)).max(0.0) };
    let mut best: Option<StagePlan> = None;
    for resident in (0..=layers).rev() {
        let r = resident as f64;
        let window = if resident < layers { t.window_layers * layer_gb } else { 0.0 };
        let left = device_free - r * layer_gb - window;
        if left < 0.0 {
            continue;
        }
        // KV on the device as far as it goes (with a double buffer for the rest).
        let mut kv_device = ((left / f.kv_full_gb.max(1e-12)).floor() as u64).min(layers);
        if kv_device < layers && kv_device as f64 * f.kv_full_gb + f.kv_buffer_gb > left {
            kv_device = ((left - f.kv_buffer_gb).max(0.0) / f.kv_full_gb.max(1e-12)).floor() as u64;
        }
        if t.kv == KvCache::OnDevice && kv_device < layers {
            continue;
        }
        let streamed = layers - resident;
        let weights_host = ((host_free / layer_gb.max(1e-12)).floor() as u64).min(streamed);
        let host_left = host_free - weights_host as f64 * layer_gb;
        let kv_off = layers - kv_device;
        let kv_host = ((host_left / f.kv_full_gb.max(1e-12)).floor() as u64).min(kv_off);
        let weights = [resident, weights_host, streamed - weights_host];
        let kv = [kv_device, kv_host, kv_off - kv_host];
        let busy_ms = busy_ms(t, k, weights, kv, last);
        if best.is_none_or(|b| busy_ms < b.busy_ms) {
            best = Some(StagePlan { weights, kv, busy_ms });
        }
    }
    best
}

/// `plan` holding less on its device: one layer's KV cache if any is there (to the
/// disk, which always has room), else one layer's weights streamed from disk — three
/// when all were resident, as streaming starts with a window of two layers in flight.
pub(super) fn relaxed(plan: &StagePlan) -> StagePlan {
    let mut out = *plan;
    let layers = out.weights.iter().sum::<u64>();
    if out.kv[0] > 0 {
        out.kv[0] -= 1;
        out.kv[2] += 1;
    } else if out.weights[0] > 0 {
        let off = if out.weights[0] == layers { 3.min(layers) } else { 1 };
        out.weights[0] -= off;
        out.weights[2] += off;
    }
    out
}

/// A stage's busy time over the run: per phase the longest of compute, copies into the
/// device and disk reads (they overlap), plus the activations crossing in.
fn busy_ms(t: &DeviceTerms, k: f64, weights: [u64; 3], kv: [u64; 3], last: bool) -> f64 {
    let f = &t.figures;
    let layer_gb = f.attention_gb + f.mlp_gb;
    let mut total = 0.0;
    for (phase, repeats) in [(0, 1.0), (1, f.decode_steps)] {
        let compute = k * f.device_fused_ms[phase] + if last { t.head_ms[phase] } else { 0.0 };
        let kv_read = if phase == 1 { f.kv_read_gb } else { 0.0 };
        let streamed_gb = (weights[1] + weights[2]) as f64 * layer_gb * t.reloads + (kv[1] + kv[2]) as f64 * kv_read;
        let disk_gb = weights[2] as f64 * layer_gb * t.reloads + kv[2] as f64 * kv_read;
        let copies = if t.unified { 0.0 } else { streamed_gb / t.h2d_gbps * 1e3 };
        let disk = disk_gb / t.disk_gbps * 1e3;
        total += repeats * (compute.max(copies).max(disk) + t.link_in_ms[phase]);
    }
    total
}
