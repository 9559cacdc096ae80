//! `ferry synth` and `ferry run`: synthetic models and real runs on the engine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use ferry_core::catalog::Catalog;
use ferry_core::model::{Dtype, ModelSpec};
use ferry_core::plan::{Plan, Policy};
use ferry_core::resolve::{resolve_model, resolve_plan_with_model, ResolvedPlan};
use ferry_core::schedule::{lower, Steps};
use ferry_core::trace::{chrome_trace, Metrics};
use ferry_core::units::{format_bytes, format_ns};
use ferry_core::CoreError;
use ferry_engine::synth::{synthesize_damped, Damping, SplitMix64};
use ferry_engine::synth_gguf::{synthesize_gguf, GgufStorage};
use ferry_engine::weights::ModelFiles;
use ferry_engine::{backend, run, RunOptions};
use ferry_sim::predict::Extrapolation;
use ferry_validate::measure::{disk_read_gbps, profiled_read_gbps, weights_file};
use indicatif::{ProgressBar, ProgressStyle};

use crate::report;

#[derive(Args)]
#[command(after_help = "Examples:
  ferry synth --model tinyllama-1.1b --out models/tinyllama --dtype bf16
  ferry synth --model tinyllama-1.1b --format gguf --dtype q4_0 --out models/tinyllama-q4_0.gguf

A GGUF file is what llama.cpp reads: its matrices in --dtype (q8_0, q4_0, q4_k and q6_k
quantized by Ferry), norms in f32, the query and key rows in llama.cpp's order, and a
placeholder vocabulary. The same --seed gives the same model in both formats.")]
pub struct SynthArgs {
    /// A Llama-family catalog model (`ferry list models`): tinyllama-1.1b, test-tiny, test-small, llama-2-7b, ...
    #[arg(long)]
    model: String,
    /// safetensors: a folder with config.json and model.safetensors; gguf: one .gguf file.
    #[arg(long)]
    out: PathBuf,
    /// File format.
    #[arg(long, value_name = "safetensors|gguf", default_value = "safetensors")]
    format: String,
    /// Weight dtype [default: the catalog model's dtype (test-tiny: f32), bf16 for int types;
    /// gguf: f16, or f32 for f32 models]. gguf also takes q8_0, q4_0, q4_k and q6_k.
    #[arg(long, value_name = "bf16|f16|f32|q8_0|q4_0|q4_k|q6_k")]
    dtype: Option<String>,
    /// Random seed; the same seed gives the same weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Damp the layers from this one on: their attention and MLP outputs (o_proj,
    /// down_proj) are scaled by --damping, so they only perturb what the first layers
    /// compute and a self-speculating draft of those layers agrees with many of the
    /// model's tokens (benchmarks of speculative decoding; safetensors only).
    #[arg(long, value_name = "LAYER", requires = "damping")]
    damp_from: Option<u64>,
    /// The factor for --damp-from (e.g. 0.1).
    #[arg(long, value_name = "FACTOR", requires = "damp_from")]
    damping: Option<f32>,
    /// Overwrite a folder that is not empty.
    #[arg(long)]
    force: bool,
}

fn parse_dtype(text: &str) -> Result<Dtype> {
    match text {
        "bf16" => Ok(Dtype::Bf16),
        "f16" => Ok(Dtype::F16),
        "f32" => Ok(Dtype::F32),
        other => Err(CoreError::invalid(format!("dtype '{other}': use bf16, f16 or f32")).into()),
    }
}

