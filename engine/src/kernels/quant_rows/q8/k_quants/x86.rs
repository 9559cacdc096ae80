//! AVX2, eight weight rows at a time, as `q8::x86` does Q8_0 and Q4_0: each block
//! of x is loaded once for the eight rows, `maddubs` multiplies the unsigned
//! weights (Q4_K 0–15, Q6_K 0–63) by x's signed bytes pairwise (below 2¹⁵), and
//! the eight rows' sums reduce into one vector whose lane r is row r's — or, from
//! three rows of x, the eight rows' block is transposed by 4-byte groups so that
//! row r's sums land in lane r unreduced (`column_totals`; see `q8::x86`). The
//! super-block's scales are transposed once (`scale_columns`) so that a block's
//! scales for the eight rows are one vector too.

use std::arch::x86_64::*;

use super::super::super::k_quants::fifth_bits;
use super::super::x86::{block_at, f16_scales, fetch_ahead, prefetch_next_rows, store, transpose_groups};
use super::super::{QuantizedX, Strides};
use super::{BlockFormat, BLOCK, BLOCKS_PER_SUPER, MAX_ROWS, SUPER};

mod low_bits;
mod one_row;
mod totals;
mod transposed;
use low_bits::{q2_k_scales_and_mins, q2_k_weights, q3_k_scales, q3_k_weights, transposed as low_bits_transposed};
use one_row::q4_k_one_row;
use totals::{column_totals, row_totals};
use transposed::{q4_k as q4_k_transposed, q6_k as q6_k_transposed};

avx2_and_vnni!(
    /// `dots[i][r] = x[i] · weight row r` for eight weight rows of Q4_K or Q6_K
    /// (`weights`, their super-blocks where `strides` says; with `strides.transposed`
    /// laid out as `order::KGroup`, which `transposed` multiplies) and `rows` rows of x.
    eight_rows, eight_rows_vnni => eight_rows_in(
        format: BlockFormat,
        weights: &[u8],
        strides: Strides,
        x: &QuantizedX,
        rows: usize,
        k: usize,
        dots: &mut [[f32; 8]; MAX_ROWS],
    )
);

#[inline(always)]
unsafe fn eight_rows_in<const VNNI: bool>(
    format: BlockFormat,
    weights: &[u8],
    strides: Strides,
    x: &QuantizedX,
    rows: usize,
    k: usize,
    dots: &mut [[f32; 8]; MAX_ROWS],
) {
    // SAFETY (each arm): as the caller vouches.
    unsafe {
        match (format, strides.transposed) {
            (BlockFormat::Q6K, true) => with_rows!(rows, q6_k_transposed::<_, VNNI>(weights, strides, x, k, dots)),
            (BlockFormat::Q5K, true) => with_rows!(rows, q4_k_transposed::<_, K5, VNNI>(weights, strides, x, k, dots)),
            (BlockFormat::Q3K, true) => {
                with_rows!(rows, low_bits_transposed::<_, K3, VNNI>(weights, strides, x, k, dots))
            }
            (BlockFormat::Q2K, true) => {
                with_rows!(rows, low_bits_transposed::<_, K2, VNNI>(weights, strides, x, k, dots))
            }
            (_, true) => with_rows!(rows, q4_k_transposed::<_, K4, VNNI>(weights, strides, x, k, dots)),
            (BlockFormat::Q6K, false) => with_rows!(rows, eight_m::<_, K6, VNNI>(weights, strides, x, k, dots)),
            (BlockFormat::Q3K, false) => with_rows!(rows, eight_m::<_, K3, VNNI>(weights, strides, x, k, dots)),
            (BlockFormat::Q2K, false) => with_rows!(rows, eight_m::<_, K2, VNNI>(weights, strides, x, k, dots)),
            (BlockFormat::Q5K, false) => with_rows!(rows, eight_m::<_, K5, VNNI>(weights, strides, x, k, dots)),
            (_, false) => with_rows!(rows, eight_m::<_, K4, VNNI>(weights, strides, x, k, dots)),
        }
    }
}

/// `eight` by rows for one or two rows of x, by columns from three.
#[inline(always)]
unsafe fn eight_m<const M: usize, const KIND: u8, const VNNI: bool>(
    weights: &[u8],
    strides: Strides,
    x: &QuantizedX,
    k: usize,
    dots: &mut [[f32; 8]; MAX_ROWS],
) {
    // SAFETY: as the caller vouches.
    unsafe {
        if M >= 3 {
            eight::<M, KIND, true, VNNI>(weights, strides, x, k, dots)
        } else if M == 1 && (KIND == K4 || KIND == K5) {
            q4_k_one_row::<KIND, VNNI>(weights, strides, x, k, dots)
        } else {
            eight::<M, KIND, false, VNNI>(weights, strides, x, k, dots)
        }
    }
}

