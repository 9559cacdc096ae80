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
    /// 256 weights in 16 sub-blocks of 16, each with a 6-bit scale offset by 32 under
    /// one f16 scale; 3-bit values offset by 4: their third bits first (`hmask`, bit
    /// `v / 32` of byte `v % 32`), then their low two bits, then the packed scales.
    Q3K,
    /// 256 weights in 16 sub-blocks of 16, each with a 4-bit scale and a 4-bit minimum
    /// under two f16 super-scales; 2-bit values.
    Q2K,
    /// 32 weights: an f16 scale and 32 4-bit indices into `IQ4_VALUES` (a non-linear
    /// grid, denser near zero), low nibbles first as Q4_0's. llama.cpp stores a
    /// Q3_K's or Q2_K's matrices in it where their rows are not whole 256-value blocks.
    IQ4NL,
    /// 256 weights in 8 sub-blocks of 32, each with a 6-bit scale offset by 32 under
    /// one f16 scale; IQ4_NL's indices, 16 bytes per sub-block.
    IQ4XS,
    /// 32 weights: an f16 scale `d`, an f16 minimum `m` and 32 4-bit values, each
    /// `d·q + m`. Older files' format; llama.cpp's quantizer keeps it for some tensors.
    Q4_1,
    /// Q4_1 with 5-bit values, their fifth bits in a u32 as Q5_0's: llama.cpp's
    /// fallback for a Q5_K matrix whose rows are not whole 256-value blocks.
    Q5_1,
    /// 256 weights, 2.06 bits each: per 32, four 8-bit indices of 8-value lattice
    /// points, their signs (7 bits a point) and a 4-bit scale under one f16 (`grids`).
    IQ2XXS,
    /// IQ2_XXS with 9-bit indices and a 4-bit scale per 16 values.
    IQ2XS,
    /// 10-bit indices, 8 explicit sign bits a point, a 4-bit scale per 16 values.
    IQ2S,
    /// Per 32: eight 8-bit indices of 4-value points, signs (7 bits per 8 values)
    /// and a 4-bit scale.
    IQ3XXS,
    /// 9-bit indices of 4-value points, explicit signs, a 4-bit scale per 32.
    IQ3S,
    /// 1.56 bits: 11-bit indices of 8-value points of −1, 0, 1, shifted by ±1/8 per 32
    /// values, a 3-bit scale per 32.
    IQ1S,
    /// IQ1_S's points with the shift per 8 values and a 3-bit scale per 16, its f16
    /// scale spread over the top bits of the packed scales.
    IQ1M,
}

/// The 16 values IQ4_NL's and IQ4_XS's 4-bit indices name (ggml's `kvalues_iq4nl`).
pub const IQ4_VALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

impl BlockFormat {
    pub const ALL: [BlockFormat; 19] = [
        BlockFormat::Q8_0,
        BlockFormat::Q4_0,
        BlockFormat::Q5_0,
        BlockFormat::Q4K,
        BlockFormat::Q5K,
        BlockFormat::Q6K,
        BlockFormat::Q3K,
        BlockFormat::Q2K,
        BlockFormat::IQ4NL,
        BlockFormat::IQ4XS,
        BlockFormat::Q4_1,
        BlockFormat::Q5_1,
        BlockFormat::IQ2XXS,
        BlockFormat::IQ2XS,
        BlockFormat::IQ2S,
        BlockFormat::IQ3XXS,
        BlockFormat::IQ3S,
        BlockFormat::IQ1S,
        BlockFormat::IQ1M,
    ];

