//! Plan invariance: the engine computes the same tokens and logits whatever the plan
//! — every schedule, placement (device / host / disk for weights and KV), host
//! attention, host-computed layers, micro-batching, chunk size and budget that fits;
//! for float weights, a mixture of experts, and a Q4_0 file with 8-bit activations.

mod common;

use std::path::Path;

use ferry_core::catalog::Catalog;
use ferry_core::hardware::Hardware;
use ferry_core::model::{Dtype, WeightFormats};
use ferry_core::plan::{ExpertReads, Policy, Schedule, Tier, TierCounts, Workload};
use ferry_core::profile::Profile;
use ferry_core::schedule::{lower, Steps};
use ferry_core::topology::{DeviceSlot, Place, Resource};
use ferry_core::units::{KIB, MIB};
use ferry_engine::backend::CpuBackend;
use ferry_engine::kernels::quant::BlockFormat;
use ferry_engine::synth_gguf::GgufStorage;
use ferry_engine::weights::ModelFiles;
use ferry_engine::{run, RunOptions, RunReport};

use common::{assert_same, staged};

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

/// `profile` with `count` devices of its kind, each with `device_bytes` of memory.
fn with_devices(profile: &Profile, count: usize, device_bytes: u64) -> Profile {
    let mut p = profile.clone();
    p.devices = vec![DeviceSlot { host: 0, memory_bytes: device_bytes, profile: None }; count];
    p
}

fn base_policy(layers: u64) -> Policy {
    Policy { chunk_bytes: 64 * KIB, io_queue_depth: 2, ..Policy::all_on_device(layers, 4, Dtype::F32) }
}

/// `base_policy` for a file planned as stored (a GGUF file's block formats).
fn stored_policy(layers: u64) -> Policy {
    let mut p = base_policy(layers);
    p.set_weight_format(WeightFormats::stored());
    p
}

fn execute(dir: &Path, files: &ModelFiles, policy: &Policy, workload: &Workload, profile: &Profile) -> RunReport {
    let graph = lower(policy, &files.spec, workload, profile, &Steps::Bound).unwrap();
    let options = RunOptions {
        prompts: prompts(workload.batch_size, workload.prompt_len, files.spec.vocab_size),
        scratch_dir: dir.join("scratch"),
        allow_buffered_io: true,
        keep_logits: true,
        progress: None,
        draft_files: None,
    };
    run(&graph, policy, workload, files, &CpuBackend::default(), &options).unwrap_or_else(|e| panic!("{policy:?}: {e}"))
}

#[test]
fn every_schedule_and_placement_computes_the_same_tokens_and_logits() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
    let model_dir = dir.path().join("model");
    ferry_engine::synth::synthesize(&spec, Dtype::F32, 7, &model_dir, false, |_, _| {}).unwrap();
    every_plan_agrees(dir.path(), &ModelFiles::open(&model_dir).unwrap(), base_policy);
}

/// The same over a Q4_0 GGUF file with the default 8-bit activations, whose rounding
/// would turn a last-bit difference between plans into a different next-layer input:
/// the plans must agree to the bit there.
#[test]
fn every_plan_over_32_value_block_files_with_8_bit_activations_computes_the_same_tokens_and_logits() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
    let file = dir.path().join("tiny-q4_0.gguf");
    let storage = GgufStorage::Blocks(BlockFormat::Q4_0);
    ferry_engine::synth_gguf::synthesize_gguf(&spec, storage, 7, &file, false, |_, _| {}).unwrap();
    every_plan_agrees(dir.path(), &ModelFiles::open(&file).unwrap(), stored_policy);
    // IQ4_NL (Q4_0's blocks on a non-linear grid), Q4_1 and Q5_1 (a minimum per block).
    for format in [BlockFormat::IQ4NL, BlockFormat::Q4_1, BlockFormat::Q5_1] {
        let file = dir.path().join(format!("tiny-{}.gguf", format.name()));
        let storage = GgufStorage::Blocks(format);
        ferry_engine::synth_gguf::synthesize_gguf(&spec, storage, 7, &file, false, |_, _| {}).unwrap();
        every_plan_agrees(dir.path(), &ModelFiles::open(&file).unwrap(), stored_policy);
    }
}

