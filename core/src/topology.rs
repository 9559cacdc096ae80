//! Where things are: the places of a machine (devices and hosts), the links between
//! them, and the resources the task graph occupies — all keyed by place, so a plan
//! over several devices is the same vocabulary as a plan over one.
//!
//! A **place** holds memory and may compute: a device (its memory is a pool) or a
//! host's RAM. A **location** is where bytes may live: a place or a host's disk. A
//! **resource** runs tasks: the compute of a place, one direction of a link between
//! two places, or a host's disk (reads and writes share it).
//!
//! Today's machine — one device, one host, one disk — is the degenerate case: its
//! resources and pools print exactly as they always did ("device compute",
//! "host→device", "disk"); indices appear in names only when a graph has several
//! devices.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// A place that holds memory and may compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Place {
    /// Accelerator (or, on the cpu backend, a RAM budget acting as one) number `n`.
    Device(u16),
    /// Host number `n`: its RAM and CPU.
    Host(u16),
}

impl Place {
    /// The first device: the only one of a one-stage plan.
    pub const DEVICE: Place = Place::Device(0);
    /// The host every device of today's machines sits in.
    pub const HOST: Place = Place::Host(0);

    pub fn is_device(self) -> bool {
        matches!(self, Place::Device(_))
    }

    /// A small integer naming the place, for fast lookups in hot loops.
    pub fn key(self) -> u32 {
        match self {
            Place::Device(n) => n as u32,
            Place::Host(n) => 0x1_0000 | n as u32,
        }
    }

    /// The name people read. `indexed`: the machine has several of this kind, so the
    /// number is part of the name ("device 1"); otherwise just "device" or "host".
    pub fn label(self, indexed: bool) -> String {
        match (self, indexed) {
            (Place::Device(_), false) => "device".into(),
            (Place::Host(_), false) => "host".into(),
            (Place::Device(n), true) => format!("device {n}"),
            (Place::Host(n), true) => format!("host {n}"),
        }
    }

    /// The canonical token written to files: `device0`, `host0`.
    pub fn token(self) -> String {
        match self {
            Place::Device(n) => format!("device{n}"),
            Place::Host(n) => format!("host{n}"),
        }
    }

    pub fn parse(text: &str) -> Result<Place> {
        let (kind, number) = if let Some(n) = text.strip_prefix("device") {
            (Place::Device as fn(u16) -> Place, n)
        } else if let Some(n) = text.strip_prefix("host") {
            (Place::Host as fn(u16) -> Place, n)
        } else {
            return Err(CoreError::invalid(format!("'{text}' is not a place: use device0, device1, …, host0")));
        };
        let number = if number.is_empty() { Ok(0) } else { number.trim().parse::<u16>() };
        number
            .map(kind)
            .map_err(|_| CoreError::invalid(format!("'{text}' is not a place: use device0, device1, …, host0")))
    }
}

impl From<Place> for String {
    fn from(place: Place) -> String {
        place.token()
    }
}

impl TryFrom<String> for Place {
    type Error = CoreError;
    fn try_from(text: String) -> Result<Place> {
        Place::parse(&text)
    }
}

/// Something that runs tasks, one per lane at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Resource {
    /// A host's offload disk; reads and writes share it.
    Disk { host: u16 },
    /// One direction of a link between two places.
    Link { from: Place, to: Place },
    /// The processor of a place.
    Compute { at: Place },
}

impl Resource {
    pub const DISK: Resource = Resource::Disk { host: 0 };
    pub const HOST_COMPUTE: Resource = Resource::Compute { at: Place::HOST };
    pub const DEVICE_COMPUTE: Resource = Resource::Compute { at: Place::DEVICE };
    pub const HOST_TO_DEVICE: Resource = Resource::Link { from: Place::HOST, to: Place::DEVICE };
    pub const DEVICE_TO_HOST: Resource = Resource::Link { from: Place::DEVICE, to: Place::HOST };

    pub fn compute(at: Place) -> Resource {
        Resource::Compute { at }
    }

    pub fn link(from: Place, to: Place) -> Resource {
        Resource::Link { from, to }
    }

    pub fn is_transfer(self) -> bool {
        !matches!(self, Resource::Compute { .. })
    }

    /// An integer naming the resource (distinct for distinct resources), for fast
    /// lookups in hot loops: comparing it is one instruction.
    pub fn key(self) -> u64 {
        match self {
            Resource::Disk { host } => 1 << 48 | host as u64,
            Resource::Link { from, to } => 2 << 48 | (from.key() as u64) << 20 | to.key() as u64,
            Resource::Compute { at } => 3 << 48 | at.key() as u64,
        }
    }

    /// The name people read; `indexed` as in `Place::label`.
    pub fn label(self, indexed: bool) -> String {
        match self {
            Resource::Disk { host: 0 } => "disk".into(),
            Resource::Disk { host } => format!("disk of host {host}"),
            Resource::Link { from, to } => format!("{}→{}", from.label(indexed), to.label(indexed)),
            Resource::Compute { at } => format!("{} compute", at.label(indexed)),
        }
    }

    /// The reverse direction of a link (copies in opposite directions may slow each
    /// other); `None` for disks and processors.
    pub fn reverse(self) -> Option<Resource> {
        match self {
            Resource::Link { from, to } => Some(Resource::Link { from: to, to: from }),
            _ => None,
        }
    }

    /// Whether this resource moves bytes into or out of `place`.
    pub fn touches(self, place: Place) -> bool {
        match self {
            Resource::Link { from, to } => from == place || to == place,
            Resource::Disk { host } => place == Place::Host(host),
            Resource::Compute { at } => at == place,
        }
    }
}

/// What kind of wire a link is (for people and for datasheet figures).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkKind {
    /// PCI Express between a card and its host (or two cards through the root complex).
    Pcie,
    /// A direct GPU-to-GPU link.
    Nvlink,
    Ethernet,
    Wifi,
    /// Two places sharing one memory: a copy is a memcpy (two cpu devices on one host).
    Loopback,
}

/// One device of a machine: where it sits and how much memory it has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSlot {
    /// The host the device is attached to.
    #[serde(default)]
    pub host: u16,
    #[serde(with = "crate::units::bytes_serde")]
    pub memory_bytes: u64,
    /// The device's own figures when its kind differs from the profile's (a cluster of
    /// different devices; `crate::machine`). Absent: the profile's device figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Box<crate::machine::DeviceProfile>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_round_trip_and_name_like_before() {
        for place in [Place::Device(0), Place::Device(3), Place::Host(0)] {
            assert_eq!(Place::parse(&place.token()).unwrap(), place);
        }
        assert_eq!(Place::parse("device").unwrap(), Place::DEVICE);
        assert!(Place::parse("gpu0").unwrap_err().to_string().contains("device0"));
        assert_eq!(Resource::HOST_TO_DEVICE.label(false), "host→device");
        assert_eq!(Resource::DEVICE_COMPUTE.label(false), "device compute");
        assert_eq!(Resource::DISK.label(false), "disk");
        assert_eq!(Resource::link(Place::Device(0), Place::Device(1)).label(true), "device 0→device 1");
    }

    #[test]
    fn resources_serialize_by_place() {
        let text = crate::yaml::to_yaml_string(&Resource::HOST_TO_DEVICE).unwrap();
        assert!(text.contains("from: host0") && text.contains("to: device0"), "{text}");
        let back: Resource = crate::yaml::from_yaml_str(&text, "r.yaml").unwrap();
        assert_eq!(back, Resource::HOST_TO_DEVICE);
    }
}
