//! Few-row products over block-quantized weights (decoding) from RAM: the engine's
//! block kernel (`quant_rows`, on the instruction set chosen for this CPU) for each
//! format, against the bf16 one-pass kernel (`linear_rows`) on the same shape and the
//! machine's read bandwidth, all in the same run. Weights are eight matrices of
//! TinyLlama's MLP shape (5632 × 2048) per format, used in turn, so every product
//! reads its weights from RAM as decoding does.
//!
//! Every format also runs with the activations rounded to 8 bits (`linear_q8`, the
//! engine's default), over rows in the file's order and interleaved by eights (the
//! order a run keeps resident weights in), and Q4_0, Q5_0 and the K-quants at 64 rows
//! (prefill) against the f32 path there (blocks decoded to f32 and multiplied by the
//! GEMM).
//!
//! Last, the machine's integer multiply-add peak for the instructions the 8-bit
//! products spend their time in (`maddubs` and 16-bit adds, on registers, on every
//! thread of the pool): what "near the peak" means for the 64-row figures.
//!
//! The weights lie in the engine's own memory (`memory::Buffer`), as in a run.
//!
//! Run: cargo bench -p ferry-engine --bench quant_rows
//! Throughput is weights multiplied per second (Elements): formats compare at equal
//! work; bytes per weight differ (bf16 2, Q8_0 1.06, Q6_K 0.82, Q5_0 0.69, Q4_K 0.56, Q4_0 0.56).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_core::model::Dtype;
use ferry_engine::kernels::quant::{sample_blocks, BlockFormat};
use ferry_engine::kernels::{
    from_f32, interleave, linear_q8, linear_rows, quant_converted, quant_rows, simd_path, BlockOrder, Matrix,
    QuantMatrix, SimdPath,
};
use ferry_engine::memory::Buffer;

const N: usize = 5632;
const K: usize = 2048;
const MATRICES: usize = 8;

/// `bytes` in the engine's own memory for resident weights (`Buffer::resident`: huge
/// pages where the kernel gives them), where it keeps the weights it multiplies.
fn engine_memory(bytes: &[u8]) -> Buffer {
    let mut buffer = Buffer::resident(bytes.len()).expect("map a buffer");
    buffer.as_mut_slice().copy_from_slice(bytes);
    buffer
}

/// One of the stored N × K matrices.
fn matrix_of(buffer: &Buffer, format: BlockFormat, order: BlockOrder) -> QuantMatrix<'_> {
    QuantMatrix { bytes: buffer.as_slice(), format, rows: N, cols: K, order }
}

