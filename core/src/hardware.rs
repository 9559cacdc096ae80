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
    /// A published measurement of what the device sustains, used by its datasheet
    /// profile in place of the datasheet peak times an assumed efficiency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sustained: Option<SustainedFigures>,
}

/// What a device was measured to sustain, with where (the datasheet peak assumes
/// boost clocks that a power-capped card such as the T4's 70 W does not hold).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SustainedFigures {
    /// Dense fp16 products of large matrices (a vendor BLAS), TFLOP/s, run long
    /// enough to reach the clocks the card holds.
    pub fp16_gemm_tflops: f64,
    /// Who measured it, how, and where it is published.
    pub source: String,
}

impl GpuSpec {
    /// Checks what serde cannot: a sustained rate is a positive number no larger than
    /// the datasheet peak it falls short of.
    pub fn validate(&self) -> crate::error::Result<()> {
        if let Some(sustained) = &self.sustained {
            let tflops = sustained.fp16_gemm_tflops;
            if !(tflops.is_finite() && tflops > 0.0 && tflops <= self.fp16_tflops) {
                return Err(crate::error::CoreError::invalid(format!(
                    "gpu {}: sustained.fp16_gemm_tflops is {tflops}; give a positive rate no larger than the \
                     datasheet's fp16_tflops ({})",
                    self.name, self.fp16_tflops
                )));
            }
        }
        Ok(())
    }

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

/// A link preset (`configs/links/*.yaml`): the wire between two devices of a server
/// (NVLink, PCIe peer-to-peer) or between machines (Ethernet, Wi-Fi).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    pub name: String,
    pub description: String,
    pub kind: crate::topology::LinkKind,
    /// Signalling rate in one direction, GB/s (1 Gbit/s Ethernet is 0.125).
    pub peak_gbps: f64,
    /// Fraction of the peak a bulk transfer reaches (framing, TCP/IP, protocol).
    pub efficiency: f64,
    /// Time to first byte of one transfer, µs (a round trip for a network).
    pub latency_us: f64,
    pub source: String,
}

impl LinkSpec {
    /// The link as a datasheet transfer curve: each transfer pays the latency once.
    pub fn curve(&self) -> crate::profile::TransferCurve {
        let latency_ns = (self.latency_us * 1000.0) as u64;
        crate::profile::TransferCurve::from_datasheet(self.peak_gbps * self.efficiency, latency_ns, latency_ns)
    }
}

/// A machine of several devices, or several machines on a network
/// (`configs/clusters/*.yaml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub name: String,
    pub description: String,
    /// The machines, in order; devices are numbered node by node.
    pub nodes: Vec<ClusterNode>,
    /// A link preset joining devices of one node directly (NVLink, PCIe peer-to-peer);
    /// absent: their copies go through the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_link: Option<String>,
    /// The link preset joining the nodes (required with several nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_link: Option<String>,
    pub source: String,
}

/// One machine of a cluster: a host preset and its devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterNode {
    pub host: String,
    /// The node's devices, in order (`{gpu: rtx4090, count: 8}`).
    pub devices: Vec<NodeDevices>,
}

/// `count` devices of one kind in a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeDevices {
    pub gpu: String,
    #[serde(default = "one")]
    pub count: u32,
    /// Memory of each device when not the GPU's (a cpu device's RAM budget).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::units::opt_bytes_serde")]
    pub memory: Option<u64>,
}

fn one() -> u32 {
    1
}
