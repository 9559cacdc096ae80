//! Operations across a vector's lanes that the 8-bit kernels share: four byte products
//! summed into each 32-bit lane (`byte_sums`, `pair_sums`: AVX2 or AVX-512 VNNI, the
//! same integers), eight rows' sums reduced into one vector whose lane r is row r's,
//! and eight rows' 4-byte groups transposed.

use std::arch::x86_64::*;

/// Eight vectors of eight 32-bit groups transposed: lane r of vector g is group g
/// of vector r (bytes 4g..4g+4 of weight row r's block). Loops, not `from_fn`: a
/// closure that is not inlined loses the caller's target features, and then every
/// intrinsic in it is a call.
#[inline(always)]
pub(in super::super) unsafe fn transpose_groups(w: &[__m256i; 8]) -> [__m256i; 8] {
    // SAFETY: AVX2 is present where this is inlined.
    unsafe {
        // Rows (2p, 2p+1) interleaved: t[2p] per 128-bit half [r g0, r' g0, r g1, r' g1]
        // (groups 0, 1 | 4, 5), t[2p + 1] the same for groups 2, 3 | 6, 7.
        let mut t = [_mm256_setzero_si256(); 8];
        for pair in 0..4 {
            t[2 * pair] = _mm256_unpacklo_epi32(w[2 * pair], w[2 * pair + 1]);
            t[2 * pair + 1] = _mm256_unpackhi_epi32(w[2 * pair], w[2 * pair + 1]);
        }
        // Pairs of pairs: u[4q + j] holds rows 4q..4q+4 of group j | group j + 4.
        let mut u = [_mm256_setzero_si256(); 8];
        for q in 0..2 {
            for half in 0..2 {
                let (a, b) = (t[4 * q + half], t[4 * q + 2 + half]);
                u[4 * q + 2 * half] = _mm256_unpacklo_epi64(a, b);
                u[4 * q + 2 * half + 1] = _mm256_unpackhi_epi64(a, b);
            }
        }
        // Rows 0–3 and 4–7 side by side.
        let mut v = [_mm256_setzero_si256(); 8];
        for g in 0..4 {
            v[g] = _mm256_permute2x128_si256(u[g], u[4 + g], 0x20);
            v[g + 4] = _mm256_permute2x128_si256(u[g], u[4 + g], 0x31);
        }
        v
    }
}

/// Lane j of the result: Σ over bytes 4j..4j+4 of `a`·`xa` + `b`·`xb` (`a`, `b`
/// unsigned, `xa`, `xb` signed). With `VNNI` two `VPDPBUSD`; without, `maddubs` pairs
/// added in 16 bits and widened by `madd`, which the callers' bounds keep below 2¹⁵
/// (so no pair saturates): the same integers either way.
#[inline(always)]
pub(in super::super) unsafe fn pair_sums<const VNNI: bool>(
    a: __m256i,
    xa: __m256i,
    b: __m256i,
    xb: __m256i,
) -> __m256i {
    // SAFETY: AVX2 (and with `VNNI`, AVX-512 VNNI and VL) is present where this is inlined.
    unsafe {
        if VNNI {
            _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), a, xa), b, xb)
        } else {
            let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(a, xa), _mm256_maddubs_epi16(b, xb));
            _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
        }
    }
}

/// `acc` plus, in lane j, Σ over bytes 4j..4j+4 of `a`·`b` (`a` unsigned, `b`
/// signed): one `VPDPBUSD` with `VNNI`, else `maddubs` widened by `madd` (the
/// callers' pairs stay below 2¹⁵): the same integers.
#[inline(always)]
pub(in super::super) unsafe fn byte_sums<const VNNI: bool>(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    // SAFETY: AVX2 (and with `VNNI`, AVX-512 VNNI and VL) is present where this is inlined.
    unsafe {
        if VNNI {
            _mm256_dpbusd_epi32(acc, a, b)
        } else {
            _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)))
        }
    }
}

/// Four vectors of paired rows into one: `sums[p]`'s lanes 0–3 are row p's 32-bit
/// sums and lanes 4–7 row p + 4's; lane r of the result is row r's total (as
/// `reduce_halves` does, per 128-bit lane).
#[inline(always)]
pub(in super::super) unsafe fn reduce_paired(sums: [__m256i; 4]) -> __m256i {
    // SAFETY: AVX2 is present where this is inlined.
    unsafe {
        let pair = |a: __m256i, b: __m256i| _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
        let quad = |a: __m256i, b: __m256i| _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
        quad(pair(sums[0], sums[1]), pair(sums[2], sums[3]))
    }
}

/// Eight vectors of eight i32 into one: lane r holds the sum of vector r's lanes.
#[inline(always)]
pub(in super::super) unsafe fn reduce_eight(p: [__m256i; 8]) -> __m256i {
    // SAFETY: AVX2 is present where this is inlined.
    unsafe {
        let (first, second) = reduce_halves(p);
        _mm256_add_epi32(first, second)
    }
}

/// Eight vectors of eight i32 into two: lane r of the first holds the sum of
/// vector r's lanes 0–3 (from bytes 0–15 of a block), of the second its lanes 4–7.
#[inline(always)]
pub(in super::super) unsafe fn reduce_halves(p: [__m256i; 8]) -> (__m256i, __m256i) {
    // SAFETY: AVX2 is present where this is inlined.
    unsafe {
        // Pairs of vectors interleaved and added, twice (one µop per instruction,
        // where a horizontal add is three): per 128-bit half, [Σ p0, Σ p1, Σ p2, Σ p3].
        let pair = |a: __m256i, b: __m256i| _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
        let quad = |a: __m256i, b: __m256i| _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
        let low = quad(pair(p[0], p[1]), pair(p[2], p[3]));
        let high = quad(pair(p[4], p[5]), pair(p[6], p[7]));
        (_mm256_permute2x128_si256(low, high, 0x20), _mm256_permute2x128_si256(low, high, 0x31))
    }
}
