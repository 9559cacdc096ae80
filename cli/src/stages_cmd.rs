//! Stages over the network from the command line: `ferry stage-worker` (one machine's
//! stages of a plan, for the head that connects) and the head's side of `ferry run`
//! for a plan over several machines — stage workers given with `--worker NODE=ADDR`,
//! or started on this machine, each its own process with its own memory.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use clap::Args;
use ferry_core::graph::TaskGraph;
use ferry_core::plan::Policy;
use ferry_core::profile::Profile;
use ferry_core::CoreError;
use ferry_engine::kernels::Activations;
use ferry_engine::stages::{serve, Ownership, Served, Worker};
use ferry_engine::weights::ModelFiles;

#[derive(Args)]
#[command(after_help = "Example (a plan over two machines; node 1 runs its stages here):
  on node 1:  ferry stage-worker --listen 0.0.0.0:7070 --model-dir models/tinyllama
  on node 0:  ferry run --plan plan.yaml --model-dir models/tinyllama --worker 1=node1.local:7070
Without --worker, `ferry run` starts a stage worker for each other node on this machine.")]
pub struct StageWorkerArgs {
    /// Address to listen on for the head (HOST:PORT; port 0 picks a free one). The
    /// address it listens on is printed first: "listening on ADDR". There is no
    /// authentication: listen only on a network you trust.
    #[arg(long, default_value = "0.0.0.0:7070")]
    listen: String,
    /// This machine's copy of the model (the head checks it holds the same weights);
    /// without it the worker only answers link probes (`ferry profile --as-nodes`).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Where a disk-resident KV cache file is created (and removed) [default: the model
    /// folder, or the folder holding the GGUF file].
    #[arg(long, value_name = "DIR")]
    scratch_dir: Option<PathBuf>,
    /// Serve one run and exit (otherwise serve runs one after another until stopped).
    #[arg(long)]
    once: bool,
    /// How products take their inputs (as `ferry run --activations`; give every process
    /// of a run the same).
    #[arg(long, value_name = "q8|f32|bf16", default_value = "bf16", value_parser = parse_activations)]
    activations: Activations,
}

/// `q8`, `f32` or `bf16`, for `--activations`.
pub fn parse_activations(text: &str) -> Result<Activations, String> {
    Activations::parse(text).ok_or_else(|| {
        let names: Vec<&str> = Activations::ALL.iter().map(|a| a.name()).collect();
        format!("unknown activations '{text}'; use one of {}", names.join(", "))
    })
}

pub fn stage_worker(args: StageWorkerArgs) -> Result<()> {
    let files = args.model_dir.as_deref().map(ModelFiles::open).transpose()?;
    let backend = ferry_engine::backend::backend("cpu", args.activations)?;
    let listener = TcpListener::bind(&args.listen)
        .map_err(|e| CoreError::invalid(format!("--listen {}: cannot listen there: {e}", args.listen)))?;
    let address = listener.local_addr().context("the listening address")?;
    println!("listening on {address}");
    std::io::stdout().flush()?;
    let scratch_dir = args.scratch_dir.clone().unwrap_or_else(|| {
        args.model_dir.as_deref().map_or_else(|| PathBuf::from("."), ferry_engine::weights::model_folder)
    });
    let worker = Worker { files: files.as_ref(), backend: backend.as_ref(), scratch_dir };
    loop {
        match serve(&listener, &worker) {
            Ok(Served::Run { head, host }) => eprintln!("served node {host}'s stages for the head at {head}"),
            Ok(Served::Probe { from }) => eprintln!("answered link probes from {from}"),
            Err(e) if args.once => return Err(e.into()),
            Err(e) => eprintln!("error: {e}"),
        }
        if args.once {
            return Ok(());
        }
    }
}

/// The hosts other than the head's that a graph runs tasks on.
pub fn other_hosts(graph: &TaskGraph, profile: &Profile, policy: &Policy) -> Vec<u16> {
    let head = profile.device(policy.first_device()).host;
    let ownership = Ownership::of(profile, policy, head);
    ownership.hosts(graph).into_iter().filter(|&h| h != head).collect()
}

/// `--worker NODE=ADDR` parsed.
pub fn parse_worker(text: &str) -> Result<(u16, String)> {
    let (node, address) = text
        .split_once('=')
        .ok_or_else(|| CoreError::invalid(format!("--worker {text}: give NODE=HOST:PORT, e.g. 1=192.168.1.5:7070")))?;
    let node = node
        .trim()
        .parse::<u16>()
        .map_err(|_| CoreError::invalid(format!("--worker {text}: the node '{node}' is not a number")))?;
    Ok((node, address.trim().to_string()))
}

