//! The kernel table: the engine's compute tasks timed at a model's shape through the
//! real executor, alone and while the read pool streams, and the engine's fixed
//! per-task overhead. A model stored in a ggml block format is measured in that
//! format (a GGUF copy of its shape), so its products are timed as runs make them,
//! 8-bit activations and all; its entries carry the format, and price only plans that
//! store their weights so.

use super::*;

mod slowdown;

/// The kernel table and how much the same tasks slow while the disk is read.
pub(crate) struct KernelTable {
    pub(crate) entries: Vec<ferry_core::profile::KernelTiming>,
    /// How much slower a decoding step's compute runs beside reads
    /// (`slowdown::decoding_slowdown`).
    pub(crate) slowdown_during_reads: f64,
}

/// Layers in the copy of a model the kernel table is measured on: enough that the
/// median over layers is a layer in the middle of a step (the first layer after the
/// embedding or a gap runs 5–40 % slower: threads wake, caches are cold), few enough
/// that the copy stays near 1 GiB.
pub(crate) fn kernel_table_layers(model: &ferry_core::model::ModelSpec, dtype: Dtype) -> u64 {
    (GIB_BYTES / model.layer_bytes(dtype).max(1)).clamp(3, 4)
}

/// One run of the kernel table's model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Untimed: threads wake, pages fault, caches fill.
    Warmup,
    Alone,
    /// Beside the read pool streaming the scratch file.
    Reads,
}

/// What one copy of the model stores its weights as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyWeights {
    Float(Dtype),
    Blocks(kernels::quant::BlockFormat),
}

/// Writes the few-layer copy `spec` in `weights` under `dir`; returns the path to open
/// and the block format its entries are filed under (`None`: float weights).
fn synthesize_copy(
    spec: &ferry_core::model::ModelSpec,
    weights: CopyWeights,
    dir: &Path,
) -> Result<(PathBuf, Option<kernels::quant::BlockFormat>), ProfileError> {
    match weights {
        CopyWeights::Float(dtype) => {
            ferry_engine::synth::synthesize(spec, dtype, 3, dir, true, |_, _| {})?;
            Ok((dir.to_path_buf(), None))
        }
        CopyWeights::Blocks(format) => {
            std::fs::create_dir_all(dir).map_err(io_error(dir))?;
            let path = dir.join(format!("{}.gguf", spec.name));
            let storage = ferry_engine::synth_gguf::GgufStorage::Blocks(format);
            ferry_engine::synth_gguf::synthesize_gguf(spec, storage, 3, &path, true, |_, _| {})?;
            Ok((path, Some(format)))
        }
    }
}

