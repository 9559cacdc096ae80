//! `Profile`: the numbers the simulator turns into durations, and where they came
//! from. A datasheet profile is derived from catalog entries; a measured one is
//! written by `ferry profile`. The simulator reads nothing else.

use serde::{Deserialize, Serialize};

pub use crate::profile_drift::{Drift, RateRange, RateResource};

use crate::topology::{DeviceSlot, LinkKind, Place};
use crate::units::{bytes_serde, KIB, MIB};

/// Where a profile's numbers came from: the honesty rule made a type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", try_from = "ProvenanceFields")]
pub enum Provenance {
    /// Derived from catalog datasheets; predictions from it say so.
    Datasheet { gpu: String, host: String, sources: Vec<String> },
    /// Measured by `ferry profile` on `machine` at `date`.
    Measured { machine: String, date: String, backend: String },
}

/// `Provenance` as read: a plain struct, so that an unknown or misspelt key is
/// reported with its path and line (an internally tagged enum loses both).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvenanceFields {
    kind: String,
    gpu: Option<String>,
    host: Option<String>,
    sources: Option<Vec<String>>,
    machine: Option<String>,
    date: Option<String>,
    backend: Option<String>,
}

impl TryFrom<ProvenanceFields> for Provenance {
    type Error = String;

    fn try_from(f: ProvenanceFields) -> std::result::Result<Self, String> {
        let need = |value: Option<String>, key: &str| value.ok_or(format!("{} provenance needs `{key}`", f.kind));
        let (datasheet, measured) = (
            [f.gpu.is_some(), f.host.is_some(), f.sources.is_some()],
            [f.machine.is_some(), f.date.is_some(), f.backend.is_some()],
        );
        match f.kind.as_str() {
            "datasheet" if !measured.contains(&true) => Ok(Provenance::Datasheet {
                gpu: need(f.gpu.clone(), "gpu")?,
                host: need(f.host.clone(), "host")?,
                sources: f.sources.unwrap_or_default(),
            }),
            "measured" if !datasheet.contains(&true) => Ok(Provenance::Measured {
                machine: need(f.machine.clone(), "machine")?,
                date: need(f.date.clone(), "date")?,
                backend: need(f.backend.clone(), "backend")?,
            }),
            "datasheet" => Err("datasheet provenance takes gpu, host and sources only".into()),
            "measured" => Err("measured provenance takes machine, date and backend only".into()),
            other => Err(format!("unknown provenance kind `{other}`: use datasheet or measured")),
        }
    }
}

/// Throughput of a link at one request size and number of requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurvePoint {
    #[serde(with = "bytes_serde")]
    pub chunk_bytes: u64,
    /// Requests in flight at once (I/O queue depth or copy streams).
    pub concurrency: u32,
    /// Aggregate bandwidth of all requests together, GB/s.
    pub gbps: f64,
    /// Measured profiles: (max − min) ÷ median over the trials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<f64>,
}

/// A link's bandwidth as a function of request size and concurrency, plus a fixed
/// latency paid once per transfer task (first byte).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferCurve {
    pub latency_ns: u64,
    pub points: Vec<CurvePoint>,
}

impl TransferCurve {
    /// Aggregate bandwidth in bytes per ns at `chunk_bytes` with `concurrency` requests in
    /// flight: log-linear interpolation in chunk size at the nearest measured concurrency
    /// levels, linear between them, clamped at the ends of the measured range.
    pub fn bytes_per_ns(&self, chunk_bytes: u64, concurrency: u32) -> f64 {
        // No allocation: the simulator and the tuner ask this for every transfer task.
        let levels = || self.points.iter().map(|p| p.concurrency);
        let below = levels().filter(|&c| c <= concurrency).max().or_else(|| levels().min());
        let above = levels().filter(|&c| c >= concurrency).min().or_else(|| levels().max());
        let (Some(low), Some(high)) = (below, above) else {
            return 0.0;
        };
        let at_low = self.interpolate_chunk(chunk_bytes, low);
        if low == high {
            return at_low;
        }
        let at_high = self.interpolate_chunk(chunk_bytes, high);
        let weight = (concurrency - low) as f64 / (high - low) as f64;
        at_low + (at_high - at_low) * weight
    }

