//! The model's forward pass: embeddings, attention (fused, or split around host
//! attention), MLP and head on one micro-batch's activations at the place the task
//! runs, and the copies that move those activations between places.

use std::collections::HashMap;
use std::sync::Arc;

use ferry_core::graph::{Op, Place, Task};
use ferry_core::model::{Family, WeightGroup};
use ferry_core::plan::Tier;

use super::speculate::{is_draft, Positions};
use super::weights::Loaded;
use super::{lock, Engine};
use crate::backend::{DeviceBuffer, Rotary, WeightRef};
use crate::kernels::{self, Rows};
use crate::EngineError;

/// One micro-batch's activations at one place: the hidden state and the attention
/// intermediates (q, k, v after the projections; the attention output), f32 each.
#[derive(Default)]
pub(super) struct Activations {
    pub(super) hidden: Option<DeviceBuffer>,
    pub(super) q: Option<DeviceBuffer>,
    pub(super) k: Option<DeviceBuffer>,
    pub(super) v: Option<DeviceBuffer>,
    pub(super) attn: Option<DeviceBuffer>,
}

/// Per micro-batch state: its activations at every place that has held them. Only
/// the graph's copy tasks move them between places.
#[derive(Default)]
pub(super) struct MicroBatch {
    places: HashMap<Place, Activations>,
    /// Where the hidden state of a last token first went non-finite: (step, layer,
    /// sub-layer), for the error that non-finite logits raise.
    first_non_finite: Option<(u32, u32, &'static str)>,
}

/// The parts of a micro-batch's activations a copy after `after` moves.
pub(super) fn activation_parts(activations: &mut Activations, after: Option<Op>) -> Vec<&mut Option<DeviceBuffer>> {
    match after {
        Some(Op::AttnQkv) => vec![&mut activations.q, &mut activations.k, &mut activations.v],
        Some(Op::AttnCore) => vec![&mut activations.attn],
        _ => vec![&mut activations.hidden],
    }
}

impl MicroBatch {
    pub(super) fn at(&mut self, place: Place) -> &mut Activations {
        self.places.entry(place).or_default()
    }
}

fn missing(what: &str, task: &Task) -> EngineError {
    EngineError::Internal(format!("{}: no {what} at the place it runs", task.label()))
}

impl<'a> Engine<'a> {
    /// Moves a micro-batch's activations from one place to another over the task's
    /// link. What moves follows from the task before it: q/k/v after AttnQkv, the
    /// attention output after AttnCore, otherwise the hidden state.
    pub(super) fn copy_activations(&self, task: &Task) -> Result<(), EngineError> {
        let (from, to) =
            task.link_ends().ok_or_else(|| EngineError::Internal(format!("copy {} has no link", task.label())))?;
        let after = self.copied_after(task);
        let mut state = lock(&self.micro_batches[task.micro_batch as usize]);
        // Copied into fresh memory at the destination; the source stays where it is.
        let mut copies = Vec::new();
        for part in activation_parts(state.at(from), after) {
            let src = part.as_ref().ok_or_else(|| missing("activations to copy", task))?;
            let bytes = src.len_bytes();
            let mut dst = self.backend.scratch(to, bytes)?;
            self.backend.copy(src, 0, &mut dst, 0, bytes)?;
            copies.push(dst);
        }
        for (part, copy) in activation_parts(state.at(to), after).into_iter().zip(copies) {
            *part = Some(copy);
        }
        Ok(())
    }

    pub(super) fn compute(&self, task: &Task, op: Op, side: Place) -> Result<(), EngineError> {
        match op {
            Op::Embed => self.embed(task, side),
            Op::Head => self.head(task, side),
            Op::Attention => {
                self.attn_qkv(task, side)?;
                self.attn_core(task, side)?;
                self.attn_out(task, side)
            }
            Op::AttnQkv => self.attn_qkv(task, side),
            Op::AttnCore => self.attn_core(task, side),
            Op::AttnOut => self.attn_out(task, side),
            Op::Mlp => self.mlp(task, side),
            Op::Route => self.route_tokens(task, side),
        }
    }

    /// The weights a layer task multiplies by: the draft's resident ones, or the
    /// target's as its visit loaded them.
    pub(super) fn layer_weights(
        &self,
        task: &Task,
        group: WeightGroup,
    ) -> Result<Vec<std::sync::Arc<Loaded>>, EngineError> {
        if is_draft(task) {
            self.draft_weights(group, task.layer)
        } else {
            self.weights(group, task.layer, task.step, task.micro_batch)
        }
    }

