//! The lattice formats' products with 8-bit x in vectors (`q8::grids` is the
//! portable body, whose steps these repeat). A sub-block decodes to 32 unsigned
//! magnitudes and a mask of the negative ones: lattice points looked up 8 (IQ2, IQ1)
//! or 4 (IQ3) bytes at a time, signs as byte masks from a 256-entry table, IQ1's
//! `8·g ± 1` made from g with additions. x takes the signs (`(x ^ m) − m`), so the
//! byte products are unsigned by signed (`VPDPBUSD`, or `maddubs` whose pairs stay
//! below 2·62·127). A super-block's eight sub-block sums land in one vector's lanes
//! (their halves apart, for the formats that scale halves), and meet the eight scales
//! times x's block scales in one fused multiply-add per row of x and scale.

use std::arch::x86_64::*;

use super::super::grids::reduce;
use super::super::{QuantizedX, BLOCK, EIGHT, MAX_ROWS};
use super::lanes::byte_sums;
use crate::kernels::quant::grids::{
    iq1_m_scale, scales_halves, IQ1_GRID, IQ2_S_GRID, IQ2_XS_GRID, IQ2_XXS_GRID, IQ3_S_GRID, IQ3_XXS_GRID, LATTICE,
};
use crate::kernels::quant::BlockFormat;
use crate::kernels::quant_rows::order::Strides;

/// Byte k of entry s is 0xFF where bit k of s is set: a sign byte as a mask.
static SIGN_MASKS: [u64; 256] = {
    let mut masks = [0u64; 256];
    let mut s = 0;
    while s < 256 {
        let mut k = 0;
        while k < 8 {
            if s >> k & 1 == 1 {
                masks[s] |= 0xFF << (8 * k);
            }
            k += 1;
        }
        s += 1;
    }
    masks
};

/// The mask of the eight signs a 7-bit index names (`grids::seven_bit_signs`).
static SEVEN_BIT_MASKS: [u64; 128] = {
    let mut masks = [0u64; 128];
    let mut index = 0;
    while index < 128 {
        masks[index] = SIGN_MASKS[index | ((index as u32).count_ones() as usize & 1) << 7];
        index += 1;
    }
    masks
};

/// A super-block decoded: per sub-block its magnitudes and negative-value mask, and
/// its scales (both halves' the same where the format has one per 32).
struct Decoded {
    magnitudes: [__m256i; 8],
    masks: [__m256i; 8],
    low: [f32; 8],
    high: [f32; 8],
}

#[inline(always)]
fn u16_at(block: &[u8], at: usize) -> usize {
    u16::from_le_bytes([block[at], block[at + 1]]) as usize
}

#[inline(always)]
fn u32_at(block: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]])
}

