//! The engine's own compute on the GPU: its per-task cost and, for a float model, its
//! kernel table, timed through the cuda backend as the cpu profile times the cpu
//! backend. A prediction priced with these is a prediction of Ferry's engine on this
//! GPU, which `ferry validate --backend cuda` can check (its host tasks are timed on
//! the host CPU the same way). cuBLAS's bf16 products at the same shapes price a
//! faster engine than Ferry's (on an H200 at TinyLlama's shapes its attention tasks
//! took 4-10×, MLP 5-12× and head 10-41× that composition's time), so they remain only
//! where the cuda backend cannot run the model (block formats), as a floor.

use std::sync::Arc;

use ferry_core::profile::KernelTiming;
use ferry_engine::backend::cuda::{CudaBackend, HOST_KERNELS};
use ferry_engine::io::DiskFile;

use crate::kernel_table::{measure_kernel_table, measure_task_overhead, TaskCosts};
use crate::{ProfileError, ProfileOptions, TableWeights};

/// What the engine's tasks took on the GPU.
pub(super) struct EngineTimings {
    /// A tiny model's compute tasks beyond their roofline, and between them.
    pub task_costs: TaskCosts,
    /// The kernel table of `ProfileOptions::kernel_model` when it is a float model.
    pub table: Option<Vec<KernelTiming>>,
    /// The same model's tasks on the host CPU (empty without a float model).
    pub host_table: Vec<KernelTiming>,
    /// One small copy's time through the backend, ns: the copy curves' latency.
    pub copy_latency_ns: u64,
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
    let task_costs = measure_task_overhead(&options.scratch_dir, peak_flops, memory_bytes_per_s, &backend)?;
    let (table, host_table) = match &options.kernel_model {
        Some((model, TableWeights::Float(dtype))) => {
            let weights = TableWeights::Float(*dtype);
            let mut report = |step: &str, f: f64| progress(step, f);
            let device = measure_kernel_table(options, model, &weights, disk, &backend, &mut report)?.entries;
            // The same tasks on the host CPU, with the kernels and numerics the cuda
            // backend computes host places with (host attention, host layers, a head
            // on the host): the host's roofline priced them 2.6-7x fast on an H200
            // machine's 16-core host.
            report("the engine's tasks on the host", 0.0);
            let host = measure_kernel_table(options, model, &weights, disk, &HOST_KERNELS, &mut report)?.entries;
            (Some(device), host)
        }
        _ => (None, Vec::new()),
    };
    let copy_latency_ns = small_copy_ns(&backend)?;
    Ok(EngineTimings { task_costs, table, host_table, copy_latency_ns })
}

/// The engine's fixed cost of one copy between host and GPU memory (its activation
/// copies are a few KiB): the median of small copies each way through the backend,
/// which issues each on its thread's stream and waits for it. One cuBLAS launch (the
/// latency this replaces) priced them 4-6x fast on an H200.
fn small_copy_ns(backend: &CudaBackend) -> Result<u64, ProfileError> {
    use ferry_core::graph::Place;
    use ferry_engine::backend::Backend;
    const BYTES: usize = 16 << 10;
    let mut host = HOST_KERNELS.allocate(Place::HOST, BYTES)?;
    let mut device = backend.scratch(Place::DEVICE, BYTES)?;
    let mut times = Vec::new();
    for i in 0..41 {
        let start = std::time::Instant::now();
        if i % 2 == 0 {
            backend.copy(&host, 0, &mut device, 0, BYTES)?;
        } else {
            backend.copy(&device, 0, &mut host, 0, BYTES)?;
        }
        // The first copy each way warms the stream and the allocator up.
        if i >= 2 {
            times.push(start.elapsed().as_nanos() as f64);
        }
    }
    Ok(crate::median_spread(&times).0 as u64)
}
