//! The rate at which a target accepts a draft's tokens, measured by running both on
//! this machine's engine (`ferry profile --model DIR --draft D`): greedy speculative
//! decoding of random prompts with every weight resident, counted by the engine's own
//! verification (each sequence on its own: a draft token is judged until its sequence's
//! first disagreement in a round). The speculative tuner predicts with it.

use std::path::Path;
use std::sync::Arc;

use ferry_core::model::Dtype;
use ferry_core::plan::{Draft, Policy, Speculation, Workload};
use ferry_core::profile::{MeasuredAcceptance, Profile};
use ferry_core::schedule::{lower, Steps};
use ferry_engine::backend::CpuBackend;
use ferry_engine::synth::SplitMix64;
use ferry_engine::weights::ModelFiles;
use ferry_engine::RunOptions;

use crate::ProfileError;

/// The run that measures: sequences decoded together, their lengths, the prompts' seed.
#[derive(Debug, Clone, Copy)]
pub struct AcceptanceRun {
    pub sequences: u64,
    pub prompt_len: u64,
    pub gen_len: u64,
    pub draft_len: u32,
    pub seed: u64,
}

impl AcceptanceRun {
    pub fn new(quick: bool, draft_len: u32) -> AcceptanceRun {
        let (sequences, gen_len) = if quick { (4, 32) } else { (8, 64) };
        AcceptanceRun { sequences, prompt_len: 32, gen_len, draft_len, seed: 7 }
    }
}

/// Runs `target` with `draft` (the target's first layers, or the model at `draft_path`)
/// under `profile`'s machine and returns what the engine measured. `draft_name` is how
/// `ferry tune --draft` names it (`self:L`, or the draft's name).
pub fn measure_acceptance(
    target: &ModelFiles,
    draft: Draft,
    draft_path: Option<&Path>,
    draft_name: &str,
    profile: &Profile,
    run: AcceptanceRun,
    scratch_dir: &Path,
) -> Result<MeasuredAcceptance, ProfileError> {
    let spec = &target.spec;
    let draft_files = draft_path.map(ModelFiles::open).transpose()?;
    let speculation = Speculation {
        draft,
        draft_len: run.draft_len,
        // Not used by the engine: it verifies and counts; the plan must carry a rate.
        acceptance_rate: 0.5,
        draft_spec: draft_files.as_ref().map(|f| Arc::new(f.spec.clone())),
    };
    speculation.validate(spec)?;
    let mut policy = Policy::all_on_device(spec.num_layers, run.sequences, Dtype::F32);
    policy.set_weight_format(target.formats.clone());
    policy.speculation = Some(speculation);
    let workload = Workload { batch_size: run.sequences, prompt_len: run.prompt_len, gen_len: run.gen_len };
    // Everything resident: the rate is the models', whatever the budget.
    let mut machine = profile.clone();
    machine.device_memory_bytes = machine.host_memory_bytes;
    let graph = lower(&policy, spec, &workload, &machine, &Steps::Bound)?;
    let mut rng = SplitMix64::new(run.seed);
    let prompts = (0..run.sequences)
        .map(|_| (0..run.prompt_len).map(|_| (rng.next_u64() % spec.vocab_size) as u32).collect())
        .collect();
    let options = RunOptions {
        prompts,
        scratch_dir: scratch_dir.to_path_buf(),
        allow_buffered_io: true,
        keep_logits: false,
        progress: None,
        draft_files,
    };
    let report = ferry_engine::run(&graph, &policy, &workload, target, &CpuBackend::default(), &options)?;
    let measured = report
        .speculation
        .ok_or_else(|| ProfileError::Unsupported("the speculative run reported no acceptance".into()))?;
    Ok(MeasuredAcceptance {
        target: spec.name.clone(),
        draft: draft_name.to_string(),
        draft_len: run.draft_len,
        acceptance_rate: measured.acceptance_rate,
        judged: measured.agreed + measured.rejections,
        sequences: run.sequences,
        tokens_per_sequence: run.gen_len,
    })
}