/// Which K-quant a kernel multiplies (its const parameter `KIND`). Q5_K is Q4_K's
/// layout with the values' fifth bits in 32 bytes before the nibbles: the same
/// scales, minimums and sums, values 0–31. Q3_K is Q6_K's arithmetic (a signed scale
/// per 16 values, values taken unsigned less an offset) over 3-bit values; Q2_K
/// Q6_K's with 2-bit values, no offset and unsigned scales, and a minimum per 16
/// values times x's sum over them (x's half sums).
const K4: u8 = 4;
const K5: u8 = 5;
const K6: u8 = 6;
const K3: u8 = 3;
const K2: u8 = 2;

/// Whether `KIND`'s scales cover 16 values each (two per block of x).
const fn per_16(kind: u8) -> bool {
    matches!(kind, K6 | K3 | K2)
}

/// What `KIND`'s stored values exceed their signed values by (Q6_K 32, Q3_K 4).
const fn value_offset(kind: u8) -> i8 {
    match kind {
        K6 => 32,
        K3 => 4,
        _ => 0,
    }
}

/// A Q4_K super-block's 12 bytes of packed scales as 16 bytes: `sc` of sub-blocks
/// 0–7, then `m` of 0–7 (the unpacking of `quant::scale_min_k4`, four at a time:
/// sub-blocks 0–3 keep the low 6 bits of their bytes, 4–7 gather a nibble and the
/// two bits 0–3 left over).
#[inline(always)]
unsafe fn q4_k_scales(packed: *const u8) -> __m128i {
    // SAFETY: the caller's block holds 12 bytes of scales at `packed`.
    let word = |at: usize| unsafe { packed.add(at).cast::<u32>().read_unaligned() };
    let (a, b, c) = (word(0), word(4), word(8));
    let low6 = 0x3F3F_3F3F;
    let (nibble, two) = (0x0F0F_0F0F, 0x0303_0303);
    let sc_high = (c & nibble) | (((a >> 6) & two) << 4);
    let m_high = ((c >> 4) & nibble) | (((b >> 6) & two) << 4);
    // SAFETY: SSE2 is part of x86_64.
    unsafe { _mm_setr_epi32((a & low6) as i32, sc_high as i32, (b & low6) as i32, m_high as i32) }
}

/// Eight rows of 16 scale bytes transposed: vector t holds column 2t in its low
/// 8 bytes and column 2t + 1 in its high 8, byte r of each from row r.
#[inline(always)]
unsafe fn scale_columns(rows: [__m128i; 8]) -> [__m128i; 8] {
    // SAFETY: SSE2 is part of x86_64.
    unsafe {
        let pairs: [__m128i; 8] = std::array::from_fn(|p| {
            let (a, b) = (rows[2 * (p / 2)], rows[2 * (p / 2) + 1]);
            if p.is_multiple_of(2) {
                _mm_unpacklo_epi8(a, b) // columns 0–7 of rows 2q, 2q + 1
            } else {
                _mm_unpackhi_epi8(a, b) // columns 8–15
            }
        });
        // quads[h·4 + g]: columns 4g .. 4g + 4 of rows 4h .. 4h + 4.
        let quads: [__m128i; 8] = std::array::from_fn(|n| {
            let (h, g) = (n / 4, n % 4);
            let (a, b) = (pairs[4 * h + g / 2], pairs[4 * h + 2 + g / 2]);
            if g.is_multiple_of(2) {
                _mm_unpacklo_epi16(a, b)
            } else {
                _mm_unpackhi_epi16(a, b)
            }
        });
        std::array::from_fn(|t| {
            let (a, b) = (quads[t / 2], quads[4 + t / 2]);
            if t.is_multiple_of(2) {
                _mm_unpacklo_epi32(a, b)
            } else {
                _mm_unpackhi_epi32(a, b)
            }
        })
    }
}

