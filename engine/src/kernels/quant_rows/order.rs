//! The order of a block-quantized matrix's blocks in memory. Files store row after
//! row; the x86 kernels multiply eight weight rows at a time, block by block, so in
//! row order they read eight streams a row apart (on two threads, sixteen), which
//! the hardware prefetcher does not keep ahead of. Interleaved by eights, the same
//! bytes are one stream: block b of rows 8g … 8g + 7 side by side, then block b + 1
//! (as llama.cpp repacks Q4_0 and Q4_K for its CPU kernels), for the 32-value formats
//! with the eight rows' scales first. The K-quants go further (`KGroup`): the eight
//! rows' super-blocks b are also transposed by 4-byte groups, so that one 32-byte load
//! holds four values of each of the eight rows and the kernels' byte sums land in
//! lane r for row r with nothing to reduce across lanes. One row of x multiplied Q8_0 weights from RAM
//! 1.75× as fast so, Q4_0 1.55× (BENCHMARKS.md, "Weights in the order the kernels
//! read them").
//!
//! A group of eight rows occupies the same bytes in both orders, and rows past the
//! last whole group stay in row order: a range of whole groups is the same bytes
//! either way, and so is every row count's size.

use rayon::prelude::*;

use super::QuantMatrix;
use crate::kernels::quant::BlockFormat;
use crate::kernels::{in_pool, SimdPath};

/// Weight rows a group of the interleaved order holds (the x86 kernels' row count).
pub const GROUP_ROWS: usize = 8;

/// How a block-quantized matrix lays out its blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BlockOrder {
    /// Row after row, as files store them.
    #[default]
    Rows,
    /// Every whole group of eight rows with its blocks interleaved: block b of the
    /// group's eight rows side by side, then block b + 1; the rows past the last whole
    /// group in row order.
    EightRows,
}

/// Whether `path` has the kernels that multiply eight weight rows at once (in
/// either order): the products with 8-bit x on x86.
pub(super) fn has_eight_row_kernels(path: SimdPath) -> bool {
    cfg!(target_arch = "x86_64") && matches!(path, SimdPath::Avx2 | SimdPath::Avx512)
}

/// The order for block-quantized weights kept in memory for the products with 8-bit
/// x on this CPU: `EightRows` where it has the eight-row kernels, unless
/// `FERRY_BLOCK_ORDER=rows` declines it (to compare the two side by side).
pub fn resident_order() -> BlockOrder {
    static ORDER: std::sync::OnceLock<BlockOrder> = std::sync::OnceLock::new();
    *ORDER.get_or_init(|| {
        let declined = std::env::var("FERRY_BLOCK_ORDER").is_ok_and(|v| v == "rows");
        match crate::kernels::simd_path() {
            Some(path) if has_eight_row_kernels(path) && !declined => BlockOrder::EightRows,
            _ => BlockOrder::Rows,
        }
    })
}

/// Where the blocks of eight weight rows lie: block b (a K-quant's super-block b) of
/// row r at `r · row + b · block` bytes from the group's start — with `scales_first`,
/// the bytes after its f16 scale there, the eight rows' scales side by side at the
/// start of the eight blocks (`scales_first`). With `transposed` (K-quants
/// interleaved), the eight super-blocks b fill `block` bytes as `KGroup` lays them
/// out, and `row` says nothing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strides {
    pub row: usize,
    pub block: usize,
    pub scales_first: bool,
    pub transposed: bool,
}

/// Whether `format`'s interleaved blocks put the eight rows' scales side by side ahead
/// of their values: the 32-value formats, whose one f16 scale leads each block. The
/// kernel then loads them as one vector where it gathered eight 2-byte loads, a sixth
/// of one row of Q4_0's time (BENCHMARKS.md, "Weights in the order the kernels read
/// them"). A K-quant's super-block keeps its bytes together.
pub(crate) fn scales_first(format: BlockFormat) -> bool {
    matches!(format, BlockFormat::Q8_0 | BlockFormat::Q4_0 | BlockFormat::Q5_0 | BlockFormat::IQ4NL)
}

