//! Known answers: timings that can be worked out by hand.

mod common;

use common::*;
use ferry_core::catalog::Catalog;
use ferry_core::graph::{MemOp, Pool};
use ferry_core::model::Dtype;
use ferry_core::plan::{Policy, Schedule, Tier, TierCounts, Workload};
use ferry_core::schedule::{lower, Steps};
use ferry_core::trace::Metrics;
use ferry_sim::cost::CostModel;
use ferry_sim::{predict, simulate, Extrapolation, SimError};

fn tiny() -> ferry_core::model::ModelSpec {
    Catalog::builtin().unwrap().model("test-tiny").unwrap().value
}

#[test]
fn one_resource_in_series_is_the_sum_of_durations() {
    // 1 FLOP per ns: flops are nanoseconds.
    let profile = flat_profile(1.0, 1.0, 1 << 30, 1 << 30);
    let g = graph(
        vec![
            task(DEVICE_COMPUTE, 0, 1_000, vec![]),
            task(DEVICE_COMPUTE, 0, 2_500, vec![]),
            task(DEVICE_COMPUTE, 0, 700, vec![]),
        ],
        1 << 30,
        1 << 30,
        1,
    );
    let out = simulate(&g, &CostModel::new(&profile, &tiny())).unwrap();
    let end = out.trace.spans.iter().map(|s| s.end_ns).max().unwrap();
    assert_eq!(end, 4_200);
}

/// A measured hand-over between compute tasks (Ferry's scheduler hearing of one task's
/// end and dispatching the next) is paid once per compute task by Ferry's engine, and
/// not by another engine's model priced on the same profile.
#[test]
fn the_engines_hand_over_is_paid_once_per_compute_task_by_ferry_alone() {
    let mut profile = flat_profile(1.0, 1.0, 1 << 30, 1 << 30);
    profile.device_compute.handoff_ns = 300;
    let g = graph(
        vec![
            task(DEVICE_COMPUTE, 0, 1_000, vec![]),
            task(DEVICE_COMPUTE, 0, 2_500, vec![0]),
            task(DEVICE_COMPUTE, 0, 700, vec![1]),
        ],
        1 << 30,
        1 << 30,
        1,
    );
    let end = |cost: &CostModel| simulate(&g, cost).unwrap().trace.spans.iter().map(|s| s.end_ns).max().unwrap();
    assert_eq!(end(&CostModel::new(&profile, &tiny())), 4_200 + 3 * 300);
    let llama_cpp = CostModel::new(&profile, &tiny()).run_by(Some(ferry_core::export::Engine::LlamaCpp));
    assert_eq!(end(&llama_cpp), 4_200);
}

#[test]
fn overlapped_load_and_compute_is_the_larger_per_layer_plus_fill() {
    let profile = flat_profile(1.0, 1.0, 1 << 30, 1 << 30);
    for (load, compute) in [(3_000u64, 1_000u64), (1_000, 3_000), (2_000, 2_000)] {
        let layers = 6;
        let mut tasks = Vec::new();
        for layer in 0..layers {
            let load_id = tasks.len() as u32;
            tasks.push(task(H2D, load, 0, vec![]));
            let mut deps = vec![load_id];
            if layer > 0 {
                deps.push(load_id - 1);
            }
            tasks.push(task(DEVICE_COMPUTE, 0, compute, deps));
        }
        let g = graph(tasks, 1 << 30, 1 << 30, 1);
        let out = simulate(&g, &CostModel::new(&profile, &tiny())).unwrap();
        let end = out.trace.spans.iter().map(|s| s.end_ns).max().unwrap();
        let expected = load.min(compute) + layers * load.max(compute);
        assert_eq!(end, expected, "load {load} compute {compute}");
    }
}

#[test]
fn concurrent_transfers_share_the_link() {
    // Two 1000-byte copies on two lanes of a 1 byte/ns link finish together at 2000 ns.
    let profile = flat_profile(1.0, 1.0, 1 << 30, 1 << 30);
    let g = graph(vec![task(H2D, 1_000, 0, vec![]), task(H2D, 1_000, 0, vec![])], 1 << 30, 1 << 30, 2);
    let out = simulate(&g, &CostModel::new(&profile, &tiny())).unwrap();
    assert_eq!(out.trace.spans[0].end_ns, 2_000);
    assert_eq!(out.trace.spans[1].end_ns, 2_000);
    assert_eq!(out.trace.spans[0].start_ns, 0);
    assert_eq!(out.trace.spans[1].start_ns, 0);
}

