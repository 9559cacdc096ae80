//! Weight and cache values between their stored dtypes (f32, f16, bf16) and f32.

use ferry_core::model::Dtype;

/// f16 bits to f32, `out.len() == halves.len()`: with F16C eight values to an
/// instruction in one loop. The `half` crate's slice conversion calls a function per
/// eight values (13–14 µs of a TinyLlama decoding step's 70 µs of attention per layer,
/// converting the KV cache, against 2–3 here); one value at a time it checks for F16C
/// on every call (9 % of a decoding step of test-moe).
fn f16_to_f32(halves: &[u16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has F16C and AVX, checked above.
        return unsafe { f16_to_f32_f16c(halves, out) };
    }
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    halves.reinterpret_cast::<half::f16>().convert_to_f32_slice(out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(halves: &[u16], out: &mut [f32]) {
    use std::arch::x86_64::{_mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let whole = halves.len().min(out.len()) / 8 * 8;
    let (halves, source_tail) = halves.split_at(whole);
    let (out, target_tail) = out.split_at_mut(whole);
    for (h, o) in halves.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
        // SAFETY: `h` holds eight u16 (16 bytes) and `o` eight f32; F16C and AVX are
        // enabled on this function.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast()))) };
    }
    for (&h, o) in source_tail.iter().zip(target_tail) {
        *o = half::f16::from_bits(h).to_f32();
    }
}

/// Converts `bytes` of `dtype` to f32 into `out` (same element count).
pub fn to_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F16 => {
            // SAFETY: any two bytes are a valid u16.
            let (before, halves, _) = unsafe { bytes.align_to::<u16>() };
            if before.is_empty() && cfg!(target_endian = "little") {
                let n = out.len().min(halves.len());
                f16_to_f32(&halves[..n], &mut out[..n]);
            } else {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
        _ => {
            // bf16 is the top half of an f32.
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits(((c[1] as u32) << 24) | ((c[0] as u32) << 16));
            }
        }
    }
}

/// Encodes f32 values as `dtype` bytes into `out`.
pub fn from_f32(dtype: Dtype, values: &[f32], out: &mut [u8]) {
    match dtype {
        Dtype::F32 => {
            for (v, c) in values.iter().zip(out.chunks_exact_mut(4)) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (v, c) in values.iter().zip(out.chunks_exact_mut(2)) {
                c.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
        _ => {
            for (v, c) in values.iter().zip(out.chunks_exact_mut(2)) {
                c.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
            }
        }
    }
}

pub fn element_bytes(dtype: Dtype) -> usize {
    (dtype.bits() / 8) as usize
}
