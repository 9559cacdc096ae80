//! A decoding step's work beside the products, at TinyLlama's shape (32 heads, 4 KV
//! heads of 64, hidden 2 048, MLP 5 632): attention over an f16 cache as the cpu
//! backend runs it (keys converted by dimension, values to f32, then the kernel) at 90
//! and 500 positions, SwiGLU, and the rotary embedding of one row of q. The attention
//! is timed from inside the compute pool, as a run's lanes call it (from outside,
//! handing work to the pool costs two thread wake-ups per call).
//!
//! Run: cargo bench -p ferry-engine --bench decode_steps

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ferry_core::model::Dtype;
use ferry_engine::kernels::{attention, compute_pool, from_f32, keys_by_dim, rope, silu_mul, to_f32, RopeLayout};

const HEADS: usize = 32;
const KV_HEADS: usize = 4;
const HEAD_DIM: usize = 64;

/// Values in [−2, 2) that are not all alike.
fn wave(n: usize, factor: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * factor % 37) as f32 - 18.0) / 9.0).collect()
}

/// `iterations` calls of `f` from a thread of the compute pool, timed there.
fn in_pool_timed(iterations: u64, mut f: impl FnMut() + Send) -> Duration {
    compute_pool().install(|| {
        let start = Instant::now();
        for _ in 0..iterations {
            f();
        }
        start.elapsed()
    })
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode steps");
    group.sample_size(30);
    let kv_width = KV_HEADS * HEAD_DIM;
    for positions in [90usize, 500] {
        let past = positions - 1;
        let mut keys_f16 = vec![0u8; positions * kv_width * 2];
        let mut values_f16 = vec![0u8; positions * kv_width * 2];
        from_f32(Dtype::F16, &wave(positions * kv_width, 11), &mut keys_f16);
        from_f32(Dtype::F16, &wave(positions * kv_width, 13), &mut values_f16);
        let q = wave(HEADS * HEAD_DIM, 7);
        let mut keys = vec![0.0f32; keys_by_dim::len_for(positions, KV_HEADS, HEAD_DIM)];
        let mut values = vec![0.0f32; positions * kv_width];
        let mut out = vec![0.0f32; HEADS * HEAD_DIM];
        group.bench_with_input(BenchmarkId::new("keys and values from an f16 cache", positions), &positions, |b, _| {
            b.iter_custom(|iterations| {
                in_pool_timed(iterations, || {
                    keys_by_dim::from_rows(Dtype::F16, &keys_f16, positions, KV_HEADS, HEAD_DIM, &mut keys);
                    to_f32(Dtype::F16, &values_f16, &mut values);
                })
            })
        });
        group.bench_with_input(BenchmarkId::new("attention kernel", positions), &positions, |b, _| {
            b.iter_custom(|iterations| {
                in_pool_timed(iterations, || {
                    attention(&q, &keys, &values, past, 1, HEADS, KV_HEADS, HEAD_DIM, &mut out)
                })
            })
        });
    }
    let up = wave(5632, 11);
    let gate = wave(5632, 5);
    let mut work = gate.clone();
    group.bench_function("SwiGLU over 5 632 values", |b| {
        b.iter(|| {
            work.copy_from_slice(&gate);
            silu_mul(&mut work, &up)
        })
    });
    let mut row = wave(HEADS * HEAD_DIM, 3);
    group.bench_function("rotary embedding of one row of q", |b| {
        let frequencies = ferry_core::model::rope_frequencies(10_000.0, HEAD_DIM, None, None);
        b.iter(|| rope(&mut row, HEADS, HEAD_DIM, &[77], &frequencies, RopeLayout::Pairs))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