fn policy(schedule: Schedule, layers: u64, weights: Tier) -> Policy {
    Policy {
        schedule,
        attention_weights: TierCounts::all(weights, layers),
        mlp_weights: TierCounts::all(weights, layers),
        chunk_bytes: 64 * 1024,
        pinned_host_bytes: 1 << 30,
        stages: Vec::new(),
        speculation: None,
        ..Policy::all_on_device(layers, 2, Dtype::F32)
    }
}

#[test]
fn sequential_is_the_sum_of_loads_and_computes() {
    let model = tiny();
    let profile = flat_profile(0.5, 2.0, 1 << 30, 1 << 30);
    let workload = Workload { batch_size: 2, prompt_len: 8, gen_len: 4 };
    let p = policy(Schedule::Sequential, model.num_layers, Tier::Host);
    let g = lower(&p, &model, &workload, &profile, &Steps::All).unwrap();
    let out = simulate(&g, &CostModel::new(&profile, &model)).unwrap();
    let sum: u64 = out.trace.spans.iter().map(|s| s.end_ns - s.start_ns).sum();
    let metrics = Metrics::compute(&g, &out.trace);
    assert_eq!(metrics.total_ns, sum, "nothing overlaps in a sequential plan");
    // And prefetching the same placement is strictly faster.
    let prefetch = policy(Schedule::LayerPrefetch, model.num_layers, Tier::Host);
    let g2 = lower(&prefetch, &model, &workload, &profile, &Steps::All).unwrap();
    let m2 = Metrics::compute(&g2, &simulate(&g2, &CostModel::new(&profile, &model)).unwrap().trace);
    assert!(m2.total_ns < metrics.total_ns);
}

#[test]
fn task_larger_than_its_pool_is_a_clear_error() {
    let profile = flat_profile(1.0, 1.0, 1 << 30, 1 << 30);
    let mut big = task(H2D, 1_000, 0, vec![]);
    big.acquire.push(MemOp { pool: Pool::DEVICE, bytes: 5_000 });
    let mut consumer = task(DEVICE_COMPUTE, 0, 10, vec![0]);
    consumer.release.push(MemOp { pool: Pool::DEVICE, bytes: 5_000 });
    let g = graph(vec![big, consumer], 4_096, 1 << 20, 1);
    let err = simulate(&g, &CostModel::new(&profile, &tiny())).unwrap_err().to_string();
    assert!(err.contains("device memory") && err.contains("short by"), "{err}");
}

#[test]
fn deadlock_names_the_pool_and_shortfall() {
    // Two loads each take 3 KiB of a 4 KiB pool; the consumer that frees the first
    // needs both, so the second can never start.
    let profile = flat_profile(1.0, 1.0, 1 << 30, 1 << 30);
    let mut a = task(H2D, 100, 0, vec![]);
    a.acquire.push(MemOp { pool: Pool::DEVICE, bytes: 3_072 });
    let mut b = task(H2D, 100, 0, vec![]);
    b.acquire.push(MemOp { pool: Pool::DEVICE, bytes: 3_072 });
    let mut c = task(DEVICE_COMPUTE, 0, 10, vec![0, 1]);
    c.release.push(MemOp { pool: Pool::DEVICE, bytes: 6_144 });
    let g = graph(vec![a, b, c], 4_096, 1 << 20, 2);
    let err = simulate(&g, &CostModel::new(&profile, &tiny())).unwrap_err();
    assert!(matches!(&err, SimError::Deadlock { pool, .. } if pool == "device"), "{err}");
    let text = err.to_string();
    assert!(text.contains("needs 3.00 KiB") && text.contains("1.00 KiB is free"), "{text}");
}

/// Layer 0's weights come from disk, layer 1's from host RAM, and the device holds
/// one layer's weights. Layer 1's copy is ready first; let it take the room and layer
/// 0's copy can never start, while layer 1's compute waits for layer 0's. The copy
/// that comes later in program order must wait: the graph runs in program order.
fn a_later_copy_ready_first(device_bytes: u64) -> ferry_core::graph::TaskGraph {
    let read0 = task(DISK_READ, 1_000, 0, vec![]);
    let mut copy0 = task(H2D, 1_000, 0, vec![0]);
    copy0.acquire.push(MemOp { pool: Pool::DEVICE, bytes: 1_000 });
    let mut copy1 = task(H2D, 1_000, 0, vec![]);
    copy1.acquire.push(MemOp { pool: Pool::DEVICE, bytes: 1_000 });
    let mut compute0 = task(DEVICE_COMPUTE, 0, 100, vec![1]);
    compute0.release.push(MemOp { pool: Pool::DEVICE, bytes: 1_000 });
    let mut compute1 = task(DEVICE_COMPUTE, 0, 100, vec![2, 3]);
    compute1.release.push(MemOp { pool: Pool::DEVICE, bytes: 1_000 });
    graph(vec![read0, copy0, copy1, compute0, compute1], device_bytes, 1 << 20, 1)
}

