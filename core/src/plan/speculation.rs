//! Speculative decoding (SpecOffload): a small draft model, resident on the device,
//! proposes `draft_len` tokens per sequence; the offloaded target verifies them all in
//! one pass over `draft_len + 1` positions, so one stream of its weights yields up to
//! `draft_len + 1` tokens.
//!
//! Verification is greedy and per sequence: a round accepts, for each sequence, the
//! longest prefix of its draft tokens the target agrees with and appends the target's
//! own token after it, so each sequence's output is exactly the target's greedy
//! decoding and each advances by its own count. A micro-batch's sequences then sit at
//! different positions (the engine's attention and KV stores take one past per
//! sequence); its rounds go on until its slowest sequence has its tokens.
//!
//! This file holds the plan's section and the arithmetic of rounds under the usual
//! model of acceptance: each draft token is accepted independently with probability
//! α, until the first rejection.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use std::sync::Arc;

use crate::model::{ModelSpec, WeightFormat, WeightFormats};

/// The most draft tokens a round may verify (the tuner searches 1–8).
pub const MAX_DRAFT_LEN: u32 = 16;

/// Where the draft model comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Draft {
    /// Self-speculation (early exit, as in LayerSkip): the target's own first `layers`
    /// layers with its final norm and head. No second file; the draft shares the
    /// target's embeddings and head, and every one of those layers the target keeps on
    /// the device.
    #[serde(rename = "self")]
    SelfLayers { layers: u64 },
    /// A separate model: the plan's `models.draft` (a catalog name, a model folder or
    /// a GGUF file), resident on the device in its own format. Its vocabulary must be
    /// the target's.
    Model,
}

/// A plan's speculation section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Speculation {
    pub draft: Draft,
    /// Draft tokens proposed per sequence and round (k).
    pub draft_len: u32,
    /// The probability α that the target accepts one draft token, which predictions
    /// assume. Not a measurement: `ferry run` measures the rate a run achieved.
    pub acceptance_rate: f64,
    /// A separate draft's shape, resolved from `models.draft` (`resolve`); never in a
    /// file.
    #[serde(skip)]
    pub draft_spec: Option<Arc<ModelSpec>>,
}

impl Speculation {
    /// Checks the section against the target model.
    pub fn validate(&self, model: &ModelSpec) -> Result<()> {
        let fail = |m: String| Err(CoreError::invalid(format!("plan: speculation: {m}")));
        if self.draft_len == 0 || self.draft_len > MAX_DRAFT_LEN {
            return fail(format!("draft_len {} must be 1 to {MAX_DRAFT_LEN}", self.draft_len));
        }
        if !self.acceptance_rate.is_finite() || !(0.0..=1.0).contains(&self.acceptance_rate) {
            return fail(format!("acceptance_rate {} must be a probability, 0 to 1", self.acceptance_rate));
        }
        match (self.draft, &self.draft_spec) {
            // Every layer is allowed: a draft that is the target itself is always
            // accepted (a check of verification, never faster).
            (Draft::SelfLayers { layers }, _) if layers == 0 || layers > model.num_layers => fail(format!(
                "a self-speculating draft uses the first 1 to {} of {}'s layers, not {layers}",
                model.num_layers, model.name
            )),
            (Draft::SelfLayers { .. }, _) => Ok(()),
            (Draft::Model, None) => fail(
                "the draft is a separate model: name it in the plan's models (`models: {target: …, draft: …}`)".into(),
            ),
            (Draft::Model, Some(draft)) if draft.vocab_size != model.vocab_size => fail(format!(
                "the draft {} has a vocabulary of {} tokens but the target {} has {}: a draft must share the \
                 target's vocabulary (its tokens are the target's)",
                draft.name, draft.vocab_size, model.name, model.vocab_size
            )),
            (Draft::Model, Some(_)) => Ok(()),
        }
    }

