//! `ferry check -- llama-server ...`: a llama.cpp command line a user already has,
//! read back into Ferry's model of llama.cpp (`ferry_sim::tune::llama_cpp_policy`):
//! its memory per device at the context it allocates, whether it runs out, its
//! predicted speed, the largest `-ngl` that fits, and Ferry's own plan at that budget.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use ferry_core::catalog::Catalog;
use ferry_core::engine_args::llama_cpp::{self, LlamaCppArgs};
use ferry_core::graph::PoolSpec;
use ferry_core::model::ModelSpec;
use ferry_core::plan::{HardwareRef, Policy, Workload};
use ferry_core::profile::Profile;
use ferry_core::resolve::resolve_hardware;
use ferry_core::schedule::pool_specs;
use ferry_core::units::{format_bytes, parse_bytes};
use ferry_core::CoreError;
use ferry_sim::tune::{llama_cpp_largest_fit, llama_cpp_policy, tune, BatchChoice, KnobSpace, Objective, TuneRequest};
use ferry_sim::{predict, Extrapolation};

use crate::table::Table;

#[derive(Args)]
#[command(after_help = "Examples:
  ferry check --gpu rtx3060 -- llama-server -m llama-2-13b.Q4_K_M.gguf -ngl 30 -c 4096
  ferry check --gpu rtx3060-laptop-6gb --host-mem 16GiB -- llama-cli -m 13b -ngl 20 -c 2048
  ferry check --gpu rtx4090 -- vllm serve llama-2-13b --cpu-offload-gb 4 --max-model-len 4096