#[test]
fn a_ready_copy_does_not_take_the_room_of_an_earlier_one_still_reading() {
    // 1 byte per ns: the read ends at 1000, copy 0 at 2000, compute 0 at 2100; copy 1
    // may only start then (3100), and compute 1 ends at 3200.
    let profile = flat_profile(1.0, 1.0, 1 << 30, 1 << 30);
    let g = a_later_copy_ready_first(1_000);
    let run = simulate(&g, &CostModel::new(&profile, &tiny())).unwrap();
    assert_eq!(Metrics::compute(&g, &run.trace).total_ns, 3_200);
    // With room for both, the later copy still overtakes: it runs while layer 0 reads,
    // and compute 1 ends at 2000 (copy 0) + 100 + 100.
    let g = a_later_copy_ready_first(2_000);
    let run = simulate(&g, &CostModel::new(&profile, &tiny())).unwrap();
    let copy1 = run.trace.spans.iter().find(|s| s.task == 2).unwrap();
    assert_eq!((copy1.start_ns, copy1.end_ns), (0, 1_000));
    assert_eq!(Metrics::compute(&g, &run.trace).total_ns, 2_200);
}

#[test]
fn sampled_extrapolation_stays_within_half_a_percent() {
    let catalog = Catalog::builtin().unwrap();
    for name in [
        "rtx3060-13b-layer-prefetch",
        "rtx3060-laptop-13b-zigzag",
        "cpu-tinyllama-512mib-pipelined",
        "t4-opt-30b-sequential",
    ] {
        let text = &catalog.plans.iter().find(|(f, _)| f == &format!("{name}.yaml")).unwrap().1;
        let plan: ferry_core::plan::Plan = ferry_core::yaml::from_yaml_str(text, name).unwrap();
        let mut resolved = ferry_core::resolve::resolve_plan(&catalog, plan, std::path::Path::new(".")).unwrap();
        for gen_len in [48u64, 96] {
            resolved.plan.workload.gen_len = gen_len;
            let run = |mode| {
                predict(&resolved.plan.policy, &resolved.model, &resolved.plan.workload, &resolved.profile, mode)
                    .unwrap()
                    .metrics
            };
            let full = run(Extrapolation::Full);
            let sampled = run(Extrapolation::Sampled);
            let error = (sampled.tokens_per_s - full.tokens_per_s).abs() / full.tokens_per_s;
            assert!(
                error < 0.005,
                "{name} gen {gen_len}: sampled {} vs full {} tokens/s",
                sampled.tokens_per_s,
                full.tokens_per_s
            );
            assert_eq!(sampled.time_to_first_token_ns, full.time_to_first_token_ns);
        }
    }
}

/// A generation longer than `MAX_FULL_STEPS` is sampled even when every step is asked
/// for (its graph would hold every step's tasks: 100 000 tokens of an 8B model ran
/// out of memory): the same figures as sampling.
#[test]
fn a_full_prediction_past_its_step_limit_is_sampled() {
    let catalog = Catalog::builtin().unwrap();
    let name = "cpu-tinyllama-512mib-pipelined";
    let text = &catalog.plans.iter().find(|(f, _)| f == &format!("{name}.yaml")).unwrap().1;
    let plan: ferry_core::plan::Plan = ferry_core::yaml::from_yaml_str(text, name).unwrap();
    let mut resolved = ferry_core::resolve::resolve_plan(&catalog, plan, std::path::Path::new(".")).unwrap();
    resolved.plan.workload.gen_len = 4 * ferry_sim::predict::MAX_FULL_STEPS as u64;
    resolved.plan.policy.kv_cache = TierCounts::all(Tier::Disk, resolved.model.num_layers);
    (resolved.plan.policy.micro_batch_size, resolved.plan.policy.num_micro_batches) = (1, 2);
    resolved.plan.workload.batch_size = 2;
    resolved.model.max_position_embeddings = 131_072;
    let run = |mode| {
        predict(&resolved.plan.policy, &resolved.model, &resolved.plan.workload, &resolved.profile, mode).unwrap()
    };
    let (full, sampled) = (run(Extrapolation::Full), run(Extrapolation::Sampled));
    assert_eq!(full.metrics.tokens_per_s, sampled.metrics.tokens_per_s);
    assert!(full.metrics.tokens_per_s > 0.0);
}

