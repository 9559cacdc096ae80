//! Machines of several devices and hosts: what each place of a profile is like, and
//! the datasheet profile of a cluster from the catalog.
//!
//! A profile's top-level figures describe device 0 and host 0. A machine of one
//! kind of device (two cpu budgets, eight RTX 4090 in one server) lists its devices
//! by memory only; a device of another kind carries its own figures
//! (`DeviceSlot::profile`: compute, links to its host, unified memory), and hosts
//! after the first (the other nodes of a cluster) are `Profile::hosts`. Everything
//! that prices a place reads it through `Profile::device` and `Profile::host`, so a
//! one-device profile prices exactly as before.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::hardware::{GpuSpec, Hardware, HostSpec, LinkSpec};
use crate::profile::{ComputeProfile, LinkProfile, Profile, Provenance, TransferCurve};
use crate::topology::{DeviceSlot, Place};
use crate::units::opt_bytes_serde;

/// A device whose kind differs from the profile's own (device 0's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    pub name: String,
    /// Shares its host's memory (a Jetson, a cpu device): no host↔device copy.
    pub unified_memory: bool,
    pub compute: ComputeProfile,
    pub host_to_device: TransferCurve,
    pub host_to_device_pageable: TransferCurve,
    pub device_to_host: TransferCurve,
    /// Compute runs at 1 / (1 + this) while a transfer into its memory runs.
    #[serde(default)]
    pub compute_slowdown: f64,
    /// Fraction of its memory kept free.
    pub memory_reserve_fraction: f64,
}

/// A host after the first: another node of a cluster, with its own RAM, CPU and disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostProfile {
    pub name: String,
    #[serde(with = "crate::units::bytes_serde")]
    pub memory_bytes: u64,
    #[serde(with = "crate::units::bytes_serde")]
    pub max_pinned_bytes: u64,
    pub compute: ComputeProfile,
    pub disk_read: TransferCurve,
    pub disk_write: TransferCurve,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_bytes_serde")]
    pub disk_capacity_bytes: Option<u64>,
    /// Host compute runs at 1 / (1 + this) while a transfer touches its memory.
    #[serde(default)]
    pub compute_slowdown: f64,
}

/// One device as the simulator prices it.
#[derive(Debug, Clone, Copy)]
pub struct DeviceView<'a> {
    pub name: &'a str,
    pub host: u16,
    pub memory_bytes: u64,
    pub memory_reserve_fraction: f64,
    pub unified_memory: bool,
    pub compute: &'a ComputeProfile,
    pub host_to_device: &'a TransferCurve,
    pub host_to_device_pageable: &'a TransferCurve,
    pub device_to_host: &'a TransferCurve,
    pub compute_slowdown: f64,
}

/// One host as the simulator prices it.
#[derive(Debug, Clone, Copy)]
pub struct HostView<'a> {
    pub name: &'a str,
    pub memory_bytes: u64,
    pub max_pinned_bytes: u64,
    pub compute: &'a ComputeProfile,
    pub disk_read: &'a TransferCurve,
    pub disk_write: &'a TransferCurve,
    /// Reads while compute shares the CPU (measured on host 0 only).
    pub disk_read_under_compute: Option<&'a TransferCurve>,
    pub disk_capacity_bytes: Option<u64>,
    pub compute_slowdown: f64,
}

