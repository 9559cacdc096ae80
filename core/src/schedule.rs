//! Lowering: a plan's policy, a model and a workload become a `TaskGraph` — the
//! graph the simulator replays and the engine executes.
//!
//! Program order is the order of compute: for each step (0 = prefill), the layer
//! *visits* in schedule order — micro-batch-major for `sequential` and
//! `layer-prefetch` (each micro-batch walks every layer, reloading streamed weights),
//! layer-major for `zigzag-block` and `pipelined` (each layer serves every
//! micro-batch before the next). Loads are emitted just before the visit that uses
//! them; *gates* (dependencies) bound how far they run ahead:
//!
//! * weight loads of visit `v` wait for visit `v − prefetch_depth − 1` to finish;
//!   `sequential` goes further: every task waits for the one emitted before it, so
//!   nothing overlaps at all (Accelerate's hooks);
//! * KV loads of micro-batch `j` wait for the attention of `j − 2` in the same visit
//!   (double buffering), the first two for the weight gate;
//! * a task's memory is acquired when it starts and released when it ends; streamed
//!   weights are released by their last consumer;
//! * a KV load of (layer, micro-batch) waits for the previous store of the same cache
//!   (data, not just a gate: the engine reads what that store wrote);
//! * the task that frees a visit's streamed weights waits for every other consumer of
//!   them (micro-batches can otherwise finish out of order under the dispatch rule).
//!
//! Where the hidden state of each micro-batch lives (device or host) is tracked, and
//! an activation copy is emitted whenever the next operation runs on the other side.

use crate::error::{CoreError, Result};
use crate::graph::{
    MemOp, Op, Payload, Place, Pool, PoolSpec, Resource, ResourceSpec, Task, TaskGraph, TaskId, TaskKind, NO_LAYER,
    WHOLE_GROUP,
};
use crate::model::{ModelSpec, WeightGroup};
use crate::plan::{LayerPlacement, Policy, Schedule, Tier, Workload};
use crate::profile::Profile;

/// About how many tasks one weight-group transfer is split into by the `pipelined`
/// schedule: finer tasks add events, not overlap.
pub const MAX_PIPELINE_PIECES: u64 = 16;

/// A piece of a weight group moved by one pipelined task: rows `row_start ..
/// row_start + rows` of the group's tensor number `tensor` (see
/// `ModelSpec::group_tensors`). The simulator needs only the bytes; the engine
/// multiplies by each row block as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub tensor: u32,
    pub row_start: u64,
    pub rows: u64,
    pub bytes: u64,
}

/// The pieces of one weight group for a `pipelined` transfer with `chunk_bytes`
/// requests: each tensor is cut into row blocks of about max(chunk, group ÷ 16) bytes.
pub fn weight_pieces(
    model: &ModelSpec,
    group: WeightGroup,
    layer: u64,
    dtype: crate::model::Dtype,
    chunk_bytes: u64,
) -> Vec<Piece> {
    let tensors = model.group_tensors(group, layer);
    let total: u64 = tensors.iter().map(|t| dtype.bytes_of(t.elements())).sum();
    let target = chunk_bytes.max(total.div_ceil(MAX_PIPELINE_PIECES)).max(1);
    let mut pieces = Vec::new();
    for (index, tensor) in tensors.iter().enumerate() {
        let row_bytes = dtype.bytes_of(tensor.cols).max(1);
        let rows_per_piece = (target / row_bytes).max(1);
        let mut row = 0;
        while row < tensor.rows {
            let rows = rows_per_piece.min(tensor.rows - row);
            pieces.push(Piece {
                tensor: index as u32,
                row_start: row,
                rows,
                bytes: dtype.bytes_of(rows * tensor.cols),
            });
            row += rows;
        }
    }
    pieces
}

/// Which decode steps to lower. The prefill (step 0) is always included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Steps {
    /// Every decode step: 1 ..= gen_len − 1.
    All,
    /// Only these decode steps, ascending; used to extrapolate long generations.
    Only(Vec<u32>),
}

/// Memory capacities the graph's pools get: the profile's memory less its reserve
/// (device 0 and the host).
pub fn pool_capacities(profile: &Profile) -> (u64, u64) {
    (pool_capacity(profile, Place::DEVICE), pool_capacity(profile, Place::HOST))
}