    /// The draft as a model: for self-speculation, the target cut after its first
    /// layers; else the resolved `models.draft`.
    pub fn draft_model(&self, target: &ModelSpec) -> ModelSpec {
        match (self.draft, &self.draft_spec) {
            (Draft::SelfLayers { layers }, _) => ModelSpec {
                name: format!("{} (first {layers} layers)", target.name),
                num_layers: layers,
                ..target.clone()
            },
            (Draft::Model, Some(draft)) => draft.as_ref().clone(),
            // `validate` refuses this; a target-shaped draft of no layers prices nothing.
            (Draft::Model, None) => ModelSpec { num_layers: 0, ..target.clone() },
        }
    }

    /// Whether the draft is the target's own first layers (sharing its files, its
    /// embeddings and head and its device-resident layers).
    pub fn is_self(&self) -> bool {
        matches!(self.draft, Draft::SelfLayers { .. })
    }

    /// How the draft's weights are stored: self-speculation reads the target's (in
    /// `target_formats`); a separate model its own (a GGUF file's mix, or its dtype).
    pub fn draft_formats(&self, target_formats: &WeightFormats) -> WeightFormats {
        match (&self.draft, &self.draft_spec) {
            (Draft::Model, Some(draft)) if draft.stored.is_some() => WeightFormats::stored(),
            (Draft::Model, Some(draft)) => {
                WeightFormats::float(draft.dtype).unwrap_or_else(|| WeightFormats::uniform(WeightFormat::F16))
            }
            _ => target_formats.clone(),
        }
    }

    /// Expected tokens per round for each sequence: (1 − α^(k+1)) ÷ (1 − α) (k + 1
    /// when α = 1).
    pub fn tokens_per_round(&self) -> f64 {
        tokens_per_round(self.acceptance_rate, self.draft_len)
    }

    /// Expected rounds until every one of `sequences` (each accepting on its own) has
    /// `tokens` tokens: the rounds of the slowest (`expected_rounds`).
    pub fn expected_rounds(&self, tokens: u64, sequences: u64) -> f64 {
        expected_rounds(self.acceptance_rate, self.draft_len, tokens, sequences)
    }
}

/// Expected tokens one round yields when each of `k` draft tokens is accepted with
/// probability `a`, until the first rejection, plus the target's own token.
pub fn tokens_per_round(a: f64, k: u32) -> f64 {
    if a >= 1.0 {
        return (k + 1) as f64;
    }
    (1.0 - a.powi(k as i32 + 1)) / (1.0 - a)
}

/// The probabilities of a round yielding 1 ..= k + 1 tokens: t < k + 1 tokens with
/// a^(t−1)(1 − a), all k + 1 with a^k.
fn round_yield(a: f64, k: u32) -> Vec<f64> {
    let mut p: Vec<f64> = (0..k).map(|t| a.powi(t as i32) * (1.0 - a)).collect();
    p.push(a.powi(k as i32));
    p
}

