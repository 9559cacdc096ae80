//! ggml's block-quantized weight formats, decoded to f32 exactly as llama.cpp does:
//! the same integer unpacking and the same float operations in the same order, so the
//! values are bit-identical to llama.cpp's (tested against the `gguf` package). These
//! are the reference the quantized matrix kernels (`quant_rows`) are checked against,
//! and the unpacking those kernels run.

/// A block-quantized format (`ferry_core::gguf::GgmlType` names them in files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// 32 weights: an f16 scale and 32 signed bytes.
    Q8_0,
    /// 32 weights: an f16 scale and 32 4-bit values offset by 8.
    Q4_0,
    /// 32 weights: an f16 scale, the 32 values' fifth bits in a u32, and their low
    /// nibbles; values offset by 16. llama.cpp stores a K-quant's matrices in it where
    /// their rows are not whole 256-value blocks (Qwen1.5-MoE's experts).
    Q5_0,
    /// 256 weights in 8 sub-blocks of 32, each with a 6-bit scale and minimum under
    /// two f16 super-scales; 4-bit values.
    Q4K,
    /// Q4_K's scales and minimums with 5-bit values: the fifth bits in 32 bytes
    /// (bit j of byte l is value l of sub-block j) before the nibbles.
    Q5K,
    /// 256 weights in 16 sub-blocks of 16 with signed 8-bit scales under one f16
    /// scale; 6-bit values offset by 32.
    Q6K,
}

impl BlockFormat {
    pub const ALL: [BlockFormat; 6] =
        [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q5_0, BlockFormat::Q4K, BlockFormat::Q5K, BlockFormat::Q6K];

    /// ggml's name (`Q4_K`), as `GgmlType::name` has it.
    pub fn name(self) -> &'static str {
        match self {
            BlockFormat::Q8_0 => "Q8_0",
            BlockFormat::Q4_0 => "Q4_0",
            BlockFormat::Q5_0 => "Q5_0",
            BlockFormat::Q4K => "Q4_K",
            BlockFormat::Q5K => "Q5_K",
            BlockFormat::Q6K => "Q6_K",
        }
    }

    /// Every format's name, "Q8_0, …, Q4_K and Q6_K" (lower case where `lower`), for
    /// messages that say what the engine runs.
    pub fn listed(lower: bool) -> String {
        let names: Vec<String> = BlockFormat::ALL
            .iter()
            .map(|f| if lower { f.name().to_ascii_lowercase() } else { f.name().into() })
            .collect();
        match names.split_last() {
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
            None => String::new(),
        }
    }

    /// The format of a ggml type name (`Q4_K`), if the engine decodes it.
    pub fn from_ggml(name: &str) -> Option<BlockFormat> {
        BlockFormat::ALL.into_iter().find(|f| f.name() == name)
    }

    /// (weights, bytes) per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            BlockFormat::Q8_0 => (32, 34),
            BlockFormat::Q4_0 => (32, 18),
            BlockFormat::Q5_0 => (32, 22),
            BlockFormat::Q4K => (256, 144),
            BlockFormat::Q5K => (256, 176),
            BlockFormat::Q6K => (256, 210),
        }
    }
}

#[inline(always)]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Decodes whole blocks of `format` into `out` (one f32 per weight). Panics if the
/// lengths are not whole blocks of each other: callers size both from the tensor's
/// shape, which the GGUF reader checked to be whole blocks.
pub fn dequantize(format: BlockFormat, bytes: &[u8], out: &mut [f32]) {
    let (weights, block_bytes) = format.block();
    assert!(
        bytes.len().is_multiple_of(block_bytes) && out.len() == bytes.len() / block_bytes * weights,
        "dequantize {}: {} bytes into {} values",
        format.name(),
        bytes.len(),
        out.len()
    );
    for (block, y) in bytes.chunks_exact(block_bytes).zip(out.chunks_exact_mut(weights)) {
        dequantize_block(format, block, y);
    }
}