impl Profile {
    /// Device `device` (device 0 when the index is out of range: callers check plans
    /// against `device_count` first).
    pub fn device(&self, device: u16) -> DeviceView<'_> {
        let slot = self.devices.get(device as usize);
        let memory_bytes = slot.map_or(self.device_memory_bytes, |s| s.memory_bytes);
        let host = slot.map_or(0, |s| s.host);
        match slot.and_then(|s| s.profile.as_deref()) {
            Some(kind) => DeviceView {
                name: &kind.name,
                host,
                memory_bytes,
                memory_reserve_fraction: kind.memory_reserve_fraction,
                unified_memory: kind.unified_memory,
                compute: &kind.compute,
                host_to_device: &kind.host_to_device,
                host_to_device_pageable: &kind.host_to_device_pageable,
                device_to_host: &kind.device_to_host,
                compute_slowdown: kind.compute_slowdown,
            },
            None => DeviceView {
                name: &self.device_name,
                host,
                memory_bytes,
                memory_reserve_fraction: self.memory_reserve_fraction,
                unified_memory: self.unified_memory,
                compute: &self.device_compute,
                host_to_device: &self.host_to_device,
                host_to_device_pageable: &self.host_to_device_pageable,
                device_to_host: &self.device_to_host,
                compute_slowdown: self.interference.device_compute_slowdown,
            },
        }
    }

    /// Host `host` (host 0 when out of range).
    pub fn host(&self, host: u16) -> HostView<'_> {
        match host.checked_sub(1).and_then(|h| self.hosts.get(h as usize)) {
            Some(other) => HostView {
                name: &other.name,
                memory_bytes: other.memory_bytes,
                max_pinned_bytes: other.max_pinned_bytes,
                compute: &other.compute,
                disk_read: &other.disk_read,
                disk_write: &other.disk_write,
                disk_read_under_compute: None,
                disk_capacity_bytes: other.disk_capacity_bytes,
                compute_slowdown: other.compute_slowdown,
            },
            None => HostView {
                name: match &self.provenance {
                    Provenance::Datasheet { host, .. } => host,
                    Provenance::Measured { machine, .. } => machine,
                },
                memory_bytes: self.host_memory_bytes,
                max_pinned_bytes: self.max_pinned_bytes,
                compute: &self.host_compute,
                disk_read: &self.disk_read,
                disk_write: &self.disk_write,
                disk_read_under_compute: self.interference.disk_read_under_compute.as_ref(),
                disk_capacity_bytes: self.disk_capacity_bytes,
                compute_slowdown: self.interference.host_compute_slowdown,
            },
        }
    }

    pub fn host_count(&self) -> usize {
        self.hosts.len() + 1
    }

    /// The host a place belongs to (a device's, or the host itself).
    pub fn host_of(&self, place: Place) -> u16 {
        match place {
            Place::Device(d) => self.devices.get(d as usize).map_or(0, |s| s.host),
            Place::Host(h) => h,
        }
    }

    /// Whether `a` and `b` share one memory: a unified device and its own host.
    pub fn shares_memory(&self, a: Place, b: Place) -> bool {
        match (a, b) {
            (Place::Device(d), Place::Host(h)) | (Place::Host(h), Place::Device(d)) => {
                self.host_of(Place::Device(d)) == h && self.device(d).unified_memory
            }
            _ => a == b,
        }
    }

    /// The one-device machine of device `device` and its host: what a stage's own
    /// offload plan is searched on.
    pub fn single_device(&self, device: u16) -> Profile {
        let d = self.device(device);
        let h = self.host(d.host);
        Profile {
            provenance: self.provenance.clone(),
            device_name: d.name.to_string(),
            unified_memory: d.unified_memory,
            device_memory_bytes: d.memory_bytes,
            host_memory_bytes: h.memory_bytes,
            max_pinned_bytes: h.max_pinned_bytes,
            memory_reserve_fraction: d.memory_reserve_fraction,
            disk_capacity_bytes: h.disk_capacity_bytes,
            disk_read: h.disk_read.clone(),
            disk_write: h.disk_write.clone(),
            host_to_device: d.host_to_device.clone(),
            host_to_device_pageable: d.host_to_device_pageable.clone(),
            device_to_host: d.device_to_host.clone(),
            device_compute: d.compute.clone(),
            host_compute: h.compute.clone(),
            interference: crate::profile::Interference {
                device_compute_slowdown: d.compute_slowdown,
                host_compute_slowdown: h.compute_slowdown,
                disk_read_under_compute: h.disk_read_under_compute.cloned(),
                copy_duplex_slowdown: self.interference.copy_duplex_slowdown,
            },
            devices: Vec::new(),
            links: Vec::new(),
            hosts: Vec::new(),
            acceptance: Vec::new(),
            drift: None,
        }
    }
}

