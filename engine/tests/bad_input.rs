//! Bad input is a clear error, never a panic: truncated or mis-shaped weights, an
//! architecture the engine does not run, a plan that does not fit or does not match.

use ferry_core::catalog::Catalog;
use ferry_core::hardware::Hardware;
use ferry_core::model::{Dtype, WeightFormat, WeightFormats};
use ferry_core::plan::{Policy, Schedule, Workload};
use ferry_core::profile::Profile;
use ferry_core::schedule::{lower, Steps};
use ferry_core::units::{KIB, MIB};
use ferry_engine::backend::CpuBackend;
use ferry_engine::weights::ModelFiles;
use ferry_engine::{run, EngineError, RunOptions};

fn tiny(dir: &std::path::Path) -> ferry_core::model::ModelSpec {
    let spec = Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
    ferry_engine::synth::synthesize(&spec, Dtype::F32, 3, dir, false, |_, _| {}).unwrap();
    spec
}

fn message(result: Result<ModelFiles, EngineError>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            assert!(e.is_usage_error(), "{e} should be the user's to fix");
            e.to_string()
        }
    }
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let file = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len - 1000).unwrap();
    let err = message(ModelFiles::open(dir.path()));
    assert!(err.contains("truncated") && err.contains("model.safetensors"), "{err}");
    f.set_len(5).unwrap();
    let err = message(ModelFiles::open(dir.path()));
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn shapes_that_disagree_with_config_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let config = dir.path().join("config.json");
    let text =
        std::fs::read_to_string(&config).unwrap().replace("\"intermediate_size\": 352", "\"intermediate_size\": 360");
    std::fs::write(&config, text).unwrap();
    let err = message(ModelFiles::open(dir.path()));
    assert!(err.contains("gate_proj") && err.contains("[360, 128]"), "{err}");
}

#[test]
fn missing_tensors_and_unsupported_architectures_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let config = dir.path().join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, original.replace("\"num_hidden_layers\": 4", "\"num_hidden_layers\": 5")).unwrap();
    let err = message(ModelFiles::open(dir.path()));
    assert!(err.contains("missing tensor 'model.layers.4."), "{err}");
    std::fs::write(&config, original.replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt2\"")).unwrap();
    let err = message(ModelFiles::open(dir.path()));
    assert!(err.contains("unsupported model_type 'gpt2'"), "{err}");
    let mixtral = original.replace(
        "\"model_type\": \"llama\"",
        "\"model_type\": \"mixtral\", \"num_local_experts\": 2, \"num_experts_per_tok\": 1",
    );
    std::fs::write(&config, mixtral).unwrap();
    let err = message(ModelFiles::open(dir.path()));
    assert!(err.contains("missing tensor 'model.layers.0.block_sparse_moe.gate.weight'"), "{err}");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(&config, original).unwrap();
    let err = message(ModelFiles::open(dir.path()));
    assert!(err.contains("no model.safetensors"), "{err}");
}

/// A mixture of experts whose config disagrees with its tensors: more or fewer
/// experts than stored (the router's rows give it away), more per token than there are.
/// Synthesizes catalog model `name` into `dir`; `edit(from, to)` then opens it with
/// `from` replaced by `to` in its config.json and returns the error's text, and
/// `restore()` puts the original config back.
fn edited_config<'a>(dir: &'a std::path::Path, name: &str) -> (impl Fn(&str, &str) -> String + 'a, impl Fn() + 'a) {
    let spec = Catalog::builtin().unwrap().model(name).unwrap().value;
    ferry_engine::synth::synthesize(&spec, Dtype::F32, 3, dir, false, |_, _| {}).unwrap();
    let config = dir.join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    let (config_edit, original_edit) = (config.clone(), original.clone());
    let edit = move |from: &str, to: &str| {
        assert!(original_edit.contains(from), "{from}");
        std::fs::write(&config_edit, original_edit.replace(from, to)).unwrap();
        message(ModelFiles::open(dir))
    };
    let restore = move || std::fs::write(&config, &original).unwrap();
    (edit, restore)
}

