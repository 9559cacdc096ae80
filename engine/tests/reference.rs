//! Logits of a synthetic model match an independent numpy implementation
//! (tests/reference/llama_reference.py, output committed as golden values) within
//! 1e-4, through a plan that streams weights and KV from disk.

use ferry_core::catalog::Catalog;
use ferry_core::hardware::Hardware;
use ferry_core::model::Dtype;
use ferry_core::plan::{Policy, Schedule, Tier, TierCounts, Workload};
use ferry_core::profile::Profile;
use ferry_core::schedule::{lower, Steps};
use ferry_core::units::{KIB, MIB};
use ferry_engine::backend::CpuBackend;
use ferry_engine::weights::ModelFiles;
use ferry_engine::{run, RunOptions};

#[test]
fn logits_match_the_numpy_reference() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference");
    let prompts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("prompts.json")).unwrap()).unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("test-tiny-seed11-golden.json")).unwrap()).unwrap();
    let prompts: Vec<Vec<u32>> = prompts["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect())
        .collect();
    let gen_len = golden["gen_len"].as_u64().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::builtin().unwrap();
    let spec = catalog.model("test-tiny").unwrap().value;
    ferry_engine::synth::synthesize(&spec, Dtype::F32, 11, dir.path(), false, |_, _| {}).unwrap();
    let files = ModelFiles::open(dir.path()).unwrap();
    let layers = spec.num_layers;
    let workload = Workload { batch_size: prompts.len() as u64, prompt_len: prompts[0].len() as u64, gen_len };
    let policy = Policy {
        schedule: Schedule::Pipelined,
        micro_batch_size: 1,
        num_micro_batches: 2,
        prefetch_depth: 2,
        attention_weights: TierCounts { device: 1, host: 0, disk: layers - 1 },
        mlp_weights: TierCounts { device: 0, host: 0, disk: layers },
        embeddings: Tier::Device,
        head: Tier::Device,
        kv_cache: TierCounts { device: 1, host: 0, disk: layers - 1 },
        host_attention: false,
        compute_host_layers_on_host: false,
        weight_format: ferry_core::model::WeightFormats::uniform(ferry_core::model::WeightFormat::F32),
        weight_dtype: Dtype::F32,
        kv_dtype: Dtype::F32,
        chunk_bytes: 32 * KIB,
        copy_streams: 1,
        io_queue_depth: 2,
        pinned_host_bytes: 0,
        stages: Vec::new(),
    };
    let mut profile = Profile::from_datasheet(&Hardware {
        gpu: catalog.gpu("cpu").unwrap().value,
        host: catalog.host("ferry-ci-vm").unwrap().value,
    });
    profile.device_memory_bytes = 16 * MIB;
    let graph = lower(&policy, &spec, &workload, &profile, &Steps::All).unwrap();
    let options = RunOptions {
        prompts,
        scratch_dir: dir.path().to_path_buf(),
        allow_buffered_io: true,
        keep_logits: true,
        progress: None,
    };
    let report = run(&graph, &policy, &workload, &files, &CpuBackend, &options).unwrap();

    for (seq, expected) in golden["sequences"].as_array().unwrap().iter().enumerate() {
        let tokens: Vec<u32> =
            expected["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        assert_eq!(report.tokens[seq], tokens, "sequence {seq}: generated tokens differ from the reference");
        for (step, logits) in expected["logits"].as_array().unwrap().iter().enumerate() {
            let reference: Vec<f64> = logits.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let ours = &report.logits[step][seq];
            let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let worst = ours.iter().zip(&reference).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(
                worst <= 1e-4 * scale,
                "sequence {seq} step {step}: largest difference {worst:e} against a largest logit of {scale}"
            );
        }
    }
}