#[inline(always)]
fn f16_at(block: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// Four 8-byte pieces as one vector, the first lowest.
#[inline(always)]
unsafe fn four(pieces: [u64; 4]) -> __m256i {
    // SAFETY: AVX2 is present where this is inlined.
    unsafe { _mm256_set_epi64x(pieces[3] as i64, pieces[2] as i64, pieces[1] as i64, pieces[0] as i64) }
}

/// IQ1's signed values `8·g + shift` (g −1, 0 or 1 a byte; shift ±1 a byte) as
/// magnitudes and a mask of the negative ones.
#[inline(always)]
unsafe fn shifted(points: __m256i, shifts: __m256i) -> (__m256i, __m256i) {
    // SAFETY: AVX2 is present where this is inlined.
    unsafe {
        let twice = _mm256_add_epi8(points, points);
        let four_times = _mm256_add_epi8(twice, twice);
        let values = _mm256_add_epi8(_mm256_add_epi8(four_times, four_times), shifts);
        (_mm256_abs_epi8(values), _mm256_cmpgt_epi8(_mm256_setzero_si256(), values))
    }
}

/// `$body` for `$j` = 0 to 7, each a constant.
macro_rules! for_each_sub_block {
    ($j:ident => $body:block) => {{
        {
            let $j: usize = 0;
            $body
        }
        {
            let $j: usize = 1;
            $body
        }
        {
            let $j: usize = 2;
            $body
        }
        {
            let $j: usize = 3;
            $body
        }
        {
            let $j: usize = 4;
            $body
        }
        {
            let $j: usize = 5;
            $body
        }
        {
            let $j: usize = 6;
            $body
        }
        {
            let $j: usize = 7;
            $body
        }
    }};
}

/// The f16 scale of a block (IQ1_M's spread over its packed scales): converted once a
/// block, not per sub-block (`half` checks the CPU for F16C each time).
#[inline(always)]
fn block_scale(format: BlockFormat, block: &[u8]) -> f32 {
    if format == BlockFormat::IQ1M {
        iq1_m_scale(block)
    } else {
        f16_at(block, 0)
    }
}

/// One sub-block in registers: its magnitudes, the mask of its negative values, and
/// the scales of its halves (the same where the format has one per 32).
struct Sub {
    magnitudes: __m256i,
    masks: __m256i,
    low: f32,
    high: f32,
}

/// Sub-block `j` of `block` (`grids::sub_block`'s values and scales, as vectors); `d`
/// is the block's `block_scale`.
#[inline(always)]
unsafe fn decode_sub(format: BlockFormat, block: &[u8], d: f32, j: usize) -> Sub {
    // Its length a constant where `format` is one (`body`'s copies): no bounds checks.
    let block = &block[..format.block().1];
    let masks = |signs: [u8; 4]| signs.map(|s| SIGN_MASKS[s as usize]);
    // 7-bit sign indices straight to masks (the eighth sign's parity looked up with them).
    let seven_bit_masks = |aux: u32| std::array::from_fn(|l| SEVEN_BIT_MASKS[(aux >> (7 * l) & 0x7F) as usize]);
    // SAFETY (each arm): AVX2 is present where this is inlined; the block is whole.
    let zero = unsafe { _mm256_setzero_si256() };
    let mut sub = Sub { magnitudes: zero, masks: zero, low: 0.0, high: 0.0 };
    match format {
        BlockFormat::IQ2XXS => unsafe {
            let (indices, aux) = (u32_at(block, 2 + 8 * j), u32_at(block, 6 + 8 * j));
            let points = std::array::from_fn(|l| IQ2_XXS_GRID[(indices >> (8 * l) & 0xFF) as usize]);
            sub.magnitudes = four(points);
            sub.masks = four(seven_bit_masks(aux));
            sub.low = d * (0.5 + (aux >> 28) as f32) * 0.25;
            sub.high = sub.low;
        },
        BlockFormat::IQ2XS => unsafe {
            let q: [usize; 4] = std::array::from_fn(|l| u16_at(block, 2 + 8 * j + 2 * l));
            sub.magnitudes = four(q.map(|q| IQ2_XS_GRID[q & 511]));
            sub.masks = four(q.map(|q| SEVEN_BIT_MASKS[q >> 9]));
            let byte = block[66 + j];
            sub.low = d * (0.5 + (byte & 0x0F) as f32) * 0.25;
            sub.high = d * (0.5 + (byte >> 4) as f32) * 0.25;
        },
        BlockFormat::IQ2S => unsafe {
            let high = block[66 + j] as usize;
            let points =
                std::array::from_fn(|l| IQ2_S_GRID[block[2 + 4 * j + l] as usize | (high >> (2 * l) & 3) << 8]);
            sub.magnitudes = four(points);
            sub.masks = four(masks(std::array::from_fn(|l| block[34 + 4 * j + l])));
            let byte = block[74 + j];
            sub.low = d * (0.5 + (byte & 0x0F) as f32) * 0.25;
            sub.high = d * (0.5 + (byte >> 4) as f32) * 0.25;
        },
        BlockFormat::IQ3XXS => unsafe {
            let aux = u32_at(block, 66 + 4 * j);
            // Eight 4-byte points gathered at once (eight loads and inserts took three
            // times as long).
            let indices = _mm256_cvtepu8_epi32(_mm_loadl_epi64(block[2 + 8 * j..].as_ptr().cast()));
            sub.magnitudes = _mm256_i32gather_epi32::<8>(IQ3_XXS_GRID.as_ptr().cast(), indices);
            sub.masks = four(seven_bit_masks(aux));
            sub.low = d * (0.5 + (aux >> 28) as f32) * 0.5;
            sub.high = sub.low;
        },
        BlockFormat::IQ3S => unsafe {
            let high = block[66 + j] as usize;
            let low_bits = _mm256_cvtepu8_epi32(_mm_loadl_epi64(block[2 + 8 * j..].as_ptr().cast()));
            let high_bits =
                _mm256_srlv_epi32(_mm256_set1_epi32(high as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            let indices =
                _mm256_or_si256(low_bits, _mm256_slli_epi32::<8>(_mm256_and_si256(high_bits, _mm256_set1_epi32(1))));
            sub.magnitudes = _mm256_i32gather_epi32::<8>(IQ3_S_GRID.as_ptr().cast(), indices);
            sub.masks = four(masks(std::array::from_fn(|l| block[74 + 4 * j + l])));
            let step = block[106 + j / 2] >> (4 * (j % 2)) & 0x0F;
            sub.low = d * (1 + 2 * step as u32) as f32;
            sub.high = sub.low;
        },
        BlockFormat::IQ1S => unsafe {
            let qh = u16_at(block, 34 + 2 * j);
            let points = std::array::from_fn(|l| IQ1_GRID[block[2 + 4 * j + l] as usize | (qh >> (3 * l) & 7) << 8]);
            let shift = if qh & 0x8000 == 0 { 1 } else { -1 };
            (sub.magnitudes, sub.masks) = shifted(four(points), _mm256_set1_epi8(shift));
            sub.low = d * (2 * (qh >> 12 & 7) + 1) as f32 * 0.125;
            sub.high = sub.low;
        },
        BlockFormat::IQ1M => unsafe {
            // Each group's four bits: three of its index, then its shift's sign.
            let nibbles = u16_at(block, 32 + 2 * j) as i32;
            // Four scalar loads: a gather of the four was slower on this VM's Zen 4.
            let points = four(std::array::from_fn(|l| {
                IQ1_GRID[block[4 * j + l] as usize | (((nibbles >> (4 * l)) & 7) as usize) << 8]
            }));
            let down = _mm256_srlv_epi64(_mm256_set1_epi64x(nibbles as i64), _mm256_setr_epi64x(3, 7, 11, 15));
            let down = _mm256_cmpeq_epi64(_mm256_and_si256(down, _mm256_set1_epi64x(1)), _mm256_set1_epi64x(1));
            // +1 a byte, or −1 where the group shifts down.
            let shifts = _mm256_sub_epi8(_mm256_set1_epi8(1), _mm256_and_si256(down, _mm256_set1_epi8(2)));
            (sub.magnitudes, sub.masks) = shifted(points, shifts);
            let packed = u16_at(block, 48 + 2 * (j / 2)) >> (6 * (j % 2));
            sub.low = d * (2 * (packed & 7) + 1) as f32 * 0.125;
            sub.high = d * (2 * (packed >> 3 & 7) + 1) as f32 * 0.125;
        },
        _ => unreachable!("{} is not a lattice format", format.name()),
    }
    sub
}

/// A block's eight sub-blocks, into `out`.
#[inline(always)]
unsafe fn decode(format: BlockFormat, block: &[u8], out: &mut Decoded) {
    let d = block_scale(format, block);
    for_each_sub_block!(j => {
        // SAFETY: as the caller vouches.
        let sub = unsafe { decode_sub(format, block, d, j) };
        (out.magnitudes[j], out.masks[j], out.low[j], out.high[j]) = (sub.magnitudes, sub.masks, sub.low, sub.high);
    });
}

/// The portable body's `dots` for the same arguments, in vectors (see the module's docs).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn body<const VNNI: bool, const FORMAT: usize>(
    weights: &[u8],
    strides: Strides,
    weight_rows: usize,
    x: &QuantizedX,
    rows: usize,
    k: usize,
    dots: &mut [[f32; EIGHT]; MAX_ROWS],
) {
    // A constant in each copy: the format's branches fold away.
    let format = LATTICE[FORMAT];
    let (weights_per_block, block_bytes) = format.block();
    let (halves, blocks) = (scales_halves(format), k / BLOCK);
    assert!(x.quants.len() >= rows * k && x.scales.len() >= rows * blocks);
    // SAFETY: AVX2 and FMA (and with `VNNI`, AVX-512 VNNI and VL) are present, as the
    // callers vouch; every load is inside x's rows (asserted) or a whole block.
    unsafe {
        if rows == 1 {
            return one_row::<VNNI>(format, weights, strides, weight_rows, x, k, dots);
        }
        // Super-block by super-block, each weight row's in turn: the order of the bytes
        // where the rows come interleaved, one stream. Two decodings in turn: the
        // products read one while the next is written, so that its vectors — stored
        // in pieces — are not loaded whole straight after.
        let mut sums = [[_mm256_setzero_ps(); EIGHT]; MAX_ROWS];
        let zero = _mm256_setzero_si256();
        let empty = || Decoded { magnitudes: [zero; 8], masks: [zero; 8], low: [0.0; 8], high: [0.0; 8] };
        let mut decodings = [empty(), empty()];
        let units = k / weights_per_block * weight_rows;
        let block = |unit: usize| {
            let (super_block, r) = (unit / weight_rows, unit % weight_rows);
            &weights[r * strides.row + super_block * strides.block..][..block_bytes]
        };
        decode(format, block(0), &mut decodings[0]);
        for unit in 0..units {
            let (super_block, r) = (unit / weight_rows, unit % weight_rows);
            let (even, odd) = decodings.split_at_mut(1);
            let (decoded, next) = if unit % 2 == 0 { (&even[0], &mut odd[0]) } else { (&odd[0], &mut even[0]) };
            if unit + 1 < units {
                decode(format, block(unit + 1), next);
            }
            let (low_scales, high_scales) =
                (_mm256_loadu_ps(decoded.low.as_ptr()), _mm256_loadu_ps(decoded.high.as_ptr()));
            for (i, sums) in sums[..rows].iter_mut().enumerate() {
                let sum = &mut sums[r];
                let xs = x.quants.as_ptr().add(i * k + super_block * weights_per_block);
                // Plain loops: a closure would not inherit this function's features.
                let mut sub_sums = [_mm256_setzero_si256(); 8];
                for_each_sub_block!(j => {
                    let values = _mm256_loadu_si256(xs.add(j * BLOCK).cast());
                    let signed = _mm256_sub_epi8(_mm256_xor_si256(values, decoded.masks[j]), decoded.masks[j]);
                    sub_sums[j] = byte_sums::<VNNI>(_mm256_setzero_si256(), decoded.magnitudes[j], signed);
                });
                let d_x = _mm256_loadu_ps(x.scales.as_ptr().add(i * blocks + super_block * 8));
                *sum = add_super_block(halves, &sub_sums, low_scales, high_scales, d_x, *sum);
            }
        }
        for (i, sums) in sums[..rows].iter().enumerate() {
            for (r, sum) in sums[..weight_rows].iter().enumerate() {
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *sum);
                dots[i][r] = reduce(&lanes);
            }
        }
    }
}

/// `sum` plus a super-block's eight sub-block sums (lanes 0–3 of each its first 16
/// bytes', 4–7 the rest) times their scales and x's block scales `d_x`: with
/// `halves`, the halves' sums by `low` and `high` apart; else the whole by `low`.
#[inline(always)]
unsafe fn add_super_block(
    halves: bool,
    sub_sums: &[__m256i; 8],
    low: __m256,
    high: __m256,
    d_x: __m256,
    sum: __m256,
) -> __m256 {
    // SAFETY: AVX2 and FMA are present where this is inlined.
    unsafe {
        let first =
            _mm256_hadd_epi32(_mm256_hadd_epi32(sub_sums[0], sub_sums[1]), _mm256_hadd_epi32(sub_sums[2], sub_sums[3]));
        let last =
            _mm256_hadd_epi32(_mm256_hadd_epi32(sub_sums[4], sub_sums[5]), _mm256_hadd_epi32(sub_sums[6], sub_sums[7]));
        let (first_halves, last_halves) =
            (_mm256_permute2x128_si256(first, last, 0x20), _mm256_permute2x128_si256(first, last, 0x31));
        if halves {
            let sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(first_halves), _mm256_mul_ps(low, d_x), sum);
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(last_halves), _mm256_mul_ps(high, d_x), sum)
        } else {
            let whole = _mm256_cvtepi32_ps(_mm256_add_epi32(first_halves, last_halves));
            _mm256_fmadd_ps(whole, _mm256_mul_ps(low, d_x), sum)
        }
    }
}