#[test]
fn expert_counts_that_disagree_with_the_tensors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (with, restore) = edited_config(dir.path(), "test-tiny-moe");
    let err = with("\"num_local_experts\": 8", "\"num_local_experts\": 10");
    assert!(err.contains("block_sparse_moe.gate.weight' has shape [8, 128]") && err.contains("[10, 128]"), "{err}");
    let err = with("\"num_local_experts\": 8", "\"num_local_experts\": 4");
    assert!(err.contains("block_sparse_moe.gate.weight' has shape [8, 128]") && err.contains("[4, 128]"), "{err}");
    let err = with("\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 9");
    assert!(err.contains("config.json") && err.contains("9 experts per token (num_experts_per_tok) of 8"), "{err}");
    restore();
    ModelFiles::open(dir.path()).unwrap();
}

/// A shared expert whose config width disagrees with its tensors is an error naming
/// the tensor and both shapes.
#[test]
fn a_shared_expert_that_disagrees_with_the_tensors_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (with, restore) = edited_config(dir.path(), "test-tiny-qwen2-moe");
    let err = with("\"shared_expert_intermediate_size\": 96", "\"shared_expert_intermediate_size\": 128");
    assert!(
        err.contains("mlp.shared_expert.gate_proj.weight' has shape [96, 128]") && err.contains("[128, 128]"),
        "{err}"
    );
    restore();
    ModelFiles::open(dir.path()).unwrap();
}

#[test]
fn synth_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let spec = tiny(dir.path());
    let err = ferry_engine::synth::synthesize(&spec, Dtype::F32, 3, dir.path(), false, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("--force"));
    ferry_engine::synth::synthesize(&spec, Dtype::F32, 3, dir.path(), true, |_, _| {}).unwrap();
}

#[test]
fn plans_that_do_not_fit_or_match_are_refused_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let spec = tiny(dir.path());
    let files = ModelFiles::open(dir.path()).unwrap();
    let catalog = Catalog::builtin().unwrap();
    let mut profile = Profile::from_datasheet(&Hardware {
        gpu: catalog.gpu("cpu").unwrap().value,
        host: catalog.host("ferry-ci-vm").unwrap().value,
    });
    profile.memory_reserve_fraction = 0.0;
    let layers = spec.num_layers;
    let mut policy = Policy {
        schedule: Schedule::LayerPrefetch,
        chunk_bytes: 64 * KIB,
        ..Policy::all_on_device(layers, 2, Dtype::F32)
    };
    let workload = Workload { batch_size: 2, prompt_len: 4, gen_len: 2 };
    let options = RunOptions {
        prompts: vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]],
        scratch_dir: dir.path().to_path_buf(),
        allow_buffered_io: true,
        keep_logits: false,
        progress: None,
        draft_files: None,
    };
    // A 1 MiB budget cannot hold the 3.3 MiB of resident weights.
    profile.device_memory_bytes = MIB;
    let graph = lower(&policy, &spec, &workload, &profile, &Steps::All).unwrap();
    let err = run(&graph, &policy, &workload, &files, &CpuBackend::default(), &options).unwrap_err().to_string();
    assert!(err.contains("device memory") && err.contains("short by"), "{err}");
    // A plan that reads the weights in another dtype is not for these files.
    profile.device_memory_bytes = 64 * MIB;
    policy.set_weight_format(WeightFormats::uniform(WeightFormat::Bf16));
    let graph = lower(&policy, &spec, &workload, &profile, &Steps::All).unwrap();
    let err = run(&graph, &policy, &workload, &files, &CpuBackend::default(), &options).unwrap_err().to_string();
    assert!(err.contains("stores 'model.embed_tokens.weight' as bf16 but") && err.contains("holds it as f32"), "{err}");
    // Nor is a plan of quantized weights for float files; and FlexGen's group-wise
    // formats, which the simulator predicts, are refused saying what the engine runs.
    for (format, expected) in [("q8_0", "as q8_0 but"), ("int4-g64", "not int4-g64")] {
        policy.set_weight_format(WeightFormats::uniform(WeightFormat::parse(format).unwrap()));
        let graph = lower(&policy, &spec, &workload, &profile, &Steps::All).unwrap();
        let err = run(&graph, &policy, &workload, &files, &CpuBackend::default(), &options).unwrap_err();
        assert!(err.is_usage_error(), "{err}");
        let err = err.to_string();
        assert!(err.contains(expected), "{err}");
    }
    // A sampled graph (not every round) is for the simulator only.
    policy.set_weight_format(WeightFormats::uniform(WeightFormat::F32));
    let long = Workload { gen_len: 20, ..workload };
    let sampled = lower(&policy, &spec, &long, &profile, &Steps::Only(vec![1, 2, 9])).unwrap();
    assert!(!sampled.is_complete());
    let err = run(&sampled, &policy, &long, &files, &CpuBackend::default(), &options).unwrap_err().to_string();
    assert!(err.contains("complete graphs"), "{err}");
    // A round that yields two tokens needs a verifier the engine does not have.
    let mut graph = lower(&policy, &spec, &workload, &profile, &Steps::All).unwrap();
    graph.rounds[1].tokens = 2;
    graph.gen_len += 1;
    assert!(graph.is_complete() && graph.validate().is_ok());
    let three = Workload { gen_len: 3, ..workload };
    let err = run(&graph, &policy, &three, &files, &CpuBackend::default(), &options).unwrap_err();
    assert!(matches!(err, EngineError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("round 1") && err.to_string().contains("yields 2 token(s)"), "{err}");
    // Token ids outside the vocabulary.
    let graph = lower(&policy, &spec, &workload, &profile, &Steps::All).unwrap();
    let bad = RunOptions { prompts: vec![vec![1, 2, 3, 4], vec![5, 6, 7, 9999]], ..options };
    let err = run(&graph, &policy, &workload, &files, &CpuBackend::default(), &bad).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
}

