//! Rotary embedding frequencies: the base θ^(−2i/d) of every Llama-shaped model, and
//! the long-context scalings released checkpoints set on top — Hugging Face's
//! `rope_scaling` (`linear`, Llama 3.1's `llama3`), GGUF's `rope.scaling.*` keys and
//! its `rope_freqs` tensor (llama.cpp's converter writes Llama 3.1's scaling as one
//! divisor per frequency). A scaling Ferry does not implement (YaRN, dynamic NTK,
//! LongRoPE) is refused when the model is read: the engine would otherwise compute a
//! different model without a word.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// A checkpoint's change to the rotary frequencies (Hugging Face's
/// `_compute_linear_scaling_rope_parameters` and `_compute_llama3_parameters`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (positions interpolated).
    Linear { factor: f64 },
    /// Llama 3.1's: frequencies whose wavelength exceeds
    /// `original_max_position_embeddings / low_freq_factor` divided by `factor`, those
    /// shorter than `… / high_freq_factor` kept, a smooth blend between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: u64 },
}

impl RopeScaling {
    /// Reads Hugging Face's `rope_scaling` object (`rope_type`, or the older `type`);
    /// `origin` names the file in errors.
    pub fn from_hf(value: &serde_json::Value, origin: &str) -> Result<Option<RopeScaling>> {
        let bad = |what: String| CoreError::invalid(format!("{origin}: rope_scaling: {what}"));
        let map = value.as_object().ok_or_else(|| bad(format!("must be an object, found {value}")))?;
        let kind = map.get("rope_type").or_else(|| map.get("type")).and_then(|v| v.as_str());
        let number = |key: &str| -> Result<f64> {
            match map.get(key).and_then(|v| v.as_f64()) {
                Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                _ => Err(bad(format!("'{key}' must be a positive finite number"))),
            }
        };
        let scaling = match kind {
            // Transformers' name for "no scaling".
            Some("default") => return Ok(None),
            Some("linear") => RopeScaling::Linear { factor: number("factor")? },
            Some("llama3") => RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: number("original_max_position_embeddings")? as u64,
            },
            Some(other) => {
                return Err(bad(format!(
                    "type '{other}' is not implemented (Ferry runs linear and llama3 scalings); computing without \
                     it would give another model's outputs"
                )))
            }
            None => return Err(bad("names no rope_type".into())),
        };
        scaling.check().map_err(bad)?;
        Ok(Some(scaling))
    }

    pub(super) fn check(&self) -> std::result::Result<(), String> {
        match *self {
            RopeScaling::Linear { factor } if !(factor.is_finite() && factor > 0.0) => {
                Err(format!("factor {factor} must be a positive finite number"))
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let all = [factor, low_freq_factor, high_freq_factor];
                if !all.iter().all(|x| x.is_finite() && *x > 0.0) || original_max_position_embeddings == 0 {
                    Err("factor, low_freq_factor, high_freq_factor and original_max_position_embeddings must be \
                         positive"
                        .into())
                } else if high_freq_factor <= low_freq_factor {
                    Err(format!("high_freq_factor {high_freq_factor} must exceed low_freq_factor {low_freq_factor}"))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// The divisor of each frequency of `base` (1 where it is kept), as llama.cpp's
    /// converter writes a GGUF file's `rope_freqs` tensor for Llama 3.1.
    pub fn divisors(&self, base: &[f32]) -> Vec<f32> {
        let scaled = self.apply(base);
        base.iter().zip(&scaled).map(|(b, s)| b / s).collect()
    }

    /// `base` scaled, in f32 and in the order of Hugging Face's float32 tensor operations.
    fn apply(&self, base: &[f32]) -> Vec<f32> {
        match *self {
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, old) = (factor as f32, original_max_position_embeddings as f32);
                let (low, high) = (low_freq_factor as f32, high_freq_factor as f32);
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Each pair's frequency, θ^(−2i/head_dim) for i < head_dim / 2, computed in f32 as
/// Hugging Face's float32 `inv_freq`, then scaled (`scaling`) and divided by a GGUF
/// file's per-frequency divisors (`divisors`).
pub fn frequencies(theta: f64, head_dim: usize, scaling: Option<&RopeScaling>, divisors: Option<&[f32]>) -> Vec<f32> {
    let theta = theta as f32;
    let base: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32)).collect();
    let mut freq = match scaling {
        Some(s) => s.apply(&base),
        None => base,
    };
    if let Some(divisors) = divisors {
        for (f, d) in freq.iter_mut().zip(divisors) {
            *f /= d;
        }
    }
    freq
}

/// Checks a GGUF file's `rope_freqs` divisors: one positive finite value per pair.
pub fn check_divisors(divisors: &[f32], head_dim: u64) -> std::result::Result<(), String> {
    if divisors.len() as u64 != head_dim / 2 {
        return Err(format!(
            "rope_freqs holds {} values; a head of {head_dim} has {} frequencies",
            divisors.len(),
            head_dim / 2
        ));
    }
    match divisors.iter().position(|d| !(d.is_finite() && *d > 0.0)) {
        Some(i) => Err(format!("rope_freqs value {i} is {}; each must be a positive finite number", divisors[i])),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3() -> RopeScaling {
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }
    }

    /// Llama 3.1 8B's frequencies (θ 500 000, head 128): the fastest kept, the slowest
    /// divided by 8, the ones between blended — and the divisors llama.cpp's converter
    /// computes in f64 for its `rope_freqs` tensor (1, 8, and 1 / ((1 − s)/8 + s)
    /// between) give the same frequencies to f32 rounding.
    #[test]
    fn llama3_scaling_keeps_fast_frequencies_divides_slow_ones_and_blends_between() {
        let base = frequencies(500000.0, 128, None, None);
        let scaled = frequencies(500000.0, 128, Some(&llama3()), None);
        assert_eq!(scaled[0], base[0]);
        assert_eq!(scaled[63], base[63] / 8.0);
        let mut blended = 0;
        for (i, (&b, &s)) in base.iter().zip(&scaled).enumerate() {
            let wavelen = 2.0 * std::f64::consts::PI / b as f64;
            let divisor = if wavelen < 8192.0 / 4.0 {
                1.0
            } else if wavelen > 8192.0 {
                8.0
            } else {
                blended += 1;
                let smooth = (8192.0 / wavelen - 1.0) / 3.0;
                1.0 / ((1.0 - smooth) / 8.0 + smooth)
            };
            let want = b as f64 / divisor;
            assert!((s as f64 - want).abs() <= 4e-7 * want, "frequency {i}: {s} against {want}");
        }
        assert!(blended > 0, "some frequencies lie between the two wavelengths");
        // A file's divisors reproduce the scaling.
        let divisors = llama3().divisors(&base);
        let from_file = frequencies(500000.0, 128, None, Some(&divisors));
        for (a, b) in from_file.iter().zip(&scaled) {
            assert!((a - b).abs() <= 2e-7 * b, "{a} against {b}");
        }
    }

    #[test]
    fn hugging_face_rope_scaling_is_read_or_refused_by_name() {
        let read = |v: serde_json::Value| RopeScaling::from_hf(&v, "config.json");
        let llama = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        assert_eq!(read(llama).unwrap(), Some(llama3()));
        let linear = serde_json::json!({"type": "linear", "factor": 4});
        assert_eq!(read(linear).unwrap(), Some(RopeScaling::Linear { factor: 4.0 }));
        assert_eq!(read(serde_json::json!({"rope_type": "default"})).unwrap(), None);
        for (value, says) in [
            (serde_json::json!({"rope_type": "yarn", "factor": 4.0}), "'yarn' is not implemented"),
            (serde_json::json!({"type": "dynamic", "factor": 2.0}), "'dynamic' is not implemented"),
            (serde_json::json!({"type": "linear", "factor": -3}), "'factor' must be a positive"),
            (serde_json::json!({"type": "linear", "factor": "nan"}), "'factor' must be a positive"),
            (serde_json::json!({"factor": 2.0}), "names no rope_type"),
            (serde_json::json!("linear"), "must be an object"),
            (
                serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                    "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
                "must exceed low_freq_factor",
            ),
        ] {
            let err = read(value.clone()).unwrap_err().to_string();
            assert!(err.contains(says) && err.contains("config.json: rope_scaling"), "{value}: {err}");
        }
    }

    /// The catalog's Llama 3.1 models carry their configs' scaling, so a model
    /// synthesized from them computes as the released one does.
    #[test]
    fn the_catalogs_llama_3_1_models_carry_their_scaling() {
        let catalog = crate::catalog::Catalog::builtin().unwrap();
        for name in ["llama-3.1-8b", "llama-3.1-70b"] {
            assert_eq!(catalog.model(name).unwrap().value.rope_scaling, Some(llama3()), "{name}");
        }
        assert_eq!(catalog.model("llama-2-7b").unwrap().value.rope_scaling, None);
    }

    #[test]
    fn a_files_divisors_must_be_one_positive_number_per_frequency() {
        assert!(check_divisors(&[1.0; 64], 128).is_ok());
        assert!(check_divisors(&[1.0; 63], 128).unwrap_err().contains("63 values"));
        assert!(check_divisors(&[1.0, f32::NAN], 4).unwrap_err().contains("value 1 is NaN"));
        assert!(check_divisors(&[0.0, 1.0], 4).unwrap_err().contains("value 0 is 0"));
    }
}