/// The same over K-quant files (Q4_K, Q6_K, Q2_K and llama.cpp's Q4_K_M, Q5_K_M and Q3_K_M mixtures,
/// IQ4_XS, plain and in llama.cpp's mixture, and the lattice formats,
/// whose products also take 8-bit activations): test-tiny widened to whole 256-value
/// super-blocks.
#[test]
fn every_plan_over_k_quant_files_with_8_bit_activations_computes_the_same_tokens_and_logits() {
    let mut spec = Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
    (spec.hidden_size, spec.intermediate_size) = (256, 512);
    let storages = [
        GgufStorage::Blocks(BlockFormat::Q4K),
        GgufStorage::Blocks(BlockFormat::Q6K),
        GgufStorage::Blocks(BlockFormat::Q2K),
        GgufStorage::Q4KM,
        GgufStorage::Q5KM,
        GgufStorage::Q3KM,
        GgufStorage::Blocks(BlockFormat::IQ4XS),
        GgufStorage::IQ4XSMixture,
        // Lattice formats: a scale per 32 (IQ2_XXS, IQ3_S) or per 16 (IQ2_S, IQ1_M).
        GgufStorage::Blocks(BlockFormat::IQ2XXS),
        GgufStorage::Blocks(BlockFormat::IQ2S),
        GgufStorage::Blocks(BlockFormat::IQ3S),
        GgufStorage::Blocks(BlockFormat::IQ1M),
    ];
    for storage in storages {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(format!("tiny-{storage:?}.gguf"));
        ferry_engine::synth_gguf::synthesize_gguf(&spec, storage, 7, &file, false, |_, _| {}).unwrap();
        every_plan_agrees(dir.path(), &ModelFiles::open(&file).unwrap(), stored_policy);
    }
}

/// The same over mixtures of experts (8 experts, 2 per token; Mixtral's shape, and
/// Qwen3-MoE's with its wider heads and per-head q/k norms), where micro-batching
/// changes which tokens an expert multiplies together.
#[test]
fn every_plan_over_a_mixture_of_experts_computes_the_same_tokens_and_logits() {
    for model in ["test-tiny-moe", "test-tiny-qwen3-moe", "test-tiny-qwen2-moe"] {
        let dir = tempfile::tempdir().unwrap();
        let spec = Catalog::builtin().unwrap().model(model).unwrap().value;
        let model_dir = dir.path().join("model");
        ferry_engine::synth::synthesize(&spec, Dtype::F32, 7, &model_dir, false, |_, _| {}).unwrap();
        every_plan_agrees(dir.path(), &ModelFiles::open(&model_dir).unwrap(), base_policy);
    }
}

