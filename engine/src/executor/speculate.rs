//! Speculative decoding in the engine: the draft's resident weights, KV cache and
//! activations; the positions each task of a speculative round processes (known only
//! at run time); greedy verification; and the measured acceptance.
//!
//! Each sequence advances by its own count (see `ferry_core::plan::speculation`):
//! after the target's pass over the last accepted token and the draft's guesses, the
//! round accepts the longest prefix of a sequence's guesses its target argmax agrees
//! with, then the target's token after it. The sequences of a micro-batch then start
//! the next round at different positions: every task's `Positions` holds one past per
//! sequence, and attention and KV stores take them (`Backend::attention_ragged`).
//! Rejected positions need no undo: the next round starts at the first of them and
//! overwrites their keys and values in both caches (attention never reads beyond a
//! sequence's own rows).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferry_core::graph::{Payload, Place, Task, NO_LAYER};

use super::weights::{GroupPart, Lands};
use ferry_core::model::{ModelSpec, WeightGroup};
use ferry_core::plan::{Draft, Speculation, Tier};
use serde::Serialize;

use super::forward::MicroBatch;
use super::weights::{group_code, Loaded};
use super::{lock, Engine};
use crate::backend::DeviceBuffer;
use crate::EngineError;

/// What a speculative run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpeculationReport {
    pub draft_len: u32,
    /// Rounds after the prefill until every sequence had its tokens.
    pub rounds: u32,
    /// Over every sequence's rounds until it had its tokens: draft tokens the target
    /// agreed with (each sequence on its own), and rounds in which it disagreed with one.
    pub agreed: u64,
    pub rejections: u64,
    /// Tokens the sequences' rounds yielded (accepted guesses + the target's own), over
    /// the sequence-rounds that yielded them.
    pub yielded: u64,
    pub yielding_rounds: u64,
    /// Micro-batch rounds whose sequences gained different counts (each advances by its
    /// own; the next round's positions differ between them).
    pub ragged_rounds: u64,
    /// α measured: agreed ÷ (agreed + rejections), the rate at which the target accepts
    /// one draft token (each token accepted until the first rejection).
    pub acceptance_rate: f64,
    /// Tokens per round and sequence, measured (yielded ÷ yielding rounds).
    pub tokens_per_round: f64,
}

/// The draft's memory: weights of its layers (shared with the target's where the
/// target keeps them on the device), its KV regions per (layer, micro-batch), and the
/// activations of each micro-batch.
pub(super) struct DraftState {
    pub(super) speculation: Speculation,
    /// The draft's shape (self-speculation: the target's, cut after its layers).
    pub(super) spec: ModelSpec,
    /// Its layers' weights, and for a separate model its embeddings and head (a
    /// self-speculating draft uses the target's).
    pub(super) weights: HashMap<(u8, u32), Arc<Loaded>>,
    pub(super) kv: Vec<Mutex<Option<DeviceBuffer>>>,
    pub(super) micro_batches: Vec<Mutex<MicroBatch>>,
    /// Per sequence: this round's guesses so far.
    pub(super) guesses: Mutex<Vec<Vec<u32>>>,
    /// Per sequence of micro-batch j: the target's first position (its last accepted
    /// token) in round (step, j).
    pub(super) round_start: Mutex<HashMap<(u32, u32), Vec<usize>>>,
    /// Per micro-batch: the last round that yielded tokens for it (every sequence has
    /// all its tokens after that; later rounds recompute the same positions and add
    /// nothing).
    pub(super) finished_at: Mutex<Vec<Option<u32>>>,
    pub(super) report: Mutex<SpeculationReport>,
    /// Per sequence: the tokens each round gained it, until it had them all.
    pub(super) yielded_by_round: Mutex<Vec<Vec<u32>>>,
}

/// The positions one task processes: `new` per sequence after `pasts[i]` earlier ones
/// for sequence i of its micro-batch (the same for all but in a speculative round after
/// the sequences accepted different counts).
#[derive(Debug, Clone)]
pub(super) struct Positions {
    pub(super) pasts: Vec<usize>,
    pub(super) new: usize,
}

impl Positions {
    pub(super) fn uniform(past: usize, new: usize, sequences: usize) -> Positions {
        Positions { pasts: vec![past; sequences], new }
    }

    /// The past every sequence shares, if they do.
    pub(super) fn common_past(&self) -> Option<usize> {
        let first = *self.pasts.first()?;
        self.pasts.iter().all(|&p| p == first).then_some(first)
    }

    /// The most positions any sequence has before this task's.
    pub(super) fn most_past(&self) -> usize {
        self.pasts.iter().copied().max().unwrap_or(0)
    }
}