    /// Between the measured request sizes just below and at or above `chunk_bytes` (the
    /// first listed of equal sizes above, the last listed below), clamped at the ends.
    fn interpolate_chunk(&self, chunk_bytes: u64, concurrency: u32) -> f64 {
        let (mut below, mut at_or_above): (Option<&CurvePoint>, Option<&CurvePoint>) = (None, None);
        for p in self.points.iter().filter(|p| p.concurrency == concurrency) {
            if p.chunk_bytes >= chunk_bytes {
                if at_or_above.is_none_or(|b| p.chunk_bytes < b.chunk_bytes) {
                    at_or_above = Some(p);
                }
            } else if below.is_none_or(|a| p.chunk_bytes >= a.chunk_bytes) {
                below = Some(p);
            }
        }
        // GB/s is bytes per ns.
        match (below, at_or_above) {
            (None, None) => 0.0,
            (Some(p), None) | (None, Some(p)) => p.gbps,
            (Some(a), Some(b)) => {
                let x = (chunk_bytes.max(1) as f64).ln();
                let (xa, xb) = ((a.chunk_bytes as f64).ln(), (b.chunk_bytes as f64).ln());
                a.gbps + (b.gbps - a.gbps) * (x - xa) / (xb - xa)
            }
        }
    }

    /// A datasheet curve: each request pays `overhead_ns` before streaming at `peak_gbps`;
    /// requests in flight hide each other's overhead up to the peak.
    pub fn from_datasheet(peak_gbps: f64, latency_ns: u64, overhead_ns: u64) -> TransferCurve {
        let mut points = Vec::new();
        for concurrency in [1u32, 2, 4, 8] {
            let mut chunk = 64 * KIB;
            while chunk <= 256 * MIB {
                let single = chunk as f64 / (overhead_ns as f64 + chunk as f64 / peak_gbps);
                points.push(CurvePoint {
                    chunk_bytes: chunk,
                    concurrency,
                    gbps: (single * concurrency as f64).min(peak_gbps),
                    spread: None,
                });
                chunk *= 4;
            }
        }
        TransferCurve { latency_ns, points }
    }
}

/// How fast a processor runs the work Ferry gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeProfile {
    /// Peak matrix-multiply rate at the compute dtype, FLOP/s.
    pub peak_flops: f64,
    /// Memory bandwidth for reading weights and cache, bytes/s.
    pub memory_bytes_per_s: f64,
    /// Fraction of peak FLOP/s large matrix products reach.
    pub matmul_efficiency: f64,
    /// Fraction of memory bandwidth streaming kernels reach.
    pub memory_efficiency: f64,
    /// Fixed cost of one compute task (kernel launches, thread wake-ups), ns.
    pub task_overhead_ns: u64,
    /// The engine's hand-over from one compute task's end to the next one's start on
    /// the same lane, ns: its scheduler hears of the end and dispatches the next task
    /// (two thread wake-ups, 10-20 µs on a 2-core VM), time in which the lane computes
    /// nothing. Measured (`ferry profile`); 0 in datasheet profiles and older measured
    /// ones. Ferry's engine pays it per compute task; other engines' models do not.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub handoff_ns: u64,
    /// Measured durations of compute tasks by operation and shape; preferred over the
    /// roofline where an entry matches.
    #[serde(default)]
    pub table: Vec<KernelTiming>,
    /// Time to hand a freed buffer's memory back to the system, ns per MiB, charged to
    /// the compute task that frees streamed weights or a loaded cache (the cpu engine
    /// unmaps them: about 50 µs per MiB of 4 KiB pages). 0 where not measured (GPU
    /// engines keep freed memory in a caching allocator).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub release_ns_per_mib: f64,
    /// Measured dequantization rates by weight format (the engine's decoder of each
    /// format on every compute thread). A format without an entry is priced as
    /// dequantized inside the multiply at no extra cost (memory-bound at its real bytes),
    /// and predictions say so. Absent from datasheet profiles and older measured ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dequantize: Vec<DequantRate>,
}

