//! Machines of several kinds of device and several hosts: catalog clusters build valid
//! profiles whose places keep their own figures; a two-stage plan over two machines
//! lowers with each stage's host, disk and link, and simulates deterministically; the
//! pipeline search covers every layer, never loses to the splits it is compared with,
//! and says which device falls short when nothing fits.

use std::path::Path;

use ferry_core::catalog::Catalog;
use ferry_core::graph::{Payload, Place, Resource, TaskKind};
use ferry_core::model::{Dtype, WeightFormats};
use ferry_core::plan::{HardwareRef, Policy, Schedule, Stage, Tier, TierCounts, Workload};
use ferry_core::profile::Profile;
use ferry_core::resolve::resolve_hardware;
use ferry_core::schedule::{lower, Steps};
use ferry_sim::predict::{predict, Extrapolation};
use ferry_sim::tune::{tune_pipeline, BatchChoice, KnobSpace, Objective, TuneError, TuneRequest};

fn cluster(name: &str) -> Profile {
    let catalog = Catalog::builtin().unwrap();
    let hardware = HardwareRef { cluster: Some(name.into()), ..HardwareRef::default() };
    resolve_hardware(&catalog, &hardware, Path::new(".")).unwrap().0
}

#[test]
fn catalog_clusters_are_valid_and_keep_each_places_figures() {
    let catalog = Catalog::builtin().unwrap();
    assert!(catalog.clusters.len() >= 6);
    for spec in &catalog.clusters {
        let profile = cluster(&spec.name);
        profile.validate().unwrap();
        let devices: u32 = spec.nodes.iter().flat_map(|n| &n.devices).map(|d| d.count).sum();
        assert_eq!(profile.device_count(), devices as usize, "{}", spec.name);
        assert_eq!(profile.host_count(), spec.nodes.len(), "{}", spec.name);
    }
    let edge = cluster("edge-trio-wifi");
    let (laptop, orin, pi) = (edge.device(0), edge.device(1), edge.device(2));
    assert_eq!((laptop.host, orin.host, pi.host), (0, 1, 2));
    assert!(!laptop.unified_memory && orin.unified_memory && pi.unified_memory);
    assert!(orin.compute.peak_flops > 10.0 * pi.compute.peak_flops);
    // The Pi computes on its own CPU: its device figures are its host's.
    assert_eq!(pi.compute, edge.host(2).compute);
    assert_eq!(pi.memory_bytes, 6 << 30);
    assert_eq!(edge.host(2).name, "raspberry-pi-5");
    // Every pair of devices on different machines is joined by the Wi-Fi curve.
    assert_eq!(edge.links.len(), 6);
    let wifi = edge.links[0].curve.bytes_per_ns(1 << 20, 1);
    assert!(wifi < 0.08, "{wifi}");
    // One server of one kind: no per-device figures, a peer link between every pair.
    let l4 = cluster("8x-l4");
    assert!(l4.devices.iter().all(|d| d.profile.is_none()));
    assert_eq!(l4.links.len(), 56);
    // No peer-to-peer: copies between cards go through the host.
    assert!(cluster("8x-rtx4090").links.is_empty());
}

/// Llama-2-13B over the laptop (layers 0–9, streamed from its host) and the Orin.
fn edge_pair_plan() -> (Policy, Workload) {
    let mut policy = Policy::all_on_device(40, 2, Dtype::F16);
    policy.schedule = Schedule::LayerPrefetch;
    policy.num_micro_batches = 2;
    policy.prefetch_depth = 1;
    policy.embeddings = Tier::Host;
    policy.chunk_bytes = 64 << 20;
    let counts = |device, host, disk| TierCounts { device, host, disk };
    policy.stages = vec![
        Stage {
            device: 0,
            attention_weights: counts(2, 8, 0),
            mlp_weights: counts(2, 8, 0),
            kv_cache: counts(10, 0, 0),
        },
        Stage {
            device: 1,
            attention_weights: counts(30, 0, 0),
            mlp_weights: counts(30, 0, 0),
            kv_cache: counts(30, 0, 0),
        },
    ];
    policy.attention_weights = counts(32, 8, 0);
    policy.mlp_weights = counts(32, 8, 0);
    policy.kv_cache = counts(40, 0, 0);
    (policy, Workload { batch_size: 4, prompt_len: 128, gen_len: 8 })
}