/// Block `c` (32 values) of a Q4_K super-block at `block`: the low nibbles of a
/// 32-byte chunk for even blocks, the high ones for odd.
#[inline(always)]
unsafe fn q4_k_weights(block: *const u8, c: usize, low4: __m256i) -> __m256i {
    // SAFETY: the caller's super-block holds 128 bytes of values at 16.
    unsafe {
        let packed = _mm256_loadu_si256(block.add(16 + 32 * (c / 2)).cast());
        _mm256_and_si256(_mm256_srl_epi16(packed, _mm_cvtsi32_si128(4 * (c % 2) as i32)), low4)
    }
}

/// Block `c` (32 values) of a Q5_K super-block at `block`: Q4_K's nibbles (after the
/// 32 bytes of fifth bits) with bit c of fifth-bit byte l as value l's bit 4.
#[inline(always)]
unsafe fn q5_k_weights(block: *const u8, c: usize, low4: __m256i) -> __m256i {
    // SAFETY: the caller's super-block holds 32 bytes of fifth bits at 16 and 128
    // bytes of values at 48.
    unsafe {
        let packed = _mm256_loadu_si256(block.add(48 + 32 * (c / 2)).cast());
        let nibbles = _mm256_and_si256(_mm256_srl_epi16(packed, _mm_cvtsi32_si128(4 * (c % 2) as i32)), low4);
        _mm256_or_si256(nibbles, fifth_bits(_mm256_loadu_si256(block.add(16).cast()), c))
    }
}

/// Block `c` (32 values) of a Q6_K super-block at `block`, 0–63: four low bits
/// from `ql` (a nibble of one of the half's two 32-byte chunks), two high bits
/// from `qh` (a pair of the half's 32 bytes), as `quant::q6_k` unpacks them.
#[inline(always)]
unsafe fn q6_k_weights<const TERNARY: bool>(block: *const u8, c: usize) -> __m256i {
    let (half, quarter) = (c / 4, c % 4);
    // SAFETY: the caller's super-block holds `ql` (128 bytes) and `qh` (64).
    unsafe {
        let ql = _mm256_loadu_si256(block.add(64 * half + 32 * (quarter % 2)).cast());
        let qh = _mm256_loadu_si256(block.add(128 + 32 * half).cast());
        q6_k_values::<TERNARY>(ql, qh, quarter)
    }
}

/// Quarter `quarter`'s values 0–63 from bytes of `ql` (the low nibbles of quarters 0
/// and 1, the high ones of 2 and 3) and `qh` (the pair at bits 2·quarter) side by
/// side: bytewise, so the bytes may come in any order as long as both share it.
/// With `TERNARY` (AVX-512 VL, the VNNI kernels) in fewer operations: `qh`'s pair
/// shifted straight to bits 4–5 and merged with the nibble under a mask by one
/// `VPTERNLOGD`. The same bytes.
#[inline(always)]
pub(super) unsafe fn q6_k_values<const TERNARY: bool>(ql: __m256i, qh: __m256i, quarter: usize) -> __m256i {
    // SAFETY: AVX2 (with `TERNARY`, AVX-512 VL) is present where this is inlined.
    unsafe {
        let low4 = _mm256_set1_epi8(0x0F);
        if !TERNARY {
            let low = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128(4 * (quarter / 2) as i32)), low4);
            let pair = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * quarter as i32));
            let high = _mm256_and_si256(pair, _mm256_set1_epi8(3));
            return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
        }
        let low = if quarter < 2 { ql } else { _mm256_srli_epi16::<4>(ql) };
        // Pair `quarter` (bits 2q, 2q + 1) to bits 4–5.
        let high = match quarter {
            0 => _mm256_slli_epi16::<4>(qh),
            1 => _mm256_slli_epi16::<2>(qh),
            2 => qh,
            _ => _mm256_srli_epi16::<2>(qh),
        };
        // (low & 0x0F) | (high & 0x30): the pair masked, then one table (bit
        // (a << 2 | b << 1 | c) of 0xD8 is `c ? b : a`) takes low's bits under
        // 0x0F and high's elsewhere.
        let high = _mm256_and_si256(high, _mm256_set1_epi8(0x30));
        _mm256_ternarylogic_epi32::<0xD8>(high, low, low4)
    }
}

