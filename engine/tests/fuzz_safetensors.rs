//! Fuzzing the safetensors reader: random and mutated headers, length fields and
//! shard indexes. Every answer is a layout that holds up (tensors tile the data
//! section exactly, sizes match shapes) or an error naming the file; never a panic,
//! and always quick.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_core::model::Dtype;
use ferry_engine::safetensors::{read_header, write, TensorLocation};
use ferry_engine::EngineError;
use proptest::prelude::*;
use proptest::sample::Index;

const BOUND: Duration = Duration::from_secs(2);

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    assert!(started.elapsed() < BOUND, "{what} took {:?}", started.elapsed());
    out
}

/// What an accepted header promises: each tensor's bytes match its shape and dtype, and
/// the tensors, in offset order, cover the data section exactly once.
fn check_layout(file: &Path, tensors: &std::collections::BTreeMap<String, TensorLocation>) {
    let bytes = std::fs::read(file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let mut spans: Vec<&TensorLocation> = tensors.values().collect();
    spans.sort_by_key(|t| (t.start, t.end));
    let mut covered = 8 + header_len;
    for t in spans {
        let elements: u64 = t.shape.iter().product();
        assert_eq!(t.end - t.start, t.dtype.bytes_of(elements), "{t:?}");
        assert_eq!(t.start, covered, "{t:?}");
        covered = t.end;
    }
    assert_eq!(covered, bytes.len() as u64);
}

#[derive(Debug, Clone)]
struct Entry {
    name: usize,
    dtype: usize,
    shape: Vec<u64>,
    /// Offsets as written (else contiguous ones are computed from the shape).
    offsets: Option<[u64; 2]>,
}

const NAMES: &[&str] = &["a", "b", "c", "model.norm.weight", "__metadata__", "", "a\u{0}b", "ü"];
const DTYPES: &[&str] = &["F32", "F16", "BF16", "I8", "F64", "f32", ""];

fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..6, 1 => Just(u64::MAX), 1 => Just(1u64 << 32), 1 => any::<u64>()]
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        0..NAMES.len(),
        0..DTYPES.len(),
        proptest::collection::vec(dim(), 0..4),
        proptest::option::weighted(0.3, (0u64..64, 0u64..64).prop_map(|(a, b)| [a, b])),
    )
        .prop_map(|(name, dtype, shape, offsets)| Entry { name, dtype, shape, offsets })
}

fn element_bytes(dtype: &str) -> u64 {
    match dtype {
        "F32" => 4,
        "F16" | "BF16" => 2,
        _ => 1,
    }
}

/// A header in JSON text (duplicate names kept), and the data length its offsets imply.
fn header_text(entries: &[Entry]) -> (String, u64) {
    let mut offset = 0u64;
    let mut parts = Vec::new();
    for e in entries {
        let dtype = DTYPES[e.dtype];
        let name = serde_json::to_string(NAMES[e.name]).unwrap();
        if NAMES[e.name] == "__metadata__" {
            parts.push(format!("{name}:{{\"format\":\"pt\"}}"));
            continue;
        }
        let [begin, end] = e.offsets.unwrap_or_else(|| {
            let bytes = e
                .shape
                .iter()
                .try_fold(element_bytes(dtype), |n, &d| n.checked_mul(d))
                .unwrap_or(u64::MAX / 2)
                .min(1 << 20);
            [offset, offset + bytes]
        });
        offset = offset.max(end);
        parts
            .push(format!("{name}:{{\"dtype\":\"{dtype}\",\"shape\":{:?},\"data_offsets\":[{begin},{end}]}}", e.shape));
    }
    (format!("{{{}}}", parts.join(",")), offset)
}

fn file_bytes(header: &str, length_field: u64, data_len: u64) -> Vec<u8> {
    let mut bytes = length_field.to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len as usize, 0x3c);
    bytes
}

