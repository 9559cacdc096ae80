//! Running one plan for real and predicting it, with the disk measured around the run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_core::graph::{Resource, TaskGraph};
use ferry_core::plan::Plan;
use ferry_core::profile::Profile;
use ferry_core::schedule::{lower, Steps};
use ferry_core::trace::{Metrics, Trace};
use ferry_core::units::MIB;
use ferry_core::CoreError;
use ferry_engine::io::{DiskFile, ReadPool, ReadPriority};
use ferry_engine::memory::Recycler;
use ferry_engine::synth::SplitMix64;
use ferry_engine::weights::ModelFiles;
use ferry_engine::{backend::Backend, run, RunOptions};
use ferry_sim::cost::CostModel;

use crate::sweep::describe;
use crate::{ExpertsPerStep, PlanResult, ValidateError};

/// One plan, run and predicted: the comparison, with the graph and both traces.
pub struct Measured {
    pub result: PlanResult,
    pub graph: TaskGraph,
    pub predicted: Trace,
    pub measured: Trace,
}

/// The model's weights file whose disk is re-measured: a GGUF model's file itself, or
/// a folder's `model.safetensors`, or else its first `.safetensors` file.
pub fn weights_file(model_dir: &Path) -> Option<PathBuf> {
    if model_dir.is_file() {
        return Some(model_dir.to_path_buf());
    }
    ["model.safetensors"].iter().map(|f| model_dir.join(f)).find(|p| p.exists()).or_else(|| {
        std::fs::read_dir(model_dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
    })
}

/// Drops the kernel's page cache; false when not permitted (not root).
pub fn drop_page_cache() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "1\n").is_ok()
}

/// Read bandwidth of the disk holding `file`, GB/s: direct I/O through the engine's read
/// pool at this request size and queue depth, over up to 512 MiB of the file, into a
/// recycled buffer — measured the way the profile measured it and the engine reads
/// (into fresh mappings it would be slower: the kernel faults and zeroes every page).
pub fn disk_read_gbps(file: &Path, chunk: u64, depth: u32) -> Result<f64, ValidateError> {
    let disk = Arc::new(DiskFile::open(file, false)?);
    let len = recheck_len(file)?;
    let piece = len.min(RECHECK_PIECE);
    let pieces = (len / piece.max(1)).clamp(1, 8);
    let pool = ReadPool::new(depth as usize);
    let recycler = Recycler::new();
    recycler.set_limit(u64::MAX);
    let read =
        |offset: u64| pool.read_recycled(&disk, &[(offset, offset + piece)], chunk, ReadPriority::Stream, &recycler);
    // The first read maps the buffer; the timed ones reuse it.
    read(len - piece)?;
    let start = std::time::Instant::now();
    for i in 0..pieces {
        read(i * piece)?;
    }
    Ok((pieces * piece) as f64 / start.elapsed().as_secs_f64() / 1e9)
}

/// Bytes `disk_read_gbps` reads at once: pieces of the file no larger than this.
const RECHECK_PIECE: u64 = 64 * MIB;

fn recheck_len(file: &Path) -> Result<u64, ValidateError> {
    Ok(std::fs::metadata(file).map_err(|e| CoreError::io(file, e))?.len() / 4096 * 4096)
}

/// The profile's read rate at the operating point `disk_read_gbps` measures for this
/// request size and depth, GB/s: requests of min(chunk, piece) bytes, as many in flight
/// as a piece holds up to `depth` (a chunk of a piece or more is one request at a time).
/// A recheck compares like with like: the curve at the plan's chunk and depth would
/// price requests the recheck never issued.
pub fn profiled_read_gbps(profile: &Profile, file: &Path, chunk: u64, depth: u32) -> Result<f64, ValidateError> {
    let piece = recheck_len(file)?.clamp(1, RECHECK_PIECE);
    let request = chunk.clamp(1, piece);
    let in_flight = (piece.div_ceil(request)).min(depth.max(1) as u64) as u32;
    Ok(profile.disk_read.bytes_per_ns(request, in_flight))
}