/// The eight rows' products with `M` rows of x, block by block, each row of x's
/// integer sums for the block as one vector whose lane r is weight row r's (by
/// `row_totals` or, with `COLUMNS`, `column_totals`: the same integers).
/// Eight rows' block of 32 values, ready to multiply: the values (by row, or with
/// `COLUMNS` transposed by 4-byte groups for `column_totals`, Q6_K's then less 32),
/// their magnitudes (Q6_K by columns multiplies |q − 32| by x with q − 32's sign),
/// the sub-block scales of the block's halves as i32 lanes (Q4_K: `sc` and `m`),
/// the super-block's `d`, Q4_K's `dmin·m`, and Q2_K's `dmin` with its halves' `m`.
#[derive(Clone, Copy)]
pub(in super::super) struct KBlocks {
    values: [__m256i; 8],
    magnitudes: [__m256i; 8],
    scale_a: __m256i,
    scale_b: __m256i,
    d: __m256,
    min: __m256,
    /// Q2_K: the minimums of the block's halves (and `min` is `dmin`).
    min_a: __m256i,
    min_b: __m256i,
}

/// A super-block's scales for eight rows: `d`, Q4_K's `dmin` (zero for Q6_K) and
/// the sub-block scale bytes transposed (`scale_columns`; read by `scale_column`).
struct SuperScales {
    d: __m256,
    dmin: __m256,
    columns: [__m128i; 8],
    /// Q2_K's minimums, transposed as `columns`.
    min_columns: [__m128i; 8],
}

/// The scales of the eight rows' super-blocks at `at(r)`.
#[inline(always)]
unsafe fn super_scales<const KIND: u8>(at: impl Fn(usize) -> *const u8) -> SuperScales {
    // SAFETY: each `at(r)` is a whole super-block; AVX2 and F16C are present where
    // this is inlined.
    unsafe {
        let d = f16_scales(
            &at,
            match KIND {
                K6 => 208,
                K3 => 108,
                K2 => 80,
                _ => 0,
            },
        );
        // Q4_K's and Q2_K's minimums are scaled by `dmin`; Q6_K and Q3_K have none.
        let dmin = match KIND {
            K6 | K3 => _mm256_setzero_ps(),
            K2 => f16_scales(&at, 82),
            _ => f16_scales(&at, 2),
        };
        let (mut scales, mut mins) = ([_mm_setzero_si128(); 8], [_mm_setzero_si128(); 8]);
        for (r, (scales, mins)) in scales.iter_mut().zip(mins.iter_mut()).enumerate() {
            *scales = match KIND {
                K6 => _mm_loadu_si128(at(r).add(192).cast()),
                K3 => q3_k_scales(at(r).add(96)),
                K2 => {
                    let (sc, m) = q2_k_scales_and_mins(at(r));
                    *mins = m;
                    sc
                }
                _ => q4_k_scales(at(r).add(4)),
            };
        }
        let min_columns = if KIND == K2 { scale_columns(mins) } else { mins };
        SuperScales { d, dmin, columns: scale_columns(scales), min_columns }
    }
}

/// Column t of the scales as eight i32 lanes (lane r: row r's): Q4_K's `sc` of
/// sub-block t for t < 8 and its `m` of sub-block t − 8 after; Q6_K's and Q3_K's
/// signed scale of their 16 values t, Q2_K's unsigned one (or, from its
/// `min_columns`, its minimum).
#[inline(always)]
unsafe fn scale_column<const KIND: u8>(columns: &[__m128i; 8], t: usize) -> __m256i {
    // SAFETY: AVX2 is present where this is inlined.
    unsafe {
        let pair = columns[t / 2];
        let bytes = if t.is_multiple_of(2) { pair } else { _mm_srli_si128(pair, 8) };
        if KIND == K6 || KIND == K3 {
            _mm256_cvtepi8_epi32(bytes)
        } else {
            _mm256_cvtepu8_epi32(bytes)
        }
    }
}

