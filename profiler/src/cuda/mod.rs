//! `ferry profile --backend cuda`: measures an NVIDIA GPU through the CUDA driver API
//! and cuBLAS (cudarc, libraries loaded at run time, so Ferry builds and runs on
//! machines without CUDA and says so plainly when asked to profile one).
//!
//! Measured: host→device and device→host copies from pinned and pageable memory by
//! chunk size and copy streams; both directions at once (the duplex slowdown); cuBLAS
//! bf16 GEMMs at the model's projection shapes and batched GEMMs for attention scores;
//! the cost of one small cuBLAS call (the per-kernel launch overhead); device memory
//! bandwidth (device-to-device copies); GEMM slowdown while a copy runs; disk reads
//! into pinned memory by request size × requests in flight; the host CPU's compute.
//!
//! Split so that everything but the device calls is testable here: chunk schedules,
//! the kernel table composed from GEMM timings, and assembling the `Profile` are pure
//! functions with unit tests; `device` holds the calls that need a GPU.

use ferry_core::model::ModelSpec;
use ferry_core::profile::{ComputeProfile, CurvePoint, Interference, KernelTiming, Profile, Provenance, TransferCurve};

use crate::ProfileError;

/// Whether the CUDA driver and cuBLAS can be loaded; the error says what is missing.
/// Must be called before any other CUDA call: cudarc panics when a library is absent.
/// The check is the engine's (`ferry_engine::backend::cuda`), whose device primitives
/// this profiler measures with.
pub fn check_libraries() -> Result<(), ProfileError> {
    ferry_engine::backend::cuda::check_libraries().map_err(|e| match e {
        ferry_engine::EngineError::Device(message) => ProfileError::Cuda(message),
        other => ProfileError::Engine(other),
    })
}

/// How `total_bytes` is copied as `chunk_bytes` pieces over `streams` streams: piece i
/// goes to stream i mod `streams`, in order, so each stream's pieces are contiguous in
/// time and every stream has work until the last round. Returns (offset, length) per
/// stream.
pub fn chunk_schedule(total_bytes: u64, chunk_bytes: u64, streams: u32) -> Vec<Vec<(u64, u64)>> {
    let chunk = chunk_bytes.max(1);
    let mut schedule = vec![Vec::new(); streams.max(1) as usize];
    let mut offset = 0;
    let mut piece = 0usize;
    while offset < total_bytes {
        let len = chunk.min(total_bytes - offset);
        let lanes = schedule.len();
        schedule[piece % lanes].push((offset, len));
        offset += len;
        piece += 1;
    }
    schedule
}

pub use ferry_engine::backend::cuda::GemmShape;

/// Attention scores and weighted values for one task: `sequences × heads` products of
/// `queries` rows against `context` keys of `head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttentionShape {
    pub batch: u64,
    pub queries: u64,
    pub context: u64,
    pub head_dim: u64,
}

/// The GEMMs each of the graph's compute operations performs at `tokens` rows.
pub fn op_gemms(model: &ModelSpec, op: &str, tokens: u64) -> Vec<GemmShape> {
    let (hidden, inter) = (model.hidden_size, model.intermediate_size);
    let q_width = model.num_heads * model.head_dim();
    let qkv = GemmShape { m: tokens, n: q_width + 2 * model.kv_dim(), k: hidden };
    let out = GemmShape { m: tokens, n: hidden, k: q_width };
    match op {
        "attn-qkv" => vec![qkv],
        "attn-out" => vec![out],
        "attention" => vec![qkv, out],
        "mlp" => vec![
            GemmShape { m: tokens, n: inter, k: hidden },
            GemmShape { m: tokens, n: inter, k: hidden },
            GemmShape { m: tokens, n: hidden, k: inter },
        ],
        "head" => vec![GemmShape { m: tokens, n: model.vocab_size, k: hidden }],
        _ => Vec::new(),
    }
}

