//! ferry-validate: predicts and runs many plans on this machine and compares the two.
//! `sweep` chooses diverse plans (every schedule, several budgets, batches, depths and
//! chunks, each placed by the tuner), `measure` runs one plan on the engine with the
//! disk's read rate measured around the run and predicts it with the simulator,
//! `stats` computes error statistics, rank correlation and the tolerance gate, and
//! `report` writes `validation.md`, the predicted-vs-measured plot and per-plan traces.
//!
//! Must never: print. Progress and notes reach the caller through the `Event`
//! callback; the results come back as an `Outcome` for the caller to show.

pub mod measure;
pub mod report;
pub mod stats;
pub mod sweep;

use std::path::{Path, PathBuf};

use ferry_core::catalog::Catalog;
use ferry_core::graph::Resource;
use ferry_core::plan::HardwareRef;
use ferry_core::profile::{Drift, Profile, Provenance, RateRange, RateResource};
use ferry_core::resolve::resolve_hardware;
use ferry_core::{Classify, CoreError, ErrorKind};
use ferry_engine::weights::ModelFiles;
use ferry_engine::EngineError;
use ferry_reports::ReportError;
use ferry_sim::tune::TuneError;
use ferry_sim::SimError;

pub use stats::{spearman, ErrorStats, Tolerances};
pub use sweep::describe;

/// Errors of a validation: the other crates' errors, and which plan failed.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error(transparent)]
    Tune(#[from] TuneError),
    #[error(transparent)]
    Report(#[from] ReportError),
    /// A plan the engine failed to run; `plan` is its one-line description.
    #[error("{plan}")]
    Run {
        plan: String,
        #[source]
        source: EngineError,
    },
    /// The simulator failed on a plan.
    #[error("simulating a plan")]
    Simulate(#[source] SimError),
}

impl Classify for ValidateError {
    fn kind(&self) -> ErrorKind {
        match self {
            ValidateError::Core(e) => e.kind(),
            ValidateError::Engine(e) | ValidateError::Run { source: e, .. } => e.kind(),
            ValidateError::Sim(e) | ValidateError::Simulate(e) => e.kind(),
            ValidateError::Tune(e) => e.kind(),
            ValidateError::Report(e) => e.kind(),
        }
    }
}

/// Where the tolerances of the gate come from.
#[derive(Debug, Clone)]
pub enum ToleranceSource {
    /// Median and largest absolute error, percent; the largest defaults to 2.5 × the median.
    Percent { median_pct: f64, max_pct: Option<f64> },
    /// A YAML file with `median_pct`, `max_pct` and optionally `min_spearman`.
    File(PathBuf),
}

/// What to validate and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// Model folder to run (config.json + safetensors).
    pub model_dir: PathBuf,
    /// Profile of this machine; validation is meant for a measured one.
    pub profile: PathBuf,
    /// How many plans to predict and run (at most).
    pub plans: usize,
    /// Runs of each plan (at least 1): each is predicted and measured on its own, and
    /// the plan's result is the run of median error, so one run on a core that slowed
    /// for a second does not stand for the plan.
    pub runs: usize,
    /// The engine backend the plans run on (`cpu` or `cuda`).
    pub backend: String,
    /// The gate; `None` always passes.
    pub tolerances: Option<ToleranceSource>,
    /// Device-memory budgets to plan for, as fractions of the model's size.
    pub budget_fractions: Vec<f64>,
    pub prompt_len: u64,
    pub gen_len: u64,
    /// Write a predicted-vs-measured scatter plot, `validation.md` and per-plan traces here.
    pub report: Option<PathBuf>,
    /// Measure the disk's read bandwidth right before and right after each run and scale
    /// the profile's disk curves to the mean (a shared disk drifts by tens of percent
    /// within minutes).
    pub disk_recheck: bool,
    /// A mixture of experts' measured routing file (`ferry run --routing-out`): the
    /// predictions count experts with it instead of uniform routing.
    pub routing: Option<PathBuf>,
    /// Write the profile here with the drift these runs saw (`Profile::drift`): the
    /// slowest and fastest rate each resource achieved against it.
    pub save_profile: Option<PathBuf>,
    /// Overwrite report files (and `save_profile`).
    pub force: bool,
}

/// What `validate` reports while it works, for the caller to show.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A remark for the user, as soon as it is known (before the runs).
    Note(String),
    /// The plans are chosen: `total` of them are about to run.
    Running { total: usize },
    /// One more plan has been predicted and run.
    PlanDone,
    /// Every plan has run; statistics and the report follow.
    Finished,
}

