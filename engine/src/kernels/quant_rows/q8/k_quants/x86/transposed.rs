//! Q4_K and Q6_K over eight weight rows laid out as `order::KGroup` (the order a run
//! keeps resident weights in): each 32-byte load of values holds four of every row's,
//! so a byte product (`VPDPBUSD`, or `maddubs` and `madd`) against four values of x
//! broadcast sums straight into lane r for row r. Where the rows lie in file order,
//! `super::eight` reduces eight vectors across lanes per block for one row of x and
//! transposes the block for more: here neither is done, and the super-block's scales
//! come by column, ready to multiply.
//!
//! The integers are those of the other paths (a block's exact sums under its
//! integer scales; Q6_K's `q − 32` taken as `Σ q·x − 32·Σx` over each half, with x's
//! half sums from its quantization), and the float steps are `super::accumulate`'s,
//! in its order: the same bits.

use std::arch::x86_64::*;

use super::super::super::super::k_quants::fifth_bits;
use super::super::super::x86::{fetch_ahead, prefetch_next_rows, store};
use super::super::super::{QuantizedX, Strides};
use super::super::{BLOCK, BLOCKS_PER_SUPER, MAX_ROWS, SUPER};
use super::{column_totals, q6_k_values, K5};
use crate::kernels::quant_rows::order::KGroup;

/// Column t of the scales (`columns`: byte 8t + r is row r's), as eight i32 lanes:
/// zero-extended (Q4_K's 6-bit scales and minimums) or sign-extended (Q6_K's).
#[inline(always)]
unsafe fn scale_column<const SIGNED: bool>(columns: *const u8, t: usize) -> __m256i {
    // SAFETY: the caller's columns hold byte 8t + 7; AVX2 is present where this is inlined.
    unsafe {
        let bytes = _mm_loadl_epi64(columns.add(8 * t).cast());
        if SIGNED {
            _mm256_cvtepi8_epi32(bytes)
        } else {
            _mm256_cvtepu8_epi32(bytes)
        }
    }
}

/// Q4_K's packed scale bytes of the eight rows (`KGroup`: three vectors whose byte
/// 8j + r is row r's byte j, 4 + j, 8 + j) unpacked into `columns`: `sc` of sub-blocks
/// 0–7 as columns 0–7, `m` as 8–15 (`quant::scale_min_k4`'s unpacking, for all eight
/// rows and four sub-blocks at a time).
#[inline(always)]
unsafe fn q4_k_scale_columns(packed: *const u8, columns: &mut [u8; 128]) {
    // SAFETY: the caller's group holds 96 bytes of scales at `packed`; AVX2 is
    // present where this is inlined.
    unsafe {
        let load = |v: usize| _mm256_loadu_si256(packed.add(32 * v).cast());
        let (a, b, c) = (load(0), load(1), load(2));
        let (low6, nibble, two) = (_mm256_set1_epi8(0x3F), _mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
        // Bits 6–7 of `a`'s (or `b`'s) byte as bits 4–5 of the high sub-blocks' values.
        let top_two = |v: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(v), two));
        let sc_high = _mm256_or_si256(_mm256_and_si256(c, nibble), top_two(a));
        let m_high = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(c), nibble), top_two(b));
        let out = columns.as_mut_ptr();
        for (v, value) in
            [_mm256_and_si256(a, low6), sc_high, _mm256_and_si256(b, low6), m_high].into_iter().enumerate()
        {
            _mm256_storeu_si256(out.add(32 * v).cast(), value);
        }
    }
}

