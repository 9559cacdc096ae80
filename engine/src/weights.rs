//! A model on disk: a Hugging Face folder (`config.json`, `model.safetensors` or shards
//! listed in `model.safetensors.index.json`) or a llama.cpp GGUF file (`gguf_files`):
//! its shape and where every tensor's bytes are, in what format. Everything is
//! validated before a run starts: names, formats, shapes and file sizes.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_core::model::{ModelSpec, WeightFormat, WeightFormats, WeightGroup};

use crate::kernels::quant::{first_non_finite_block, BlockFormat};
use crate::kernels::RopeLayout;
use crate::safetensors::{read_header, TensorLocation};
use crate::EngineError;

/// One stored tensor: its file, byte range, format and shape (`[rows, cols]`, or
/// `[cols]` for a vector, in Hugging Face order).
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub file: PathBuf,
    pub format: WeightFormat,
    pub shape: Vec<u64>,
    /// Absolute byte offsets in the file.
    pub start: u64,
    pub end: u64,
}

/// The tensors of one weight group in the order the engine uses them.
#[derive(Debug, Clone)]
pub struct GroupLocation {
    pub tensors: Vec<StoredTensor>,
}

impl GroupLocation {
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.end - t.start).sum()
    }
}

/// The folder a model lives in: `path` itself for a model folder, the folder holding
/// it for a GGUF file (where a run's scratch files go by default).
pub fn model_folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if path.is_file() => {
            if parent.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                parent.to_path_buf()
            }
        }
        _ => path.to_path_buf(),
    }
}

/// A model's files (the tensor table is long: `Debug` names the model only).
pub struct ModelFiles {
    /// The model folder, or the GGUF file.
    pub dir: PathBuf,
    pub spec: ModelSpec,
    /// The weight formats a plan must name to run on these files: one float dtype for a
    /// safetensors folder, `stored` (the file's own mix) for a GGUF file.
    pub formats: WeightFormats,
    /// How the files lay out each head's query and key rows, which the rotary
    /// embedding must follow (Hugging Face folders: halves).
    pub rope_layout: RopeLayout,
    tensors: BTreeMap<String, StoredTensor>,
    /// Byte ranges (file, start) whose values were found finite: streamed weights are
    /// read every step, checked the first time only.
    checked: Arc<Mutex<HashSet<(PathBuf, u64)>>>,
}

impl std::fmt::Debug for ModelFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFiles").field("dir", &self.dir).field("model", &self.spec.name).finish_non_exhaustive()
    }
}

impl ModelFiles {
    /// Opens and validates a model folder or GGUF file (or a folder holding one GGUF
    /// file and no safetensors).
    pub fn open(dir: &Path) -> Result<ModelFiles, EngineError> {
        if dir.is_file() && dir.extension().is_some_and(|e| e == "gguf") {
            return crate::gguf_files::open(dir);
        }
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if !single.exists() && !index.exists() {
            if let Some(file) = crate::gguf_files::only_gguf_in(dir)? {
                return crate::gguf_files::open(&file);
            }
        }
        let spec = ferry_core::catalog::model_from_path(dir)?;
        crate::synth::check_supported(&spec)?;
        let located = if single.exists() {
            read_header(&single)?
        } else if index.exists() {
            read_sharded(dir, &index)?
        } else {
            return Err(EngineError::BadWeights {
                file: dir.to_path_buf(),
                message: "no model.safetensors, model.safetensors.index.json or .gguf file in this folder".into(),
            });
        };
        let dtype = located.values().next().map(|t| t.dtype).ok_or_else(|| EngineError::BadWeights {
            file: dir.to_path_buf(),
            message: "the safetensors files hold no tensors".into(),
        })?;
        if let Some((name, other)) = located.iter().find(|(_, t)| t.dtype != dtype) {
            return Err(EngineError::BadWeights {
                file: other.file.clone(),
                message: format!(
                    "tensor '{name}' is {} but the others are {}; mixed dtypes are not supported",
                    other.dtype.name(),
                    dtype.name()
                ),
            });
        }
        let stored = |t: TensorLocation| StoredTensor {
            file: t.file,
            format: WeightFormat::from_dtype(t.dtype).unwrap_or(WeightFormat::F32),
            shape: t.shape,
            start: t.start,
            end: t.end,
        };
        let required: HashSet<String> = required_tensors(&spec).into_iter().map(|t| t.name).collect();
        // Buffers some checkpoints save beside the weights, and a head the model ties to
        // its embeddings: not weights the model computes with.
        let ignorable = |name: &str| {
            name.ends_with("rotary_emb.inv_freq") || (spec.tie_word_embeddings && name == "lm_head.weight")
        };
        let unused: Vec<String> =
            located.keys().filter(|n| !ignorable(n) && !required.contains(n.as_str())).cloned().collect();
        let files = ModelFiles::new(
            dir.to_path_buf(),
            spec,
            WeightFormats::uniform(WeightFormat::from_dtype(dtype).unwrap_or(WeightFormat::F32)),
            RopeLayout::Halves,
            located.into_iter().map(|(name, t)| (name, stored(t))).collect(),
        );
        files.validate()?;
        check_all_used(dir, &required, unused.iter().map(String::as_str))?;
        Ok(files)
    }

