//! Stages over TCP: a plan whose devices sit on several machines runs as one process
//! per machine joined by sockets (here: the head and stage workers on threads of the
//! test, over loopback) and computes exactly the tokens and logits of the same plan
//! in one process — the head on host 0 or not, two or three machines, weights and KV
//! on every tier, host attention, every schedule.

mod common;

use std::net::TcpListener;
use std::path::Path;

use ferry_core::catalog::Catalog;
use ferry_core::hardware::Hardware;
use ferry_core::machine::HostProfile;
use ferry_core::model::Dtype;
use ferry_core::plan::{HardwareRef, Models, Plan, Policy, Schedule, Tier, TierCounts, Workload};
use ferry_core::profile::Profile;
use ferry_core::schedule::{lower, Steps};
use ferry_core::topology::{DeviceSlot, Place, Resource};
use ferry_core::units::{KIB, MIB};
use ferry_engine::backend::CpuBackend;
use ferry_engine::stages::{run_head, serve, Worker};
use ferry_engine::weights::ModelFiles;
use ferry_engine::{run, RunOptions, RunReport};

use common::{assert_same, staged, tiny_model};

fn profile(gpu: &str, host: &str) -> (Profile, Hardware) {
    let catalog = Catalog::builtin().unwrap();
    let hardware = Hardware { gpu: catalog.gpu(gpu).unwrap().value, host: catalog.host(host).unwrap().value };
    let mut p = Profile::from_datasheet(&hardware);
    p.memory_reserve_fraction = 0.0;
    (p, hardware)
}

/// `base`'s kind of device, one per entry of `hosts` (the host it sits on), 32 MiB each.
fn machine(base: &(Profile, Hardware), hosts: &[u16]) -> Profile {
    let mut p = base.0.clone();
    p.devices = hosts.iter().map(|&host| DeviceSlot { host, memory_bytes: 32 * MIB, profile: None }).collect();
    let count = hosts.iter().copied().max().unwrap_or(0);
    p.hosts = (0..count).map(|_| HostProfile::from_datasheet(&base.1)).collect();
    p
}

fn options(dir: &Path, workload: &Workload, vocab: u64) -> RunOptions {
    let prompts = (0..workload.batch_size)
        .map(|s| (0..workload.prompt_len).map(|t| ((s * 131 + t * 17 + 3) % vocab) as u32).collect())
        .collect();
    RunOptions {
        prompts,
        scratch_dir: dir.join("scratch"),
        allow_buffered_io: true,
        keep_logits: true,
        progress: None,
        draft_files: None,
    }
}

/// The plan in one process on one machine (every device on host 0).
fn in_one_process(
    dir: &Path,
    files: &ModelFiles,
    policy: &Policy,
    workload: &Workload,
    profile: &Profile,
) -> RunReport {
    let mut one = profile.clone();
    one.hosts.clear();
    for slot in &mut one.devices {
        slot.host = 0;
    }
    let graph = lower(policy, &files.spec, workload, &one, &Steps::Bound).unwrap();
    run(&graph, policy, workload, files, &CpuBackend::default(), &options(dir, workload, files.spec.vocab_size))
        .unwrap()
}

/// The plan over its machines: a stage worker on a thread per host other than the
/// head's, each serving one run on its own loopback port.
fn over_tcp(dir: &Path, files: &ModelFiles, policy: &Policy, workload: &Workload, profile: &Profile) -> RunReport {
    over_tcp_via(dir, files, policy, workload, profile, |_, address| address)
}

/// `over_tcp`, the workers' addresses passed through `route` (host, address) first.
fn over_tcp_via(
    dir: &Path,
    files: &ModelFiles,
    policy: &Policy,
    workload: &Workload,
    profile: &Profile,
    route: impl Fn(u16, String) -> String,
) -> RunReport {
    let graph = lower(policy, &files.spec, workload, profile, &Steps::Bound).unwrap();
    let head = profile.device(policy.first_device()).host;
    let hosts: Vec<u16> = (0..profile.host_count() as u16).filter(|&h| h != head).collect();
    let plan = Plan {
        models: Models::target("test-tiny"),
        hardware: HardwareRef::default(),
        workload: *workload,
        policy: policy.clone(),
        predicted: None,
    };
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        let mut threads = Vec::new();
        for &host in &hosts {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            workers.push((host, route(host, listener.local_addr().unwrap().to_string())));
            threads.push(scope.spawn(move || {
                let worker =
                    Worker { files: Some(files), backend: &CpuBackend::default(), scratch_dir: dir.join("scratch") };
                serve(&listener, &worker)
            }));
        }
        let options = options(dir, workload, files.spec.vocab_size);
        let report = run_head(&graph, &plan, profile, files, &CpuBackend::default(), &options, &workers);
        for thread in threads {
            thread.join().unwrap().unwrap();
        }
        report.unwrap_or_else(|e| panic!("{e}"))
    })
}

