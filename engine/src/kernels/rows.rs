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

use super::{compute_pool, Matrix, SendPtr};

/// The most rows of `x` this path takes; more rows go to the GEMM, where arithmetic
/// starts to dominate (measured: see BENCHMARKS.md, "few-row products").
pub const MAX_ROWS: usize = 8;

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
    let out_ptr = SendPtr(out.as_mut_ptr());
    let tasks = w.rows.div_ceil(ROWS_PER_TASK);
    compute_pool().install(|| {
        (0..tasks).into_par_iter().for_each(|task| {
            let first = task * ROWS_PER_TASK;
            let last = (first + ROWS_PER_TASK).min(w.rows);
            let mut dots = [0.0f32; MAX_ROWS];
            for j in first..last {
                let row = &w.bytes[j * k * element..(j + 1) * k * element];
                dot_rows(path, w.dtype, row, x, m, k, &mut dots);
                for (i, &dot) in dots[..m].iter().enumerate() {
                    // SAFETY: task `task` alone writes columns col0 + first .. col0 + last
                    // of each row; the asserts above keep every index inside `out`.
                    unsafe { *out_ptr.get().add(i * out_stride + col0 + j) = dot };
                }
            }
        })
    });
}

/// `dots[i] = x[i] · row` for the first `m` rows of `x`.
fn dot_rows(path: SimdPath, dtype: Dtype, row: &[u8], x: &[f32], m: usize, k: usize, dots: &mut [f32; MAX_ROWS]) {
    match path {
        // SAFETY: the path is only chosen when the CPU supports it (`linear_rows`).
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 => unsafe { x86::dot_rows_avx512(dtype, row, x, m, k, dots) },
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 => unsafe { x86::dot_rows_avx2(dtype, row, x, m, k, dots) },
        _ => dot_rows_scalar(dtype, row, x, m, k, dots),
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

fn dot_rows_scalar(dtype: Dtype, row: &[u8], x: &[f32], m: usize, k: usize, dots: &mut [f32; MAX_ROWS]) {
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
    //! The vector paths. Each loads a run of stored weights, widens it to f32 lanes
    //! once and multiplies it into every row's accumulators. The row count is a const
    //! parameter so the accumulators live in registers (a runtime count puts them on
    //! the stack, which measured half the speed at two rows); `U` accumulators per row
    //! keep `U` FMA chains in flight (one row alone would wait on each FMA's latency),
    //! as many as the register file holds beside the weights. The tail (k not a
    //! multiple of the vector) is done element by element.

    use std::arch::x86_64::*;

    use super::{element, Dtype, MAX_ROWS};

    /// Calls `$f::<M, U>` for the runtime row count `$m` (1..=MAX_ROWS).
    macro_rules! by_rows {
        ($f:ident, $m:expr, $few:literal, $many:literal, $($arg:expr),*) => {
            match $m {
                1 => $f::<1, $few>($($arg),*),
                2 => $f::<2, $few>($($arg),*),
                3 => $f::<3, $few>($($arg),*),
                4 => $f::<4, $few>($($arg),*),
                5 => $f::<5, $many>($($arg),*),
                6 => $f::<6, $many>($($arg),*),
                7 => $f::<7, $many>($($arg),*),
                _ => $f::<8, $many>($($arg),*),
            }
        };
    }

    /// # Safety
    /// The CPU supports AVX-512F; `row` holds `k` elements of `dtype`, `x` holds m × k.
    pub(super) unsafe fn dot_rows_avx512(
        dtype: Dtype,
        row: &[u8],
        x: &[f32],
        m: usize,
        k: usize,
        dots: &mut [f32; MAX_ROWS],
    ) {
        // 32 zmm registers: 8 rows × 2 chains + 2 weight vectors fit; 4 chains for few rows.
        by_rows!(avx512, m, 4, 2, dtype, row, x, k, dots)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<const M: usize, const U: usize>(
        dtype: Dtype,
        row: &[u8],
        x: &[f32],
        k: usize,
        dots: &mut [f32; MAX_ROWS],
    ) {
        // 16 weights per vector, widened from their stored form (c + 16 ≤ k).
        let load = |c: usize| -> __m512 {
            match dtype {
                Dtype::F32 => _mm512_loadu_ps(row.as_ptr().add(4 * c).cast()),
                Dtype::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(row.as_ptr().add(2 * c).cast())),
                _ => {
                    let halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(row.as_ptr().add(2 * c).cast()));
                    _mm512_castsi512_ps(_mm512_slli_epi32(halves, 16))
                }
            }
        };
        let mut acc = [[_mm512_setzero_ps(); U]; M];
        let mut c = 0;
        while c + 16 * U <= k {
            let mut w = [_mm512_setzero_ps(); U];
            for (u, v) in w.iter_mut().enumerate() {
                *v = load(c + 16 * u);
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let xr = x.as_ptr().add(i * k + c);
                for u in 0..U {
                    a[u] = _mm512_fmadd_ps(w[u], _mm512_loadu_ps(xr.add(16 * u)), a[u]);
                }
            }
            c += 16 * U;
        }
        while c + 16 <= k {
            let w0 = load(c);
            for (i, a) in acc.iter_mut().enumerate() {
                a[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x.as_ptr().add(i * k + c)), a[0]);
            }
            c += 16;
        }
        for (i, dot) in dots[..M].iter_mut().enumerate() {
            let sum = acc[i][1..].iter().fold(acc[i][0], |s, &a| _mm512_add_ps(s, a));
            *dot = _mm512_reduce_add_ps(sum);
            for t in c..k {
                *dot += element(dtype, row, t) * x[i * k + t];
            }
        }
    }

    /// # Safety
    /// The CPU supports AVX2, FMA and F16C; `row` holds `k` elements of `dtype`, `x`
    /// holds m × k.
    pub(super) unsafe fn dot_rows_avx2(
        dtype: Dtype,
        row: &[u8],
        x: &[f32],
        m: usize,
        k: usize,
        dots: &mut [f32; MAX_ROWS],
    ) {
        // 16 ymm registers: up to 4 rows × 2 chains + 2 weight vectors; one chain beyond.
        by_rows!(avx2, m, 2, 1, dtype, row, x, k, dots)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2<const M: usize, const U: usize>(
        dtype: Dtype,
        row: &[u8],
        x: &[f32],
        k: usize,
        dots: &mut [f32; MAX_ROWS],
    ) {
        // 8 weights per vector (c + 8 ≤ k).
        let load = |c: usize| -> __m256 {
            match dtype {
                Dtype::F32 => _mm256_loadu_ps(row.as_ptr().add(4 * c).cast()),
                Dtype::F16 => _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(2 * c).cast())),
                _ => {
                    let halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(row.as_ptr().add(2 * c).cast()));
                    _mm256_castsi256_ps(_mm256_slli_epi32(halves, 16))
                }
            }
        };
        let mut acc = [[_mm256_setzero_ps(); U]; M];
        let mut c = 0;
        while c + 8 * U <= k {
            let mut w = [_mm256_setzero_ps(); U];
            for (u, v) in w.iter_mut().enumerate() {
                *v = load(c + 8 * u);
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let xr = x.as_ptr().add(i * k + c);
                for u in 0..U {
                    a[u] = _mm256_fmadd_ps(w[u], _mm256_loadu_ps(xr.add(8 * u)), a[u]);
                }
            }
            c += 8 * U;
        }
        while c + 8 <= k {
            let w0 = load(c);
            for (i, a) in acc.iter_mut().enumerate() {
                a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.as_ptr().add(i * k + c)), a[0]);
            }
            c += 8;
        }
        for (i, dot) in dots[..M].iter_mut().enumerate() {
            let sum = acc[i][1..].iter().fold(acc[i][0], |s, &a| _mm256_add_ps(s, a));
            *dot = horizontal_sum_avx(sum);
            for t in c..k {
                *dot += element(dtype, row, t) * x[i * k + t];
            }
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

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

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
}
