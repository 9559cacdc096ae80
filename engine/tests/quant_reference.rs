//! ggml's quantized block formats decode bit-identically to llama.cpp's own `gguf`
//! Python package (`gguf.quants.dequantize`), on random blocks of every format Ferry
//! decodes. The README's test command installs the package.

use ferry_engine::kernels::quant::{dequantize, BlockFormat};

/// `blocks` random blocks whose f16 scales are finite (random bytes elsewhere).
fn random_blocks(format: BlockFormat, blocks: usize, seed: u64) -> Vec<u8> {
    let (_, block_bytes) = format.block();
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u8
    };
    let mut bytes: Vec<u8> = (0..blocks * block_bytes).map(|_| next()).collect();
    // Where each format keeps its f16 scales.
    let scale_offsets: &[usize] = match format {
        BlockFormat::Q8_0 | BlockFormat::Q4_0 => &[0],
        BlockFormat::Q4K => &[0, 2],
        BlockFormat::Q6K => &[208],
    };
    for (b, block) in bytes.chunks_exact_mut(block_bytes).enumerate() {
        for (i, &at) in scale_offsets.iter().enumerate() {
            let scale = half::f16::from_f32(((b * 7 + i * 3) % 23) as f32 / 64.0 - 0.17);
            block[at..at + 2].copy_from_slice(&scale.to_le_bytes());
        }
    }
    bytes
}

#[test]
fn every_format_decodes_bit_identically_to_the_gguf_package() {
    let dir = tempfile::tempdir().unwrap();
    for (i, format) in BlockFormat::ALL.into_iter().enumerate() {
        let (weights, _) = format.block();
        let blocks = 37;
        let bytes = random_blocks(format, blocks, 11 + i as u64);
        let input = dir.path().join(format!("{}.bin", format.name()));
        let output = dir.path().join(format!("{}.f32", format.name()));
        std::fs::write(&input, &bytes).unwrap();
        let script =
            "import sys, numpy as np\nfrom gguf import quants\nfrom gguf.constants import GGMLQuantizationType as T\n\
                      data = np.fromfile(sys.argv[1], dtype=np.uint8)\n\
                      out = quants.dequantize(data, T[sys.argv[3]]).astype(np.float32)\n\
                      out.tofile(sys.argv[2])\n";
        let run = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&input)
            .arg(&output)
            .arg(format.name())
            .output()
            .expect("python3 runs");
        assert!(
            run.status.success(),
            "the gguf package did not decode {} (pip install gguf): {}",
            format.name(),
            String::from_utf8_lossy(&run.stderr)
        );
        let reference: Vec<f32> = std::fs::read(&output)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut ours = vec![f32::NAN; blocks * weights];
        dequantize(format, &bytes, &mut ours);
        assert_eq!(reference.len(), ours.len(), "{}", format.name());
        let differ = ours.iter().zip(&reference).position(|(a, b)| a.to_bits() != b.to_bits());
        if let Some(i) = differ {
            panic!("{}: value {i} is {} here and {} in the gguf package", format.name(), ours[i], reference[i]);
        }
        assert!(ours.iter().any(|v| *v != 0.0), "{}: all zero", format.name());
    }
}
