//! The plans to validate: diverse configurations, each placed by the tuner.

use std::path::Path;

use ferry_core::plan::{HardwareRef, Models, Plan, Schedule};
use ferry_core::profile::Profile;
use ferry_core::units::{format_bytes, MIB};
use ferry_core::CoreError;
use ferry_engine::synth::SplitMix64;
use ferry_engine::weights::ModelFiles;
use ferry_sim::tune::{tune, BatchChoice, KnobSpace, Objective, TuneRequest};

use crate::{Options, ValidateError};

/// A configuration the tuner is restricted to: budget fraction, schedule, batch size,
/// prefetch depth and chunk bytes. No schedule means the tuner's own pick.
type Config = (f64, Option<Schedule>, u64, u64, u64);

/// One line naming a plan: schedule, batch = micro-batch × count, depth, chunk, the
/// devices of attention weights / MLP weights / KV cache, and the device budget.
pub fn describe(plan: &Plan) -> String {
    let p = &plan.policy;
    format!(
        "{} b{}={}x{} d{} {} {}/{}/{} dev {}",
        p.schedule.name(),
        plan.workload.batch_size,
        p.micro_batch_size,
        p.num_micro_batches,
        p.prefetch_depth,
        format_bytes(p.chunk_bytes).replace(' ', ""),
        p.attention_weights.device,
        p.mlp_weights.device,
        p.kv_cache.device,
        plan.hardware.device_memory.map(format_bytes).unwrap_or_default().replace(' ', "")
    ) + if p.expert_reads.is_routed() { "" } else { " whole-experts" }
}

/// The configurations in the order they are tried: the tuner's own pick at the middle
/// budget, then every schedule × budget × batch × (depth, chunk) in a fixed shuffle.
fn configs(budget_fractions: &[f64]) -> Vec<Config> {
    // Diverse configurations: every schedule, several budgets, batches, depths and chunks;
    // each is placed by the tuner restricted to it, so every plan fits its budget.
    let mut configs = Vec::new();
    for &fraction in budget_fractions {
        for schedule in Schedule::ALL {
            for batch in [1u64, 4, 2] {
                for (depth, chunk) in [(1u64, 8 * MIB), (2, MIB), (3, 32 * MIB)] {
                    configs.push((fraction, Some(schedule), batch, depth, chunk));
                }
            }
        }
    }
    // A fixed shuffle, so the first N cover the space.
    let mut rng = SplitMix64::new(7);
    for i in (1..configs.len()).rev() {
        configs.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    // The tuner's own pick at the middle budget comes first.
    let middle = budget_fractions.get(budget_fractions.len() / 2).copied().unwrap_or(0.6);
    configs.insert(0, (middle, None, 0, 0, 0));
    configs
}

/// Up to `options.plans` distinct plans, each fitting its budget; configurations the
/// tuner cannot place are skipped. Fails when none fits.
pub(crate) fn plans(options: &Options, files: &ModelFiles, base_profile: &Profile) -> Result<Vec<Plan>, ValidateError> {
    let spec = &files.spec;
    let model_bytes = ferry_core::model::WeightLayout::of(spec, &files.formats).total_bytes();
    // Absolute paths: the plans written into --report must resolve from their folder.
    let absolute =
        |path: &Path| std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string();
    let mut plans: Vec<Plan> = Vec::new();
    for (fraction, schedule, batch, depth, chunk) in configs(&options.budget_fractions) {
        if plans.len() >= options.plans {
            break;
        }
        let mut profile = base_profile.clone();
        profile.device_memory_bytes = ((model_bytes as f64 * fraction) as u64).max(16 * MIB);
        let request = TuneRequest {
            model: spec,
            profile: &profile,
            prompt_len: options.prompt_len,
            gen_len: options.gen_len,
            batch: if schedule.is_none() { BatchChoice::Auto { max: 4 } } else { BatchChoice::Fixed(batch) },
            objective: Objective::Throughput,
            // The engine runs the weights as the files store them.
            weight_format: files.formats.clone(),
            kv_dtype: files.kv_dtype(),
            speculation: None,
        };
        let space = match schedule {
            None => KnobSpace::full(),
            Some(s) => KnobSpace {
                schedules: vec![s],
                prefetch_depths: vec![depth],
                chunk_bytes: vec![chunk],
                ..KnobSpace::full()
            },
        };
        let Ok(result) = tune(&request, &space) else { continue };
        let plan = Plan {
            models: Models {
                routing: options.routing.as_deref().map(absolute),
                ..Models::target(absolute(&options.model_dir))
            },
            hardware: HardwareRef {
                profile: Some(absolute(&options.profile)),
                device_memory: Some(profile.device_memory_bytes),
                ..HardwareRef::default()
            },
            workload: result.best.workload,
            policy: result.best.policy,
            predicted: None,
        };
        if !plans.iter().any(|p| p.policy == plan.policy && p.hardware == plan.hardware) {
            plans.push(plan);
        }
    }
    if plans.is_empty() {
        return Err(CoreError::invalid("no plan fits these budgets; raise --budget-fractions").into());
    }
    Ok(plans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_start_with_the_tuners_pick_and_cover_the_space() {
        let configs = configs(&[0.35, 0.6, 1.5]);
        assert_eq!(configs[0], (0.6, None, 0, 0, 0));
        assert_eq!(configs.len(), 1 + 3 * Schedule::ALL.len() * 9);
        assert!(configs[1..].iter().all(|c| c.1.is_some()));
        // The shuffle is fixed: the same order every time.
        assert_eq!(configs, super::configs(&[0.35, 0.6, 1.5]));
    }
}