/// `body` for one row of x: each sub-block decoded and multiplied in registers.
#[inline(always)]
unsafe fn one_row<const VNNI: bool>(
    format: BlockFormat,
    weights: &[u8],
    strides: Strides,
    weight_rows: usize,
    x: &QuantizedX,
    k: usize,
    dots: &mut [[f32; EIGHT]; MAX_ROWS],
) {
    let (weights_per_block, block_bytes) = format.block();
    assert!(x.quants.len() >= k && x.scales.len() >= k / BLOCK);
    // SAFETY: as `body`'s.
    unsafe {
        let mut sums = [_mm256_setzero_ps(); EIGHT];
        for super_block in 0..k / weights_per_block {
            let xs = x.quants.as_ptr().add(super_block * weights_per_block);
            let d_x = _mm256_loadu_ps(x.scales.as_ptr().add(super_block * 8));
            for (r, sum) in sums[..weight_rows].iter_mut().enumerate() {
                let block = &weights[r * strides.row + super_block * strides.block..][..block_bytes];
                let d = block_scale(format, block);
                let (mut sub_sums, mut low, mut high) = ([_mm256_setzero_si256(); 8], [0.0f32; 8], [0.0f32; 8]);
                // Written out eight times: as a loop it was not unrolled, and its sums
                // and scales went through memory (a failed store forward each block).
                for_each_sub_block!(j => {
                    let sub = decode_sub(format, block, d, j);
                    let values = _mm256_loadu_si256(xs.add(j * BLOCK).cast());
                    let signed = _mm256_sub_epi8(_mm256_xor_si256(values, sub.masks), sub.masks);
                    sub_sums[j] = byte_sums::<VNNI>(_mm256_setzero_si256(), sub.magnitudes, signed);
                    (low[j], high[j]) = (sub.low, sub.high);
                });
                let low = _mm256_setr_ps(low[0], low[1], low[2], low[3], low[4], low[5], low[6], low[7]);
                let high = _mm256_setr_ps(high[0], high[1], high[2], high[3], high[4], high[5], high[6], high[7]);
                *sum = add_super_block(scales_halves(format), &sub_sums, low, high, d_x, *sum);
            }
        }
        for (r, sum) in sums[..weight_rows].iter().enumerate() {
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), *sum);
            dots[0][r] = reduce(&lanes);
        }
    }
}

