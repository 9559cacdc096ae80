//! Matrix products for few rows — decoding, where each step multiplies a handful of
//! hidden states by every weight of the model. Such a product is bound by memory
//! bandwidth, not arithmetic: what matters is reading each stored weight once, in its
//! stored dtype, and doing all the rows' arithmetic while it is in a register. The
//! general path (`linear`) converts a block of weights to f32 first and then calls a
//! GEMM, which reads and writes every weight twice more; for few rows that is most of
//! the time.
//!
//! The instruction set is chosen once, at run time, for the CPU present (AVX-512F,
//! AVX2 with FMA and F16C, or portable Rust); `FERRY_SIMD=scalar|avx2|avx512` forces a
//! path the CPU supports (tests and benchmarks compare them), and `FERRY_SIMD=off`
//! sends every product through the GEMM. Every path converts bf16
//! and f16 exactly to f32 and multiplies in f32, so results differ from the GEMM only
//! in the order of additions.

use std::sync::OnceLock;

use ferry_core::model::Dtype;
use rayon::prelude::*;

use super::{in_pool, Matrix, SendPtr};

/// The most rows of `x` this path takes; more rows go to the GEMM, where arithmetic
/// starts to dominate (measured: see BENCHMARKS.md, "few-row products"). The cost
/// model prices a product asking for this path at more rows as a pass per this many.
pub const MAX_ROWS: usize = ferry_core::profile::FEW_ROWS as usize;

/// Weight rows per parallel task: enough work to amortise the task, small enough to
/// balance over the cores.
const ROWS_PER_TASK: usize = 64;

/// The instruction set of the few-row kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdPath {
    Scalar,
    Avx2,
    Avx512,
}

impl SimdPath {
    pub fn name(self) -> &'static str {
        match self {
            SimdPath::Scalar => "scalar",
            SimdPath::Avx2 => "avx2",
            SimdPath::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            SimdPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best path this CPU supports.
    pub fn best() -> SimdPath {
        [SimdPath::Avx512, SimdPath::Avx2].into_iter().find(|p| p.supported()).unwrap_or(SimdPath::Scalar)
    }
}

/// The path the engine uses for few rows: `FERRY_SIMD` if set to a path this CPU
/// supports, else the best; `None` with `FERRY_SIMD=off`, which sends every product
/// through the GEMM (to compare, or to rule the kernels out).
pub fn simd_path() -> Option<SimdPath> {
    static PATH: OnceLock<Option<SimdPath>> = OnceLock::new();
    *PATH.get_or_init(|| {
        let wanted = std::env::var("FERRY_SIMD").ok();
        if wanted.as_deref() == Some("off") {
            return None;
        }
        let forced = [SimdPath::Scalar, SimdPath::Avx2, SimdPath::Avx512]
            .into_iter()
            .find(|p| wanted.as_deref() == Some(p.name()) && p.supported());
        Some(forced.unwrap_or_else(SimdPath::best))
    })
}

/// `out[i, col0 + j] = x[i] · w[j]` for the `m ≤ MAX_ROWS` rows of `x` and every row
/// `j` of `w`, reading `w` once in its stored dtype; `out` rows are `out_stride` wide.
pub fn linear_rows(path: SimdPath, x: &[f32], m: usize, w: Matrix, out: &mut [f32], out_stride: usize, col0: usize) {
    let k = w.cols;
    assert!(m <= MAX_ROWS && x.len() >= m * k, "linear_rows: {m} rows of {k}");
    assert!(col0 + w.rows <= out_stride && out.len() >= m * out_stride, "linear_rows: output too small");
    let element = super::element_bytes(w.dtype);
    assert!(w.bytes.len() >= w.rows * k * element, "linear_rows: weights too short");
    let path = if path.supported() { path } else { SimdPath::Scalar };
    let weights = WeightRows { bytes: w.bytes, rows: w.rows, row_bytes: k * element };
    by_weight_rows(weights, m, out, out_stride, col0, |rows, available, dots| {
        dot_block(path, w.dtype, rows, available, x, m, k, dots)
    });
}

/// The most weight rows one call of a vector kernel multiplies together.
pub(crate) const MAX_BLOCK: usize = 4;

/// A few-row product's weights as stored: `rows` rows of `row_bytes` bytes each.
#[derive(Clone, Copy)]
pub(crate) struct WeightRows<'a> {
    pub bytes: &'a [u8],
    pub rows: usize,
    pub row_bytes: usize,
}

