//! Matrix products over block-quantized weights (ggml's Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K, Q3_K, Q2_K,
//! IQ4_NL, IQ4_XS, Q4_1, Q5_1 and the lattice formats IQ2_XXS … IQ1_M),
//! multiplied straight from the stored blocks: no float copy of a tensor is made.
//!
//! For few rows (decoding) each block is decoded and multiplied into every row of `x`
//! while it is in registers or the L1 cache, so the weights are read from memory once,
//! at their quantized size; results differ from "dequantize, then multiply" only in
//! the order of additions. The path follows `simd_path()` like the float kernels:
//! AVX2 (with FMA and F16C) and AVX-512 kernels per format (`x86` for Q8_0 and Q4_0,
//! `k_quants` for Q4_K, Q5_K and Q6_K; `x86` also for Q5_0, llama.cpp's fallback for a
//! K-quant's matrices of other widths; Q3_K, Q2_K, IQ4_NL, IQ4_XS, Q4_1, Q5_1 and the
//! lattice formats take the portable body compiled for AVX2) decode a block straight into vectors; every
//! format off x86 takes the portable body, which decodes each block into a small stack buffer with the reference unpacking
//! (`quant::dequantize_block`, bit-identical to llama.cpp's). Many rows (prefill)
//! decode row blocks to f32 and take the GEMM (`linear_converted`), where arithmetic
//! dominates. With 8-bit activations (`q8`, the cpu backend's default) every format
//! skips all of this at every row count: its products are integer sums (`q8` for
//! the 32-value formats and IQ4_XS, `q8::k_quants` for the K-quants, `q8::grids` for
//! the lattice formats).

use rayon::prelude::*;

use super::quant::{dequantize_block, BlockFormat};
use super::{in_pool, linear_converted, Matrix, Rows, SendPtr, SimdPath, MAX_ROWS};
use ferry_core::model::Dtype;

