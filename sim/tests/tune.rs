//! Tuner behaviour: never worse than the baselines, plans that fit, the whole model on
//! the device when it fits, determinism, clear errors for impossible requests.

use ferry_core::catalog::Catalog;
use ferry_core::hardware::Hardware;
use ferry_core::model::{Dtype, ModelSpec, WeightFormat, WeightFormats};
use ferry_core::plan::Tier;
use ferry_core::profile::Profile;
use ferry_core::schedule::{lower, Steps};
use ferry_core::units::MIB;
use ferry_sim::cost::CostModel;
use ferry_sim::tune::{tune, tune_and_compare, BatchChoice, KnobSpace, Objective, TuneError, TuneRequest};
use ferry_sim::{predict, predict_run_by, simulate, Extrapolation};

fn setup(gpu: &str, host: &str, model: &str, device_mem: Option<u64>) -> (ModelSpec, Profile) {
    let catalog = Catalog::builtin().unwrap();
    let gpu = catalog.gpu(gpu).unwrap().value;
    let host = catalog.host(host).unwrap().value;
    let mut profile = Profile::from_datasheet(&Hardware { gpu, host });
    if let Some(bytes) = device_mem {
        profile.device_memory_bytes = bytes;
        profile.memory_reserve_fraction = 0.0;
    }
    (catalog.model(model).unwrap().value, profile)
}

fn request<'a>(model: &'a ModelSpec, profile: &'a Profile, batch: BatchChoice) -> TuneRequest<'a> {
    TuneRequest {
        model,
        profile,
        prompt_len: 256,
        gen_len: 16,
        batch,
        objective: Objective::Throughput,
        weight_format: WeightFormats::uniform(WeightFormat::F16),
        kv_dtype: Dtype::F16,
        speculation: None,
    }
}

const SCENARIOS: [(&str, &str, &str, Option<u64>); 4] = [
    ("rtx3060-12gb", "desktop-pcie4", "llama-2-13b", None),
    ("rtx3060-laptop-6gb", "laptop-pcie3", "llama-2-7b", None),
    ("t4", "gcp-t4-flexgen", "opt-30b", None),
    ("cpu", "ferry-ci-vm", "tinyllama-1.1b", Some(512 * MIB)),
];

#[test]
fn tuned_plan_is_never_worse_than_a_baseline_and_fits() {
    for (gpu, host, model_name, device_mem) in SCENARIOS {
        let (model, profile) = setup(gpu, host, model_name, device_mem);
        let req = request(&model, &profile, BatchChoice::Auto { max: 16 });
        let comparison = tune_and_compare(&req, &KnobSpace::full()).unwrap();
        let best = &comparison.result.best;
        // The search itself should find these plans; adopting a baseline is only the safety net.
        assert_eq!(comparison.adopted_baseline, None, "{gpu}/{model_name}: search lost to a baseline");
        for baseline in &comparison.baselines {
            if let Ok(c) = &baseline.outcome {
                assert!(
                    best.metrics.tokens_per_s >= c.metrics.tokens_per_s,
                    "{gpu}/{model_name}: {} {} tok/s beats the plan's {}",
                    baseline.name,
                    c.metrics.tokens_per_s,
                    best.metrics.tokens_per_s
                );
                // Each baseline is priced as the engine it models runs it.
                let priced =
                    predict_run_by(baseline.engine, &c.policy, &model, &c.workload, &profile, Extrapolation::Full);
                assert_eq!(priced.unwrap().metrics.tokens_per_s, c.metrics.tokens_per_s, "{}", baseline.name);
            }
        }
        // The emitted plan fits its budgets when every step is simulated.
        let graph = lower(&best.policy, &model, &best.workload, &profile, &Steps::All).unwrap();
        graph.check_fits().unwrap();
        let full = predict(&best.policy, &model, &best.workload, &profile, Extrapolation::Full).unwrap();
        for pool in &full.metrics.pools {
            assert!(pool.peak_bytes <= pool.capacity_bytes, "{gpu}/{model_name}: {:?}", pool);
        }
        let out = simulate(&graph, &CostModel::new(&profile, &model)).unwrap();
        assert_eq!(out.trace.spans.len(), graph.tasks.len());
        assert!(
            comparison.result.stats.simulated > 0
                && comparison.result.stats.considered > comparison.result.stats.simulated
        );
    }
}

