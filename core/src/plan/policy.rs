//! `Policy`: the knobs a tuner turns (placement totals and stages, batching,
//! schedule, transfer knobs), how a policy file is read (`PolicyFile`, whose totals
//! may be left out when stages are given), the checks against a model and workload,
//! and the per-layer placement the rest of Ferry reads (`layer_placements`,
//! `placement_of`, `stage_list`).

use serde::{Deserialize, Serialize};

use super::experts::ExpertReads;
use super::placement::{DeviceLayers, LayerPlacement, Stage, Tier, TierCounts};
use super::speculation::{Draft, Speculation};
use super::{Schedule, Workload};
use crate::error::{CoreError, Result};
use crate::model::{Dtype, ModelSpec, WeightFormat, WeightFormats};
use crate::units::{bytes_serde, format_bytes};

/// The most copy streams a plan may use (GPUs have a handful of copy engines).
pub const MAX_COPY_STREAMS: u32 = 64;
/// The most disk requests a plan may keep in flight (NVMe queues saturate far below).
pub const MAX_IO_QUEUE_DEPTH: u32 = 256;

/// The knobs a tuner turns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PolicyFile")]
pub struct Policy {
    pub schedule: Schedule,
    pub micro_batch_size: u64,
    pub num_micro_batches: u64,
    /// Layers whose weights may be loading ahead of the layer being computed.
    pub prefetch_depth: u64,
    pub attention_weights: TierCounts,
    pub mlp_weights: TierCounts,
    /// The token embedding table: on the device or host, or `disk`, where it stays in
    /// the file and each lookup reads only its tokens' rows.
    pub embeddings: Tier,
    pub head: Tier,
    /// Layers whose KV cache lives on each tier.
    pub kv_cache: TierCounts,
    /// Which layers the counts above keep on the device: spread through the stack (the
    /// default) or the first ones (a self-speculating draft then shares them).
    #[serde(default, skip_serializing_if = "DeviceLayers::is_spread")]
    pub device_layers: DeviceLayers,
    /// Attention over host-resident KV runs on the host (FlexGen's CPU delegation).
    pub host_attention: bool,
    /// Layers whose attention and MLP weights are both on the host are computed by the
    /// host where they live (llama.cpp's split), instead of being copied to the device.
    /// Their KV cache must be on the host too.
    #[serde(default)]
    pub compute_host_layers_on_host: bool,
    /// A mixture of experts whose MLP streams: read only the experts a visit's tokens
    /// were routed to, once routed (the default), or whole layers ahead of time.
    #[serde(default, skip_serializing_if = "ExpertReads::is_routed")]
    pub expert_reads: ExpertReads,
    /// Under routed reads, each streamed layer keeps this many of its experts on the
    /// device for good — the most popular ones by the plan's measured routing, or the
    /// first ones under uniform routing, where all are alike — and a visit reads only
    /// the chosen experts outside them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hot_experts: u64,
    /// Under routed reads, each streamed layer's next most popular experts after the hot
    /// ones, this many, are read ahead with its router part (before the layer's tokens
    /// are routed, so the read overlaps the layers before it); the routed read then
    /// brings in only the chosen experts outside both sets.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub prefetched_experts: u64,
    /// How each weight group is stored (`f16`, `q4_k`, `{default: q4_k, head: q6_k}`,
    /// `stored`); what memory, transfers and compute are priced at.
    pub weight_format: WeightFormats,
    /// The float type the engine's executor reads weights as: `weight_format`'s when it
    /// is one float type for every group, else f32 (what dequantized weights become).
    /// Kept in step by `set_weight_format` and checked by `validate`; never written to a
    /// file (`weight_dtype` in a file is the old name of a float `weight_format`).
    #[serde(skip_serializing)]
    pub weight_dtype: Dtype,
    pub kv_dtype: Dtype,
    /// Size of one transfer request.
    #[serde(with = "bytes_serde")]
    pub chunk_bytes: u64,
    /// Host↔device copies in flight at once.
    pub copy_streams: u32,
    /// Disk requests in flight at once.
    pub io_queue_depth: u32,
    /// Host memory page-locked for fast copies; host-resident weights inside it copy at
    /// the pinned rate, the rest at the pageable rate.
    #[serde(with = "bytes_serde")]
    pub pinned_host_bytes: u64,
    /// Layers split over several devices, in layer order. Empty: one stage, every layer
    /// on device 0 with the placement above. When given, the counts above are the totals
    /// over the stages (they may be left out of the file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<Stage>,
    /// Speculative decoding: a draft proposes tokens the target verifies in rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculation: Option<Speculation>,
}

