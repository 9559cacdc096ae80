//! Q4_K, Q5_K and Q6_K products with AVX2 and AVX-512. A super-block's scales (and Q4_K's
//! minimums) are decoded once into 16 floats; its 256 weights are then decoded a
//! piece at a time into vectors of f32 and multiplied into each row of x while they
//! are in registers. The decoding does the reference's float operations
//! (`quant::q4_k`, `quant::q6_k`): `d·sc` and `dmin·m` are products of an f16 and a
//! small integer, then `scale·q − min` (one fused rounding, where the reference rounds
//! the exact product `scale·q` and then the difference, which is the same) or
//! `scale·(q − 32)` (exact), so the weights are bit-identical to the reference and the
//! sums differ from it only in the order of additions.
//!
//! One kernel body (`kernel`) serves both vector widths (`Vector`) and both formats
//! (`Pieces`; Q5_K is Q4_K with a fifth bit per value); rows of x and weight rows come in const counts so that the
//! accumulators stay in registers.

use std::arch::x86_64::*;

use super::{BlockFormat, MAX_ROWS};

/// `dots[i] = x[i] · row` for a row of Q4_K or Q6_K super-blocks, 8 lanes at a time.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn k_blocks(
    format: BlockFormat,
    row: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    dots: &mut [f32; MAX_ROWS],
) {
    let dots = std::array::from_mut(dots);
    // SAFETY (both arms): the caller checked that `row` holds whole super-blocks of
    // `format` and `x` holds m rows of k = 256 × super-blocks values; AVX2, FMA and
    // F16C are present.
    unsafe {
        match format {
            BlockFormat::Q4K => by_rows::<__m256, Q4K, 1>([row], x, m, k, dots),
            BlockFormat::Q5K => by_rows::<__m256, Q5K, 1>([row], x, m, k, dots),
            BlockFormat::Q6K => by_rows::<__m256, Q6K, 1>([row], x, m, k, dots),
            _ => unreachable!("{} is not a K-quant", format.name()),
        }
    }
}

/// Whether `k_blocks_avx512` and `k_two_rows_avx512` run on this CPU: besides
/// AVX-512F they use AVX-512VL and BW, whose encodings reach all 32 vector registers
/// with the 256-bit byte operations too (with only 16 the two-row kernel spills its
/// accumulators). Every AVX-512 CPU since Skylake-X has them; the Xeon Phi has not.
pub(super) fn avx512_present() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512bw")
}

/// `k_blocks` with 16-lane vectors: half the instructions for the same weights.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma,f16c")]
pub(super) unsafe fn k_blocks_avx512(
    format: BlockFormat,
    row: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    dots: &mut [f32; MAX_ROWS],
) {
    let dots = std::array::from_mut(dots);
    // SAFETY (both arms): as in `k_blocks`; AVX-512F, VL and BW are present.
    unsafe {
        match format {
            BlockFormat::Q4K => by_rows::<__m512, Q4K, 1>([row], x, m, k, dots),
            BlockFormat::Q5K => by_rows::<__m512, Q5K, 1>([row], x, m, k, dots),
            BlockFormat::Q6K => by_rows::<__m512, Q6K, 1>([row], x, m, k, dots),
            _ => unreachable!("{} is not a K-quant", format.name()),
        }
    }
}

/// `k_blocks_avx512` for two weight rows at once: each vector of x is loaded once for
/// both (x for eight rows outgrows the L1 cache, so its loads are what a row at a
/// time waits on).
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma,f16c")]
pub(super) unsafe fn k_two_rows_avx512(
    format: BlockFormat,
    first: &[u8],
    second: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    dots: &mut [[f32; MAX_ROWS]; 2],
) {
    // SAFETY (both arms): as in `k_blocks`, for both rows; AVX-512F, VL and BW are
    // present.
    unsafe {
        match format {
            BlockFormat::Q4K => by_rows::<__m512, Q4K, 2>([first, second], x, m, k, dots),
            BlockFormat::Q5K => by_rows::<__m512, Q5K, 2>([first, second], x, m, k, dots),
            BlockFormat::Q6K => by_rows::<__m512, Q6K, 2>([first, second], x, m, k, dots),
            _ => unreachable!("{} is not a K-quant", format.name()),
        }
    }
}

