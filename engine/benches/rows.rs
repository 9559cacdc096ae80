//! Few-row matrix products (decoding) from RAM: the engine's one-pass kernel
//! (`linear_rows`, on the instruction set chosen for this CPU) against the converting
//! GEMM path (`linear_converted`), and both against the machine's read bandwidth
//! measured on the same bytes in the same run. Weights are eight bf16 matrices of
//! TinyLlama's MLP shape (5632 × 2048, 184 MB in all, several times the L3 cache),
//! used in turn, so every product reads its weights from RAM as decoding does.
//!
//! Run: cargo bench -p ferry-engine --bench rows
//! Throughput is weight bytes read per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_core::model::Dtype;
use ferry_engine::kernels::{compute_pool, from_f32, linear_converted, linear_rows, simd_path, Matrix, SimdPath};
use rayon::prelude::*;

const N: usize = 5632;
const K: usize = 2048;
const MATRICES: usize = 8;

fn bench(c: &mut Criterion) {
    let w: Vec<f32> = (0..N * K).map(|i| ((i % 23) as f32 - 11.0) / 128.0).collect();
    let mut one = vec![0u8; N * K * 2];
    from_f32(Dtype::Bf16, &w, &mut one);
    let weights: Vec<Vec<u8>> = (0..MATRICES).map(|_| one.clone()).collect();
    let bytes_per_product = (N * K * 2) as u64;
    let path = simd_path().unwrap_or_else(SimdPath::best);
    let mut group = c.benchmark_group(format!("rows ({})", path.name()));
    group.sample_size(20);
    group.throughput(Throughput::Bytes(bytes_per_product));
    let mut next = 0;
    group.bench_function("read bandwidth (sum of the same bytes)", |b| {
        b.iter(|| {
            next = (next + 1) % MATRICES;
            compute_pool().install(|| {
                weights[next]
                    .par_chunks(1 << 16)
                    .map(|chunk| chunk.chunks_exact(8).fold(0u64, |a, c| a ^ u64::from_le_bytes(c.try_into().unwrap())))
                    .reduce(|| 0, |a, b| a ^ b)
            })
        })
    });
    for m in [1usize, 2, 4, 8] {
        let x: Vec<f32> = (0..m * K).map(|i| ((i % 17) as f32 - 8.0) / 64.0).collect();
        let mut out = vec![0.0f32; m * N];
        group.bench_with_input(BenchmarkId::new("one pass", m), &m, |b, &m| {
            b.iter(|| {
                next = (next + 1) % MATRICES;
                let matrix = Matrix { bytes: &weights[next], dtype: Dtype::Bf16, rows: N, cols: K };
                linear_rows(path, &x, m, matrix, &mut out, N, 0)
            })
        });
        group.bench_with_input(BenchmarkId::new("convert + gemm", m), &m, |b, &m| {
            b.iter(|| {
                next = (next + 1) % MATRICES;
                let matrix = Matrix { bytes: &weights[next], dtype: Dtype::Bf16, rows: N, cols: K };
                linear_converted(&x, m, matrix, &mut out, N, 0)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