    /// ggml's name (`Q4_K`), as `GgmlType::name` has it.
    pub fn name(self) -> &'static str {
        match self {
            BlockFormat::Q8_0 => "Q8_0",
            BlockFormat::Q4_0 => "Q4_0",
            BlockFormat::Q5_0 => "Q5_0",
            BlockFormat::Q4K => "Q4_K",
            BlockFormat::Q5K => "Q5_K",
            BlockFormat::Q6K => "Q6_K",
            BlockFormat::Q3K => "Q3_K",
            BlockFormat::Q2K => "Q2_K",
            BlockFormat::IQ4NL => "IQ4_NL",
            BlockFormat::IQ4XS => "IQ4_XS",
            BlockFormat::Q4_1 => "Q4_1",
            BlockFormat::Q5_1 => "Q5_1",
            BlockFormat::IQ2XXS => "IQ2_XXS",
            BlockFormat::IQ2XS => "IQ2_XS",
            BlockFormat::IQ2S => "IQ2_S",
            BlockFormat::IQ3XXS => "IQ3_XXS",
            BlockFormat::IQ3S => "IQ3_S",
            BlockFormat::IQ1S => "IQ1_S",
            BlockFormat::IQ1M => "IQ1_M",
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
            BlockFormat::Q3K => (256, 110),
            BlockFormat::Q2K => (256, 84),
            BlockFormat::IQ4NL => (32, 18),
            BlockFormat::IQ4XS => (256, 136),
            BlockFormat::Q4_1 => (32, 20),
            BlockFormat::Q5_1 => (32, 24),
            BlockFormat::IQ2XXS => (256, 66),
            BlockFormat::IQ2XS => (256, 74),
            BlockFormat::IQ2S => (256, 82),
            BlockFormat::IQ3XXS => (256, 98),
            BlockFormat::IQ3S => (256, 110),
            BlockFormat::IQ1S => (256, 50),
            BlockFormat::IQ1M => (256, 56),
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
        BlockFormat::Q3K => q3_k(block, y),
        BlockFormat::Q2K => q2_k(block, y),
        BlockFormat::IQ4NL => iq4_nl(block, y),
        BlockFormat::IQ4XS => iq4_xs(block, y),
        BlockFormat::Q4_1 => q4_1(block, y),
        BlockFormat::Q5_1 => q5_1(block, y),
        _ => grids::dequantize_block(format, block, y),
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

#[inline(always)]
fn q4_1(block: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(block, 0), f16_at(block, 2));
    for (l, &q) in block[4..20].iter().enumerate() {
        y[l] = (q & 0x0F) as f32 * d + m;
        y[l + 16] = (q >> 4) as f32 * d + m;
    }
}

#[inline(always)]
fn q5_1(block: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(block, 0), f16_at(block, 2));
    let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
    for (j, &q) in block[8..24].iter().enumerate() {
        let low = (q & 0x0F) as u32 | ((qh >> j) << 4 & 0x10);
        let high = (q >> 4) as u32 | ((qh >> (j + 12)) & 0x10);
        y[j] = low as f32 * d + m;
        y[j + 16] = high as f32 * d + m;
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

/// Sub-block `s`'s 6-bit scale of a Q3_K block's 12 packed bytes, less its offset of 32:
/// the low four bits in byte `s` (s < 8) or the high nibble of byte `s − 8`, the high two
/// in byte `8 + s % 4` at bit `2 · (s / 4)`.
#[inline(always)]
pub(crate) fn q3_k_scale(s: usize, scales: &[u8]) -> i8 {
    let low = if s < 8 { scales[s] & 0x0F } else { scales[s - 8] >> 4 };
    let high = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
    (low | high << 4) as i8 - 32
}

/// A Q3_K block's 256 values as signed 3-bit integers, −4..=3: value v's low two
/// bits at bit `2 · (v % 128 / 32)` of byte `v / 128 · 32 + v % 32` of `qs`, its third
/// (set: no offset of 4) at bit `v / 32` of `hmask[v % 32]`. In llama.cpp's loop
/// order, 32 values at a time, so that the compiler vectorises it.
#[inline(always)]
pub(crate) fn q3_k_values(hmask: &[u8], qs: &[u8]) -> [i8; 256] {
    let mut values = [0i8; 256];
    for (c, out) in values.chunks_exact_mut(32).enumerate() {
        let (low_bits, shift) = (&qs[c / 4 * 32..][..32], 2 * (c % 4));
        for ((v, &low), &high) in out.iter_mut().zip(low_bits).zip(&hmask[..32]) {
            *v = ((low >> shift) & 3) as i8 - (((high >> c) & 1) ^ 1) as i8 * 4;
        }
    }
    values
}

/// A Q2_K block's 256 values, 0..=3, laid out as Q3_K's low bits.
#[inline(always)]
pub(crate) fn q2_k_values(qs: &[u8]) -> [u8; 256] {
    let mut values = [0u8; 256];
    for (c, out) in values.chunks_exact_mut(32).enumerate() {
        let (low_bits, shift) = (&qs[c / 4 * 32..][..32], 2 * (c % 4));
        for (v, &low) in out.iter_mut().zip(low_bits) {
            *v = (low >> shift) & 3;
        }
    }
    values
}

#[inline(always)]
fn q3_k(block: &[u8], y: &mut [f32]) {
    let values = q3_k_values(&block[0..32], &block[32..96]);
    let d = f16_at(block, 108);
    for (s, (out, q)) in y.chunks_exact_mut(16).zip(values.chunks_exact(16)).enumerate() {
        let scale = d * q3_k_scale(s, &block[96..108]) as f32;
        for (v, &q) in out.iter_mut().zip(q) {
            *v = scale * q as f32;
        }
    }
}

#[inline(always)]
fn q2_k(block: &[u8], y: &mut [f32]) {
    let values = q2_k_values(&block[16..80]);
    let (d, dmin) = (f16_at(block, 80), f16_at(block, 82));
    for (s, (out, q)) in y.chunks_exact_mut(16).zip(values.chunks_exact(16)).enumerate() {
        let (scale, min) = (d * (block[s] & 0x0F) as f32, dmin * (block[s] >> 4) as f32);
        for (v, &q) in out.iter_mut().zip(q) {
            *v = scale * q as f32 - min;
        }
    }
}

#[inline(always)]
fn iq4_nl(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    for (l, &q) in block[2..18].iter().enumerate() {
        y[l] = d * IQ4_VALUES[(q & 0x0F) as usize] as f32;
        y[l + 16] = d * IQ4_VALUES[(q >> 4) as usize] as f32;
    }
}

/// Sub-block `j`'s 6-bit scale of an IQ4_XS block, less its offset of 32: the low
/// four bits in nibble `j % 2` of byte `4 + j / 2`, the high two at bit `2·j` of the
/// u16 at bytes 2..4.
#[inline(always)]
pub(crate) fn iq4_xs_scale(block: &[u8], j: usize) -> i32 {
    let high = u16::from_le_bytes([block[2], block[3]]) >> (2 * j) & 3;
    let low = block[4 + j / 2] >> (4 * (j % 2)) & 0x0F;
    (low as i32 | (high as i32) << 4) - 32
}

#[inline(always)]
fn iq4_xs(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    for (j, out) in y.chunks_exact_mut(32).enumerate() {
        // Exact in f32: an 11-bit mantissa times a 6-bit integer.
        let scale = d * iq4_xs_scale(block, j) as f32;
        for (l, &q) in block[8 + 16 * j..][..16].iter().enumerate() {
            out[l] = scale * IQ4_VALUES[(q & 0x0F) as usize] as f32;
            out[l + 16] = scale * IQ4_VALUES[(q >> 4) as usize] as f32;
        }
    }
}

/// The first weight (index) of a block whose f16 scales are not finite: a NaN or
/// infinity there makes every weight of the block non-finite.
pub fn first_non_finite_block(format: BlockFormat, bytes: &[u8]) -> Option<usize> {
    let (weights, block_bytes) = format.block();
    bytes
        .chunks_exact(block_bytes)
        .position(|block| (0..scale_count(format)).any(|i| !scale(format, block, i).is_finite()))
        .map(|b| b * weights)
}

/// `count` blocks of pseudo-random bytes (`seed`) whose f16 scales are finite and
/// small (0.01): what tests, benchmarks and the profiler multiply by (random scale bits
/// would include infinities and NaNs).
pub fn sample_blocks(format: BlockFormat, count: usize, seed: u64) -> Vec<u8> {
    let (_, block_bytes) = format.block();
    let mut rng = crate::synth::SplitMix64::new(seed);
    let mut data: Vec<u8> = (0..count * block_bytes).map(|_| rng.next_u64() as u8).collect();
    for block in data.chunks_exact_mut(block_bytes) {
        for i in 0..scale_count(format) {
            set_scale(format, block, i, half::f16::from_f32(0.01));
        }
    }
    data
}

/// How many f16 scales a block of `format` has (ggml's block layouts).
pub fn scale_count(format: BlockFormat) -> usize {
    match format {
        BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q4_1 | BlockFormat::Q5_1 | BlockFormat::Q2K => 2,
        _ => 1,
    }
}

/// Where a block keeps its f16 scale `i`; `None` for IQ1_M, which spreads its one
/// scale over the top four bits of its four packed u16 scales.
fn scale_offset(format: BlockFormat, i: usize) -> Option<usize> {
    match format {
        BlockFormat::Q6K => Some(208),
        BlockFormat::Q3K => Some(108),
        BlockFormat::Q2K => Some(80 + 2 * i),
        BlockFormat::IQ1M => None,
        _ => Some(2 * i),
    }
}

/// A block's f16 scale `i` (`i < scale_count(format)`).
pub fn scale(format: BlockFormat, block: &[u8], i: usize) -> f32 {
    match scale_offset(format, i) {
        Some(at) => f16_at(block, at),
        None => grids::iq1_m_scale(block),
    }
}

/// Sets a block's f16 scale `i` to `value`, its other bits untouched.
pub fn set_scale(format: BlockFormat, block: &mut [u8], i: usize, value: half::f16) {
    match scale_offset(format, i) {
        Some(at) => block[at..at + 2].copy_from_slice(&value.to_le_bytes()),
        None => {
            let bits = value.to_bits();
            for t in 0..4 {
                let at = 48 + 2 * t + 1;
                block[at] = (block[at] & 0x0F) | ((bits >> (4 * t) & 0x0F) as u8) << 4;
            }
        }
    }
}

mod encode;
mod grid_encode;
pub(crate) mod grids;
pub use encode::quantize;
