//! ferry-profiler: measures this machine with the engine's own code paths and writes
//! a `Profile` whose provenance is `measured`: disk reads (direct I/O through the
//! engine's read pool) by request size and requests in flight, buffered writes, copies
//! between engine buffers, the engine's matrix products (peak rate, and the rate of
//! streaming bf16 weights through memory, which bounds small batches), the engine's
//! dequantization of each ggml block format (`dequant`), and how much compute slows
//! while a read runs.
//!
//! Must never: invent a number. Every figure in the output was measured here, as the
//! median of repeated trials with its spread; the only inputs that are not are the
//! memory sizes, read from /proc/meminfo.

pub mod acceptance;
pub mod cuda;
mod dequant;
mod disk;
mod kernel_table;
mod machine;
mod memory;

use disk::timed_release_ns_per_mib;
pub(crate) use disk::{measure_read_curve, read_bytes, ScratchDisk};
use kernel_table::{measure_kernel_table, measure_task_overhead};
pub(crate) use machine::{disk_free_bytes, meminfo_bytes};
pub use machine::{fingerprint, today};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ferry_core::model::{Dtype, WeightFormat};
use ferry_core::profile::{ComputeProfile, CurvePoint, Interference, Profile, Provenance, TransferCurve};
use ferry_core::units::{KIB, MIB};
use ferry_engine::backend::{Backend, CpuBackend, DeviceBuffer, WeightRef};
use ferry_engine::io::{DiskFile, ReadPool, ReadPriority};
use ferry_engine::kernels::{self, BlockOrder};
use ferry_engine::memory::Buffer;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Engine(#[from] ferry_engine::EngineError),
    #[error(transparent)]
    Core(#[from] ferry_core::CoreError),
    #[error("{0}")]
    Unsupported(String),
    /// The cuda backend cannot run here, or a CUDA call failed.
    #[error("cuda backend: {0}")]
    Cuda(String),
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> ProfileError + '_ {
    move |source| ProfileError::Core(ferry_core::CoreError::io(path, source))
}

impl ferry_core::Classify for ProfileError {
    fn kind(&self) -> ferry_core::ErrorKind {
        match self {
            ProfileError::Engine(e) => e.kind(),
            ProfileError::Core(e) => e.kind(),
            ProfileError::Unsupported(_) => ferry_core::ErrorKind::Usage,
            // No driver or library, or a CUDA call failed: the machine's.
            ProfileError::Cuda(_) => ferry_core::ErrorKind::Environment,
        }
    }
}

/// What the kernel table's copies of a model store their weights as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableWeights {
    /// Safetensors in a float dtype: the entries price every float format.
    Float(Dtype),
    /// GGUF files in ggml block formats, one copy per format (a Q4_K_M file's Q4_K and
    /// Q6_K), the format holding most bytes first (the slowdown beside reads is
    /// measured on its copy): each copy's entries price its format, and tasks whose
    /// weights mix them by each one's share.
    Blocks(Vec<kernels::quant::BlockFormat>),
}

/// How much to measure.
#[derive(Debug, Clone)]
pub struct ProfileOptions {
    /// Folder for the scratch file (created and removed).
    pub scratch_dir: PathBuf,
    /// Size of the scratch file; reads are timed over it.
    pub scratch_bytes: u64,
    /// Trials per measurement (the median is kept, the spread recorded).
    pub trials: usize,
    pub chunk_sizes: Vec<u64>,
    pub queue_depths: Vec<u32>,
    /// Also measure the engine's compute tasks at this model's shape (the kernel table).
    pub kernel_model: Option<(ferry_core::model::ModelSpec, TableWeights)>,
    /// Micro-batch sizes the kernel table is measured at.
    pub kernel_batches: Vec<u64>,
    /// Prompt length of the kernel-table runs (prefill rows = batch × this).
    pub kernel_prompt_len: u64,
    /// Runs per micro-batch size for the kernel table (a slow moment during one run
    /// would otherwise bias every entry of that size).
    pub kernel_runs: usize,
    /// Buffer the memory's read bandwidth is timed over: larger than any last-level
    /// cache (AMD's largest hold several hundred MiB).
    pub memory_read_bytes: u64,
}

impl ProfileOptions {
    /// Under a minute on the build machine.
    pub fn quick(scratch_dir: PathBuf) -> ProfileOptions {
        ProfileOptions {
            scratch_dir,
            scratch_bytes: 256 * MIB,
            trials: 3,
            chunk_sizes: vec![64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB],
            queue_depths: vec![1, 2, 4, 8],
            kernel_model: None,
            kernel_batches: vec![1, 2, 4, 8, 16],
            kernel_prompt_len: 32,
            kernel_runs: 2,
            memory_read_bytes: GIB_BYTES,
        }
    }

