//! Products over block-quantized weights with the activations quantized to 8 bits, the
//! way llama.cpp computes them: each row of x becomes blocks of 32 signed bytes and a
//! scale (`d = max|x| ÷ 127`, values rounded to the nearest step), and a block's
//! product is an integer sum of byte products scaled once by both blocks' scales.
//! Multiplying bytes instead of floats decodes no weight to f32, so one row is bound
//! by memory bandwidth rather than by the widening (see BENCHMARKS.md), and many rows
//! need no f32 copy of the weights at all.
//!
//! The price is the rounding of x: each product moves by at most half an activation
//! step times Σ|w| (the tests hold it to that bound). And rounding makes the result
//! jump where a value of x sits on a boundary between steps: an x that differs in its
//! last bit (another order of additions upstream) can move the next layer's input by
//! a whole step, and the logits by about 1 % on the test model. So that plans still
//! give identical tokens, a product's value for one row of x and one weight row is
//! the same bits on every path, whatever rows of x or weights are computed beside it:
//! each block's integer sum (exact), minus Q4_0's offset, is converted to f32 and
//! multiplied by `d_w · d_x` into the row's sum with one fused multiply-add, block
//! after block. The x86 kernel does this for eight weight rows at once, one lane each;
//! the one-row body does it with `mul_add`. Q4_K and Q6_K, whose sub-blocks carry
//! their own integer scales, follow the same scheme in `k_quants`.

use std::cell::RefCell;

use rayon::prelude::*;

use super::order::{has_eight_row_kernels, Strides, SCALE_BYTES};
use super::GROUP_ROWS;
use super::{BlockOrder, QuantMatrix, ROWS_PER_TASK};
use crate::kernels::quant::grids::is_grid;
use crate::kernels::quant::{iq4_xs_scale, BlockFormat, IQ4_VALUES};
use crate::kernels::{in_pool, SendPtr, SimdPath, MAX_ROWS};

/// An x86 kernel's two entry points over one body generic in `VNNI`: `$name` with
/// AVX2 (`maddubs`), `$vnni` with AVX-512 VNNI's byte products (the same bits). Each
/// is `unsafe` as its body is: the caller vouches for the slices' bounds.
#[cfg(target_arch = "x86_64")]
macro_rules! avx2_and_vnni {
    ($(#[$doc:meta])* $name:ident, $vnni:ident => $body:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(in crate::kernels::quant_rows::q8) unsafe fn $name($($arg: $ty),*) {
            // SAFETY: as the caller vouches.
            unsafe { $body::<false>($($arg),*) }
        }

        #[doc = concat!("`", stringify!($name), "` with AVX-512 VNNI's byte products: the same bits.")]
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
        pub(in crate::kernels::quant_rows::q8) unsafe fn $vnni($($arg: $ty),*) {
            // SAFETY: as the caller vouches.
            unsafe { $body::<true>($($arg),*) }
        }
    };
}

mod grids;
mod k_quants;

/// Values per block of quantized activations (Q8_0's and Q4_0's block size).
const BLOCK: usize = 32;

/// How activations (x) meet weights in the engine's products: rounded for block-quantized
/// weights (`Q8`, `Bf16`) and for bf16 weights (`Bf16`, the default: llama.cpp's numerics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activations {
    /// Quantized to 8 bits per block of 32 (llama.cpp's speed; its numerics for
    /// Q8_0 and Q4_0, where it also rounds x in blocks of 32).
    Q8,
    /// Always f32: products within float rounding of "dequantize, then multiply".
    F32,
    /// As `Q8` for block-quantized weights, and x rounded to bf16 before every product
    /// over bf16 weights (llama.cpp's numerics for bf16 files): many rows then multiply on
    /// the CPU's AMX tiles where it has them (`kernels::linear_bf16`).
    #[default]
    Bf16,
}

