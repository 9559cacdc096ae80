//! Weight formats: how a plan stores each weight group, and the exact bytes that
//! follow. A format is plan data (`Policy::weight_format`), not a property of the
//! model: the same shape can be planned in f16, in ggml's block formats or in
//! FlexGen's group-wise compression.
//!
//! - **Float** (`f32`, `f16`, `bf16`): every tensor of the group in that type.
//! - **ggml blocks** (`q8_0`, `q4_0`, `q5_0`, `q4_k`, `q5_k`, `q6_k`, `q3_k`, `q2_k`): the layouts of
//!   `gguf::GgmlType` (one table, shared with the GGUF reader). A row is stored as
//!   whole blocks. Where a K-quant's 256-value blocks do not divide a matrix's rows,
//!   the matrix takes llama.cpp's quantizer's fallback (`GgmlType::for_rows_of`: Q4_K
//!   to Q5_0, Q6_K to Q8_0); where a 32-value block does not divide them either, the
//!   format cannot store the matrix and is refused (`WeightFormats::check`). As llama.cpp's
//!   quantizer does (`tensor_allows_quantization` in `src/llama-quant.cpp`), only
//!   matrices are quantized; vectors (norms, biases) stay F32 as GGUF files keep them,
//!   and the MoE router (`ffn_gate_inp`) and learned position embeddings keep the
//!   model's float type.
//! - **Group-wise** (`int4-g64`, `int8-g64`, any even group size): FlexGen's
//!   compression (`flexgen/compression.py`, `TorchCompressedDevice.compress`, with the
//!   weight config `CompressionConfig(num_bits=4, group_size=64, group_dim=0)`):
//!   values are grouped along dimension 0 of the `(out, in)` weight — down a column,
//!   over `group_size` rows, the last group padded — and each group stores its values
//!   packed (two 4-bit values a byte; one byte each at 8 bits) plus an f16 scale and
//!   an f16 minimum. FlexGen compresses every matrix (embeddings too) and keeps vectors
//!   in the model's float type.
//!
//! `stored` means "as the model's files store each tensor": a GGUF file's own mix
//! (a Q4_K_M file holds Q4_K, Q6_K and F32 tensors, its `attn_v` and `ffn_down` in
//! Q6_K in some layers only), or a catalog model's released dtype.
//!
//! A new format is a `WeightFormat` variant (its bytes in `bytes`, what it applies to in
//! `for_tensor`, its name in `name`/`parse`) and, to price its dequantization, a
//! profiler measurement named by `name`.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Dtype, ModelSpec, TensorSpec, WeightGroup};
use crate::error::{CoreError, Result};
use crate::gguf::GgmlType;

/// ggml block types a plan may name (the ones the engine decodes, `kernels::quant`).
/// A GGUF file's other types (TQ1_0, TQ2_0, Q8_K, …) are planned through `stored`.
pub const PLANNABLE_BLOCKS: [&str; 19] = [
    "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "Q4_1", "Q5_1", "IQ2_XXS",
    "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
];
/// FlexGen's default group size for weights.
pub const DEFAULT_GROUP_SIZE: u32 = 64;
/// The largest group size accepted (FlexGen uses 64; larger groups lose precision).
pub const MAX_GROUP_SIZE: u32 = 4096;
/// Bytes of a group-wise group's f16 scale and f16 minimum.
const GROUP_SCALE_MIN_BYTES: u64 = 4;

/// How one tensor's values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    F16,
    Bf16,
    /// A ggml block type (quantized: more than one element per block).
    Block(GgmlType),
    /// FlexGen's group-wise compression: `bits` (4 or 8) per value, `group_size` values
    /// per group sharing an f16 scale and minimum.
    Grouped {
        bits: u8,
        group_size: u32,
    },
}

impl WeightFormat {
    /// The float format of a dtype (`None` for the integer dtypes, which are no storage
    /// format of their own: use a block or group-wise format).
    pub fn from_dtype(dtype: Dtype) -> Option<WeightFormat> {
        match dtype {
            Dtype::F32 => Some(WeightFormat::F32),
            Dtype::F16 => Some(WeightFormat::F16),
            Dtype::Bf16 => Some(WeightFormat::Bf16),
            Dtype::Int8 | Dtype::Int4 => None,
        }
    }

