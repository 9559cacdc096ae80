//! `ferry synth` and `ferry profile`: synthetic models, and this machine measured with
//! the engine's code paths (`ferry run` is `run_cmd`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use ferry_core::catalog::Catalog;
use ferry_core::model::{Dtype, ModelSpec};
use ferry_core::units::{format_bytes, format_ns};
use ferry_core::CoreError;
use ferry_engine::synth::{synthesize_damped, Damping};
use ferry_engine::synth_gguf::{synthesize_gguf, GgufStorage};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
#[command(after_help = "Examples:
  ferry synth --model tinyllama-1.1b --out models/tinyllama --dtype bf16
  ferry synth --model tinyllama-1.1b --format gguf --dtype q4_0 --out models/tinyllama-q4_0.gguf

A GGUF file is what llama.cpp reads: its matrices in --dtype (quantized by Ferry; matrices
whose rows are not whole 256-value blocks take llama.cpp's fallback, Q5_0 for Q4_K, Q5_1 for
Q5_K, Q8_0 for Q6_K, Q4_0 for Q3_K and Q2_K, IQ4_NL for IQ4_XS and IQ1_S … IQ3_S), norms in f32, the query and
key rows in
llama.cpp's order, and a placeholder vocabulary. The same --seed gives the same model in both formats.")]
pub struct SynthArgs {
    /// A catalog model the engine runs (`ferry list models`): Llama, Mistral, Qwen2/3 and the mixtures of experts Mixtral, Qwen2-MoE and Qwen3-MoE — tinyllama-1.1b, test-tiny, test-small, test-moe, llama-2-7b, ...
    #[arg(long)]
    model: String,
    /// safetensors: a folder with config.json and model.safetensors; gguf: one .gguf file.
    #[arg(long)]
    out: PathBuf,
    /// File format.
    #[arg(long, value_name = "safetensors|gguf", default_value = "safetensors")]
    format: String,
    /// Weight dtype [default: the catalog model's dtype (test-tiny: f32), bf16 for int types;
    /// gguf: f16, or f32 for f32 models]. gguf also takes q8_0, q4_0, q5_0, q4_1, q5_1, q4_k,
    /// q5_k, q6_k, q3_k, q2_k, iq4_nl, iq4_xs, the lattice formats iq2_xxs, iq2_xs, iq2_s, iq3_xxs,
    /// iq3_s, iq1_s and iq1_m (every matrix so; Ferry's own quantizer, without llama.cpp's importance
    /// matrix), q4_k_m (llama.cpp's mixture: Q4_K, and Q6_K for the head
    /// and some layers' value and down projections), q5_k_m (the same over Q5_K), q3_k_m
    /// (Q3_K, with Q4_K/Q5_K for the attention output, value and down projections, Q6_K
    /// head) and iq4_xs_m (what llama.cpp writes for IQ4_XS: Q5_K for some value and down
    /// projections, Q6_K head).
    #[arg(
        long,
        value_name = "bf16|f16|f32|q8_0|q4_0|q5_0|q4_1|q5_1|q4_k|q5_k|q6_k|q3_k|q2_k|iq4_nl|iq4_xs|iq2_xxs|iq2_xs|iq2_s|iq3_xxs|iq3_s|iq1_s|iq1_m|q4_k_m|q5_k_m|q3_k_m|iq4_xs_m"
    )]
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

/// The ggml block format named `text` (`q4_0`), if the engine multiplies it.
fn block_format(text: &str) -> Option<ferry_engine::kernels::quant::BlockFormat> {
    let all = ferry_engine::kernels::quant::BlockFormat::ALL;
    all.into_iter().find(|f| f.name().eq_ignore_ascii_case(text))
}

/// The kernel table's weights for `model`: a GGUF file's block formats that the
/// engine multiplies, over its layers and head, the one holding most bytes first (a
/// Q4_K_M file: Q4_K, then Q6_K); else its float dtype (bf16 for others).
fn table_weights(model: &ferry_core::model::ModelSpec) -> ferry_profiler::TableWeights {
    use ferry_core::model::WeightGroup;
    let mut formats: Vec<(ferry_engine::kernels::quant::BlockFormat, u64)> = Vec::new();
    if let Some(layout) = &model.stored {
        let layers = (0..model.num_layers).flat_map(|l| [WeightGroup::Attention, WeightGroup::Mlp].map(|g| (g, l)));
        for (group, layer) in layers.chain([(WeightGroup::Head, 0)]) {
            for (format, bytes) in &layout.group(group, layer).quantized {
                let Some(format) = block_format(&format.name()) else { continue };
                match formats.iter_mut().find(|(f, _)| *f == format) {
                    Some((_, total)) => *total += bytes,
                    None => formats.push((format, *bytes)),
                }
            }
        }
    }
    formats.sort_by_key(|&(_, bytes)| std::cmp::Reverse(bytes));
    match formats.is_empty() {
        false => ferry_profiler::TableWeights::Blocks(formats.into_iter().map(|(f, _)| f).collect()),
        true if matches!(model.dtype, Dtype::F32 | Dtype::F16 | Dtype::Bf16) => {
            ferry_profiler::TableWeights::Float(model.dtype)
        }
        true => ferry_profiler::TableWeights::Float(Dtype::Bf16),
    }
}

