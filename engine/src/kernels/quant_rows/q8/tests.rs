use super::*;
use crate::kernels::quant::dequantize;
use crate::kernels::quant_rows::tests::random_blocks;
use crate::synth::SplitMix64;

const FORMATS: [BlockFormat; 19] = BlockFormat::ALL;

/// Blocks of `format` in `weights` weights.
fn blocks(format: BlockFormat, weights: usize) -> usize {
    weights / format.block().0
}

fn random_x(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..len).map(|_| rng.next_signed() * 3.0).collect()
}

/// The paths this CPU runs, each called directly.
fn paths() -> Vec<SimdPath> {
    [SimdPath::Scalar, SimdPath::Avx2, SimdPath::Avx512].into_iter().filter(|p| p.supported()).collect()
}

/// `(Σ w·x, Σ |w·x|)` in f64 over the decoded weights, for weight row `r` and `x_row`.
fn exact(decoded: &[f32], r: usize, x_row: &[f32]) -> (f64, f64) {
    let k = x_row.len();
    let products = decoded[r * k..(r + 1) * k].iter().zip(x_row).map(|(&w, &x)| w as f64 * x as f64);
    products.fold((0.0, 0.0), |(sum, size), p| (sum + p, size + p.abs()))
}

/// Runs `linear_q8` into an output wider than the weights (stride and column offset
/// exercised) and returns out[i][col0 + j] as out[i][j].
fn product(path: SimdPath, format: BlockFormat, w: &[u8], rows: usize, x: &[f32], m: usize, k: usize) -> Vec<Vec<f32>> {
    product_in(BlockOrder::Rows, path, format, w, rows, x, m, k)
}

/// `product` over weights in `order` (`w` already in it).
#[allow(clippy::too_many_arguments)]
fn product_in(
    order: BlockOrder,
    path: SimdPath,
    format: BlockFormat,
    w: &[u8],
    rows: usize,
    x: &[f32],
    m: usize,
    k: usize,
) -> Vec<Vec<f32>> {
    let (stride, col0) = (rows + 5, 3);
    let mut out = vec![f32::NAN; m * stride];
    let matrix = QuantMatrix { bytes: w, format, rows, cols: k, order };
    linear_q8(path, x, m, matrix, &mut out, stride, col0);
    (0..m).map(|i| out[i * stride + col0..i * stride + col0 + rows].to_vec()).collect()
}