/// The expected number of rounds until each of `groups` sequences (independent,
/// acceptance `a` each) has yielded `tokens` tokens: the run lasts as long as its
/// slowest sequence, E[max of `groups` round counts]. Exact for the model of
/// acceptance above (a distribution over totals, round by round).
pub fn expected_rounds(a: f64, k: u32, tokens: u64, groups: u64) -> f64 {
    if tokens == 0 {
        return 0.0;
    }
    let yields = round_yield(a.clamp(0.0, 1.0), k);
    let need = tokens as usize;
    // dist[s]: probability of having s < need tokens after the rounds so far.
    let mut dist = vec![0.0f64; need];
    dist[0] = 1.0;
    let mut expected = 0.0;
    for _ in 0..need {
        // P(N > n) for one micro-batch = probability mass still below `need`.
        let unfinished: f64 = dist.iter().sum();
        let all_done = (1.0 - unfinished).clamp(0.0, 1.0).powf(groups.max(1) as f64);
        expected += 1.0 - all_done;
        if 1.0 - all_done < 1e-12 {
            break;
        }
        let mut next = vec![0.0f64; need];
        for (s, &p) in dist.iter().enumerate().filter(|(_, p)| **p > 0.0) {
            for (t, &q) in yields.iter().enumerate() {
                let total = s + t + 1;
                if total < need {
                    next[total] += p * q;
                }
            }
        }
        dist = next;
    }
    expected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_per_round_is_the_closed_form_and_its_limits() {
        assert!((tokens_per_round(0.0, 4) - 1.0).abs() < 1e-12);
        assert!((tokens_per_round(1.0, 4) - 5.0).abs() < 1e-12);
        // 1 + 0.5 + 0.25 + 0.125 for k = 3.
        assert!((tokens_per_round(0.5, 3) - 1.875).abs() < 1e-12);
        // The sum of the yield distribution is its mean.
        let mean: f64 = round_yield(0.7, 5).iter().enumerate().map(|(t, p)| (t + 1) as f64 * p).sum();
        assert!((mean - tokens_per_round(0.7, 5)).abs() < 1e-12);
    }

    #[test]
    fn expected_rounds_match_their_limits_and_a_simulation() {
        // Nothing accepted: one token per round.
        assert!((expected_rounds(0.0, 4, 31, 1) - 31.0).abs() < 1e-9);
        // Everything accepted: k + 1 per round.
        assert!((expected_rounds(1.0, 4, 31, 1) - 7.0).abs() < 1e-9);
        // More micro-batches wait for the slowest: never fewer rounds.
        let one = expected_rounds(0.6, 4, 40, 1);
        let four = expected_rounds(0.6, 4, 40, 4);
        assert!(four > one && one > 40.0 / tokens_per_round(0.6, 4) - 1.0, "{one} {four}");
        // A seeded Monte Carlo of the same model agrees.
        let mut state = 0x2545f4914f6cdd1du64;
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let trials = 20_000;
        let mut total = 0u64;
        for _ in 0..trials {
            let mut worst = 0;
            for _ in 0..4 {
                let (mut tokens, mut rounds) = (0, 0);
                while tokens < 40 {
                    let mut accepted = 0;
                    while accepted < 4 && uniform() < 0.6 {
                        accepted += 1;
                    }
                    tokens += accepted + 1;
                    rounds += 1;
                }
                worst = worst.max(rounds);
            }
            total += worst;
        }
        let simulated = total as f64 / trials as f64;
        assert!((simulated - four).abs() < 0.05, "{simulated} vs {four}");
    }

    #[test]
    fn bad_sections_are_refused() {
        let mut model = crate::catalog::Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
        model.num_layers = 4;
        let ok = Speculation {
            draft: Draft::SelfLayers { layers: 1 },
            draft_len: 4,
            acceptance_rate: 0.5,
            draft_spec: None,
        };
        ok.validate(&model).unwrap();
        let other_vocab = ModelSpec { vocab_size: 1000, ..model.clone() };
        for (bad, needle) in [
            (Speculation { draft_len: 0, ..ok.clone() }, "draft_len"),
            (Speculation { acceptance_rate: f64::NAN, ..ok.clone() }, "probability"),
            (Speculation { acceptance_rate: 1.5, ..ok.clone() }, "probability"),
            (Speculation { draft: Draft::SelfLayers { layers: 5 }, ..ok.clone() }, "1 to 4"),
            (Speculation { draft: Draft::SelfLayers { layers: 0 }, ..ok.clone() }, "1 to 4"),
            (Speculation { draft: Draft::Model, ..ok.clone() }, "models"),
            (
                Speculation { draft: Draft::Model, draft_spec: Some(Arc::new(other_vocab)), ..ok.clone() },
                "vocabulary of 1000 tokens",
            ),
        ] {
            let err = bad.validate(&model).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        assert_eq!(ok.draft_model(&model).num_layers, 1);
    }
}
