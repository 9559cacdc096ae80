//! `ferry validate`: predict and run many plans on this machine and compare. The
//! workflow is `ferry_validate::validate`; this shows its progress and results.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use ferry_validate::{Event, Options, Outcome, ToleranceSource};
use indicatif::ProgressBar;

use crate::table::Table;

#[derive(Args)]
#[command(after_help = "Example:
  ferry synth --model test-small --out models/small
  ferry profile --out profile.yaml --quick
  ferry validate --model-dir models/small --profile profile.yaml --plans 12 --report validation/")]
pub struct ValidateArgs {
    /// Model folder to run (config.json + safetensors).
    #[arg(long)]
    model_dir: PathBuf,
    /// Measured profile of this machine (`ferry profile`).
    #[arg(long)]
    profile: PathBuf,
    /// How many plans to predict and run.
    #[arg(long, default_value_t = 12)]
    plans: usize,
    /// Run each plan this many times, each run predicted and measured on its own, and
    /// report the run of median error (a shared machine's CPU can slow by half for a
    /// second; every run's error is in --json and the report).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    runs: u64,
    /// Backend to run the plans on: cpu, or cuda (the plans' device is CUDA GPU 0; pass a
    /// profile measured with `ferry profile --backend cuda`).
    #[arg(long, value_name = "cpu|cuda", default_value = "cpu")]
    backend: String,
    /// Fail (exit 1) when the median absolute error exceeds this many percent.
    #[arg(long, value_name = "PCT")]
    tolerance: Option<f64>,
    /// Fail when the largest absolute error exceeds this many percent [default: 2.5 × --tolerance].
    #[arg(long, value_name = "PCT")]
    max_tolerance: Option<f64>,
    /// A YAML file with `median_pct`, `max_pct` and `min_spearman` (instead of the flags).
    #[arg(long, value_name = "FILE")]
    tolerances: Option<PathBuf>,
    /// Device-memory budgets to plan for, as fractions of the model's size.
    #[arg(long, value_delimiter = ',', default_value = "0.35,0.6,1.5")]
    budget_fractions: Vec<f64>,
    #[arg(long, default_value_t = 32)]
    prompt_len: u64,
    /// Tokens each sequence generates. Enough that a run's decoding outlasts a shared
    /// machine's second-long slow spells (the same plan's runs on the build VM: 4.7 %
    /// from their median at 8 tokens, 1.3–1.9 % at 32).
    #[arg(long, default_value_t = 32)]
    gen_len: u64,
    /// Write a predicted-vs-measured scatter plot and a report of the worst plan here.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// A mixture of experts' measured routing (`ferry run --routing-out`, from other
    /// prompts than validation's): predictions count the experts a step touches from it
    /// instead of uniform routing.
    #[arg(long, value_name = "FILE")]
    routing: Option<PathBuf>,
    /// Do not re-measure the disk around each plan (by default its read bandwidth is
    /// measured right before and right after each run and the profile's disk curves
    /// scaled to the mean: a shared disk drifts by tens of percent within minutes).
    #[arg(long)]
    no_disk_recheck: bool,
    /// Write the profile to FILE with the drift these runs saw: each resource's slowest
    /// and fastest achieved rate against it. Predictions with that profile then carry an
    /// interval (`26.1 tokens/s (23.8–27.4)`), and validating with it reports coverage.
    #[arg(long, value_name = "FILE")]
    save_profile: Option<PathBuf>,
    /// Overwrite report files and --save-profile's file.
    #[arg(long)]
    force: bool,
}

impl ValidateArgs {
    fn options(self) -> Options {
        // A tolerances file takes the place of the flags.
        let tolerances = match self.tolerances {
            Some(path) => Some(ToleranceSource::File(path)),
            None => self.tolerance.map(|t| ToleranceSource::Percent { median_pct: t, max_pct: self.max_tolerance }),
        };
        Options {
            model_dir: self.model_dir,
            profile: self.profile,
            plans: self.plans,
            runs: self.runs as usize,
            backend: self.backend,
            tolerances,
            budget_fractions: self.budget_fractions,
            prompt_len: self.prompt_len,
            gen_len: self.gen_len,
            report: self.report,
            disk_recheck: !self.no_disk_recheck,
            routing: self.routing,
            save_profile: self.save_profile,
            force: self.force,
        }
    }
}