impl Activations {
    pub const ALL: [Activations; 3] = [Activations::Q8, Activations::F32, Activations::Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Activations::Q8 => "q8",
            Activations::F32 => "f32",
            Activations::Bf16 => "bf16",
        }
    }

    /// Whether products over block-quantized weights round x to 8 bits.
    pub fn quantize_for_blocks(self) -> bool {
        self != Activations::F32
    }

    pub fn parse(name: &str) -> Option<Activations> {
        Activations::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// Rows of x quantized in blocks of 32: `quants[i·k + c]`, `scales[i·(k/32) + b]`,
/// each block's sum of quants (`sums`, for Q4_0's offset of 8 and, times the
/// block's scale, Q4_K's minimums) and of its first 16 (`halves`, for Q6_K's offset
/// of 32 where its sub-blocks of 16 are summed apart; filled only where asked for,
/// as the Q6_K products ask).
#[derive(Default)]
pub(crate) struct Q8Rows {
    quants: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
    halves: Vec<i32>,
    k: usize,
}

/// Some rows of a `Q8Rows`, as the kernels read them (row 0 is the first of them).
struct QuantizedX<'a> {
    quants: &'a [i8],
    scales: &'a [f32],
    sums: &'a [i32],
    halves: &'a [i32],
}

impl Q8Rows {
    /// Quantizes `m` rows of `k` values (k a multiple of 32) from `x`, with the
    /// blocks' half sums where `halves` says (the Q6_K products read them).
    pub(crate) fn quantize(&mut self, x: &[f32], m: usize, k: usize, halves: bool) {
        assert!(k.is_multiple_of(BLOCK) && x.len() >= m * k, "q8 activations: {m} rows of {k}");
        self.k = k;
        self.quants.resize(m * k, 0);
        self.scales.resize(m * k / BLOCK, 0.0);
        self.sums.resize(m * k / BLOCK, 0);
        self.halves.resize(m * k / BLOCK, 0);
        let x = &x[..m * k];
        let out = Quantized {
            quants: &mut self.quants[..],
            scales: &mut self.scales[..],
            sums: &mut self.sums[..],
            halves: halves.then_some(&mut self.halves[..]),
        };
        match crate::kernels::simd_path() {
            // SAFETY: the path is one this CPU supports.
            #[cfg(target_arch = "x86_64")]
            Some(SimdPath::Avx512) => unsafe { quantize_avx512(x, out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Some(SimdPath::Avx2) => unsafe { quantize_avx2(x, out) },
            _ => quantize_blocks::<false>(x, out),
        }
    }

    /// Rows `first .. first + rows`.
    fn rows(&self, first: usize, rows: usize) -> QuantizedX<'_> {
        let (k, blocks) = (self.k, self.k / BLOCK);
        QuantizedX {
            quants: &self.quants[first * k..(first + rows) * k],
            scales: &self.scales[first * blocks..(first + rows) * blocks],
            sums: &self.sums[first * blocks..(first + rows) * blocks],
            halves: &self.halves[first * blocks..(first + rows) * blocks],
        }
    }

    /// Row `i`'s values times its block scales, as f32 (what the products multiply).
    #[cfg(test)]
    fn dequantized_row(&self, i: usize) -> Vec<f32> {
        let quants = &self.quants[i * self.k..(i + 1) * self.k];
        let scales = &self.scales[i * self.k / BLOCK..(i + 1) * self.k / BLOCK];
        quants.chunks_exact(BLOCK).zip(scales).flat_map(|(q, &d)| q.iter().map(move |&v| v as f32 * d)).collect()
    }
}

/// Where `quantize_blocks` writes: a `Q8Rows`' vectors, each as long as x needs.
struct Quantized<'a> {
    quants: &'a mut [i8],
    scales: &'a mut [f32],
    sums: &'a mut [i32],
    halves: Option<&'a mut [i32]>,
}

