//! Tuning with speculative decoding: the search runs once without a draft and once per
//! draft length k with it (the draft's memory and its passes priced in every
//! candidate; each group's LP bound counts the expected rounds, so it still bounds),
//! and the result says how much the best speculative plan gains over the best plain
//! plan at the same budget — and from which acceptance rate on it gains at all, since
//! the rate the search assumed is the user's estimate, not a measurement.

use ferry_core::plan::Speculation;

use super::{tune, tune_and_compare, Candidate, Comparison, KnobSpace, TuneError, TuneRequest};
use crate::predict::{predict, Extrapolation};

/// The draft lengths the tuner tries when none is given.
pub const DRAFT_LENS: [u32; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

/// Bisection steps for the break-even acceptance rate (2⁻¹² ≈ 0.0002).
const BREAK_EVEN_STEPS: u32 = 12;

#[derive(Debug, Clone)]
pub struct SpeculativeComparison {
    /// The best plan without speculation, with the baselines.
    pub plain: Comparison,
    /// The best speculative plan for each draft length tried, or why none fits.
    pub by_draft_len: Vec<(u32, Result<Candidate, String>)>,
    /// The best speculative plan, simulated round by round.
    pub best: Option<Candidate>,
    /// The acceptance rate from which `best`'s policy beats the best plain plan;
    /// `None` when it does not even with every draft token accepted.
    pub break_even: Option<f64>,
}

impl SpeculativeComparison {
    /// The plan to recommend: the speculative one when it beats the plain one.
    pub fn recommended(&self, request: &TuneRequest) -> &Candidate {
        match &self.best {
            Some(best) if best.score(request.objective) > self.plain.result.best.score(request.objective) => best,
            _ => &self.plain.result.best,
        }
    }
}

/// Tunes without speculation and with `speculation`'s draft at each of `draft_lens`
/// (its `draft_len` is replaced), at its assumed acceptance rate.
pub fn tune_speculative(
    request: &TuneRequest,
    space: &KnobSpace,
    speculation: Speculation,
    draft_lens: &[u32],
) -> Result<SpeculativeComparison, TuneError> {
    let plain_request = TuneRequest { speculation: None, ..request.clone() };
    let plain = tune_and_compare(&plain_request, space)?;
    let mut by_draft_len = Vec::new();
    for &draft_len in draft_lens {
        let with =
            TuneRequest { speculation: Some(Speculation { draft_len, ..speculation.clone() }), ..request.clone() };
        // A draft length whose plans do not fit is a row saying why, not a failure.
        let best = match tune(&with, space) {
            Ok(result) => Ok(exact(&with, result.best)?),
            Err(e) => Err(e.to_string()),
        };
        by_draft_len.push((draft_len, best));
    }
    let best = by_draft_len
        .iter()
        .filter_map(|(_, c)| c.as_ref().ok())
        .max_by(|a, b| a.score(request.objective).total_cmp(&b.score(request.objective)))
        .cloned();
    let break_even = match &best {
        Some(candidate) => break_even(request, candidate, plain.result.best.score(request.objective))?,
        None => None,
    };
    Ok(SpeculativeComparison { plain, by_draft_len, best, break_even })
}

/// The candidate simulated round by round (the search ranks with sampled rounds).
fn exact(request: &TuneRequest, candidate: Candidate) -> Result<Candidate, TuneError> {
    let p = predict(&candidate.policy, request.model, &candidate.workload, request.profile, Extrapolation::Full)?;
    Ok(Candidate { metrics: p.metrics, ..candidate })
}

/// The smallest acceptance rate at which `candidate`'s policy scores above `target`
/// (the score rises with the rate: more tokens per round, same work per round).
fn break_even(request: &TuneRequest, candidate: &Candidate, target: f64) -> Result<Option<f64>, TuneError> {
    let score_at = |rate: f64| -> Result<f64, TuneError> {
        let mut policy = candidate.policy.clone();
        if let Some(s) = policy.speculation.as_mut() {
            s.acceptance_rate = rate;
        }
        let p = predict(&policy, request.model, &candidate.workload, request.profile, Extrapolation::Full)?;
        Ok(Candidate { policy, metrics: p.metrics, ..candidate.clone() }.score(request.objective))
    };
    if score_at(1.0)? <= target {
        return Ok(None);
    }
    if score_at(0.0)? > target {
        return Ok(Some(0.0));
    }
    let (mut low, mut high) = (0.0, 1.0);
    for _ in 0..BREAK_EVEN_STEPS {
        let mid = (low + high) / 2.0;
        if score_at(mid)? > target {
            high = mid;
        } else {
            low = mid;
        }
    }
    Ok(Some(high))
}
