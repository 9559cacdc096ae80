//! `eight` for one row of x (batch-1 decoding) over Q4_0, Q4_1, IQ4_NL and IQ4_XS, two weight
//! rows to a vector: rows p and p + 4's 16 bytes of nibbles side by side, whose low
//! nibbles multiply x's first 16 values and high nibbles its last 16 (x's halves
//! broadcast to both 128-bit lanes), so no nibble is moved across lanes and the eight
//! rows reduce from four vectors, not eight. This kernel's time was its arithmetic,
//! not its reads (one row of x multiplied 35 G weights/s from RAM, 20 GB/s of blocks,
//! where the memory gives 27–30). With VNNI it gained nothing while its rows lay in
//! row order (a decoding step 0.91–1.02× in pairs), and 1.02–1.07× once they came
//! interleaved (five pairs, all faster).
//!
//! Q4_0's and Q4_1's nibbles multiply as they are (Q4_0's 8·Σx off after, Q4_1's
//! minimum times x's sum added; a nibble times x is at most 15·127, two pairs' sum
//! 7 620: 16 bits hold it). IQ4_NL's and IQ4_XS's are looked up
//! in both lanes at once: with VNNI as w + 128 (an offset kind; 128·Σx off after: four
//! products summed into 32 bits, nothing to saturate), else as |w| times x with w's
//! sign (at most 127·127, a pair below 2¹⁵), the two halves widened apart. The
//! integer sums are `row_sums`' and the float steps the same, in lane order: the same
//! bits.

use std::arch::x86_64::*;

use super::iq4::{headers, iq4_xs_block_at, sub_block_scales, Headers, SUB_BLOCKS};
use super::lanes::{byte_sums, pair_sums, reduce_paired};
use super::{
    base, block_at, broadcast_halves, f16_scales, fetch_ahead, has_min, offset, paired_nibbles, prefetch_next_rows,
    scales_of, store, unsigned, KIND_IQ4_XS, KIND_Q4_0, KIND_Q4_1, OFFSET,
};
use super::{QuantizedX, Strides, BLOCK, MAX_ROWS};
use crate::kernels::quant::IQ4_VALUES;

#[inline(always)]
pub(super) unsafe fn one_row<const KIND: u8, const VNNI: bool>(
    weights: &[u8],
    strides: Strides,
    x: &QuantizedX,
    k: usize,
    dots: &mut [[f32; 8]; MAX_ROWS],
) {
    let blocks = k / BLOCK;
    // SAFETY: see `eight_rows`: block b of each of the eight rows lies inside
    // `weights`, and x's one row holds `blocks` blocks; AVX2, FMA and F16C are present.
    unsafe {
        let nibble = _mm256_set1_epi8(0x0F);
        let mut values = _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_VALUES.as_ptr().cast()));
        if KIND & OFFSET != 0 {
            values = _mm256_add_epi8(values, _mm256_set1_epi8(-128));
        }
        // Q4_1's nibbles follow its scale and minimum.
        let values_at = if KIND == KIND_Q4_1 { 4 } else { 2 };
        let mut acc = _mm256_setzero_ps();
        let ahead = fetch_ahead(strides, 1);
        let mut super_block =
            Headers { d: _mm256_setzero_ps(), low: _mm256_setzero_si256(), high: _mm256_setzero_si256() };
        for b in 0..blocks {
            prefetch_next_rows(weights, ahead, b, blocks);
            let at = |r: usize| {
                if base(KIND) == KIND_IQ4_XS {
                    iq4_xs_block_at(weights, strides, r, b)
                } else {
                    block_at(weights, strides, r, b)
                }
            };
            let (x_low, x_high) = broadcast_halves(x.quants.as_ptr().add(b * BLOCK));
            // Lanes 0–3 of `sums[p]`: row p's 32-bit sums, lanes 4–7 row p + 4's.
            let mut sums = [_mm256_setzero_si256(); 4];
            for (p, sum) in sums.iter_mut().enumerate() {
                let (mut low, mut high) = paired_nibbles(at(p).add(values_at), at(p + 4).add(values_at), nibble);
                if KIND != KIND_Q4_0 && KIND != KIND_Q4_1 {
                    (low, high) = (_mm256_shuffle_epi8(values, low), _mm256_shuffle_epi8(values, high));
                }
                *sum = if unsigned(KIND) {
                    pair_sums::<VNNI>(low, x_low, high, x_high)
                } else {
                    let first =
                        byte_sums::<VNNI>(_mm256_setzero_si256(), _mm256_abs_epi8(low), _mm256_sign_epi8(x_low, low));
                    byte_sums::<VNNI>(first, _mm256_abs_epi8(high), _mm256_sign_epi8(x_high, high))
                };
            }
            let mut total = reduce_paired(sums);
            if offset(KIND) != 0 {
                total = _mm256_sub_epi32(total, _mm256_set1_epi32(offset(KIND) * *x.sums.get_unchecked(b)));
            }
            let weight_scales = if base(KIND) == KIND_IQ4_XS {
                if b % SUB_BLOCKS == 0 {
                    super_block = headers(weights, strides, b);
                }
                sub_block_scales(super_block, b % SUB_BLOCKS)
            } else {
                scales_of(weights, strides, b)
            };
            let d_x = *x.scales.get_unchecked(b);
            let scale = _mm256_mul_ps(weight_scales, _mm256_set1_ps(d_x));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), scale, acc);
            if has_min(KIND) {
                let mins = f16_scales(at, 2);
                acc = _mm256_fmadd_ps(mins, _mm256_set1_ps(d_x * *x.sums.get_unchecked(b) as f32), acc);
            }
        }
        store([acc], dots);
    }
}
