//! The arithmetic of the cuda backend's launches that needs no GPU, kept apart so it
//! is tested on every machine: how a linear layer maps onto cuBLAS's column-major
//! SGEMM, how a weight too large to widen at once is split, and the extent checks
//! every device operation makes (a kernel that runs past its buffer corrupts memory
//! silently, where the cpu backend's slices would stop at an error).

use crate::EngineError;

/// Elements of widened (f32) weight a linear converts at once: 64 MiB of scratch. A
/// vocabulary projection (128k × 4096) would take 2 GiB in one piece.
pub(super) const WIDEN_ELEMENTS: usize = 16 << 20;

/// One cuBLAS SGEMM call, `C = op(A) · op(B)` column-major with op(A) = Aᵀ and
/// op(B) = B, computing `out[:, col0 + row0 .. + rows] = x · w[row0 .. row0 + rows]ᵀ`.
///
/// Row-major `out` (`x_rows` × `out_stride`) is column-major `out_stride` × `x_rows`
/// with leading dimension `out_stride`, so the product is written as Cᵀ = W · Xᵀ:
/// A = the weight block (row-major `rows` × k = column-major k × `rows`, lda = k,
/// transposed), B = x (row-major `x_rows` × k = column-major k × `x_rows`, ldb = k),
/// C = `rows` × `x_rows` starting at element `col0 + row0` of `out`, ldc = `out_stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sgemm {
    /// The weight rows this call covers.
    pub row0: usize,
    pub rows: usize,
    /// cuBLAS's m, n, k and leading dimensions.
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldb: i32,
    pub ldc: i32,
    /// Where C starts in `out`, in f32 elements.
    pub c_offset: usize,
}

fn int(what: &str, value: usize) -> Result<i32, EngineError> {
    i32::try_from(value).map_err(|_| {
        EngineError::Unsupported(format!("a linear layer's {what} of {value} exceeds cuBLAS's 32-bit sizes"))
    })
}

/// The SGEMM calls of a linear layer: `x_rows` rows of x, a `w_rows` × `k` weight,
/// its columns written from `col0` of `out_stride`-wide output rows; the weight split
/// into blocks of at most `max_elements` (at least one row each).
pub(super) fn sgemm_blocks(
    x_rows: usize,
    w_rows: usize,
    k: usize,
    out_stride: usize,
    col0: usize,
    max_elements: usize,
) -> Result<Vec<Sgemm>, EngineError> {
    if col0 + w_rows > out_stride {
        return Err(EngineError::Internal(format!(
            "a linear's columns {col0}..{} pass its {out_stride}-wide output rows",
            col0 + w_rows
        )));
    }
    if x_rows == 0 || w_rows == 0 {
        return Ok(Vec::new());
    }
    let block_rows = (max_elements / k.max(1)).clamp(1, w_rows);
    let mut blocks = Vec::new();
    let mut row0 = 0;
    while row0 < w_rows {
        let rows = block_rows.min(w_rows - row0);
        blocks.push(Sgemm {
            row0,
            rows,
            m: int("output width", rows)?,
            n: int("row count", x_rows)?,
            k: int("input width", k)?,
            lda: int("input width", k.max(1))?,
            ldb: int("input width", k.max(1))?,
            ldc: int("output stride", out_stride)?,
            c_offset: col0 + row0,
        });
        row0 += rows;
    }
    Ok(blocks)
}

/// An error unless `bytes` at `offset` lie within a `len`-byte buffer.
pub(super) fn within(what: &str, offset: usize, bytes: usize, len: usize) -> Result<(), EngineError> {
    match offset.checked_add(bytes) {
        Some(end) if end <= len => Ok(()),
        _ => Err(EngineError::Internal(format!(
            "{what} ({bytes} bytes at {offset}) passes the end of its {len}-byte buffer"
        ))),
    }
}

/// Bytes of `count` f32 values.
pub(super) fn f32_bytes(count: usize) -> usize {
    count * 4
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{self, Matrix};
    use ferry_core::model::Dtype;

    /// cuBLAS's `sgemm(OP_T, OP_N, ...)` by its definition, column-major:
    /// C[i + j·ldc] = Σ_l A[l + i·lda] · B[l + j·ldb] for i < m, j < n.
    fn reference_sgemm(g: &Sgemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        for j in 0..n {
            for i in 0..m {
                let sum: f32 = (0..k).map(|l| a[l + i * g.lda as usize] * b[l + j * g.ldb as usize]).sum();
                c[g.c_offset + i + j * g.ldc as usize] = sum;
            }
        }
    }

    /// The SGEMM calls, run by their definition on the weight's row blocks, write what
    /// the cpu kernel writes: the same columns, nothing else.
    #[test]
    fn sgemm_blocks_compute_the_cpu_linear() {
        for (x_rows, w_rows, k, stride, col0, max) in
            [(3, 7, 5, 10, 2, 1 << 20), (1, 9, 4, 9, 0, 8), (4, 13, 6, 20, 7, 13), (2, 5, 3, 5, 0, 1)]
        {
            let x: Vec<f32> = (0..x_rows * k).map(|i| (i % 7) as f32 - 3.0).collect();
            let w: Vec<f32> = (0..w_rows * k).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
            let mut bytes = vec![0u8; w.len() * 4];
            kernels::from_f32(Dtype::F32, &w, &mut bytes);
            let mut expected = vec![f32::NAN; x_rows * stride];
            let matrix = Matrix { bytes: &bytes, dtype: Dtype::F32, rows: w_rows, cols: k };
            kernels::linear_converted(&x, x_rows, matrix, &mut expected, stride, col0);

            let mut got = vec![f32::NAN; x_rows * stride];
            let blocks = sgemm_blocks(x_rows, w_rows, k, stride, col0, max).unwrap();
            assert!(blocks.iter().all(|b| b.rows * k <= max.max(k)), "blocks within the scratch");
            assert_eq!(blocks.iter().map(|b| b.rows).sum::<usize>(), w_rows);
            for g in &blocks {
                // The block's rows, as the decode kernel widens them into scratch.
                reference_sgemm(g, &w[g.row0 * k..(g.row0 + g.rows) * k], &x, &mut got);
            }
            for (i, (a, b)) in expected.iter().zip(&got).enumerate() {
                assert!(a.is_nan() && b.is_nan() || a == b, "{x_rows}x{w_rows}x{k} [{i}]: {a} vs {b}");
            }
        }
    }

    #[test]
    fn sgemm_blocks_refuse_columns_past_the_row() {
        assert!(sgemm_blocks(2, 5, 3, 6, 2, 100).is_err());
        assert!(sgemm_blocks(0, 5, 3, 5, 0, 100).unwrap().is_empty());
        // A weight wider than the scratch still goes one row at a time.
        let blocks = sgemm_blocks(1, 3, 1000, 3, 0, 10).unwrap();
        assert_eq!(blocks.len(), 3);
        assert!(sgemm_blocks(1, 1, 1 << 31, 1, 0, 1 << 40).is_err(), "k past i32");
    }

    #[test]
    fn extents_are_checked_without_overflow() {
        assert!(within("x", 4, 4, 8).is_ok());
        assert!(within("x", 5, 4, 8).is_err());
        assert!(within("x", usize::MAX, 2, 8).is_err());
        assert!(within("x", 0, 0, 0).is_ok());
    }
}
