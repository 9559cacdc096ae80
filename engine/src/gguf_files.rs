//! A llama.cpp GGUF file as a model the engine runs: the shape from its metadata
//! (`ferry_core::model::from_gguf`), each tensor Ferry names as Hugging Face does
//! found under llama.cpp's name, with its byte range and ggml type as its format. The
//! data is read like safetensors data, with direct I/O widened to whole pages (GGUF
//! aligns tensors to 32 bytes only).
//!
//! llama.cpp's converter stores the query and key rows of `llama`-architecture files
//! with each head's halves interleaved, for its rotary embedding that turns adjacent
//! pairs; the engine runs them as stored with `RopeLayout::Pairs`, which gives the
//! same attention scores (see `synth_gguf`). `qwen2` files are stored unpermuted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_core::gguf::GgufHeader;
use ferry_core::model::{gguf_name, WeightFormat, WeightFormats, WeightGroup};

use crate::kernels::RopeLayout;
use crate::weights::{ModelFiles, StoredTensor};
use crate::EngineError;

/// Opens and validates a GGUF file.
pub fn open(path: &Path) -> Result<ModelFiles, EngineError> {
    let header = GgufHeader::open(path)?;
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let spec = ferry_core::model::from_gguf(&header, name)?;
    crate::synth::check_supported(&spec)?;
    let rope_layout = match header.architecture()? {
        "qwen2" => RopeLayout::Halves,
        _ => RopeLayout::Pairs,
    };
    let by_name: BTreeMap<&str, &ferry_core::gguf::TensorInfo> =
        header.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut tensors = BTreeMap::new();
    let mut groups = vec![(WeightGroup::Embeddings, 0), (WeightGroup::Head, 0)];
    for layer in 0..spec.num_layers {
        groups.extend(WeightGroup::PER_LAYER.map(|g| (g, layer)));
    }
    for (group, layer) in groups {
        for tensor in spec.group_tensors(group, layer) {
            let bad = |message: String| EngineError::BadWeights { file: path.to_path_buf(), message };
            let gguf = gguf_name(&tensor.name).ok_or_else(|| bad(format!("no llama.cpp name for {}", tensor.name)))?;
            let info = by_name
                .get(gguf.as_str())
                .ok_or_else(|| bad(format!("no tensor '{gguf}' ({}, which the metadata implies)", tensor.name)))?;
            let format = match info.ggml_type.name {
                "F32" => WeightFormat::F32,
                "F16" => WeightFormat::F16,
                "BF16" => WeightFormat::Bf16,
                _ => WeightFormat::Block(info.ggml_type),
            };
            let shape: Vec<u64> = info.dims.iter().rev().copied().collect();
            let stored = StoredTensor { file: path.to_path_buf(), format, shape, start: info.start, end: info.end };
            tensors.insert(tensor.name, stored);
        }
    }
    let files = ModelFiles::new(path.to_path_buf(), spec, WeightFormats::stored(), rope_layout, tensors);
    files.validate()?;
    Ok(files)
}

/// The one `.gguf` file in a folder, if it holds exactly one (two are ambiguous: an
/// error naming them).
pub fn only_gguf_in(dir: &Path) -> Result<Option<PathBuf>, EngineError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(EngineError::Refused(format!(
            "{} holds several GGUF files ({}); name the one to run",
            dir.display(),
            found.iter().filter_map(|p| p.file_name()?.to_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}