/// `kernel::<M, …>(args)` with `M`, the const count of rows of x (1–8) the kernels
/// keep their sums for in registers, matched to `rows` at run time (here and in `q8`).
#[cfg(target_arch = "x86_64")]
macro_rules! with_rows {
    ($rows:expr, $kernel:ident::<_ $(, $param:tt)*>($($arg:expr),* $(,)?)) => {
        match $rows {
            1 => $kernel::<1 $(, $param)*>($($arg),*),
            2 => $kernel::<2 $(, $param)*>($($arg),*),
            3 => $kernel::<3 $(, $param)*>($($arg),*),
            4 => $kernel::<4 $(, $param)*>($($arg),*),
            5 => $kernel::<5 $(, $param)*>($($arg),*),
            6 => $kernel::<6 $(, $param)*>($($arg),*),
            7 => $kernel::<7 $(, $param)*>($($arg),*),
            _ => $kernel::<8 $(, $param)*>($($arg),*),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod k_quants;
mod order;
mod q8;

pub use order::{interleave, resident_order, BlockOrder, GROUP_ROWS};
pub use q8::{byte_products_path, linear_q8, Activations};

/// A weight matrix stored as `rows` rows of `cols / weights-per-block` blocks, in
/// `order`.
#[derive(Clone, Copy)]
pub struct QuantMatrix<'a> {
    pub bytes: &'a [u8],
    pub format: BlockFormat,
    pub rows: usize,
    pub cols: usize,
    pub order: BlockOrder,
}

impl QuantMatrix<'_> {
    pub fn row_bytes(&self) -> usize {
        let (weights, block_bytes) = self.format.block();
        self.cols / weights * block_bytes
    }

    fn check(&self) {
        let (weights, _) = self.format.block();
        assert!(
            self.cols.is_multiple_of(weights) && self.bytes.len() >= self.rows * self.row_bytes(),
            "{}: {} bytes do not hold {} × {} weights",
            self.format.name(),
            self.bytes.len(),
            self.rows,
            self.cols
        );
    }
}

/// Accumulator lanes per row of `x`: one AVX2 vector of f32.
const LANES: usize = 8;

/// Weight rows per parallel task: whole groups of eight, so that a task's groups are
/// the matrix's (`BlockOrder::EightRows`).
const ROWS_PER_TASK: usize = 32;
const _: () = assert!(ROWS_PER_TASK.is_multiple_of(GROUP_ROWS));

/// `out[:, col0 .. col0 + w.rows] = x · wᵀ` for `rows.count` rows of `x`; `out` rows are
/// `out_stride` wide. With activations quantized (`Activations::Q8`, and `Bf16`, which
/// rounds only float weights' x to bf16) every row count takes the integer products
/// (`linear_q8`); otherwise the few-row kernels multiply from the blocks (`quant_rows`,
/// `MAX_ROWS` rows of x at a time) where `rows` asks for them, and the GEMM the rest.
#[allow(clippy::too_many_arguments)]
pub fn linear_quant(
    x: &[f32],
    rows: Rows,
    w: QuantMatrix,
    out: &mut [f32],
    out_stride: usize,
    col0: usize,
    activations: Activations,
) {
    let m = rows.count;
    if activations.quantize_for_blocks() {
        let path = super::simd_path().unwrap_or(SimdPath::Scalar);
        return linear_q8(path, x, m, w, out, out_stride, col0);
    }
    match super::simd_path().filter(|_| rows.few()) {
        Some(path) => super::in_row_groups(x, m, w.cols, out, out_stride, |x, group, out| {
            quant_rows(path, x, group, w, out, out_stride, col0)
        }),
        None => quant_converted(x, m, w, out, out_stride, col0),
    }
}

/// The few-row product on `path` (scalar where the CPU lacks it).
pub fn quant_rows(
    path: SimdPath,
    x: &[f32],
    m: usize,
    w: QuantMatrix,
    out: &mut [f32],
    out_stride: usize,
    col0: usize,
) {
    w.check();
    // These kernels read a row at a time (or two): rows in order.
    let bytes = w.in_row_order();
    let w = QuantMatrix { bytes: &bytes, order: BlockOrder::Rows, ..w };
    let k = w.cols;
    assert!((1..=MAX_ROWS).contains(&m) && x.len() >= m * k, "quant_rows: {m} rows of {k}");
    assert!(col0 + w.rows <= out_stride && out.len() >= m * out_stride, "quant_rows: output too small");
    let path = if path.supported() { path } else { SimdPath::Scalar };
    let row_bytes = w.row_bytes();
    let out_ptr = SendPtr(out.as_mut_ptr());
    in_pool(|| {
        (0..w.rows.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(|task| {
            let mut dots = [[0.0f32; MAX_ROWS]; 2];
            let last = ((task + 1) * ROWS_PER_TASK).min(w.rows);
            let mut j = task * ROWS_PER_TASK;
            while j < last {
                let rows = &w.bytes[j * row_bytes..last * row_bytes];
                let done = weight_rows_dots(path, w.format, rows, row_bytes, x, m, k, &mut dots);
                for (r, row_dots) in dots[..done].iter().enumerate() {
                    for (i, &dot) in row_dots[..m].iter().enumerate() {
                        // SAFETY: this task alone writes columns col0 + its rows; the
                        // asserts above keep every index inside `out`.
                        unsafe { *out_ptr.get().add(i * out_stride + col0 + j + r) = dot };
                    }
                }
                j += done;
            }
        })
    });
}

/// `dots[r][i] = x[i] · row r` for the first one or two of the weight rows in `rows`
/// (whole rows of `row_bytes`); returns how many it did. Two at once where the vector
/// path has them and x has enough rows (`pairs_from`): each load of x then serves both.
#[allow(clippy::too_many_arguments)]
fn weight_rows_dots(
    path: SimdPath,
    format: BlockFormat,
    rows: &[u8],
    row_bytes: usize,
    x: &[f32],
    m: usize,
    k: usize,
    dots: &mut [[f32; MAX_ROWS]; 2],
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if path == SimdPath::Avx512 && m >= pairs_from(format) && rows.len() >= 2 * row_bytes {
        let (first, second) = rows.split_at(row_bytes);
        let second = &second[..row_bytes];
        match format {
            // SAFETY: `quant_rows` only passes a path this CPU supports; both rows are whole.
            BlockFormat::Q8_0 | BlockFormat::Q4_0 | BlockFormat::Q5_0 => unsafe {
                x86::two_rows_avx512(format, first, second, x, m, k, dots);
                return 2;
            },
            // SAFETY: as above, and the kernel's further features were detected.
            BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q6K if k_quants::avx512_present() => unsafe {
                k_quants::k_two_rows_avx512(format, first, second, x, m, k, dots);
                return 2;
            },
            _ => {}
        }
    }
    row_dots(path, format, &rows[..row_bytes], x, m, k, &mut dots[0]);
    1
}

/// The fewest rows of x from which the AVX-512 path multiplies two weight rows at a
/// time (measured): below four x fits the L1 cache and a row at a time is faster;
/// Q6_K, whose decoding is the most work, gains from pairs only from six.
#[cfg(target_arch = "x86_64")]
fn pairs_from(format: BlockFormat) -> usize {
    match format {
        BlockFormat::Q6K => 6,
        _ => 4,
    }
}

/// `dots[i] = x[i] · row` for one stored weight row.
fn row_dots(
    path: SimdPath,
    format: BlockFormat,
    row: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    dots: &mut [f32; MAX_ROWS],
) {
    match path {
        // SAFETY (each x86 arm): `quant_rows` only passes a path this CPU supports, and
        // the K-quant AVX-512 kernel's further features were detected. Every AVX-512
        // CPU has AVX2, FMA and F16C, so one without those (the Xeon Phi) runs the
        // AVX2 kernel.
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 => unsafe {
            match format {
                BlockFormat::Q8_0 | BlockFormat::Q4_0 | BlockFormat::Q5_0 => {
                    x86::small_blocks_avx512(format, row, x, m, k, dots)
                }
                BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q6K if k_quants::avx512_present() => {
                    k_quants::k_blocks_avx512(format, row, x, m, k, dots)
                }
                BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q6K => {
                    k_quants::k_blocks(format, row, x, m, k, dots)
                }
                _ => portable_avx2(format, row, x, m, k, dots),
            }
        },
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 => unsafe {
            match format {
                BlockFormat::Q8_0 | BlockFormat::Q4_0 | BlockFormat::Q5_0 => {
                    x86::small_blocks(format, row, x, m, k, dots)
                }
                BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q6K => {
                    k_quants::k_blocks(format, row, x, m, k, dots)
                }
                _ => portable_avx2(format, row, x, m, k, dots),
            }
        },
        _ => by_format(format, row, x, m, k, dots),
    }
}

/// The portable body, one copy per format so that each is compiled with its
/// unpacking inlined.
fn by_format(format: BlockFormat, row: &[u8], x: &[f32], m: usize, k: usize, dots: &mut [f32; MAX_ROWS]) {
    match format {
        BlockFormat::Q8_0 => row_body(BlockFormat::Q8_0, row, x, m, k, dots),
        BlockFormat::Q4_0 => row_body(BlockFormat::Q4_0, row, x, m, k, dots),
        BlockFormat::Q5_0 => row_body(BlockFormat::Q5_0, row, x, m, k, dots),
        BlockFormat::Q4K => row_body(BlockFormat::Q4K, row, x, m, k, dots),
        BlockFormat::Q5K => row_body(BlockFormat::Q5K, row, x, m, k, dots),
        BlockFormat::Q6K => row_body(BlockFormat::Q6K, row, x, m, k, dots),
        BlockFormat::Q3K => row_body(BlockFormat::Q3K, row, x, m, k, dots),
        BlockFormat::Q2K => row_body(BlockFormat::Q2K, row, x, m, k, dots),
        BlockFormat::IQ4NL => row_body(BlockFormat::IQ4NL, row, x, m, k, dots),
        BlockFormat::IQ4XS => row_body(BlockFormat::IQ4XS, row, x, m, k, dots),
        BlockFormat::Q4_1 => row_body(BlockFormat::Q4_1, row, x, m, k, dots),
        BlockFormat::Q5_1 => row_body(BlockFormat::Q5_1, row, x, m, k, dots),
        // The lattice formats' unpacking is table lookups: one body for all of them.
        _ => row_body(format, row, x, m, k, dots),
    }
}

/// The portable body compiled for AVX2 and FMA, for the formats without a kernel of
/// their own for f32 x (Q3_K, Q2_K, IQ4_NL, IQ4_XS, Q4_1, Q5_1; 8-bit x, the default,
/// has one):
/// their unpacking and the sums vectorise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn portable_avx2(format: BlockFormat, row: &[u8], x: &[f32], m: usize, k: usize, dots: &mut [f32; MAX_ROWS]) {
    match format {
        BlockFormat::Q3K => row_body(BlockFormat::Q3K, row, x, m, k, dots),
        BlockFormat::Q2K => row_body(BlockFormat::Q2K, row, x, m, k, dots),
        BlockFormat::IQ4NL => row_body(BlockFormat::IQ4NL, row, x, m, k, dots),
        BlockFormat::Q4_1 => row_body(BlockFormat::Q4_1, row, x, m, k, dots),
        BlockFormat::Q5_1 => row_body(BlockFormat::Q5_1, row, x, m, k, dots),
        BlockFormat::IQ4XS => row_body(BlockFormat::IQ4XS, row, x, m, k, dots),
        _ => row_body(format, row, x, m, k, dots),
    }
}

/// Decodes each block of `row` and multiplies it into every row of `x`, in `LANES`
/// independent sums per row (reduced at the end).
#[inline(always)]
fn row_body(format: BlockFormat, row: &[u8], x: &[f32], m: usize, k: usize, dots: &mut [f32; MAX_ROWS]) {
    let (weights, block_bytes) = format.block();
    let mut sums = [[0.0f32; LANES]; MAX_ROWS];
    let mut decoded = [0.0f32; 256];
    for (b, block) in row.chunks_exact(block_bytes).enumerate() {
        let values = &mut decoded[..weights];
        dequantize_block(format, block, values);
        for (i, sum) in sums[..m].iter_mut().enumerate() {
            let xs = &x[i * k + b * weights..i * k + (b + 1) * weights];
            for (w, v) in values.chunks_exact(LANES).zip(xs.chunks_exact(LANES)) {
                for l in 0..LANES {
                    sum[l] += w[l] * v[l];
                }
            }
        }
    }
    for (dot, sum) in dots[..m].iter_mut().zip(&sums[..m]) {
        *dot = sum.iter().sum();
    }
}

/// Many rows: blocks of weight rows decoded to f32 (about 1 MiB each) and multiplied
/// by the GEMM.
pub fn quant_converted(x: &[f32], m: usize, w: QuantMatrix, out: &mut [f32], out_stride: usize, col0: usize) {
    w.check();
    let bytes = w.in_row_order();
    let w = QuantMatrix { bytes: &bytes, order: BlockOrder::Rows, ..w };
    let k = w.cols;
    let block_rows = ((1 << 18) / k.max(1)).clamp(1, w.rows.max(1));
    let row_bytes = w.row_bytes();
    let mut decoded = vec![0.0f32; block_rows * k];
    for first in (0..w.rows).step_by(block_rows) {
        let rows = block_rows.min(w.rows - first);
        let values = &mut decoded[..rows * k];
        super::quant::dequantize(w.format, &w.bytes[first * row_bytes..(first + rows) * row_bytes], values);
        // SAFETY: f32 has no invalid bit patterns and u8 no alignment.
        let bytes = unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), values.len() * 4) };
        let block = Matrix { bytes, dtype: Dtype::F32, rows, cols: k };
        linear_converted(x, m, block, out, out_stride, col0 + first);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Q8_0, Q4_0 and Q5_0 with AVX2: a block's 32 small integers (`signed_bytes`)
    //! widen to four vectors of f32 and multiply into each row of x; the block's scale
    //! `d` multiplies the block's sum once: d·Σ q·x instead of Σ (d·q)·x. Each d·q is
    //! exact in f32 (an 11-bit f16 mantissa times a 4- or 8-bit integer), so this
    //! differs from the reference decoding only in rounding order. Rows of x come in a
    //! const count `M` so that the accumulators stay in registers.

    use std::arch::x86_64::*;

    use super::{BlockFormat, MAX_ROWS};

    /// `dots[i] = x[i] · row` for a row of Q8_0, Q4_0 or Q5_0 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn small_blocks(
        format: BlockFormat,
        row: &[u8],
        x: &[f32],
        m: usize,
        k: usize,
        dots: &mut [f32; MAX_ROWS],
    ) {
        // SAFETY (each arm): the caller checked `row` holds whole blocks of `format`
        // and `x` holds m rows of k = 32 × blocks values; AVX2, FMA and F16C are present.
        unsafe { with_rows!(m, rows::<_>(format, row, x, k, dots)) }
    }

    /// The block's f16 scale (its first two bytes) as f32.
    #[inline(always)]
    unsafe fn scale(block: *const u8) -> f32 {
        // SAFETY: a block starts with its 2-byte scale; F16C is present where this runs.
        unsafe { super::k_quants::f16_at(block) }
    }

    /// The block's 32 values as signed bytes: weights 0–15, then 16–31.
    #[inline(always)]
    unsafe fn signed_bytes(format: BlockFormat, block: *const u8) -> (__m128i, __m128i) {
        // SAFETY: the block holds its format's bytes (34, 18 or 22); SSSE3 is present
        // wherever this is inlined (AVX2 or AVX-512 kernels).
        unsafe {
            let nibble = _mm_set1_epi8(0x0F);
            match format {
                BlockFormat::Q4_0 => {
                    // Low nibbles are weights 0..16, high nibbles 16..32; both offset by 8.
                    let packed = _mm_loadu_si128(block.add(2).cast());
                    let eight = _mm_set1_epi8(8);
                    let low = _mm_sub_epi8(_mm_and_si128(packed, nibble), eight);
                    let high = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(packed, 4), nibble), eight);
                    (low, high)
                }
                BlockFormat::Q5_0 => {
                    // As Q4_0, each value's fifth bit from the u32 at bytes 2..6 (bit j:
                    // weight j), offset by 16: a nibble without its bit is the byte
                    // 0xF0 | nibble, with it the nibble.
                    let packed = _mm_loadu_si128(block.add(6).cast());
                    let bits = _mm_cvtsi32_si128(block.add(2).cast::<i32>().read_unaligned());
                    let bit = _mm_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
                    let clear = |spread: __m128i| {
                        let set = _mm_cmpeq_epi8(_mm_and_si128(_mm_shuffle_epi8(bits, spread), bit), bit);
                        _mm_andnot_si128(set, _mm_set1_epi8(0xF0u8 as i8))
                    };
                    let low =
                        _mm_or_si128(_mm_and_si128(packed, nibble), clear(_mm_set_epi64x(0x0101_0101_0101_0101, 0)));
                    let high = _mm_or_si128(
                        _mm_and_si128(_mm_srli_epi16(packed, 4), nibble),
                        clear(_mm_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202)),
                    );
                    (low, high)
                }
                _ => (_mm_loadu_si128(block.add(2).cast()), _mm_loadu_si128(block.add(18).cast())),
            }
        }
    }

    /// The block's 32 values as four vectors of f32 (weights 0–7, 8–15, 16–23, 24–31).
    #[inline(always)]
    unsafe fn widen(format: BlockFormat, block: *const u8) -> [__m256; 4] {
        // SAFETY: as `signed_bytes`.
        unsafe {
            let (low, high) = signed_bytes(format, block);
            [
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(low)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(low, 8))),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(high)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(high, 8))),
            ]
        }
    }

    /// `small_blocks` with 16-lane vectors: a block is two vectors, half the
    /// instructions of the 8-lane path for the same weights.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn small_blocks_avx512(
        format: BlockFormat,
        row: &[u8],
        x: &[f32],
        m: usize,
        k: usize,
        dots: &mut [f32; MAX_ROWS],
    ) {
        // SAFETY (each arm): as in `small_blocks`; AVX-512F is present.
        unsafe { with_rows!(m, rows16::<_>(format, row, x, k, dots)) }
    }

    /// `small_blocks_avx512` for two weight rows at once: each pair of x vectors is
    /// loaded once for both (x for eight rows outgrows the L1 cache, so its loads are
    /// what a row at a time waits on).
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn two_rows_avx512(
        format: BlockFormat,
        first: &[u8],
        second: &[u8],
        x: &[f32],
        m: usize,
        k: usize,
        dots: &mut [[f32; MAX_ROWS]; 2],
    ) {
        // SAFETY (each arm): as in `small_blocks`, for both rows; AVX-512F is present.
        unsafe { with_rows!(m, pair16::<_>(format, [first, second], x, k, dots)) }
    }

    // `i` picks a row of x and the accumulator of both weight rows for it.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn pair16<const M: usize>(
        format: BlockFormat,
        rows: [&[u8]; 2],
        x: &[f32],
        k: usize,
        dots: &mut [[f32; MAX_ROWS]; 2],
    ) {
        let block_bytes = format.block().1;
        // SAFETY: see `small_blocks`; every load below lies inside the rows or `x`.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); M]; 2];
            for b in 0..rows[0].len() / block_bytes {
                let blocks = [rows[0].as_ptr().add(b * block_bytes), rows[1].as_ptr().add(b * block_bytes)];
                let d = [_mm512_set1_ps(scale(blocks[0])), _mm512_set1_ps(scale(blocks[1]))];
                let q = [widen16(format, blocks[0]), widen16(format, blocks[1])];
                for i in 0..M {
                    let xs = x.as_ptr().add(i * k + b * 32);
                    let (low, high) = (_mm512_loadu_ps(xs), _mm512_loadu_ps(xs.add(16)));
                    for r in 0..2 {
                        let s = _mm512_fmadd_ps(q[r][1], high, _mm512_mul_ps(q[r][0], low));
                        acc[r][i] = _mm512_fmadd_ps(d[r], s, acc[r][i]);
                    }
                }
            }
            for (row_dots, sums) in dots.iter_mut().zip(acc) {
                for (dot, sum) in row_dots.iter_mut().zip(sums) {
                    *dot = _mm512_reduce_add_ps(sum);
                }
            }
        }
    }

    /// The block's 32 values as two vectors of f32 (weights 0–15, 16–31).
    #[inline(always)]
    unsafe fn widen16(format: BlockFormat, block: *const u8) -> [__m512; 2] {
        // SAFETY: as `signed_bytes`.
        unsafe {
            let (low, high) = signed_bytes(format, block);
            [_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(low)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(high))]
        }
    }

    #[inline(always)]
    unsafe fn rows16<const M: usize>(format: BlockFormat, row: &[u8], x: &[f32], k: usize, dots: &mut [f32; MAX_ROWS]) {
        let block_bytes = format.block().1;
        // SAFETY: see `small_blocks`; every load below lies inside `row` or `x`.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); M];
            for b in 0..row.len() / block_bytes {
                let block = row.as_ptr().add(b * block_bytes);
                let d = _mm512_set1_ps(scale(block));
                let q = widen16(format, block);
                for (i, sum) in acc.iter_mut().enumerate() {
                    let xs = x.as_ptr().add(i * k + b * 32);
                    let s = _mm512_mul_ps(q[0], _mm512_loadu_ps(xs));
                    let s = _mm512_fmadd_ps(q[1], _mm512_loadu_ps(xs.add(16)), s);
                    *sum = _mm512_fmadd_ps(d, s, *sum);
                }
            }
            for (dot, sum) in dots.iter_mut().zip(acc) {
                *dot = _mm512_reduce_add_ps(sum);
            }
        }
    }

    #[inline(always)]
    unsafe fn rows<const M: usize>(format: BlockFormat, row: &[u8], x: &[f32], k: usize, dots: &mut [f32; MAX_ROWS]) {
        let block_bytes = format.block().1;
        // SAFETY: see `small_blocks`; every load below lies inside `row` or `x`.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); M];
            for b in 0..row.len() / block_bytes {
                let block = row.as_ptr().add(b * block_bytes);
                let d = _mm256_set1_ps(scale(block));
                let q = widen(format, block);
                for (i, sum) in acc.iter_mut().enumerate() {
                    let xs = x.as_ptr().add(i * k + b * 32);
                    let mut s = _mm256_mul_ps(q[0], _mm256_loadu_ps(xs));
                    s = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xs.add(8)), s);
                    s = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xs.add(16)), s);
                    s = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xs.add(24)), s);
                    *sum = _mm256_fmadd_ps(d, s, *sum);
                }
            }
            for (dot, sum) in dots.iter_mut().zip(acc) {
                let halves = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
                let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
                *dot = _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
            }
        }
    }
}

#[cfg(test)]
mod tests;