    /// A few minutes: a larger file, more trials, more sizes.
    pub fn full(scratch_dir: PathBuf) -> ProfileOptions {
        ProfileOptions {
            scratch_bytes: GIB_BYTES,
            trials: 5,
            chunk_sizes: vec![64 * KIB, 256 * KIB, MIB, 2 * MIB, 4 * MIB, 8 * MIB, 16 * MIB, 64 * MIB],
            kernel_runs: 3,
            ..ProfileOptions::quick(scratch_dir)
        }
    }
}

const GIB_BYTES: u64 = 1 << 30;

/// Median and relative spread ((max − min) ÷ median) of some measurements.
pub fn median_spread(values: &[f64]) -> (f64, f64) {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return (0.0, 0.0);
    }
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
    let spread = if median > 0.0 { (sorted[n - 1] - sorted[0]) / median } else { 0.0 };
    (median, spread)
}

/// Measures the cpu backend. `progress(step, fraction)` reports as it goes.
pub fn profile_cpu(options: &ProfileOptions, mut progress: impl FnMut(&str, f64)) -> Result<Profile, ProfileError> {
    let started = Instant::now();
    let scratch = ScratchDisk::create(options, &mut progress)?;
    let disk = &scratch.disk;
    let (write_points, read_latency_ns) = (scratch.write_points.clone(), scratch.read_latency_ns);

    // Disk reads: every request size × requests in flight, through the engine's read pool;
    // then the same while the engine's compute keeps every core busy.
    // Into recycled buffers, as the engine streams weights in steady state.
    let recycler = ferry_engine::memory::Recycler::new();
    recycler.set_limit(u64::MAX);
    let into_recycled = |pool: &ReadPool, offset: u64, bytes: u64, chunk: u64| {
        pool.read_recycled(disk, &[(offset, offset + bytes)], chunk, ReadPriority::Stream, &recycler)
    };
    let read_points = measure_read_curve(options, into_recycled, |done| progress("disk reads", done))?;
    let under_compute = {
        let _load = Background::compute()?;
        // Two trials each: a quick profile stays under a minute.
        let fewer = ProfileOptions { trials: options.trials.min(2), ..options.clone() };
        measure_read_curve(&fewer, into_recycled, |done| progress("disk reads under compute", done))?
    };
    drop(recycler);

    // Copies between engine buffers (host↔device on the cpu backend is a memcpy).
    progress("memory copies", 0.0);
    let mut copy_points = Vec::new();
    for &chunk in &[64 * KIB, MIB, 16 * MIB, 64 * MIB] {
        for threads in [1u32, 2] {
            let mut rates = Vec::new();
            for _ in 0..options.trials {
                rates.push(timed_copy(64 * MIB, chunk, threads)?);
            }
            let (gbps, spread) = median_spread(&rates);
            copy_points.push(CurvePoint { chunk_bytes: chunk, concurrency: threads, gbps, spread: Some(spread) });
        }
    }

    // With a model, the slowdown comes from the engine's own tasks beside the engine's
    // own reads (the kernel table's runs), a better measure than one long product.
    let host = measure_host_compute(options, disk, options.kernel_model.is_none(), &mut progress)?;
    let (table, slowdown) = match &options.kernel_model {
        Some((model, weights)) => {
            let table = measure_kernel_table(options, model, weights, disk, &CpuBackend::default(), &mut progress)?;
            (table.entries, table.slowdown_during_reads)
        }
        None => (Vec::new(), host.slowdown_during_reads.unwrap_or(0.0)),
    };
    progress("done", 1.0);

    let memory = meminfo_bytes("MemTotal:").unwrap_or(8 * GIB_BYTES);
    let compute = ComputeProfile { table, ..host.compute };
    let copies = TransferCurve { latency_ns: 0, points: copy_points };
    let profile = Profile {
        provenance: Provenance::Measured {
            machine: fingerprint(),
            date: today(),
            // Which kernels ran (few rows; many rows over bf16 weights; 8-bit x): the kernel
            // table and the peak hold their timings (`kernels::kernels_mismatch` tells a run
            // on others). And which pages the reads went
            // into: on some disks direct reads into small pages run several times
            // slower, so runs in the other mode are told (`memory::page_mode_mismatch`).
            backend: format!(
                "cpu, {}, {} (profiled in {:.0} s)",
                kernels::description(),
                ferry_engine::memory::page_mode(),
                started.elapsed().as_secs_f64()
            ),
        },
        device_name: "cpu".into(),
        unified_memory: true,
        device_memory_bytes: memory,
        host_memory_bytes: memory,
        max_pinned_bytes: memory / 2,
        memory_reserve_fraction: 0.0,
        disk_capacity_bytes: disk_free_bytes(&options.scratch_dir),
        disk_read: TransferCurve { latency_ns: read_latency_ns as u64, points: read_points },
        disk_write: TransferCurve { latency_ns: read_latency_ns as u64, points: write_points },
        host_to_device: copies.clone(),
        host_to_device_pageable: copies.clone(),
        device_to_host: copies,
        device_compute: compute.clone(),
        host_compute: compute,
        interference: Interference {
            device_compute_slowdown: slowdown,
            host_compute_slowdown: slowdown,
            disk_read_under_compute: Some(TransferCurve { latency_ns: read_latency_ns as u64, points: under_compute }),
            // Copies on the cpu backend are memcpys on the compute threads' memory bus;
            // their contention is in the compute slowdown above.
            copy_duplex_slowdown: 0.0,
        },
        devices: Vec::new(),
        links: Vec::new(),
        hosts: Vec::new(),
        acceptance: Vec::new(),
        drift: None,
    };
    profile.validate()?;
    Ok(profile)
}

