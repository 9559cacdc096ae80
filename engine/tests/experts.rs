//! Routed expert reads: with a mixture of experts' MLPs on disk, the engine reads each
//! layer's router part and then only the experts the visit's tokens were routed to —
//! the bytes it asks of storage are exactly those, whatever the file's layout (a
//! safetensors folder keeps each expert together; a GGUF file keeps each projection of
//! every expert together) — and whole layers when the plan says `expert_reads: whole`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use ferry_core::catalog::Catalog;
use ferry_core::hardware::Hardware;
use ferry_core::model::{Dtype, WeightFormats, WeightGroup, WeightLayout};
use ferry_core::plan::{ExpertReads, Policy, Schedule, TierCounts, Workload};
use ferry_core::profile::Profile;
use ferry_core::schedule::{lower, Steps};
use ferry_core::units::{KIB, MIB};
use ferry_engine::backend::CpuBackend;
use ferry_engine::kernels::quant::BlockFormat;
use ferry_engine::synth_gguf::GgufStorage;
use ferry_engine::weights::ModelFiles;
use ferry_engine::{run, RunOptions, RunReport};

/// Attention, KV cache, embeddings and head on the device; every MLP on the disk.
fn experts_on_disk(layers: u64, schedule: Schedule, micro_batches: u64, formats: WeightFormats) -> Policy {
    let mut p = Policy { chunk_bytes: 64 * KIB, io_queue_depth: 2, ..Policy::all_on_device(layers, 1, Dtype::F32) };
    p.set_weight_format(formats);
    p.schedule = schedule;
    p.micro_batch_size = 4 / micro_batches;
    p.num_micro_batches = micro_batches;
    p.mlp_weights = TierCounts { device: 0, host: 0, disk: layers };
    p.prefetch_depth = 1;
    p
}

fn execute(dir: &Path, files: &ModelFiles, policy: &Policy) -> RunReport {
    let catalog = Catalog::builtin().unwrap();
    let mut profile = Profile::from_datasheet(&Hardware {
        gpu: catalog.gpu("cpu").unwrap().value,
        host: catalog.host("ferry-ci-vm").unwrap().value,
    });
    profile.device_memory_bytes = 64 * MIB;
    let workload = Workload { batch_size: 4, prompt_len: 5, gen_len: 3 };
    let graph = lower(policy, &files.spec, &workload, &profile, &Steps::Bound).unwrap();
    let vocab = files.spec.vocab_size;
    let options = RunOptions {
        prompts: (0..4).map(|s| (0..5).map(|t| ((s * 37 + t * 11 + 1) % vocab) as u32).collect()).collect(),
        scratch_dir: dir.join("scratch"),
        allow_buffered_io: true,
        keep_logits: false,
        progress: None,
        draft_files: None,
    };
    run(&graph, policy, &workload, files, &CpuBackend::default(), &options).unwrap()
}

/// The bytes a run reads when each visit reads its router part and the union of the
/// experts its micro-batches were routed to (every micro-batch of a step in a
/// layer-major schedule, each alone otherwise), but for the layer's hot experts.
fn routed_bytes(report: &RunReport, files: &ModelFiles, policy: &Policy, layer_major: bool) -> u64 {
    let layout = WeightLayout::of(&files.spec, &policy.weight_format);
    let mut visits: BTreeMap<(u32, u32, u32), BTreeSet<u16>> = BTreeMap::new();
    for used in &report.experts {
        let visit = if layer_major { 0 } else { used.micro_batch };
        visits.entry((used.step, used.layer, visit)).or_default().extend(&used.experts);
    }
    let steps = report.experts.iter().map(|u| u.step).max().unwrap() + 1;
    let layers = files.spec.num_layers as u32;
    let per_step = if layer_major { 1 } else { policy.num_micro_batches as usize };
    assert_eq!(visits.len(), (steps * layers) as usize * per_step, "every visit routed its tokens");
    visits
        .iter()
        .map(|(&(_, layer, _), experts)| {
            let sizes = layout.expert_bytes(&files.spec, layer as u64).unwrap();
            let hot = files.spec.hot_experts(layer as u64, policy.hot_experts);
            let ahead = files.spec.prefetched_experts(layer as u64, policy.hot_experts, policy.prefetched_experts);
            let cold = experts.iter().filter(|&&e| !hot.contains(&(e as usize)) && !ahead.contains(&(e as usize)));
            sizes.router + sizes.of(&ahead) + cold.map(|&e| sizes.experts[e as usize]).sum::<u64>()
        })
        .sum()
}

