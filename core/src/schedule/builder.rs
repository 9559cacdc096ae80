//! The builder: program order, prefetch gates, weight loads and where each
//! micro-batch's hidden state is (see the module docs of `schedule`).

use super::attention::AttentionInputs;
use super::format_pieces;
use crate::graph::{
    Deps, MemOp, MemOps, Op, Payload, Place, Pool, Resource, Round, Task, TaskId, TaskKind, WHOLE_GROUP,
};
use crate::model::{ExpertBytes, ModelSpec, WeightGroup, WeightLayout};
use crate::plan::{LayerPlacement, Policy, Schedule, Tier, Workload};
use crate::profile::Profile;

/// Weights brought in for one visit: what compute must wait for, and what device
/// memory the last consumer releases.
#[derive(Default)]
pub(super) struct Loaded {
    pub(super) ready: Vec<TaskId>,
    pub(super) device_bytes: u64,
}

/// The visit being lowered: one layer for micro-batches `first_j..=last_j`.
#[derive(Clone, Copy)]
pub(super) struct Visit {
    pub(super) step: u32,
    pub(super) layer: u32,
    pub(super) first_j: u32,
    pub(super) last_j: u32,
}

/// One transfer of a group's load: which part (`Task::piece`), the bytes it moves and
/// the bytes it holds (more than it moves where routing decides the bytes at run time),
/// and the largest request it can make (a routed read asks for separate tensors).
#[derive(Clone, Copy)]
pub(super) struct LoadPart {
    pub(super) piece: u16,
    pub(super) bytes: u64,
    pub(super) held_bytes: u64,
    pub(super) largest_request: u64,
}

impl LoadPart {
    /// A part read as one range of `bytes`.
    pub(super) fn contiguous(piece: u16, bytes: u64) -> LoadPart {
        LoadPart { piece, bytes, held_bytes: bytes, largest_request: bytes }
    }
}

pub(super) struct Builder<'a> {
    pub(super) policy: &'a Policy,
    pub(super) model: &'a ModelSpec,
    pub(super) workload: &'a Workload,
    /// The machine: each device's host and whether it shares that host's memory.
    pub(super) profile: &'a Profile,
    /// Where every layer lives and runs (its stage's device and tiers).
    pub(super) placements: Vec<LayerPlacement>,
    /// The bytes of every weight group in the plan's formats.
    pub(super) layout: WeightLayout,
    pub(super) tasks: Vec<Task>,
    /// The round being lowered.
    pub(super) round: Round,
    /// Per device: the last compute task of every visit on it so far, for prefetch
    /// gates. Prefetch is a device's own pipeline: with several stages, a gate on a
    /// visit of another device would let a later visit's loads take this device's
    /// memory before an earlier visit's (gated on the other device) could — a deadlock.
    pub(super) visit_done: Vec<Vec<TaskId>>,
    /// Per micro-batch: the task that last produced its hidden state, and where it is.
    pub(super) hidden_producer: Vec<Option<TaskId>>,
    pub(super) hidden_side: Vec<Place>,
    /// Per micro-batch: the head task of the previous step (the sampled token).
    pub(super) last_head: Vec<Option<TaskId>>,
    /// pinned[layer][slot in `WeightGroup::PER_LAYER`]: host-resident weights inside
    /// the pinned budget.
    pub(super) pinned: Vec<[bool; WeightGroup::PER_LAYER.len()]>,
    pub(super) kv_pinned: bool,
    /// Last task that wrote KV of (layer, micro-batch) to where the cache lives: the next
    /// load of that cache must wait for it (a data dependency, not only a gate).
    pub(super) last_kv_store: std::collections::HashMap<(u32, u32), TaskId>,
    /// The draft of a speculative plan (`schedule::draft`).
    pub(super) draft: Option<super::draft::DraftShape>,
    /// A mixture of experts: each layer's MLP as router part and experts (one entry
    /// when every layer is alike), for routed reads (`schedule::experts`).
    pub(super) expert_bytes: Vec<ExpertBytes>,
    /// Memo of the pipelined pieces of (group slot, layer — 0 when every layer is
    /// alike): a mixture of experts' hundreds of tensors make cutting them costly, and
    /// every visit of a layer cuts the same.
    pieces: std::collections::HashMap<(usize, u64), Vec<LoadPart>>,
    /// Memo of the MLP bytes a compute task reads, by (layer as above, rows).
    mlp_read: std::collections::HashMap<(u64, u64), u64>,
    /// Memo of `ModelSpec::expected_cold_experts` by tokens (a measured routing ranks
    /// every layer's experts for each figure).
    pub(super) cold_experts: std::collections::HashMap<u64, f64>,
}

