//! `ferry run`: a plan executed on the engine, its measured figures beside the plan's
//! prediction (with speculation: at the acceptance rate the run measured; with
//! `--recheck-disk`: at the disk's rate around the run).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use ferry_core::catalog::Catalog;
use ferry_core::model::ModelSpec;
use ferry_core::plan::{Plan, Policy};
use ferry_core::resolve::{resolve_model, resolve_plan_with_model, ResolvedPlan};
use ferry_core::schedule::{lower, Steps};
use ferry_core::trace::{chrome_trace, Metrics};
use ferry_core::units::{format_bytes, format_ns};
use ferry_core::CoreError;
use ferry_engine::kernels::Activations;
use ferry_engine::synth::SplitMix64;
use ferry_engine::weights::ModelFiles;
use ferry_engine::{backend, run, RunOptions};
use ferry_sim::predict::Extrapolation;
use ferry_validate::measure::{disk_read_gbps, profiled_read_gbps, weights_file};

use crate::engine_cmds::bar;
use crate::report;

#[derive(Args)]
#[command(after_help = "Example:
  ferry synth --model tinyllama-1.1b --out models/tinyllama
  ferry tune --gpu cpu --device-mem 512MiB --host ferry-ci-vm --model models/tinyllama --batch 8 --prompt-len 64 --out plan.yaml
  ferry run --model-dir models/tinyllama --plan plan.yaml")]
