//! Helpers shared by the simulator tests: simple profiles whose durations are easy
//! to compute by hand, and hand-built graphs.

#![allow(dead_code)]

use ferry_core::graph::*;
use ferry_core::profile::*;

/// A profile with flat curves: every transfer moves `gbps` bytes per ns regardless of
/// request size or concurrency, no latency; compute runs at `gflops` FLOP per ns, no
/// overhead, memory bandwidth effectively unlimited; no interference.
pub fn flat_profile(gbps: f64, gflops: f64, device_bytes: u64, host_bytes: u64) -> Profile {
    let curve = TransferCurve {
        latency_ns: 0,
        points: vec![CurvePoint { chunk_bytes: 4096, concurrency: 1, gbps, spread: None }],
    };
    let compute = ComputeProfile {
        peak_flops: gflops * 1e9,
        memory_bytes_per_s: 1e18,
        matmul_efficiency: 1.0,
        memory_efficiency: 1.0,
        task_overhead_ns: 0,
        handoff_ns: 0,
        table: Vec::new(),
        release_ns_per_mib: 0.0,
        dequantize: Vec::new(),
    };
    Profile {
        provenance: Provenance::Measured { machine: "test".into(), date: "2026-01-01".into(), backend: "test".into() },
        device_name: "test".into(),
        unified_memory: false,
        device_memory_bytes: device_bytes,
        host_memory_bytes: host_bytes,
        max_pinned_bytes: host_bytes,
        memory_reserve_fraction: 0.0,
        disk_capacity_bytes: None,
        disk_read: curve.clone(),
        disk_write: curve.clone(),
        host_to_device: curve.clone(),
        host_to_device_pageable: curve.clone(),
        device_to_host: curve,
        device_compute: compute.clone(),
        host_compute: compute,
        interference: Interference {
            device_compute_slowdown: 0.0,
            host_compute_slowdown: 0.0,
            disk_read_under_compute: None,
            copy_duplex_slowdown: 0.0,
        },
        devices: Vec::new(),
        links: Vec::new(),
        hosts: Vec::new(),
        acceptance: Vec::new(),
        drift: None,
    }
}

/// Task kinds of a one-device machine, as (kind, resource).
pub type Kind = (TaskKind, Resource);
pub const DISK_READ: Kind = (TaskKind::DiskRead, Resource::DISK);
pub const DISK_WRITE: Kind = (TaskKind::DiskWrite, Resource::DISK);
pub const H2D: Kind = (TaskKind::Copy, Resource::HOST_TO_DEVICE);
pub const D2H: Kind = (TaskKind::Copy, Resource::DEVICE_TO_HOST);
pub const DEVICE_COMPUTE: Kind = (TaskKind::Compute, Resource::DEVICE_COMPUTE);
pub const HOST_COMPUTE: Kind = (TaskKind::Compute, Resource::HOST_COMPUTE);
pub const ALL_KINDS: [Kind; 6] = [DISK_READ, DISK_WRITE, H2D, D2H, DEVICE_COMPUTE, HOST_COMPUTE];

pub fn task((kind, resource): Kind, bytes: u64, flops: u64, deps: Vec<TaskId>) -> Task {
    Task {
        kind,
        resource,
        payload: match kind {
            TaskKind::Compute => Payload::Compute { op: Op::Mlp, draft: false, weights_off_device: false },
            _ => Payload::Activations,
        },
        layer: 0,
        micro_batch: 0,
        step: 0,
        bytes,
        flops,
        tokens: 1,
        context: 1,
        chunk_bytes: Task::request_bytes(bytes.max(4096)),
        piece: WHOLE_GROUP,
        pinned: true,
        deps: deps.into(),
        acquire: Default::default(),
        release: Default::default(),
    }
}

pub fn graph(tasks: Vec<Task>, device_bytes: u64, host_bytes: u64, lanes: u32) -> TaskGraph {
    TaskGraph {
        tasks,
        pools: vec![
            PoolSpec { pool: Pool::DEVICE, capacity_bytes: device_bytes, resident: Vec::new() },
            PoolSpec { pool: Pool::HOST, capacity_bytes: host_bytes, resident: Vec::new() },
        ],
        resources: ONE_DEVICE_RESOURCES.iter().map(|&resource| ResourceSpec { resource, lanes }).collect(),
        batch_size: 1,
        prompt_len: 1,
        gen_len: 1,
        rounds: vec![Round { step: 0, past: 0, rows: 1, tokens: 1, drafted: 0 }],
    }
}

/// The resources of a one-device machine, in the lowering's order.
pub const ONE_DEVICE_RESOURCES: [Resource; 5] = [
    Resource::DISK,
    Resource::HOST_TO_DEVICE,
    Resource::DEVICE_TO_HOST,
    Resource::DEVICE_COMPUTE,
    Resource::HOST_COMPUTE,
];

/// The median of `values` (sorted in place); the mean of the middle two for an even count.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}
