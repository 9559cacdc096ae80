//! The bandwidths a member's transfer knobs reach, looked up once per search. A search
//! bounds hundreds of thousands of members, each asking the host→device curve at its
//! request size and copy streams and the disk curve at its request size and queue
//! depth; a curve interpolates (in log space) on every ask, which was a sixth of a
//! mixture-of-experts search. The knob lists are short, so the search asks each curve
//! once per combination up front and members index the table.

use super::search::Searcher;
use crate::cost::{CostModel, Curve};

/// Bytes/ns by (pinned, request size, copy streams) and by (request size, queue depth).
pub(super) struct MemberRates {
    chunk_bytes: Vec<u64>,
    copy_streams: Vec<u32>,
    io_queue_depths: Vec<u32>,
    /// Index: (pinned × chunks + chunk) × streams + stream.
    h2d: Vec<f64>,
    /// Index: chunk × depths + depth.
    disk: Vec<f64>,
}

impl MemberRates {
    pub(super) fn new(cost: &CostModel, chunk_bytes: &[u64], copy_streams: &[u32], io_queue_depths: &[u32]) -> Self {
        let mut h2d = Vec::with_capacity(2 * chunk_bytes.len() * copy_streams.len());
        for curve in [false, true].map(h2d_curve) {
            for &chunk in chunk_bytes {
                h2d.extend(copy_streams.iter().map(|&streams| cost.bandwidth(curve, chunk, streams)));
            }
        }
        let mut disk = Vec::with_capacity(chunk_bytes.len() * io_queue_depths.len());
        for &chunk in chunk_bytes {
            disk.extend(io_queue_depths.iter().map(|&depth| cost.bandwidth(Curve::DiskRead(0), chunk, depth)));
        }
        MemberRates {
            chunk_bytes: chunk_bytes.to_vec(),
            copy_streams: copy_streams.to_vec(),
            io_queue_depths: io_queue_depths.to_vec(),
            h2d,
            disk,
        }
    }

    /// Host→device bytes/ns; `None` for a knob value the table was not built over.
    pub(super) fn h2d(&self, pinned: bool, chunk_bytes: u64, copy_streams: u32) -> Option<f64> {
        let chunk = self.chunk_bytes.iter().position(|&c| c == chunk_bytes)?;
        let stream = self.copy_streams.iter().position(|&s| s == copy_streams)?;
        let row = pinned as usize * self.chunk_bytes.len() + chunk;
        self.h2d.get(row * self.copy_streams.len() + stream).copied()
    }

    /// Disk-read bytes/ns; `None` for a knob value the table was not built over.
    pub(super) fn disk(&self, chunk_bytes: u64, io_queue_depth: u32) -> Option<f64> {
        let chunk = self.chunk_bytes.iter().position(|&c| c == chunk_bytes)?;
        let depth = self.io_queue_depths.iter().position(|&d| d == io_queue_depth)?;
        self.disk.get(chunk * self.io_queue_depths.len() + depth).copied()
    }
}

/// The host→device curve of pinned or pageable copies (the table's rows in that order).
fn h2d_curve(pinned: bool) -> Curve {
    if pinned {
        Curve::HostToDevicePinned(0)
    } else {
        Curve::HostToDevicePageable(0)
    }
}

impl Searcher<'_> {
    /// Host→device bytes/ns of a member: from the table, or the curve itself for a
    /// value outside the searched lists.
    pub(super) fn h2d_rate(&self, pinned: bool, chunk_bytes: u64, copy_streams: u32) -> f64 {
        self.rates
            .h2d(pinned, chunk_bytes, copy_streams)
            .unwrap_or_else(|| self.cost.bandwidth(h2d_curve(pinned), chunk_bytes, copy_streams))
    }

    /// Disk-read bytes/ns of a member (see `h2d_rate`).
    pub(super) fn disk_rate(&self, chunk_bytes: u64, io_queue_depth: u32) -> f64 {
        self.rates
            .disk(chunk_bytes, io_queue_depth)
            .unwrap_or_else(|| self.cost.bandwidth(Curve::DiskRead(0), chunk_bytes, io_queue_depth))
    }
}

#[cfg(test)]
mod tests {
    use super::MemberRates;
    use crate::cost::{CostModel, Curve};
    use ferry_core::catalog::Catalog;
    use ferry_core::hardware::Hardware;
    use ferry_core::profile::Profile;

    #[test]
    fn the_table_holds_what_the_curves_give_for_every_knob_combination() {
        let catalog = Catalog::builtin().unwrap();
        let model = catalog.model("test-tiny").unwrap().value;
        let profile = Profile::from_datasheet(&Hardware {
            gpu: catalog.gpu("rtx3060").unwrap().value,
            host: catalog.host("desktop-pcie4").unwrap().value,
        });
        let cost = CostModel::new(&profile, &model);
        let (chunks, streams, depths) = ([1 << 28, 1 << 20, 1 << 18], [1, 2, 4], [1, 4, 8]);
        let rates = MemberRates::new(&cost, &chunks, &streams, &depths);
        let mut distinct = Vec::new();
        for chunk in chunks {
            for (pinned, curve) in [(false, Curve::HostToDevicePageable(0)), (true, Curve::HostToDevicePinned(0))] {
                for s in streams {
                    let rate = rates.h2d(pinned, chunk, s).unwrap();
                    assert_eq!(rate, cost.bandwidth(curve, chunk, s), "h2d {pinned} {chunk} {s}");
                    distinct.push(rate.to_bits());
                }
            }
            for d in depths {
                assert_eq!(rates.disk(chunk, d).unwrap(), cost.bandwidth(Curve::DiskRead(0), chunk, d));
            }
        }
        // The lookups land on different entries, not one figure for all.
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 2, "{distinct:?}");
        // A knob value outside the lists is not in the table.
        assert_eq!(rates.h2d(true, 1 << 25, 1), None);
        assert_eq!(rates.disk(1 << 20, 2), None);
    }
}
