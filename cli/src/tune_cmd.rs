//! `ferry tune`: search the plan space for this hardware and model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use ferry_core::catalog::Catalog;
use ferry_core::model::{ModelSpec, WeightFormats};
use ferry_core::plan::{HardwareRef, Schedule};
use ferry_core::resolve::{resolve_hardware, resolve_model};
use ferry_core::units::{format_ns, parse_bytes};
use ferry_core::CoreError;
use ferry_sim::tune::{
    tune_and_compare, Baseline, BatchChoice, Candidate, Comparison, KnobSpace, Objective, TuneRequest, TuneResult,
};
use ferry_sim::Extrapolation;

use crate::report;
use crate::table::Table;
use crate::tune_formats::{self, Outcome};
use crate::tune_output;
use crate::tune_speculative;

#[derive(Clone, Copy, ValueEnum)]
pub enum ObjectiveArg {
    Throughput,
    Latency,
}

#[derive(Args)]
#[command(after_help = "Examples:
  ferry tune --gpu rtx3060 --model 13b
  ferry tune --gpu rtx3060-laptop-6gb --model 13b --batch 8 --out plan.yaml --plots plots/
  ferry tune --gpu cpu --device-mem 512MiB --host ferry-ci-vm --model tinyllama-1.1b
  ferry tune --profile profile.yaml --model ./my-model --device-mem 512MiB
  ferry tune --gpu rtx3060 --model 13b --weight-format q4_k,q8_0,f16
  ferry tune --gpu cpu --device-mem 1GiB --model ./tinyllama-q4_k_m.gguf
  ferry tune --gpu cpu --device-mem 512MiB --model tinyllama-1.1b --draft self:2 --acceptance 0.7

