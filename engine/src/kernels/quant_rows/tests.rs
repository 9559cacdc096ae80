use super::*;
use crate::kernels::quant::dequantize;
use crate::synth::SplitMix64;

/// `count` blocks of random bytes whose f16 scales are random too (signed, finite,
/// of different sizes), so that every scale and minimum enters the products.
pub(super) fn random_blocks(format: BlockFormat, count: usize, seed: u64) -> Vec<u8> {
    let mut bytes = crate::kernels::quant::sample_blocks(format, count, seed);
    let mut rng = SplitMix64::new(seed ^ 0x5CA1E);
    for block in bytes.chunks_exact_mut(format.block().1) {
        for i in 0..crate::kernels::quant::scale_count(format) {
            let scale = rng.next_signed() * 0.05;
            crate::kernels::quant::set_scale(format, block, i, half::f16::from_f32(scale));
        }
    }
    bytes
}

fn random_x(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..len).map(|_| rng.next_signed()).collect()
}

/// `(x[i] · w[r], Σ |x[i]·w[r]|)` in f64 over the reference decoding, indexed
/// [r][i]: the value a kernel must give, and the size its rounding scales with.
fn reference(format: BlockFormat, w: &[u8], rows: usize, x: &[f32], m: usize, k: usize) -> Vec<Vec<(f64, f64)>> {
    let mut decoded = vec![0.0f32; rows * k];
    dequantize(format, w, &mut decoded);
    let dot = |r: usize, i: usize| {
        let products = (0..k).map(|c| decoded[r * k + c] as f64 * x[i * k + c] as f64);
        products.fold((0.0, 0.0), |(sum, size), p| (sum + p, size + p.abs()))
    };
    (0..rows).map(|r| (0..m).map(|i| dot(r, i)).collect()).collect()
}

/// `got` is within float rounding of `want`: 1e-5 of the sum of |products|.
fn assert_close(what: &str, got: f32, (want, size): (f64, f64)) {
    assert!((got as f64 - want).abs() <= 1e-5 * size, "{what}: {got} vs {want} (Σ|products| {size})");
}

