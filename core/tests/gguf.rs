//! The GGUF header reader: files written by the `gguf` Python package (llama.cpp's own
//! writer) read back with the same tensors, types and offsets; every malformed header
//! below is a clear error naming what is wrong; randomly corrupted headers give an
//! answer (a layout that holds up, or an error), never a panic, and quickly.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_core::gguf::{GgmlType, GgufHeader, Value};
use ferry_core::CoreError;
use proptest::prelude::*;

/// A GGUF file built by hand: metadata entries, then tensors (name, dims, type id,
/// bytes of data), laid out with `alignment`.
struct Builder {
    metadata: Vec<(String, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, usize)>,
    alignment: usize,
}

fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

impl Builder {
    fn new() -> Builder {
        Builder { metadata: Vec::new(), tensors: Vec::new(), alignment: 32 }
    }

    fn meta_u32(mut self, key: &str, value: u32) -> Builder {
        let mut v = 4u32.to_le_bytes().to_vec();
        v.extend_from_slice(&value.to_le_bytes());
        self.metadata.push((key.into(), v));
        self
    }

    fn meta_str(mut self, key: &str, value: &str) -> Builder {
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend(string(value));
        self.metadata.push((key.into(), v));
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], ggml: &str) -> Builder {
        let t = GgmlType::all().find(|t| t.name == ggml).unwrap();
        let elements: u64 = dims.iter().product();
        let bytes = (elements / t.block_elements * t.block_bytes) as usize;
        self.tensors.push((name.into(), dims.to_vec(), t.id, bytes));
        self
    }

    /// A tensor entry with any type id and `bytes` of data.
    fn tensor_raw(mut self, name: &str, dims: &[u64], type_id: u32, bytes: usize) -> Builder {
        self.tensors.push((name.into(), dims.to_vec(), type_id, bytes));
        self
    }

    /// The file's bytes, with each tensor's offset from `offsets` where given.
    fn bytes_with(&self, offsets: &[Option<u64>]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            out.extend(string(key));
            out.extend_from_slice(value);
        }
        let mut offset = 0u64;
        let mut data_len = 0usize;
        for (i, (name, dims, type_id, bytes)) in self.tensors.iter().enumerate() {
            out.extend(string(name));
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&type_id.to_le_bytes());
            let at = offsets.get(i).copied().flatten().unwrap_or(offset);
            out.extend_from_slice(&at.to_le_bytes());
            offset += (*bytes as u64).div_ceil(self.alignment as u64) * self.alignment as u64;
            data_len = data_len.max((at as usize) + bytes);
        }
        while !out.len().is_multiple_of(self.alignment) {
            out.push(0);
        }
        out.extend(std::iter::repeat_n(0x11u8, data_len));
        out
    }

    fn bytes(&self) -> Vec<u8> {
        self.bytes_with(&[])
    }
}

fn llama() -> Builder {
    Builder::new()
        .meta_str("general.architecture", "llama")
        .meta_u32("llama.block_count", 1)
        .tensor("token_embd.weight", &[64, 10], "F16")
        .tensor("blk.0.attn_q.weight", &[64, 64], "Q8_0")
        .tensor("blk.0.ffn_up.weight", &[256, 8], "Q4_K")
        .tensor("output_norm.weight", &[64], "F32")
}

fn parse(bytes: &[u8]) -> Result<GgufHeader, CoreError> {
    GgufHeader::parse(Path::new("model.gguf"), bytes, bytes.len() as u64)
}

fn error(bytes: &[u8]) -> String {
    match parse(bytes) {
        Ok(h) => panic!("accepted: {:?}", h.tensors),
        Err(e) => {
            assert!(e.to_string().contains("model.gguf"), "the error names the file: {e}");
            e.to_string()
        }
    }
}

#[test]
fn a_well_formed_header_reads_back() {
    let bytes = llama().bytes();
    let header = parse(&bytes).unwrap();
    assert_eq!(header.architecture().unwrap(), "llama");
    assert_eq!(header.uint("llama.block_count").unwrap(), 1);
    let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_up.weight", "output_norm.weight"]);
    let q = &header.tensors[1];
    assert_eq!((q.ggml_type.name, q.dims.clone(), q.end - q.start), ("Q8_0", vec![64, 64], 64 * 64 / 32 * 34));
    assert!(header.tensors.iter().all(|t| (t.start - header.data_start).is_multiple_of(32)));
    assert!(header.uint("llama.missing").unwrap_err().to_string().contains("llama.missing"));
}