-m takes a GGUF file, or a catalog model name for a quick look (priced at its own dtype).
llama.cpp: -m, -ngl, -c, -np, -n, -ctk/-ctv are read. vLLM: the model, --cpu-offload-gb,
--gpu-memory-utilization, --max-model-len, --max-num-seqs. Refused by name: flags that place tensors in ways
Ferry's plans cannot say (-ot, --n-cpu-moe, -nkvo, --tensor-split, ...). Other flags are
listed as ignored. Exit status 1 when the command runs out of memory, 0 when it fits.")]
pub struct CheckArgs {
    /// GPU from the catalog (`ferry list gpus`); `cpu` for llama.cpp without a GPU.
    #[arg(long, required_unless_present = "profile")]
    gpu: Option<String>,
    /// A profile file instead of catalog datasheets (`ferry profile`).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Host preset (`ferry list hosts`) [default: the GPU's usual host].
    #[arg(long)]
    host: Option<String>,
    /// Offload disk preset (`ferry list disks`).
    #[arg(long)]
    disk: Option<String>,
    /// Host RAM the command may use, e.g. 32GiB [default: the host preset's RAM].
    #[arg(long, value_name = "SIZE")]
    host_mem: Option<String>,
    /// Device memory, e.g. 6GiB [default: the GPU's memory].
    #[arg(long, value_name = "SIZE")]
    device_mem: Option<String>,
    /// Prompt tokens per request, for the predicted speed (fewer where -c is shorter).
    #[arg(long, default_value_t = 512)]
    pub(crate) prompt_len: u64,
    /// Tokens generated per request, for the predicted speed [default: -n, else 128].
    #[arg(long)]
    pub(crate) gen_len: Option<u64>,
    /// Print the result as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// The llama.cpp (`llama-server`, `llama-cli`) or vLLM (`vllm serve`) command line, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// What the command allocates and runs: its context split over its sequences.
struct Shape {
    gpu_layers: u64,
    /// Tokens of KV cache per sequence (`-c` ÷ `-np`).
    context_per_sequence: u64,
    sequences: u64,
    /// The request the speed is predicted for.
    speed: Workload,
}

pub fn run(mut args: CheckArgs) -> Result<u8> {
    // `python -m vllm.entrypoints.openai.api_server --model M ...` is `vllm serve` by its old name.
    if let [python, m, module, rest @ ..] = &args.command[..] {
        if python.contains("python") && m == "-m" && module.starts_with("vllm.entrypoints") {
            args.command = ["vllm".to_string(), "serve".to_string()].into_iter().chain(rest.iter().cloned()).collect();
        }
    }
    if args.command.first().is_some_and(|program| program.ends_with("vllm")) {
        let command = ferry_core::engine_args::vllm::parse(&args.command)?;
        let (named, profile) = setting(&args, &command.model)?;
        return crate::check_vllm::run(&args, &command, &named.model, &profile, named.notes);
    }
    let command = llama_cpp::parse(&args.command)?;
    let (named, profile) = setting(&args, &command.model)?;
    let (model, mut notes) = (named.model, named.notes);
    // How `ferry tune` names this model: a missing file by the catalog model and type read from its name.
    let tune_model = match named.format {
        Some(format) => format!("{} --weight-format {}", model.name, format.name()),
        None => command.model.clone(),
    };
    let shape = shape(&args, &command, &model, &profile, &mut notes)?;
    for note in &notes {
        eprintln!("note: {note}");
    }
    let formats = match named.format {
        Some(format) => ferry_core::model::WeightFormats::uniform(format),
        None => crate::tune_formats::requested(None, &model)?.swap_remove(0),
    };
    let request = |workload: &Workload| TuneRequest {
        model: &model,
        profile: &profile,
        prompt_len: workload.prompt_len,
        gen_len: workload.gen_len,
        batch: BatchChoice::Fixed(shape.sequences),
        objective: Objective::Throughput,
        weight_format: formats.clone(),
        kv_dtype: command.kv_dtype,
        speculation: None,
    };
    // llama.cpp allocates the KV cache for the whole context at start-up.
    let allocated = Workload { batch_size: shape.sequences, prompt_len: shape.context_per_sequence - 1, gen_len: 1 };
    let policy = llama_cpp_policy(&request(&allocated), shape.gpu_layers);
    let pools = pool_specs(&policy, &model, &allocated, &profile);
    let fits = pools.iter().all(|p| p.resident_bytes() <= p.capacity_bytes);
    let speed_of = |policy: &Policy| predict(policy, &model, &shape.speed, &profile, Extrapolation::Full);
    let predicted = fits.then(|| speed_of(&policy));
    // The most layers llama.cpp could offload at this context: fewer layers on the
    // device only slows it, so the largest that fits (and streams) is its best.
    // Each prediction printed carries its interval (`None` where the profile gives none).
    let interval_of = |engine, policy: &Policy, workload: &Workload, tokens_per_s: f64| {
        let mode = Extrapolation::Full;
        ferry_sim::interval_of_prediction(engine, policy, &model, workload, &profile, mode, tokens_per_s).ok().flatten()
    };
    let best_ngl = llama_cpp_largest_fit(&request(&allocated), &allocated, &shape.speed).ok().map(|(ngl, c)| {
        let interval = interval_of(None, &c.policy, &c.workload, c.metrics.tokens_per_s);
        (ngl, c.metrics, interval)
    });
    let ferry_plan = tune(&request(&shape.speed), &KnobSpace::full()).ok().map(|r| r.best);
    let plan_interval =
        ferry_plan.as_ref().and_then(|c| interval_of(None, &c.policy, &c.workload, c.metrics.tokens_per_s));
    let interval = match &predicted {
        Some(Ok(p)) => {
            let engine = Some(ferry_core::export::Engine::LlamaCpp);
            interval_of(engine, &policy, &shape.speed, p.metrics.tokens_per_s)
        }
        _ => None,
    };
    let report = Report {
        command: &command,
        model: &model,
        profile: &profile,
        shape: &shape,
        policy: &policy,
        pools: &pools,
        interval,
        plan_interval,
        tune_model,
    };
    let ok = predicted.as_ref().is_some_and(|p| p.is_ok());
    if args.json {
        report.json(&predicted, &best_ngl, &ferry_plan)?;
    } else {
        report.human(&predicted, &best_ngl, &ferry_plan, &args);
    }
    Ok(if ok { 0 } else { 1 })
}

/// The model the command names and the machine it runs on (one device), with notes.
fn setting(args: &CheckArgs, model_name: &str) -> Result<(crate::check_model::NamedModel, Profile)> {
    let catalog = Catalog::builtin()?;
    let cwd = std::path::Path::new(".");
    let mut named = crate::check_model::resolve(&catalog, model_name, cwd)?;
    let hardware = HardwareRef {
        gpu: args.gpu.clone(),
        host: args.host.clone(),
        disk: args.disk.clone(),
        profile: args.profile.as_ref().map(|p| p.display().to_string()),
        device_memory: args.device_mem.as_deref().map(parse_bytes).transpose()?,
        host_memory: args.host_mem.as_deref().map(parse_bytes).transpose()?,
        ..HardwareRef::default()
    };
    let (profile, hardware_notes) = resolve_hardware(&catalog, &hardware, cwd)?;
    named.notes.extend(hardware_notes);
    if profile.device_count() > 1 {
        return Err(CoreError::invalid(format!(
            "ferry check models an engine on one device; the profile describes {}",
            profile.device_count()
        ))
        .into());
    }
    Ok((named, profile))
}

/// Memory per pool: what it needs, its budget, and whether it fits (with what fills
/// it when it does not).
pub(crate) fn memory_table(pools: &[PoolSpec]) -> String {
    let mut table = Table::new(["memory", "needs", "budget", "verdict"]);
    let mut short = Vec::new();
    for pool in pools {
        let (need, budget) = (pool.resident_bytes(), pool.capacity_bytes);
        let verdict = if need <= budget {
            format!("fits ({} free)", format_bytes(budget - need))
        } else {
            short.push(format!("  {}: {}\n", pool_name(pool), items(pool)));
            format!("OUT OF MEMORY: short by {}", format_bytes(need - budget))
        };
        table.row([pool_name(pool), format_bytes(need), format_bytes(budget), verdict]);
    }
    table.render() + &short.concat()
}

/// The layers, context and sequences the command asks for (llama.cpp's defaults where
/// it is silent, each said in a note), and the request its speed is predicted for.
fn shape(
    args: &CheckArgs,
    command: &LlamaCppArgs,
    model: &ModelSpec,
    profile: &Profile,
    notes: &mut Vec<String>,
) -> Result<Shape> {
    let cpu = profile.device_name == "cpu";
    let gpu_layers = command.gpu_layers.unwrap_or_else(|| {
        if cpu {
            return 0;
        }
        notes.push(
            "no -ngl: checked with every layer on the CPU (-ngl 0, llama.cpp's long-standing default; newer builds \
             may fit layers on their own)"
                .into(),
        );
        0
    });
    let context = match command.context {
        Some(0) => model.max_position_embeddings,
        Some(c) => c,
        None => {
            notes.push("no -c: checked at 4096 tokens of context (llama.cpp's default in most builds)".into());
            4096
        }
    };
    let sequences = command.parallel.unwrap_or(1);
    let context_per_sequence = context / sequences;
    if context_per_sequence < 2 {
        return Err(CoreError::invalid(format!(
            "-c {context} over -np {sequences} leaves {context_per_sequence} tokens per sequence; give a larger -c"
        ))
        .into());
    }
    let positions = model.max_position_embeddings;
    if context_per_sequence > positions {
        notes.push(format!(
            "{context_per_sequence} tokens per sequence exceed the {positions} positions {} was trained for: \
             llama.cpp allocates them anyway; the speed is predicted within {positions}",
            model.name
        ));
    }
    let usable = context_per_sequence.min(positions);
    if args.prompt_len == 0 || args.gen_len == Some(0) {
        return Err(CoreError::invalid("--prompt-len and --gen-len must be at least 1").into());
    }
    let asked_gen = command.predict.or(args.gen_len).unwrap_or(128);
    let gen_len = asked_gen.clamp(1, usable - 1);
    let prompt_len = args.prompt_len.clamp(1, usable - gen_len);
    // A request longer than a sequence's context is shortened to fit it, and said so.
    if (gen_len, prompt_len) != (asked_gen, args.prompt_len) {
        notes.push(format!(
            "a prompt of {} and {asked_gen} new tokens do not fit a sequence's {usable} tokens of context: the speed \
             is predicted for a prompt of {prompt_len} and {gen_len} new tokens",
            args.prompt_len
        ));
    }
    let speed = Workload { batch_size: sequences, prompt_len, gen_len };
    Ok(Shape { gpu_layers, context_per_sequence, sequences, speed })
}

/// `-ngl` as llama.cpp users write "everything": more than the layers is `all`.
fn ngl_text(ngl: u64, layers: u64) -> String {
    if ngl > layers {
        "all".to_string()
    } else {
        ngl.to_string()
    }
}

struct Report<'a> {
    command: &'a LlamaCppArgs,
    model: &'a ModelSpec,
    profile: &'a Profile,
    shape: &'a Shape,
    policy: &'a Policy,
    pools: &'a [PoolSpec],
    /// The prediction's interval (`ferry_sim::interval_of_prediction`), where the profile gives one.
    interval: Option<ferry_sim::Interval>,
    /// The interval of Ferry's own plan's prediction.
    plan_interval: Option<ferry_sim::Interval>,
    /// `ferry tune`'s `--model` (and `--weight-format`) for this model.
    tune_model: String,
}