Weight formats: the tuner plans the model's own format unless --weight-format lists
others (it never lowers precision on its own). With several, it tunes each, prints a
table of the best plan per format (tokens/s, first token, weights on device / host /
disk) and keeps the best by the objective; --out writes that one.")]
pub struct TuneArgs {
    /// GPU from the catalog (`ferry list gpus`); `cpu` plans for the CPU backend. Several,
    /// comma-separated, plan a pipeline over them: each on its own machine joined by
    /// --link, or all in one machine with --host.
    #[arg(long, required_unless_present_any = ["profile", "cluster"], conflicts_with_all = ["profile", "cluster"])]
    pub(crate) gpu: Option<String>,
    /// A machine of several devices or a cluster of machines (`ferry list clusters`, or a
    /// cluster file): plans split the layers over its devices in pipeline stages.
    #[arg(long, value_name = "NAME|FILE", conflicts_with = "profile")]
    pub(crate) cluster: Option<String>,
    /// The link joining the devices --gpu lists (`ferry list links`): 1gbe, 10gbe, wifi6,
    /// pcie4-p2p, nvlink4.
    #[arg(long, value_name = "NAME", requires = "gpu")]
    pub(crate) link: Option<String>,
    /// A profile file instead of catalog datasheets (start from `ferry show profile GPU`).
    #[arg(long, value_name = "FILE")]
    pub(crate) profile: Option<PathBuf>,
    /// Model: catalog name or alias (`ferry list models`) or a Hugging Face repository id it has the shape
    /// of (meta-llama/Llama-2-13b-hf), a Hugging Face folder, its config.json, or a GGUF file.
    #[arg(long, visible_alias = "model-dir")]
    pub(crate) model: String,
    /// Host preset (`ferry list hosts`) [default: the GPU's usual host].
    #[arg(long)]
    pub(crate) host: Option<String>,
    /// Offload disk preset (`ferry list disks`) replacing the host preset's disk.
    #[arg(long)]
    pub(crate) disk: Option<String>,
    /// Host RAM to plan with, e.g. 32GiB [default: the host preset's RAM].
    #[arg(long, value_name = "SIZE")]
    pub(crate) host_mem: Option<String>,
    /// Device memory to plan with, e.g. 6GiB; on the cpu device the RAM budget [default: the GPU's memory].
    #[arg(long, value_name = "SIZE")]
    pub(crate) device_mem: Option<String>,
    /// Prompt tokens per sequence [default: 512, or shorter to fit the model's positions].
    #[arg(long)]
    pub(crate) prompt_len: Option<u64>,
    /// Tokens generated per sequence [default: 32, or shorter to fit the model's positions].
    #[arg(long)]
    pub(crate) gen_len: Option<u64>,
    /// Sequences per batch, or `auto` to search batch sizes up to 64 (throughput) / 1 (latency).
    #[arg(long, default_value = "auto", value_name = "N|auto")]
    pub(crate) batch: String,
    /// What to optimise: generated tokens/s over the batch, or one request's completion time.
    #[arg(long, value_enum, default_value = "throughput")]
    pub(crate) objective: ObjectiveArg,
    /// Only consider this schedule (sequential, layer-prefetch, zigzag-block, pipelined).
    #[arg(long, value_name = "NAME")]
    pub(crate) schedule: Option<String>,
    /// Weight formats to compare, comma-separated: f32, f16, bf16, q8_0, q4_0, q5_0, q4_k, q5_k, q6_k,
    /// q3_k, q2_k, iq4_nl, iq4_xs, iq2_xxs, iq2_xs, iq2_s, iq3_xxs, iq3_s, iq1_s, iq1_m (ggml blocks), int4-g64, int8-g64 (FlexGen's group-wise; -gN sets the group).
    /// Each is tuned and the best plan of each shown; the plan is the best of them.
    /// [default: the model's own: its dtype, or a GGUF file's mix of types as stored]
    #[arg(long, visible_alias = "weight-dtype", value_name = "LIST")]
    pub(crate) weight_format: Option<String>,
    /// A mixture of experts' measured routing (`ferry run --routing-out FILE`): plans
    /// count the experts a step touches from it instead of uniform routing; the plan
    /// written names the file.
    #[arg(long, value_name = "FILE")]
    pub(crate) routing: Option<PathBuf>,
    /// Speculative decoding: the draft to try, `self:L` (the model's own first L layers
    /// with its head; LayerSkip-style early exit) or a draft model (catalog name,
    /// folder or GGUF file) with the model's vocabulary. The search runs with and
    /// without it and reports the speed-up and the acceptance rate it needs to win.
    #[arg(long, value_name = "self:L|MODEL")]
    pub(crate) draft: Option<String>,
    /// Draft tokens per round to plan with [default: search 1 to 8].
    #[arg(long, value_name = "K", requires = "draft")]
    pub(crate) draft_len: Option<u32>,
    /// The rate α at which the model accepts a draft token, which the speculative
    /// plans are predicted with: your estimate, or the rate `ferry run` measured on a
    /// speculative plan (it prints it) [default: the rate `ferry profile --draft`
    /// measured into the --profile given].
    #[arg(long, value_name = "α", requires = "draft")]
    pub(crate) acceptance: Option<f64>,
    /// Write the winning plan (YAML) here.
    #[arg(long, value_name = "FILE")]
    pub(crate) out: Option<PathBuf>,
    /// Write plots (PNG and SVG) into this folder.
    #[arg(long, value_name = "DIR")]
    pub(crate) plots: Option<PathBuf>,
    /// Also show this many runner-up plans.
    #[arg(long, default_value_t = 3)]
    pub(crate) top: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Overwrite files given with --out or in --plots.
    #[arg(long)]
    pub(crate) force: bool,
}