/// Bytes of the f16 scale that leads a 32-value block.
pub(crate) const SCALE_BYTES: usize = 2;

impl Strides {
    /// The strides of a group of `format` rows of `row_bytes` in `order`.
    pub(crate) fn of(order: BlockOrder, format: BlockFormat, row_bytes: usize) -> Strides {
        let block_bytes = format.block().1;
        let group = GROUP_ROWS * block_bytes;
        match order {
            BlockOrder::Rows => Strides { row: row_bytes, block: block_bytes, scales_first: false, transposed: false },
            BlockOrder::EightRows if format == BlockFormat::IQ4XS => {
                Strides { row: IQ4_XS_VALUES, block: group, scales_first: true, transposed: false }
            }
            BlockOrder::EightRows if scales_first(format) => {
                Strides { row: block_bytes - SCALE_BYTES, block: group, scales_first: true, transposed: false }
            }
            BlockOrder::EightRows => {
                let transposed = KGroup::of(format).is_some();
                Strides { row: block_bytes, block: group, scales_first: false, transposed }
            }
        }
    }

    /// Whether the group's blocks come interleaved (one stream to read).
    pub(crate) fn interleaved(self) -> bool {
        self.block > self.row
    }
}

/// Interleaves every whole group of eight rows of `bytes` (`rows` rows of `format`,
/// `cols` wide, in row order) in place: `BlockOrder::Rows` to `EightRows`.
pub fn interleave(format: BlockFormat, rows: usize, cols: usize, bytes: &mut [u8]) {
    reorder(format, rows, cols, bytes, true)
}

/// The inverse of `interleave`: `EightRows` back to `Rows`, in place.
fn deinterleave(format: BlockFormat, rows: usize, cols: usize, bytes: &mut [u8]) {
    reorder(format, rows, cols, bytes, false)
}

fn reorder(format: BlockFormat, rows: usize, cols: usize, bytes: &mut [u8], to_eight: bool) {
    let (weights, block_bytes) = format.block();
    let row_bytes = cols / weights * block_bytes;
    let group_bytes = GROUP_ROWS * row_bytes;
    assert!(bytes.len() >= rows * row_bytes, "{}: {} bytes do not hold {rows} rows", format.name(), bytes.len());
    let blocks = row_bytes / block_bytes;
    let eights = Strides::of(BlockOrder::EightRows, format, row_bytes);
    // Row r's block as runs of pieces: the scale and the rest apart where the scales
    // come first, `KGroup`'s runs for the K-quants, the whole block otherwise.
    let runs: Vec<Vec<Run>> = (0..GROUP_ROWS)
        .map(|r| match KGroup::of(format) {
            Some(layout) => layout.runs(r),
            None if format == BlockFormat::IQ4XS => iq4_xs_runs(r),
            None if eights.scales_first => {
                let rest = GROUP_ROWS * SCALE_BYTES + r * eights.row;
                vec![Run::one(0, r * SCALE_BYTES, SCALE_BYTES), Run::one(SCALE_BYTES, rest, eights.row)]
            }
            None => vec![Run::one(0, r * eights.row, block_bytes)],
        })
        .collect();
    // Groups on every compute thread: a K-quant's small pieces took 0.5 s of loading
    // a 640 MiB model on one.
    let whole_groups = bytes[..rows / GROUP_ROWS * group_bytes].par_chunks_exact_mut(group_bytes);
    let each = |copy: &mut Vec<u8>, group: &mut [u8]| {
        copy.copy_from_slice(group);
        for (r, runs) in runs.iter().enumerate() {
            for b in 0..blocks {
                let (in_rows, in_eights) = (r * row_bytes + b * block_bytes, b * eights.block);
                for run in runs {
                    let (in_rows, in_eights) = ((in_rows + run.within, run.len), (in_eights + run.at, run.at_step));
                    let (to, from) = if to_eight { (in_eights, in_rows) } else { (in_rows, in_eights) };
                    // Pieces of 1, 2 and 4 bytes as moves of that size, not calls to
                    // `memmove`.
                    match run.len {
                        1 => move_run::<1>(group, to, copy, from, run.count),
                        2 => move_run::<2>(group, to, copy, from, run.count),
                        4 => move_run::<4>(group, to, copy, from, run.count),
                        len => {
                            let ((to, _), (from, _)) = (to, from);
                            group[to..to + len].copy_from_slice(&copy[from..from + len]);
                        }
                    }
                }
            }
        }
    };
    in_pool(|| whole_groups.for_each_init(|| vec![0u8; group_bytes], each));
}