/// `kernel` for the run-time count of rows of x (1 to MAX_ROWS).
#[inline(always)]
unsafe fn by_rows<V: Vector, F: Pieces<V>, const R: usize>(
    rows: [&[u8]; R],
    x: &[f32],
    m: usize,
    k: usize,
    dots: &mut [[f32; MAX_ROWS]; R],
) {
    // SAFETY (each arm): the caller's guarantees, passed on.
    unsafe {
        match m {
            1 => kernel::<V, F, 1, R>(rows, x, k, dots),
            2 => kernel::<V, F, 2, R>(rows, x, k, dots),
            3 => kernel::<V, F, 3, R>(rows, x, k, dots),
            4 => kernel::<V, F, 4, R>(rows, x, k, dots),
            5 => kernel::<V, F, 5, R>(rows, x, k, dots),
            6 => kernel::<V, F, 6, R>(rows, x, k, dots),
            7 => kernel::<V, F, 7, R>(rows, x, k, dots),
            _ => kernel::<V, F, 8, R>(rows, x, k, dots),
        }
    }
}

/// `dots[r][i] = x[i] · rows[r]` for R weight rows (of equal length) and M rows of x.
/// Each piece's products go into a fresh sum first, then into the row's accumulator:
/// with fewer than eight accumulators that keeps consecutive pieces from waiting on
/// each other (measured), and with more it costs one addition per four products. The
/// same order at every M and R is what gives a row of x the same bits whatever rows
/// and weight rows are multiplied with it (`Rows::kernel_for`; adding straight into
/// the accumulators from eight on moved a Q4_K row's last bits between one row of x
/// and four).
// `r` and `i` index the weights, the sums and the accumulators alike.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn kernel<V: Vector, F: Pieces<V>, const M: usize, const R: usize>(
    rows: [&[u8]; R],
    x: &[f32],
    k: usize,
    dots: &mut [[f32; MAX_ROWS]; R],
) {
    // SAFETY: every row holds whole super-blocks of F and x holds M rows of k = 256 ×
    // super-blocks values (the caller's checks), so every load below lies inside them.
    unsafe {
        let mut acc = [[V::zero(); M]; R];
        for b in 0..rows[0].len() / F::BYTES {
            let blocks = rows.map(|row| row.as_ptr().add(b * F::BYTES));
            let mut scales = [[0.0f32; 16]; R];
            for r in 0..R {
                scales[r] = F::scales(blocks[r]);
            }
            for p in 0..F::PIECES {
                let mut w = [[V::zero(); 4]; R];
                for r in 0..R {
                    w[r] = F::piece(blocks[r], &scales[r], p);
                }
                for i in 0..M {
                    let xs = x.as_ptr().add(i * k + b * 256);
                    let mut sum = [V::zero(); R];
                    for v in 0..4 {
                        let xv = V::load(xs.add(F::offset(p, v)));
                        for r in 0..R {
                            sum[r] = if v == 0 { V::mul(w[r][0], xv) } else { V::fmadd(w[r][v], xv, sum[r]) };
                        }
                    }
                    for r in 0..R {
                        acc[r][i] = V::add(acc[r][i], sum[r]);
                    }
                }
            }
        }
        for r in 0..R {
            for i in 0..M {
                dots[r][i] = acc[r][i].sum();
            }
        }
    }
}