/// The host CPU running the engine's kernels.
pub(crate) struct HostCompute {
    /// Rates without a kernel table.
    pub compute: ComputeProfile,
    /// Compute runs at 1 / (1 + this) while the read pool reads (when asked for).
    pub slowdown_during_reads: Option<f64>,
}

/// The engine's linear at a compute-bound shape (peak rate) and at one row over bf16
/// weights (the rate weights stream through memory); with `slowdown`, the same while
/// the read pool reads `disk`; and the engine's per-task overhead.
pub(crate) fn measure_host_compute(
    options: &ProfileOptions,
    disk: &Arc<DiskFile>,
    slowdown: bool,
    progress: &mut impl FnMut(&str, f64),
) -> Result<HostCompute, ProfileError> {
    progress("kernels", 0.0);
    // Over bf16 weights, the dtype of nearly every model run, with the backend's default
    // activations: on AMX machines its products run on the tiles, at several times the
    // f32 rate, and this is the rate prefill reaches there.
    let peaks =
        (0..options.trials).map(|_| timed_linear(256, 2048, 2048, Dtype::Bf16)).collect::<Result<Vec<_>, _>>()?;
    let (peak_flops, _) = median_spread(&peaks);
    progress("kernels", 0.5);
    let streams = || (0..options.trials).map(|_| timed_weight_stream(256 * MIB)).collect::<Result<Vec<_>, _>>();
    let (stream_bytes_per_s, _) = median_spread(&streams()?);
    let threads = ferry_engine::kernels::compute_pool().current_num_threads();
    let read_bytes_per_s = memory::read_bytes_per_s(options.memory_read_bytes, threads, options.trials)?;
    let slowdown_during_reads = if slowdown {
        progress("interference", 0.0);
        let _load = Background::reads(disk, options.scratch_bytes);
        let contended = median_spread(&streams()?).0;
        Some((stream_bytes_per_s / contended.max(1.0) - 1.0).max(0.0))
    } else {
        None
    };
    progress("dequantization", 0.0);
    let dequantize = dequant::measure_dequantize(options, peak_flops);
    progress("task overhead", 0.0);
    let task_costs =
        measure_task_overhead(&options.scratch_dir, peak_flops, stream_bytes_per_s, &CpuBackend::default())?;
    Ok(HostCompute {
        compute: ComputeProfile {
            peak_flops,
            // The memory's own rate, and the share of it one-row products reach: their
            // product is the products' measured rate (a faster product than the read,
            // within the noise of two measurements, counts as the memory's rate).
            memory_bytes_per_s: read_bytes_per_s.max(stream_bytes_per_s),
            // Measured rates are achieved rates.
            matmul_efficiency: 1.0,
            memory_efficiency: stream_bytes_per_s / read_bytes_per_s.max(stream_bytes_per_s),
            task_overhead_ns: task_costs.overhead_ns,
            handoff_ns: task_costs.handoff_ns,
            table: Vec::new(),
            release_ns_per_mib: timed_release_ns_per_mib(options, disk)?,
            dequantize,
        },
        slowdown_during_reads,
    })
}