    /// The float dtype of a float format.
    pub fn dtype(self) -> Option<Dtype> {
        match self {
            WeightFormat::F32 => Some(Dtype::F32),
            WeightFormat::F16 => Some(Dtype::F16),
            WeightFormat::Bf16 => Some(Dtype::Bf16),
            WeightFormat::Block(_) | WeightFormat::Grouped { .. } => None,
        }
    }

    /// Whether values are stored with scales and must be dequantized before use.
    pub fn is_quantized(self) -> bool {
        match self {
            WeightFormat::Block(t) => t.is_quantized(),
            WeightFormat::Grouped { .. } => true,
            _ => false,
        }
    }

    /// The name plans, flags and profiles use: `f16`, `q4_k`, `int4-g64`.
    pub fn name(self) -> String {
        match self {
            WeightFormat::F32 => "f32".into(),
            WeightFormat::F16 => "f16".into(),
            WeightFormat::Bf16 => "bf16".into(),
            WeightFormat::Block(t) => t.name.to_ascii_lowercase(),
            WeightFormat::Grouped { bits, group_size } => format!("int{bits}-g{group_size}"),
        }
    }

    /// Every format a plan may name, for messages and suggestions.
    pub fn plannable_names() -> Vec<String> {
        let mut names: Vec<String> = vec!["f32".into(), "f16".into(), "bf16".into()];
        names.extend(PLANNABLE_BLOCKS.iter().map(|n| n.to_ascii_lowercase()));
        names.extend(["int4-g64".into(), "int8-g64".into()]);
        names
    }

    /// Parses a format name; `int4` and `int8` are FlexGen's group size (64). Unknown
    /// names are an `UnknownName` error with the closest names.
    pub fn parse(text: &str) -> Result<WeightFormat> {
        let wanted = text.trim().to_ascii_lowercase();
        let float = match wanted.as_str() {
            "f32" | "fp32" => Some(WeightFormat::F32),
            "f16" | "fp16" => Some(WeightFormat::F16),
            "bf16" => Some(WeightFormat::Bf16),
            _ => None,
        };
        if let Some(format) = float {
            return Ok(format);
        }
        if PLANNABLE_BLOCKS.iter().any(|n| n.eq_ignore_ascii_case(&wanted)) {
            if let Some(t) = GgmlType::by_name(&wanted) {
                return Ok(WeightFormat::Block(t));
            }
        }
        if let Some(format) = parse_grouped(&wanted)? {
            return Ok(format);
        }
        let names = WeightFormat::plannable_names();
        Err(CoreError::UnknownName {
            kind: "weight format",
            name: text.to_string(),
            suggestions: crate::catalog::closest_names(&wanted, names.iter().map(String::as_str), 3),
        })
    }

    /// Whether row `r` of a tensor is its bytes `r × bytes(1, cols)` on, so one row can be
    /// read alone: float and block formats; not group-wise ones, which quantize groups
    /// of rows together.
    pub fn rows_contiguous(self) -> bool {
        !matches!(self, WeightFormat::Grouped { .. })
    }

    /// Bytes of a `rows` × `cols` tensor (`cols` contiguous). Block formats store whole
    /// blocks per row (a partial block is counted whole: `cannot_store` says when that
    /// happens); group-wise formats pad the last group of rows, as FlexGen does.
    pub fn bytes(self, rows: u64, cols: u64) -> u64 {
        match self {
            WeightFormat::Block(t) => rows * cols.div_ceil(t.block_elements) * t.block_bytes,
            WeightFormat::Grouped { bits, group_size } => {
                let g = group_size as u64;
                rows.div_ceil(g) * cols * grouped_group_bytes(bits, g)
            }
            float => float.dtype().map_or(0, |d| d.bytes_of(rows * cols)),
        }
    }

    /// How many weights `bytes` of this format hold (a group-wise format's padding
    /// counted as weights).
    pub fn weights_in(self, bytes: u64) -> f64 {
        let (weights, bytes_per_unit) = match self {
            WeightFormat::Block(t) => (t.block_elements, t.block_bytes),
            WeightFormat::Grouped { bits, group_size } => {
                (group_size as u64, grouped_group_bytes(bits, group_size as u64))
            }
            float => (1, float.dtype().map_or(1, |d| d.bytes_of(1))),
        };
        bytes as f64 * weights as f64 / bytes_per_unit.max(1) as f64
    }