impl DeviceProfile {
    /// The figures of `hardware`'s device in a datasheet profile.
    pub fn from_datasheet(hardware: &Hardware) -> DeviceProfile {
        let p = Profile::from_datasheet(hardware);
        DeviceProfile {
            name: p.device_name,
            unified_memory: p.unified_memory,
            compute: p.device_compute,
            host_to_device: p.host_to_device,
            host_to_device_pageable: p.host_to_device_pageable,
            device_to_host: p.device_to_host,
            compute_slowdown: p.interference.device_compute_slowdown,
            memory_reserve_fraction: p.memory_reserve_fraction,
        }
    }
}

impl Profile {
    /// This one-device machine described as `nodes` identical machines (each with this
    /// machine's device and host figures), every pair joined by `link` (measured
    /// between two stage processes). What a plan over several machines is validated
    /// with on one machine, and the profile of a cluster of identical ones.
    pub fn as_nodes(&self, nodes: u16, link: &TransferCurve, kind: crate::topology::LinkKind) -> Result<Profile> {
        if self.device_count() != 1 || !self.hosts.is_empty() {
            return Err(CoreError::invalid(
                "only a profile of one device on one machine is described as several nodes",
            ));
        }
        if nodes < 2 {
            return Err(CoreError::invalid(format!("{nodes} node(s): give at least 2")));
        }
        let mut out = self.clone();
        let host = self.host(0);
        out.devices =
            (0..nodes).map(|host| DeviceSlot { host, memory_bytes: self.device_memory_bytes, profile: None }).collect();
        out.hosts = (1..nodes)
            .map(|n| HostProfile {
                name: format!("{} (node {n})", host.name),
                memory_bytes: host.memory_bytes,
                max_pinned_bytes: host.max_pinned_bytes,
                compute: host.compute.clone(),
                disk_read: host.disk_read.clone(),
                disk_write: host.disk_write.clone(),
                disk_capacity_bytes: host.disk_capacity_bytes,
                compute_slowdown: host.compute_slowdown,
            })
            .collect();
        out.links = Vec::new();
        for from in 0..nodes {
            for to in (0..nodes).filter(|&to| to != from) {
                out.links.push(LinkProfile {
                    from: Place::Device(from),
                    to: Place::Device(to),
                    kind,
                    curve: link.clone(),
                });
            }
        }
        out.validate()?;
        Ok(out)
    }
}

impl HostProfile {
    /// The figures of `hardware`'s host in a datasheet profile.
    pub fn from_datasheet(hardware: &Hardware) -> HostProfile {
        let p = Profile::from_datasheet(hardware);
        HostProfile {
            name: hardware.host.name.clone(),
            memory_bytes: p.host_memory_bytes,
            max_pinned_bytes: p.max_pinned_bytes,
            compute: p.host_compute,
            disk_read: p.disk_read,
            disk_write: p.disk_write,
            disk_capacity_bytes: p.disk_capacity_bytes,
            compute_slowdown: p.interference.host_compute_slowdown,
        }
    }
}

/// One node of a cluster with its catalog entries resolved.
#[derive(Debug, Clone)]
pub struct NodeHardware {
    pub host: HostSpec,
    /// The node's devices, in order, each with its memory (a cpu device's RAM budget).
    pub devices: Vec<(GpuSpec, u64)>,
}

/// A cluster with its catalog entries resolved: what a datasheet profile is made from.
#[derive(Debug, Clone)]
pub struct ClusterHardware {
    pub name: String,
    pub nodes: Vec<NodeHardware>,
    /// Devices of one node reach each other over this (absent: through their host).
    pub peer_link: Option<LinkSpec>,
    /// Nodes reach each other over this (required with several nodes).
    pub node_link: Option<LinkSpec>,
}

