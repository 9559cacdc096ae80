//! ggml's lattice formats (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M):
//! each group of 8 (IQ2, IQ1) or 4 (IQ3) values is one point of a fixed lattice
//! (`grid_tables`), named by an index of 8 to 11 bits, with the signs apart (IQ2, IQ3)
//! or a shift of ±1/8 (IQ1). A 256-value block has one f16 scale and small integer
//! scales per sub-block of 32 or 16 values.
//!
//! Every value is `scale · integer` with both exact: the integer is the lattice value
//! with its sign (IQ2, IQ3) or `8·g ± 1` (IQ1, whose `g ± 1/8` is that over 8), and the
//! scale an f16 times a small odd integer (and a power of two), exact in f32. So a
//! sub-block decodes to 32 signed bytes and one or two f32 scales (`SubBlock`), the
//! f32 values llama.cpp computes are their products bit for bit, and the products
//! with 8-bit x are integer sums, as for the other formats.

use super::BlockFormat;

mod tables {
    include!("grid_tables.rs");
}

/// Values per sub-block: the products' unit, one block of 8-bit x.
pub(crate) const SUB: usize = 32;

/// One hex digit's value (the `gguf` package's packing: digits and lower-case letters).
const fn hex_digit(c: u8) -> u8 {
    (if c > 0x40 { c + 9 } else { c }) & 0x0F
}

/// `N` points of `values` values (8 or 4), each value's level as a byte (point p's
/// value v in byte v of `points[p]`), unpacked from `hex`: bytes of `8 / slot` values
/// of `bits` bits each, the first value lowest.
const fn unpack<const N: usize>(hex: &str, bits: u32, levels: &[i8], values: usize) -> [u64; N] {
    let hex = hex.as_bytes();
    let per_byte = if bits == 2 { 4 } else { 2 };
    let slot = 8 / per_byte;
    let mut points = [0u64; N];
    let mut i = 0;
    while i < N * values {
        let at = 2 * (i / per_byte);
        let byte = hex_digit(hex[at]) << 4 | hex_digit(hex[at + 1]);
        let level = (byte >> ((i % per_byte) * slot)) & ((1 << bits) - 1);
        points[i / values] |= (levels[level as usize] as u8 as u64) << (8 * (i % values));
        i += 1;
    }
    points
}

const IQ2_LEVELS: [i8; 3] = [8, 25, 43];
const IQ1_LEVELS: [i8; 3] = [-1, 0, 1];

/// IQ2_XXS's 256 points of 8 values (8, 25 or 43 each).
pub(crate) static IQ2_XXS_GRID: [u64; 256] = unpack(tables::IQ2_XXS_HEX, 2, &IQ2_LEVELS, 8);
/// IQ2_XS's 512 points.
pub(crate) static IQ2_XS_GRID: [u64; 512] = unpack(tables::IQ2_XS_HEX, 2, &IQ2_LEVELS, 8);
/// IQ2_S's 1024 points.
pub(crate) static IQ2_S_GRID: [u64; 1024] = unpack(tables::IQ2_S_HEX, 2, &IQ2_LEVELS, 8);
/// IQ3_XXS's 256 points of 4 values (4, 12, …, 52, 62), in the low four bytes.
pub(crate) static IQ3_XXS_GRID: [u64; 256] = unpack(tables::IQ3_XXS_HEX, 3, &[4, 12, 20, 28, 36, 44, 52, 62], 4);
/// IQ3_S's 512 points of 4 values (1, 3, …, 15).
pub(crate) static IQ3_S_GRID: [u64; 512] = unpack(tables::IQ3_S_HEX, 3, &[1, 3, 5, 7, 9, 11, 13, 15], 4);
/// IQ1_S's and IQ1_M's 2048 points of 8 values (−1, 0 or 1, as signed bytes).
pub(crate) static IQ1_GRID: [u64; 2048] = unpack(tables::IQ1_S_HEX, 2, &IQ1_LEVELS, 8);

/// The 8 signs a 7-bit index names (IQ2_XXS, IQ2_XS, IQ3_XXS): bit k set for a
/// negative value k; the eighth sign makes the count of negatives even.
#[inline(always)]
pub(crate) fn seven_bit_signs(index: u32) -> u8 {
    let index = (index & 0x7F) as u8;
    index | (((index.count_ones() & 1) as u8) << 7)
}

/// A sub-block of 32 values: `values[v] · scales[v / 16]` is value v (both scales
/// equal where the format has one per 32).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SubBlock {
    pub values: [i8; SUB],
    pub scales: [f32; 2],
}

