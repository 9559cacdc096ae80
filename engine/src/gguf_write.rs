//! Writing GGUF files (version 3): metadata, the tensor table and each tensor's data
//! at 32-byte aligned offsets, as llama.cpp writes them; read back by
//! `ferry_core::gguf` and by llama.cpp's own `gguf` package (tested).

use std::io::Write;
use std::path::Path;

use ferry_core::gguf::GgmlType;

use crate::EngineError;

/// Where llama.cpp aligns tensor data unless `general.alignment` says otherwise.
const ALIGNMENT: u64 = 32;

/// A metadata value with the width GGUF stores it in.
#[derive(Debug, Clone)]
pub enum Meta {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strings(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

/// One tensor of the file: `dims` in ggml order (the row length first).
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
}

impl GgufTensor {
    pub fn bytes(&self) -> u64 {
        let elements: u64 = self.dims.iter().product();
        elements / self.ggml_type.block_elements * self.ggml_type.block_bytes
    }
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn put_meta(out: &mut Vec<u8>, value: &Meta) {
    let array = |out: &mut Vec<u8>, kind: u32, count: usize| {
        out.extend_from_slice(&9u32.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&(count as u64).to_le_bytes());
    };
    match value {
        Meta::U32(v) => {
            out.extend_from_slice(&4u32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        Meta::I32(v) => {
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        Meta::F32(v) => {
            out.extend_from_slice(&6u32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        Meta::Bool(v) => {
            out.extend_from_slice(&7u32.to_le_bytes());
            out.push(*v as u8);
        }
        Meta::Str(v) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            put_string(out, v);
        }
        Meta::Strings(vs) => {
            array(out, 8, vs.len());
            vs.iter().for_each(|v| put_string(out, v));
        }
        Meta::F32s(vs) => {
            array(out, 6, vs.len());
            vs.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        Meta::I32s(vs) => {
            array(out, 5, vs.len());
            vs.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
    }
}

/// The header: magic, version, counts, metadata and tensor table, padded to the
/// alignment where the data starts.
fn header(metadata: &[(String, Meta)], tensors: &[GgufTensor]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        put_meta(&mut out, value);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
        out.extend_from_slice(&t.ggml_type.id.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.bytes()).div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    out.resize((out.len() as u64).div_ceil(ALIGNMENT) as usize * ALIGNMENT as usize, 0);
    out
}

/// Counts what a tensor's writer wrote, to check it wrote exactly its tensor.
struct Counted<'a> {
    inner: &'a mut dyn Write,
    bytes: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `path` atomically (an existing file only with `overwrite`); `fill(i, w)`
/// writes tensor i's data, exactly its bytes.
pub fn write(
    path: &Path,
    overwrite: bool,
    metadata: &[(String, Meta)],
    tensors: &[GgufTensor],
    mut fill: impl FnMut(usize, &mut dyn Write) -> std::io::Result<()>,
) -> Result<(), EngineError> {
    for t in tensors {
        let elements: u64 = t.dims.iter().product();
        let row = t.dims.first().copied().unwrap_or(0);
        if t.dims.is_empty() || !row.is_multiple_of(t.ggml_type.block_elements) || elements == 0 {
            return Err(EngineError::Internal(format!(
                "{}: {:?} cannot be stored as {} (rows of whole {}-value blocks)",
                t.name, t.dims, t.ggml_type.name, t.ggml_type.block_elements
            )));
        }
    }
    let file = ferry_core::atomic::AtomicFile::create(path, overwrite)?;
    let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
    let io = |e| EngineError::io(path, e);
    out.write_all(&header(metadata, tensors)).map_err(io)?;
    for (index, t) in tensors.iter().enumerate() {
        let mut counted = Counted { inner: &mut out, bytes: 0 };
        fill(index, &mut counted).map_err(io)?;
        if counted.bytes != t.bytes() {
            return Err(EngineError::Internal(format!(
                "{}: wrote {} bytes of a {}-byte tensor",
                t.name,
                counted.bytes,
                t.bytes()
            )));
        }
        let padding = t.bytes().div_ceil(ALIGNMENT) * ALIGNMENT - t.bytes();
        out.write_all(&vec![0u8; padding as usize]).map_err(io)?;
    }
    let file = out.into_inner().map_err(|e| EngineError::io(path, e.into_error()))?;
    Ok(file.commit()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::gguf::{GgufHeader, Value};

    fn ggml(name: &str) -> GgmlType {
        GgmlType::all().find(|t| t.name == name).unwrap()
    }

    #[test]
    fn a_written_file_reads_back_with_its_metadata_and_aligned_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        let metadata = vec![
            ("general.architecture".to_string(), Meta::Str("llama".into())),
            ("llama.block_count".to_string(), Meta::U32(3)),
            ("tokenizer.ggml.tokens".to_string(), Meta::Strings(vec!["a".into(), "bc".into()])),
            ("tokenizer.ggml.scores".to_string(), Meta::F32s(vec![0.5, -1.0])),
        ];
        let tensors = vec![
            GgufTensor { name: "norm.weight".into(), dims: vec![5], ggml_type: ggml("F32") },
            GgufTensor { name: "w.weight".into(), dims: vec![64, 3], ggml_type: ggml("Q8_0") },
        ];
        write(&path, false, &metadata, &tensors, |i, w| w.write_all(&vec![i as u8 + 1; tensors[i].bytes() as usize]))
            .unwrap();
        let header = GgufHeader::open(&path).unwrap();
        assert_eq!(header.architecture().unwrap(), "llama");
        assert_eq!(header.uint("llama.block_count").unwrap(), 3);
        assert_eq!(
            header.get("tokenizer.ggml.tokens"),
            Some(&Value::Array(vec![Value::String("a".into()), Value::String("bc".into())]))
        );
        let bytes = std::fs::read(&path).unwrap();
        for (i, t) in header.tensors.iter().enumerate() {
            assert_eq!(t.start % ALIGNMENT, 0, "{}", t.name);
            assert_eq!(t.end - t.start, tensors[i].bytes());
            assert!(bytes[t.start as usize..t.end as usize].iter().all(|&b| b == i as u8 + 1));
        }
        // A writer that writes the wrong amount is an error, and leaves no file.
        let short = dir.path().join("short.gguf");
        let err = write(&short, false, &metadata, &tensors, |_, w| w.write_all(&[0; 3])).unwrap_err();
        assert!(err.to_string().contains("wrote 3 bytes"), "{err}");
        assert!(!short.exists());
    }
}
