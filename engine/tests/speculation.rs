//! Speculative decoding: with greedy verification the tokens are exactly those of
//! plain greedy decoding of the target, whatever the draft length, the draft, the
//! schedule, the placement and the micro-batching — and the run reports the rate at
//! which the target accepted the draft's tokens.

use std::path::Path;
use std::sync::Arc;

use ferry_core::catalog::Catalog;
use ferry_core::hardware::Hardware;
use ferry_core::model::Dtype;
use ferry_core::plan::{DeviceLayers, Draft, Policy, Schedule, Speculation, TierCounts, Workload};
use ferry_core::profile::Profile;
use ferry_core::schedule::{lower, Steps};
use ferry_core::units::{KIB, MIB};
use ferry_engine::backend::CpuBackend;
use ferry_engine::synth::Damping;
use ferry_engine::weights::ModelFiles;
use ferry_engine::{run, RunOptions, RunReport};

/// The cpu device (unified memory), or a discrete GPU's datasheet (device and host
/// apart; the cpu backend runs it with both in RAM).
const DAMPING: f32 = 0.3;

fn profile(discrete: bool) -> Profile {
    let catalog = Catalog::builtin().unwrap();
    let (gpu, host) = if discrete { ("rtx3060-12gb", "desktop-pcie4") } else { ("cpu", "ferry-ci-vm") };
    let mut p = Profile::from_datasheet(&Hardware {
        gpu: catalog.gpu(gpu).unwrap().value,
        host: catalog.host(host).unwrap().value,
    });
    let device_bytes = 64 * MIB;
    p.device_memory_bytes = device_bytes;
    p.memory_reserve_fraction = 0.0;
    p
}

fn prompts(batch: u64, len: u64, vocab: u64) -> Vec<Vec<u32>> {
    (0..batch).map(|s| (0..len).map(|t| ((s * 131 + t * 17 + 3) % vocab) as u32).collect()).collect()
}

fn execute(dir: &Path, files: &ModelFiles, policy: &Policy, workload: &Workload) -> RunReport {
    execute_with(dir, files, None, policy, workload)
}

/// Runs `policy` on `files`, with a separate draft's files when it speculates with one.
fn execute_with(
    dir: &Path,
    files: &ModelFiles,
    draft_files: Option<&Path>,
    policy: &Policy,
    workload: &Workload,
) -> RunReport {
    // Host placements need a machine whose device is not the host.
    let profile = profile(policy.host_attention);
    let draft_files = draft_files.map(|path| ModelFiles::open(path).unwrap());
    let mut policy = policy.clone();
    if let (Some(draft), Some(speculation)) = (&draft_files, policy.speculation.as_mut()) {
        speculation.draft_spec = Some(Arc::new(draft.spec.clone()));
    }
    let graph = lower(&policy, &files.spec, workload, &profile, &Steps::Bound).unwrap();
    let options = RunOptions {
        prompts: prompts(workload.batch_size, workload.prompt_len, files.spec.vocab_size),
        scratch_dir: dir.join("scratch"),
        allow_buffered_io: true,
        keep_logits: true,
        progress: None,
        draft_files,
    };
    run(&graph, &policy, workload, files, &CpuBackend::default(), &options)
        .unwrap_or_else(|e| panic!("{policy:?}: {e}"))
}

/// test-tiny with its later layers damped (`DAMPING`), written to `dir/model`, and a
/// file of exactly its first layer, embeddings, final norm and head (synthetic values
/// depend only on the seed and the tensor's name) in `dir/cut`.
fn damped_and_its_first_layer(dir: &Path) -> (ferry_core::model::ModelSpec, std::path::PathBuf, std::path::PathBuf) {
    let spec = Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
    let damping = Some(Damping { from_layer: 1, factor: DAMPING });
    let model_dir = dir.join("model");
    ferry_engine::synth::synthesize_damped(&spec, Dtype::F32, 7, damping, &model_dir, false, |_, _| {}).unwrap();
    let first_layer = ferry_core::model::ModelSpec { num_layers: 1, ..spec.clone() };
    let cut_dir = dir.join("cut");
    ferry_engine::synth::synthesize(&first_layer, Dtype::F32, 7, &cut_dir, false, |_, _| {}).unwrap();
    (spec, model_dir, cut_dir)
}