    /// `count` rows of a micro-batch's product and the kernel they take. The prefill
    /// takes the kernel for its rows; a decoding or verification step of the target
    /// the one plain decoding's step takes, a product of the micro-batch's sequences.
    /// The few-row, GEMM and AMX kernels add in different orders (a row's last bits,
    /// and at a near-tie its token, follow the kernel), so without this a verification
    /// of k + 1 guesses per sequence could take another kernel than plain decoding and
    /// speculation could change a token (measured on AMX at the TinyLlama shape). The
    /// draft's passes take their own rows' kernel: its guesses decide how many tokens a
    /// round yields, never which. The cost model prices the same choice (`sim::cost`,
    /// `kernel_tokens`).
    pub(super) fn product_rows(&self, task: &Task, count: usize) -> Rows {
        if task.step == 0 || is_draft(task) {
            return Rows::all(count);
        }
        Rows { count, kernel_for: self.policy.micro_batch_size as usize }
    }

    /// `product_rows` for the rows routed to one expert: how many there are depends on
    /// what the step's other rows chose, so the target's decoding steps take the
    /// few-row kernels whatever their number (one expert's rows in a step are few).
    pub(super) fn expert_rows(&self, task: &Task, count: usize) -> Rows {
        if task.step == 0 || is_draft(task) {
            return Rows::all(count);
        }
        Rows { count, kernel_for: 1 }
    }

    /// f32 working memory for `elements` values at `place`.
    pub(super) fn activation(&self, place: Place, elements: usize) -> Result<DeviceBuffer, EngineError> {
        self.backend.scratch(place, elements * 4)
    }

    pub(super) fn embed(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let h = self.spec_of(task).hidden_size as usize;
        let at = self.positions_of(task)?;
        let mut ids = self.input_tokens(task, &at)?;
        let table = if self.policy.embeddings == Tier::Disk && !is_draft(task) {
            let rows = self.take_embedding_rows(task)?;
            ids = rows.rows_of(&ids)?;
            Arc::clone(rows.table())
        } else {
            self.table(task, WeightGroup::Embeddings)?
        };
        let table_ref = Engine::tensor(std::slice::from_ref(&table), 0)?;
        let mut hidden = self.activation(side, ids.len() * h)?;
        self.backend.embed(table_ref, &ids, &mut hidden)?;
        lock(self.activations_of(task)).at(side).hidden = Some(hidden);
        Ok(())
    }

    /// The rows of a micro-batch's hidden state its next tokens come from: each
    /// sequence's last of `new`.
    fn last_rows(&self, new: usize) -> Vec<usize> {
        (1..=self.policy.micro_batch_size as usize).map(|i| i * new - 1).collect()
    }

    /// The rows a head projects: each sequence's last, or for a verification every
    /// row (the target's token after each guess).
    fn head_rows(&self, task: &Task, at: &Positions) -> Vec<usize> {
        if !is_draft(task) && self.graph.rounds[task.step as usize].drafted > 0 {
            (0..self.policy.micro_batch_size as usize * at.new).collect()
        } else {
            self.last_rows(at.new)
        }
    }

    pub(super) fn head(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let spec = self.spec_of(task);
        let h = spec.hidden_size as usize;
        let vocab = spec.vocab_size as usize;
        let at = self.positions_of(task)?;
        let rows = self.head_rows(task, &at);
        let head = self.table(task, WeightGroup::Head)?;
        let norm = Engine::tensor(std::slice::from_ref(&head), 0)?;
        let mut last = self.activation(side, rows.len() * h)?;
        {
            let mut state = lock(self.activations_of(task));
            let hidden = state.at(side).hidden.as_ref().ok_or_else(|| missing("hidden state", task))?;
            self.backend.gather_rows(hidden, h, &rows, &mut last)?;
        }
        let mut normed = self.activation(side, rows.len() * h)?;
        self.backend.rms_norm(&last, norm, spec.rms_norm_eps as f32, &mut normed)?;
        let logits = if spec.tie_word_embeddings {
            let table = self.table(task, WeightGroup::Embeddings)?;
            self.project(std::slice::from_ref(&table), 0, &normed, self.product_rows(task, rows.len()), vocab, side)?
        } else {
            self.project(std::slice::from_ref(&head), 1, &normed, self.product_rows(task, rows.len()), vocab, side)?
        };
        let logits = self.backend.download_f32(&logits)?;
        let per_sequence = rows.len() / self.policy.micro_batch_size as usize;
        let mut predicted = Vec::with_capacity(rows.len());
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            // A NaN has no maximum: the argmax of such a row would be an arbitrary token.
            if row.iter().any(|v| !v.is_finite()) {
                return Err(self.non_finite_logits(task, self.sequences(task.micro_batch).start + i / per_sequence));
            }
            predicted.push(kernels::argmax(row));
        }
        if is_draft(task) {
            return self.take_guesses(task, &predicted);
        }
        let kept = if self.options.keep_logits {
            logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect()
        } else {
            Vec::new()
        };
        self.accept(task, &predicted, kept)
    }

