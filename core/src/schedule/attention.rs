//! Attention of one (layer, micro-batch, step), with the KV cache on any tier: fused
//! on the layer's device, split around FlexGen's host attention (projections on the
//! device, attention where the cache is), or on the host for a host-computed layer.
//! Task emission order is program order; changing it changes every prediction.

use super::builder::Builder;
use crate::graph::{Deps, MemOp, Op, Payload, Place, Resource, Task, TaskId, TaskKind};
use crate::model::WeightGroup;
use crate::plan::Tier;

/// What the attention of one visit waits for and frees.
pub(super) struct AttentionInputs<'t> {
    /// Tasks that bring the layer's attention weights in.
    pub weights_ready: &'t [TaskId],
    /// Streamed weight bytes this task frees on the device (the visit's last consumer).
    pub release_weights: u64,
    /// The double-buffering gate for KV loads.
    pub kv_gate: &'t [TaskId],
}

impl Builder<'_> {
    /// Attention of a device-computed layer; returns the task after which the hidden
    /// state is updated on the device.
    pub(super) fn attention(&mut self, step: u32, layer: u32, j: u32, inputs: &AttentionInputs) -> TaskId {
        let kv_tier = self.kv_tier(layer);
        if self.policy.host_attention && kv_tier != Tier::Device && !self.unified(layer) {
            self.host_attention(step, layer, j, inputs)
        } else {
            self.device_attention(step, layer, j, inputs)
        }
    }

    /// A KV-cache transfer of `bytes` for (layer, micro-batch, step), in chunk-sized requests.
    fn kv_transfer(&self, kind: TaskKind, resource: Resource, (layer, j, step): (u32, u32, u32), bytes: u64) -> Task {
        let mut task = Builder::new_task(kind, resource, Payload::KvCache, layer, j, step);
        task.bytes = bytes;
        task.chunk_bytes = Task::request_bytes(self.policy.chunk_bytes.min(bytes));
        task
    }

    /// An activation copy of `bytes` over `from → to`, one request, from pinned buffers.
    fn activation_copy(from: Place, to: Place, (layer, j, step): (u32, u32, u32), bytes: u64) -> Task {
        let mut task =
            Builder::new_task(TaskKind::Copy, Resource::link(from, to), Payload::Activations, layer, j, step);
        task.bytes = bytes;
        task.chunk_bytes = Task::request_bytes(bytes);
        task.pinned = true;
        task
    }

    /// FlexGen's CPU delegation: projections on the device, attention where the KV is.
    fn host_attention(&mut self, step: u32, layer: u32, j: u32, inputs: &AttentionInputs) -> TaskId {
        let at = (layer, j, step);
        let device = self.device_of(layer);
        let kv_tier = self.kv_tier(layer);
        let past_kv = self.kv_bytes(self.context() - self.new_tokens());
        let attn_bytes = self.layout.bytes(WeightGroup::Attention, layer as u64);
        let (qkv_flops, core_flops, out_flops) = self.attention_flops();
        let hidden = self.hidden_on(device, j, step, layer);
        let (qkv_params, _) = self.model.attention_split_params();
        let qkv_share = attn_bytes * qkv_params / self.model.params().attention_per_layer.max(1);
        let mut qkv = self.compute_task(device, Op::AttnQkv, at, qkv_flops, qkv_share);
        qkv.deps.extend(hidden);
        qkv.deps.extend_from_slice(inputs.weights_ready);
        let qkv_id = self.push(qkv);
        let rows = self.rows();
        let qkv_bytes = rows * 4 * (self.model.q_dim() + 2 * self.model.kv_dim());
        let host = self.host_of(layer);
        let mut down = Builder::activation_copy(device, host, at, qkv_bytes);
        down.deps.push(qkv_id);
        let down_id = self.push(down);
        let kv_read = self.kv_bytes(self.context());
        let mut core = self.compute_task(host, Op::AttnCore, at, core_flops, kv_read);
        core.deps.push(down_id);
        if kv_tier == Tier::Disk && past_kv > 0 {
            let mut read = self.kv_transfer(TaskKind::DiskRead, self.disk_of(layer), at, past_kv);
            read.deps = Deps::from_slice(inputs.kv_gate);
            read.deps.extend(self.last_kv_store.get(&(layer, j)).copied());
            read.acquire.push(MemOp { pool: host, bytes: past_kv });
            core.deps.push(self.push(read));
            core.release.push(MemOp { pool: host, bytes: past_kv });
        }
        let core_id = self.push(core);
        if kv_tier == Tier::Disk {
            let new_kv = self.kv_bytes(self.new_tokens());
            let mut write = self.kv_transfer(TaskKind::DiskWrite, self.disk_of(layer), at, new_kv);
            write.deps.push(core_id);
            let write_id = self.push(write);
            self.last_kv_store.insert((layer, j), write_id);
        }
        // The attention output: heads × head width per row.
        let mut up = Builder::activation_copy(host, device, at, rows * 4 * self.model.q_dim());
        up.deps.push(core_id);
        let up_id = self.push(up);
        let mut out = self.compute_task(device, Op::AttnOut, at, out_flops, attn_bytes - qkv_share);
        out.deps.push(up_id);
        out.deps.push(qkv_id);
        if inputs.release_weights > 0 {
            out.release.push(MemOp { pool: device, bytes: inputs.release_weights });
        }
        let out_id = self.push(out);
        self.set_hidden(j, device, out_id);
        out_id
    }

    /// Attention on the layer's device, bringing past KV in if it lives elsewhere and
    /// storing the new tokens' KV back where the cache lives.
    fn device_attention(&mut self, step: u32, layer: u32, j: u32, inputs: &AttentionInputs) -> TaskId {
        let device = self.device_of(layer);
        let attn_bytes = self.layout.bytes(WeightGroup::Attention, layer as u64);
        let (qkv_flops, core_flops, out_flops) = self.attention_flops();
        let hidden = self.hidden_on(device, j, step, layer);
        let (kv_ready, release_kv) = self.load_past_kv(step, layer, j, inputs.kv_gate);
        let kv_read = self.kv_bytes(self.context());
        let flops = qkv_flops + core_flops + out_flops;
        let mut task = self.compute_task(device, Op::Attention, (layer, j, step), flops, attn_bytes + kv_read);
        task.deps.extend(hidden);
        task.deps.extend_from_slice(inputs.weights_ready);
        task.deps.extend(kv_ready);
        if release_kv > 0 {
            task.release.push(MemOp { pool: device, bytes: release_kv });
        }
        if inputs.release_weights > 0 {
            task.release.push(MemOp { pool: device, bytes: inputs.release_weights });
        }
        let id = self.push(task);
        self.set_hidden(j, device, id);
        self.store_new_kv(step, layer, j, id);
        id
    }

    /// Loads of the past KV of a cache that is not on the layer's device: a disk read
    /// (into host staging, or the device on unified memory) and a copy up. Returns what
    /// attention waits for and the device bytes it frees afterwards.
    fn load_past_kv(&mut self, step: u32, layer: u32, j: u32, kv_gate: &[TaskId]) -> (Vec<TaskId>, u64) {
        let at = (layer, j, step);
        let kv_tier = self.kv_tier(layer);
        let past_kv = self.kv_bytes(self.context() - self.new_tokens());
        if kv_tier == Tier::Device || past_kv == 0 {
            return (Vec::new(), 0);
        }
        let device = self.device_of(layer);
        let mut deps = kv_gate.to_vec();
        deps.extend(self.last_kv_store.get(&(layer, j)));
        if kv_tier == Tier::Disk {
            let mut read = self.kv_transfer(TaskKind::DiskRead, self.disk_of(layer), at, past_kv);
            read.deps = deps.into();
            read.acquire.push(MemOp { pool: self.staging_pool(layer), bytes: past_kv });
            deps = vec![self.push(read)];
        }
        if self.unified(layer) {
            return (deps, past_kv);
        }
        let host = self.host_of(layer);
        let mut copy = self.kv_transfer(TaskKind::Copy, Resource::link(host, device), at, past_kv);
        copy.pinned = kv_tier == Tier::Disk || self.kv_pinned;
        copy.deps = deps.into();
        copy.acquire.push(MemOp { pool: device, bytes: past_kv });
        if kv_tier == Tier::Disk {
            copy.release.push(MemOp { pool: host, bytes: past_kv });
        }
        (vec![self.push(copy)], past_kv)
    }

    /// Stores the new tokens' KV where the cache lives (a copy down, a disk write), after
    /// the attention task `after`; the next load of this cache waits for the last of them.
    fn store_new_kv(&mut self, step: u32, layer: u32, j: u32, after: TaskId) {
        let kv_tier = self.kv_tier(layer);
        if kv_tier == Tier::Device {
            return;
        }
        let at = (layer, j, step);
        let new_kv = self.kv_bytes(self.new_tokens());
        let mut store_deps = vec![after];
        if !self.unified(layer) {
            let link = Resource::link(self.device_of(layer), self.host_of(layer));
            let mut store = self.kv_transfer(TaskKind::Copy, link, at, new_kv);
            store.pinned = kv_tier == Tier::Disk || self.kv_pinned;
            store.deps = store_deps.into();
            store_deps = vec![self.push(store)];
        }
        if kv_tier == Tier::Disk {
            let mut write = self.kv_transfer(TaskKind::DiskWrite, self.disk_of(layer), at, new_kv);
            write.deps = store_deps.into();
            store_deps = vec![self.push(write)];
        }
        self.last_kv_store.insert((layer, j), store_deps[0]);
    }

    /// A layer computed where its weights live, on the host (llama.cpp's split).
    pub(super) fn attention_on_host_layer(&mut self, step: u32, layer: u32, j: u32) -> TaskId {
        let host = self.host_of(layer);
        let hidden = self.hidden_on(host, j, step, layer);
        let (qkv_flops, core_flops, out_flops) = self.attention_flops();
        let bytes = self.layout.bytes(WeightGroup::Attention, layer as u64) + self.kv_bytes(self.context());
        let flops = qkv_flops + core_flops + out_flops;
        let mut task = self.compute_task(host, Op::Attention, (layer, j, step), flops, bytes);
        task.deps.extend(hidden);
        let id = self.push(task);
        self.set_hidden(j, host, id);
        id
    }
}
