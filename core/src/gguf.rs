//! GGUF files (llama.cpp's format): the header (a model description, like a
//! Hugging Face `config.json`, with the tensor table beside it) — metadata key/value pairs and the
//! tensor table — read and validated before anything trusts it. A GGUF file is
//! `GGUF`, a version, counts, the metadata, the tensor infos (name, shape, ggml type,
//! offset), padding to the file's alignment, then the tensor data; offsets are
//! relative to the data section and aligned.
//!
//! Everything a header claims is checked against the bytes that are there: counts and
//! lengths before anything is allocated for them (a hostile count cannot make the
//! reader allocate), nesting of arrays, known tensor types, shapes whose element count
//! fits and whose rows are whole blocks of the type, offsets aligned and inside the
//! file, tensors that neither overlap nor repeat a name. Errors name the file and the
//! key or tensor. The block layouts are ggml's (`GgmlType::block`), checked against
//! the `gguf` Python package in the tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{CoreError, Result};

/// The most header bytes read: large vocabularies take a few MiB.
pub const MAX_HEADER_BYTES: usize = 64 << 20;
/// Bytes a header is first read in (`GgufHeader::open`).
const FIRST_HEADER_READ_BYTES: usize = 1 << 20;
/// Arrays of arrays deeper than this are refused (the format allows nesting; models
/// use one level).
const MAX_ARRAY_DEPTH: usize = 4;
/// ggml's most dimensions.
const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// A tensor type of ggml, with its block layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    /// Elements per block and bytes per block.
    pub block_elements: u64,
    pub block_bytes: u64,
}

