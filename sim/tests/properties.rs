//! Property tests: invariants of the simulator over random graphs and random plans.

mod common;

use common::*;
use ferry_core::catalog::Catalog;
use ferry_core::graph::{MemOp, Payload, Pool, TaskGraph, TaskKind};
use ferry_core::model::{Dtype, WeightFormat, WeightFormats, WeightGroup, WeightLayout};
use ferry_core::plan::{DeviceLayers, Policy, Schedule, Tier, TierCounts, Workload};
use ferry_core::schedule::{lower, Steps};
use ferry_core::trace::{Metrics, Trace, Usage};
use ferry_sim::cost::CostModel;
use ferry_sim::{simulate, SimError};
use proptest::prelude::*;

const KINDS: [Kind; 6] = ALL_KINDS;

/// A random acyclic graph; some tasks hold device or host memory until a later
/// dependent task releases it.
fn random_graph() -> impl Strategy<Value = (TaskGraph, u32)> {
    (2usize..40, 1u32..4)
        .prop_flat_map(|(n, lanes)| {
            let tasks = proptest::collection::vec(
                (
                    0usize..6,
                    0u64..5_000,
                    proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
                    0u64..3_000,
                    any::<bool>(),
                ),
                n,
            );
            (tasks, Just(lanes))
        })
        .prop_map(|(specs, lanes)| {
            let mut tasks = Vec::new();
            let mut pending_release: Vec<(usize, MemOp)> = Vec::new();
            for (i, (kind, size, deps, mem, device_pool)) in specs.into_iter().enumerate() {
                let kind = KINDS[kind];
                let mut deps: Vec<u32> = if i == 0 { vec![] } else { deps.iter().map(|d| d.index(i) as u32).collect() };
                deps.sort_unstable();
                deps.dedup();
                let is_compute = matches!(kind, DEVICE_COMPUTE | HOST_COMPUTE);
                let mut t = task(kind, if is_compute { 0 } else { size }, if is_compute { size } else { 0 }, deps);
                // Release memory held by an earlier task, and make this task depend on it.
                if let Some((holder, op)) = pending_release.pop() {
                    if !t.deps.contains(&(holder as u32)) {
                        t.deps.push(holder as u32);
                    }
                    t.release.push(op);
                }
                if mem > 0 {
                    let op = MemOp { pool: if device_pool { Pool::DEVICE } else { Pool::HOST }, bytes: mem };
                    t.acquire.push(op);
                    pending_release.push((i, op));
                }
                tasks.push(t);
            }
            // Whatever is still held is released by a final task depending on the holders.
            if !pending_release.is_empty() {
                let deps = pending_release.iter().map(|(h, _)| *h as u32).collect();
                let mut last = task(DEVICE_COMPUTE, 0, 1, deps);
                last.release = pending_release.iter().map(|(_, op)| *op).collect();
                tasks.push(last);
            }
            (graph(tasks, 8_000, 8_000, lanes), lanes)
        })
}