impl Profile {
    /// The datasheet profile of a cluster: devices numbered node by node, hosts one per
    /// node, a link curve for every ordered pair of devices that does not go through
    /// their host.
    pub fn from_cluster(cluster: &ClusterHardware) -> Result<Profile> {
        let Some((first_gpu, _)) = cluster.nodes.first().and_then(|n| n.devices.first()) else {
            return Err(CoreError::invalid(format!("cluster {}: it lists no devices", cluster.name)));
        };
        let first_host = &cluster.nodes[0].host;
        let mut profile = Profile::from_datasheet(&Hardware { gpu: first_gpu.clone(), host: first_host.clone() });
        let mut sources = vec![first_gpu.source.clone(), first_host.source.clone()];
        let mut placed = Vec::new();
        for (n, node) in cluster.nodes.iter().enumerate() {
            let hardware = |gpu: &GpuSpec| Hardware { gpu: gpu.clone(), host: node.host.clone() };
            if n > 0 {
                profile.hosts.push(HostProfile::from_datasheet(&hardware(&node.devices[0].0)));
                sources.push(node.host.source.clone());
            }
            for (gpu, memory_bytes) in &node.devices {
                let same_kind = gpu.name == first_gpu.name && node.host.name == first_host.name;
                let kind = (!same_kind).then(|| Box::new(DeviceProfile::from_datasheet(&hardware(gpu))));
                if !same_kind {
                    sources.push(gpu.source.clone());
                }
                profile.devices.push(DeviceSlot { host: n as u16, memory_bytes: *memory_bytes, profile: kind });
                placed.push(n);
            }
        }
        profile.device_memory_bytes = profile.devices[0].memory_bytes;
        for (a, &node_a) in placed.iter().enumerate() {
            for (b, &node_b) in placed.iter().enumerate() {
                let link = match (a == b, node_a == node_b) {
                    (true, _) => continue,
                    (false, true) => cluster.peer_link.as_ref(),
                    (false, false) => Some(cluster.node_link.as_ref().ok_or_else(|| {
                        CoreError::invalid(format!(
                            "cluster {}: devices {a} and {b} are on different nodes but no node_link says how \
                             the nodes are joined (e.g. node_link: 1gbe)",
                            cluster.name
                        ))
                    })?),
                };
                if let Some(link) = link {
                    profile.links.push(LinkProfile {
                        from: Place::Device(a as u16),
                        to: Place::Device(b as u16),
                        kind: link.kind,
                        curve: link.curve(),
                    });
                }
            }
        }
        sources.extend(cluster.peer_link.iter().chain(&cluster.node_link).map(|l| l.source.clone()));
        sources.dedup();
        profile.provenance =
            Provenance::Datasheet { gpu: cluster.name.clone(), host: first_host.name.clone(), sources };
        profile.validate()?;
        Ok(profile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

    #[test]
    fn a_machine_as_nodes_has_its_figures_on_each_node_and_one_disk() {
        let catalog = Catalog::builtin().unwrap();
        let gpu = catalog.gpu("cpu").unwrap().value;
        let host = catalog.host("ferry-ci-vm").unwrap().value;
        let one = Profile::from_datasheet(&Hardware { gpu, host });
        let link = TransferCurve::from_datasheet(0.125, 200_000, 200_000);
        let mut three = one.as_nodes(3, &link, crate::topology::LinkKind::Ethernet).unwrap();
        assert_eq!(three.device_count(), 3);
        assert_eq!((0..3).map(|d| three.device(d).host).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(three.host(2).compute, &one.host_compute);
        assert_eq!(three.links.len(), 6, "every ordered pair of nodes");
        assert!(one.as_nodes(1, &link, crate::topology::LinkKind::Ethernet).is_err());
        assert!(three.as_nodes(2, &link, crate::topology::LinkKind::Ethernet).is_err(), "one machine only");
        // Re-measuring the disk scales every node's copy of it.
        let before = three.host(1).disk_read.points[0].gbps;
        three.scale_disk_reads(0.5);
        assert_eq!(three.host(1).disk_read.points[0].gbps, before * 0.5);
        assert_eq!(three.host(0).disk_read.points[0].gbps, before * 0.5);
    }

    #[test]
    fn one_device_views_are_the_top_level_figures() {
        let catalog = Catalog::builtin().unwrap();
        let gpu = catalog.gpu("rtx3060").unwrap().value;
        let host = catalog.host(&gpu.default_host).unwrap().value;
        let profile = Profile::from_datasheet(&Hardware { gpu, host });
        let device = profile.device(0);
        assert_eq!(device.compute, &profile.device_compute);
        assert_eq!(device.memory_bytes, profile.device_memory_bytes);
        assert_eq!(profile.host(0).disk_read, &profile.disk_read);
        assert_eq!(profile.single_device(0), profile);
    }
}