/// Runs `plan` on the engine (random prompts, direct I/O, page cache dropped first) and
/// predicts it with `base_profile` at the plan's device budget. With `disk_file`, the
/// disk's read rate is measured right before and right after the run, and the profile's
/// disk curves are scaled to the mean before predicting.
pub fn predict_and_run(
    plan: &Plan,
    files: &ModelFiles,
    base_profile: &Profile,
    backend: &dyn Backend,
    disk_file: Option<&Path>,
    scratch_dir: &Path,
) -> Result<Measured, ValidateError> {
    let spec = &files.spec;
    let mut profile = base_profile.clone();
    profile.device_memory_bytes = plan.hardware.device_memory.unwrap_or(profile.device_memory_bytes);
    let graph = lower(&plan.policy, spec, &plan.workload, &profile, &Steps::Bound)?;
    // The disk's read rate at this plan's request size and depth, right before the run
    // and again right after it: the mean estimates what the run had (this disk drifts by
    // tens of percent within minutes). Nothing from the run itself enters the prediction.
    let recheck = disk_file.map(|file| (file, plan.policy.chunk_bytes, plan.policy.io_queue_depth));
    let before = recheck.map(|(file, chunk, depth)| disk_read_gbps(file, chunk, depth)).transpose()?;
    // The interval a user of the profile is shown: from its drift, without the recheck.
    let interval = ferry_sim::interval(&plan.policy, spec, &plan.workload, &profile, ferry_sim::Extrapolation::Full)
        .map_err(ValidateError::Simulate)?;
    let mut rng = SplitMix64::new(plan.workload.batch_size);
    let prompts = (0..plan.workload.batch_size)
        .map(|_| (0..plan.workload.prompt_len).map(|_| (rng.next_u64() % spec.vocab_size) as u32).collect())
        .collect();
    let options = RunOptions {
        prompts,
        scratch_dir: scratch_dir.to_path_buf(),
        allow_buffered_io: false,
        keep_logits: false,
        progress: None,
        draft_files: None,
    };
    drop_page_cache();
    let report = run(&graph, &plan.policy, &plan.workload, files, backend, &options)
        .map_err(|source| ValidateError::Run { plan: describe(plan), source })?;
    let experts_per_step = report
        .mean_experts(false)
        .map(|measured| ExpertsPerStep { predicted: spec.expected_experts(plan.policy.micro_batch_size), measured });
    let measured = report.metrics;
    let mut disk_factor = 1.0;
    if let (Some((file, chunk, depth)), Some(before)) = (recheck, before) {
        let fresh = (before + disk_read_gbps(file, chunk, depth)?) / 2.0;
        let profiled = profiled_read_gbps(&profile, file, chunk, depth)?;
        if fresh > 0.0 && profiled > 0.0 {
            disk_factor = fresh / profiled;
            profile.scale_disk_reads(disk_factor);
        }
    }
    let predicted_trace =
        ferry_sim::simulate(&graph, &CostModel::for_formats(&profile, spec, &plan.policy.weight_format))
            .map_err(ValidateError::Simulate)?
            .trace;
    let predicted = Metrics::compute(&graph, &predicted_trace);
    let busy = |m: &Metrics| {
        m.resources.iter().filter(|r| r.busy_ns > 0).map(|r| (r.resource, r.busy_ns as f64 / 1e9)).collect()
    };
    let achieved_rates = achieved_rates(&predicted, &measured, &handoffs_ns(&graph, &profile));
    let replayed = replay(&graph, &profile, spec, &plan.policy.weight_format, &achieved_rates)?;
    let error_pct = |predicted: f64| (predicted / measured.tokens_per_s - 1.0) * 100.0;
    let result = PlanResult {
        plan: describe(plan),
        predicted_tokens_per_s: predicted.tokens_per_s,
        measured_tokens_per_s: measured.tokens_per_s,
        signed_error_pct: error_pct(predicted.tokens_per_s),
        replayed_tokens_per_s: replayed,
        replayed_error_pct: error_pct(replayed),
        achieved_rates,
        interval: interval.map(|i| [i.slow_tokens_per_s, i.fast_tokens_per_s]),
        disk_factor,
        run_errors_pct: vec![error_pct(predicted.tokens_per_s)],
        predicted_busy_s: busy(&predicted),
        measured_busy_s: busy(&measured),
        experts_per_step,
    };
    Ok(Measured { result, graph, predicted: predicted_trace, measured: report.trace })
}

