use super::*;
use crate::kernels::{from_f32, tests::naive};

/// Values spread over several binades, so rounding x to bf16 moves most of them.
fn values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
        })
        .collect()
}

/// Random x (m × k) and bf16 weights (n × k, as bytes), and `round_bf16(x) · wᵀ` by the
/// definition in f64.
fn case(m: usize, n: usize, k: usize, seed: u64) -> (Vec<f32>, Vec<u8>, Vec<f32>) {
    let x = values(m * k, seed + m as u64);
    let w = values(n * k, seed + 4 + n as u64);
    let mut bytes = vec![0u8; n * k * 2];
    from_f32(Dtype::Bf16, &w, &mut bytes);
    let w_rounded: Vec<f32> = w.iter().map(|&v| round(v)).collect();
    let x_rounded: Vec<f32> = x.iter().map(|&v| round(v)).collect();
    let expected = naive(&x_rounded, m, &w_rounded, n, k);
    (x, bytes, expected)
}

/// `round_bf16(x) · wᵀ` for bf16 `w` against the definition (f64 sums), written into the
/// middle columns of a wider output, for shapes that exercise every tail: rows of x past
/// a tile, weight rows past a task's 32, k not a whole tile row (the f32 path), and few
/// rows.
#[test]
fn products_over_bf16_weights_round_x_and_match_the_definition() {
    for (m, n, k) in [(1, 40, 64), (9, 48, 64), (17, 300, 64), (33, 270, 96), (40, 257, 48), (70, 530, 128)] {
        let (x, bytes, expected) = case(m, n, k, 7);
        let stride = n + 3;
        let mut out = vec![f32::NAN; m * stride];
        linear_bf16(&x, m, Matrix { bytes: &bytes, dtype: Dtype::Bf16, rows: n, cols: k }, &mut out, stride, 1);
        for i in 0..m {
            assert!(out[i * stride].is_nan() && out[i * stride + 1 + n..(i + 1) * stride].iter().all(|v| v.is_nan()));
            for j in 0..n {
                let (got, want) = (out[i * stride + 1 + j], expected[i * n + j]);
                assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "{m}×{n}×{k} [{i},{j}]: {got} vs {want}");
            }
        }
    }
}

/// The tiles themselves, for shapes below the dispatch's thresholds too: fewer weight
/// rows than a tile, one block of x, a block of x cut short.
#[cfg(target_arch = "x86_64")]
#[test]
fn the_tiles_match_the_definition_at_every_edge() {
    if !amx::available() {
        assert!(!amx_cpu() || std::env::var("FERRY_AMX").is_ok(), "this CPU has AMX but the kernel refused the tiles");
        return;
    }
    for (m, n, k) in [(1, 5, 32), (16, 16, 32), (5, 20, 64), (16, 33, 32), (31, 64, 160), (48, 31, 64)] {
        let (x, bytes, expected) = case(m, n, k, 17);
        let mut out = vec![f32::NAN; m * n];
        amx::linear(&x, m, Matrix { bytes: &bytes, dtype: Dtype::Bf16, rows: n, cols: k }, &mut out, n, 0);
        assert_matches_definition(&out, &expected, (m, n, k));
    }
}

/// The rounding is what makes the mode: against unrounded x the results differ by far
/// more than summation order would move them.
#[test]
fn x_is_rounded_to_bf16_before_the_product() {
    let (m, n, k) = (20, 64, 64);
    let x = values(m * k, 3);
    let w = values(n * k, 5);
    let mut bytes = vec![0u8; n * k * 2];
    from_f32(Dtype::Bf16, &w, &mut bytes);
    let w_rounded: Vec<f32> = w.iter().map(|&v| round(v)).collect();
    let unrounded = naive(&x, m, &w_rounded, n, k);
    let mut out = vec![0.0; m * n];
    linear_bf16(&x, m, Matrix { bytes: &bytes, dtype: Dtype::Bf16, rows: n, cols: k }, &mut out, n, 0);
    let largest = out.iter().zip(&unrounded).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(largest > 1e-3, "x was not rounded: largest difference {largest}");
}