/// Every block of `x` into `quants`, `scales`, `sums` (each block's Σq) and, where
/// given, `halves` (Σq over its first 16): every block's scale first, then every
/// block's values, so that one block's divisions and reductions do not wait on the
/// last one's (the same values as block by block).
#[inline(always)]
fn quantize_blocks<const VECTOR: bool>(x: &[f32], out: Quantized) {
    for (values, scale) in x.chunks_exact(BLOCK).zip(out.scales.iter_mut()) {
        *scale = block_scale(values);
    }
    let blocks = x.chunks_exact(BLOCK).zip(out.quants.chunks_exact_mut(BLOCK));
    for (((values, quants), &scale), sum) in blocks.zip(out.scales.iter()).zip(out.sums.iter_mut()) {
        *sum = round_block::<VECTOR>(values, scale, quants);
    }
    if let Some(halves) = out.halves {
        for (half, quants) in halves.iter_mut().zip(out.quants.chunks_exact(BLOCK)) {
            *half = quants[..BLOCK / 2].iter().map(|&q| q as i32).sum();
        }
    }
}

/// `quantize_blocks` compiled for AVX-512: the same values, in vector registers 16
/// wide (a row of 2 048 took 4.5 µs for the baseline's SSE2, 5 632 took 12.3 — on one
/// thread, before every product, while the others wait).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_avx512(x: &[f32], out: Quantized) {
    quantize_blocks::<true>(x, out)
}

/// `quantize_blocks` compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], out: Quantized) {
    quantize_blocks::<true>(x, out)
}

/// One block: `d = max|x| ÷ 127`, `q = round(x ÷ d)` (half away from zero, as C's
/// `roundf`), and Σq. A NaN or infinite value makes the scale NaN, so that it reaches
/// the product instead of rounding to a byte. Written without calls (`f32::round` is
/// one into libm per value) so that it compiles to vector instructions: quantizing
/// the input of every product runs on one thread while the others wait.
#[cfg(test)]
fn quantize_block<const VECTOR: bool>(values: &[f32], quants: &mut [i8]) -> (f32, i32) {
    let d = block_scale(values);
    (d, round_block::<VECTOR>(values, d, quants))
}

/// A block's scale `d = max|x| ÷ 127`, NaN where a value is not finite.
#[inline(always)]
fn block_scale(values: &[f32]) -> f32 {
    // Eight lanes apiece, so that the reductions vectorize. v · 0 is 0 for a finite v
    // and NaN otherwise, and NaN survives the sums.
    let (mut largest, mut poison) = ([0.0f32; 8], [0.0f32; 8]);
    for chunk in values.chunks_exact(8) {
        for lane in 0..8 {
            // A plain comparison, not `f32::max`'s NaN rules (NaN is `poison`'s).
            let size = chunk[lane].abs();
            largest[lane] = if size > largest[lane] { size } else { largest[lane] };
            poison[lane] += chunk[lane] * 0.0;
        }
    }
    let pairs: [f32; 4] =
        std::array::from_fn(|i| if largest[i + 4] > largest[i] { largest[i + 4] } else { largest[i] });
    let amax = pairs.iter().fold(0.0f32, |a, &v| if v > a { v } else { a });
    if poison.iter().sum::<f32>() != 0.0 {
        return f32::NAN;
    }
    amax / 127.0
}

