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
    for (b, block) in bytes.chunks_exact_mut(block_bytes).enumerate() {
        for i in 0..ferry_engine::kernels::quant::scale_count(format) {
            let scale = half::f16::from_f32(((b * 7 + i * 3) % 23) as f32 / 64.0 - 0.17);
            ferry_engine::kernels::quant::set_scale(format, block, i, scale);
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

/// `x · wᵀ` in f64 over the reference decoding of `w`: what the kernels must give,
/// up to the order of f32 additions.
fn reference_product(format: BlockFormat, w: &[u8], rows: usize, cols: usize, x: &[f32], m: usize) -> Vec<f64> {
    let mut decoded = vec![0.0f32; rows * cols];
    dequantize(format, w, &mut decoded);
    let mut out = vec![0.0f64; m * rows];
    for i in 0..m {
        for j in 0..rows {
            out[i * rows + j] = (0..cols).map(|c| decoded[j * cols + c] as f64 * x[i * cols + c] as f64).sum::<f64>();
        }
    }
    out
}

/// Every quantized product — each instruction-set path this CPU has, 1 to 8 rows, and
/// the GEMM path for more — against the f64 product over the reference decoding, into
/// the middle columns of a wider output (the other columns untouched).
#[test]
fn quantized_products_match_the_reference_decoding_on_every_path() {
    use ferry_engine::kernels::{quant_converted, quant_rows, BlockOrder, QuantMatrix, SimdPath};
    let paths: Vec<SimdPath> =
        [SimdPath::Scalar, SimdPath::Avx2, SimdPath::Avx512].into_iter().filter(|p| p.supported()).collect();
    for (f, format) in BlockFormat::ALL.into_iter().enumerate() {
        let (weights, block_bytes) = format.block();
        let (rows, cols) = (37, 2 * weights);
        let w = random_blocks(format, rows * cols / weights, 101 + f as u64);
        assert_eq!(w.len(), rows * cols / weights * block_bytes);
        let matrix = QuantMatrix { bytes: &w, format, rows, cols, order: BlockOrder::Rows };
        for m in [1, 2, 3, 5, 8, 11] {
            let x: Vec<f32> = (0..m * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
            let expected = reference_product(format, &w, rows, cols, &x, m);
            let scale = expected.iter().fold(1e-3f64, |a, v| a.max(v.abs()));
            let (stride, col0) = (rows + 5, 3);
            let mut runs: Vec<(String, Vec<f32>)> = Vec::new();
            if m <= 8 {
                for &path in &paths {
                    let mut out = vec![-7.0f32; m * stride];
                    quant_rows(path, &x, m, matrix, &mut out, stride, col0);
                    runs.push((path.name().to_string(), out));
                }
            }
            let mut out = vec![-7.0f32; m * stride];
            quant_converted(&x, m, matrix, &mut out, stride, col0);
            runs.push(("gemm".into(), out));
            for (name, out) in runs {
                for i in 0..m {
                    for c in 0..stride {
                        let got = out[i * stride + c] as f64;
                        if c < col0 || c >= col0 + rows {
                            assert_eq!(
                                got,
                                -7.0,
                                "{} {name} m={m}: column {c} outside the product changed",
                                format.name()
                            );
                            continue;
                        }
                        let want = expected[i * rows + c - col0];
                        assert!(
                            (got - want).abs() <= 1e-5 * scale,
                            "{} {name} m={m} row {i} col {c}: {got} vs {want} (scale {scale})",
                            format.name()
                        );
                    }
                }
            }
        }
    }
}

/// Q8_0, Q4_0, Q5_0, Q4_1 and Q5_1 encode to the same bytes as llama.cpp's reference quantizers
/// (the `gguf` package's `quants.quantize`), ties and outliers included.
#[test]
fn the_32_value_formats_quantize_byte_identically_to_the_gguf_package() {
    use ferry_engine::kernels::quant::quantize;
    let dir = tempfile::tempdir().unwrap();
    // Signed values with exact halves (ties), zeros, an all-zero block and outliers.
    let mut values: Vec<f32> = (0..32 * 40).map(|i| ((i * 7919 % 257) as f32 - 128.0) / 64.0).collect();
    values[64..96].fill(0.0);
    values[5] = 40.0;
    values[200] = -40.0;
    let input = dir.path().join("values.f32");
    std::fs::write(&input, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    for format in [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q5_0, BlockFormat::Q4_1, BlockFormat::Q5_1] {
        let output = dir.path().join(format!("{}.bin", format.name()));
        let script =
            "import sys, numpy as np\nfrom gguf import quants\nfrom gguf.constants import GGMLQuantizationType as T\n\
                      x = np.fromfile(sys.argv[1], dtype=np.float32).reshape(-1, 32)\n\
                      quants.quantize(x, T[sys.argv[3]]).tofile(sys.argv[2])\n";
        let run = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&input)
            .arg(&output)
            .arg(format.name())
            .output()
            .expect("python3 runs");
        assert!(run.status.success(), "the gguf package: {}", String::from_utf8_lossy(&run.stderr));
        let reference = std::fs::read(&output).unwrap();
        let mut ours = Vec::new();
        quantize(format, &values, &mut ours);
        assert_eq!(ours.len(), reference.len(), "{}", format.name());
        let first_difference = ours.iter().zip(&reference).position(|(a, b)| a != b);
        assert_eq!(first_difference, None, "{}: bytes differ", format.name());
    }
}

/// Every ggml type Ferry reads has the block layout llama.cpp's `gguf` package gives it
/// (`GGML_QUANT_SIZES`: values and bytes per block), under the same id and name.
#[test]
fn every_ggml_type_ferry_reads_has_the_gguf_packages_block_layout() {
    let script = "import sys\nfrom gguf.constants import GGMLQuantizationType as T, GGML_QUANT_SIZES as S\n\
                  for line in sys.stdin:\n    i, name = line.split()\n    t = T(int(i))\n\
                  \x20   print(t.name, *S[t])\n";
    let types: Vec<_> = ferry_core::gguf::GgmlType::all().collect();
    let input: String = types.iter().map(|t| format!("{} {}\n", t.id, t.name)).collect();
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the gguf package (pip install gguf): {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
    assert_eq!(lines.len(), types.len());
    for (t, line) in types.iter().zip(&lines) {
        assert_eq!(line, &format!("{} {} {}", t.name, t.block_elements, t.block_bytes), "ggml type {}", t.id);
    }
}
