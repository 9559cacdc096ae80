//! The draft model's tasks (speculative decoding). The draft is resident on the first
//! stage's device with its own KV cache there, so a draft pass is compute only: embed,
//! each draft layer's attention and MLP, and its head, one after another, each a task
//! of the same kinds as the target's (priced alike) marked `draft`.
//!
//! Rounds (see `plan::speculation`): the prefill round starts with the draft's pass over
//! the prompt (filling its cache while the target's first weights load); every later
//! round starts, per micro-batch, with `draft_len` passes: the first over the last two
//! accepted positions (the one before may be a draft token the draft never processed,
//! when every guess was accepted), the others over the guess before. The target's
//! pass then waits for the last draft pass, as it waits for a head in plain decoding.

use super::builder::Builder;
use crate::graph::{Op, Payload, Place, Round, TaskId, NO_LAYER};
use crate::model::{ModelSpec, WeightGroup, WeightLayout};
use crate::plan::{Policy, Tier};

/// The draft as lowering sees it: its shape and the bytes of its weights.
pub(super) struct DraftShape {
    pub(super) model: ModelSpec,
    pub(super) layout: WeightLayout,
    /// Self-speculation: the target's own first layers, sharing its embeddings and
    /// head and every such layer the target keeps on the device.
    pub(super) is_self: bool,
}

impl DraftShape {
    pub(super) fn of(policy: &Policy, target: &ModelSpec) -> Option<DraftShape> {
        let speculation = policy.speculation.as_ref()?;
        let model = speculation.draft_model(target);
        let layout = WeightLayout::of(&model, &speculation.draft_formats(&policy.weight_format));
        Some(DraftShape { model, layout, is_self: speculation.is_self() })
    }
}

impl Builder<'_> {
    /// Emits micro-batch `j`'s draft passes for `round`: over the prompt in the
    /// prefill, else `drafted` passes of 2, 1, 1, … positions per sequence.
    pub(super) fn draft_passes(&mut self, round: Round, j: u32) {
        if round.step == 0 {
            self.draft_pass(round.step, j, round.rows as u64, round.rows as u64);
            return;
        }
        for pass in 0..round.drafted {
            let rows = if pass == 0 { 2 } else { 1 };
            // Context after the pass: the round's first row (the last accepted token)
            // is position `past`, guess i sits at `past + i`.
            let context = round.past as u64 + 1 + pass as u64;
            self.draft_pass(round.step, j, rows, context);
        }
    }

    /// One draft pass of micro-batch `j` over `rows` new positions per sequence,
    /// `context` positions in all after it.
    fn draft_pass(&mut self, step: u32, j: u32, rows: u64, context: u64) {
        let Some(draft) = self.draft.take() else { return };
        let device = Place::Device(self.policy.first_device());
        let mb = self.policy.micro_batch_size;
        let model = &draft.model;
        let all_rows = mb * rows;
        let mut previous: Vec<TaskId> = self.last_head[j as usize].into_iter().collect();
        let mut emit = |builder: &mut Builder, op: Op, layer: u32, flops: u64, bytes: u64, tokens: u64| {
            let mut task = builder.compute_task(device, op, (layer, j, step), flops, bytes);
            // A draft is resident on the device (`plan::speculation`).
            task.payload = Payload::Compute { op, draft: true, weights_off_device: false };
            task.tokens = tokens as u32;
            task.context = context as u32;
            task.deps = std::mem::take(&mut previous).into();
            let id = builder.push(task);
            previous = vec![id];
            id
        };
        emit(self, Op::Embed, NO_LAYER, 0, draft.layout.embedding_lookup(all_rows).bytes, all_rows);
        let kv_read = model.kv_bytes_per_token_per_layer(self.policy.kv_dtype) * mb * context;
        let (qkv_params, out_params) = model.attention_split_params();
        for layer in 0..model.num_layers as u32 {
            let core = mb * model.attention_core_flops(rows, context);
            let flops = 2 * all_rows * (qkv_params + out_params) + core;
            let bytes = draft.layout.bytes(WeightGroup::Attention, layer as u64) + kv_read;
            emit(self, Op::Attention, layer, flops, bytes, all_rows);
            let flops = model.projection_flops(WeightGroup::Mlp, all_rows);
            let bytes = model.mlp_bytes_read(all_rows, draft.layout.bytes(WeightGroup::Mlp, layer as u64));
            emit(self, Op::Mlp, layer, flops, bytes, all_rows);
        }
        // The guess comes from each sequence's last position only.
        let flops = model.projection_flops(WeightGroup::Head, mb);
        let head = emit(self, Op::Head, NO_LAYER, flops, draft.layout.bytes(WeightGroup::Head, 0), mb);
        self.last_head[j as usize] = Some(head);
        self.draft = Some(draft);
    }

    /// Device memory the draft holds for the whole run: its weights (self-speculation
    /// shares every group the target keeps on the device, and the embeddings and head)
    /// and its KV cache, with room for every position.
    pub(super) fn draft_resident(&self) -> Vec<(String, u64)> {
        let Some(draft) = &self.draft else { return Vec::new() };
        let model = &draft.model;
        let shared = |layer: u64, group: WeightGroup| {
            draft.is_self && self.placements[layer as usize].tier(group) == Tier::Device
        };
        let mut weights: u64 = (0..model.num_layers)
            .flat_map(|layer| WeightGroup::PER_LAYER.map(|group| (layer, group)))
            .filter(|&(layer, group)| !shared(layer, group))
            .map(|(layer, group)| draft.layout.bytes(group, layer))
            .sum();
        if !draft.is_self {
            weights += draft.layout.bytes(WeightGroup::Embeddings, 0) + draft.layout.bytes(WeightGroup::Head, 0);
        }
        let kv = model.num_layers
            * model.kv_bytes_per_token_per_layer(self.policy.kv_dtype)
            * self.workload.batch_size
            * self.policy.kv_positions(self.workload);
        let hidden = self.workload.batch_size * self.workload.prompt_len * model.activation_bytes_per_token();
        vec![("draft weights".into(), weights), ("draft KV cache".into(), kv), ("draft hidden states".into(), hidden)]
    }
}
