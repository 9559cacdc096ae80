//! `ferry tune --draft self:L --acceptance α`: the speculation section the search
//! plans with, and the table of the best plan per draft length beside the best plan
//! without a draft.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use ferry_core::catalog::Catalog;
use ferry_core::model::ModelSpec;
use ferry_core::plan::speculation::tokens_per_round;
use ferry_core::plan::{Draft, HardwareRef, Speculation};
use ferry_core::resolve::resolve_model;
use ferry_core::units::format_ns;
use ferry_core::CoreError;
use ferry_sim::tune::{tune_speculative, KnobSpace, SpeculativeComparison, TuneRequest, DRAFT_LENS};

use crate::table::Table;
use crate::tune_cmd::TuneArgs;

/// `ferry tune --draft`: the search without and with speculation (each draft length),
/// the recommended plan written and reported like any, then the speculation table.
pub fn run(
    args: &TuneArgs,
    request: &TuneRequest,
    hardware: &HardwareRef,
    space: &KnobSpace,
    speculation: Speculation,
) -> Result<()> {
    let started = Instant::now();
    let draft_lens = args.draft_len.map_or(DRAFT_LENS.to_vec(), |k| vec![k]);
    let outcome = tune_speculative(request, space, speculation.clone(), &draft_lens)?;
    let search_time = started.elapsed();
    let mut result = outcome.plain.result.clone();
    let recommended = outcome.recommended(request).clone();
    if recommended.policy.speculation.is_some() {
        result.top.insert(0, recommended.clone());
        result.best = recommended;
    }
    let plan = crate::tune_output::write_outputs(args, request, hardware, space, &result)?;
    if args.json {
        let table = json(&outcome, request);
        return crate::tune_output::print_json(
            &plan,
            &result,
            &outcome.plain.baselines,
            search_time,
            args.top,
            vec![table],
        );
    }
    crate::tune_cmd::print_report(args, request, &result, &outcome.plain.baselines, search_time, &plan);
    print(&outcome, request, &speculation);
    Ok(())
}

/// The speculation section from `--draft` (`self:L`, or a draft model: a catalog name,
/// a folder or a GGUF file), `--draft-len` and `--acceptance` — or, without it, the
/// rate `ferry profile --draft` measured for this pair into `profile` — checked
/// against the model.
pub fn requested(
    draft: &str,
    draft_len: Option<u32>,
    acceptance: Option<f64>,
    model: &ModelSpec,
    catalog: &Catalog,
    profile: &ferry_core::profile::Profile,
) -> Result<Speculation> {
    let draft_len = draft_len.unwrap_or(1);
    let (kind, draft_spec) = match draft.strip_prefix("self:") {
        Some(layers) => {
            let layers = layers.trim().parse::<u64>().map_err(|_| {
                CoreError::invalid(format!("--draft {draft}: give self:L, the model's first L layers (e.g. self:2)"))
            })?;
            if layers == model.num_layers {
                return Err(CoreError::invalid(format!(
                    "--draft self:{layers} is all of {}'s layers: the draft would be the model itself (never \
                     faster); give fewer",
                    model.name
                ))
                .into());
            }
            (Draft::SelfLayers { layers }, None)
        }
        None => {
            let (spec, _) = resolve_model(catalog, draft, Path::new(".")).map_err(|e| {
                anyhow::Error::from(e)
                    .context(format!("--draft {draft}: a draft model, or self:L for the model's own first layers"))
            })?;
            (Draft::Model, Some(Arc::new(spec)))
        }
    };
    let key = match (kind, &draft_spec) {
        (Draft::SelfLayers { layers }, _) => format!("self:{layers}"),
        (_, Some(spec)) => spec.name.clone(),
        (_, None) => draft.to_string(),
    };
    let acceptance_rate = match (acceptance, profile.measured_acceptance(&model.name, &key)) {
        (Some(rate), _) => rate,
        (None, Some(measured)) => {
            eprintln!(
                "note: α = {:.3}: {} accepted {key}'s tokens at this rate on this machine ({} judged; ferry profile)",
                measured.acceptance_rate, model.name, measured.judged
            );
            measured.acceptance_rate
        }
        (None, None) => {
            return Err(CoreError::invalid(format!(
                "--draft needs --acceptance α, the rate at which the model accepts a draft token: your estimate, \
                 the rate `ferry run` reports for a speculative plan, or measured into a profile (ferry profile \
                 --model {} --draft {draft} --out profile.yaml, then --profile profile.yaml)",
                model.name
            ))
            .into())
        }
    };
    let speculation = Speculation { draft: kind, draft_len, acceptance_rate, draft_spec };
    speculation.validate(model)?;
    Ok(speculation)
}

