//! The two ends of a run over several machines: the head (`run_head`: connects to a
//! stage worker per other machine, hands each the plan, checks that they lowered the
//! same graph, starts the clock and gathers the trace) and a stage worker (`serve`:
//! one run for the head that connects).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use ferry_core::graph::TaskGraph;
use ferry_core::plan::Plan;
use ferry_core::profile::Profile;
use ferry_core::schedule::{lower, Steps};

use super::wire::Message;
use super::{accept, connect, fingerprint, Network, Ownership, Peer, Role, Setup};
use crate::backend::Backend;
use crate::executor::{run_on, RunOptions, RunReport};
use crate::weights::ModelFiles;
use crate::EngineError;

/// The head's part of `plan` (lowered to `graph`), with a stage worker for every other
/// machine at the addresses given by host. The report covers every process.
#[allow(clippy::too_many_arguments)]
pub fn run_head(
    graph: &TaskGraph,
    plan: &Plan,
    profile: &Profile,
    files: &ModelFiles,
    backend: &dyn Backend,
    options: &RunOptions,
    workers: &[(u16, String)],
) -> Result<RunReport, EngineError> {
    if plan.policy.speculation.is_some() {
        // The draft's guesses live where it runs (the head); verification at the last
        // stage would need them on another machine.
        return Err(EngineError::Unsupported(
            "speculative plans run on one machine: stages over the network do not carry the draft's guesses".into(),
        ));
    }
    let head = profile.device(plan.policy.first_device()).host;
    let ownership = Ownership::of(profile, &plan.policy, head);
    let needed: Vec<u16> = ownership.hosts(graph).into_iter().filter(|&h| h != head).collect();
    for host in &needed {
        if !workers.iter().any(|(h, _)| h == host) {
            return Err(EngineError::Refused(format!(
                "the plan runs stages on node {host}, and no stage worker was given for it"
            )));
        }
    }
    let print = fingerprint(graph);
    let mut peers = Vec::new();
    for (host, address) in workers.iter().filter(|(h, _)| needed.contains(h)) {
        let peer = Arc::new(connect(address, *host, head, Role::Head)?);
        let setup = Setup {
            plan: plan.clone(),
            profile: profile.clone(),
            host: *host,
            prompts: options.prompts.clone(),
            keep_logits: options.keep_logits,
            allow_buffered_io: options.allow_buffered_io,
            workers: workers.to_vec(),
            fingerprint: print,
        };
        let json = serde_json::to_string(&setup).map_err(|e| EngineError::Internal(format!("setup: {e}")))?;
        peer.send(&Message::Setup(json))?;
        peers.push(peer);
    }
    let network = Network { ownership, peers };
    let mut ready = || {
        for peer in &network.peers {
            match peer.receive()? {
                Some(Message::Ready { fingerprint }) if fingerprint == print => {}
                Some(Message::Ready { .. }) => {
                    return Err(EngineError::Mismatch(format!(
                        "{} lowered another graph from the same plan: its model files or its build differ from \
                         this one's",
                        peer.describe()
                    )))
                }
                Some(Message::Failed(message)) => {
                    return Err(EngineError::Network(format!("{} failed: {message}", peer.describe())))
                }
                other => {
                    return Err(EngineError::Network(format!(
                        "{} answered {} instead of being ready",
                        peer.describe(),
                        other.map_or("nothing (it closed the connection)".into(), |m| format!("{m:?}"))
                    )))
                }
            }
        }
        for peer in &network.peers {
            peer.send(&Message::Start)?;
        }
        Ok(())
    };
    let report = run_on(graph, &plan.policy, &plan.workload, files, backend, options, Some(&network), &mut ready);
    if let Err(e) = &report {
        network.fail(&e.to_string());
    }
    report
}

/// A stage worker's files and where it keeps its scratch file.
pub struct Worker<'a> {
    /// The model (`None`: the worker only answers link probes).
    pub files: Option<&'a ModelFiles>,
    pub backend: &'a dyn Backend,
    pub scratch_dir: PathBuf,
}

/// What a stage worker did for the process that connected.
#[derive(Debug, Clone, PartialEq)]
pub enum Served {
    /// Ran node `host`'s stages of a plan for the head at `head`.
    Run { head: String, host: u16 },
    /// Answered a link measurement (`ferry profile --as-nodes`) from `from`.
    Probe { from: String },
}

/// Most workers that may join this one before the head's own connection is accepted.
const MAX_EARLY_JOINS: usize = 1024;