/// The attention-core products of a task with `tokens` rows at `context`: a prefill
/// task holds whole prompts (`tokens` a multiple of `context`, every query of a
/// sequence at once), a decode task one new query per sequence.
pub fn attention_shape(model: &ModelSpec, tokens: u64, context: u64) -> AttentionShape {
    let (sequences, queries) = if context > 0 && tokens >= context && tokens.is_multiple_of(context) {
        (tokens / context, context)
    } else {
        (tokens, 1)
    };
    AttentionShape { batch: sequences * model.num_heads, queries, context: context.max(1), head_dim: model.head_dim() }
}

/// Kernels besides the GEMMs each operation launches (norms, rotary embedding,
/// softmax, SwiGLU, residual adds, sampling): each costs one launch overhead.
fn extra_launches(op: &str) -> u64 {
    match op {
        "attn-qkv" => 3,
        "attn-core" => 1,
        "attn-out" => 1,
        "attention" => 5,
        "mlp" => 3,
        "head" => 3,
        _ => 1,
    }
}

/// The (tokens, context) points a kernel table covers: prefill (batch × prompt rows at
/// the prompt's context) and decode (batch rows at the context halfway through
/// generation) for each batch size.
pub fn table_points(batches: &[u64], prompt_len: u64, gen_len: u64) -> Vec<(u64, u64)> {
    let mut points = Vec::new();
    for &batch in batches {
        points.push((batch * prompt_len, prompt_len));
        points.push((batch, prompt_len + gen_len.div_ceil(2)));
    }
    points.sort_unstable();
    points.dedup();
    points
}

/// A kernel table for the graph's operations at `model`'s shape, composed from
/// measured times: each operation is the sum of its GEMMs (`gemm_ns`), its
/// attention-core products (`attention_ns`) and one `launch_ns` per other kernel.
pub fn compose_kernel_table(
    model: &ModelSpec,
    points: &[(u64, u64)],
    gemm_ns: &dyn Fn(GemmShape) -> f64,
    attention_ns: &dyn Fn(AttentionShape) -> f64,
    launch_ns: f64,
) -> Vec<KernelTiming> {
    let shape = format!("{}x{}", model.hidden_size, model.intermediate_size);
    let mut table = Vec::new();
    for &(tokens, context) in points {
        for op in ["attn-qkv", "attn-core", "attn-out", "attention", "mlp", "head"] {
            // The head runs on each sequence's last position only.
            let rows =
                if op == "head" { attention_shape(model, tokens, context).batch / model.num_heads } else { tokens };
            let mut ns: f64 = op_gemms(model, op, rows).into_iter().map(gemm_ns).sum();
            if op == "attn-core" || op == "attention" {
                ns += attention_ns(attention_shape(model, tokens, context));
            }
            ns += extra_launches(op) as f64 * launch_ns;
            table.push(KernelTiming {
                op: op.to_string(),
                shape: shape.clone(),
                tokens: rows,
                context,
                ns: ns as u64,
                format: None,
            });
        }
    }
    table
}

/// Everything the cuda profiler measured, before it becomes a `Profile`.
#[derive(Debug, Clone)]
pub struct CudaMeasurements {
    pub device_name: String,
    pub device_memory_bytes: u64,
    pub host_memory_bytes: u64,
    pub host_to_device_pinned: Vec<CurvePoint>,
    pub host_to_device_pageable: Vec<CurvePoint>,
    pub device_to_host_pinned: Vec<CurvePoint>,
    /// Per-direction GB/s of large pinned copies, each alone and both at once.
    pub duplex_alone_gbps: f64,
    pub duplex_both_gbps: f64,
    /// Time of one small cuBLAS call back to back with others (launch overhead).
    pub launch_ns: f64,
    /// Best bf16 GEMM rate measured, FLOP/s.
    pub peak_flops: f64,
    /// Device-to-device copy rate counting both the read and the write, bytes/s.
    pub device_memory_bytes_per_s: f64,
    /// GEMM time while a host→device copy runs, over the time alone, minus one.
    pub compute_slowdown_during_copy: f64,
    pub disk_read: Vec<CurvePoint>,
    pub disk_write: Vec<CurvePoint>,
    pub read_latency_ns: f64,
    pub disk_capacity_bytes: Option<u64>,
    /// The host's CPU, measured with the engine's kernels (host attention, host layers).
    pub host_compute: ComputeProfile,
    pub host_compute_slowdown: f64,
    /// The engine's cost per compute task beyond its roofline (`engine`).
    pub task_overhead_ns: u64,
    /// The engine's hand-over between one compute task and the next (`engine`).
    pub handoff_ns: u64,
    /// The engine's cost of one small copy (`engine`): the copy curves' latency.
    pub copy_latency_ns: u64,
    /// The engine's tasks timed on the GPU (a float model), else cuBLAS's products
    /// composed (`compose_kernel_table`).
    pub kernel_table: Vec<KernelTiming>,
    pub machine: String,
    pub date: String,
    pub seconds: f64,
}