/// A policy as written in a file: with `stages`, the totals may be left out.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    schedule: Schedule,
    micro_batch_size: u64,
    num_micro_batches: u64,
    prefetch_depth: u64,
    attention_weights: Option<TierCounts>,
    mlp_weights: Option<TierCounts>,
    embeddings: Tier,
    head: Tier,
    kv_cache: Option<TierCounts>,
    #[serde(default)]
    device_layers: DeviceLayers,
    host_attention: bool,
    #[serde(default)]
    compute_host_layers_on_host: bool,
    #[serde(default)]
    expert_reads: ExpertReads,
    #[serde(default)]
    hot_experts: u64,
    #[serde(default)]
    prefetched_experts: u64,
    /// The old name of a float `weight_format` (plans before weight formats).
    #[serde(default)]
    weight_dtype: Option<Dtype>,
    #[serde(default)]
    weight_format: Option<WeightFormats>,
    kv_dtype: Dtype,
    #[serde(with = "bytes_serde")]
    chunk_bytes: u64,
    copy_streams: u32,
    io_queue_depth: u32,
    #[serde(with = "bytes_serde")]
    pinned_host_bytes: u64,
    #[serde(default)]
    stages: Vec<Stage>,
    #[serde(default)]
    speculation: Option<Speculation>,
}

impl TryFrom<PolicyFile> for Policy {
    type Error = String;

    fn try_from(f: PolicyFile) -> std::result::Result<Policy, String> {
        let weight_format = match (f.weight_format, f.weight_dtype) {
            (Some(format), None) => format,
            (None, Some(dtype)) => WeightFormats::float(dtype).ok_or_else(|| {
                format!(
                    "weight_dtype {} is no storage format (values without scales); write `weight_format:` with \
                     int{}-g64 (FlexGen's group-wise) or a ggml block format ({})",
                    dtype.name(),
                    dtype.bits(),
                    crate::model::PLANNABLE_BLOCKS.map(|n| n.to_ascii_lowercase()).join(", ")
                )
            })?,
            (Some(_), Some(_)) => {
                return Err("give weight_format (weight_dtype is its old name for float formats), not both".into())
            }
            (None, None) => return Err("missing field `weight_format` (e.g. `weight_format: f16`)".into()),
        };
        // Missing totals are the sums over the stages (zero without stages: `validate`
        // then says which placement is missing).
        let total = |pick: fn(&Stage) -> TierCounts| {
            f.stages.iter().map(pick).fold(TierCounts { device: 0, host: 0, disk: 0 }, |a, b| TierCounts {
                device: a.device + b.device,
                host: a.host + b.host,
                disk: a.disk + b.disk,
            })
        };
        Ok(Policy {
            attention_weights: f.attention_weights.unwrap_or_else(|| total(|s| s.attention_weights)),
            mlp_weights: f.mlp_weights.unwrap_or_else(|| total(|s| s.mlp_weights)),
            kv_cache: f.kv_cache.unwrap_or_else(|| total(|s| s.kv_cache)),
            device_layers: f.device_layers,
            schedule: f.schedule,
            micro_batch_size: f.micro_batch_size,
            num_micro_batches: f.num_micro_batches,
            prefetch_depth: f.prefetch_depth,
            embeddings: f.embeddings,
            head: f.head,
            host_attention: f.host_attention,
            compute_host_layers_on_host: f.compute_host_layers_on_host,
            expert_reads: f.expert_reads,
            hot_experts: f.hot_experts,
            prefetched_experts: f.prefetched_experts,
            weight_dtype: engine_dtype(&weight_format),
            weight_format,
            kv_dtype: f.kv_dtype,
            chunk_bytes: f.chunk_bytes,
            copy_streams: f.copy_streams,
            io_queue_depth: f.io_queue_depth,
            pinned_host_bytes: f.pinned_host_bytes,
            stages: f.stages,
            speculation: f.speculation,
        })
    }
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

/// `Policy::weight_dtype` for a plan's formats.
fn engine_dtype(formats: &WeightFormats) -> Dtype {
    formats.uniform_float().unwrap_or(Dtype::F32)
}

impl Policy {
    /// Sets the weight formats and the engine's float type with them.
    pub fn set_weight_format(&mut self, formats: WeightFormats) {
        self.weight_dtype = engine_dtype(&formats);
        self.weight_format = formats;
    }

