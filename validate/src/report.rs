//! The validation report: `validation.md`, the predicted-vs-measured scatter, and each
//! plan with both of its traces under `plans/`.

use std::path::Path;

use ferry_core::graph::Resource;
use ferry_core::plan::Plan;
use ferry_core::CoreError;

use crate::measure::Measured;
use crate::{ErrorStats, Options, PlanResult, ValidateError};

const SCATTER: &str = "predicted-vs-measured";

/// Creates the report folder and its `plans/`; refuses to overwrite the plot unless `force`.
pub fn prepare(dir: &Path, force: bool) -> Result<(), ValidateError> {
    ferry_reports::prepare(dir, &[SCATTER], force)?;
    let plans = dir.join("plans");
    std::fs::create_dir_all(&plans).map_err(|e| CoreError::io(plans, e))?;
    Ok(())
}

/// Writes plan number `index` (from 0) as `plans/NN.yaml` with its predicted and measured
/// traces beside it.
pub fn write_plan(
    dir: &Path,
    index: usize,
    plan: &Plan,
    measured: &Measured,
    force: bool,
) -> Result<(), ValidateError> {
    // Each plan with both traces (Chrome/Perfetto), to see where a prediction went wrong.
    let base = dir.join("plans").join(format!("{:02}", index + 1));
    let write =
        |suffix: &str, text: String| ferry_core::yaml::write_new_file(&base.with_extension(suffix), &text, force);
    write("yaml", ferry_core::yaml::to_yaml_string(plan)?)?;
    write("predicted.json", ferry_core::trace::chrome_trace(&measured.graph, &measured.predicted).to_string())?;
    write("measured.json", ferry_core::trace::chrome_trace(&measured.graph, &measured.measured).to_string())?;
    Ok(())
}

/// Draws the scatter of every plan (with a ±10 % band) and writes `validation.md`.
pub fn write_summary(
    dir: &Path,
    model: &str,
    options: &Options,
    rows: &[PlanResult],
    stats: &ErrorStats,
) -> Result<(), ValidateError> {
    let points: Vec<ferry_reports::ScatterPoint> = rows
        .iter()
        .map(|r| ferry_reports::ScatterPoint { predicted: r.predicted_tokens_per_s, measured: r.measured_tokens_per_s })
        .collect();
    ferry_reports::scatter_with_band(
        dir,
        SCATTER,
        &format!("{model}: {} plans on this machine", rows.len()),
        "tokens/s",
        &points,
        0.10,
    )?;
    let md = markdown(model, options, rows, stats);
    ferry_core::yaml::write_new_file(&dir.join("validation.md"), &md, true)?;
    Ok(())
}

/// Busy seconds of `resource` in a plan's list (0 when absent).
fn busy_of(list: &[(Resource, f64)], resource: Resource) -> f64 {
    list.iter().find(|(r, _)| *r == resource).map_or(0.0, |(_, s)| *s)
}

/// `validation.md`: the summary, the worst plan's busy time per resource, and every plan.
fn markdown(model: &str, options: &Options, rows: &[PlanResult], stats: &ErrorStats) -> String {
    let worst = &rows[stats.worst];
    let mut md = format!(
        "# Validation of {}\n\n{} plans, prompt {}, {} new tokens; median |error| {:.1} %, max {:.1} %, Spearman {:.3}. With each run's achieved rates replayed (the model's own error, free of drift): median |error| {:.1} %, max {:.1} %.{}\n\n![predicted vs measured](predicted-vs-measured.png)\n\n## Worst plan: {}\n\npredicted {:.3} tokens/s, measured {:.3} ({:+.1} %)\n\n| resource | predicted busy (s) | measured busy (s) |\n|---|---|---|\n",
        model,
        rows.len(),
        options.prompt_len,
        options.gen_len,
        stats.median_abs_error_pct,
        stats.max_abs_error_pct,
        stats.spearman,
        stats.replayed_median_abs_error_pct,
        stats.replayed_max_abs_error_pct,
        stats.run_noise_pct.map_or(String::new(), |noise| format!(
            " A plan's runs measured a median {noise:.1} % from its median run: the machine's noise at this workload."
        )),
        worst.plan,
        worst.predicted_tokens_per_s,
        worst.measured_tokens_per_s,
        worst.signed_error_pct
    );
    for &(resource, _) in &worst.predicted_busy_s {
        let (p, m) = (busy_of(&worst.predicted_busy_s, resource), busy_of(&worst.measured_busy_s, resource));
        if p > 0.0 || m > 0.0 {
            md.push_str(&format!("| {} | {p:.3} | {m:.3} |\n", resource.label(false)));
        }
    }
    md.push_str(
        "\n## Every plan\n\nBusy seconds per resource, predicted / measured; the disk factor is the disk's read \
         rate around the run (mean of right before and right after) over the profile's (the prediction uses it). Plans and both traces are in \
         `plans/` (open the .json files in Perfetto). Replayed: predicted again with every resource at the rate \
         the run achieved (achieved ÷ profile per resource in the last column). With several runs of a plan \
         (`--runs`), its row is the run of median error, and every run's error is listed.\n\n| # | plan | predicted tok/s | measured tok/s | error | runs' errors | replayed error | disk factor | disk busy (s) | compute busy (s) | achieved rates |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (i, r) in rows.iter().enumerate() {
        let pair = |resource| {
            format!("{:.2} / {:.2}", busy_of(&r.predicted_busy_s, resource), busy_of(&r.measured_busy_s, resource))
        };
        let rates: Vec<String> =
            r.achieved_rates.iter().map(|(resource, f)| format!("{} {f:.2}", resource.label(false))).collect();
        md.push_str(&format!(
            "| {:02} | {} | {:.3} | {:.3} | {:+.1} % | {} | {:+.1} % | {:.2} | {} | {} | {} |\n",
            i + 1,
            r.plan,
            r.predicted_tokens_per_s,
            r.measured_tokens_per_s,
            r.signed_error_pct,
            r.run_errors_pct.iter().map(|e| format!("{e:+.1}")).collect::<Vec<_>>().join(", "),
            r.replayed_error_pct,
            r.disk_factor,
            pair(Resource::DISK),
            pair(Resource::DEVICE_COMPUTE),
            rates.join(", ")
        ));
    }
    md
}