/// `body::<VNNI, F>(args)` with F the index of `format` in `grids::LATTICE`: one copy per
/// format.
macro_rules! by_format {
    ($format:expr, body::<$vnni:tt, _>($($arg:expr),* $(,)?)) => {
        match $format {
            BlockFormat::IQ2XXS => body::<$vnni, 0>($($arg),*),
            BlockFormat::IQ2XS => body::<$vnni, 1>($($arg),*),
            BlockFormat::IQ2S => body::<$vnni, 2>($($arg),*),
            BlockFormat::IQ3XXS => body::<$vnni, 3>($($arg),*),
            BlockFormat::IQ3S => body::<$vnni, 4>($($arg),*),
            BlockFormat::IQ1S => body::<$vnni, 5>($($arg),*),
            BlockFormat::IQ1M => body::<$vnni, 6>($($arg),*),
            _ => unreachable!("{} is not a lattice format", $format.name()),
        }
    };
}

/// `body` with AVX2's `maddubs`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(in crate::kernels::quant_rows::q8) unsafe fn eight_rows(
    format: BlockFormat,
    weights: &[u8],
    strides: Strides,
    weight_rows: usize,
    x: &QuantizedX,
    rows: usize,
    k: usize,
    dots: &mut [[f32; EIGHT]; MAX_ROWS],
) {
    // SAFETY: as the caller vouches.
    unsafe { by_format!(format, body::<false, _>(weights, strides, weight_rows, x, rows, k, dots)) }
}

/// `body` with AVX-512 VNNI's byte products: the same bits.
///
/// # Safety
/// The CPU must have AVX2, FMA, F16C, AVX-512 F, VL and VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(in crate::kernels::quant_rows::q8) unsafe fn eight_rows_vnni(
    format: BlockFormat,
    weights: &[u8],
    strides: Strides,
    weight_rows: usize,
    x: &QuantizedX,
    rows: usize,
    k: usize,
    dots: &mut [[f32; EIGHT]; MAX_ROWS],
) {
    // SAFETY: as the caller vouches.
    unsafe { by_format!(format, body::<true, _>(weights, strides, weight_rows, x, rows, k, dots)) }
}