/// Whether `format` scales each half of a sub-block on its own (IQ2_XS, IQ2_S, IQ1_M).
pub(crate) fn scales_halves(format: BlockFormat) -> bool {
    matches!(format, BlockFormat::IQ2XS | BlockFormat::IQ2S | BlockFormat::IQ1M)
}

/// The lattice formats, in `BlockFormat::ALL`'s order (the x86 kernels' copies index it).
pub(crate) const LATTICE: [BlockFormat; 7] = [
    BlockFormat::IQ2XXS,
    BlockFormat::IQ2XS,
    BlockFormat::IQ2S,
    BlockFormat::IQ3XXS,
    BlockFormat::IQ3S,
    BlockFormat::IQ1S,
    BlockFormat::IQ1M,
];

/// Whether `format` is one of the lattice formats this module decodes.
pub(crate) fn is_grid(format: BlockFormat) -> bool {
    LATTICE.contains(&format)
}

#[inline(always)]
fn f16_at(block: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

#[inline(always)]
fn u16_at(block: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([block[at], block[at + 1]])
}

#[inline(always)]
fn u32_at(block: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]])
}

/// Eight lattice values with the signs of `signs` (bit k: value k negative) into `out`.
#[inline(always)]
fn signed_eight(point: u64, signs: u8, out: &mut [i8]) {
    for (k, v) in out[..8].iter_mut().enumerate() {
        let value = (point >> (8 * k)) as u8 as i8;
        *v = if signs >> k & 1 == 1 { -value } else { value };
    }
}

/// IQ1's eight values `g` as `8·g + shift` (shift ±1).
#[inline(always)]
fn shifted_eight(point: u64, shift: i8, out: &mut [i8]) {
    for (k, v) in out[..8].iter_mut().enumerate() {
        *v = 8 * ((point >> (8 * k)) as u8 as i8) + shift;
    }
}

/// The f16 scale of an IQ1_M block, kept in the top four bits of its four u16 scales.
#[inline(always)]
pub(crate) fn iq1_m_scale(block: &[u8]) -> f32 {
    let bits = (0..4).fold(0u16, |bits, t| bits | (u16_at(block, 48 + 2 * t) >> 12) << (4 * t));
    half::f16::from_bits(bits).to_f32()
}

/// Sub-block `j` (values 32·j … 32·j + 31) of a block of a lattice `format`.
#[inline(always)]
pub(crate) fn sub_block(format: BlockFormat, block: &[u8], j: usize) -> SubBlock {
    let mut values = [0i8; SUB];
    let scales = match format {
        BlockFormat::IQ2XXS => {
            let (indices, aux) = (u32_at(block, 2 + 8 * j), u32_at(block, 6 + 8 * j));
            for l in 0..4 {
                let point = IQ2_XXS_GRID[(indices >> (8 * l) & 0xFF) as usize];
                signed_eight(point, seven_bit_signs(aux >> (7 * l)), &mut values[8 * l..]);
            }
            let d = f16_at(block, 0) * (0.5 + (aux >> 28) as f32) * 0.25;
            [d, d]
        }
        BlockFormat::IQ2XS => {
            for l in 0..4 {
                let q = u16_at(block, 2 + 8 * j + 2 * l) as u32;
                signed_eight(IQ2_XS_GRID[(q & 511) as usize], seven_bit_signs(q >> 9), &mut values[8 * l..]);
            }
            halves_scales(f16_at(block, 0), block[66 + j])
        }
        BlockFormat::IQ2S => {
            let high = block[66 + j] as usize;
            for l in 0..4 {
                let index = block[2 + 4 * j + l] as usize | (high >> (2 * l) & 3) << 8;
                signed_eight(IQ2_S_GRID[index], block[34 + 4 * j + l], &mut values[8 * l..]);
            }
            halves_scales(f16_at(block, 0), block[74 + j])
        }
        BlockFormat::IQ3XXS => {
            let aux = u32_at(block, 66 + 4 * j);
            for l in 0..4 {
                let pair = IQ3_XXS_GRID[block[2 + 8 * j + 2 * l] as usize]
                    | IQ3_XXS_GRID[block[3 + 8 * j + 2 * l] as usize] << 32;
                signed_eight(pair, seven_bit_signs(aux >> (7 * l)), &mut values[8 * l..]);
            }
            let d = f16_at(block, 0) * (0.5 + (aux >> 28) as f32) * 0.5;
            [d, d]
        }
        BlockFormat::IQ3S => {
            let high = block[66 + j] as usize;
            for l in 0..4 {
                let point = |i: usize| IQ3_S_GRID[block[2 + 8 * j + i] as usize | (high >> i & 1) << 8];
                signed_eight(point(2 * l) | point(2 * l + 1) << 32, block[74 + 4 * j + l], &mut values[8 * l..]);
            }
            let d = f16_at(block, 0) * (1 + 2 * (block[106 + j / 2] >> (4 * (j % 2)) & 0x0F) as u32) as f32;
            [d, d]
        }
        BlockFormat::IQ1S => {
            let qh = u16_at(block, 34 + 2 * j) as usize;
            let shift = if qh & 0x8000 == 0 { 1 } else { -1 };
            for l in 0..4 {
                let index = block[2 + 4 * j + l] as usize | (qh >> (3 * l) & 7) << 8;
                shifted_eight(IQ1_GRID[index], shift, &mut values[8 * l..]);
            }
            // (g ± 1/8) · d·(2s + 1) is (8g ± 1) · that over 8: exact either way.
            let d = f16_at(block, 0) * (2 * (qh >> 12 & 7) + 1) as f32 * 0.125;
            [d, d]
        }
        BlockFormat::IQ1M => {
            for l in 0..4 {
                let high = (block[32 + 2 * j + l / 2] >> (4 * (l % 2))) as usize;
                let shift = if high & 8 == 0 { 1 } else { -1 };
                let index = block[4 * j + l] as usize | (high & 7) << 8;
                shifted_eight(IQ1_GRID[index], shift, &mut values[8 * l..]);
            }
            let (d, packed) = (iq1_m_scale(block), u16_at(block, 48 + 2 * (j / 2)) >> (6 * (j % 2)));
            let half = |h: u16| d * (2 * (packed >> (3 * h) & 7) + 1) as f32 * 0.125;
            [half(0), half(1)]
        }
        _ => unreachable!("{} is not a lattice format", format.name()),
    };
    SubBlock { values, scales }
}

