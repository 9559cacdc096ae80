//! `WeightLayout`: the bytes of every weight group of a model in a plan's formats —
//! what memory accounting, transfers and the cost model read (never element counts
//! times a dtype). Each group's bytes are the sum of its tensors' exact bytes in the
//! format each tensor gets (`WeightFormat::for_tensor`); a GGUF file's own layout is
//! its tensor table's byte ranges (`ModelSpec::stored`).

use std::sync::Arc;

use super::format::{WeightFormat, WeightFormats};
use super::{ModelSpec, WeightGroup};

/// The bytes of one weight group (one layer's, for per-layer groups).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupSize {
    pub bytes: u64,
    /// Bytes of the group's quantized tensors by format (empty when all are float):
    /// what dequantization is priced on.
    pub quantized: Vec<(WeightFormat, u64)>,
    /// The format of each tensor, in `ModelSpec::group_tensors` order: where pieces of
    /// a transfer may cut (`schedule::format_pieces`).
    pub tensors: Vec<WeightFormat>,
}

impl GroupSize {
    /// Adds a tensor of `bytes` stored in `format`.
    pub fn add(&mut self, format: WeightFormat, bytes: u64) {
        self.tensors.push(format);
        self.bytes += bytes;
        if format.is_quantized() {
            match self.quantized.iter_mut().find(|(f, _)| *f == format) {
                Some((_, b)) => *b += bytes,
                None => self.quantized.push((format, bytes)),
            }
        }
    }

    pub fn is_quantized(&self) -> bool {
        !self.quantized.is_empty()
    }
}

/// One layer's mixture-of-experts MLP in a plan's formats, split the way routed reads
/// move it (`ExpertReads::Routed`): the router part first, then the chosen experts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertBytes {
    /// What every token uses, read ahead of routing (`ModelSpec::router_tensors`): the
    /// norm, the router and the shared expert.
    pub router: u64,
    /// The shared expert's part of `router` (0 without one).
    pub shared: u64,
    /// Each expert's three projections, in expert order.
    pub experts: Vec<u64>,
    /// The largest single projection of an expert: the most one request of a routed
    /// read can take, as no file keeps an expert's projections together (a GGUF file
    /// stacks each projection of every expert; safetensors files order tensors by name).
    pub largest_tensor: u64,
}

impl ExpertBytes {
    /// The most `count` experts can take: the largest ones (what a buffer must hold).
    pub fn most(&self, count: u64) -> u64 {
        if self.experts.windows(2).all(|w| w[0] == w[1]) {
            return count.min(self.experts.len() as u64) * self.experts.first().copied().unwrap_or(0);
        }
        let mut sizes = self.experts.clone();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        sizes.iter().take(count as usize).sum()
    }

    /// What the experts `chosen` take together.
    pub fn of(&self, chosen: &[usize]) -> u64 {
        chosen.iter().map(|&e| self.experts.get(e).copied().unwrap_or(0)).sum()
    }

    /// What `experts` experts take on average (a fractional count: an expectation).
    pub fn expected(&self, experts: f64) -> u64 {
        let mean = self.experts.iter().sum::<u64>() as f64 / self.experts.len().max(1) as f64;
        (mean * experts).round() as u64
    }
}

/// The bytes of a model's weight groups in one plan's formats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightLayout {
    /// Per layer, the groups of `WeightGroup::PER_LAYER`; a single entry when every
    /// layer is alike (any format but a file's own mix).
    layers: Vec<[GroupSize; 2]>,
    num_layers: u64,
    embeddings: GroupSize,
    head: GroupSize,
    /// The token embeddings' format and row width, for lookups.
    token_embedding: WeightFormat,
    hidden: u64,
}

impl WeightLayout {
    /// A layout from its parts (a GGUF file's tensor table); `layers` holds one entry
    /// per layer, or one for all.
    pub fn from_parts(
        layers: Vec<[GroupSize; 2]>,
        num_layers: u64,
        embeddings: GroupSize,
        head: GroupSize,
        token_embedding: WeightFormat,
        hidden: u64,
    ) -> WeightLayout {
        WeightLayout { layers, num_layers, embeddings, head, token_embedding, hidden }
    }

