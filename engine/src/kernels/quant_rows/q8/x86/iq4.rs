//! IQ4_XS's blocks of 32 are the sub-blocks of its super-blocks, each scaled by the
//! super-block's f16 scale times its 6-bit scale less 32 (exact in f32): where a
//! block's indices lie, and the eight rows' scales from their 8-byte headers.

use std::arch::x86_64::*;

use super::{f16_scales, Strides, GROUP_ROWS};

/// Bytes ahead of an IQ4_XS super-block's indices: its f16 scale, the sub-blocks'
/// 6-bit scales' high bits (a u16), their low nibbles (4 bytes).
const HEADER: usize = 8;

/// Sub-blocks (blocks of 32) per IQ4_XS super-block.
pub(super) const SUB_BLOCKS: usize = 8;

/// IQ4_XS's super-blocks hold eight blocks of 32 after an 8-byte header (the f16
/// scale, then the sub-blocks' 6-bit scales): row r's sub-block `b % 8` of
/// super-block `b / 8`, as the address two bytes before its indices (where a 32-value
/// block's scale would be), so that `block_values` reads them where it reads Q4_0's.
#[inline(always)]
pub(super) unsafe fn iq4_xs_block_at(weights: &[u8], strides: Strides, r: usize, b: usize) -> *const u8 {
    // Sub-block j's indices lie `within` bytes past its super-block's header.
    let within = 16 * (b % SUB_BLOCKS);
    // SAFETY: the caller's super-block lies inside `weights`.
    unsafe {
        if strides.scales_first {
            // Interleaved: the eight headers, then row after row's indices.
            weights.as_ptr().add(b / SUB_BLOCKS * strides.block + GROUP_ROWS * HEADER + r * strides.row + within - 2)
        } else {
            iq4_xs_super_block(weights, strides, r, b).add(HEADER + within - 2)
        }
    }
}

/// Row r's IQ4_XS super-block holding block `b` of the eight rows at `weights`.
#[inline(always)]
unsafe fn iq4_xs_super_block(weights: &[u8], strides: Strides, r: usize, b: usize) -> *const u8 {
    // SAFETY: the caller's super-block lies inside `weights`.
    unsafe { weights.as_ptr().add(b / SUB_BLOCKS * strides.block + r * strides.row) }
}

/// The eight rows' IQ4_XS headers of the super-block holding block `b`, as vectors:
/// lane r row r's f16 scale (as f32), its sub-blocks' low scale bits (the u32 at
/// bytes 4..8: sub-block j's at bit 4·j) and high ones (the u16 at bytes 2..4: bit 2·j).
#[derive(Clone, Copy)]
pub(super) struct Headers {
    pub(super) d: __m256,
    pub(super) low: __m256i,
    pub(super) high: __m256i,
}

#[inline(always)]
pub(super) unsafe fn headers(weights: &[u8], strides: Strides, b: usize) -> Headers {
    let (mut low, mut high) = ([0u32; 8], [0u32; 8]);
    // SAFETY: the eight rows' super-blocks holding block `b` lie inside `weights`;
    // AVX2 and F16C are present where this is inlined.
    unsafe {
        if strides.scales_first {
            // Interleaved (`order::iq4_xs_runs`): the eight headers as three vectors.
            let at = weights.as_ptr().add(b / SUB_BLOCKS * strides.block);
            return Headers {
                d: _mm256_cvtph_ps(_mm_loadu_si128(at.cast())),
                low: _mm256_loadu_si256(at.add(16).cast()),
                high: _mm256_cvtepu16_epi32(_mm_loadu_si128(at.add(48).cast())),
            };
        }
        for r in 0..8 {
            let block = iq4_xs_super_block(weights, strides, r, b);
            high[r] = block.add(2).cast::<u16>().read_unaligned() as u32;
            low[r] = block.add(4).cast::<u32>().read_unaligned();
        }
        Headers {
            d: f16_scales(|r| iq4_xs_super_block(weights, strides, r, b), 0),
            low: _mm256_loadu_si256(low.as_ptr().cast()),
            high: _mm256_loadu_si256(high.as_ptr().cast()),
        }
    }
}

/// The eight rows' scales of sub-block `j`: the f16 scale times the 6-bit scale less
/// 32, exact in f32 (`quant::iq4_xs` decodes the same values).
#[inline(always)]
pub(super) unsafe fn sub_block_scales(headers: Headers, j: usize) -> __m256 {
    // SAFETY: AVX2 is present where this is inlined.
    unsafe {
        let low =
            _mm256_and_si256(_mm256_srlv_epi32(headers.low, _mm256_set1_epi32(4 * j as i32)), _mm256_set1_epi32(15));
        let high =
            _mm256_and_si256(_mm256_srlv_epi32(headers.high, _mm256_set1_epi32(2 * j as i32)), _mm256_set1_epi32(3));
        let scale = _mm256_sub_epi32(_mm256_or_si256(low, _mm256_slli_epi32(high, 4)), _mm256_set1_epi32(32));
        _mm256_mul_ps(headers.d, _mm256_cvtepi32_ps(scale))
    }
}

/// The eight rows' scales of IQ4_XS block `b`.
#[inline(always)]
pub(super) unsafe fn iq4_xs_scales(weights: &[u8], strides: Strides, b: usize) -> __m256 {
    // SAFETY: as `headers` needs.
    unsafe { sub_block_scales(headers(weights, strides, b), b % SUB_BLOCKS) }
}
