//! The device half of `ferry profile --backend cuda`: the calls that need a GPU
//! (copies by chunk and streams, both directions at once, cuBLAS GEMMs, launch
//! overhead, device bandwidth, disk reads into pinned memory), made through the
//! engine's cuda primitives (`ferry_engine::backend::cuda`).
//! Not exercised on machines without a GPU; everything computed from their timings is
//! (see `super`).

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{result, CudaContext, CudaStream, DriverError};
use ferry_core::profile::CurvePoint;
use ferry_core::units::MIB;
use ferry_engine::backend::cuda::{copy_async, open_device, DeviceMemory, Direction, Gemm, PinnedMemory};

use super::{chunk_schedule, AttentionShape, CudaMeasurements, CudaOptions, GemmShape};
use crate::{median_spread, ProfileError, ProfileOptions};

fn driver(what: &str) -> impl Fn(DriverError) -> ProfileError + '_ {
    move |e| ProfileError::Cuda(format!("{what}: {e}"))
}

/// GB/s of copying `bytes` in `chunk` pieces spread over `streams` (see `chunk_schedule`).
fn timed_copy(
    streams: &[Arc<CudaStream>],
    direction: Direction,
    host: &mut [u8],
    device: &DeviceMemory,
    bytes: u64,
    chunk: u64,
) -> Result<f64, ProfileError> {
    let schedule = chunk_schedule(bytes.min(host.len() as u64).min(device.bytes as u64), chunk, streams.len() as u32);
    let start = Instant::now();
    for (stream, pieces) in streams.iter().zip(&schedule) {
        for &(offset, len) in pieces {
            let (offset, len) = (offset as usize, len as usize);
            // The host range is not touched until every stream is synchronised below.
            copy_async(stream, direction, &mut host[offset..offset + len], device, offset)?;
        }
    }
    for stream in streams {
        stream.synchronize().map_err(driver("synchronising a copy stream"))?;
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e9)
}

fn copy_curve(
    streams: &[Arc<CudaStream>],
    cuda: &CudaOptions,
    trials: usize,
    direction: Direction,
    host: &mut [u8],
    device: &DeviceMemory,
) -> Result<Vec<CurvePoint>, ProfileError> {
    let mut points = Vec::new();
    for &count in &cuda.copy_streams {
        for &chunk in &cuda.copy_chunks {
            let lanes = &streams[..count as usize];
            timed_copy(lanes, direction, host, device, cuda.copy_bytes, chunk)?; // warm-up
            let rates = (0..trials)
                .map(|_| timed_copy(lanes, direction, host, device, cuda.copy_bytes, chunk))
                .collect::<Result<Vec<_>, _>>()?;
            let (gbps, spread) = median_spread(&rates);
            points.push(CurvePoint { chunk_bytes: chunk, concurrency: count, gbps, spread: Some(spread) });
        }
    }
    Ok(points)
}

/// Times `repeat` launches of `work` on `stream` with CUDA events; ns per launch.
fn timed_on_stream(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    repeat: usize,
    mut work: impl FnMut() -> Result<(), ProfileError>,
) -> Result<f64, ProfileError> {
    work()?; // warm-up (cuBLAS picks its kernel on the first call)
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver("event"))?;
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver("event"))?;
    start.record(stream).map_err(driver("event"))?;
    for _ in 0..repeat {
        work()?;
    }
    end.record(stream).map_err(driver("event"))?;
    end.synchronize().map_err(driver("event"))?;
    let ms = start.elapsed_ms(&end).map_err(driver("event"))?;
    Ok(ms as f64 * 1e6 / repeat as f64)
}

/// bf16 GEMMs on the device through the engine's cuBLAS wrapper; buffers sized
/// for the largest shape asked for.
struct GemmBench {
    gemm: Gemm,
    a: DeviceMemory,
    b: DeviceMemory,
    c: DeviceMemory,
}

impl GemmBench {
    fn new(stream: &Arc<CudaStream>, max_elements: usize) -> Result<GemmBench, ProfileError> {
        let gemm = Gemm::new(stream)?;
        let bytes = max_elements * 2;
        let (a, b, c) = (DeviceMemory::new(bytes)?, DeviceMemory::new(bytes)?, DeviceMemory::new(bytes)?);
        for buffer in [&a, &b, &c] {
            // 0x3c3c is a small finite bf16.
            buffer.fill(0x3c, stream)?;
        }
        Ok(GemmBench { gemm, a, b, c })
    }

    /// Elements the largest operand of `batch` products of `shape` holds.
    fn elements(shape: GemmShape, batch: u64) -> u64 {
        batch * (shape.n * shape.k).max(shape.m * shape.k).max(shape.n * shape.m)
    }

    /// Cᵀ (n × m) = W (n × k) · Xᵀ (k × m), `batch` times with strides.
    fn run(&self, shape: GemmShape, batch: u64) -> Result<(), ProfileError> {
        Ok(self.gemm.bf16(&self.a, &self.b, &self.c, shape, batch)?)
    }
}

