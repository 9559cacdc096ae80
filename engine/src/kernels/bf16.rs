//! Products over bf16 weights with x rounded to bf16 (`Activations::Bf16`): llama.cpp's
//! numerics for bf16 files (it rounds x to bf16 before every product over bf16 weights),
//! and the numerics under which the CPU's bf16 matrix instructions apply. Every product of
//! two bf16 values is exact in f32, so what differs from the f32 path is the rounding of x
//! alone, the same for every row count and every machine: a row's result never depends
//! on the path that computed it beyond f32 summation order, as between the GEMM and the
//! few-row kernels.
//!
//! Many rows (prefill, large batches) run on AMX tiles where the CPU and the kernel allow
//! them (`amx`), at several times the f32 rate. Few rows (decoding) run on AVX512-BF16
//! pair products where the CPU has them (`pairs`: no widening of the weights, two
//! products per lane and instruction). Elsewhere x is rounded and the f32 kernels
//! multiply it.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod pairs;

use super::{linear_for, Matrix, Rows, ROW_INDEPENDENT_ROWS};
use ferry_core::model::Dtype;

/// The bf16 value nearest `v` (ties to even; NaN stays NaN, quieted), as its bits: the
/// `half` crate's rounding, written without branches so packing loops vectorize (it took
/// an eighth of a prefill through `half`).
#[inline(always)]
pub fn round_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let nan = (bits >> 16) | 0x40;
    (if bits & 0x7fff_ffff > 0x7f80_0000 { nan } else { rounded }) as u16
}

/// `v` rounded to the nearest bf16, as f32.
pub fn round(v: f32) -> f32 {
    f32::from_bits((round_bits(v) as u32) << 16)
}

/// The instructions `linear_bf16` multiplies many rows with on this machine: "amx", or
/// "f32" where the CPU or the kernel does not offer AMX (`FERRY_AMX=off` turns it off).
pub fn matrix_path() -> &'static str {
    if amx_available() {
        "amx"
    } else {
        "f32"
    }
}

/// The instructions `linear_bf16` multiplies few rows with on this machine: "pairs"
/// (AVX512-BF16), or "f32" where the CPU lacks it (`FERRY_BF16_PAIRS=off` turns it off).
pub fn few_rows_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if pairs::available() {
        return "pairs";
    }
    "f32"
}

fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[:, col0 .. col0 + w.rows] = round_bf16(x) · wᵀ` for bf16 `w` (other dtypes: the
/// plain `linear`, x unrounded), `out` being `out_stride` columns wide.
pub fn linear_bf16(x: &[f32], m: usize, w: Matrix, out: &mut [f32], out_stride: usize, col0: usize) {
    linear_bf16_for(x, Rows::all(m), w, out, out_stride, col0)
}

/// `linear_bf16` with the kernel `rows.kernel_for` rows take (see `Rows`).
pub fn linear_bf16_for(x: &[f32], rows: Rows, w: Matrix, out: &mut [f32], out_stride: usize, col0: usize) {
    if w.dtype != Dtype::Bf16 {
        return linear_for(x, rows, w, out, out_stride, col0);
    }
    // The few-row kernels where the rows ask for them, and for a matrix small enough
    // that any row count takes them (`linear`): its rows' bits never follow the count.
    let few = rows.few() || w.rows <= ROW_INDEPENDENT_ROWS;
    #[cfg(target_arch = "x86_64")]
    if !few && amx::fits(w) && amx::available() {
        return amx::linear(x, rows.count, w, out, out_stride, col0);
    }
    let m = rows.count;
    #[cfg(target_arch = "x86_64")]
    if few && pairs::available() {
        // x as bf16 bits, MAX_ROWS rows at a time (the pair products' limit).
        let mut bits = ROUNDED_BITS.take();
        bits.clear();
        bits.extend(x[..m * w.cols].iter().map(|&v| round_bits(v)));
        super::in_row_groups(&bits, m, w.cols, out, out_stride, |x, group, out| {
            pairs::linear(x, group, w, out, out_stride, col0)
        });
        ROUNDED_BITS.set(bits);
        return;
    }
    let mut rounded = ROUNDED.take();
    rounded.clear();
    rounded.extend(x[..m * w.cols].iter().map(|&v| round(v)));
    linear_for(&rounded, rows, w, out, out_stride, col0);
    ROUNDED.set(rounded);
}

thread_local! {
    /// The calling thread's rounded x for the f32 kernels, reused across products (a
    /// decoding step makes several per layer). Taken out, not borrowed, while the
    /// product runs: a pool thread waiting inside a parallel product may run another
    /// product on its stack, which then finds an empty buffer, not a borrow in use.
    static ROUNDED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// The same as bf16 bits, for the pair products.
    static ROUNDED_BITS: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
}

#[cfg(test)]
mod tests;
