//! AVX2, eight weight rows at a time: `maddubs` multiplies a weight block's bytes
//! by x's pairwise into 16-bit sums — Q8_0 as `maddubs(|w|, sign(x, w))` (|w| ≤ 128,
//! |x| ≤ 127: a pair stays below 2¹⁵), Q4_0's nibbles unsigned (0–15) with 8·Σx
//! taken off afterwards — and `madd` by ones widens them to 32 bits. Rows of x come
//! in a const count `M` so that the accumulators stay in registers. Two orders give
//! the same integers: by rows (`row_sums`: each row of x's sums reduced across the
//! eight weight rows, for one or two rows of x) and by columns (`column_sums`: the
//! eight rows' block transposed once, in registers for one group of x rows or into
//! a per-thread set for all the groups of a prefill). Where the CPU has AVX-512 VNNI
//! (and `FERRY_VNNI` does not decline it), the `_vnni` entries compile the same
//! kernels with `VPDPBUSD`, four byte products summed into each 32-bit lane at once
//! (`byte_sums`, `pair_sums`): no pair can saturate 16 bits in the AVX2 order, so both
//! give the same integers and the same bits.

use std::arch::x86_64::*;

use super::{BlockFormat, QuantizedX, Strides, BLOCK, GROUP_ROWS, MAX_ROWS, SCALE_BYTES};
use crate::kernels::quant::IQ4_VALUES;

pub(super) mod grids;
mod iq4;
mod lanes;
mod one_row;
use iq4::{iq4_xs_block_at, iq4_xs_scales};
use lanes::{byte_sums, reduce_eight};
pub(super) use lanes::{pair_sums, reduce_halves, reduce_paired, transpose_groups};

/// The block formats these kernels take, as const parameters: Q8_0's and Q5_0's
/// values are signed bytes (multiplied as |w| by x with w's sign), Q4_0's unsigned
/// nibbles (8·Σx taken off after).
const KIND_Q8_0: u8 = 0;
pub(super) const KIND_Q4_0: u8 = 1;
const KIND_Q5_0: u8 = 2;
/// IQ4_NL's and IQ4_XS's indices looked up to `IQ4_VALUES` (signed bytes, as Q8_0's);
/// IQ4_XS's block b is sub-block b % 8 of super-block b / 8, its scale the
/// super-block's times the sub-block's 6-bit scale.
pub(super) const KIND_IQ4_NL: u8 = 3;
pub(super) const KIND_IQ4_XS: u8 = 4;
/// Q4_1's nibbles multiply unsigned as Q4_0's (no offset); Q5_1's 5-bit values as
/// signed bytes (0–31: a pair of them by x would pass 2¹⁵ in the 16-bit sums of
/// `column_sums`); both blocks' minimum times x's sum added after (`has_min`).
pub(super) const KIND_Q4_1: u8 = 5;
const KIND_Q5_1: u8 = 6;
/// A kind's values taken as w + 128 (unsigned, 1–241) with 128·Σx off after: for
/// VNNI's byte products only, which sum four products into 32 bits with no 16-bit
/// step to saturate (`maddubs` pairs would), and save the signed path's signs.
const OFFSET: u8 = 8;
const KIND_IQ4_NL_OFFSET: u8 = KIND_IQ4_NL | OFFSET;
const KIND_IQ4_XS_OFFSET: u8 = KIND_IQ4_XS | OFFSET;

/// The format a kind reads (less `OFFSET`).
pub(super) const fn base(kind: u8) -> u8 {
    kind & !OFFSET
}

/// Whether a kind's values multiply x unsigned (Q4_0's nibbles, offset kinds).
pub(super) const fn unsigned(kind: u8) -> bool {
    kind == KIND_Q4_0 || kind == KIND_Q4_1 || kind & OFFSET != 0
}

/// Whether a kind's blocks carry a minimum (Q4_1, Q5_1: `q8::has_min`).
pub(super) const fn has_min(kind: u8) -> bool {
    kind == KIND_Q4_1 || kind == KIND_Q5_1
}

/// What a kind's integer sums carry times Σx: Q4_0's 8, an offset kind's 128.
pub(super) const fn offset(kind: u8) -> i32 {
    if kind == KIND_Q4_0 {
        8
    } else if kind & OFFSET != 0 {
        128
    } else {
        0
    }
}

