//! Causal grouped-query attention on the CPU. Each (query row, head) pair is a task:
//! its scores against every visible key, a softmax, and the weighted sum of values.
//! The keys come by dimension (`super::keys_by_dim`), so a block of `SCORE_LANES`
//! positions' scores is a vertical sum over the head's dimensions, and the weighted sum
//! keeps `OUT_LANES` outputs in registers over the positions; both are written as
//! independent lanes, which the compiler turns into vector instructions without
//! reordering any lane's additions. The function is compiled once per instruction set
//! (`SimdPath`) and the path chosen at run time, as for the few-row products. Decoding
//! has one query row, so tasks are spread over heads as well as rows: one row's heads
//! used to run on one thread, scalar.

use rayon::prelude::*;

use super::keys_by_dim::{stride_for, SCORE_LANES};
use super::{in_pool, simd_path, SimdPath};

/// The shape of one sequence's attention (see `super::attention`).
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub past: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Attention with `keys` by dimension (`keys_by_dim`, rows of `stride_for(past + new)`
/// positions) and `values` by position.
pub(super) fn attention(q: &[f32], keys: &[f32], values: &[f32], shape: Shape, out: &mut [f32]) {
    attention_on(simd_path().unwrap_or(SimdPath::Scalar), q, keys, values, shape, out);
}

fn attention_on(path: SimdPath, q: &[f32], keys: &[f32], values: &[f32], shape: Shape, out: &mut [f32]) {
    let Shape { past, heads, kv_heads, head_dim } = shape;
    let new = out.len() / (heads * head_dim);
    let stride = stride_for(past + new);
    assert!(keys.len() >= kv_heads * head_dim * stride, "attention: keys by dimension for {} positions", past + new);
    let path = if path.supported() { path } else { SimdPath::Scalar };
    in_pool(|| {
        out.par_chunks_mut(head_dim).enumerate().with_min_len(4).for_each_init(Vec::new, |scores, (index, o)| {
            let task = Task { q, keys, stride, values, shape, t: index / heads, h: index % heads };
            // SAFETY: `path` is one this CPU supports (checked above).
            unsafe { head(path, &task, scores, o) }
        })
    });
}

/// One (query row, head) of one sequence's attention.
struct Task<'a> {
    q: &'a [f32],
    /// By dimension, rows of `stride` positions.
    keys: &'a [f32],
    stride: usize,
    values: &'a [f32],
    shape: Shape,
    t: usize,
    h: usize,
}