    /// RMSNorm of the side's hidden state (read in place) into new memory.
    pub(super) fn normed_hidden(
        &self,
        task: &Task,
        side: Place,
        weight: WeightRef,
        rows: usize,
    ) -> Result<DeviceBuffer, EngineError> {
        let spec = self.spec_of(task);
        let mut normed = self.activation(side, rows * spec.hidden_size as usize)?;
        let mut state = lock(self.activations_of(task));
        let hidden = state.at(side).hidden.as_ref().ok_or_else(|| missing("hidden state", task))?;
        self.backend.rms_norm(hidden, weight, spec.rms_norm_eps as f32, &mut normed)?;
        Ok(normed)
    }

    /// Adds `delta` to the side's hidden state (the residual connection), and notes
    /// the first sub-layer after which a sequence's last row is no longer finite (the
    /// rows the next token comes from; checking only them keeps this cheap).
    pub(super) fn add_to_hidden(
        &self,
        task: &Task,
        side: Place,
        delta: &DeviceBuffer,
        sublayer: &'static str,
    ) -> Result<(), EngineError> {
        let new = self.positions_of(task)?.new;
        let mut state = lock(self.activations_of(task));
        let hidden = state.at(side).hidden.as_mut().ok_or_else(|| missing("hidden state", task))?;
        self.backend.add(hidden, delta)?;
        if state.first_non_finite.is_none() {
            let h = self.spec_of(task).hidden_size as usize;
            let hidden = state.at(side).hidden.as_ref().ok_or_else(|| missing("hidden state", task))?;
            if !self.backend.rows_finite(hidden, h, &self.last_rows(new))? {
                state.first_non_finite = Some((task.step, task.layer, sublayer));
            }
        }
        Ok(())
    }

    /// The error for non-finite logits at `step`: where the hidden state first went
    /// non-finite, if it did (otherwise the head itself overflowed).
    fn non_finite_logits(&self, task: &Task, seq: usize) -> EngineError {
        let state = lock(self.activations_of(task));
        let origin = match state.first_non_finite {
            Some((step, layer, sublayer)) => {
                format!("the hidden state first went non-finite in layer {layer} ({sublayer}) at step {step}")
            }
            None => "the hidden state is finite: the head overflowed".to_string(),
        };
        EngineError::BadWeights {
            file: self.files.dir.clone(),
            message: format!(
                "step {}: the logits of sequence {seq} are not finite (NaN or infinity); {origin}. \
                 The weights are out of range for this model's arithmetic",
                task.step
            ),
        }
    }

    /// Norm, q/k/v projections (with Qwen2's biases, or Qwen3's per-head norms) and
    /// rotary embedding into the side's q, k and v.
    pub(super) fn attn_qkv(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let spec = self.spec_of(task);
        let (q_dim, kv) = (spec.q_dim() as usize, spec.kv_dim() as usize);
        let rows = self.policy.micro_batch_size as usize * self.positions_of(task)?.new;
        let weights = self.layer_weights(task, WeightGroup::Attention)?;
        let normed = self.normed_hidden(task, side, Engine::tensor(&weights, 0)?, rows)?;
        // Tensor order: norm, q, [q bias], k, [k bias], v, [v bias], o, [q norm, k norm].
        let bias = spec.qkv_bias;
        let (q_t, k_t, v_t) = if bias { (1, 3, 5) } else { (1, 2, 3) };
        let mut q = self.project(&weights, q_t, &normed, self.product_rows(task, rows), q_dim, side)?;
        let mut k = self.project(&weights, k_t, &normed, self.product_rows(task, rows), kv, side)?;
        let mut v = self.project(&weights, v_t, &normed, self.product_rows(task, rows), kv, side)?;
        drop(normed);
        if bias {
            self.backend.add_bias(&mut q, Engine::tensor(&weights, 2)?, q_dim, 0)?;
            self.backend.add_bias(&mut k, Engine::tensor(&weights, 4)?, kv, 0)?;
            self.backend.add_bias(&mut v, Engine::tensor(&weights, 6)?, kv, 0)?;
        }
        if spec.family == Family::Qwen3 {
            // Qwen3: an RMSNorm over each head of q and of k before the rotation (each
            // row of the norm's weight is one head wide).
            q = self.head_norm(&q, Engine::tensor(&weights, 5)?, side, spec.rms_norm_eps)?;
            k = self.head_norm(&k, Engine::tensor(&weights, 6)?, side, spec.rms_norm_eps)?;
        }
        self.finish_qkv(task, side, q, k, v)
    }