avx2_and_vnni!(
    /// `dots[i][r] = x[i] · weight row r` for eight weight rows (`weights`, their
    /// blocks where `strides` says) and `rows` rows of x: one or two by `row_sums`, more by
    /// `column_sums`, each block transposed in registers (the same bits; see there).
    /// Many rows of x go through `transpose_set` and `from_columns` instead. Q4_0's
    /// nibbles multiply unsigned (0–15) and the block's 8·Σx is taken off the integer
    /// sum.
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
        match format {
            BlockFormat::Q4_0 => with_rows!(rows, eight_m::<_, KIND_Q4_0, VNNI>(weights, strides, x, k, dots)),
            BlockFormat::Q5_0 => with_rows!(rows, eight_m::<_, KIND_Q5_0, VNNI>(weights, strides, x, k, dots)),
            BlockFormat::Q4_1 => with_rows!(rows, eight_m::<_, KIND_Q4_1, VNNI>(weights, strides, x, k, dots)),
            BlockFormat::Q5_1 => with_rows!(rows, eight_m::<_, KIND_Q5_1, VNNI>(weights, strides, x, k, dots)),
            BlockFormat::IQ4NL if VNNI => {
                with_rows!(rows, eight_m::<_, KIND_IQ4_NL_OFFSET, VNNI>(weights, strides, x, k, dots))
            }
            BlockFormat::IQ4XS if VNNI => {
                with_rows!(rows, eight_m::<_, KIND_IQ4_XS_OFFSET, VNNI>(weights, strides, x, k, dots))
            }
            BlockFormat::IQ4NL => with_rows!(rows, eight_m::<_, KIND_IQ4_NL, VNNI>(weights, strides, x, k, dots)),
            BlockFormat::IQ4XS => with_rows!(rows, eight_m::<_, KIND_IQ4_XS, VNNI>(weights, strides, x, k, dots)),
            _ => with_rows!(rows, eight_m::<_, KIND_Q8_0, VNNI>(weights, strides, x, k, dots)),
        }
    }
}

/// Eight rows' block, ready to multiply: their values (by row, or with `COLUMNS`
/// transposed by 4-byte groups for `column_sums`), the values' magnitudes (Q8_0
/// multiplies |w| by x with w's sign), the eight scales and (Q4_1, Q5_1) minimums.
#[derive(Clone, Copy)]
pub(super) struct EightBlocks {
    values: [__m256i; 8],
    magnitudes: [__m256i; 8],
    scales: __m256,
    mins: __m256,
}

/// Block `b` of the eight rows at `weights` as `EightBlocks`.
#[inline(always)]
unsafe fn eight_blocks<const KIND: u8, const COLUMNS: bool>(weights: &[u8], strides: Strides, b: usize) -> EightBlocks {
    // SAFETY: block `b` of each of the eight rows lies inside `weights`.
    unsafe {
        let at = |r: usize| {
            if base(KIND) == KIND_IQ4_XS {
                iq4_xs_block_at(weights, strides, r, b)
            } else {
                block_at(weights, strides, r, b)
            }
        };
        let mut values = [_mm256_setzero_si256(); 8];
        for (r, w) in values.iter_mut().enumerate() {
            *w = block_values::<KIND>(at(r));
        }
        if COLUMNS {
            values = transpose_groups(&values);
        }
        let mut magnitudes = values;
        if !unsigned(KIND) {
            for (m, &w) in magnitudes.iter_mut().zip(&values) {
                *m = _mm256_sign_epi8(w, w);
            }
        }
        let scales =
            if base(KIND) == KIND_IQ4_XS { iq4_xs_scales(weights, strides, b) } else { scales_of(weights, strides, b) };
        let mins = if has_min(KIND) { f16_scales(at, 2) } else { _mm256_setzero_ps() };
        EightBlocks { values, magnitudes, scales, mins }
    }
}