/// The network link to the stage worker at `address` (or one started here), measured.
pub fn measure_link(address: Option<&str>, quick: bool) -> Result<ferry_core::profile::TransferCurve> {
    let local = match address {
        Some(_) => None,
        None => Some(LocalWorkers::start(&[1], None, None, Activations::default())?),
    };
    let address = address.map(str::to_string).or_else(|| local.as_ref().map(|l| l.addresses[0].1.clone()));
    let address = address.context("no stage worker to measure the link to")?;
    eprintln!("measuring the network link to the stage worker at {address} ...");
    let peer = ferry_engine::stages::connect(&address, 1, 0, ferry_engine::stages::Role::Head)?;
    let curve = ferry_engine::stages::probe::measure_link(&peer, if quick { 5 } else { 11 })?;
    peer.finish_sending();
    drop(peer);
    if let Some(local) = local {
        local.wait();
    }
    Ok(curve)
}

/// Stage workers this process started on this machine; killed when dropped (a run
/// that fails must not leave them waiting).
pub struct LocalWorkers {
    children: Vec<Child>,
    pub addresses: Vec<(u16, String)>,
}

impl LocalWorkers {
    /// One `ferry stage-worker --once` per host, on the loopback interface.
    pub fn start(
        hosts: &[u16],
        model_dir: Option<&std::path::Path>,
        scratch_dir: Option<&std::path::Path>,
        activations: Activations,
    ) -> Result<Self> {
        let exe = std::env::current_exe().context("finding the ferry executable to start stage workers")?;
        let mut workers = LocalWorkers { children: Vec::new(), addresses: Vec::new() };
        for &host in hosts {
            let mut command = Command::new(&exe);
            command.args(["stage-worker", "--listen", "127.0.0.1:0", "--once", "--activations", activations.name()]);
            if let Some(dir) = model_dir {
                command.arg("--model-dir").arg(dir);
            }
            if let Some(dir) = scratch_dir {
                command.arg("--scratch-dir").arg(dir);
            }
            let mut child = command
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting a stage worker for node {host}"))?;
            let stdout = child.stdout.take().context("the stage worker's output")?;
            workers.children.push(child);
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).context("reading the stage worker's address")?;
            let address = line.trim().strip_prefix("listening on ").map(str::to_string).with_context(|| {
                format!("the stage worker for node {host} did not start (it printed '{}')", line.trim())
            })?;
            workers.addresses.push((host, address));
        }
        Ok(workers)
    }

    /// Waits for the workers to exit (after a run they served).
    pub fn wait(mut self) {
        for child in &mut self.children {
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The head's side of a plan over several machines: the stage workers given with
/// `--worker`, or one started here per other node.
pub(crate) fn run_over_machines(
    args: &crate::run_cmd::RunArgs,
    others: &[u16],
    graph: &ferry_core::graph::TaskGraph,
    resolved: &ferry_core::resolve::ResolvedPlan,
    files: &ModelFiles,
    backend: &dyn ferry_engine::backend::Backend,
    options: &ferry_engine::RunOptions,
) -> Result<ferry_engine::RunReport> {
    if args.backend != "cpu" {
        return Err(CoreError::invalid("stages over several machines run on the cpu backend").into());
    }
    let given: Vec<(u16, String)> =
        args.worker.iter().map(|w| crate::stages_cmd::parse_worker(w)).collect::<Result<_>>()?;
    if let Some((node, _)) = given.iter().find(|(node, _)| !others.contains(node)) {
        let nodes: Vec<String> = others.iter().map(|n| n.to_string()).collect();
        return Err(CoreError::invalid(format!(
            "--worker {node}=...: the plan has no node {node}; its other machines are node {}",
            nodes.join(", node ")
        ))
        .into());
    }
    let local = if given.is_empty() {
        let (model_dir, scratch_dir) = (Some(args.model_dir.as_path()), args.scratch_dir.as_deref());
        Some(crate::stages_cmd::LocalWorkers::start(others, model_dir, scratch_dir, args.activations)?)
    } else {
        None
    };
    let workers = local.as_ref().map_or(given, |l| l.addresses.clone());
    let report =
        ferry_engine::stages::run_head(graph, &resolved.plan, &resolved.profile, files, backend, options, &workers)
            .context("running the plan over several machines")?;
    if let Some(local) = local {
        local.wait();
    }
    Ok(report)
}
