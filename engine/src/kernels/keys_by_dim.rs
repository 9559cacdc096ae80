//! Attention's keys laid out by dimension: for each KV head, dimension d's values for
//! every position side by side (`[kv_head][d][position]`, each row `stride` positions
//! long, `stride` a multiple of `SCORE_LANES`). A head's scores for a block of
//! positions are then sums over d of q[d] times a row of keys — lanes that add
//! vertically, with no sum across a vector's lanes per position (those reductions were
//! most of the scores' time with keys by position).
//!
//! Built from the KV cache's rows (by position) as they are converted to f32: for an
//! f16 cache on x86, eight positions by eight dimensions at a time, converted with F16C
//! and transposed in registers, about the cost of the plain conversion it replaces.

use ferry_core::model::Dtype;

/// Positions of one block of scores: the rows of keys by dimension are padded to a
/// multiple of it.
pub const SCORE_LANES: usize = 64;

/// The row length (positions) of keys by dimension holding `positions`.
pub fn stride_for(positions: usize) -> usize {
    positions.div_ceil(SCORE_LANES).max(1) * SCORE_LANES
}

/// f32 values keys by dimension take for `positions` positions of `kv_heads` heads of
/// `head_dim`.
pub fn len_for(positions: usize, kv_heads: usize, head_dim: usize) -> usize {
    kv_heads * head_dim * stride_for(positions)
}

/// `positions` rows of keys (`kv_heads × head_dim` values of `dtype` each, row-major
/// bytes in `rows`) into `out` by dimension with rows of `stride_for(positions)`.
/// Positions past `positions` in each row keep what `out` held.
pub fn from_rows(dtype: Dtype, rows: &[u8], positions: usize, kv_heads: usize, head_dim: usize, out: &mut [f32]) {
    let width = kv_heads * head_dim;
    let element = super::element_bytes(dtype);
    assert!(rows.len() >= positions * width * element, "keys by dimension: {positions} rows");
    assert!(out.len() >= len_for(positions, kv_heads, head_dim), "keys by dimension: output too small");
    #[cfg(target_arch = "x86_64")]
    if dtype == Dtype::F16
        && head_dim.is_multiple_of(8)
        && is_x86_feature_detected!("avx")
        && is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU has AVX and F16C; the asserts above bound every access.
        return unsafe { f16_by_eights(rows, positions, kv_heads, head_dim, out) };
    }
    let stride = stride_for(positions);
    let mut row = vec![0.0f32; width];
    for p in 0..positions {
        super::to_f32(dtype, &rows[p * width * element..(p + 1) * width * element], &mut row);
        for (i, &value) in row.iter().enumerate() {
            out[i * stride + p] = value;
        }
    }
}

/// `from_rows` for an f16 cache: blocks of eight positions by eight dimensions, each
/// row's eight halves converted by one `VCVTPH2PS` and the 8 × 8 block transposed in
/// registers; the last positions (fewer than eight) one by one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_by_eights(rows: &[u8], positions: usize, kv_heads: usize, head_dim: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (width, stride) = (kv_heads * head_dim, stride_for(positions));
    let whole = positions / 8 * 8;
    // Eight rows of `out` (values i0 .. i0 + 8 of every position) filled along the
    // positions, so that each row is written in order: sweeping the values first wrote
    // 8 × 32 bytes `stride` floats apart, addresses that share the L1's few sets.
    for i0 in (0..width).step_by(8) {
        for p0 in (0..whole).step_by(8) {
            // SAFETY: positions p0 .. p0 + 8 < `positions` and values i0 .. i0 + 8 <
            // `width` lie inside `rows` (asserted by `from_rows`); rows i0 .. i0 + 8 of
            // `out` hold `stride` ≥ p0 + 8 values each.
            unsafe {
                let r: [__m256; 8] = std::array::from_fn(|k| {
                    let at = rows.as_ptr().add(((p0 + k) * width + i0) * 2);
                    _mm256_cvtph_ps(_mm_loadu_si128(at.cast()))
                });
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                // Column j: value i0 + j of positions p0 .. p0 + 8.
                let columns = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (j, column) in columns.into_iter().enumerate() {
                    _mm256_storeu_ps(out.as_mut_ptr().add((i0 + j) * stride + p0), column);
                }
            }
        }
    }
    for p in whole..positions {
        for i in 0..width {
            let bits = u16::from_le_bytes([rows[(p * width + i) * 2], rows[(p * width + i) * 2 + 1]]);
            out[i * stride + p] = half::f16::from_bits(bits).to_f32();
        }
    }
}

/// `positions` rows of f32 keys (`kv_heads × head_dim` each) by dimension, into a new
/// vector: the tests' keys, held by position.
#[cfg(test)]
pub(crate) fn from_f32_rows(keys: &[f32], positions: usize, kv_heads: usize, head_dim: usize) -> Vec<f32> {
    let values = &keys[..positions * kv_heads * head_dim];
    let mut bytes = vec![0u8; values.len() * 4];
    super::from_f32(Dtype::F32, values, &mut bytes);
    let mut out = vec![0.0f32; len_for(positions, kv_heads, head_dim)];
    from_rows(Dtype::F32, &bytes, positions, kv_heads, head_dim, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f16 path against the definition: value (p, i) at out[i · stride + p], for
    /// position counts with and without a tail and head widths the fast path takes or not.
    #[test]
    fn keys_land_by_dimension() {
        for (positions, kv_heads, head_dim) in [(1, 1, 8), (7, 2, 8), (8, 4, 64), (93, 4, 64), (20, 3, 12), (65, 1, 16)]
        {
            let width = kv_heads * head_dim;
            let values: Vec<f32> = (0..positions * width).map(|i| ((i * 37 % 101) as f32 - 50.0) / 8.0).collect();
            let mut bytes = vec![0u8; values.len() * 2];
            super::super::from_f32(Dtype::F16, &values, &mut bytes);
            let stride = stride_for(positions);
            let mut out = vec![f32::NAN; len_for(positions, kv_heads, head_dim)];
            from_rows(Dtype::F16, &bytes, positions, kv_heads, head_dim, &mut out);
            let plain = from_f32_rows(&values, positions, kv_heads, head_dim);
            for p in 0..positions {
                for i in 0..width {
                    assert_eq!(out[i * stride + p], values[p * width + i], "f16 ({positions}, {width}): {p}, {i}");
                    assert_eq!(plain[i * stride + p], values[p * width + i]);
                }
            }
        }
    }
}