pub struct RunArgs {
    /// Hugging Face style model folder (config.json + safetensors).
    #[arg(long)]
    pub(crate) model_dir: PathBuf,
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
    /// driver, cuBLAS and NVRTC (CUDA 12, or 13 linked as bench/cuda-libs.sh does) at
    /// run time and says which is missing.
    #[arg(long, default_value = "cpu")]
    pub(crate) backend: String,
    /// How products take their inputs (x). bf16: llama.cpp's numerics: x rounded to bf16
    /// before products over bf16 weights (many rows then multiply on the CPU's AMX tiles
    /// where it has them: prefill and large batches at several times the f32 rate) and
    /// to 8 bits per block of 32 before products over block-quantized weights (Q8_0,
    /// Q4_0, Q5_0, IQ4_NL and the K-quants: integer products, llama.cpp's speed; for K-quants it rounds
    /// per 256 values, a coarser x). q8: the same for quantized weights, f32 x for float
    /// weights. f32: x never rounded (logits within float rounding of "dequantize, then
    /// multiply"). f16 and f32 weights always multiply f32 x.
    #[arg(long, value_name = "q8|f32|bf16", default_value = "bf16", value_parser = crate::stages_cmd::parse_activations)]
    pub(crate) activations: Activations,
    /// The draft model's files, for a plan that speculates with a separate draft
    /// [default: the plan's `models.draft`, relative to the plan's folder].
    #[arg(long, value_name = "DIR|FILE")]
    draft_dir: Option<PathBuf>,
    /// Where a disk-resident KV cache file is created (and removed) [default: the model
    /// folder, or the folder holding the GGUF file].
    #[arg(long, value_name = "DIR")]
    pub(crate) scratch_dir: Option<PathBuf>,
    /// Measure the disk's read rate (the plan's request size and queue depth, direct I/O
    /// on the model's weights file) right before and right after the run, and predict
    /// with the profile's disk figures scaled to it, as `ferry validate` does: a disk
    /// whose rate drifts then does not pass for an error of the model.
    #[arg(long)]
    recheck_disk: bool,
    /// A plan over several machines: the stage worker of node NODE at HOST:PORT
    /// (`ferry stage-worker` there), repeated for each node other than the first
    /// stage's. Without it, a stage worker per node is started on this machine, each
    /// its own process joined over loopback.
    #[arg(long, value_name = "NODE=HOST:PORT")]
    pub(crate) worker: Vec<String>,
    /// Write the last step's logits as a NumPy `.npy` array (sequences × vocabulary,
    /// f32), to compare with another engine on the same weights (`numpy.load`). The run
    /// keeps every step's logits in memory for it (steps × sequences × vocabulary × 4 bytes).
    #[arg(long, value_name = "FILE")]
    logits: Option<PathBuf>,
    /// Write the measured trace as Chrome trace-event JSON (opens in Perfetto).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// A mixture of experts: write the run's routing (per layer, the share of tokens
    /// routed to each expert) as YAML, for `ferry tune --routing` and a plan's
    /// `models.routing`: predictions then count the experts a step touches from it.
    #[arg(long, value_name = "FILE")]
    routing_out: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Overwrite the trace, logits and routing files.
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
    for path in args.trace.iter().chain(&args.logits).chain(&args.routing_out) {
        ferry_core::atomic::check_output_path(path, args.force)?;
    }
    let catalog = Catalog::builtin()?;
    if args.backend != "cpu" && args.activations != Activations::default() {
        return Err(CoreError::invalid("--activations applies to the cpu backend").into());
    }
    let backend = backend::backend(&args.backend, args.activations)?;
    let mut files = ModelFiles::open(&args.model_dir)?;
    if args.routing_out.is_some() && files.spec.num_experts == 0 {
        return Err(CoreError::invalid(format!(
            "--routing-out: {} is no mixture of experts, so it has no routing to write",
            files.spec.name
        ))
        .into());
    }
    let mut resolved = resolve_for_folder(&catalog, &args.plan, &files.spec, args.draft_dir.as_deref())?;
    // The plan's measured routing: what the run is lowered and predicted with, and
    // which experts a plan's `hot_experts` keeps on the device.
    files.spec.routing = resolved.model.routing.clone();
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
    if let ferry_core::profile::Provenance::Measured { backend: measured_on, .. } = &resolved.profile.provenance {
        let notes = [
            ferry_engine::memory::page_mode_mismatch(measured_on),
            ferry_engine::kernels::kernels_mismatch(measured_on),
        ];
        for note in notes.into_iter().flatten() {
            eprintln!("note: {note}");
        }
    }
    let (workload, policy) = (resolved.plan.workload, &resolved.plan.policy);
    // Refused before anything is set up (the engine checks again when it runs).
    ferry_engine::check_weight_format(policy)?;
    // A new scratch folder is made in an existing one, not a whole path of them (a
    // mistyped path would otherwise become folders on whatever disk it names).
    if let Some(dir) = &args.scratch_dir {
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if !dir.exists() && !parent.is_dir() {
            return Err(CoreError::invalid(format!(
                "--scratch-dir {}: the folder it would be made in, {}, does not exist; create the scratch folder on \
                 the disk you offload to",
                dir.display(),
                parent.display()
            ))
            .into());
        }
        if dir.exists() && !dir.is_dir() {
            crate::engine_cmds::existing_scratch_dir(dir, "the KV cache's disk tier")?;
        }
    }
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
        scratch_dir: args.scratch_dir.clone().unwrap_or_else(|| ferry_engine::weights::model_folder(&args.model_dir)),
        allow_buffered_io: true,
        keep_logits: args.logits.is_some(),
        progress: callback,
        draft_files,
    };
    let others = crate::stages_cmd::other_hosts(&graph, &resolved.profile, policy);
    let report = if others.is_empty() {
        if let Some(worker) = args.worker.first() {
            return Err(CoreError::invalid(format!(
                "--worker {worker}: this plan runs on one machine; stage workers serve the other machines of a plan \
                 over several (tune one with --cluster or --gpu A,B --link L)"
            ))
            .into());
        }
        run(&graph, policy, &workload, &files, backend.as_ref(), &options).context("running the plan")?
    } else {
        crate::stages_cmd::run_over_machines(&args, &others, &graph, &resolved, &files, backend.as_ref(), &options)?
    };
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
    let predictions = predict_run(&resolved, &files.spec, &graph, &report, disk_factor, backend.pins_host_memory());
    // A speculative run stops once every sequence has its tokens: its trace is over the
    // rounds that ran.
    let graph = report.graph_run.as_ref().unwrap_or(&graph);
    if let Some(path) = &args.logits {
        let last = report.logits.last().context("the run kept no logits")?;
        ferry_core::atomic::write_atomic(path, &ferry_core::npy::f32_matrix(last)?, args.force)?;
    }
    if let Some(path) = &args.routing_out {
        let routing = report.expert_popularity(&files.spec).context("--routing-out: the run routed no tokens")?;
        ferry_core::yaml::write_new_file(path, &ferry_core::yaml::to_yaml_string(&routing)?, args.force)?;
    }
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
    /// The plan's interval from the profile's drift (as given, without the recheck).
    interval: Option<ferry_sim::Interval>,
    /// The backend pins no host memory: its host→device copies were priced pageable.
    pageable_copies: bool,
}