fn parse_dtype(text: &str) -> Result<Dtype> {
    match text {
        "bf16" => Ok(Dtype::Bf16),
        "f16" => Ok(Dtype::F16),
        "f32" => Ok(Dtype::F32),
        other if block_format(other).is_some() => Err(CoreError::invalid(format!(
            "dtype '{other}' is a GGUF block format: a safetensors folder holds bf16, f16 or f32; add --format gguf"
        ))
        .into()),
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
#[command(after_help = "Examples:
  ferry profile --backend cpu --out profile.yaml --quick
  ferry tune --profile profile.yaml --model models/tinyllama --device-mem 512MiB
  ferry profile --backend cuda --model llama-2-7b --out rtx3060.yaml --scratch-dir /mnt/nvme

cpu measures this machine with the engine's own code paths (disk reads alone and
while compute runs, copies, the engine's kernels and per-task cost). cuda measures an
NVIDIA GPU through the driver and cuBLAS, loaded at run time: pinned and pageable
copies both ways and both at once, cuBLAS's peak, the engine's own tasks at the
model's shape on the GPU and on the host (the kernel tables `ferry validate --backend
cuda` checks), disk reads into pinned memory; it says so plainly where there is no driver.")]
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
    /// Weights of the kernel table's copy of the model: a float dtype, or a ggml block
    /// format (measured as a GGUF file in it; its entries then price plans in that
    /// format) [default: the model's: a GGUF file's main block format, else its float
    /// dtype]
    #[arg(
        long,
        value_name = "bf16|f16|f32|q8_0|q4_0|q5_0|q4_1|q5_1|q4_k|q5_k|q6_k|q3_k|q2_k|iq4_nl|iq4_xs|iq2_xxs|iq2_xs|iq2_s|iq3_xxs|iq3_s|iq1_s|iq1_m"
    )]
    dtype: Option<String>,
    /// Also measure the rate at which the model (--model: its folder or GGUF file, with
    /// real weights) accepts this draft's tokens, `self:L` or a draft model's folder:
    /// greedy speculative decoding of random prompts on this machine's engine. Written
    /// into the profile; `ferry tune --draft` predicts with it.
    #[arg(long, value_name = "self:L|DIR", requires = "model")]
    draft: Option<String>,
    /// Draft tokens per round the acceptance is measured at.
    #[arg(long, value_name = "K", default_value_t = 4, requires = "draft")]
    draft_len: u32,
    /// Describe this machine as N identical nodes joined by the network link measured
    /// between this process and a stage worker (latency and one-way rate at the sizes
    /// stages send): a plan over several machines is then tuned, run and validated
    /// here, the link shaped with `tc` to an edge network's rate.
    #[arg(long, value_name = "N")]
    as_nodes: Option<u16>,
    /// With --as-nodes: the stage worker to measure the link to (`ferry stage-worker`
    /// on another machine) [default: one started here, over loopback].
    #[arg(long, value_name = "HOST:PORT", requires = "as_nodes")]
    link_to: Option<String>,
    /// Overwrite the output file.
    #[arg(long)]
    force: bool,
}

/// `ferry profile`'s `--scratch-dir` must exist: the disk it is on is the one measured,
/// so a mistyped path must not quietly put the scratch file on another disk.
pub(crate) fn existing_scratch_dir(dir: &std::path::Path, what: &str) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let problem = if dir.exists() { "is not a folder" } else { "does not exist" };
    Err(CoreError::invalid(format!(
        "--scratch-dir {} {problem}; {what} goes there, so create the folder on the disk you offload to",
        dir.display()
    ))
    .into())
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
    existing_scratch_dir(&scratch, "the scratch file whose disk is measured")?;
    let mut options = if args.quick {
        ferry_profiler::ProfileOptions::quick(scratch)
    } else {
        ferry_profiler::ProfileOptions::full(scratch)
    };
    if let Some(name) = &args.model {
        let model = Catalog::builtin()?.model(name)?.value;
        ferry_engine::synth::check_supported(&model)?;
        let weights = match args.dtype.as_deref() {
            Some(text) => match block_format(text) {
                Some(format) => ferry_profiler::TableWeights::Blocks(vec![format]),
                None => ferry_profiler::TableWeights::Float(parse_dtype(text).map_err(|_| {
                    CoreError::invalid(format!(
                        "--dtype {text}: use bf16, f16, f32 or {}",
                        ferry_engine::kernels::quant::BlockFormat::listed(true).replace(" and ", " or ")
                    ))
                })?),
            },
            None => table_weights(&model),
        };
        options.kernel_model = Some((model, weights));
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
    let mut profile = profile;
    if let Some(draft) = &args.draft {
        let measured = measure_acceptance(&args, draft, &profile, &options.scratch_dir)?;
        println!(
            "  acceptance: {} accepted {}'s tokens at α = {:.3} ({} judged, {} per round; measured)",
            measured.target, measured.draft, measured.acceptance_rate, measured.judged, measured.draft_len
        );
        profile.acceptance.push(measured);
    }
    let profile = match args.as_nodes {
        Some(nodes) => {
            let link = crate::stages_cmd::measure_link(args.link_to.as_deref(), args.quick)?;
            println!(
                "  network link: {} one way, {:.3} GB/s at 1 MiB (measured)",
                format_ns(link.latency_ns),
                link.bytes_per_ns(1 << 20, 1)
            );
            profile.as_nodes(nodes, &link, ferry_core::topology::LinkKind::Ethernet)?
        }
        None => profile,
    };
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
    let compute = &profile.device_compute;
    println!(
        "  matrix products: {:.0} GFLOP/s peak; bf16 weights stream through one-row products at {:.1} GB/s{}",
        compute.peak_flops / 1e9,
        compute.memory_bytes_per_s * compute.memory_efficiency / 1e9,
        if profile.unified_memory {
            format!(
                ", {:.0} % of the memory's read rate ({:.1} GB/s)",
                compute.memory_efficiency * 100.0,
                compute.memory_bytes_per_s / 1e9
            )
        } else {
            String::new()
        }
    );
    if let Some(under_compute) = &profile.interference.disk_read_under_compute {
        println!("  disk read while compute runs: up to {:.2} GB/s", best(under_compute));
    }
    println!(
        "  {} slows by {:.0} % while a {} runs",
        if profile.unified_memory { "a decoding step's compute" } else { "compute" },
        profile.interference.device_compute_slowdown * 100.0,
        if profile.unified_memory { "read" } else { "copy" }
    );
    if profile.interference.copy_duplex_slowdown > 0.0 {
        println!(
            "  copies in both directions at once run {:.0} % slower each",
            profile.interference.copy_duplex_slowdown * 100.0
        );
    }
    println!(
        "  engine compute task overhead {}, hand-over to the next task {}",
        format_ns(profile.device_compute.task_overhead_ns),
        format_ns(profile.device_compute.handoff_ns)
    );
    let describe = |rates: ferry_core::profile::ProductRates| match rates.product_flops_per_s {
        Some(flops) => format!("{:.1} GB/s, products {:.1} GFLOP/s", rates.bytes_per_s / 1e9, flops / 1e9),
        None => format!("{:.1} GB/s", rates.bytes_per_s / 1e9),
    };
    let rates: Vec<String> = (profile.host_compute.dequantize.iter())
        .map(|r| match r.row_order {
            Some(rows) => {
                format!("{} {} (in the file's row order {})", r.format, describe(r.rates(false)), describe(rows))
            }
            None => format!("{} {}", r.format, describe(r.rates(false))),
        })
        .collect();
    if !rates.is_empty() {
        println!(
            "  quantized weights (host: decoding, of quantized bytes; products over many rows): {}",
            rates.join("; ")
        );
    }
    if !profile.device_compute.table.is_empty() {
        let table = &profile.device_compute.table;
        let mut formats: Vec<&str> = Vec::new();
        for format in table.iter().filter_map(|e| e.format.as_deref()) {
            if !formats.contains(&format) {
                formats.push(format);
            }
        }
        let weights = match formats.as_slice() {
            [] => "float weights".to_string(),
            [format] => format!("{format} weights (prices plans in {format})"),
            _ => format!(
                "{} weights, one copy each (prices plans in them, and their mixtures by each one's share)",
                formats.join(", ")
            ),
        };
        println!("  kernel table: {} entries at the model's shape, over {weights}", table.len());
    }
    // A GPU's profile also times the engine's tasks on the host CPU (host attention,
    // host layers).
    if !profile.unified_memory && !profile.host_compute.table.is_empty() {
        println!(
            "  host kernel table: {} entries (the engine's tasks on the host CPU)",
            profile.host_compute.table.len()
        );
    }
    Ok(())
}

/// `ferry profile --draft`: the target's own files and the draft's, run on this machine.
fn measure_acceptance(
    args: &ProfileArgs,
    draft: &str,
    profile: &ferry_core::profile::Profile,
    scratch: &std::path::Path,
) -> Result<ferry_core::profile::MeasuredAcceptance> {
    use ferry_core::plan::Draft;
    let model = args.model.as_deref().unwrap_or_default();
    let path = std::path::Path::new(model);
    if !path.exists() {
        return Err(CoreError::invalid(format!(
            "--draft measures the model on its own weights: give --model its folder or GGUF file, not '{model}'"
        ))
        .into());
    }
    let target = ferry_engine::weights::ModelFiles::open(path)?;
    let (kind, draft_path, name) = match draft.strip_prefix("self:") {
        Some(layers) => {
            let layers = layers.trim().parse::<u64>().map_err(|_| {
                CoreError::invalid(format!("--draft {draft}: give self:L, the model's first L layers (e.g. self:1)"))
            })?;
            (Draft::SelfLayers { layers }, None, format!("self:{layers}"))
        }
        None => {
            let draft_path = std::path::Path::new(draft);
            let spec = ferry_engine::weights::ModelFiles::open(draft_path)
                .map_err(|e| anyhow::Error::from(e).context(format!("--draft {draft}: self:L or a draft's folder")))?
                .spec;
            (Draft::Model, Some(draft_path), spec.name)
        }
    };
    eprintln!("measuring how often {} accepts {name}'s tokens ...", target.spec.name);
    let run = ferry_profiler::acceptance::AcceptanceRun::new(args.quick, args.draft_len);
    Ok(ferry_profiler::acceptance::measure_acceptance(&target, kind, draft_path, &name, profile, run, scratch)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::model::{WeightFormat, WeightFormats, WeightLayout};
    use ferry_engine::kernels::quant::BlockFormat;
    use ferry_profiler::TableWeights;

    fn stored(model: &mut ferry_core::model::ModelSpec, format: &str) {
        let formats = WeightFormats::uniform(WeightFormat::parse(format).unwrap());
        model.stored = Some(std::sync::Arc::new(WeightLayout::of(model, &formats)));
    }

    #[test]
    fn the_kernel_table_takes_a_gguf_files_block_format_and_a_float_models_dtype() {
        let catalog = Catalog::builtin().unwrap();
        let mut model = catalog.model("test-tiny").unwrap().value;
        assert_eq!(table_weights(&model), TableWeights::Float(model.dtype));
        stored(&mut model, "q4_0");
        assert_eq!(table_weights(&model), TableWeights::Blocks(vec![BlockFormat::Q4_0]));
        // A mixture (the head in Q6_K, as Q4_K_M files have it): every format, the one
        // with most bytes first; the embeddings' format only where a product uses it.
        // (test-small: test-tiny's 352 columns would take K-quants' fallback formats)
        let mut model = catalog.model("test-small").unwrap().value;
        let mut formats = WeightFormats::uniform(WeightFormat::parse("q4_k").unwrap());
        formats.overrides.insert(ferry_core::model::WeightGroup::Head, WeightFormat::parse("q6_k").unwrap());
        formats.overrides.insert(ferry_core::model::WeightGroup::Embeddings, WeightFormat::parse("q8_0").unwrap());
        model.stored = Some(std::sync::Arc::new(WeightLayout::of(&model, &formats)));
        assert_eq!(table_weights(&model), TableWeights::Blocks(vec![BlockFormat::Q4K, BlockFormat::Q6K]));
        // A format the engine does not multiply: the float dtype, as before.
        stored(&mut model, "int4-g64");
        assert_eq!(table_weights(&model), TableWeights::Float(model.dtype));
        assert_eq!(block_format("Q6_K"), Some(BlockFormat::Q6K));
        assert_eq!(block_format("q5_k"), Some(BlockFormat::Q5K));
        assert_eq!(block_format("q3_k"), Some(BlockFormat::Q3K));
        assert_eq!(block_format("iq4_nl"), Some(BlockFormat::IQ4NL));
        assert_eq!(block_format("iq3_s"), Some(BlockFormat::IQ3S));
        assert_eq!(block_format("tq2_0"), None);
    }
}
