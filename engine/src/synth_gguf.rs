//! `ferry synth --format gguf`: the synthetic model of `synth` (same seed, same
//! values) as a llama.cpp GGUF file, its matrices stored as f32, f16 or a block format
//! quantized by Ferry (`kernels::quant::quantize`), its norms and biases as f32 — the
//! way llama.cpp's converter and quantizer lay out a model, so every test and
//! benchmark of quantized weights runs without a download.
//!
//! Like llama.cpp's converter, the query and key projections of `llama`-architecture
//! files are stored with each head's rows interleaved (llama.cpp's rotary embedding
//! rotates adjacent pairs where Hugging Face rotates halves); `qwen2` files keep them
//! as they are. A reader of these files must undo it (`unpermuted_row`).

use std::path::Path;

use ferry_core::gguf::GgmlType;
use ferry_core::model::{gguf_name, Family, ModelSpec};

use crate::gguf_files::ROPE_FREQS;
use crate::gguf_write::{self, GgufTensor, Meta};
use crate::kernels::quant::{quantize, BlockFormat};
use crate::synth::{check_supported, tensor_list, tensor_values};
use crate::EngineError;

/// How a synthetic GGUF file stores its matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufStorage {
    F32,
    F16,
    Blocks(BlockFormat),
    /// llama.cpp's Q4_K_M mixture, the format most GGUF downloads come in: Q4_K, with
    /// Q6_K for the output head and for the value and down projections of the layers
    /// that get more bits (`more_bits`).
    Q4KM,
    /// Q5_K_M, the same mixture over Q5_K.
    Q5KM,
    /// llama.cpp's Q3_K_M mixture, a common download for 70B models on small GPUs:
    /// Q3_K, with Q6_K for the output head, Q4_K for the attention output and the down
    /// projections, and Q5_K for the first two value projections and the first
    /// sixteenth of the down projections (`q3_k_m_type`).
    Q3KM,
    /// What llama.cpp's quantizer writes when asked for IQ4_XS (`--dtype iq4_xs_m`;
    /// plain `iq4_xs` stores every matrix so): IQ4_XS, with Q6_K for the output head,
    /// Q5_K for the value projections where four or more query heads share each key
    /// head, and Q5_K for the down projections of the first eighth of the layers
    /// (`iq4_xs_type`).
    IQ4XSMixture,
}

impl GgufStorage {
    pub const NAMES: [&'static str; 25] = [
        "f32", "f16", "q8_0", "q4_0", "q5_0", "q4_1", "q5_1", "q4_k", "q5_k", "q6_k", "q3_k", "q2_k", "iq4_nl",
        "iq4_xs", "q4_k_m", "q5_k_m", "q3_k_m", "iq4_xs_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s",
        "iq1_m",
    ];

    pub fn parse(text: &str) -> Option<GgufStorage> {
        Some(match text.to_ascii_lowercase().as_str() {
            "f32" => GgufStorage::F32,
            "f16" => GgufStorage::F16,
            "q8_0" => GgufStorage::Blocks(BlockFormat::Q8_0),
            "q4_0" => GgufStorage::Blocks(BlockFormat::Q4_0),
            "q5_0" => GgufStorage::Blocks(BlockFormat::Q5_0),
            "q4_1" => GgufStorage::Blocks(BlockFormat::Q4_1),
            "q5_1" => GgufStorage::Blocks(BlockFormat::Q5_1),
            "q4_k" => GgufStorage::Blocks(BlockFormat::Q4K),
            "q5_k" => GgufStorage::Blocks(BlockFormat::Q5K),
            "q6_k" => GgufStorage::Blocks(BlockFormat::Q6K),
            "q3_k" => GgufStorage::Blocks(BlockFormat::Q3K),
            "q2_k" => GgufStorage::Blocks(BlockFormat::Q2K),
            "iq4_nl" => GgufStorage::Blocks(BlockFormat::IQ4NL),
            "iq4_xs" => GgufStorage::Blocks(BlockFormat::IQ4XS),
            "iq4_xs_m" => GgufStorage::IQ4XSMixture,
            "iq2_xxs" => GgufStorage::Blocks(BlockFormat::IQ2XXS),
            "iq2_xs" => GgufStorage::Blocks(BlockFormat::IQ2XS),
            "iq2_s" => GgufStorage::Blocks(BlockFormat::IQ2S),
            "iq3_xxs" => GgufStorage::Blocks(BlockFormat::IQ3XXS),
            "iq3_s" => GgufStorage::Blocks(BlockFormat::IQ3S),
            "iq1_s" => GgufStorage::Blocks(BlockFormat::IQ1S),
            "iq1_m" => GgufStorage::Blocks(BlockFormat::IQ1M),
            "q4_k_m" => GgufStorage::Q4KM,
            "q5_k_m" => GgufStorage::Q5KM,
            "q3_k_m" => GgufStorage::Q3KM,
            _ => return None,
        })
    }