/// Decodes one block (`format.block()` bytes) into its weights. Inlined so that a
/// caller compiled for a wider instruction set vectorises the unpacking too.
#[inline(always)]
pub(crate) fn dequantize_block(format: BlockFormat, block: &[u8], y: &mut [f32]) {
    match format {
        BlockFormat::Q8_0 => q8_0(block, y),
        BlockFormat::Q4_0 => q4_0(block, y),
        BlockFormat::Q5_0 => q5_0(block, y),
        BlockFormat::Q4K => q4_k(block, y),
        BlockFormat::Q5K => q5_k(block, y),
        BlockFormat::Q6K => q6_k(block, y),
    }
}

#[inline(always)]
fn q8_0(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    for (v, &q) in y.iter_mut().zip(&block[2..34]) {
        *v = d * (q as i8) as f32;
    }
}

#[inline(always)]
fn q4_0(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    let qs = &block[2..18];
    for (l, &q) in qs.iter().enumerate() {
        // Low nibbles are weights 0..16, high nibbles 16..32.
        y[l] = d * ((q & 0x0F) as i32 - 8) as f32;
        y[l + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// The fifth bits of a Q5_0 block: bit j of the little-endian u32 at bytes 2..6 is
/// weight j's.
#[inline(always)]
pub(crate) fn q5_0_high_bits(block: &[u8]) -> u32 {
    u32::from_le_bytes([block[2], block[3], block[4], block[5]])
}

#[inline(always)]
fn q5_0(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    let qh = q5_0_high_bits(block);
    for (j, &q) in block[6..22].iter().enumerate() {
        // As `q4_0`, with each value's fifth bit from `qh`.
        let low = (q & 0x0F) as u32 | ((qh >> j) << 4 & 0x10);
        let high = (q >> 4) as u32 | ((qh >> (j + 12)) & 0x10);
        y[j] = d * (low as i32 - 16) as f32;
        y[j + 16] = d * (high as i32 - 16) as f32;
    }
}

/// The 6-bit scale and minimum of sub-block `j` of a K-quant's 12 packed bytes.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    }
}

#[inline(always)]
fn q4_k(block: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
    let scales = &block[4..16];
    let qs = &block[16..144];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        for (half, shift) in [(0, 0), (1, 4)] {
            let (sc, m) = scale_min_k4(2 * chunk + half, scales);
            let (scale, min) = (d * sc as f32, dmin * m as f32);
            let out = &mut y[chunk * 64 + half * 32..chunk * 64 + half * 32 + 32];
            for (v, &byte) in out.iter_mut().zip(q) {
                *v = scale * ((byte >> shift) & 0x0F) as f32 - min;
            }
        }
    }
}

#[inline(always)]
fn q5_k(block: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
    let (scales, qh, qs) = (&block[4..16], &block[16..48], &block[48..176]);
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        for (half, shift) in [(0, 0), (1, 4)] {
            let j = 2 * chunk + half;
            let (sc, m) = scale_min_k4(j, scales);
            let (scale, min) = (d * sc as f32, dmin * m as f32);
            let out = &mut y[j * 32..j * 32 + 32];
            for ((v, &byte), &high) in out.iter_mut().zip(q).zip(qh) {
                let value = ((byte >> shift) & 0x0F) | ((high >> j) & 1) << 4;
                *v = scale * value as f32 - min;
            }
        }
    }
}

#[inline(always)]
fn q6_k(block: &[u8], y: &mut [f32]) {
    let (ql_all, qh_all, sc_all) = (&block[0..128], &block[128..192], &block[192..208]);
    let d = f16_at(block, 208);
    for half in 0..2 {
        let (ql, qh, sc) = (&ql_all[half * 64..][..64], &qh_all[half * 32..][..32], &sc_all[half * 8..][..8]);
        let y = &mut y[half * 128..][..128];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0x0F) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, &value) in q.iter().enumerate() {
                let scale = d * (sc[is + 2 * k] as i8) as f32;
                y[l + 32 * k] = scale * (value as i32 - 32) as f32;
            }
        }
    }
}

