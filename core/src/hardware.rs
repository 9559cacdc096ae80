//! Hardware as a catalog describes it: an accelerator (`GpuSpec`) and the host it
//! sits in (`HostSpec`). These are datasheet figures; `Profile` turns them (or a
//! measurement) into the curves the simulator uses.

use serde::{Deserialize, Serialize};

use crate::units::bytes_serde;

/// How the device reaches host memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Interconnect {
    /// A discrete card on PCI Express.
    Pcie { generation: u32, lanes: u32 },
    /// Device and host share one physical memory (Jetson, Apple, or the CPU itself).
    Unified,
}

impl Interconnect {
    /// Theoretical one-direction bandwidth in GB/s (PCIe: 128b/130b encoding from gen 3).
    pub fn peak_gbps(&self) -> Option<f64> {
        match self {
            Interconnect::Pcie { generation, lanes } => {
                let per_lane_gbps = match generation {
                    1 => 0.25,
                    2 => 0.5,
                    3 => 0.985,
                    4 => 1.969,
                    5 => 3.938,
                    _ => 7.877,
                };
                Some(per_lane_gbps * *lanes as f64)
            }
            Interconnect::Unified => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Interconnect::Pcie { generation, lanes } => format!("PCIe {generation}.0 x{lanes}"),
            Interconnect::Unified => "unified memory".to_string(),
        }
    }
}

/// An accelerator from the catalog (`configs/gpus/*.yaml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    pub name: String,
    pub description: String,
    /// Device memory; for the `cpu` device a default RAM budget (override with `--device-mem`).
    #[serde(with = "bytes_serde")]
    pub memory_bytes: u64,
    /// Dense fp16/bf16 tensor throughput, TFLOP/s (no sparsity).
    pub fp16_tflops: f64,
    /// Dense fp32 throughput (non-tensor), TFLOP/s.
    pub fp32_tflops: f64,
    /// Device memory bandwidth, GB/s.
    pub memory_bandwidth_gbps: f64,
    pub interconnect: Interconnect,
    /// The host preset this device usually sits in, used when `--host` is not given.
    pub default_host: String,
    /// The datasheet the figures come from.
    pub source: String,
}

impl GpuSpec {
    /// True for the host CPU acting as the compute device (the `cpu` backend).
    pub fn is_cpu(&self) -> bool {
        self.name == "cpu"
    }
}

/// A host machine preset (`configs/hosts/*.yaml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    pub name: String,
    pub description: String,
    #[serde(with = "bytes_serde")]
    pub ram_bytes: u64,
    /// Sequential read bandwidth of the offload disk, GB/s.
    pub disk_read_gbps: f64,
    pub disk_write_gbps: f64,
    /// Latency of one disk request, µs.
    pub disk_latency_us: f64,
    /// Single-thread host memcpy bandwidth, GB/s.
    pub memcpy_gbps: f64,
    /// Host memory bandwidth, GB/s (for attention run on the host).
    pub memory_bandwidth_gbps: f64,
    /// fp32 matrix-multiply throughput of all host cores, GFLOP/s.
    pub cpu_gflops: f64,
    pub source: String,
}

/// An offload disk preset (`configs/disks/*.yaml`); overrides the host preset's disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub name: String,
    pub description: String,
    pub read_gbps: f64,
    pub write_gbps: f64,
    pub latency_us: f64,
    /// Space available for offloaded weights and KV cache.
    #[serde(with = "bytes_serde")]
    pub capacity_bytes: u64,
    pub source: String,
}

impl HostSpec {
    /// This host with `disk` as its offload disk.
    pub fn with_disk(&self, disk: &DiskSpec) -> HostSpec {
        HostSpec {
            disk_read_gbps: disk.read_gbps,
            disk_write_gbps: disk.write_gbps,
            disk_latency_us: disk.latency_us,
            description: format!("{} (disk: {})", self.description, disk.description),
            ..self.clone()
        }
    }
}

/// A device and its host: everything a datasheet profile is made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hardware {
    pub gpu: GpuSpec,
    pub host: HostSpec,
}
