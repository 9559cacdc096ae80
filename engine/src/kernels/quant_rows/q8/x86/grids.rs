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
    iq1_m_scale, scales_halves, seven_bit_signs, IQ1_GRID, IQ2_S_GRID, IQ2_XS_GRID, IQ2_XXS_GRID, IQ3_S_GRID,
    IQ3_XXS_GRID,
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

/// A block's eight sub-blocks (`grids::sub_block`'s values and scales, as vectors).
#[inline(always)]
unsafe fn decode(format: BlockFormat, block: &[u8]) -> Decoded {
    let zero = unsafe { _mm256_setzero_si256() };
    let mut out = Decoded { magnitudes: [zero; 8], masks: [zero; 8], low: [0.0; 8], high: [0.0; 8] };
    let masks = |signs: [u8; 4]| signs.map(|s| SIGN_MASKS[s as usize]);
    // SAFETY (each block): AVX2 is present where this is inlined; the block is whole.
    for j in 0..8 {
        match format {
            BlockFormat::IQ2XXS => unsafe {
                let (indices, aux) = (u32_at(block, 2 + 8 * j), u32_at(block, 6 + 8 * j));
                let points = std::array::from_fn(|l| IQ2_XXS_GRID[(indices >> (8 * l) & 0xFF) as usize]);
                out.magnitudes[j] = four(points);
                out.masks[j] = four(masks(std::array::from_fn(|l| seven_bit_signs(aux >> (7 * l)))));
                out.low[j] = f16_at(block, 0) * (0.5 + (aux >> 28) as f32) * 0.25;
                out.high[j] = out.low[j];
            },
            BlockFormat::IQ2XS => unsafe {
                let q: [usize; 4] = std::array::from_fn(|l| u16_at(block, 2 + 8 * j + 2 * l));
                out.magnitudes[j] = four(q.map(|q| IQ2_XS_GRID[q & 511]));
                out.masks[j] = four(masks(q.map(|q| seven_bit_signs((q >> 9) as u32))));
                let (d, byte) = (f16_at(block, 0), block[66 + j]);
                out.low[j] = d * (0.5 + (byte & 0x0F) as f32) * 0.25;
                out.high[j] = d * (0.5 + (byte >> 4) as f32) * 0.25;
            },
            BlockFormat::IQ2S => unsafe {
                let high = block[66 + j] as usize;
                let points =
                    std::array::from_fn(|l| IQ2_S_GRID[block[2 + 4 * j + l] as usize | (high >> (2 * l) & 3) << 8]);
                out.magnitudes[j] = four(points);
                out.masks[j] = four(masks(std::array::from_fn(|l| block[34 + 4 * j + l])));
                let (d, byte) = (f16_at(block, 0), block[74 + j]);
                out.low[j] = d * (0.5 + (byte & 0x0F) as f32) * 0.25;
                out.high[j] = d * (0.5 + (byte >> 4) as f32) * 0.25;
            },
            BlockFormat::IQ3XXS => unsafe {
                let aux = u32_at(block, 66 + 4 * j);
                let point = |i: usize| IQ3_XXS_GRID[block[2 + 8 * j + i] as usize];
                out.magnitudes[j] = four(std::array::from_fn(|l| point(2 * l) | point(2 * l + 1) << 32));
                out.masks[j] = four(masks(std::array::from_fn(|l| seven_bit_signs(aux >> (7 * l)))));
                out.low[j] = f16_at(block, 0) * (0.5 + (aux >> 28) as f32) * 0.5;
                out.high[j] = out.low[j];
            },
            BlockFormat::IQ3S => unsafe {
                let high = block[66 + j] as usize;
                let point = |i: usize| IQ3_S_GRID[block[2 + 8 * j + i] as usize | (high >> i & 1) << 8];
                out.magnitudes[j] = four(std::array::from_fn(|l| point(2 * l) | point(2 * l + 1) << 32));
                out.masks[j] = four(masks(std::array::from_fn(|l| block[74 + 4 * j + l])));
                let step = block[106 + j / 2] >> (4 * (j % 2)) & 0x0F;
                out.low[j] = f16_at(block, 0) * (1 + 2 * step as u32) as f32;
                out.high[j] = out.low[j];
            },
            BlockFormat::IQ1S => unsafe {
                let qh = u16_at(block, 34 + 2 * j);
                let points =
                    std::array::from_fn(|l| IQ1_GRID[block[2 + 4 * j + l] as usize | (qh >> (3 * l) & 7) << 8]);
                let shift = if qh & 0x8000 == 0 { 1 } else { -1 };
                (out.magnitudes[j], out.masks[j]) = shifted(four(points), _mm256_set1_epi8(shift));
                out.low[j] = f16_at(block, 0) * (2 * (qh >> 12 & 7) + 1) as f32 * 0.125;
                out.high[j] = out.low[j];
            },
            BlockFormat::IQ1M => unsafe {
                let high = |l: usize| (block[32 + 2 * j + l / 2] >> (4 * (l % 2))) as usize;
                let points = std::array::from_fn(|l| IQ1_GRID[block[4 * j + l] as usize | (high(l) & 7) << 8]);
                let shifts = std::array::from_fn(|l| if high(l) & 8 == 0 { 0x0101_0101_0101_0101 } else { u64::MAX });
                (out.magnitudes[j], out.masks[j]) = shifted(four(points), four(shifts));
                let (d, packed) = (iq1_m_scale(block), u16_at(block, 48 + 2 * (j / 2)) >> (6 * (j % 2)));
                out.low[j] = d * (2 * (packed & 7) + 1) as f32 * 0.125;
                out.high[j] = d * (2 * (packed >> 3 & 7) + 1) as f32 * 0.125;
            },
            _ => unreachable!("{} is not a lattice format", format.name()),
        }
    }
    out
}