/// The best plan without a draft, then the best for each draft length.
pub fn print(outcome: &SpeculativeComparison, request: &TuneRequest, speculation: &Speculation) {
    let plain = &outcome.plain.result.best;
    let draft = match (speculation.draft, &speculation.draft_spec) {
        (Draft::SelfLayers { layers }, _) => format!("{}'s first {layers} layers", request.model.name),
        (Draft::Model, Some(model)) => model.name.clone(),
        (Draft::Model, None) => "a draft model".into(),
    };
    println!(
        "\nspeculation: a draft of {draft}, planned at α = {:.3} (each sequence accepts its own draft tokens)",
        speculation.acceptance_rate
    );
    let mut table = Table::new(["draft tokens", "batch", "tokens/round", "tokens/s", "first token", "vs no draft"]);
    table.row([
        "none".to_string(),
        plain.workload.batch_size.to_string(),
        "1.00".into(),
        format!("{:.2}", plain.metrics.tokens_per_s),
        format_ns(plain.metrics.time_to_first_token_ns),
        "1.00×".into(),
    ]);
    for (draft_len, candidate) in &outcome.by_draft_len {
        let c = match candidate {
            Ok(c) => c,
            Err(_) => {
                table.row([draft_len.to_string(), "-".into(), "-".into(), "no plan".into(), "-".into(), "-".into()]);
                continue;
            }
        };
        table.row([
            draft_len.to_string(),
            c.workload.batch_size.to_string(),
            format!("{:.2}", tokens_per_round(speculation.acceptance_rate, *draft_len)),
            format!("{:.2}", c.metrics.tokens_per_s),
            format_ns(c.metrics.time_to_first_token_ns),
            format!("{:.2}×", c.metrics.tokens_per_s / plain.metrics.tokens_per_s),
        ]);
    }
    print!("{}", table.render());
    let chosen = outcome.recommended(request);
    match (&outcome.best, outcome.break_even) {
        (Some(best), Some(rate)) => println!(
            "the best speculative plan (draft {} tokens) beats the best plan without a draft for α ≥ {rate:.3}{}",
            best.policy.speculation.as_ref().map_or(0, |s| s.draft_len),
            if chosen.policy.speculation.is_some() {
                "; it is the plan"
            } else {
                "; at the assumed α it does not: the plan has no draft"
            }
        ),
        (Some(_), None) => {
            println!("no speculative plan beats the best plan without a draft, even at α = 1: the plan has no draft")
        }
        (None, _) => {
            let why = outcome.by_draft_len.iter().find_map(|(_, c)| c.as_ref().err()).cloned().unwrap_or_default();
            println!("no speculative plan fits beside the draft (the plan has no draft): {why}")
        }
    }
}

/// The same, for `--json`.
pub fn json(outcome: &SpeculativeComparison, request: &TuneRequest) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = outcome
        .by_draft_len
        .iter()
        .map(|(k, c)| match c {
            Ok(c) => serde_json::json!({"draft_len": k, "batch": c.workload.batch_size, "tokens_per_s": c.metrics.tokens_per_s, "metrics": c.metrics}),
            Err(e) => serde_json::json!({"draft_len": k, "error": e}),
        })
        .collect();
    serde_json::json!({
        "speculation": {
            "without_draft_tokens_per_s": outcome.plain.result.best.metrics.tokens_per_s,
            "by_draft_len": rows,
            "break_even_acceptance": outcome.break_even,
            "chosen_has_draft": outcome.recommended(request).policy.speculation.is_some(),
        }
    })
}
