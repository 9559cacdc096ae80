//! `ferry export`: a plan in the terms of another engine.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use ferry_core::catalog::Catalog;
use ferry_core::export::{export, Engine};
use ferry_core::resolve::load_plan;

#[derive(Args)]
#[command(after_help = "Example:
  ferry tune --gpu rtx3060 --model 13b --out plan.yaml
  ferry export --plan plan.yaml --to llama.cpp")]
pub struct ExportArgs {
    /// Plan file, e.g. written by `ferry tune --out plan.yaml`.
    #[arg(long)]
    plan: PathBuf,
    /// Target engine: llama.cpp, vllm, accelerate or flexgen.
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
    let out = export(&resolved.plan, &resolved.model, &resolved.profile, engine);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "# {} settings closest to {} ({} on {})",
        engine.name(),
        args.plan.display(),
        resolved.model.name,
        resolved.profile.device_name
    );
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
