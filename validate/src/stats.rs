//! Error statistics over the validated plans, rank correlation, and the tolerance gate.

use statrs::statistics::{Data, OrderStatistics, RankTieBreaker, Statistics};

use crate::{PlanResult, ToleranceSource};

/// The gate: limits on the median and largest absolute error, and optionally a least
/// rank correlation.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tolerances {
    pub median_pct: f64,
    pub max_pct: f64,
    #[serde(default)]
    pub min_spearman: Option<f64>,
}

impl Tolerances {
    /// The tolerances from the flags (the largest error defaults to 2.5 × the median) or
    /// from a YAML file.
    pub fn resolve(source: &ToleranceSource) -> Result<Tolerances, ferry_core::CoreError> {
        Ok(match source {
            ToleranceSource::File(path) => ferry_core::yaml::read_file::<Tolerances>(path)?,
            &ToleranceSource::Percent { median_pct, max_pct } => {
                Tolerances { median_pct, max_pct: max_pct.unwrap_or(2.5 * median_pct), min_spearman: None }
            }
        })
    }

    /// Whether `stats` are within these tolerances.
    pub fn passed_by(&self, stats: &ErrorStats) -> bool {
        stats.median_abs_error_pct <= self.median_pct
            && stats.max_abs_error_pct <= self.max_pct
            && self.min_spearman.is_none_or(|s| stats.spearman >= s)
    }
}

/// Prediction error over all plans.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorStats {
    /// Median of |signed error|, percent.
    pub median_abs_error_pct: f64,
    /// Largest |signed error|, percent.
    pub max_abs_error_pct: f64,
    /// Rank correlation of predicted and measured tokens/s.
    pub spearman: f64,
    /// Index of the plan with the largest |error| (0 when there are none).
    pub worst: usize,
    /// Median and largest |error| of the predictions replayed at the rates each run
    /// achieved (`PlanResult::replayed_error_pct`): the model's own error.
    pub replayed_median_abs_error_pct: f64,
    pub replayed_max_abs_error_pct: f64,
    /// Plans whose measurement fell inside their prediction's interval, of the plans
    /// with one (`None`: the profile records no drift, so no plan has one).
    pub coverage: Option<(usize, usize)>,
    /// The machine's noise at this workload, percent: how far a plan's runs measured
    /// from its median run (the median over runs, then over plans); `None` with one run
    /// per plan. An error of that size is the measurement's, not the model's.
    pub run_noise_pct: Option<f64>,
}

impl ErrorStats {
    pub fn of(rows: &[PlanResult]) -> ErrorStats {
        let median_max = |error: fn(&PlanResult) -> f64| {
            let abs: Vec<f64> = rows.iter().map(|r| error(r).abs()).collect();
            (Data::new(abs.clone()).median(), abs.iter().copied().fold(0.0, f64::max))
        };
        let (median, max) = median_max(|r| r.signed_error_pct);
        let (replayed_median, replayed_max) = median_max(|r| r.replayed_error_pct);
        let rho = spearman(
            &rows.iter().map(|r| r.predicted_tokens_per_s).collect::<Vec<_>>(),
            &rows.iter().map(|r| r.measured_tokens_per_s).collect::<Vec<_>>(),
        );
        let worst = rows
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.signed_error_pct.abs().total_cmp(&b.1.signed_error_pct.abs()))
            .map(|(i, _)| i)
            .unwrap_or(0);
        ErrorStats {
            median_abs_error_pct: median,
            max_abs_error_pct: max,
            spearman: rho,
            worst,
            replayed_median_abs_error_pct: replayed_median,
            replayed_max_abs_error_pct: replayed_max,
            coverage: coverage(rows),
            run_noise_pct: run_noise(rows),
        }
    }
}

/// `ErrorStats::run_noise_pct`: each run's measured speed against the plan's median
/// run, from the runs' errors against one prediction (`(1 + e_median) ÷ (1 + e_run)`).
fn run_noise(rows: &[PlanResult]) -> Option<f64> {
    let per_plan: Vec<f64> = rows
        .iter()
        .filter(|r| r.run_errors_pct.len() > 1)
        .map(|r| {
            let median = 1.0 + r.signed_error_pct / 100.0;
            let off: Vec<f64> =
                r.run_errors_pct.iter().map(|e| (median / (1.0 + e / 100.0) - 1.0).abs() * 100.0).collect();
            Data::new(off).median()
        })
        .collect();
    (!per_plan.is_empty()).then(|| Data::new(per_plan).median())
}

/// (inside, with an interval) over `rows`.
fn coverage(rows: &[PlanResult]) -> Option<(usize, usize)> {
    let with: Vec<[f64; 2]> = rows.iter().filter_map(|r| r.interval).collect();
    let inside = rows
        .iter()
        .filter_map(|r| r.interval.map(|[slow, fast]| (slow..=fast).contains(&r.measured_tokens_per_s)))
        .filter(|&inside| inside)
        .count();
    (!with.is_empty()).then_some((inside, with.len()))
}

