//! `ferry check -- vllm serve ...`: a vLLM command line read back into Ferry's model of
//! vLLM (`ferry_sim::engines`): `--cpu-offload-gb` of weights in pinned host RAM copied
//! in as each layer runs, the KV cache on the GPU in what `--gpu-memory-utilization`
//! leaves, at least one `--max-model-len` sequence of it (else vLLM refuses to start),
//! and as many sequences batched as it holds, up to `--max-num-seqs`. Its V1 engine
//! prefills in chunks of `--max-num-batched-tokens`, so the activations at start-up are
//! those of one chunk, not of a `--max-model-len` prompt.

use anyhow::Result;
use ferry_core::engine_args::vllm::VllmArgs;
use ferry_core::graph::PoolSpec;
use ferry_core::model::{ModelSpec, WeightGroup, WeightLayout};
use ferry_core::plan::{Policy, Tier, TierCounts, Workload};
use ferry_core::profile::Profile;
use ferry_core::schedule::pool_specs;
use ferry_core::units::{format_bytes, GIB};
use ferry_core::CoreError;
use ferry_sim::engines::{as_run_by, EngineRun};
use ferry_sim::tune::{tune, BatchChoice, KnobSpace, Objective, TuneRequest};
use ferry_sim::{predict, Extrapolation};

use crate::check_cmd::{memory_json, memory_table, CheckArgs};

/// vLLM's default `--max-num-seqs` (its V0 engine's and, below 70 GiB, V1's; V1 takes
/// 1024 on larger GPUs, which Ferry's one-pass prefill of the whole batch would
/// overstate the activations of: see `default_chunk`).
const DEFAULT_MAX_NUM_SEQS: u64 = 256;

/// vLLM V1's default `--max-num-batched-tokens` for `vllm serve` on `profile`'s GPU:
/// 8192 on 70 GiB or more other than an A100, else 2048 (`EngineArgs.get_batch_defaults`,
/// the `OPENAI_API_SERVER` column).
fn default_chunk(profile: &Profile) -> u64 {
    let large = profile.device_memory_bytes >= 70 * GIB && !profile.device_name.to_ascii_lowercase().contains("a100");
    if large {
        8192
    } else {
        2048
    }
}

