//! A llama.cpp GGUF file as a model the engine runs: the shape from its metadata
//! (`ferry_core::model::from_gguf`), each tensor Ferry names as Hugging Face does
//! found under llama.cpp's name, with its byte range and ggml type as its format. The
//! data is read like safetensors data, with direct I/O widened to whole pages (GGUF
//! aligns tensors to 32 bytes only).
//!
//! llama.cpp's converter stores the query and key rows of `llama`-architecture files
//! with each head's halves interleaved, for its rotary embedding that turns adjacent
//! pairs; the engine runs them as stored with `RopeLayout::Pairs`, which gives the
//! same attention scores (see `synth_gguf`). `qwen2`, `qwen3` and `qwen3moe` files are
//! stored unpermuted.
//!
//! A `rope_freqs` tensor (llama.cpp's converter writes Llama 3.1's long-context
//! scaling as one divisor per rotary frequency) is read with the file and applied
//! (`ModelSpec::rope_divisors`); any other tensor the model does not use is refused.
//!
//! A mixture of experts (Mixtral, written by llama.cpp as a `llama` file with
//! `expert_count`) stores each layer's experts as one 3-D tensor per projection
//! (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`); each expert is a contiguous
//! slice of it, read as its own tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_core::gguf::GgufHeader;
use ferry_core::model::{gguf_name, WeightFormat, WeightFormats};

use crate::kernels::RopeLayout;
use crate::weights::{ModelFiles, StoredTensor};
use crate::EngineError;

/// Opens and validates a GGUF file.
pub fn open(path: &Path) -> Result<ModelFiles, EngineError> {
    let header = GgufHeader::open(path)?;
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let mut spec = ferry_core::model::from_gguf(&header, name)?;
    crate::synth::check_supported(&spec)?;
    let mut required: std::collections::HashSet<String> =
        crate::weights::required_tensors(&spec).iter().filter_map(|t| gguf_name(&t.name)).collect();
    required.insert(ROPE_FREQS.into());
    if let Some(info) = header.tensors.iter().find(|t| t.name == ROPE_FREQS) {
        spec.rope_divisors = Some(rope_divisors(path, info, spec.head_dim())?);
    }
    let rope_layout = match header.architecture()? {
        "qwen2" | "qwen2moe" | "qwen3" | "qwen3moe" => RopeLayout::Halves,
        _ => RopeLayout::Pairs,
    };
    let by_name: BTreeMap<&str, &ferry_core::gguf::TensorInfo> =
        header.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut tensors = BTreeMap::new();
    for tensor in crate::weights::required_tensors(&spec) {
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
        let mut stored = StoredTensor { file: path.to_path_buf(), format, shape, start: info.start, end: info.end };
        if let Some(expert) = expert_index(&tensor.name) {
            stored = expert_slice(stored, expert, spec.num_experts).map_err(|m| bad(format!("'{gguf}': {m}")))?;
        }
        tensors.insert(tensor.name, stored);
    }
    let files = ModelFiles::new(path.to_path_buf(), spec, WeightFormats::stored(), rope_layout, tensors);
    files.validate()?;
    crate::weights::check_all_used(path, &required, header.tensors.iter().map(|t| t.name.as_str()))?;
    Ok(files)
}

/// llama.cpp's name for a file's rotary frequency divisors.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// The `rope_freqs` tensor's values: F32, one positive divisor per rotary frequency.
fn rope_divisors(
    path: &Path,
    info: &ferry_core::gguf::TensorInfo,
    head_dim: u64,
) -> Result<std::sync::Arc<[f32]>, EngineError> {
    let bad = |message: String| EngineError::BadWeights { file: path.to_path_buf(), message };
    if info.ggml_type.name != "F32" {
        return Err(bad(format!("'{ROPE_FREQS}' is {}; llama.cpp writes it as F32", info.ggml_type.name)));
    }
    let mut bytes = vec![0u8; (info.end - info.start) as usize];
    let mut read = || -> std::io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open(path)?;
        file.seek(SeekFrom::Start(info.start))?;
        file.read_exact(&mut bytes)
    };
    read().map_err(|e| EngineError::io(path, e))?;
    let values: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    ferry_core::model::check_rope_divisors(&values, head_dim).map_err(|m| bad(format!("'{ROPE_FREQS}': {m}")))?;
    Ok(values.into())
}

/// The expert a Hugging Face tensor name belongs to (`...experts.7.w1.weight` → 7).
fn expert_index(hf: &str) -> Option<u64> {
    let rest = hf.split_once(".experts.")?.1;
    rest.split('.').next()?.parse().ok()
}

/// Expert `expert` of a layer's 3-D expert tensor (`[experts][rows][cols]`, the
/// experts contiguous one after another): its rows × cols matrix and byte range.
fn expert_slice(whole: StoredTensor, expert: u64, experts: u64) -> Result<StoredTensor, String> {
    let [count, rows, cols] = whole.shape[..] else {
        return Err(format!("an expert tensor must have 3 dimensions, not {:?}", whole.shape));
    };
    if count != experts || expert >= experts {
        return Err(format!("holds {count} experts where the metadata says {experts} (expert_count)"));
    }
    let bytes = whole.format.bytes(rows, cols);
    if whole.end - whole.start != bytes * count {
        return Err(format!("spans {} bytes, not {count} experts of {bytes}", whole.end - whole.start));
    }
    let start = whole.start + expert * bytes;
    Ok(StoredTensor { shape: vec![rows, cols], start, end: start + bytes, ..whole })
}