    /// Each head of `x` normalised by `weight` (one head wide) into new memory.
    fn head_norm(
        &self,
        x: &DeviceBuffer,
        weight: WeightRef,
        side: Place,
        eps: f64,
    ) -> Result<DeviceBuffer, EngineError> {
        let mut out = self.backend.scratch(side, x.len_bytes())?;
        self.backend.rms_norm(x, weight, eps as f32, &mut out)?;
        Ok(out)
    }

    /// Rotary embedding of q and k, then q, k and v into the side's activations.
    fn finish_qkv(
        &self,
        task: &Task,
        side: Place,
        mut q: DeviceBuffer,
        mut k: DeviceBuffer,
        v: DeviceBuffer,
    ) -> Result<(), EngineError> {
        let spec = self.spec_of(task);
        let d = spec.head_dim() as usize;
        let at = self.positions_of(task)?;
        let positions = self.positions(&at);
        let frequencies = spec.rope_frequencies();
        let rotary = |heads: u64| Rotary {
            heads: heads as usize,
            head_dim: d,
            frequencies: &frequencies,
            layout: self.rope_layout_of(task),
        };
        self.backend.rope(&mut q, rotary(spec.num_heads), &positions)?;
        self.backend.rope(&mut k, rotary(spec.num_kv_heads), &positions)?;
        let mut state = lock(self.activations_of(task));
        let activations = state.at(side);
        (activations.q, activations.k, activations.v) = (Some(q), Some(k), Some(v));
        Ok(())
    }

    /// Output projection and residual.
    pub(super) fn attn_out(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let spec = self.spec_of(task);
        let h = spec.hidden_size as usize;
        let rows = self.policy.micro_batch_size as usize * self.positions_of(task)?.new;
        let weights = self.layer_weights(task, WeightGroup::Attention)?;
        let o_tensor = if spec.qkv_bias { 7 } else { 4 };
        let attn = lock(self.activations_of(task)).at(side).attn.take();
        let attn = attn.ok_or_else(|| missing("attention output", task))?;
        let projected = self.project(&weights, o_tensor, &attn, self.product_rows(task, rows), h, side)?;
        drop(attn);
        self.add_to_hidden(task, side, &projected, "attention")?;
        if !is_draft(task) {
            self.release_weights_if_last(task, WeightGroup::Attention);
        }
        Ok(())
    }

    pub(super) fn mlp(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let spec = self.spec_of(task);
        if spec.num_experts > 0 {
            return self.moe_mlp(task, side);
        }
        let (h, ffn) = (spec.hidden_size as usize, spec.intermediate_size as usize);
        let rows = self.policy.micro_batch_size as usize * self.positions_of(task)?.new;
        let weights = self.layer_weights(task, WeightGroup::Mlp)?;
        let normed = self.normed_hidden(task, side, Engine::tensor(&weights, 0)?, rows)?;
        let mut gate = self.project(&weights, 1, &normed, self.product_rows(task, rows), ffn, side)?;
        let up = self.project(&weights, 2, &normed, self.product_rows(task, rows), ffn, side)?;
        drop(normed);
        self.backend.silu_mul(&mut gate, &up)?;
        drop(up);
        let down = self.project(&weights, 3, &gate, self.product_rows(task, rows), h, side)?;
        drop(gate);
        self.add_to_hidden(task, side, &down, "mlp")?;
        if !is_draft(task) {
            self.release_weights_if_last(task, WeightGroup::Mlp);
        }
        Ok(())
    }
}
