//! Encoders for each block format: llama.cpp's reference quantizers where Ferry follows
//! them bit for bit (Q8_0, Q4_0, Q5_0, Q4_1, Q5_1), plain min/max fits for the K-quants, a scale
//! from the extreme value or a least-squares fit for IQ4_NL and IQ4_XS. Synth and
//! the tests write files with them; the engine only decodes.

use super::{BlockFormat, IQ4_VALUES};

/// Encodes `values` (whole blocks) in `format`, appending to `out`. Q8_0, Q4_0, Q5_0,
/// Q4_1 and Q5_1 follow llama.cpp's reference quantizers (`quantize_row_q8_0_ref`,
/// `quantize_row_q4_0_ref`, …) operation for operation, so their bytes equal llama.cpp's
/// (tested against the `gguf` package). The K-quants use a plain min/max fit per
/// sub-block, not llama.cpp's iterative search for the scales: valid blocks any
/// reader decodes, with somewhat larger rounding error than llama.cpp's own files.
pub fn quantize(format: BlockFormat, values: &[f32], out: &mut Vec<u8>) {
    use rayon::prelude::*;
    let (weights, block_bytes) = format.block();
    assert!(values.len().is_multiple_of(weights), "quantize {}: {} values", format.name(), values.len());
    let at = out.len();
    out.resize(at + values.len() / weights * block_bytes, 0);
    // Blocks are independent: runs of them on every core (the lattice formats' search
    // takes about a microsecond a block).
    const RUN: usize = 64;
    out[at..].par_chunks_mut(RUN * block_bytes).zip(values.par_chunks(RUN * weights)).for_each(|(blocks, x)| {
        for (block, x) in blocks.chunks_exact_mut(block_bytes).zip(x.chunks_exact(weights)) {
            quantize_block(format, x, block);
        }
    });
}

/// One block of `format` from its values, into `block` (zeroed).
fn quantize_block(format: BlockFormat, x: &[f32], block: &mut [u8]) {
    match format {
        BlockFormat::Q8_0 => quantize_q8_0(x, block),
        BlockFormat::Q4_0 => quantize_q4_0(x, block),
        BlockFormat::Q5_0 => quantize_q5_0(x, block),
        BlockFormat::Q4K => quantize_q4_k(x, block),
        BlockFormat::Q5K => quantize_q5_k(x, block),
        BlockFormat::Q6K => quantize_q6_k(x, block),
        BlockFormat::Q3K => quantize_q3_k(x, block),
        BlockFormat::Q2K => quantize_q2_k(x, block),
        BlockFormat::IQ4NL => quantize_iq4_nl(x, block),
        BlockFormat::IQ4XS => quantize_iq4_xs(x, block),
        BlockFormat::Q4_1 => quantize_q4_1(x, block),
        BlockFormat::Q5_1 => quantize_q5_1(x, block),
        _ => super::grid_encode::quantize_block(format, x, block),
    }
}

fn put_f16(block: &mut [u8], at: usize, value: f32) {
    block[at..at + 2].copy_from_slice(&half::f16::from_f32(value).to_le_bytes());
}

fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

fn quantize_q8_0(x: &[f32], block: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    put_f16(block, 0, d);
    for (q, v) in block[2..34].iter_mut().zip(x) {
        *q = (v * id).round() as i8 as u8;
    }
}

