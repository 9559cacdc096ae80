//! `ferry tune --weight-format A,B,C`: which formats to tune (the model's own by
//! default: the tuner never lowers precision by itself), and the comparison table of
//! the best plan found for each.

use anyhow::Result;
use ferry_core::model::{Dtype, ModelSpec, WeightFormat, WeightFormats};
use ferry_core::profile::Profile;
use ferry_core::units::{format_bytes, format_ns};
use ferry_core::CoreError;
use ferry_sim::tune::{Comparison, Objective, TuneError};

use crate::table::Table;

/// The formats to tune: the list given (each checked against the model's shapes before
/// any search), or the model's own — a GGUF file's mix as stored, else its dtype.
pub fn requested(arg: Option<&str>, model: &ModelSpec) -> Result<Vec<WeightFormats>> {
    let own = match model.stored {
        Some(_) => WeightFormats::stored(),
        // The integer dtypes are no storage format; such checkpoints are planned in f16.
        None => WeightFormats::float(model.dtype).unwrap_or_else(|| WeightFormats::uniform(WeightFormat::F16)),
    };
    let Some(list) = arg else { return Ok(vec![own]) };
    let mut formats: Vec<WeightFormats> = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        // `stored` is the model's own format: a file's mix, or a checkpoint's dtype by name.
        let format = if name.eq_ignore_ascii_case("stored") {
            own.clone()
        } else {
            WeightFormats::uniform(WeightFormat::parse(name)?)
        };
        if model.stored.is_some() && format != WeightFormats::stored() {
            return Err(CoreError::invalid(format!(
                "--weight-format {name}: {} is a GGUF file whose weights are stored as they are; plan it as \
                 stored (the default), or give a catalog model or Hugging Face folder to compare formats",
                model.name
            ))
            .into());
        }
        if !formats.contains(&format) {
            formats.push(format);
        }
    }
    if formats.is_empty() {
        return Err(CoreError::invalid("--weight-format: give one or more formats, e.g. q4_k,q8_0,f16").into());
    }
    // Every name first (a typo is the likelier mistake), then every shape.
    for format in &formats {
        format.check(model)?;
    }
    Ok(formats)
}

/// The KV cache's dtype for weights in `formats`: f32 beside f32 weights, else f16.
pub fn kv_dtype(formats: &WeightFormats) -> Dtype {
    if formats.uniform_float() == Some(Dtype::F32) {
        Dtype::F32
    } else {
        Dtype::F16
    }
}

/// One format's search.
pub struct Outcome {
    pub formats: WeightFormats,
    pub result: Result<Comparison, TuneError>,
}

/// The index of the best outcome by the objective (`None` when none found a plan).
pub fn best(outcomes: &[Outcome], objective: Objective) -> Option<usize> {
    outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.result.as_ref().ok().map(|c| (i, c.result.best.score(objective))))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

/// Whether the profile lacks a dequantization rate on the device for one of the quantized
/// formats `formats` stores `model` in: its figures are then a lower bound (the
/// dequantization is priced as fused into the multiply), not comparable as equals with
/// formats whose rates were measured.
pub fn unpriced(formats: &WeightFormats, model: &ModelSpec, profile: &Profile) -> bool {
    let quantized = formats.quantized_formats(model);
    quantized.iter().any(|f| profile.device_compute.dequant_rate(&f.name()).is_none())
}

/// The comparison table: for each format the best plan's figures and where its weights
/// live; formats whose dequantization the profile does not price are marked †.
pub fn table(outcomes: &[Outcome], model: &ModelSpec, profile: &Profile, chosen: Option<usize>) -> String {
    let mut table = Table::new([
        "format",
        "weights",
        "tokens/s",
        "first token",
        "per token",
        "batch",
        "weights on device / host / disk",
        "peak device memory",
    ]);
    for (i, outcome) in outcomes.iter().enumerate() {
        let name = format!(
            "{}{}{}",
            outcome.formats.describe(),
            if unpriced(&outcome.formats, model, profile) { " †" } else { "" },
            if Some(i) == chosen { " *" } else { "" }
        );
        let total = ferry_core::model::WeightLayout::of(model, &outcome.formats).total_bytes();
        match &outcome.result {
            Ok(c) => {
                let best = &c.result.best;
                let [device, host, disk] = best.policy.weight_bytes_by_tier(model);
                let peak = best.metrics.pools.iter().find(|p| p.pool.is_device()).map_or(0, |p| p.peak_bytes);
                let interval = interval_of(best, model, profile);
                table.row([
                    name,
                    format_bytes(total),
                    format!("{:.2}{}", best.metrics.tokens_per_s, crate::report::interval_text(interval.as_ref())),
                    format_ns(best.metrics.time_to_first_token_ns),
                    format_ns(best.metrics.time_per_output_token_ns),
                    best.workload.batch_size.to_string(),
                    format!("{} / {} / {}", format_bytes(device), format_bytes(host), format_bytes(disk)),
                    format_bytes(peak),
                ]);
            }
            Err(e) => table.row([
                name,
                format_bytes(total),
                "—".into(),
                "—".into(),
                "—".into(),
                "—".into(),
                format!("no plan: {e}"),
                "—".into(),
            ]),
        }
    }
    let mut text = table.render();
    if outcomes.iter().any(|o| unpriced(&o.formats, model, profile)) {
        text.push_str(&format!(
            "† dequantization not measured in this profile: priced as fused into the multiply, a lower bound \
             (`ferry profile --backend cpu` measures {} on a CPU)\n",
            ferry_engine::kernels::quant::BlockFormat::listed(true)
        ));
    }
    text
}

/// The interval of a format's best plan, as its own report would print it.
fn interval_of(best: &ferry_sim::tune::Candidate, model: &ModelSpec, profile: &Profile) -> Option<ferry_sim::Interval> {
    ferry_sim::interval(&best.policy, model, &best.workload, profile, ferry_sim::Extrapolation::Full).ok().flatten()
}

/// The comparison as JSON rows.
pub fn json(
    outcomes: &[Outcome],
    model: &ModelSpec,
    profile: &Profile,
    chosen: Option<usize>,
) -> Vec<serde_json::Value> {
    outcomes
        .iter()
        .enumerate()
        .map(|(i, outcome)| {
            let total = ferry_core::model::WeightLayout::of(model, &outcome.formats).total_bytes();
            let mut row = serde_json::json!({
                "weight_format": outcome.formats,
                "weight_bytes": total,
                "chosen": Some(i) == chosen,
                "dequantization_priced": !unpriced(&outcome.formats, model, profile),
            });
            match &outcome.result {
                Ok(c) => {
                    let best = &c.result.best;
                    let [device, host, disk] = best.policy.weight_bytes_by_tier(model);
                    row["tokens_per_s"] = best.metrics.tokens_per_s.into();
                    row["tokens_per_s_interval"] =
                        interval_of(best, model, profile).map(|i| [i.slow_tokens_per_s, i.fast_tokens_per_s]).into();
                    row["time_to_first_token_ns"] = best.metrics.time_to_first_token_ns.into();
                    row["time_per_output_token_ns"] = best.metrics.time_per_output_token_ns.into();
                    row["batch_size"] = best.workload.batch_size.into();
                    row["weights_by_tier"] = serde_json::json!({"device": device, "host": host, "disk": disk});
                    row["pools"] = serde_json::to_value(&best.metrics.pools).unwrap_or_default();
                    row["policy"] = serde_json::to_value(&best.policy).unwrap_or_default();
                }
                Err(e) => row["error"] = e.to_string().into(),
            }
            row
        })
        .collect()
}
