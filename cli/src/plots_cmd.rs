//! Plots for `ferry tune --plots` (drawn by ferry-reports from simulator output).

use std::path::{Path, PathBuf};

use anyhow::Result;
use ferry_core::graph::{Op, Payload, TaskKind};
use ferry_core::units::GIB;
use ferry_reports::{gantt, line_chart, prepare, Bar, Series};
use ferry_sim::tune::{tune, BatchChoice, KnobSpace, TuneRequest, TuneResult};
use ferry_sim::{predict, Extrapolation};

const STEMS: [&str; 3] = ["throughput-vs-batch", "decode-step-timeline", "throughput-vs-device-memory"];

pub fn tune_plots(
    dir: &Path,
    request: &TuneRequest,
    space: &KnobSpace,
    result: &TuneResult,
    force: bool,
) -> Result<Vec<PathBuf>> {
    prepare(dir, &STEMS, force)?;
    let mut files = Vec::new();
    let model = &request.model.name;
    let device = &request.profile.device_name;

    // 1. Best predicted throughput at each batch size, one line per schedule: the search
    //    itself prunes most batch sizes, so each (batch, schedule) is tuned on its own.
    let max_batch = match request.batch {
        BatchChoice::Fixed(b) => b.max(1),
        BatchChoice::Auto { max } => max.max(1),
    };
    let batches: Vec<u64> =
        std::iter::successors(Some(1u64), |b| Some(b * 2)).take_while(|b| *b <= max_batch).collect();
    let mut series = Vec::new();
    for &schedule in &space.schedules {
        let restricted = KnobSpace { schedules: vec![schedule], ..space.clone() };
        let mut points = Vec::new();
        for &batch in &batches {
            let fixed = TuneRequest { batch: BatchChoice::Fixed(batch), ..request.clone() };
            if let Ok(r) = tune(&fixed, &restricted) {
                points.push((batch as f64, r.best.metrics.tokens_per_s));
            }
        }
        if !points.is_empty() {
            series.push(Series { name: schedule.name().to_string(), points });
        }
    }
    files.extend(line_chart(
        dir,
        STEMS[0],
        &format!("{model} on {device}: best simulated plans by batch size"),
        "batch size (sequences)",
        "predicted throughput (tokens/s)",
        &series,
        true,
    )?);

    // 2. One decode step of the winning plan, one row per resource lane.
    let best = &result.best;
    let prediction = predict(&best.policy, request.model, &best.workload, request.profile, Extrapolation::Full)?;
    let step = (request.gen_len.saturating_sub(1)).min(2) as u32;
    let categories: Vec<String> =
        ["weight loads", "KV-cache transfers", "activation copies", "attention", "MLP", "embed / head", "draft passes"]
            .map(String::from)
            .to_vec();
    let mut rows: Vec<(ferry_core::graph::Resource, u32)> = Vec::new();
    let mut bars = Vec::new();
    for span in &prediction.trace.spans {
        let task = &prediction.graph.tasks[span.task as usize];
        if task.step != step {
            continue;
        }
        let key = (task.resource(), span.lane);
        let row = match rows.iter().position(|r| *r == key) {
            Some(i) => i,
            None => {
                rows.push(key);
                rows.len() - 1
            }
        };
        let category = match (task.kind, task.payload) {
            (_, Payload::Weights { .. }) => 0,
            (_, Payload::KvCache) => 1,
            (_, Payload::Activations) => 2,
            (TaskKind::Compute, Payload::Compute { draft: true, .. }) => 6,
            (TaskKind::Compute, Payload::Compute { op, .. }) => match op {
                Op::Attention | Op::AttnQkv | Op::AttnCore | Op::AttnOut => 3,
                Op::Mlp | Op::Route => 4,
                Op::Embed | Op::Head => 5,
            },
            _ => 5,
        };
        bars.push(Bar { row, start_ms: span.start_ns as f64 / 1e6, end_ms: span.end_ns as f64 / 1e6, category });
    }
    // Order rows by resource, then lane, and renumber the bars.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| rows[i]);
    let position: Vec<usize> = (0..rows.len()).map(|i| order.iter().position(|&o| o == i).unwrap_or(i)).collect();
    for bar in &mut bars {
        bar.row = position[bar.row];
    }
    let row_names: Vec<String> = order
        .iter()
        .map(|&i| {
            let (resource, lane) = rows[i];
            let label = prediction.graph.resource_label(resource);
            if prediction.graph.lanes(resource) > 1 {
                format!("{label} #{lane}")
            } else {
                label
            }
        })
        .collect();
    files.extend(gantt(
        dir,
        STEMS[1],
        &format!("{model} on {device}: decode step {step} of the winning plan ({})", best.policy.schedule.name()),
        &row_names,
        &categories,
        &bars,
    )?);

    // 3. Throughput against the device-memory budget (Ferry's search and FlexGen's policy).
    let base = request.profile.device_memory_bytes;
    let mut ferry_points = Vec::new();
    let mut flexgen_points = Vec::new();
    for factor in [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0] {
        let mut profile = request.profile.clone();
        profile.device_memory_bytes = (base as f64 * factor) as u64;
        let scaled = TuneRequest { profile: &profile, ..request.clone() };
        let budget_gib = profile.device_memory_bytes as f64 / GIB as f64;
        if let Ok(r) = tune(&scaled, space) {
            ferry_points.push((budget_gib, r.best.metrics.tokens_per_s));
        }
        if let Ok(r) = tune(&scaled, &KnobSpace::flexgen()) {
            flexgen_points.push((budget_gib, r.best.metrics.tokens_per_s));
        }
    }
    files.extend(line_chart(
        dir,
        STEMS[2],
        &format!("{model} on {device}: throughput by device-memory budget"),
        "device memory budget (GiB)",
        "predicted throughput (tokens/s)",
        &[
            Series { name: "ferry".into(), points: ferry_points },
            Series { name: "flexgen policy".into(), points: flexgen_points },
        ],
        false,
    )?);
    Ok(files)
}