/// Super-block `s` of the eight rows at `weights`: its blocks, in order, to `each`;
/// fetching the next eight rows' share where `ahead` says so.
#[inline(always)]
unsafe fn super_blocks<const KIND: u8, const COLUMNS: bool, const VNNI: bool>(
    weights: &[u8],
    strides: Strides,
    ahead: bool,
    s: usize,
    supers: usize,
    mut each: impl FnMut(usize, &KBlocks),
) {
    // SAFETY: super-block `s` of each of the eight rows lies inside `weights`.
    unsafe {
        let low4 = _mm256_set1_epi8(0x0F);
        let at = |r: usize| block_at(weights, strides, r, s);
        let SuperScales { d, dmin, columns, min_columns } = super_scales::<KIND>(at);
        let column = |t: usize| scale_column::<KIND>(&columns, t);
        for c in 0..BLOCKS_PER_SUPER {
            // A few lines at a time: a burst of a super-block's 27 (Q6_K) fills
            // the cache's queue of misses and stalls the products behind it.
            prefetch_next_rows(weights, ahead, s * BLOCKS_PER_SUPER + c, supers * BLOCKS_PER_SUPER);
            // A loop, not `from_fn`: a closure this size is not always inlined,
            // and outside this function it would lose the target features.
            let mut values = [_mm256_setzero_si256(); 8];
            for (r, w) in values.iter_mut().enumerate() {
                *w = match KIND {
                    K6 => q6_k_weights::<VNNI>(at(r), c),
                    K3 => q3_k_weights(at(r), c),
                    K2 => q2_k_weights(at(r), c),
                    K5 => q5_k_weights(at(r), c, low4),
                    _ => q4_k_weights(at(r), c, low4),
                };
            }
            let mut magnitudes = values;
            if COLUMNS {
                values = transpose_groups(&values);
                magnitudes = values;
                // Q6_K by columns multiplies |q − 32| by x with q − 32's sign; Q3_K takes
                // q + 4 as it is and x's half sums take the 4 off (`accumulate`).
                if KIND == K6 {
                    for (w, m) in values.iter_mut().zip(magnitudes.iter_mut()) {
                        *w = _mm256_sub_epi8(*w, _mm256_set1_epi8(value_offset(KIND)));
                        *m = _mm256_sign_epi8(*w, *w);
                    }
                }
            }
            let (scale_a, scale_b) =
                if per_16(KIND) { (column(2 * c), column(2 * c + 1)) } else { (column(c), column(8 + c)) };
            // Q4_K: dmin·m for the block, one product per lane as the row body has it.
            let min = if KIND == K2 { dmin } else { _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(scale_b)) };
            let (min_a, min_b) = if KIND == K2 {
                (scale_column::<K2>(&min_columns, 2 * c), scale_column::<K2>(&min_columns, 2 * c + 1))
            } else {
                (_mm256_setzero_si256(), _mm256_setzero_si256())
            };
            each(c, &KBlocks { values, magnitudes, scale_a, scale_b, d, min, min_a, min_b });
        }
    }
}

/// The eight rows' products with `M` rows of x, block by block (`accumulate`).
#[inline(always)]
unsafe fn eight<const M: usize, const KIND: u8, const COLUMNS: bool, const VNNI: bool>(
    weights: &[u8],
    strides: Strides,
    x: &QuantizedX,
    k: usize,
    dots: &mut [[f32; 8]; MAX_ROWS],
) {
    // SAFETY: see `eight_rows`; every load lies inside `weights` (8 rows) or x.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); M];
        for s in 0..k / SUPER {
            super_blocks::<KIND, COLUMNS, VNNI>(weights, strides, fetch_ahead(strides, M), s, k / SUPER, |c, block| {
                for (i, sum) in acc.iter_mut().enumerate() {
                    accumulate::<KIND, COLUMNS, VNNI>(block, x, i, s * BLOCKS_PER_SUPER + c, k, sum);
                }
            });
        }
        store(acc, dots);
    }
}

/// Every block of the eight rows at `weights`, transposed, into `set`: done once
/// for all the rows of x that multiply them (`from_columns`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(in super::super) unsafe fn transpose_set(
    format: BlockFormat,
    weights: &[u8],
    strides: Strides,
    k: usize,
    set: &mut Vec<KBlocks>,
) {
    set.clear();
    // SAFETY: as the caller vouches: `weights` holds eight whole rows.
    unsafe {
        for s in 0..k / SUPER {
            let push = |_, block: &KBlocks| set.push(*block);
            match format {
                BlockFormat::Q6K => super_blocks::<K6, true, false>(weights, strides, true, s, k / SUPER, push),
                BlockFormat::Q3K => super_blocks::<K3, true, false>(weights, strides, true, s, k / SUPER, push),
                BlockFormat::Q2K => super_blocks::<K2, true, false>(weights, strides, true, s, k / SUPER, push),
                BlockFormat::Q5K => super_blocks::<K5, true, false>(weights, strides, true, s, k / SUPER, push),
                _ => super_blocks::<K4, true, false>(weights, strides, true, s, k / SUPER, push),
            }
        }
    }
}

avx2_and_vnni!(
    /// `eight_rows` for any number of rows of x (up to eight) over a set transposed
    /// by `transpose_set`, by `column_totals`: the same bits.
    from_columns, from_columns_vnni => from_columns_in(
        format: BlockFormat,
        set: &[KBlocks],
        x: &QuantizedX,
        rows: usize,
        k: usize,
        dots: &mut [[f32; 8]; MAX_ROWS],
    )
);