pub fn run(args: TuneArgs) -> Result<()> {
    // Before the search: a file that will be refused is refused now.
    if let Some(path) = &args.out {
        ferry_core::atomic::check_output_path(path, args.force)?;
    }
    let catalog = Catalog::builtin()?;
    let cwd = std::path::Path::new(".");
    let (mut model, mut notes) = resolve_model(&catalog, &args.model, cwd)?;
    if let Some(file) = &args.routing {
        model.routing = Some(std::sync::Arc::new(ferry_core::resolve::load_routing(file, &model)?));
    }
    let hardware = HardwareRef {
        gpu: args.gpu.clone(),
        cluster: args.cluster.clone(),
        link: args.link.clone(),
        host: args.host.clone(),
        disk: args.disk.clone(),
        profile: args.profile.as_ref().map(|p| p.display().to_string()),
        device_memory: args.device_mem.as_deref().map(parse_bytes).transpose()?,
        host_memory: args.host_mem.as_deref().map(parse_bytes).transpose()?,
        devices: Vec::new(),
    };
    let (profile, hardware_notes) = resolve_hardware(&catalog, &hardware, cwd)?;
    notes.extend(hardware_notes);
    if profile.device_name == "cpu" && hardware.device_memory.is_none() && profile.device_count() == 1 {
        notes.push(format!(
            "planning the cpu backend with the default {} RAM budget; set it with --device-mem",
            ferry_core::units::format_bytes(profile.device_memory_bytes)
        ));
    }
    let objective = match args.objective {
        ObjectiveArg::Throughput => Objective::Throughput,
        ObjectiveArg::Latency => Objective::Latency,
    };
    let batch = parse_batch(&args.batch, objective)?;
    let (prompt_len, gen_len) = context_lengths(args.prompt_len, args.gen_len, &model, &mut notes)?;
    let formats = tune_formats::requested(args.weight_format.as_deref(), &model)?;
    let mut space = KnobSpace::full();
    if let Some(name) = &args.schedule {
        space.schedules = vec![Schedule::parse(name)?];
    }
    for f in &formats {
        notes.extend(ferry_core::resolve::weight_format_notes(f, &model, &profile));
    }
    for note in &notes {
        eprintln!("note: {note}");
    }
    let request_for = |weight_format: &WeightFormats| TuneRequest {
        model: &model,
        profile: &profile,
        prompt_len,
        gen_len,
        batch,
        objective,
        weight_format: weight_format.clone(),
        kv_dtype: tune_formats::kv_dtype(weight_format),
        speculation: None,
    };
    if let Some(draft) = &args.draft {
        let speculation =
            tune_speculative::requested(draft, args.draft_len, args.acceptance, &model, &catalog, &profile)?;
        let [format] = formats.as_slice() else {
            bail!("--draft tunes one weight format; give a single --weight-format (or none) with it")
        };
        return tune_speculative::run(&args, &request_for(format), &hardware, &space, speculation);
    }
    if profile.device_count() > 1 {
        let [format] = formats.as_slice() else {
            bail!("a machine of several devices tunes one weight format; give a single --weight-format (or none)")
        };
        return crate::tune_pipeline::run(&args, &request_for(format), &hardware, &space);
    }
    let started = Instant::now();
    let mut outcomes: Vec<Outcome> = formats
        .into_iter()
        .map(|formats| Outcome { result: tune_and_compare(&request_for(&formats), &space), formats })
        .collect();
    let search_time = started.elapsed();
    let Some(chosen) = tune_formats::best(&outcomes, objective) else {
        // No format found a plan: the reason (of the first format, the only one unless compared).
        let count = outcomes.len();
        let first = outcomes.swap_remove(0);
        let err = first.result.err().map_or_else(|| anyhow::anyhow!("no plan found"), anyhow::Error::from);
        return Err(if count > 1 { err.context("no weight format found a plan") } else { err });
    };
    let compared = outcomes.len() > 1;
    let Ok(comparison) = &outcomes[chosen].result else { bail!("the chosen format has no plan; this is a bug") };
    let request = request_for(&outcomes[chosen].formats);
    let Comparison { result, baselines: baseline_results, adopted_baseline, disk_note } = comparison;
    if let Some(name) = adopted_baseline {
        eprintln!("note: the {name} baseline beat the searched plans; it is the plan");
    }
    if let Some(note) = disk_note {
        eprintln!("note: {note}");
    }
    let plan = tune_output::write_outputs(&args, &request, &hardware, &space, result)?;
    if args.json {
        let formats_json = tune_formats::json(&outcomes, &model, &profile, Some(chosen));
        return tune_output::print_json(&plan, result, baseline_results, search_time, args.top, formats_json);
    }
    if compared {
        print_formats(&args, &outcomes, &model, &profile, chosen);
    }
    print_report(&args, &request, result, baseline_results, search_time, &plan);
    if result.best.metrics.tokens_per_s <= 0.0 {
        bail!("the best plan predicts no throughput; this is a bug");
    }
    Ok(())
}

