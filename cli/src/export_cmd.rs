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
    predict(&plan.policy, &resolved.model, &plan.workload, &resolved.profile, Extrapolation::Sampled)
        .with_context(|| format!("{} cannot run", args.plan.display()))?;
    let out = export(&resolved.plan, &resolved.model, &resolved.profile, engine);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
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
    Ok(())
}