#[inline(always)]
unsafe fn from_columns_in<const VNNI: bool>(
    format: BlockFormat,
    set: &[KBlocks],
    x: &QuantizedX,
    rows: usize,
    k: usize,
    dots: &mut [[f32; 8]; MAX_ROWS],
) {
    // SAFETY (each arm): as the caller vouches.
    unsafe {
        match format {
            BlockFormat::Q6K => with_rows!(rows, columns::<_, K6, VNNI>(set, x, k, dots)),
            BlockFormat::Q3K => with_rows!(rows, columns::<_, K3, VNNI>(set, x, k, dots)),
            BlockFormat::Q2K => with_rows!(rows, columns::<_, K2, VNNI>(set, x, k, dots)),
            BlockFormat::Q5K => with_rows!(rows, columns::<_, K5, VNNI>(set, x, k, dots)),
            _ => with_rows!(rows, columns::<_, K4, VNNI>(set, x, k, dots)),
        }
    }
}

/// `eight` over a transposed set.
#[inline(always)]
unsafe fn columns<const M: usize, const KIND: u8, const VNNI: bool>(
    set: &[KBlocks],
    x: &QuantizedX,
    k: usize,
    dots: &mut [[f32; 8]; MAX_ROWS],
) {
    // SAFETY: see `from_columns`; x holds M rows of k.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); M];
        for (b, block) in set.iter().enumerate() {
            for (i, sum) in acc.iter_mut().enumerate() {
                accumulate::<KIND, true, VNNI>(block, x, i, b, k, sum);
            }
        }
        store(acc, dots);
    }
}

/// Row `i` of x's block `b` times the eight rows' block, into `sum` (lane r: row
/// r's): each half's (Q6_K) or the block's (Q4_K) integer sums times its scales,
/// then the float steps in the row body's order.
#[inline(always)]
unsafe fn accumulate<const KIND: u8, const COLUMNS: bool, const VNNI: bool>(
    block: &KBlocks,
    x: &QuantizedX,
    i: usize,
    b: usize,
    k: usize,
    sum: &mut __m256,
) {
    let blocks = k / BLOCK;
    // SAFETY: row i of x holds block b; AVX2 and FMA are present where this is inlined.
    unsafe {
        let xs = x.quants.as_ptr().add(i * k + b * BLOCK);
        let d_x = *x.scales.get_unchecked(i * blocks + b);
        let (mut first, mut second) = if COLUMNS {
            column_totals::<KIND, VNNI>(&block.values, &block.magnitudes, xs)
        } else {
            row_totals::<KIND, VNNI>(&block.values, xs)
        };
        if COLUMNS && KIND == K3 {
            // Σ (q + 4)·x − 4·Σx over each half: the integers of q·x.
            let first_x = *x.halves.get_unchecked(i * blocks + b);
            let second_x = *x.sums.get_unchecked(i * blocks + b) - first_x;
            first = _mm256_sub_epi32(first, _mm256_set1_epi32(4 * first_x));
            second = _mm256_sub_epi32(second, _mm256_set1_epi32(4 * second_x));
        }
        let total = if per_16(KIND) {
            _mm256_add_epi32(_mm256_mullo_epi32(first, block.scale_a), _mm256_mullo_epi32(second, block.scale_b))
        } else {
            _mm256_mullo_epi32(_mm256_add_epi32(first, second), block.scale_a)
        };
        *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(block.d, _mm256_set1_ps(d_x)), *sum);
        if KIND == K4 || KIND == K5 {
            let scaled_sum = d_x * *x.sums.get_unchecked(i * blocks + b) as f32;
            *sum = _mm256_fnmadd_ps(block.min, _mm256_set1_ps(scaled_sum), *sum);
        } else if KIND == K2 {
            // dmin·(d_x·(m_a·Σx_a + m_b·Σx_b)), the integers exact in i32 lanes.
            let first_x = *x.halves.get_unchecked(i * blocks + b);
            let second_x = *x.sums.get_unchecked(i * blocks + b) - first_x;
            let mins = _mm256_add_epi32(
                _mm256_mullo_epi32(block.min_a, _mm256_set1_epi32(first_x)),
                _mm256_mullo_epi32(block.min_b, _mm256_set1_epi32(second_x)),
            );
            let scaled = _mm256_mul_ps(_mm256_set1_ps(d_x), _mm256_cvtepi32_ps(mins));
            *sum = _mm256_fnmadd_ps(block.min, scaled, *sum);
        }
    }
}
