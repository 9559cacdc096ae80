//! A profile's drift: how far a machine's resources ran from the profile's rates in
//! runs checked against it (`ferry validate --save-profile`), and the profiles at
//! either end of that range that a prediction's interval is simulated on.

use serde::{Deserialize, Serialize};

use crate::profile::{Profile, TransferCurve};

/// Each resource's slowest and fastest achieved rate ÷ the profile's over a set of runs,
/// and what runs those were. A prediction's interval is the plan simulated with every
/// resource at its slowest and with every one at its fastest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drift {
    /// Where the ranges come from (`ferry validate`, how many plans, when).
    pub basis: String,
    pub rates: Vec<RateRange>,
}

/// One resource's achieved rate ÷ the profile's: its lowest and highest over the runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateRange {
    pub resource: RateResource,
    pub low: f64,
    pub high: f64,
}

/// The resources whose rates a drift range scales (a one-device machine's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateResource {
    Disk,
    HostToDevice,
    DeviceToHost,
    DeviceCompute,
    HostCompute,
}

impl RateResource {
    pub fn resource(self) -> crate::graph::Resource {
        use crate::graph::Resource;
        match self {
            RateResource::Disk => Resource::DISK,
            RateResource::HostToDevice => Resource::HOST_TO_DEVICE,
            RateResource::DeviceToHost => Resource::DEVICE_TO_HOST,
            RateResource::DeviceCompute => Resource::DEVICE_COMPUTE,
            RateResource::HostCompute => Resource::HOST_COMPUTE,
        }
    }

    /// The range's resource for a one-device machine's `resource` (`None`: another).
    pub fn of(resource: crate::graph::Resource) -> Option<RateResource> {
        [
            RateResource::Disk,
            RateResource::HostToDevice,
            RateResource::DeviceToHost,
            RateResource::DeviceCompute,
            RateResource::HostCompute,
        ]
        .into_iter()
        .find(|r| r.resource() == resource)
    }
}

impl Drift {
    /// The profile with every resource of the ranges at its lowest (`fast`: false) or
    /// highest rate.
    pub fn apply(&self, profile: &Profile, fast: bool) -> Profile {
        let mut out = profile.clone();
        for range in &self.rates {
            out.scale_resource(range.resource.resource(), if fast { range.high } else { range.low });
        }
        out
    }
}

impl Profile {
    /// Scales how fast `resource` runs by `factor` (2: twice as fast): a disk's reads
    /// and writes, a link's copies in that direction, a processor's every rate and
    /// per-task cost (devices: the profile's device kind). What `ferry validate`
    /// replays a run's achieved rates with.
    pub fn scale_resource(&mut self, resource: crate::graph::Resource, factor: f64) {
        use crate::graph::{Place, Resource};
        let scale_curve = |curve: &mut TransferCurve| curve.points.iter_mut().for_each(|p| p.gbps *= factor);
        match resource {
            Resource::Disk { .. } => {
                self.scale_disk_reads(factor);
                scale_curve(&mut self.disk_write);
            }
            Resource::Link { from: Place::Host(_), to: Place::Device(_) } => {
                scale_curve(&mut self.host_to_device);
                scale_curve(&mut self.host_to_device_pageable);
            }
            Resource::Link { from: Place::Device(_), to: Place::Host(_) } => scale_curve(&mut self.device_to_host),
            Resource::Link { from, to } => {
                self.links.iter_mut().filter(|l| (l.from, l.to) == (from, to)).for_each(|l| scale_curve(&mut l.curve))
            }
            Resource::Compute { at: Place::Device(_) } => self.device_compute.scale_speed(factor),
            Resource::Compute { at: Place::Host(_) } => self.host_compute.scale_speed(factor),
        }
    }

    /// Every host→device copy priced at the pageable rate: for an engine that copies
    /// from memory it has not page-locked, where the plan's pinned copies become
    /// pageable ones (the driver stages them). Devices with figures of their own too.
    pub fn with_pageable_copies(mut self) -> Profile {
        self.host_to_device = self.host_to_device_pageable.clone();
        for slot in &mut self.devices {
            if let Some(own) = slot.profile.as_mut() {
                own.host_to_device = own.host_to_device_pageable.clone();
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use crate::catalog::Catalog;
    use crate::hardware::Hardware;
    use crate::profile::Profile;

    #[test]
    fn pageable_copies_replace_the_pinned_host_to_device_curve_only() {
        let catalog = Catalog::builtin().unwrap();
        let profile = Profile::from_datasheet(&Hardware {
            gpu: catalog.gpu("rtx3060-12gb").unwrap().value,
            host: catalog.host("desktop-pcie4").unwrap().value,
        });
        assert_ne!(profile.host_to_device, profile.host_to_device_pageable, "a datasheet GPU pins faster");
        let pageable = profile.clone().with_pageable_copies();
        assert_eq!(pageable.host_to_device, profile.host_to_device_pageable);
        assert_eq!(pageable.host_to_device_pageable, profile.host_to_device_pageable);
        assert_eq!(pageable.device_to_host, profile.device_to_host);
        assert_eq!(pageable.disk_read, profile.disk_read);
    }
}
