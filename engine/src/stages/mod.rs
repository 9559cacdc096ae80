//! Stages over TCP: a plan whose devices sit on several machines runs as one process
//! per machine — the head (where the prompts enter: the first stage's machine) and a
//! stage worker for every other — joined by sockets, so a link between machines is a
//! real network link. Every process lowers the same graph (checked by fingerprint)
//! and runs the tasks of its own places; a task another process waits on is announced
//! when it ends (`wire::Message::Done`), carrying the activations that cross a link or
//! a head's tokens. The head gathers every process's spans into one measured trace.
//!
//! How a process sees the graph (`LocalView`): its own tasks as they are; another
//! machine's tasks keep their ids and dependencies but acquire no memory here and
//! run on lanes without threads — the scheduler ends them at once, or, where a task
//! of its own waits on one, when its announcement arrives.

pub mod probe;
mod run;
pub mod wire;

pub use run::{run_head, serve, Served, Worker};

use std::collections::HashMap;
use std::io::BufWriter;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_core::graph::{Op, Payload, Place, Resource, TaskGraph};
use ferry_core::plan::{Plan, Policy};
use ferry_core::profile::Profile;
use serde::{Deserialize, Serialize};

use crate::EngineError;
use wire::Message;

/// How long connecting to a stage worker may take before the run is refused.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which machine owns what: every place belongs to one host, and a host's process
/// runs the tasks on its places (a link's task runs where the link starts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ownership {
    /// The host this process runs.
    pub me: u16,
    /// The head's host: where the prompts enter and the tokens are gathered.
    pub head: u16,
    /// The host of every device.
    pub device_hosts: Vec<u16>,
}

impl Ownership {
    /// The ownership of `profile`'s machine as seen from host `me`, the head on the
    /// first stage's host.
    pub fn of(profile: &Profile, policy: &Policy, me: u16) -> Ownership {
        let device_hosts = (0..profile.device_count() as u16).map(|d| profile.device(d).host).collect();
        Ownership { me, head: profile.device(policy.first_device()).host, device_hosts }
    }

    pub fn host_of(&self, place: Place) -> u16 {
        match place {
            Place::Host(h) => h,
            Place::Device(d) => self.device_hosts.get(d as usize).copied().unwrap_or(0),
        }
    }

    /// The host whose process runs tasks on `resource`.
    pub fn owner(&self, resource: Resource) -> u16 {
        match resource {
            Resource::Disk { host } => host,
            Resource::Compute { at } => self.host_of(at),
            Resource::Link { from, .. } => self.host_of(from),
        }
    }

    /// Every host the graph's places are on.
    pub fn hosts(&self, graph: &TaskGraph) -> Vec<u16> {
        let mut hosts: Vec<u16> = graph.resources.iter().map(|r| self.owner(r.resource)).collect();
        hosts.extend(graph.pools.iter().map(|p| self.host_of(p.pool)));
        hosts.sort_unstable();
        hosts.dedup();
        hosts
    }
}

/// One process's view of the graph (see the module docs).
pub struct LocalView {
    pub graph: TaskGraph,
    /// Tasks this process runs.
    pub owned: Vec<bool>,
    /// Other machines' tasks this process waits to hear of.
    pub awaited: Vec<bool>,
    /// For each task this process runs, the hosts waiting to hear of it.
    pub observers: Vec<Vec<u16>>,
}