/// A header past the first read (a vocabulary of megabytes) is read on, and a file cut
/// inside its header is still refused, by `open` as by `parse`.
#[test]
fn open_reads_headers_longer_than_its_first_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    let long = "x".repeat(3 << 20);
    let bytes = llama().meta_str("tokenizer.chat_template", &long).bytes();
    std::fs::write(&path, &bytes).unwrap();
    let header = GgufHeader::open(&path).unwrap();
    assert_eq!(header.tensors.len(), 4);
    assert!(matches!(header.get("tokenizer.chat_template"), Some(Value::String(s)) if s.len() == long.len()));
    std::fs::write(&path, &bytes[..2 << 20]).unwrap();
    let message = GgufHeader::open(&path).unwrap_err().to_string();
    assert!(message.contains("model.gguf") && message.contains("truncated"), "{message}");
}

#[test]
fn malformed_headers_are_errors_naming_what_is_wrong() {
    let good = llama().bytes();
    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(error(&magic).contains("not a GGUF file"));
    let mut version = good.clone();
    version[4] = 9;
    assert!(error(&version).contains("version 9"));
    assert!(error(&good[..40]).contains("truncated"));
    // The data ends before the last tensor does.
    assert!(error(&good[..good.len() - 1]).contains("output_norm.weight"));
    // A hostile count is refused before anything is allocated for it.
    let mut count = good.clone();
    count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let hostile = error(&count);
    assert!(hostile.contains("tensor entry 4"), "{hostile}");
    let unknown = Builder::new().tensor_raw("x", &[32], 99, 128).bytes();
    assert!(error(&unknown).contains("ggml type 99"));
    // Q8_0 rows of 48 elements are not whole blocks of 32.
    let partial = Builder::new().tensor_raw("blk.0.ffn_down.weight", &[48, 2], 8, 102).bytes();
    let message = error(&partial);
    assert!(message.contains("blk.0.ffn_down.weight") && message.contains("blocks"), "{message}");
    let too_many_dims = Builder::new().tensor("t", &[1, 1, 1, 1, 1], "F32").bytes();
    assert!(error(&too_many_dims).contains("5 dimensions"));
    let overlapping = llama().bytes_with(&[None, Some(0)]);
    assert!(error(&overlapping).contains("overlap"));
    let misaligned = llama().bytes_with(&[None, Some(1313)]);
    assert!(error(&misaligned).contains("not aligned"));
    let twice = Builder::new().tensor("a", &[8], "F32").tensor("a", &[8], "F32");
    assert!(error(&twice.bytes()).contains("`a` appears twice"));
    let key_twice = Builder::new().meta_u32("k", 1).meta_u32("k", 2);
    assert!(error(&key_twice.bytes()).contains("`k` appears twice"));
    // Control characters in a name are corruption, and shown escaped, not raw.
    let garbled = error(&Builder::new().meta_u32("general.\u{1b}[2Jx\0", 1).bytes());
    assert!(garbled.contains("control characters") && garbled.contains("\\u{1b}"), "{garbled}");
    assert!(!garbled.contains('\u{1b}'), "{garbled}");
    let garbled = error(&Builder::new().tensor("a\nb", &[8], "F32").bytes());
    assert!(garbled.contains("control characters") && garbled.contains("a\\nb"), "{garbled}");
}

const BOUND: Duration = Duration::from_secs(2);

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Byte flips anywhere in a header: an answer, never a panic. An accepted header's
    /// tensors lie inside the file, in whole blocks, without overlapping.
    #[test]
    fn corrupted_headers_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = llama().bytes();
        let header_len = bytes.len() - 4096.min(bytes.len() / 2);
        for (index, value) in flips {
            let at = index.index(header_len);
            bytes[at] = value;
        }
        let started = Instant::now();
        let result = parse(&bytes);
        prop_assert!(started.elapsed() < BOUND);
        if let Ok(header) = result {
            let mut spans: Vec<(u64, u64)> = header.tensors.iter().map(|t| (t.start, t.end)).collect();
            spans.sort();
            for t in &header.tensors {
                prop_assert!(t.end <= bytes.len() as u64);
                prop_assert_eq!(t.end - t.start, t.elements() / t.ggml_type.block_elements * t.ggml_type.block_bytes);
            }
            for pair in spans.windows(2) {
                prop_assert!(pair[0].1 <= pair[1].0);
            }
        }
    }
}

/// A file written by the `gguf` package (llama.cpp's writer), read back: the same
/// metadata, names, shapes, types and data offsets as the package's own reader says.
/// CI installs the package (`.ci/run`); without it this test fails, saying so.
#[test]
fn files_written_by_the_gguf_package_read_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ref.gguf");
    let script = r#"