/// Runs `task` on the chosen instruction set.
unsafe fn head(path: SimdPath, task: &Task, scores: &mut Vec<f32>, o: &mut [f32]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 => head_avx512(task, scores, o),
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 => head_avx2(task, scores, o),
        _ => head_body::<false>(task, scores, o),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn head_avx512(task: &Task, scores: &mut Vec<f32>, o: &mut [f32]) {
    head_body::<true>(task, scores, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2(task: &Task, scores: &mut Vec<f32>, o: &mut [f32]) {
    head_body::<true>(task, scores, o)
}

/// The work of one (row, head); `FUSED` multiplies and adds in one rounding (where the
/// CPU has FMA; without it `mul_add` would be a library call).
#[inline(always)]
fn head_body<const FUSED: bool>(task: &Task, scores: &mut Vec<f32>, o: &mut [f32]) {
    let Task { q, keys, stride, values, shape, t, h } = *task;
    let Shape { past, heads, kv_heads, head_dim } = shape;
    let kv_width = kv_heads * head_dim;
    let kv_offset = (h / (heads / kv_heads)) * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let visible = past + t + 1;
    let q_row = &q[(t * heads + h) * head_dim..][..head_dim];
    // This head's keys by dimension: row d holds dimension d of every position.
    let head_keys = &keys[kv_offset * stride..][..head_dim * stride];
    scores.clear();
    scores.resize(visible.next_multiple_of(SCORE_LANES), 0.0);
    // `SCORE_LANES` positions' scores at once: Σ_d q[d] · keys[d][p], d in order, in
    // registers; positions past `visible` (padding) are computed and dropped.
    for (block, chunk) in scores.chunks_exact_mut(SCORE_LANES).enumerate() {
        let first = block * SCORE_LANES;
        let mut acc = [0.0f32; SCORE_LANES];
        for (d, &q_d) in q_row.iter().enumerate() {
            let row = &head_keys[d * stride + first..][..SCORE_LANES];
            for i in 0..SCORE_LANES {
                acc[i] = fma::<FUSED>(q_d, row[i], acc[i]);
            }
        }
        for (score, total) in chunk.iter_mut().zip(acc) {
            *score = total * scale;
        }
    }
    scores.truncate(visible);
    // The softmax in loops that vectorize: the largest score in lanes (a maximum in
    // any order is the same), the exponentials alone, their sum in `SUM_LANES` partial
    // sums then those in order (one running sum held each exponential back on the last
    // one's addition, and kept them scalar).
    let mut largest = [f32::NEG_INFINITY; SUM_LANES];
    for chunk in scores.chunks(SUM_LANES) {
        for (lane, &score) in largest.iter_mut().zip(chunk) {
            *lane = lane.max(score);
        }
    }
    let max = largest.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for score in scores.iter_mut() {
        *score = super::exp::exp::<FUSED>(*score - max);
    }
    let mut partial = [0.0f32; SUM_LANES];
    for chunk in scores.chunks(SUM_LANES) {
        for (lane, &score) in partial.iter_mut().zip(chunk) {
            *lane += score;
        }
    }
    let sum: f32 = partial.iter().sum();
    // The weighted sum of values, `OUT_LANES` of the output at a time held in
    // registers across every position (through memory, each position's additions
    // waited on the last one's store); each output value adds the positions in order.
    for (chunk, o) in o.chunks_mut(OUT_LANES).enumerate() {
        let first = kv_offset + chunk * OUT_LANES;
        if o.len() == OUT_LANES {
            let mut acc = [0.0f32; OUT_LANES];
            for (p, score) in scores.iter().enumerate() {
                let weight = score / sum;
                let v = &values[p * kv_width + first..][..OUT_LANES];
                for i in 0..OUT_LANES {
                    acc[i] = fma::<FUSED>(weight, v[i], acc[i]);
                }
            }
            o.copy_from_slice(&acc);
        } else {
            o.fill(0.0);
            for (p, score) in scores.iter().enumerate() {
                axpy::<FUSED>(score / sum, &values[p * kv_width + first..][..o.len()], o);
            }
        }
    }
}

/// Output values of a head summed in registers at once: four AVX-512 registers.
const OUT_LANES: usize = 64;

/// Partial sums of the softmax's maximum and total: one AVX-512 register.
const SUM_LANES: usize = 16;

#[inline(always)]
fn fma<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `out += alpha × x`.
#[inline(always)]
fn axpy<const FUSED: bool>(alpha: f32, x: &[f32], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = fma::<FUSED>(alpha, *v, *o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Causal attention in f64, straight from the definition.
    fn naive(q: &[f32], keys: &[f32], values: &[f32], shape: Shape, new: usize) -> Vec<f32> {
        let Shape { past, heads, kv_heads, head_dim } = shape;
        let kv_width = kv_heads * head_dim;
        let mut out = vec![0.0f32; new * heads * head_dim];
        for t in 0..new {
            for h in 0..heads {
                let kv = (h / (heads / kv_heads)) * head_dim;
                let q_row = &q[(t * heads + h) * head_dim..][..head_dim];
                let scores: Vec<f64> = (0..past + t + 1)
                    .map(|p| {
                        let k_row = &keys[p * kv_width + kv..][..head_dim];
                        q_row.iter().zip(k_row).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
                            / (head_dim as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..head_dim {
                    let value: f64 =
                        weights.iter().enumerate().map(|(p, w)| w / total * values[p * kv_width + kv + d] as f64).sum();
                    out[(t * heads + h) * head_dim + d] = value as f32;
                }
            }
        }
        out
    }

    /// Every path this CPU has, grouped and plain attention, prefill and decode shapes,
    /// head widths with and without a tail, against the f64 definition.
    #[test]
    fn every_path_matches_the_definition() {
        let paths: Vec<SimdPath> =
            [SimdPath::Scalar, SimdPath::Avx2, SimdPath::Avx512].into_iter().filter(|p| p.supported()).collect();
        for (past, new, heads, kv_heads, head_dim) in
            [(0, 5, 4, 2, 16), (7, 1, 8, 2, 64), (3, 3, 4, 4, 20), (30, 1, 6, 3, 8), (0, 1, 2, 1, 33)]
        {
            let shape = Shape { past, heads, kv_heads, head_dim };
            let rows = past + new;
            let wave =
                |n: usize, f: usize| -> Vec<f32> { (0..n).map(|i| ((i * f % 37) as f32 - 18.0) / 9.0).collect() };
            let q = wave(new * heads * head_dim, 7);
            let keys = wave(rows * kv_heads * head_dim, 11);
            let values = wave(rows * kv_heads * head_dim, 13);
            let expected = naive(&q, &keys, &values, shape, new);
            for &path in &paths {
                let mut out = vec![f32::NAN; new * heads * head_dim];
                let by_dim = crate::kernels::keys_by_dim::from_f32_rows(&keys, rows, kv_heads, head_dim);
                attention_on(path, &q, &by_dim, &values, shape, &mut out);
                for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{path:?} {past}+{new} [{i}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