impl LocalView {
    pub fn new(graph: &TaskGraph, ownership: &Ownership) -> Result<LocalView, EngineError> {
        let count = graph.tasks.len();
        let owner: Vec<u16> = graph.tasks.iter().map(|t| ownership.owner(t.resource)).collect();
        let owned: Vec<bool> = owner.iter().map(|&h| h == ownership.me).collect();
        let mut awaited = vec![false; count];
        let mut observers: Vec<Vec<u16>> = vec![Vec::new(); count];
        for (id, task) in graph.tasks.iter().enumerate() {
            // Memory never moves between machines: a task touches only its own host's pools.
            if let Some(m) = task.acquire.iter().chain(&task.release).find(|m| ownership.host_of(m.pool) != owner[id]) {
                return Err(EngineError::Unsupported(format!(
                    "{} on host {} moves memory of host {}; stages over the network exchange activations and \
                     tokens only",
                    task.label(),
                    owner[id],
                    ownership.host_of(m.pool)
                )));
            }
            for &dep in &task.deps {
                let dep = dep as usize;
                if owner[dep] != owner[id] {
                    if owned[id] {
                        awaited[dep] = true;
                    }
                    if !observers[dep].contains(&owner[id]) {
                        observers[dep].push(owner[id]);
                    }
                }
            }
            // The head gathers every token, whoever computes the head.
            if is_head(task) && owner[id] != ownership.head {
                if ownership.me == ownership.head {
                    awaited[id] = true;
                }
                if !observers[id].contains(&ownership.head) {
                    observers[id].push(ownership.head);
                }
            }
        }
        let mut local = graph.clone();
        let mut remote_tasks: HashMap<Resource, u32> = HashMap::new();
        for (id, task) in local.tasks.iter_mut().enumerate() {
            if !owned[id] {
                task.acquire.clear();
                task.release.clear();
                *remote_tasks.entry(task.resource).or_default() += 1;
            }
        }
        // Another machine's resource: a lane for each of its tasks, so none waits for a
        // lane here (the owner's dispatch decides when it really runs).
        for spec in &mut local.resources {
            if ownership.owner(spec.resource) != ownership.me {
                spec.lanes = remote_tasks.get(&spec.resource).copied().unwrap_or(1).max(1);
            }
        }
        for id in 0..count {
            if !owned[id] {
                observers[id].clear();
            }
        }
        Ok(LocalView { graph: local, owned, awaited, observers })
    }
}

fn is_head(task: &ferry_core::graph::Task) -> bool {
    matches!(task.payload, Payload::Compute { op: Op::Head, .. })
}

/// A fingerprint of a graph's tasks: two processes that lowered the same plan for the
/// same model on the same profile agree on it.
pub fn fingerprint(graph: &TaskGraph) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    graph.tasks.len().hash(&mut hasher);
    for task in &graph.tasks {
        (task.kind as u8, task.resource.key(), task.layer, task.micro_batch, task.step, task.bytes, task.flops)
            .hash(&mut hasher);
        task.deps.hash(&mut hasher);
        for m in task.acquire.iter().chain(&task.release) {
            (m.pool.key(), m.bytes).hash(&mut hasher);
        }
    }
    hasher.finish()
}

/// What the head tells a stage worker before the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    pub plan: Plan,
    pub profile: Profile,
    /// The host the worker runs.
    pub host: u16,
    pub prompts: Vec<Vec<u32>>,
    pub keep_logits: bool,
    pub allow_buffered_io: bool,
    /// Every worker's address by host: a worker connects to those of higher hosts.
    pub workers: Vec<(u16, String)>,
    /// The head's graph fingerprint (`fingerprint`).
    pub fingerprint: u64,
}

/// A connection to another stage process.
pub struct Peer {
    pub host: u16,
    pub address: String,
    reader: Mutex<Option<TcpStream>>,
    writer: Mutex<BufWriter<TcpStream>>,
}

impl Peer {
    pub fn new(host: u16, address: String, stream: TcpStream) -> Result<Peer, EngineError> {
        // Small messages (a token, a decoding step's hidden state) must leave at once.
        let _ = stream.set_nodelay(true);
        let reader = stream.try_clone().map_err(|e| peer_error(&address, host, "could not use the connection", e))?;
        Ok(Peer { host, address, reader: Mutex::new(Some(reader)), writer: Mutex::new(BufWriter::new(stream)) })
    }

    pub fn send(&self, message: &Message) -> Result<(), EngineError> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        wire::write(&mut *writer, message).map_err(|e| self.error("could not send to it", e))
    }

    /// The next message (blocking); `None` when the peer closed the connection.
    pub fn receive(&self) -> Result<Option<Message>, EngineError> {
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let stream = reader.as_mut().ok_or_else(|| EngineError::Internal("a peer's reader was taken".into()))?;
        wire::read(stream).map_err(|e| self.error("could not read from it", e))
    }

    /// The reading half, for a thread that reads until the peer closes.
    pub(crate) fn take_reader(&self) -> Option<TcpStream> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// No more messages from this side (the peer's reader sees the end).
    pub fn finish_sending(&self) {
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writer.get_ref().shutdown(std::net::Shutdown::Write);
    }

    pub fn error(&self, what: &str, e: std::io::Error) -> EngineError {
        peer_error(&self.address, self.host, what, e)
    }

    pub fn describe(&self) -> String {
        describe(&self.address, self.host)
    }
}

