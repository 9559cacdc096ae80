//! `ferry export`: a plan in the terms of another engine.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ferry_core::catalog::Catalog;
use ferry_core::export::{export, Engine};
use ferry_core::resolve::load_plan;
use ferry_sim::{predict, Extrapolation};

#[derive(Args)]
#[command(after_help = "Example:
  ferry tune --gpu rtx3060 --model 13b --out plan.yaml
  ferry export --plan plan.yaml --to llama.cpp")]
pub struct ExportArgs {
    /// Plan file, e.g. written by `ferry tune --out plan.yaml`.
    #[arg(long)]
    plan: PathBuf,
    /// Target engine: llama.cpp, vllm, accelerate, flexgen or prima.cpp. A plan over
    /// several machines gets the commands of every node (workers first, the head last).
    #[arg(long, value_name = "ENGINE")]
    to: String,
    /// Print JSON (settings and the list of what the engine cannot express).
    #[arg(long)]
    json: bool,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let engine = Engine::parse(&args.to)?;
    let catalog = Catalog::builtin()?;
    let resolved = load_plan(&catalog, &args.plan)?;
    for note in &resolved.notes {
        eprintln!("note: {note}");
    }
    // A plan `simulate` refuses (memory that does not fit, a graph that cannot be
    // built) is refused here too: settings for a plan that cannot run would mislead.
    // The sampled prediction checks the same graph rules at a fraction of the cost.
    let plan = &resolved.plan;
    let planned = predict(&plan.policy, &resolved.model, &plan.workload, &resolved.profile, Extrapolation::Full)
        .with_context(|| format!("{} cannot run", args.plan.display()))?;
    let out = export(&resolved.plan, &resolved.model, &resolved.profile, engine);
    let engine_run = engine_prediction(&resolved, engine);
    if args.json {
        let mut json = serde_json::to_value(&out)?;
        json["plan_tokens_per_s"] = planned.metrics.tokens_per_s.into();
        json["engine_prediction"] = match &engine_run {
            EnginePrediction::Priced { tokens_per_s, interval, approximations } => serde_json::json!({
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_interval": interval.map(|i| [i.slow_tokens_per_s, i.fast_tokens_per_s]),
                "approximations": approximations
            }),
            EnginePrediction::Not(why) => serde_json::json!({"not_predicted": why}),
        };
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    let machine = if resolved.profile.device_count() > 1 {
        crate::tune_pipeline::machine_line(&resolved.profile)
    } else {
        resolved.profile.device_name.clone()
    };
    println!("# {} settings closest to {} ({} on {machine})", engine.name(), args.plan.display(), resolved.model.name);
    println!("{}\n", out.settings);
    if out.cannot_express.is_empty() {
        println!("{} can express the whole plan.", engine.name());
    } else {
        println!("What {} cannot express (expect different speed or memory than predicted):", engine.name());
        for line in &out.cannot_express {
            println!("  - {line}");
        }
    }
    let ferry = format!("the plan on Ferry's engine: {:.2} tokens/s", planned.metrics.tokens_per_s);
    match engine_run {
        EnginePrediction::Priced { tokens_per_s, interval, approximations } => {
            println!(
                "\npredicted for {} with these settings: {tokens_per_s:.2} tokens/s{} ({ferry})",
                engine.name(),
                crate::report::interval_text(interval.as_ref())
            );
            for line in approximations {
                println!("  approximated: {line}");
            }
            if let Some(basis) = interval.and(ferry_sim::interval_basis(&resolved.profile)) {
                println!("{basis}");
            }
        }
        EnginePrediction::Not(why) => {
            println!("\n{} with these settings is not predicted: {why} ({ferry})", engine.name())
        }
    }
    Ok(())
}

/// What the engine's model predicts for the exported settings.
enum EnginePrediction {
    Priced { tokens_per_s: f64, interval: Option<ferry_sim::Interval>, approximations: Vec<String> },
    Not(String),
}

/// The plan as `engine` would run it (`ferry_sim::engines`), simulated.
fn engine_prediction(resolved: &ferry_core::resolve::ResolvedPlan, engine: Engine) -> EnginePrediction {
    let (plan, model, profile) = (&resolved.plan, &resolved.model, &resolved.profile);
    match ferry_sim::engines::as_run_by(engine, &plan.policy, model, profile, plan.workload.batch_size) {
        ferry_sim::engines::EngineRun::NotModelled(what) => EnginePrediction::Not(format!("{what} is not modelled")),
        ferry_sim::engines::EngineRun::Priced { policy, approximations } => {
            let (engine, workload) = (Some(engine), &plan.workload);
            match ferry_sim::predict_run_by(engine, &policy, model, workload, profile, Extrapolation::Full) {
                Ok(p) => EnginePrediction::Priced {
                    tokens_per_s: p.metrics.tokens_per_s,
                    interval: ferry_sim::interval_run_by(
                        engine,
                        &policy,
                        model,
                        workload,
                        profile,
                        Extrapolation::Full,
                    )
                    .ok()
                    .flatten(),
                    approximations,
                },
                Err(error) => EnginePrediction::Not(format!("in Ferry's model of it, it does not run: {error}")),
            }
        }
    }
}
