//! Products of the lattice formats (IQ2_XXS … IQ1_M, `quant::grids`) with 8-bit x.
//! A sub-block of 32 weights decodes to 32 signed bytes and one scale, or one per
//! half (IQ2_XS, IQ2_S, IQ1_M); it meets one block of x as an exact integer sum per
//! scale, and each sum enters the row's f32 sum with one fused multiply-add by
//! `scale · d_x`, sub-block after sub-block, half after half. Eight weight rows
//! (interleaved or not: `Strides` says where their blocks lie) and a row on its own
//! run the same steps, so a product's bits do not depend on what is computed beside
//! it (see `q8`'s docs). The lookups that decode a point vectorise poorly; the
//! integer sums vectorise when compiled for AVX2 (`eight_rows_avx2`).

use super::{QuantizedX, BLOCK, EIGHT, MAX_ROWS};
use crate::kernels::quant::grids::{scales_halves, sub_block, SubBlock, SUB};
use crate::kernels::quant::BlockFormat;
use crate::kernels::quant_rows::order::Strides;

const _: () = assert!(SUB == BLOCK);

/// Σ w·x over 16 or 32 bytes (exact in i32: |w| ≤ 63, |x| ≤ 127).
#[inline(always)]
fn byte_dot(w: &[i8], x: &[i8]) -> i32 {
    w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// Adds sub-block `sub`'s products with block `b` of `rows` rows of x into `sums`.
#[inline(always)]
fn add_sub_block(sub: &SubBlock, halves: bool, x: &QuantizedX, b: usize, rows: usize, k: usize, sums: &mut [f32]) {
    let blocks = k / BLOCK;
    for (i, sum) in sums[..rows].iter_mut().enumerate() {
        let xs = &x.quants[i * k + b * BLOCK..][..BLOCK];
        let d_x = x.scales[i * blocks + b];
        if halves {
            let (low, high) = (byte_dot(&sub.values[..16], &xs[..16]), byte_dot(&sub.values[16..], &xs[16..]));
            *sum = (low as f32).mul_add(sub.scales[0] * d_x, *sum);
            *sum = (high as f32).mul_add(sub.scales[1] * d_x, *sum);
        } else {
            *sum = (byte_dot(&sub.values, xs) as f32).mul_add(sub.scales[0] * d_x, *sum);
        }
    }
}

/// `dots[i][r] = x[i] · weight row r` for `weight_rows` rows (1 to 8) whose block b
/// lies at `r · strides.row + b · strides.block` in `weights`, and `rows` rows of x.
#[inline(always)]
fn body(
    format: BlockFormat,
    weights: &[u8],
    strides: Strides,
    weight_rows: usize,
    x: &QuantizedX,
    rows: usize,
    k: usize,
    dots: &mut [[f32; EIGHT]; MAX_ROWS],
) {
    let (weights_per_block, block_bytes) = format.block();
    let halves = scales_halves(format);
    for r in 0..weight_rows {
        let mut sums = [0.0f32; MAX_ROWS];
        for super_block in 0..k / weights_per_block {
            let block = &weights[r * strides.row + super_block * strides.block..][..block_bytes];
            for j in 0..weights_per_block / SUB {
                let sub = sub_block(format, block, j);
                add_sub_block(&sub, halves, x, super_block * (weights_per_block / SUB) + j, rows, k, &mut sums);
            }
        }
        for (i, &sum) in sums[..rows].iter().enumerate() {
            dots[i][r] = sum;
        }
    }
}

/// `body` as compiled for the baseline instruction set.
#[allow(clippy::too_many_arguments)]
pub(super) fn eight_rows(
    format: BlockFormat,
    weights: &[u8],
    strides: Strides,
    weight_rows: usize,
    x: &QuantizedX,
    rows: usize,
    k: usize,
    dots: &mut [[f32; EIGHT]; MAX_ROWS],
) {
    body(format, weights, strides, weight_rows, x, rows, k, dots)
}

/// `body` compiled for AVX2: the byte sums in vector registers. The same bits as
/// `eight_rows` (integer sums, then the same float steps in the same order).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn eight_rows_avx2(
    format: BlockFormat,
    weights: &[u8],
    strides: Strides,
    weight_rows: usize,
    x: &QuantizedX,
    rows: usize,
    k: usize,
    dots: &mut [[f32; EIGHT]; MAX_ROWS],
) {
    body(format, weights, strides, weight_rows, x, rows, k, dots)
}
