//! Plan → prediction: lower, simulate, compute metrics. Long generations may be
//! extrapolated: decode steps differ only in context length, so their durations
//! change smoothly; we simulate the first steps and a few windows of consecutive
//! steps further on, and interpolate the steps in between (tested to stay within
//! 0.5 % of simulating every step).

use ferry_core::export::Engine;
use ferry_core::graph::TaskGraph;
use ferry_core::model::ModelSpec;
use ferry_core::plan::{Policy, Workload};
use ferry_core::profile::Profile;
use ferry_core::schedule::{decode_rounds, expected_decode_rounds, lower_if_fits, Steps};
use ferry_core::trace::{step_end_times, Metrics, Trace};

use crate::cost::CostModel;
use crate::des::{simulate, SimError};

/// How many decode steps to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extrapolation {
    /// Every step (exact; what `ferry simulate` does by default), up to
    /// `MAX_FULL_STEPS`: a longer generation is sampled as `Sampled` is, its graph
    /// would otherwise hold every step's tasks (100 000 tokens of an 8B model: tens
    /// of millions, gigabytes).
    Full,
    /// Warm-up steps plus sampled windows, interpolated (what the tuner uses).
    Sampled,
}

/// The most decode steps `Extrapolation::Full` simulates one by one (0.06–0.19 % is
/// what sampling costs in accuracy; see `WINDOWS`).
pub const MAX_FULL_STEPS: u32 = 4096;

/// Decode steps simulated one after another at the start.
const WARMUP_STEPS: u32 = 2;
/// Windows of two consecutive steps spread over the rest of the generation. A step's
/// duration grows near-linearly with its context, so two windows carry the slope: three
/// warm-up steps and four windows (12 of 32 steps of a default run, against 7 now) were
/// 0.03–0.08 % off full simulation on the catalog's plans, these 0.06–0.19 %, and the
/// tuner, which simulates a hundred plans this way, runs 1.6× faster.
const WINDOWS: u32 = 2;

#[derive(Debug, Clone)]
pub struct Prediction {
    pub graph: TaskGraph,
    pub trace: Trace,
    pub metrics: Metrics,
    /// Events the simulation processed.
    pub events: u64,
}

/// How slow and how fast a plan may run on a machine whose resources drift as its
/// profile records (`Profile::drift`): tokens/s with every resource at its slowest
/// achieved rate, and with every one at its fastest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub slow_tokens_per_s: f64,
    pub fast_tokens_per_s: f64,
}

impl Interval {
    /// Whether `tokens_per_s` lies within the interval.
    pub fn covers(&self, tokens_per_s: f64) -> bool {
        self.slow_tokens_per_s <= tokens_per_s && tokens_per_s <= self.fast_tokens_per_s
    }
}

/// The plan's `Interval`: from the rates the profile's runs achieved (`Profile::drift`),
/// or for a GPU's datasheet profile the spread the calibration set has shown
/// (`calibration`); `None` for a profile with neither.
pub fn interval(
    policy: &Policy,
    model: &ModelSpec,
    workload: &Workload,
    profile: &Profile,
    mode: Extrapolation,
) -> Result<Option<Interval>, SimError> {
    interval_run_by(None, policy, model, workload, profile, mode)
}

/// `interval` for the plan as `engine` runs it (`predict_run_by`).
pub fn interval_run_by(
    engine: Option<Engine>,
    policy: &Policy,
    model: &ModelSpec,
    workload: &Workload,
    profile: &Profile,
    mode: Extrapolation,
) -> Result<Option<Interval>, SimError> {
    interval_around(engine, policy, model, workload, profile, mode, None)
}

/// `interval_run_by` of a prediction already made at `tokens_per_s` (with the same
/// engine, profile and `mode`): a datasheet interval is scaled from it without
/// simulating again; a drifted profile's is simulated at both ends.
pub fn interval_of_prediction(
    engine: Option<Engine>,
    policy: &Policy,
    model: &ModelSpec,
    workload: &Workload,
    profile: &Profile,
    mode: Extrapolation,
    tokens_per_s: f64,
) -> Result<Option<Interval>, SimError> {
    interval_around(engine, policy, model, workload, profile, mode, Some(tokens_per_s))
}

fn interval_around(
    engine: Option<Engine>,
    policy: &Policy,
    model: &ModelSpec,
    workload: &Workload,
    profile: &Profile,
    mode: Extrapolation,
    predicted_tokens_per_s: Option<f64>,
) -> Result<Option<Interval>, SimError> {
    let predict = |profile: &Profile| predict_run_by(engine, policy, model, workload, profile, mode);
    let Some(drift) = &profile.drift else {
        if !crate::calibration::applies_to(profile) {
            return Ok(None);
        }
        let predicted = match predicted_tokens_per_s {
            Some(tokens_per_s) => tokens_per_s,
            None => predict(profile)?.metrics.tokens_per_s,
        };
        let (low, high) = crate::calibration::DATASHEET_PUBLISHED_OVER_PREDICTED;
        return Ok(Some(Interval { slow_tokens_per_s: predicted * low, fast_tokens_per_s: predicted * high }));
    };
    let at = |fast: bool| -> Result<f64, SimError> { Ok(predict(&drift.apply(profile, fast))?.metrics.tokens_per_s) };
    let (slow, fast) = (at(false)?, at(true)?);
    // A range whose low and high straddle 1 brackets the prediction; one that does not
    // still orders slow before fast.
    Ok(Some(Interval { slow_tokens_per_s: slow.min(fast), fast_tokens_per_s: slow.max(fast) }))
}