fn speculating(policy: &Policy, layers: u64, draft_len: u32) -> Policy {
    let draft = Draft::SelfLayers { layers };
    let speculation = Speculation { draft, draft_len, acceptance_rate: 0.5, draft_spec: None };
    Policy { speculation: Some(speculation), ..policy.clone() }
}

/// `policy` speculating with a separate draft model (its shape is filled in from its
/// files by `execute_with`).
fn with_draft_model(policy: &Policy, draft_len: u32) -> Policy {
    let speculation = Speculation { draft: Draft::Model, draft_len, acceptance_rate: 0.5, draft_spec: None };
    Policy { speculation: Some(speculation), ..policy.clone() }
}

fn streamed(layers: u64, schedule: Schedule, micro_batch_size: u64, micro_batches: u64) -> Policy {
    let mut p = Policy::all_on_device(layers, micro_batch_size, Dtype::F32);
    p.num_micro_batches = micro_batches;
    p.schedule = schedule;
    p.chunk_bytes = 64 * KIB;
    p.io_queue_depth = 2;
    // One layer stays on the device (the last: spread device layers are the last of
    // each share, so a one-layer draft keeps its own copy), the rest stream from disk;
    // half the KV cache is on disk.
    p.attention_weights = TierCounts { device: 1, host: 0, disk: layers - 1 };
    p.mlp_weights = TierCounts { device: 1, host: 0, disk: layers - 1 };
    p.kv_cache = TierCounts { device: layers / 2, host: 0, disk: layers - layers / 2 };
    p
}

