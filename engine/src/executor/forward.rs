//! The model's forward pass: embeddings, attention (fused, or split around host
//! attention), MLP and head on one micro-batch's activations at the place the task
//! runs, and the copies that move those activations between places.

use std::collections::HashMap;

use ferry_core::graph::{Op, Payload, Place, Task};
use ferry_core::model::WeightGroup;
use ferry_core::plan::Tier;

use super::{lock, Engine};
use crate::backend::AttentionShape;
use crate::kernels;
use crate::EngineError;

/// One micro-batch's activations at one place: the hidden state and the attention
/// intermediates (q/k/v after the projections, the attention output).
#[derive(Default)]
pub(super) struct Activations {
    hidden: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
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

/// The part of a micro-batch's activations a copy after `after` moves.
pub(super) fn activation_part(activations: &mut Activations, after: Option<Op>) -> &mut Vec<f32> {
    match after {
        Some(Op::AttnQkv) => &mut activations.qkv,
        Some(Op::AttnCore) => &mut activations.attn,
        _ => &mut activations.hidden,
    }
}

impl MicroBatch {
    pub(super) fn at(&mut self, place: Place) -> &mut Activations {
        self.places.entry(place).or_default()
    }
}

impl<'a> Engine<'a> {
    /// Moves a micro-batch's activations from one place to another over the task's
    /// link. What moves follows from the task before it: q/k/v after AttnQkv, the
    /// attention output after AttnCore, otherwise the hidden state.
    pub(super) fn copy_activations(&self, task: &Task) -> Result<(), EngineError> {
        let (from, to) =
            task.link_ends().ok_or_else(|| EngineError::Internal(format!("copy {} has no link", task.label())))?;
        let producer = task.deps.first().map(|&d| &self.graph.tasks[d as usize]);
        let after = producer.and_then(|p| match p.payload {
            Payload::Compute { op } => Some(op),
            _ => None,
        });
        let mut state = lock(&self.micro_batches[task.micro_batch as usize]);
        // Taken out while copying, so source and destination are borrowed apart.
        let mut source = state.places.remove(&from).unwrap_or_default();
        let src = activation_part(&mut source, after);
        let dst = activation_part(state.at(to), after);
        dst.resize(src.len(), 0.0);
        self.backend.copy_f32(dst, src);
        state.places.insert(from, source);
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
        }
    }

    pub(super) fn embed(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let h = self.spec.hidden_size as usize;
        let new = self.new_tokens(task.step);
        let past = self.past(task.step);
        let prompt_len = self.workload.prompt_len as usize;
        let table = self.resident_group(WeightGroup::Embeddings);
        let blocks = Engine::matrix(std::slice::from_ref(&table), 0);
        let (_, matrix) = blocks.first().ok_or_else(|| EngineError::Internal("no embeddings".into()))?;
        let row_bytes = kernels::element_bytes(matrix.dtype) * h;
        let tokens = lock(&self.tokens);
        let mut hidden = vec![0.0f32; self.policy.micro_batch_size as usize * new * h];
        for (i, seq) in self.sequences(task.micro_batch).enumerate() {
            for t in 0..new {
                // The token at position past + t: the prompt's, then the generated ones.
                let position = past + t;
                let token = if position < prompt_len {
                    self.options.prompts[seq][position]
                } else {
                    tokens[seq][position - prompt_len]
                } as usize;
                let src = &matrix.bytes[token * row_bytes..(token + 1) * row_bytes];
                self.backend.decode(matrix.dtype, src, &mut hidden[(i * new + t) * h..(i * new + t + 1) * h]);
            }
        }
        drop(tokens);
        lock(&self.micro_batches[task.micro_batch as usize]).at(side).hidden = hidden;
        Ok(())
    }