fn reads_only_routed_experts(files: &ModelFiles, formats: WeightFormats) {
    let dir = tempfile::tempdir().unwrap();
    let layers = files.spec.num_layers;
    let layout = WeightLayout::of(&files.spec, &formats);
    let whole_layers: u64 = (0..layers).map(|l| layout.bytes(WeightGroup::Mlp, l)).sum();
    for (schedule, micro_batches) in
        [(Schedule::LayerPrefetch, 1), (Schedule::LayerPrefetch, 2), (Schedule::ZigzagBlock, 2)]
    {
        let what = format!("{schedule:?} ×{micro_batches}");
        let policy = experts_on_disk(layers, schedule, micro_batches, formats.clone());
        let routed = execute(dir.path(), files, &policy);
        let layer_major = schedule == Schedule::ZigzagBlock;
        let expected = routed_bytes(&routed, files, &policy, layer_major);
        assert_eq!(routed.requested_read_bytes, expected, "{what}: the routed experts' bytes, no more");
        let visits_per_step = if layer_major { 1 } else { micro_batches };
        let steps = 3;
        assert!(
            routed.requested_read_bytes < visits_per_step * steps * whole_layers,
            "{what}: fewer bytes than whole layers"
        );
        // Whole layers read ahead: every byte of every layer, each visit; the same tokens.
        let mut whole = policy.clone();
        whole.expert_reads = ExpertReads::Whole;
        let all = execute(dir.path(), files, &whole);
        assert_eq!(all.requested_read_bytes, visits_per_step * steps * whole_layers, "{what}: whole layers");
        assert_eq!(all.tokens, routed.tokens, "{what}: the same tokens either way");
        assert!(routed.metrics.pools.iter().all(|p| p.peak_bytes <= p.capacity_bytes), "{what}: within budget");
        // Three experts a layer kept on the device: never read again, the same tokens.
        let mut hot = policy.clone();
        hot.hot_experts = 3;
        let kept = execute(dir.path(), files, &hot);
        assert_eq!(kept.tokens, routed.tokens, "{what}: the same tokens with hot experts");
        let expected = routed_bytes(&kept, files, &hot, layer_major);
        assert_eq!(kept.requested_read_bytes, expected, "{what}: the routed experts' bytes but the hot ones'");
        assert!(kept.requested_read_bytes < routed.requested_read_bytes, "{what}: hot experts are not read");
        assert!(kept.metrics.pools.iter().all(|p| p.peak_bytes <= p.capacity_bytes), "{what}: within budget");
        // Two more read ahead with the router part, whether routed to or not.
        hot.prefetched_experts = 2;
        let ahead = execute(dir.path(), files, &hot);
        assert_eq!(ahead.tokens, routed.tokens, "{what}: the same tokens with prefetched experts");
        let expected = routed_bytes(&ahead, files, &hot, layer_major);
        assert_eq!(ahead.requested_read_bytes, expected, "{what}: router parts, prefetched and other routed experts");
        assert!(ahead.metrics.pools.iter().all(|p| p.peak_bytes <= p.capacity_bytes), "{what}: within budget");
        hot.prefetched_experts = 0;
        // Every expert kept: a visit reads its router part only.
        hot.hot_experts = files.spec.num_experts;
        let all_kept = execute(dir.path(), files, &hot);
        assert_eq!(all_kept.tokens, routed.tokens, "{what}: the same tokens with every expert kept");
        let router: u64 = (0..layers).map(|l| layout.expert_bytes(&files.spec, l).unwrap().router).sum();
        assert_eq!(all_kept.requested_read_bytes, visits_per_step * steps * router, "{what}: router parts only");
    }
}

#[test]
fn experts_on_disk_are_read_only_when_routed() {
    let spec = Catalog::builtin().unwrap().model("test-tiny-moe").unwrap().value;
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("model");
    ferry_engine::synth::synthesize(&spec, Dtype::F32, 7, &folder, false, |_, _| {}).unwrap();
    reads_only_routed_experts(&ModelFiles::open(&folder).unwrap(), WeightFormats::float(Dtype::F32).unwrap());

    let file = dir.path().join("moe-q8_0.gguf");
    let storage = GgufStorage::Blocks(BlockFormat::Q8_0);
    ferry_engine::synth_gguf::synthesize_gguf(&spec, storage, 7, &file, false, |_, _| {}).unwrap();
    reads_only_routed_experts(&ModelFiles::open(&file).unwrap(), WeightFormats::stored());
}