#[test]
fn products_equal_the_exact_sums_over_the_quantized_activations_on_every_path() {
    let (rows, k) = (37, 512); // two tasks of weight rows, two K-quant super-blocks
    for format in FORMATS {
        let w = random_blocks(format, blocks(format, rows * k), 7);
        let mut decoded = vec![0.0f32; rows * k];
        dequantize(format, &w, &mut decoded);
        for path in paths() {
            for m in [1, 2, 3, 5, 8, 13, 21] {
                let x = random_x(m * k, 100 + m as u64);
                let mut xq = Q8Rows::default();
                xq.quantize(&x, m, k, false);
                let got = product(path, format, &w, rows, &x, m, k);
                for (i, row) in got.iter().enumerate() {
                    let x_row = xq.dequantized_row(i);
                    for (r, &value) in row.iter().enumerate() {
                        let (want, size) = exact(&decoded, r, &x_row);
                        assert!(
                            (value as f64 - want).abs() <= 1e-5 * size,
                            "{} {path:?} m={m} x row {i} weight row {r}: {value} vs {want}",
                            format.name()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn rounding_the_activations_moves_a_product_by_at_most_half_a_step_per_weight() {
    let (rows, k) = (9, 512);
    for format in FORMATS {
        let w = random_blocks(format, blocks(format, rows * k), 3);
        let mut decoded = vec![0.0f32; rows * k];
        dequantize(format, &w, &mut decoded);
        let m = 4;
        let mut moved = 0;
        let x = random_x(m * k, 5);
        let mut xq = Q8Rows::default();
        xq.quantize(&x, m, k, false);
        let got = product(SimdPath::best(), format, &w, rows, &x, m, k);
        for i in 0..m {
            let x_row = &x[i * k..(i + 1) * k];
            for r in 0..rows {
                let (want, size) = exact(&decoded, r, x_row);
                // Each x moves by at most half its block's step d = max|x| / 127.
                let bound: f64 =
                    (0..k).map(|c| decoded[r * k + c].abs() as f64 * xq.scales[i * k / 32 + c / 32] as f64 / 2.0).sum();
                let error = (got[i][r] as f64 - want).abs();
                assert!(error <= bound + 1e-5 * size, "{} row {i}·{r}: off by {error}, bound {bound}", format.name());
                moved += usize::from(error > 1e-5 * size);
            }
        }
        // The rounding is real: most products move by more than float rounding.
        assert!(moved > m * rows / 2, "{}: only {moved} products moved", format.name());
    }
}

#[test]
fn a_rows_products_do_not_depend_on_the_rows_beside_it() {
    let (rows, k) = (40, 256);
    for format in FORMATS {
        let w = random_blocks(format, blocks(format, rows * k), 11);
        for path in paths() {
            let m = 19;
            let x = random_x(m * k, 13);
            let together = product(path, format, &w, rows, &x, m, k);
            for i in [0, 7, 8, 18] {
                let alone = product(path, format, &w, rows, &x[i * k..(i + 1) * k], 1, k);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&together[i]), bits(&alone[0]), "{} {path:?} row {i}", format.name());
            }
        }
    }
}

#[test]
fn a_non_finite_activation_reaches_its_rows_products_and_no_other() {
    let (rows, k) = (4, 256);
    for format in FORMATS {
        let w = random_blocks(format, blocks(format, rows * k), 17);
        for poison in [f32::NAN, f32::INFINITY] {
            let mut x = random_x(2 * k, 19);
            x[k + 40] = poison;
            for path in paths() {
                let out = product(path, format, &w, rows, &x, 2, k);
                assert!(out[0].iter().all(|v| v.is_finite()), "{path:?}: row 0 {:?}", out[0]);
                assert!(out[1].iter().all(|v| v.is_nan()), "{path:?}: row 1 {:?}", out[1]);
            }
        }
    }
}

#[test]
fn a_block_quantizes_its_largest_value_to_127_and_zeros_to_zero() {
    for quantize_block in [quantize_block::<false>, quantize_block::<true>] {
        let mut q = [0i8; 32];
        let mut values = [0.0f32; 32];
        assert_eq!(quantize_block(&values, &mut q), (0.0, 0));
        assert!(q.iter().all(|&v| v == 0));
        values[3] = -2.54;
        values[4] = 1.27;
        values[5] = 0.009;
        let (d, sum) = quantize_block(&values, &mut q);
        assert_eq!((q[3], q[4], q[5], q[6], sum), (-127, 64, 0, 0, -63));
        assert!((d - 0.02).abs() < 1e-7, "{d}");
    }
}

#[test]
fn the_quantizer_this_cpu_runs_gives_the_bytes_of_the_plain_one() {
    let (m, k) = (3, 5632);
    let mut x = random_x(m * k, 11);
    // Halfway points, an infinity (its block's scale NaN) and a block of zeros.
    for (i, v) in x.iter_mut().enumerate().take(256) {
        *v = (i as f32 - 128.0 + 0.5) / 127.0;
    }
    x[1000] = f32::INFINITY;
    x[2048..2080].fill(0.0);
    // Subnormal values: the scale's inverse is infinite, 0 × it NaN.
    x[3008..3040].fill(0.0);
    x[3010] = 1e-40;
    x[3011] = -3e-41;
    let mut dispatched = Q8Rows::default();
    dispatched.quantize(&x, m, k, true);
    let (mut quants, mut scales) = (vec![0i8; m * k], vec![0.0f32; m * k / 32]);
    let (mut sums, mut halves) = (vec![0i32; m * k / 32], vec![0i32; m * k / 32]);
    let out = Quantized { quants: &mut quants, scales: &mut scales, sums: &mut sums, halves: Some(&mut halves) };
    quantize_blocks::<false>(&x, out);
    let first_difference = dispatched.quants.iter().zip(&quants).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "{:?}", first_difference.map(|i| (x[i], dispatched.quants[i], quants[i])));
    assert_eq!(dispatched.sums, sums);
    assert_eq!(dispatched.halves, halves);
    // The halves are the first 16 values' sums.
    let first_sixteen = |b: usize| quants[32 * b..32 * b + 16].iter().map(|&q| q as i32).sum::<i32>();
    assert!((0..m * k / 32).all(|b| halves[b] == first_sixteen(b)));
    let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&dispatched.scales), bits(&scales));
    assert!(dispatched.scales[1000 / 32].is_nan() && dispatched.scales[2048 / 32] == 0.0);
}

#[test]
fn activations_are_named_on_the_command_line() {
    assert_eq!(Activations::parse("q8"), Some(Activations::Q8));
    assert_eq!(Activations::parse("f32"), Some(Activations::F32));
    assert_eq!(Activations::parse("int8"), None);
}

#[test]
fn every_path_and_every_split_of_the_weight_rows_gives_the_same_bits() {
    let (rows, k) = (45, 512);
    // One row of x (Q4_0 has its own kernel there), two, and three (by columns).
    for (format, m) in FORMATS.into_iter().flat_map(|f| [(f, 1), (f, 2), (f, 3)]) {
        let w = random_blocks(format, blocks(format, rows * k), 23);
        let x = random_x(m * k, 29);
        let whole = product(SimdPath::Scalar, format, &w, rows, &x, m, k);
        let row_bytes = blocks(format, k) * format.block().1;
        for path in paths() {
            // Pieces as a streamed plan delivers them: groups of eight fall elsewhere.
            for pieces in [vec![45], vec![3, 13, 29], vec![1, 8, 36]] {
                let mut first = 0;
                for piece in pieces {
                    let bytes = &w[first * row_bytes..(first + piece) * row_bytes];
                    let got = product(path, format, bytes, piece, &x, m, k);
                    for i in 0..m {
                        let want: Vec<u32> = whole[i][first..first + piece].iter().map(|v| v.to_bits()).collect();
                        let got: Vec<u32> = got[i].iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "{} {path:?} rows {first}..{}", format.name(), first + piece);
                    }
                    first += piece;
                }
            }
        }
    }
}

#[test]
fn weights_interleaved_by_eights_give_the_same_bits_on_every_path() {
    // Five whole groups of eight and five rows left in row order; from nine rows of x
    // the eight-row kernels transpose a set (`from_columns`).
    let (rows, k) = (45, 512);
    for format in FORMATS {
        let w = random_blocks(format, blocks(format, rows * k), 41);
        let mut interleaved = w.clone();
        super::super::interleave(format, rows, k, &mut interleaved);
        for m in [1, 2, 3, 8, 9, 13] {
            let x = random_x(m * k, 43 + m as u64);
            let want = product(SimdPath::Scalar, format, &w, rows, &x, m, k);
            for path in paths() {
                let got = product_in(BlockOrder::EightRows, path, format, &interleaved, rows, &x, m, k);
                for (i, (got, want)) in got.iter().zip(&want).enumerate() {
                    let bits = |row: &[f32]| row.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(got), bits(want), "{} {path:?} m={m} x row {i}", format.name());
                }
            }
        }
    }
}