/// `count` pieces of `len` bytes of a row's block: piece i at `within + i·len` in the
/// block and at `at + i·at_step` in the eight rows' blocks.
#[derive(Clone, Copy, Debug)]
struct Run {
    within: usize,
    at: usize,
    len: usize,
    count: usize,
    at_step: usize,
}

impl Run {
    fn one(within: usize, at: usize, len: usize) -> Run {
        Run { within, at, len, count: 1, at_step: len }
    }
}

/// Bytes of an IQ4_XS super-block's indices (after its 8-byte header).
pub(crate) const IQ4_XS_VALUES: usize = 128;

/// Row r's IQ4_XS super-block among the eight rows' interleaved ones: the eight f16
/// scales side by side (16 bytes), the eight u32s of 4-bit sub-block scales (32), the
/// eight u16s of their high bits (16), then each row's 128 index bytes. The 64 bytes
/// of headers then load as three vectors where the eight rows' scattered headers took
/// 24 loads (`q8::x86::iq4::headers`).
fn iq4_xs_runs(r: usize) -> Vec<Run> {
    vec![
        Run::one(0, 2 * r, 2),
        Run::one(4, 16 + 4 * r, 4),
        Run::one(2, 48 + 2 * r, 2),
        Run::one(8, GROUP_ROWS * 8 + r * IQ4_XS_VALUES, IQ4_XS_VALUES),
    ]
}

/// `count` moves of `LEN` bytes from `src` to `dst`, each side `(start, step)`.
#[inline(always)]
fn move_run<const LEN: usize>(dst: &mut [u8], to: (usize, usize), src: &[u8], from: (usize, usize), count: usize) {
    for i in 0..count {
        let (to, from) = (to.0 + i * to.1, from.0 + i * from.1);
        dst[to..to + LEN].copy_from_slice(&src[from..from + LEN]);
    }
}

/// How the eight rows' super-blocks b of a K-quant lie when interleaved: every f16
/// scale of the eight side by side, the sub-block scales by column, and the values
/// transposed by 4-byte groups — group G of the eight rows' values (bytes 4G … 4G + 3
/// of each) as 32 bytes, row r's four at 4r. A 32-byte load then holds four values of
/// every row, a byte product sums them into lane r, and the kernels reduce nothing
/// across lanes (`q8::k_quants::x86::transposed`). The same bytes as the eight
/// super-blocks, moved:
///
/// - Q4_K (8 × 144): `d` of rows 0–7 (16 bytes), `dmin` (16), the 12 packed scale
///   bytes as three 32-byte vectors whose byte 8j + r is row r's byte j, 4 + j and
///   8 + j (j < 4; so that the 6-bit scales unpack for all eight rows at once), then
///   the 128 value bytes in 32 groups (1 024).
/// - Q6_K (8 × 210): `d` (16), the 16 signed scales by column, byte 8t + r row r's
///   scale t (128), then per half of 128 values (768 each) its 8 groups of `ql`'s
///   first chunk (low nibbles: quarter 0, high: 2), 8 of `qh`, 8 of `ql`'s second
///   chunk (quarters 1 and 3): a block reads 512 bytes in a row (quarter 0 and 2 the
///   first, 1 and 3 the last), as the hardware prefetcher follows best. (`qh` after
///   all of `ql`, as the rows store them, ran 0.6× as fast from memory.)
/// - Q3_K (8 × 110): `d` (16), the 12 packed scale bytes as Q4_K's three vectors (96),
///   `hmask`'s 8 groups (256), then the 2-bit values' 16 groups (512).
/// - Q2_K (8 × 84): `d` (16), `dmin` (16), the 16 scale-and-minimum bytes by column,
///   byte 8t + r row r's byte t (128), then the 2-bit values' 16 groups (512).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KGroup {
    Q4K,
    Q5K,
    Q6K,
    Q3K,
    Q2K,
}

