//! The safetensors format, read and written directly: an 8-byte little-endian header
//! length, a JSON header mapping tensor names to dtype, shape and byte offsets, then
//! the data. Only the header is parsed here; tensor bytes are read later with direct
//! I/O at the offsets it gives, so every offset is checked against the file size.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_core::model::Dtype;

use crate::EngineError;

/// Where one tensor's bytes are.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorLocation {
    pub file: PathBuf,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Absolute byte offsets in the file.
    pub start: u64,
    pub end: u64,
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Entry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

pub fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "F32",
        Dtype::F16 => "F16",
        Dtype::Bf16 => "BF16",
        Dtype::Int8 => "I8",
        Dtype::Int4 => "I4",
    }
}

fn parse_dtype(name: &str) -> Option<Dtype> {
    match name {
        "F32" => Some(Dtype::F32),
        "F16" => Some(Dtype::F16),
        "BF16" => Some(Dtype::Bf16),
        _ => None,
    }
}

/// The JSON header's top-level entries in file order, duplicates kept (a JSON object
/// read into a map silently keeps the last of two equal keys).
struct RawHeader(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for RawHeader {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object mapping tensor names to entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    entries.push(entry);
                }
                Ok(RawHeader(entries))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// The largest header accepted (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Reads the header of one safetensors file and checks its layout: the header length
/// fits the file, tensor names are unique, every tensor's bytes match its shape and lie
/// inside the data section, no two tensors overlap, and the tensors cover the data
/// section exactly (no gap or trailing bytes that a shifted header could hide in).
pub fn read_header(path: &Path) -> Result<BTreeMap<String, TensorLocation>, EngineError> {
    use std::io::Read;
    let bad = |message: String| EngineError::BadWeights { file: path.to_path_buf(), message };
    let mut file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let metadata = file.metadata().map_err(|e| EngineError::io(path, e))?;
    if metadata.is_dir() {
        return Err(bad("is a directory, not a safetensors file".into()));
    }
    if !metadata.is_file() {
        return Err(bad("not a regular file (a device, pipe or socket), so not a safetensors file".into()));
    }
    let file_len = metadata.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| bad(format!("truncated: {file_len} bytes, too short for a safetensors header")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || header_len > file_len.saturating_sub(8) {
        return Err(bad(format!(
            "header length {header_len} does not fit in a {file_len}-byte file (truncated or not safetensors)"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| EngineError::io(path, e))?;
    let RawHeader(raw) = serde_json::from_slice(&header).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut tensors = BTreeMap::new();
    let mut metadata_seen = false;
    for (name, value) in raw {
        if name == "__metadata__" {
            if std::mem::replace(&mut metadata_seen, true) {
                return Err(bad("the header has two __metadata__ entries".into()));
            }
            continue;
        }
        if tensors.contains_key(&name) {
            return Err(bad(format!("tensor '{name}' appears twice in the header")));
        }
        let entry: Entry = serde_json::from_value(value).map_err(|e| bad(format!("tensor '{name}': {e}")))?;
        let dtype = parse_dtype(&entry.dtype)
            .ok_or_else(|| bad(format!("tensor '{name}' has dtype {}; Ferry reads F32, F16 and BF16", entry.dtype)))?;
        let [begin, end] = entry.data_offsets;
        let bytes = entry
            .shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .and_then(|elements| elements.checked_mul(dtype.bits()))
            .map(|bits| bits.div_ceil(8));
        if end < begin || bytes != Some(end - begin) {
            return Err(bad(format!(
                "tensor '{name}': offsets {begin}..{end} do not match shape {:?} of {}",
                entry.shape, entry.dtype
            )));
        }
        if end > data_len {
            return Err(bad(format!(
                "truncated: tensor '{name}' ends at byte {} but the file has {file_len}",
                data_start as u128 + end as u128
            )));
        }
        tensors.insert(
            name,
            TensorLocation {
                file: path.to_path_buf(),
                dtype,
                shape: entry.shape,
                start: data_start + begin,
                end: data_start + end,
            },
        );
    }
    check_coverage(&tensors, data_start, file_len).map_err(bad)?;
    Ok(tensors)
}

/// The tensors, in offset order, tile the data section `data_start..file_len` exactly.
fn check_coverage(tensors: &BTreeMap<String, TensorLocation>, data_start: u64, file_len: u64) -> Result<(), String> {
    let mut spans: Vec<(&String, &TensorLocation)> = tensors.iter().collect();
    spans.sort_by_key(|(_, t)| (t.start, t.end));
    let mut covered = data_start;
    let mut previous: Option<&String> = None;
    for (name, tensor) in spans {
        if tensor.start < covered {
            let other = previous.map(|p| format!("tensor '{p}'")).unwrap_or_else(|| "the header".into());
            return Err(format!(
                "tensor '{name}' (data offsets {}..{}) overlaps {other}",
                tensor.start - data_start,
                tensor.end - data_start
            ));
        }
        if tensor.start > covered {
            let after = previous.map(|p| format!(" after tensor '{p}'")).unwrap_or_default();
            return Err(format!(
                "{} bytes at data offset {}{after} belong to no tensor (before tensor '{name}'); \
                 the header's offsets or length are wrong",
                tensor.start - covered,
                covered - data_start
            ));
        }
        covered = tensor.end;
        previous = Some(name);
    }
    if covered < file_len {
        let after = previous.map(|p| format!(" after tensor '{p}'")).unwrap_or_default();
        return Err(format!(
            "{} trailing bytes at data offset {}{after} belong to no tensor; \
             the header's offsets or length are wrong",
            file_len - covered,
            covered - data_start
        ));
    }
    Ok(())
}

/// Writes a safetensors file from tensors produced on demand, in the given order.
/// `fill(index, out)` writes tensor `index`'s bytes to `out`. The header is padded so
/// the data starts on a 4096-byte boundary (direct I/O reads then need less slack).
/// The file is written atomically: complete under its name, or not there at all; an
/// existing file is replaced only if `overwrite`.
pub fn write(
    path: &Path,
    overwrite: bool,
    tensors: &[(String, Dtype, Vec<u64>)],
    mut fill: impl FnMut(usize, &mut dyn Write) -> std::io::Result<()>,
) -> Result<(), EngineError> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let bytes = dtype.bytes_of(shape.iter().product());
        let entry = Entry {
            dtype: dtype_name(*dtype).to_string(),
            shape: shape.clone(),
            data_offsets: [offset, offset + bytes],
        };
        header.insert(name.clone(), serde_json::to_value(entry).expect("entries serialize"));
        offset += bytes;
    }
    let mut metadata = serde_json::Map::new();
    metadata.insert("format".into(), "pt".into());
    header.insert("__metadata__".into(), serde_json::Value::Object(metadata));
    let mut text = serde_json::to_vec(&header).expect("header serializes");
    let padded = (8 + text.len() as u64).div_ceil(4096) * 4096 - 8;
    text.resize(padded as usize, b' ');
    let file = ferry_core::atomic::AtomicFile::create(path, overwrite)?;
    let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
    let io = |e| EngineError::io(path, e);
    out.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&text).map_err(io)?;
    for index in 0..tensors.len() {
        fill(index, &mut out).map_err(io)?;
    }
    let file = out.into_inner().map_err(|e| EngineError::io(path, e.into_error()))?;
    Ok(file.commit()?)
}