impl<'a> Builder<'a> {
    pub(super) fn new(
        policy: &'a Policy,
        model: &'a ModelSpec,
        workload: &'a Workload,
        profile: &'a Profile,
    ) -> Builder<'a> {
        let micro_batches = policy.num_micro_batches as usize;
        // Fill the pinned budget with host-resident weights in layer order, then the host KV cache.
        let mut pinned_left = policy.pinned_host_bytes;
        let placements = policy.layer_placements(model.num_layers);
        let layout = WeightLayout::of(model, &policy.weight_format);
        let mut pinned = vec![[false; WeightGroup::PER_LAYER.len()]; model.num_layers as usize];
        for (layer, (flags, place)) in pinned.iter_mut().zip(&placements).enumerate() {
            for (slot, group) in WeightGroup::PER_LAYER.into_iter().enumerate() {
                let bytes = layout.bytes(group, layer as u64);
                if place.tier(group) == Tier::Host && bytes <= pinned_left {
                    pinned_left -= bytes;
                    flags[slot] = true;
                }
            }
        }
        let host_kv = policy.kv_cache.host
            * model.kv_bytes_per_token_per_layer(policy.kv_dtype)
            * workload.batch_size
            * policy.kv_positions(workload);
        let layers_with_sizes = if layout.layers_alike() { 1 } else { model.num_layers };
        let expert_bytes = (0..layers_with_sizes).filter_map(|layer| layout.expert_bytes(model, layer)).collect();
        Builder {
            policy,
            model,
            workload,
            profile,
            placements,
            layout,
            expert_bytes,
            round: Round::decoding(workload, 0),
            tasks: Vec::new(),
            visit_done: Vec::new(),
            hidden_producer: vec![None; micro_batches],
            hidden_side: vec![Place::Device(policy.first_device()); micro_batches],
            last_head: vec![None; micro_batches],
            pinned,
            kv_pinned: host_kv <= pinned_left,
            last_kv_store: std::collections::HashMap::new(),
            draft: super::draft::DraftShape::of(policy, model),
            pieces: std::collections::HashMap::new(),
            mlp_read: std::collections::HashMap::new(),
            cold_experts: std::collections::HashMap::new(),
        }
    }

    /// The layer a per-layer size is looked up under: 0 when every layer is alike.
    fn size_key(&self, layer: u32) -> u64 {
        if self.layout.layers_alike() {
            0
        } else {
            layer as u64
        }
    }

    pub(super) fn push(&mut self, mut task: Task) -> TaskId {
        let id = self.tasks.len() as TaskId;
        // Sequential runs one task at a time in program order: each waits for the one before.
        if self.policy.schedule == Schedule::Sequential && id > 0 && !task.deps.contains(&(id - 1)) {
            task.deps.push(id - 1);
        }
        self.tasks.push(task);
        id
    }

    pub(super) fn new_task(
        kind: TaskKind,
        resource: Resource,
        payload: Payload,
        layer: u32,
        micro_batch: u32,
        step: u32,
    ) -> Task {
        Task {
            kind,
            resource,
            payload,
            layer,
            micro_batch,
            step,
            bytes: 0,
            flops: 0,
            tokens: 0,
            context: 0,
            chunk_bytes: 0,
            piece: WHOLE_GROUP,
            pinned: false,
            deps: Deps::new(),
            acquire: MemOps::new(),
            release: MemOps::new(),
        }
    }

    /// New positions per sequence in the round being lowered.
    pub(super) fn new_tokens(&self) -> u64 {
        self.round.rows as u64
    }

    /// Attention context per sequence at the end of the round being lowered.
    pub(super) fn context(&self) -> u64 {
        self.round.context() as u64
    }

    pub(super) fn layer_major(&self) -> bool {
        matches!(self.policy.schedule, Schedule::ZigzagBlock | Schedule::Pipelined)
    }

    pub(super) fn prefetch_depth(&self) -> usize {
        match self.policy.schedule {
            Schedule::Sequential => 0,
            _ => self.policy.prefetch_depth as usize,
        }
    }

    /// The gate for loads of the visit of `layer` about to be emitted: the visit
    /// `prefetch_depth + 1` before it on the same device.
    pub(super) fn load_gate(&self, layer: u32) -> Vec<TaskId> {
        let device = self.placements[layer as usize].device as usize;
        let done = self.visit_done.get(device).map_or(&[][..], |v| v.as_slice());
        let depth = self.prefetch_depth();
        if done.len() > depth {
            vec![done[done.len() - depth - 1]]
        } else {
            Vec::new()
        }
    }

    /// Emits the tasks of one decoding round.
    pub(super) fn round(&mut self, round: Round) {
        self.round = round;
        let step = round.step;
        let micro_batches = self.policy.num_micro_batches as u32;
        let layers = self.model.num_layers as u32;
        let speculating = self.policy.speculation.is_some();
        if self.layer_major() {
            for j in (0..micro_batches).filter(|_| speculating) {
                self.draft_passes(round, j);
            }
            for j in 0..micro_batches {
                self.embed(step, j);
            }
            for layer in 0..layers {
                self.visit(step, layer, 0..micro_batches);
            }
            for j in 0..micro_batches {
                self.head(step, j);
            }
        } else {
            for j in 0..micro_batches {
                if speculating {
                    self.draft_passes(round, j);
                }
                self.embed(step, j);
                for layer in 0..layers {
                    self.visit(step, layer, j..j + 1);
                }
                self.head(step, j);
            }
        }
    }

    pub(super) fn rows(&self) -> u64 {
        self.policy.micro_batch_size * self.new_tokens()
    }

    /// A compute task for (`layer`, micro-batch `j`, `step`) with its FLOPs and bytes read.
    pub(super) fn compute_task(
        &self,
        at: Place,
        op: Op,
        (layer, j, step): (u32, u32, u32),
        flops: u64,
        bytes: u64,
    ) -> Task {
        let mut task = Builder::new_task(
            TaskKind::Compute,
            Resource::compute(at),
            Payload::Compute { op, draft: false, weights_off_device: self.weights_off_device(op, layer) },
            layer,
            j,
            step,
        );
        task.flops = flops;
        task.bytes = bytes;
        task.tokens = self.rows() as u32;
        task.context = self.context() as u32;
        task
    }

    /// Whether the weights an `op` task of `layer` multiplies by are not kept on the
    /// device tier (see `Task::weights_off_device`).
    fn weights_off_device(&self, op: Op, layer: u32) -> bool {
        let placement = self.placements.get(layer as usize);
        let tier = match op {
            Op::Attention | Op::AttnQkv | Op::AttnOut => placement.map(|p| p.attention),
            Op::Mlp => placement.map(|p| p.mlp),
            Op::Head => Some(self.policy.head),
            Op::Embed | Op::AttnCore | Op::Route => None,
        };
        tier.is_some_and(|tier| tier != Tier::Device)
    }

    /// Makes sure micro-batch `j`'s hidden state is at `place`, copying it if needed, and
    /// returns the task that produced it there. On unified memory a device and its host
    /// share the bytes (no copy), but two devices have their own budgets: the hidden
    /// state crosses the link between them.
    pub(super) fn hidden_on(&mut self, place: Place, j: u32, step: u32, layer: u32) -> Option<TaskId> {
        let index = j as usize;
        let from = self.hidden_side[index];
        if from == place || self.profile.shares_memory(from, place) {
            return self.hidden_producer[index];
        }
        let mut copy =
            Builder::new_task(TaskKind::Copy, Resource::link(from, place), Payload::Activations, layer, j, step);
        copy.bytes = self.rows() * self.model.activation_bytes_per_token();
        copy.chunk_bytes = Task::request_bytes(copy.bytes.max(1));
        copy.pinned = true;
        copy.deps.extend(self.hidden_producer[index]);
        let id = self.push(copy);
        self.hidden_side[index] = place;
        self.hidden_producer[index] = Some(id);
        Some(id)
    }

    pub(super) fn set_hidden(&mut self, j: u32, place: Place, producer: TaskId) {
        self.hidden_side[j as usize] = place;
        self.hidden_producer[j as usize] = Some(producer);
    }

    /// Whether `group` of `layer` is computed on the host (llama.cpp's split;
    /// `LayerPlacement::computed_on_host`).
    pub(super) fn on_host(&self, group: WeightGroup, layer: u32) -> bool {
        self.placements[layer as usize].computed_on_host(group, self.policy.compute_host_layers_on_host)
    }

    /// The device a layer's stage runs on.
    pub(super) fn device_of(&self, layer: u32) -> Place {
        Place::Device(self.placements[layer as usize].device)
    }

    /// The host of a layer's device: where its host-tier weights and cache live.
    pub(super) fn host_of(&self, layer: u32) -> Place {
        Place::Host(self.profile.host_of(self.device_of(layer)))
    }

    /// The disk of a layer's host.
    pub(super) fn disk_of(&self, layer: u32) -> Resource {
        Resource::Disk { host: self.profile.host_of(self.device_of(layer)) }
    }

    /// Whether a layer's device shares its host's memory (no host↔device copies).
    pub(super) fn unified(&self, layer: u32) -> bool {
        self.profile.device(self.placements[layer as usize].device).unified_memory
    }

    /// The host of the device the embeddings (`first`) or the head run beside.
    pub(super) fn end_host(&self, first: bool) -> Place {
        let device = if first { self.policy.first_device() } else { self.policy.last_device() };
        Place::Host(self.profile.host_of(Place::Device(device)))
    }

    /// Where disk reads for `layer` land: its device's memory when memory is unified,
    /// else host staging memory.
    pub(super) fn staging_pool(&self, layer: u32) -> Pool {
        if self.unified(layer) {
            self.device_of(layer)
        } else {
            self.host_of(layer)
        }
    }

    /// Emits the load of one weight group for the visit about to run.
    pub(super) fn load_weights(
        &mut self,
        group: WeightGroup,
        layer: u32,
        step: u32,
        first_j: u32,
        gate: &[TaskId],
    ) -> Loaded {
        if !self.streams(group, layer) {
            return Loaded::default();
        }
        let size = self.layout.group(group, layer as u64);
        let chunk = self.policy.chunk_bytes;
        // Only the pipelined schedule makes each piece its own task; others move the whole group.
        let pieces: Vec<LoadPart> = if self.policy.schedule == Schedule::Pipelined {
            let key = (group.layer_slot().unwrap_or(usize::MAX), self.size_key(layer));
            let (model, memo) = (self.model, &mut self.pieces);
            let cut = memo.entry(key).or_insert_with(|| {
                format_pieces(model, group, size, chunk)
                    .iter()
                    .enumerate()
                    // A group's pieces number tens (`MAX_PIPELINE_PIECES` per tensor,
                    // small tensors packed), far from the markers at u16::MAX.
                    .map(|(i, p)| LoadPart::contiguous(i as u16, p.bytes))
                    .collect()
            });
            cut.clone()
        } else {
            vec![LoadPart::contiguous(WHOLE_GROUP, size.bytes)]
        };
        self.load_parts(group, (layer, step, first_j), gate, &pieces)
    }

    /// Whether `group` of `layer` is brought to its device for each visit (not kept
    /// there, nor computed where it lives on the host).
    pub(super) fn streams(&self, group: WeightGroup, layer: u32) -> bool {
        self.placements[layer as usize].tier(group) != Tier::Device && !self.on_host(group, layer)
    }

    /// Emits the reads and copies of `parts` of one group for a visit at
    /// (`layer`, `step`, first micro-batch `first_j`), each after `gate`.
    pub(super) fn load_parts(
        &mut self,
        group: WeightGroup,
        (layer, step, first_j): (u32, u32, u32),
        gate: &[TaskId],
        parts: &[LoadPart],
    ) -> Loaded {
        let tier = self.placements[layer as usize].tier(group);
        let device = self.device_of(layer);
        let chunk = self.policy.chunk_bytes;
        let slot = group.layer_slot().unwrap_or(0);
        let payload = Payload::Weights { group };
        let mut loaded = Loaded { ready: Vec::new(), device_bytes: parts.iter().map(|p| p.held_bytes).sum() };
        for &LoadPart { piece, bytes, held_bytes, largest_request } in parts {
            let request = Task::request_bytes(chunk.min(bytes).min(largest_request));
            let mut deps = Deps::from_slice(gate);
            if tier == Tier::Disk {
                let mut read =
                    Builder::new_task(TaskKind::DiskRead, self.disk_of(layer), payload, layer, first_j, step);
                read.piece = piece;
                read.bytes = bytes;
                read.chunk_bytes = request;
                read.deps = deps;
                read.acquire.push(MemOp { pool: self.staging_pool(layer), bytes: held_bytes });
                let id = self.push(read);
                if self.unified(layer) {
                    loaded.ready.push(id);
                    continue;
                }
                deps = Deps::from_slice(&[id]);
            }
            let host = self.host_of(layer);
            let mut copy =
                Builder::new_task(TaskKind::Copy, Resource::link(host, device), payload, layer, first_j, step);
            copy.piece = piece;
            copy.bytes = bytes;
            copy.chunk_bytes = request;
            copy.pinned = tier == Tier::Disk || self.pinned[layer as usize][slot];
            copy.deps = deps;
            copy.acquire.push(MemOp { pool: device, bytes: held_bytes });
            if tier == Tier::Disk {
                copy.release.push(MemOp { pool: host, bytes: held_bytes });
            }
            let id = self.push(copy);
            loaded.ready.push(id);
        }
        loaded
    }

    /// One layer for the micro-batches `js`: loads, then attention and MLP of each. A
    /// mixture of experts read as routed (`routes_experts`) routes every micro-batch
    /// first, then reads the experts they chose, then computes their MLPs.
    pub(super) fn visit(&mut self, step: u32, layer: u32, js: std::ops::Range<u32>) {
        let gate = self.load_gate(layer);
        let visit = Visit { step, layer, first_j: js.start, last_j: js.end - 1 };
        let attention = self.load_weights(WeightGroup::Attention, layer, step, visit.first_j, &gate);
        let routed = self.routes_experts(layer);
        let mut mlp = if routed {
            self.load_router(layer, step, visit.first_j, &gate)
        } else {
            self.load_weights(WeightGroup::Mlp, layer, step, visit.first_j, &gate)
        };
        let mut attention_tasks: Vec<TaskId> = Vec::new();
        let mut mlp_tasks: Vec<TaskId> = Vec::new();
        let mut routes: Vec<TaskId> = Vec::new();
        for j in js.clone() {
            let attn_done = self.visit_attention(&visit, j, &attention, &attention_tasks, &gate);
            attention_tasks.push(attn_done);
            if routed {
                routes.push(self.route(step, layer, j, attn_done, &mlp.ready));
            } else {
                let id = self.mlp(&visit, j, attn_done, &mlp, &mlp_tasks);
                mlp_tasks.push(id);
            }
        }
        if routed {
            let experts = self.load_routed_experts(layer, step, visit.first_j, &routes);
            // The router part was ready before any route: the MLPs wait for the experts.
            mlp = Loaded { ready: experts.ready, device_bytes: mlp.device_bytes + experts.device_bytes };
            for (j, &route) in js.zip(&routes) {
                let id = self.mlp(&visit, j, route, &mlp, &mlp_tasks);
                mlp_tasks.push(id);
            }
        }
        let device = self.placements[layer as usize].device as usize;
        if self.visit_done.len() <= device {
            self.visit_done.resize(device + 1, Vec::new());
        }
        self.visit_done[device].extend(mlp_tasks.last());
    }

    /// Micro-batch `j`'s attention in a visit: on the host where it is computed there,
    /// else on the device after the visit's attention weights.
    fn visit_attention(
        &mut self,
        visit: &Visit,
        j: u32,
        weights: &Loaded,
        earlier: &[TaskId],
        gate: &[TaskId],
    ) -> TaskId {
        let Visit { step, layer, first_j, last_j } = *visit;
        if self.on_host(WeightGroup::Attention, layer) {
            return self.attention_on_host_layer(step, layer, j);
        }
        let kv_gate = if j >= first_j + 2 { vec![earlier[(j - first_j - 2) as usize]] } else { gate.to_vec() };
        let is_last = j == last_j;
        let release = if is_last { weights.device_bytes } else { 0 };
        // The task that frees the visit's weights runs after every other consumer
        // of them: micro-batches may otherwise finish out of order.
        let mut weights_ready = weights.ready.clone();
        if is_last && release > 0 {
            weights_ready.extend(earlier);
        }
        let inputs = AttentionInputs { weights_ready: &weights_ready, release_weights: release, kv_gate: &kv_gate };
        self.attention(step, layer, j, &inputs)
    }

    /// Micro-batch `j`'s MLP after `after`, where its weights are computed (the hidden
    /// state follows it there); the last of the visit frees the visit's MLP weights.
    fn mlp(&mut self, visit: &Visit, j: u32, after: TaskId, weights: &Loaded, earlier: &[TaskId]) -> TaskId {
        let Visit { step, layer, last_j, .. } = *visit;
        let side = if self.on_host(WeightGroup::Mlp, layer) { self.host_of(layer) } else { self.device_of(layer) };
        let hidden = self.hidden_on(side, j, step, layer);
        let rows = self.rows();
        let flops = self.model.projection_flops(WeightGroup::Mlp, rows);
        let key = (self.size_key(layer), rows);
        let (model, layout) = (self.model, &self.layout);
        let bytes = *self
            .mlp_read
            .entry(key)
            .or_insert_with(|| model.mlp_bytes_read(rows, layout.bytes(WeightGroup::Mlp, layer as u64)));
        let mut task = self.compute_task(side, Op::Mlp, (layer, j, step), flops, bytes);
        task.deps.push(after);
        task.deps.extend(hidden.filter(|&h| h != after));
        task.deps.extend_from_slice(&weights.ready);
        if j == last_j && weights.device_bytes > 0 {
            task.release.push(MemOp { pool: side, bytes: weights.device_bytes });
            task.deps.extend(earlier.iter().copied());
        }
        let id = self.push(task);
        self.set_hidden(j, side, id);
        id
    }

    pub(super) fn kv_tier(&self, layer: u32) -> Tier {
        self.placements[layer as usize].kv
    }

    pub(super) fn kv_bytes(&self, tokens: u64) -> u64 {
        self.model.kv_bytes_per_token_per_layer(self.policy.kv_dtype) * self.policy.micro_batch_size * tokens
    }

    pub(super) fn attention_flops(&self) -> (u64, u64, u64) {
        let rows = self.rows();
        let (qkv_params, out_params) = self.model.attention_split_params();
        let core = self.policy.micro_batch_size * self.model.attention_core_flops(self.new_tokens(), self.context());
        (2 * rows * qkv_params, core, 2 * rows * out_params)
    }
}
