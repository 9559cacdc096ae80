//! `ferry validate`: predict and run many plans on this machine and compare.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use ferry_core::graph::Resource;
use ferry_core::plan::{HardwareRef, Plan, Schedule};
use ferry_core::resolve::resolve_hardware;
use ferry_core::schedule::{lower, Steps};
use ferry_core::trace::Metrics;
use ferry_core::units::{format_bytes, MIB};
use ferry_core::CoreError;
use ferry_engine::synth::SplitMix64;
use ferry_engine::weights::ModelFiles;
use ferry_engine::{backend::CpuBackend, run, RunOptions};
use ferry_sim::cost::CostModel;
use ferry_sim::tune::{tune, BatchChoice, KnobSpace, Objective, TuneRequest};
use statrs::statistics::{Data, OrderStatistics, RankTieBreaker, Statistics};

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
    #[arg(long, default_value_t = 8)]
    gen_len: u64,
    /// Write a predicted-vs-measured scatter plot and a report of the worst plan here.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Do not re-measure the disk around each plan (by default its read bandwidth is
    /// measured right before and right after each run and the profile's disk curves
    /// scaled to the mean: a shared disk drifts by tens of percent within minutes).
    #[arg(long)]
    no_disk_recheck: bool,
    /// Overwrite report files.
    #[arg(long)]
    force: bool,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Tolerances {
    median_pct: f64,
    max_pct: f64,
    #[serde(default)]
    min_spearman: Option<f64>,
}

#[derive(serde::Serialize)]
struct Row {
    plan: String,
    predicted_tokens_per_s: f64,
    measured_tokens_per_s: f64,
    /// predicted ÷ measured − 1, percent.
    signed_error_pct: f64,
    /// Disk read bandwidth around the run (mean of before and after) ÷ the profile's, at
    /// this plan's request size and depth.
    disk_factor: f64,
    predicted_busy_s: Vec<(Resource, f64)>,
    measured_busy_s: Vec<(Resource, f64)>,
}

fn describe(plan: &Plan) -> String {
    let p = &plan.policy;
    format!(
        "{} b{}={}x{} d{} {} {}/{}/{} dev {}",
        p.schedule.name(),
        plan.workload.batch_size,
        p.micro_batch_size,
        p.num_micro_batches,
        p.prefetch_depth,
        format_bytes(p.chunk_bytes).replace(' ', ""),
        p.attention_weights.device,
        p.mlp_weights.device,
        p.kv_cache.device,
        plan.hardware.device_memory.map(format_bytes).unwrap_or_default().replace(' ', "")
    )
}

/// Read bandwidth of the disk holding `file`, GB/s: direct I/O through the engine's read
/// pool at this request size and queue depth, over up to 512 MiB of the file, into a
/// recycled buffer — measured the way the profile measured it and the engine reads
/// (into fresh mappings it would be slower: the kernel faults and zeroes every page).
fn disk_read_gbps(file: &Path, chunk: u64, depth: u32) -> Result<f64> {
    let disk = std::sync::Arc::new(ferry_engine::io::DiskFile::open(file, false)?);
    let len = std::fs::metadata(file)?.len() / 4096 * 4096;
    let piece = len.min(64 * MIB);
    let pieces = (len / piece.max(1)).clamp(1, 8);
    let pool = ferry_engine::io::ReadPool::new(depth as usize);
    let recycler = ferry_engine::memory::Recycler::new();
    recycler.set_limit(u64::MAX);
    let read =
        |offset: u64| -> Result<()> { Ok(pool.read_recycled(&disk, &[(offset, offset + piece)], chunk, &recycler)?) };
    // The first read maps the buffer; the timed ones reuse it.
    read(len - piece)?;
    let start = std::time::Instant::now();
    for i in 0..pieces {
        read(i * piece)?;
    }
    Ok((pieces * piece) as f64 / start.elapsed().as_secs_f64() / 1e9)
}

/// Pearson correlation of the ranks (average ranks for ties).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    if a.len() < 2 {
        return f64::NAN;
    }
    let ra = Data::new(a.to_vec()).ranks(RankTieBreaker::Average);
    let rb = Data::new(b.to_vec()).ranks(RankTieBreaker::Average);
    let covariance = (&ra).covariance(&rb);
    covariance / ((&ra).std_dev() * (&rb).std_dev())
}

fn drop_page_cache() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "1\n").is_ok()
}