fn bench(c: &mut Criterion) {
    let path = simd_path().unwrap_or_else(SimdPath::best);
    let mut group = c.benchmark_group(format!("quantized rows ({})", path.name()));
    group.sample_size(20);
    group.throughput(Throughput::Elements((N * K) as u64));
    let w: Vec<f32> = (0..N * K).map(|i| ((i % 23) as f32 - 11.0) / 128.0).collect();
    let mut one = vec![0u8; N * K * 2];
    from_f32(Dtype::Bf16, &w, &mut one);
    let bf16: Vec<Buffer> = (0..MATRICES).map(|_| engine_memory(&one)).collect();
    let mut next = 0;
    for m in [1usize, 8] {
        let x: Vec<f32> = (0..m * K).map(|i| ((i % 17) as f32 - 8.0) / 64.0).collect();
        let mut out = vec![0.0f32; m * N];
        group.bench_with_input(BenchmarkId::new("bf16 one pass", m), &m, |b, &m| {
            b.iter(|| {
                next = (next + 1) % MATRICES;
                let matrix = Matrix { bytes: bf16[next].as_slice(), dtype: Dtype::Bf16, rows: N, cols: K };
                linear_rows(path, &x, m, matrix, &mut out, N, 0)
            })
        });
        for format in BlockFormat::ALL {
            let one = sample_blocks(format, N * K / format.block().0, 7);
            let stored: Vec<Buffer> = (0..MATRICES).map(|_| engine_memory(&one)).collect();
            group.bench_with_input(BenchmarkId::new(format.name(), m), &m, |b, &m| {
                b.iter(|| {
                    next = (next + 1) % MATRICES;
                    let matrix = matrix_of(&stored[next], format, BlockOrder::Rows);
                    quant_rows(path, &x, m, matrix, &mut out, N, 0)
                })
            });
            group.bench_with_input(BenchmarkId::new(format!("{} q8 activations", format.name()), m), &m, |b, &m| {
                b.iter(|| {
                    next = (next + 1) % MATRICES;
                    let matrix = matrix_of(&stored[next], format, BlockOrder::Rows);
                    linear_q8(path, &x, m, matrix, &mut out, N, 0)
                })
            });
            // The same weights interleaved by eights, as a run keeps resident ones.
            let mut eights = one.clone();
            interleave(format, N, K, &mut eights);
            let stored: Vec<Buffer> = (0..MATRICES).map(|_| engine_memory(&eights)).collect();
            let name = format!("{} q8 activations, eight rows interleaved", format.name());
            group.bench_with_input(BenchmarkId::new(name, m), &m, |b, &m| {
                b.iter(|| {
                    next = (next + 1) % MATRICES;
                    let matrix = matrix_of(&stored[next], format, BlockOrder::EightRows);
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
    // Q8_0 apart: its blocks take the 32-value kernels as Q4_0's do.
    let formats = BlockFormat::ALL.into_iter().filter(|&f| f != BlockFormat::Q8_0);
    for format in formats {
        let stored = sample_blocks(format, N * K / format.block().0, 7);
        let matrix = QuantMatrix { bytes: &stored, format, rows: N, cols: K, order: BlockOrder::Rows };
        let name = format.name();
        group.bench_with_input(BenchmarkId::new(format!("{name} f32 via GEMM (MAC/s)"), m), &m, |b, &m| {
            b.iter(|| quant_converted(&x, m, matrix, &mut out, N, 0))
        });
        group.bench_with_input(BenchmarkId::new(format!("{name} q8 activations (MAC/s)"), m), &m, |b, &m| {
            b.iter(|| linear_q8(path, &x, m, matrix, &mut out, N, 0))
        });
    }
    // The machine's integer multiply-add peak for these instructions, beside them.
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        const ITERATIONS: usize = 1 << 16;
        let threads = rayon::current_num_threads();
        // Eight independent chains of `maddubs` (32 byte multiply-adds each) per iteration.
        group.throughput(Throughput::Elements((threads * ITERATIONS * 8 * 32) as u64));
        group.bench_function("int8 multiply-add peak, maddubs + 16-bit add (MAC/s)", |b| {
            b.iter(|| {
                use rayon::prelude::*;
                (0..threads).into_par_iter().map(|t| unsafe { peak::maddubs(ITERATIONS, t as i32) }).sum::<i64>()
            })
        });
    }
    group.finish();
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// `iterations` rounds of eight independent `maddubs` + 16-bit adds on registers
    /// (no memory): the inner operation of the engine's products over three or more
    /// rows of x. Returns a sum so that nothing is optimised away.
    #[target_feature(enable = "avx2")]
    pub unsafe fn maddubs(iterations: usize, seed: i32) -> i64 {
        let a = _mm256_set1_epi8(3);
        let mut x: [__m256i; 8] = std::array::from_fn(|j| _mm256_set1_epi32(seed + j as i32));
        let mut acc = [_mm256_setzero_si256(); 8];
        for _ in 0..iterations {
            for (acc, x) in acc.iter_mut().zip(x.iter_mut()) {
                *acc = _mm256_add_epi16(*acc, _mm256_maddubs_epi16(a, *x));
                // Keeps the compiler from hoisting the product: x "might have changed".
                std::arch::asm!("/* {0} */", inout(ymm_reg) * x, options(nomem, nostack, preserves_flags));
            }
        }
        let mut lanes = [0i16; 16];
        let total = acc.iter().fold(_mm256_setzero_si256(), |s, &v| _mm256_add_epi16(s, v));
        _mm256_storeu_si256(lanes.as_mut_ptr().cast(), total);
        lanes.iter().map(|&v| v as i64).sum()
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
