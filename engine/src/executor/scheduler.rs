//! The scheduler: drives `ferry_core::dispatch::Dispatcher` (the simulator's rule)
//! with one worker thread per lane of every resource — each lane dispatches what its
//! task's end made ready, the calling thread what other machines announce — and hands
//! each task to the code that moves or computes its data. It knows tasks,
//! resources and pools; nothing of the model.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use ferry_core::dispatch::Dispatcher;
use ferry_core::graph::{Payload, Place, Task, TaskGraph, TaskKind};
use ferry_core::model::WeightGroup;
use ferry_core::topology::Resource;
use ferry_core::trace::Span;

use super::remote::Arrival;
use super::{lock, Engine};
use crate::memory::Recycler;
use crate::stages::wire::{self, Message, StageReport};
use crate::EngineError;

/// What the scheduler waits for.
enum Event {
    /// A lane that handled its task's end itself (`Shared`) left nothing running, or
    /// everything finished: the scheduler looks at the state again.
    Wake,
    /// Another machine announced a task this process waits on, at this ns.
    Arrived(u32, Result<Arrival, EngineError>, u64),
    /// A stage worker's report (the head gathers them).
    Finished(u16, String),
    /// A peer failed, or its connection did.
    PeerFailed(String),
    /// A peer closed its connection (normal once the run is over).
    Closed(u16),
}

/// Tells a lane's thread to stop (no task has this id).
const STOP: u32 = u32::MAX;

/// The scheduler's state. The lane that ran a task records its end and dispatches what
/// it made ready itself, under this lock: a chain of tasks on one lane then goes from
/// one to the next without waking the scheduler's thread and then the lane's again (two
/// thread wake-ups, 12-37 µs on the 2-core build VM, which were most of the gap between
/// a small model's compute tasks). The scheduler's thread hears of the rest: another
/// machine's announcements, its report, a lane left idle.
struct Shared<'g> {
    dispatcher: Dispatcher<'g>,
    spans: Vec<Span>,
    failure: Option<EngineError>,
    /// Tasks sent to this process's lanes and not yet ended.
    local_running: usize,
    /// Another machine's tasks this process waits on, dispatched here and not yet heard
    /// of (task → lane).
    awaiting: HashMap<u32, u32>,
    /// Another machine's tasks heard of and not yet dispatched here.
    arrived: HashMap<u32, Arrival>,
}

/// What running the graph gave: this process's spans, and over several machines the
/// workers' reports (the head's) and when announced activations arrived here.
pub(super) struct Executed {
    pub spans: Vec<Span>,
    pub reports: Vec<StageReport>,
    pub arrivals: Vec<(u32, u64)>,
}

/// Each lane's channel, indexed like the graph's resources (another machine's
/// resources get none).
type Senders = Vec<Vec<mpsc::Sender<u32>>>;