/// Work repeated on a background thread until dropped: the load a measurement runs beside.
pub(crate) struct Background {
    stop: Arc<std::sync::atomic::AtomicBool>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    pub fn start(mut work: impl FnMut() + Send + 'static) -> Background {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let worker = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                work();
            }
        });
        // Let the load get going before anything is timed.
        std::thread::sleep(std::time::Duration::from_millis(20));
        Background { stop, worker: Some(worker) }
    }

    /// The engine's decode-sized linear (one row over bf16 weights, on the engine's
    /// compute threads), over and over.
    pub fn compute() -> Result<Background, ProfileError> {
        let (k, n) = (2048usize, 8192usize);
        let x = on_device(&f32_bytes(&vec![0.5f32; k]))?;
        let weights = on_device(&vec![0x3fu8; n * k * 2])?;
        let mut out = on_device(&vec![0u8; n * 4])?;
        Ok(Background::start(move || {
            let matrix = WeightRef {
                memory: &weights,
                offset: 0,
                format: WeightFormat::Bf16,
                rows: n,
                cols: k,
                order: BlockOrder::Rows,
            };
            // A load only: its result is not read, and the same call succeeded when timed.
            let _ = CpuBackend::default().linear(&x, kernels::Rows::all(1), matrix, &mut out, n, 0);
        }))
    }

    /// The engine's read pool streaming the scratch file into recycled buffers, as
    /// weight loads do: 4 MiB requests, 4 in flight.
    pub fn reads(disk: &Arc<DiskFile>, scratch_bytes: u64) -> Background {
        let disk = Arc::clone(disk);
        let pool = ReadPool::new(4);
        let recycler = ferry_engine::memory::Recycler::new();
        recycler.set_limit(u64::MAX);
        Background::start(move || {
            let _ = pool.read_recycled(
                &disk,
                &[(0, scratch_bytes.min(64 * MIB))],
                4 * MIB,
                ReadPriority::Stream,
                &recycler,
            );
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Copies `bytes` between two engine buffers in `chunk` pieces on `threads` threads; GB/s.
/// Both are mapped and touched first: the engine copies into recycled buffers, so in
/// steady state no copy pays for page faults.
fn timed_copy(bytes: u64, chunk: u64, threads: u32) -> Result<f64, ProfileError> {
    let mut src = Buffer::new(bytes as usize).map_err(io_error(Path::new("memory")))?;
    let mut dst = Buffer::new(bytes as usize).map_err(io_error(Path::new("memory")))?;
    src.as_mut_slice().fill(1);
    dst.as_mut_slice().fill(0);
    let per = bytes as usize / threads as usize;
    let start = Instant::now();
    std::thread::scope(|scope| {
        for (s, d) in src.as_slice().chunks(per).zip(dst.as_mut_slice().chunks_mut(per)) {
            scope.spawn(move || {
                for (a, b) in s.chunks(chunk as usize).zip(d.chunks_mut(chunk as usize)) {
                    b.copy_from_slice(a);
                }
            });
        }
    });
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e9)
}

/// Host bytes as memory of the cpu backend's device, as the engine keeps resident
/// weights (and activations: small ones, which the same call maps as small pages).
fn on_device(bytes: &[u8]) -> Result<DeviceBuffer, ProfileError> {
    let mut buffer = Buffer::resident(bytes.len()).map_err(io_error(Path::new("memory")))?;
    buffer.as_mut_slice().copy_from_slice(bytes);
    Ok(DeviceBuffer::from_mapped(buffer))
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The engine's linear as its forward pass calls it — through the cpu backend, on
/// buffers in its memory — for `m` rows of `x` over an `n × k` weight stored as
/// `dtype`: seconds of one call (`warm`: after one untimed call).
fn timed_backend_linear(
    x: &[f32],
    m: usize,
    weights: &[u8],
    dtype: Dtype,
    n: usize,
    warm: bool,
) -> Result<f64, ProfileError> {
    let k = x.len() / m;
    let (x, w) = (on_device(&f32_bytes(x))?, on_device(weights)?);
    let format = WeightFormat::from_dtype(dtype).unwrap_or(WeightFormat::F32);
    let matrix = WeightRef { memory: &w, offset: 0, format, rows: n, cols: k, order: BlockOrder::Rows };
    let mut out = on_device(&vec![0u8; m * n * 4])?;
    if warm {
        CpuBackend::default().linear(&x, kernels::Rows::all(m), matrix, &mut out, n, 0)?;
    }
    let start = Instant::now();
    CpuBackend::default().linear(&x, kernels::Rows::all(m), matrix, &mut out, n, 0)?;
    Ok(start.elapsed().as_secs_f64())
}

/// FLOP/s of the engine's linear for an m × n × k product.
pub(crate) fn timed_linear(m: usize, n: usize, k: usize, dtype: Dtype) -> Result<f64, ProfileError> {
    let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 / 13.0).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 / 7.0 - 0.5).collect();
    let mut bytes = vec![0u8; n * k * kernels::element_bytes(dtype)];
    kernels::from_f32(dtype, &w, &mut bytes);
    Ok(2.0 * (m * n * k) as f64 / timed_backend_linear(&x, m, &bytes, dtype, n, true)?)
}

/// Bytes/s at which the engine's linear consumes bf16 weights at one row: the rate that
/// bounds decode compute when weights are streamed through memory.
pub(crate) fn timed_weight_stream(bytes: u64) -> Result<f64, ProfileError> {
    let k = 2048usize;
    let n = (bytes as usize / 2) / k;
    let x = vec![0.5f32; k];
    let data = vec![0x3fu8; n * k * 2];
    Ok(bytes as f64 / timed_backend_linear(&x, 1, &data, Dtype::Bf16, n, false)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(median_spread(&[3.0, 1.0, 2.0]), (2.0, 1.0));
        assert_eq!(median_spread(&[4.0, 2.0]), (3.0, 2.0 / 3.0));
        assert_eq!(median_spread(&[]), (0.0, 0.0));
    }

    #[test]
    fn dates_are_civil() {
        let date = today();
        assert_eq!(date.len(), 10);
        assert!(date.starts_with("20"), "{date}");
    }

    /// A tiny real profile: every figure positive, provenance measured, YAML round trip.
    #[test]
    fn a_small_profile_is_measured_and_valid() {
        let dir = tempfile::tempdir().unwrap();
        let options = ProfileOptions {
            scratch_dir: dir.path().to_path_buf(),
            scratch_bytes: 32 * MIB,
            trials: 2,
            chunk_sizes: vec![256 * KIB, 4 * MIB],
            queue_depths: vec![1, 4],
            kernel_model: Some((
                ferry_core::catalog::Catalog::builtin().unwrap().model("test-tiny").unwrap().value,
                TableWeights::Float(Dtype::F32),
            )),
            kernel_batches: vec![1, 2],
            kernel_prompt_len: 4,
            kernel_runs: 1,
            memory_read_bytes: 64 * MIB,
        };
        let mut steps = Vec::new();
        let profile = profile_cpu(&options, |step, _| steps.push(step.to_string())).unwrap();
        assert!(profile.is_measured());
        assert_eq!(profile.disk_read.points.len(), 4);
        assert!(profile.disk_read.points.iter().all(|p| p.gbps > 0.0 && p.spread.is_some()));
        assert!(profile.device_compute.peak_flops > 1e9, "{}", profile.device_compute.peak_flops);
        assert!(profile.device_compute.memory_bytes_per_s > 1e8);
        // The memory's read rate, and the share of it one-row products reach.
        let efficiency = profile.device_compute.memory_efficiency;
        assert!(efficiency > 0.0 && efficiency <= 1.0, "{efficiency}");
        assert!(profile.device_compute.task_overhead_ns > 0, "the engine's per-task cost is measured");
        // Two thread wake-ups between one task and the next: never free.
        assert!(profile.device_compute.handoff_ns > 0, "the scheduler's hand-over is measured");
        // Every block format the engine decodes has a measured dequantization rate.
        let formats: Vec<&str> = profile.device_compute.dequantize.iter().map(|d| d.format.as_str()).collect();
        assert_eq!(
            formats,
            [
                "q8_0", "q4_0", "q5_0", "q4_k", "q5_k", "q6_k", "q3_k", "q2_k", "iq4_nl", "iq4_xs", "q4_1", "q5_1",
                "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m"
            ]
        );
        // The kernel table holds the engine's ops at the test-tiny shape, decode and prefill rows.
        let table = &profile.device_compute.table;
        for op in ["attention", "mlp", "head", "embed"] {
            assert!(table.iter().any(|e| e.op == op && e.shape == "128x352" && e.ns > 0), "no {op} entry");
        }
        assert!(table.iter().all(|e| e.format.is_none()), "float weights: entries for every float format");
        assert!(table.iter().any(|e| e.op == "mlp" && e.tokens == 8), "prefill rows = batch 2 × prompt 4");
        assert!(steps.contains(&"disk reads".to_string()) && steps.last().map(String::as_str) == Some("done"));
        let text = ferry_core::yaml::to_yaml_string(&profile).unwrap();
        let back: Profile = ferry_core::yaml::from_yaml_str(&text, "profile.yaml").unwrap();
        assert_eq!(back.disk_read.points.len(), 4);
        assert_eq!(back.device_compute.dequantize, profile.device_compute.dequantize);
        // The scratch file is gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
