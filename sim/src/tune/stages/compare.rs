//! What the tuned split is compared with (an even split, llama.cpp's split by memory,
//! each stage placed by the search's rule), and why nothing fits when nothing does.

use super::price::{device_terms, stage_plan, DeviceTerms};
use super::{assemble, simulate, Knobs, KvCache, SplitBaseline};
use crate::cost::CostModel;
use crate::predict::Extrapolation;
use crate::tune::search::Searcher;
use crate::tune::{Candidate, TuneRequest};

/// An even split and llama.cpp's split in proportion to device memory, over the
/// devices in their own order with the winner's knobs, each stage placed like the
/// search places it (its KV cache as `kv` allows).
pub(super) fn split_baselines(
    request: &TuneRequest,
    best: &Candidate,
    searchers: &[Searcher],
    kv: KvCache,
) -> Vec<SplitBaseline> {
    let profile = request.profile;
    let count = profile.device_count();
    let layers = request.model.num_layers;
    let knobs = Knobs {
        micro_batch_size: best.policy.micro_batch_size,
        num_micro_batches: best.policy.num_micro_batches,
        schedule: best.policy.schedule,
        prefetch_depth: best.policy.prefetch_depth,
    };
    let memories: Vec<f64> = (0..count as u16).map(|d| profile.device(d).memory_bytes as f64).collect();
    let even = if kv == KvCache::OnDevice { "even split, KV kept on the devices" } else { "even split" };
    let splits = [
        (even, proportional(&vec![1.0; count], layers)),
        ("llama.cpp split (by memory)", proportional(&memories, layers)),
    ];
    let cluster = CostModel::new(profile, request.model);
    let terms: Vec<DeviceTerms> =
        (0..count).map(|d| device_terms(request, &cluster, &searchers[d], d as u16, knobs, kv)).collect();
    splits
        .into_iter()
        .map(|(name, split)| {
            let mut plans = Vec::new();
            let mut start = 0;
            let mut devices = Vec::new();
            let mut outcome = Ok(());
            for (device, &take) in split.iter().enumerate() {
                if take == 0 {
                    continue;
                }
                match stage_plan(&terms[device], take, start == 0, start + take == layers) {
                    Some(plan) => plans.push(plan),
                    None => outcome = Err(format!("device {device} cannot hold {take} layers even streaming them")),
                }
                devices.push(device as u16);
                start += take;
            }
            let takes: Vec<u64> = split.iter().copied().filter(|&t| t > 0).collect();
            let outcome = outcome.and_then(|()| {
                simulate(request, assemble(request, knobs, &devices, &plans, &takes), Extrapolation::Full)
            });
            SplitBaseline { name, layers: split, outcome }
        })
        .collect()
}

/// `layers` split in proportion to `weights`, largest remainders first.
pub(super) fn proportional(weights: &[f64], layers: u64) -> Vec<u64> {
    let total: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| w / total * layers as f64).collect();
    let mut split: Vec<u64> = exact.iter().map(|e| e.floor() as u64).collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let missing = layers - split.iter().sum::<u64>();
    for &i in order.iter().take(missing as usize) {
        split[i] += 1;
    }
    split
}

/// Why no pipeline plan fits: what each device needs to hold even one streamed layer
/// at the smallest batch, against what it has.
pub(super) fn nothing_fits(request: &TuneRequest, knobs: Knobs, terms: &[DeviceTerms]) -> String {
    let profile = request.profile;
    let gib = |gb: f64| ferry_core::units::format_bytes((gb * 1e9).max(0.0) as u64);
    let mut short = false;
    let shortfalls: Vec<String> = terms
        .iter()
        .enumerate()
        .map(|(d, t)| {
            let f = &t.figures;
            let buffers = t.window_layers * (f.attention_gb + f.mlp_gb);
            let fixed = f.device_static_gb - t.head_gb - if t.unified { t.embeddings_gb } else { 0.0 };
            let need = buffers + f.kv_buffer_gb + fixed;
            short |= need > f.device_capacity_gb;
            format!(
                "device {d} ({}) needs {} (two streamed layers {}, KV double buffer {}, hidden states and \
                 workspace {}) but has {} usable, {} short",
                profile.device(d as u16).name,
                gib(need),
                gib(buffers),
                gib(f.kv_buffer_gb),
                gib(fixed),
                gib(f.device_capacity_gb),
                gib(need - f.device_capacity_gb)
            )
        })
        .collect();
    let batch = knobs.micro_batch_size * knobs.num_micro_batches;
    let at = format!("batch {batch} (micro-batches of {})", knobs.micro_batch_size);
    if short {
        return format!(
            "no split of {} over the {} device(s) fits even streaming every layer at {at}: {}",
            request.model.name,
            profile.device_count(),
            shortfalls.join("; ")
        );
    }
    let ends = terms.first().map_or(String::new(), |t| {
        format!(
            " (the first stage's device also holds the embeddings{}, {}, the last stage's the head, {})",
            if t.unified { "" } else { " when its memory is unified" },
            gib(t.embeddings_gb),
            gib(t.head_gb)
        )
    });
    format!(
        "no split of {} over the {} device(s) fits at {at}: each device holds a streamed middle stage ({}), but no \
         split of all {} layers fits beside what the ends keep{ends}; a smaller --batch or larger budgets",
        request.model.name,
        profile.device_count(),
        shortfalls.join("; ").replace(", 0 B short", ""),
        request.model.num_layers
    )
}
