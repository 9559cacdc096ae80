//! The scheduler: drives `ferry_core::dispatch::Dispatcher` (the simulator's rule)
//! from the calling thread, with one worker thread per lane of every resource, and
//! hands each task to the code that moves or computes its data. It knows tasks,
//! resources and pools; nothing of the model.

use std::collections::HashMap;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use ferry_core::dispatch::Dispatcher;
use ferry_core::graph::{Payload, Place, Task, TaskGraph, TaskKind};
use ferry_core::trace::Span;

use super::{lock, Engine};
use crate::memory::Recycler;
use crate::EngineError;

impl<'a> Engine<'a> {
    pub(super) fn execute_graph(&self) -> Result<Vec<Span>, EngineError> {
        let graph = self.graph;
        let count = graph.tasks.len();
        let mut dispatcher = Dispatcher::new(graph);
        let mut spans = vec![Span { task: 0, lane: 0, start_ns: 0, end_ns: 0 }; count];
        let mut failure: Option<EngineError> = None;
        let clock = Instant::now();

        std::thread::scope(|scope| {
            let (done_tx, done_rx) = mpsc::channel::<(u32, u32, u64, u64, Result<(), EngineError>)>();
            // One worker thread per lane of every resource, indexed like the graph's list.
            let mut senders: Vec<Vec<mpsc::Sender<u32>>> = Vec::new();
            'spawn: for spec in &graph.resources {
                let mut lanes = Vec::new();
                for lane in 0..spec.lanes.max(1) {
                    let (tx, rx) = mpsc::channel::<u32>();
                    lanes.push(tx);
                    let done = done_tx.clone();
                    let name = format!("ferry-{}-{lane}", graph.resource_label(spec.resource));
                    let spawned = std::thread::Builder::new().name(name.clone()).spawn_scoped(scope, move || {
                        while let Ok(id) = rx.recv() {
                            let start = clock.elapsed().as_nanos() as u64;
                            let result = self.execute(id);
                            let end = clock.elapsed().as_nanos() as u64;
                            if done.send((id, lane, start, end, result)).is_err() {
                                return;
                            }
                        }
                    });
                    // The system refusing a thread ends the run with an error, not a panic
                    // (nothing has been dispatched yet).
                    if let Err(e) = spawned {
                        failure = Some(EngineError::io(std::path::Path::new(&format!("thread {name}")), e));
                        break 'spawn;
                    }
                }
                senders.push(lanes);
            }
            drop(done_tx);
            // Freed weight buffers may be kept mapped only while their device's pool has
            // room for them beside everything the graph accounts.
            let budgets = DeviceBudgets::new(graph, &self.recyclers);
            budgets.refresh(&dispatcher);
            while !dispatcher.is_finished() {
                if failure.is_none() {
                    let mut room = budgets.room(&dispatcher);
                    dispatcher.dispatch(|id, lane, r| {
                        let task = &graph.tasks[id as usize];
                        // A weight read takes a kept buffer before the limit shrinks by its
                        // bytes; the rest are unmapped now if they no longer fit.
                        if let (TaskKind::DiskRead, Payload::Weights { group }) = (task.kind, task.payload) {
                            if !Engine::lands_on_host(task) {
                                if let Some(buffer) = self.recycler(task.layer).take_kept(task.bytes as usize) {
                                    lock(&self.reserved).insert(self.key(task, group), buffer);
                                }
                            }
                        }
                        budgets.acquired(task, &mut room);
                        if senders[r][lane as usize].send(id).is_err() {
                            failure.get_or_insert(EngineError::Internal("a worker stopped".into()));
                        }
                    });
                }
                if dispatcher.running() == 0 {
                    if failure.is_none() {
                        failure = Some(EngineError::Deadlock(dispatcher.stall().message));
                    }
                    break;
                }
                let Ok((id, lane, start, end, result)) = done_rx.recv() else {
                    failure.get_or_insert(EngineError::Internal("workers vanished".into()));
                    break;
                };
                spans[id as usize] = Span { task: id, lane, start_ns: start, end_ns: end };
                dispatcher.complete(id, lane);
                budgets.refresh(&dispatcher);
                if let Err(e) = result {
                    failure.get_or_insert(e);
                }
                let finished = dispatcher.finished();
                if let Some(progress) = &self.options.progress {
                    if finished.is_multiple_of(64) || finished == count {
                        progress(finished, count);
                    }
                }
            }
            // Dropping the senders ends the workers.
            drop(senders);
        });
        match failure {
            Some(e) => Err(e),
            None => Ok(spans),
        }
    }

    pub(super) fn execute(&self, id: u32) -> Result<(), EngineError> {
        let task = &self.graph.tasks[id as usize];
        // A speculative run that has every token skips the rounds lowered beyond.
        if self.skipped(task) {
            return Ok(());
        }
        let to_device = task.link_ends().is_some_and(|(_, to)| to.is_device());
        match (task.kind, task.payload) {
            (TaskKind::DiskRead, Payload::Weights { group }) => self.load_weights_from_disk(task, group),
            (TaskKind::Copy, Payload::Weights { group }) if to_device => self.copy_weights_to_device(task, group),
            (TaskKind::DiskRead, Payload::KvCache) => self.read_kv(task),
            (TaskKind::Copy, Payload::KvCache) if to_device => self.copy_kv_to_device(task),
            (TaskKind::Copy, Payload::KvCache) => self.store_kv_to_host(task),
            (TaskKind::DiskWrite, Payload::KvCache) => self.write_kv(task),
            (TaskKind::Copy, Payload::Activations) => self.copy_activations(task),
            (TaskKind::Compute, Payload::Compute { op, .. }) => match task.compute_place() {
                Some(place) => self.compute(task, op, place),
                None => Err(EngineError::Internal(format!("compute task {} has no place", task.label()))),
            },
            (kind, payload) => Err(EngineError::Internal(format!("no executor for {kind:?} of {payload:?}"))),
        }
    }
}
/// The device pools' budgets as the recyclers see them: each device's kept buffers
/// may use only what its pool has free beside the graph's accounting.
pub(super) struct DeviceBudgets<'e> {
    /// (device, pool capacity, recycler) for every device with a pool.
    devices: Vec<(Place, u64, &'e Arc<Recycler>)>,
}