/// The capacity of one place's pool: its memory less the profile's reserve.
pub fn pool_capacity(profile: &Profile, place: Place) -> u64 {
    let keep = 1.0 - profile.memory_reserve_fraction;
    let bytes = match place {
        Place::Device(d) => profile.device_memory(d),
        Place::Host(_) => profile.host_memory_bytes,
    };
    (bytes as f64 * keep) as u64
}

/// The pools a policy's graph would get (capacity and resident set), without building
/// the tasks: what a search needs to check a placement fits before simulating it.
pub fn pool_specs(policy: &Policy, model: &ModelSpec, workload: &Workload, profile: &Profile) -> Vec<PoolSpec> {
    Builder::new(policy, model, workload, profile.unified_memory).pools(profile)
}

/// Lowers a policy into a task graph. Fails when the policy does not fit the model.
pub fn lower(
    policy: &Policy,
    model: &ModelSpec,
    workload: &Workload,
    profile: &Profile,
    steps: &Steps,
) -> Result<TaskGraph> {
    policy.validate(model, workload, profile.unified_memory)?;
    let decode_steps: Vec<u32> = match steps {
        Steps::All => (1..workload.gen_len as u32).collect(),
        Steps::Only(list) => {
            if list.windows(2).any(|w| w[0] >= w[1]) || list.iter().any(|&s| s == 0 || s as u64 >= workload.gen_len) {
                return Err(CoreError::invalid("sampled decode steps must be ascending and within 1..gen_len"));
            }
            list.clone()
        }
    };
    crate::resolve::check_devices(policy, profile)?;
    let mut builder = Builder::new(policy, model, workload, profile.unified_memory);
    builder.step(0);
    for &step in &decode_steps {
        builder.step(step);
    }
    let graph = TaskGraph {
        pools: builder.pools(profile),
        resources: builder.resources(),
        tasks: builder.tasks,
        batch_size: workload.batch_size,
        prompt_len: workload.prompt_len,
        gen_len: workload.gen_len,
        steps: std::iter::once(0).chain(decode_steps).collect(),
    };
    graph.validate()?;
    Ok(graph)
}

/// Weights brought in for one visit: what compute must wait for, and what device
/// memory the last consumer releases.
#[derive(Default)]
struct Loaded {
    ready: Vec<TaskId>,
    device_bytes: u64,
}

struct Builder<'a> {
    policy: &'a Policy,
    model: &'a ModelSpec,
    workload: &'a Workload,
    unified: bool,
    /// Where every layer lives and runs (its stage's device and tiers).
    placements: Vec<LayerPlacement>,
    tasks: Vec<Task>,
    /// Last compute task of every visit so far, for prefetch gates.
    visit_done: Vec<TaskId>,
    /// Per micro-batch: the task that last produced its hidden state, and where it is.
    hidden_producer: Vec<Option<TaskId>>,
    hidden_side: Vec<Place>,
    /// Per micro-batch: the head task of the previous step (the sampled token).
    last_head: Vec<Option<TaskId>>,
    /// pinned[layer][0 = attention, 1 = MLP]: host-resident weights inside the pinned budget.
    pinned: Vec<[bool; 2]>,
    kv_pinned: bool,
    /// Last task that wrote KV of (layer, micro-batch) to where the cache lives: the next
    /// load of that cache must wait for it (a data dependency, not only a gate).
    last_kv_store: std::collections::HashMap<(u32, u32), TaskId>,
}

