//! Helpers the engine's integration tests share.

use std::path::Path;

use ferry_core::catalog::Catalog;
use ferry_core::model::Dtype;
use ferry_core::plan::{Policy, Stage, TierCounts};
use ferry_engine::weights::ModelFiles;
use ferry_engine::RunReport;

/// test-tiny in f32 (seed 7) written to `dir/model`, opened.
#[allow(dead_code)]
pub fn tiny_model(dir: &Path) -> ModelFiles {
    let spec = Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
    let model_dir = dir.join("model");
    ferry_engine::synth::synthesize(&spec, Dtype::F32, 7, &model_dir, false, |_, _| {}).unwrap();
    ModelFiles::open(&model_dir).unwrap()
}

/// `policy` with its layers split into stages of `sizes` layers on devices `devices`,
/// each stage placing its layers like `place(stage, layers)` says.
pub fn staged(
    policy: &Policy,
    sizes: &[u64],
    devices: &[u16],
    place: impl Fn(usize, u64) -> [TierCounts; 3],
) -> Policy {
    let mut p = policy.clone();
    p.stages = sizes
        .iter()
        .zip(devices)
        .enumerate()
        .map(|(i, (&n, &device))| {
            let [attention_weights, mlp_weights, kv_cache] = place(i, n);
            Stage { device, attention_weights, mlp_weights, kv_cache }
        })
        .collect();
    let sum = |k: usize| {
        p.stage_list().iter().fold(TierCounts { device: 0, host: 0, disk: 0 }, |a, s| {
            let c = [s.attention_weights, s.mlp_weights, s.kv_cache][k];
            TierCounts { device: a.device + c.device, host: a.host + c.host, disk: a.disk + c.disk }
        })
    };
    let totals = [sum(0), sum(1), sum(2)];
    [p.attention_weights, p.mlp_weights, p.kv_cache] = totals;
    p
}

/// The same tokens, and logits within 1e-5 of each vector's largest.
pub fn assert_same(reference: &RunReport, other: &RunReport, what: &str) {
    assert_eq!(reference.tokens, other.tokens, "{what}: tokens differ");
    for (step, (a, b)) in reference.logits.iter().zip(&other.logits).enumerate() {
        for (seq, (x, y)) in a.iter().zip(b).enumerate() {
            // Relative to the vector's largest logit: a different micro-batch size changes
            // the GEMM's row count and so its summation order, which moves near-zero
            // logits by far more than 1e-5 of themselves but not of the vector.
            let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                assert!(
                    (p - q).abs() <= 1e-5 * scale,
                    "{what}: step {step} seq {seq} logit {i}: {p} vs {q} (largest {scale})"
                );
            }
        }
    }
}