fn describe(address: &str, host: u16) -> String {
    format!("the stage process of node {host} at {address}")
}

fn peer_error(address: &str, host: u16, what: &str, e: std::io::Error) -> EngineError {
    EngineError::Network(format!("{}: {what}: {e}", describe(address, host)))
}

/// How a process that connects to a stage worker introduces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The head of a run, or a process measuring the link (`Message::Hello`).
    Head,
    /// Another stage worker of the same run (`Message::Join`).
    Worker,
}

/// Connects to the stage process of `host` at `address` and introduces this one,
/// node `me`, in its `role`.
pub fn connect(address: &str, host: u16, me: u16, role: Role) -> Result<Peer, EngineError> {
    let addrs: Vec<_> = address
        .to_socket_addrs()
        .map_err(|e| peer_error(address, host, "not an address (give HOST:PORT)", e))?
        .collect();
    let mut last = None;
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
            Ok(stream) => {
                let peer = Peer::new(host, address.to_string(), stream)?;
                let mut writer = peer.writer.lock().unwrap_or_else(|p| p.into_inner());
                std::io::Write::write_all(&mut *writer, wire::MAGIC)
                    .map_err(|e| peer_error(address, host, "could not send to it", e))?;
                drop(writer);
                peer.send(&match role {
                    Role::Head => Message::Hello { host: me },
                    Role::Worker => Message::Join { host: me },
                })?;
                return Ok(peer);
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address resolved"));
    Err(peer_error(address, host, "cannot reach it (is `ferry stage-worker` running there?)", e))
}

/// Accepts the next stage process connecting to `listener`, with the host it says it
/// runs and its role.
pub fn accept(listener: &TcpListener) -> Result<(Peer, Role), EngineError> {
    let (stream, from) = listener.accept().map_err(|e| EngineError::Network(format!("accepting a connection: {e}")))?;
    let address = from.to_string();
    let mut magic = [0u8; 8];
    let mut reading = stream.try_clone().map_err(|e| peer_error(&address, 0, "could not use the connection", e))?;
    let _ = reading.set_read_timeout(Some(CONNECT_TIMEOUT));
    std::io::Read::read_exact(&mut reading, &mut magic)
        .map_err(|e| peer_error(&address, 0, "did not introduce itself", e))?;
    if &magic != wire::MAGIC {
        return Err(EngineError::Network(format!("{address} is not a ferry stage process (wrong greeting)")));
    }
    // The greeting's message too must come within the timeout (the socket's option,
    // shared by every handle): a client that sends the magic bytes and then nothing
    // would otherwise hold this worker, which accepts one connection at a time, forever.
    let mut peer = Peer::new(0, address.clone(), stream)?;
    let role = match peer.receive()? {
        Some(Message::Hello { host }) => {
            peer.host = host;
            Role::Head
        }
        Some(Message::Join { host }) => {
            peer.host = host;
            Role::Worker
        }
        other => {
            return Err(EngineError::Network(format!("{address} greeted with {other:?} instead of its host")));
        }
    };
    let _ = reading.set_read_timeout(None);
    Ok((peer, role))
}

/// The connections of one process to the others of a run.
pub struct Network {
    pub ownership: Ownership,
    pub peers: Vec<Arc<Peer>>,
}

impl Network {
    pub fn peer(&self, host: u16) -> Result<&Peer, EngineError> {
        self.peers
            .iter()
            .find(|p| p.host == host)
            .map(|p| &**p)
            .ok_or_else(|| EngineError::Internal(format!("no connection to the process of host {host}")))
    }

    pub fn is_head(&self) -> bool {
        self.ownership.me == self.ownership.head
    }

    /// Tells every peer the run failed (best effort: the connection may be gone).
    pub fn fail(&self, message: &str) {
        for peer in &self.peers {
            let _ = peer.send(&Message::Failed(message.to_string()));
        }
    }
}
