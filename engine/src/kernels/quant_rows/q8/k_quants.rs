//! Q4_K, Q5_K, Q6_K, Q3_K and Q2_K products with 8-bit activations. x keeps Q8_0's blocks of 32
//! values (one scale each), and those line up with the K-quants' sub-blocks: a Q4_K
//! (Q5_K) sub-block is 32 values under one 6-bit scale `sc` and minimum `m`, a Q6_K
//! sub-block 16 values under a signed 8-bit scale, two per block of x. So each block
//! of x meets small integers under integer scales, and its product is
//!
//! - Q4_K, Q5_K: `S = sc · Σ q·x` (q 0–15, 0–31), then `sum += S·(d·d_x)` and
//!   `sum −= (dmin·m)·(d_x·Σx)`;
//! - Q6_K: `S = sc_a · Σ₁₆ (q−32)·x + sc_b · Σ₁₆ (q−32)·x` over the block's two
//!   halves, then `sum += S·(d·d_x)`; Q3_K the same with its values q − 4 and its
//!   scales less 32;
//! - Q2_K: `S` as Q6_K's with q 0–3 and 4-bit scales, then `sum += S·(d·d_x)` and
//!   `sum −= dmin·(d_x·(m_a·Σ₁₆x + m_b·Σ₁₆x))` (x's half sums);
//!
//! with `S` exact in 32 bits (|S| < 2²⁴) and the float steps fused and in this order
//! on every path, so a product's value for one row of x and one weight row is the
//! same bits whatever is computed beside it (see `q8`'s docs). llama.cpp quantizes x
//! for K-quants in blocks of 256 instead (Q8_K: one scale per super-block, fewer
//! float steps, a coarser x); blocks of 32 keep one quantizer and one rounding bound
//! for every format.

use super::{QuantizedX, BLOCK, MAX_ROWS};
use crate::kernels::quant::{q2_k_values, q3_k_scale, q3_k_values, scale_min_k4, BlockFormat};

/// Values per super-block.
pub(super) const SUPER: usize = 256;

/// Blocks of x per super-block.
const BLOCKS_PER_SUPER: usize = SUPER / BLOCK;

/// One super-block's values as small signed integers (Q4_K, Q5_K, Q2_K: q; Q6_K: q − 32;
/// Q3_K: q − 4) and its scales: Q4_K's and Q5_K's `(sc, m)` per sub-block of 32 in
/// `scales[0..8]` and `mins[0..8]`, the others' scale per 16 values in `scales` (and
/// Q2_K's minimum in `mins`); `d` and (Q4_K, Q5_K, Q2_K) `dmin`.
struct Unpacked {
    values: [i8; SUPER],
    scales: [i32; 16],
    mins: [i32; 16],
    d: f32,
    dmin: f32,
}

fn f16_at(block: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// The reference unpacking (`quant::q4_k`, `quant::q5_k`, `quant::q6_k`) into integers.
fn unpack(format: BlockFormat, block: &[u8]) -> Unpacked {
    let mut u = Unpacked { values: [0; SUPER], scales: [0; 16], mins: [0; 16], d: 0.0, dmin: 0.0 };
    if matches!(format, BlockFormat::Q3K | BlockFormat::Q2K) {
        unpack_low_bits(format, block, &mut u);
    } else if format != BlockFormat::Q6K {
        let fifth = format == BlockFormat::Q5K;
        (u.d, u.dmin) = (f16_at(block, 0), f16_at(block, 2));
        let nibbles = if fifth { 48 } else { 16 };
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &block[4..16]);
            (u.scales[j], u.mins[j]) = (sc as i32, m as i32);
            let packed = &block[nibbles + 32 * (j / 2)..][..32];
            for (l, (value, &byte)) in u.values[32 * j..][..32].iter_mut().zip(packed).enumerate() {
                let high = if fifth { (block[16 + l] >> j) & 1 } else { 0 };
                *value = ((byte >> (4 * (j % 2))) & 0x0F | high << 4) as i8;
            }
        }
    } else {
        u.d = f16_at(block, 208);
        for (t, scale) in u.scales.iter_mut().enumerate() {
            *scale = block[192 + t] as i8 as i32;
        }
        for (v, value) in u.values.iter_mut().enumerate() {
            let (half, quarter, l) = (v / 128, v / 32 % 4, v % 32);
            let low = block[64 * half + 32 * (quarter % 2) + l] >> (4 * (quarter / 2)) & 0x0F;
            let high = (block[128 + 32 * half + l] >> (2 * quarter)) & 3;
            *value = (low | high << 4) as i8 - 32;
        }
    }
    u
}