#[test]
fn a_model_that_fits_stays_on_the_device() {
    for (gpu, host, model_name) in
        [("a100-80gb", "server-pcie4", "llama-2-7b"), ("rtx4090", "desktop-pcie4", "tinyllama-1.1b")]
    {
        let (model, profile) = setup(gpu, host, model_name, None);
        let req = request(&model, &profile, BatchChoice::Fixed(4));
        let best = tune_and_compare(&req, &KnobSpace::full()).unwrap().result.best;
        let layers = model.num_layers;
        let p = &best.policy;
        assert_eq!(p.attention_weights.device, layers, "{gpu}: {p:?}");
        assert_eq!(p.mlp_weights.device, layers);
        assert_eq!(p.kv_cache.device, layers);
        assert_eq!((p.embeddings, p.head), (Tier::Device, Tier::Device));
    }
}

#[test]
fn a_plan_that_streams_leaves_an_untied_embedding_table_on_disk() {
    // TinyLlama's f16 table is 131 MB of a 512 MiB budget; a lookup reads kilobytes.
    let (model, profile) = setup("cpu", "ferry-ci-vm", "tinyllama-1.1b", Some(512 * MIB));
    let best = tune(&request(&model, &profile, BatchChoice::Fixed(4)), &KnobSpace::full()).unwrap().best;
    assert!(best.policy.mlp_weights.disk > 0, "{:?}", best.policy);
    assert_eq!(best.policy.embeddings, Tier::Disk);
    let device = best.metrics.pools.iter().find(|p| p.pool.is_device()).unwrap();
    assert!(device.peak_bytes <= device.capacity_bytes);
    // A tied head multiplies by the whole table every step: it stays in memory.
    let (tied, profile) = setup("cpu", "ferry-ci-vm", "opt-6.7b", Some(4096 * MIB));
    assert!(tied.tie_word_embeddings);
    let best = tune(&request(&tied, &profile, BatchChoice::Fixed(4)), &KnobSpace::full()).unwrap().best;
    assert!(best.policy.mlp_weights.disk > 0, "{:?}", best.policy);
    assert_eq!(best.policy.embeddings, Tier::Device);
}

/// The LP is indifferent between tiers that are not the bottleneck; on unified memory a
/// KV layer stays on disk only where the device has no room for one more beside what
/// the simulated plan held in flight (a person would not write it to the SSD every step).
#[test]
fn free_device_memory_holds_the_kv_cache_before_the_disk_on_unified_memory() {
    let (model, profile) = setup("cpu", "ferry-ci-vm", "tinyllama-1.1b", Some(512 * MIB));
    let best = tune(&request(&model, &profile, BatchChoice::Fixed(1)), &KnobSpace::full()).unwrap().best;
    assert!(best.policy.kv_cache.device > 0, "{:?}", best.policy);
    if best.policy.kv_cache.disk > 0 {
        let device = best.metrics.pools.iter().find(|p| p.pool.is_device()).unwrap();
        let in_flight = device.peak_bytes - device.resident_bytes;
        let mut more = best.policy.clone();
        (more.kv_cache.device, more.kv_cache.disk) = (more.kv_cache.device + 1, more.kv_cache.disk - 1);
        let pools = ferry_core::schedule::pool_specs(&more, &model, &best.workload, &profile);
        assert!(pools[0].resident_bytes() + in_flight > pools[0].capacity_bytes, "{:?}", best.policy);
    }
}