/// The first weight (index) of a block whose f16 scales are not finite: a NaN or
/// infinity there makes every weight of the block non-finite.
pub fn first_non_finite_block(format: BlockFormat, bytes: &[u8]) -> Option<usize> {
    let (weights, block_bytes) = format.block();
    let scales = scale_offsets(format);
    bytes
        .chunks_exact(block_bytes)
        .position(|block| scales.iter().any(|&at| !f16_at(block, at).is_finite()))
        .map(|b| b * weights)
}

/// `count` blocks of pseudo-random bytes (`seed`) whose f16 scales are finite and
/// small (0.01): what tests, benchmarks and the profiler multiply by (random scale bits
/// would include infinities and NaNs).
pub fn sample_blocks(format: BlockFormat, count: usize, seed: u64) -> Vec<u8> {
    let (_, block_bytes) = format.block();
    let mut rng = crate::synth::SplitMix64::new(seed);
    let mut data: Vec<u8> = (0..count * block_bytes).map(|_| rng.next_u64() as u8).collect();
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    for block in data.chunks_exact_mut(block_bytes) {
        for &at in scale_offsets(format) {
            block[at..at + 2].copy_from_slice(&scale);
        }
    }
    data
}

/// Where each format keeps its f16 scales (ggml's block layouts).
pub fn scale_offsets(format: BlockFormat) -> &'static [usize] {
    match format {
        BlockFormat::Q8_0 | BlockFormat::Q4_0 | BlockFormat::Q5_0 => &[0],
        BlockFormat::Q4K | BlockFormat::Q5K => &[0, 2],
        BlockFormat::Q6K => &[208],
    }
}

/// Encodes `values` (whole blocks) in `format`, appending to `out`. Q8_0, Q4_0 and
/// Q5_0 follow llama.cpp's reference quantizers (`quantize_row_q8_0_ref`,
/// `quantize_row_q4_0_ref`, `quantize_row_q5_0_ref`) operation for operation, so their bytes equal llama.cpp's
/// (tested against the `gguf` package). Q4_K, Q5_K and Q6_K use a plain min/max fit per
/// sub-block, not llama.cpp's iterative search for the scales: valid blocks any
/// reader decodes, with somewhat larger rounding error than llama.cpp's own files.
pub fn quantize(format: BlockFormat, values: &[f32], out: &mut Vec<u8>) {
    let (weights, block_bytes) = format.block();
    assert!(values.len().is_multiple_of(weights), "quantize {}: {} values", format.name(), values.len());
    for x in values.chunks_exact(weights) {
        let at = out.len();
        out.resize(at + block_bytes, 0);
        let block = &mut out[at..];
        match format {
            BlockFormat::Q8_0 => quantize_q8_0(x, block),
            BlockFormat::Q4_0 => quantize_q4_0(x, block),
            BlockFormat::Q5_0 => quantize_q5_0(x, block),
            BlockFormat::Q4K => quantize_q4_k(x, block),
            BlockFormat::Q5K => quantize_q5_k(x, block),
            BlockFormat::Q6K => quantize_q6_k(x, block),
        }
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

#[cfg(test)]
mod tests {
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
                BlockFormat::Q8_0 => (32, 254.0),
                BlockFormat::Q4_0 => (32, 15.0),
                BlockFormat::Q5_0 => (32, 31.0),
                BlockFormat::Q4K => (32, 15.0),
                BlockFormat::Q5K => (32, 31.0),
                BlockFormat::Q6K => (16, 62.0),
            };
            for (g, (xs, ys)) in x.chunks(group).zip(y.chunks(group)).enumerate() {
                let range = xs.iter().fold(0.0f32, |a, v| a.max(v.abs())) * 2.0;
                // Scales are stored in 6 to 16 bits: allow one step plus their rounding.
                let step = range / levels;
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