/// The comparison of formats, before the chosen format's full report.
fn print_formats(
    args: &TuneArgs,
    outcomes: &[Outcome],
    model: &ModelSpec,
    profile: &ferry_core::profile::Profile,
    chosen: usize,
) {
    println!(
        "Best plan for each weight format (* the plan below{}):",
        if args.out.is_some() { ", written with --out" } else { "" }
    );
    print!("{}", tune_formats::table(outcomes, model, profile, Some(chosen)));
    println!(
        "chosen: {}, the best by {} of the formats you listed (quality is yours to judge: Ferry never picks a lower precision you did not list)\n",
        outcomes[chosen].formats.describe(),
        match args.objective {
            ObjectiveArg::Throughput => "tokens/s",
            ObjectiveArg::Latency => "completion time",
        }
    );
    let priced_elsewhere = outcomes
        .iter()
        .any(|o| !o.formats.quantized_formats(model).is_empty() && !tune_formats::unpriced(&o.formats, model, profile));
    if tune_formats::unpriced(&outcomes[chosen].formats, model, profile) && priced_elsewhere {
        println!(
            "note: {}'s dequantization is unpriced here while other formats' is measured: its lead may be the \
             missing figure's\n",
            outcomes[chosen].formats.describe()
        );
    }
}

/// The human report: the setting, the search, the plan, the baselines, runners-up.
pub(crate) fn print_report(
    args: &TuneArgs,
    request: &TuneRequest,
    result: &TuneResult,
    baseline_results: &[Baseline],
    search_time: std::time::Duration,
    plan: &ferry_core::plan::Plan,
) {
    let (model, profile) = (request.model, request.profile);
    let (prompt_len, gen_len, objective) = (request.prompt_len, request.gen_len, request.objective);
    let batch_size = result.best.workload.batch_size;
    let stats = &result.stats;
    println!(
        "{} on {} (device {} usable of {}): prompt {} tokens, {} new tokens per sequence, objective {}",
        model.name,
        profile.device_name,
        ferry_core::units::format_bytes(ferry_core::schedule::pool_capacities(profile).0),
        ferry_core::units::format_bytes(profile.device_memory_bytes),
        prompt_len,
        gen_len,
        match objective {
            Objective::Throughput => "throughput",
            Objective::Latency => "latency",
        }
    );
    println!("{}", report::provenance_line(profile));
    println!(
        "search: {} configurations considered, {} LP bounds solved ({} configurations bounded, {} infeasible), {} pruned by bound, {} ranked out, {} simulated ({} rejected), {} variants of the leaders simulated, in {:.2} s\n",
        group_digits(stats.considered),
        stats.lp_solves,
        group_digits(stats.bounded),
        group_digits(stats.infeasible),
        group_digits(stats.pruned),
        group_digits(stats.ranked_out),
        stats.simulated,
        stats.rejected,
        stats.refined,
        search_time.as_secs_f64()
    );
    println!("Best plan (batch {}):", batch_size);
    print!("{}", report::policy_table(&result.best.policy));
    if let Some(line) = experts_line(model, &result.best.policy) {
        println!("{line}");
        let export = ferry_core::export::export(plan, model, profile, ferry_core::export::Engine::LlamaCpp);
        println!("llama.cpp for this plan:\n  {}", export.settings.replace('\n', "\n  "));
        // The command is the nearest llama.cpp can do, not the plan, where the plan
        // streams experts to the device: say so here, not only in `ferry export`.
        if let Some(difference) = export.cannot_express.iter().find(|line| line.contains("experts")) {
            println!(
                "  not the same run: {difference}; `ferry export --to llama.cpp` prices llama.cpp's run of it \
                 and lists every difference"
            );
        }
    }
    println!();
    let best = &result.best;
    // The interval `write_outputs` put in the plan, not simulated again.
    let interval = plan
        .predicted
        .as_ref()
        .and_then(|p| p.tokens_per_s_interval)
        .map(|[slow, fast]| ferry_sim::Interval { slow_tokens_per_s: slow, fast_tokens_per_s: fast });
    print!("{}", report::metrics_text(&best.metrics, interval.as_ref()));
    if let Some(basis) = interval.and(ferry_sim::interval_basis(profile)) {
        println!("{basis}");
    }
    // Every prediction printed carries its interval: a datasheet one scaled from the
    // calibration set's spread, a drifted profile's simulated at both ends.
    let interval_of = |engine, c: &Candidate, mode| {
        let tokens_per_s = c.metrics.tokens_per_s;
        ferry_sim::interval_of_prediction(engine, &c.policy, model, &c.workload, profile, mode, tokens_per_s)
            .ok()
            .flatten()
    };
    println!("\nCompared with baseline policies, simulated on the same hardware (at batch {batch_size}, or the largest half of it that fits):");
    let mut table = Table::new(["policy", "batch", "tokens/s", "first token", "per token", "vs ferry", "bottleneck"]);
    let best = &result.best;
    table.row(row("ferry (this plan)", best, best, interval.as_ref()));
    for baseline in baseline_results {
        match &baseline.outcome {
            Ok(c) => {
                let interval = interval_of(baseline.engine, c, Extrapolation::Full);
                table.row(row(baseline.name, c, best, interval.as_ref()))
            }
            Err(e) => table.row([
                baseline.name.to_string(),
                "—".into(),
                "—".into(),
                "—".into(),
                "—".into(),
                "—".into(),
                e.clone(),
            ]),
        }
    }
    print!("{}", table.render());
    for baseline in baseline_results {
        println!("  {}: {}", baseline.name, baseline.description);
    }
    if args.top > 0 && result.top.len() > 1 {
        println!("\nRunners-up:");
        let mut table = Table::new([
            "#",
            "tokens/s",
            "batch",
            "schedule",
            "depth",
            "chunk",
            "streams/io",
            "device layers (attn/mlp/kv)",
        ]);
        for (i, c) in result.top.iter().skip(1).take(args.top).enumerate() {
            let p = &c.policy;
            let interval = interval_of(None, c, Extrapolation::Sampled);
            table.row([
                (i + 2).to_string(),
                format!("{:.2}{}", c.metrics.tokens_per_s, report::interval_text(interval.as_ref())),
                format!("{}×{}", p.micro_batch_size, p.num_micro_batches),
                p.schedule.name().to_string(),
                p.prefetch_depth.to_string(),
                ferry_core::units::format_bytes(p.chunk_bytes),
                format!("{}/{}", p.copy_streams, p.io_queue_depth),
                format!("{}/{}/{}", p.attention_weights.device, p.mlp_weights.device, p.kv_cache.device),
            ]);
        }
        print!("{}", table.render());
        let shown = result.top.iter().skip(1).take(args.top);
        if shown.clone().any(|c| c.score(request.objective) > best.score(request.objective)) {
            println!(
                "the plan is the simplest within {:.1} % of the fastest (fewest micro-batches, then the shallowest \
                 prefetch): predictions differ from runs by far more than that",
                ferry_sim::tune::NEAR_TIE * 100.0
            );
        }
    }
    match &args.out {
        Some(path) => println!("\nwrote {} (run it through the simulator again with `ferry simulate --plan {}`)", path.display(), path.display()),
        None => println!("\nsave this plan with --out plan.yaml; export it for other engines with `ferry export --plan plan.yaml --to llama.cpp|vllm|accelerate|flexgen`"),
    }
    if let Some(dir) = &args.plots {
        println!("wrote plots to {}", dir.display());
    }
}