/// On unified memory a budget too tight for the cache beside the resident weights gets it
/// by streaming a few attention layers (a batch-8 cache of a 4-bit 1B model is a few MB;
/// on disk it is a small read and write per layer every step behind the weight stream).
#[test]
fn a_tight_budget_streams_attention_layers_to_hold_the_kv_cache() {
    let q4_k = WeightFormat::parse("q4_k").unwrap();
    let (model, mut profile) = setup("cpu", "ferry-ci-vm", "tinyllama-1.1b", None);
    let model_bytes = ferry_core::model::WeightLayout::of(&model, &WeightFormats::uniform(q4_k)).total_bytes();
    profile.device_memory_bytes = model_bytes / 3;
    profile.memory_reserve_fraction = 0.0;
    let req =
        TuneRequest { weight_format: WeightFormats::uniform(q4_k), ..request(&model, &profile, BatchChoice::Fixed(8)) };
    let best = tune(&req, &KnobSpace::full()).unwrap().best;
    assert_eq!(best.policy.kv_cache.disk, 0, "{:?}", best.policy);
    assert!(best.policy.attention_weights.disk > 0, "{:?}", best.policy);
    assert!(best.policy.attention_weights.device > 0, "{:?}", best.policy);
}

#[test]
fn tuning_is_deterministic() {
    let (model, profile) = setup("rtx3060-laptop-6gb", "laptop-pcie3", "llama-2-13b", None);
    let req = request(&model, &profile, BatchChoice::Auto { max: 16 });
    let a = tune(&req, &KnobSpace::full()).unwrap();
    let b = tune(&req, &KnobSpace::full()).unwrap();
    assert_eq!(a.best.policy, b.best.policy);
    assert_eq!(a.best.metrics, b.best.metrics);
    assert_eq!(a.stats, b.stats);
}

#[test]
fn impossible_budget_names_the_constraint_and_shortfall() {
    let (model, profile) = setup("cpu", "ferry-ci-vm", "llama-2-13b", Some(64 * MIB));
    let req = request(&model, &profile, BatchChoice::Auto { max: 8 });
    match tune(&req, &KnobSpace::full()) {
        Err(TuneError::Impossible(message)) => {
            assert!(message.contains("device memory") && message.contains("short by"), "{message}");
        }
        other => panic!("expected an impossible-request error, got {other:?}"),
    }
}

#[test]
fn restricting_the_schedule_is_honoured() {
    let (model, profile) = setup("rtx3060-12gb", "desktop-pcie4", "llama-2-13b", None);
    let req = request(&model, &profile, BatchChoice::Fixed(8));
    for schedule in ferry_core::plan::Schedule::ALL {
        let space = KnobSpace { schedules: vec![schedule], ..KnobSpace::full() };
        let result = tune(&req, &space).unwrap();
        assert!(result.top.iter().all(|c| c.policy.schedule == schedule));
        assert_eq!(result.best.workload.batch_size, 8);
        // A faster baseline of another schedule is compared, not adopted.
        let compared = tune_and_compare(&req, &space).unwrap();
        assert_eq!(compared.result.best.policy.schedule, schedule);
    }
}

/// The sequential schedule holds one layer's weights in flight, the least of any: it
/// must fit every budget some other schedule fits (a user asking for it at a tight
/// budget used to be told nothing fits while pipelined plans did).
#[test]
fn the_least_memory_schedule_fits_whenever_any_does() {
    let (model, _) = setup("cpu", "laptop-pcie3", "test-small", None);
    let mut checked = 0;
    for device_mib in (60..=120).step_by(2) {
        let (_, profile) = setup("cpu", "laptop-pcie3", "test-small", Some(device_mib * MIB));
        let req = TuneRequest { prompt_len: 16, gen_len: 4, ..request(&model, &profile, BatchChoice::Fixed(2)) };
        if tune(&req, &KnobSpace::full()).is_err() {
            continue;
        }
        checked += 1;
        let sequential = KnobSpace { schedules: vec![ferry_core::plan::Schedule::Sequential], ..KnobSpace::full() };
        if let Err(error) = tune(&req, &sequential) {
            panic!("{device_mib} MiB: some schedule fits but sequential does not: {error}");
        }
    }
    assert!(checked > 20, "only {checked} budgets fit at all");
}