/// The vector operations the kernel needs, for 8 lanes (AVX2) and 16 (AVX-512F).
/// Callers run them only where the instruction set is present.
trait Vector: Copy {
    unsafe fn zero() -> Self;
    unsafe fn load(at: *const f32) -> Self;
    unsafe fn splat(value: f32) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    /// a·b + c, rounded once.
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    /// a·b − c, rounded once.
    unsafe fn fmsub(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    /// The sum of the lanes.
    unsafe fn sum(self) -> f32;
    /// The first lanes of `bytes`, unsigned, as f32.
    unsafe fn from_u8(bytes: __m128i) -> Self;
    /// The first lanes of `bytes`, signed, as f32.
    unsafe fn from_i8(bytes: __m128i) -> Self;
}

impl Vector for __m256 {
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: AVX2 and FMA are present (`Vector`'s contract).
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(at: *const f32) -> Self {
        // SAFETY: AVX2 is present (`Vector`'s contract); the caller vouches
        // for the floats at `at`.
        unsafe { _mm256_loadu_ps(at) }
    }
    #[inline(always)]
    unsafe fn splat(value: f32) -> Self {
        // SAFETY: AVX2 and FMA are present (`Vector`'s contract).
        unsafe { _mm256_set1_ps(value) }
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        // SAFETY: AVX2 and FMA are present (`Vector`'s contract).
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: AVX2 and FMA are present (`Vector`'s contract).
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn fmsub(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: AVX2 and FMA are present (`Vector`'s contract).
        unsafe { _mm256_fmsub_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        // SAFETY: AVX2 and FMA are present (`Vector`'s contract).
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // SAFETY: AVX2 and FMA are present (`Vector`'s contract).
        unsafe {
            let halves = _mm_add_ps(_mm256_castps256_ps128(self), _mm256_extractf128_ps(self, 1));
            let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
            _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)))
        }
    }
    #[inline(always)]
    unsafe fn from_u8(bytes: __m128i) -> Self {
        // SAFETY: AVX2 and FMA are present (`Vector`'s contract).
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)) }
    }
    #[inline(always)]
    unsafe fn from_i8(bytes: __m128i) -> Self {
        // SAFETY: AVX2 and FMA are present (`Vector`'s contract).
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)) }
    }
}

impl Vector for __m512 {
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: AVX-512F is present (`Vector`'s contract).
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(at: *const f32) -> Self {
        // SAFETY: AVX-512F is present (`Vector`'s contract); the caller vouches
        // for the floats at `at`.
        unsafe { _mm512_loadu_ps(at) }
    }
    #[inline(always)]
    unsafe fn splat(value: f32) -> Self {
        // SAFETY: AVX-512F is present (`Vector`'s contract).
        unsafe { _mm512_set1_ps(value) }
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        // SAFETY: AVX-512F is present (`Vector`'s contract).
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: AVX-512F is present (`Vector`'s contract).
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn fmsub(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: AVX-512F is present (`Vector`'s contract).
        unsafe { _mm512_fmsub_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        // SAFETY: AVX-512F is present (`Vector`'s contract).
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // SAFETY: AVX-512F is present (`Vector`'s contract).
        unsafe { _mm512_reduce_add_ps(self) }
    }
    #[inline(always)]
    unsafe fn from_u8(bytes: __m128i) -> Self {
        // SAFETY: AVX-512F is present (`Vector`'s contract).
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)) }
    }
    #[inline(always)]
    unsafe fn from_i8(bytes: __m128i) -> Self {
        // SAFETY: AVX-512F is present (`Vector`'s contract).
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)) }
    }
}

/// A K-quant super-block as vectors of V: `PIECES` pieces of four vectors each.
trait Pieces<V> {
    const BYTES: usize;
    const PIECES: usize;
    /// Where vector `v` of piece `p` starts among the super-block's 256 weights.
    fn offset(p: usize, v: usize) -> usize;
    /// The super-block's factors per sub-block, in the order `piece` reads them.
    unsafe fn scales(block: *const u8) -> [f32; 16];
    /// The weights of piece `p`.
    unsafe fn piece(block: *const u8, scales: &[f32; 16], p: usize) -> [V; 4];
}

/// Q4_K (`FIFTH` false) and Q5_K (true): eight sub-blocks of 32; `scales` holds
/// `d·sc` for each, then `dmin·m`. Q5_K keeps the values' fifth bits in 32 bytes
/// between the scales and the nibbles.
struct QK<const FIFTH: bool>;
type Q4K = QK<false>;
type Q5K = QK<true>;

/// Q6_K: sixteen sub-blocks of 16; `scales` holds `d·sc` for each.
struct Q6K;