/// One plan, predicted and measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanResult {
    pub plan: String,
    pub predicted_tokens_per_s: f64,
    pub measured_tokens_per_s: f64,
    /// predicted ÷ measured − 1, percent.
    pub signed_error_pct: f64,
    /// The plan predicted again with each resource at the rate the run achieved
    /// (`achieved_rates`): the model's own error, free of the machine's drift.
    pub replayed_tokens_per_s: f64,
    /// replayed ÷ measured − 1, percent.
    pub replayed_error_pct: f64,
    /// Each resource's achieved rate ÷ the (disk-rechecked) profile's, from the traces.
    pub achieved_rates: Vec<(Resource, f64)>,
    /// The prediction's interval from the profile's drift (slow, fast tokens/s), as a
    /// user of the profile is shown it; `None` when the profile records no drift.
    pub interval: Option<[f64; 2]>,
    /// Disk read bandwidth around the run (mean of before and after) ÷ the profile's, at
    /// this plan's request size and depth.
    pub disk_factor: f64,
    /// Every run's signed error, percent, in the order they ran (one per run; the
    /// result is the run of median error).
    pub run_errors_pct: Vec<f64>,
    pub predicted_busy_s: Vec<(Resource, f64)>,
    pub measured_busy_s: Vec<(Resource, f64)>,
    /// A mixture of experts: distinct experts per layer and micro-batch in a decoding
    /// step, as the simulator prices them (uniform routing, or `Options::routing`) and as
    /// the run routed them.
    pub experts_per_step: Option<ExpertsPerStep>,
}

/// Predicted and measured experts per layer and micro-batch in a decoding step.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ExpertsPerStep {
    pub predicted: f64,
    pub measured: f64,
}

/// The result of a validation.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Every plan, in the order they ran.
    pub plans: Vec<PlanResult>,
    pub stats: ErrorStats,
    /// The tolerances applied, if any.
    pub tolerances: Option<Tolerances>,
    /// Whether the statistics are within the tolerances (always, without tolerances).
    pub passed: bool,
    /// Whether predictions counted experts with a measured routing (`Options::routing`).
    pub routing_measured: bool,
}