/// Runs every schedule, placement and micro-batching (`base` gives the plan every case
/// starts from) and requires the tokens and logits of the all-resident plan.
fn every_plan_agrees(dir: &Path, files: &ModelFiles, base_policy: fn(u64) -> Policy) {
    let layers = files.spec.num_layers;
    let workload = Workload { batch_size: 4, prompt_len: 6, gen_len: 4 };
    let cpu = profile("cpu", "ferry-ci-vm", 64 * MIB);
    let discrete = profile("rtx3060-12gb", "desktop-pcie4", 64 * MIB);

    let reference = execute(dir, files, &base_policy(layers), &workload, &cpu);
    assert_eq!(reference.tokens.len(), 4);
    assert!(reference.tokens.iter().all(|t| t.len() == 4));

    let mut cases: Vec<(String, Policy, &Profile)> = Vec::new();
    for schedule in Schedule::ALL {
        for (mb, n) in [(4, 1), (2, 2), (1, 4)] {
            // Unified memory (the cpu backend): weights and KV on device or disk.
            let mut p = base_policy(layers);
            p.schedule = schedule;
            p.micro_batch_size = mb;
            p.num_micro_batches = n;
            p.attention_weights = TierCounts { device: 1, host: 0, disk: layers - 1 };
            p.mlp_weights = TierCounts { device: 0, host: 0, disk: layers };
            p.kv_cache = TierCounts { device: 2, host: 0, disk: layers - 2 };
            p.prefetch_depth = 2;
            p.chunk_bytes = 16 * KIB;
            cases.push((format!("cpu {schedule:?} {mb}x{n} disk"), p.clone(), &cpu));
            let untied = !files.spec.tie_word_embeddings;
            if untied && mb == 2 {
                // The embedding table left in the file: each lookup reads its rows.
                let mut e = p.clone();
                e.embeddings = Tier::Disk;
                cases.push((format!("cpu {schedule:?} {mb}x{n} disk, embeddings on disk"), e, &cpu));
            }
            if files.spec.num_experts > 0 {
                // Every expert of a layer read ahead, beside the routed reads of the rest.
                let mut w = p.clone();
                w.expert_reads = ExpertReads::Whole;
                cases.push((format!("cpu {schedule:?} {mb}x{n} disk, whole experts"), w.clone(), &cpu));
                // Pieces larger than an expert's projections: pipelined reads pack several
                // whole projections into one piece, read from disk or copied from the host.
                w.chunk_bytes = 256 * KIB;
                cases.push((format!("cpu {schedule:?} {mb}x{n} disk, whole experts, packed pieces"), w.clone(), &cpu));
                w.mlp_weights = TierCounts { device: 1, host: layers - 1, disk: 0 };
                w.embeddings = Tier::Host;
                cases.push((format!("discrete {schedule:?} {mb}x{n} host experts, packed pieces"), w, &discrete));
                // Routed reads with three experts of each streamed layer kept on the device,
                // and on a discrete device two more read ahead with the router part.
                let mut h = p.clone();
                h.hot_experts = 3;
                cases.push((format!("cpu {schedule:?} {mb}x{n} disk, hot experts"), h.clone(), &cpu));
                h.mlp_weights = TierCounts { device: 1, host: layers - 1, disk: 0 };
                h.embeddings = Tier::Host;
                h.prefetched_experts = 2;
                cases.push((format!("discrete {schedule:?} {mb}x{n} host experts, hot and prefetched"), h, &discrete));
            }
            // A discrete device: host-resident weights and KV, host attention, pinned copies.
            let mut q = p.clone();
            q.attention_weights = TierCounts { device: 1, host: 2, disk: layers - 3 };
            q.mlp_weights = TierCounts { device: 1, host: 1, disk: layers - 2 };
            q.kv_cache = TierCounts { device: 1, host: 2, disk: layers - 3 };
            q.host_attention = true;
            q.embeddings = Tier::Host;
            q.copy_streams = 2;
            q.pinned_host_bytes = 256 * KIB;
            cases.push((format!("discrete {schedule:?} {mb}x{n} host attention"), q.clone(), &discrete));
            // Device attention over streamed host/disk KV; head on the host.
            let mut r = q.clone();
            r.host_attention = false;
            r.head = Tier::Host;
            if untied && mb == 1 {
                // Rows read to the host, looked up there, the hidden state copied up.
                let mut e = r.clone();
                e.embeddings = Tier::Disk;
                cases.push((format!("discrete {schedule:?} {mb}x{n} kv streamed, embeddings on disk"), e, &discrete));
            }
            cases.push((format!("discrete {schedule:?} {mb}x{n} kv streamed"), r, &discrete));
        }
        // llama.cpp's split: host layers computed on the host.
        let mut s = base_policy(layers);
        s.schedule = schedule;
        s.compute_host_layers_on_host = true;
        s.attention_weights = TierCounts { device: 2, host: 2, disk: 0 };
        s.mlp_weights = s.attention_weights;
        s.kv_cache = TierCounts { device: 2, host: 2, disk: 0 };
        cases.push((format!("discrete {schedule:?} llama.cpp split"), s.clone(), &discrete));
        // llama.cpp's --n-cpu-moe: attention (and KV) on the device, some layers' MLPs
        // on the host and computed there.
        let mut e = s;
        e.attention_weights = TierCounts { device: layers, host: 0, disk: 0 };
        e.mlp_weights = TierCounts { device: 1, host: layers - 1, disk: 0 };
        e.kv_cache = TierCounts { device: layers, host: 0, disk: 0 };
        cases.push((format!("discrete {schedule:?} MLPs on the host"), e, &discrete));
    }
    // Several stages: layers split over devices, the hidden state crossing the link
    // between them (two or three cpu devices on one host, each with its own budget;
    // two discrete devices with host-resident and streamed weights and KV).
    let two_cpus = with_devices(&cpu, 2, 32 * MIB);
    let three_cpus = with_devices(&cpu, 3, 32 * MIB);
    let two_gpus = with_devices(&discrete, 2, 32 * MIB);
    let all = |tier: Tier, n: u64| TierCounts::all(tier, n);
    let mixed = |n: u64| TierCounts { device: 1, host: 0, disk: n - 1 };
    for schedule in Schedule::ALL {
        for (mb, n) in [(4, 1), (2, 2)] {
            let mut p = base_policy(layers);
            p.schedule = schedule;
            p.micro_batch_size = mb;
            p.num_micro_batches = n;
            p.prefetch_depth = 2;
            p.chunk_bytes = 16 * KIB;
            let resident = staged(&p, &[2, 2], &[0, 1], |_, n| [all(Tier::Device, n); 3]);
            cases.push((format!("2 cpu stages {schedule:?} {mb}x{n} resident"), resident, &two_cpus));
            let streamed = staged(&p, &[1, 3], &[1, 0], |i, n| {
                if i == 0 {
                    [all(Tier::Disk, n), all(Tier::Device, n), all(Tier::Disk, n)]
                } else {
                    [mixed(n), all(Tier::Disk, n), mixed(n)]
                }
            });
            if !files.spec.tie_word_embeddings && mb == 2 {
                let mut e = streamed.clone();
                e.embeddings = Tier::Disk;
                cases.push((format!("2 cpu stages {schedule:?} {mb}x{n} streamed, embeddings on disk"), e, &two_cpus));
            }
            cases.push((format!("2 cpu stages {schedule:?} {mb}x{n} streamed, devices reversed"), streamed, &two_cpus));
            let three = staged(&p, &[1, 1, 2], &[0, 1, 2], |i, n| {
                [if i == 1 { all(Tier::Disk, n) } else { all(Tier::Device, n) }, mixed(n), all(Tier::Device, n)]
            });
            cases.push((format!("3 cpu stages {schedule:?} {mb}x{n}"), three, &three_cpus));
            let mut q = p.clone();
            q.host_attention = true;
            q.embeddings = Tier::Host;
            q.head = Tier::Host;
            q.copy_streams = 2;
            q.pinned_host_bytes = 256 * KIB;
            let gpus = staged(&q, &[2, 2], &[0, 1], |i, n| {
                let host = TierCounts { device: 1, host: 1, disk: n - 2 };
                if i == 0 {
                    [host, mixed(n), host]
                } else {
                    [TierCounts { device: 0, host: 1, disk: n - 1 }, host, mixed(n)]
                }
            });
            cases.push((format!("2 discrete stages {schedule:?} {mb}x{n} host attention"), gpus, &two_gpus));
        }
    }
    for (what, policy, profile) in &cases {
        let report = execute(dir, files, policy, &workload, profile);
        assert_same(&reference, &report, what);
        // Every pool stayed inside its budget.
        for pool in &report.metrics.pools {
            assert!(pool.peak_bytes <= pool.capacity_bytes, "{what}: {pool:?}");
        }
        // Host-placed groups under llama.cpp's split were computed on the host.
        if policy.compute_host_layers_on_host && policy.mlp_weights.host > 0 {
            let host = Resource::compute(Place::HOST);
            assert!(report.metrics.utilization(host) > 0.0, "{what}: nothing was computed on the host");
        }
        // A multi-stage run used every stage's device and moved activations between them.
        if policy.stages.len() > 1 {
            let devices = report.metrics.pools.iter().filter(|p| p.pool.is_device()).count();
            assert_eq!(devices, policy.stages.len(), "{what}: one pool per stage device");
            let peer_busy = report.metrics.resources.iter().any(|r| {
                matches!(r.resource, Resource::Link { from, to } if from.is_device() && to.is_device()) && r.busy_ns > 0
            });
            assert!(peer_busy, "{what}: the hidden state never crossed a device-to-device link");
            for stage in &policy.stages {
                let compute = Resource::compute(Place::Device(stage.device));
                assert!(report.metrics.utilization(compute) > 0.0, "{what}: device {} never computed", stage.device);
            }
        }
    }
}