pub(crate) fn run(
    args: &CheckArgs,
    command: &VllmArgs,
    model: &ModelSpec,
    profile: &Profile,
    mut notes: Vec<String>,
) -> Result<u8> {
    let max_len = max_model_len(command, model, profile)?;
    // On the GPU's whole memory, as vLLM decides it.
    let chunk = command.max_num_batched_tokens.unwrap_or_else(|| default_chunk(profile));
    notes.push(format!(
        "vLLM prefills {chunk} tokens a step at most ({}): memory holds one such chunk's activations; the \
         prediction prices a prefill as one pass per layer",
        if command.max_num_batched_tokens.is_some() {
            "--max-num-batched-tokens"
        } else {
            "its V1 default on this GPU"
        }
    ));
    let (profile, usable) = gpu_share(profile, command.gpu_memory_utilization);
    let mut formats = crate::tune_formats::requested(None, model)?.swap_remove(0);
    // `--dtype` converts float weights as vLLM loads them; a quantized file keeps its blocks.
    if let (Some(dtype), Some(_)) = (command.dtype, formats.uniform_float()) {
        formats = ferry_core::model::WeightFormats::float(dtype).unwrap_or(formats);
    }
    let kv_dtype = crate::tune_formats::kv_dtype(&formats);
    let (offloaded, approximation) = offloaded_layers(model, &formats, command.cpu_offload_gib);
    if command.cpu_offload_gib > 0.0 {
        notes.push(approximation);
    }
    let max_num_seqs = command.max_num_seqs.unwrap_or_else(|| {
        notes.push(format!("no --max-num-seqs: checked with vLLM's default of {DEFAULT_MAX_NUM_SEQS}"));
        DEFAULT_MAX_NUM_SEQS
    });
    for note in &notes {
        eprintln!("note: {note}");
    }
    let policy_at = |batch: u64| -> Result<Policy> {
        let mut policy = Policy::all_on_device(
            model.num_layers,
            batch,
            formats.uniform_float().unwrap_or(ferry_core::model::Dtype::F16),
        );
        policy.set_weight_format(formats.clone());
        policy.kv_dtype = kv_dtype;
        let counts = TierCounts { device: model.num_layers - offloaded, host: offloaded, disk: 0 };
        (policy.attention_weights, policy.mlp_weights) = (counts, counts);
        policy.embeddings = Tier::Device;
        match as_run_by(ferry_core::export::Engine::Vllm, &policy, model, &profile, batch) {
            EngineRun::Priced { policy, .. } => Ok(*policy),
            EngineRun::NotModelled(what) => Err(CoreError::invalid(format!("{what} is not modelled")).into()),
        }
    };
    // At start-up vLLM needs room for one sequence of --max-model-len, its prompt
    // prefilled a chunk at a time (the activations of one chunk, the KV cache of all).
    let chunk_len = chunk.min(max_len - 1);
    let one_sequence = Workload { batch_size: 1, prompt_len: chunk_len, gen_len: max_len - chunk_len };
    let pools = pool_specs(&policy_at(1)?, model, &one_sequence, &profile);
    let fits = pools.iter().all(|p| p.resident_bytes() <= p.capacity_bytes);
    // The KV cache takes what is left; as many sequences run as it holds.
    let gen_len = args.gen_len.unwrap_or(128).clamp(1, max_len - 1);
    let prompt_len = args.prompt_len.clamp(1, max_len - gen_len);
    let kv_per_token = model.kv_bytes_per_token_per_layer(kv_dtype) * model.num_layers;
    // vLLM sizes the KV cache after a profiling run that includes an offloaded layer's
    // weights in flight; the engine's transient buffers beyond that are found by
    // simulating, halving the batch while it runs out.
    let in_flight = if offloaded > 0 { per_layer_bytes(model, &formats) } else { 0 };
    let kv_tokens = kv_capacity_tokens(&pools[0], kv_per_token, in_flight);
    let fitting = (kv_tokens / (prompt_len + gen_len)).clamp(1, max_num_seqs);
    // Running, vLLM prefills at most one chunk per step; Ferry's simulation prefills
    // the batch's prompts in one pass per layer. The activations beyond one chunk's,
    // which vLLM never holds, are given to the simulation as room of its own.
    let chunk_pools = |batch: u64| -> Result<(Profile, Policy)> {
        let policy = policy_at(batch)?;
        let speed = Workload { batch_size: batch, prompt_len, gen_len };
        let whole = activation_bytes(&pool_specs(&policy, model, &speed, &profile)[0]);
        let chunk_tokens = (batch * prompt_len).min(chunk);
        let one_chunk = Workload { batch_size: 1, prompt_len: chunk_tokens, gen_len };
        let chunked = activation_bytes(&pool_specs(&policy_at(1)?, model, &one_chunk, &profile)[0]);
        Ok((with_room(&profile, whole.saturating_sub(chunked)), policy))
    };
    let run_at = |batch: u64| -> Result<Result<ferry_sim::Prediction, ferry_sim::SimError>> {
        let (room, policy) = chunk_pools(batch)?;
        let speed = Workload { batch_size: batch, prompt_len, gen_len };
        Ok(predict(&policy, model, &speed, &room, Extrapolation::Full))
    };
    let (batch, predicted) = if fits {
        let (batch, run) = largest_running_batch(fitting, run_at)?;
        (batch, Some(run))
    } else {
        (fitting, None)
    };
    let speed = Workload { batch_size: batch, prompt_len, gen_len };
    let interval = match &predicted {
        Some(Ok(p)) => {
            let ((room, policy), tokens_per_s) = (chunk_pools(batch)?, p.metrics.tokens_per_s);
            ferry_sim::interval_of_prediction(None, &policy, model, &speed, &room, Extrapolation::Full, tokens_per_s)?
        }
        _ => None,
    };
    let request = TuneRequest {
        model,
        profile: &profile,
        prompt_len,
        gen_len,
        batch: BatchChoice::Fixed(batch),
        objective: Objective::Throughput,
        weight_format: formats.clone(),
        kv_dtype,
        speculation: None,
    };
    let ferry_plan = tune(&request, &KnobSpace::full()).ok().map(|r| r.best);
    let outcome = Outcome {
        command,
        model,
        profile: &profile,
        offloaded,
        usable,
        max_len,
        max_num_seqs,
        pools,
        kv_tokens,
        fitting,
        batch,
        speed,
        predicted,
        interval,
        ferry_plan: ferry_plan.map(|c| c.metrics.tokens_per_s),
    };
    let ok = outcome.predicted.as_ref().is_some_and(|p| p.is_ok());
    if args.json {
        outcome.print_json()?;
    } else {
        outcome.print_human();
    }
    Ok(if ok { 0 } else { 1 })
}