pub fn validate(args: ValidateArgs) -> Result<u8> {
    let json = args.json;
    let mut bar: Option<ProgressBar> = None;
    let outcome = ferry_validate::validate(&args.options(), &mut |event| match event {
        Event::Note(note) => eprintln!("note: {note}"),
        Event::Running { total } => bar = Some(crate::engine_cmds::bar(total as u64, "validate")),
        Event::PlanDone => {
            if let Some(bar) = &bar {
                bar.inc(1);
            }
        }
        Event::Finished => {
            if let Some(bar) = bar.take() {
                bar.finish_and_clear();
            }
        }
    })?;
    if json {
        print_json(&outcome)?;
    } else {
        print_human(&outcome);
    }
    Ok(if outcome.passed { 0 } else { 1 })
}

fn print_json(outcome: &Outcome) -> Result<()> {
    let stats = &outcome.stats;
    let out = serde_json::json!({
        "plans": outcome.plans,
        "median_abs_error_pct": stats.median_abs_error_pct,
        "max_abs_error_pct": stats.max_abs_error_pct,
        "spearman": stats.spearman,
        "replayed_median_abs_error_pct": stats.replayed_median_abs_error_pct,
        "replayed_max_abs_error_pct": stats.replayed_max_abs_error_pct,
        "coverage": stats.coverage.map(|(inside, of)| serde_json::json!({"inside": inside, "plans": of})),
        "run_noise_pct": stats.run_noise_pct,
        "passed": outcome.passed,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn print_human(outcome: &Outcome) {
    let with_intervals = outcome.plans.iter().any(|r| r.interval.is_some());
    let mut header = vec!["plan", "predicted tok/s", "measured tok/s", "error", "replayed"];
    if with_intervals {
        header.push("interval (profile as given)");
    }
    let mut table = Table::new(header);
    for r in &outcome.plans {
        let mut row = vec![
            r.plan.clone(),
            format!("{:.3}", r.predicted_tokens_per_s),
            format!("{:.3}", r.measured_tokens_per_s),
            format!("{:+.1} %", r.signed_error_pct),
            format!("{:+.1} %", r.replayed_error_pct),
        ];
        if let Some([slow, fast]) = r.interval {
            let inside = if (slow..=fast).contains(&r.measured_tokens_per_s) { "" } else { "  measured outside" };
            row.push(format!("{slow:.3}–{fast:.3}{inside}"));
        }
        table.row(row);
    }
    print!("{}", table.render());
    let s = &outcome.stats;
    println!(
        "\nmedian |error| {:.1} %, max {:.1} %, rank correlation (Spearman) {:.3} over {} plans",
        s.median_abs_error_pct,
        s.max_abs_error_pct,
        s.spearman,
        outcome.plans.len()
    );
    println!(
        "replayed at the rates each run achieved (the model's own error, free of the machine's drift): \
         median |error| {:.1} %, max {:.1} %",
        s.replayed_median_abs_error_pct, s.replayed_max_abs_error_pct
    );
    match s.run_noise_pct {
        Some(noise) => println!(
            "the machine's noise: a plan's runs measured a median {noise:.1} % from its median run (errors of that \
             size are the measurement's, not the model's)"
        ),
        None => println!("one run per plan: --runs 3 also measures the machine's noise beside these errors"),
    }
    match s.coverage {
        Some((inside, of)) => println!(
            "coverage: {inside} of {of} measurements ({:.0} %) inside their interval (the plan predicted with the \
             profile as given, every resource at the slowest and at the fastest rate of its recorded drift; the \
             predicted column rechecks the disk around each run)",
            inside as f64 * 100.0 / of as f64
        ),
        None => println!(
            "coverage: no intervals (the profile records no drift; --save-profile FILE writes one with these runs')"
        ),
    }
    if let Some((median, worst, plans)) = ferry_validate::stats::experts_error(&outcome.plans) {
        println!(
            "experts per decoding step (per layer and micro-batch), measured against the prediction ({}): \
             median |difference| {median:.1} %, max {worst:.1} % over {plans} plans",
            if outcome.routing_measured { "the measured routing" } else { "uniform routing" }
        );
    }
    if let Some(t) = &outcome.tolerances {
        println!(
            "tolerances: median ≤ {} %, max ≤ {} %{} — {}",
            t.median_pct,
            t.max_pct,
            t.min_spearman.map(|s| format!(", Spearman ≥ {s}")).unwrap_or_default(),
            if outcome.passed { "passed" } else { "FAILED" }
        );
    }
}