/// A mixture of experts: |measured ÷ predicted − 1| of the experts per decoding step,
/// percent — (median, maximum, plans) over the plans that report them.
pub fn experts_error(rows: &[PlanResult]) -> Option<(f64, f64, usize)> {
    let errors: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.experts_per_step)
        .map(|e| (e.measured / e.predicted - 1.0).abs() * 100.0)
        .collect();
    let max = errors.iter().copied().reduce(f64::max)?;
    Some((Data::new(errors.clone()).median(), max, errors.len()))
}

/// Pearson correlation of the ranks (average ranks for ties).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    if a.len() < 2 {
        return f64::NAN;
    }
    let ra = Data::new(a.to_vec()).ranks(RankTieBreaker::Average);
    let rb = Data::new(b.to_vec()).ranks(RankTieBreaker::Average);
    let covariance = (&ra).covariance(&rb);
    covariance / ((&ra).std_dev() * (&rb).std_dev())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_is_rank_correlation() {
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 30.0, 40.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // Monotone but not linear is still perfect rank correlation.
        assert!((spearman(&[1.0, 2.0, 3.0], &[1.0, 8.0, 27.0]) - 1.0).abs() < 1e-12);
        assert!(spearman(&[1.0], &[2.0]).is_nan());
    }

    fn row(predicted: f64, measured: f64) -> PlanResult {
        PlanResult {
            plan: String::new(),
            predicted_tokens_per_s: predicted,
            measured_tokens_per_s: measured,
            signed_error_pct: (predicted / measured - 1.0) * 100.0,
            // Replayed at the achieved rates, each prediction comes half as close.
            replayed_tokens_per_s: (predicted + measured) / 2.0,
            replayed_error_pct: ((predicted + measured) / 2.0 / measured - 1.0) * 100.0,
            achieved_rates: Vec::new(),
            interval: Some([predicted * 0.9, predicted * 1.2]).filter(|_| predicted < 20.0),
            disk_factor: 1.0,
            run_errors_pct: vec![(predicted / measured - 1.0) * 100.0],
            experts_per_step: None,
            predicted_busy_s: Vec::new(),
            measured_busy_s: Vec::new(),
        }
    }

    #[test]
    fn stats_and_gate() {
        let stats = ErrorStats::of(&[row(11.0, 10.0), row(15.0, 20.0), row(30.0, 30.0)]);
        assert!((stats.median_abs_error_pct - 10.0).abs() < 1e-9);
        assert!((stats.max_abs_error_pct - 25.0).abs() < 1e-9);
        assert_eq!(stats.worst, 1);
        assert!((stats.replayed_median_abs_error_pct - 5.0).abs() < 1e-9);
        assert!((stats.replayed_max_abs_error_pct - 12.5).abs() < 1e-9);
        // Two plans carry an interval; it holds the first's measurement (10 in 9.9–13.2),
        // not the second's (20 beyond 13.5–18).
        assert_eq!(stats.coverage, Some((1, 2)));
        assert!((stats.spearman - 1.0).abs() < 1e-12);
        // The largest error defaults to 2.5 × the median.
        let flags = Tolerances::resolve(&ToleranceSource::Percent { median_pct: 10.5, max_pct: None }).unwrap();
        assert_eq!(flags, Tolerances { median_pct: 10.5, max_pct: 26.25, min_spearman: None });
        assert!(flags.passed_by(&stats));
        assert!(!Tolerances { median_pct: 9.9, ..flags.clone() }.passed_by(&stats));
        assert!(!Tolerances { max_pct: 24.9, ..flags.clone() }.passed_by(&stats));
        assert!(!Tolerances { min_spearman: Some(1.5), ..flags }.passed_by(&stats));
        assert_eq!(stats.run_noise_pct, None, "one run per plan");
    }

    #[test]
    fn the_noise_is_how_far_a_plans_runs_measured_from_its_median_run() {
        // Predicted 10 tokens/s; runs measured 8, 10 and 12.5: the median run (10) is
        // the plan's, the others 20 % below and 25 % above it.
        let mut plan = row(10.0, 10.0);
        plan.run_errors_pct = [8.0, 10.0, 12.5].map(|measured| (10.0 / measured - 1.0) * 100.0).to_vec();
        let mut steady = row(10.0, 10.0);
        steady.run_errors_pct = vec![0.0, 0.0, 0.0];
        let noise = |rows: &[PlanResult]| ErrorStats::of(rows).run_noise_pct.unwrap();
        assert!((noise(std::slice::from_ref(&plan)) - 20.0).abs() < 1e-9);
        // The median over plans.
        assert!((noise(&[plan.clone(), plan.clone(), steady.clone()]) - 20.0).abs() < 1e-9);
        assert!(noise(&[plan, steady.clone(), steady]).abs() < 1e-9);
    }
}