pub(super) fn is_draft(task: &Task) -> bool {
    matches!(task.payload, Payload::Compute { draft: true, .. })
}

impl<'a> Engine<'a> {
    /// Reads the draft's weights (before the clock starts) and allocates its KV regions
    /// on the first device, as lowering accounted them (`schedule::draft`).
    pub(super) fn draft_state(&self, speculation: &Speculation) -> Result<DraftState, EngineError> {
        let device = Place::Device(self.policy.first_device());
        let (files, spec) = match (speculation.draft, self.options.draft_files.as_ref()) {
            (Draft::SelfLayers { layers }, _) => (self.files, ModelSpec { num_layers: layers, ..self.spec.clone() }),
            (Draft::Model, Some(files)) => (files, files.spec.clone()),
            (Draft::Model, None) => {
                return Err(EngineError::Mismatch(
                    "the plan speculates with a separate draft model but the run was given no draft files".into(),
                ))
            }
        };
        let mut weights = HashMap::new();
        let mut groups: Vec<(WeightGroup, u64)> =
            (0..spec.num_layers).flat_map(|layer| WeightGroup::PER_LAYER.map(|g| (g, layer))).collect();
        if !speculation.is_self() {
            groups.extend([(WeightGroup::Embeddings, 0), (WeightGroup::Head, 0)]);
        }
        for (group, layer) in groups {
            let code = if group.layer_slot().is_none() { NO_LAYER } else { layer as u32 };
            let key = (group_code(group), code);
            let shared = speculation.is_self() && self.weight_tier(group, layer) == Tier::Device;
            let loaded = match self.resident.get(&key) {
                Some(resident) if shared => Arc::clone(resident),
                _ => Arc::new(self.read_group_of(
                    files,
                    &spec,
                    group,
                    layer,
                    &GroupPart::Whole,
                    device,
                    Lands::Resident,
                )?),
            };
            weights.insert(key, loaded);
        }
        let micro_batches = self.policy.num_micro_batches as usize;
        let region = self.kv_layout_for(&spec).bytes();
        let mut kv = Vec::new();
        for _ in 0..spec.num_layers as usize * micro_batches {
            kv.push(Mutex::new(Some(self.backend.allocate(device, region)?)));
        }
        Ok(DraftState {
            speculation: speculation.clone(),
            spec,
            weights,
            kv,
            micro_batches: (0..micro_batches).map(|_| Mutex::new(MicroBatch::default())).collect(),
            guesses: Mutex::new(vec![Vec::new(); self.workload.batch_size as usize]),
            round_start: Mutex::new(HashMap::new()),
            finished_at: Mutex::new(vec![None; micro_batches]),
            report: Mutex::new(SpeculationReport { draft_len: speculation.draft_len, ..Default::default() }),
            yielded_by_round: Mutex::new(vec![Vec::new(); self.workload.batch_size as usize]),
        })
    }

    /// The shape a task computes with: the draft's or the target's.
    pub(super) fn spec_of(&self, task: &Task) -> &ModelSpec {
        match (&self.draft, is_draft(task)) {
            (Some(draft), true) => &draft.spec,
            _ => self.spec,
        }
    }

    /// Which elements a task's rotary embedding turns together: as its model's files
    /// store q and k.
    pub(super) fn rope_layout_of(&self, task: &Task) -> crate::backend::RopeLayout {
        match (&self.draft, self.options.draft_files.as_ref(), is_draft(task)) {
            (Some(draft), Some(files), true) if !draft.speculation.is_self() => files.rope_layout,
            _ => self.files.rope_layout,
        }
    }

    /// The embeddings or head a task uses: a separate draft's own, else the target's.
    pub(super) fn table(&self, task: &Task, group: WeightGroup) -> Result<Arc<Loaded>, EngineError> {
        match (&self.draft, is_draft(task)) {
            (Some(draft), true) if !draft.speculation.is_self() => draft
                .weights
                .get(&(group_code(group), NO_LAYER))
                .cloned()
                .ok_or_else(|| EngineError::Internal(format!("the draft's {} is not in memory", group.name()))),
            _ => Ok(self.resident_group(group)),
        }
    }

    fn draft(&self) -> Result<&DraftState, EngineError> {
        self.draft.as_ref().ok_or_else(|| EngineError::Internal("a draft task in a plan without a draft".into()))
    }