    /// Bytes read to look up `rows` rows of a `cols`-wide matrix (an embedding lookup):
    /// whole rows for float and block formats; for group-wise formats each row's packed
    /// values and its share of its group's scales and minimums.
    pub fn lookup_bytes(self, rows: u64, cols: u64) -> u64 {
        match self {
            WeightFormat::Grouped { bits, group_size } => {
                let g = group_size as u64;
                (rows * cols * grouped_group_bytes(bits, g)).div_ceil(g)
            }
            other => other.bytes(rows, cols),
        }
    }

    /// Rows a piece of a tensor must be a multiple of (but for the last): group-wise
    /// groups run across rows; every other format stores each row on its own.
    pub fn row_unit(self) -> u64 {
        match self {
            WeightFormat::Grouped { group_size, .. } => group_size as u64,
            _ => 1,
        }
    }

    /// Why this format cannot store a tensor with rows of `cols` values, if it cannot.
    pub fn cannot_store(self, cols: u64) -> Option<String> {
        match self {
            WeightFormat::Block(t) if !cols.is_multiple_of(t.block_elements) => {
                let fits: Vec<String> = PLANNABLE_BLOCKS
                    .iter()
                    .filter_map(|n| GgmlType::by_name(n))
                    .filter(|o| cols.is_multiple_of(o.block_elements))
                    .map(|o| o.name.to_ascii_lowercase())
                    .collect();
                Some(format!(
                    "{} stores rows in blocks of {} values but its rows have {cols} values (not a multiple){}",
                    self.name(),
                    t.block_elements,
                    if fits.is_empty() { String::new() } else { format!("; {} can store it", fits.join(" or ")) }
                ))
            }
            _ => None,
        }
    }

    /// The format `tensor` gets when its group is stored in `self`: float formats apply
    /// to every tensor; quantized ones to the matrices the quantizer they come from
    /// quantizes (see the module docs), the rest staying float.
    pub fn for_tensor(self, tensor: &TensorSpec, model_dtype: Dtype) -> WeightFormat {
        let model_float = WeightFormat::from_dtype(model_dtype).unwrap_or(WeightFormat::F16);
        match self {
            WeightFormat::Block(t) if t.is_quantized() => {
                if tensor.rows == 1 {
                    WeightFormat::F32
                } else if tensor.quantizable() {
                    let stored = t.for_rows_of(tensor.cols);
                    if stored.is_quantized() {
                        WeightFormat::Block(stored)
                    } else {
                        WeightFormat::F16
                    }
                } else {
                    model_float
                }
            }
            WeightFormat::Grouped { .. } if tensor.rows == 1 => model_float,
            other => other,
        }
    }
}

/// Bytes of one group of `g` values down a column: packed values, f16 scale and min.
fn grouped_group_bytes(bits: u8, g: u64) -> u64 {
    (g * bits as u64).div_ceil(8) + GROUP_SCALE_MIN_BYTES
}

/// `int4`, `int8`, `int4-g128`, …; `None` if the text is no group-wise name.
fn parse_grouped(text: &str) -> Result<Option<WeightFormat>> {
    let (bits_text, group) = match text.split_once("-g") {
        Some((bits, group)) => (bits, Some(group)),
        None => (text, None),
    };
    let bits = match bits_text {
        "int4" => 4u8,
        "int8" => 8u8,
        _ => return Ok(None),
    };
    let group_size = match group {
        None => DEFAULT_GROUP_SIZE,
        Some(g) => g.parse::<u32>().map_err(|_| {
            CoreError::invalid(format!("weight format '{text}': the group size after -g must be a whole number"))
        })?,
    };
    // FlexGen packs two 4-bit values per byte within a group: an odd group would split one.
    if group_size == 0 || group_size > MAX_GROUP_SIZE || (bits == 4 && group_size % 2 == 1) {
        return Err(CoreError::invalid(format!(
            "weight format '{text}': the group size must be {} between 2 and {MAX_GROUP_SIZE}",
            if bits == 4 { "an even number" } else { "a number" }
        )));
    }
    Ok(Some(WeightFormat::Grouped { bits, group_size }))
}

