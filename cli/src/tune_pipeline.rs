//! `ferry tune --cluster` (or several devices): the pipeline plan's report — the
//! machine, the search, each stage's devices, layers and offload plan, the prediction,
//! and the other splits of the same devices.

use std::time::Instant;

use anyhow::Result;
use ferry_core::plan::{HardwareRef, Policy, Stage};
use ferry_core::units::{format_bytes, format_ns};
use ferry_sim::tune::{tune_pipeline, KnobSpace, Objective, PipelineResult, SearchStats, TuneRequest, TuneResult};

use crate::report;
use crate::table::Table;
use crate::tune_cmd::TuneArgs;

/// `ferry tune --cluster`: the pipeline search over the machine's devices, its plan
/// written like any, then its report (`tune_pipeline`).
pub fn run(args: &TuneArgs, request: &TuneRequest, hardware: &HardwareRef, space: &KnobSpace) -> Result<()> {
    let started = Instant::now();
    let outcome = tune_pipeline(request, space)?;
    let search_time = started.elapsed();
    let best = outcome.best.clone();
    let by_batch = vec![(best.workload.batch_size, best.metrics.tokens_per_s)];
    let result = TuneResult { best: best.clone(), top: vec![best], stats: SearchStats::default(), by_batch };
    let plan = crate::tune_output::write_outputs(args, request, hardware, space, &result)?;
    if args.json {
        let pipeline = json(&outcome);
        return crate::tune_output::print_json(&plan, &result, &[], search_time, 0, vec![pipeline]);
    }
    print(&outcome, request, search_time);
    Ok(())
}

/// The machine in one line: "8 devices (8× rtx4090, 24 GiB each) on 1 host".
pub fn machine_line(profile: &ferry_core::profile::Profile) -> String {
    let mut kinds: Vec<(String, u64, usize)> = Vec::new();
    for d in 0..profile.device_count() as u16 {
        let view = profile.device(d);
        match kinds.iter_mut().find(|(name, memory, _)| name == view.name && *memory == view.memory_bytes) {
            Some(kind) => kind.2 += 1,
            None => kinds.push((view.name.to_string(), view.memory_bytes, 1)),
        }
    }
    let kinds: Vec<String> =
        kinds.iter().map(|(name, memory, n)| format!("{n}× {name} ({})", format_bytes(*memory))).collect();
    format!("{} devices: {} on {} host(s)", profile.device_count(), kinds.join(", "), profile.host_count())
}

pub fn print(outcome: &PipelineResult, request: &TuneRequest, search_time: std::time::Duration) {
    let profile = request.profile;
    let best = &outcome.best;
    println!(
        "{} on {} ({}): prompt {} tokens, {} new tokens per sequence, objective {}",
        request.model.name,
        match &profile.provenance {
            ferry_core::profile::Provenance::Datasheet { gpu, .. } => gpu.as_str(),
            ferry_core::profile::Provenance::Measured { machine, .. } => machine.as_str(),
        },
        machine_line(profile),
        request.prompt_len,
        request.gen_len,
        match request.objective {
            Objective::Throughput => "throughput",
            Objective::Latency => "latency",
        }
    );
    println!("{}", report::provenance_line(profile));
    let stats = &outcome.stats;
    println!(
        "search: {} knob groups × {} device order(s){}, {} stage offload plans priced, layers split exactly over each \
         order, {} plans simulated in {:.2} s\n",
        stats.groups,
        stats.orders / stats.groups.max(1),
        if stats.orders_searched { "" } else { " (the cluster's own order: too many devices to order)" },
        stats.stage_plans,
        stats.simulated,
        search_time.as_secs_f64()
    );
    if let Some(name) = outcome.adopted {
        println!("note: the {name} simulated faster than the searched splits; it is the plan\n");
    }
    let policy = &best.policy;
    println!(
        "Best plan (batch {}: {} micro-batch(es) of {}, {}):",
        best.workload.batch_size,
        policy.num_micro_batches,
        policy.micro_batch_size,
        policy.schedule.name()
    );
    print!("{}", stage_table(policy, profile));
    println!();
    print!("{}", report::metrics_text(&best.metrics, None));
    println!(
        "\nCompared with other splits of the same devices in their own order (each stage placed alike; splits with \
         the KV cache kept on the devices, as engines without KV offload run, at the batch they hold):"
    );
    let mut table = Table::new(["split", "layers per device", "batch", "tokens/s", "first token", "vs ferry"]);
    let layers_of = |p: &Policy| -> String {
        let mut per_device = vec![0u64; profile.device_count()];
        for s in &p.stages {
            per_device[s.device as usize] += s.layers();
        }
        per_device.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
    };
    table.row([
        if outcome.adopted.is_some() { "ferry (this plan, adopted below)" } else { "ferry (this plan)" }.to_string(),
        layers_of(policy),
        best.workload.batch_size.to_string(),
        format!("{:.2}", best.metrics.tokens_per_s),
        format_ns(best.metrics.time_to_first_token_ns),
        "1.00×".into(),
    ]);
    for baseline in &outcome.baselines {
        let layers = baseline.layers.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        match &baseline.outcome {
            Ok(c) => table.row([
                baseline.name.to_string(),
                layers,
                c.workload.batch_size.to_string(),
                format!("{:.2}", c.metrics.tokens_per_s),
                format_ns(c.metrics.time_to_first_token_ns),
                format!("{:.2}×", c.metrics.tokens_per_s / best.metrics.tokens_per_s),
            ]),
            Err(e) => table.row([baseline.name.to_string(), layers, "—".into(), "—".into(), "—".into(), e.clone()]),
        }
    }
    print!("{}", table.render());
}

/// One row per stage: its device, layers and where its weights and KV cache live.
pub fn stage_table(policy: &Policy, profile: &ferry_core::profile::Profile) -> String {
    let mut table = Table::new(["stage", "device", "host", "layers", "weights dev/host/disk", "KV dev/host/disk"]);
    let mut first = 0;
    let counts = |s: &Stage| {
        (
            format!("{}/{}/{}", s.mlp_weights.device, s.mlp_weights.host, s.mlp_weights.disk),
            format!("{}/{}/{}", s.kv_cache.device, s.kv_cache.host, s.kv_cache.disk),
        )
    };
    for (index, stage) in policy.stage_list().iter().enumerate() {
        let view = profile.device(stage.device);
        let (weights, kv) = counts(stage);
        table.row([
            index.to_string(),
            format!("{} {}", stage.device, view.name),
            profile.host(view.host).name.to_string(),
            format!("{}–{}", first, first + stage.layers() - 1),
            weights,
            kv,
        ]);
        first += stage.layers();
    }
    table.render()
}

pub fn json(outcome: &PipelineResult) -> serde_json::Value {
    let baselines: Vec<serde_json::Value> = outcome
        .baselines
        .iter()
        .map(|b| match &b.outcome {
            Ok(c) => serde_json::json!({"name": b.name, "layers": b.layers, "batch_size": c.workload.batch_size,
                "tokens_per_s": c.metrics.tokens_per_s, "kv_cache": c.policy.kv_cache}),
            Err(e) => serde_json::json!({"name": b.name, "layers": b.layers, "error": e}),
        })
        .collect();
    serde_json::json!({
        "pipeline": outcome.stats,
        "estimate_ms": outcome.estimate_ms,
        "splits": baselines,
    })
}