/// IQ2_XS's and IQ2_S's scales of a sub-block's two halves: the low and high nibble
/// of its byte, each `d · (0.5 + s) · 0.25`.
#[inline(always)]
fn halves_scales(d: f32, byte: u8) -> [f32; 2] {
    [d * (0.5 + (byte & 0x0F) as f32) * 0.25, d * (0.5 + (byte >> 4) as f32) * 0.25]
}

/// Decodes a block of a lattice format into its 256 values.
#[inline(always)]
pub(crate) fn dequantize_block(format: BlockFormat, block: &[u8], y: &mut [f32]) {
    for (j, out) in y.chunks_exact_mut(SUB).enumerate() {
        let sub = sub_block(format, block, j);
        for (v, (out, &q)) in out.iter_mut().zip(&sub.values).enumerate() {
            *out = sub.scales[v / 16] * q as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every point of every lattice equals the `gguf` package's (`init_grid`), read
    /// from Python: the tables are the formats' definition.
    #[test]
    fn the_lattices_are_the_gguf_packages() {
        let script = "import sys\nimport gguf.quants as q\nfor name in sys.argv[1:]:\n\
                      \x20   t = getattr(q, name)\n    t.init_grid()\n\
                      \x20   print(' '.join(str(int(v)) for v in t.grid.flatten()))\n";
        let names = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S"];
        let run = std::process::Command::new("python3").args(["-c", script]).args(names).output();
        let run = run.expect("python3 runs");
        assert!(run.status.success(), "the gguf package (pip install gguf): {}", String::from_utf8_lossy(&run.stderr));
        let ours: [(&[u64], usize); 6] = [
            (&IQ2_XXS_GRID, 8),
            (&IQ2_XS_GRID, 8),
            (&IQ2_S_GRID, 8),
            (&IQ3_XXS_GRID, 4),
            (&IQ3_S_GRID, 4),
            (&IQ1_GRID, 8),
        ];
        let text = String::from_utf8_lossy(&run.stdout);
        for ((line, (grid, width)), name) in text.lines().zip(ours).zip(names) {
            let theirs: Vec<i64> = line.split(' ').map(|v| v.parse().expect("an integer")).collect();
            let mine: Vec<i64> =
                grid.iter().flat_map(|&p| (0..width).map(move |k| (p >> (8 * k)) as u8 as i8 as i64)).collect();
            assert_eq!(mine, theirs, "{name}");
        }
        assert_eq!(text.lines().count(), names.len());
    }
}
