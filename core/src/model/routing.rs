//! Measured routing: how often a mixture of experts' router picks each expert, per
//! layer (`ExpertPopularity`, written by `ferry run --routing-out` from the experts a
//! run's tokens were routed to). With it the simulator counts the experts a step's
//! tokens touch from the measured shares instead of uniform routing: a skewed router
//! touches fewer experts, so reads and products shrink.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// Per layer, the share of tokens routed to each expert (each token picks
/// `experts_per_token`, so a layer's shares add up to that).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertPopularity {
    /// The model the routing was measured on (for people; checked by shape).
    pub model: String,
    pub experts_per_token: u64,
    /// Tokens routed per layer in the measurement (the most any layer routed).
    pub tokens: u64,
    /// `layers[l][e]`: the share of layer `l`'s tokens routed to expert `e`.
    pub layers: Vec<Vec<f64>>,
}

impl ExpertPopularity {
    /// The shares from counts: per layer, the tokens it routed and how many of them
    /// went to each expert.
    pub fn from_counts(model: &str, experts_per_token: u64, counts: &[(u64, Vec<u64>)]) -> ExpertPopularity {
        let shares = |(tokens, routed): &(u64, Vec<u64>)| {
            routed.iter().map(|&c| if *tokens == 0 { 0.0 } else { c as f64 / *tokens as f64 }).collect()
        };
        ExpertPopularity {
            model: model.to_string(),
            experts_per_token,
            tokens: counts.iter().map(|(tokens, _)| *tokens).max().unwrap_or(0),
            layers: counts.iter().map(shares).collect(),
        }
    }

    /// Refuses shares that do not describe `layers` layers of `experts` experts picking
    /// `k` each: the message names the layer and what is wrong.
    pub fn check(&self, layers: u64, experts: u64, k: u64) -> Result<()> {
        let fail = |m: String| Err(CoreError::invalid(format!("routing of {}: {m}", self.model)));
        if self.layers.len() as u64 != layers || self.experts_per_token != k {
            return fail(format!(
                "{} layers picking {} experts each, where the model has {layers} layers picking {k}",
                self.layers.len(),
                self.experts_per_token
            ));
        }
        for (l, shares) in self.layers.iter().enumerate() {
            if shares.len() as u64 != experts {
                return fail(format!("layer {l} has {} experts' shares, the model {experts} experts", shares.len()));
            }
            if let Some(bad) = shares.iter().find(|s| !s.is_finite() || !(0.0..=1.0).contains(*s)) {
                return fail(format!("layer {l} has a share of {bad}, outside 0 to 1"));
            }
            let sum: f64 = shares.iter().sum();
            if (sum - k as f64).abs() > 1e-3 * k as f64 {
                return fail(format!("layer {l}'s shares add up to {sum:.4}, not {k} (each token picks {k})"));
            }
        }
        Ok(())
    }

    /// Distinct experts `tokens` tokens are expected to touch in a layer, the mean over
    /// layers, tokens choosing independently: expert `e` (share p) is missed by all with
    /// (1 − p)^tokens. Uniform shares k/E give `ModelSpec::expected_experts`' uniform
    /// figure; tokens of one sequence routed alike touch fewer than this.
    pub fn expected_experts(&self, tokens: u64) -> f64 {
        let t = tokens.min(i32::MAX as u64) as i32;
        let per_layer = |shares: &Vec<f64>| shares.iter().map(|p| 1.0 - (1.0 - p.clamp(0.0, 1.0)).powi(t)).sum::<f64>();
        self.layers.iter().map(per_layer).sum::<f64>() / self.layers.len().max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_shares_give_uniform_routing_and_skew_touches_fewer() {
        let uniform = ExpertPopularity::from_counts("m", 2, &[(8, vec![2; 8])]);
        uniform.check(1, 8, 2).unwrap();
        let expected = 8.0 * (1.0 - (1.0f64 - 2.0 / 8.0).powi(4));
        assert!((uniform.expected_experts(4) - expected).abs() < 1e-12);
        assert!((uniform.expected_experts(1) - 2.0).abs() < 1e-12);
        // Two experts take every token: four tokens still touch only those two.
        let skewed = ExpertPopularity::from_counts("m", 2, &[(8, vec![8, 8, 0, 0, 0, 0, 0, 0])]);
        skewed.check(1, 8, 2).unwrap();
        assert!((skewed.expected_experts(4) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn shares_that_do_not_fit_the_model_are_refused_by_layer() {
        let p = ExpertPopularity::from_counts("m", 2, &[(8, vec![2; 8]), (8, vec![2; 8])]);
        assert!(p.check(3, 8, 2).unwrap_err().to_string().contains("2 layers"));
        assert!(p.check(2, 16, 2).unwrap_err().to_string().contains("layer 0 has 8 experts"));
        let mut q = p.clone();
        q.layers[1][3] = 0.9;
        assert!(q.check(2, 8, 2).unwrap_err().to_string().contains("layer 1's shares add up"));
        q.layers[1][3] = f64::NAN;
        assert!(q.check(2, 8, 2).unwrap_err().to_string().contains("layer 1 has a share of NaN"));
    }
}