type Predicted = Option<Result<ferry_sim::Prediction, ferry_sim::SimError>>;
/// The largest `-ngl` that fits, its predicted metrics and their interval.
type BestNgl = Option<(u64, ferry_core::trace::Metrics, Option<ferry_sim::Interval>)>;

impl Report<'_> {
    fn placement(&self) -> String {
        let (layers, p) = (self.model.num_layers, self.policy);
        let device = p.attention_weights.device;
        let head = if p.head == ferry_core::plan::Tier::Device { "on the device" } else { "in host RAM" };
        if self.profile.device_name == "cpu" {
            return format!("all {layers} layers, their KV cache and the output layer in RAM, computed by the CPU");
        }
        if device == layers {
            return format!("all {layers} layers and their KV cache on the device; the output layer {head}");
        }
        format!(
            "{device} of {layers} layers and their KV cache on the device, {} in host RAM and computed by the CPU; \
             the output layer {head}",
            layers - device
        )
    }

    fn human(
        &self,
        predicted: &Predicted,
        best_ngl: &BestNgl,
        ferry_plan: &Option<ferry_sim::tune::Candidate>,
        args: &CheckArgs,
    ) {
        let (shape, model) = (self.shape, self.model);
        println!(
            "{} on {}: {} ({} layers)",
            self.command.program, self.profile.device_name, model.name, model.num_layers
        );
        println!("-ngl {}: {}", ngl_text(shape.gpu_layers, model.num_layers), self.placement());
        println!(
            "KV cache allocated for {} tokens: {} sequence(s) of {}\n",
            shape.sequences * shape.context_per_sequence,
            shape.sequences,
            shape.context_per_sequence
        );
        print!("{}", memory_table(self.pools));
        let request = format!(
            "prompt {}, {} new tokens, {} sequence(s)",
            shape.speed.prompt_len, shape.speed.gen_len, shape.speed.batch_size
        );
        match predicted {
            None => println!("\nverdict: runs out of memory when llama.cpp allocates its buffers at start-up"),
            Some(Err(error)) => println!("\nverdict: runs out of memory while running: {error}"),
            Some(Ok(p)) => {
                println!(
                    "\npredicted: {:.2} tokens/s{} over the request ({request}); first token {}, then {} per token",
                    p.metrics.tokens_per_s,
                    crate::report::interval_text(self.interval.as_ref()),
                    ms(p.metrics.time_to_first_token_ns),
                    ms(p.metrics.time_per_output_token_ns)
                );
                if let Some(basis) = self.interval.and(ferry_sim::interval_basis(self.profile)) {
                    println!("{basis}");
                }
            }
        }
        let llama_best = best_ngl.as_ref().map(|(ngl, m, _)| (*ngl, m.tokens_per_s));
        let cpu = self.profile.device_name == "cpu";
        match best_ngl {
            Some(_) if cpu => {}
            Some((ngl, m, interval)) => println!(
                "largest -ngl that fits at this context: {} → {:.2} tokens/s{} predicted",
                ngl_text(*ngl, model.num_layers),
                m.tokens_per_s,
                crate::report::interval_text(interval.as_ref())
            ),
            None => println!("nothing fits at this context: lower -c or -np"),
        }
        if let Some(plan) = ferry_plan {
            let vs =
                llama_best.map(|(_, tps)| format!(" ({:.2}× llama.cpp's best -ngl)", plan.metrics.tokens_per_s / tps));
            println!(
                "Ferry's plan for its own engine at this budget: {:.2} tokens/s{}{}; see it with `ferry tune --gpu {} \
                 --model {} --batch {} --prompt-len {} --gen-len {}`",
                plan.metrics.tokens_per_s,
                crate::report::interval_text(self.plan_interval.as_ref()),
                vs.unwrap_or_default(),
                args.gpu.as_deref().unwrap_or("<your profile>"),
                self.tune_model,
                shape.speed.batch_size,
                shape.speed.prompt_len,
                shape.speed.gen_len
            );
        }
        println!("{}", crate::report::provenance_line(self.profile));
        if !self.command.ignored.is_empty() {
            println!(
                "ignored (no effect on memory or placement in Ferry's model): {}",
                self.command.ignored.join(", ")
            );
        }
    }

    fn json(
        &self,
        predicted: &Predicted,
        best_ngl: &BestNgl,
        ferry_plan: &Option<ferry_sim::tune::Candidate>,
    ) -> Result<()> {
        let pools = memory_json(self.pools);
        let out = serde_json::json!({
            "program": self.command.program,
            "model": self.model.name,
            "device": self.profile.device_name,
            "gpu_layers": self.shape.gpu_layers.min(self.model.num_layers + 1),
            "context_tokens": self.shape.sequences * self.shape.context_per_sequence,
            "sequences": self.shape.sequences,
            "memory": pools,
            "runs": matches!(predicted, Some(Ok(_))),
            "predicted": match predicted {
                Some(Ok(p)) => serde_json::to_value(&p.metrics)?,
                Some(Err(e)) => serde_json::json!({"error": e.to_string()}),
                None => serde_json::Value::Null,
            },
            "predicted_tokens_per_s_interval": self.interval.map(|i| [i.slow_tokens_per_s, i.fast_tokens_per_s]),
            "workload": serde_json::to_value(self.shape.speed)?,
            "largest_gpu_layers_that_fit": best_ngl.as_ref().map(|(ngl, m, i)| serde_json::json!({"gpu_layers": ngl, "tokens_per_s": m.tokens_per_s, "tokens_per_s_interval": i.map(|i| [i.slow_tokens_per_s, i.fast_tokens_per_s])})),
            "ferry_plan_tokens_per_s": ferry_plan.as_ref().map(|c| c.metrics.tokens_per_s),
            "ferry_plan_tokens_per_s_interval": self.plan_interval.map(|i| [i.slow_tokens_per_s, i.fast_tokens_per_s]),
            "ignored": self.command.ignored,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        Ok(())
    }
}

/// Memory per pool as JSON: needs, budget, whether it fits, and its items.
pub(crate) fn memory_json(pools: &[PoolSpec]) -> Vec<serde_json::Value> {
    let items = |p: &PoolSpec| -> Vec<serde_json::Value> {
        p.resident.iter().map(|(what, bytes)| serde_json::json!({"what": what, "bytes": bytes})).collect()
    };
    pools
        .iter()
        .map(|p| {
            serde_json::json!({
                "pool": pool_name(p),
                "needs_bytes": p.resident_bytes(),
                "budget_bytes": p.capacity_bytes,
                "fits": p.resident_bytes() <= p.capacity_bytes,
                "items": items(p),
            })
        })
        .collect()
}

fn pool_name(pool: &PoolSpec) -> String {
    match pool.pool {
        ferry_core::graph::Place::Device(_) => "device".into(),
        ferry_core::graph::Place::Host(_) => "host".into(),
    }
}

/// A pool's resident items, largest first.
fn items(pool: &PoolSpec) -> String {
    let mut items: Vec<&(String, u64)> = pool.resident.iter().filter(|(_, b)| *b > 0).collect();
    items.sort_by_key(|(_, b)| std::cmp::Reverse(*b));
    items.iter().map(|(what, b)| format!("{what} {}", format_bytes(*b))).collect::<Vec<_>>().join(", ")
}

fn ms(ns: u64) -> String {
    format!("{:.1} ms", ns as f64 / 1e6)
}