pub(super) fn measure(
    options: &ProfileOptions,
    cuda: &CudaOptions,
    progress: &mut dyn FnMut(&str, f64),
) -> Result<CudaMeasurements, ProfileError> {
    let started = Instant::now();
    let ctx = open_device(cuda.device_ordinal)?;
    let device_name = ctx.name().map_err(driver("device name"))?;
    let device_memory_bytes = ctx.total_mem().map_err(driver("device memory"))? as u64;
    let max_streams = cuda.copy_streams.iter().copied().max().unwrap_or(1).max(2) as usize;
    let streams =
        (0..max_streams).map(|_| ctx.new_stream()).collect::<Result<Vec<_>, _>>().map_err(driver("streams"))?;
    let trials = options.trials;

    // Copies: pinned both ways, pageable host→device.
    progress("copies", 0.0);
    let device = DeviceMemory::new(cuda.copy_bytes as usize)?;
    let mut pinned = PinnedMemory::new(cuda.copy_bytes as usize)?;
    let h2d = copy_curve(&streams, cuda, trials, Direction::HostToDevice, pinned.slice_mut(), &device)?;
    progress("copies", 0.35);
    let d2h = copy_curve(&streams, cuda, trials, Direction::DeviceToHost, pinned.slice_mut(), &device)?;
    progress("copies", 0.7);
    let mut pageable = vec![1u8; cuda.copy_bytes as usize];
    let h2d_pageable = copy_curve(&streams, cuda, trials, Direction::HostToDevice, &mut pageable, &device)?;
    drop(pageable);

    // Both directions at once: half the buffer each way on its own stream.
    progress("copies both ways", 0.0);
    let half = cuda.copy_bytes / 2;
    let device_in = DeviceMemory::new(half as usize)?;
    let device_out = DeviceMemory::new(half as usize)?;
    let (first, second) = pinned.slice_mut().split_at_mut(half as usize);
    let alone = timed_copy(&streams[..1], Direction::HostToDevice, first, &device_in, half, 16 * MIB)?;
    let start = Instant::now();
    copy_whole(&streams[0], Direction::HostToDevice, first, &device_in)?;
    copy_whole(&streams[1], Direction::DeviceToHost, second, &device_out)?;
    streams[0].synchronize().map_err(driver("synchronising"))?;
    streams[1].synchronize().map_err(driver("synchronising"))?;
    let both = half as f64 / start.elapsed().as_secs_f64() / 1e9;

    // GEMMs: launch overhead, peak rate, the model's shapes, attention products.
    progress("cuBLAS", 0.0);
    let compute_stream = &streams[0];
    // Every product to time, so the operand buffers can be sized for the largest.
    // cuBLAS's products make the kernel table only where the engine cannot run the
    // model on the GPU (block formats; see `engine`).
    let composed = matches!(&options.kernel_model, Some((_, crate::TableWeights::Blocks(_))));
    let points = match &options.kernel_model {
        Some(_) if composed => super::table_points(&options.kernel_batches, options.kernel_prompt_len, 16),
        _ => Vec::new(),
    };
    let mut gemm_shapes = std::collections::BTreeSet::new();
    let mut attention_shapes = std::collections::BTreeSet::new();
    if let Some((model, _)) = options.kernel_model.as_ref().filter(|_| composed) {
        for &(tokens, context) in &points {
            let sequences = super::attention_shape(model, tokens, context).batch / model.num_heads;
            for op in ["attention", "mlp", "head"] {
                let rows = if op == "head" { sequences } else { tokens };
                gemm_shapes.extend(super::op_gemms(model, op, rows));
            }
            attention_shapes.insert(super::attention_shape(model, tokens, context));
        }
    }
    let square = GemmShape { m: 4096, n: 4096, k: 4096 };
    let largest = gemm_shapes
        .iter()
        .map(|s| GemmBench::elements(*s, 1))
        .chain(attention_shapes.iter().flat_map(|a| {
            let (scores, values) = attention_gemms(*a);
            [GemmBench::elements(scores, a.batch), GemmBench::elements(values, a.batch)]
        }))
        .fold(GemmBench::elements(square, 1), u64::max);
    let bench = GemmBench::new(compute_stream, largest as usize)?;
    let tiny = GemmShape { m: 1, n: 64, k: 64 };
    let launch_ns = timed_on_stream(&ctx, compute_stream, 200, || bench.run(tiny, 1))?;
    let square_ns = timed_on_stream(&ctx, compute_stream, 5, || bench.run(square, 1))?;
    let peak_flops = 2.0 * 4096f64.powi(3) / (square_ns * 1e-9);
    // Device memory: a device-to-device copy reads and writes every byte.
    let copy_ns = timed_on_stream(&ctx, compute_stream, 5, || {
        // SAFETY: both buffers hold at least `half` bytes.
        unsafe { result::memcpy_dtod_async(device_out.ptr, device_in.ptr, half as usize, compute_stream.cu_stream()) }
            .map_err(driver("device copy"))
    })?;
    let device_memory_bytes_per_s = 2.0 * half as f64 / (copy_ns * 1e-9);
    // GEMM slowdown while a copy runs on another stream.
    copy_whole(&streams[1], Direction::HostToDevice, first, &device_in)?;
    let contended_ns = timed_on_stream(&ctx, compute_stream, 5, || bench.run(square, 1))?;
    streams[1].synchronize().map_err(driver("synchronising"))?;
    let compute_slowdown_during_copy = contended_ns / square_ns - 1.0;

    let mut gemm_times = std::collections::BTreeMap::new();
    for (i, &shape) in gemm_shapes.iter().enumerate() {
        gemm_times.insert(shape, timed_on_stream(&ctx, compute_stream, 5, || bench.run(shape, 1))?);
        progress("cuBLAS at the model's shapes", (i + 1) as f64 / gemm_shapes.len() as f64);
    }
    let mut attention_times = std::collections::BTreeMap::new();
    for &attention in &attention_shapes {
        let (scores, values) = attention_gemms(attention);
        let ns = timed_on_stream(&ctx, compute_stream, 5, || {
            bench.run(scores, attention.batch)?;
            bench.run(values, attention.batch)
        })?;
        attention_times.insert(attention, ns);
    }
    let composed_table = match options.kernel_model.as_ref().filter(|_| composed) {
        Some((model, _)) => super::compose_kernel_table(
            model,
            &points,
            &|shape| gemm_times.get(&shape).copied().unwrap_or(0.0),
            &|shape: AttentionShape| attention_times.get(&shape).copied().unwrap_or(0.0),
            launch_ns,
        ),
        None => Vec::new(),
    };
    drop(bench);
    drop((device, device_in, device_out));

    // Disk reads land in pinned memory, as a GPU engine's would.
    let scratch = crate::ScratchDisk::create(options, &mut |step, f| progress(step, f))?;
    let read_region = crate::read_bytes(options, options.chunk_sizes.iter().copied().max().unwrap_or(MIB), 8);
    let mut landing = PinnedMemory::new(read_region.max(options.scratch_bytes / 4) as usize)?;
    let disk_read = crate::measure_read_curve(
        options,
        |pool, offset, bytes, chunk| {
            pool.read_into(
                &scratch.disk,
                offset,
                &mut landing.slice_mut()[..bytes as usize],
                chunk,
                ferry_engine::io::ReadPriority::Stream,
            )
        },
        |f| progress("disk reads into pinned memory", f),
    )?;

    // The host CPU: what host attention and host layers run on.
    progress("host compute", 0.0);
    let host = crate::measure_host_compute(options, &scratch.disk, true, &mut |step, f| progress(step, f))?;
    drop(landing);
    let engine = super::engine::measure(
        options,
        cuda.device_ordinal,
        &scratch.disk,
        peak_flops,
        device_memory_bytes_per_s,
        progress,
    )?;
    Ok(CudaMeasurements {
        device_name,
        device_memory_bytes,
        host_memory_bytes: crate::meminfo_bytes("MemTotal:").unwrap_or(0),
        host_to_device_pinned: h2d,
        host_to_device_pageable: h2d_pageable,
        device_to_host_pinned: d2h,
        duplex_alone_gbps: alone,
        duplex_both_gbps: both,
        launch_ns,
        peak_flops,
        device_memory_bytes_per_s,
        compute_slowdown_during_copy,
        disk_read,
        disk_write: scratch.write_points.clone(),
        read_latency_ns: scratch.read_latency_ns,
        disk_capacity_bytes: crate::disk_free_bytes(&options.scratch_dir),
        host_compute: ferry_core::profile::ComputeProfile { table: engine.host_table, ..host.compute },
        host_compute_slowdown: host.slowdown_during_reads.unwrap_or(0.0),
        task_overhead_ns: engine.task_costs.overhead_ns,
        handoff_ns: engine.task_costs.handoff_ns,
        copy_latency_ns: engine.copy_latency_ns,
        kernel_table: engine.table.unwrap_or(composed_table),
        machine: crate::fingerprint(),
        date: crate::today(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Scores (queries × context) then weighted values (queries × head_dim), per head.
fn attention_gemms(a: AttentionShape) -> (GemmShape, GemmShape) {
    (GemmShape { m: a.queries, n: a.context, k: a.head_dim }, GemmShape { m: a.queries, n: a.head_dim, k: a.context })
}

/// Queues one whole-buffer copy on `stream` without waiting (callers synchronise
/// `stream` before touching `host` again).
fn copy_whole(
    stream: &Arc<CudaStream>,
    direction: Direction,
    host: &mut [u8],
    device: &DeviceMemory,
) -> Result<(), ProfileError> {
    let len = host.len().min(device.bytes);
    Ok(copy_async(stream, direction, &mut host[..len], device, 0)?)
}