/// The plan predicted with the profile, its disk figures scaled to the disk as it was
/// around the run when rechecked.
fn predict_run(
    resolved: &ResolvedPlan,
    spec: &ModelSpec,
    graph: &ferry_core::graph::TaskGraph,
    report: &ferry_engine::RunReport,
    disk_factor: Option<f64>,
    pins_host_memory: bool,
) -> RunPredictions {
    // What this engine does: a backend that pins no host memory copies at the pageable rate.
    let base =
        if pins_host_memory { resolved.profile.clone() } else { resolved.profile.clone().with_pageable_copies() };
    let mut profile = base.clone();
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
    let interval =
        ferry_sim::interval(&resolved.plan.policy, spec, &workload, &base, Extrapolation::Full).ok().flatten();
    RunPredictions {
        plan: predict_at(&resolved.plan.policy),
        at_measured_acceptance,
        disk_factor,
        interval,
        pageable_copies: !pins_host_memory,
    }
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
        "predicted_with_pageable_copies": predictions.pageable_copies,
        "predicted_tokens_per_s_interval": predictions.interval.map(|i| [i.slow_tokens_per_s, i.fast_tokens_per_s]),
        "disk_factor": predictions.disk_factor,
        "speculation": report.speculation,
        "predicted_tokens_per_s_at_measured_acceptance":
            predictions.at_measured_acceptance.as_ref().map(|m| m.tokens_per_s),
        "tasks": tasks,
        "stage_workers": report.stage_processes.iter().map(|w| serde_json::json!({
            "node": w.host,
            "peak_rss_bytes": w.peak_rss_bytes,
            "baseline_rss_bytes": w.baseline_rss_bytes,
            "setup_seconds": w.setup_ns as f64 / 1e9,
        })).collect::<Vec<_>>(),
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
    print!("{}", report::metrics_text(&report.metrics, None));
    let measured_rate = report.metrics.tokens_per_s;
    if let (Some(measured), Some(plan)) = (&report.speculation, &resolved.plan.policy.speculation) {
        println!(
            "\nspeculation: {} rounds after the prefill, {:.2} tokens per round and sequence{}; the target accepted \
             a draft token at α = {:.3} (measured; the plan assumed {:.3})",
            measured.rounds,
            measured.tokens_per_round,
            match measured.ragged_rounds {
                0 => String::new(),
                n => format!(" ({n} rounds advanced a micro-batch's sequences by different counts)"),
            },
            measured.acceptance_rate,
            plan.acceptance_rate
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
            "\npredicted for the same plan: {:.2} tokens/s{} ({:+.1} % from measured; {})",
            p.tokens_per_s,
            report::interval_text(predictions.interval.as_ref()),
            (p.tokens_per_s / measured_rate - 1.0) * 100.0,
            match (resolved.profile.is_measured(), predictions.disk_factor) {
                (true, Some(f)) => format!("measured profile, its disk rates × {f:.2} as rechecked around the run"),
                (true, None) => "measured profile".into(),
                (false, _) => "datasheet profile".into(),
            }
        );
        if predictions.pageable_copies && !resolved.profile.unified_memory {
            println!(
                "  (the {backend} backend pins no host memory: its copies to the device were priced at the \
                 profile's pageable rate, not the pinned rate the plan assumes)"
            );
        }
    }
    print_memory_and_disk(resolved, report);
    if let Some(line) = experts_line(resolved, report) {
        println!("{line}");
    }
    println!("\ngenerated token ids:");
    for (i, tokens) in report.tokens.iter().enumerate().take(8) {
        println!("  sequence {i}: {tokens:?}");
    }
    if report.tokens.len() > 8 {
        println!("  ... ({} sequences; --json prints all)", report.tokens.len());
    }
}

