//! The kernel table: the engine's compute tasks timed at a model's shape through the
//! real executor, alone and while the read pool streams, and the engine's fixed
//! per-task overhead.

use super::*;

/// The kernel table and how much the same tasks slow while the disk is read.
pub(crate) struct KernelTable {
    pub(crate) entries: Vec<ferry_core::profile::KernelTiming>,
    /// Σ task time with reads running ÷ Σ task time alone − 1, over the same tasks.
    pub(crate) slowdown_during_reads: f64,
}

/// Layers in the copy of a model the kernel table is measured on: enough that the
/// median over layers is a layer in the middle of a step (the first layer after the
/// embedding or a gap runs 5–40 % slower: threads wake, caches are cold), few enough
/// that the copy stays near 1 GiB.
pub(crate) fn kernel_table_layers(model: &ferry_core::model::ModelSpec, dtype: Dtype) -> u64 {
    (GIB_BYTES / model.layer_bytes(dtype).max(1)).clamp(3, 4)
}

/// The engine's compute tasks timed at a model's shape: a few-layer copy of the model
/// (same hidden size, MLP, heads and vocabulary) runs fully resident through the real
/// executor at each micro-batch size; every compute task's measured duration is filed
/// under (operation, shape, rows, context), and the median over layers and runs is kept. Each
/// run is repeated while the read pool streams the scratch file, for the slowdown.
pub(crate) fn measure_kernel_table(
    options: &ProfileOptions,
    model: &ferry_core::model::ModelSpec,
    dtype: Dtype,
    disk: &Arc<DiskFile>,
    progress: &mut impl FnMut(&str, f64),
) -> Result<KernelTable, ProfileError> {
    use ferry_core::graph::Payload;
    use ferry_core::plan::{Policy, Workload};
    let catalog = ferry_core::catalog::Catalog::builtin()?;
    let mut spec = model.clone();
    spec.num_layers = kernel_table_layers(model, dtype);
    spec.name = format!("{}-{}-layers", model.name, spec.num_layers);
    let dir = options.scratch_dir.join(format!("ferry-profile-shape-{}", std::process::id()));
    let _cleanup = RemoveDirOnDrop(dir.clone());
    progress("kernel table: synthesizing the shape", 0.0);
    ferry_engine::synth::synthesize(&spec, dtype, 3, &dir, true, |_, _| {})?;
    let files = ferry_engine::weights::ModelFiles::open(&dir)?;
    let shape = format!("{}x{}", spec.hidden_size, spec.intermediate_size);
    type Samples = std::collections::BTreeMap<(String, u64, u64), Vec<f64>>;
    let (mut samples, mut contended): (Samples, Samples) = Default::default();
    let gen_len = 6;
    for (i, &batch) in options.kernel_batches.iter().enumerate() {
        let layers = spec.num_layers;
        let policy = Policy::all_on_device(layers, batch, dtype);
        let workload = Workload { batch_size: batch, prompt_len: options.kernel_prompt_len, gen_len };
        let mut profile = Profile::from_datasheet(&ferry_core::hardware::Hardware {
            gpu: catalog.gpu("cpu")?.value,
            host: catalog.host("ferry-ci-vm")?.value,
        });
        profile.device_memory_bytes = 1 << 40;
        let graph =
            ferry_core::schedule::lower(&policy, &spec, &workload, &profile, &ferry_core::schedule::Steps::All)?;
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|s| (0..options.kernel_prompt_len).map(|t| ((s * 31 + t * 7) % spec.vocab_size) as u32).collect())
            .collect();
        // The slowdown is one figure: measured at the smallest batch (and, in a full
        // profile, every fourth one too), which keeps --quick under a minute.
        let mut passes = vec![false; options.kernel_runs.max(1)];
        if i == 0 || (options.kernel_runs > 2 && i % 4 == 0) {
            passes.push(true);
        }
        for reads in passes {
            let into = if reads { &mut contended } else { &mut samples };
            let run_options = ferry_engine::RunOptions {
                prompts: prompts.clone(),
                scratch_dir: dir.clone(),
                allow_buffered_io: true,
                keep_logits: false,
                progress: None,
                draft_files: None,
            };
            let _load = reads.then(|| Background::reads(disk, options.scratch_bytes));
            let report = ferry_engine::run(
                &graph,
                &policy,
                &workload,
                &files,
                &ferry_engine::backend::CpuBackend::default(),
                &run_options,
            )?;
            for span in &report.trace.spans {
                let task = &graph.tasks[span.task as usize];
                if let Payload::Compute { op, .. } = task.payload {
                    let key = (op.name().to_string(), task.tokens as u64, task.context as u64);
                    into.entry(key).or_default().push((span.end_ns - span.start_ns) as f64);
                }
            }
        }
        progress("kernel table", (i + 1) as f64 / options.kernel_batches.len() as f64);
    }
    let median = |durations: &[f64]| median_spread(durations).0;
    let (mut alone_ns, mut with_reads_ns) = (0.0, 0.0);
    for (key, durations) in &samples {
        if let Some(slowed) = contended.get(key) {
            alone_ns += median(durations);
            with_reads_ns += median(slowed);
        }
    }
    let entries = samples
        .into_iter()
        .map(|((op, tokens, context), durations)| ferry_core::profile::KernelTiming {
            op,
            shape: shape.clone(),
            tokens,
            context,
            ns: median(&durations) as u64,
        })
        .collect();
    let slowdown_during_reads = if alone_ns > 0.0 { (with_reads_ns / alone_ns - 1.0).max(0.0) } else { 0.0 };
    Ok(KernelTable { entries, slowdown_during_reads })
}