pub fn validate(args: ValidateArgs) -> Result<u8> {
    let catalog = ferry_core::catalog::Catalog::builtin()?;
    let files = ModelFiles::open(&args.model_dir)?;
    let (base_profile, _) = resolve_hardware(
        &catalog,
        &HardwareRef { profile: Some(args.profile.display().to_string()), ..HardwareRef::default() },
        Path::new("."),
    )?;
    if !base_profile.is_measured() {
        eprintln!(
            "note: {} is a datasheet profile; validation is meant for a measured one (ferry profile)",
            args.profile.display()
        );
    }
    let tolerances = match &args.tolerances {
        Some(path) => Some(ferry_core::yaml::read_file::<Tolerances>(path)?),
        None => args.tolerance.map(|t| Tolerances {
            median_pct: t,
            max_pct: args.max_tolerance.unwrap_or(2.5 * t),
            min_spearman: None,
        }),
    };
    let spec = &files.spec;
    let model_bytes = spec.total_bytes(files.dtype);
    // Diverse configurations: every schedule, several budgets, batches, depths and chunks;
    // each is placed by the tuner restricted to it, so every plan fits its budget.
    let mut configs = Vec::new();
    for &fraction in &args.budget_fractions {
        for schedule in Schedule::ALL {
            for batch in [1u64, 4, 2] {
                for (depth, chunk) in [(1u64, 8 * MIB), (2, MIB), (3, 32 * MIB)] {
                    configs.push((fraction, schedule, batch, depth, chunk));
                }
            }
        }
    }
    // A fixed shuffle, so the first N cover the space.
    let mut rng = SplitMix64::new(7);
    for i in (1..configs.len()).rev() {
        configs.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut plans: Vec<Plan> = Vec::new();
    // The tuner's own pick at the middle budget comes first.
    let middle = args.budget_fractions.get(args.budget_fractions.len() / 2).copied().unwrap_or(0.6);
    for (i, (fraction, schedule, batch, depth, chunk)) in std::iter::once((middle, None, 0u64, 0u64, 0u64))
        .chain(configs.iter().map(|&(f, s, b, d, c)| (f, Some(s), b, d, c)))
        .enumerate()
    {
        if plans.len() >= args.plans {
            break;
        }
        let mut profile = base_profile.clone();
        profile.device_memory_bytes = ((model_bytes as f64 * fraction) as u64).max(16 * MIB);
        let request = TuneRequest {
            model: spec,
            profile: &profile,
            prompt_len: args.prompt_len,
            gen_len: args.gen_len,
            batch: if i == 0 { BatchChoice::Auto { max: 4 } } else { BatchChoice::Fixed(batch) },
            objective: Objective::Throughput,
            weight_dtype: files.dtype,
            kv_dtype: files.dtype,
        };
        let space = match schedule {
            None => KnobSpace::full(),
            Some(s) => KnobSpace {
                schedules: vec![s],
                prefetch_depths: vec![depth],
                chunk_bytes: vec![chunk],
                ..KnobSpace::full()
            },
        };
        let Ok(result) = tune(&request, &space) else { continue };
        // Absolute paths: the plans written into --report must resolve from their folder.
        let absolute =
            |path: &Path| std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string();
        let plan = Plan {
            model: absolute(&args.model_dir),
            hardware: HardwareRef {
                profile: Some(absolute(&args.profile)),
                device_memory: Some(profile.device_memory_bytes),
                ..HardwareRef::default()
            },
            workload: result.best.workload,
            policy: result.best.policy,
            predicted: None,
        };
        if !plans.iter().any(|p| p.policy == plan.policy && p.hardware == plan.hardware) {
            plans.push(plan);
        }
    }
    if plans.is_empty() {
        return Err(CoreError::invalid("no plan fits these budgets; raise --budget-fractions").into());
    }
    let cache_dropped = drop_page_cache();
    if !cache_dropped {
        eprintln!("note: cannot drop the page cache (not root); runs use direct I/O, which bypasses it anyway");
    }
    let progress = crate::engine_cmds::bar(plans.len() as u64, "validate");
    let mut rows = Vec::new();
    let weights_file =
        ["model.safetensors"].iter().map(|f| args.model_dir.join(f)).find(|p| p.exists()).or_else(|| {
            std::fs::read_dir(&args.model_dir)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        });
    if let Some(dir) = &args.report {
        ferry_reports::prepare(dir, &["predicted-vs-measured"], args.force)?;
        std::fs::create_dir_all(dir.join("plans")).with_context(|| format!("creating {}", dir.display()))?;
    }
    for (index, plan) in plans.iter().enumerate() {
        let mut profile = base_profile.clone();
        profile.device_memory_bytes = plan.hardware.device_memory.unwrap_or(profile.device_memory_bytes);
        let graph = lower(&plan.policy, spec, &plan.workload, &profile, &Steps::All)?;
        // The disk's read rate at this plan's request size and depth, right before the run
        // and again right after it: the mean estimates what the run had (this disk drifts by
        // tens of percent within minutes). Nothing from the run itself enters the prediction.
        let recheck = match (args.no_disk_recheck, &weights_file) {
            (false, Some(file)) => Some((file, plan.policy.chunk_bytes, plan.policy.io_queue_depth)),
            _ => None,
        };
        let before = recheck.map(|(file, chunk, depth)| disk_read_gbps(file, chunk, depth)).transpose()?;
        let mut rng = SplitMix64::new(plan.workload.batch_size);
        let prompts = (0..plan.workload.batch_size)
            .map(|_| (0..plan.workload.prompt_len).map(|_| (rng.next_u64() % spec.vocab_size) as u32).collect())
            .collect();
        let options = RunOptions {
            prompts,
            scratch_dir: args.model_dir.clone(),
            allow_buffered_io: false,
            keep_logits: false,
            progress: None,
        };
        drop_page_cache();
        let report =
            run(&graph, &plan.policy, &plan.workload, &files, &CpuBackend, &options).context(describe(plan))?;
        let measured = report.metrics;
        let mut disk_factor = 1.0;
        if let (Some((file, chunk, depth)), Some(before)) = (recheck, before) {
            let fresh = (before + disk_read_gbps(file, chunk, depth)?) / 2.0;
            let profiled = profile.disk_read.bytes_per_ns(chunk, depth);
            if fresh > 0.0 && profiled > 0.0 {
                disk_factor = fresh / profiled;
                profile.scale_disk_reads(disk_factor);
            }
        }
        let predicted_trace =
            ferry_sim::simulate(&graph, &CostModel::new(&profile, spec)).context("simulating a plan")?.trace;
        let predicted = Metrics::compute(&graph, &predicted_trace);
        if let Some(dir) = &args.report {
            // Each plan with both traces (Chrome/Perfetto), to see where a prediction went wrong.
            let base = dir.join("plans").join(format!("{:02}", index + 1));
            let write = |suffix: &str, text: String| {
                ferry_core::yaml::write_new_file(&base.with_extension(suffix), &text, args.force)
            };
            write("yaml", ferry_core::yaml::to_yaml_string(plan)?)?;
            write("predicted.json", ferry_core::trace::chrome_trace(&graph, &predicted_trace).to_string())?;
            write("measured.json", ferry_core::trace::chrome_trace(&graph, &report.trace).to_string())?;
        }
        let busy = |m: &Metrics| {
            m.resources.iter().filter(|r| r.busy_ns > 0).map(|r| (r.resource, r.busy_ns as f64 / 1e9)).collect()
        };
        rows.push(Row {
            plan: describe(plan),
            predicted_tokens_per_s: predicted.tokens_per_s,
            measured_tokens_per_s: measured.tokens_per_s,
            signed_error_pct: (predicted.tokens_per_s / measured.tokens_per_s - 1.0) * 100.0,
            disk_factor,
            predicted_busy_s: busy(&predicted),
            measured_busy_s: busy(&measured),
        });
        progress.inc(1);
    }
    progress.finish_and_clear();

    let abs: Vec<f64> = rows.iter().map(|r| r.signed_error_pct.abs()).collect();
    let median = Data::new(abs.clone()).median();
    let max = abs.iter().copied().fold(0.0, f64::max);
    let rho = spearman(
        &rows.iter().map(|r| r.predicted_tokens_per_s).collect::<Vec<_>>(),
        &rows.iter().map(|r| r.measured_tokens_per_s).collect::<Vec<_>>(),
    );
    let worst = rows
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.signed_error_pct.abs().total_cmp(&b.1.signed_error_pct.abs()))
        .map(|(i, _)| i)
        .unwrap_or(0);

    if let Some(dir) = &args.report {
        let points: Vec<ferry_reports::ScatterPoint> = rows
            .iter()
            .map(|r| ferry_reports::ScatterPoint {
                predicted: r.predicted_tokens_per_s,
                measured: r.measured_tokens_per_s,
            })
            .collect();
        ferry_reports::scatter_with_band(
            dir,
            "predicted-vs-measured",
            &format!("{}: {} plans on this machine", spec.name, rows.len()),
            "tokens/s",
            &points,
            0.10,
        )?;
        let mut md = format!(
            "# Validation of {}\n\n{} plans, prompt {}, {} new tokens; median |error| {:.1} %, max {:.1} %, Spearman {:.3}.\n\n![predicted vs measured](predicted-vs-measured.png)\n\n## Worst plan: {}\n\npredicted {:.3} tokens/s, measured {:.3} ({:+.1} %)\n\n| resource | predicted busy (s) | measured busy (s) |\n|---|---|---|\n",
            spec.name, rows.len(), args.prompt_len, args.gen_len, median, max, rho, rows[worst].plan, rows[worst].predicted_tokens_per_s, rows[worst].measured_tokens_per_s, rows[worst].signed_error_pct
        );
        let worst_resources: Vec<Resource> = rows[worst].predicted_busy_s.iter().map(|(r, _)| *r).collect();
        for resource in worst_resources {
            let get = |list: &[(Resource, f64)]| list.iter().find(|(r, _)| *r == resource).map_or(0.0, |(_, s)| *s);
            let (p, m) = (get(&rows[worst].predicted_busy_s), get(&rows[worst].measured_busy_s));
            if p > 0.0 || m > 0.0 {
                md.push_str(&format!("| {} | {p:.3} | {m:.3} |\n", resource.label(false)));
            }
        }
        md.push_str(
            "\n## Every plan\n\nBusy seconds per resource, predicted / measured; the disk factor is the disk's read \
             rate around the run (mean of right before and right after) over the profile's (the prediction uses it). Plans and both traces are in \
             `plans/` (open the .json files in Perfetto).\n\n| # | plan | predicted tok/s | measured tok/s | error | disk factor | disk busy (s) | compute busy (s) |\n|---|---|---|---|---|---|---|---|\n",
        );
        for (i, r) in rows.iter().enumerate() {
            let get =
                |list: &[(Resource, f64)], resource| list.iter().find(|(x, _)| *x == resource).map_or(0.0, |(_, s)| *s);
            let pair = |resource| {
                format!("{:.2} / {:.2}", get(&r.predicted_busy_s, resource), get(&r.measured_busy_s, resource))
            };
            md.push_str(&format!(
                "| {:02} | {} | {:.3} | {:.3} | {:+.1} % | {:.2} | {} | {} |\n",
                i + 1,
                r.plan,
                r.predicted_tokens_per_s,
                r.measured_tokens_per_s,
                r.signed_error_pct,
                r.disk_factor,
                pair(Resource::DISK),
                pair(Resource::DEVICE_COMPUTE)
            ));
        }
        ferry_core::yaml::write_new_file(&dir.join("validation.md"), &md, true)?;
    }
    let passed = tolerances
        .as_ref()
        .is_none_or(|t| median <= t.median_pct && max <= t.max_pct && t.min_spearman.is_none_or(|s| rho >= s));
    if args.json {
        let out = serde_json::json!({"plans": rows, "median_abs_error_pct": median, "max_abs_error_pct": max, "spearman": rho, "passed": passed});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let mut table = Table::new(["plan", "predicted tok/s", "measured tok/s", "error"]);
        for r in &rows {
            table.row([
                r.plan.clone(),
                format!("{:.3}", r.predicted_tokens_per_s),
                format!("{:.3}", r.measured_tokens_per_s),
                format!("{:+.1} %", r.signed_error_pct),
            ]);
        }
        print!("{}", table.render());
        println!(
            "\nmedian |error| {median:.1} %, max {max:.1} %, rank correlation (Spearman) {rho:.3} over {} plans",
            rows.len()
        );
        if let Some(t) = &tolerances {
            println!(
                "tolerances: median ≤ {} %, max ≤ {} %{} — {}",
                t.median_pct,
                t.max_pct,
                t.min_spearman.map(|s| format!(", Spearman ≥ {s}")).unwrap_or_default(),
                if passed { "passed" } else { "FAILED" }
            );
        }
    }
    Ok(if passed { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_is_rank_correlation() {
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 30.0, 40.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // Monotone but not linear is still perfect rank correlation.
        assert!((spearman(&[1.0, 2.0, 3.0], &[1.0, 8.0, 27.0]) - 1.0).abs() < 1e-12);
    }
}
