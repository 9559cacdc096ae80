//! ferry-engine: executes a plan's `TaskGraph` for real — weights read from disk with
//! direct I/O, held in budgeted memory, layers computed on the CPU — and records a
//! measured `Trace` of the same type the simulator predicts, so the two compare task
//! by task.
//!
//! Owns: safetensors reading/writing (`safetensors`), synthetic models (`synth`),
//! model validation (`weights`), page-aligned memory (`memory`), direct I/O
//! (`io`), the CPU kernels (`kernels`), the backend boundary (`backend`) and the
//! executor (`executor`).
//!
//! Must never: guess a duration (it measures), or hold memory its plan did not
//! account for beyond a small fixed overhead.

pub mod backend;
pub mod executor;
pub mod gguf_files;
pub mod gguf_write;
pub mod io;
pub mod kernels;
pub mod memory;
pub mod safetensors;
pub mod stages;
pub mod synth;
pub mod synth_gguf;
pub mod weights;

use std::path::{Path, PathBuf};

use ferry_core::{Classify, ErrorKind};

pub use executor::{ExpertUse, RunOptions, RunReport};

/// Runs a plan's graph on `files` (see `executor::run`), after refusing weight formats
/// the engine cannot execute.
pub fn run(
    graph: &ferry_core::graph::TaskGraph,
    policy: &ferry_core::plan::Policy,
    workload: &ferry_core::plan::Workload,
    files: &weights::ModelFiles,
    backend: &dyn backend::Backend,
    options: &RunOptions,
) -> Result<RunReport, EngineError> {
    check_weight_format(policy)?;
    check_one_machine(graph)?;
    executor::run(graph, policy, workload, files, backend, options)
}

/// Refuses a graph whose stages span several machines: one process runs the stages of
/// one host (several devices on it are fine); `stages` runs the others.
fn check_one_machine(graph: &ferry_core::graph::TaskGraph) -> Result<(), EngineError> {
    use ferry_core::graph::Place;
    match graph.pools.iter().find_map(|p| match p.pool {
        Place::Host(h) if h > 0 => Some(h),
        _ => None,
    }) {
        Some(host) => Err(EngineError::Unsupported(format!(
            "this plan's stages span several machines (it uses host {host}): it runs as one process per machine \
             (`stages::run_head` with a stage worker per other machine; `ferry run` starts them)"
        ))),
        None => Ok(()),
    }
}

/// Refuses a plan naming a weight format the engine has no kernels for: it runs f32,
/// f16, bf16 and ggml's block formats (`BlockFormat::ALL`; and a file's `stored` mix of those);
/// FlexGen's group-wise formats are planned and priced, not run.
pub fn check_weight_format(policy: &ferry_core::plan::Policy) -> Result<(), EngineError> {
    use ferry_core::model::{WeightFormat, WeightGroup};
    let groups = [WeightGroup::Embeddings, WeightGroup::Head, WeightGroup::Attention, WeightGroup::Mlp];
    for format in groups.into_iter().filter_map(|g| policy.weight_format.group(g)) {
        let runs = match format {
            WeightFormat::F32 | WeightFormat::F16 | WeightFormat::Bf16 => true,
            WeightFormat::Block(t) => kernels::quant::BlockFormat::from_ggml(t.name).is_some(),
            WeightFormat::Grouped { .. } => false,
        };
        if !runs {
            return Err(EngineError::Unsupported(format!(
                "this plan's weight format is {}; the engine runs f32, f16, bf16, {} weights, not {} \
                 (`ferry simulate` predicts the plan; tune with another --weight-format for a plan it runs)",
                policy.weight_format.describe(),
                kernels::quant::BlockFormat::listed(true),
                format.name()
            )));
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Core(#[from] ferry_core::CoreError),
    #[error("{file}: {message}")]
    BadWeights { file: PathBuf, message: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Refused(String),
    #[error("the plan does not match the model: {0}")]
    Mismatch(String),
    #[error("{0}")]
    Deadlock(String),
    /// An accelerator could not be used: no driver or library, or a device call failed.
    #[error("cuda backend: {0}")]
    Device(String),
    /// Stages over the network: a stage process unreachable, failed or gone.
    #[error("{0}")]
    Network(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// A file that could not be read or written (`CoreError::Io`, the one I/O error).
    pub fn io(path: &Path, source: std::io::Error) -> EngineError {
        EngineError::Core(ferry_core::CoreError::io(path, source))
    }

    /// Whether the user's input is at fault (bad files, mismatched plan, refused request).
    pub fn is_usage_error(&self) -> bool {
        self.kind() == ErrorKind::Usage
    }
}

impl Classify for EngineError {
    fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Core(e) => e.kind(),
            EngineError::BadWeights { .. }
            | EngineError::Unsupported(_)
            | EngineError::Refused(_)
            | EngineError::Mismatch(_) => ErrorKind::Usage,
            // A plan whose memory runs out mid-run was accepted by the checks: the
            // user's budget is too small for what the run needed.
            EngineError::Deadlock(_) => ErrorKind::Usage,
            EngineError::Device(_) | EngineError::Network(_) => ErrorKind::Environment,
            EngineError::Internal(_) => ErrorKind::Internal,
        }
    }
}
