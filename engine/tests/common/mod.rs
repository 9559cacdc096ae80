//! Helpers the engine's integration tests share.

use ferry_core::plan::{Policy, Stage, TierCounts};

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