/// Every block of the eight rows at `weights`, transposed, into `set`: done once
/// for all the rows of x that multiply them (`from_columns`, VNNI's where `vnni`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn transpose_set(
    format: BlockFormat,
    vnni: bool,
    weights: &[u8],
    strides: Strides,
    k: usize,
    set: &mut Vec<EightBlocks>,
) {
    let blocks = k / BLOCK;
    set.clear();
    // SAFETY: as the caller vouches: `weights` holds eight whole rows.
    unsafe {
        for b in 0..blocks {
            prefetch_next_rows(weights, true, b, blocks);
            set.push(match format {
                BlockFormat::Q4_0 => eight_blocks::<KIND_Q4_0, true>(weights, strides, b),
                BlockFormat::Q5_0 => eight_blocks::<KIND_Q5_0, true>(weights, strides, b),
                BlockFormat::Q4_1 => eight_blocks::<KIND_Q4_1, true>(weights, strides, b),
                BlockFormat::Q5_1 => eight_blocks::<KIND_Q5_1, true>(weights, strides, b),
                BlockFormat::IQ4NL if vnni => eight_blocks::<KIND_IQ4_NL_OFFSET, true>(weights, strides, b),
                BlockFormat::IQ4XS if vnni => eight_blocks::<KIND_IQ4_XS_OFFSET, true>(weights, strides, b),
                BlockFormat::IQ4NL => eight_blocks::<KIND_IQ4_NL, true>(weights, strides, b),
                BlockFormat::IQ4XS => eight_blocks::<KIND_IQ4_XS, true>(weights, strides, b),
                _ => eight_blocks::<KIND_Q8_0, true>(weights, strides, b),
            });
        }
    }
}

avx2_and_vnni!(
    /// `eight_rows` for any number of rows of x (up to eight) over a set transposed
    /// by `transpose_set`, by `column_sums`: the same bits.
    from_columns, from_columns_vnni => from_columns_in(
        format: BlockFormat,
        set: &[EightBlocks],
        x: &QuantizedX,
        rows: usize,
        k: usize,
        dots: &mut [[f32; 8]; MAX_ROWS],
    )
);

#[inline(always)]
unsafe fn from_columns_in<const VNNI: bool>(
    format: BlockFormat,
    set: &[EightBlocks],
    x: &QuantizedX,
    rows: usize,
    k: usize,
    dots: &mut [[f32; 8]; MAX_ROWS],
) {
    // SAFETY (each arm): as the caller vouches.
    unsafe {
        match format {
            BlockFormat::Q4_0 => with_rows!(rows, columns::<_, KIND_Q4_0, VNNI>(set, x, k, dots)),
            BlockFormat::Q5_0 => with_rows!(rows, columns::<_, KIND_Q5_0, VNNI>(set, x, k, dots)),
            BlockFormat::Q4_1 => with_rows!(rows, columns::<_, KIND_Q4_1, VNNI>(set, x, k, dots)),
            BlockFormat::Q5_1 => with_rows!(rows, columns::<_, KIND_Q5_1, VNNI>(set, x, k, dots)),
            BlockFormat::IQ4NL if VNNI => with_rows!(rows, columns::<_, KIND_IQ4_NL_OFFSET, VNNI>(set, x, k, dots)),
            BlockFormat::IQ4XS if VNNI => with_rows!(rows, columns::<_, KIND_IQ4_XS_OFFSET, VNNI>(set, x, k, dots)),
            BlockFormat::IQ4NL => with_rows!(rows, columns::<_, KIND_IQ4_NL, VNNI>(set, x, k, dots)),
            BlockFormat::IQ4XS => with_rows!(rows, columns::<_, KIND_IQ4_XS, VNNI>(set, x, k, dots)),
            _ => with_rows!(rows, columns::<_, KIND_Q8_0, VNNI>(set, x, k, dots)),
        }
    }
}

/// Row r's block `b` as 32 bytes in x's order: Q4_0's nibbles (0–15), Q5_0's
/// signed values (−16–15), IQ4_NL's and IQ4_XS's values (`IQ4_VALUES`), Q8_0's bytes.
#[inline(always)]
unsafe fn block_values<const KIND: u8>(block: *const u8) -> __m256i {
    // SAFETY: `block` is a whole block; AVX2 is present where this is inlined.
    unsafe {
        let nibbles = |at: usize| {
            let packed = _mm_loadu_si128(block.add(at).cast());
            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F))
        };
        match KIND {
            KIND_Q4_0 => nibbles(2),
            KIND_Q4_1 => nibbles(4),
            KIND_Q5_1 => {
                // Q5_0's fifth bits (here at bytes 4..8), set as 0x10 over the nibble.
                let set = fifth_bits(block.add(4));
                _mm256_or_si256(nibbles(8), _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
            }
            _ if base(KIND) == KIND_IQ4_NL || base(KIND) == KIND_IQ4_XS => {
                let mut table = _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_VALUES.as_ptr().cast()));
                if KIND & OFFSET != 0 {
                    table = _mm256_add_epi8(table, _mm256_set1_epi8(-128));
                }
                _mm256_shuffle_epi8(table, nibbles(2))
            }
            KIND_Q5_0 => {
                // A nibble without its fifth bit is nibble − 16: the byte 0xF0 | nibble.
                let set = fifth_bits(block.add(2));
                _mm256_or_si256(nibbles(6), _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8)))
            }
            _ => _mm256_loadu_si256(block.add(2).cast()),
        }
    }
}