    /// `model`'s weights in `formats`.
    pub fn of(model: &ModelSpec, formats: &WeightFormats) -> WeightLayout {
        let model_float = WeightFormat::from_dtype(model.dtype).unwrap_or(WeightFormat::F16);
        let stored: Option<&WeightLayout> = model.stored.as_deref();
        let computed = |group: WeightGroup, format: WeightFormat| group_size(model, group, format);
        let stored_group = |group: WeightGroup, layer: u64| match stored {
            Some(s) => s.group(group, layer).clone(),
            None => computed(group, model_float),
        };
        // Layers differ only where a per-layer group is as stored in a file that mixes types by layer.
        let varies = stored.is_some_and(|s| s.layers.len() > 1)
            && WeightGroup::PER_LAYER.iter().any(|&g| formats.group(g).is_none());
        let per_layer: [Option<GroupSize>; 2] =
            WeightGroup::PER_LAYER.map(|g| formats.group(g).map(|f| computed(g, f)));
        let count = if varies { model.num_layers } else { 1 };
        let layers = (0..count)
            .map(|layer| {
                std::array::from_fn(|slot| {
                    per_layer[slot].clone().unwrap_or_else(|| stored_group(WeightGroup::PER_LAYER[slot], layer))
                })
            })
            .collect();
        let single = |group: WeightGroup| match formats.group(group) {
            Some(f) => computed(group, f),
            None => stored_group(group, 0),
        };
        let token_embedding = WeightLayout::token_embedding_of(model, formats);
        WeightLayout {
            layers,
            num_layers: model.num_layers,
            embeddings: single(WeightGroup::Embeddings),
            head: single(WeightGroup::Head),
            token_embedding,
            hidden: model.hidden_size,
        }
    }

    /// The format `model`'s token embeddings take in `formats` (`of`'s, without the rest).
    pub fn token_embedding_of(model: &ModelSpec, formats: &WeightFormats) -> WeightFormat {
        match formats.group(WeightGroup::Embeddings) {
            Some(f) => {
                model.group_tensors(WeightGroup::Embeddings, 0).first().map_or(f, |t| f.for_tensor(t, model.dtype))
            }
            None => match model.stored.as_deref() {
                Some(stored) => stored.token_embedding,
                None => WeightFormat::from_dtype(model.dtype).unwrap_or(WeightFormat::F16),
            },
        }
    }

    /// One group of one layer (`layer` is ignored for embeddings and head).
    pub fn group(&self, group: WeightGroup, layer: u64) -> &GroupSize {
        match group.layer_slot() {
            Some(slot) => &self.layers[(layer as usize).min(self.layers.len() - 1)][slot],
            None if group == WeightGroup::Embeddings => &self.embeddings,
            None => &self.head,
        }
    }

    pub fn bytes(&self, group: WeightGroup, layer: u64) -> u64 {
        self.group(group, layer).bytes
    }

    /// A mixture of experts' MLP of `layer` as router part and experts; `None` for a
    /// dense model.
    pub fn expert_bytes(&self, model: &ModelSpec, layer: u64) -> Option<ExpertBytes> {
        if model.num_experts == 0 {
            return None;
        }
        let formats = &self.group(WeightGroup::Mlp, layer).tensors;
        let shapes = model.group_shapes(WeightGroup::Mlp);
        let bytes: Vec<u64> = shapes.iter().zip(formats).map(|(t, f)| f.bytes(t.rows, t.cols)).collect();
        let sum = |range: std::ops::Range<usize>| bytes.get(range).map_or(0, |b| b.iter().sum());
        let router = model.router_tensors();
        Some(ExpertBytes {
            shared: model.shared_expert_tensors().map_or(0, sum),
            experts: (0..model.num_experts as usize).map(|e| sum(model.expert_tensors(e))).collect(),
            largest_tensor: bytes.get(router.end..).and_then(|b| b.iter().max().copied()).unwrap_or(0),
            router: sum(router),
        })
    }

    /// Whether every layer's groups have the same bytes.
    pub fn layers_alike(&self) -> bool {
        self.layers.len() == 1
    }