/// A kernel's name and a call of it giving the dots of two weight rows with m rows
/// of x: `(format, rows, x, m, k) -> dots[row][i]`.
#[cfg(target_arch = "x86_64")]
type Kernel = (&'static str, fn(BlockFormat, [&[u8]; 2], &[f32], usize, usize) -> [[f32; MAX_ROWS]; 2]);

/// The x86 kernels for the K-quants that this CPU runs, called directly (not
/// through the dispatch, so that a fallback cannot stand in for them).
#[cfg(target_arch = "x86_64")]
fn k_kernels() -> Vec<Kernel> {
    let mut kernels: Vec<Kernel> = Vec::new();
    if SimdPath::Avx2.supported() {
        kernels.push(("avx2", |format, rows, x, m, k| {
            let mut dots = [[f32::NAN; MAX_ROWS]; 2];
            // SAFETY: AVX2, FMA and F16C are present; the test sizes rows and x.
            unsafe { k_quants::k_blocks(format, rows[0], x, m, k, &mut dots[0]) };
            // SAFETY: as above.
            unsafe { k_quants::k_blocks(format, rows[1], x, m, k, &mut dots[1]) };
            dots
        }));
    }
    if k_quants::avx512_present() {
        kernels.push(("avx512", |format, rows, x, m, k| {
            let mut dots = [[f32::NAN; MAX_ROWS]; 2];
            // SAFETY: the kernel's features are present; the test sizes rows and x.
            unsafe { k_quants::k_blocks_avx512(format, rows[0], x, m, k, &mut dots[0]) };
            // SAFETY: as above.
            unsafe { k_quants::k_blocks_avx512(format, rows[1], x, m, k, &mut dots[1]) };
            dots
        }));
        kernels.push(("avx512 pairs", |format, rows, x, m, k| {
            let mut dots = [[f32::NAN; MAX_ROWS]; 2];
            // SAFETY: as above.
            unsafe { k_quants::k_two_rows_avx512(format, rows[0], rows[1], x, m, k, &mut dots) };
            dots
        }));
    }
    kernels
}

/// Each K-quant kernel this CPU has against the portable body and the f64
/// product over the reference decoding: 1 to MAX_ROWS rows of x, one, three and
/// five super-blocks per row.
#[cfg(target_arch = "x86_64")]
#[test]
fn k_quant_kernels_match_the_portable_body_and_the_reference() {
    let kernels = k_kernels();
    // Whatever this CPU has is tested (the build machine has all three).
    use std::arch::is_x86_feature_detected as has;
    let expected = if has!("avx512f") && has!("avx512vl") && has!("avx512bw") { 3 } else { has!("avx2") as usize };
    assert_eq!(kernels.len(), expected, "the kernels this CPU runs are all tested");
    for format in [BlockFormat::Q4K, BlockFormat::Q5K, BlockFormat::Q6K] {
        for blocks in [1, 3, 5] {
            let rows = 3;
            let w = random_blocks(format, rows * blocks, 17 * blocks as u64);
            for m in 1..=MAX_ROWS {
                let x = random_x(m * 256 * blocks, 100 + m as u64);
                check_k_kernels(&kernels, format, &w, rows, &x, m);
            }
        }
    }
}

/// `k_quant_kernels_match_the_portable_body_and_the_reference` for one matrix of
/// `rows` rows and one x of m rows.
#[cfg(target_arch = "x86_64")]
fn check_k_kernels(kernels: &[Kernel], format: BlockFormat, w: &[u8], rows: usize, x: &[f32], m: usize) {
    let k = x.len() / m;
    let want = reference(format, w, rows, x, m, k);
    let row_bytes = w.len() / rows;
    let row = |r: usize| &w[r % rows * row_bytes..][..row_bytes];
    for r in 0..rows {
        let mut portable = [f32::NAN; MAX_ROWS];
        by_format(format, row(r), x, m, k, &mut portable);
        for (name, kernel) in kernels.iter().copied().chain([("portable", portable_kernel as _)]) {
            let dots = kernel(format, [row(r), row(r + 1)], x, m, k);
            for (s, dots) in dots.iter().enumerate() {
                for i in 0..m {
                    let what = format!("{} {name} k={k} m={m} row {}.{i}", format.name(), (r + s) % rows);
                    assert_close(&what, dots[i], want[(r + s) % rows][i]);
                    // Both within rounding of the reference, so of each other.
                    let apart = (dots[i] - portable[i]).abs() as f64;
                    assert!(s == 1 || apart <= 2e-5 * want[r][i].1, "{what}: {} vs portable {}", dots[i], portable[i]);
                }
            }
        }
    }
}

/// The portable body as a `Kernel`, for the same checks.
#[cfg(target_arch = "x86_64")]
fn portable_kernel(format: BlockFormat, rows: [&[u8]; 2], x: &[f32], m: usize, k: usize) -> [[f32; MAX_ROWS]; 2] {
    let mut dots = [[f32::NAN; MAX_ROWS]; 2];
    for (row, dots) in rows.into_iter().zip(&mut dots) {
        by_format(format, row, x, m, k, dots);
    }
    dots
}

/// Through the dispatch: every path this CPU supports, every format, 1 to MAX_ROWS
/// rows of x, an odd number of weight rows (pairs and a single row) and of
/// super-blocks, into the middle columns of a wider output.
#[test]
fn quant_rows_on_every_path_matches_the_reference() {
    let paths: Vec<SimdPath> =
        [SimdPath::Scalar, SimdPath::Avx2, SimdPath::Avx512].into_iter().filter(|p| p.supported()).collect();
    let (rows, k) = (5, 768);
    for format in BlockFormat::ALL {
        let blocks = rows * k / format.block().0;
        let w = random_blocks(format, blocks, 3);
        let matrix = QuantMatrix { bytes: &w, format, rows, cols: k, order: BlockOrder::Rows };
        for m in 1..=MAX_ROWS {
            let x = random_x(m * k, m as u64);
            let want = reference(format, &w, rows, &x, m, k);
            let (stride, col0) = (rows + 3, 2);
            for &path in &paths {
                let mut out = vec![-7.0f32; m * stride];
                quant_rows(path, &x, m, matrix, &mut out, stride, col0);
                for i in 0..m {
                    for c in 0..stride {
                        let got = out[i * stride + c];
                        let what = format!("{} {} m={m} row {i} col {c}", format.name(), path.name());
                        if (col0..col0 + rows).contains(&c) {
                            assert_close(&what, got, want[c - col0][i]);
                        } else {
                            assert_eq!(got, -7.0, "{what}: outside the product");
                        }
                    }
                }
            }
        }
    }
}

/// The float-activation products read rows: over weights interleaved by eights they
/// give the same bits as over the same weights in row order.
#[test]
fn float_activations_over_interleaved_weights_match_row_order() {
    let (rows, k) = (19, 512);
    for format in BlockFormat::ALL {
        let w = random_blocks(format, rows * k / format.block().0, 5);
        let mut interleaved = w.clone();
        interleave(format, rows, k, &mut interleaved);
        let by_rows = QuantMatrix { bytes: &w, format, rows, cols: k, order: BlockOrder::Rows };
        let by_eights = QuantMatrix { bytes: &interleaved, order: BlockOrder::EightRows, ..by_rows };
        for m in [1, 3, 40] {
            let x = random_x(m * k, 9);
            let mut outputs = Vec::new();
            for matrix in [by_rows, by_eights] {
                let mut out = vec![0.0f32; m * rows];
                match crate::kernels::simd_path().filter(|_| m <= MAX_ROWS) {
                    Some(path) => quant_rows(path, &x, m, matrix, &mut out, rows, 0),
                    None => quant_converted(&x, m, matrix, &mut out, rows, 0),
                }
                outputs.push(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            }
            assert_eq!(outputs[0], outputs[1], "{} m={m}", format.name());
        }
    }
}