/// How the interval of a prediction from `profile` was found, in a sentence; `None`
/// when it has none.
pub fn interval_basis(profile: &Profile) -> Option<String> {
    if let Some(drift) = &profile.drift {
        return Some(format!(
            "interval: every resource at the slowest and at the fastest rate this profile's runs achieved ({})",
            drift.basis
        ));
    }
    crate::calibration::applies_to(profile).then(|| {
        let (low, high) = crate::calibration::DATASHEET_PUBLISHED_OVER_PREDICTED;
        format!(
            "interval: real systems' published speeds ran {:.0}–{:.0} % below Ferry's datasheet predictions for \
             their own policies (configs/calibration/); `ferry profile` on this machine gives a measured one",
            (1.0 - high) * 100.0,
            (1.0 - low) * 100.0
        )
    })
}

pub fn predict(
    policy: &Policy,
    model: &ModelSpec,
    workload: &Workload,
    profile: &Profile,
    mode: Extrapolation,
) -> Result<Prediction, SimError> {
    predict_run_by(None, policy, model, workload, profile, mode)
}

/// `predict` for the plan as `engine` runs it (`None`: Ferry's engine), at that
/// engine's own costs (`engines::EngineCosts`).
pub fn predict_run_by(
    engine: Option<Engine>,
    policy: &Policy,
    model: &ModelSpec,
    workload: &Workload,
    profile: &Profile,
    mode: Extrapolation,
) -> Result<Prediction, SimError> {
    let cost = CostModel::for_policy(profile, model, policy).run_by(engine);
    let decode_steps = decode_rounds(policy, workload);
    let sampled = sample_steps(decode_steps);
    let steps = match (mode, &sampled) {
        (Extrapolation::Sampled, Some(list)) => Steps::Only(list.clone()),
        (Extrapolation::Full, Some(list)) if decode_steps > MAX_FULL_STEPS => Steps::Only(list.clone()),
        _ => Steps::All,
    };
    let graph = lower_if_fits(policy, model, workload, profile, &steps)?;
    let output = simulate(&graph, &cost)?;
    let metrics = match steps {
        Steps::All if policy.speculation.is_none() => Metrics::compute_with(&graph, &output.trace, &output.usage),
        Steps::All | Steps::Bound => {
            // Speculation: the graph holds the expected rounds rounded up; the decode
            // time is scaled to the expected (fractional) number.
            let ends = step_end_times(&graph, &output.trace);
            let start = output.trace.spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
            let end = output.trace.spans.iter().map(|s| s.end_ns).max().unwrap_or(0);
            let ttft = ends.first().map_or(0, |e| e - start);
            let scale = expected_decode_rounds(policy, workload) / decode_steps.max(1) as f64;
            let decode_ns = (end - start - ttft) as f64 * scale;
            let tpot = decode_ns / workload.gen_len.saturating_sub(1).max(1) as f64;
            Metrics::assemble(
                &graph,
                &output.trace,
                &output.usage,
                ttft + decode_ns.round() as u64,
                ttft,
                tpot.round() as u64,
            )
        }
        Steps::Only(list) => {
            let ends = step_end_times(&graph, &output.trace);
            let start = output.trace.spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
            let ttft = ends[0] - start;
            // Known step durations: a step that directly follows its predecessor in the graph.
            let mut known: Vec<(u32, f64)> = Vec::new();
            let mut previous = 0u32;
            for (index, &step) in list.iter().enumerate() {
                if step == previous + 1 {
                    known.push((step, (ends[index + 1] - ends[index]) as f64));
                }
                previous = step;
            }
            let scale = expected_decode_rounds(policy, workload) / decode_steps.max(1) as f64;
            let decode_ns: f64 = (1..=decode_steps).map(|s| interpolate(&known, s)).sum::<f64>() * scale;
            let total = ttft + decode_ns.round() as u64;
            // Per output token: speculative rounds yield several.
            let tpot = (decode_ns / workload.gen_len.saturating_sub(1).max(1) as f64).round() as u64;
            Metrics::assemble(&graph, &output.trace, &output.usage, total, ttft, tpot)
        }
    };
    Ok(Prediction { graph, trace: output.trace, metrics, events: output.events })
}

/// The decode steps of a sampled simulation, or `None` when simulating all is as cheap.
fn sample_steps(decode_steps: u32) -> Option<Vec<u32>> {
    let sampled_len = WARMUP_STEPS + 2 * WINDOWS;
    if decode_steps <= sampled_len + 4 {
        return None;
    }
    let mut steps: Vec<u32> = (1..=WARMUP_STEPS).collect();
    // Windows (s, s + 1) spread from after the warm-up to the last step.
    let first = WARMUP_STEPS + 2;
    let last = decode_steps - 1;
    for w in 0..WINDOWS {
        let s = first + (last - first) * (w + 1) / WINDOWS;
        let s = s.min(last);
        if steps.last().is_some_and(|&p| p >= s) {
            continue;
        }
        steps.push(s);
        steps.push(s + 1);
    }
    Some(steps)
}

/// Linear interpolation of step duration by step index between known points,
/// constant beyond the ends.
fn interpolate(known: &[(u32, f64)], step: u32) -> f64 {
    match known.iter().position(|&(s, _)| s >= step) {
        Some(0) => known[0].1,
        Some(i) => {
            let (s0, d0) = known[i - 1];
            let (s1, d1) = known[i];
            d0 + (d1 - d0) * (step - s0) as f64 / (s1 - s0) as f64
        }
        None => known.last().map_or(0.0, |k| k.1),
    }
}
