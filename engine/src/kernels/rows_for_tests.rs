//! `Rows::kernel_for`: a product of many rows gives each row the bits a product of
//! `kernel_for` rows gives it, for every weight type and every kernel family. This is
//! what lets a speculative verification (k + 1 rows per sequence) reproduce plain
//! decoding's tokens (one row per sequence) on every machine.

use super::quant::{sample_blocks, BlockFormat};
use super::*;
use crate::synth::SplitMix64;

/// Weight rows past `ROW_INDEPENDENT_ROWS`, so many rows of x may take the GEMM or the
/// AMX tiles; columns a multiple of the tiles' and of a K-quant block's.
const N: usize = 300;
const K: usize = 256;

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..len).map(|_| rng.next_signed()).collect()
}

/// For `kernel_for` in a few row counts on both sides of `MAX_ROWS`: the product of
/// `4 · kernel_for` rows taking `kernel_for`'s kernel against each group of
/// `kernel_for` rows multiplied on its own, bit for bit.
fn check(what: &str, product: impl Fn(&[f32], Rows, &mut [f32])) {
    for kernel_for in [1, 3, MAX_ROWS, MAX_ROWS + 1, 2 * MAX_ROWS] {
        let m = 4 * kernel_for;
        let x = random(m * K, kernel_for as u64);
        let mut together = vec![0.0f32; m * N];
        product(&x, Rows { count: m, kernel_for }, &mut together);
        for first in (0..m).step_by(kernel_for) {
            let mut alone = vec![0.0f32; kernel_for * N];
            product(&x[first * K..(first + kernel_for) * K], Rows::all(kernel_for), &mut alone);
            for i in 0..kernel_for {
                let (got, want) = (&together[(first + i) * N..][..N], &alone[i * N..][..N]);
                let differ = got.iter().zip(want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                assert_eq!(differ, 0, "{what}: row {} of {m} as among {kernel_for}: {differ} values differ", first + i);
            }
        }
    }
}

#[test]
fn float_weights_give_each_row_the_bits_of_its_kernel_row_count() {
    let w = random(N * K, 7);
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        let mut bytes = vec![0u8; N * K * element_bytes(dtype)];
        from_f32(dtype, &w, &mut bytes);
        let matrix = Matrix { bytes: &bytes, dtype, rows: N, cols: K };
        check(&format!("{dtype:?}"), |x, rows, out| linear_for(x, rows, matrix, out, N, 0));
        // x rounded to bf16: the AMX tiles where the machine has them.
        let what = format!("{dtype:?} with bf16 x ({})", matrix_path());
        check(&what, |x, rows, out| linear_bf16_for(x, rows, matrix, out, N, 0));
    }
}

#[test]
fn block_quantized_weights_give_each_row_the_bits_of_its_kernel_row_count() {
    for format in [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4K] {
        let (weights, _) = format.block();
        let bytes = sample_blocks(format, N * K / weights, 11);
        let matrix = QuantMatrix { bytes: &bytes, format, rows: N, cols: K, order: super::BlockOrder::Rows };
        for activations in Activations::ALL {
            let what = format!("{} with {activations:?} x", format.name());
            check(&what, |x, rows, out| linear_quant(x, rows, matrix, out, N, 0, activations));
        }
    }
}