/// ggml's tensor types Ferry knows the layout of (id, name, elements, bytes per block):
/// a file holding any of them is read and planned at its real bytes (`stored`); the
/// engine runs those `kernels::quant` decodes and refuses the others by name.
const TYPES: [(u32, &str, u64, u64); 31] = [
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
];

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().find(|t| t.0 == id).map(|&(id, name, block_elements, block_bytes)| GgmlType {
            id,
            name,
            block_elements,
            block_bytes,
        })
    }

    /// Every type Ferry knows, for tests and messages.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        TYPES.iter().filter_map(|t| GgmlType::from_id(t.0))
    }

    /// The type of a name as ggml spells it (`Q4_K`), in any case.
    pub fn by_name(name: &str) -> Option<GgmlType> {
        GgmlType::all().find(|t| t.name.eq_ignore_ascii_case(name))
    }

    /// Whether values are stored in blocks with scales (every type of more than one
    /// element per block), not as plain numbers.
    pub fn is_quantized(&self) -> bool {
        self.block_elements > 1
    }

    /// The type llama.cpp's quantizer stores a matrix with rows of `cols` values in when
    /// asked for `self` (`llama_tensor_get_type` in `src/llama-quant.cpp`). The
    /// K-quants' 256-value blocks do not divide every row — Qwen1.5-MoE's experts are
    /// 1408 wide — and it then falls back to a 32-value type of at least as many bits:
    /// Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, Q2_K and Q3_K to Q4_0 (older llama.cpp
    /// versions wrote IQ4_NL: both run, at the same bytes), IQ4_XS and the lattice types
    /// (IQ1_S … IQ3_S) to IQ4_NL, TQ1_0 and TQ2_0 to Q4_0 (`tensor_type_fallback` in
    /// `src/llama-quant.cpp`);
    /// to F16 where those blocks do not divide the row either. Any other type stays.
    pub fn for_rows_of(self, cols: u64) -> GgmlType {
        if self.block_elements != 256 || cols.is_multiple_of(256) {
            return self;
        }
        let fallback = match self.name {
            "Q4_K" => "Q5_0",
            "Q5_K" => "Q5_1",
            "Q6_K" => "Q8_0",
            "Q2_K" | "Q3_K" | "TQ1_0" | "TQ2_0" => "Q4_0",
            "IQ4_XS" | "IQ1_S" | "IQ1_M" | "IQ2_XXS" | "IQ2_XS" | "IQ2_S" | "IQ3_XXS" | "IQ3_S" => "IQ4_NL",
            _ => return self,
        };
        match GgmlType::by_name(fallback) {
            Some(t) if cols.is_multiple_of(t.block_elements) => t,
            _ => GgmlType::by_name("F16").unwrap_or(self),
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: the first dimension is the row length (contiguous).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A validated GGUF header.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    /// Where the data section starts.
    pub data_start: u64,
    pub alignment: u64,
}

impl GgufHeader {
    /// Reads and validates the header of a GGUF file: its first MiB, and four times
    /// more while that does not hold the whole header (a large vocabulary), up to
    /// `MAX_HEADER_BYTES`. Reading the limit at once read most of a small model's
    /// weights through the page cache on every open.
    pub fn open(path: &Path) -> Result<GgufHeader> {
        use std::io::Read;
        let mut file = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| CoreError::io(path, e))?.len();
        let limit = (MAX_HEADER_BYTES as u64).min(file_len) as usize;
        let mut bytes = Vec::new();
        let mut wanted = FIRST_HEADER_READ_BYTES.min(limit);
        loop {
            let more = (wanted - bytes.len()) as u64;
            (&mut file).take(more).read_to_end(&mut bytes).map_err(|e| CoreError::io(path, e))?;
            match GgufHeader::parse(path, &bytes, file_len) {
                // What was read ends before `wanted`: the file is shorter than it says.
                Err(e) if bytes.len() < wanted || bytes.len() >= limit => return Err(e),
                Err(_) => wanted = wanted.saturating_mul(4).min(limit),
                header => return header,
            }
        }
    }

    /// Validates the header in `bytes` (the file's first bytes, or all of it) of a
    /// file of `file_len` bytes.
    pub fn parse(path: &Path, bytes: &[u8], file_len: u64) -> Result<GgufHeader> {
        let bad = |message: String| CoreError::invalid(format!("{}: {message}", path.display()));
        let mut r = Reader { bytes, at: 0 };
        if r.take(4).map_err(&bad)? != b"GGUF" {
            return Err(bad("not a GGUF file (the first four bytes are not `GGUF`)".into()));
        }
        let version = r.u32().map_err(&bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let tensor_count = r.u64().map_err(&bad)?;
        let kv_count = r.u64().map_err(&bad)?;
        let mut metadata = BTreeMap::new();
        for index in 0..kv_count {
            let key = r.name().map_err(|e| bad(format!("metadata entry {index}: {e}")))?;
            let value = r.value(0).map_err(|e| bad(format!("metadata `{key}`: {e}")))?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(bad(format!("metadata `{key}` appears twice")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::Uint(a)) if *a > 0 && a.is_power_of_two() => *a,
            Some(other) => return Err(bad(format!("general.alignment = {other:?} is not a power of two"))),
        };
        let mut infos = Vec::new();
        for index in 0..tensor_count {
            // Each entry takes at least 8 + 4 + 4 + 8 bytes: a count past that is a lie.
            if r.remaining() < 24 {
                return Err(bad(format!(
                    "the header promises {tensor_count} tensors but ends after {index} (truncated?)"
                )));
            }
            infos.push(r.tensor_info().map_err(|e| bad(format!("tensor entry {index}: {e}")))?);
        }
        let data_start = (r.at as u64).div_ceil(alignment) * alignment;
        let tensors = place_tensors(infos, data_start, alignment, file_len).map_err(bad)?;
        Ok(GgufHeader { path: path.to_path_buf(), version, metadata, tensors, data_start, alignment })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A whole-number metadata value, or an error naming the key.
    pub fn uint(&self, key: &str) -> Result<u64> {
        match self.metadata.get(key) {
            Some(Value::Uint(v)) => Ok(*v),
            Some(Value::Int(v)) if *v >= 0 => Ok(*v as u64),
            Some(other) => Err(self.bad(format!("`{key}` is {other:?}, not a whole number"))),
            None => Err(self.bad(format!("metadata `{key}` is missing"))),
        }
    }

    /// The architecture (`general.architecture`: llama, qwen2, …).
    pub fn architecture(&self) -> Result<&str> {
        match self.metadata.get("general.architecture") {
            Some(Value::String(s)) => Ok(s),
            _ => Err(self.bad("metadata `general.architecture` is missing or not a string".into())),
        }
    }

    fn bad(&self, message: String) -> CoreError {
        CoreError::invalid(format!("{}: {message}", self.path.display()))
    }
}

/// Turns the tensor table into absolute, checked byte ranges.
fn place_tensors(
    infos: Vec<(String, Vec<u64>, u32, u64)>,
    data_start: u64,
    alignment: u64,
    file_len: u64,
) -> Result<Vec<TensorInfo>, String> {
    let mut tensors = Vec::with_capacity(infos.len());
    let mut names = std::collections::HashSet::new();
    for (name, dims, type_id, offset) in infos {
        let ggml_type = GgmlType::from_id(type_id)
            .ok_or_else(|| format!("tensor `{name}`: ggml type {type_id} is not one Ferry knows"))?;
        if !names.insert(name.clone()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        if dims.contains(&0) {
            return Err(format!("tensor `{name}`: shape {dims:?} has an empty dimension"));
        }
        if dims[0] % ggml_type.block_elements != 0 {
            return Err(format!(
                "tensor `{name}`: rows of {} elements are not whole {} blocks of {}",
                dims[0], ggml_type.name, ggml_type.block_elements
            ));
        }
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}`: shape {dims:?} overflows"))?;
        let bytes = (elements / ggml_type.block_elements)
            .checked_mul(ggml_type.block_bytes)
            .ok_or_else(|| format!("tensor `{name}`: shape {dims:?} overflows"))?;
        if offset % alignment != 0 {
            return Err(format!("tensor `{name}`: offset {offset} is not aligned to {alignment} bytes"));
        }
        let start = data_start.checked_add(offset).ok_or_else(|| format!("tensor `{name}`: offset overflows"))?;
        let end = start.checked_add(bytes).filter(|&end| end <= file_len).ok_or_else(|| {
            format!("tensor `{name}`: {bytes} bytes at offset {offset} run past the end of the file ({file_len} bytes; truncated?)")
        })?;
        tensors.push(TensorInfo { name, dims, ggml_type, start, end });
    }
    let mut by_start: Vec<&TensorInfo> = tensors.iter().collect();
    by_start.sort_by_key(|t| t.start);
    for pair in by_start.windows(2) {
        if pair[1].start < pair[0].end {
            return Err(format!("tensors `{}` and `{}` overlap", pair[0].name, pair[1].name));
        }
    }
    Ok(tensors)
}

/// A cursor over the header bytes; every read is checked against what is left.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(if self.bytes.len() >= MAX_HEADER_BYTES {
                format!("the header is larger than {} MiB", MAX_HEADER_BYTES >> 20)
            } else {
                format!("truncated: {n} more bytes needed at byte {}", self.at)
            });
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items at least `item_bytes` each: more than the bytes left is refused
    /// before anything is allocated for it.
    fn count(&mut self, item_bytes: usize) -> Result<usize, String> {
        let n = self.u64()?;
        if n > (self.remaining() / item_bytes.max(1)) as u64 {
            return Err(format!(
                "truncated or corrupt: a count of {n} at byte {} is more than the {} bytes left can hold",
                self.at - 8,
                self.remaining()
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.count(1)?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "a string is not valid UTF-8".to_string())
    }

    /// A key or tensor name: a string without control characters (a corrupt one
    /// would otherwise reach the terminal raw in every message that names it).
    fn name(&mut self) -> Result<String, String> {
        let name = self.string()?;
        if name.chars().any(char::is_control) {
            return Err(format!("a name holds control characters (\"{}\"): corrupt", name.escape_debug()));
        }
        Ok(name)
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        let kind = self.u32()?;
        self.value_of(kind, depth)
    }

    fn value_of(&mut self, kind: u32, depth: usize) -> Result<Value, String> {
        Ok(match kind {
            0 => Value::Uint(self.array::<1>()?[0] as u64),
            1 => Value::Int(self.array::<1>()?[0] as i8 as i64),
            2 => Value::Uint(u16::from_le_bytes(self.array()?) as u64),
            3 => Value::Int(i16::from_le_bytes(self.array()?) as i64),
            4 => Value::Uint(self.u32()? as u64),
            5 => Value::Int(i32::from_le_bytes(self.array()?) as i64),
            6 => Value::Float(f32::from_le_bytes(self.array()?) as f64),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => return Err(format!("a bool of {other}")),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let item_kind = self.u32()?;
                let len = self.count(item_size(item_kind))?;
                let mut items = Vec::with_capacity(len);
                for _ in 0..len {
                    items.push(self.value_of(item_kind, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::Uint(self.u64()?),
            11 => Value::Int(i64::from_le_bytes(self.array()?)),
            12 => Value::Float(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown value type {other}")),
        })
    }

    /// (name, dims, ggml type id, offset).
    fn tensor_info(&mut self) -> Result<(String, Vec<u64>, u32, u64), String> {
        let name = self.name()?;
        let n_dims = self.u32()?;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            return Err(format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS})"));
        }
        let dims = (0..n_dims).map(|_| self.u64()).collect::<Result<Vec<u64>, String>>()?;
        let type_id = self.u32()?;
        let offset = self.u64()?;
        Ok((name, dims, type_id, offset))
    }
}

/// The fewest bytes one array item of `kind` takes (strings: their length field).
fn item_size(kind: u32) -> usize {
    match kind {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}