/// Row r's 12 packed scale bytes (Q4_K's, Q3_K's) from `within` in its super-block to
/// three vectors from `at` in the eight rows': bytes 4v … 4v + 3 to vector v, byte 4v + j
/// at 8j + r, so that the eight rows' scales unpack four columns at a time.
fn scale_vectors(within: usize, at: usize, r: usize) -> impl Iterator<Item = Run> {
    (0..3).map(move |v| Run { within: within + 4 * v, at: at + 32 * v + r, len: 1, count: 4, at_step: 8 })
}

impl KGroup {
    pub(crate) fn of(format: BlockFormat) -> Option<KGroup> {
        match format {
            BlockFormat::Q4K => Some(KGroup::Q4K),
            BlockFormat::Q5K => Some(KGroup::Q5K),
            BlockFormat::Q6K => Some(KGroup::Q6K),
            BlockFormat::Q3K => Some(KGroup::Q3K),
            BlockFormat::Q2K => Some(KGroup::Q2K),
            _ => None,
        }
    }

    /// Q4_K: where the values' groups start; the three vectors of scale bytes
    /// before them start at `Q4K_SCALES`.
    pub(crate) const Q4K_VALUES: usize = 128;
    pub(crate) const Q4K_SCALES: usize = 32;
    /// Q5_K: Q4_K's heads and scales, then the fifth bits' 8 groups, then the values'.
    pub(crate) const Q5K_BITS: usize = 128;
    pub(crate) const Q5K_VALUES: usize = 384;
    /// Q6_K: the scales by column; half h's groups at `Q6K_VALUES + h · Q6K_HALF`,
    /// `ql`'s first chunk's, then `qh`'s at `Q6K_QH`, the second chunk's at `Q6K_QL_1`.
    pub(crate) const Q6K_SCALES: usize = 16;
    pub(crate) const Q6K_VALUES: usize = 144;
    pub(crate) const Q6K_HALF: usize = 768;
    pub(crate) const Q6K_QH: usize = 256;
    pub(crate) const Q6K_QL_1: usize = 512;
    /// Q3_K: the three vectors of scale bytes, `hmask`'s groups, the values' groups.
    pub(crate) const Q3K_SCALES: usize = 16;
    pub(crate) const Q3K_HMASK: usize = 112;
    pub(crate) const Q3K_VALUES: usize = 368;
    /// Q2_K: the scale bytes by column, then the values' groups.
    pub(crate) const Q2K_SCALES: usize = 32;
    pub(crate) const Q2K_VALUES: usize = 160;