/// Q3_K's and Q2_K's values and scales (`quant::q3_k`, `quant::q2_k`).
fn unpack_low_bits(format: BlockFormat, block: &[u8], u: &mut Unpacked) {
    if format == BlockFormat::Q3K {
        let (hmask, qs, scales) = (&block[0..32], &block[32..96], &block[96..108]);
        u.d = f16_at(block, 108);
        for (s, scale) in u.scales.iter_mut().enumerate() {
            *scale = q3_k_scale(s, scales) as i32;
        }
        u.values = q3_k_values(hmask, qs);
    } else {
        (u.d, u.dmin) = (f16_at(block, 80), f16_at(block, 82));
        for (s, &packed) in block[..16].iter().enumerate() {
            (u.scales[s], u.mins[s]) = ((packed & 0x0F) as i32, (packed >> 4) as i32);
        }
        for (value, &q) in u.values.iter_mut().zip(&q2_k_values(&block[16..80])) {
            *value = q as i8;
        }
    }
}

/// `dots[i] = x[first + i] · row` for one weight row of K-quant super-blocks:
/// the operations of a lane of the eight-row kernel, in its order.
pub(super) fn row_dots(
    format: BlockFormat,
    row: &[u8],
    x: &QuantizedX,
    rows: usize,
    k: usize,
    dots: &mut [f32; MAX_ROWS],
) {
    let blocks = k / BLOCK;
    let mut sums = [0.0f32; MAX_ROWS];
    for (s, block) in row.chunks_exact(format.block().1).enumerate() {
        let u = unpack(format, block);
        for c in 0..BLOCKS_PER_SUPER {
            let b = s * BLOCKS_PER_SUPER + c;
            let values = &u.values[c * BLOCK..][..BLOCK];
            for (i, sum) in sums[..rows].iter_mut().enumerate() {
                let xs = &x.quants[i * k + b * BLOCK..][..BLOCK];
                let half = |h: usize| -> i32 {
                    let pairs = values[16 * h..][..16].iter().zip(&xs[16 * h..][..16]);
                    pairs.map(|(&w, &x)| w as i32 * x as i32).sum()
                };
                let d_x = x.scales[i * blocks + b];
                if matches!(format, BlockFormat::Q4K | BlockFormat::Q5K) {
                    let total = u.scales[c] * (half(0) + half(1));
                    *sum = (total as f32).mul_add(u.d * d_x, *sum);
                    let scaled_sum = d_x * x.sums[i * blocks + b] as f32;
                    *sum = (-(u.dmin * u.mins[c] as f32)).mul_add(scaled_sum, *sum);
                } else {
                    let total = u.scales[2 * c] * half(0) + u.scales[2 * c + 1] * half(1);
                    *sum = (total as f32).mul_add(u.d * d_x, *sum);
                    if format == BlockFormat::Q2K {
                        let first = x.halves[i * blocks + b];
                        let second = x.sums[i * blocks + b] - first;
                        let mins = u.mins[2 * c] * first + u.mins[2 * c + 1] * second;
                        *sum = (-u.dmin).mul_add(d_x * mins as f32, *sum);
                    }
                }
            }
        }
    }
    dots[..rows].copy_from_slice(&sums[..rows]);
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86;