/// `--batch`: a number, or `auto` (up to 64 for throughput, 1 for latency).
fn parse_batch(text: &str, objective: Objective) -> Result<BatchChoice> {
    if text == "auto" {
        return Ok(BatchChoice::Auto { max: if objective == Objective::Latency { 1 } else { 64 } });
    }
    let n: u64 =
        text.parse().map_err(|_| ferry_core::CoreError::invalid(format!("--batch '{text}': give a number or auto")))?;
    if n == 0 {
        return Err(ferry_core::CoreError::invalid("--batch must be at least 1").into());
    }
    Ok(BatchChoice::Fixed(n))
}

fn row(name: &str, c: &Candidate, best: &Candidate, interval: Option<&ferry_sim::Interval>) -> Vec<String> {
    vec![
        name.to_string(),
        c.workload.batch_size.to_string(),
        format!("{:.2}{}", c.metrics.tokens_per_s, report::interval_text(interval)),
        format_ns(c.metrics.time_to_first_token_ns),
        format_ns(c.metrics.time_per_output_token_ns),
        format!("{:.2}×", c.metrics.tokens_per_s / best.metrics.tokens_per_s),
        c.metrics.resource_label(c.metrics.bottleneck),
    ]
}

/// Prompt and generation lengths within the model's positions, as `run` requires.
/// Lengths the user gave are checked (the error names the flags); defaults are
/// shortened to fit, with a note.
fn context_lengths(
    prompt: Option<u64>,
    gen: Option<u64>,
    model: &ModelSpec,
    notes: &mut Vec<String>,
) -> Result<(u64, u64)> {
    let positions = model.max_position_embeddings;
    let (p, g) = (prompt.unwrap_or(512), gen.unwrap_or(32));
    if p == 0 || g == 0 {
        bail!(CoreError::invalid("--prompt-len and --gen-len must be at least 1"));
    }
    if p.saturating_add(g) <= positions {
        return Ok((p, g));
    }
    let (p, g) = match (prompt, gen) {
        (Some(p), None) => (p, positions.saturating_sub(p).min(g)),
        (None, Some(g)) => (positions.saturating_sub(g), g),
        (None, None) => (positions - g.min(positions / 2), g.min(positions / 2)),
        (Some(_), Some(_)) => (0, 0),
    };
    if p == 0 || g == 0 {
        bail!(CoreError::invalid(format!(
            "--prompt-len {} + --gen-len {} exceeds the {positions} positions {} encodes; shorten them",
            prompt.unwrap_or(512),
            gen.unwrap_or(32),
            model.name
        )));
    }
    notes.push(format!(
        "prompt {p} and generation {g} tokens: the defaults shortened to the {positions} positions {} encodes",
        model.name
    ));
    Ok((p, g))
}