#[test]
fn stages_over_tcp_compute_the_tokens_and_logits_of_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_model(dir.path());
    let spec = files.spec.clone();
    let workload = Workload { batch_size: 4, prompt_len: 6, gen_len: 4 };
    let cpu = profile("cpu", "ferry-ci-vm");
    let discrete = profile("rtx3060-12gb", "desktop-pcie4");
    let all = |tier: Tier, n: u64| TierCounts::all(tier, n);
    let mixed = |n: u64| TierCounts { device: 1, host: 0, disk: n - 1 };
    let base = Policy {
        chunk_bytes: 16 * KIB,
        io_queue_depth: 2,
        prefetch_depth: 2,
        micro_batch_size: 2,
        num_micro_batches: 2,
        ..Policy::all_on_device(spec.num_layers, 2, Dtype::F32)
    };
    let mut cases: Vec<(String, Policy, Profile)> = Vec::new();
    for schedule in Schedule::ALL {
        let p = Policy { schedule, ..base.clone() };
        let resident = staged(&p, &[2, 2], &[0, 1], |_, n| [all(Tier::Device, n); 3]);
        cases.push((format!("{schedule:?}: 2 machines, resident"), resident, machine(&cpu, &[0, 1])));
    }
    // The first stage on host 1's device: the head is host 1, host 0 a worker.
    let reversed = staged(&base, &[1, 3], &[1, 0], |i, n| {
        if i == 0 {
            [all(Tier::Disk, n), all(Tier::Device, n), all(Tier::Disk, n)]
        } else {
            [mixed(n), all(Tier::Disk, n), mixed(n)]
        }
    });
    cases.push(("2 machines, streamed, head on host 1".into(), reversed, machine(&cpu, &[0, 1])));
    // Three machines: workers join each other too.
    let three = staged(&base, &[1, 1, 2], &[0, 1, 2], |i, n| {
        [if i == 1 { all(Tier::Disk, n) } else { all(Tier::Device, n) }, mixed(n), all(Tier::Device, n)]
    });
    cases.push(("3 machines".into(), three, machine(&cpu, &[0, 1, 2])));
    // Discrete devices: host-resident weights and KV on each machine, host attention,
    // embeddings and head on the hosts.
    let mut q = base.clone();
    q.host_attention = true;
    q.embeddings = Tier::Host;
    q.head = Tier::Host;
    q.copy_streams = 2;
    q.pinned_host_bytes = 256 * KIB;
    let gpus = staged(&q, &[2, 2], &[0, 1], |i, n| {
        let host = TierCounts { device: 1, host: 1, disk: n - 2 };
        if i == 0 {
            [host, mixed(n), host]
        } else {
            [TierCounts { device: 0, host: 1, disk: n - 1 }, host, mixed(n)]
        }
    });
    cases.push(("2 discrete machines, host attention".into(), gpus, machine(&discrete, &[0, 1])));

    for (what, policy, profile) in &cases {
        let reference = in_one_process(dir.path(), &files, policy, &workload, profile);
        let report = over_tcp(dir.path(), &files, policy, &workload, profile);
        assert_same(&reference, &report, what);
        // The head's trace covers every machine's tasks: each stage's device computed,
        // and the hidden state crossed the network link.
        for stage in &policy.stages {
            let compute = Resource::compute(Place::Device(stage.device));
            assert!(report.metrics.utilization(compute) > 0.0, "{what}: device {} never computed", stage.device);
        }
        let crossed = report.metrics.resources.iter().any(|r| {
            matches!(r.resource, Resource::Link { from, to } if profile.host_of(from) != profile.host_of(to))
                && r.busy_ns > 0
        });
        assert!(crossed, "{what}: nothing crossed between machines");
        assert_eq!(report.stage_processes.len(), profile.host_count() - 1, "{what}: one report per worker");
    }
}