    /// The positions a compute task (or a KV store after it) processes. Plain decoding
    /// and the prefill: its round's. A verification: from each sequence's first
    /// position in its round, known once the round before was verified. A draft pass:
    /// the prompt in the prefill; then the two positions ending at the round's first,
    /// then one guess each.
    pub(super) fn positions_of(&self, task: &Task) -> Result<Positions, EngineError> {
        let round = &self.graph.rounds[task.step as usize];
        let sequences = self.policy.micro_batch_size as usize;
        let Some(draft) = &self.draft else {
            return Ok(Positions::uniform(round.past as usize, round.rows as usize, sequences));
        };
        if task.step == 0 {
            return Ok(Positions::uniform(0, round.rows as usize, sequences));
        }
        let starts = lock(&draft.round_start)
            .get(&(task.step, task.micro_batch))
            .cloned()
            .ok_or_else(|| EngineError::Internal(format!("{}: round {} has no start yet", task.label(), task.step)))?;
        if !is_draft(task) {
            return Ok(Positions { pasts: starts, new: round.rows as usize });
        }
        // Every sequence of a micro-batch has made the same number of guesses.
        let first_seq = self.sequences(task.micro_batch).start;
        let guessed = lock(&draft.guesses)[first_seq].len();
        Ok(if guessed == 0 {
            Positions { pasts: starts.iter().map(|s| s - 1).collect(), new: 2 }
        } else {
            Positions { pasts: starts.iter().map(|s| s + guessed).collect(), new: 1 }
        })
    }

    /// The token ids a task embeds, per sequence of its micro-batch, in row order.
    pub(super) fn input_tokens(&self, task: &Task, at: &Positions) -> Result<Vec<u32>, EngineError> {
        let prompt_len = self.workload.prompt_len as usize;
        let tokens = lock(&self.tokens);
        let guesses = self.draft.as_ref().map(|d| lock(&d.guesses));
        let mut ids = Vec::with_capacity(self.policy.micro_batch_size as usize * at.new);
        for (seq, &past) in self.sequences(task.micro_batch).zip(&at.pasts) {
            for position in past..past + at.new {
                let accepted = prompt_len + tokens[seq].len();
                ids.push(if position < prompt_len {
                    self.options.prompts[seq][position]
                } else if position < accepted {
                    tokens[seq][position - prompt_len]
                } else {
                    // A guess of this round: position `accepted` holds guess 0.
                    let guess = guesses.as_ref().and_then(|g| g[seq].get(position - accepted).copied());
                    guess.ok_or_else(|| {
                        EngineError::Internal(format!("{}: no token at position {position}", task.label()))
                    })?
                });
            }
        }
        Ok(ids)
    }

    /// The micro-batch state a task works on: the draft's or the target's.
    pub(super) fn activations_of(&self, task: &Task) -> &Mutex<MicroBatch> {
        match (&self.draft, is_draft(task)) {
            (Some(draft), true) => &draft.micro_batches[task.micro_batch as usize],
            _ => &self.micro_batches[task.micro_batch as usize],
        }
    }

    /// The resident weights of a draft layer.
    pub(super) fn draft_weights(&self, group: WeightGroup, layer: u32) -> Result<Vec<Arc<Loaded>>, EngineError> {
        let draft = self.draft()?;
        let loaded = draft.weights.get(&(group_code(group), layer)).ok_or_else(|| {
            EngineError::Internal(format!("the draft has no layer {layer} (it has {})", draft.spec.num_layers))
        })?;
        Ok(vec![Arc::clone(loaded)])
    }

    /// The draft's KV region of (layer, micro-batch).
    pub(super) fn draft_kv(&self, task: &Task) -> Result<&Mutex<Option<DeviceBuffer>>, EngineError> {
        let draft = self.draft()?;
        Ok(&draft.kv[task.layer as usize * self.policy.num_micro_batches as usize + task.micro_batch as usize])
    }

    /// A draft head's tokens: each sequence's guess (the prefill's is not needed: the
    /// target's first token follows the prompt).
    pub(super) fn take_guesses(&self, task: &Task, argmax: &[u32]) -> Result<(), EngineError> {
        if task.step == 0 {
            return Ok(());
        }
        let mut guesses = lock(&self.draft()?.guesses);
        for (seq, &token) in self.sequences(task.micro_batch).zip(argmax) {
            guesses[seq].push(token);
        }
        Ok(())
    }