/// The u32 of fifth bits at `bits` (Q5_0's, Q5_1's) as a mask: byte j 0xFF where bit
/// j is set — the u32 broadcast, byte j taken from the byte holding bit j, and tested
/// against bit j % 8 of it.
#[inline(always)]
unsafe fn fifth_bits(bits: *const u8) -> __m256i {
    // SAFETY: `bits` holds 4 bytes; AVX2 is present where this is inlined.
    unsafe {
        let bits = _mm256_set1_epi32(bits.cast::<i32>().read_unaligned());
        let spread = _mm256_shuffle_epi8(
            bits,
            _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
    }
}

/// Weight rows p and p + 4's 16 bytes of nibbles (at `row` and `row_plus_4`) side by
/// side, as (low nibbles, high nibbles): 128-bit lane 0 row p's, lane 1 row p + 4's.
#[inline(always)]
pub(super) unsafe fn paired_nibbles(row: *const u8, row_plus_4: *const u8, nibble: __m256i) -> (__m256i, __m256i) {
    // SAFETY: both hold 16 bytes; AVX2 is present where this is inlined.
    unsafe {
        let packed = _mm256_loadu2_m128i(row_plus_4.cast(), row.cast());
        (_mm256_and_si256(packed, nibble), _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble))
    }
}

/// A block of x's two halves (16 values each), each in both 128-bit lanes: what
/// `paired_nibbles`' low and high nibbles multiply.
#[inline(always)]
pub(super) unsafe fn broadcast_halves(xs: *const i8) -> (__m256i, __m256i) {
    // SAFETY: `xs` holds 32 bytes; AVX2 is present where this is inlined.
    unsafe {
        (
            _mm256_broadcastsi128_si256(_mm_loadu_si128(xs.cast())),
            _mm256_broadcastsi128_si256(_mm_loadu_si128(xs.add(16).cast())),
        )
    }
}

/// Whether this CPU multiplies bytes with AVX-512 VNNI on 256-bit vectors (`VPDPBUSD`
/// with VL), which the one-row kernels use on the AVX-512 path, and `FERRY_VNNI=off`
/// does not decline it (benchmarks compare the two).
pub(super) fn has_vnni() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var("FERRY_VNNI").map_or(true, |v| v != "off")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// Block (or super-block) `b` of row `r` of the eight rows at `weights`. Where the
/// scales come first (`Strides::scales_first`), the address two bytes before the
/// block's values, so that its values are where a whole block has them; its scale is
/// not there (`scales_of`).
#[inline(always)]
pub(super) unsafe fn block_at(weights: &[u8], strides: Strides, r: usize, b: usize) -> *const u8 {
    let scales = if strides.scales_first { GROUP_ROWS * SCALE_BYTES - SCALE_BYTES } else { 0 };
    // SAFETY: the caller's block lies inside `weights`, and so do the values after it.
    unsafe { weights.as_ptr().add(b * strides.block + scales + r * strides.row) }
}

/// The f16 scales leading block `b` of the eight rows at `weights`, as eight f32: one
/// load where they lie side by side, eight otherwise.
#[inline(always)]
pub(super) unsafe fn scales_of(weights: &[u8], strides: Strides, b: usize) -> __m256 {
    // SAFETY: block `b` of the eight rows lies inside `weights`; F16C is present
    // where this is inlined.
    unsafe {
        if strides.scales_first {
            _mm256_cvtph_ps(_mm_loadu_si128(weights.as_ptr().add(b * strides.block).cast()))
        } else {
            f16_scales(|r| block_at(weights, strides, r, b), 0)
        }
    }
}