    /// The ggml type of matrix `name` (llama.cpp's tensor name) of a model of `layers`.
    fn ggml_name(self, name: &str, layers: u64, gqa: u64) -> &'static str {
        match self {
            GgufStorage::F32 => "F32",
            GgufStorage::F16 => "F16",
            GgufStorage::Blocks(format) => format.name(),
            GgufStorage::Q4KM | GgufStorage::Q5KM => {
                let base = if self == GgufStorage::Q4KM { "Q4_K" } else { "Q5_K" };
                let layer = name.strip_prefix("blk.").and_then(|rest| rest.split('.').next()?.parse::<u64>().ok());
                let wide = name.contains(".attn_v.") || name.contains(".ffn_down");
                match layer {
                    _ if name == "output.weight" => "Q6_K",
                    Some(layer) if wide && more_bits(layer, layers) => "Q6_K",
                    _ => base,
                }
            }
            GgufStorage::Q3KM => q3_k_m_type(name, layers),
            GgufStorage::IQ4XSMixture => iq4_xs_type(name, layers, gqa),
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            GgufStorage::F32 => 0,
            GgufStorage::F16 => 1,
            GgufStorage::Blocks(BlockFormat::Q4_0) => 2,
            GgufStorage::Blocks(BlockFormat::Q8_0) => 7,
            GgufStorage::Blocks(BlockFormat::Q5_0) => 8,
            GgufStorage::Blocks(BlockFormat::Q4_1) => 3,
            GgufStorage::Blocks(BlockFormat::Q5_1) => 9,
            GgufStorage::Blocks(BlockFormat::Q4K) => 14,
            // Q5_K_S: llama.cpp names no all-Q5_K type.
            GgufStorage::Blocks(BlockFormat::Q5K) => 16,
            GgufStorage::Blocks(BlockFormat::Q6K) => 18,
            // Q3_K_S and Q2_K: the types llama.cpp names after these blocks.
            GgufStorage::Blocks(BlockFormat::Q3K) => 11,
            GgufStorage::Blocks(BlockFormat::Q2K) => 10,
            GgufStorage::Blocks(BlockFormat::IQ4NL) => 25,
            GgufStorage::Blocks(BlockFormat::IQ4XS) | GgufStorage::IQ4XSMixture => 30,
            // The types llama.cpp names after these blocks (IQ2_S blocks: its IQ2_M).
            GgufStorage::Blocks(BlockFormat::IQ2XXS) => 19,
            GgufStorage::Blocks(BlockFormat::IQ2XS) => 20,
            GgufStorage::Blocks(BlockFormat::IQ2S) => 29,
            GgufStorage::Blocks(BlockFormat::IQ3XXS) => 23,
            GgufStorage::Blocks(BlockFormat::IQ3S) => 26,
            GgufStorage::Blocks(BlockFormat::IQ1S) => 24,
            GgufStorage::Blocks(BlockFormat::IQ1M) => 31,
            GgufStorage::Q4KM => 15,
            GgufStorage::Q5KM => 17,
            GgufStorage::Q3KM => 12,
        }
    }
}

/// Whether Q4_K_M gives layer `layer` of `layers` Q6_K value and down projections, as
/// llama.cpp's quantizer does: the first and the last eighth of the layers, and every
/// third layer between them.
fn more_bits(layer: u64, layers: u64) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
}