impl<'a> Engine<'a> {
    pub(super) fn execute_graph(&self, baseline_rss_bytes: u64, setup_ns: u64) -> Result<Executed, EngineError> {
        let graph = self.graph;
        let count = graph.tasks.len();
        let shared = Mutex::new(Shared {
            dispatcher: Dispatcher::new(graph),
            spans: vec![Span { task: 0, lane: 0, start_ns: 0, end_ns: 0 }; count],
            failure: None,
            local_running: 0,
            awaiting: HashMap::new(),
            arrived: HashMap::new(),
        });
        let mut reports: Vec<StageReport> = Vec::new();
        let mut arrivals: Vec<(u32, u64)> = Vec::new();
        let clock = Instant::now();
        let (done_tx, done_rx) = mpsc::channel::<Event>();
        let mut senders: Senders = Vec::new();
        let mut receivers = Vec::new();
        for spec in &graph.resources {
            let lanes = if self.runs_resource(spec.resource) { spec.lanes.max(1) } else { 0 };
            let (tx, rx): (Vec<_>, Vec<_>) = (0..lanes).map(|_| mpsc::channel::<u32>()).unzip();
            senders.push(tx);
            receivers.push(rx);
        }
        // Freed weight buffers may be kept mapped only while their device's pool has
        // room for them beside everything the graph accounts.
        let budgets = DeviceBudgets::new(graph, &self.recyclers);
        budgets.refresh(&lock(&shared).dispatcher);

        std::thread::scope(|scope| {
            // One worker thread per lane of every resource this process runs.
            let mut started: Vec<&mpsc::Sender<u32>> = Vec::new();
            'spawn: for ((spec, lanes), txs) in graph.resources.iter().zip(receivers).zip(&senders) {
                for ((lane, rx), tx) in lanes.into_iter().enumerate().zip(txs) {
                    let lane = lane as u32;
                    let done = done_tx.clone();
                    let name = format!("ferry-{}-{lane}", graph.resource_label(spec.resource));
                    // Computing on the CPU, the lane runs its tasks inside its own pool of
                    // compute threads (`kernels::compute_threads` says why).
                    let threads = match spec.resource {
                        Resource::Compute { at } if self.backend.host_addressable(at) => {
                            match crate::kernels::lend_compute_threads("ferry-lane") {
                                Ok(pool) => Some(pool),
                                Err(e) => {
                                    lock(&shared).failure =
                                        Some(EngineError::Internal(format!("starting {name}'s threads: {e}")));
                                    break 'spawn;
                                }
                            }
                        }
                        _ => None,
                    };
                    let (shared, budgets, senders) = (&shared, &budgets, &senders);
                    let spawned = std::thread::Builder::new().name(name.clone()).spawn_scoped(scope, move || {
                        let serve = move || {
                            while let Ok(id) = rx.recv() {
                                if id == STOP {
                                    return;
                                }
                                let start = clock.elapsed().as_nanos() as u64;
                                let result = self.execute(id);
                                let end = clock.elapsed().as_nanos() as u64;
                                let mut state = lock(shared);
                                self.ran(&mut state, budgets, (id, lane, start, end), result);
                                self.advance(&mut state, budgets, senders);
                                let idle = state.local_running == 0 || state.dispatcher.is_finished();
                                drop(state);
                                // Only a lane that left nothing running wakes the scheduler's
                                // thread: to finish, or to see whether the run can go on.
                                if idle && done.send(Event::Wake).is_err() {
                                    return;
                                }
                            }
                        };
                        // The whole loop inside the lane's pool, not each task: a task then
                        // starts on a thread of the pool as it is received, where handing
                        // each one in and its end back out cost two more thread wake-ups.
                        match &threads {
                            Some(pool) => pool.install(serve),
                            None => serve(),
                        }
                    });
                    // The system refusing a thread ends the run with an error, not a panic
                    // (nothing has been dispatched yet).
                    match spawned {
                        Ok(_) => started.push(tx),
                        Err(e) => {
                            lock(shared).failure =
                                Some(EngineError::io(std::path::Path::new(&format!("thread {name}")), e));
                            break 'spawn;
                        }
                    }
                }
            }
            self.spawn_readers(scope, &done_tx, clock);
            drop(done_tx);
            self.drive(&shared, &budgets, &senders, &done_rx, &mut reports, &mut arrivals);
            // Every lane stops once its queue is empty.
            for tx in started {
                let _ = tx.send(STOP);
            }
            let state = lock(&shared);
            self.finish_network(&state.failure, &state.spans, &arrivals, baseline_rss_bytes, setup_ns);
        });
        let state = shared.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        match state.failure {
            Some(e) => Err(e),
            None => Ok(Executed { spans: state.spans, reports, arrivals }),
        }
    }

    /// The scheduler's thread: dispatches the first tasks, then wakes when a lane is
    /// left idle or (over several machines) a peer announces a task, until the graph is
    /// finished (and the workers have reported to the head) or has failed.
    fn drive(
        &self,
        shared: &Mutex<Shared>,
        budgets: &DeviceBudgets,
        senders: &Senders,
        done_rx: &mpsc::Receiver<Event>,
        reports: &mut Vec<StageReport>,
        arrivals: &mut Vec<(u32, u64)>,
    ) {
        // Announcements still owed by each other machine.
        let mut pending_from: HashMap<u16, usize> = HashMap::new();
        if let Some(net) = &self.net {
            for (id, _) in net.view.awaited.iter().enumerate().filter(|(_, &a)| a) {
                *pending_from.entry(self.owner_of(id as u32)).or_default() += 1;
            }
        }
        let mut reports_due =
            self.net.as_ref().map_or(0, |n| if n.network.is_head() { n.network.peers.len() } else { 0 });
        loop {
            let mut state = lock(shared);
            if state.dispatcher.is_finished() && reports_due == 0 {
                break;
            }
            self.advance(&mut state, budgets, senders);
            if state.failure.is_some() && state.local_running == 0 {
                break;
            }
            if state.failure.is_none()
                && !state.dispatcher.is_finished()
                && state.local_running == 0
                && state.awaiting.is_empty()
            {
                state.failure = Some(EngineError::Deadlock(state.dispatcher.stall().message));
                break;
            }
            drop(state);
            let Ok(event) = done_rx.recv() else {
                lock(shared).failure.get_or_insert(EngineError::Internal("workers vanished".into()));
                break;
            };
            let mut state = lock(shared);
            match event {
                Event::Wake => {}
                Event::Arrived(id, arrival, at_ns) => {
                    arrivals.push((id, at_ns));
                    if let Some(owed) = pending_from.get_mut(&self.owner_of(id)) {
                        *owed = owed.saturating_sub(1);
                    }
                    match (arrival, state.awaiting.remove(&id)) {
                        (Err(e), _) => {
                            state.failure.get_or_insert(e);
                        }
                        (Ok(arrival), Some(lane)) => {
                            if let Err(e) = self.install(id, arrival) {
                                state.failure.get_or_insert(e);
                            }
                            state.dispatcher.complete(id, lane);
                        }
                        (Ok(arrival), None) => {
                            state.arrived.insert(id, arrival);
                        }
                    }
                }
                Event::Finished(host, json) => {
                    reports_due = reports_due.saturating_sub(1);
                    match serde_json::from_str::<StageReport>(&json) {
                        Ok(report) => reports.push(report),
                        Err(e) => {
                            state.failure.get_or_insert(EngineError::Network(format!(
                                "the stage process of node {host} sent an unreadable report: {e}"
                            )));
                        }
                    }
                }
                Event::PeerFailed(message) => {
                    state.failure.get_or_insert(EngineError::Network(message));
                }
                Event::Closed(host) => {
                    // Normal once that process sent all this one waits on (and, to
                    // the head, its report).
                    let reported = reports.iter().any(|r| r.host == host);
                    let head = self.net.as_ref().is_some_and(|n| n.network.is_head());
                    let owed = pending_from.get(&host).copied().unwrap_or(0);
                    if owed > 0 || (head && !reported) {
                        state.failure.get_or_insert(EngineError::Network(format!(
                            "the stage process of node {host} closed its connection before the run ended"
                        )));
                    }
                }
            }
        }
    }

    /// Dispatches until nothing more is ready: this process's tasks go to their lanes;
    /// another machine's task ends here at once, unless this process waits on it: then
    /// when its announcement is (or was) received.
    fn advance(&self, state: &mut Shared, budgets: &DeviceBudgets, senders: &Senders) {
        while state.failure.is_none() && !state.dispatcher.is_finished() {
            let mut progressed = false;
            for (id, lane) in self.dispatch(state, budgets, senders) {
                if !self.awaits(id) {
                    state.dispatcher.complete(id, lane);
                    progressed = true;
                } else if let Some(arrival) = state.arrived.remove(&id) {
                    if let Err(e) = self.install(id, arrival) {
                        state.failure.get_or_insert(e);
                    }
                    state.dispatcher.complete(id, lane);
                    progressed = true;
                } else {
                    state.awaiting.insert(id, lane);
                }
            }
            if !progressed {
                return;
            }
        }
    }

    /// Sends every task the dispatcher finds ready to its lane; returns another
    /// machine's tasks among them (task, lane).
    fn dispatch(&self, state: &mut Shared, budgets: &DeviceBudgets, senders: &Senders) -> Vec<(u32, u32)> {
        let graph = self.graph;
        let mut elsewhere = Vec::new();
        let mut room = budgets.room(&state.dispatcher);
        let (mut started, mut stopped) = (0usize, false);
        state.dispatcher.dispatch(|id, lane, r| {
            if !self.owns(id) {
                elsewhere.push((id, lane));
                return;
            }
            let task = &graph.tasks[id as usize];
            // A weight read takes a kept buffer before the limit shrinks by its bytes;
            // the rest are unmapped now if they no longer fit.
            if let (TaskKind::DiskRead, Payload::Weights { group }) = (task.kind, task.payload) {
                if !Engine::lands_on_host(task) && group != WeightGroup::Embeddings {
                    // What it holds, not what it is expected to move: a routed read's
                    // bytes are known only as it starts.
                    let held: u64 = task.acquire.iter().map(|m| m.bytes).sum();
                    if let Some(buffer) = self.recycler(task.layer).take_kept(held as usize) {
                        lock(&self.reserved).insert(self.key(task, group), buffer);
                    }
                }
            }
            budgets.acquired(task, &mut room);
            started += 1;
            if senders[r][lane as usize].send(id).is_err() {
                stopped = true;
            }
        });
        state.local_running += started;
        if stopped {
            state.failure.get_or_insert(EngineError::Internal("a worker stopped".into()));
        }
        elsewhere
    }

    /// A task of this process ended: its span, its end to the dispatcher, the devices'
    /// budgets, its error if any, progress.
    fn ran(
        &self,
        state: &mut Shared,
        budgets: &DeviceBudgets,
        span: (u32, u32, u64, u64),
        result: Result<(), EngineError>,
    ) {
        let (id, lane, start_ns, end_ns) = span;
        state.local_running -= 1;
        state.spans[id as usize] = Span { task: id, lane, start_ns, end_ns };
        state.dispatcher.complete(id, lane);
        budgets.refresh(&state.dispatcher);
        if let Err(e) = result {
            state.failure.get_or_insert(e);
        }
        let (finished, count) = (state.dispatcher.finished(), self.graph.tasks.len());
        if let Some(progress) = &self.options.progress {
            if finished.is_multiple_of(64) || finished == count {
                progress(finished, count);
            }
        }
    }

    /// The host whose process runs task `id` (0 without a network).
    fn owner_of(&self, id: u32) -> u16 {
        self.net.as_ref().map_or(0, |n| n.network.ownership.owner(self.graph.tasks[id as usize].resource))
    }

    /// Whether this process runs tasks on `resource` (every one, without a network).
    fn runs_resource(&self, resource: ferry_core::graph::Resource) -> bool {
        self.net.as_ref().is_none_or(|n| n.network.ownership.owner(resource) == n.network.ownership.me)
    }

    /// One thread per peer reading its announcements into the scheduler's events.
    fn spawn_readers<'s>(
        &'s self,
        scope: &'s std::thread::Scope<'s, '_>,
        events: &mpsc::Sender<Event>,
        clock: Instant,
    ) {
        let Some(net) = &self.net else { return };
        for peer in &net.network.peers {
            let Some(mut stream) = peer.take_reader() else { continue };
            let sender = events.clone();
            let spawned =
                std::thread::Builder::new().name(format!("ferry-net-{}", peer.host)).spawn_scoped(scope, move || {
                    let events = sender;
                    loop {
                        let event = match wire::read(&mut stream) {
                            Ok(Some(Message::Done { task, carried })) => {
                                let arrival = self.receive(task, carried);
                                Event::Arrived(task, arrival, clock.elapsed().as_nanos() as u64)
                            }
                            Ok(Some(Message::Finished(json))) => Event::Finished(peer.host, json),
                            Ok(Some(Message::Failed(message))) => {
                                Event::PeerFailed(format!("{} failed: {message}", peer.describe()))
                            }
                            Ok(Some(other)) => {
                                Event::PeerFailed(format!("{} sent {other:?} during the run", peer.describe()))
                            }
                            Ok(None) => {
                                let _ = events.send(Event::Closed(peer.host));
                                return;
                            }
                            Err(e) => {
                                let _ =
                                    events.send(Event::PeerFailed(peer.error("lost the connection", e).to_string()));
                                return;
                            }
                        };
                        if events.send(event).is_err() {
                            return;
                        }
                    }
                });
            if let Err(e) = spawned {
                let _ = events.send(Event::PeerFailed(format!("could not start a reader thread: {e}")));
            }
        }
    }

    /// The end of a run over several machines: a worker reports its spans to the head
    /// (or says why it failed), then every process stops sending, so each peer's
    /// reader sees the end of its stream.
    fn finish_network(
        &self,
        failure: &Option<EngineError>,
        spans: &[Span],
        arrivals: &[(u32, u64)],
        baseline_rss_bytes: u64,
        setup_ns: u64,
    ) {
        let Some(net) = &self.net else { return };
        let network = net.network;
        if let Some(e) = failure {
            network.fail(&e.to_string());
        } else if !network.is_head() {
            let report = StageReport {
                host: network.ownership.me,
                spans: spans
                    .iter()
                    .enumerate()
                    .filter(|(id, _)| net.view.owned[*id])
                    .map(|(id, s)| (id as u32, s.lane, s.start_ns, s.end_ns))
                    .collect(),
                arrivals: arrivals.to_vec(),
                peak_rss_bytes: crate::memory::peak_rss_bytes().unwrap_or(0),
                baseline_rss_bytes,
                setup_ns,
            };
            let json = serde_json::to_string(&report).unwrap_or_default();
            if let Ok(head) = network.peer(network.ownership.head) {
                let _ = head.send(&Message::Finished(json));
            }
        }
        for peer in &network.peers {
            peer.finish_sending();
        }
    }

    pub(super) fn execute(&self, id: u32) -> Result<(), EngineError> {
        let task = &self.graph.tasks[id as usize];
        // A speculative run that has every token skips the rounds lowered beyond.
        if self.skipped(task) {
            return Ok(());
        }
        self.run_task(task, id)?;
        self.announce(task, id)
    }

    fn run_task(&self, task: &Task, id: u32) -> Result<(), EngineError> {
        let to_device = task.link_ends().is_some_and(|(_, to)| to.is_device());
        match (task.kind, task.payload) {
            (TaskKind::DiskRead, Payload::Weights { group: WeightGroup::Embeddings }) => self.read_embedding_rows(task),
            (TaskKind::DiskRead, Payload::Weights { group }) => self.load_weights_from_disk(task, group),
            (TaskKind::Copy, Payload::Weights { group }) if to_device => self.copy_weights_to_device(task, group),
            (TaskKind::DiskRead, Payload::KvCache) => self.read_kv(task),
            (TaskKind::Copy, Payload::KvCache) if to_device => self.copy_kv_to_device(task),
            (TaskKind::Copy, Payload::KvCache) => self.store_kv_to_host(task),
            (TaskKind::DiskWrite, Payload::KvCache) => self.write_kv(task),
            (TaskKind::Copy, Payload::Activations) if self.crosses_machines(task) => self.send_activations(task, id),
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