    /// The target's tokens after a round: the prefill's first token, or the verified
    /// prefix of guesses and the target's token after it. `predicted[i]` holds each
    /// row's argmax, `logits[i]` its logits (kept when asked).
    pub(super) fn accept(&self, task: &Task, predicted: &[u32], logits: Vec<Vec<f32>>) -> Result<(), EngineError> {
        let gen_len = self.workload.gen_len as usize;
        let rows = predicted.len() / self.policy.micro_batch_size as usize;
        let sequences = self.sequences(task.micro_batch);
        let Some(draft) = &self.draft else {
            let one_each =
                sequences.enumerate().map(|(i, _)| vec![(predicted[i * rows + rows - 1], Some(i * rows + rows - 1))]);
            return self.append(task, one_each.collect(), logits);
        };
        let j = task.micro_batch as usize;
        // Each sequence's first position this round (a verification's pasts).
        let starts = if task.step == 0 {
            vec![self.workload.prompt_len as usize; sequences.len()]
        } else {
            self.positions_of(task)?.pasts
        };
        let mut guesses = lock(&draft.guesses);
        let had: Vec<usize> = {
            let tokens = lock(&self.tokens);
            sequences.clone().map(|seq| tokens[seq].len()).collect()
        };
        // Each sequence on its own: the guesses its target agrees with, then the
        // target's token after them, up to its last token.
        let (mut new_tokens, mut next_starts) = (Vec::new(), starts.clone());
        let (mut report, mut yielded_by_round) = (lock(&draft.report), lock(&draft.yielded_by_round));
        let (mut gains, mut all_done) = (Vec::new(), true);
        for (i, seq) in sequences.clone().enumerate() {
            let row = &predicted[i * rows..(i + 1) * rows];
            let agreed =
                if task.step == 0 { 0 } else { guesses[seq].iter().zip(row).take_while(|(g, p)| g == p).count() };
            let gained = (agreed + 1).min(gen_len - had[i]);
            new_tokens.push(
                (0..gained)
                    .map(|t| (if t < agreed { guesses[seq][t] } else { row[t] }, Some(i * rows + t)))
                    .collect::<Vec<_>>(),
            );
            all_done &= had[i] + gained >= gen_len;
            if gained == 0 {
                continue;
            }
            gains.push(gained);
            yielded_by_round[seq].push(gained as u32);
            if task.step > 0 {
                report.agreed += agreed as u64;
                report.rejections += u64::from(agreed < draft.speculation.draft_len as usize);
                report.yielded += gained as u64;
                report.yielding_rounds += 1;
            }
            // A sequence with all its tokens stays where it is: later rounds recompute
            // its positions (within the bounds the graph was lowered for), adding nothing.
            if task.step > 0 && had[i] + gained < gen_len {
                next_starts[i] = starts[i] + gained;
            }
        }
        if task.step > 0 && gains.iter().any(|&g| g != gains[0]) {
            report.ragged_rounds += 1;
        }
        drop((report, yielded_by_round));
        self.append(task, new_tokens, logits)?;
        let mut finished = lock(&draft.finished_at);
        if finished[j].is_none() && all_done {
            finished[j] = Some(task.step);
        }
        for seq in sequences {
            guesses[seq].clear();
        }
        lock(&draft.round_start).insert((task.step + 1, task.micro_batch), next_starts);
        drop((guesses, finished));
        self.note_round_done(task.step);
        Ok(())
    }

    /// Appends tokens (with the index of their logits row) to each sequence of the
    /// task's micro-batch.
    pub(super) fn append(
        &self,
        task: &Task,
        new_tokens: Vec<Vec<(u32, Option<usize>)>>,
        mut logits: Vec<Vec<f32>>,
    ) -> Result<(), EngineError> {
        let mut tokens = lock(&self.tokens);
        let mut all_logits = lock(&self.logits);
        for (seq, keep) in self.sequences(task.micro_batch).zip(new_tokens) {
            for (token, row) in keep {
                let index = tokens[seq].len();
                tokens[seq].push(token);
                if self.options.keep_logits {
                    if all_logits.len() <= index {
                        all_logits.resize(index + 1, vec![Vec::new(); self.workload.batch_size as usize]);
                    }
                    if let Some(row) = row.filter(|&r| r < logits.len()) {
                        all_logits[index][seq] = std::mem::take(&mut logits[row]);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether every micro-batch has its tokens: the rounds after `step` need not run.
    pub(super) fn finished_after(&self, step: u32) -> bool {
        self.draft.as_ref().is_some_and(|d| lock(&d.finished_at).iter().all(|f| f.is_some_and(|s| s <= step)))
    }

    /// The measured figures, once the run is over.
    pub(super) fn speculation_report(&self, rounds: u32) -> Option<SpeculationReport> {
        let draft = self.draft.as_ref()?;
        let mut report = lock(&draft.report).clone();
        report.rounds = rounds;
        let trials = report.agreed + report.rejections;
        report.acceptance_rate = if trials == 0 { 0.0 } else { report.agreed as f64 / trials as f64 };
        report.tokens_per_round =
            if report.yielding_rounds == 0 { 0.0 } else { report.yielded as f64 / report.yielding_rounds as f64 };
        Some(report)
    }
}