/// 216000 → "216,000".
fn group_digits(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// For a mixture of experts, where the plan keeps the experts, in llama.cpp's terms.
fn experts_line(model: &ferry_core::model::ModelSpec, policy: &ferry_core::plan::Policy) -> Option<String> {
    use ferry_core::plan::ExpertReads;
    if model.num_experts == 0 {
        return None;
    }
    let mlp = policy.mlp_weights;
    let on_cpu = if policy.compute_host_layers_on_host { mlp.host } else { 0 };
    Some(if on_cpu > 0 {
        format!(
            "experts: {on_cpu} of {} layers' experts stay in host RAM and are computed there, the rest on the device \
             (llama.cpp's --n-cpu-moe {on_cpu} keeps as many, the first layers'; the -ot rule below keeps the \
             plan's own)",
            model.num_layers
        )
    } else {
        let streamed = mlp.host + mlp.disk;
        let how = match policy.expert_reads {
            _ if streamed == 0 => String::new(),
            ExpertReads::Routed if policy.hot_experts + policy.prefetched_experts > 0 => {
                let (hot, ahead) = (policy.hot_experts, policy.prefetched_experts);
                let kept = hot + ahead;
                let mut parts = Vec::new();
                if hot > 0 {
                    parts.push(format!("{hot} hot experts of each stay on the device"));
                }
                if ahead > 0 {
                    parts.push(format!("the next {ahead} most popular are read ahead with its router"));
                }
                format!(
                    ": {} ({:.0} % of the tokens' choices under {}), and a decoding step reads only the other \
                     experts its tokens are routed to (about {:.1} of {} per layer)",
                    parts.join(" and "),
                    100.0 * model.hot_hit_rate(kept),
                    model.routing_name(),
                    model.expected_cold_experts(policy.sequences_per_visit(), kept),
                    model.num_experts - kept,
                )
            }
            ExpertReads::Routed => format!(
                ": each decoding step reads only the experts its tokens are routed to (about {:.1} of {} per \
                 layer under {})",
                model.expected_experts(policy.sequences_per_visit()),
                model.num_experts,
                model.routing_name()
            ),
            ExpertReads::Whole => ": every expert of a layer, read ahead (expert_reads: whole)".to_string(),
        };
        format!(
            "experts: {} of {} layers' experts on the device, {streamed} streamed to it from host RAM or disk{how}",
            mlp.device, model.num_layers
        )
    })
}