/// The task loop every few-row kernel shares: the weight rows in parallel tasks of
/// `ROWS_PER_TASK`, each handing `block(rows, available, dots)` the rest of its rows
/// until done; `block` fills `dots[r][i] = x[i] · w[r]` for the block of weight rows it
/// takes (returned) and the first `m` rows of x, and the loop writes them to
/// `out[i, col0 + j + r]` (`out` rows `out_stride` wide).
///
/// # Panics
/// Where `out` or the weights are too small for the shapes, or `m` exceeds `MAX_ROWS`.
pub(crate) fn by_weight_rows(
    weights: WeightRows,
    m: usize,
    out: &mut [f32],
    out_stride: usize,
    col0: usize,
    block: impl Fn(&[u8], usize, &mut [[f32; MAX_ROWS]; MAX_BLOCK]) -> usize + Sync,
) {
    let WeightRows { bytes, rows, row_bytes } = weights;
    assert!(m <= MAX_ROWS, "few-row products: {m} rows of x");
    assert!(col0 + rows <= out_stride && out.len() >= m * out_stride, "few-row products: output too small");
    assert!(bytes.len() >= rows * row_bytes, "few-row products: weights too short");
    let out_ptr = SendPtr(out.as_mut_ptr());
    in_pool(|| {
        (0..rows.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(|task| {
            let first = task * ROWS_PER_TASK;
            let last = (first + ROWS_PER_TASK).min(rows);
            let mut dots = [[0.0f32; MAX_ROWS]; MAX_BLOCK];
            let mut j = first;
            while j < last {
                let done = block(&bytes[j * row_bytes..last * row_bytes], last - j, &mut dots);
                // Writes stay inside this task's columns whatever a block returns (the
                // slice below); a block that did nothing would never end the loop.
                debug_assert!((1..=MAX_BLOCK).contains(&done), "few-row products: a block of {done} rows");
                for (r, row_dots) in dots[..done.min(last - j)].iter().enumerate() {
                    for (i, &dot) in row_dots[..m].iter().enumerate() {
                        // SAFETY: task `task` alone writes columns col0 + first .. col0 + last
                        // of each row; the asserts above keep every index inside `out`.
                        unsafe { *out_ptr.get().add(i * out_stride + col0 + j + r) = dot };
                    }
                }
                j += done;
            }
        })
    });
}

/// `dots[r][i] = x[i] · w[r]` for a block of the `available` weight rows at the start
/// of `rows` and the first `m` rows of `x`; returns how many weight rows it did.
#[allow(clippy::too_many_arguments)]
fn dot_block(
    path: SimdPath,
    dtype: Dtype,
    rows: &[u8],
    available: usize,
    x: &[f32],
    m: usize,
    k: usize,
    dots: &mut [[f32; MAX_ROWS]; MAX_BLOCK],
) -> usize {
    match path {
        // SAFETY: the path is only chosen when the CPU supports it (`linear_rows`), and
        // `rows` holds `available` rows of k elements.
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 | SimdPath::Avx2 => unsafe { x86::dot_block(path, dtype, rows, available, x, m, k, dots) },
        _ => {
            let row_bytes = rows.len() / available;
            dot_row_scalar(dtype, &rows[..row_bytes], x, m, k, &mut dots[0]);
            1
        }
    }
}

/// One stored element as f32 (the exact conversion every path uses).
#[inline(always)]
fn element(dtype: Dtype, row: &[u8], index: usize) -> f32 {
    match dtype {
        Dtype::F32 => f32::from_le_bytes([row[4 * index], row[4 * index + 1], row[4 * index + 2], row[4 * index + 3]]),
        Dtype::F16 => half::f16::from_le_bytes([row[2 * index], row[2 * index + 1]]).to_f32(),
        _ => f32::from_bits(((row[2 * index + 1] as u32) << 24) | ((row[2 * index] as u32) << 16)),
    }
}

fn dot_row_scalar(dtype: Dtype, row: &[u8], x: &[f32], m: usize, k: usize, dots: &mut [f32; MAX_ROWS]) {
    dots[..m].fill(0.0);
    for c in 0..k {
        let w = element(dtype, row, c);
        for (i, dot) in dots[..m].iter_mut().enumerate() {
            *dot += w * x[i * k + c];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The vector paths. A kernel multiplies a block of `R` weight rows by `M` rows of
    //! x: each step loads one vector of every weight row (widened to f32 lanes once)
    //! and one vector of every x row, and does the R × M FMAs between them. Loading x
    //! once for R weight rows is what keeps several rows fast (x for eight rows is
    //! larger than the L1 cache, so with R = 1 every FMA waited on an L2 load), and the
    //! R × M accumulators are independent FMA chains. `M` and `R` are const parameters
    //! so the accumulators live in registers; R is as large as the register file
    //! allows beside the weight and x vectors. The tail (k not a multiple of the
    //! vector) is done element by element.

    use std::arch::x86_64::*;

    use super::{element, Dtype, SimdPath, MAX_BLOCK, MAX_ROWS};

    /// Calls `$f::<M, R>` for the runtime row count `$m`, with the block of weight rows
    /// R each row count allows (`$r` lists them for M = 1..=8), or R = 1 when fewer
    /// weight rows than that are left.
    macro_rules! by_shape {
        ($f:ident, $m:expr, $available:expr, [$($r:literal),*], $($arg:expr),*) => {{
            let blocks: [usize; 8] = [$($r),*];
            let m = $m;
            let block = blocks[m - 1];
            if $available >= block {
                by_shape!(@rows $f, m, block, [$($r),*], $($arg),*)
            } else {
                by_shape!(@one $f, m, $($arg),*)
            }
        }};
        (@rows $f:ident, $m:expr, $block:expr, [$r1:literal, $r2:literal, $r3:literal, $r4:literal,
            $r5:literal, $r6:literal, $r7:literal, $r8:literal], $($arg:expr),*) => {
            match $m {
                1 => $f::<1, $r1>($($arg),*),
                2 => $f::<2, $r2>($($arg),*),
                3 => $f::<3, $r3>($($arg),*),
                4 => $f::<4, $r4>($($arg),*),
                5 => $f::<5, $r5>($($arg),*),
                6 => $f::<6, $r6>($($arg),*),
                7 => $f::<7, $r7>($($arg),*),
                _ => $f::<8, $r8>($($arg),*),
            }
        };
        (@one $f:ident, $m:expr, $($arg:expr),*) => {
            match $m {
                1 => $f::<1, 1>($($arg),*),
                2 => $f::<2, 1>($($arg),*),
                3 => $f::<3, 1>($($arg),*),
                4 => $f::<4, 1>($($arg),*),
                5 => $f::<5, 1>($($arg),*),
                6 => $f::<6, 1>($($arg),*),
                7 => $f::<7, 1>($($arg),*),
                _ => $f::<8, 1>($($arg),*),
            }
        };
    }

    /// # Safety
    /// The CPU supports `path` (AVX-512F, or AVX2 with FMA and F16C); `rows` holds
    /// `available` rows of `k` elements of `dtype`; `x` holds m × k values, 1 ≤ m ≤ MAX_ROWS.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn dot_block(
        path: SimdPath,
        dtype: Dtype,
        rows: &[u8],
        available: usize,
        x: &[f32],
        m: usize,
        k: usize,
        dots: &mut [[f32; MAX_ROWS]; MAX_BLOCK],
    ) -> usize {
        if path == SimdPath::Avx512 {
            // 32 zmm registers hold M × R accumulators, R weight vectors and one x vector.
            by_shape!(avx512, m, available, [4, 4, 4, 4, 4, 4, 3, 3], dtype, rows, x, k, dots)
        } else {
            // 16 ymm registers hold the same for AVX2.
            by_shape!(avx2, m, available, [4, 4, 3, 2, 2, 1, 1, 1], dtype, rows, x, k, dots)
        }
    }

    /// The block kernel, once per instruction set: `$width` f32 lanes in a `$vector`,
    /// `$load_weights` widening `$width` stored weights, `$fma`, `$sum` across lanes.
    macro_rules! block_kernel {
        ($name:ident, $features:literal, $vector:ty, $width:literal, $zero:ident, $load_x:ident, $fma:ident,
         $sum:path, $load_weights:path) => {
            #[target_feature(enable = $features)]
            unsafe fn $name<const M: usize, const R: usize>(
                dtype: Dtype,
                rows: &[u8],
                x: &[f32],
                k: usize,
                dots: &mut [[f32; MAX_ROWS]; MAX_BLOCK],
            ) -> usize {
                let mut acc: [[$vector; R]; M] = [[$zero(); R]; M];
                let mut c = 0;
                while c + $width <= k {
                    let mut w: [$vector; R] = [$zero(); R];
                    for (r, v) in w.iter_mut().enumerate() {
                        // Row r's weights from column c (c + width ≤ k, r < R ≤ rows held).
                        *v = $load_weights(dtype, rows.as_ptr(), r * k + c);
                    }
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xv = $load_x(x.as_ptr().add(i * k + c));
                        for (lane, &wv) in a.iter_mut().zip(&w) {
                            *lane = $fma(wv, xv, *lane);
                        }
                    }
                    c += $width;
                }
                let row_bytes = k * crate::kernels::element_bytes(dtype);
                for (r, row_dots) in dots[..R].iter_mut().enumerate() {
                    let row = &rows[r * row_bytes..(r + 1) * row_bytes];
                    for (i, dot) in row_dots[..M].iter_mut().enumerate() {
                        *dot = $sum(acc[i][r]);
                        for t in c..k {
                            *dot += element(dtype, row, t) * x[i * k + t];
                        }
                    }
                }
                R
            }
        };
    }

    block_kernel!(
        avx512,
        "avx512f",
        __m512,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps,
        weights_avx512
    );
    block_kernel!(
        avx2,
        "avx2,fma,f16c",
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        horizontal_sum_avx,
        weights_avx2
    );

    /// 16 stored weights from element `at` of `rows`, widened to f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn weights_avx512(dtype: Dtype, rows: *const u8, at: usize) -> __m512 {
        match dtype {
            Dtype::F32 => _mm512_loadu_ps(rows.add(4 * at).cast()),
            Dtype::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(rows.add(2 * at).cast())),
            // bf16 is the top half of an f32.
            _ => _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(rows.add(2 * at).cast())),
                16,
            )),
        }
    }

    /// 8 stored weights from element `at` of `rows`, widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn weights_avx2(dtype: Dtype, rows: *const u8, at: usize) -> __m256 {
        match dtype {
            Dtype::F32 => _mm256_loadu_ps(rows.add(4 * at).cast()),
            Dtype::F16 => _mm256_cvtph_ps(_mm_loadu_si128(rows.add(2 * at).cast())),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(rows.add(2 * at).cast())),
                16,
            )),
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn horizontal_sum_avx(v: __m256) -> f32 {
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        let single = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
        _mm_cvtss_f32(single)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::from_f32;
    use crate::kernels::tests::naive;

    /// Every path this CPU supports, every stored dtype, row counts 1..=MAX_ROWS and
    /// widths with and without a tail, against a naive f64 product of the same
    /// (dtype-rounded) weights. Paths the CPU lacks are named, so a run that tested
    /// only the scalar path says so.
    #[test]
    fn every_path_matches_a_naive_product() {
        let supported: Vec<SimdPath> =
            [SimdPath::Scalar, SimdPath::Avx2, SimdPath::Avx512].into_iter().filter(|p| p.supported()).collect();
        eprintln!("few-row paths on this CPU: {:?}", supported);
        assert!(supported.contains(&SimdPath::Scalar) && supported.contains(&SimdPath::best()));
        for (n, k) in [(37usize, 64usize), (5, 77), (130, 48), (3, 7)] {
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 7 % 29) as f32 - 14.0) / 16.0).collect();
            for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
                let mut bytes = vec![0u8; n * k * crate::kernels::element_bytes(dtype)];
                from_f32(dtype, &w, &mut bytes);
                let mut rounded = vec![0.0f32; n * k];
                crate::kernels::to_f32(dtype, &bytes, &mut rounded);
                for m in 1..=MAX_ROWS {
                    let x: Vec<f32> = (0..m * k).map(|i| ((i * 5 % 31) as f32 - 15.0) / 8.0).collect();
                    let expected = naive(&x, m, &rounded, n, k);
                    for &path in &supported {
                        // Written into columns 2.. of a wider output, as a split weight does.
                        let stride = n + 3;
                        let mut out = vec![f32::NAN; m * stride];
                        let matrix = Matrix { bytes: &bytes, dtype, rows: n, cols: k };
                        linear_rows(path, &x, m, matrix, &mut out, stride, 2);
                        for i in 0..m {
                            for j in 0..n {
                                let (got, want) = (out[i * stride + 2 + j], expected[i * n + j]);
                                assert!(
                                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                                    "{path:?} {dtype:?} m={m} n={n} k={k} [{i},{j}]: {got} vs {want}"
                                );
                            }
                            assert!(out[i * stride].is_nan() && out[i * stride + 1].is_nan(), "wrote left of col0");
                        }
                    }
                }
            }
        }
    }

    /// A router-sized matrix (one row per expert) gives each row of x the same bits
    /// whether it is multiplied alone or among many rows: the experts a token chooses
    /// must not depend on the micro-batching.
    #[test]
    fn a_small_matrix_gives_each_row_the_same_bits_at_any_row_count() {
        let (n, k) = (8usize, 128usize);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 13 % 37) as f32 - 18.0) / 23.0).collect();
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let matrix = Matrix { bytes: &bytes, dtype: Dtype::F32, rows: n, cols: k };
        let m = 3 * MAX_ROWS + 5;
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 11 % 41) as f32 - 20.0) / 9.0).collect();
        let mut all = vec![0.0f32; m * n];
        crate::kernels::linear(&x, m, matrix, &mut all, n, 0);
        for i in 0..m {
            let mut alone = vec![0.0f32; n];
            crate::kernels::linear(&x[i * k..(i + 1) * k], 1, matrix, &mut alone, n, 0);
            assert_eq!(alone, all[i * n..(i + 1) * n], "row {i} of {m}");
        }
    }
}