/// Predicts and runs `options.plans` diverse plans and compares prediction with
/// measurement; writes the report when asked. A failed gate is `passed: false`, not an
/// error.
pub fn validate(options: &Options, progress: &mut dyn FnMut(Event)) -> Result<Outcome, ValidateError> {
    let catalog = Catalog::builtin()?;
    let mut files = ModelFiles::open(&options.model_dir)?;
    if let Some(path) = &options.routing {
        let routing = ferry_core::resolve::load_routing(path, &files.spec)?;
        files.spec.routing = Some(std::sync::Arc::new(routing));
    }
    let (base_profile, _) = resolve_hardware(
        &catalog,
        &HardwareRef { profile: Some(options.profile.display().to_string()), ..HardwareRef::default() },
        Path::new("."),
    )?;
    if !base_profile.is_measured() {
        progress(Event::Note(format!(
            "{} is a datasheet profile; validation is meant for a measured one (ferry profile)",
            options.profile.display()
        )));
    } else {
        check_kernel_table(&base_profile, &files.spec, options)?;
    }
    let tolerances = options.tolerances.as_ref().map(Tolerances::resolve).transpose()?;
    let backend = open_backend(options, &base_profile, progress)?;
    // Plans are chosen and predicted for the engine that runs them: one that pins no
    // host memory copies at the pageable rate (the saved profile keeps both curves).
    let priced = if backend.pins_host_memory() {
        base_profile.clone()
    } else {
        progress(Event::Note(format!(
            "the {} backend copies from pageable host memory: its host→device copies are priced at the \
             profile's pageable rate",
            backend.name()
        )));
        base_profile.clone().with_pageable_copies()
    };
    let plans = sweep::plans(options, &files, &priced)?;
    if !measure::drop_page_cache() {
        progress(Event::Note(
            "cannot drop the page cache (not root); runs use direct I/O, which bypasses it anyway".into(),
        ));
    }
    progress(Event::Running { total: plans.len() });
    let disk_file = measure::weights_file(&options.model_dir).filter(|_| options.disk_recheck);
    if let Some(dir) = &options.report {
        report::prepare(dir, options.force)?;
    }
    let mut rows = Vec::new();
    for (index, plan) in plans.iter().enumerate() {
        let scratch = ferry_engine::weights::model_folder(&options.model_dir);
        let mut runs = Vec::with_capacity(options.runs.max(1));
        for _ in 0..options.runs.max(1) {
            runs.push(measure::predict_and_run(
                plan,
                &files,
                &priced,
                backend.as_ref(),
                disk_file.as_deref(),
                &scratch,
            )?);
        }
        let measured = median_run(runs);
        if let Some(dir) = &options.report {
            report::write_plan(dir, index, plan, &measured, options.force)?;
        }
        rows.push(measured.result);
        progress(Event::PlanDone);
    }
    progress(Event::Finished);
    let stats = ErrorStats::of(&rows);
    if let Some(dir) = &options.report {
        report::write_summary(dir, &files.spec.name, options, &rows, &stats)?;
    }
    if let Some(path) = &options.save_profile {
        let profile = Profile { drift: Some(drift_of(&rows, &files.spec.name, options)), ..base_profile.clone() };
        let text = format!(
            "# Measured by `ferry profile`, its drift by `ferry validate`; pass it to `ferry tune --profile`.\n{}",
            ferry_core::yaml::to_yaml_string(&profile)?
        );
        ferry_core::yaml::write_new_file(path, &text, options.force)?;
    }
    let passed = tolerances.as_ref().is_none_or(|t| t.passed_by(&stats));
    Ok(Outcome { plans: rows, stats, tolerances, passed, routing_measured: options.routing.is_some() })
}

/// The backend the plans run on. A profile measured on another backend prices another
/// machine's device (a GPU's copies and GEMMs, or the CPU's): said, not refused, since
/// comparing them is sometimes the point.
fn open_backend(
    options: &Options,
    profile: &Profile,
    progress: &mut dyn FnMut(Event),
) -> Result<Box<dyn ferry_engine::backend::Backend>, ValidateError> {
    let backend = ferry_engine::backend::backend(&options.backend, Default::default())?;
    if let Provenance::Measured { backend: measured_on, .. } = &profile.provenance {
        let name = backend_name(measured_on);
        if name != backend.name() {
            progress(Event::Note(format!(
                "{} was measured with --backend {name} ({measured_on}); these plans run on the {} backend",
                options.profile.display(),
                backend.name()
            )));
        }
        let notes = [
            ferry_engine::memory::page_mode_mismatch(measured_on),
            ferry_engine::kernels::kernels_mismatch(measured_on),
        ];
        for note in notes.into_iter().flatten() {
            progress(Event::Note(format!("{}: {note}", options.profile.display())));
        }
    }
    // A backend whose device is host RAM measures nothing of a discrete GPU's plan.
    if !profile.unified_memory && backend.host_addressable(ferry_core::graph::Place::DEVICE) {
        return Err(ValidateError::Core(CoreError::invalid(format!(
            "{} describes a discrete GPU; the {} backend runs plans for the cpu device: pass --backend cuda, \
             or a profile measured with --backend cpu",
            options.profile.display(),
            backend.name()
        ))));
    }
    Ok(backend)
}