    pub(super) fn head(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let h = self.spec.hidden_size as usize;
        let vocab = self.spec.vocab_size as usize;
        let new = self.new_tokens(task.step);
        let mb = self.policy.micro_batch_size as usize;
        let head = self.resident_group(WeightGroup::Head);
        let norm = self.vector(std::slice::from_ref(&head), 0);
        let last_rows: Vec<f32> = {
            let mut state = lock(&self.micro_batches[task.micro_batch as usize]);
            let hidden = &state.at(side).hidden;
            (0..mb).flat_map(|i| hidden[((i + 1) * new - 1) * h..(i + 1) * new * h].iter().copied()).collect()
        };
        let mut normed = vec![0.0; mb * h];
        self.backend.rms_norm(&last_rows, &norm, self.spec.rms_norm_eps as f32, &mut normed);
        let logits = if self.spec.tie_word_embeddings {
            self.project(std::slice::from_ref(&self.resident_group(WeightGroup::Embeddings)), 0, &normed, mb, vocab)
        } else {
            self.project(std::slice::from_ref(&head), 1, &normed, mb, vocab)
        };
        let mut tokens = lock(&self.tokens);
        let mut all_logits = lock(&self.logits);
        if self.options.keep_logits && all_logits.len() <= task.step as usize {
            all_logits.resize(task.step as usize + 1, vec![Vec::new(); self.workload.batch_size as usize]);
        }
        for (i, seq) in self.sequences(task.micro_batch).enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            // A NaN has no maximum: the argmax of such a row would be an arbitrary token.
            if row.iter().any(|v| !v.is_finite()) {
                return Err(self.non_finite_logits(task, seq));
            }
            tokens[seq].push(self.backend.argmax(row));
            if self.options.keep_logits {
                all_logits[task.step as usize][seq] = row.to_vec();
            }
        }
        Ok(())
    }

    /// RMSNorm of the side's hidden state, read in place (no copy of the hidden state).
    pub(super) fn normed_hidden(&self, j: u32, side: Place, weight: &[f32], rows: usize) -> Vec<f32> {
        let mut state = lock(&self.micro_batches[j as usize]);
        let hidden = &state.at(side).hidden;
        let mut normed = vec![0.0; rows * self.spec.hidden_size as usize];
        self.backend.rms_norm(hidden, weight, self.spec.rms_norm_eps as f32, &mut normed);
        normed
    }

    /// Adds `delta` to the side's hidden state (the residual connection), and notes
    /// the first sub-layer after which a sequence's last row is no longer finite (the
    /// rows the next token comes from; checking only them keeps this cheap).
    pub(super) fn add_to_hidden(&self, task: &Task, side: Place, delta: &[f32], sublayer: &'static str) {
        let mut state = lock(&self.micro_batches[task.micro_batch as usize]);
        let hidden = &mut state.at(side).hidden;
        self.backend.add(hidden, delta);
        if state.first_non_finite.is_none() {
            let (h, new) = (self.spec.hidden_size as usize, self.new_tokens(task.step));
            let hidden = &state.at(side).hidden;
            let last_rows =
                (0..self.policy.micro_batch_size as usize).map(|i| &hidden[((i + 1) * new - 1) * h..(i + 1) * new * h]);
            if last_rows.flatten().any(|v| !v.is_finite()) {
                state.first_non_finite = Some((task.step, task.layer, sublayer));
            }
        }
    }

    /// The error for non-finite logits at `step`: where the hidden state first went
    /// non-finite, if it did (otherwise the head itself overflowed).
    fn non_finite_logits(&self, task: &Task, seq: usize) -> EngineError {
        let state = lock(&self.micro_batches[task.micro_batch as usize]);
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

    /// Norm, q/k/v projections and rotary embedding into the side's `qkv` buffer,
    /// laid out as [q: rows × h][k: rows × kv][v: rows × kv].
    pub(super) fn attn_qkv(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let spec = self.spec;
        let (h, kv, d) = (spec.hidden_size as usize, spec.kv_dim() as usize, spec.head_dim() as usize);
        let rows = self.policy.micro_batch_size as usize * self.new_tokens(task.step);
        let weights = self.weights(WeightGroup::Attention, task.layer, task.step, task.micro_batch)?;
        let normed = self.normed_hidden(task.micro_batch, side, &self.vector(&weights, 0), rows);
        // Tensor order: norm, q, [q bias], k, [k bias], v, [v bias], o.
        let bias = spec.qkv_bias;
        let (q_t, k_t, v_t) = if bias { (1, 3, 5) } else { (1, 2, 3) };
        let mut qkv = vec![0.0f32; rows * (h + 2 * kv)];
        {
            let (q, rest) = qkv.split_at_mut(rows * h);
            let (k, v) = rest.split_at_mut(rows * kv);
            self.project_into(&weights, q_t, &normed, rows, h, q);
            self.project_into(&weights, k_t, &normed, rows, kv, k);
            self.project_into(&weights, v_t, &normed, rows, kv, v);
            if bias {
                self.backend.add_bias(q, &self.vector(&weights, 2), h, 0);
                self.backend.add_bias(k, &self.vector(&weights, 4), kv, 0);
                self.backend.add_bias(v, &self.vector(&weights, 6), kv, 0);
            }
            let positions = self.positions(task.step);
            self.backend.rope(q, spec.num_heads as usize, d, &positions, spec.rope_theta as f32);
            self.backend.rope(k, spec.num_kv_heads as usize, d, &positions, spec.rope_theta as f32);
        }
        drop(normed);
        lock(&self.micro_batches[task.micro_batch as usize]).at(side).qkv = qkv;
        Ok(())
    }

    /// Attention over the cache where the plan keeps it; appends the new keys and values.
    pub(super) fn attn_core(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let spec = self.spec;
        let (h, kv, d) = (spec.hidden_size as usize, spec.kv_dim() as usize, spec.head_dim() as usize);
        let mb = self.policy.micro_batch_size as usize;
        let new = self.new_tokens(task.step);
        let past = self.past(task.step);
        let rows = mb * new;
        let kv_dtype = self.policy.kv_dtype;
        let row_bytes = self.kv_row_bytes();
        // Consumed here: taking it keeps no copy alive between steps.
        let qkv = { std::mem::take(&mut lock(&self.micro_batches[task.micro_batch as usize]).at(side).qkv) };
        let (q, rest) = qkv.split_at(rows * h);
        let (k_new, v_new) = rest.split_at(rows * kv);
        // New K and V in the cache dtype: [K: seq × new][V: seq × new].
        let mut new_kv = vec![0u8; 2 * rows * row_bytes];
        self.backend.encode(kv_dtype, k_new, &mut new_kv[..rows * row_bytes]);
        self.backend.encode(kv_dtype, v_new, &mut new_kv[rows * row_bytes..]);
        let key = (task.layer, task.micro_batch, task.step);
        let tier = self.placements[task.layer as usize].kv;
        let max = self.workload.max_context() as usize;
        // The whole visible cache as bytes: [K: seq × (past + new)][V: ...].
        let visible = past + new;
        let mut cache = vec![0u8; 2 * mb * visible * row_bytes];
        let mut place = |half: usize, seq: usize, pos: usize, bytes: &[u8]| {
            let at = ((half * mb + seq) * visible + pos) * row_bytes;
            cache[at..at + bytes.len()].copy_from_slice(bytes);
        };
        // Where the cache lives decides where past rows come from and where new rows go.
        let resident_region = match (tier, side) {
            (Tier::Device, _) => Some(&self.kv_device),
            (Tier::Host, Place::Host(_)) => Some(&self.kv_host),
            _ => None,
        };
        if let Some(regions) = resident_region {
            let mut slot = lock(&regions[self.kv_slot(task.layer, task.micro_batch)]);
            let region = slot.as_mut().ok_or_else(|| EngineError::Internal("KV region missing".into()))?;
            self.scatter_new(region.as_mut_slice(), &new_kv, past, new);
            let bytes = region.as_slice();
            for half in 0..2 {
                for seq in 0..mb {
                    let start = (half * mb + seq) * max * row_bytes;
                    place(half, seq, 0, &bytes[start..start + visible * row_bytes]);
                }
            }
        } else {
            let past_bytes = if past == 0 {
                Vec::new()
            } else if !side.is_device() {
                lock(&self.kv_staged)
                    .remove(&key)
                    .ok_or_else(|| EngineError::Internal(format!("KV of layer {} not staged", task.layer)))?
            } else {
                lock(&self.kv_loaded)
                    .remove(&key)
                    .ok_or_else(|| EngineError::Internal(format!("KV of layer {} not loaded", task.layer)))?
            };
            for half in 0..2 {
                for seq in 0..mb {
                    let p = (half * mb + seq) * past * row_bytes;
                    place(half, seq, 0, &past_bytes[p..p + past * row_bytes]);
                    let n = (half * mb + seq) * new * row_bytes;
                    place(half, seq, past, &new_kv[n..n + new * row_bytes]);
                }
            }
            lock(&self.kv_outbox).insert(key, new_kv);
        }
        let mut out = vec![0.0f32; rows * h];
        let elements = visible * kv;
        let mut keys = vec![0.0f32; elements];
        let mut values = vec![0.0f32; elements];
        for seq in 0..mb {
            let k_at = seq * visible * row_bytes;
            let v_at = (mb + seq) * visible * row_bytes;
            self.backend.decode(kv_dtype, &cache[k_at..k_at + visible * row_bytes], &mut keys);
            self.backend.decode(kv_dtype, &cache[v_at..v_at + visible * row_bytes], &mut values);
            let shape = AttentionShape {
                past,
                new,
                heads: spec.num_heads as usize,
                kv_heads: spec.num_kv_heads as usize,
                head_dim: d,
            };
            self.backend.attention(
                &q[seq * new * h..(seq + 1) * new * h],
                &keys,
                &values,
                shape,
                &mut out[seq * new * h..(seq + 1) * new * h],
            );
        }
        lock(&self.micro_batches[task.micro_batch as usize]).at(side).attn = out;
        Ok(())
    }

    /// Output projection and residual.
    pub(super) fn attn_out(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let spec = self.spec;
        let h = spec.hidden_size as usize;
        let rows = self.policy.micro_batch_size as usize * self.new_tokens(task.step);
        let weights = self.weights(WeightGroup::Attention, task.layer, task.step, task.micro_batch)?;
        let o_tensor = if spec.qkv_bias { 7 } else { 4 };
        let attn = { std::mem::take(&mut lock(&self.micro_batches[task.micro_batch as usize]).at(side).attn) };
        let projected = self.project(&weights, o_tensor, &attn, rows, h);
        drop(attn);
        self.add_to_hidden(task, side, &projected, "attention");
        self.release_weights_if_last(task, WeightGroup::Attention);
        Ok(())
    }

    pub(super) fn mlp(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let spec = self.spec;
        let (h, ffn) = (spec.hidden_size as usize, spec.intermediate_size as usize);
        let rows = self.policy.micro_batch_size as usize * self.new_tokens(task.step);
        let weights = self.weights(WeightGroup::Mlp, task.layer, task.step, task.micro_batch)?;
        let normed = self.normed_hidden(task.micro_batch, side, &self.vector(&weights, 0), rows);
        let mut gate = self.project(&weights, 1, &normed, rows, ffn);
        let up = self.project(&weights, 2, &normed, rows, ffn);
        drop(normed);
        self.backend.silu_mul(&mut gate, &up);
        drop(up);
        let down = self.project(&weights, 3, &gate, rows, h);
        drop(gate);
        self.add_to_hidden(task, side, &down, "mlp");
        self.release_weights_if_last(task, WeightGroup::Mlp);
        Ok(())
    }
}