/// The eight rows' Q4_K (`KIND` K4) or Q5_K (K5: each value's fifth bit from the
/// fifth-bit groups, which line up with every chunk's value groups) products with `M`
/// rows of x.
#[inline(always)]
pub(super) unsafe fn q4_k<const M: usize, const KIND: u8, const VNNI: bool>(
    weights: &[u8],
    strides: Strides,
    x: &QuantizedX,
    k: usize,
    dots: &mut [[f32; 8]; MAX_ROWS],
) {
    let (blocks, supers) = (k / BLOCK, k / SUPER);
    // SAFETY: see `eight_rows`: each super-block group lies inside
    // `weights`, x's rows hold `blocks` blocks; AVX2, FMA and F16C are present.
    unsafe {
        let nibble = _mm256_set1_epi8(0x0F);
        let ahead = fetch_ahead(strides, M);
        let mut acc = [_mm256_setzero_ps(); M];
        let mut columns = [0u8; 128];
        for s in 0..supers {
            let group = weights.as_ptr().add(s * strides.block);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(group.cast()));
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(group.add(16).cast()));
            q4_k_scale_columns(group.add(KGroup::Q4K_SCALES), &mut columns);
            let mut bits = [_mm256_setzero_si256(); 8];
            if KIND == K5 {
                for (g, b) in bits.iter_mut().enumerate() {
                    *b = _mm256_loadu_si256(group.add(KGroup::Q5K_BITS + 32 * g).cast());
                }
            }
            let values = if KIND == K5 { KGroup::Q5K_VALUES } else { KGroup::Q4K_VALUES };
            for chunk in 0..BLOCKS_PER_SUPER / 2 {
                // Values 32·chunk … of every row: block 2·chunk in the low nibbles,
                // 2·chunk + 1 in the high ones.
                let mut packed = [_mm256_setzero_si256(); 8];
                for (g, p) in packed.iter_mut().enumerate() {
                    *p = _mm256_loadu_si256(group.add(values + 32 * (8 * chunk + g)).cast());
                }
                for c in [2 * chunk, 2 * chunk + 1] {
                    let b = s * BLOCKS_PER_SUPER + c;
                    prefetch_next_rows(weights, ahead, b, blocks);
                    let mut w = packed;
                    for (w, &b) in w.iter_mut().zip(&bits) {
                        let shifted = if c.is_multiple_of(2) { *w } else { _mm256_srli_epi16::<4>(*w) };
                        *w = _mm256_and_si256(shifted, nibble);
                        if KIND == K5 {
                            *w = _mm256_or_si256(*w, fifth_bits(b, c));
                        }
                    }
                    let scale = scale_column::<false>(columns.as_ptr(), c);
                    // dmin·m for the block, as `super_blocks`' `min`.
                    let min = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(scale_column::<false>(columns.as_ptr(), 8 + c)));
                    for (i, sum) in acc.iter_mut().enumerate() {
                        let xs = x.quants.as_ptr().add(i * k + b * BLOCK);
                        let (first, second) = column_totals::<KIND, VNNI>(&w, &w, xs);
                        let d_x = *x.scales.get_unchecked(i * blocks + b);
                        let total = _mm256_mullo_epi32(_mm256_add_epi32(first, second), scale);
                        *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(d, _mm256_set1_ps(d_x)), *sum);
                        let scaled_sum = d_x * *x.sums.get_unchecked(i * blocks + b) as f32;
                        *sum = _mm256_fnmadd_ps(min, _mm256_set1_ps(scaled_sum), *sum);
                    }
                }
            }
        }
        store(acc, dots);
    }
}

/// The eight rows' Q6_K products with `M` rows of x.
#[inline(always)]
pub(super) unsafe fn q6_k<const M: usize, const VNNI: bool>(
    weights: &[u8],
    strides: Strides,
    x: &QuantizedX,
    k: usize,
    dots: &mut [[f32; 8]; MAX_ROWS],
) {
    // SAFETY: as in `q4_k`.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); M];
        let at = Q6Block { weights, ahead: fetch_ahead(strides, M), x, k };
        for s in 0..k / SUPER {
            let group = weights.as_ptr().add(s * strides.block);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(group.cast()));
            // Each block's quarter a constant, so that its shifts are.
            for half in 0..2 {
                at.block::<M, VNNI, 0>(group, d, s, half, &mut acc);
                at.block::<M, VNNI, 1>(group, d, s, half, &mut acc);
                at.block::<M, VNNI, 2>(group, d, s, half, &mut acc);
                at.block::<M, VNNI, 3>(group, d, s, half, &mut acc);
            }
        }
        store(acc, dots);
    }
}