/// The run of median signed error among a plan's runs (the lower middle one of an
/// even count), with every run's error recorded in it.
fn median_run(mut runs: Vec<measure::Measured>) -> measure::Measured {
    let errors: Vec<f64> = runs.iter().map(|m| m.result.signed_error_pct).collect();
    runs.sort_by(|a, b| a.result.signed_error_pct.total_cmp(&b.result.signed_error_pct));
    let mut median = runs.swap_remove((runs.len() - 1) / 2);
    median.result.run_errors_pct = errors;
    median
}

/// The backend a measured profile's provenance names: the profiler writes it first
/// ("cpu, avx2 kernels, ...", "cuda: NVIDIA H200 (...)").
fn backend_name(provenance: &str) -> &str {
    provenance.split([',', ':', ' ']).next().unwrap_or_default()
}

/// The drift `rows` saw: per resource, the slowest and fastest rate achieved against
/// the profile as given (the disk's against its rechecked rate times the recheck).
pub fn drift_of(rows: &[PlanResult], model: &str, options: &Options) -> Drift {
    let mut rates: Vec<RateRange> = Vec::new();
    for row in rows {
        for &(resource, achieved) in &row.achieved_rates {
            let Some(kind) = RateResource::of(resource) else { continue };
            let factor = if kind == RateResource::Disk { achieved * row.disk_factor } else { achieved };
            match rates.iter_mut().find(|r| r.resource == kind) {
                Some(range) => {
                    range.low = range.low.min(factor);
                    range.high = range.high.max(factor);
                }
                None => rates.push(RateRange { resource: kind, low: factor, high: factor }),
            }
        }
    }
    Drift {
        basis: format!(
            "ferry validate: {} plans of {model}, prompt {}, {} new tokens",
            rows.len(),
            options.prompt_len,
            options.gen_len
        ),
        rates,
    }
}

/// A measured profile must have timed this model's kernels: without a table at its
/// shape every compute task is priced by the roofline, and validation would measure
/// that guess instead of the model (a quick profile without one was 44 % off on
/// test-small, with one 3–10 %).
fn check_kernel_table(
    profile: &ferry_core::profile::Profile,
    model: &ferry_core::model::ModelSpec,
    options: &Options,
) -> Result<(), ValidateError> {
    let shape = ferry_sim::cost::shape_key(model);
    let timed = [&profile.device_compute, &profile.host_compute]
        .iter()
        .any(|compute| compute.table.iter().any(|entry| entry.shape == shape));
    if timed {
        return Ok(());
    }
    let mut shapes: Vec<&str> = profile.device_compute.table.iter().map(|e| e.shape.as_str()).collect();
    shapes.dedup();
    let has = if shapes.is_empty() {
        "no kernel table".to_string()
    } else {
        format!("kernels timed at {}", shapes.join(", "))
    };
    Err(CoreError::invalid(format!(
        "{} has {has}, not at {}'s shape ({shape} hidden × intermediate): its predictions would rest on the \
         roofline alone, and validation would measure that guess. Measure a profile that times this model's \
         kernels and validate with it: `ferry profile --backend cpu --quick --model {} --out profile-{}.yaml`",
        options.profile.display(),
        model.name,
        options.model_dir.display(),
        model.name
    ))
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profiles_backend_is_the_first_word_of_its_provenance() {
        assert_eq!(backend_name("cpu, avx2 kernels, bf16 products on gemm (few rows: avx2) (profiled in 9 s)"), "cpu");
        assert_eq!(backend_name("cuda: NVIDIA H200 (profiled in 55 s)"), "cuda");
        assert_eq!(backend_name("cpu"), "cpu");
    }

    #[test]
    fn kind_comes_from_the_wrapped_error() {
        let run = ValidateError::Run { plan: "sequential b1".into(), source: EngineError::Internal("x".into()) };
        assert_eq!(run.kind(), ErrorKind::Internal);
        // The plan names the failure; the engine's error follows as its source.
        assert_eq!(run.to_string(), "sequential b1");
        assert!(std::error::Error::source(&run).is_some());
        let core: ValidateError = CoreError::invalid("no plan fits").into();
        assert_eq!(core.kind(), ErrorKind::Usage);
        assert_eq!(core.to_string(), "no plan fits");
    }
}