    pub(crate) fn new(
        dir: PathBuf,
        spec: ModelSpec,
        formats: WeightFormats,
        rope_layout: RopeLayout,
        tensors: BTreeMap<String, StoredTensor>,
    ) -> ModelFiles {
        ModelFiles { dir, spec, formats, rope_layout, tensors, checked: Default::default() }
    }

    /// Every tensor the architecture needs exists with the right shape, in a format
    /// the engine decodes (a missing one named with the files' closest names).
    pub(crate) fn validate(&self) -> Result<(), EngineError> {
        for spec in required_tensors(&self.spec) {
            let found = self.tensors.get(&spec.name).ok_or_else(|| {
                let close = ferry_core::catalog::closest_names(&spec.name, self.tensors.keys().map(String::as_str), 2);
                let hint =
                    if close.is_empty() { String::new() } else { format!("; the files have {}", close.join(", ")) };
                EngineError::BadWeights {
                    file: self.dir.clone(),
                    message: format!("missing tensor '{}' required by {}{hint}", spec.name, self.spec.name),
                }
            })?;
            let expected: Vec<u64> = if spec.rows == 1 { vec![spec.cols] } else { vec![spec.rows, spec.cols] };
            if found.shape != expected {
                return Err(EngineError::BadWeights {
                    file: found.file.clone(),
                    message: format!(
                        "tensor '{}' has shape {:?} but the model's shape implies {:?}",
                        spec.name, found.shape, expected
                    ),
                });
            }
            if let WeightFormat::Block(t) = found.format {
                if BlockFormat::from_ggml(t.name).is_none() {
                    return Err(EngineError::Unsupported(format!(
                        "{}: tensor '{}' is {}; the engine runs F32, F16, BF16, {}",
                        found.file.display(),
                        spec.name,
                        t.name,
                        BlockFormat::listed(false)
                    )));
                }
            }
        }
        Ok(())
    }

    /// The KV cache's natural dtype: the weights' float dtype, or f16 (llama.cpp's
    /// default) for quantized files.
    pub fn kv_dtype(&self) -> ferry_core::model::Dtype {
        self.formats.uniform_float().unwrap_or(ferry_core::model::Dtype::F16)
    }

    pub fn group(&self, group: WeightGroup, layer: u64) -> GroupLocation {
        let tensors = self.spec.group_tensors(group, layer).iter().map(|t| self.tensors[&t.name].clone()).collect();
        GroupLocation { tensors }
    }

    /// The language-model head matrix: `lm_head.weight`, or the embeddings when tied.
    pub fn head_matrix_name(&self) -> &'static str {
        if self.spec.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        }
    }

    /// Every file the tensors are in, once each.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = self.tensors.values().map(|t| t.file.clone()).collect();
        paths.sort();
        paths.dedup();
        paths
    }

    pub fn tensor(&self, name: &str) -> Option<&StoredTensor> {
        self.tensors.get(name)
    }

    /// Checks that `bytes`, values of tensor `name` read from `file` at byte `start`,
    /// are all finite, the first time these bytes are read: one pass over them (for a
    /// block format, over its scales), cheap beside the multiply that follows. A NaN or
    /// infinity in a weight would otherwise only show as garbage tokens (or non-finite
    /// logits) far from its cause.
    pub fn check_finite(&self, name: &str, file: &Path, start: u64, bytes: &[u8]) -> Result<(), EngineError> {
        let key = (file.to_path_buf(), start);
        if self.checked.lock().unwrap_or_else(|p| p.into_inner()).contains(&key) {
            return Ok(());
        }
        let tensor = self.tensors.get(name);
        let format = tensor.map_or(WeightFormat::F32, |t| t.format);
        let (found, unit_bytes, unit_values) = match (format, format.dtype()) {
            (_, Some(dtype)) => (first_non_finite(dtype, bytes), dtype.bytes_of(1), 1),
            (WeightFormat::Block(t), None) => match BlockFormat::from_ggml(t.name) {
                Some(block) => (first_non_finite_block(block, bytes), t.block_bytes, t.block_elements),
                None => (None, 1, 1),
            },
            _ => (None, 1, 1),
        };
        if let Some(index) = found {
            let element = (start - tensor.map_or(start, |t| t.start)) / unit_bytes * unit_values + index as u64;
            return Err(EngineError::BadWeights {
                file: file.to_path_buf(),
                message: format!("tensor '{name}' holds a non-finite value (NaN or infinity) at element {element}"),
            });
        }
        self.checked.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        Ok(())
    }
}

/// The index of the first NaN or infinity among little-endian values of `dtype`: the
/// exponent bits all set.
pub fn first_non_finite(dtype: ferry_core::model::Dtype, bytes: &[u8]) -> Option<usize> {
    match dtype {
        ferry_core::model::Dtype::F32 => bytes
            .chunks_exact(4)
            .position(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000),
        ferry_core::model::Dtype::Bf16 => {
            bytes.chunks_exact(2).position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80)
        }
        ferry_core::model::Dtype::F16 => {
            bytes.chunks_exact(2).position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00)
        }
        // Integer types hold no non-finite values.
        _ => None,
    }
}