#[test]
fn rounding_agrees_with_the_half_crate_on_every_kind_of_value() {
    let special =
        [0.0f32, -0.0, f32::MIN_POSITIVE, 1e-40, -1e-45, f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY];
    let swept = (0..1u64 << 20).map(|i| f32::from_bits((i * 4093 + (i << 12)) as u32));
    for v in special.into_iter().chain(swept) {
        let want = half::bf16::from_f32(v);
        if v.is_nan() {
            assert!(f32::from_bits((round_bits(v) as u32) << 16).is_nan(), "{:#x}", v.to_bits());
        } else {
            assert_eq!(round_bits(v), want.to_bits(), "{v:e} ({:#x})", v.to_bits());
        }
    }
}

#[test]
fn rounding_is_to_nearest_even_and_keeps_nan() {
    assert_eq!(round_bits(1.0), 0x3f80);
    // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even 1.
    assert_eq!(round_bits(1.0 + 1.0 / 256.0), 0x3f80);
    assert_eq!(round_bits(1.0 + 3.0 / 256.0), 0x3f82);
    assert!(round(f32::NAN).is_nan());
    assert_eq!(round(f32::INFINITY), f32::INFINITY);
}

/// On a CPU with AMX the many-row path must be the tiles, not a silent fallback.
#[test]
fn the_matrix_path_is_amx_where_the_cpu_has_it() {
    #[cfg(target_arch = "x86_64")]
    if std::env::var("FERRY_AMX").is_err() && amx_cpu() {
        assert_eq!(matrix_path(), "amx");
    }
}

#[cfg(target_arch = "x86_64")]
fn amx_cpu() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| info.contains(" amx_bf16") && info.contains(" amx_tile"))
}

/// The pair products (AVX512-BF16) against the definition for every row count they take
/// and every tail: weight rows past a block, k past the last whole 32 and below one.
#[cfg(target_arch = "x86_64")]
#[test]
fn pair_products_match_the_definition_at_every_row_count_and_tail() {
    if !pairs::available() {
        let declined = std::env::var("FERRY_BF16_PAIRS").is_ok_and(|v| v == "off");
        assert!(declined || !is_x86_feature_detected!("avx512bf16"), "this CPU has AVX512-BF16 but it went unused");
        return;
    }
    for m in 1..=crate::kernels::MAX_ROWS {
        for (n, k) in [(37, 64), (5, 80), (9, 31)] {
            let (x, bytes, expected) = case(m, n, k, 29);
            let bits: Vec<u16> = x.iter().map(|&v| round_bits(v)).collect();
            let mut out = vec![f32::NAN; m * n];
            pairs::linear(&bits, m, Matrix { bytes: &bytes, dtype: Dtype::Bf16, rows: n, cols: k }, &mut out, n, 0);
            assert_matches_definition(&out, &expected, (m, n, k));
        }
    }
}

/// A router-sized bf16 matrix gives each row the same bits alone and among many rows
/// (the few-row kernels at any row count), as the f32 one does (`rows`' test).
#[test]
fn a_small_bf16_matrix_gives_each_row_the_same_bits_at_any_row_count() {
    let (m, n, k) = (29, 8, 128);
    let (x, bytes, _) = case(m, n, k, 31);
    let matrix = Matrix { bytes: &bytes, dtype: Dtype::Bf16, rows: n, cols: k };
    let mut all = vec![0.0f32; m * n];
    linear_bf16(&x, m, matrix, &mut all, n, 0);
    for i in 0..m {
        let mut alone = vec![0.0f32; n];
        linear_bf16(&x[i * k..(i + 1) * k], 1, matrix, &mut alone, n, 0);
        assert_eq!(alone, all[i * n..(i + 1) * n], "row {i} of {m}");
    }
}

/// Every result of an `m × n × k` product within summation-order distance of the
/// definition's (`case`'s expected values).
#[cfg(target_arch = "x86_64")]
fn assert_matches_definition(out: &[f32], expected: &[f32], (m, n, k): (usize, usize, usize)) {
    for (i, (got, want)) in out.iter().zip(expected).enumerate() {
        assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "{m}×{n}×{k} at {i}: {got} vs {want}");
    }
}