#[test]
fn a_block_rounds_like_roundf_halves_included() {
    let mut rng = SplitMix64::new(31);
    for trial in 0..2000 {
        let mut values: Vec<f32> = (0..32).map(|_| rng.next_signed() * 5.0).collect();
        if trial % 2 == 0 {
            // Values on and just beside the halfway points between steps.
            let d = 5.0f32 / 127.0;
            values[0] = 5.0;
            for (j, v) in values.iter_mut().enumerate().skip(1) {
                let half = ((j % 20) as f32 - 10.0 + 0.5) * d;
                *v = [half, f32::from_bits(half.to_bits() + 1), f32::from_bits(half.to_bits() - 1)][j % 3];
            }
        }
        for quantize_block in [quantize_block::<false>, quantize_block::<true>] {
            let mut q = [0i8; 32];
            let (d, sum) = quantize_block(&values, &mut q);
            assert_eq!(sum, q.iter().map(|&v| v as i32).sum::<i32>());
            let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (j, (&got, &v)) in q.iter().zip(&values).enumerate() {
                let want = (v * inverse).round().clamp(-127.0, 127.0) as i8;
                assert_eq!(got, want, "trial {trial} value {j}: {v} scaled {}", v * inverse);
            }
        }
    }
}

/// Blocks of `format` whose every value sits at one extreme, all scales 1 except the
/// integer sub-block scales (`fill` fills the rest of each block's bytes): Q4_0 and
/// Q4_K nibbles 15 or 0, Q5_K values 31, Q8_0 −128 or 127, Q6_K q − 32 = −32 or 31,
/// sub-block scales at 63 (Q4_K, Q5_K) and −128 or 127 (Q6_K); Q3_K values 3 under
/// scales 31 (fill 0xFF) or −4 under −32 (0x00), Q2_K values 3, scales and minimums 15,
/// IQ4_NL and IQ4_XS values −127 (fill 0x00; IQ4_XS's scales −32) or 113 (0xFF; 31),
/// Q4_1 values 15 and Q5_1 31 (0xFF) over a minimum of 1.
fn extreme_blocks(format: BlockFormat, count: usize, fill: u8, sub_scale: u8) -> Vec<u8> {
    let one = half::f16::from_f32(1.0).to_le_bytes();
    let block_bytes = format.block().1;
    let mut bytes = vec![fill; count * block_bytes];
    for block in bytes.chunks_exact_mut(block_bytes) {
        match format {
            BlockFormat::Q8_0 | BlockFormat::Q4_0 | BlockFormat::Q5_0 | BlockFormat::IQ4NL | BlockFormat::IQ4XS => {
                block[..2].copy_from_slice(&one)
            }
            BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q4_1 | BlockFormat::Q5_1 => {
                block[..2].copy_from_slice(&one);
                block[2..4].copy_from_slice(&one);
            }
            BlockFormat::Q6K => {
                block[192..208].fill(sub_scale);
                block[208..210].copy_from_slice(&one);
            }
            BlockFormat::Q3K => block[108..110].copy_from_slice(&one),
            BlockFormat::Q2K => {
                block[80..82].copy_from_slice(&one);
                block[82..84].copy_from_slice(&one);
            }
            // Lattice formats: every index, sign and scale bit the fill's.
            _ => crate::kernels::quant::set_scale(format, block, 0, half::f16::ONE),
        }
    }
    bytes
}