/// The most bytes held in `pool` at any instant of the trace (releases first at ties).
fn peak(graph: &TaskGraph, trace: &Trace, pool: Pool) -> u64 {
    let metrics = Metrics::compute(graph, trace);
    metrics.pool(pool).unwrap().peak_bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn des_invariants_hold_on_random_graphs((g, lanes) in random_graph()) {
        let profile = flat_profile(0.7, 1.3, 1 << 30, 1 << 30);
        let tiny = Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
        let cost = CostModel::new(&profile, &tiny);
        match simulate(&g, &cost) {
            Ok(out) => {
                let spans = &out.trace.spans;
                prop_assert_eq!(spans.len(), g.tasks.len());
                // Dependencies respected.
                for (i, t) in g.tasks.iter().enumerate() {
                    for &d in &t.deps {
                        prop_assert!(spans[i].start_ns >= spans[d as usize].end_ns, "task {} starts before dep {} ends", i, d);
                    }
                }
                // No resource runs more tasks at once than it has lanes; lanes never double-booked.
                for r in ONE_DEVICE_RESOURCES {
                    let mut on: Vec<_> = spans.iter().filter(|s| g.tasks[s.task as usize].resource() == r).collect();
                    on.sort_by_key(|s| s.start_ns);
                    // A task that takes no time (no bytes, no FLOPs) holds its lane for no
                    // time: the task started on that lane at the same instant does not overlap it.
                    for s in on.iter().filter(|s| s.end_ns > s.start_ns) {
                        let overlapping: Vec<_> = on.iter().filter(|o| o.start_ns <= s.start_ns && o.end_ns > s.start_ns && o.end_ns > o.start_ns).collect();
                        prop_assert!(overlapping.len() as u32 <= lanes);
                        let same_lane = overlapping.iter().filter(|o| o.lane == s.lane && o.task != s.task).count();
                        prop_assert_eq!(same_lane, 0);
                    }
                }
                // Pools never above capacity.
                for pool in [Pool::DEVICE, Pool::HOST] {
                    prop_assert!(peak(&g, &out.trace, pool) <= g.pool(pool).capacity_bytes);
                }
                // The usage kept as the clock advanced is the trace's, exactly.
                prop_assert_eq!(&out.usage, &Usage::of_trace(&g, &out.trace));
                // Same input, identical trace.
                let again = simulate(&g, &cost).unwrap();
                prop_assert_eq!(&again.trace, &out.trace);
            }
            // A random graph may genuinely deadlock on memory; that must be reported, not hang.
            Err(SimError::Deadlock { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected error {}", other),
        }
    }
}

/// Whether the graph fits its pools when its tasks run one at a time in id order
/// (program order), each acquiring as it starts and releasing as it ends.
fn fits_in_program_order(graph: &TaskGraph) -> bool {
    let mut used = [0u64; 2];
    let index = |pool: Pool| if pool == Pool::DEVICE { 0 } else { 1 };
    for task in &graph.tasks {
        for op in &task.acquire {
            used[index(op.pool)] += op.bytes;
        }
        if used.iter().zip([Pool::DEVICE, Pool::HOST]).any(|(&u, pool)| u > graph.pool(pool).capacity_bytes) {
            return false;
        }
        for op in &task.release {
            used[index(op.pool)] -= op.bytes;
        }
    }
    true
}

/// Layers streamed as the lowering streams them: each layer's weights copied to the
/// device (from host RAM at once, or after a disk read of random length) into memory
/// its compute releases, computes chained, copies `depth` layers ahead of the computes
/// in program order, on 1–3 copy lanes, in a device of random size.
fn random_layer_stream() -> impl Strategy<Value = TaskGraph> {
    (proptest::collection::vec((any::<bool>(), 1u64..5_000, 100u64..3_000), 2..10), 0usize..3, 1u32..4, 0u64..6_000)
        .prop_map(|(layers, depth, lanes, extra)| {
            let mut tasks = Vec::new();
            let mut copies = Vec::new();
            let mut last_compute: Option<u32> = None;
            let compute = |tasks: &mut Vec<_>, layer: usize, copies: &[u32], last: Option<u32>| {
                let mut deps = vec![copies[layer]];
                deps.extend(last);
                let mut t = task(DEVICE_COMPUTE, 0, 500, deps);
                t.release.push(MemOp { pool: Pool::DEVICE, bytes: layers[layer].2 });
                tasks.push(t);
                (tasks.len() - 1) as u32
            };
            for (l, &(from_disk, read, bytes)) in layers.iter().enumerate() {
                let mut deps = Vec::new();
                if from_disk {
                    tasks.push(task(DISK_READ, read, 0, vec![]));
                    deps.push((tasks.len() - 1) as u32);
                }
                let mut copy = task(H2D, bytes, 0, deps);
                copy.acquire.push(MemOp { pool: Pool::DEVICE, bytes });
                tasks.push(copy);
                copies.push((tasks.len() - 1) as u32);
                if l >= depth {
                    last_compute = Some(compute(&mut tasks, l - depth, &copies, last_compute));
                }
            }
            for l in layers.len().saturating_sub(depth)..layers.len() {
                last_compute = Some(compute(&mut tasks, l, &copies, last_compute));
            }
            let largest = layers.iter().map(|l| l.2).max().unwrap_or(0);
            graph(tasks, largest * (depth as u64 + 1) + extra, 1 << 20, lanes)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// The dispatch rule lets ready tasks overtake earlier ones, but never into memory
    /// those earlier ones have yet to take: whatever fits in program order runs to the
    /// end, on any number of lanes.
    #[test]
    fn a_graph_that_fits_in_program_order_never_deadlocks((g, _lanes) in random_graph(), stream in random_layer_stream()) {
        let profile = flat_profile(0.7, 1.3, 1 << 30, 1 << 30);
        let tiny = Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
        for graph in [g, stream] {
            if fits_in_program_order(&graph) {
                let result = simulate(&graph, &CostModel::new(&profile, &tiny));
                prop_assert!(result.is_ok(), "{:?}", result.err());
            }
        }
    }
}

fn counts(device: u64, host: u64, layers: u64) -> TierCounts {
    let device = device.min(layers);
    let host = host.min(layers - device);
    TierCounts { device, host, disk: layers - device - host }
}

fn random_policy(layers: u64) -> impl Strategy<Value = (Policy, Workload, bool)> {
    (
        (0usize..4, 1u64..4, 1u64..4, 0u64..4),
        (0u64..5, 0u64..5, 0u64..5, 0u64..5, 0u64..5, 0u64..5),
        (0usize..3, any::<bool>(), any::<bool>(), any::<bool>()),
        (prop::sample::select(vec![4096u64, 16384, 65536]), 1u32..4, 1u32..4, 0u64..400_000),
        (1u64..10, 1u64..6, 0usize..4, any::<bool>()),
    )
        .prop_map(
            move |(
                (schedule, mb, nmb, depth),
                (ad, ah, md, mh, kd, kh),
                (embeddings, head_dev, host_attn, unified),
                (chunk, streams, qd, pinned),
                (prompt, gen, format, first),
            )| {
                // test-tiny's rows (128 and 352 values) are whole q8_0 and q4_0 blocks.
                let format = ["f32", "q8_0", "q4_0", "int4-g64"][format];
                let mut policy = Policy {
                    schedule: Schedule::ALL[schedule],
                    micro_batch_size: mb,
                    num_micro_batches: nmb,
                    prefetch_depth: depth,
                    attention_weights: if unified { counts(ad, 0, layers) } else { counts(ad, ah, layers) },
                    mlp_weights: if unified { counts(md, 0, layers) } else { counts(md, mh, layers) },
                    // The table on disk where its rows can be read alone (not group-wise).
                    embeddings: match embeddings {
                        2 if format != "int4-g64" => Tier::Disk,
                        1 if !unified => Tier::Host,
                        _ => Tier::Device,
                    },
                    head: if head_dev || unified { Tier::Device } else { Tier::Host },
                    kv_cache: if unified { counts(kd, 0, layers) } else { counts(kd, kh, layers) },
                    device_layers: if first { DeviceLayers::First } else { DeviceLayers::Spread },
                    host_attention: host_attn && !unified,
                    compute_host_layers_on_host: false,
                    expert_reads: Default::default(),
                    hot_experts: 0,
                    prefetched_experts: 0,
                    weight_format: WeightFormats::uniform(WeightFormat::F32),
                    weight_dtype: Dtype::F32,
                    kv_dtype: Dtype::F32,
                    chunk_bytes: chunk,
                    copy_streams: streams,
                    io_queue_depth: qd,
                    pinned_host_bytes: pinned,
                    stages: Vec::new(),
                    speculation: None,
                };
                policy.set_weight_format(WeightFormats::uniform(WeightFormat::parse(format).unwrap()));
                (policy, Workload { batch_size: mb * nmb, prompt_len: prompt, gen_len: gen }, unified)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn lowered_plans_move_what_the_plan_needs_and_fit((policy, workload, unified) in random_policy(4)) {
        let model = Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
        let mut profile = flat_profile(1.0, 1.0, 64 << 20, 64 << 20);
        profile.unified_memory = unified;
        let graph = lower(&policy, &model, &workload, &profile, &Steps::All).unwrap();
        graph.validate().unwrap();

        // Weight bytes streamed: every visit of a layer brings its non-device groups in, at
        // the bytes of the plan's format.
        let layout = WeightLayout::of(&model, &policy.weight_format);
        let steps = workload.gen_len;
        let visits_per_layer = if matches!(policy.schedule, Schedule::ZigzagBlock | Schedule::Pipelined) { 1 } else { policy.num_micro_batches };
        let mut expected_stream = 0;
        let mut expected_disk = 0;
        for layer in 0..model.num_layers {
            let place = policy.placement_of(layer);
            for (group, tier) in [(WeightGroup::Attention, place.attention), (WeightGroup::Mlp, place.mlp)] {
                let bytes = layout.bytes(group, layer) * steps * visits_per_layer;
                match tier {
                    Tier::Device => {}
                    Tier::Host => expected_stream += bytes,
                    Tier::Disk => { expected_stream += bytes; expected_disk += bytes; }
                }
            }
        }
        // An embedding table on disk: each lookup's rows, read where they are looked up.
        if policy.embeddings == Tier::Disk {
            let rows = [workload.prompt_len].into_iter().chain(std::iter::repeat_n(1, steps as usize - 1));
            let lookups: u64 = rows.map(|r| layout.embedding_disk_read(r * policy.micro_batch_size).0).sum();
            expected_disk += lookups * policy.num_micro_batches;
            if unified {
                expected_stream += lookups * policy.num_micro_batches;
            }
        }
        let weight_bytes = |(kind, resource): Kind| -> u64 {
            graph.tasks.iter().filter(|t| t.kind == kind && t.resource == resource && matches!(t.payload, Payload::Weights { .. })).map(|t| t.bytes).sum()
        };
        prop_assert_eq!(weight_bytes(DISK_READ), expected_disk);
        let landed = if unified { weight_bytes(DISK_READ) } else { weight_bytes(H2D) };
        prop_assert_eq!(landed, expected_stream);

        // KV bytes: every decode step reads the past KV of each non-device layer once per micro-batch.
        let kv_token = model.kv_bytes_per_token_per_layer(policy.kv_dtype) * policy.micro_batch_size;
        let mut expected_kv_read = 0;
        for layer in 0..model.num_layers {
            if policy.placement_of(layer).kv == Tier::Disk {
                for step in 1..workload.gen_len {
                    expected_kv_read += kv_token * (workload.prompt_len + step - 1) * policy.num_micro_batches;
                }
            }
        }
        let kv_disk: u64 = graph.tasks.iter().filter(|t| t.kind == TaskKind::DiskRead && t.payload == Payload::KvCache).map(|t| t.bytes).sum();
        prop_assert_eq!(kv_disk, expected_kv_read);

        // The simulation finishes, within the pools.
        let cost = CostModel::for_formats(&profile, &model, &policy.weight_format);
        let out = simulate(&graph, &cost).unwrap();
        prop_assert_eq!(&out.usage, &Usage::of_trace(&graph, &out.trace));
        let metrics = Metrics::compute(&graph, &out.trace);
        for pool in &metrics.pools {
            prop_assert!(pool.peak_bytes <= pool.capacity_bytes);
        }
        prop_assert!(metrics.tokens_per_s > 0.0);
    }
}