impl<'a> Builder<'a> {
    fn new(policy: &'a Policy, model: &'a ModelSpec, workload: &'a Workload, unified: bool) -> Builder<'a> {
        let micro_batches = policy.num_micro_batches as usize;
        // Fill the pinned budget with host-resident weights in layer order, then the host KV cache.
        let mut pinned_left = policy.pinned_host_bytes;
        let placements = policy.layer_placements(model.num_layers);
        let mut pinned = vec![[false; 2]; model.num_layers as usize];
        for (flags, place) in pinned.iter_mut().zip(&placements) {
            for (slot, group, tier) in [(0, WeightGroup::Attention, place.attention), (1, WeightGroup::Mlp, place.mlp)]
            {
                let bytes = model.group_bytes(group, policy.weight_dtype);
                if tier == Tier::Host && bytes <= pinned_left {
                    pinned_left -= bytes;
                    flags[slot] = true;
                }
            }
        }
        let host_kv = policy.kv_cache.host
            * model.kv_bytes_per_token_per_layer(policy.kv_dtype)
            * workload.batch_size
            * workload.max_context();
        Builder {
            policy,
            model,
            workload,
            unified,
            placements,
            tasks: Vec::new(),
            visit_done: Vec::new(),
            hidden_producer: vec![None; micro_batches],
            hidden_side: vec![Place::Device(policy.first_device()); micro_batches],
            last_head: vec![None; micro_batches],
            pinned,
            kv_pinned: host_kv <= pinned_left,
            last_kv_store: std::collections::HashMap::new(),
        }
    }

    fn push(&mut self, mut task: Task) -> TaskId {
        let id = self.tasks.len() as TaskId;
        // Sequential runs one task at a time in program order: each waits for the one before.
        if self.policy.schedule == Schedule::Sequential && id > 0 && !task.deps.contains(&(id - 1)) {
            task.deps.push(id - 1);
        }
        self.tasks.push(task);
        id
    }

    fn new_task(kind: TaskKind, resource: Resource, payload: Payload, layer: u32, micro_batch: u32, step: u32) -> Task {
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
            deps: Vec::new(),
            acquire: Vec::new(),
            release: Vec::new(),
        }
    }

    fn new_tokens(&self, step: u32) -> u64 {
        if step == 0 {
            self.workload.prompt_len
        } else {
            1
        }
    }

    fn context(&self, step: u32) -> u64 {
        self.workload.prompt_len + step as u64
    }

    fn layer_major(&self) -> bool {
        matches!(self.policy.schedule, Schedule::ZigzagBlock | Schedule::Pipelined)
    }

    fn prefetch_depth(&self) -> usize {
        match self.policy.schedule {
            Schedule::Sequential => 0,
            _ => self.policy.prefetch_depth as usize,
        }
    }

    /// The gate for loads of the visit about to be emitted.
    fn load_gate(&self) -> Vec<TaskId> {
        let visit = self.visit_done.len();
        let depth = self.prefetch_depth();
        if visit > depth {
            vec![self.visit_done[visit - depth - 1]]
        } else {
            Vec::new()
        }
    }

