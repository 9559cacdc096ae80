use super::*;
use crate::kernels::quant::dequantize_block;

/// The 256 weights of a super-block as the pieces give them, each where `offset`
/// puts it (NaN where none does).
#[inline(always)]
unsafe fn decoded<V: Vector, F: Pieces<V>>(block: &[u8]) -> Vec<f32> {
    let lanes = std::mem::size_of::<V>() / 4;
    let mut out = vec![f32::NAN; 256];
    // SAFETY: the block is whole; the callers check the instruction set.
    unsafe {
        let scales = F::scales(block.as_ptr());
        for p in 0..F::PIECES {
            for (v, vector) in F::piece(block.as_ptr(), &scales, p).iter().enumerate() {
                let values = std::slice::from_raw_parts((vector as *const V).cast::<f32>(), lanes);
                out[F::offset(p, v)..][..lanes].copy_from_slice(values);
            }
        }
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decoded_avx2<F: Pieces<__m256>>(block: &[u8]) -> Vec<f32> {
    // SAFETY: AVX2, FMA and F16C are present.
    unsafe { decoded::<__m256, F>(block) }
}

#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma,f16c")]
unsafe fn decoded_avx512<F: Pieces<__m512>>(block: &[u8]) -> Vec<f32> {
    // SAFETY: AVX-512F, VL, BW, AVX2, FMA and F16C are present.
    unsafe { decoded::<__m512, F>(block) }
}

/// The pieces of both widths are the reference decoding, bit for bit, and cover
/// every weight: random bytes and random signed scales, 40 blocks a format.
#[test]
fn pieces_decode_bit_identically_to_the_reference() {
    for format in [BlockFormat::Q4K, BlockFormat::Q5K, BlockFormat::Q6K] {
        let bytes = super::super::tests::random_blocks(format, 40, 9);
        for block in bytes.chunks_exact(format.block().1) {
            let mut want = [0.0f32; 256];
            dequantize_block(format, block, &mut want);
            let mut runs = Vec::new();
            // SAFETY (each): the instruction set was detected first.
            if crate::kernels::SimdPath::Avx2.supported() {
                runs.push(("avx2", unsafe {
                    match format {
                        BlockFormat::Q4K => decoded_avx2::<Q4K>(block),
                        BlockFormat::Q5K => decoded_avx2::<Q5K>(block),
                        _ => decoded_avx2::<Q6K>(block),
                    }
                }));
            }
            if avx512_present() {
                runs.push(("avx512", unsafe {
                    match format {
                        BlockFormat::Q4K => decoded_avx512::<Q4K>(block),
                        BlockFormat::Q5K => decoded_avx512::<Q5K>(block),
                        _ => decoded_avx512::<Q6K>(block),
                    }
                }));
            }
            for (name, got) in runs {
                let differ = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
                if let Some(i) = differ {
                    panic!("{} {name}: weight {i} is {} here, {} in the reference", format.name(), got[i], want[i]);
                }
            }
        }
    }
}