impl Serialize for WeightFormat {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for WeightFormat {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<WeightFormat, D::Error> {
        let text = String::deserialize(deserializer)?;
        WeightFormat::parse(&text).map_err(de::Error::custom)
    }
}

/// A plan's weight formats: a base for every group (a format, or `stored`: as the
/// model's files store each tensor) and per-group overrides. In a file, one format for
/// all is the short form (`weight_format: q4_k`); overrides use the long form
/// (`weight_format: {default: q4_k, head: q6_k}`), as GGUF's mixed files do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFormats {
    /// `None`: as stored.
    pub default: Option<WeightFormat>,
    pub overrides: BTreeMap<WeightGroup, WeightFormat>,
}

impl WeightFormats {
    pub fn uniform(format: WeightFormat) -> WeightFormats {
        WeightFormats { default: Some(format), overrides: BTreeMap::new() }
    }

    /// Every tensor as the model's files store it.
    pub fn stored() -> WeightFormats {
        WeightFormats { default: None, overrides: BTreeMap::new() }
    }

    /// One float dtype for every group (what plans before formats said with `weight_dtype`).
    pub fn float(dtype: Dtype) -> Option<WeightFormats> {
        WeightFormat::from_dtype(dtype).map(WeightFormats::uniform)
    }

    /// The format of `group` (`None`: as stored).
    pub fn group(&self, group: WeightGroup) -> Option<WeightFormat> {
        self.overrides.get(&group).copied().or(self.default)
    }

    const GROUPS: [WeightGroup; 4] =
        [WeightGroup::Attention, WeightGroup::Mlp, WeightGroup::Embeddings, WeightGroup::Head];

    /// The float dtype every group is stored in, when there is one (the engine runs only
    /// such plans today). `stored` has none: it depends on the model's files.
    pub fn uniform_float(&self) -> Option<Dtype> {
        let first = self.group(WeightGroup::Attention)?.dtype()?;
        WeightFormats::GROUPS
            .iter()
            .all(|&g| self.group(g).and_then(WeightFormat::dtype) == Some(first))
            .then_some(first)
    }

    /// The quantized formats the plan stores `model`'s weights in (with `stored`, the
    /// file's), each once.
    pub fn quantized_formats(&self, model: &ModelSpec) -> Vec<WeightFormat> {
        let layout = super::WeightLayout::of(model, self);
        let mut out: Vec<WeightFormat> = Vec::new();
        for size in layout.all_groups() {
            for (format, _) in &size.quantized {
                if !out.contains(format) {
                    out.push(*format);
                }
            }
        }
        out
    }

    /// Refuses a format that cannot store one of `model`'s tensors, naming the tensor.
    pub fn check(&self, model: &ModelSpec) -> Result<()> {
        for group in WeightFormats::GROUPS {
            let Some(format) = self.group(group) else { continue };
            // Every layer has the same shapes: layer 0 speaks for all.
            for tensor in model.group_tensors(group, 0) {
                let applied = format.for_tensor(&tensor, model.dtype);
                if let Some(why) = applied.cannot_store(tensor.cols) {
                    return Err(CoreError::invalid(format!(
                        "plan: weight format {} cannot store {} of {} ({} × {}): {why}",
                        format.name(),
                        tensor.name,
                        model.name,
                        tensor.rows,
                        tensor.cols
                    )));
                }
            }
        }
        Ok(())
    }

