//! Q3_K's and Q2_K's values and scales as the eight-row kernels take them: both keep
//! a super-block's values' low two bits in 64 bytes (value v at bit 2·(v % 128 / 32)
//! of byte v / 128 · 32 + v % 32), so block c of 32 values is one 32-byte load, shift
//! and mask; Q3_K adds each value's third bit from `hmask` (bit c of byte l is value
//! l of block c) and stores q + 4, which the kernels take as 0–7 less an offset of 4,
//! as Q6_K's 0–63 less 32.

use std::arch::x86_64::*;

use super::super::super::x86::{fetch_ahead, prefetch_next_rows, store};
use super::super::super::{QuantizedX, Strides};
use super::super::{BLOCK, BLOCKS_PER_SUPER, MAX_ROWS, SUPER};
use super::{accumulate, scale_column, KBlocks, K2, K3};
use crate::kernels::quant_rows::order::KGroup;

/// Block `c` (32 values) of the 64 bytes of 2-bit values at `low_bits`, 0–3.
#[inline(always)]
unsafe fn two_bits(low_bits: *const u8, c: usize) -> __m256i {
    // SAFETY: the caller's super-block holds 64 bytes of values at `low_bits`; AVX2
    // is present where this is inlined.
    unsafe {
        let packed = _mm256_loadu_si256(low_bits.add(32 * (c / 4)).cast());
        _mm256_and_si256(_mm256_srl_epi16(packed, _mm_cvtsi32_si128(2 * (c % 4) as i32)), _mm256_set1_epi8(3))
    }
}

/// Block `c` of a Q3_K super-block at `block` as q + 4, 0–7 (`quant::q3_k_values`).
#[inline(always)]
pub(super) unsafe fn q3_k_weights(block: *const u8, c: usize) -> __m256i {
    // SAFETY: the caller's super-block holds `hmask` (32 bytes) and the 2-bit values
    // (64) after it; AVX2 is present where this is inlined.
    unsafe {
        let hmask = _mm256_loadu_si256(block.cast());
        let third = _mm256_and_si256(_mm256_srl_epi16(hmask, _mm_cvtsi32_si128(c as i32)), _mm256_set1_epi8(1));
        _mm256_or_si256(two_bits(block.add(32), c), _mm256_slli_epi16::<2>(third))
    }
}

/// Block `c` of a Q2_K super-block at `block`, 0–3 (`quant::q2_k_values`).
#[inline(always)]
pub(super) unsafe fn q2_k_weights(block: *const u8, c: usize) -> __m256i {
    // SAFETY: the caller's super-block holds 64 bytes of values at 16.
    unsafe { two_bits(block.add(16), c) }
}

/// A Q3_K super-block's 12 bytes of packed 6-bit scales as 16 signed bytes, each less
/// its offset of 32 (`quant::q3_k_scale`, four at a time: scales 0–7 keep the low
/// nibbles of bytes 0–7, 8–15 their high ones, and bytes 8–11 give each its two high
/// bits).
#[inline(always)]
pub(super) unsafe fn q3_k_scales(packed: *const u8) -> __m128i {
    // SAFETY: the caller's block holds 12 bytes of scales at `packed`.
    let word = |at: usize| unsafe { packed.add(at).cast::<u32>().read_unaligned() };
    let (a, b, c) = (word(0), word(4), word(8));
    let (nibble, two) = (0x0F0F_0F0F, 0x0303_0303);
    let scales = [
        (a & nibble) | ((c & two) << 4),
        (b & nibble) | (((c >> 2) & two) << 4),
        ((a >> 4) & nibble) | (((c >> 4) & two) << 4),
        ((b >> 4) & nibble) | (((c >> 6) & two) << 4),
    ];
    // SAFETY: SSE2 is part of x86_64.
    unsafe {
        let stored = _mm_setr_epi32(scales[0] as i32, scales[1] as i32, scales[2] as i32, scales[3] as i32);
        _mm_sub_epi8(stored, _mm_set1_epi8(32))
    }
}

/// A Q2_K super-block's 16 scale bytes split: each sub-block's scale (low nibble)
/// and minimum (high nibble).
#[inline(always)]
pub(super) unsafe fn q2_k_scales_and_mins(block: *const u8) -> (__m128i, __m128i) {
    // SAFETY: the caller's block starts with 16 bytes of scales; SSE2 is part of x86_64.
    unsafe {
        let bytes = _mm_loadu_si128(block.cast());
        let nibble = _mm_set1_epi8(0x0F);
        (_mm_and_si128(bytes, nibble), _mm_and_si128(_mm_srli_epi16::<4>(bytes), nibble))
    }
}

