//! What `ferry tune` leaves behind: the plan file it writes (checked as `simulate`,
//! `run` and `export` check one, paths relative to the plan's folder), the plots, and
//! the JSON report.

use std::path::Path;

use anyhow::Result;
use ferry_core::model::ModelSpec;
use ferry_core::plan::{HardwareRef, Models, Plan, PredictionNote};
use ferry_sim::tune::{Baseline, Candidate, KnobSpace, TuneRequest, TuneResult};

use crate::tune_cmd::TuneArgs;

/// The plan file `tune` writes, checked as `simulate`, `run` and `export` check a plan
/// file: a plan this writes is one they accept.
/// The plan of `result`'s best candidate, written to `--out`, and the plots to `--plots`.
pub(crate) fn write_outputs(
    args: &TuneArgs,
    request: &TuneRequest,
    hardware: &HardwareRef,
    space: &KnobSpace,
    result: &TuneResult,
) -> Result<Plan> {
    let (model, profile) = (request.model, request.profile);
    let plan = written_plan(args, model, hardware, profile, &result.best)?;
    if let Some(path) = &args.out {
        let text = format!(
            "# Written by `ferry tune` for {} on {}; run `ferry simulate --plan {}` to predict it again.\n{}",
            model.name,
            profile.device_name,
            path.display(),
            ferry_core::yaml::to_yaml_string(&plan)?
        );
        ferry_core::yaml::write_new_file(path, &text, args.force)?;
    }
    if let Some(dir) = &args.plots {
        crate::plots_cmd::tune_plots(dir, request, space, result, args.force)?;
    }
    Ok(plan)
}

fn written_plan(
    args: &TuneArgs,
    model: &ModelSpec,
    hardware: &HardwareRef,
    profile: &ferry_core::profile::Profile,
    best: &Candidate,
) -> Result<Plan> {
    let named = |given: &str, name: &str| {
        if Path::new(given).exists() {
            path_from_plan(Path::new(given), args.out.as_deref())
        } else {
            name.to_string()
        }
    };
    // A separate draft is named like the model: a path relative to the plan, or a name.
    let draft = match (&args.draft, best.policy.speculation.as_ref().and_then(|s| s.draft_spec.as_ref())) {
        (Some(given), Some(spec)) => Some(named(given, &spec.name)),
        _ => None,
    };
    let plan = Plan {
        models: Models {
            target: named(&args.model, &model.name),
            draft,
            routing: args.routing.as_deref().map(|p| path_from_plan(p, args.out.as_deref())),
        },
        hardware: HardwareRef {
            profile: args.profile.as_deref().map(|p| path_from_plan(p, args.out.as_deref())),
            ..hardware.clone()
        },
        workload: best.workload,
        policy: best.policy.clone(),
        predicted: Some(PredictionNote {
            tokens_per_s: round3(best.metrics.tokens_per_s),
            time_to_first_token_s: round3(best.metrics.time_to_first_token_ns as f64 / 1e9),
            time_per_output_token_s: round3(best.metrics.time_per_output_token_ns as f64 / 1e9),
            profile: if profile.is_measured() { "measured".into() } else { "datasheet".into() },
            // Scaled from the step-by-step prediction just made (a datasheet profile's);
            // a drifted profile's is simulated at both ends.
            tokens_per_s_interval: ferry_sim::interval_of_prediction(
                None,
                &best.policy,
                model,
                &best.workload,
                profile,
                ferry_sim::Extrapolation::Full,
                best.metrics.tokens_per_s,
            )
            .ok()
            .flatten()
            .map(|i| [round3(i.slow_tokens_per_s), round3(i.fast_tokens_per_s)]),
        }),
    };
    plan.policy.validate(model, &plan.workload, profile.unified_memory)?;
    ferry_core::resolve::check_devices(&plan.policy, profile)?;
    Ok(plan)
}

pub(crate) fn print_json(
    plan: &Plan,
    result: &TuneResult,
    baseline_results: &[Baseline],
    search_time: std::time::Duration,
    top: usize,
    formats: Vec<serde_json::Value>,
) -> Result<()> {
    let baselines_json: Vec<serde_json::Value> = baseline_results
        .iter()
        .map(|b| match &b.outcome {
            Ok(c) => serde_json::json!({"name": b.name, "tokens_per_s": c.metrics.tokens_per_s, "metrics": c.metrics, "policy": c.policy}),
            Err(e) => serde_json::json!({"name": b.name, "error": e}),
        })
        .collect();
    let out = serde_json::json!({
        "plan": plan,
        "metrics": result.best.metrics,
        "search": result.stats,
        "search_seconds": search_time.as_secs_f64(),
        "baselines": baselines_json,
        "top": result.top.iter().take(top + 1).map(|c| serde_json::json!({"policy": c.policy, "workload": c.workload, "tokens_per_s": c.metrics.tokens_per_s})).collect::<Vec<_>>(),
        "by_batch": result.by_batch,
        // The best plan of each weight format tuned (one row unless --weight-format listed several).
        "formats": formats,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `given`, a path relative to the working directory, as a plan written to `out` must
/// name it: paths in a plan are relative to the plan's folder (as `run`, `simulate`
/// and `export` read them). Inside that folder it stays relative; elsewhere it
/// becomes absolute.
fn path_from_plan(given: &Path, out: Option<&Path>) -> String {
    let plan_dir = out.and_then(Path::parent).filter(|p| !p.as_os_str().is_empty());
    let (Some(plan_dir), false) = (plan_dir, given.is_absolute()) else {
        return given.display().to_string();
    };
    let (Ok(target), Ok(dir)) = (given.canonicalize(), plan_dir.canonicalize()) else {
        // The plan's folder does not exist yet (it is made when the plan is written).
        return std::path::absolute(given).unwrap_or_else(|_| given.to_path_buf()).display().to_string();
    };
    match target.strip_prefix(&dir) {
        Ok(inside) => inside.display().to_string(),
        Err(_) => target.display().to_string(),
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