/// The engine's compute tasks timed at a model's shape: a few-layer copy of the model
/// (same hidden size, MLP, heads and vocabulary) runs fully resident through the real
/// executor at each micro-batch size; every compute task's measured duration is filed
/// under (operation, shape, format, rows, context), and the median over layers and runs
/// is kept. One copy per block format of `weights`, their runs taken in turn so that
/// every copy sees the same minutes (measured one after the other, a Q4_K_M file's Q6_K
/// entries came out 1.6× and 2.4× its Q4_K ones in two profiles of one hour), and in
/// rounds over the batch sizes for the same reason; the first copy's runs at the
/// smallest batch are repeated while the read pool streams the scratch file, for the
/// slowdown.
pub(crate) fn measure_kernel_table(
    options: &ProfileOptions,
    model: &ferry_core::model::ModelSpec,
    weights: &TableWeights,
    disk: &Arc<DiskFile>,
    backend: &dyn ferry_engine::backend::Backend,
    progress: &mut impl FnMut(&str, f64),
) -> Result<KernelTable, ProfileError> {
    let kinds: Vec<CopyWeights> = match weights {
        TableWeights::Float(dtype) => vec![CopyWeights::Float(*dtype)],
        TableWeights::Blocks(formats) => formats.iter().map(|&f| CopyWeights::Blocks(f)).collect(),
    };
    let mut spec = model.clone();
    spec.num_layers = kernel_table_layers(model, Dtype::Bf16);
    spec.name = format!("{}-{}-layers", model.name, spec.num_layers);
    spec.stored = None;
    let dir = options.scratch_dir.join(format!("ferry-profile-shape-{}", std::process::id()));
    let _cleanup = RemoveDirOnDrop(dir.clone());
    progress("kernel table: synthesizing the shape", 0.0);
    let mut copies = Vec::with_capacity(kinds.len());
    for (c, &kind) in kinds.iter().enumerate() {
        copies.push(TableCopy::synthesize(&spec, kind, &dir.join(c.to_string()))?);
    }
    let shape = format!("{}x{}", spec.hidden_size, spec.intermediate_size);
    let catalog = ferry_core::catalog::Catalog::builtin()?;
    let mut lowering = Profile::from_datasheet(&ferry_core::hardware::Hardware {
        gpu: catalog.gpu("cpu")?.value,
        host: catalog.host("ferry-ci-vm")?.value,
    });
    lowering.device_memory_bytes = 1 << 40;
    let batches: Vec<BatchRuns> = options
        .kernel_batches
        .iter()
        .enumerate()
        .map(|(i, &batch)| BatchRuns::lowered(&copies, &spec, batch, i, options, &lowering))
        .collect::<Result<_, _>>()?;
    // Rounds go over every batch size, so that each entry's samples spread over the
    // whole table's minutes: measured batch after batch, an entry carried its own
    // second or two of this machine's speed (batch 2 ÷ batch 1 MLP came out 0.99–1.45
    // in six profiles' tables against 1.28–1.38 inside runs). The round before them is
    // untimed, at the batch measured beside reads: threads wake, pages fault.
    let rounds = options.kernel_runs.max(1);
    for round in 0..=rounds {
        for batch in &batches {
            let passes: &[Pass] = match (round, batch.with_reads) {
                (0, true) => &[Pass::Warmup],
                (0, false) => &[],
                // Runs alone and beside reads alternate, so neither side gets the
                // machine's drift to itself (run once each, the reads' side measured
                // 0 to 54 % in five profiles of one hour), in pairs that take turns
                // going first; the slowdown is the median over pairs.
                (_, true) => &[Pass::Alone, Pass::Reads, Pass::Reads, Pass::Alone, Pass::Alone, Pass::Reads],
                (_, false) => &[Pass::Alone],
            };
            for &pass in passes {
                batch.run(pass, &mut copies, &dir, backend, disk, options.scratch_bytes)?;
            }
        }
        if round > 0 {
            progress("kernel table", round as f64 / rounds as f64);
        }
    }
    let median = |durations: &[f64]| median_spread(durations).0;
    let slowdown_during_reads =
        copies.first().map_or(0.0, |first| first.paired_runs.slowdown(options.kernel_prompt_len, model.num_layers));
    let entries = copies
        .into_iter()
        .flat_map(|copy| copy.samples)
        .map(|((op, format, tokens, context), durations)| ferry_core::profile::KernelTiming {
            op,
            shape: shape.clone(),
            tokens,
            context,
            ns: median(&durations) as u64,
            format,
        })
        .collect();
    Ok(KernelTable { entries, slowdown_during_reads })
}

/// One batch size of the kernel table: every copy's all-resident run at it.
struct BatchRuns {
    workload: ferry_core::plan::Workload,
    /// Per copy, its plan and lowered graph.
    runs: Vec<(ferry_core::plan::Policy, ferry_core::graph::TaskGraph)>,
    prompts: Vec<Vec<u32>>,
    /// Whether its runs alternate with runs beside reads, for the slowdown: one figure,
    /// measured at the smallest batch (and, in a full profile, every fourth one too),
    /// which keeps --quick under a minute.
    with_reads: bool,
}

impl BatchRuns {
    fn lowered(
        copies: &[TableCopy],
        spec: &ferry_core::model::ModelSpec,
        batch: u64,
        index: usize,
        options: &ProfileOptions,
        lowering: &Profile,
    ) -> Result<Self, ProfileError> {
        let workload =
            ferry_core::plan::Workload { batch_size: batch, prompt_len: options.kernel_prompt_len, gen_len: GEN_LEN };
        let runs = copies.iter().map(|copy| copy.lowered(&workload, lowering)).collect::<Result<_, _>>()?;
        let prompts = (0..batch)
            .map(|s| (0..options.kernel_prompt_len).map(|t| ((s * 31 + t * 7) % spec.vocab_size) as u32).collect())
            .collect();
        let with_reads = index == 0 || (options.kernel_runs > 2 && index.is_multiple_of(4));
        Ok(BatchRuns { workload, runs, prompts, with_reads })
    }

