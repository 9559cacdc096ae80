//! The cuda backend against the cpu backend: the same small plans (a synthesized
//! test-tiny model, as in `invariance.rs`) run through `backend("cuda")` and through
//! `CpuBackend` must give identical tokens and logits within a stated tolerance.
//!
//! What this checks depends on the machine. With an NVIDIA GPU, its driver, cuBLAS
//! and NVRTC, it runs every plan on the GPU and compares. Without them (CI, the build
//! machine) `backend("cuda")` must fail with the clear message that names what is
//! missing, and the comparison is skipped, saying so on stderr. Set
//! `FERRY_REQUIRE_GPU=1` (bench/gpu-check.sh does) to make a missing GPU a failure,
//! so a GPU machine never passes by skipping.
#![cfg(feature = "cuda")]

use std::path::Path;

use ferry_core::catalog::Catalog;
use ferry_core::hardware::Hardware;
use ferry_core::model::Dtype;
use ferry_core::plan::{Policy, Schedule, Tier, TierCounts, Workload};
use ferry_core::profile::Profile;
use ferry_core::schedule::{lower, Steps};
use ferry_core::units::{KIB, MIB};
use ferry_engine::backend::{backend, Backend, CpuBackend};
use ferry_engine::kernels::Activations;
use ferry_engine::weights::ModelFiles;
use ferry_engine::{run, EngineError, RunOptions, RunReport};

/// Logits may differ by this much relative to the largest logit of their vector: the
/// GPU sums in other orders than the CPU (cuBLAS's SGEMM, tree reductions in RMSNorm
/// and attention) and its expf/sinf/cosf differ from the CPU's in the last bits. All in
/// f32, so a few ulps per operation over a handful of layers: far below 1e-4.
const LOGIT_TOLERANCE: f32 = 1e-4;

fn profile(gpu: &str, host: &str, device_bytes: u64) -> Profile {
    let catalog = Catalog::builtin().unwrap();
    let mut p = Profile::from_datasheet(&Hardware {
        gpu: catalog.gpu(gpu).unwrap().value,
        host: catalog.host(host).unwrap().value,
    });
    p.device_memory_bytes = device_bytes;
    p.memory_reserve_fraction = 0.0;
    p
}

fn prompts(batch: u64, len: u64, vocab: u64) -> Vec<Vec<u32>> {
    (0..batch).map(|s| (0..len).map(|t| ((s * 131 + t * 17 + 3) % vocab) as u32).collect()).collect()
}

fn execute(
    dir: &Path,
    files: &ModelFiles,
    policy: &Policy,
    workload: &Workload,
    profile: &Profile,
    backend: &dyn Backend,
) -> RunReport {
    let graph = lower(policy, &files.spec, workload, profile, &Steps::Bound).unwrap();
    let options = RunOptions {
        prompts: prompts(workload.batch_size, workload.prompt_len, files.spec.vocab_size),
        scratch_dir: dir.join("scratch"),
        allow_buffered_io: true,
        keep_logits: true,
        progress: None,
        draft_files: None,
    };
    run(&graph, policy, workload, files, backend, &options)
        .unwrap_or_else(|e| panic!("{} backend, {policy:?}: {e}", backend.name()))
}

fn assert_close(cpu: &RunReport, gpu: &RunReport, what: &str) {
    assert_eq!(cpu.tokens, gpu.tokens, "{what}: tokens differ");
    assert_eq!(cpu.logits.len(), gpu.logits.len(), "{what}: steps");
    for (step, (a, b)) in cpu.logits.iter().zip(&gpu.logits).enumerate() {
        for (seq, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x.len(), y.len(), "{what}: vocabulary");
            let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                assert!(
                    (p - q).abs() <= LOGIT_TOLERANCE * scale,
                    "{what}: step {step} seq {seq} logit {i}: cpu {p} vs cuda {q} (largest {scale})"
                );
            }
        }
    }
}

/// The messages `backend("cuda")` gives where it cannot start: each names what is
/// missing. On a machine without an NVIDIA driver, the first.
const CLEAR_FAILURES: [&str; 4] = [
    "no NVIDIA driver on this machine",
    "the NVIDIA driver is present but cuBLAS is not",
    "but NVRTC, which compiles Ferry's GPU kernels",
    "could not be opened",
];

/// The cuda backend, or `None` after checking that its failure is a clear one.
fn cuda_or_clear_failure() -> Option<Box<dyn Backend>> {
    match backend("cuda", Default::default()) {
        Ok(cuda) => Some(cuda),
        Err(e) => {
            let message = e.to_string();
            assert!(matches!(e, EngineError::Device(_)), "not a device error: {message}");
            assert!(CLEAR_FAILURES.iter().any(|m| message.contains(m)), "unclear failure: {message}");
            assert!(message.contains("--backend cpu") || !message.contains("no NVIDIA driver"), "{message}");
            if std::env::var_os("FERRY_REQUIRE_GPU").is_some() {
                panic!("FERRY_REQUIRE_GPU is set but the cuda backend did not open: {message}");
            }
            eprintln!("cuda backend not available, GPU comparison skipped: {message}");
            None
        }
    }
}

