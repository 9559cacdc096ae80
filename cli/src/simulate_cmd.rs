//! `ferry simulate`: predict one plan.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ferry_core::catalog::Catalog;
use ferry_core::resolve::load_plan;
use ferry_core::trace::chrome_trace;
use ferry_sim::{predict, Extrapolation};

use crate::report;

#[derive(Args)]
pub struct SimulateArgs {
    /// Plan file (YAML) naming model, hardware, workload and policy; examples ship
    /// in configs/plans/ (print one with `ferry simulate --example NAME`).
    #[arg(long, required_unless_present = "example")]
    plan: Option<PathBuf>,
    /// Print a built-in example plan (e.g. rtx3060-13b-layer-prefetch) instead of simulating.
    #[arg(long, conflicts_with = "plan")]
    example: Option<String>,
    /// Write the predicted trace as Chrome trace-event JSON (opens in Perfetto).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Print the metrics as JSON.
    #[arg(long)]
    json: bool,
    /// Simulate a few decode steps and interpolate the rest (faster for long generations).
    #[arg(long)]
    sampled: bool,
    /// Overwrite the trace file if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: SimulateArgs) -> Result<()> {
    let catalog = Catalog::builtin()?;
    if let Some(name) = args.example {
        let wanted = format!("{}.yaml", name.trim_end_matches(".yaml"));
        let Some((_, text)) = catalog.plans.iter().find(|(file, _)| *file == wanted) else {
            let names: Vec<&str> = catalog.plans.iter().map(|(f, _)| f.trim_end_matches(".yaml")).collect();
            return Err(ferry_core::CoreError::UnknownName {
                kind: "example plan",
                name,
                suggestions: names.iter().map(|s| s.to_string()).collect(),
            }
            .into());
        };
        print!("{text}");
        return Ok(());
    }
    let path = args.plan.expect("clap requires --plan without --example");
    let resolved = load_plan(&catalog, &path)?;
    for note in &resolved.notes {
        eprintln!("note: {note}");
    }
    let mode = if args.sampled { Extrapolation::Sampled } else { Extrapolation::Full };
    let prediction = predict(&resolved.plan.policy, &resolved.model, &resolved.plan.workload, &resolved.profile, mode)
        .with_context(|| format!("simulating {}", path.display()))?;
    let plan = &resolved.plan;
    let interval = ferry_sim::interval(&plan.policy, &resolved.model, &plan.workload, &resolved.profile, mode)?;
    if let Some(trace_path) = &args.trace {
        let json = chrome_trace(&prediction.graph, &prediction.trace);
        ferry_core::yaml::write_new_file(trace_path, &serde_json::to_string(&json)?, args.force)?;
        eprintln!(
            "wrote {} ({} tasks; open it in https://ui.perfetto.dev)",
            trace_path.display(),
            prediction.graph.tasks.len()
        );
    }
    if args.json {
        let out = serde_json::json!({
            "plan": path.display().to_string(),
            "profile": if resolved.profile.is_measured() { "measured" } else { "datasheet" },
            "metrics": prediction.metrics,
            "tokens_per_s_interval": interval.map(|i| [i.slow_tokens_per_s, i.fast_tokens_per_s]),
            "tasks": prediction.graph.tasks.len(),
            "events": prediction.events,
            "speculation": resolved.plan.policy.speculation.as_ref().map(|s| serde_json::json!({
                "tokens_per_round": s.tokens_per_round(),
                "expected_rounds": ferry_core::schedule::expected_decode_rounds(&resolved.plan.policy, &resolved.plan.workload),
            })),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let workload = &resolved.plan.workload;
    println!(
        "{} on {}: batch {}, prompt {} tokens, {} new tokens per sequence",
        resolved.model.name, resolved.profile.device_name, workload.batch_size, workload.prompt_len, workload.gen_len
    );
    println!("{}\n", report::provenance_line(&resolved.profile));
    print!("{}", report::policy_table(&resolved.plan.policy));
    println!();
    print!("{}", report::metrics_text(&prediction.metrics, interval.as_ref()));
    if let Some(basis) = ferry_sim::interval_basis(&resolved.profile) {
        println!("{basis}");
    }
    Ok(())
}