#[test]
fn disk_reads_follow_the_under_compute_curve_while_cpu_compute_runs() {
    // Disk 1 byte/ns alone, 0.5 byte/ns while compute shares the CPU. A 3000-byte read
    // beside a 1000 ns compute: 500 bytes in the first 1000 ns, the other 2500 at full
    // rate, so it ends at 3500 ns. Device compute shares the CPU only on unified memory;
    // host compute always does.
    let mut profile = flat_profile(1.0, 1.0, 1 << 30, 1 << 30);
    let mut slow = profile.disk_read.clone();
    slow.points[0].gbps = 0.5;
    profile.interference.disk_read_under_compute = Some(slow);
    let read_end = |profile: &ferry_core::profile::Profile, compute: Kind| {
        let g = graph(vec![task(DISK_READ, 3_000, 0, vec![]), task(compute, 0, 1_000, vec![])], 1 << 30, 1 << 30, 1);
        let out = simulate(&g, &CostModel::new(profile, &tiny())).unwrap();
        assert_eq!(out.trace.spans[1].end_ns, 1_000, "compute is not slowed (no compute slowdown)");
        out.trace.spans[0].end_ns
    };
    assert_eq!(read_end(&profile, HOST_COMPUTE), 3_500);
    assert_eq!(read_end(&profile, DEVICE_COMPUTE), 3_000, "a discrete GPU does not slow the disk");
    profile.unified_memory = true;
    assert_eq!(read_end(&profile, DEVICE_COMPUTE), 3_500);
    // Without the curve (datasheet profiles) reads ignore compute.
    profile.interference.disk_read_under_compute = None;
    assert_eq!(read_end(&profile, DEVICE_COMPUTE), 3_000);
}

#[test]
fn copies_in_opposite_directions_slow_each_other_by_the_duplex_factor() {
    // 1 byte/ns each way alone; with a duplex slowdown of 1.0 both run at half rate
    // while they overlap: 2000 bytes each way, together, end at 4000 ns; a lone copy at 2000.
    let mut profile = flat_profile(1.0, 1.0, 1 << 30, 1 << 30);
    profile.interference.copy_duplex_slowdown = 1.0;
    let both = graph(vec![task(H2D, 2_000, 0, vec![]), task(D2H, 2_000, 0, vec![])], 1 << 30, 1 << 30, 1);
    let out = simulate(&both, &CostModel::new(&profile, &tiny())).unwrap();
    assert_eq!((out.trace.spans[0].end_ns, out.trace.spans[1].end_ns), (4_000, 4_000));
    let alone = graph(vec![task(H2D, 2_000, 0, vec![])], 1 << 30, 1 << 30, 1);
    assert_eq!(simulate(&alone, &CostModel::new(&profile, &tiny())).unwrap().trace.spans[0].end_ns, 2_000);
}

#[test]
fn a_pools_peak_counts_an_instants_releases_before_its_acquisitions() {
    // Compute 0 holds 100 device bytes until task 1, which takes no time, releases
    // them at 1000 ns — the instant copy 2 takes 50. At that instant the release
    // counts first: the peak is 100, not 150; the device computes for 1000 ns and the
    // copy (1000 bytes at 1 byte/ns) keeps the link busy for 1000 more.
    let profile = flat_profile(1.0, 1.0, 1 << 30, 1 << 30);
    let mut hold = task(DEVICE_COMPUTE, 0, 1_000, vec![]);
    let (hundred, fifty) = (MemOp { pool: Pool::DEVICE, bytes: 100 }, MemOp { pool: Pool::DEVICE, bytes: 50 });
    hold.acquire.push(hundred);
    let mut free = task(DEVICE_COMPUTE, 0, 0, vec![0]);
    free.release.push(hundred);
    let mut copy = task(H2D, 1_000, 0, vec![0]);
    copy.acquire.push(fifty);
    copy.release.push(fifty);
    let g = graph(vec![hold, free, copy], 1 << 30, 1 << 30, 1);
    let out = simulate(&g, &CostModel::new(&profile, &tiny())).unwrap();
    let spans = &out.trace.spans;
    assert_eq!((spans[1].start_ns, spans[1].end_ns, spans[2].start_ns, spans[2].end_ns), (1_000, 1_000, 1_000, 2_000));
    let usage = ferry_core::trace::Usage::of_trace(&g, &out.trace);
    assert_eq!(usage.held_peak_bytes[g.pool_index(Pool::DEVICE)], 100);
    assert_eq!(usage.busy_ns[g.resource_index(ferry_core::graph::Resource::DEVICE_COMPUTE)], 1_000);
    assert_eq!(usage.busy_ns[g.resource_index(ferry_core::graph::Resource::HOST_TO_DEVICE)], 1_000);
    // The simulator's own figures, kept as its clock advanced, are the same.
    assert_eq!(out.usage, usage);
}