/// What every Q6_K block of a product reads besides its group's bytes.
struct Q6Block<'a, 'x> {
    weights: &'a [u8],
    ahead: bool,
    x: &'a QuantizedX<'x>,
    k: usize,
}

impl Q6Block<'_, '_> {
    /// Block `4·half + QUARTER` of super-block `s` (at `group`, its `d`) into `acc`.
    #[inline(always)]
    unsafe fn block<const M: usize, const VNNI: bool, const QUARTER: usize>(
        &self,
        group: *const u8,
        d: __m256,
        s: usize,
        half: usize,
        acc: &mut [__m256; M],
    ) {
        let (x, k, blocks) = (self.x, self.k, self.k / BLOCK);
        let c = 4 * half + QUARTER;
        let b = s * BLOCKS_PER_SUPER + c;
        // SAFETY: as in `q4_k`.
        unsafe {
            prefetch_next_rows(self.weights, self.ahead, b, blocks);
            let values = group.add(KGroup::Q6K_VALUES + half * KGroup::Q6K_HALF);
            let ql = values.add(if QUARTER.is_multiple_of(2) { 0 } else { KGroup::Q6K_QL_1 });
            let mut w = [_mm256_setzero_si256(); 8];
            for (g, w) in w.iter_mut().enumerate() {
                let ql = _mm256_loadu_si256(ql.add(32 * g).cast());
                let qh = _mm256_loadu_si256(values.add(KGroup::Q6K_QH + 32 * g).cast());
                *w = q6_k_values::<VNNI>(ql, qh, QUARTER);
            }
            let columns = group.add(KGroup::Q6K_SCALES);
            let (scale_a, scale_b) = (scale_column::<true>(columns, 2 * c), scale_column::<true>(columns, 2 * c + 1));
            for (i, sum) in acc.iter_mut().enumerate() {
                let xs = x.quants.as_ptr().add(i * k + b * BLOCK);
                let first = *x.halves.get_unchecked(i * blocks + b);
                let second = *x.sums.get_unchecked(i * blocks + b) - first;
                let (a, b_sums) = q6_k_totals::<VNNI>(&w, xs, -32 * first, -32 * second);
                let total = _mm256_add_epi32(_mm256_mullo_epi32(a, scale_a), _mm256_mullo_epi32(b_sums, scale_b));
                let d_x = *x.scales.get_unchecked(i * blocks + b);
                *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(d, _mm256_set1_ps(d_x)), *sum);
            }
        }
    }
}

/// A block of x (`xs`, 32 bytes) times eight rows' Q6_K values 0–63 transposed by
/// 4-byte groups (`w`; groups 0–3 the block's first half): per row, Σ (q − 32)·x
/// over each half, as `offset_a + Σ q·x` with `offset_a = −32·Σx` over that half.
#[inline(always)]
unsafe fn q6_k_totals<const VNNI: bool>(
    w: &[__m256i; 8],
    xs: *const i8,
    offset_a: i32,
    offset_b: i32,
) -> (__m256i, __m256i) {
    // SAFETY: `xs` holds 32 bytes; AVX2 (with `VNNI`, AVX-512 VNNI and VL) is
    // present where this is inlined.
    unsafe {
        let group = |g: usize| _mm256_set1_epi32(xs.cast::<i32>().add(g).read_unaligned());
        let mut halves = [_mm256_set1_epi32(offset_a), _mm256_set1_epi32(offset_b)];
        for (h, sums) in halves.iter_mut().enumerate() {
            if VNNI {
                for (g, &w) in w.iter().enumerate().skip(4 * h).take(4) {
                    *sums = _mm256_dpbusd_epi32(*sums, w, group(g));
                }
            } else {
                // Two groups' pairs add in 16 bits: 2 · 2 · 63 · 127 < 2¹⁵.
                for g in [4 * h, 4 * h + 2] {
                    let pairs = _mm256_maddubs_epi16(w[g], group(g));
                    let pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w[g + 1], group(g + 1)));
                    *sums = _mm256_add_epi32(*sums, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
                }
            }
        }
        (halves[0], halves[1])
    }
}