impl<'e> DeviceBudgets<'e> {
    pub(super) fn new(graph: &TaskGraph, recyclers: &'e HashMap<u16, Arc<Recycler>>) -> DeviceBudgets<'e> {
        let devices = graph
            .pools
            .iter()
            .filter_map(|p| match p.pool {
                Place::Device(d) => recyclers.get(&d).map(|r| (p.pool, p.capacity_bytes, r)),
                Place::Host(_) => None,
            })
            .collect();
        DeviceBudgets { devices }
    }

    /// Free bytes of every device pool now.
    pub(super) fn room(&self, dispatcher: &Dispatcher) -> Vec<u64> {
        self.devices.iter().map(|(place, capacity, _)| capacity.saturating_sub(dispatcher.used(*place))).collect()
    }

    /// Sets every recycler's limit to its pool's free bytes.
    pub(super) fn refresh(&self, dispatcher: &Dispatcher) {
        for ((_, _, recycler), room) in self.devices.iter().zip(self.room(dispatcher)) {
            recycler.set_limit(room);
        }
    }

    /// A task just started: its device acquisitions shrink the room of their pools.
    pub(super) fn acquired(&self, task: &Task, room: &mut [u64]) {
        for m in &task.acquire {
            if let Some(i) = self.devices.iter().position(|(place, _, _)| *place == m.pool) {
                room[i] = room[i].saturating_sub(m.bytes);
                self.devices[i].2.set_limit(room[i]);
            }
        }
    }
}