/// Whether a kernel multiplying `rows_of_x` rows of x by eight weight rows in
/// `strides` fetches the next eight rows ahead (`prefetch_next_rows`). In row order it
/// does: the kernel reads its eight rows side by side, sixteen streams on two
/// threads, which the hardware prefetcher does not keep ahead of, while the next
/// eight rows are one contiguous run of memory. Interleaved rows are one stream,
/// which the prefetcher follows at one row of x (fetching as well made those products
/// 0.78–0.98× as fast) but not at eight, whose slower pace wants the next rows in the
/// cache (0.76–0.86× without; BENCHMARKS.md, "Weights in the order the kernels read
/// them").
#[inline(always)]
pub(super) fn fetch_ahead(strides: Strides, rows_of_x: usize) -> bool {
    rows_of_x > 1 || !strides.interleaved()
}

/// Fetches the share of step `s` (of `steps`: blocks or super-blocks) of the eight
/// weight rows after `weights` (eight rows, the same bytes in either order) into the
/// cache, where `ahead` (`fetch_ahead`) says so: a few lines per step, as a burst
/// stalls the products behind it.
#[inline(always)]
pub(super) unsafe fn prefetch_next_rows(weights: &[u8], ahead: bool, s: usize, steps: usize) {
    const LINE: usize = 64;
    if !ahead {
        return;
    }
    let lines = weights.len().div_ceil(LINE);
    let share = lines.div_ceil(steps);
    // `wrapping_add`: the next rows may lie past this slice (the last group of a
    // matrix); a prefetch of any address is harmless, a pointer past the
    // allocation made with `add` would not be.
    let next = weights.as_ptr().wrapping_add(weights.len());
    for line in s * share..((s + 1) * share).min(lines) {
        // SAFETY: a prefetch reads nothing the program sees and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line * LINE).cast()) };
    }
}

/// The f16 at `offset` of each of eight rows' blocks (`at(r)`), as eight f32.
#[inline(always)]
pub(super) unsafe fn f16_scales(at: impl Fn(usize) -> *const u8, offset: usize) -> __m256 {
    let mut bits = [0u16; 8];
    for (r, bits) in bits.iter_mut().enumerate() {
        // SAFETY: the caller's blocks hold an f16 at `offset`.
        *bits = unsafe { at(r).add(offset).cast::<u16>().read_unaligned() };
    }
    // SAFETY: F16C is enabled where this is inlined.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(bits.as_ptr().cast())) }
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
    // An offset kind's pairs would saturate `maddubs`: VNNI only (dispatched so; the
    // arms for the other are instantiated, never taken).
    debug_assert!(VNNI || KIND & OFFSET == 0);
    // SAFETY: as the caller vouches.
    unsafe {
        if M >= 3 {
            eight::<M, KIND, true, VNNI>(weights, strides, x, k, dots)
        } else if M == 1
            && (KIND == KIND_Q4_0 || KIND == KIND_Q4_1 || base(KIND) == KIND_IQ4_NL || base(KIND) == KIND_IQ4_XS)
        {
            one_row::one_row::<KIND, VNNI>(weights, strides, x, k, dots)
        } else {
            eight::<M, KIND, false, VNNI>(weights, strides, x, k, dots)
        }
    }
}

/// Each row of x's eight sums (lane r: weight row r's) into `dots`.
#[inline(always)]
pub(super) unsafe fn store<const M: usize>(acc: [__m256; M], dots: &mut [[f32; 8]; MAX_ROWS]) {
    for (row_dots, sum) in dots.iter_mut().zip(acc) {
        // SAFETY: AVX is present where this is inlined; `row_dots` holds eight f32.
        unsafe { _mm256_storeu_ps(row_dots.as_mut_ptr(), sum) };
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
    let blocks = k / BLOCK;
    // SAFETY: see `eight_rows`; every load lies inside `weights` (8 rows) or x.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); M];
        let ahead = fetch_ahead(strides, M);
        for b in 0..blocks {
            prefetch_next_rows(weights, ahead, b, blocks);
            let block = eight_blocks::<KIND, COLUMNS>(weights, strides, b);
            for (i, sum) in acc.iter_mut().enumerate() {
                accumulate::<KIND, COLUMNS, VNNI>(&block, x, i, b, k, sum);
            }
        }
        store(acc, dots);
    }
}