/// Serves one session: waits for a head on `listener`, runs this machine's stages of
/// its plan and reports to the head (or answers its link probes).
pub fn serve(listener: &TcpListener, worker: &Worker) -> Result<Served, EngineError> {
    // A lower worker, set up before this one, may join before the head's connection
    // is accepted: keep it for the run.
    let mut joined = Vec::new();
    let head = loop {
        match accept(listener)? {
            (peer, Role::Head) => break Arc::new(peer),
            (peer, Role::Worker) if joined.len() < MAX_EARLY_JOINS => joined.push(Arc::new(peer)),
            (peer, Role::Worker) => {
                return Err(EngineError::Network(format!(
                    "{} joined after {MAX_EARLY_JOINS} other workers and no head connected",
                    peer.describe()
                )))
            }
        }
    };
    let result = match head.receive()? {
        Some(Message::Setup(json)) => serde_json::from_str::<Setup>(&json)
            .map_err(|e| EngineError::Network(format!("{} sent an unreadable setup: {e}", head.describe())))
            .and_then(|setup| serve_head(listener, worker, &head, setup, joined))
            .map(|host| Served::Run { head: head.address.clone(), host }),
        Some(probe @ Message::Echo { .. }) => {
            super::probe::answer(&head, probe).map(|()| Served::Probe { from: head.address.clone() })
        }
        other => Err(EngineError::Network(format!("{} sent {other:?} instead of a setup", head.describe()))),
    };
    if let Err(e) = &result {
        let _ = head.send(&Message::Failed(e.to_string()));
        head.finish_sending();
    }
    result
}

fn serve_head(
    listener: &TcpListener,
    worker: &Worker,
    head: &Arc<Peer>,
    setup: Setup,
    joined: Vec<Arc<Peer>>,
) -> Result<u16, EngineError> {
    let (plan, profile) = (&setup.plan, &setup.profile);
    let files = worker.files.ok_or_else(|| {
        EngineError::Refused("this stage worker was started without --model-dir: it only answers link probes".into())
    })?;
    let graph = lower(&plan.policy, &files.spec, &plan.workload, profile, &Steps::Bound)?;
    let print = fingerprint(&graph);
    if print != setup.fingerprint {
        return Err(EngineError::Mismatch(format!(
            "this worker lowered another graph from the head's plan: its model files ({}) or its build differ",
            files.dir.display()
        )));
    }
    let me = setup.host;
    let ownership = Ownership::of(profile, &plan.policy, me);
    // Workers join each other: the lower host connects to the higher.
    if head.host != ownership.head {
        return Err(EngineError::Network(format!(
            "{} introduced itself as node {}, but the plan's head is node {}",
            head.describe(),
            head.host,
            ownership.head
        )));
    }
    let mut peers = vec![head.clone()];
    for (host, address) in setup.workers.iter().filter(|(h, _)| *h > me && *h != ownership.head) {
        peers.push(Arc::new(connect(address, *host, me, Role::Worker)?));
    }
    let mut lower: Vec<u16> =
        setup.workers.iter().map(|(h, _)| *h).filter(|&h| h < me && h != ownership.head).collect();
    let mut joined = joined.into_iter();
    while !lower.is_empty() {
        let peer = match joined.next() {
            Some(peer) => peer,
            None => match accept(listener)? {
                (peer, Role::Worker) => Arc::new(peer),
                (peer, Role::Head) => {
                    return Err(EngineError::Network(format!(
                        "{} connected as a head while this worker waits for the run's other workers",
                        peer.describe()
                    )))
                }
            },
        };
        let Some(at) = lower.iter().position(|&h| h == peer.host) else {
            return Err(EngineError::Network(format!(
                "{} joined, but this run expects workers {lower:?} to join",
                peer.describe()
            )));
        };
        lower.swap_remove(at);
        peers.push(peer);
    }
    if let Some(extra) = joined.next() {
        return Err(EngineError::Network(format!("{} joined, but is not a worker of this run", extra.describe())));
    }
    let network = Network { ownership, peers };
    let options = RunOptions {
        prompts: setup.prompts.clone(),
        scratch_dir: worker.scratch_dir.clone(),
        allow_buffered_io: setup.allow_buffered_io,
        keep_logits: setup.keep_logits,
        progress: None,
        draft_files: None,
    };
    let mut ready = || {
        let head = network.peer(network.ownership.head)?;
        head.send(&Message::Ready { fingerprint: print })?;
        match head.receive()? {
            Some(Message::Start) => Ok(()),
            Some(Message::Failed(message)) => {
                Err(EngineError::Network(format!("{} failed: {message}", head.describe())))
            }
            other => Err(EngineError::Network(format!("{} sent {other:?} instead of the start", head.describe()))),
        }
    };
    run_on(&graph, &plan.policy, &plan.workload, files, worker.backend, &options, Some(&network), &mut ready)?;
    Ok(me)
}
