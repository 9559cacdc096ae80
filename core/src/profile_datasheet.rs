//! A profile from catalog datasheets: the figures a machine's parts are sold with,
//! turned into the same `Profile` a measurement gives, with every assumption named.

use crate::hardware::{Hardware, Interconnect};
use crate::profile::*;

/// Assumptions used to turn datasheets into a profile. They are written into the
/// profile (the simulator reads numbers only from there), and kept here, named, so
/// nobody has to hunt for them.
pub mod datasheet_assumptions {
    /// Achieved fraction of theoretical PCIe bandwidth with pinned memory (FlexGen
    /// measured 12.9 GB/s on a 15.75 GB/s PCIe 3.0 x16 T4 link: 0.82).
    pub const PCIE_PINNED_EFFICIENCY: f64 = 0.82;
    /// Pageable copies go through a driver bounce buffer: about half the pinned rate.
    pub const PCIE_PAGEABLE_EFFICIENCY: f64 = 0.45;
    /// Per-copy setup cost on a PCIe link, ns.
    pub const PCIE_COPY_OVERHEAD_NS: u64 = 10_000;
    /// Large GEMMs reach about 70 % of tensor peak on GPUs, 75 % on CPUs with a tuned BLAS.
    pub const GPU_MATMUL_EFFICIENCY: f64 = 0.7;
    pub const CPU_MATMUL_EFFICIENCY: f64 = 0.75;
    pub const MEMORY_EFFICIENCY: f64 = 0.8;
    /// Launch cost of one compute task: a handful of kernels on a GPU, a thread wake-up on a CPU.
    pub const GPU_TASK_OVERHEAD_NS: u64 = 30_000;
    pub const CPU_TASK_OVERHEAD_NS: u64 = 20_000;
    /// Share of host RAM that may be pinned.
    pub const MAX_PINNED_FRACTION: f64 = 0.5;
    /// FlexGen's safety margin: plan for 80 % of each memory.
    pub const MEMORY_RESERVE_FRACTION: f64 = 0.2;
    /// On unified memory, a copy or read running beside compute steals memory bandwidth.
    pub const UNIFIED_COMPUTE_SLOWDOWN: f64 = 0.15;
}

impl Profile {
    /// Builds a profile from catalog datasheets. On a unified-memory device (and the
    /// `cpu` device, whose compute figures are the host's) there is no PCIe link.
    pub fn from_datasheet(hardware: &Hardware) -> Profile {
        use datasheet_assumptions::*;
        let gpu = &hardware.gpu;
        let host = &hardware.host;
        let unified = matches!(gpu.interconnect, Interconnect::Unified);
        let disk_latency_ns = (host.disk_latency_us * 1000.0) as u64;
        let disk_read = TransferCurve::from_datasheet(host.disk_read_gbps, disk_latency_ns, disk_latency_ns);
        let disk_write = TransferCurve::from_datasheet(host.disk_write_gbps, disk_latency_ns, disk_latency_ns);
        let (h2d, h2d_pageable) = match gpu.interconnect.peak_gbps() {
            Some(peak) => (
                TransferCurve::from_datasheet(
                    peak * PCIE_PINNED_EFFICIENCY,
                    PCIE_COPY_OVERHEAD_NS,
                    PCIE_COPY_OVERHEAD_NS,
                ),
                TransferCurve::from_datasheet(
                    peak * PCIE_PAGEABLE_EFFICIENCY,
                    PCIE_COPY_OVERHEAD_NS,
                    PCIE_COPY_OVERHEAD_NS,
                ),
            ),
            // Unified memory: a "copy" is a host memcpy (the schedule avoids most of them).
            None => {
                let memcpy = TransferCurve::from_datasheet(host.memcpy_gbps, 1_000, 1_000);
                (memcpy.clone(), memcpy)
            }
        };
        let host_compute = host_compute_profile(hardware);
        let device_compute = if gpu.is_cpu() {
            host_compute.clone()
        } else {
            // A published sustained GEMM rate is already what large products reach.
            let (peak_flops, matmul_efficiency) = match &gpu.sustained {
                Some(sustained) => (sustained.fp16_gemm_tflops * 1e12, 1.0),
                None => (gpu.fp16_tflops * 1e12, GPU_MATMUL_EFFICIENCY),
            };
            ComputeProfile {
                peak_flops,
                memory_bytes_per_s: gpu.memory_bandwidth_gbps * 1e9,
                matmul_efficiency,
                memory_efficiency: MEMORY_EFFICIENCY,
                task_overhead_ns: GPU_TASK_OVERHEAD_NS,
                handoff_ns: 0,
                table: Vec::new(),
                release_ns_per_mib: 0.0,
                dequantize: Vec::new(),
            }
        };
        let slowdown = if unified { UNIFIED_COMPUTE_SLOWDOWN } else { 0.0 };
        Profile {
            provenance: Provenance::Datasheet {
                gpu: gpu.name.clone(),
                host: host.name.clone(),
                sources: [Some(&gpu.source), gpu.sustained.as_ref().map(|s| &s.source), Some(&host.source)]
                    .into_iter()
                    .flatten()
                    .cloned()
                    .collect(),
            },
            device_name: gpu.name.clone(),
            unified_memory: unified,
            device_memory_bytes: gpu.memory_bytes,
            host_memory_bytes: host.ram_bytes,
            max_pinned_bytes: (host.ram_bytes as f64 * MAX_PINNED_FRACTION) as u64,
            memory_reserve_fraction: if gpu.is_cpu() { 0.0 } else { MEMORY_RESERVE_FRACTION },
            disk_capacity_bytes: None,
            disk_read,
            disk_write,
            host_to_device: h2d,
            host_to_device_pageable: h2d_pageable,
            device_to_host: TransferCurve::from_datasheet(
                gpu.interconnect.peak_gbps().map_or(host.memcpy_gbps, |p| p * PCIE_PINNED_EFFICIENCY),
                PCIE_COPY_OVERHEAD_NS,
                PCIE_COPY_OVERHEAD_NS,
            ),
            device_compute,
            host_compute,
            interference: Interference {
                device_compute_slowdown: slowdown,
                host_compute_slowdown: slowdown,
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
}

fn host_compute_profile(hardware: &Hardware) -> ComputeProfile {
    use datasheet_assumptions::*;
    ComputeProfile {
        peak_flops: hardware.host.cpu_gflops * 1e9,
        memory_bytes_per_s: hardware.host.memory_bandwidth_gbps * 1e9,
        matmul_efficiency: CPU_MATMUL_EFFICIENCY,
        memory_efficiency: MEMORY_EFFICIENCY,
        task_overhead_ns: CPU_TASK_OVERHEAD_NS,
        handoff_ns: 0,
        table: Vec::new(),
        release_ns_per_mib: 0.0,
        dequantize: Vec::new(),
    }
}