/// The block's values rounded to steps of `d` (zeros where `d` is NaN) into `quants`;
/// returns their sum.
#[inline(always)]
fn round_block<const VECTOR: bool>(values: &[f32], d: f32, quants: &mut [i8]) -> i32 {
    if d.is_nan() {
        quants.fill(0);
        return 0;
    }
    let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for (q, v) in quants.iter_mut().zip(values) {
        let scaled = v * inverse;
        // |scaled| ≤ 127 up to rounding: truncated, what was cut off is exact in f32;
        // half a step or more moves the value away from zero. `VECTOR` (compiled with
        // SSE4.1 or later) truncates in floats, which vectorizes, where the saturating
        // cast does not; elsewhere `trunc` is a call. The same bytes either way.
        let rounded = if VECTOR {
            let truncated = scaled.trunc();
            let away = if (scaled - truncated).abs() >= 0.5 { 1.0f32.copysign(scaled) } else { 0.0 };
            // A NaN (0 × an infinite inverse of a subnormal scale) is 0, as the cast
            // below makes it. The integer, exact in f32 and within ±127, is read from
            // the low mantissa bits of its sum with 1.5 · 2²³: Rust's saturating
            // float-to-integer cast does not vectorize.
            let rounded = (truncated + away).clamp(-127.0, 127.0);
            let rounded = if rounded.is_nan() { 0.0 } else { rounded };
            const MAGIC: f32 = 12_582_912.0;
            (rounded + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
        } else {
            let truncated = scaled as i32;
            let away = ((scaled - truncated as f32).abs() >= 0.5) as i32;
            // Saturating: an infinite `scaled` (a subnormal block's scale) casts to
            // i32::MAX, which one more step would wrap to −127.
            let rounded = if scaled < 0.0 { truncated.saturating_sub(away) } else { truncated.saturating_add(away) };
            rounded.clamp(-127, 127)
        };
        *q = rounded as i8;
        sum += rounded;
    }
    sum
}

thread_local! {
    /// The caller's quantized x, reused between products.
    static QUANTIZED: RefCell<Q8Rows> = RefCell::default();
}

/// `out[:, col0 .. col0 + w.rows] = x · wᵀ` for any number of rows of x, with x
/// quantized to 8 bits; `out` rows are `out_stride` wide.
pub fn linear_q8(path: SimdPath, x: &[f32], m: usize, w: QuantMatrix, out: &mut [f32], out_stride: usize, col0: usize) {
    w.check();
    let k = w.cols;
    assert!(x.len() >= m * k, "linear_q8: {m} rows of {k}");
    assert!(col0 + w.rows <= out_stride && out.len() >= m * out_stride, "linear_q8: output too small");
    let path = if path.supported() { path } else { SimdPath::Scalar };
    // Only the eight-row kernels read interleaved groups; the one-row body reads rows.
    let in_rows;
    let w = if w.order == BlockOrder::EightRows && !has_eight_row_kernels(path) {
        in_rows = w.in_row_order();
        QuantMatrix { bytes: &in_rows, order: BlockOrder::Rows, ..w }
    } else {
        w
    };
    QUANTIZED.with_borrow_mut(|xq| {
        xq.quantize(x, m, k, matches!(w.format, BlockFormat::Q6K | BlockFormat::Q3K | BlockFormat::Q2K));
        products(path, xq, m, w, out, out_stride, col0);
    });
}

/// The products of quantized x with every row of `w`: tasks of `ROWS_PER_TASK` weight
/// rows in parallel; within a task, eight weight rows at a time (their blocks stay in
/// the L1 cache) times every row of x, in groups of up to `MAX_ROWS` rows.
fn products(path: SimdPath, xq: &Q8Rows, m: usize, w: QuantMatrix, out: &mut [f32], out_stride: usize, col0: usize) {
    let row_bytes = w.row_bytes();
    let out_ptr = SendPtr(out.as_mut_ptr());
    // SAFETY: each task alone writes columns col0 + first .. col0 + last, its weight
    // rows; `linear_q8`'s asserts keep every index inside `out`.
    let write = |i: usize, j: usize, dot: f32| unsafe { *out_ptr.get().add(i * out_stride + col0 + j) = dot };
    // Chosen once per product, not per eight weight rows.
    let vnni = takes_vnni(path);
    in_pool(|| {
        (0..w.rows.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(|task| {
            let first = task * ROWS_PER_TASK;
            let last = (first + ROWS_PER_TASK).min(w.rows);
            // Eight weight rows at a time where the path has that kernel, the rest one
            // at a time: both compute the same bits (see the module's docs).
            let mut j = first;
            while j + EIGHT <= last {
                let emit = &mut |group: usize, rows: usize, eight: &[[f32; EIGHT]; MAX_ROWS]| {
                    for (i, row_dots) in eight[..rows].iter().enumerate() {
                        for (r, &dot) in row_dots.iter().enumerate() {
                            write(group + i, j + r, dot);
                        }
                    }
                };
                if !eight_rows_dots(path, vnni, &w, j, xq, m, emit) {
                    break;
                }
                j += EIGHT;
            }
            let mut dots = [0.0f32; MAX_ROWS];
            for j in j..last {
                let row = &w.bytes[j * row_bytes..(j + 1) * row_bytes];
                for group in (0..m).step_by(MAX_ROWS) {
                    let rows = MAX_ROWS.min(m - group);
                    row_dots(path, w.format, row, xq, group, rows, &mut dots);
                    for (i, &dot) in dots[..rows].iter().enumerate() {
                        write(group + i, j, dot);
                    }
                }
            }
        })
    });
}

/// Weight rows the x86 kernel multiplies at once.
const EIGHT: usize = super::GROUP_ROWS;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each thread's eight weight rows transposed (`x86::transpose_set`), reused.
    static SET: RefCell<Vec<x86::EightBlocks>> = const { RefCell::new(Vec::new()) };
    /// The same for the K-quants (`k_quants::x86::transpose_set`).
    static K_SET: RefCell<Vec<k_quants::x86::KBlocks>> = const { RefCell::new(Vec::new()) };
}

/// Receives `(first, rows, dots)`: rows `first .. first + rows` of x times eight weight
/// rows, `dots[i][r]` for row `first + i` of x and weight row r.
type Emit<'a> = &'a mut dyn FnMut(usize, usize, &[[f32; EIGHT]; MAX_ROWS]);

/// Fills `dots` with a group of rows of x (its `rows` rows) times eight weight rows.
#[cfg(target_arch = "x86_64")]
type Multiply<'a> = &'a mut dyn FnMut(&QuantizedX, usize, &mut [[f32; EIGHT]; MAX_ROWS]);

/// `emit(first, rows, dots)` with `dots[i][r] = x[first + i] · w row (j + r)` for
/// eight weight rows and every group of up to `MAX_ROWS` rows of x, where the path
/// has a kernel for it (false elsewhere). More than one group of rows of x (a
/// prefill) transposes the eight rows' blocks once for all the groups; one group
/// transposes each block in registers as it goes.
#[allow(unused_variables)]
fn eight_rows_dots(path: SimdPath, vnni: bool, w: &QuantMatrix, j: usize, xq: &Q8Rows, m: usize, emit: Emit) -> bool {
    #[cfg(target_arch = "x86_64")]
    if has_eight_row_kernels(path) {
        let (row_bytes, k) = (w.row_bytes(), xq.k);
        // A group's bytes are the same in either order; the strides say where its blocks are.
        let weights = &w.bytes[j * row_bytes..(j + EIGHT) * row_bytes];
        let strides = Strides::of(w.order, w.format, row_bytes);
        let transpose_once = m > MAX_ROWS;
        let mut dots = [[0.0f32; EIGHT]; MAX_ROWS];
        let mut groups = |multiply: Multiply| {
            for group in (0..m).step_by(MAX_ROWS) {
                let rows = MAX_ROWS.min(m - group);
                multiply(&xq.rows(group, rows), rows, &mut dots);
                emit(group, rows, &dots);
            }
        };
        let format = w.format;
        // SAFETY (each call): as in `row_dots`; `weights` holds eight whole rows, `x`
        // the group's rows.
        match format {
            _ if is_grid(format) => {
                groups(&mut |x, rows, dots| grid_dots(path, format, weights, strides, EIGHT, x, rows, k, dots))
            }
            _ if per_block(format) && transpose_once => SET.with_borrow_mut(|set| {
                unsafe { x86::transpose_set(format, vnni, weights, strides, k, set) };
                let from_columns = if vnni { x86::from_columns_vnni } else { x86::from_columns };
                groups(&mut |x, rows, dots| unsafe { from_columns(format, set, x, rows, k, dots) })
            }),
            _ if per_block(format) => {
                let eight_rows = if vnni { x86::eight_rows_vnni } else { x86::eight_rows };
                groups(&mut |x, rows, dots| unsafe { eight_rows(format, weights, strides, x, rows, k, dots) })
            }
            // Resident K-quants come transposed (`order::KGroup`): `eight_rows` reads them.
            _ if transpose_once && !strides.transposed => K_SET.with_borrow_mut(|set| {
                unsafe { k_quants::x86::transpose_set(format, weights, strides, k, set) };
                let from_columns = if vnni { k_quants::x86::from_columns_vnni } else { k_quants::x86::from_columns };
                groups(&mut |x, rows, dots| unsafe { from_columns(format, set, x, rows, k, dots) })
            }),
            _ => {
                let eight_rows = if vnni { k_quants::x86::eight_rows_vnni } else { k_quants::x86::eight_rows };
                groups(&mut |x, rows, dots| unsafe { eight_rows(format, weights, strides, x, rows, k, dots) })
            }
        }
        return true;
    }
    false
}

/// `dots[i] = x[first + i] · row` for `rows` rows of quantized x, one weight row on
/// its own (rows left over from groups of eight, and every row off x86).
fn row_dots(
    path: SimdPath,
    format: BlockFormat,
    row: &[u8],
    xq: &Q8Rows,
    first: usize,
    rows: usize,
    dots: &mut [f32; MAX_ROWS],
) {
    let (k, x) = (xq.k, xq.rows(first, rows));
    if is_grid(format) {
        let strides = Strides::of(BlockOrder::Rows, format, row.len());
        let mut eight = [[0.0f32; EIGHT]; MAX_ROWS];
        grid_dots(path, format, row, strides, 1, &x, rows, k, &mut eight);
        for (dot, eight) in dots[..rows].iter_mut().zip(&eight) {
            *dot = eight[0];
        }
        return;
    }
    if !per_block(format) {
        return k_quants::row_dots(format, row, &x, rows, k, dots);
    }
    let blocks = k / BLOCK;
    let mut sums = [0.0f32; MAX_ROWS];
    for b in 0..blocks {
        let (w, d) = decode_block(format, row, b);
        // Q4_1's and Q5_1's minimum: the f16 after the block's scale.
        let min = has_min(format).then(|| {
            let at = b * format.block().1 + 2;
            half::f16::from_le_bytes([row[at], row[at + 1]]).to_f32()
        });
        for (i, sum) in sums[..rows].iter_mut().enumerate() {
            let xs = &x.quants[i * k + b * BLOCK..i * k + (b + 1) * BLOCK];
            let dot: i32 = w.iter().zip(xs).map(|(&a, &b)| a as i32 * b as i32).sum();
            // The operations of a lane of the eight-row kernel, in its order.
            let d_x = x.scales[i * blocks + b];
            *sum = (dot as f32).mul_add(d * d_x, *sum);
            if let Some(min) = min {
                *sum = min.mul_add(d_x * x.sums[i * blocks + b] as f32, *sum);
            }
        }
    }
    dots[..rows].copy_from_slice(&sums[..rows]);
}

/// The lattice formats' products: in vectors where the CPU has AVX2 (`x86::grids`,
/// with VNNI where `takes_vnni`), else the portable body (`grids`); the same bits.
#[allow(clippy::too_many_arguments)]
fn grid_dots(
    path: SimdPath,
    format: BlockFormat,
    weights: &[u8],
    strides: Strides,
    weight_rows: usize,
    x: &QuantizedX,
    rows: usize,
    k: usize,
    dots: &mut [[f32; EIGHT]; MAX_ROWS],
) {
    #[cfg(target_arch = "x86_64")]
    if has_eight_row_kernels(path) {
        let kernel = if takes_vnni(path) { x86::grids::eight_rows_vnni } else { x86::grids::eight_rows };
        // SAFETY: both paths' CPUs have AVX2, FMA and F16C, and `takes_vnni` checked VNNI.
        return unsafe { kernel(format, weights, strides, weight_rows, x, rows, k, dots) };
    }
    grids::eight_rows(format, weights, strides, weight_rows, x, rows, k, dots)
}

/// Whether `format`'s products go block of x by block of x with one float scale per
/// weight block of 32 (`x86`'s kernels): the 32-value formats, and IQ4_XS, whose
/// sub-blocks' scales are its f16 scale times a small integer (exact in f32). The
/// K-quants' integer scales multiply integer sums instead (`k_quants`).
fn per_block(format: BlockFormat) -> bool {
    format.block().0 == BLOCK || format == BlockFormat::IQ4XS
}

/// Whether `format`'s blocks carry a minimum added to every value (Q4_1, Q5_1): their
/// products add `m · d_x · Σx` after the integer sum's `d · d_x · Σ q·x`.
pub(super) fn has_min(format: BlockFormat) -> bool {
    matches!(format, BlockFormat::Q4_1 | BlockFormat::Q5_1)
}

/// Block `b` (of 32 weights) of a row as 32 signed integers and its scale (Q4_1's
/// and Q5_1's values as they are, their minimum apart).
fn decode_block(format: BlockFormat, row: &[u8], b: usize) -> ([i8; BLOCK], f32) {
    let f16_at = |at: usize| half::f16::from_le_bytes([row[at], row[at + 1]]).to_f32();
    let mut q = [0i8; BLOCK];
    if format == BlockFormat::IQ4XS {
        let (block_bytes, j) = (format.block().1, b % 8);
        let block = &row[b / 8 * block_bytes..][..block_bytes];
        for (l, &byte) in block[8 + 16 * j..][..16].iter().enumerate() {
            (q[l], q[l + 16]) = (IQ4_VALUES[(byte & 0x0F) as usize], IQ4_VALUES[(byte >> 4) as usize]);
        }
        return (q, f16_at(b / 8 * block_bytes) * iq4_xs_scale(block, j) as f32);
    }
    let block = &row[b * format.block().1..][..format.block().1];
    let d = f16_at(b * format.block().1);
    match format {
        BlockFormat::IQ4NL => {
            for (l, &byte) in block[2..18].iter().enumerate() {
                (q[l], q[l + 16]) = (IQ4_VALUES[(byte & 0x0F) as usize], IQ4_VALUES[(byte >> 4) as usize]);
            }
        }
        BlockFormat::Q4_0 => {
            for (j, &byte) in block[2..18].iter().enumerate() {
                q[j] = (byte & 0x0F) as i8 - 8;
                q[j + 16] = (byte >> 4) as i8 - 8;
            }
        }
        BlockFormat::Q4_1 => {
            for (j, &byte) in block[4..20].iter().enumerate() {
                (q[j], q[j + 16]) = ((byte & 0x0F) as i8, (byte >> 4) as i8);
            }
        }
        BlockFormat::Q5_1 => {
            let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
            for (j, &byte) in block[8..24].iter().enumerate() {
                q[j] = ((byte & 0x0F) as u32 | ((qh >> j) << 4 & 0x10)) as i8;
                q[j + 16] = ((byte >> 4) as u32 | ((qh >> (j + 12)) & 0x10)) as i8;
            }
        }
        BlockFormat::Q5_0 => {
            let qh = super::super::quant::q5_0_high_bits(block);
            for (j, &byte) in block[6..22].iter().enumerate() {
                q[j] = ((byte & 0x0F) as u32 | ((qh >> j) << 4 & 0x10)) as i8 - 16;
                q[j + 16] = ((byte >> 4) as u32 | ((qh >> (j + 12)) & 0x10)) as i8 - 16;
            }
        }
        _ => {
            for (q, &byte) in q.iter_mut().zip(&block[2..34]) {
                *q = byte as i8;
            }
        }
    }
    (q, d)
}

#[cfg(target_arch = "x86_64")]
mod x86;

/// Whether `path` multiplies 8-bit x with VNNI's byte products: the AVX-512 path, where
/// the CPU has AVX-512 VNNI and `FERRY_VNNI` does not decline it.
fn takes_vnni(path: SimdPath) -> bool {
    #[cfg(target_arch = "x86_64")]
    if matches!(path, SimdPath::Avx512) {
        return x86::has_vnni();
    }
    let _ = path;
    false
}

/// The instructions 8-bit x multiplies block-quantized weights with on the AVX-512
/// path: "vnni" (AVX-512 VNNI, declined by `FERRY_VNNI=off`) or "maddubs".
pub fn byte_products_path() -> &'static str {
    match crate::kernels::simd_path() {
        Some(path) if takes_vnni(path) => "vnni",
        _ => "maddubs",
    }
}

#[cfg(test)]
mod tests;