/// `eight` over a transposed set.
#[inline(always)]
unsafe fn columns<const M: usize, const KIND: u8, const VNNI: bool>(
    set: &[EightBlocks],
    x: &QuantizedX,
    k: usize,
    dots: &mut [[f32; 8]; MAX_ROWS],
) {
    debug_assert!(VNNI || KIND & OFFSET == 0);
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
/// r's): the block's integer sums as one vector whose lane r is weight row r's
/// (by `row_sums` or, with `COLUMNS`, `column_sums`: the same integers), so that
/// the block's scales (eight weight scales as one vector) and its FMA are shared
/// by the eight rows.
#[inline(always)]
unsafe fn accumulate<const KIND: u8, const COLUMNS: bool, const VNNI: bool>(
    block: &EightBlocks,
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
        let mut total = if COLUMNS {
            column_sums::<KIND, VNNI>(&block.values, &block.magnitudes, xs)
        } else {
            row_sums::<KIND, VNNI>(&block.values, &block.magnitudes, xs)
        };
        if offset(KIND) != 0 {
            let taken = offset(KIND) * *x.sums.get_unchecked(i * blocks + b);
            total = _mm256_sub_epi32(total, _mm256_set1_epi32(taken));
        }
        let d_x = *x.scales.get_unchecked(i * blocks + b);
        let scale = _mm256_mul_ps(block.scales, _mm256_set1_ps(d_x));
        *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), scale, *sum);
        if has_min(KIND) {
            let scaled_sum = d_x * *x.sums.get_unchecked(i * blocks + b) as f32;
            *sum = _mm256_fmadd_ps(block.mins, _mm256_set1_ps(scaled_sum), *sum);
        }
    }
}

/// A block of x (`xs`, 32 bytes) times eight rows' blocks `w` (`magnitude`: |w|
/// for Q8_0): each row's 32-bit sums, reduced across rows.
#[inline(always)]
unsafe fn row_sums<const KIND: u8, const VNNI: bool>(
    w: &[__m256i; 8],
    magnitude: &[__m256i; 8],
    xs: *const i8,
) -> __m256i {
    // SAFETY: `xs` holds 32 bytes; AVX2 (with `VNNI`, AVX-512 VNNI and VL) is present
    // where this is inlined.
    unsafe {
        let xv = _mm256_loadu_si256(xs.cast());
        let mut p = [_mm256_setzero_si256(); 8];
        for r in 0..8 {
            p[r] = if unsigned(KIND) {
                byte_sums::<VNNI>(_mm256_setzero_si256(), w[r], xv)
            } else {
                byte_sums::<VNNI>(_mm256_setzero_si256(), magnitude[r], _mm256_sign_epi8(xv, w[r]))
            };
        }
        reduce_eight(p)
    }
}

/// `row_sums` over blocks transposed by `transpose_groups`: lane r of `v[g]` holds
/// row r's bytes 4g..4g+4, so `maddubs` by x's group g broadcast to every lane
/// leaves row r's pair sums in lane r, and eight of them add up to the block's
/// sums with no reduction. The transpose costs about what one row of x's
/// reduction does, so this pays from three rows of x. Q4_0's eight groups add in
/// 16 bits (each ≤ 2·15·127, eight ≤ 30 480); Q8_0's pairs reach 2·128·127 and
/// widen to 32 bits per group.
#[inline(always)]
unsafe fn column_sums<const KIND: u8, const VNNI: bool>(
    v: &[__m256i; 8],
    magnitude: &[__m256i; 8],
    xs: *const i8,
) -> __m256i {
    // SAFETY: `xs` holds 32 bytes; AVX2 (with `VNNI`, AVX-512 VNNI and VL) is present
    // where this is inlined.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let group = |g: usize| _mm256_set1_epi32(xs.cast::<i32>().add(g).read_unaligned());
        if VNNI {
            // Four products to a lane, summed into 32 bits as they come: the same integers.
            let mut total = _mm256_setzero_si256();
            for g in 0..8 {
                total = if unsigned(KIND) {
                    _mm256_dpbusd_epi32(total, v[g], group(g))
                } else {
                    _mm256_dpbusd_epi32(total, magnitude[g], _mm256_sign_epi8(group(g), v[g]))
                };
            }
            return total;
        }
        if KIND == KIND_Q4_0 || KIND == KIND_Q4_1 {
            let mut pairs = _mm256_setzero_si256();
            for (g, &v) in v.iter().enumerate() {
                pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(v, group(g)));
            }
            _mm256_madd_epi16(pairs, ones)
        } else {
            let mut total = _mm256_setzero_si256();
            for g in 0..8 {
                let pairs = _mm256_maddubs_epi16(magnitude[g], _mm256_sign_epi8(group(g), v[g]));
                total = _mm256_add_epi32(total, _mm256_madd_epi16(pairs, ones));
            }
            total
        }
    }
}