/// The cuda backend opens where a GPU and its driver are, and otherwise says what is
/// missing: the driver (built with the `cuda` feature) or the feature itself.
#[test]
fn the_cuda_backend_opens_or_says_what_is_missing() {
    match ferry_engine::backend::backend("cuda", Default::default()) {
        Ok(backend) => assert_eq!(backend.name(), "cuda"),
        Err(e) => {
            let message = e.to_string();
            let expected = if cfg!(feature = "cuda") { "no NVIDIA driver" } else { "built without the cuda backend" };
            assert!(message.contains(expected), "{message}");
        }
    }
}

/// What a config leaves out of the computation is refused, not dropped: weights the
/// model as described does not use (a layer past `num_hidden_layers`, Qwen2's biases
/// under a llama config), Llama's optional biases, a rotary scaling the engine does
/// not implement. A sliding window caps the model's positions instead (the engine's
/// full attention is the same computation up to the window).
#[test]
fn what_the_engine_would_silently_leave_out_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (edit, restore) = edited_config(dir.path(), "test-tiny");
    let err = edit("\"num_hidden_layers\": 4", "\"num_hidden_layers\": 3");
    assert!(err.contains("'model.layers.3.") && err.contains("does not use"), "{err}");
    let err = edit("\"model_type\": \"llama\"", "\"model_type\": \"llama\", \"attention_bias\": true");
    assert!(err.contains("'attention_bias': true is not implemented for llama"), "{err}");
    let err = edit(
        "\"model_type\": \"llama\"",
        "\"model_type\": \"llama\", \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0}",
    );
    assert!(err.contains("rope_scaling: type 'yarn' is not implemented"), "{err}");
    restore();
    let qwen = tempfile::tempdir().unwrap();
    let (edit, _) = edited_config(qwen.path(), "test-tiny-qwen2");
    let err = edit("\"model_type\": \"qwen2\"", "\"model_type\": \"llama\"");
    assert!(err.contains("q_proj.bias'") && err.contains("does not use"), "{err}");
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let mistral = text.replace("\"model_type\": \"llama\"", "\"model_type\": \"mistral\", \"sliding_window\": 64");
    std::fs::write(&config, mistral).unwrap();
    assert_eq!(ModelFiles::open(dir.path()).unwrap().spec.max_position_embeddings, 64);
}