/// The portable body's `dots` for the same arguments, in vectors (see the module's docs).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn body<const VNNI: bool>(
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
    assert!(x.quants.len() >= rows * k && x.scales.len() >= rows * blocks);
    // SAFETY: AVX2 and FMA (and with `VNNI`, AVX-512 VNNI and VL) are present, as the
    // callers vouch; every load is inside x's rows (asserted) or a whole block.
    unsafe {
        for r in 0..weight_rows {
            let mut sums = [_mm256_setzero_ps(); MAX_ROWS];
            for super_block in 0..k / weights_per_block {
                let block = &weights[r * strides.row + super_block * strides.block..][..block_bytes];
                let decoded = decode(format, block);
                let (low_scales, high_scales) =
                    (_mm256_loadu_ps(decoded.low.as_ptr()), _mm256_loadu_ps(decoded.high.as_ptr()));
                for (i, sum) in sums[..rows].iter_mut().enumerate() {
                    let xs = x.quants.as_ptr().add(i * k + super_block * weights_per_block);
                    // Plain loops: a closure would not inherit this function's features.
                    let mut sub_sums = [_mm256_setzero_si256(); 8];
                    for (j, sub_sum) in sub_sums.iter_mut().enumerate() {
                        let values = _mm256_loadu_si256(xs.add(j * BLOCK).cast());
                        let signed = _mm256_sub_epi8(_mm256_xor_si256(values, decoded.masks[j]), decoded.masks[j]);
                        *sub_sum = byte_sums::<VNNI>(_mm256_setzero_si256(), decoded.magnitudes[j], signed);
                    }
                    // Lanes 0–3 of a sub-block's sums are its first 16 bytes', 4–7 the rest.
                    let first = _mm256_hadd_epi32(
                        _mm256_hadd_epi32(sub_sums[0], sub_sums[1]),
                        _mm256_hadd_epi32(sub_sums[2], sub_sums[3]),
                    );
                    let last = _mm256_hadd_epi32(
                        _mm256_hadd_epi32(sub_sums[4], sub_sums[5]),
                        _mm256_hadd_epi32(sub_sums[6], sub_sums[7]),
                    );
                    let (low, high) =
                        (_mm256_permute2x128_si256(first, last, 0x20), _mm256_permute2x128_si256(first, last, 0x31));
                    let d_x = _mm256_loadu_ps(x.scales.as_ptr().add(i * blocks + super_block * 8));
                    if halves {
                        *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(low), _mm256_mul_ps(low_scales, d_x), *sum);
                        *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(high), _mm256_mul_ps(high_scales, d_x), *sum);
                    } else {
                        let whole = _mm256_cvtepi32_ps(_mm256_add_epi32(low, high));
                        *sum = _mm256_fmadd_ps(whole, _mm256_mul_ps(low_scales, d_x), *sum);
                    }
                }
            }
            for (i, sum) in sums[..rows].iter().enumerate() {
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *sum);
                dots[i][r] = reduce(&lanes);
            }
        }
    }
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
    unsafe { body::<false>(format, weights, strides, weight_rows, x, rows, k, dots) }
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
    unsafe { body::<true>(format, weights, strides, weight_rows, x, rows, k, dots) }
}