#[test]
fn speculation_yields_exactly_the_targets_greedy_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
    let model_dir = dir.path().join("model");
    // Layers after the first perturb what it computes: a first-layer draft agrees with
    // many of the target's tokens, not all.
    let damping = Some(Damping { from_layer: 1, factor: DAMPING });
    ferry_engine::synth::synthesize_damped(&spec, Dtype::F32, 7, damping, &model_dir, false, |_, _| {}).unwrap();
    let files = ModelFiles::open(&model_dir).unwrap();
    let layers = spec.num_layers;
    let workload = Workload { batch_size: 2, prompt_len: 5, gen_len: 12 };
    let plain = Policy::all_on_device(layers, 2, Dtype::F32);
    let reference = execute(dir.path(), &files, &plain, &workload);
    assert!(reference.speculation.is_none());

    let mut cases: Vec<(String, Policy)> = Vec::new();
    // A draft that is the target itself agrees with every token.
    let whole = execute(dir.path(), &files, &speculating(&plain, layers, 4), &workload);
    assert_eq!(reference.tokens, whole.tokens);
    let measured = whole.speculation.as_ref().unwrap();
    assert_eq!((measured.rejections, measured.acceptance_rate), (0, 1.0), "{measured:?}");
    assert_eq!(measured.rounds, 3, "11 tokens after the prefill at 5 per round: {measured:?}");
    for k in 1..=8 {
        cases.push((format!("resident, self 1 layer, k {k}"), speculating(&plain, 1, k)));
    }
    for schedule in Schedule::ALL {
        for (mb, n) in [(2, 1), (1, 2)] {
            let p = streamed(layers, schedule, mb, n);
            cases.push((format!("{schedule:?} {mb}×{n} streamed, self 1, k 3"), speculating(&p, 1, 3)));
            cases.push((format!("{schedule:?} {mb}×{n} streamed, self 2, k 5"), speculating(&p, 2, 5)));
        }
    }
    // The first layer on the device: a one-layer draft shares it, a two-layer draft
    // shares it and keeps its own copy of the second.
    let first = Policy { device_layers: DeviceLayers::First, ..streamed(layers, Schedule::Pipelined, 1, 2) };
    cases.push(("Pipelined 1×2, first layer resident and shared, self 1, k 3".into(), speculating(&first, 1, 3)));
    cases.push(("Pipelined 1×2, first layer resident and shared, self 2, k 4".into(), speculating(&first, 2, 4)));
    let mut host = streamed(layers, Schedule::LayerPrefetch, 1, 2);
    host.attention_weights = TierCounts { device: 1, host: layers - 1, disk: 0 };
    host.kv_cache = TierCounts { device: 1, host: layers - 1, disk: 0 };
    host.host_attention = true;
    cases.push(("host weights and KV, host attention, k 4".into(), speculating(&host, 2, 4)));
    let host_pair = Policy { micro_batch_size: 2, num_micro_batches: 1, ..host };
    cases.push(("host weights and KV, host attention, 2×1, k 3".into(), speculating(&host_pair, 1, 3)));

    let (mut agreed, mut rejected, mut ragged) = (0, 0, Vec::new());
    for (what, policy) in cases {
        let report = execute(dir.path(), &files, &policy, &workload);
        assert_eq!(reference.tokens, report.tokens, "{what}: tokens differ from plain greedy decoding");
        let measured = report.speculation.as_ref().unwrap_or_else(|| panic!("{what}: no speculation report"));
        // Every accepted token is one fewer round: the rounds and tokens add up.
        let k = policy.speculation.as_ref().unwrap().draft_len;
        assert!(measured.rounds >= 1 && measured.rounds < workload.gen_len as u32, "{what}: {measured:?}");
        assert!(measured.tokens_per_round >= 1.0 && measured.tokens_per_round <= (k + 1) as f64, "{what}");
        let graph_run = report.graph_run.as_ref().expect("a speculative run reports the graph it ran");
        assert_eq!(graph_run.rounds.len() as u32, measured.rounds + 1, "{what}");
        assert!(graph_run.is_complete(), "{what}: the rounds that ran yield every token");
        assert_eq!(report.trace.spans.len(), graph_run.tasks.len());
        // Across micro-batchings the prefill's kernels differ (its row count does);
        // against the same plan decoding plainly, not even a bit may.
        let plainly = execute(dir.path(), &files, &Policy { speculation: None, ..policy.clone() }, &workload);
        assert_same_logits(&what, &plainly, &report);
        agreed += measured.agreed;
        rejected += measured.rejections;
        if policy.micro_batch_size > 1 && measured.ragged_rounds > 0 {
            ragged.push(what);
        }
    }
    // The cases exercise both sides of verification, and sequences of one micro-batch
    // advancing by different counts (each accepts on its own) with the KV cache at
    // every tier: on the device, on the host under host attention, on disk.
    assert!(agreed > 0 && rejected > 0, "agreed {agreed}, rejected {rejected}");
    for needle in ["resident", "streamed", "host weights"] {
        assert!(ragged.iter().any(|w| w.contains(needle)), "no ragged round in {needle} plans: {ragged:?}");
    }
}

/// The logits behind every token `run` kept are `reference`'s, bit for bit: a
/// verification's k + 1 rows per sequence take the kernels plain decoding's one row
/// takes (`kernels::Rows`), so not even a near-tie can come out another way.
fn assert_same_logits(what: &str, reference: &RunReport, run: &RunReport) {
    let mut compared = 0;
    for (index, (a, b)) in reference.logits.iter().zip(&run.logits).enumerate() {
        for (sequence, (x, y)) in a.iter().zip(b).enumerate().filter(|(_, (_, y))| !y.is_empty()) {
            let differ = x.iter().zip(y).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
            assert_eq!(differ, 0, "{what}: token {index} of sequence {sequence}: {differ} logits differ in their bits");
            compared += 1;
        }
    }
    assert!(compared > 0, "{what}: no logits were kept to compare");
}