/// Reads the headers of the shards an index lists. Each shard is a plain relative path
/// inside the model folder (no `..`, no absolute path) that names a regular file (links
/// followed, as in the Hugging Face cache); every tensor the index maps is in the shard
/// it names, and no tensor is in two shards.
/// Every tensor the model's architecture computes with (Hugging Face's names), the
/// embeddings and head first, then each layer's groups.
pub(crate) fn required_tensors(spec: &ModelSpec) -> Vec<ferry_core::model::TensorSpec> {
    let mut groups = vec![(WeightGroup::Embeddings, 0), (WeightGroup::Head, 0)];
    for layer in 0..spec.num_layers {
        groups.extend(WeightGroup::PER_LAYER.map(|g| (g, layer)));
    }
    groups.into_iter().flat_map(|(group, layer)| spec.group_tensors(group, layer)).collect()
}

/// Refuses files holding weights the model as read does not compute with (a bias of
/// a model whose config has none, a tensor of another architecture): running without
/// them would give another model's outputs without a word.
pub(crate) fn check_all_used<'a>(
    file: &Path,
    required: &HashSet<String>,
    present: impl Iterator<Item = &'a str>,
) -> Result<(), EngineError> {
    let unused: Vec<&str> = present.filter(|name| !required.contains(*name)).collect();
    if unused.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = unused.iter().take(3).map(|n| format!("'{n}'")).collect();
    let more = if unused.len() > 3 { format!(" and {} more", unused.len() - 3) } else { String::new() };
    Err(EngineError::Unsupported(format!(
        "{}: the files hold {}{more}, which the model as its config describes does not use; Ferry will not run \
         it without them (that would compute another model)",
        file.display(),
        shown.join(", ")
    )))
}

fn read_sharded(dir: &Path, index: &Path) -> Result<BTreeMap<String, TensorLocation>, EngineError> {
    let bad = |message: String| EngineError::BadWeights { file: index.to_path_buf(), message };
    let text = ferry_core::yaml::read_text(index)?;
    let parsed: serde_json::Value = ferry_core::yaml::from_json_str(&text, &index.display().to_string())?;
    let map = parsed.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no weight_map object".into()))?;
    let mut wanted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            bad(format!("tensor '{tensor}': the weight_map value must be a file name, found {shard}"))
        })?;
        wanted.entry(shard).or_default().push(tensor);
    }
    let mut tensors: BTreeMap<String, TensorLocation> = BTreeMap::new();
    for (shard, names) in wanted {
        let path = shard_path(dir, shard).map_err(|message| {
            bad(format!("tensor '{}': shard '{shard}' {message}", names.first().copied().unwrap_or_default()))
        })?;
        let found = read_header(&path)?;
        for name in names {
            if !found.contains_key(name) {
                return Err(EngineError::BadWeights {
                    file: path.clone(),
                    message: format!("tensor '{name}' is mapped to this shard by {} but is not in it", index.display()),
                });
            }
        }
        for (name, location) in found {
            if let Some(other) = tensors.get(&name) {
                return Err(EngineError::BadWeights {
                    file: path.clone(),
                    message: format!(
                        "tensor '{name}' is also in {}; tensor names must be unique",
                        other.file.display()
                    ),
                });
            }
            tensors.insert(name, location);
        }
    }
    Ok(tensors)
}

/// The path of one shard, refused unless it is a relative path of plain names inside
/// the model folder that resolves to a regular file. Links are followed wherever they
/// lead: the Hugging Face cache links every file of `snapshots/<rev>/` to
/// `../../blobs/`, and a link is something the user made, unlike an index entry
/// (which is only refused from naming `..`, an absolute path, or a device).
fn shard_path(dir: &Path, shard: &str) -> Result<PathBuf, String> {
    use std::path::Component;
    let relative = Path::new(shard);
    if shard.is_empty() || !relative.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err("must be a relative path inside the model folder (no '..', no absolute path)".into());
    }
    let path = dir.join(relative);
    let metadata = std::fs::metadata(&path).map_err(|e| format!("cannot be opened: {e}"))?;
    if metadata.is_dir() {
        return Err("is a directory, not a safetensors file".into());
    }
    if !metadata.is_file() {
        return Err("is not a regular file".into());
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::model::Dtype;

    #[test]
    fn non_finite_values_are_found_in_every_float_dtype() {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let encode = |values: &[f32]| {
                let mut out = Vec::new();
                crate::synth::encode(values.iter().copied(), dtype, &mut out);
                out
            };
            // The largest finite value of each dtype and subnormals are finite.
            let big = match dtype {
                Dtype::F16 => 65504.0,
                _ => 3.0e38,
            };
            assert_eq!(first_non_finite(dtype, &encode(&[0.0, -1.5, big, -big, 1e-40])), None, "{dtype:?}");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                assert_eq!(first_non_finite(dtype, &encode(&[1.0, 2.0, bad, 3.0])), Some(2), "{dtype:?} {bad}");
            }
        }
    }
}