#[test]
fn a_plan_over_two_machines_uses_each_stages_host_disk_and_link() {
    let profile = cluster("laptop-orin-1gbe");
    let model = Catalog::builtin().unwrap().model("llama-2-13b").unwrap().value;
    let (policy, workload) = edge_pair_plan();
    let graph = lower(&policy, &model, &workload, &profile, &Steps::All).unwrap();
    let pools: Vec<Place> = graph.pools.iter().map(|p| p.pool).collect();
    assert_eq!(pools, [Place::Device(0), Place::Device(1), Place::Host(0), Place::Host(1)]);
    let resources: Vec<Resource> = graph.resources.iter().map(|r| r.resource).collect();
    assert!(resources.contains(&Resource::Disk { host: 1 }));
    assert!(resources.contains(&Resource::compute(Place::Host(1))));
    assert!(resources.contains(&Resource::link(Place::Host(1), Place::Device(1))));
    // The laptop's streamed layers come from its own host; the Orin (unified) copies
    // no weights from its host, and the hidden state crosses the network.
    let copies = |from: Place, to: Place, payload: fn(&Payload) -> bool| {
        graph.tasks.iter().filter(|t| t.resource == Resource::link(from, to) && payload(&t.payload)).count()
    };
    assert!(copies(Place::Host(0), Place::Device(0), |p| matches!(p, Payload::Weights { .. })) > 0);
    assert_eq!(copies(Place::Host(1), Place::Device(1), |p| matches!(p, Payload::Weights { .. })), 0);
    assert!(copies(Place::Device(0), Place::Device(1), |p| matches!(p, Payload::Activations)) > 0);
    assert!(graph.tasks.iter().all(|t| t.kind != TaskKind::DiskRead || t.resource == Resource::Disk { host: 0 }));
    // The host's capacity is each machine's own.
    let host1 = graph.pools.iter().find(|p| p.pool == Place::Host(1)).unwrap();
    assert!(host1.capacity_bytes <= 64 << 30 && host1.capacity_bytes > 32 << 30);

    let a = predict(&policy, &model, &workload, &profile, Extrapolation::Full).unwrap();
    let b = predict(&policy, &model, &workload, &profile, Extrapolation::Full).unwrap();
    assert_eq!(a.metrics.total_ns, b.metrics.total_ns);
    assert_eq!(a.trace.spans, b.trace.spans);
    // Over 1 GbE the activations take measurable time; over a faster link the same plan is faster.
    let link_busy = |p: &ferry_sim::predict::Prediction| {
        p.metrics
            .resources
            .iter()
            .find(|u| u.resource == Resource::link(Place::Device(0), Place::Device(1)))
            .unwrap()
            .busy_ns
    };
    let mut fast = profile.clone();
    for link in &mut fast.links {
        link.curve = ferry_core::profile::TransferCurve::from_datasheet(100.0, 1_000, 1_000);
    }
    let quick = predict(&policy, &model, &workload, &fast, Extrapolation::Full).unwrap();
    assert!(link_busy(&quick) < link_busy(&a), "{} vs {}", link_busy(&quick), link_busy(&a));
}

fn request<'a>(model: &'a ferry_core::model::ModelSpec, profile: &'a Profile, batch: BatchChoice) -> TuneRequest<'a> {
    TuneRequest {
        model,
        profile,
        prompt_len: 512,
        gen_len: 32,
        batch,
        objective: Objective::Throughput,
        weight_format: WeightFormats::uniform(ferry_core::model::WeightFormat::F16),
        kv_dtype: Dtype::F16,
        speculation: None,
    }
}