/// bf16 weights (x rounded to bf16, llama.cpp's numerics): a verification's many rows
/// would take the AMX tiles where the CPU has them (the f32 GEMM where not) while plain
/// decoding's few rows take the few-row kernels, which add in another order. The
/// logits of speculation still are plain decoding's, bit for bit, at every draft length.
#[test]
fn speculation_reproduces_plain_decodings_logits_where_many_rows_take_other_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
    let model_dir = dir.path().join("model");
    let damping = Some(Damping { from_layer: 1, factor: DAMPING });
    ferry_engine::synth::synthesize_damped(&spec, Dtype::Bf16, 7, damping, &model_dir, false, |_, _| {}).unwrap();
    let files = ModelFiles::open(&model_dir).unwrap();
    let layers = spec.num_layers;
    let workload = Workload { batch_size: 4, prompt_len: 5, gen_len: 10 };
    for (mb, n) in [(4, 1), (2, 2)] {
        let mut plain = Policy::all_on_device(layers, mb, Dtype::Bf16);
        plain.num_micro_batches = n;
        let reference = execute(dir.path(), &files, &plain, &workload);
        for k in [2, 5, 8] {
            let what = format!("bf16 {mb}×{n}, self 1 layer, k {k} ({})", ferry_engine::kernels::matrix_path());
            let report = execute(dir.path(), &files, &speculating(&plain, 1, k), &workload);
            assert_eq!(reference.tokens, report.tokens, "{what}: tokens differ from plain greedy decoding");
            assert_same_logits(&what, &reference, &report);
        }
    }
}

/// A mixture of experts speculating while its experts stream from disk as routed reads
/// (the draft's first layer computes its routes itself; the target's verification
/// routes, reads the chosen experts and computes): exactly plain greedy decoding.
#[test]
fn a_mixture_of_experts_speculates_over_routed_expert_reads() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Catalog::builtin().unwrap().model("test-tiny-moe").unwrap().value;
    let model_dir = dir.path().join("model");
    let damping = Some(Damping { from_layer: 1, factor: DAMPING });
    ferry_engine::synth::synthesize_damped(&spec, Dtype::F32, 7, damping, &model_dir, false, |_, _| {}).unwrap();
    let files = ModelFiles::open(&model_dir).unwrap();
    let layers = spec.num_layers;
    let workload = Workload { batch_size: 2, prompt_len: 5, gen_len: 8 };
    let reference = execute(dir.path(), &files, &Policy::all_on_device(layers, 2, Dtype::F32), &workload);
    for schedule in [Schedule::LayerPrefetch, Schedule::ZigzagBlock] {
        for (mb, n) in [(2, 1), (1, 2)] {
            let policy = speculating(&streamed(layers, schedule, mb, n), 1, 3);
            let report = execute(dir.path(), &files, &policy, &workload);
            let what = format!("{schedule:?} {mb}×{n}");
            assert_eq!(reference.tokens, report.tokens, "{what}: tokens differ from greedy decoding");
            assert!(report.speculation.is_some());
            let plainly = execute(dir.path(), &files, &Policy { speculation: None, ..policy.clone() }, &workload);
            assert_same_logits(&what, &plainly, &report);
        }
    }
}