    fn step(&mut self, step: u32) {
        let micro_batches = self.policy.num_micro_batches as u32;
        let layers = self.model.num_layers as u32;
        if self.layer_major() {
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
                self.embed(step, j);
                for layer in 0..layers {
                    self.visit(step, layer, j..j + 1);
                }
                self.head(step, j);
            }
        }
    }

    fn rows(&self, step: u32) -> u64 {
        self.policy.micro_batch_size * self.new_tokens(step)
    }

    /// A compute task for (`layer`, micro-batch `j`, `step`) with its FLOPs and bytes read.
    fn compute_task(&self, at: Place, op: Op, (layer, j, step): (u32, u32, u32), flops: u64, bytes: u64) -> Task {
        let mut task =
            Builder::new_task(TaskKind::Compute, Resource::compute(at), Payload::Compute { op }, layer, j, step);
        task.flops = flops;
        task.bytes = bytes;
        task.tokens = self.rows(step) as u32;
        task.context = self.context(step) as u32;
        task
    }

    /// Makes sure micro-batch `j`'s hidden state is at `place`, copying it if needed, and
    /// returns the task that produced it there. On unified memory a device and its host
    /// share the bytes (no copy), but two devices have their own budgets: the hidden
    /// state crosses the link between them.
    fn hidden_on(&mut self, place: Place, j: u32, step: u32, layer: u32) -> Option<TaskId> {
        let index = j as usize;
        let from = self.hidden_side[index];
        if from == place || (self.unified && !(from.is_device() && place.is_device())) {
            return self.hidden_producer[index];
        }
        let mut copy =
            Builder::new_task(TaskKind::Copy, Resource::link(from, place), Payload::Activations, layer, j, step);
        copy.bytes = self.rows(step) * self.model.activation_bytes_per_token();
        copy.chunk_bytes = copy.bytes.max(1);
        copy.pinned = true;
        copy.deps.extend(self.hidden_producer[index]);
        let id = self.push(copy);
        self.hidden_side[index] = place;
        self.hidden_producer[index] = Some(id);
        Some(id)
    }

    fn set_hidden(&mut self, j: u32, place: Place, producer: TaskId) {
        self.hidden_side[j as usize] = place;
        self.hidden_producer[j as usize] = Some(producer);
    }

    /// The device a layer's stage runs on.
    fn device_of(&self, layer: u32) -> Place {
        Place::Device(self.placements[layer as usize].device)
    }

    /// Where disk reads for `layer` land: its device's memory when memory is unified,
    /// else host staging memory.
    fn staging_pool(&self, layer: u32) -> Pool {
        if self.unified {
            self.device_of(layer)
        } else {
            Place::HOST
        }
    }

    fn embed(&mut self, step: u32, j: u32) {
        let side = match self.policy.embeddings {
            Tier::Device => Place::Device(self.policy.first_device()),
            _ => Place::HOST,
        };
        let rows = self.rows(step);
        let bytes = rows * self.model.hidden_size * self.policy.weight_dtype.bits() / 8;
        let mut task = self.compute_task(side, Op::Embed, (NO_LAYER, j, step), 0, bytes);
        task.deps.extend(self.last_head[j as usize]);
        let id = self.push(task);
        self.set_hidden(j, side, id);
    }

    fn head(&mut self, step: u32, j: u32) {
        let side = match self.policy.head {
            Tier::Device => Place::Device(self.policy.last_device()),
            _ => Place::HOST,
        };
        let dep = self.hidden_on(side, j, step, NO_LAYER);
        // Only the last position of each sequence is projected to the vocabulary.
        let rows = self.policy.micro_batch_size;
        let flops = self.model.projection_flops(WeightGroup::Head, rows);
        let bytes = self.model.group_bytes(WeightGroup::Head, self.policy.weight_dtype);
        let mut task = self.compute_task(side, Op::Head, (NO_LAYER, j, step), flops, bytes);
        task.tokens = rows as u32;
        task.deps.extend(dep);
        let id = self.push(task);
        self.last_head[j as usize] = Some(id);
        self.set_hidden(j, side, id);
    }

    /// Emits the load of one weight group for the visit about to run.
    fn load_weights(&mut self, group: WeightGroup, layer: u32, step: u32, first_j: u32, gate: &[TaskId]) -> Loaded {
        let placement = self.placements[layer as usize];
        let tier = if group == WeightGroup::Attention { placement.attention } else { placement.mlp };
        let device = self.device_of(layer);
        if tier == Tier::Device || self.policy.layer_on_host(layer as u64) {
            return Loaded::default();
        }
        let bytes = self.model.group_bytes(group, self.policy.weight_dtype);
        let chunk = self.policy.chunk_bytes;
        // Only the pipelined schedule makes each piece its own task; others move the whole group.
        let pieces: Vec<(u32, u64)> = if self.policy.schedule == Schedule::Pipelined {
            weight_pieces(self.model, group, layer as u64, self.policy.weight_dtype, chunk)
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u32, p.bytes))
                .collect()
        } else {
            vec![(WHOLE_GROUP, bytes)]
        };
        let slot = usize::from(group != WeightGroup::Attention);
        let payload = Payload::Weights { group };
        let mut loaded = Loaded { ready: Vec::new(), device_bytes: bytes };
        for (piece_index, piece) in pieces {
            let mut deps = gate.to_vec();
            if tier == Tier::Disk {
                let mut read = Builder::new_task(TaskKind::DiskRead, Resource::DISK, payload, layer, first_j, step);
                read.piece = piece_index;
                read.bytes = piece;
                read.chunk_bytes = chunk.min(piece);
                read.deps = deps;
                read.acquire.push(MemOp { pool: self.staging_pool(layer), bytes: piece });
                let id = self.push(read);
                if self.unified {
                    loaded.ready.push(id);
                    continue;
                }
                deps = vec![id];
            }
            let mut copy =
                Builder::new_task(TaskKind::Copy, Resource::link(Place::HOST, device), payload, layer, first_j, step);
            copy.piece = piece_index;
            copy.bytes = piece;
            copy.chunk_bytes = chunk.min(piece);
            copy.pinned = tier == Tier::Disk || self.pinned[layer as usize][slot];
            copy.deps = deps;
            copy.acquire.push(MemOp { pool: device, bytes: piece });
            if tier == Tier::Disk {
                copy.release.push(MemOp { pool: Place::HOST, bytes: piece });
            }
            let id = self.push(copy);
            loaded.ready.push(id);
        }
        loaded
    }

    /// One layer for the micro-batches `js`: loads, then attention and MLP of each.
    fn visit(&mut self, step: u32, layer: u32, js: std::ops::Range<u32>) {
        let gate = self.load_gate();
        let first_j = js.start;
        let last_j = js.end - 1;
        let attention = self.load_weights(WeightGroup::Attention, layer, step, first_j, &gate);
        let mlp = self.load_weights(WeightGroup::Mlp, layer, step, first_j, &gate);
        let on_host = self.policy.layer_on_host(layer as u64);
        let mut attention_tasks: Vec<TaskId> = Vec::new();
        let mut mlp_tasks: Vec<TaskId> = Vec::new();
        let mut last_mlp = 0;
        for j in js {
            let is_last = j == last_j;
            let kv_gate =
                if j >= first_j + 2 { vec![attention_tasks[(j - first_j - 2) as usize]] } else { gate.clone() };
            let attn_done = if on_host {
                self.attention_on_host_layer(step, layer, j)
            } else {
                let release = if is_last { attention.device_bytes } else { 0 };
                // The task that frees the visit's weights runs after every other consumer
                // of them: micro-batches may otherwise finish out of order.
                let mut weights_ready = attention.ready.clone();
                if is_last && release > 0 {
                    weights_ready.extend(&attention_tasks);
                }
                self.attention(step, layer, j, &weights_ready, release, &kv_gate)
            };
            attention_tasks.push(attn_done);
            // MLP.
            let side = if on_host { Place::HOST } else { self.device_of(layer) };
            let rows = self.rows(step);
            let flops = self.model.projection_flops(WeightGroup::Mlp, rows);
            let bytes = self.model.mlp_bytes_read(rows, self.policy.weight_dtype);
            let mut task = self.compute_task(side, Op::Mlp, (layer, j, step), flops, bytes);
            task.deps.push(attn_done);
            task.deps.extend(&mlp.ready);
            if is_last && mlp.device_bytes > 0 {
                task.release.push(MemOp { pool: side, bytes: mlp.device_bytes });
                task.deps.extend(&mlp_tasks);
            }
            let id = self.push(task);
            self.set_hidden(j, side, id);
            mlp_tasks.push(id);
            last_mlp = id;
        }
        self.visit_done.push(last_mlp);
    }

    fn kv_tier(&self, layer: u32) -> Tier {
        self.placements[layer as usize].kv
    }

    fn kv_bytes(&self, tokens: u64) -> u64 {
        self.model.kv_bytes_per_token_per_layer(self.policy.kv_dtype) * self.policy.micro_batch_size * tokens
    }

    fn attention_flops(&self, step: u32) -> (u64, u64, u64) {
        let rows = self.rows(step);
        let (qkv_params, out_params) = self.model.attention_split_params();
        let core =
            self.policy.micro_batch_size * self.model.attention_core_flops(self.new_tokens(step), self.context(step));
        (2 * rows * qkv_params, core, 2 * rows * out_params)
    }

    /// Attention of a device-computed layer; returns the task after which the hidden
    /// state is updated on the device.
    fn attention(
        &mut self,
        step: u32,
        layer: u32,
        j: u32,
        weights_ready: &[TaskId],
        release_weights: u64,
        kv_gate: &[TaskId],
    ) -> TaskId {
        let kv_tier = self.kv_tier(layer);
        let past_tokens = self.context(step) - self.new_tokens(step);
        let new_kv = self.kv_bytes(self.new_tokens(step));
        let past_kv = self.kv_bytes(past_tokens);
        let attn_bytes = self.model.group_bytes(WeightGroup::Attention, self.policy.weight_dtype);
        let (qkv_flops, core_flops, out_flops) = self.attention_flops(step);
        let kv_read = self.kv_bytes(self.context(step));
        let host_attention = self.policy.host_attention && kv_tier != Tier::Device && !self.unified;
        let device = self.device_of(layer);
        if host_attention {
            // FlexGen's CPU delegation: projections on the device, attention where the KV is.
            let hidden = self.hidden_on(device, j, step, layer);
            let (qkv_params, _) = self.model.attention_split_params();
            let qkv_share = attn_bytes * qkv_params / self.model.params().attention_per_layer.max(1);
            let mut qkv = self.compute_task(device, Op::AttnQkv, (layer, j, step), qkv_flops, qkv_share);
            qkv.deps.extend(hidden);
            qkv.deps.extend(weights_ready);
            let qkv_id = self.push(qkv);
            let rows = self.rows(step);
            let mut down = Builder::new_task(
                TaskKind::Copy,
                Resource::link(device, Place::HOST),
                Payload::Activations,
                layer,
                j,
                step,
            );
            down.bytes = rows * 4 * (self.model.hidden_size + 2 * self.model.kv_dim());
            down.chunk_bytes = down.bytes;
            down.pinned = true;
            down.deps.push(qkv_id);
            let down_id = self.push(down);
            let mut core = self.compute_task(Place::HOST, Op::AttnCore, (layer, j, step), core_flops, kv_read);
            core.deps.push(down_id);
            if kv_tier == Tier::Disk && past_kv > 0 {
                let mut read = Builder::new_task(TaskKind::DiskRead, Resource::DISK, Payload::KvCache, layer, j, step);
                read.bytes = past_kv;
                read.chunk_bytes = self.policy.chunk_bytes.min(past_kv);
                read.deps = kv_gate.to_vec();
                read.deps.extend(self.last_kv_store.get(&(layer, j)));
                read.acquire.push(MemOp { pool: Place::HOST, bytes: past_kv });
                let read_id = self.push(read);
                core.deps.push(read_id);
                core.release.push(MemOp { pool: Place::HOST, bytes: past_kv });
            }
            let core_id = self.push(core);
            if kv_tier == Tier::Disk {
                let mut write =
                    Builder::new_task(TaskKind::DiskWrite, Resource::DISK, Payload::KvCache, layer, j, step);
                write.bytes = new_kv;
                write.chunk_bytes = self.policy.chunk_bytes.min(new_kv);
                write.deps.push(core_id);
                let write_id = self.push(write);
                self.last_kv_store.insert((layer, j), write_id);
            }
            let mut up = Builder::new_task(
                TaskKind::Copy,
                Resource::link(Place::HOST, device),
                Payload::Activations,
                layer,
                j,
                step,
            );
            up.bytes = rows * self.model.activation_bytes_per_token();
            up.chunk_bytes = up.bytes;
            up.pinned = true;
            up.deps.push(core_id);
            let up_id = self.push(up);
            let mut out = self.compute_task(device, Op::AttnOut, (layer, j, step), out_flops, attn_bytes - qkv_share);
            out.deps.push(up_id);
            out.deps.push(qkv_id);
            if release_weights > 0 {
                out.release.push(MemOp { pool: device, bytes: release_weights });
            }
            let out_id = self.push(out);
            self.set_hidden(j, device, out_id);
            return out_id;
        }
        // Attention on the device: bring past KV in if it lives elsewhere.
        let hidden = self.hidden_on(device, j, step, layer);
        let mut kv_ready = Vec::new();
        let mut release_kv = 0;
        if kv_tier != Tier::Device && past_kv > 0 {
            let mut deps = kv_gate.to_vec();
            deps.extend(self.last_kv_store.get(&(layer, j)));
            if kv_tier == Tier::Disk {
                let mut read = Builder::new_task(TaskKind::DiskRead, Resource::DISK, Payload::KvCache, layer, j, step);
                read.bytes = past_kv;
                read.chunk_bytes = self.policy.chunk_bytes.min(past_kv);
                read.deps = deps;
                read.acquire.push(MemOp { pool: self.staging_pool(layer), bytes: past_kv });
                deps = vec![self.push(read)];
            }
            if self.unified {
                kv_ready = deps;
            } else {
                let mut copy = Builder::new_task(
                    TaskKind::Copy,
                    Resource::link(Place::HOST, device),
                    Payload::KvCache,
                    layer,
                    j,
                    step,
                );
                copy.bytes = past_kv;
                copy.chunk_bytes = self.policy.chunk_bytes.min(past_kv);
                copy.pinned = kv_tier == Tier::Disk || self.kv_pinned;
                copy.deps = deps;
                copy.acquire.push(MemOp { pool: device, bytes: past_kv });
                if kv_tier == Tier::Disk {
                    copy.release.push(MemOp { pool: Place::HOST, bytes: past_kv });
                }
                kv_ready = vec![self.push(copy)];
            }
            release_kv = past_kv;
        }
        let mut task = self.compute_task(
            device,
            Op::Attention,
            (layer, j, step),
            qkv_flops + core_flops + out_flops,
            attn_bytes + kv_read,
        );
        task.deps.extend(hidden);
        task.deps.extend(weights_ready);
        task.deps.extend(kv_ready);
        if release_kv > 0 {
            task.release.push(MemOp { pool: device, bytes: release_kv });
        }
        if release_weights > 0 {
            task.release.push(MemOp { pool: device, bytes: release_weights });
        }
        let id = self.push(task);
        self.set_hidden(j, device, id);
        // Store the new tokens' KV where the cache lives.
        if kv_tier != Tier::Device {
            let mut store_deps = vec![id];
            if !self.unified {
                let mut store = Builder::new_task(
                    TaskKind::Copy,
                    Resource::link(device, Place::HOST),
                    Payload::KvCache,
                    layer,
                    j,
                    step,
                );
                store.bytes = new_kv;
                store.chunk_bytes = self.policy.chunk_bytes.min(new_kv);
                store.pinned = kv_tier == Tier::Disk || self.kv_pinned;
                store.deps = store_deps;
                store_deps = vec![self.push(store)];
            }
            if kv_tier == Tier::Disk {
                let mut write =
                    Builder::new_task(TaskKind::DiskWrite, Resource::DISK, Payload::KvCache, layer, j, step);
                write.bytes = new_kv;
                write.chunk_bytes = self.policy.chunk_bytes.min(new_kv);
                write.deps = store_deps;
                store_deps = vec![self.push(write)];
            }
            self.last_kv_store.insert((layer, j), store_deps[0]);
        }
        id
    }

    /// A layer computed where its weights live, on the host (llama.cpp's split).
    fn attention_on_host_layer(&mut self, step: u32, layer: u32, j: u32) -> TaskId {
        let hidden = self.hidden_on(Place::HOST, j, step, layer);
        let (qkv_flops, core_flops, out_flops) = self.attention_flops(step);
        let bytes = self.model.group_bytes(WeightGroup::Attention, self.policy.weight_dtype)
            + self.kv_bytes(self.context(step));
        let mut task =
            self.compute_task(Place::HOST, Op::Attention, (layer, j, step), qkv_flops + core_flops + out_flops, bytes);
        task.deps.extend(hidden);
        let id = self.push(task);
        self.set_hidden(j, Place::HOST, id);
        id
    }

    /// The devices the graph uses, ascending: every stage's device.
    fn devices(&self) -> Vec<u16> {
        let mut devices: Vec<u16> = self.policy.stage_list().iter().map(|s| s.device).collect();
        devices.sort_unstable();
        devices.dedup();
        devices
    }

    /// The resources tasks run on, in a fixed order: the disk, each device's links to
    /// and from the host, the links between consecutive stages, each device's compute,
    /// the host's compute. One device gives exactly today's five.
    fn resources(&self) -> Vec<ResourceSpec> {
        let policy = self.policy;
        let copy = |resource| ResourceSpec { resource, lanes: policy.copy_streams };
        let mut resources = vec![ResourceSpec { resource: Resource::DISK, lanes: policy.io_queue_depth }];
        let devices = self.devices();
        for &d in &devices {
            resources.push(copy(Resource::link(Place::HOST, Place::Device(d))));
            resources.push(copy(Resource::link(Place::Device(d), Place::HOST)));
        }
        for pair in policy.stage_list().windows(2) {
            resources.push(copy(Resource::link(Place::Device(pair[0].device), Place::Device(pair[1].device))));
        }
        for &d in &devices {
            resources.push(ResourceSpec { resource: Resource::compute(Place::Device(d)), lanes: 1 });
        }
        resources.push(ResourceSpec { resource: Resource::HOST_COMPUTE, lanes: 1 });
        // Any other link a task uses (none today) still gets a resource.
        for task in &self.tasks {
            if !resources.iter().any(|r| r.resource == task.resource) {
                resources.push(copy(task.resource));
            }
        }
        resources
    }

    /// Capacities and what stays resident in each pool for the whole run: one pool per
    /// stage device, then the host's.
    fn pools(&self, profile: &Profile) -> Vec<PoolSpec> {
        let policy = self.policy;
        let model = self.model;
        let wd = policy.weight_dtype;
        let devices = self.devices();
        // Per device: resident attention, MLP and KV bytes.
        let mut on_device = vec![[0u64; 3]; devices.len()];
        let mut host_weights = 0;
        let kv_per_layer = model.kv_bytes_per_token_per_layer(policy.kv_dtype)
            * self.workload.batch_size
            * self.workload.max_context();
        for place in &self.placements {
            let slot = devices.iter().position(|&d| d == place.device).unwrap_or(0);
            for (index, group, tier) in [(0, WeightGroup::Attention, place.attention), (1, WeightGroup::Mlp, place.mlp)]
            {
                match tier {
                    Tier::Device => on_device[slot][index] += model.group_bytes(group, wd),
                    Tier::Host => host_weights += model.group_bytes(group, wd),
                    Tier::Disk => {}
                }
            }
            if place.kv == Tier::Device {
                on_device[slot][2] += kv_per_layer;
            }
        }
        let hidden_states = self.workload.batch_size * self.workload.prompt_len * model.activation_bytes_per_token();
        let workspace = policy.micro_batch_size * self.workload.prompt_len * model.workspace_bytes_per_token()
            + model.attention_scratch_bytes(self.workload.prompt_len, self.workload.max_context());
        let embeddings = model.group_bytes(WeightGroup::Embeddings, wd);
        let head = model.group_bytes(WeightGroup::Head, wd);
        let on = |tier: Tier, wanted: Tier, bytes: u64| if tier == wanted { bytes } else { 0 };
        let mut pools: Vec<PoolSpec> = devices
            .iter()
            .zip(&on_device)
            .map(|(&d, resident)| {
                let first = d == policy.first_device();
                let last = d == policy.last_device();
                PoolSpec {
                    pool: Place::Device(d),
                    capacity_bytes: pool_capacity(profile, Place::Device(d)),
                    resident: vec![
                        ("resident attention weights".into(), resident[0]),
                        ("resident MLP weights".into(), resident[1]),
                        ("embeddings".into(), if first { on(policy.embeddings, Tier::Device, embeddings) } else { 0 }),
                        ("head".into(), if last { on(policy.head, Tier::Device, head) } else { 0 }),
                        ("resident KV cache".into(), resident[2]),
                        ("hidden states".into(), hidden_states),
                        ("workspace".into(), workspace),
                    ],
                }
            })
            .collect();
        let layers = model.num_layers;
        let host_computes = policy.compute_host_layers_on_host && (0..layers).any(|l| policy.layer_on_host(l))
            || policy.host_attention && policy.kv_cache.device < layers
            || policy.embeddings == Tier::Host
            || policy.head == Tier::Host;
        let host_workspace = if host_computes && !self.unified { workspace + hidden_states } else { 0 };
        pools.push(PoolSpec {
            pool: Place::HOST,
            capacity_bytes: pool_capacity(profile, Place::HOST),
            resident: vec![
                ("host-resident weights".into(), host_weights),
                ("embeddings".into(), on(policy.embeddings, Tier::Host, embeddings)),
                ("head".into(), on(policy.head, Tier::Host, head)),
                ("host KV cache".into(), policy.kv_cache.host * kv_per_layer),
                ("host workspace".into(), host_workspace),
            ],
        });
        pools
    }
}
