//! One row of x (batch-1 decoding) over eight Q4_K or Q5_K weight rows in row order.

use std::arch::x86_64::*;

use super::super::super::super::k_quants::fifth_bits;
use super::super::super::x86::{
    block_at, broadcast_halves, fetch_ahead, pair_sums, paired_nibbles, prefetch_next_rows, reduce_paired, store,
};
use super::super::super::QuantizedX;
use super::super::super::Strides;
use super::super::{BLOCK, BLOCKS_PER_SUPER, MAX_ROWS, SUPER};
use super::{scale_column, super_scales, SuperScales, K4, K5};

/// `eight` for Q4_K (or Q5_K) and one row of x (batch-1 decoding), two weight rows
/// to a vector as `q8::x86`'s `q4_0_one_row` does: a 32-byte chunk of values holds
/// block 2j in its low nibbles and block 2j + 1 in its high ones, so rows p and
/// p + 4's chunk halves side by side give both blocks' sums for the two rows from
/// two loads, and the eight rows reduce from four vectors per block, not eight.
/// Q5_K's fifth bits come from the same 16-byte halves of its 32 bytes of them.
/// The integers are `row_totals`' (the block's two halves added, as `accumulate`
/// adds them; two pairs' sum at most 2 · 2 · 31 · 127 < 2¹⁵) and the float steps
/// `accumulate`'s: the same bits.
#[inline(always)]
pub(super) unsafe fn q4_k_one_row<const KIND: u8, const VNNI: bool>(
    weights: &[u8],
    strides: Strides,
    x: &QuantizedX,
    k: usize,
    dots: &mut [[f32; 8]; MAX_ROWS],
) {
    let (blocks, supers) = (k / BLOCK, k / SUPER);
    // SAFETY: see `eight_rows`: super-block s of each of the eight rows lies inside
    // `weights`, and x's one row holds `blocks` blocks; AVX2, FMA and F16C are present.
    unsafe {
        let nibble = _mm256_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        let ahead = fetch_ahead(strides, 1);
        for s in 0..supers {
            let at = |r: usize| block_at(weights, strides, r, s);
            let SuperScales { d, dmin, columns, .. } = super_scales::<K4>(at);
            for chunk in 0..BLOCKS_PER_SUPER / 2 {
                let first = s * BLOCKS_PER_SUPER + 2 * chunk;
                prefetch_next_rows(weights, ahead, first, blocks);
                prefetch_next_rows(weights, ahead, first + 1, blocks);
                let (x0_low, x0_high) = broadcast_halves(x.quants.as_ptr().add(first * BLOCK));
                let (x1_low, x1_high) = broadcast_halves(x.quants.as_ptr().add((first + 1) * BLOCK));
                // Per pair of rows: the chunk's first and second 16 bytes, each
                // as (low, high) nibbles. Two pairs' sum is at most 2 · 2 · 15 · 127.
                let mut even = [_mm256_setzero_si256(); 4];
                let mut odd = [_mm256_setzero_si256(); 4];
                let nibbles = if KIND == K5 { 48 } else { 16 };
                for p in 0..4 {
                    let values = |r: usize, half: usize| at(r).add(nibbles + 32 * chunk + 16 * half);
                    let (mut low_a, mut high_a) = paired_nibbles(values(p, 0), values(p + 4, 0), nibble);
                    let (mut low_b, mut high_b) = paired_nibbles(values(p, 1), values(p + 4, 1), nibble);
                    if KIND == K5 {
                        let bits = |half: usize| {
                            _mm256_loadu2_m128i(at(p + 4).add(16 + 16 * half).cast(), at(p).add(16 + 16 * half).cast())
                        };
                        let (bits_a, bits_b) = (bits(0), bits(1));
                        low_a = _mm256_or_si256(low_a, fifth_bits(bits_a, 2 * chunk));
                        high_a = _mm256_or_si256(high_a, fifth_bits(bits_a, 2 * chunk + 1));
                        low_b = _mm256_or_si256(low_b, fifth_bits(bits_b, 2 * chunk));
                        high_b = _mm256_or_si256(high_b, fifth_bits(bits_b, 2 * chunk + 1));
                    }
                    even[p] = pair_sums::<VNNI>(low_a, x0_low, low_b, x0_high);
                    odd[p] = pair_sums::<VNNI>(high_a, x1_low, high_b, x1_high);
                }
                for (c, sums) in [(2 * chunk, even), (2 * chunk + 1, odd)] {
                    let b = s * BLOCKS_PER_SUPER + c;
                    let d_x = *x.scales.get_unchecked(b);
                    let total = _mm256_mullo_epi32(reduce_paired(sums), scale_column::<K4>(&columns, c));
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(d, _mm256_set1_ps(d_x)), acc);
                    // As `super_blocks`' `min` and `accumulate`'s last step.
                    let min = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(scale_column::<K4>(&columns, 8 + c)));
                    let scaled_sum = d_x * *x.sums.get_unchecked(b) as f32;
                    acc = _mm256_fnmadd_ps(min, _mm256_set1_ps(scaled_sum), acc);
                }
            }
        }
        store([acc], dots);
    }
}