fn print_memory_and_disk(resolved: &ResolvedPlan, report: &ferry_engine::RunReport) {
    // The budgets of the devices on a host together: its process holds all of them.
    let profile = &resolved.profile;
    let budget_of = |host: u16| -> (u64, usize) {
        let on = (0..profile.device_count() as u16).filter(|&d| profile.device(d).host == host);
        on.fold((0, 0), |(bytes, n), d| (bytes + profile.device(d).memory_bytes, n + 1))
    };
    let devices = |n: usize| if n == 1 { String::new() } else { format!(" over {n} devices") };
    let head = profile.device(resolved.plan.policy.first_device()).host;
    let (budget, n) = budget_of(head);
    println!(
        "{} peak memory {} (VmHWM) for {} of device budget{}; {} was resident before the model loaded",
        if report.stage_processes.is_empty() { "process" } else { "head process" },
        format_bytes(report.peak_rss_bytes),
        format_bytes(budget),
        devices(n),
        format_bytes(report.baseline_rss_bytes)
    );
    for worker in &report.stage_processes {
        let (budget, n) = budget_of(worker.host);
        println!(
            "stage worker of node {}: peak memory {} (VmHWM) for {} of device budget{}; {} before the model loaded",
            worker.host,
            format_bytes(worker.peak_rss_bytes),
            format_bytes(budget),
            devices(n),
            format_bytes(worker.baseline_rss_bytes)
        );
    }
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

/// A mixture of experts: how many experts a layer's tokens touched per step, measured
/// against what the simulator predicts for the same tokens (uniform routing, or the
/// plan's measured routing).
fn experts_line(resolved: &ResolvedPlan, report: &ferry_engine::RunReport) -> Option<String> {
    let model = &resolved.model;
    let (prefill, decode) = (report.mean_experts(true)?, report.mean_experts(false));
    let rows = |new: u64| resolved.plan.policy.micro_batch_size * new;
    let prompt = resolved.plan.workload.prompt_len;
    let mut line = format!(
        "experts: {prefill:.1} of {} per layer and micro-batch in the prefill ({}: {:.1})",
        model.num_experts,
        model.routing_name(),
        model.expected_experts(rows(prompt))
    );
    if let Some(decode) = decode {
        line.push_str(&format!(", {decode:.1} per decoding step ({:.1})", model.expected_experts(rows(1))));
    }
    let policy = &resolved.plan.policy;
    let kept = policy.hot_experts + policy.prefetched_experts;
    if kept > 0 {
        line.push_str(&format!(
            "; the {kept} kept or read ahead per layer took {:.0} % of the tokens' choices ({:.0} % predicted)",
            100.0 * kept_share(model, policy, report),
            100.0 * model.hot_hit_rate(kept)
        ));
    }
    Some(line)
}

/// The share of the run's token-to-expert choices that went to each layer's hot or
/// prefetched experts (`Policy::hot_experts`, `Policy::prefetched_experts`).
fn kept_share(
    model: &ferry_core::model::ModelSpec,
    policy: &ferry_core::plan::Policy,
    report: &ferry_engine::RunReport,
) -> f64 {
    let kept = policy.hot_experts + policy.prefetched_experts;
    let (mut on_kept, mut all) = (0u64, 0u64);
    for used in &report.experts {
        let set = model.hot_experts(used.layer as u64, kept);
        for (&expert, &routed) in used.experts.iter().zip(&used.routed) {
            all += routed as u64;
            if set.contains(&(expert as usize)) {
                on_kept += routed as u64;
            }
        }
    }
    on_kept as f64 / all.max(1) as f64
}