/// The one `.gguf` file in a folder, if it holds exactly one (two are ambiguous: an
/// error naming them).
pub fn only_gguf_in(dir: &Path) -> Result<Option<PathBuf>, EngineError> {
    Ok(ferry_core::catalog::only_gguf_in(dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn experts(shape: Vec<u64>, bytes: u64) -> StoredTensor {
        StoredTensor { file: "m.gguf".into(), format: WeightFormat::F32, shape, start: 100, end: 100 + bytes }
    }

    #[test]
    fn each_expert_is_its_slice_of_the_layers_tensor() {
        assert_eq!(expert_index("model.layers.3.block_sparse_moe.experts.12.w2.weight"), Some(12));
        assert_eq!(expert_index("model.layers.3.block_sparse_moe.gate.weight"), None);
        let slice = expert_slice(experts(vec![4, 6, 8], 4 * 6 * 8 * 4), 2, 4).unwrap();
        assert_eq!((slice.shape, slice.start, slice.end), (vec![6, 8], 100 + 2 * 192, 100 + 3 * 192));
    }

    #[test]
    fn expert_tensors_that_disagree_with_the_metadata_are_errors() {
        let err = expert_slice(experts(vec![4, 6, 8], 4 * 192), 0, 8).unwrap_err();
        assert!(err.contains("holds 4 experts where the metadata says 8"), "{err}");
        let err = expert_slice(experts(vec![4, 6, 8], 4 * 192 - 4), 0, 4).unwrap_err();
        assert!(err.contains("not 4 experts of 192"), "{err}");
        let err = expert_slice(experts(vec![6, 8], 192), 0, 4).unwrap_err();
        assert!(err.contains("3 dimensions"), "{err}");
    }

    /// A `qwen3moe` file as llama.cpp writes one (tiny): its experts' width
    /// (`expert_feed_forward_length`), head width (`attention.key_length`), per-head
    /// query and key norms and 3-D experts are read into the shape the engine runs.
    #[test]
    fn a_qwen3_moe_file_reads_as_its_shape() {
        use crate::gguf_write::{write, GgufTensor, Meta};
        use ferry_core::gguf::GgmlType;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qwen3moe-tiny.gguf");
        let (hidden, layers, experts, expert_ffn, head_dim, vocab) = (64u64, 2u64, 4u64, 32u64, 48u64, 80u64);
        let key = |k: &str| format!("qwen3moe.{k}");
        let metadata = vec![
            ("general.architecture".to_string(), Meta::Str("qwen3moe".into())),
            (key("embedding_length"), Meta::U32(hidden as u32)),
            (key("block_count"), Meta::U32(layers as u32)),
            (key("feed_forward_length"), Meta::U32(256)),
            (key("expert_feed_forward_length"), Meta::U32(expert_ffn as u32)),
            (key("attention.head_count"), Meta::U32(2)),
            (key("attention.head_count_kv"), Meta::U32(1)),
            (key("attention.key_length"), Meta::U32(head_dim as u32)),
            (key("expert_count"), Meta::U32(experts as u32)),
            (key("expert_used_count"), Meta::U32(2)),
            ("tokenizer.ggml.tokens".to_string(), Meta::Strings((0..vocab).map(|i| format!("t{i}")).collect())),
        ];
        let f32 = GgmlType::all().find(|t| t.name == "F32").unwrap();
        let t = |name: String, dims: Vec<u64>| GgufTensor { name, dims, ggml_type: f32 };
        let mut tensors = vec![t("token_embd.weight".into(), vec![hidden, vocab])];
        for l in 0..layers {
            let b = |n: &str| format!("blk.{l}.{n}.weight");
            tensors.extend([
                t(b("attn_norm"), vec![hidden]),
                t(b("attn_q"), vec![hidden, 2 * head_dim]),
                t(b("attn_k"), vec![hidden, head_dim]),
                t(b("attn_v"), vec![hidden, head_dim]),
                t(b("attn_output"), vec![2 * head_dim, hidden]),
                t(b("attn_q_norm"), vec![head_dim]),
                t(b("attn_k_norm"), vec![head_dim]),
                t(b("ffn_norm"), vec![hidden]),
                t(b("ffn_gate_inp"), vec![hidden, experts]),
                t(b("ffn_gate_exps"), vec![hidden, expert_ffn, experts]),
                t(b("ffn_down_exps"), vec![expert_ffn, hidden, experts]),
                t(b("ffn_up_exps"), vec![hidden, expert_ffn, experts]),
            ]);
        }
        tensors.extend([t("output_norm.weight".into(), vec![hidden]), t("output.weight".into(), vec![hidden, vocab])]);
        write(&path, false, &metadata, &tensors, |i, out| out.write_all(&vec![0u8; tensors[i].bytes() as usize]))
            .unwrap();
        let header = GgufHeader::open(&path).unwrap();
        let spec = ferry_core::model::from_gguf(&header, "q").unwrap();
        assert_eq!(spec.family, ferry_core::model::Family::Qwen3);
        assert_eq!((spec.intermediate_size, spec.head_dim, spec.q_dim()), (expert_ffn, Some(head_dim), 96));
        assert_eq!((spec.num_experts, spec.experts_per_token), (experts, 2));
        let stored: u64 = tensors.iter().map(GgufTensor::bytes).sum();
        assert_eq!(spec.stored.as_ref().unwrap().total_bytes(), stored, "every tensor in a group");
        // Read with each expert a slice; the rotation on unpermuted halves.
        let files = open(&path).unwrap();
        assert_eq!(files.rope_layout, RopeLayout::Halves);
        let expert = files.tensor("model.layers.1.mlp.experts.3.down_proj.weight").unwrap();
        assert_eq!(expert.shape, vec![hidden, expert_ffn]);
    }
}
