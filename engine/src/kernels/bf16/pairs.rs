//! Few-row products `round_bf16(x) · wᵀ` over bf16 weights with AVX512-BF16: VDPBF16PS
//! multiplies 16 pairs of bf16 values and adds both products into 16 f32 lanes, twice
//! the products of an f32 FMA per instruction, on the stored weights as they are (the
//! f32 row kernels widen every weight first). That is the work of decoding: at 8 rows
//! the f32 kernels are bound by instructions, not by the weights' bytes.
//!
//! Numerics: the instruction adds the odd element's product, then the even one's, each
//! rounded once as a fused multiply-add would (checked bit for bit against two FMAs on
//! 1.6 M lanes of random values), with denormal inputs and results flushed to zero.
//! Lane `l` sums elements 2l and 2l + 1 of every 32; the lanes are summed at the end
//! and the last `k mod 32` elements added one at a time. A row of x takes the same
//! operations whatever rows and weight rows come with it, so its bits never depend on
//! the row count (`Rows`).
//!
//! `FERRY_BF16_PAIRS=off` declines the instruction (benchmarks compare the two paths).

use std::arch::x86_64::*;
use std::sync::OnceLock;

use crate::kernels::rows::{by_weight_rows, WeightRows, MAX_BLOCK};
use crate::kernels::{Matrix, MAX_ROWS};

/// bf16 values per vector.
const LANES: usize = 32;

/// Whether this CPU has AVX512-BF16 (with AVX-512F) and `FERRY_BF16_PAIRS` does not
/// decline it.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var("FERRY_BF16_PAIRS").map_or(true, |v| v != "off")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bf16")
    })
}

/// `out[i, col0 + j] = x[i] · w[j]` for the `m ≤ MAX_ROWS` rows of `x` (bf16 bits, m × k)
/// and every row `j` of bf16 `w`; `out` rows are `out_stride` wide.
///
/// # Panics
/// Where `available()` is false, or the shapes do not hold.
pub fn linear(x: &[u16], m: usize, w: Matrix, out: &mut [f32], out_stride: usize, col0: usize) {
    let k = w.cols;
    assert!(available(), "bf16 pair products: the CPU lacks AVX512-BF16");
    assert!((1..=MAX_ROWS).contains(&m) && x.len() >= m * k, "bf16 pairs: {m} rows of {k}");
    assert!(col0 + w.rows <= out_stride && out.len() >= m * out_stride, "bf16 pairs: output too small");
    assert!(w.bytes.len() >= w.rows * k * 2, "bf16 pairs: weights too short");
    let weights = WeightRows { bytes: w.bytes, rows: w.rows, row_bytes: k * 2 };
    by_weight_rows(weights, m, out, out_stride, col0, |rows, available, dots| {
        // SAFETY: the CPU was checked above, and `rows` holds `available` whole rows of
        // k values (`by_weight_rows`).
        unsafe { by_shape(rows, available, x, m, k, dots) }
    });
}

/// The block kernel for `m` rows of x and up to the weight rows that fit the 32 vector
/// registers beside them (M × R accumulators, R weight vectors, one x vector).
///
/// # Safety
/// AVX-512F and AVX512-BF16 are present; `rows` holds `available` rows of k bf16
/// values (any alignment: the loads are unaligned).
unsafe fn by_shape(
    rows: &[u8],
    available: usize,
    x: &[u16],
    m: usize,
    k: usize,
    dots: &mut [[f32; MAX_ROWS]; MAX_BLOCK],
) -> usize {
    const BLOCK: [usize; MAX_ROWS] = [4, 4, 4, 4, 4, 4, 3, 3];
    let r = BLOCK[m - 1].min(available);
    macro_rules! shapes {
        ($($m:literal),*) => {
            match (m, r) {
                $(
                    ($m, 4) => block::<$m, 4>(rows, x, k, dots),
                    ($m, 3) => block::<$m, 3>(rows, x, k, dots),
                    ($m, 2) => block::<$m, 2>(rows, x, k, dots),
                    ($m, _) => block::<$m, 1>(rows, x, k, dots),
                )*
                _ => block::<8, 1>(rows, x, k, dots),
            }
        };
    }
    // SAFETY: the caller's guarantees; M = m ≤ MAX_ROWS and R ≤ available.
    unsafe { shapes!(1, 2, 3, 4, 5, 6, 7) }
}

/// `dots[r][i] = x[i] · w[r]` for R weight rows and M rows of x; returns R.
///
/// # Safety
/// As `by_shape`, with R ≤ the rows `w` holds and M the rows `x` holds.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block<const M: usize, const R: usize>(
    w: &[u8],
    x: &[u16],
    k: usize,
    dots: &mut [[f32; MAX_ROWS]; MAX_BLOCK],
) -> usize {
    let mut acc = [[_mm512_setzero_ps(); R]; M];
    let mut c = 0;
    while c + LANES <= k {
        let mut wv = [_mm512_setzero_si512(); R];
        for (r, v) in wv.iter_mut().enumerate() {
            // SAFETY: row r's values c .. c + 32 lie inside `w` (c + 32 ≤ k, r < R).
            *v = unsafe { _mm512_loadu_si512(w.as_ptr().add(2 * (r * k + c)).cast()) };
        }
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: as above for row i of x.
            let xv: __m512bh = unsafe { std::mem::transmute(_mm512_loadu_si512(x.as_ptr().add(i * k + c).cast())) };
            for (lane, &v) in row.iter_mut().zip(&wv) {
                let v: __m512bh = unsafe { std::mem::transmute(v) };
                *lane = _mm512_dpbf16_ps(*lane, v, xv);
            }
        }
        c += LANES;
    }
    let value = |bits: u16| f32::from_bits((bits as u32) << 16);
    for (r, row_dots) in dots[..R].iter_mut().enumerate() {
        for (i, dot) in row_dots[..M].iter_mut().enumerate() {
            *dot = _mm512_reduce_add_ps(acc[i][r]);
            for t in c..k {
                let at = 2 * (r * k + t);
                *dot += value(u16::from_le_bytes([w[at], w[at + 1]])) * value(x[i * k + t]);
            }
        }
    }
    R
}