/// How fast the engine multiplies by one weight format's stored blocks: a product over
/// `rows` rows costs `2·weights·rows ÷ product_flops_per_s + bytes ÷ bytes_per_s` (the
/// multiply-adds, and decoding each block once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DequantRate {
    /// The format's name (`q4_k`, as plans name it).
    pub format: String,
    /// Bytes of quantized input decoded per second.
    pub bytes_per_s: f64,
    /// FLOPs per second of the format's products once decoding is paid (`None`: the
    /// profile's `peak_flops`, as older profiles priced them). Integer products over
    /// 8-bit activations are not the float GEMM, so prefill over Q4_0 runs at its own
    /// rate, faster or slower than the peak.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_flops_per_s: Option<f64>,
    /// The same products over weights in the file's row order, where the engine keeps
    /// the weights resident on its device in another order for its kernels
    /// (`kernels::resident_order`): weights streamed for a visit, or computed where the
    /// host keeps them, are multiplied as the file stores them (on this machine's cpu
    /// engine one row of Q4_K ran at 0.6× the reordered rate). `None`: one order for
    /// all weights, or a profile from before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_order: Option<ProductRates>,
}

/// A format's product rates in one order of its blocks (see `DequantRate`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductRates {
    pub bytes_per_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_flops_per_s: Option<f64>,
}

impl DequantRate {
    /// The rates of products over resident weights, or (`row_order`) over weights in
    /// the file's row order where the profile measured them apart.
    pub fn rates(&self, row_order: bool) -> ProductRates {
        match self.row_order {
            Some(rates) if row_order => rates,
            _ => ProductRates { bytes_per_s: self.bytes_per_s, product_flops_per_s: self.product_flops_per_s },
        }
    }
}

impl ComputeProfile {
    /// This processor running `factor` times as fast: every rate multiplied, every
    /// measured or fixed duration divided (the hand-over between tasks too: its thread
    /// wake-ups run on this processor, and took 3× as long in runs on a slowed core).
    pub fn scale_speed(&mut self, factor: f64) {
        self.peak_flops *= factor;
        self.memory_bytes_per_s *= factor;
        self.task_overhead_ns = (self.task_overhead_ns as f64 / factor).round() as u64;
        self.handoff_ns = (self.handoff_ns as f64 / factor).round() as u64;
        self.release_ns_per_mib /= factor;
        for entry in &mut self.table {
            entry.ns = (entry.ns as f64 / factor).round() as u64;
        }
        for rate in &mut self.dequantize {
            rate.bytes_per_s *= factor;
            rate.product_flops_per_s = rate.product_flops_per_s.map(|f| f * factor);
            if let Some(rows) = &mut rate.row_order {
                rows.bytes_per_s *= factor;
                rows.product_flops_per_s = rows.product_flops_per_s.map(|f| f * factor);
            }
        }
    }

    /// The measured rates of `format`'s products.
    pub fn dequant_rate(&self, format: &str) -> Option<&DequantRate> {
        self.dequantize.iter().find(|d| d.format == format)
    }

    /// The rate the cost model charges FLOPs at: the measured peak at the efficiency
    /// the profile gives it.
    pub fn flops_per_s(&self) -> f64 {
        self.peak_flops * self.matmul_efficiency
    }
}

/// Rows of x the cpu engine's few-row kernels multiply per pass over the weights
/// (`kernels::MAX_ROWS`). More rows take the GEMM or the AMX tiles, unless a product
/// asks for the few-row kernels (a speculative verification takes plain decoding's
/// kernels: `kernels::Rows`); it then pays a pass per this many rows.
pub const FEW_ROWS: u64 = 8;

