//! Few-row products over block-quantized weights (decoding) from RAM: the engine's
//! block kernel (`quant_rows`, on the instruction set chosen for this CPU) for each
//! format, against the bf16 one-pass kernel (`linear_rows`) on the same shape and the
//! machine's read bandwidth, all in the same run. Weights are eight matrices of
//! TinyLlama's MLP shape (5632 × 2048) per format, used in turn, so every product
//! reads its weights from RAM as decoding does.
//!
//! Run: cargo bench -p ferry-engine --bench quant_rows
//! Throughput is weights multiplied per second (Elements): formats compare at equal
//! work; bytes per weight differ (bf16 2, Q8_0 1.06, Q6_K 0.82, Q4_K 0.56, Q4_0 0.56).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_core::model::Dtype;
use ferry_engine::kernels::quant::BlockFormat;
use ferry_engine::kernels::{from_f32, linear_rows, quant_rows, simd_path, Matrix, QuantMatrix, SimdPath};

const N: usize = 5632;
const K: usize = 2048;
const MATRICES: usize = 8;

/// Blocks of random bytes with finite, small f16 scales where the format keeps them.
fn blocks(format: BlockFormat, count: usize) -> Vec<u8> {
    let (_, block_bytes) = format.block();
    let mut state = 7u64;
    let mut bytes: Vec<u8> = (0..count * block_bytes)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect();
    let scales: &[usize] = match format {
        BlockFormat::Q8_0 | BlockFormat::Q4_0 => &[0],
        BlockFormat::Q4K => &[0, 2],
        BlockFormat::Q6K => &[208],
    };
    for block in bytes.chunks_exact_mut(block_bytes) {
        for &at in scales {
            block[at..at + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        }
    }
    bytes
}

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
            let one = blocks(format, N * K / format.block().0);
            let stored: Vec<Vec<u8>> = (0..MATRICES).map(|_| one.clone()).collect();
            group.bench_with_input(BenchmarkId::new(format.name(), m), &m, |b, &m| {
                b.iter(|| {
                    next = (next + 1) % MATRICES;
                    let matrix = QuantMatrix { bytes: &stored[next], format, rows: N, cols: K };
                    quant_rows(path, &x, m, matrix, &mut out, N, 0)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