    /// One `pass` of every copy (beside reads, only the first copy's: the slowdown is
    /// measured on it).
    fn run(
        &self,
        pass: Pass,
        copies: &mut [TableCopy],
        dir: &Path,
        backend: &dyn ferry_engine::backend::Backend,
        disk: &Arc<DiskFile>,
        scratch_bytes: u64,
    ) -> Result<(), ProfileError> {
        for (c, (copy, (policy, graph))) in copies.iter_mut().zip(&self.runs).enumerate() {
            if pass == Pass::Reads && c > 0 {
                continue;
            }
            let run_options = ferry_engine::RunOptions {
                prompts: self.prompts.clone(),
                scratch_dir: dir.to_path_buf(),
                allow_buffered_io: true,
                keep_logits: false,
                progress: None,
                draft_files: None,
            };
            let _load = (pass == Pass::Reads).then(|| Background::reads(disk, scratch_bytes));
            let report = ferry_engine::run(graph, policy, &self.workload, &copy.files, backend, &run_options)?;
            let run = copy.keyed(graph, &report.trace, self.workload.prompt_len + 1);
            if self.with_reads && c == 0 && pass != Pass::Warmup {
                copy.paired_runs.push(pass == Pass::Reads, run.clone());
            }
            copy.file(pass, run);
        }
        Ok(())
    }
}

/// Decoding steps of each kernel-table run: enough that the entries are the steady
/// steps runs mostly take, not the first ones after the prefill (test-moe's attention
/// in a 32-token run: 58 µs at the first step, 43–52 after; with 6 steps a fifth of the
/// samples were first steps), and that attention's entries reach longer contexts.
const GEN_LEN: u64 = 16;

/// Durations by (operation, format, rows, context).
type Samples = std::collections::BTreeMap<(String, Option<String>, u64, u64), Vec<f64>>;

/// One copy of the model the kernel table runs, and what its runs measured.
struct TableCopy {
    files: ferry_engine::weights::ModelFiles,
    /// The block format its entries are filed under (`None`: float weights).
    block_format: Option<kernels::quant::BlockFormat>,
    /// The dtype plans of it keep activations in (and its layers are counted at).
    dtype: Dtype,
    /// Its runs alone (the entries).
    samples: Samples,
    /// The runs measured for the slowdown, alone and beside reads, in pairs.
    paired_runs: slowdown::PairedRuns,
}

impl TableCopy {
    /// Writes the few-layer copy `spec` in `weights` under `dir` and opens it.
    fn synthesize(spec: &ferry_core::model::ModelSpec, weights: CopyWeights, dir: &Path) -> Result<Self, ProfileError> {
        let (path, block_format) = synthesize_copy(spec, weights, dir)?;
        let dtype = match weights {
            CopyWeights::Float(dtype) => dtype,
            CopyWeights::Blocks(_) => Dtype::F32,
        };
        let files = ferry_engine::weights::ModelFiles::open(&path)?;
        Ok(TableCopy {
            files,
            block_format,
            dtype,
            samples: Samples::new(),
            paired_runs: slowdown::PairedRuns::default(),
        })
    }

    /// The all-resident plan of this copy at `workload`'s batch, and its graph lowered
    /// with `profile` (any one with room for it: the run does not read its rates).
    fn lowered(
        &self,
        workload: &ferry_core::plan::Workload,
        profile: &Profile,
    ) -> Result<(ferry_core::plan::Policy, ferry_core::graph::TaskGraph), ProfileError> {
        let spec = &self.files.spec;
        let mut policy = ferry_core::plan::Policy::all_on_device(spec.num_layers, workload.batch_size, self.dtype);
        policy.set_weight_format(self.files.formats.clone());
        let graph = ferry_core::schedule::lower(&policy, spec, workload, profile, &ferry_core::schedule::Steps::All)?;
        Ok((policy, graph))
    }

    /// Files a run's samples as entries: a run alone's (a warm-up's and a run beside
    /// reads' are not entries).
    fn file(&mut self, pass: Pass, run: Samples) {
        if pass == Pass::Alone {
            for (key, durations) in run {
                self.samples.entry(key).or_default().extend(durations);
            }
        }
    }

    /// A run's compute tasks' durations under their keys. Only
    /// attention reads the KV cache: every other operation's decoding steps are filed
    /// at `first_decoding_context`, one entry pooled over the run's steps. (Filed at
    /// each step's context, a Q4_K MLP entry held eight samples, and the cost model
    /// priced every longer context at the last one: 683 µs where the entries of the
    /// other contexts were 559–629 and the runs it priced measured 590.)
    fn keyed(
        &self,
        graph: &ferry_core::graph::TaskGraph,
        trace: &ferry_core::trace::Trace,
        first_decoding_context: u64,
    ) -> Samples {
        use ferry_core::graph::{Op, Payload};
        let mut samples = Samples::new();
        for span in &trace.spans {
            let task = &graph.tasks[span.task as usize];
            if let Payload::Compute { op, .. } = task.payload {
                // Only tasks that multiply by weights are filed under their format.
                let format = self.block_format.filter(|_| !matches!(op, Op::AttnCore | Op::Route));
                let reads_kv = matches!(op, Op::Attention | Op::AttnCore);
                let context = if task.step > 0 && !reads_kv { first_decoding_context } else { task.context as u64 };
                let key =
                    (op.name().to_string(), format.map(|f| f.name().to_ascii_lowercase()), task.tokens as u64, context);
                samples.entry(key).or_default().push((span.end_ns - span.start_ns) as f64);
            }
        }
        samples
    }
}