/// One measured compute task: an operation of a model shape at a number of tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelTiming {
    pub op: String,
    /// Identifies the model shape (`hidden_size`x`intermediate_size`), so a table
    /// measured for one model is never applied to another.
    pub shape: String,
    pub tokens: u64,
    #[serde(default)]
    pub context: u64,
    pub ns: u64,
    /// The weight format the task multiplied by (`q4_0`, as plans name formats), when
    /// the table was measured over quantized weights; absent for float weights, whose
    /// entries price every float format (the profiler measures them in one dtype).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// Measured or assumed slowdowns when resources run together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interference {
    /// Device compute runs at 1 / (1 + this) while a transfer into device memory is active
    /// (on the cpu backend copies and reads compete for the same memory bandwidth).
    pub device_compute_slowdown: f64,
    /// Host compute runs at 1 / (1 + this) while a transfer touches host memory.
    pub host_compute_slowdown: f64,
    /// Disk reads measured (by request size and requests in flight, like `disk_read`)
    /// while compute runs on every core. Reads are issued by threads that sleep between
    /// requests; where they share the CPU with compute (host compute always, device
    /// compute on unified memory) they wake late and the disk idles in between. Absent
    /// in datasheet profiles: reads then run at `disk_read` whatever else runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_read_under_compute: Option<TransferCurve>,
    /// A host→device copy runs at 1 / (1 + this) while a device→host copy runs, and the
    /// other way round: links (or copy engines) that are not fully duplex. Measured by the
    /// cuda profiler; 0 where not measured.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub copy_duplex_slowdown: f64,
}

fn is_zero(value: &f64) -> bool {
    *value == 0.0
}

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

/// Everything the simulator knows about a machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub provenance: Provenance,
    pub device_name: String,
    /// Device and host share memory (the cpu backend, Jetson): disk reads land in device
    /// memory directly and there is no host↔device copy.
    pub unified_memory: bool,
    #[serde(with = "bytes_serde")]
    pub device_memory_bytes: u64,
    #[serde(with = "bytes_serde")]
    pub host_memory_bytes: u64,
    /// The most host memory that may be pinned (page-locked) for fast copies.
    #[serde(with = "bytes_serde")]
    pub max_pinned_bytes: u64,
    /// Fraction of each memory kept free as a safety margin (FlexGen keeps 20 %).
    pub memory_reserve_fraction: f64,
    /// Space on the offload disk, when known (a disk preset or a measured profile).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::units::opt_bytes_serde")]
    pub disk_capacity_bytes: Option<u64>,
    pub disk_read: TransferCurve,
    pub disk_write: TransferCurve,
    /// Host→device from pinned memory (pageable copies use `host_to_device_pageable`).
    pub host_to_device: TransferCurve,
    pub host_to_device_pageable: TransferCurve,
    pub device_to_host: TransferCurve,
    pub device_compute: ComputeProfile,
    pub host_compute: ComputeProfile,
    pub interference: Interference,
    /// The machine's devices when it has several, each of this profile's kind with its
    /// own memory. Empty: one device with `device_memory_bytes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceSlot>,
    /// Links between devices (device→device, one entry per direction). A pair without
    /// an entry copies through what the profile knows: a memcpy on unified memory, else
    /// device→host then host→device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkProfile>,
    /// Hosts after the first (host 0 is this profile's own host figures): the other
    /// nodes of a cluster (`crate::machine`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<crate::machine::HostProfile>,
    /// Acceptance rates measured on this machine (`ferry profile --model DIR --draft D`):
    /// what `ferry tune --draft D` predicts with when no `--acceptance` is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acceptance: Vec<MeasuredAcceptance>,
    /// How far this machine's resources ran from the profile's rates in runs checked
    /// against it (`ferry validate --save-profile`): what a prediction's interval rests on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<Drift>,
}

/// The rate at which a target accepted a draft's tokens, measured by running them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasuredAcceptance {
    /// The target model's name (its folder's or file's).
    pub target: String,
    /// `self:L`, or the draft model's name.
    pub draft: String,
    /// Draft tokens per round it was measured at.
    pub draft_len: u32,
    /// Draft tokens the target agreed with ÷ those it judged (each sequence on its own).
    pub acceptance_rate: f64,
    /// Draft tokens judged: the sample the rate rests on.
    pub judged: u64,
    /// Sequences and new tokens per sequence of the run.
    pub sequences: u64,
    pub tokens_per_sequence: u64,
}

impl Profile {
    /// The acceptance measured for `target` with `draft` (the largest sample if several).
    pub fn measured_acceptance(&self, target: &str, draft: &str) -> Option<&MeasuredAcceptance> {
        self.acceptance.iter().filter(|a| a.target == target && a.draft == draft).max_by_key(|a| a.judged)
    }
}

