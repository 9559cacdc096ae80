//! The engine's own compute on the GPU: its per-task cost and, for a float model, its
//! kernel table, timed through the cuda backend as the cpu profile times the cpu
//! backend. A prediction priced with these is a prediction of Ferry's engine on this
//! GPU, which `ferry validate --backend cuda` can check; cuBLAS's bf16 products at the
//! same shapes price a faster engine than Ferry's (measured on an H200: its attention
//! tasks 14×, MLP 4× and head 18× slower than that composition), so they remain only
//! where the cuda backend cannot run the model (block formats), as a floor.

use std::sync::Arc;

use ferry_core::profile::KernelTiming;
use ferry_engine::backend::cuda::CudaBackend;
use ferry_engine::io::DiskFile;

use crate::kernel_table::{measure_kernel_table, measure_task_overhead};
use crate::{ProfileError, ProfileOptions, TableWeights};

/// What the engine's tasks took on the GPU.
pub(super) struct EngineTimings {
    /// Median time a tiny model's compute task takes beyond its roofline, ns.
    pub task_overhead_ns: u64,
    /// The kernel table of `ProfileOptions::kernel_model` when it is a float model.
    pub table: Option<Vec<KernelTiming>>,
}

/// Times the engine's tasks on GPU `ordinal` (peak rate and device bandwidth as
/// measured, for the roofline the per-task cost is taken beyond).
pub(super) fn measure(
    options: &ProfileOptions,
    ordinal: usize,
    disk: &Arc<DiskFile>,
    peak_flops: f64,
    memory_bytes_per_s: f64,
    progress: &mut dyn FnMut(&str, f64),
) -> Result<EngineTimings, ProfileError> {
    progress("the engine's tasks on the GPU", 0.0);
    let backend = CudaBackend::open(ordinal)?;
    let task_overhead_ns = measure_task_overhead(&options.scratch_dir, peak_flops, memory_bytes_per_s, &backend)?;
    let table = match &options.kernel_model {
        Some((model, TableWeights::Float(dtype))) => Some(
            measure_kernel_table(options, model, TableWeights::Float(*dtype), disk, &backend, &mut |step, f| {
                progress(step, f)
            })?
            .entries,
        ),
        _ => None,
    };
    Ok(EngineTimings { task_overhead_ns, table })
}