    /// Row r's super-block as runs of pieces.
    fn runs(self, r: usize) -> Vec<Run> {
        // `count` groups of four value bytes from `within` on, to `at` on in the eight's.
        let groups =
            |within: usize, at: usize, count: usize| Run { within, at: at + 4 * r, len: 4, count, at_step: 32 };
        match self {
            KGroup::Q4K | KGroup::Q5K => {
                let scales = scale_vectors(4, Self::Q4K_SCALES, r);
                let heads = [Run::one(0, 2 * r, 2), Run::one(2, 16 + 2 * r, 2)];
                let values = match self {
                    KGroup::Q4K => vec![groups(16, Self::Q4K_VALUES, 32)],
                    _ => vec![groups(16, Self::Q5K_BITS, 8), groups(48, Self::Q5K_VALUES, 32)],
                };
                heads.into_iter().chain(scales).chain(values).collect()
            }
            KGroup::Q6K => {
                let scales = Run { within: 192, at: Self::Q6K_SCALES + r, len: 1, count: 16, at_step: 8 };
                let values = (0..2).flat_map(|h| {
                    let at = Self::Q6K_VALUES + h * Self::Q6K_HALF;
                    [
                        groups(64 * h, at, 8),
                        groups(64 * h + 32, at + Self::Q6K_QL_1, 8),
                        groups(128 + 32 * h, at + Self::Q6K_QH, 8),
                    ]
                });
                [Run::one(208, 2 * r, 2), scales].into_iter().chain(values).collect()
            }
            KGroup::Q3K => {
                let scales = scale_vectors(96, Self::Q3K_SCALES, r);
                let head = Run::one(108, 2 * r, 2);
                let bits = [groups(0, Self::Q3K_HMASK, 8), groups(32, Self::Q3K_VALUES, 16)];
                [head].into_iter().chain(scales).chain(bits).collect()
            }
            KGroup::Q2K => {
                let scales = Run { within: 0, at: Self::Q2K_SCALES + r, len: 1, count: 16, at_step: 8 };
                let heads = [Run::one(80, 2 * r, 2), Run::one(82, 16 + 2 * r, 2)];
                heads.into_iter().chain([scales, groups(16, Self::Q2K_VALUES, 16)]).collect()
            }
        }
    }

    /// Row r's super-block as (offset in it, offset in the eight rows', length) pieces.
    #[cfg(test)]
    fn pieces(self, r: usize) -> Vec<(usize, usize, usize)> {
        let runs = self.runs(r).into_iter();
        runs.flat_map(|run| (0..run.count).map(move |i| (run.within + i * run.len, run.at + i * run.at_step, run.len)))
            .collect()
    }
}