/// The f16 at `at` as f32, with F16C's conversion (exact, like every f16 → f32).
#[inline(always)]
pub(super) unsafe fn f16_at(at: *const u8) -> f32 {
    // SAFETY: the caller vouches for two bytes at `at`; F16C is present.
    unsafe {
        let bits = u16::from_le_bytes([*at, *at.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

/// Bit `c` of each byte of `bits` as that byte's bit 4, the rest zero (16-bit shifts:
/// a bit carried across bytes falls outside the mask): Q5_K's fifth bits, for these
/// kernels and the 8-bit ones (`q8::k_quants::x86`).
#[inline(always)]
pub(super) unsafe fn fifth_bits(bits: __m256i, c: usize) -> __m256i {
    // SAFETY: AVX2 is present where this is inlined.
    unsafe {
        let moved = if c <= 4 {
            _mm256_sll_epi16(bits, _mm_cvtsi32_si128(4 - c as i32))
        } else {
            _mm256_srl_epi16(bits, _mm_cvtsi32_si128(c as i32 - 4))
        };
        _mm256_and_si256(moved, _mm256_set1_epi8(0x10))
    }
}

/// `fifth_bits` of 16 bytes.
#[inline(always)]
unsafe fn fifth_bits_128(bits: __m128i, c: usize) -> __m128i {
    // SAFETY: AVX2 is present where this is inlined; only the defined low half is kept.
    unsafe { _mm256_castsi256_si128(fifth_bits(_mm256_castsi128_si256(bits), c)) }
}

/// Eight f32 of `bytes` (unsigned, or signed) times `factor` into `out`.
#[inline(always)]
unsafe fn scaled8(bytes: __m128i, signed: bool, factor: f32, out: *mut f32) {
    // SAFETY: AVX2 is present; the caller vouches for 8 floats at `out`.
    unsafe {
        let ints = if signed { _mm256_cvtepi8_epi32(bytes) } else { _mm256_cvtepu8_epi32(bytes) };
        _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(ints), _mm256_set1_ps(factor)));
    }
}

impl<const FIFTH: bool> QK<FIFTH> {
    const BLOCK_BYTES: usize = if FIFTH { 176 } else { 144 };
    /// Where the nibbles start.
    const NIBBLES: usize = if FIFTH { 48 } else { 16 };

    /// `d·sc` of the eight sub-blocks, then `dmin·m`.
    #[inline(always)]
    unsafe fn scales(block: *const u8) -> [f32; 16] {
        // SAFETY: a Q4_K block is 144 bytes: d, dmin, 12 packed bytes of scales and
        // minimums, 128 bytes of values (Q5_K: 32 bytes of fifth bits before them).
        // AVX2 and F16C are present.
        unsafe {
            let word = |at: usize| u32::from_le_bytes(*block.add(4 + at).cast::<[u8; 4]>());
            let (a, b, c) = (word(0), word(4), word(8));
            // Sub-blocks 0–3 keep their 6-bit scale in bytes 0–3 and minimum in 4–7;
            // 4–7 keep the low 4 bits of both in bytes 8–11 and the top 2 bits in the
            // top bits of bytes 0–3 (scales) and 4–7 (minimums): `scale_min_k4`, four
            // sub-blocks per 32-bit word.
            let (low6, low4, low2) = (0x3F3F_3F3F, 0x0F0F_0F0F, 0x0303_0303);
            let scales = [a & low6, (c & low4) | (((a >> 6) & low2) << 4)];
            let mins = [b & low6, ((c >> 4) & low4) | (((b >> 6) & low2) << 4)];
            let packed = _mm_set_epi32(mins[1] as i32, mins[0] as i32, scales[1] as i32, scales[0] as i32);
            let mut out = [0.0f32; 16];
            scaled8(packed, false, f16_at(block), out.as_mut_ptr());
            scaled8(_mm_srli_si128(packed, 8), false, f16_at(block.add(2)), out.as_mut_ptr().add(8));
            out
        }
    }

    /// Values 0–15 (Q5_K: 0–31) of 16 bytes of chunk `c` (32 bytes, the values of
    /// sub-blocks 2c and 2c + 1) from byte `l0`: (low nibbles, of sub-block 2c; high,
    /// of 2c + 1), with Q5_K's fifth bits (bit j of fifth-bit byte l is value l's of
    /// sub-block j).
    #[inline(always)]
    unsafe fn values(block: *const u8, c: usize, l0: usize) -> (__m128i, __m128i) {
        // SAFETY: c < 4 and l0 ≤ 16 keep the 16 bytes inside the block's values (and
        // Q5_K's fifth bits).
        unsafe {
            let packed = _mm_loadu_si128(block.add(Self::NIBBLES + 32 * c + l0).cast());
            let nibble = _mm_set1_epi8(0x0F);
            let (low, high) = (_mm_and_si128(packed, nibble), _mm_and_si128(_mm_srli_epi16(packed, 4), nibble));
            if !FIFTH {
                return (low, high);
            }
            let bits = _mm_loadu_si128(block.add(16 + l0).cast());
            (_mm_or_si128(low, fifth_bits_128(bits, 2 * c)), _mm_or_si128(high, fifth_bits_128(bits, 2 * c + 1)))
        }
    }

    /// `scale·q − min` for the first lanes of `q` in sub-block `j`.
    #[inline(always)]
    unsafe fn weights<V: Vector>(q: __m128i, scales: &[f32; 16], j: usize) -> V {
        // SAFETY: the caller's instruction set (see `Vector`).
        unsafe { V::fmsub(V::from_u8(q), V::splat(scales[j]), V::splat(scales[8 + j])) }
    }
}

impl<const FIFTH: bool> Pieces<__m256> for QK<FIFTH> {
    const BYTES: usize = Self::BLOCK_BYTES;
    // Piece p: 16 bytes (p odd: the second 16) of chunk p / 2, both nibbles.
    const PIECES: usize = 8;
    fn offset(p: usize, v: usize) -> usize {
        64 * (p / 2) + 16 * (p % 2) + [0, 8, 32, 40][v]
    }
    #[inline(always)]
    unsafe fn scales(block: *const u8) -> [f32; 16] {
        // SAFETY: the caller's block and instruction set.
        unsafe { Self::scales(block) }
    }
    #[inline(always)]
    unsafe fn piece(block: *const u8, scales: &[f32; 16], p: usize) -> [__m256; 4] {
        // SAFETY: the caller's block and instruction set.
        unsafe {
            let (c, l0) = (p / 2, 16 * (p % 2));
            let (low, high) = Self::values(block, c, l0);
            [
                Self::weights(low, scales, 2 * c),
                Self::weights(_mm_srli_si128(low, 8), scales, 2 * c),
                Self::weights(high, scales, 2 * c + 1),
                Self::weights(_mm_srli_si128(high, 8), scales, 2 * c + 1),
            ]
        }
    }
}

impl<const FIFTH: bool> Pieces<__m512> for QK<FIFTH> {
    const BYTES: usize = Self::BLOCK_BYTES;
    // Piece p: chunk p, its 64 weights in order.
    const PIECES: usize = 4;
    fn offset(p: usize, v: usize) -> usize {
        64 * p + 16 * v
    }
    #[inline(always)]
    unsafe fn scales(block: *const u8) -> [f32; 16] {
        // SAFETY: the caller's block and instruction set.
        unsafe { Self::scales(block) }
    }
    #[inline(always)]
    unsafe fn piece(block: *const u8, scales: &[f32; 16], p: usize) -> [__m512; 4] {
        // SAFETY: the caller's block and instruction set.
        unsafe {
            let (low0, high0) = Self::values(block, p, 0);
            let (low1, high1) = Self::values(block, p, 16);
            [
                Self::weights(low0, scales, 2 * p),
                Self::weights(low1, scales, 2 * p),
                Self::weights(high0, scales, 2 * p + 1),
                Self::weights(high1, scales, 2 * p + 1),
            ]
        }
    }
}

impl Q6K {
    /// `d·sc` of the sixteen sub-blocks.
    #[inline(always)]
    unsafe fn scales(block: *const u8) -> [f32; 16] {
        // SAFETY: a Q6_K block is 210 bytes: 128 of low nibbles, 64 of high bits, 16
        // signed scales and d. AVX2 and F16C are present.
        unsafe {
            let d = f16_at(block.add(208));
            let packed = _mm_loadu_si128(block.add(192).cast());
            let mut out = [0.0f32; 16];
            scaled8(packed, true, d, out.as_mut_ptr());
            scaled8(_mm_srli_si128(packed, 8), true, d, out.as_mut_ptr().add(8));
            out
        }
    }

    /// q − 32 (signed bytes) for the 32 weights of `set` (0–3) in half `h` (128
    /// weights: 32·set + l for l in 0..32), assembled as `quant::q6_k` does from a
    /// nibble of `ql` and two bits of `qh`.
    #[inline(always)]
    unsafe fn values(block: *const u8, h: usize, set: usize) -> __m256i {
        // SAFETY: h < 2 and set < 4 keep both loads inside the block.
        unsafe {
            // Sets 0 and 2 take the low and high nibbles of ql[l], 1 and 3 of ql[l + 32].
            let ql = _mm256_loadu_si256(block.add(64 * h + 32 * (set % 2)).cast());
            let qh = _mm256_loadu_si256(block.add(128 + 32 * h).cast());
            let low = if set < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
            let low = _mm256_and_si256(low, _mm256_set1_epi8(0x0F));
            // Bits 2·set and 2·set + 1 of qh become bits 4 and 5 (16-bit shifts: the
            // bits they carry across bytes fall outside the mask).
            let high = match set {
                0 => _mm256_slli_epi16(qh, 4),
                1 => _mm256_slli_epi16(qh, 2),
                2 => qh,
                _ => _mm256_srli_epi16(qh, 2),
            };
            let high = _mm256_and_si256(high, _mm256_set1_epi8(0x30));
            _mm256_sub_epi8(_mm256_or_si256(low, high), _mm256_set1_epi8(32))
        }
    }
}

impl Pieces<__m256> for Q6K {
    const BYTES: usize = 210;
    // Piece p: weights 32p .. 32p + 32 (set p % 4 of half p / 4), two sub-blocks.
    const PIECES: usize = 8;
    fn offset(p: usize, v: usize) -> usize {
        32 * p + 8 * v
    }
    #[inline(always)]
    unsafe fn scales(block: *const u8) -> [f32; 16] {
        // SAFETY: the caller's block and instruction set.
        unsafe { Q6K::scales(block) }
    }
    #[inline(always)]
    unsafe fn piece(block: *const u8, scales: &[f32; 16], p: usize) -> [__m256; 4] {
        // SAFETY: the caller's block and instruction set.
        unsafe {
            let q = Q6K::values(block, p / 4, p % 4);
            let (low, high) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            let bytes = [low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)];
            let mut w = [_mm256_setzero_ps(); 4];
            for (v, (w, bytes)) in w.iter_mut().zip(bytes).enumerate() {
                *w = _mm256_mul_ps(__m256::from_i8(bytes), _mm256_set1_ps(scales[2 * p + v / 2]));
            }
            w
        }
    }
}

impl Pieces<__m512> for Q6K {
    const BYTES: usize = 210;
    // Piece p: weights 64p .. 64p + 64 (sets 2·(p % 2) and 2·(p % 2) + 1 of half
    // p / 2), a sub-block per vector.
    const PIECES: usize = 4;
    fn offset(p: usize, v: usize) -> usize {
        64 * p + 16 * v
    }
    #[inline(always)]
    unsafe fn scales(block: *const u8) -> [f32; 16] {
        // SAFETY: the caller's block and instruction set.
        unsafe { Q6K::scales(block) }
    }
    #[inline(always)]
    unsafe fn piece(block: *const u8, scales: &[f32; 16], p: usize) -> [__m512; 4] {
        // SAFETY: the caller's block and instruction set.
        unsafe {
            let (h, first) = (p / 2, 2 * (p % 2));
            let (a, b) = (Q6K::values(block, h, first), Q6K::values(block, h, first + 1));
            let bytes = [
                _mm256_castsi256_si128(a),
                _mm256_extracti128_si256(a, 1),
                _mm256_castsi256_si128(b),
                _mm256_extracti128_si256(b, 1),
            ];
            let mut w = [_mm512_setzero_ps(); 4];
            for (v, (w, bytes)) in w.iter_mut().zip(bytes).enumerate() {
                *w = _mm512_mul_ps(__m512::from_i8(bytes), _mm512_set1_ps(scales[4 * p + v]));
            }
            w
        }
    }
}

#[cfg(test)]
mod tests;