/// A plan with weights both in host RAM and on disk: a later layer's host-resident copy
/// is ready while an earlier layer's copy still waits on its read. Taking the earlier
/// copy's room deadlocked a simulation, and `ferry tune --gpu rtx4090
/// --model 70b` failed with "device memory is exhausted".
#[test]
fn a_plan_mixing_host_and_disk_weights_simulates_to_the_end() {
    let (model, profile) = setup("rtx4090", "desktop-pcie4", "llama-2-70b", None);
    let req = TuneRequest { prompt_len: 512, gen_len: 32, ..request(&model, &profile, BatchChoice::Fixed(64)) };
    let best = tune_and_compare(&req, &KnobSpace::full()).unwrap().result.best;
    let p = &best.policy;
    assert!(p.mlp_weights.host > 0 && p.mlp_weights.disk > 0, "{p:?}");
    assert!(best.metrics.tokens_per_s > 0.0);
}

/// The LP is indifferent between tiers that are not the bottleneck; among equally fast
/// plans a person would hold the KV cache in free host RAM rather than write it to the
/// SSD every step, and the tuner must too, or say why not.
#[test]
fn free_host_ram_is_used_before_the_disk() {
    let (model, profile) = setup("rtx3060-12gb", "desktop-pcie4", "llama-2-13b", None);
    let req = TuneRequest { objective: Objective::Latency, ..request(&model, &profile, BatchChoice::Fixed(1)) };
    let comparison = tune_and_compare(&req, &KnobSpace::full()).unwrap();
    let policy = &comparison.result.best.policy;
    assert_eq!((policy.kv_cache.disk, policy.attention_weights.disk, policy.mlp_weights.disk), (0, 0, 0), "{policy:?}");
    assert_eq!(comparison.disk_note, None);
    // Where the host is too small, the plan says so.
    let mut small = profile.clone();
    small.host_memory_bytes = 16 << 30;
    let req = request(&model, &small, BatchChoice::Fixed(16));
    let comparison = tune_and_compare(&req, &KnobSpace::full()).unwrap();
    let policy = &comparison.result.best.policy;
    assert!(policy.kv_cache.disk + policy.mlp_weights.disk > 0, "{policy:?}");
    let note = comparison.disk_note.expect("a plan with layers on disk says why");
    assert!(note.contains("stay on disk") && note.contains("no room"), "{note}");
}

/// A budget too small for two streamed layers beside the resident set: every
/// overlapping schedule's group LP misses its prefetch window, yet such plans run (a
/// load waits for memory) and stream several times faster than the sequential one.
/// The search bounds those groups again with one layer in flight instead of giving
/// them up (it once returned the sequential plan here).
#[test]
fn groups_that_cannot_hold_their_prefetch_window_are_still_searched() {
    let (model, profile) = setup("cpu", "ferry-ci-vm", "tinyllama-1.1b", Some(384 * MIB));
    let req = TuneRequest { prompt_len: 64, gen_len: 32, ..request(&model, &profile, BatchChoice::Auto { max: 64 }) };
    let best = tune(&req, &KnobSpace::full()).unwrap().best;
    let sequential = KnobSpace { schedules: vec![ferry_core::plan::Schedule::Sequential], ..KnobSpace::full() };
    let only_sequential = tune(&req, &sequential).unwrap().best;
    assert_ne!(best.policy.schedule, ferry_core::plan::Schedule::Sequential);
    assert!(
        best.metrics.tokens_per_s > 1.5 * only_sequential.metrics.tokens_per_s,
        "{} against {} tok/s sequential",
        best.metrics.tokens_per_s,
        only_sequential.metrics.tokens_per_s
    );
    // The plan runs in simulation within its budget (no deadlock, no overdraft).
    let p = predict(&best.policy, &model, &best.workload, &profile, Extrapolation::Full).unwrap();
    let device = p.metrics.pools.iter().find(|pool| pool.pool == ferry_core::graph::Place::DEVICE).unwrap();
    assert!(device.peak_bytes <= 384 * MIB, "{}", device.peak_bytes);
}