    /// Bytes of a per-layer group summed over the layers (of embeddings or head: theirs).
    pub fn group_total(&self, group: WeightGroup) -> u64 {
        match group.layer_slot() {
            Some(slot) if self.layers_alike() => self.num_layers * self.layers[0][slot].bytes,
            Some(slot) => self.layers.iter().map(|l| l[slot].bytes).sum(),
            None => self.group(group, 0).bytes,
        }
    }

    /// Mean bytes of a per-layer group over the layers, rounded up (what an LP written per
    /// layer uses); of embeddings or head, theirs.
    pub fn mean_bytes(&self, group: WeightGroup) -> u64 {
        match group.layer_slot() {
            Some(_) => self.group_total(group).div_ceil(self.num_layers.max(1)),
            None => self.group(group, 0).bytes,
        }
    }

    /// The largest layer's bytes of a group.
    pub fn max_bytes(&self, group: WeightGroup) -> u64 {
        match group.layer_slot() {
            Some(slot) => self.layers.iter().map(|l| l[slot].bytes).max().unwrap_or(0),
            None => self.group(group, 0).bytes,
        }
    }

    /// Every weight byte of the model.
    pub fn total_bytes(&self) -> u64 {
        WeightGroup::PER_LAYER.iter().map(|&g| self.group_total(g)).sum::<u64>()
            + self.embeddings.bytes
            + self.head.bytes
    }

    /// The bytes an embedding lookup of `rows` tokens reads.
    pub fn embedding_lookup(&self, rows: u64) -> GroupSize {
        let mut size = GroupSize::default();
        size.add(self.token_embedding, self.token_embedding.lookup_bytes(rows, self.hidden));
        size
    }

    /// What a lookup of `rows` tokens reads when the table stays in its file
    /// (`embeddings: disk`): (bytes, bytes per request). Direct reads cover whole pages,
    /// so a row of `r` bytes at a random offset costs `r - 1 + PAGE` bytes on average, in
    /// a request of its own (rows whose pages touch merge into one request in the
    /// engine, which this leaves out: an upper estimate). Many rows read at most the
    /// table, then as one range.
    pub fn embedding_disk_read(&self, rows: u64) -> (u64, u64) {
        const PAGE: u64 = 4096;
        let row = self.token_embedding.lookup_bytes(1, self.hidden).max(1);
        let request = row - 1 + PAGE;
        let table = self.embeddings.bytes.max(request);
        if rows * request >= table {
            (table, table)
        } else {
            (rows * request, request)
        }
    }

    /// The token embeddings' format.
    pub fn token_embedding(&self) -> WeightFormat {
        self.token_embedding
    }

    /// Every group size held (each distinct layer once), for summaries.
    pub fn all_groups(&self) -> impl Iterator<Item = &GroupSize> {
        self.layers.iter().flatten().chain([&self.embeddings, &self.head])
    }
}

/// One group's bytes with its base format applied per tensor (layer 0: every layer
/// has the same shapes).
pub(super) fn group_size(model: &ModelSpec, group: WeightGroup, format: WeightFormat) -> GroupSize {
    let shapes = model.group_shapes(group);
    let mut size = GroupSize { tensors: Vec::with_capacity(shapes.len()), ..GroupSize::default() };
    // A mixture's experts are hundreds of unnamed tensors of two shapes, and every
    // plan lowered prices its layout: each shape's format and bytes are found once.
    let mut unnamed: Vec<((u64, u64), WeightFormat, u64)> = Vec::new();
    for tensor in &shapes {
        let shape = (tensor.rows, tensor.cols);
        let (applied, bytes) = match unnamed.iter().find(|(s, _, _)| tensor.name.is_empty() && *s == shape) {
            Some(&(_, applied, bytes)) => (applied, bytes),
            None => {
                let applied = format.for_tensor(tensor, model.dtype);
                let bytes = applied.bytes(tensor.rows, tensor.cols);
                if tensor.name.is_empty() {
                    unnamed.push((shape, applied, bytes));
                }
                (applied, bytes)
            }
        };
        size.add(applied, bytes);
    }
    size
}

/// A shared layout (how a `ModelSpec` keeps its file's).
pub type SharedLayout = Arc<WeightLayout>;