/// The value of largest magnitude, with its sign (the first on ties).
fn signed_max(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn quantize_q4_0(x: &[f32], block: &mut [u8]) {
    let d = signed_max(x) / -8.0;
    let id = inverse(d);
    put_f16(block, 0, d);
    for j in 0..16 {
        let low = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let high = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        block[2 + j] = low | (high << 4);
    }
}

fn quantize_q5_0(x: &[f32], block: &mut [u8]) {
    let d = signed_max(x) / -16.0;
    let id = inverse(d);
    put_f16(block, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let low = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let high = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        block[6 + j] = (low & 0x0F) | ((high & 0x0F) << 4);
        qh |= (((low & 0x10) >> 4) as u32) << j;
        qh |= (((high & 0x10) >> 4) as u32) << (j + 16);
    }
    block[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// The index of `IQ4_VALUES`' nearest value to `x / d` for each of 32 values, as
/// IQ4_NL and IQ4_XS pack them (16 bytes: low nibbles the first 16, high the last).
fn iq4_pack(x: &[f32], d: f32, packed: &mut [u8]) {
    let id = inverse(d);
    let nearest = |v: f32| -> u8 {
        let target = v * id;
        let distance = |i: usize| (IQ4_VALUES[i] as f32 - target).abs();
        (0..16).min_by(|&a, &b| distance(a).total_cmp(&distance(b))).unwrap_or(8) as u8
    };
    for j in 0..16 {
        packed[j] = nearest(x[j]) | nearest(x[j + 16]) << 4;
    }
}

/// 32 values' scale for `IQ4_VALUES`: the value of largest magnitude on the grid's
/// end (−127), or the least-squares scale for the indices that gives, whichever
/// leaves the smaller squared error (llama.cpp searches more scales, weighted).
fn iq4_scale(x: &[f32]) -> f32 {
    let first = signed_max(x) / IQ4_VALUES[0] as f32;
    if first == 0.0 {
        return 0.0;
    }
    let values = |d: f32| -> Vec<f32> {
        let mut packed = [0u8; 16];
        iq4_pack(x, d, &mut packed);
        (0..32).map(|l| IQ4_VALUES[(packed[l % 16] >> (4 * (l / 16)) & 0x0F) as usize] as f32).collect()
    };
    let error = |d: f32, q: &[f32]| -> f32 { q.iter().zip(x).map(|(q, v)| (d * q - v).powi(2)).sum() };
    let q = values(first);
    let squares: f32 = q.iter().map(|q| q * q).sum();
    let fitted = q.iter().zip(x).map(|(q, v)| q * v).sum::<f32>() / squares;
    if fitted.is_finite() && error(fitted, &values(fitted)) < error(first, &q) {
        fitted
    } else {
        first
    }
}

fn quantize_iq4_nl(x: &[f32], block: &mut [u8]) {
    put_f16(block, 0, iq4_scale(x));
    let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
    iq4_pack(x, d, &mut block[2..18]);
}

/// Each sub-block's own scale (`iq4_scale`) as a 6-bit multiple of one f16 scale,
/// the largest in magnitude on −32; the values then packed at the scale stored.
fn quantize_iq4_xs(x: &[f32], block: &mut [u8]) {
    let scales: Vec<f32> = x.chunks_exact(32).map(iq4_scale).collect();
    put_f16(block, 0, signed_max(&scales) / -32.0);
    let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
    let id = inverse(d);
    let mut high = 0u16;
    for (j, (&scale, x)) in scales.iter().zip(x.chunks_exact(32)).enumerate() {
        let l = (scale * id).round().clamp(-32.0, 31.0) as i32;
        let ls = (l + 32) as u8;
        block[4 + j / 2] |= (ls & 0x0F) << (4 * (j % 2));
        high |= ((ls >> 4) as u16) << (2 * j);
        iq4_pack(x, d * l as f32, &mut block[8 + 16 * j..][..16]);
    }
    block[2..4].copy_from_slice(&high.to_le_bytes());
}

/// A block's minimum and step for `levels` steps, stored (as llama.cpp's
/// `quantize_row_q4_1_ref` and `quantize_row_q5_1_ref` compute them), and the
/// inverse step the values are scaled by.
fn min_and_step(x: &[f32], levels: f32, block: &mut [u8]) -> (f32, f32) {
    let (min, max) =
        x.iter().fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (if v < lo { v } else { lo }, if v > hi { v } else { hi }));
    let d = (max - min) / levels;
    put_f16(block, 0, d);
    put_f16(block, 2, min);
    (min, inverse(d))
}

fn quantize_q4_1(x: &[f32], block: &mut [u8]) {
    let (min, id) = min_and_step(x, 15.0, block);
    for j in 0..16 {
        let low = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let high = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        block[4 + j] = low | (high << 4);
    }
}

fn quantize_q5_1(x: &[f32], block: &mut [u8]) {
    let (min, id) = min_and_step(x, 31.0, block);
    let mut qh = 0u32;
    for j in 0..16 {
        let low = ((x[j] - min) * id + 0.5) as u8;
        let high = ((x[j + 16] - min) * id + 0.5) as u8;
        block[8 + j] = (low & 0x0F) | ((high & 0x0F) << 4);
        qh |= (((low & 0x10) >> 4) as u32) << j;
        qh |= (((high & 0x10) >> 4) as u32) << (j + 16);
    }
    block[4..8].copy_from_slice(&qh.to_le_bytes());
}

/// Rounds `value / step` to an integer in `0..=max` (0 where the step is 0).
fn level(value: f32, step: f32, max: u8) -> u8 {
    if step == 0.0 {
        0
    } else {
        (value / step).round().clamp(0.0, max as f32) as u8
    }
}

/// The fewest whole `step`s that reach `value`, at most `max`.
fn steps_up(value: f32, step: f32, max: u8) -> u8 {
    if step == 0.0 {
        0
    } else {
        (value / step).ceil().clamp(0.0, max as f32) as u8
    }
}

/// `step` as stored (f16), rounded up so that `max` steps still cover what they must.
fn stored_step(step: f32) -> f32 {
    let stored = half::f16::from_f32(step);
    if stored.to_f32() < step {
        half::f16::from_bits(stored.to_bits() + 1).to_f32()
    } else {
        stored.to_f32()
    }
}

fn quantize_q4_k(x: &[f32], block: &mut [u8]) {
    let q = k_scales_and_mins(x, 15, block);
    for chunk in 0..4 {
        for l in 0..32 {
            block[16 + chunk * 32 + l] = q[2 * chunk][l] | (q[2 * chunk + 1][l] << 4);
        }
    }
}

fn quantize_q5_k(x: &[f32], block: &mut [u8]) {
    let q = k_scales_and_mins(x, 31, block);
    for l in 0..32 {
        block[16 + l] = (0..8).fold(0u8, |bits, j| bits | (q[j][l] >> 4) << j);
    }
    for chunk in 0..4 {
        for l in 0..32 {
            block[48 + chunk * 32 + l] = (q[2 * chunk][l] & 0x0F) | ((q[2 * chunk + 1][l] & 0x0F) << 4);
        }
    }
}

/// Q4_K's and Q5_K's scales and minimums for the super-block `x`, written to `block`
/// (`d`, `dmin` and the 12 packed bytes), and each sub-block's values in `0..=max`.
fn k_scales_and_mins(x: &[f32], max: u8, block: &mut [u8]) -> [[u8; 32]; 8] {
    // Each sub-block of 32: value ≈ scale·q − min with q in 0..=max and min ≥ 0. The
    // 6-bit multiples of the super-scales are rounded up, never down, so that every
    // sub-block's range stays covered (rounding down would clip its extremes).
    let lows: Vec<f32> = x.chunks_exact(32).map(|s| s.iter().fold(0.0f32, |a, &v| a.min(v))).collect();
    let highs: Vec<f32> = x.chunks_exact(32).map(|s| s.iter().fold(0.0f32, |a, &v| a.max(v))).collect();
    let dmin = stored_step(lows.iter().fold(0.0f32, |a, &l| a.max(-l)) / 63.0);
    put_f16(block, 2, dmin);
    let m: Vec<u8> = lows.iter().map(|&l| steps_up(-l, dmin, 63)).collect();
    let scales: Vec<f32> = highs.iter().zip(&m).map(|(&h, &m)| (h + dmin * m as f32) / max as f32).collect();
    let d = stored_step(scales.iter().fold(0.0f32, |a, &s| a.max(s)) / 63.0);
    put_f16(block, 0, d);
    let sc: Vec<u8> = scales.iter().map(|&s| steps_up(s, d, 63)).collect();
    // Packed as `scale_min_k4` unpacks them.
    let packed = &mut block[4..16];
    for j in 0..4 {
        packed[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        packed[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        packed[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
    }
    std::array::from_fn(|j| std::array::from_fn(|l| level(x[j * 32 + l] + dmin * m[j] as f32, d * sc[j] as f32, max)))
}

fn quantize_q6_k(x: &[f32], block: &mut [u8]) {
    // Each sub-block of 16: value ≈ scale·(q − 32) with q in 0..=63, scale signed.
    let mut scales = [0.0f32; 16];
    for (s, sub) in x.chunks_exact(16).enumerate() {
        scales[s] = sub.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 31.0;
    }
    let d = stored_step(scales.iter().fold(0.0f32, |a, &s| a.max(s)) / 127.0);
    put_f16(block, 208, d);
    let sc: Vec<i8> = scales.iter().map(|&s| steps_up(s, d, 127) as i8).collect();
    for (s, &scale) in sc.iter().enumerate() {
        block[192 + s] = scale as u8;
    }
    let q = |p: usize| {
        let step = d * sc[p / 16] as f32;
        if step == 0.0 {
            32
        } else {
            ((x[p] / step).round() + 32.0).clamp(0.0, 63.0) as u8
        }
    };
    // Packed as `q6_k` unpacks them: per half of 128, low nibbles in `ql`, high bits in `qh`.
    for half in 0..2 {
        let base = half * 128;
        for l in 0..32 {
            let (a, b, c, e) = (q(base + l), q(base + l + 32), q(base + l + 64), q(base + l + 96));
            block[half * 64 + l] = (a & 0x0F) | ((c & 0x0F) << 4);
            block[half * 64 + l + 32] = (b & 0x0F) | ((e & 0x0F) << 4);
            block[128 + half * 32 + l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
}

/// Where value `v` of a 256-value super-block sits in Q3_K's and Q2_K's 64 bytes of
/// 2-bit values: (byte, shift), as `quant::q2_k_values` reads it.
fn two_bit_place(v: usize) -> (usize, usize) {
    (v / 128 * 32 + v % 32, 2 * (v % 128 / 32))
}

fn quantize_q3_k(x: &[f32], block: &mut [u8]) {
    // Each sub-block of 16: value ≈ scale·q with q in −4..=3 and the scale signed, so
    // that the value of largest magnitude lands on −4 (as Q4_0 puts its on −8).
    let scales: Vec<f32> = x.chunks_exact(16).map(|s| signed_max(s) / -4.0).collect();
    let d = stored_step(scales.iter().fold(0.0f32, |a, s| a.max(s.abs())) / 31.0);
    put_f16(block, 108, d);
    // Magnitudes rounded up as in `k_scales_and_mins`, at most 31 either way.
    let sc: Vec<i8> = scales.iter().map(|&s| steps_up(s.abs(), d, 31) as i8 * if s < 0.0 { -1 } else { 1 }).collect();
    let packed = &mut block[96..108];
    packed.fill(0);
    for (s, &scale) in sc.iter().enumerate() {
        let stored = (scale + 32) as u8;
        if s < 8 {
            packed[s] |= stored & 0x0F;
        } else {
            packed[s - 8] |= (stored & 0x0F) << 4;
        }
        packed[8 + s % 4] |= (stored >> 4) << (2 * (s / 4));
    }
    block[..96].fill(0);
    for (v, &value) in x.iter().enumerate() {
        let step = d * sc[v / 16] as f32;
        let q = if step == 0.0 { 0 } else { (value / step).round().clamp(-4.0, 3.0) as i8 };
        let stored = (q + 4) as u8;
        let (byte, shift) = two_bit_place(v);
        block[32 + byte] |= (stored & 3) << shift;
        block[v % 32] |= (stored >> 2) << (v / 32);
    }
}

fn quantize_q2_k(x: &[f32], block: &mut [u8]) {
    // Each sub-block of 16: value ≈ scale·q − min with q in 0..=3 and min ≥ 0, the
    // 4-bit multiples of the super-scales rounded up (see `k_scales_and_mins`).
    let lows: Vec<f32> = x.chunks_exact(16).map(|s| s.iter().fold(0.0f32, |a, &v| a.min(v))).collect();
    let highs: Vec<f32> = x.chunks_exact(16).map(|s| s.iter().fold(0.0f32, |a, &v| a.max(v))).collect();
    let dmin = stored_step(lows.iter().fold(0.0f32, |a, &l| a.max(-l)) / 15.0);
    put_f16(block, 82, dmin);
    let m: Vec<u8> = lows.iter().map(|&l| steps_up(-l, dmin, 15)).collect();
    let scales: Vec<f32> = highs.iter().zip(&m).map(|(&h, &m)| (h + dmin * m as f32) / 3.0).collect();
    let d = stored_step(scales.iter().fold(0.0f32, |a, &s| a.max(s)) / 15.0);
    put_f16(block, 80, d);
    let sc: Vec<u8> = scales.iter().map(|&s| steps_up(s, d, 15)).collect();
    for s in 0..16 {
        block[s] = sc[s] | m[s] << 4;
    }
    block[16..80].fill(0);
    for (v, &value) in x.iter().enumerate() {
        let q = level(value + dmin * m[v / 16] as f32, d * sc[v / 16] as f32, 3);
        let (byte, shift) = two_bit_place(v);
        block[16 + byte] |= q << shift;
    }
}

#[cfg(test)]
mod tests {
    use super::super::dequantize;
    use super::*;

    /// Values of a transformer weight's size, signed, with one outlier per 64.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2654435761) >> 8;
                let v = (h % 2001) as f32 / 1000.0 - 1.0;
                if i % 64 == 7 {
                    v * 4.0
                } else {
                    v * 0.05
                }
            })
            .collect()
    }

    /// Quantized then decoded, every value is within one step (the spacing of levels
    /// its sub-block can represent) of the original, and most within half a step.
    #[test]
    fn round_trips_stay_within_each_formats_step() {
        for format in BlockFormat::ALL {
            let x = values(4 * 256, 3);
            let mut bytes = Vec::new();
            quantize(format, &x, &mut bytes);
            assert_eq!(bytes.len(), x.len() / format.block().0 * format.block().1);
            let mut y = vec![0.0f32; x.len()];
            dequantize(format, &bytes, &mut y);
            let (group, levels) = match format {
                // A lattice holds few of the tuples of levels: no step bounds every value
                // (`grid_encode`'s tests bound the error as a whole).
                f if super::super::grids::is_grid(f) => continue,
                BlockFormat::Q8_0 => (32, 254.0),
                BlockFormat::Q4_0 => (32, 15.0),
                BlockFormat::Q5_0 => (32, 31.0),
                BlockFormat::Q4K => (32, 15.0),
                BlockFormat::Q5K => (32, 31.0),
                BlockFormat::Q6K => (16, 62.0),
                BlockFormat::Q3K => (16, 7.0),
                BlockFormat::Q2K => (16, 3.0),
                // The grid's widest gap, 24 of 127 (113 − 89), as the step.
                BlockFormat::IQ4NL | BlockFormat::IQ4XS => (32, 2.0 * 127.0 / 24.0),
                // The range is max − min, at most twice the largest magnitude.
                BlockFormat::Q4_1 => (32, 15.0),
                BlockFormat::Q5_1 => (32, 31.0),
                _ => unreachable!(),
            };
            // Q3_K's 6-bit and Q2_K's 4-bit sub-block scales are whole multiples of the
            // super-block's `d`, rounded up: a sub-block's step may exceed its own by up
            // to one `d`, at most the super-block's largest scale over 31 (15).
            let scale_levels = match format {
                BlockFormat::Q3K => Some(4.0 * 31.0),
                BlockFormat::Q2K => Some(3.0 * 15.0 / 2.07),
                // IQ4_XS's 6-bit sub-block scales are whole multiples of `d`, the largest
                // sub-block scale over 32, rounded to the nearest: a value moves by up
                // to half a `d` times 127, a 64th of the super-block's largest.
                BlockFormat::IQ4XS => Some(64.0),
                _ => None,
            };
            for (g, (xs, ys)) in x.chunks(group).zip(y.chunks(group)).enumerate() {
                let range = xs.iter().fold(0.0f32, |a, v| a.max(v.abs())) * 2.0;
                let super_block = &x[g * group / 256 * 256..][..256];
                let d = scale_levels.map_or(0.0, |l| super_block.iter().fold(0.0f32, |a, v| a.max(v.abs())) / l);
                // Scales are stored in 4 to 16 bits: allow one step plus their rounding.
                let step = range / levels + d;
                for (a, b) in xs.iter().zip(ys) {
                    assert!(
                        (a - b).abs() <= step * 1.05 + 1e-6,
                        "{} group {g}: {a} → {b} (step {step})",
                        format.name()
                    );
                }
            }
        }
    }

    #[test]
    fn zero_blocks_quantize_to_zero() {
        for format in BlockFormat::ALL {
            let x = vec![0.0f32; 256];
            let mut bytes = Vec::new();
            quantize(format, &x, &mut bytes);
            let mut y = vec![1.0f32; 256];
            dequantize(format, &bytes, &mut y);
            assert!(y.iter().all(|&v| v == 0.0), "{}", format.name());
        }
    }
}