/// What one compute task costs the engine beyond its work, ns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TaskCosts {
    /// Inside the task: hand-off to a worker, locks, buffer set-up, one parallel
    /// dispatch per projection (the median of a task's duration beyond its roofline).
    pub overhead_ns: u64,
    /// Between tasks: from one compute task's end to the next one's start on the same
    /// lane, while the scheduler hears of the end and dispatches the next (the median
    /// gap in a chain where each task waits only on the one before).
    pub handoff_ns: u64,
}

/// The fixed costs of one compute task in the engine: runs a tiny synthetic model,
/// fully resident on one sequential lane, through the real executor and takes the
/// medians over decoding's compute tasks of (measured duration − roofline time at the
/// measured rates) and of the gap before the next one starts.
pub(crate) fn measure_task_overhead(
    scratch: &Path,
    peak_flops: f64,
    bytes_per_s: f64,
    backend: &dyn ferry_engine::backend::Backend,
) -> Result<TaskCosts, ProfileError> {
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
    // Three runs, the medians over all of them: a shared machine's cores change speed
    // from one second to the next (the gaps of single runs ranged 12-37 µs).
    let (mut excess, mut gaps): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let report = ferry_engine::run(&graph, &policy, &workload, &files, backend, &options)?;
        let mut compute: Vec<&ferry_core::trace::Span> = report
            .trace
            .spans
            .iter()
            .filter(|span| {
                let task = &graph.tasks[span.task as usize];
                task.resource() == ferry_core::graph::Resource::DEVICE_COMPUTE && task.step > 0
            })
            .collect();
        compute.sort_by_key(|span| span.start_ns);
        excess.extend(compute.iter().map(|span| {
            let task = &graph.tasks[span.task as usize];
            let roofline_ns = (task.flops as f64 / peak_flops).max(task.bytes as f64 / bytes_per_s) * 1e9;
            ((span.end_ns - span.start_ns) as f64 - roofline_ns).max(0.0)
        }));
        // One lane, one micro-batch, everything resident: each task waits only on the
        // one before it, so the gap between them is the hand-over alone.
        gaps.extend(
            compute
                .windows(2)
                .filter(|pair| pair[0].lane == pair[1].lane)
                .map(|pair| pair[1].start_ns.saturating_sub(pair[0].end_ns) as f64),
        );
    }
    Ok(TaskCosts { overhead_ns: median_spread(&excess).0 as u64, handoff_ns: median_spread(&gaps).0 as u64 })
}

struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF model's table is measured over its block format, and says so.
    #[test]
    fn a_block_format_table_files_its_entries_under_the_format() {
        let dir = tempfile::tempdir().unwrap();
        let options = ProfileOptions {
            scratch_bytes: 4 * MIB,
            trials: 1,
            kernel_batches: vec![1, 2],
            kernel_prompt_len: 4,
            kernel_runs: 1,
            ..ProfileOptions::quick(dir.path().to_path_buf())
        };
        let scratch = dir.path().join("scratch.bin");
        std::fs::write(&scratch, vec![7u8; options.scratch_bytes as usize]).unwrap();
        let disk = Arc::new(DiskFile::open(&scratch, true).unwrap());
        let model = ferry_core::catalog::Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
        use kernels::quant::BlockFormat;
        let weights = TableWeights::Blocks(vec![BlockFormat::Q8_0, BlockFormat::Q4_0]);
        let table =
            measure_kernel_table(&options, &model, &weights, &disk, &CpuBackend::default(), &mut |_, _| {}).unwrap();
        for op in ["attention", "mlp", "head", "embed"] {
            let entries: Vec<_> = table.entries.iter().filter(|e| e.op == op).collect();
            assert!(entries.iter().all(|e| e.shape == "128x352"), "{op}");
            for format in ["q8_0", "q4_0"] {
                let of_format = entries.iter().filter(|e| e.format.as_deref() == Some(format));
                assert!(of_format.count() * 2 == entries.len(), "{op}: half the entries over {format}");
            }
        }
        assert!(table.entries.iter().any(|e| e.op == "mlp" && e.tokens == 8), "prefill rows = batch 2 × prompt 4");
    }
}