pub fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {percent:>3}% {elapsed_precise} (eta {eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

pub fn synth(args: SynthArgs) -> Result<()> {
    let catalog = Catalog::builtin()?;
    let resolved = catalog.model(&args.model)?;
    if let Some(note) = &resolved.note {
        eprintln!("note: {note}");
    }
    let model = resolved.value;
    let damping = args.damp_from.zip(args.damping).map(|(from_layer, factor)| Damping { from_layer, factor });
    match args.format.as_str() {
        "safetensors" => {}
        "gguf" if damping.is_some() => {
            return Err(CoreError::invalid("--damp-from writes safetensors folders; leave out --format gguf").into())
        }
        "gguf" => return synth_gguf(&args, &model),
        other => return Err(CoreError::invalid(format!("format '{other}': use safetensors or gguf")).into()),
    }
    // The catalog's dtype, so that a synthetic folder and the catalog entry of the
    // same name describe the same bytes (and plans tuned for one run on the other).
    let dtype = match &args.dtype {
        Some(text) => parse_dtype(text)?,
        None if matches!(model.dtype, Dtype::F32 | Dtype::F16 | Dtype::Bf16) => model.dtype,
        None => Dtype::Bf16,
    };
    let total = model.total_bytes(dtype);
    eprintln!(
        "writing {} ({} parameters, {} in {}) to {}",
        model.name,
        model.params().total,
        format_bytes(total),
        dtype.name(),
        args.out.display()
    );
    let progress = bar(total, "synth");
    synthesize_damped(&model, dtype, args.seed, damping, &args.out, args.force, |done, _| progress.set_position(done))?;
    progress.finish_and_clear();
    println!("wrote {} ({})", args.out.display(), format_bytes(total));
    Ok(())
}

fn synth_gguf(args: &SynthArgs, model: &ModelSpec) -> Result<()> {
    let storage = match &args.dtype {
        Some(text) => GgufStorage::parse(text)
            .ok_or_else(|| CoreError::invalid(format!("gguf dtype '{text}': use {}", GgufStorage::NAMES.join(", "))))?,
        None if model.dtype == Dtype::F32 => GgufStorage::F32,
        None => GgufStorage::F16,
    };
    if args.out.extension().and_then(|e| e.to_str()) != Some("gguf") {
        return Err(CoreError::invalid(format!(
            "--out {}: a GGUF model is one file; name it with .gguf (e.g. --out models/{}.gguf)",
            args.out.display(),
            model.name
        ))
        .into());
    }
    eprintln!("writing {} ({} parameters) as GGUF to {}", model.name, model.params().total, args.out.display());
    let progress = bar(0, "synth");
    synthesize_gguf(model, storage, args.seed, &args.out, args.force, |done, total| {
        progress.set_length(total);
        progress.set_position(done)
    })?;
    progress.finish_and_clear();
    let bytes = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    println!("wrote {} ({})", args.out.display(), format_bytes(bytes));
    Ok(())
}

#[derive(Args)]
#[command(after_help = "Example:
  ferry synth --model tinyllama-1.1b --out models/tinyllama
  ferry tune --gpu cpu --device-mem 512MiB --host ferry-ci-vm --model models/tinyllama --batch 8 --prompt-len 64 --out plan.yaml
  ferry run --model-dir models/tinyllama --plan plan.yaml")]
pub struct RunArgs {
    /// Hugging Face style model folder (config.json + safetensors).
    #[arg(long)]
    model_dir: PathBuf,
    /// Plan for the cpu device (from `ferry tune --gpu cpu --device-mem ...`).
    #[arg(long)]
    plan: PathBuf,
    /// Override the plan's prompt length.
    #[arg(long)]
    prompt_len: Option<u64>,
    /// Override the plan's generation length.
    #[arg(long)]
    gen_len: Option<u64>,
    /// Override the batch (must divide by the plan's number of micro-batches).
    #[arg(long)]
    batch: Option<u64>,
    /// Seed of the random prompt token ids.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Backend to run on: cpu, or cuda (the plan's device is CUDA GPU 0, its memory and
    /// compute; host memory and host compute stay on the CPU). cuda loads the NVIDIA
    /// driver, cuBLAS and NVRTC (CUDA 12) at run time and says which is missing.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// The draft model's files, for a plan that speculates with a separate draft
    /// [default: the plan's `models.draft`, relative to the plan's folder].
    #[arg(long, value_name = "DIR|FILE")]
    draft_dir: Option<PathBuf>,
    /// Where a disk-resident KV cache file is created (and removed) [default: the model folder].
    #[arg(long, value_name = "DIR")]
    scratch_dir: Option<PathBuf>,
    /// Measure the disk's read rate (the plan's request size and queue depth, direct I/O
    /// on the model's weights file) right before and right after the run, and predict
    /// with the profile's disk figures scaled to it, as `ferry validate` does: a disk
    /// whose rate drifts then does not pass for an error of the model.
    #[arg(long)]
    recheck_disk: bool,
    /// Write the measured trace as Chrome trace-event JSON (opens in Perfetto).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Overwrite the trace file.
    #[arg(long)]
    force: bool,
}

/// The plan must describe the model on disk: same shape, whatever the name.
fn check_same_shape(plan_model: &ModelSpec, files: &ModelSpec) -> Result<()> {
    let shape =
        |m: &ModelSpec| (m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads, m.vocab_size);
    if shape(plan_model) != shape(files) {
        return Err(CoreError::invalid(format!(
            "the plan is for {} (hidden {}, {} layers, vocabulary {}) but the folder holds a model with hidden {}, {} layers, vocabulary {}",
            plan_model.name, plan_model.hidden_size, plan_model.num_layers, plan_model.vocab_size, files.hidden_size, files.num_layers, files.vocab_size
        ))
        .into());
    }
    Ok(())
}

/// The file whose disk `--recheck-disk` measures: the model's weights file.
fn disk_recheck_file(model_dir: &Path) -> Result<PathBuf> {
    let file = if model_dir.is_file() { Some(model_dir.to_path_buf()) } else { weights_file(model_dir) };
    file.ok_or_else(|| {
        CoreError::invalid(format!("--recheck-disk: no weights file in {} to read", model_dir.display())).into()
    })
}

/// A separate draft's files: the plan's `models.draft` (relative to its folder, or the
/// `--draft-dir` put there), which must hold the shape the plan was resolved with.
fn open_draft(plan_path: &Path, resolved: &mut ResolvedPlan) -> Result<Option<ModelFiles>> {
    let Some(name) = &resolved.plan.models.draft else { return Ok(None) };
    let base = plan_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let path = base.join(name);
    if !path.exists() {
        return Err(CoreError::invalid(format!(
            "the plan's draft '{name}' is no folder or file from {}; give the draft's files with --draft-dir",
            base.display()
        ))
        .into());
    }
    let files = ModelFiles::open(&path)?;
    if let Some(speculation) = resolved.plan.policy.speculation.as_mut() {
        if let Some(spec) = &speculation.draft_spec {
            check_same_shape(spec, &files.spec)?;
        }
        speculation.draft_spec = Some(std::sync::Arc::new(files.spec.clone()));
    }
    Ok(Some(files))
}

/// Resolves the plan for the model in the folder given with `--model-dir`, which is
/// what runs. The plan's own model must have the folder's shape when it names one that
/// resolves; a path that does not resolve from the plan's folder (a plan copied
/// elsewhere) is stood in for by the folder, with a note.
fn resolve_for_folder(
    catalog: &Catalog,
    path: &Path,
    folder: &ModelSpec,
    draft_dir: Option<&Path>,
) -> Result<ResolvedPlan> {
    let mut plan: Plan = ferry_core::yaml::read_file(path)?;
    let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Some(dir) = draft_dir {
        let absolute = std::path::absolute(dir).map_err(|e| CoreError::io(dir, e))?;
        plan.models.draft = Some(absolute.display().to_string());
    }
    match resolve_model(catalog, &plan.models.target, base) {
        Ok((model, _)) => check_same_shape(&model, folder)?,
        Err(CoreError::UnknownName { .. }) => eprintln!(
            "note: the plan's model '{}' is not found from {}; running it on the --model-dir folder",
            plan.models.target,
            base.display()
        ),
        Err(e) => return Err(e.into()),
    }
    Ok(resolve_plan_with_model(catalog, plan, folder.clone(), Vec::new(), base)?)
}

pub fn run_plan(args: RunArgs) -> Result<()> {
    if let Some(path) = &args.trace {
        ferry_core::atomic::check_output_path(path, args.force)?;
    }
    let catalog = Catalog::builtin()?;
    let backend = backend::backend(&args.backend)?;
    let files = ModelFiles::open(&args.model_dir)?;
    let mut resolved = resolve_for_folder(&catalog, &args.plan, &files.spec, args.draft_dir.as_deref())?;
    let draft_files = open_draft(&args.plan, &mut resolved)?;
    // A backend whose "device" is host RAM (cpu) measures nothing of a discrete GPU's plan.
    if !resolved.profile.unified_memory && backend.host_addressable(ferry_core::graph::Place::DEVICE) {
        return Err(CoreError::invalid(format!(
            "{} is a plan for {}; the {} backend runs plans for the cpu device (ferry tune --gpu cpu --device-mem SIZE ...)",
            args.plan.display(),
            resolved.profile.device_name,
            backend.name()
        ))
        .into());
    }
    apply_overrides(&args, &mut resolved.plan)?;
    let (workload, policy) = (resolved.plan.workload, &resolved.plan.policy);
    // Refused before anything is set up (the engine checks again when it runs).
    ferry_engine::check_weight_format(policy)?;
    let graph = lower(policy, &files.spec, &workload, &resolved.profile, &Steps::Bound)?;
    let recheck = args.recheck_disk.then(|| disk_recheck_file(&args.model_dir)).transpose()?;
    let recheck = recheck.map(|file| (file, policy.chunk_bytes, policy.io_queue_depth));
    let before = recheck.as_ref().map(|(file, chunk, depth)| disk_read_gbps(file, *chunk, *depth)).transpose()?;
    let mut rng = SplitMix64::new(args.seed);
    let prompts: Vec<Vec<u32>> = (0..workload.batch_size)
        .map(|_| (0..workload.prompt_len).map(|_| (rng.next_u64() % files.spec.vocab_size) as u32).collect())
        .collect();
    let progress = if args.json { None } else { Some(bar(graph.tasks.len() as u64, "run")) };
    let callback = progress.clone().map(|bar| {
        Box::new(move |done: usize, _total: usize| bar.set_position(done as u64))
            as Box<dyn Fn(usize, usize) + Send + Sync>
    });
    let options = RunOptions {
        prompts,
        scratch_dir: args.scratch_dir.clone().unwrap_or_else(|| args.model_dir.clone()),
        allow_buffered_io: true,
        keep_logits: false,
        progress: callback,
        draft_files,
    };
    let report = run(&graph, policy, &workload, &files, backend.as_ref(), &options).context("running the plan")?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    // The disk's rate around the run, against the profile's at the plan's request size.
    let mut disk_factor = None;
    if let (Some((file, chunk, depth)), Some(before)) = (&recheck, before) {
        let around = (before + disk_read_gbps(file, *chunk, *depth)?) / 2.0;
        let profiled = profiled_read_gbps(&resolved.profile, file, *chunk, *depth)?;
        disk_factor = (around > 0.0 && profiled > 0.0).then(|| around / profiled);
    }
    let predictions = predict_run(&resolved, &files.spec, &graph, &report, disk_factor);
    // A speculative run stops once every sequence has its tokens: its trace is over the
    // rounds that ran.
    let graph = report.graph_run.as_ref().unwrap_or(&graph);
    if let Some(path) = &args.trace {
        let json = chrome_trace(graph, &report.trace);
        ferry_core::yaml::write_new_file(path, &serde_json::to_string(&json)?, args.force)?;
    }
    if args.json {
        return print_run_json(&resolved, &report, &predictions, graph.tasks.len());
    }
    print_run(&resolved, &files.spec, backend.name(), &report, &predictions);
    Ok(())
}

/// `--prompt-len`, `--gen-len` and `--batch` applied to the plan.
fn apply_overrides(args: &RunArgs, plan: &mut Plan) -> Result<()> {
    if let Some(n) = args.prompt_len {
        plan.workload.prompt_len = n;
    }
    if let Some(n) = args.gen_len {
        plan.workload.gen_len = n;
    }
    if let Some(batch) = args.batch {
        let n = plan.policy.num_micro_batches;
        if batch == 0 || batch % n != 0 {
            return Err(CoreError::invalid(format!(
                "--batch {batch} must be a positive multiple of the plan's {n} micro-batches"
            ))
            .into());
        }
        plan.policy.micro_batch_size = batch / n;
        plan.workload.batch_size = batch;
    }
    Ok(())
}

/// What a run is compared with.
struct RunPredictions {
    /// The plan as given (with speculation: its expected rounds at its acceptance rate).
    plan: Result<Metrics, ferry_sim::SimError>,
    /// A speculative plan again at the acceptance rate the run measured.
    at_measured_acceptance: Option<Metrics>,
    /// The profile's disk rates were scaled by this (`--recheck-disk`).
    disk_factor: Option<f64>,
}

/// The plan predicted with the profile, its disk figures scaled to the disk as it was
/// around the run when rechecked.
fn predict_run(
    resolved: &ResolvedPlan,
    spec: &ModelSpec,
    graph: &ferry_core::graph::TaskGraph,
    report: &ferry_engine::RunReport,
    disk_factor: Option<f64>,
) -> RunPredictions {
    let mut profile = resolved.profile.clone();
    if let Some(factor) = disk_factor {
        profile.scale_disk_reads(factor);
    }
    let workload = resolved.plan.workload;
    let predict_at = |policy: &Policy| {
        if policy.speculation.is_some() {
            ferry_sim::predict::predict(policy, spec, &workload, &profile, Extrapolation::Full).map(|p| p.metrics)
        } else {
            let cost = ferry_sim::cost::CostModel::for_formats(&profile, spec, &policy.weight_format);
            ferry_sim::simulate(graph, &cost).map(|out| Metrics::compute(graph, &out.trace))
        }
    };
    let at_measured_acceptance = report.speculation.as_ref().and_then(|measured| {
        let mut policy = resolved.plan.policy.clone();
        policy.speculation.as_mut()?.acceptance_rate = measured.acceptance_rate;
        predict_at(&policy).ok()
    });
    RunPredictions { plan: predict_at(&resolved.plan.policy), at_measured_acceptance, disk_factor }
}

fn print_run_json(
    resolved: &ResolvedPlan,
    report: &ferry_engine::RunReport,
    predictions: &RunPredictions,
    tasks: usize,
) -> Result<()> {
    // Every device's budget together: the process holds all of them.
    let budget: u64 = resolved.profile.device_slots().iter().map(|d| d.memory_bytes).sum();
    let out = serde_json::json!({
        "metrics": report.metrics,
        "tokens": report.tokens,
        "peak_rss_bytes": report.peak_rss_bytes,
        "baseline_rss_bytes": report.baseline_rss_bytes,
        "device_budget_bytes": budget,
        "storage_read_bytes": report.storage_read_bytes,
        "recycled_bytes": report.recycled_bytes,
        "newly_mapped_bytes": report.newly_mapped_bytes,
        "requested_read_bytes": report.requested_read_bytes,
        "direct_io": report.direct_io,
        "setup_seconds": report.setup_ns as f64 / 1e9,
        "predicted_tokens_per_s": predictions.plan.as_ref().ok().map(|m| m.tokens_per_s),
        "disk_factor": predictions.disk_factor,
        "speculation": report.speculation,
        "predicted_tokens_per_s_at_measured_acceptance":
            predictions.at_measured_acceptance.as_ref().map(|m| m.tokens_per_s),
        "tasks": tasks,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn print_run(
    resolved: &ResolvedPlan,
    spec: &ModelSpec,
    backend: &str,
    report: &ferry_engine::RunReport,
    predictions: &RunPredictions,
) {
    let workload = &resolved.plan.workload;
    println!(
        "{} on the {backend} backend: batch {}, prompt {} tokens, {} new tokens per sequence (measured)",
        spec.name, workload.batch_size, workload.prompt_len, workload.gen_len
    );
    println!("resident weights read before the run in {}\n", format_ns(report.setup_ns));
    print!("{}", report::metrics_text(&report.metrics));
    let measured_rate = report.metrics.tokens_per_s;
    if let (Some(measured), Some(plan)) = (&report.speculation, &resolved.plan.policy.speculation) {
        println!(
            "\nspeculation: {} rounds after the prefill, {:.2} tokens per round; the target accepted a draft token \
             at α = {:.3} (measured; the plan assumed {:.3})",
            measured.rounds, measured.tokens_per_round, measured.acceptance_rate, plan.acceptance_rate
        );
        if let Some(p) = &predictions.at_measured_acceptance {
            println!(
                "predicted at the measured α: {:.2} tokens/s ({:+.1} % from measured)",
                p.tokens_per_s,
                (p.tokens_per_s / measured_rate - 1.0) * 100.0
            );
        }
    }
    if let Ok(p) = &predictions.plan {
        println!(
            "\npredicted for the same plan: {:.2} tokens/s ({:+.1} % from measured; {})",
            p.tokens_per_s,
            (p.tokens_per_s / measured_rate - 1.0) * 100.0,
            match (resolved.profile.is_measured(), predictions.disk_factor) {
                (true, Some(f)) => format!("measured profile, its disk rates × {f:.2} as rechecked around the run"),
                (true, None) => "measured profile".into(),
                (false, _) => "datasheet profile".into(),
            }
        );
    }
    print_memory_and_disk(resolved, report);
    println!("\ngenerated token ids:");
    for (i, tokens) in report.tokens.iter().enumerate().take(8) {
        println!("  sequence {i}: {tokens:?}");
    }
    if report.tokens.len() > 8 {
        println!("  ... ({} sequences; --json prints all)", report.tokens.len());
    }
}

fn print_memory_and_disk(resolved: &ResolvedPlan, report: &ferry_engine::RunReport) {
    // Every device's budget together: the process holds all of them.
    let budget: u64 = resolved.profile.device_slots().iter().map(|d| d.memory_bytes).sum();
    println!(
        "process peak memory {} (VmHWM) for {} of device budget{}; {} was resident before the model loaded",
        format_bytes(report.peak_rss_bytes),
        format_bytes(budget),
        match resolved.profile.device_count() {
            1 => String::new(),
            n => format!(" over {n} devices"),
        },
        format_bytes(report.baseline_rss_bytes)
    );
    println!(
        "disk: {} requested by tasks, {} read from storage by the kernel ({})",
        format_bytes(report.requested_read_bytes),
        format_bytes(report.storage_read_bytes),
        if report.direct_io {
            "direct I/O: the page cache is bypassed"
        } else {
            "buffered reads, pages dropped after use: this file system refused O_DIRECT"
        }
    );
}

#[derive(Args)]
#[command(after_help = "Examples:
  ferry profile --backend cpu --out profile.yaml --quick
  ferry tune --profile profile.yaml --model models/tinyllama --device-mem 512MiB
  ferry profile --backend cuda --model llama-2-7b --out rtx3060.yaml --scratch-dir /mnt/nvme

cpu measures this machine with the engine's own code paths (disk reads alone and
while compute runs, copies, the engine's kernels and per-task cost). cuda measures an
NVIDIA GPU through the driver and cuBLAS, loaded at run time: pinned and pageable
copies both ways and both at once, cuBLAS GEMMs at the model's shapes, launch
overhead, disk reads into pinned memory; it says so plainly where there is no driver.")]
pub struct ProfileArgs {
    /// Backend to measure: cpu or cuda.
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda")]
    backend: String,
    /// GPU to measure with --backend cuda (as nvidia-smi numbers them).
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Where to write the profile (YAML).
    #[arg(long)]
    out: PathBuf,
    /// A shorter run (under a minute): a 256 MiB scratch file, 3 trials per figure.
    #[arg(long)]
    quick: bool,
    /// Folder on the disk you offload to, for the scratch file [default: the current folder].
    #[arg(long, value_name = "DIR")]
    scratch_dir: Option<PathBuf>,
    /// Also time the engine's compute tasks at this model's shape (catalog name or folder):
    /// the kernel table the simulator prefers to its roofline.
    #[arg(long, visible_alias = "model-dir")]
    model: Option<String>,
    /// Weight dtype of the kernel table [default: the model's].
    #[arg(long, value_name = "bf16|f16|f32")]
    dtype: Option<String>,
    /// Overwrite the output file.
    #[arg(long)]
    force: bool,
}

pub fn profile(args: ProfileArgs) -> Result<()> {
    if !matches!(args.backend.as_str(), "cpu" | "cuda") {
        return Err(CoreError::invalid(format!("unknown backend '{}'; use cpu or cuda", args.backend)).into());
    }
    if args.backend == "cuda" {
        // Before anything else: no scratch file, no synthesis, when there is no GPU to measure.
        ferry_profiler::cuda::check_libraries()?;
    }
    // Before minutes of measuring: the file written at the end must be writable.
    ferry_core::atomic::check_output_path(&args.out, args.force)?;
    let scratch = args.scratch_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let mut options = if args.quick {
        ferry_profiler::ProfileOptions::quick(scratch)
    } else {
        ferry_profiler::ProfileOptions::full(scratch)
    };
    if let Some(name) = &args.model {
        let model = Catalog::builtin()?.model(name)?.value;
        ferry_engine::synth::check_supported(&model)?;
        let dtype = match args.dtype.as_deref() {
            Some(text) => parse_dtype(text)?,
            None if matches!(model.dtype, Dtype::F32 | Dtype::F16 | Dtype::Bf16) => model.dtype,
            None => Dtype::Bf16,
        };
        options.kernel_model = Some((model, dtype));
    }
    eprintln!(
        "measuring {} with a {} scratch file in {} ...",
        ferry_profiler::fingerprint(),
        format_bytes(options.scratch_bytes),
        options.scratch_dir.display()
    );
    let bar = bar(1000, "profile");
    let report = |step: &str, fraction: f64| {
        bar.set_message(format!("profile: {step}"));
        bar.set_position((fraction * 1000.0) as u64);
    };
    let profile = if args.backend == "cuda" {
        let cuda = ferry_profiler::cuda::CudaOptions::new(args.device, args.quick);
        ferry_profiler::cuda::profile_cuda(&options, &cuda, report)
    } else {
        ferry_profiler::profile_cpu(&options, report)
    }?;
    bar.finish_and_clear();
    let best = |curve: &ferry_core::profile::TransferCurve| curve.points.iter().map(|p| p.gbps).fold(0.0, f64::max);
    let text = format!(
        "# Measured by `ferry profile`; pass it to `ferry tune --profile`.\n{}",
        ferry_core::yaml::to_yaml_string(&profile)?
    );
    ferry_core::yaml::write_new_file(&args.out, &text, args.force)?;
    println!("wrote {}", args.out.display());
    println!(
        "  disk read: up to {:.2} GB/s (direct I/O), first byte {}",
        best(&profile.disk_read),
        format_ns(profile.disk_read.latency_ns)
    );
    println!("  disk write: up to {:.2} GB/s (buffered + fsync)", best(&profile.disk_write));
    if profile.unified_memory {
        println!("  memory copy: up to {:.1} GB/s", best(&profile.host_to_device));
    } else {
        println!(
            "  host→device: up to {:.1} GB/s pinned, {:.1} GB/s pageable; device→host up to {:.1} GB/s",
            best(&profile.host_to_device),
            best(&profile.host_to_device_pageable),
            best(&profile.device_to_host)
        );
    }
    println!(
        "  matrix products: {:.0} GFLOP/s peak; bf16 weights stream through one-row products at {:.1} GB/s",
        profile.device_compute.peak_flops / 1e9,
        profile.device_compute.memory_bytes_per_s / 1e9
    );
    if let Some(under_compute) = &profile.interference.disk_read_under_compute {
        println!("  disk read while compute runs: up to {:.2} GB/s", best(under_compute));
    }
    println!(
        "  compute slows by {:.0} % while a {} runs",
        profile.interference.device_compute_slowdown * 100.0,
        if profile.unified_memory { "read" } else { "copy" }
    );
    if profile.interference.copy_duplex_slowdown > 0.0 {
        println!(
            "  copies in both directions at once run {:.0} % slower each",
            profile.interference.copy_duplex_slowdown * 100.0
        );
    }
    println!("  engine compute task overhead {}", format_ns(profile.device_compute.task_overhead_ns));
    let rates: Vec<String> = (profile.host_compute.dequantize.iter())
        .map(|r| format!("{} {:.1} GB/s", r.format, r.bytes_per_s / 1e9))
        .collect();
    if !rates.is_empty() {
        println!("  dequantization (host, of quantized bytes): {}", rates.join(", "));
    }
    if !profile.device_compute.table.is_empty() {
        println!("  kernel table: {} entries at the model's shape", profile.device_compute.table.len());
    }
    Ok(())
}