/// How fast each resource ran in the measured run against the prediction: predicted
/// busy time ÷ measured busy time (the same tasks move the same bytes and do the same
/// work in both, so this is the achieved rate ÷ the profile's; 2: twice as fast). A
/// measured trace's spans hold the work alone, so the hand-overs the prediction counts
/// into its compute tasks (`handoffs`, ns per resource) are taken out of its busy time.
pub fn achieved_rates(predicted: &Metrics, measured: &Metrics, handoffs: &[(Resource, f64)]) -> Vec<(Resource, f64)> {
    predicted
        .resources
        .iter()
        .filter_map(|p| {
            let m = measured.resources.iter().find(|m| m.resource == p.resource)?;
            let handoff_ns = handoffs.iter().find(|(r, _)| *r == p.resource).map_or(0.0, |(_, ns)| *ns);
            let work_ns = p.busy_ns as f64 - handoff_ns;
            (work_ns > 0.0 && m.busy_ns > 0).then(|| (p.resource, work_ns / m.busy_ns as f64))
        })
        .collect()
}

/// The hand-overs Ferry's scheduler adds before a plan's compute tasks, ns per
/// processor (`ComputeProfile::handoff_ns` times its compute tasks).
fn handoffs_ns(graph: &TaskGraph, profile: &Profile) -> Vec<(Resource, f64)> {
    let mut totals: Vec<(Resource, f64)> = Vec::new();
    for task in graph.tasks.iter().filter(|t| t.kind == ferry_core::graph::TaskKind::Compute) {
        let resource = task.resource();
        let handoff_ns = match resource {
            Resource::Compute { at: ferry_core::graph::Place::Device(d) } => profile.device(d).compute.handoff_ns,
            Resource::Compute { at: ferry_core::graph::Place::Host(h) } => profile.host(h).compute.handoff_ns,
            _ => 0,
        };
        match totals.iter_mut().find(|(r, _)| *r == resource) {
            Some((_, total)) => *total += handoff_ns as f64,
            None => totals.push((resource, handoff_ns as f64)),
        }
    }
    totals
}