    /// Checks the policy against a model and workload; the message says what to change.
    pub fn validate(&self, model: &ModelSpec, workload: &Workload, unified_memory: bool) -> Result<()> {
        let fail = |m: String| Err(CoreError::invalid(format!("plan: {m}")));
        let layers = model.num_layers;
        self.validate_stages(layers)?;
        if self.weight_dtype != engine_dtype(&self.weight_format) {
            return fail(format!(
                "weight_dtype {} disagrees with weight_format {} (set both with `Policy::set_weight_format`)",
                self.weight_dtype.name(),
                self.weight_format.describe()
            ));
        }
        self.weight_format.check(model)?;
        for (name, counts) in [
            ("attention_weights", &self.attention_weights),
            ("mlp_weights", &self.mlp_weights),
            ("kv_cache", &self.kv_cache),
        ] {
            if counts.total() != layers {
                return fail(format!(
                    "{name} places {} layers ({}) but {} has {layers}",
                    counts.total(),
                    counts.describe(),
                    model.name
                ));
            }
        }
        if self.micro_batch_size == 0 || self.num_micro_batches == 0 {
            return fail("micro_batch_size and num_micro_batches must be at least 1".into());
        }
        if self.micro_batch_size * self.num_micro_batches != workload.batch_size {
            return fail(format!(
                "micro_batch_size {} × num_micro_batches {} = {} but the workload's batch_size is {}",
                self.micro_batch_size,
                self.num_micro_batches,
                self.micro_batch_size * self.num_micro_batches,
                workload.batch_size
            ));
        }
        if workload.prompt_len == 0 || workload.gen_len == 0 {
            return fail("prompt_len and gen_len must be at least 1".into());
        }
        // Checked before any work: a run would otherwise grow memory and simulate a
        // graph for positions the model cannot encode.
        if self.kv_positions(workload) > model.max_position_embeddings {
            return fail(format!(
                "prompt + generation{} = {} tokens exceeds the {} positions {} encodes; shorten the prompt or \
                 the generation",
                if self.speculation.is_some() { " + draft tokens" } else { "" },
                self.kv_positions(workload),
                model.max_position_embeddings,
                model.name
            ));
        }
        if self.chunk_bytes < 4096 {
            return fail(format!("chunk_bytes {} is below 4 KiB", self.chunk_bytes));
        }
        if self.copy_streams == 0 || self.io_queue_depth == 0 {
            return fail("copy_streams and io_queue_depth must be at least 1".into());
        }
        // Each stream and each request in flight is a thread of the engine (a stack, a
        // buffer): bounded so a plan cannot exhaust the machine or its budget.
        if self.copy_streams > MAX_COPY_STREAMS || self.io_queue_depth > MAX_IO_QUEUE_DEPTH {
            return fail(format!(
                "copy_streams {} and io_queue_depth {} must be at most {MAX_COPY_STREAMS} and {MAX_IO_QUEUE_DEPTH}",
                self.copy_streams, self.io_queue_depth
            ));
        }
        self.validate_ends(model)?;
        // With several stages, each stage's device is checked against the machine
        // (`resolve::check_devices`): a cluster may mix unified and discrete devices.
        if unified_memory && self.stages.len() <= 1 {
            let uses_host = self.attention_weights.host + self.mlp_weights.host + self.kv_cache.host > 0
                || self.embeddings == Tier::Host
                || self.head == Tier::Host;
            if uses_host || self.host_attention || self.compute_host_layers_on_host {
                return fail(
                    "this device shares memory with the host: place things on device or disk only, without host attention"
                        .into(),
                );
            }
        }
        if let Some(speculation) = &self.speculation {
            self.validate_speculation(speculation, model)?;
        }
        self.validate_kept_experts(model)?;
        if self.compute_host_layers_on_host {
            for (layer, place) in self.layer_placements(layers).iter().enumerate() {
                if place.computed_on_host(crate::model::WeightGroup::Attention, true) && place.kv != Tier::Host {
                    return fail(format!(
                        "layer {layer}'s attention is computed on the host but its KV cache is on the {}; \
                         place the KV cache of layers whose attention is on the host on the host",
                        place.kv.name()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The draft runs on the first stage's device; a self-speculating one shares the
    /// target's embeddings and head there, so it needs them both on that one device.
    fn validate_speculation(&self, speculation: &Speculation, model: &ModelSpec) -> Result<()> {
        speculation.validate(model)?;
        let fail = |m: &str| Err(CoreError::invalid(format!("plan: speculation: {m}")));
        if self.stages.len() > 1 && speculation.is_self() {
            return fail(
                "a self-speculating draft shares the target's head, which several stages keep on the last stage's \
                 device while the draft runs on the first's: speculate with a separate draft model (models.draft)",
            );
        }
        match speculation.draft {
            Draft::SelfLayers { .. } if self.embeddings != Tier::Device || self.head != Tier::Device => {
                fail("a self-speculating draft shares the target's embeddings and head on the device: place both there")
            }
            Draft::SelfLayers { .. } | Draft::Model => Ok(()),
        }
    }

    /// Positions every sequence's KV cache holds room for: the prompt and the
    /// generation, and with speculation the draft tokens the last round verifies beyond.
    pub fn kv_positions(&self, workload: &Workload) -> u64 {
        workload.max_context() + self.speculation.as_ref().map_or(0, |s| s.draft_len as u64)
    }

    /// Stages cover the layers in order, each with a consistent placement, on distinct
    /// devices, and agree with the totals.
    fn validate_stages(&self, layers: u64) -> Result<()> {
        let fail = |m: String| Err(CoreError::invalid(format!("plan: {m}")));
        let mut first = 0;
        let mut seen = Vec::new();
        for (index, stage) in self.stages.iter().enumerate() {
            let n = stage.layers();
            if n == 0 {
                return fail(format!("stage {index} holds no layers"));
            }
            if stage.mlp_weights.total() != n || stage.kv_cache.total() != n {
                return fail(format!(
                    "stage {index} places {n} layers of attention weights but {} of MLP weights and {} of KV cache",
                    stage.mlp_weights.total(),
                    stage.kv_cache.total()
                ));
            }
            if seen.contains(&stage.device) {
                return fail(format!("device {} holds two stages; give each stage its own device", stage.device));
            }
            seen.push(stage.device);
            first += n;
        }
        if !self.stages.is_empty() && first != layers {
            return fail(format!("the stages hold {first} layers but the model has {layers}"));
        }
        if !self.stages.is_empty() {
            let sums = self.layer_placements(layers);
            let count =
                |pick: fn(&LayerPlacement) -> Tier, tier: Tier| sums.iter().filter(|p| pick(p) == tier).count() as u64;
            for (name, totals, pick) in [
                (
                    "attention_weights",
                    self.attention_weights,
                    (|p: &LayerPlacement| p.attention) as fn(&LayerPlacement) -> Tier,
                ),
                ("mlp_weights", self.mlp_weights, |p: &LayerPlacement| p.mlp),
                ("kv_cache", self.kv_cache, |p: &LayerPlacement| p.kv),
            ] {
                let expected = TierCounts {
                    device: count(pick, Tier::Device),
                    host: count(pick, Tier::Host),
                    disk: count(pick, Tier::Disk),
                };
                if totals != expected {
                    return fail(format!(
                        "{name} says {} but the stages add up to {}; leave the totals out or correct them",
                        totals.describe(),
                        expected.describe()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The stages of this policy: the listed ones, or one stage on device 0 with the
    /// top-level placement.
    pub fn stage_list(&self) -> std::borrow::Cow<'_, [Stage]> {
        if self.stages.is_empty() {
            std::borrow::Cow::Owned(vec![Stage {
                device: 0,
                attention_weights: self.attention_weights,
                mlp_weights: self.mlp_weights,
                kv_cache: self.kv_cache,
            }])
        } else {
            std::borrow::Cow::Borrowed(&self.stages)
        }
    }

    /// Where every layer of a `layers`-layer model lives and runs.
    pub fn layer_placements(&self, layers: u64) -> Vec<LayerPlacement> {
        let mut out = Vec::with_capacity(layers as usize);
        for (index, stage) in self.stage_list().iter().enumerate() {
            out.extend((0..stage.layers()).map(|local| stage.placement(index as u16, local, self.device_layers)));
        }
        out.resize(out.len().max(layers as usize), LayerPlacement::UNPLACED);
        out
    }

    /// The placement of one layer (see `layer_placements`; prefer that in loops).
    pub fn placement_of(&self, layer: u64) -> LayerPlacement {
        if self.stages.is_empty() {
            // One stage: no list to build (this runs per layer in the tuner's inner loop).
            return Stage {
                device: 0,
                attention_weights: self.attention_weights,
                mlp_weights: self.mlp_weights,
                kv_cache: self.kv_cache,
            }
            .placement(0, layer, self.device_layers);
        }
        let mut first = 0;
        for (index, stage) in self.stages.iter().enumerate() {
            if layer < first + stage.layers() {
                return stage.placement(index as u16, layer - first, self.device_layers);
            }
            first += stage.layers();
        }
        LayerPlacement::UNPLACED
    }

    /// Devices the policy uses: 1 + the highest stage device.
    pub fn device_count(&self) -> usize {
        self.stages.iter().map(|s| s.device as usize + 1).max().unwrap_or(1)
    }

    /// The device of the first and of the last stage: where embeddings and the head
    /// run when they are on "the device".
    pub fn first_device(&self) -> u16 {
        self.stages.first().map_or(0, |s| s.device)
    }

    pub fn last_device(&self) -> u16 {
        self.stages.last().map_or(0, |s| s.device)
    }

    /// The simplest plan: everything on the device, one micro-batch, sequential. A
    /// reference for tests and the plan the profiler times kernels with.
    pub fn all_on_device(layers: u64, micro_batch_size: u64, dtype: Dtype) -> Policy {
        let weight_format = WeightFormats::float(dtype).unwrap_or_else(|| WeightFormats::uniform(WeightFormat::F32));
        Policy {
            schedule: Schedule::Sequential,
            micro_batch_size,
            num_micro_batches: 1,
            prefetch_depth: 1,
            attention_weights: TierCounts::all(Tier::Device, layers),
            mlp_weights: TierCounts::all(Tier::Device, layers),
            embeddings: Tier::Device,
            head: Tier::Device,
            kv_cache: TierCounts::all(Tier::Device, layers),
            device_layers: DeviceLayers::Spread,
            host_attention: false,
            compute_host_layers_on_host: false,
            expert_reads: ExpertReads::Routed,
            hot_experts: 0,
            prefetched_experts: 0,
            weight_dtype: engine_dtype(&weight_format),
            weight_format,
            kv_dtype: dtype,
            chunk_bytes: 1 << 20,
            copy_streams: 1,
            io_queue_depth: 1,
            pinned_host_bytes: 0,
            stages: Vec::new(),
            speculation: None,
        }
    }

    /// Sequences one visit of a layer computes: the whole batch where a layer serves
    /// every micro-batch before the next (layer-major schedules), one micro-batch else.
    pub fn sequences_per_visit(&self) -> u64 {
        match self.schedule {
            Schedule::ZigzagBlock | Schedule::Pipelined => self.micro_batch_size * self.num_micro_batches,
            Schedule::Sequential | Schedule::LayerPrefetch => self.micro_batch_size,
        }
    }

    /// Weight bytes kept on each tier (device, host, disk) of `model` in this policy's
    /// formats: the per-layer groups where each layer places them, embeddings and head.
    pub fn weight_bytes_by_tier(&self, model: &ModelSpec) -> [u64; 3] {
        let layout = crate::model::WeightLayout::of(model, &self.weight_format);
        let mut tiers = [0u64; 3];
        for (layer, place) in self.layer_placements(model.num_layers).iter().enumerate() {
            for group in crate::model::WeightGroup::PER_LAYER {
                tiers[place.tier(group) as usize] += layout.bytes(group, layer as u64);
            }
        }
        tiers[self.embeddings as usize] += layout.bytes(crate::model::WeightGroup::Embeddings, 0);
        tiers[self.head as usize] += layout.bytes(crate::model::WeightGroup::Head, 0);
        tiers
    }

    pub fn batch_size(&self) -> u64 {
        self.micro_batch_size * self.num_micro_batches
    }

    pub fn describe(&self) -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> = vec![
            ("schedule".into(), self.schedule.name().into()),
            ("batch".into(), format!("{} × {} micro-batches", self.micro_batch_size, self.num_micro_batches)),
            ("attention weights".into(), self.attention_weights.describe()),
            ("MLP weights".into(), self.mlp_weights.describe()),
            ("embeddings / head".into(), {
                // Said in words: a table on disk is not streamed whole.
                let rows = if self.embeddings == Tier::Disk { " (a lookup reads its rows)" } else { "" };
                format!("{}{rows} / {}", self.embeddings.name(), self.head.name())
            }),
            ("KV cache".into(), self.kv_cache.describe()),
            ("attention on host".into(), if self.host_attention { "yes".into() } else { "no".into() }),
        ];
        if self.compute_host_layers_on_host {
            rows.push(("host-placed weights".into(), "computed on the host (llama.cpp's split)".into()));
        }
        if self.device_layers == DeviceLayers::First {
            rows.push(("device layers".into(), "the first ones (a self-speculating draft shares them)".into()));
        }
        rows.extend([
            ("prefetch depth".into(), format!("{} layers", self.prefetch_depth)),
            ("transfer chunk".into(), format_bytes(self.chunk_bytes)),
            ("copy streams / I/O depth".into(), format!("{} / {}", self.copy_streams, self.io_queue_depth)),
            ("pinned host memory".into(), format_bytes(self.pinned_host_bytes)),
            (
                "weights / KV cache".into(),
                format!(
                    "{} / {}",
                    self.weight_format.describe(),
                    WeightFormat::from_dtype(self.kv_dtype)
                        .map_or(self.kv_dtype.name().to_string(), WeightFormat::name)
                ),
            ),
        ]);
        if let Some(speculation) = &self.speculation {
            let draft = match (speculation.draft, &speculation.draft_spec) {
                (Draft::SelfLayers { layers }, _) => format!("the first {layers} layers"),
                (Draft::Model, Some(model)) => model.name.clone(),
                (Draft::Model, None) => "the plan's draft model".into(),
            };
            rows.push((
                "speculation".into(),
                format!(
                    "draft: {draft}; {} draft tokens per round; α = {} assumed ({:.2} tokens per round)",
                    speculation.draft_len,
                    speculation.acceptance_rate,
                    speculation.tokens_per_round()
                ),
            ));
        }
        for (index, stage) in self.stages.iter().enumerate() {
            rows.push((
                format!("stage {index}"),
                format!(
                    "device {}: {} layers (attention {}; MLP {}; KV {})",
                    stage.device,
                    stage.layers(),
                    stage.attention_weights.describe(),
                    stage.mlp_weights.describe(),
                    stage.kv_cache.describe()
                ),
            ));
        }
        rows
    }
}
