//! Q3_K's and Q2_K's values and scales as the eight-row kernels take them: both keep
//! a super-block's values' low two bits in 64 bytes (value v at bit 2·(v % 128 / 32)
//! of byte v / 128 · 32 + v % 32), so block c of 32 values is one 32-byte load, shift
//! and mask; Q3_K adds each value's third bit from `hmask` (bit c of byte l is value
//! l of block c) and stores q + 4, which the kernels take as 0–7 less an offset of 4,
//! as Q6_K's 0–63 less 32.

use std::arch::x86_64::*;

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
