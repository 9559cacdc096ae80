//! Products of the lattice formats (IQ2_XXS … IQ1_M, `quant::grids`) with 8-bit x,
//! portable. A sub-block of 32 weights decodes to 32 signed bytes and one scale, or
//! one per half (IQ2_XS, IQ2_S, IQ1_M); it meets one block of x as an exact integer
//! sum per scale. Each row of x keeps eight f32 sums, sum j taking sub-block j of
//! every super-block with one fused multiply-add by `scale · d_x` per scale, and the
//! eight are reduced at the end in a vector's horizontal order: what `x86::grids`
//! computes in one vector's lanes, so every path gives the same bits, and eight weight
//! rows (interleaved or not: `Strides` says where their blocks lie) or a row on its
//! own give the same bits too (see `q8`'s docs).

use super::{QuantizedX, BLOCK, EIGHT, MAX_ROWS};
use crate::kernels::quant::grids::{scales_halves, sub_block, SUB};
use crate::kernels::quant::BlockFormat;
use crate::kernels::quant_rows::order::Strides;

const _: () = assert!(SUB == BLOCK && SUB * LANES == 256);

/// Σ w·x over 16 or 32 bytes (exact in i32: |w| ≤ 63, |x| ≤ 127).
#[inline(always)]
fn byte_dot(w: &[i8], x: &[i8]) -> i32 {
    w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// `dots[i][r] = x[i] · weight row r` for `weight_rows` rows (1 to 8) whose block b
/// lies at `r · strides.row + b · strides.block` in `weights`, and `rows` rows of x.
/// Each row of x keeps eight f32 sums, sum j taking sub-block j of every super-block
/// (as `x86::grids` keeps them in one vector's lanes), reduced at the end by `reduce`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
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
    let (halves, blocks) = (scales_halves(format), k / BLOCK);
    for r in 0..weight_rows {
        let mut sums = [[0.0f32; LANES]; MAX_ROWS];
        for super_block in 0..k / weights_per_block {
            let block = &weights[r * strides.row + super_block * strides.block..][..block_bytes];
            for j in 0..LANES {
                let sub = sub_block(format, block, j);
                let b = super_block * LANES + j;
                for (i, sums) in sums[..rows].iter_mut().enumerate() {
                    let (xs, d_x) = (&x.quants[i * k + b * BLOCK..][..BLOCK], x.scales[i * blocks + b]);
                    let sum = &mut sums[j];
                    if halves {
                        let (low, high) =
                            (byte_dot(&sub.values[..16], &xs[..16]), byte_dot(&sub.values[16..], &xs[16..]));
                        *sum = (low as f32).mul_add(sub.scales[0] * d_x, *sum);
                        *sum = (high as f32).mul_add(sub.scales[1] * d_x, *sum);
                    } else {
                        *sum = (byte_dot(&sub.values, xs) as f32).mul_add(sub.scales[0] * d_x, *sum);
                    }
                }
            }
        }
        for (i, sums) in sums[..rows].iter().enumerate() {
            dots[i][r] = reduce(sums);
        }
    }
}

/// Sub-blocks per super-block, and f32 sums per row of x.
const LANES: usize = 8;

/// The eight sums' total in the order of a vector's horizontal sum: the halves added
/// lane by lane, then those four's halves, then the last two.
#[inline(always)]
pub(super) fn reduce(sums: &[f32; LANES]) -> f32 {
    let b: [f32; 4] = std::array::from_fn(|l| sums[l] + sums[l + 4]);
    (b[0] + b[2]) + (b[1] + b[3])
}

/// The products off x86 (and where the CPU lacks AVX2).
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