/// The plans compared: everything in GPU memory; weights and KV streamed from disk; a
/// discrete GPU's host-resident weights and KV with host attention (host compute
/// through the cpu kernels, copies both ways); device attention over streamed KV with
/// the head on the host; and KV caches in bf16 and f16 (the dtype kernels). Each runs
/// on f32, bf16 and f16 weights.
fn plans(layers: u64) -> Vec<(&'static str, Policy, bool)> {
    let base = Policy { chunk_bytes: 64 * KIB, io_queue_depth: 2, ..Policy::all_on_device(layers, 4, Dtype::F32) };
    let mut streamed = base.clone();
    streamed.schedule = Schedule::Pipelined;
    streamed.micro_batch_size = 2;
    streamed.num_micro_batches = 2;
    streamed.attention_weights = TierCounts { device: 1, host: 0, disk: layers - 1 };
    streamed.mlp_weights = TierCounts { device: 0, host: 0, disk: layers };
    streamed.kv_cache = TierCounts { device: 2, host: 0, disk: layers - 2 };
    streamed.prefetch_depth = 2;
    streamed.chunk_bytes = 16 * KIB;
    let mut host_attention = streamed.clone();
    host_attention.attention_weights = TierCounts { device: 1, host: 2, disk: layers - 3 };
    host_attention.mlp_weights = TierCounts { device: 1, host: 1, disk: layers - 2 };
    host_attention.kv_cache = TierCounts { device: 1, host: 2, disk: layers - 3 };
    host_attention.host_attention = true;
    host_attention.embeddings = Tier::Host;
    host_attention.copy_streams = 2;
    host_attention.pinned_host_bytes = 256 * KIB;
    let mut kv_streamed = host_attention.clone();
    kv_streamed.host_attention = false;
    kv_streamed.head = Tier::Host;
    let mut bf16_kv = base.clone();
    bf16_kv.kv_dtype = Dtype::Bf16;
    let mut f16_kv = host_attention.clone();
    f16_kv.kv_dtype = Dtype::F16;
    // (what, policy, on a discrete GPU's profile)
    vec![
        ("all in GPU memory", base, false),
        ("streamed from disk", streamed, false),
        ("discrete, host attention", host_attention, true),
        ("discrete, KV streamed, head on the host", kv_streamed, true),
        ("bf16 KV", bf16_kv, false),
        ("f16 KV, host attention", f16_kv, true),
    ]
}

#[test]
fn the_cuda_backend_computes_the_cpu_backends_tokens() {
    // The cpu side runs everywhere, so the plans are known to be valid before a GPU
    // machine ever compares.
    let cuda = cuda_or_clear_failure();
    let dir = tempfile::tempdir().unwrap();
    let spec = Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
    let workload = Workload { batch_size: 4, prompt_len: 6, gen_len: 4 };
    let unified = profile("cpu", "ferry-ci-vm", 64 * MIB);
    let discrete = profile("rtx3060-12gb", "desktop-pcie4", 64 * MIB);
    for (dtype, seed) in [(Dtype::F32, 7), (Dtype::Bf16, 11), (Dtype::F16, 5)] {
        let model = dir.path().join(format!("model-{dtype:?}"));
        ferry_engine::synth::synthesize(&spec, dtype, seed, &model, false, |_, _| {}).unwrap();
        let files = ModelFiles::open(&model).unwrap();
        for (what, mut policy, on_discrete) in plans(spec.num_layers) {
            policy.set_weight_format(ferry_core::model::WeightFormats::uniform(
                ferry_core::model::WeightFormat::from_dtype(dtype).unwrap(),
            ));
            let profile = if on_discrete { &discrete } else { &unified };
            let what = format!("{dtype:?} model, {what}");
            // The cuda backend multiplies f32 activations by widened weights: the cpu
            // backend's f32 numerics, not its default (x rounded to bf16 over bf16 weights).
            let cpu_f32 = CpuBackend { activations: Activations::F32 };
            let cpu = execute(dir.path(), &files, &policy, &workload, profile, &cpu_f32);
            assert!(cpu.tokens.iter().all(|t| t.len() == workload.gen_len as usize), "{what}");
            if let Some(cuda) = &cuda {
                let gpu = execute(dir.path(), &files, &policy, &workload, profile, cuda.as_ref());
                assert_close(&cpu, &gpu, &what);
                eprintln!("{what}: tokens identical, logits within {LOGIT_TOLERANCE} of the largest");
            }
        }
    }
}

/// A plan over two devices needs two GPUs; the backend drives one and says so.
#[test]
fn a_second_device_is_refused_clearly() {
    let Some(cuda) = cuda_or_clear_failure() else { return };
    let err = match cuda.scratch(ferry_core::topology::Place::Device(1), 16) {
        Ok(_) => panic!("device 1 should be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("drives one GPU"), "{err}");
}
