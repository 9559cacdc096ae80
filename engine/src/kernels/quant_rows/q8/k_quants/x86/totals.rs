//! A block of x times eight weight rows' blocks, as the integer sums the K-quant
//! kernels scale: by rows (each row's sums reduced across lanes) or by 4-byte
//! columns (each row's sums landing in its lane).

use std::arch::x86_64::*;

use super::super::super::x86::reduce_halves;
use super::{per_16, value_offset, K4, K6};

/// A block of x (`xs`, 32 bytes) times eight rows' blocks `w` (unsigned values, 0–3
/// to 0–63): per row, the integer sums of the block's halves (less `value_offset`·x:
/// Q6_K 32, Q3_K 4), reduced across rows into lane r of two vectors.
#[inline(always)]
pub(super) unsafe fn row_totals<const KIND: u8, const VNNI: bool>(
    w: &[__m256i; 8],
    xs: *const i8,
) -> (__m256i, __m256i) {
    // SAFETY: `xs` holds 32 bytes; AVX2 (with `VNNI`, AVX-512 VNNI and VL) is
    // present where this is inlined.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let xv = _mm256_loadu_si256(xs.cast());
        let offset = _mm256_maddubs_epi16(_mm256_set1_epi8(value_offset(KIND)), xv);
        let mut p = [_mm256_setzero_si256(); 8];
        if VNNI {
            // Four products to a lane at once, less 32·x over the same four: the
            // 16-bit pairs' difference widened, as below.
            let offset = _mm256_madd_epi16(offset, ones);
            for (p, &w) in p.iter_mut().zip(w) {
                let sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, xv);
                *p = if value_offset(KIND) != 0 { _mm256_sub_epi32(sums, offset) } else { sums };
            }
        } else {
            for (p, &w) in p.iter_mut().zip(w) {
                let pairs = _mm256_maddubs_epi16(w, xv);
                *p = _mm256_madd_epi16(
                    if value_offset(KIND) != 0 { _mm256_sub_epi16(pairs, offset) } else { pairs },
                    ones,
                );
            }
        }
        reduce_halves(p)
    }
}

/// `row_totals` over blocks transposed by `transpose_groups` (see `q8`'s
/// `column_sums`), Q6_K's as q − 32 (`w`) and |q − 32| (`magnitude`): groups
/// 0–3 are the block's first half, 4–7 its second. Q4_K's pairs (≤ 2·15·127) add
/// in 16 bits over the block (its sum comes back in two parts to add: with VNNI
/// the even and odd groups, else whole and zero),
/// Q5_K's (≤ 2·31·127) and Q6_K's (≤ 2·32·127 = 8 128) four to a half; Q3_K's
/// (q + 4, ≤ 2·7·127: `accumulate` takes 4·Σx off each half) and Q2_K's unsigned,
/// four to a half.
#[inline(always)]
pub(super) unsafe fn column_totals<const KIND: u8, const VNNI: bool>(
    w: &[__m256i; 8],
    magnitude: &[__m256i; 8],
    xs: *const i8,
) -> (__m256i, __m256i) {
    // SAFETY: `xs` holds 32 bytes; AVX2 (with `VNNI`, AVX-512 VNNI and VL) is
    // present where this is inlined.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let group = |g: usize| _mm256_set1_epi32(xs.cast::<i32>().add(g).read_unaligned());
        if VNNI {
            // Four products to a lane, summed into 32 bits as they come (Q6_K's
            // halves apart; Q4_K's groups in two chains, even and odd, so that each
            // product waits on half as many): the same integers.
            let mut halves = [_mm256_setzero_si256(); 2];
            for g in 0..8 {
                let half = &mut halves[if per_16(KIND) { g / 4 } else { g % 2 }];
                *half = if KIND == K6 {
                    _mm256_dpbusd_epi32(*half, magnitude[g], _mm256_sign_epi8(group(g), w[g]))
                } else {
                    _mm256_dpbusd_epi32(*half, w[g], group(g))
                };
            }
            return (halves[0], halves[1]);
        }
        if KIND == K4 {
            let mut pairs = _mm256_setzero_si256();
            for (g, &w) in w.iter().enumerate() {
                pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w, group(g)));
            }
            return (_mm256_madd_epi16(pairs, ones), _mm256_setzero_si256());
        }
        let mut halves = [_mm256_setzero_si256(); 2];
        for (h, half) in halves.iter_mut().enumerate() {
            let mut pairs = _mm256_setzero_si256();
            for g in 4 * h..4 * h + 4 {
                let product = if KIND == K6 {
                    _mm256_maddubs_epi16(magnitude[g], _mm256_sign_epi8(group(g), w[g]))
                } else {
                    _mm256_maddubs_epi16(w[g], group(g))
                };
                pairs = _mm256_add_epi16(pairs, product);
            }
            *half = _mm256_madd_epi16(pairs, ones);
        }
        (halves[0], halves[1])
    }
}