    /// The matrices stored in another block type than their group's, because the
    /// asked type's blocks do not divide their rows (`GgmlType::for_rows_of`), one line
    /// per (asked, stored) pair: `q4_k: mlp.experts.0.down_proj.weight and 59 more
    /// matrices per layer are stored as q5_0 …`.
    pub fn fallbacks(&self, model: &ModelSpec) -> Vec<String> {
        /// Matrices of one (asked, stored) pair: the first's name and row width, how many.
        struct Fallback {
            asked: WeightFormat,
            stored: WeightFormat,
            first: String,
            cols: u64,
            count: usize,
        }
        let mut found: Vec<Fallback> = Vec::new();
        for group in WeightFormats::GROUPS {
            let Some(asked) = self.group(group) else { continue };
            for tensor in model.group_tensors(group, 0) {
                let stored = asked.for_tensor(&tensor, model.dtype);
                let planned = tensor.rows > 1 && tensor.quantizable() && asked.is_quantized();
                if !planned || stored == asked {
                    continue;
                }
                match found.iter_mut().find(|f| (f.asked, f.stored) == (asked, stored)) {
                    Some(f) => f.count += 1,
                    None => {
                        let first = tensor.name.strip_prefix("model.layers.0.").unwrap_or(&tensor.name).to_string();
                        found.push(Fallback { asked, stored, first, cols: tensor.cols, count: 1 });
                    }
                }
            }
        }
        found
            .into_iter()
            .map(|f| {
                let more = if f.count > 1 { format!(" and {} more matrices", f.count - 1) } else { String::new() };
                format!(
                    "{asked}: {first}{more} stored as {stored}, as llama.cpp's quantizer stores them: rows of {cols} \
                     values are not whole {asked} blocks",
                    asked = f.asked.name(),
                    first = f.first,
                    stored = f.stored.name(),
                    cols = f.cols,
                )
            })
            .collect()
    }

    /// For people: `q4_k`, `q4_k (head q6_k)`, `stored (the model file's own types)`.
    pub fn describe(&self) -> String {
        let base = self.default.map_or("stored (the model file's own types)".to_string(), WeightFormat::name);
        if self.overrides.is_empty() {
            return base;
        }
        let rest: Vec<String> = self.overrides.iter().map(|(g, f)| format!("{} {}", g.name(), f.name())).collect();
        format!("{base} ({})", rest.join(", "))
    }
}

impl Serialize for WeightFormats {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let base = self.default.map_or("stored".to_string(), WeightFormat::name);
        if self.overrides.is_empty() {
            return serializer.serialize_str(&base);
        }
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(1 + self.overrides.len()))?;
        map.serialize_entry("default", &base)?;
        for (group, format) in &self.overrides {
            map.serialize_entry(group, format)?;
        }
        map.end()
    }
}

/// `stored` or a format name.
fn parse_base(text: &str) -> Result<Option<WeightFormat>> {
    if text.trim().eq_ignore_ascii_case("stored") {
        return Ok(None);
    }
    WeightFormat::parse(text).map(Some)
}

impl<'de> Deserialize<'de> for WeightFormats {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<WeightFormats, D::Error> {
        struct FormatsVisitor;
        impl<'de> Visitor<'de> for FormatsVisitor {
            type Value = WeightFormats;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a weight format (f16, q4_k, int4-g64, stored) or {default: FORMAT, head: FORMAT, …}")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> std::result::Result<WeightFormats, E> {
                Ok(WeightFormats { default: parse_base(text).map_err(E::custom)?, overrides: BTreeMap::new() })
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<WeightFormats, A::Error> {
                let mut default = None;
                let mut overrides = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    if key == "default" {
                        default = Some(parse_base(&value).map_err(de::Error::custom)?);
                        continue;
                    }
                    let group = WeightFormats::GROUPS.into_iter().find(|g| group_key(*g) == key).ok_or_else(|| {
                        de::Error::custom(format!(
                            "unknown weight_format key `{key}`: use default, attention, mlp, embeddings or head"
                        ))
                    })?;
                    let format = WeightFormat::parse(&value).map_err(de::Error::custom)?;
                    if overrides.insert(group, format).is_some() {
                        return Err(de::Error::custom(format!("weight_format names `{key}` twice")));
                    }
                }
                let default = default.ok_or_else(|| {
                    de::Error::custom("weight_format needs `default` (the format of groups not named)")
                })?;
                Ok(WeightFormats { default, overrides })
            }
        }
        deserializer.deserialize_any(FormatsVisitor)
    }
}

/// The key a group has in a plan's `weight_format` map (its serde name).
fn group_key(group: WeightGroup) -> &'static str {
    match group {
        WeightGroup::Attention => "attention",
        WeightGroup::Mlp => "mlp",
        WeightGroup::Embeddings => "embeddings",
        WeightGroup::Head => "head",
    }
}