/// The largest integer sums the byte products can reach — every weight at its
/// format's extreme against x at ±127 — come out right at every row count, where a
/// 16-bit pair sum or a sum of groups would saturate if the kernels' bounds were wrong.
#[test]
fn the_largest_byte_sums_do_not_saturate() {
    let (rows, k) = (8, 256);
    let cases: [(BlockFormat, u8, u8); 18] = [
        (BlockFormat::Q4_0, 0xFF, 0),
        (BlockFormat::Q4_0, 0x00, 0),
        (BlockFormat::Q8_0, 0x80, 0),
        (BlockFormat::Q8_0, 0x7F, 0),
        (BlockFormat::Q4K, 0xFF, 0),
        (BlockFormat::Q5K, 0xFF, 0),
        (BlockFormat::Q6K, 0x00, 0x80),
        (BlockFormat::Q6K, 0x00, 0x7F),
        (BlockFormat::Q6K, 0xFF, 0x80),
        (BlockFormat::Q3K, 0xFF, 0),
        (BlockFormat::Q3K, 0x00, 0),
        (BlockFormat::Q2K, 0xFF, 0),
        (BlockFormat::IQ4NL, 0x00, 0),
        (BlockFormat::IQ4NL, 0xFF, 0),
        (BlockFormat::IQ4XS, 0x00, 0),
        (BlockFormat::IQ4XS, 0xFF, 0),
        (BlockFormat::Q4_1, 0xFF, 0),
        (BlockFormat::Q5_1, 0xFF, 0),
    ];
    for (format, fill, sub_scale) in cases {
        let w = extreme_blocks(format, blocks(format, rows * k), fill, sub_scale);
        let mut decoded = vec![0.0f32; rows * k];
        dequantize(format, &w, &mut decoded);
        // In file order and interleaved (the K-quants transposed: other sums).
        let mut interleaved = w.clone();
        super::super::interleave(format, rows, k, &mut interleaved);
        let orders = [(BlockOrder::Rows, &w), (BlockOrder::EightRows, &interleaved)];
        for (sign, (order, w)) in [1.0f32, -1.0].into_iter().flat_map(|s| orders.map(|o| (s, o))) {
            for path in paths() {
                for m in 1..=8 {
                    let x = vec![127.0 * sign; m * k];
                    let got = product_in(order, path, format, w, rows, &x, m, k);
                    for (i, row) in got.iter().enumerate() {
                        for (r, &value) in row.iter().enumerate() {
                            let (want, size) = exact(&decoded, r, &x[i * k..(i + 1) * k]);
                            assert!(
                                (value as f64 - want).abs() <= 1e-6 * size,
                                "{} {order:?} {path:?} m={m} fill {fill:#x}, x {sign}·127: {value} vs {want}",
                                format.name()
                            );
                        }
                    }
                }
            }
        }
    }
}