#[test]
fn the_pipeline_search_covers_every_layer_and_beats_the_splits_it_is_compared_with() {
    let catalog = Catalog::builtin().unwrap();
    for (name, model) in
        [("8x-rtx4090", "llama-2-70b"), ("desktop-3090-3060", "llama-2-13b"), ("laptop-orin-1gbe", "llama-2-70b")]
    {
        let profile = cluster(name);
        let model = catalog.model(model).unwrap().value;
        let request = request(&model, &profile, BatchChoice::Auto { max: 64 });
        let result = tune_pipeline(&request, &KnobSpace::full()).unwrap();
        let policy = &result.best.policy;
        assert_eq!(policy.stages.iter().map(Stage::layers).sum::<u64>(), model.num_layers, "{name}");
        let mut devices: Vec<u16> = policy.stages.iter().map(|s| s.device).collect();
        devices.dedup();
        assert_eq!(devices.len(), policy.stages.len(), "{name}: a device holds two stages");
        // The plan simulates with the figures reported.
        let again = predict(policy, &model, &result.best.workload, &profile, Extrapolation::Full).unwrap();
        assert_eq!(again.metrics.total_ns, result.best.metrics.total_ns, "{name}");
        // Even and by-memory splits; where the plan parks KV in host memory, also the
        // search and the even split with every stage's KV cache on its device.
        let offloads = policy.kv_cache.device < model.num_layers;
        assert_eq!(result.baselines.len(), if offloads { 4 } else { 2 }, "{name}");
        for baseline in &result.baselines {
            if baseline.name.contains("KV kept on the devices") {
                if let Ok(c) = &baseline.outcome {
                    assert_eq!(c.policy.kv_cache.device, model.num_layers, "{name}: {}", baseline.name);
                    assert!(c.policy.stages.iter().all(|s| s.kv_cache.device == s.layers()), "{name}");
                }
            }
            if let Ok(c) = &baseline.outcome {
                assert!(c.metrics.tokens_per_s <= result.best.metrics.tokens_per_s + 1e-9, "{name}: {}", baseline.name);
            }
        }
    }
    // Two cards of one desktop: the faster, larger 3090 holds more of the model.
    let profile = cluster("desktop-3090-3060");
    let model = catalog.model("llama-2-13b").unwrap().value;
    let result = tune_pipeline(&request(&model, &profile, BatchChoice::Fixed(16)), &KnobSpace::full()).unwrap();
    let on = |d: u16| result.best.policy.stages.iter().filter(|s| s.device == d).map(Stage::layers).sum::<u64>();
    assert!(on(0) > on(1), "3090 {} layers, 3060 {}", on(0), on(1));
    assert_eq!(result.best.workload.batch_size, 16);
}

/// PipeMax's setting: eight GPUs of a commodity server, Llama-2-70B, an offline batch.
/// Parking KV in host memory lets the pipeline hold a larger batch than keeping it on
/// the cards, and the search finds it; the comparison is simulated, not assumed.
#[test]
fn kv_offload_lets_eight_cards_hold_a_larger_batch_than_keeping_kv_on_them() {
    let catalog = Catalog::builtin().unwrap();
    let profile = cluster("8x-rtx4090");
    let model = catalog.model("llama-2-70b").unwrap().value;
    let mut request = request(&model, &profile, BatchChoice::Auto { max: 64 });
    request.gen_len = 128;
    let result = tune_pipeline(&request, &KnobSpace::full()).unwrap();
    assert!(result.best.policy.kv_cache.host > 0, "{:?}", result.best.policy.kv_cache);
    let kept = result.baselines.iter().find(|b| b.name == "ferry, KV kept on the devices").unwrap();
    let kept = kept.outcome.as_ref().unwrap();
    assert!(kept.workload.batch_size < result.best.workload.batch_size);
    assert!(kept.metrics.tokens_per_s < result.best.metrics.tokens_per_s);
}

#[test]
fn when_nothing_fits_the_search_says_which_device_falls_short_and_by_how_much() {
    let catalog = Catalog::builtin().unwrap();
    let path = std::env::temp_dir().join(format!("ferry-small-cluster-{}.yaml", std::process::id()));
    std::fs::write(
        &path,
        "name: small\ndescription: two small budgets\nnodes:\n  - host: ferry-ci-vm\n    devices: [{gpu: cpu, count: 2, memory: 200MiB}]\nsource: test\n",
    )
    .unwrap();
    let hardware = HardwareRef { cluster: Some(path.display().to_string()), ..HardwareRef::default() };
    let profile = resolve_hardware(&catalog, &hardware, Path::new(".")).unwrap().0;
    std::fs::remove_file(&path).unwrap();
    let model = catalog.model("llama-2-70b").unwrap().value;
    let err = tune_pipeline(&request(&model, &profile, BatchChoice::Auto { max: 8 }), &KnobSpace::full()).unwrap_err();
    let TuneError::Impossible(message) = err else { panic!("{err}") };
    assert!(
        message.contains("device 0 (cpu) needs") && message.contains("short") && message.contains("200 MiB"),
        "{message}"
    );
}