import sys, json, numpy as np, gguf
from gguf.constants import GGMLQuantizationType as T, GGML_QUANT_SIZES
path = sys.argv[1]
w = gguf.GGUFWriter(path, "llama")
w.add_block_count(2)
w.add_context_length(2048)
w.add_embedding_length(64)
w.add_string("general.name", "ferry-test")
w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
rng = np.random.default_rng(7)
w.add_tensor("token_embd.weight", rng.standard_normal((10, 64)).astype(np.float16))
w.add_tensor("output_norm.weight", rng.standard_normal(64).astype(np.float32))
for name, qtype, shape in [("blk.0.attn_q.weight", T.Q8_0, (64, 64)), ("blk.0.ffn_up.weight", T.Q4_K, (8, 256)),
                           ("blk.1.ffn_down.weight", T.Q6_K, (4, 512)), ("blk.1.attn_k.weight", T.Q4_0, (16, 64))]:
    elements, block = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 255, size=(shape[0], shape[1] // elements * block), dtype=np.uint8)
    w.add_tensor(name, raw, raw_dtype=qtype)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
r = gguf.GGUFReader(path)
print(json.dumps([{"name": t.name, "dims": [int(d) for d in t.shape], "type": int(t.tensor_type),
                   "start": int(t.data_offset), "bytes": int(t.n_bytes)} for t in r.tensors]))
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .expect("python3 runs (CI installs the gguf package: .ci/run)");
    assert!(
        out.status.success(),
        "the gguf Python package wrote no file (CI installs it with pip: .ci/run): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let header = GgufHeader::open(&path).unwrap();
    assert_eq!(header.architecture().unwrap(), "llama");
    assert_eq!(header.uint("llama.block_count").unwrap(), 2);
    assert_eq!(header.uint("llama.context_length").unwrap(), 2048);
    assert_eq!(header.get("general.name"), Some(&Value::String("ferry-test".into())));
    match header.get("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => assert_eq!(tokens.len(), 3),
        other => panic!("tokens: {other:?}"),
    }
    let expected = expected.as_array().unwrap();
    assert_eq!(header.tensors.len(), expected.len());
    for (t, e) in header.tensors.iter().zip(expected) {
        assert_eq!(t.name, e["name"].as_str().unwrap());
        let dims: Vec<u64> = e["dims"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        assert_eq!(t.dims, dims, "{}", t.name);
        assert_eq!(t.ggml_type.id as u64, e["type"].as_u64().unwrap(), "{}", t.name);
        assert_eq!(t.start, e["start"].as_u64().unwrap(), "{}", t.name);
        assert_eq!(t.end - t.start, e["bytes"].as_u64().unwrap(), "{}", t.name);
    }
}

/// The block layouts agree with the `gguf` package's table for every type Ferry knows.
#[test]
fn block_layouts_match_the_gguf_package() {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg("import json; from gguf.constants import GGML_QUANT_SIZES as S; print(json.dumps({int(k): list(v) for k, v in S.items()}))")
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "the gguf Python package is missing (.ci/run installs it)");
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for t in GgmlType::all() {
        let entry = &table[t.id.to_string()];
        assert_eq!(
            (entry[0].as_u64().unwrap(), entry[1].as_u64().unwrap()),
            (t.block_elements, t.block_bytes),
            "{}",
            t.name
        );
    }
}

/// llama.cpp's quantizer (`llama_tensor_get_type`) stores a K-quant's matrices whose
/// rows are not whole 256-value blocks in a 32-value type of at least as many bits,
/// or F16 where no 32-value block divides them either; other types stay.
#[test]
fn k_quants_fall_back_as_llama_cpps_quantizer_does() {
    let t = |name: &str| GgmlType::by_name(name).unwrap();
    for (asked, cols, stored) in [
        ("Q4_K", 4096, "Q4_K"),
        ("Q4_K", 1408, "Q5_0"),
        ("Q6_K", 1408, "Q8_0"),
        ("Q5_K", 1408, "Q5_1"),
        ("Q3_K", 1408, "Q4_0"),
        ("Q2_K", 96, "Q4_0"),
        ("IQ4_XS", 1408, "IQ4_NL"),
        ("IQ2_XXS", 1408, "IQ4_NL"),
        ("IQ1_M", 896, "IQ4_NL"),
        ("IQ3_S", 2048, "IQ3_S"),
        ("TQ2_0", 1408, "Q4_0"),
        ("Q4_K", 200, "F16"),
        ("Q4_0", 1408, "Q4_0"),
        ("F16", 1408, "F16"),
    ] {
        assert_eq!(t(asked).for_rows_of(cols).name, stored, "{asked} with rows of {cols}");
    }
}
