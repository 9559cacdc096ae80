//! Few-row products over block-quantized weights (decoding) from RAM: the engine's
//! block kernel (`quant_rows`, on the instruction set chosen for this CPU) for each
//! format, against the bf16 one-pass kernel (`linear_rows`) on the same shape and the
//! machine's read bandwidth, all in the same run. Weights are eight matrices of
//! TinyLlama's MLP shape (5632 × 2048) per format, used in turn, so every product
//! reads its weights from RAM as decoding does.
//!
//! Every format also runs with the activations rounded to 8 bits (`linear_q8`, the
//! engine's default), and Q4_0 and Q4_K at 64 rows (prefill) against the f32 path
//! there (blocks decoded to f32 and multiplied by the GEMM).
//!
//! Run: cargo bench -p ferry-engine --bench quant_rows
//! Throughput is weights multiplied per second (Elements): formats compare at equal
//! work; bytes per weight differ (bf16 2, Q8_0 1.06, Q6_K 0.82, Q4_K 0.56, Q4_0 0.56).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_core::model::Dtype;
use ferry_engine::kernels::quant::{sample_blocks, BlockFormat};
use ferry_engine::kernels::{
    from_f32, linear_q8, linear_rows, quant_converted, quant_rows, simd_path, Matrix, QuantMatrix, SimdPath,
};

const N: usize = 5632;
const K: usize = 2048;
const MATRICES: usize = 8;

fn bench(c: &mut Criterion) {
    let path = simd_path().unwrap_or_else(SimdPath::best);
    let mut group = c.benchmark_group(format!("quantized rows ({})", path.name()));
    group.sample_size(20);
    group.throughput(Throughput::Elements((N * K) as u64));
    let w: Vec<f32> = (0..N * K).map(|i| ((i % 23) as f32 - 11.0) / 128.0).collect();
    let mut one = vec![0u8; N * K * 2];
    from_f32(Dtype::Bf16, &w, &mut one);
    let bf16: Vec<Vec<u8>> = (0..MATRICES).map(|_| one.clone()).collect();
    let mut next = 0;
    for m in [1usize, 8] {
        let x: Vec<f32> = (0..m * K).map(|i| ((i % 17) as f32 - 8.0) / 64.0).collect();
        let mut out = vec![0.0f32; m * N];
        group.bench_with_input(BenchmarkId::new("bf16 one pass", m), &m, |b, &m| {
            b.iter(|| {
                next = (next + 1) % MATRICES;
                let matrix = Matrix { bytes: &bf16[next], dtype: Dtype::Bf16, rows: N, cols: K };
                linear_rows(path, &x, m, matrix, &mut out, N, 0)
            })
        });
        for format in BlockFormat::ALL {
            let one = sample_blocks(format, N * K / format.block().0, 7);
            let stored: Vec<Vec<u8>> = (0..MATRICES).map(|_| one.clone()).collect();
            group.bench_with_input(BenchmarkId::new(format.name(), m), &m, |b, &m| {
                b.iter(|| {
                    next = (next + 1) % MATRICES;
                    let matrix = QuantMatrix { bytes: &stored[next], format, rows: N, cols: K };
                    quant_rows(path, &x, m, matrix, &mut out, N, 0)
                })
            });
            group.bench_with_input(BenchmarkId::new(format!("{} q8 activations", format.name()), m), &m, |b, &m| {
                b.iter(|| {
                    next = (next + 1) % MATRICES;
                    let matrix = QuantMatrix { bytes: &stored[next], format, rows: N, cols: K };
                    linear_q8(path, &x, m, matrix, &mut out, N, 0)
                })
            });
        }
    }
    // Prefill: 64 rows, the integer products against decoding to f32 for the GEMM.
    let m = 64;
    group.throughput(Throughput::Elements((m * N * K) as u64));
    let x: Vec<f32> = (0..m * K).map(|i| ((i % 17) as f32 - 8.0) / 64.0).collect();
    let mut out = vec![0.0f32; m * N];
    for format in [BlockFormat::Q4_0, BlockFormat::Q4K] {
        let stored = sample_blocks(format, N * K / format.block().0, 7);
        let matrix = QuantMatrix { bytes: &stored, format, rows: N, cols: K };
        let name = format.name();
        group.bench_with_input(BenchmarkId::new(format!("{name} f32 via GEMM (MAC/s)"), m), &m, |b, &m| {
            b.iter(|| quant_converted(&x, m, matrix, &mut out, N, 0))
        });
        group.bench_with_input(BenchmarkId::new(format!("{name} q8 activations (MAC/s)"), m), &m, |b, &m| {
            b.iter(|| linear_q8(path, &x, m, matrix, &mut out, N, 0))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