/// Eight rows of Q3_K (`KIND` K3) or Q2_K (K2) laid out as `order::KGroup` times `M`
/// rows of x: a block's eight 32-byte groups of values hold four of each row's (group
/// g: values 4g … 4g + 3 of the block), so `super::accumulate` takes them by columns,
/// nothing reduced across lanes and nothing transposed at run time. The same integers
/// and float steps as by rows: the same bits.
#[inline(always)]
pub(super) unsafe fn transposed<const M: usize, const KIND: u8, const VNNI: bool>(
    weights: &[u8],
    strides: Strides,
    x: &QuantizedX,
    k: usize,
    dots: &mut [[f32; 8]; MAX_ROWS],
) {
    let blocks = k / BLOCK;
    // SAFETY: super-block s of the eight rows is the `strides.block` bytes at
    // s · strides.block inside `weights`; x holds M rows of k; AVX2, FMA and F16C (with
    // `VNNI`, AVX-512 VNNI and VL) are present where this is inlined.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); M];
        let ahead = fetch_ahead(strides, M);
        let vector = |at: *const u8| _mm256_loadu_si256(at.cast());
        for s in 0..k / SUPER {
            let group = weights.as_ptr().add(s * strides.block);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(group.cast()));
            let (scales, mins, dmin) = if KIND == K3 {
                (q3_k_scale_columns(group.add(KGroup::Q3K_SCALES)), [_mm_setzero_si128(); 8], _mm256_setzero_ps())
            } else {
                let (scales, mins) = q2_k_scale_columns(group.add(KGroup::Q2K_SCALES));
                (scales, mins, _mm256_cvtph_ps(_mm_loadu_si128(group.add(16).cast())))
            };
            let values = group.add(if KIND == K3 { KGroup::Q3K_VALUES } else { KGroup::Q2K_VALUES });
            for c in 0..BLOCKS_PER_SUPER {
                let b = s * BLOCKS_PER_SUPER + c;
                prefetch_next_rows(weights, ahead, b, blocks);
                let shift = _mm_cvtsi32_si128(2 * (c % 4) as i32);
                let mut w = [_mm256_setzero_si256(); 8];
                for (g, w) in w.iter_mut().enumerate() {
                    let low = _mm256_srl_epi16(vector(values.add(32 * (8 * (c / 4) + g))), shift);
                    *w = _mm256_and_si256(low, _mm256_set1_epi8(3));
                    if KIND == K3 {
                        let hmask = vector(group.add(KGroup::Q3K_HMASK + 32 * g));
                        let third = _mm256_srl_epi16(hmask, _mm_cvtsi32_si128(c as i32));
                        let third = _mm256_slli_epi16::<2>(_mm256_and_si256(third, _mm256_set1_epi8(1)));
                        *w = _mm256_or_si256(*w, third);
                    }
                }
                let (min_a, min_b) = if KIND == K2 {
                    (scale_column::<K2>(&mins, 2 * c), scale_column::<K2>(&mins, 2 * c + 1))
                } else {
                    (_mm256_setzero_si256(), _mm256_setzero_si256())
                };
                let block = KBlocks {
                    values: w,
                    magnitudes: w,
                    scale_a: scale_column::<KIND>(&scales, 2 * c),
                    scale_b: scale_column::<KIND>(&scales, 2 * c + 1),
                    d,
                    min: dmin,
                    min_a,
                    min_b,
                };
                for (i, sum) in acc.iter_mut().enumerate() {
                    accumulate::<KIND, true, VNNI>(&block, x, i, b, k, sum);
                }
            }
        }
        store(acc, dots);
    }
}

/// The eight rows' Q3_K scales (`KGroup`: three vectors whose byte 8j + r is row r's
/// byte j, 4 + j and 8 + j) as 16 signed columns, byte 8t + r row r's scale t less 32,
/// two columns to a vector as `super::scale_column` reads them.
#[inline(always)]
unsafe fn q3_k_scale_columns(packed: *const u8) -> [__m128i; 8] {
    // SAFETY: the caller's group holds 96 bytes of scales at `packed`; AVX2 is present
    // where this is inlined.
    unsafe {
        let load = |v: usize| _mm256_loadu_si256(packed.add(32 * v).cast());
        let (a, b, c) = (load(0), load(1), load(2));
        let (nibble, two) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
        // Byte 8 + j's pair at bits 2·q as bits 4–5.
        let high = |q: i32| {
            let pair = _mm256_and_si256(_mm256_srl_epi16(c, _mm_cvtsi32_si128(2 * q)), two);
            _mm256_slli_epi16::<4>(pair)
        };
        let low = |v: __m256i, upper: bool| _mm256_and_si256(if upper { _mm256_srli_epi16::<4>(v) } else { v }, nibble);
        // Columns 0–3, 4–7, 8–11, 12–15 (`quant::q3_k_scale`).
        let quads = [
            _mm256_or_si256(low(a, false), high(0)),
            _mm256_or_si256(low(b, false), high(1)),
            _mm256_or_si256(low(a, true), high(2)),
            _mm256_or_si256(low(b, true), high(3)),
        ];
        let mut columns = [_mm_setzero_si128(); 8];
        for (q, quad) in quads.into_iter().enumerate() {
            let signed = _mm256_sub_epi8(quad, _mm256_set1_epi8(32));
            columns[2 * q] = _mm256_castsi256_si128(signed);
            columns[2 * q + 1] = _mm256_extracti128_si256::<1>(signed);
        }
        columns
    }
}

/// The eight rows' Q2_K scale bytes by column (`KGroup`) as the scales' columns and the
/// minimums', two columns to a vector.
#[inline(always)]
unsafe fn q2_k_scale_columns(packed: *const u8) -> ([__m128i; 8], [__m128i; 8]) {
    // SAFETY: the caller's group holds 128 bytes of scales at `packed`; SSE2 is part
    // of x86_64.
    unsafe {
        let nibble = _mm_set1_epi8(0x0F);
        let (mut scales, mut mins) = ([_mm_setzero_si128(); 8], [_mm_setzero_si128(); 8]);
        for (p, (scale, min)) in scales.iter_mut().zip(mins.iter_mut()).enumerate() {
            let bytes = _mm_loadu_si128(packed.add(16 * p).cast());
            (*scale, *min) = (_mm_and_si128(bytes, nibble), _mm_and_si128(_mm_srli_epi16::<4>(bytes), nibble));
        }
        (scales, mins)
    }
}
