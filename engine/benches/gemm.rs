//! The GEMM rate the engine's `linear` achieves against the `gemm` crate alone on the
//! same shapes (TinyLlama's projections, decode and prefill row counts). The engine
//! reads bf16 weights and converts row blocks to f32 as it goes; the reference
//! multiplies f32 matrices that are already converted, multi-threaded by gemm itself.
//!
//! "engine bf16 x" is the same product with x rounded to bf16 (`--activations bf16`):
//! on AMX tiles where the CPU has them (`FERRY_AMX=off` for the f32 path it falls back to).
//!
//! Run: cargo bench -p ferry-engine --bench gemm
//! Throughput is reported in FLOP (2·m·n·k per product).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_core::model::Dtype;
use ferry_engine::kernels::{from_f32, linear, linear_bf16, Matrix};

fn bench(c: &mut Criterion) {
    let threads = rayon::current_num_threads();
    let mut group = c.benchmark_group("gemm");
    group.sample_size(20);
    // (name, n = output features, k = input features)
    for (name, n, k) in [("mlp gate 5632x2048", 5632usize, 2048usize), ("attn q 2048x2048", 2048, 2048)] {
        for m in [1usize, 8, 64, 512] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) / 64.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i % 23) as f32 - 11.0) / 128.0).collect();
            let mut w_bf16 = vec![0u8; n * k * 2];
            from_f32(Dtype::Bf16, &w, &mut w_bf16);
            let mut out = vec![0.0f32; m * n];
            group.throughput(Throughput::Elements((2 * m * n * k) as u64));
            group.bench_with_input(BenchmarkId::new(format!("{name} engine bf16"), m), &m, |b, &m| {
                b.iter(|| {
                    linear(&x, m, Matrix { bytes: &w_bf16, dtype: Dtype::Bf16, rows: n, cols: k }, &mut out, n, 0)
                })
            });
            group.bench_with_input(BenchmarkId::new(format!("{name} engine bf16 x"), m), &m, |b, &m| {
                b.iter(|| {
                    linear_bf16(&x, m, Matrix { bytes: &w_bf16, dtype: Dtype::Bf16, rows: n, cols: k }, &mut out, n, 0)
                })
            });
            let w_bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            group.bench_with_input(BenchmarkId::new(format!("{name} engine f32"), m), &m, |b, &m| {
                b.iter(|| {
                    linear(&x, m, Matrix { bytes: &w_bytes, dtype: Dtype::F32, rows: n, cols: k }, &mut out, n, 0)
                })
            });
            group.bench_with_input(BenchmarkId::new(format!("{name} gemm crate f32"), m), &m, |b, &m| {
                b.iter(|| unsafe {
                    // out (m×n) = x (m×k) · wᵀ, wᵀ read from row-major w with row stride 1, column stride k.
                    gemm::gemm(
                        m,
                        n,
                        k,
                        out.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        x.as_ptr(),
                        1,
                        k as isize,
                        w.as_ptr(),
                        k as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    )
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
