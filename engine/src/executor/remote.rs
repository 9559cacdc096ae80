//! The executor's side of stages over TCP (`crate::stages`): which tasks this process
//! runs, what it announces when one ends (the activations a copy carries to another
//! machine, a head's tokens), and what an announcement from another machine installs.

use ferry_core::graph::{Op, Payload, Place, Task, TaskGraph};
use ferry_core::model::WeightGroup;

use super::{lock, Engine};
use crate::backend::DeviceBuffer;
use crate::stages::wire::{Carried, Message};
use crate::stages::{LocalView, Network};
use crate::EngineError;

/// This process's part of a run over several machines.
pub(super) struct NetView<'a> {
    pub network: &'a Network,
    pub view: &'a LocalView,
}

/// An announcement received, made ready off the scheduler's thread.
pub(super) enum Arrival {
    Nothing,
    /// Activation parts, already at the place the copy lands.
    Activations(Vec<DeviceBuffer>),
    Tokens {
        tokens: Vec<u32>,
        logits: Vec<Vec<f32>>,
    },
}

impl<'a> Engine<'a> {
    /// Whether this process runs task `id` (every task, without a network).
    pub(super) fn owns(&self, id: u32) -> bool {
        self.net.as_ref().is_none_or(|n| n.view.owned[id as usize])
    }

    /// Whether this process waits to hear of another machine's task `id`.
    pub(super) fn awaits(&self, id: u32) -> bool {
        self.net.as_ref().is_some_and(|n| n.view.awaited[id as usize])
    }

    /// Whether a place's memory is this process's (every place, without a network).
    pub(super) fn is_local(&self, place: Place) -> bool {
        self.net.as_ref().is_none_or(|n| n.network.ownership.host_of(place) == n.network.ownership.me)
    }

    /// Whether a weight group's resident copy lives on this machine: the host of the
    /// device it belongs to (embeddings: the first stage's, head: the last's).
    pub(super) fn holds_group(&self, group: WeightGroup, layer: u32) -> bool {
        let device = match group {
            WeightGroup::Embeddings => Place::Device(self.policy.first_device()),
            WeightGroup::Head => Place::Device(self.policy.last_device()),
            _ => self.layer_device(layer),
        };
        self.is_local(device)
    }

    /// Whether an activation copy leaves this machine.
    pub(super) fn crosses_machines(&self, task: &Task) -> bool {
        task.link_ends().is_some_and(|(from, to)| self.is_local(from) != self.is_local(to))
    }

    /// A copy to another machine: the parts it moves, sent to the processes waiting on
    /// it (the copy is done here when they are on the wire).
    pub(super) fn send_activations(&self, task: &Task, id: u32) -> Result<(), EngineError> {
        let (from, _) =
            task.link_ends().ok_or_else(|| EngineError::Internal(format!("{} has no link", task.label())))?;
        let after = self.copied_after(task);
        let mut parts = Vec::new();
        {
            let mut state = lock(&self.micro_batches[task.micro_batch as usize]);
            for part in super::forward::activation_parts(state.at(from), after) {
                let buffer = part.as_ref().ok_or_else(|| {
                    EngineError::Internal(format!("{}: no activations to send at the place it runs", task.label()))
                })?;
                parts.push(self.backend.download_f32(buffer)?);
            }
        }
        self.send(id, Carried::Activations(parts))
    }

    /// After task `id` ran here: tells the processes waiting on it.
    pub(super) fn announce(&self, task: &Task, id: u32) -> Result<(), EngineError> {
        let Some(net) = &self.net else { return Ok(()) };
        if net.view.observers[id as usize].is_empty() || self.crosses_machines(task) {
            return Ok(());
        }
        let carried = match task.payload {
            Payload::Compute { op: Op::Head, .. } => self.head_tokens(task),
            _ => Carried::Nothing,
        };
        self.send(id, carried)
    }

    fn send(&self, id: u32, carried: Carried) -> Result<(), EngineError> {
        let Some(net) = &self.net else { return Ok(()) };
        let message = Message::Done { task: id, carried };
        for &host in &net.view.observers[id as usize] {
            net.network.peer(host)?.send(&message)?;
        }
        Ok(())
    }

    /// The token (and logits) each sequence of a head's micro-batch got at its step.
    fn head_tokens(&self, task: &Task) -> Carried {
        let tokens = lock(&self.tokens);
        let logits = lock(&self.logits);
        let index = task.step as usize;
        let mut out = Carried::Tokens { tokens: Vec::new(), logits: Vec::new() };
        if let Carried::Tokens { tokens: t, logits: l } = &mut out {
            for seq in self.sequences(task.micro_batch) {
                t.extend(tokens[seq].get(index).copied());
                if self.options.keep_logits {
                    l.push(logits.get(index).and_then(|row| row.get(seq)).cloned().unwrap_or_default());
                }
            }
        }
        out
    }