/// Sharded files (with model.safetensors.index.json), f16 weights and tied embeddings
/// load and run; the sharded copy computes exactly what the single file does.
#[test]
fn sharded_f16_and_tied_models_run() {
    use ferry_engine::safetensors::{read_header, write};
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::builtin().unwrap();
    let spec = catalog.model("test-tiny").unwrap().value;
    let single = dir.path().join("single");
    ferry_engine::synth::synthesize(&spec, Dtype::F16, 5, &single, false, |_, _| {}).unwrap();
    // Split the single file into two shards plus an index, as Hugging Face writes them.
    let sharded = dir.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    std::fs::copy(single.join("config.json"), sharded.join("config.json")).unwrap();
    let header = read_header(&single.join("model.safetensors")).unwrap();
    let bytes = std::fs::read(single.join("model.safetensors")).unwrap();
    let names: Vec<&String> = header.keys().collect();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let tensors: Vec<(String, Dtype, Vec<u64>)> =
            part.iter().map(|n| ((*n).clone(), Dtype::F16, header[*n].shape.clone())).collect();
        write(&sharded.join(shard), false, &tensors, |i, out| {
            let t = &header[&tensors[i].0];
            out.write_all(&bytes[t.start as usize..t.end as usize])
        })
        .unwrap();
        for n in part {
            weight_map.insert((*n).clone(), shard.into());
        }
    }
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();

    let workload = Workload { batch_size: 2, prompt_len: 5, gen_len: 3 };
    let cpu = profile("cpu", "ferry-ci-vm", 64 * MIB);
    let mut policy = base_policy(spec.num_layers);
    policy.set_weight_format(ferry_core::model::WeightFormats::uniform(ferry_core::model::WeightFormat::F16));
    policy.kv_dtype = Dtype::F16;
    policy.micro_batch_size = 2;
    policy.schedule = Schedule::Pipelined;
    policy.mlp_weights = TierCounts { device: 1, host: 0, disk: spec.num_layers - 1 };
    let a = execute(dir.path(), &ModelFiles::open(&single).unwrap(), &policy, &workload, &cpu);
    let b = execute(dir.path(), &ModelFiles::open(&sharded).unwrap(), &policy, &workload, &cpu);
    assert_same(&a, &b, "sharded vs single file");

    // Tied embeddings: no lm_head tensor; the head projects with the embeddings.
    let tied = dir.path().join("tied");
    let mut tied_spec = spec.clone();
    tied_spec.tie_word_embeddings = true;
    ferry_engine::synth::synthesize(&tied_spec, Dtype::F16, 5, &tied, false, |_, _| {}).unwrap();
    let files = ModelFiles::open(&tied).unwrap();
    assert!(files.tensor("lm_head.weight").is_none());
    let report = execute(dir.path(), &files, &policy, &workload, &cpu);
    assert!(report.tokens.iter().all(|t| t.len() == 3));
    assert_ne!(report.logits[0][0], a.logits[0][0], "tied and untied heads must differ");
}