/// The profile of a measured GPU machine.
pub fn assemble(m: CudaMeasurements) -> Result<Profile, ProfileError> {
    let curve = |points: Vec<CurvePoint>| TransferCurve { latency_ns: m.copy_latency_ns, points };
    let duplex_slowdown =
        if m.duplex_both_gbps > 0.0 { (m.duplex_alone_gbps / m.duplex_both_gbps - 1.0).max(0.0) } else { 0.0 };
    let profile = Profile {
        provenance: Provenance::Measured {
            machine: m.machine,
            date: m.date,
            backend: format!("cuda: {} (profiled in {:.0} s)", m.device_name, m.seconds),
        },
        device_name: m.device_name,
        unified_memory: false,
        device_memory_bytes: m.device_memory_bytes,
        host_memory_bytes: m.host_memory_bytes,
        max_pinned_bytes: m.host_memory_bytes / 2,
        // CUDA context, cuBLAS workspace and fragmentation: FlexGen's margin.
        memory_reserve_fraction: ferry_core::profile::datasheet_assumptions::MEMORY_RESERVE_FRACTION,
        disk_capacity_bytes: m.disk_capacity_bytes,
        disk_read: TransferCurve { latency_ns: m.read_latency_ns as u64, points: m.disk_read },
        disk_write: TransferCurve { latency_ns: m.read_latency_ns as u64, points: m.disk_write },
        host_to_device: curve(m.host_to_device_pinned),
        host_to_device_pageable: curve(m.host_to_device_pageable),
        device_to_host: curve(m.device_to_host_pinned),
        device_compute: ComputeProfile {
            peak_flops: m.peak_flops,
            memory_bytes_per_s: m.device_memory_bytes_per_s,
            matmul_efficiency: 1.0,
            memory_efficiency: 1.0,
            task_overhead_ns: m.task_overhead_ns,
            handoff_ns: m.handoff_ns,
            table: m.kernel_table,
            // A GPU engine keeps freed device memory in a caching allocator.
            release_ns_per_mib: 0.0,
            // The engine has no GPU dequantization kernel to time yet: predictions
            // price quantized weights as dequantized inside the multiply, and say so.
            dequantize: Vec::new(),
        },
        host_compute: m.host_compute,
        interference: Interference {
            device_compute_slowdown: m.compute_slowdown_during_copy.max(0.0),
            host_compute_slowdown: m.host_compute_slowdown.max(0.0),
            // The reading threads share the CPU with host compute only; measured on the
            // cpu backend, not here (a GPU machine's host compute is a smaller share).
            disk_read_under_compute: None,
            copy_duplex_slowdown: duplex_slowdown,
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

/// What `profile_cuda` measures on the device.
#[derive(Debug, Clone)]
pub struct CudaOptions {
    pub device_ordinal: usize,
    /// Bytes per timed copy.
    pub copy_bytes: u64,
    pub copy_chunks: Vec<u64>,
    pub copy_streams: Vec<u32>,
}

impl CudaOptions {
    pub fn new(device_ordinal: usize, quick: bool) -> CudaOptions {
        use ferry_core::units::{KIB, MIB};
        CudaOptions {
            device_ordinal,
            copy_bytes: if quick { 256 * MIB } else { 1 << 30 },
            copy_chunks: vec![64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB],
            copy_streams: vec![1, 2, 4],
        }
    }
}

/// Measures the GPU `cuda.device_ordinal` and this host. Checks the libraries first.
pub fn profile_cuda(
    options: &crate::ProfileOptions,
    cuda: &CudaOptions,
    mut progress: impl FnMut(&str, f64),
) -> Result<Profile, ProfileError> {
    check_libraries()?;
    device::measure(options, cuda, &mut progress).and_then(assemble)
}

mod device;
mod engine;

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::catalog::Catalog;

    #[test]
    fn chunk_schedules_cover_every_byte_once_round_robin() {
        for (total, chunk, streams) in [(10u64, 3u64, 2u32), (1 << 20, 1 << 16, 4), (5, 10, 3), (0, 4, 2), (12, 4, 1)] {
            let schedule = chunk_schedule(total, chunk, streams);
            assert_eq!(schedule.len(), streams as usize);
            let mut pieces: Vec<(u64, u64)> = schedule.iter().flatten().copied().collect();
            pieces.sort_unstable();
            let mut next = 0;
            for (offset, len) in pieces {
                assert_eq!(offset, next, "pieces are contiguous and disjoint");
                assert!(len > 0 && len <= chunk);
                next += len;
            }
            assert_eq!(next, total);
            let counts: Vec<usize> = schedule.iter().map(Vec::len).collect();
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(max - min <= 1, "balanced: {counts:?}");
        }
        // Piece i goes to stream i mod streams.
        assert_eq!(chunk_schedule(10, 3, 2), vec![vec![(0, 3), (6, 3)], vec![(3, 3), (9, 1)]]);
    }

    fn llama_7b() -> ModelSpec {
        Catalog::builtin().unwrap().model("llama-2-7b").unwrap().value
    }

    #[test]
    fn each_operation_is_its_gemms_plus_launches() {
        let model = llama_7b();
        // A GEMM costs 1 ns per million multiply-adds; attention 1 ns per batch element.
        let gemm = |s: GemmShape| (s.m * s.n * s.k) as f64 / 1e6;
        let attention = |s: AttentionShape| s.batch as f64;
        let table = compose_kernel_table(&model, &[(4, 40)], &gemm, &attention, 1000.0);
        let ns = |op: &str| table.iter().find(|e| e.op == op).unwrap().ns;
        let (h, i) = (4096u64, 11008u64);
        assert_eq!(ns("mlp"), ((3 * 4 * h * i) as f64 / 1e6 + 3000.0) as u64);
        assert_eq!(ns("head"), ((4 * 32000 * h) as f64 / 1e6 + 3000.0) as u64);
        // Decode: one query per sequence, 4 sequences × 32 heads.
        assert_eq!(ns("attn-core"), (4.0 * 32.0 + 1000.0) as u64);
        let qkv = (4 * 3 * h * h) as f64 / 1e6;
        let out = (4 * h * h) as f64 / 1e6;
        assert_eq!(ns("attention"), (qkv + out + 128.0 + 5000.0) as u64);
        assert!(table.iter().all(|e| e.shape == "4096x11008"));
    }

    #[test]
    fn prefill_tasks_hold_whole_prompts() {
        let model = llama_7b();
        assert_eq!(
            attention_shape(&model, 64, 32),
            AttentionShape { batch: 64, queries: 32, context: 32, head_dim: 128 }
        );
        assert_eq!(
            attention_shape(&model, 2, 40),
            AttentionShape { batch: 64, queries: 1, context: 40, head_dim: 128 }
        );
        assert_eq!(table_points(&[1, 2], 32, 8), vec![(1, 36), (2, 36), (32, 32), (64, 32)]);
        // The head runs once per sequence, prefill included.
        let table = compose_kernel_table(&model, &[(64, 32)], &|s| s.m as f64, &|_| 0.0, 0.0);
        let head = table.iter().find(|e| e.op == "head").unwrap();
        assert_eq!((head.tokens, head.ns), (2, 2));
    }

    fn point(chunk_bytes: u64, concurrency: u32, gbps: f64) -> CurvePoint {
        CurvePoint { chunk_bytes, concurrency, gbps, spread: Some(0.01) }
    }

    #[test]
    fn measurements_become_a_valid_profile() {
        let host = ComputeProfile {
            peak_flops: 2e11,
            memory_bytes_per_s: 1e10,
            matmul_efficiency: 1.0,
            memory_efficiency: 1.0,
            task_overhead_ns: 90_000,
            handoff_ns: 12_000,
            table: Vec::new(),
            release_ns_per_mib: 50_000.0,
            dequantize: Vec::new(),
        };
        let measured = CudaMeasurements {
            device_name: "NVIDIA GeForce RTX 3060".into(),
            device_memory_bytes: 12 << 30,
            host_memory_bytes: 32 << 30,
            host_to_device_pinned: vec![point(1 << 20, 1, 11.0), point(1 << 24, 2, 12.5)],
            host_to_device_pageable: vec![point(1 << 20, 1, 5.0)],
            device_to_host_pinned: vec![point(1 << 20, 1, 12.0)],
            duplex_alone_gbps: 12.0,
            duplex_both_gbps: 8.0,
            launch_ns: 6_000.0,
            peak_flops: 5e13,
            device_memory_bytes_per_s: 3.2e11,
            compute_slowdown_during_copy: 0.03,
            disk_read: vec![point(1 << 22, 4, 2.5)],
            disk_write: vec![point(1 << 22, 1, 1.5)],
            read_latency_ns: 80_000.0,
            disk_capacity_bytes: Some(100 << 30),
            host_compute: host.clone(),
            host_compute_slowdown: 0.2,
            task_overhead_ns: 41_000,
            handoff_ns: 25_000,
            copy_latency_ns: 30_000,
            kernel_table: Vec::new(),
            machine: "test".into(),
            date: "2026-11-24".into(),
            seconds: 42.0,
        };
        let profile = assemble(measured).unwrap();
        assert!(profile.is_measured() && !profile.unified_memory);
        assert_eq!(profile.host_to_device.points.len(), 2);
        assert_eq!(profile.host_to_device_pageable.points[0].gbps, 5.0);
        assert_eq!(profile.device_to_host.points[0].gbps, 12.0);
        assert!((profile.interference.copy_duplex_slowdown - 0.5).abs() < 1e-12, "12 alone, 8 together");
        // The engine's own per-task and per-copy costs, not one cuBLAS launch.
        assert_eq!(profile.device_compute.task_overhead_ns, 41_000);
        assert_eq!(profile.device_compute.handoff_ns, 25_000);
        assert_eq!(profile.host_to_device.latency_ns, 30_000);
        assert_eq!(profile.device_to_host.latency_ns, 30_000);
        assert_eq!(profile.host_compute, host);
        assert_eq!(profile.disk_read.latency_ns, 80_000);
        // Round trip through YAML, as `ferry profile` writes it.
        let text = ferry_core::yaml::to_yaml_string(&profile).unwrap();
        assert!(text.contains("copy_duplex_slowdown"));
        let back: Profile = ferry_core::yaml::from_yaml_str(&text, "profile.yaml").unwrap();
        assert_eq!(back, profile);
    }

    /// On a machine without the NVIDIA driver (every CI machine), asking for the cuda
    /// backend is a clear error, not a panic; where a driver is present, the check passes.
    #[test]
    fn the_library_check_matches_what_is_installed() {
        // SAFETY: only tries to dlopen.
        let driver_present = unsafe { cudarc::driver::sys::is_culib_present() };
        match check_libraries() {
            Ok(()) => assert!(driver_present),
            Err(e) => {
                let message = e.to_string();
                if driver_present {
                    assert!(message.contains("cuBLAS"), "{message}");
                } else {
                    assert!(message.contains("no NVIDIA driver") && message.contains("--backend cpu"), "{message}");
                }
            }
        }
    }
}