impl QuantMatrix<'_> {
    /// The matrix's bytes in row order: borrowed where they are, copied and
    /// deinterleaved where they are not (for the paths without eight-row kernels).
    pub(super) fn in_row_order(&self) -> std::borrow::Cow<'_, [u8]> {
        let bytes = &self.bytes[..self.rows * self.row_bytes()];
        match self.order {
            BlockOrder::Rows => std::borrow::Cow::Borrowed(bytes),
            BlockOrder::EightRows => {
                let mut copy = bytes.to_vec();
                deinterleave(self.format, self.rows, self.cols, &mut copy);
                std::borrow::Cow::Owned(copy)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quant::sample_blocks;

    #[test]
    fn interleaving_moves_whole_blocks_and_comes_back() {
        for format in BlockFormat::ALL {
            let (weights, block_bytes) = format.block();
            // 19 rows: two whole groups and three rows left in row order.
            let (rows, cols) = (19, 2 * weights);
            let original = sample_blocks(format, rows * 2, 3);
            let mut bytes = original.clone();
            interleave(format, rows, cols, &mut bytes);
            let row_bytes = 2 * block_bytes;
            // Block 1 of row 10 (group 1, row 2 in it) sits after group 1's block 0 and
            // the first two rows' block 1; where the scales come first, its scale after
            // theirs and its values after the eight scales and two rows' values.
            let (group, from) = (GROUP_ROWS * row_bytes, 10 * row_bytes + block_bytes);
            let block_1 = group + GROUP_ROWS * block_bytes;
            let pieces = if KGroup::of(format).is_some() {
                vec![] // moved byte by byte: `k_quant_groups_are_transposed_by_four_bytes`
            } else if format == BlockFormat::IQ4XS {
                // The eight headers' scales, low and high sub-block scales, then indices.
                let values = block_1 + 64 + 2 * IQ4_XS_VALUES;
                vec![
                    (block_1 + 4, 0, 2),
                    (block_1 + 16 + 8, 4, 4),
                    (block_1 + 48 + 4, 2, 2),
                    (values, 8, IQ4_XS_VALUES),
                ]
            } else if scales_first(format) {
                let rest = block_bytes - SCALE_BYTES;
                vec![(block_1 + 2 * SCALE_BYTES, 0, SCALE_BYTES), (block_1 + 16 + 2 * rest, SCALE_BYTES, rest)]
            } else {
                vec![(block_1 + 2 * block_bytes, 0, block_bytes)]
            };
            for (at, within, len) in pieces {
                assert_eq!(bytes[at..at + len], original[from + within..from + within + len], "{}", format.name());
            }
            assert_eq!(bytes[16 * row_bytes..], original[16 * row_bytes..], "{}: the tail moved", format.name());
            assert_ne!(bytes, original, "{}: nothing moved", format.name());
            deinterleave(format, rows, cols, &mut bytes);
            assert_eq!(bytes, original, "{}", format.name());
        }
    }

    #[test]
    fn k_quant_groups_are_transposed_by_four_bytes() {
        let layouts = [
            (BlockFormat::Q4K, KGroup::Q4K),
            (BlockFormat::Q5K, KGroup::Q5K),
            (BlockFormat::Q6K, KGroup::Q6K),
            (BlockFormat::Q3K, KGroup::Q3K),
            (BlockFormat::Q2K, KGroup::Q2K),
        ];
        for (format, layout) in layouts {
            let block_bytes = format.block().1;
            // Every byte of the eight super-blocks lands once, inside the eight's bytes.
            let mut landed = vec![0u8; GROUP_ROWS * block_bytes];
            for r in 0..GROUP_ROWS {
                let mut covered = vec![0u8; block_bytes];
                for (within, at, len) in layout.pieces(r) {
                    covered[within..within + len].iter_mut().for_each(|c| *c += 1);
                    landed[at..at + len].iter_mut().for_each(|c| *c += 1);
                }
                assert!(covered.iter().all(|&c| c == 1), "{}: row {r}'s bytes", format.name());
            }
            assert!(landed.iter().all(|&c| c == 1), "{}: the eight rows' bytes", format.name());
        }
        // Two groups of eight rows of two super-blocks: row 11 is row 3 of group 1.
        let (rows, cols) = (16, 512);
        for format in [BlockFormat::Q4K, BlockFormat::Q5K, BlockFormat::Q6K] {
            let block_bytes = format.block().1;
            let original = sample_blocks(format, rows * 2, 5);
            let mut bytes = original.clone();
            interleave(format, rows, cols, &mut bytes);
            let row_11_block_1 = 11 * 2 * block_bytes + block_bytes;
            let eights_block_1 = GROUP_ROWS * 2 * block_bytes + GROUP_ROWS * block_bytes;
            let byte = |within: usize| original[row_11_block_1 + within];
            // (offset in row 11's super-block 1, where the eight rows' super-blocks 1 hold it)
            let places: Vec<(usize, usize)> = if format == BlockFormat::Q4K {
                vec![(0, 6), (3, 16 + 7), (4 + 9, 32 + 64 + 8 + 3), (16 + 4 * 5 + 2, 128 + 32 * 5 + 12 + 2)]
            } else if format == BlockFormat::Q5K {
                // Fifth-bit byte 21 (group 5), value byte 22 (group 5).
                vec![
                    (0, 6),
                    (4 + 9, 32 + 64 + 8 + 3),
                    (16 + 21, 128 + 32 * 5 + 12 + 1),
                    (48 + 22, 384 + 32 * 5 + 12 + 2),
                ]
            } else {
                // ql byte 125: half 1, second chunk, group 7; qh byte 36: half 1, group 1.
                let half_1 = 144 + 768;
                vec![
                    (209, 7),
                    (192 + 7, 16 + 56 + 3),
                    (125, half_1 + 512 + 32 * 7 + 13),
                    (128 + 36, half_1 + 256 + 32 + 12),
                ]
            };
            for (within, at) in places {
                assert_eq!(bytes[eights_block_1 + at], byte(within), "{}: byte {within}", format.name());
            }
        }
    }
}