/// The type llama.cpp's quantizer gives matrix `name` of a dense model of `layers` in
/// a Q3_K_M file (`llama_tensor_get_type_impl` in `src/llama-quant.cpp`). Not modelled:
/// its 70B rule (value projections Q5_K throughout, for 8 heads sharing each) and its
/// eight-expert rules (Q8_0 keys and values, Q5_K attention output).
fn q3_k_m_type(name: &str, layers: u64) -> &'static str {
    let layer = name.strip_prefix("blk.").and_then(|rest| rest.split('.').next()?.parse::<u64>().ok());
    match layer {
        _ if name == "output.weight" => "Q6_K",
        Some(layer) if name.contains(".attn_v.") => ["Q4_K", "Q5_K"][(layer < 2) as usize],
        Some(layer) if name.contains(".ffn_down") => ["Q4_K", "Q5_K"][(layer < layers / 16) as usize],
        Some(_) if name.contains(".attn_output.") => "Q4_K",
        _ => "Q3_K",
    }
}

/// The type llama.cpp's quantizer gives matrix `name` of a dense model of `layers`,
/// `gqa` query heads to a key head, in an IQ4_XS file without an importance matrix
/// (`llama_tensor_get_type_impl`): its eight-expert rule (Q5_K attention output) not
/// modelled.
fn iq4_xs_type(name: &str, layers: u64, gqa: u64) -> &'static str {
    let layer = name.strip_prefix("blk.").and_then(|rest| rest.split('.').next()?.parse::<u64>().ok());
    match layer {
        _ if name == "output.weight" => "Q6_K",
        Some(_) if name.contains(".attn_v.") && gqa >= 4 => "Q5_K",
        Some(layer) if name.contains(".ffn_down") && layer < layers / 8 => "Q5_K",
        _ => "IQ4_XS",
    }
}

fn ggml_type(name: &str) -> Result<GgmlType, EngineError> {
    GgmlType::all().find(|t| t.name == name).ok_or_else(|| EngineError::Internal(format!("no ggml type {name}")))
}

/// The Hugging Face row that row `row` of a permuted projection holds: within each
/// head of `head_dim` rows, stored row 2i + j is Hugging Face row j·head_dim/2 + i.
pub fn unpermuted_row(row: usize, head_dim: usize) -> usize {
    let (head, within) = (row / head_dim, row % head_dim);
    head * head_dim + (within % 2) * (head_dim / 2) + within / 2
}

fn architecture(model: &ModelSpec) -> &'static str {
    match model.family {
        Family::Qwen2 if model.num_experts > 0 => "qwen2moe",
        Family::Qwen2 => "qwen2",
        Family::Qwen3 if model.num_experts > 0 => "qwen3moe",
        Family::Qwen3 => "qwen3",
        _ => "llama",
    }
}