/// What the check found, for printing.
struct Outcome<'a> {
    command: &'a VllmArgs,
    model: &'a ModelSpec,
    profile: &'a Profile,
    offloaded: u64,
    usable: u64,
    max_len: u64,
    max_num_seqs: u64,
    /// Memory at start-up, with one `max_len` sequence's KV cache.
    pools: Vec<PoolSpec>,
    kv_tokens: u64,
    /// Sequences the KV cache holds (up to `max_num_seqs`), and those that run.
    fitting: u64,
    batch: u64,
    speed: Workload,
    predicted: Option<Result<ferry_sim::Prediction, ferry_sim::SimError>>,
    /// The prediction's interval (`ferry_sim::interval_of_prediction`), where the profile gives one.
    interval: Option<ferry_sim::Interval>,
    ferry_plan: Option<f64>,
}

impl Outcome<'_> {
    fn print_json(&self) -> Result<()> {
        let out = serde_json::json!({
            "program": "vllm serve",
            "model": self.model.name,
            "device": self.profile.device_name,
            "offloaded_layers": self.offloaded,
            "usable_device_bytes": self.usable,
            "memory": memory_json(&self.pools),
            "runs": matches!(self.predicted, Some(Ok(_))),
            "kv_cache_tokens": self.kv_tokens,
            "sequences": self.batch,
            "workload": serde_json::to_value(self.speed)?,
            "predicted": match &self.predicted {
                Some(Ok(p)) => serde_json::to_value(&p.metrics)?,
                Some(Err(e)) => serde_json::json!({"error": e.to_string()}),
                None => serde_json::Value::Null,
            },
            "predicted_tokens_per_s_interval": self.interval.map(|i| [i.slow_tokens_per_s, i.fast_tokens_per_s]),
            "ferry_plan_tokens_per_s": self.ferry_plan,
            "ignored": self.command.ignored,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        Ok(())
    }

    fn print_human(&self) {
        let (model, command) = (self.model, self.command);
        println!("vllm serve on {}: {} ({} layers)", self.profile.device_name, model.name, model.num_layers);
        println!(
            "--cpu-offload-gb {}: {} of {} layers' weights in pinned host RAM, copied in as each layer runs; \
             {} of the GPU's memory usable (--gpu-memory-utilization {})",
            command.cpu_offload_gib,
            self.offloaded,
            model.num_layers,
            format_bytes(self.usable),
            command.gpu_memory_utilization
        );
        println!("memory at start-up, with the KV cache of one {}-token sequence:\n", self.max_len);
        print!("{}", memory_table(&self.pools));
        let Workload { prompt_len, gen_len, .. } = self.speed;
        match &self.predicted {
            None => println!("\nverdict: vLLM refuses to start: one --max-model-len sequence does not fit"),
            Some(Err(error)) => println!("\nverdict: runs out of memory while running: {error}"),
            Some(Ok(p)) => println!(
                "\nthe KV cache holds {} tokens: {} sequence(s) of prompt {prompt_len} + {gen_len} run at once \
                 (--max-num-seqs {}{})\npredicted: {:.2} tokens/s{} over the batch",
                self.kv_tokens,
                self.batch,
                self.max_num_seqs,
                if self.batch < self.fitting { "; more would leave no room for the weights in flight" } else { "" },
                p.metrics.tokens_per_s,
                crate::report::interval_text(self.interval.as_ref())
            ),
        }
        if let Some(basis) = self.interval.and(ferry_sim::interval_basis(self.profile)) {
            println!("{basis}");
        }
        if let (Some(ferry), Some(Ok(p))) = (self.ferry_plan, &self.predicted) {
            println!(
                "Ferry's plan for its own engine at this budget and batch: {ferry:.2} tokens/s ({:.2}× vLLM's)",
                ferry / p.metrics.tokens_per_s
            );
        }
        println!("{}", crate::report::provenance_line(self.profile));
        if !command.ignored.is_empty() {
            println!("ignored (no effect on memory or placement in Ferry's model): {}", command.ignored.join(", "));
        }
    }
}

/// `--max-model-len` or the model's positions; more than those, or a device sharing
/// the host's memory, is refused.
fn max_model_len(command: &VllmArgs, model: &ModelSpec, profile: &Profile) -> Result<u64> {
    if profile.unified_memory {
        return Err(CoreError::invalid("vLLM's CPU backend is not modelled; check a GPU (--gpu)").into());
    }
    let positions = model.max_position_embeddings;
    let max_len = command.max_model_len.unwrap_or(positions);
    if max_len > positions {
        return Err(CoreError::invalid(format!(
            "--max-model-len {max_len} exceeds the {positions} positions {} has; vLLM refuses it",
            model.name
        ))
        .into());
    }
    Ok(max_len)
}

/// The profile with the device's pool at `utilization` of its memory (the profile's
/// reserve stays the host's), and those bytes.
fn gpu_share(profile: &Profile, utilization: f64) -> (Profile, u64) {
    let mut profile = profile.clone();
    let usable = (profile.device_memory_bytes as f64 * utilization) as u64;
    profile.device_memory_bytes = (usable as f64 / (1.0 - profile.device(0).memory_reserve_fraction)) as u64;
    (profile, usable)
}

/// A pool's activations: the hidden states and the workspace.
fn activation_bytes(pool: &PoolSpec) -> u64 {
    pool.resident
        .iter()
        .filter(|(what, _)| what == "hidden states" || what == "workspace")
        .map(|(_, bytes)| bytes)
        .sum()
}

/// `profile` with `bytes` more device memory in its pool.
fn with_room(profile: &Profile, bytes: u64) -> Profile {
    let mut profile = profile.clone();
    let reserve = profile.device(0).memory_reserve_fraction;
    profile.device_memory_bytes += (bytes as f64 / (1.0 - reserve)).ceil() as u64;
    profile
}

/// The largest batch up to `fitting` whose run does not run out of memory, halving
/// from `fitting` (down to one sequence, whose outcome is returned either way).
fn largest_running_batch(
    fitting: u64,
    run_at: impl Fn(u64) -> Result<Result<ferry_sim::Prediction, ferry_sim::SimError>>,
) -> Result<(u64, Result<ferry_sim::Prediction, ferry_sim::SimError>)> {
    let mut batch = fitting;
    loop {
        let run = run_at(batch)?;
        if batch == 1 || !matches!(run, Err(ferry_sim::SimError::Deadlock { .. })) {
            return Ok((batch, run));
        }
        batch /= 2;
    }
}

/// Whole layers standing for `gib` of offloaded weights (vLLM offloads parameter by
/// parameter until the amount is reached, so it rounds up), and the note saying so.
fn offloaded_layers(model: &ModelSpec, formats: &ferry_core::model::WeightFormats, gib: f64) -> (u64, String) {
    let layers = model.num_layers;
    let per_layer = per_layer_bytes(model, formats);
    let bytes = (gib * GIB as f64) as u64;
    let offloaded = bytes.div_ceil(per_layer.max(1)).min(layers);
    let note = format!(
        "--cpu-offload-gb {gib} priced as {offloaded} whole layers of {} (vLLM offloads parameter by parameter)",
        format_bytes(per_layer)
    );
    (offloaded, note)
}

/// A layer's weights (attention and MLP), the mean over the layers.
fn per_layer_bytes(model: &ModelSpec, formats: &ferry_core::model::WeightFormats) -> u64 {
    let layout = WeightLayout::of(model, formats);
    let layers = model.num_layers;
    let total: u64 =
        (0..layers).map(|l| layout.bytes(WeightGroup::Attention, l) + layout.bytes(WeightGroup::Mlp, l)).sum();
    total / layers.max(1)
}

/// Tokens of KV cache the device holds beside everything else it keeps resident and
/// `in_flight` bytes of streamed weights.
fn kv_capacity_tokens(device: &PoolSpec, kv_per_token: u64, in_flight: u64) -> u64 {
    let others: u64 = device.resident.iter().filter(|(what, _)| !what.contains("KV cache")).map(|(_, b)| b).sum();
    device.capacity_bytes.saturating_sub(others + in_flight) / kv_per_token.max(1)
}
