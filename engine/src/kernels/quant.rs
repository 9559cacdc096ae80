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
    /// 256 weights in 8 sub-blocks of 32, each with a 6-bit scale and minimum under
    /// two f16 super-scales; 4-bit values.
    Q4K,
    /// 256 weights in 16 sub-blocks of 16 with signed 8-bit scales under one f16
    /// scale; 6-bit values offset by 32.
    Q6K,
}

impl BlockFormat {
    pub const ALL: [BlockFormat; 4] = [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4K, BlockFormat::Q6K];

    /// ggml's name (`Q4_K`), as `GgmlType::name` has it.
    pub fn name(self) -> &'static str {
        match self {
            BlockFormat::Q8_0 => "Q8_0",
            BlockFormat::Q4_0 => "Q4_0",
            BlockFormat::Q4K => "Q4_K",
            BlockFormat::Q6K => "Q6_K",
        }
    }

    /// (weights, bytes) per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            BlockFormat::Q8_0 => (32, 34),
            BlockFormat::Q4_0 => (32, 18),
            BlockFormat::Q4K => (256, 144),
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
        BlockFormat::Q4K => q4_k(block, y),
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

/// The 6-bit scale and minimum of sub-block `j` of a K-quant's 12 packed bytes.
#[inline(always)]
fn scale_min_k4(j: usize, scales: &[u8]) -> (u8, u8) {
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
