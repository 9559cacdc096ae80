//! The order of a block-quantized matrix's blocks in memory. Files store row after
//! row; the x86 kernels multiply eight weight rows at a time, block by block, so in
//! row order they read eight streams a row apart (on two threads, sixteen), which
//! the hardware prefetcher does not keep ahead of. Interleaved by eights, the same
//! bytes are one stream: block b of rows 8g … 8g + 7 side by side, then block b + 1
//! (as llama.cpp repacks Q4_0 and Q4_K for its CPU kernels), for the 32-value formats
//! with the eight rows' scales first. One row of x multiplied Q8_0 weights from RAM
//! 1.75× as fast so, Q4_0 1.55× (BENCHMARKS.md, "Weights in the order the kernels
//! read them").
//!
//! A group of eight rows occupies the same bytes in both orders, and rows past the
//! last whole group stay in row order: a range of whole groups is the same bytes
//! either way, and so is every row count's size.

use super::QuantMatrix;
use crate::kernels::quant::BlockFormat;
use crate::kernels::SimdPath;

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
/// start of the eight blocks (`scales_first`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strides {
    pub row: usize,
    pub block: usize,
    pub scales_first: bool,
}

/// Whether `format`'s interleaved blocks put the eight rows' scales side by side ahead
/// of their values: the 32-value formats, whose one f16 scale leads each block. The
/// kernel then loads them as one vector where it gathered eight 2-byte loads, a sixth
/// of one row of Q4_0's time (BENCHMARKS.md, "Weights in the order the kernels read
/// them"). A K-quant's super-block keeps its bytes together.
pub(crate) fn scales_first(format: BlockFormat) -> bool {
    matches!(format, BlockFormat::Q8_0 | BlockFormat::Q4_0 | BlockFormat::Q5_0)
}

/// Bytes of the f16 scale that leads a 32-value block.
pub(crate) const SCALE_BYTES: usize = 2;

impl Strides {
    /// The strides of a group of `format` rows of `row_bytes` in `order`.
    pub(crate) fn of(order: BlockOrder, format: BlockFormat, row_bytes: usize) -> Strides {
        let block_bytes = format.block().1;
        match order {
            BlockOrder::Rows => Strides { row: row_bytes, block: block_bytes, scales_first: false },
            BlockOrder::EightRows if scales_first(format) => {
                Strides { row: block_bytes - SCALE_BYTES, block: GROUP_ROWS * block_bytes, scales_first: true }
            }
            BlockOrder::EightRows => Strides { row: block_bytes, block: GROUP_ROWS * block_bytes, scales_first: false },
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
    let mut copy = vec![0u8; group_bytes];
    let blocks = row_bytes / block_bytes;
    let eights = Strides::of(BlockOrder::EightRows, format, row_bytes);
    // Each block as (offset, length) pieces in row order and interleaved: the scale
    // and the rest apart where the scales come first, the whole block otherwise.
    let pieces = |r: usize, b: usize| -> [(usize, usize, usize); 2] {
        let in_rows = r * row_bytes + b * block_bytes;
        if eights.scales_first {
            let scale = b * eights.block + r * SCALE_BYTES;
            let rest = b * eights.block + GROUP_ROWS * SCALE_BYTES + r * eights.row;
            [(in_rows, scale, SCALE_BYTES), (in_rows + SCALE_BYTES, rest, eights.row)]
        } else {
            [(in_rows, b * eights.block + r * eights.row, block_bytes), (0, 0, 0)]
        }
    };
    for group in bytes[..rows / GROUP_ROWS * group_bytes].chunks_exact_mut(group_bytes) {
        copy.copy_from_slice(group);
        for r in 0..GROUP_ROWS {
            for b in 0..blocks {
                for (in_rows, in_eights, len) in pieces(r, b) {
                    let (to, from) = if to_eight { (in_eights, in_rows) } else { (in_rows, in_eights) };
                    group[to..to + len].copy_from_slice(&copy[from..from + len]);
                }
            }
        }
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
            let pieces = if scales_first(format) {
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
}