/// One direction of a link between two places, with its own curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkProfile {
    pub from: Place,
    pub to: Place,
    pub kind: LinkKind,
    pub curve: TransferCurve,
}

pub use crate::profile_datasheet::datasheet_assumptions;

impl Profile {
    /// The devices of the machine (one unless `devices` lists several).
    pub fn device_slots(&self) -> Vec<DeviceSlot> {
        if self.devices.is_empty() {
            vec![DeviceSlot { host: 0, memory_bytes: self.device_memory_bytes, profile: None }]
        } else {
            self.devices.clone()
        }
    }

    pub fn device_count(&self) -> usize {
        self.devices.len().max(1)
    }

    /// Memory of device `device` (0 when the machine has no such device).
    pub fn device_memory(&self, device: u16) -> u64 {
        match (self.devices.is_empty(), device) {
            (true, 0) => self.device_memory_bytes,
            (true, _) => 0,
            (false, d) => self.devices.get(d as usize).map_or(0, |slot| slot.memory_bytes),
        }
    }

    /// Scales every disk-read figure (alone and under compute) by `factor`: how a disk
    /// re-measured just now compares with the profile.
    pub fn scale_disk_reads(&mut self, factor: f64) {
        // Other hosts described with this host's very disk figures (`as_nodes`: one
        // machine standing for several) are taken to be this disk.
        let same_disk = self.hosts.iter_mut().filter(|h| h.disk_read == self.disk_read).map(|h| &mut h.disk_read);
        let same_disk: Vec<&mut TransferCurve> = same_disk.collect();
        let under_compute = self.interference.disk_read_under_compute.iter_mut();
        for curve in std::iter::once(&mut self.disk_read).chain(under_compute).chain(same_disk) {
            for point in &mut curve.points {
                point.gbps *= factor;
            }
        }
    }

    pub fn is_measured(&self) -> bool {
        matches!(self.provenance, Provenance::Measured { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::hardware::Hardware;

    fn hardware(gpu: &str) -> Hardware {
        let catalog = Catalog::builtin().unwrap();
        let gpu = catalog.gpu(gpu).unwrap().value;
        let host = catalog.host(&gpu.default_host).unwrap().value;
        Hardware { gpu, host }
    }

    #[test]
    fn datasheet_profile_of_t4_matches_flexgen_link_speed() {
        let profile = Profile::from_datasheet(&hardware("t4"));
        profile.validate().unwrap();
        let gbps = profile.host_to_device.bytes_per_ns(256 * MIB, 1);
        assert!((gbps - 12.9).abs() < 0.3, "T4 PCIe 3 x16 pinned: {gbps} GB/s");
        assert!(!profile.unified_memory);
    }

    #[test]
    fn curves_interpolate_and_clamp() {
        let curve = TransferCurve::from_datasheet(2.0, 0, 100_000);
        let small = curve.bytes_per_ns(64 * KIB, 1);
        let large = curve.bytes_per_ns(256 * MIB, 1);
        assert!(small < large && large <= 2.0);
        let between = curve.bytes_per_ns(128 * KIB, 1);
        assert!(small < between && between < curve.bytes_per_ns(256 * KIB, 1));
        // Deeper queues hide per-request overhead.
        assert!(curve.bytes_per_ns(64 * KIB, 4) > small);
        assert!(curve.bytes_per_ns(1 << 40, 64) <= 2.0 + 1e-9);
    }

    #[test]
    fn cpu_device_takes_host_figures() {
        let profile = Profile::from_datasheet(&hardware("cpu"));
        assert!(profile.unified_memory);
        assert_eq!(profile.device_compute, profile.host_compute);
    }

    #[test]
    fn profile_round_trips_through_yaml() {
        let profile = Profile::from_datasheet(&hardware("rtx3060"));
        let text = crate::yaml::to_yaml_string(&profile).unwrap();
        let back: Profile = crate::yaml::from_yaml_str(&text, "profile.yaml").unwrap();
        assert_eq!(profile, back);
    }
}