/// The fixed cost of one compute task in the engine (hand-off to a worker, locks,
/// buffer set-up, one parallel dispatch per projection): runs a tiny synthetic model,
/// fully resident, through the real executor and takes the median over compute tasks
/// of (measured duration − roofline time at the measured rates).
pub(crate) fn measure_task_overhead(scratch: &Path, peak_flops: f64, bytes_per_s: f64) -> Result<u64, ProfileError> {
    use ferry_core::plan::{Policy, Workload};
    let catalog = ferry_core::catalog::Catalog::builtin()?;
    let spec = catalog.model("test-tiny")?.value;
    let dir = scratch.join(format!("ferry-profile-model-{}", std::process::id()));
    let _cleanup = RemoveDirOnDrop(dir.clone());
    ferry_engine::synth::synthesize(&spec, Dtype::Bf16, 1, &dir, true, |_, _| {})?;
    let files = ferry_engine::weights::ModelFiles::open(&dir)?;
    let layers = spec.num_layers;
    let policy = Policy::all_on_device(layers, 2, Dtype::Bf16);
    let workload = Workload { batch_size: 2, prompt_len: 8, gen_len: 16 };
    let mut profile = Profile::from_datasheet(&ferry_core::hardware::Hardware {
        gpu: catalog.gpu("cpu")?.value,
        host: catalog.host("ferry-ci-vm")?.value,
    });
    profile.device_memory_bytes = 64 * MIB;
    let graph = ferry_core::schedule::lower(&policy, &spec, &workload, &profile, &ferry_core::schedule::Steps::All)?;
    let options = ferry_engine::RunOptions {
        prompts: vec![vec![1; 8], vec![2; 8]],
        scratch_dir: dir.clone(),
        allow_buffered_io: true,
        keep_logits: false,
        progress: None,
        draft_files: None,
    };
    let report =
        ferry_engine::run(&graph, &policy, &workload, &files, &ferry_engine::backend::CpuBackend::default(), &options)?;
    let mut excess: Vec<f64> = Vec::new();
    for span in &report.trace.spans {
        let task = &graph.tasks[span.task as usize];
        if task.resource() != ferry_core::graph::Resource::DEVICE_COMPUTE || task.step == 0 {
            continue;
        }
        let roofline_ns = (task.flops as f64 / peak_flops).max(task.bytes as f64 / bytes_per_s) * 1e9;
        excess.push(((span.end_ns - span.start_ns) as f64 - roofline_ns).max(0.0));
    }
    Ok(median_spread(&excess).0 as u64)
}

struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