/// A mixture of experts whose measured routing sends most tokens to two experts per
/// layer: with device memory left beside the streamed layers, the tuner keeps those
/// experts on the device (`hot_experts`) — predicted faster than the same plan without
/// them — and under uniform routing it keeps none unless that is faster too.
#[test]
fn a_skewed_routing_keeps_its_hot_experts_on_the_device() {
    let (mut model, profile) = setup("cpu", "ferry-ci-vm", "test-moe", Some(300 * MIB));
    let (layers, experts) = (model.num_layers as usize, model.num_experts as usize);
    let shares = (0..layers)
        .map(|l| {
            let mut s = vec![0.2 / (experts - 2) as f64; experts];
            s[(3 * l) % experts] = 0.9;
            s[(3 * l + 5) % experts] = 0.9;
            s
        })
        .collect();
    let routing = ferry_core::model::ExpertPopularity {
        model: model.name.clone(),
        experts_per_token: model.experts_per_token,
        tokens: 1000,
        layers: shares,
    };
    routing.check(model.num_layers, model.num_experts, model.experts_per_token).unwrap();
    model.routing = Some(std::sync::Arc::new(routing));
    let req = TuneRequest { prompt_len: 32, gen_len: 32, ..request(&model, &profile, BatchChoice::Fixed(1)) };
    let best = tune_and_compare(&req, &KnobSpace::full()).unwrap().result.best;
    let policy = &best.policy;
    assert!(policy.hot_experts >= 2, "{policy:?}");
    let mut cold = policy.clone();
    cold.hot_experts = 0;
    let without = predict(&cold, &model, &best.workload, &profile, Extrapolation::Full).unwrap();
    assert!(
        best.metrics.tokens_per_s > 1.2 * without.metrics.tokens_per_s,
        "{} against {}",
        best.metrics.tokens_per_s,
        without.metrics.tokens_per_s
    );
    assert!(best.metrics.pools.iter().all(|p| p.peak_bytes <= p.capacity_bytes));
    // Hot experts are only kept where they are faster.
    model.routing = None;
    let req = TuneRequest { prompt_len: 32, gen_len: 32, ..request(&model, &profile, BatchChoice::Fixed(1)) };
    let best = tune_and_compare(&req, &KnobSpace::full()).unwrap().result.best;
    if best.policy.hot_experts > 0 {
        let mut cold = best.policy.clone();
        cold.hot_experts = 0;
        let without = predict(&cold, &model, &best.workload, &profile, Extrapolation::Full).unwrap();
        assert!(best.metrics.tokens_per_s > without.metrics.tokens_per_s);
    }
}

/// Past a measured curve's largest request size every size ties with it (the curve
/// holds its last rate), and a tie would go to the coarsest: a size nothing measured.
/// A measured profile's plans stay within what it measured; a datasheet's keep the
/// whole range.
#[test]
fn a_measured_profile_is_not_tuned_past_the_request_sizes_it_measured() {
    use ferry_core::profile::{CurvePoint, Provenance, TransferCurve};
    let (model, mut profile) = setup("cpu", "ferry-ci-vm", "tinyllama-1.1b", Some(512 * MIB));
    let chunks_of = |profile: &Profile| {
        let best = tune(&request(&model, profile, BatchChoice::Fixed(4)), &KnobSpace::full()).unwrap().best;
        assert!(best.policy.mlp_weights.disk > 0, "the plan streams from disk: {:?}", best.policy);
        best.policy.chunk_bytes
    };
    let datasheet_chunk = chunks_of(&profile);
    profile.provenance =
        Provenance::Measured { machine: "test".into(), date: "2026-12-03".into(), backend: "cpu".into() };
    let point =
        |chunk_bytes: u64, concurrency: u32, gbps: f64| CurvePoint { chunk_bytes, concurrency, gbps, spread: None };
    profile.disk_read = TransferCurve {
        latency_ns: 80_000,
        points: vec![point(MIB / 4, 1, 0.6), point(4 * MIB, 1, 1.0), point(16 * MIB, 1, 1.2), point(16 * MIB, 8, 1.5)],
    };
    profile.interference.disk_read_under_compute = None;
    let measured_chunk = chunks_of(&profile);
    assert!(measured_chunk <= 16 * MIB, "tuned to {measured_chunk} bytes per request; the curve stops at 16 MiB");
    assert!(datasheet_chunk >= measured_chunk, "datasheet {datasheet_chunk}, measured {measured_chunk}");
}
