//! `ferry`: the command-line front end. The only crate that prints for people;
//! everything it shows is computed by the library crates.

mod catalog_cmds;
mod check_cmd;
mod check_model;
mod check_vllm;
mod engine_cmds;
mod export_cmd;
mod plots_cmd;
mod report;
mod run_cmd;
mod simulate_cmd;
mod stages_cmd;
mod table;
mod tune_cmd;
mod tune_formats;
mod tune_output;
mod tune_pipeline;
mod tune_speculative;
mod validate_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry_core::{Classify, ErrorKind};

/// Plan, predict and run LLM inference on GPUs (or CPUs) too small for the model.
///
/// Start with `ferry tune --gpu rtx3060 --model 13b`; list what the catalog knows
/// with `ferry list gpus|models|hosts`.
#[derive(Parser)]
#[command(name = "ferry", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the catalog's GPUs, models, host presets or disks.
    List(catalog_cmds::ListArgs),
    /// Show one catalog entry in detail (a model's memory breakdown, a GPU's figures).
    Show(catalog_cmds::ShowArgs),
    /// Predict one plan with the discrete-event simulator: tokens/s, time to first
    /// token, utilization and peak memory; optionally a Chrome/Perfetto trace.
    Simulate(simulate_cmd::SimulateArgs),
    /// Find the best plan for a GPU (or the CPU) and a model: placement, batching,
    /// schedule and transfer knobs, with predicted speed, memory and utilization.
    Tune(Box<tune_cmd::TuneArgs>),
    /// Translate a plan into llama.cpp, vLLM, Accelerate, FlexGen or prima.cpp settings
    /// (each node's commands for a plan over several machines), and list what each
    /// cannot express.
    Export(export_cmd::ExportArgs),
    /// Check a llama.cpp or vLLM command line you already have: memory per device at
    /// what it allocates, whether it runs out, its predicted speed, the largest -ngl
    /// that fits, and Ferry's plan at that budget (`ferry check --gpu G -- llama-server ...`).
    Check(check_cmd::CheckArgs),
    /// Write a Hugging Face style model folder with deterministic random weights.
    Synth(engine_cmds::SynthArgs),
    /// Execute a plan for real on the engine (weights streamed from disk within the
    /// plan's memory budget) and report measured speed next to the prediction.
    Run(run_cmd::RunArgs),
    /// Serve one machine's stages of a plan that spans several machines: the head
    /// (`ferry run --worker NODE=ADDR`) connects, hands over the plan and gathers the trace.
    StageWorker(stages_cmd::StageWorkerArgs),
    /// Measure this machine (disk, copies, kernels) with the engine's own code paths and
    /// write a profile for `ferry tune --profile`.
    Profile(engine_cmds::ProfileArgs),
    /// Predict and run many plans on this machine; report prediction error and rank
    /// correlation, and fail (exit 1) past a tolerance.
    Validate(validate_cmd::ValidateArgs),
}

fn main() -> ExitCode {
    end_quietly_on_broken_pipe();
    remove_temporary_files_on_interrupt();
    let cli = Cli::parse();
    // Every command returns its exit status: 0, or 1 when validation fails its tolerances.
    let result: anyhow::Result<u8> = match cli.command {
        Command::List(args) => catalog_cmds::list(args).map(|()| 0),
        Command::Show(args) => catalog_cmds::show(args).map(|()| 0),
        Command::Simulate(args) => simulate_cmd::run(args).map(|()| 0),
        Command::Tune(args) => tune_cmd::run(*args).map(|()| 0),
        Command::Export(args) => export_cmd::run(args).map(|()| 0),
        Command::Check(args) => check_cmd::run(args),
        Command::Synth(args) => engine_cmds::synth(args).map(|()| 0),
        Command::Run(args) => run_cmd::run_plan(args).map(|()| 0),
        Command::StageWorker(args) => stages_cmd::stage_worker(args).map(|()| 0),
        Command::Profile(args) => engine_cmds::profile(args).map(|()| 0),
        Command::Validate(args) => validate_cmd::validate(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(exit_status(&err))
        }
    }
}

/// Restores the default action of SIGPIPE, which the Rust runtime ignores: output piped
/// into a reader that stops early (`ferry show model 13b | head`) then ends the program
/// quietly, as for other command-line tools, instead of `println!` panicking on EPIPE.
/// Ferry writes to no other pipes or sockets, so only stdout and stderr are affected.
fn end_quietly_on_broken_pipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in `main`, before any other thread exists; it only
    // changes the disposition of one signal to the system default.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// SIGINT and SIGTERM end the program as before, but first remove the temporary files
/// of the atomic writes in progress (`ferry_core::atomic`), which the default action
/// would leave behind. Both signals are blocked in every thread (threads inherit the
/// mask of the one that spawns them, and this runs before any other exists) and one
/// thread takes them with `sigwait`, so the clean-up runs as ordinary code, not in a
/// signal handler. The exit status is the shells' 128 + signal: 130 and 143.
fn remove_temporary_files_on_interrupt() {
    #[cfg(unix)]
    {
        // SAFETY: `sigset_t` is plain data that sigemptyset initializes; the calls only
        // read and write that local set and this thread's signal mask.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            set
        };
        let waiter = std::thread::Builder::new().name("signals".into()).spawn(move || loop {
            let mut signal = 0;
            // SAFETY: sigwait reads the initialized set and writes one integer.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                ferry_core::atomic::remove_live_temps();
                std::process::exit(128 + signal);
            }
        });
        if waiter.is_err() {
            // Without the waiting thread, the signals must keep ending the program.
            // SAFETY: as above, on this thread's mask.
            unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
        }
    }
}

/// The exit status follows from the kind of the first typed error in the chain, the
/// same way in every command: 2 for mistakes in what the user asked (unknown names,
/// malformed or missing files, impossible budgets), 1 for everything else, as clap
/// does for bad flags. An error no library classified is Ferry's own: 1.
fn exit_status(err: &anyhow::Error) -> u8 {
    err.chain().find_map(kind_of).map_or(1, ErrorKind::exit_status)
}

fn kind_of(cause: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    fn kind<E: Classify + std::error::Error + 'static>(cause: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
        cause.downcast_ref::<E>().map(Classify::kind)
    }
    kind::<ferry_core::CoreError>(cause)
        .or_else(|| kind::<ferry_engine::EngineError>(cause))
        .or_else(|| kind::<ferry_sim::SimError>(cause))
        .or_else(|| kind::<ferry_sim::tune::TuneError>(cause))
        .or_else(|| kind::<ferry_profiler::ProfileError>(cause))
        .or_else(|| kind::<ferry_reports::ReportError>(cause))
        .or_else(|| kind::<ferry_validate::ValidateError>(cause))
}