/// The plan predicted again with every resource at the rate the run achieved: what is
/// left of the error is the model's own (overlap, dependencies, what the graph leaves
/// out), free of the machine's drift. Tokens/s.
fn replay(
    graph: &TaskGraph,
    profile: &Profile,
    spec: &ferry_core::model::ModelSpec,
    weight_format: &ferry_core::model::WeightFormats,
    achieved_rates: &[(Resource, f64)],
) -> Result<f64, ValidateError> {
    let mut replayed = profile.clone();
    for &(resource, factor) in achieved_rates {
        replayed.scale_resource(resource, factor);
    }
    let cost = CostModel::for_formats(&replayed, spec, weight_format);
    let trace = ferry_sim::simulate(graph, &cost).map_err(ValidateError::Simulate)?.trace;
    Ok(Metrics::compute(graph, &trace).tokens_per_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "run" that differs from the prediction only in its rates (simulated on a
    /// profile whose disk is half and whose processor is 0.8 times as fast): the
    /// achieved rates recover both factors, and the replay recovers its speed.
    #[test]
    fn replaying_the_achieved_rates_recovers_a_run_that_differs_only_in_rates() {
        use ferry_core::catalog::Catalog;
        use ferry_core::hardware::Hardware;
        use ferry_core::model::Dtype;
        use ferry_core::plan::{Policy, Schedule, TierCounts, Workload};
        let catalog = Catalog::builtin().unwrap();
        let spec = catalog.model("test-small").unwrap().value;
        let hardware =
            Hardware { gpu: catalog.gpu("cpu").unwrap().value, host: catalog.host("ferry-ci-vm").unwrap().value };
        let profile = Profile::from_datasheet(&hardware);
        let mut policy = Policy::all_on_device(spec.num_layers, 1, Dtype::F32);
        policy.schedule = Schedule::LayerPrefetch;
        policy.prefetch_depth = 1;
        policy.mlp_weights = TierCounts { device: 4, host: 0, disk: spec.num_layers - 4 };
        let workload = Workload { batch_size: 1, prompt_len: 8, gen_len: 4 };
        let graph = lower(&policy, &spec, &workload, &profile, &Steps::All).unwrap();
        let metrics_on = |profile: &Profile| {
            let cost = CostModel::for_formats(profile, &spec, &policy.weight_format);
            Metrics::compute(&graph, &ferry_sim::simulate(&graph, &cost).unwrap().trace)
        };
        let mut slower = profile.clone();
        slower.scale_resource(Resource::DISK, 0.5);
        slower.scale_resource(Resource::DEVICE_COMPUTE, 0.8);
        let (predicted, measured) = (metrics_on(&profile), metrics_on(&slower));
        let rates = achieved_rates(&predicted, &measured, &handoffs_ns(&graph, &profile));
        let rate = |resource| rates.iter().find(|(r, _)| *r == resource).unwrap().1;
        assert!((rate(Resource::DISK) - 0.5).abs() < 0.03, "{rates:?}");
        assert!((rate(Resource::DEVICE_COMPUTE) - 0.8).abs() < 0.05, "{rates:?}");
        let replayed = replay(&graph, &profile, &spec, &policy.weight_format, &rates).unwrap();
        assert!(predicted.tokens_per_s > measured.tokens_per_s * 1.2, "the rates matter to this plan");
        let error = (replayed / measured.tokens_per_s - 1.0).abs();
        assert!(error < 0.02, "replayed {replayed} against {} tokens/s", measured.tokens_per_s);

        // A profile with the engine's hand-over between compute tasks: a real run's
        // spans hold the work alone (the hand-over is the gap between them), so its
        // processor's rate is the work's, not the work and the gaps'.
        let mut handing = profile.clone();
        handing.device_compute.handoff_ns = 500_000;
        let mut work_only = slower.clone();
        work_only.device_compute.handoff_ns = 0;
        let (predicted, measured) = (metrics_on(&handing), metrics_on(&work_only));
        let rates = achieved_rates(&predicted, &measured, &handoffs_ns(&graph, &handing));
        let rate = |resource| rates.iter().find(|(r, _)| *r == resource).unwrap().1;
        assert!((rate(Resource::DEVICE_COMPUTE) - 0.8).abs() < 0.05, "{rates:?}");
    }

    #[test]
    fn the_rechecked_file_is_a_gguf_model_itself_or_a_folders_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("small-q4_k.gguf");
        std::fs::write(&gguf, b"GGUF").unwrap();
        assert_eq!(weights_file(&gguf), Some(gguf.clone()));
        let folder = dir.path().join("model");
        std::fs::create_dir(&folder).unwrap();
        assert_eq!(weights_file(&folder), None);
        let shard = folder.join("model-00001-of-00002.safetensors");
        std::fs::write(&shard, b"{}").unwrap();
        assert_eq!(weights_file(&folder), Some(shard));
        std::fs::write(folder.join("model.safetensors"), b"{}").unwrap();
        assert_eq!(weights_file(&folder), Some(folder.join("model.safetensors")));
    }
}