#[test]
fn an_unreachable_stage_worker_is_an_error_naming_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_model(dir.path());
    let spec = files.spec.clone();
    let workload = Workload { batch_size: 2, prompt_len: 4, gen_len: 2 };
    let profile = machine(&profile("cpu", "ferry-ci-vm"), &[0, 1]);
    let base = Policy::all_on_device(spec.num_layers, 2, Dtype::F32);
    let policy = staged(&base, &[2, 2], &[0, 1], |_, n| [TierCounts::all(Tier::Device, n); 3]);
    let graph = lower(&policy, &files.spec, &workload, &profile, &Steps::Bound).unwrap();
    let plan = Plan {
        models: Models::target("test-tiny"),
        hardware: HardwareRef::default(),
        workload,
        policy: policy.clone(),
        predicted: None,
    };
    // A port nothing listens on: bound, then closed.
    let address = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let options = options(dir.path(), &workload, spec.vocab_size);
    let started = std::time::Instant::now();
    let workers = vec![(1, address.clone())];
    let err =
        run_head(&graph, &plan, &profile, &files, &CpuBackend::default(), &options, &workers).unwrap_err().to_string();
    assert!(err.contains(&address) && err.contains("node 1") && err.contains("cannot reach"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(15), "it waited {:?}", started.elapsed());
    // No worker given for a node the plan uses.
    let err = run_head(&graph, &plan, &profile, &files, &CpuBackend::default(), &options, &[]).unwrap_err().to_string();
    assert!(err.contains("node 1") && err.contains("no stage worker"), "{err}");
}

/// Relays connections to `upstream`, holding back the first one by `delay` while later
/// ones pass at once.
fn relay_delaying_the_first(upstream: String, delay: std::time::Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for (i, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { return };
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                if i == 0 {
                    std::thread::sleep(delay);
                }
                let server = std::net::TcpStream::connect(&upstream).unwrap();
                let (mut client_in, mut server_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let forward = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut client_in, &mut server_out);
                    let _ = server_out.shutdown(std::net::Shutdown::Write);
                });
                let (mut server_in, mut client_out) = (server, client);
                let _ = std::io::copy(&mut server_in, &mut client_out);
                let _ = client_out.shutdown(std::net::Shutdown::Write);
                let _ = forward.join();
            });
        }
    });
    address
}

/// The head connects to its workers in turn, and a worker set up by it connects to
/// the workers above it: the last worker may hear from a lower worker before it
/// accepts the head. It must keep that connection for the run, not take it for the
/// head's (which once left all three processes waiting on each other).
#[test]
fn a_worker_that_joins_before_the_head_connects_is_kept_for_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_model(dir.path());
    let workload = Workload { batch_size: 2, prompt_len: 4, gen_len: 2 };
    let profile = machine(&profile("cpu", "ferry-ci-vm"), &[0, 1, 2]);
    let base = Policy::all_on_device(files.spec.num_layers, 2, Dtype::F32);
    let policy = staged(&base, &[1, 1, 2], &[0, 1, 2], |_, n| [TierCounts::all(Tier::Device, n); 3]);
    let reference = in_one_process(dir.path(), &files, &policy, &workload, &profile);
    // Hang or not, the test ends: a deadlock is a failure, not a stuck CI.
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watched = finished.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(120));
        if !watched.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("the stages waited on each other for 2 minutes: deadlock");
            std::process::exit(101);
        }
    });
    // The head connects first to node 2 through the relay, which holds it back while
    // node 1 (set up before) joins node 2 through it.
    let delay = std::time::Duration::from_millis(1500);
    let report = over_tcp_via(dir.path(), &files, &policy, &workload, &profile, |host, address| {
        if host == 2 {
            relay_delaying_the_first(address, delay)
        } else {
            address
        }
    });
    finished.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_same(&reference, &report, "a worker joined before the head");
}

/// A client that greets and then says nothing does not hold the worker: `serve` gives
/// up on it within the connection timeout (checked from another thread, so that a
/// worker that waits forever fails the test instead of hanging it).
#[test]
fn a_connection_that_stops_after_the_greeting_is_dropped_within_the_timeout() {
    use std::io::Write;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let mut silent = std::net::TcpStream::connect(address).unwrap();
    silent.write_all(ferry_engine::stages::wire::MAGIC).unwrap();
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let backend = CpuBackend::default();
        let worker = Worker { files: None, backend: &backend, scratch_dir: std::env::temp_dir() };
        let _ = done.send(serve(&listener, &worker).map(|_| ()).map_err(|e| e.to_string()));
    });
    let limit = ferry_engine::stages::CONNECT_TIMEOUT + std::time::Duration::from_secs(5);
    let err = outcome.recv_timeout(limit).expect("the worker still waits on the silent client").unwrap_err();
    assert!(err.contains("could not read"), "{err}");
    drop(silent);
}