#[test]
fn a_separate_draft_model_yields_the_targets_tokens_and_agrees_as_its_layers_do() {
    let dir = tempfile::tempdir().unwrap();
    // The first-layer file as a separate draft must agree with the target exactly as
    // the self-speculating one does.
    let (spec, model_dir, cut_dir) = damped_and_its_first_layer(dir.path());
    // A draft of another shape (narrower, two layers, its own weights) with the vocabulary.
    let narrow = ferry_core::model::ModelSpec {
        name: "test-narrow".into(),
        hidden_size: 64,
        intermediate_size: 160,
        num_layers: 2,
        num_heads: 2,
        num_kv_heads: 1,
        ..spec.clone()
    };
    let narrow_dir = dir.path().join("narrow");
    ferry_engine::synth::synthesize(&narrow, Dtype::F32, 11, &narrow_dir, false, |_, _| {}).unwrap();
    let files = ModelFiles::open(&model_dir).unwrap();
    let layers = spec.num_layers;
    let workload = Workload { batch_size: 2, prompt_len: 5, gen_len: 12 };
    let plain = Policy::all_on_device(layers, 2, Dtype::F32);
    let reference = execute(dir.path(), &files, &plain, &workload);
    for (what, policy) in [
        ("resident", plain.clone()),
        ("streamed, layer-major, 1×2", streamed(layers, Schedule::ZigzagBlock, 1, 2)),
        ("streamed, pipelined", streamed(layers, Schedule::Pipelined, 2, 1)),
    ] {
        let own = execute(dir.path(), &files, &speculating(&policy, 1, 3), &workload);
        let cut = execute_with(dir.path(), &files, Some(&cut_dir), &with_draft_model(&policy, 3), &workload);
        assert_eq!(reference.tokens, cut.tokens, "{what}: a separate draft changed the tokens");
        let (a, b) = (own.speculation.unwrap(), cut.speculation.unwrap());
        assert_eq!((a.agreed, a.rejections, a.rounds), (b.agreed, b.rejections, b.rounds), "{what}");
        let narrow = execute_with(dir.path(), &files, Some(&narrow_dir), &with_draft_model(&policy, 4), &workload);
        assert_eq!(reference.tokens, narrow.tokens, "{what}: a draft of another shape changed the tokens");
    }
}

/// A separate draft on the first stage's device, the target split over two devices of
/// one machine: the last stage verifies, the first drafts the next round — the tokens
/// are still the target's own, and the draft agrees exactly as it does on one device.
#[test]
fn a_separate_draft_speculates_over_two_stages() {
    use ferry_core::plan::{Stage, Tier};
    use ferry_core::topology::DeviceSlot;
    let dir = tempfile::tempdir().unwrap();
    let (spec, model_dir, cut_dir) = damped_and_its_first_layer(dir.path());
    let files = ModelFiles::open(&model_dir).unwrap();
    let layers = spec.num_layers;
    let workload = Workload { batch_size: 2, prompt_len: 5, gen_len: 12 };
    let plain = Policy::all_on_device(layers, 2, Dtype::F32);
    let reference = execute(dir.path(), &files, &plain, &workload);
    let one_stage = execute_with(dir.path(), &files, Some(&cut_dir), &with_draft_model(&plain, 3), &workload);

    let mut two = with_draft_model(&plain, 3);
    let half = TierCounts::all(Tier::Device, layers / 2);
    two.stages =
        (0..2).map(|device| Stage { device, attention_weights: half, mlp_weights: half, kv_cache: half }).collect();
    let mut machine = profile(false);
    machine.devices = vec![DeviceSlot { host: 0, memory_bytes: 32 * MIB, profile: None }; 2];
    let draft = ModelFiles::open(&cut_dir).unwrap();
    if let Some(speculation) = two.speculation.as_mut() {
        speculation.draft_spec = Some(Arc::new(draft.spec.clone()));
    }
    two.validate(&files.spec, &workload, true).unwrap();
    let graph = lower(&two, &files.spec, &workload, &machine, &Steps::Bound).unwrap();
    let options = RunOptions {
        prompts: prompts(workload.batch_size, workload.prompt_len, files.spec.vocab_size),
        scratch_dir: dir.path().join("scratch"),
        allow_buffered_io: true,
        keep_logits: false,
        progress: None,
        draft_files: Some(draft),
    };
    let report = run(&graph, &two, &workload, &files, &CpuBackend::default(), &options).unwrap();
    assert_eq!(reference.tokens, report.tokens, "two stages with a draft changed the tokens");
    let (a, b) = (one_stage.speculation.unwrap(), report.speculation.unwrap());
    assert_eq!((a.agreed, a.rejections, a.rounds), (b.agreed, b.rejections, b.rounds));
    // A self-speculating draft over several stages is refused, saying why.
    let mut own = speculating(&plain, 1, 3);
    own.stages = two.stages.clone();
    let err = own.validate(&files.spec, &workload, true).unwrap_err().to_string();
    assert!(err.contains("separate draft model"), "{err}");
}