/// The metadata llama.cpp needs to load the model: shape, rotary and norm figures,
/// and a vocabulary of placeholder tokens (unknown, begin, end, the 256 byte tokens
/// where the vocabulary is large enough, then `t<id>`).
fn metadata(model: &ModelSpec, storage: GgufStorage) -> Vec<(String, Meta)> {
    let arch = architecture(model);
    let key = |k: &str| format!("{arch}.{k}");
    let mut meta = vec![
        ("general.architecture".to_string(), Meta::Str(arch.into())),
        ("general.name".to_string(), Meta::Str(format!("{} (synthetic, ferry synth)", model.name))),
        ("general.file_type".to_string(), Meta::U32(storage.file_type())),
        (key("context_length"), Meta::U32(model.max_position_embeddings as u32)),
        (key("embedding_length"), Meta::U32(model.hidden_size as u32)),
        (key("block_count"), Meta::U32(model.num_layers as u32)),
        (key("feed_forward_length"), Meta::U32(model.intermediate_size as u32)),
        (key("rope.dimension_count"), Meta::U32(model.head_dim() as u32)),
        (key("attention.head_count"), Meta::U32(model.num_heads as u32)),
        (key("attention.head_count_kv"), Meta::U32(model.num_kv_heads as u32)),
        (key("attention.layer_norm_rms_epsilon"), Meta::F32(model.rms_norm_eps as f32)),
        (key("rope.freq_base"), Meta::F32(model.rope_theta as f32)),
        (key("vocab_size"), Meta::U32(model.vocab_size as u32)),
    ];
    if model.num_experts > 0 {
        meta.push((key("expert_count"), Meta::U32(model.num_experts as u32)));
        meta.push((key("expert_used_count"), Meta::U32(model.experts_per_token as u32)));
        if arch == "qwen3moe" || arch == "qwen2moe" {
            meta.push((key("expert_feed_forward_length"), Meta::U32(model.intermediate_size as u32)));
        }
        if model.shared_expert_intermediate_size > 0 {
            let width = model.shared_expert_intermediate_size as u32;
            meta.push((key("expert_shared_feed_forward_length"), Meta::U32(width)));
        }
        // llama.cpp takes the weighting from the architecture (Qwen2-MoE's not
        // renormalised, the others' renormalised); the key makes the file say it.
        meta.push((key("expert_weights_norm"), Meta::Bool(model.renormalize_top_k)));
    }
    if let Some(ferry_core::model::RopeScaling::Linear { factor }) = model.rope_scaling {
        meta.push((key("rope.scaling.type"), Meta::Str("linear".into())));
        meta.push((key("rope.scaling.factor"), Meta::F32(factor as f32)));
    }
    if model.head_dim.is_some() {
        meta.push((key("attention.key_length"), Meta::U32(model.head_dim() as u32)));
        meta.push((key("attention.value_length"), Meta::U32(model.head_dim() as u32)));
    }
    if matches!(storage, GgufStorage::Blocks(_)) {
        meta.push(("general.quantization_version".into(), Meta::U32(2)));
    }
    let vocab = model.vocab_size as usize;
    let bytes = if vocab >= 3 + 256 { 256 } else { 0 };
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    tokens.extend((0..bytes).map(|b| format!("<0x{b:02X}>")));
    types.extend(std::iter::repeat_n(6, bytes));
    tokens.extend((tokens.len()..vocab).map(|i| format!("t{i}")));
    types.resize(vocab, 1);
    tokens.truncate(vocab);
    meta.extend([
        ("tokenizer.ggml.model".to_string(), Meta::Str("llama".into())),
        ("tokenizer.ggml.scores".to_string(), Meta::F32s(vec![0.0; vocab])),
        ("tokenizer.ggml.token_type".to_string(), Meta::I32s(types)),
        ("tokenizer.ggml.tokens".to_string(), Meta::Strings(tokens)),
        ("tokenizer.ggml.bos_token_id".to_string(), Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id".to_string(), Meta::U32(2)),
        ("tokenizer.ggml.unknown_token_id".to_string(), Meta::U32(0)),
    ]);
    meta
}

/// One tensor's values as stored: rows permuted for the llama layout where needed.
fn stored_values(model: &ModelSpec, seed: u64, hf: &str, shape: &[u64]) -> Vec<f32> {
    let elements: u64 = shape.iter().product();
    let values: Vec<f32> = tensor_values(seed, hf, elements).collect();
    let permuted = architecture(model) == "llama"
        && shape.len() == 2
        && (hf.ends_with("q_proj.weight") || hf.ends_with("k_proj.weight"));
    if !permuted {
        return values;
    }
    let (rows, cols) = (shape[0] as usize, shape[1] as usize);
    let head_dim = model.head_dim() as usize;
    let mut out = vec![0.0f32; values.len()];
    for row in 0..rows {
        let source = unpermuted_row(row, head_dim);
        out[row * cols..(row + 1) * cols].copy_from_slice(&values[source * cols..(source + 1) * cols]);
    }
    out
}

/// One tensor of the file: llama.cpp's name, the Hugging Face tensors it holds (one,
/// or a layer's experts of one projection, stacked) and its shape (outermost first:
/// `[experts, rows, cols]` for experts).
struct FileTensor {
    name: String,
    parts: Vec<String>,
    shape: Vec<u64>,
}

/// The file's tensors in order.
fn file_tensors(model: &ModelSpec) -> Result<Vec<FileTensor>, EngineError> {
    let mut out: Vec<FileTensor> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (hf, shape) in tensor_list(model) {
        let name = gguf_name(&hf).ok_or_else(|| EngineError::Internal(format!("no GGUF name for {hf}")))?;
        match index.get(&name) {
            // Another expert of a projection already listed: one more slice.
            Some(&at) => {
                out[at].parts.push(hf);
                out[at].shape[0] += 1;
            }
            None => {
                let shape = if name.contains("_exps.") { [&[1], &shape[..]].concat() } else { shape };
                index.insert(name.clone(), out.len());
                out.push(FileTensor { name, parts: vec![hf], shape });
            }
        }
    }
    // Llama 3.1's scaling as llama.cpp's converter writes it: a divisor per frequency.
    if rope_divisors(model).is_some() {
        out.push(FileTensor { name: ROPE_FREQS.into(), parts: Vec::new(), shape: vec![model.head_dim() / 2] });
    }
    Ok(out)
}

/// The `rope_freqs` values of a model with Llama 3.1's rotary scaling.
fn rope_divisors(model: &ModelSpec) -> Option<Vec<f32>> {
    match &model.rope_scaling {
        Some(scaling @ ferry_core::model::RopeScaling::Llama3 { .. }) => {
            let base = ferry_core::model::rope_frequencies(model.rope_theta, model.head_dim() as usize, None, None);
            Some(scaling.divisors(&base))
        }
        _ => None,
    }
}

/// Writes the model to `out` (a `.gguf` file; an existing one only with `force`).
/// `progress(tensors_done, tensors_total)` is called as tensors are written.
pub fn synthesize_gguf(
    model: &ModelSpec,
    storage: GgufStorage,
    seed: u64,
    out: &Path,
    force: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), EngineError> {
    check_supported(model)?;
    let list = file_tensors(model)?;
    let mut tensors = Vec::with_capacity(list.len());
    for FileTensor { name, shape, .. } in &list {
        let matrix = shape.len() >= 2 && !name.contains("ffn_gate_inp");
        // A tied embedding table is the head too: llama.cpp's quantizer gives it the
        // head's type.
        let role = if model.tie_word_embeddings && name == "token_embd.weight" { "output.weight" } else { name };
        let gqa = model.num_heads / model.num_kv_heads.max(1);
        let kind = if matrix { storage.ggml_name(role, model.num_layers, gqa) } else { "F32" };
        let cols = *shape.last().unwrap_or(&0);
        // Rows a K-quant's blocks do not divide take llama.cpp's quantizer's fallback.
        let asked = ggml_type(kind)?;
        let ggml_type = asked.for_rows_of(cols);
        let writes =
            ggml_type.name == "F32" || ggml_type.name == "F16" || BlockFormat::from_ggml(ggml_type.name).is_some();
        if !writes {
            return Err(EngineError::Unsupported(format!(
                "{} cannot be stored as {kind}: {name} has rows of {cols} values, not whole {}-value blocks, and \
                 llama.cpp's quantizer stores such matrices as {}, which Ferry neither writes nor runs \
                 (q4_k, q5_k and q6_k fall back to q5_0, q5_1 and q8_0, q3_k and q2_k to q4_0, iq4_xs and the \
                 lattice types iq1_s … iq3_s to iq4_nl, \
                 which it does)",
                model.name, asked.block_elements, ggml_type.name
            )));
        }
        if !cols.is_multiple_of(ggml_type.block_elements) {
            return Err(EngineError::Unsupported(format!(
                "{} cannot be stored as {}: {name} has rows of {cols} values, not whole {}-value blocks \
                 (q8_0, q4_0 and q5_0 need rows of a multiple of 32)",
                model.name, ggml_type.name, ggml_type.block_elements
            )));
        }
        // ggml lists dimensions from the contiguous one.
        tensors.push(GgufTensor { name: name.clone(), dims: shape.iter().rev().copied().collect(), ggml_type });
    }
    let total = tensors.len() as u64;
    let mut bytes = Vec::new();
    gguf_write::write(out, force, &metadata(model, storage), &tensors, |index, writer| {
        let FileTensor { parts, shape, .. } = &list[index];
        // Each part is a matrix (or a vector): the last two dimensions.
        let part_shape = &shape[shape.len().saturating_sub(2)..];
        let values: Vec<f32> = match rope_divisors(model) {
            Some(divisors) if parts.is_empty() => divisors,
            _ => parts.iter().flat_map(|hf| stored_values(model, seed, hf, part_shape)).collect(),
        };
        bytes.clear();
        let kind = tensors[index].ggml_type.name;
        match BlockFormat::from_ggml(kind) {
            Some(format) => quantize(format, &values, &mut bytes),
            None if kind == "F16" => values.iter().for_each(|v| bytes.extend(half::f16::from_f32(*v).to_le_bytes())),
            None => values.iter().for_each(|v| bytes.extend(v.to_le_bytes())),
        }
        writer.write_all(&bytes)?;
        progress(index as u64 + 1, total);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q4_K_M as llama.cpp's quantizer lays it out for a 32-layer model: Q6_K for the
    /// head, and for the value and down projections of layers 0–3, 28–31 and every
    /// third layer from 6; Q4_K for everything else.
    #[test]
    fn q4_k_m_gives_the_head_and_some_layers_value_and_down_projections_q6_k() {
        let q4km = |name: &str| GgufStorage::Q4KM.ggml_name(name, 32, 4);
        assert_eq!((q4km("output.weight"), q4km("token_embd.weight")), ("Q6_K", "Q4_K"));
        let wide: Vec<u64> = (0..32).filter(|i| q4km(&format!("blk.{i}.attn_v.weight")) == "Q6_K").collect();
        assert_eq!(wide, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
        for i in 0..32 {
            let down = [format!("blk.{i}.ffn_down.weight"), format!("blk.{i}.ffn_down_exps.weight")];
            assert!(down.iter().all(|n| q4km(n) == q4km(&format!("blk.{i}.attn_v.weight"))), "layer {i}");
            for other in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"] {
                assert_eq!(q4km(&format!("blk.{i}.{other}.weight")), "Q4_K", "layer {i} {other}");
            }
        }
        assert_eq!(GgufStorage::parse("Q4_K_M"), Some(GgufStorage::Q4KM));
    }

    /// llama.cpp's IQ4_XS files: the head Q6_K, the value projections Q5_K where four
    /// or more query heads share a key head, the first eighth's down projections Q5_K.
    #[test]
    fn iq4_xs_m_follows_llama_cpps_quantizer() {
        let iq4 = |name: &str, gqa: u64| GgufStorage::IQ4XSMixture.ggml_name(name, 32, gqa);
        assert_eq!((iq4("output.weight", 4), iq4("token_embd.weight", 4)), ("Q6_K", "IQ4_XS"));
        assert_eq!((iq4("blk.9.attn_v.weight", 4), iq4("blk.9.attn_v.weight", 2)), ("Q5_K", "IQ4_XS"));
        let down: Vec<u64> = (0..32).filter(|i| iq4(&format!("blk.{i}.ffn_down.weight"), 1) == "Q5_K").collect();
        assert_eq!(down, [0, 1, 2, 3]);
        assert_eq!(iq4("blk.0.ffn_up.weight", 8), "IQ4_XS");
        assert_eq!(GgufStorage::parse("IQ4_XS_M"), Some(GgufStorage::IQ4XSMixture));
    }

    /// The permutation is llama.cpp's `reshape(heads, 2, d/2, cols).swapaxes(1, 2)`:
    /// a bijection on each head's rows that interleaves its two halves.
    #[test]
    fn the_query_key_permutation_interleaves_each_heads_halves() {
        let head_dim = 8;
        let rows: Vec<usize> = (0..16).map(|r| unpermuted_row(r, head_dim)).collect();
        assert_eq!(&rows[..8], &[0, 4, 1, 5, 2, 6, 3, 7]);
        assert_eq!(&rows[8..], &[8, 12, 9, 13, 10, 14, 11, 15]);
    }

    /// The rotary embedding in llama.cpp's layout on the permuted rows is the Hugging
    /// Face embedding on the original ones, element for element: why a GGUF file's
    /// query and key projections run unpermuted with `RopeLayout::Pairs`.
    #[test]
    fn pairs_on_permuted_rows_equal_halves_on_the_original() {
        use crate::kernels::{rope, RopeLayout};
        let (heads, head_dim) = (3, 16);
        let original: Vec<f32> = (0..2 * heads * head_dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut permuted: Vec<f32> = (0..original.len())
            .map(|i| {
                let (row, element) = (i / (heads * head_dim), i % (heads * head_dim));
                original[row * heads * head_dim + unpermuted_row(element, head_dim)]
            })
            .collect();
        let mut halves = original.clone();
        let frequencies = ferry_core::model::rope_frequencies(10000.0, head_dim, None, None);
        rope(&mut halves, heads, head_dim, &[3, 70], &frequencies, RopeLayout::Halves);
        rope(&mut permuted, heads, head_dim, &[3, 70], &frequencies, RopeLayout::Pairs);
        for (i, &value) in permuted.iter().enumerate() {
            let (row, element) = (i / (heads * head_dim), i % (heads * head_dim));
            assert_eq!(value, halves[row * heads * head_dim + unpermuted_row(element, head_dim)], "element {i}");
        }
    }
}