fn small_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("small.safetensors");
    let tensors = vec![
        ("w".to_string(), Dtype::F32, vec![3, 4]),
        ("b".to_string(), Dtype::Bf16, vec![5]),
        ("e".to_string(), Dtype::F16, vec![0]),
        ("n".to_string(), Dtype::F32, vec![2]),
    ];
    write(&path, true, &tensors, |i, out| {
        out.write_all(&vec![i as u8; 64][..tensors[i].1.bytes_of(tensors[i].2.iter().product()) as usize])
    })
    .unwrap();
    path
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random headers: names (with duplicates), dtypes, shapes (with overflowing ones),
    /// offsets, a length field that is right or a little off, data a little short or long.
    #[test]
    fn random_headers_never_panic(
        entries in proptest::collection::vec(entry(), 0..6),
        length_delta in prop_oneof![6 => Just(0i64), 1 => -8i64..8, 1 => Just(i64::MAX)],
        data_delta in prop_oneof![6 => Just(0i64), 1 => -8i64..8],
    ) {
        let (header, data_len) = header_text(&entries);
        let length = if length_delta == i64::MAX { u64::MAX } else { (header.len() as i64 + length_delta).max(0) as u64 };
        let data_len = (data_len as i64 + data_delta).max(0) as u64;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, file_bytes(&header, length, data_len)).unwrap();
        match timed("read_header", || read_header(&path)) {
            Ok(tensors) => check_layout(&path, &tensors),
            Err(e) => prop_assert!(e.to_string().contains("model.safetensors"), "{e}"),
        }
    }

    /// A valid file with its length field or header bytes mutated, or cut short.
    #[test]
    fn mutated_files_never_panic(
        flips in proptest::collection::vec((any::<Index>(), any::<u8>()), 0..4),
        cut in proptest::option::weighted(0.2, any::<Index>()),
        inserted in proptest::option::weighted(0.3, (any::<Index>(), proptest::collection::vec(any::<u8>(), 1..8))),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = small_file(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for (at, x) in flips {
            // Mostly the length field and the JSON text, where the structure is.
            let at = at.index(header_end.min(200));
            bytes[at] ^= x.max(1);
        }
        if let Some((at, extra)) = inserted {
            let at = at.index(bytes.len());
            bytes.splice(at..at, extra);
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        std::fs::write(&path, &bytes).unwrap();
        match timed("read_header", || read_header(&path)) {
            Ok(tensors) => check_layout(&path, &tensors),
            Err(e) => prop_assert!(e.to_string().contains("small.safetensors"), "{e}"),
        }
    }

    /// A shard index naming arbitrary paths: only files inside the folder are read.
    #[test]
    fn shard_indexes_never_escape_or_panic(
        shards in proptest::collection::vec(0..SHARDS.len(), 1..4),
        extra in proptest::option::of("[./a-z\u{0}]{0,12}"),
    ) {
        let outer = tempfile::tempdir().unwrap();
        let dir = outer.path().join("m");
        std::fs::create_dir(&dir).unwrap();
        let spec = ferry_core::catalog::Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
        std::fs::write(dir.join("config.json"), ferry_engine::synth::config_json(&spec, Dtype::F32).to_string()).unwrap();
        let small = small_file(&dir);
        std::fs::rename(&small, dir.join("shard.safetensors")).unwrap();
        std::fs::copy(dir.join("shard.safetensors"), outer.path().join("outside.safetensors")).unwrap();
        std::os::unix::fs::symlink(outer.path().join("outside.safetensors"), dir.join("link.safetensors")).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        let mut map = serde_json::Map::new();
        for (i, s) in shards.iter().enumerate() {
            map.insert(format!("t{i}"), SHARDS[*s].into());
        }
        if let Some(extra) = extra {
            map.insert("x".into(), extra.into());
        }
        let index = serde_json::json!({"weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let result = timed("open", || ferry_engine::weights::ModelFiles::open(&dir));
        // The small shard never has test-tiny's tensors, so every outcome is an error;
        // none may come from a file outside the folder (it would have been read).
        match result.expect_err("no tiny model in these shards") {
            EngineError::BadWeights { file, message } => prop_assert!(file.starts_with(&dir), "{}: {message}", file.display()),
            EngineError::Core(ferry_core::CoreError::Io { path, error }) => {
                prop_assert!(path.starts_with(&dir), "{}: {error}", path.display())
            }
            other => prop_assert!(false, "unexpected error {other}"),
        }
    }
}

const SHARDS: &[&str] = &[
    "shard.safetensors",
    "./shard.safetensors",
    "../outside.safetensors",
    "../m/shard.safetensors",
    "/dev/zero",
    "link.safetensors",
    "sub",
    "sub/../shard.safetensors",
    "",
    ".",
    "missing.safetensors",
];

#[test]
fn the_seed_file_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_file(dir.path());
    let tensors = read_header(&path).unwrap();
    assert_eq!(tensors.len(), 4);
    check_layout(&path, &tensors);
}