    /// An announcement as it will be installed: activations uploaded to the place the
    /// copy lands (on the reader's thread, not the scheduler's).
    pub(super) fn receive(&self, id: u32, carried: Carried) -> Result<Arrival, EngineError> {
        let task = self.graph.tasks.get(id as usize).ok_or_else(|| {
            EngineError::Network(format!("another stage process announced task {id}, which this graph lacks"))
        })?;
        Ok(match carried {
            Carried::Nothing => Arrival::Nothing,
            Carried::Tokens { tokens, logits } => Arrival::Tokens { tokens, logits },
            Carried::Activations(parts) => {
                let (_, to) = task.link_ends().ok_or_else(|| {
                    EngineError::Network(format!("activations arrived for {}, which is no copy", task.label()))
                })?;
                let mut buffers = Vec::with_capacity(parts.len());
                for part in parts {
                    let mut bytes = crate::memory::Buffer::new(part.len() * 4)
                        .map_err(|e| EngineError::io(std::path::Path::new("activation buffer"), e))?;
                    bytes.as_f32_mut().copy_from_slice(&part);
                    buffers.push(self.backend.adopt(to, bytes)?);
                }
                Arrival::Activations(buffers)
            }
        })
    }

    /// Puts what another machine's task `id` produced where this process's tasks read it.
    pub(super) fn install(&self, id: u32, arrival: Arrival) -> Result<(), EngineError> {
        let task = &self.graph.tasks[id as usize];
        match arrival {
            Arrival::Nothing => Ok(()),
            Arrival::Activations(buffers) => {
                let (_, to) = task.link_ends().ok_or_else(|| EngineError::Internal("no link".into()))?;
                let after = self.copied_after(task);
                let mut state = lock(&self.micro_batches[task.micro_batch as usize]);
                let parts = super::forward::activation_parts(state.at(to), after);
                if parts.len() != buffers.len() {
                    return Err(EngineError::Network(format!(
                        "{}: {} activation parts arrived, {} expected",
                        task.label(),
                        buffers.len(),
                        parts.len()
                    )));
                }
                for (part, buffer) in parts.into_iter().zip(buffers) {
                    *part = Some(buffer);
                }
                Ok(())
            }
            Arrival::Tokens { tokens, mut logits } => {
                let sequences = self.sequences(task.micro_batch);
                if tokens.len() != sequences.len() {
                    return Err(EngineError::Network(format!(
                        "{}: {} tokens arrived for {} sequences",
                        task.label(),
                        tokens.len(),
                        sequences.len()
                    )));
                }
                logits.resize(tokens.len(), Vec::new());
                let new: Vec<Vec<(u32, Option<usize>)>> =
                    tokens.iter().enumerate().map(|(i, &t)| vec![(t, Some(i))]).collect();
                self.append(task, new, logits)
            }
        }
    }

    /// The operation whose output a copy moves (q/k/v after AttnQkv, the attention
    /// output after AttnCore, else the hidden state).
    pub(super) fn copied_after(&self, task: &Task) -> Option<Op> {
        let producer = task.deps.first().map(|&d| &self.graph.tasks[d as usize]);
        producer.and_then(|p| match p.payload {
            Payload::Compute { op, .. } => Some(op),
            _ => None,
        })
    }
}

/// The head's trace over every process: each task's span from the process that ran
/// it; a copy to another machine ends when its activations arrived there (its sender
/// finished writing them to the socket before).
pub(super) fn merge_stage_reports(
    graph: &TaskGraph,
    spans: &mut [ferry_core::trace::Span],
    reports: &[crate::stages::wire::StageReport],
    arrivals: &[(u32, u64)],
) {
    use ferry_core::trace::Span;
    for report in reports {
        for &(task, lane, start_ns, end_ns) in &report.spans {
            if let Some(span) = spans.get_mut(task as usize) {
                *span = Span { task, lane, start_ns, end_ns };
            }
        }
    }
    let every_arrival = reports.iter().flat_map(|r| r.arrivals.iter()).chain(arrivals);
    for &(task, at_ns) in every_arrival {
        let is_copy = graph.tasks.get(task as usize).is_some_and(|t| t.link_ends().is_some());
        if let (true, Some(span)) = (is_copy, spans.get_mut(task as usize)) {
            span.end_ns = span.end_ns.max(at_ns);
        }
    }
}
