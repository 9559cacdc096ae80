//! `Profile::validate`: every figure of a profile finite, of the right sign and within
//! what any real machine could measure. A profile is hand-editable YAML; a slip such
//! as `peak_flops: 1e-300` must be refused naming the field, not turned into a
//! prediction of hundreds of thousands of tokens per second.

use crate::error::{CoreError, Result};
use crate::profile::{ComputeProfile, Profile, TransferCurve};
use crate::topology::Place;

/// Bandwidths from a slow network disk to the fastest device memory, bytes/s.
const BYTES_PER_S: (f64, f64) = (1e3, 1e13);
/// Compute rates from a microcontroller to a rack of accelerators, FLOP/s.
const FLOPS: (f64, f64) = (1e6, 1e18);
/// Fixed latencies (first byte, task launch): at most 10 s.
const MAX_LATENCY_NS: u64 = 10_000_000_000;
/// One measured compute task: at most an hour.
const MAX_TASK_NS: u64 = 3_600_000_000_000;
/// Interference slowdowns: a resource running 1 / (1 + x) as fast; 100 is already
/// a hundredfold slowdown.
const MAX_SLOWDOWN: f64 = 100.0;
/// Requests in flight on one link.
const MAX_CONCURRENCY: u32 = 4096;

fn out_of_range(field: &str, value: impl std::fmt::Display, wanted: &str) -> CoreError {
    CoreError::invalid(format!("profile: {field} = {value} is out of range: {wanted}"))
}

/// `value` finite and within `[lo, hi]`.
fn check_range(field: &str, value: f64, (lo, hi): (f64, f64), unit: &str) -> Result<()> {
    if value.is_finite() && value >= lo && value <= hi {
        Ok(())
    } else {
        Err(out_of_range(field, readable(value), &format!("{unit} between {} and {}", readable(lo), readable(hi))))
    }
}

/// A number as people write it: plainly from 0.001 to a million, else in exponent form
/// (`2.5e12`), never `0e0`.
fn readable(value: f64) -> String {
    let magnitude = value.abs();
    if value == 0.0 || !value.is_finite() || (1e-3..1e6).contains(&magnitude) {
        format!("{value}")
    } else {
        format!("{value:e}")
    }
}

fn check_curve(field: &str, curve: &TransferCurve) -> Result<()> {
    if curve.latency_ns > MAX_LATENCY_NS {
        return Err(out_of_range(&format!("{field}.latency_ns"), curve.latency_ns, "at most 10 s"));
    }
    if curve.points.is_empty() {
        return Err(CoreError::invalid(format!("profile: {field}.points needs at least one point")));
    }
    // Curves are in GB/s, which is bytes per ns.
    let gbps = (BYTES_PER_S.0 / 1e9, BYTES_PER_S.1 / 1e9);
    for (i, point) in curve.points.iter().enumerate() {
        let at = format!("{field}.points[{i}]");
        check_range(&format!("{at}.gbps"), point.gbps, gbps, "GB/s")?;
        if point.concurrency == 0 || point.concurrency > MAX_CONCURRENCY {
            return Err(out_of_range(&format!("{at}.concurrency"), point.concurrency, "1 to 4096 requests"));
        }
        if point.chunk_bytes == 0 {
            return Err(out_of_range(&format!("{at}.chunk_bytes"), 0, "at least one byte"));
        }
        if let Some(spread) = point.spread {
            check_range(&format!("{at}.spread"), spread, (0.0, f64::MAX), "a ratio")?;
        }
    }
    Ok(())
}

fn check_compute(field: &str, compute: &ComputeProfile) -> Result<()> {
    check_range(&format!("{field}.peak_flops"), compute.peak_flops, FLOPS, "FLOP/s")?;
    check_range(&format!("{field}.memory_bytes_per_s"), compute.memory_bytes_per_s, BYTES_PER_S, "bytes/s")?;
    for (name, value) in
        [("matmul_efficiency", compute.matmul_efficiency), ("memory_efficiency", compute.memory_efficiency)]
    {
        if !(value > 0.0 && value <= 1.0) {
            return Err(out_of_range(&format!("{field}.{name}"), value, "a fraction in (0, 1]"));
        }
    }
    if compute.task_overhead_ns > MAX_LATENCY_NS {
        return Err(out_of_range(&format!("{field}.task_overhead_ns"), compute.task_overhead_ns, "at most 10 s"));
    }
    if compute.handoff_ns > MAX_LATENCY_NS {
        return Err(out_of_range(&format!("{field}.handoff_ns"), compute.handoff_ns, "at most 10 s"));
    }
    let release = (0.0, MAX_LATENCY_NS as f64);
    check_range(&format!("{field}.release_ns_per_mib"), compute.release_ns_per_mib, release, "ns")?;
    for (i, rate) in compute.dequantize.iter().enumerate() {
        crate::model::WeightFormat::parse(&rate.format)
            .map_err(|e| CoreError::invalid(format!("profile: {field}.dequantize[{i}].format: {e}")))?;
        let rates = std::iter::once(("", rate.rates(false))).chain(rate.row_order.map(|r| (".row_order", r)));
        for (order, rates) in rates {
            let at = format!("{field}.dequantize[{i}]{order}");
            check_range(&format!("{at}.bytes_per_s"), rates.bytes_per_s, BYTES_PER_S, "bytes/s")?;
            if let Some(flops) = rates.product_flops_per_s {
                check_range(&format!("{at}.product_flops_per_s"), flops, FLOPS, "FLOP/s")?;
            }
        }
    }
    for (i, timing) in compute.table.iter().enumerate() {
        if timing.ns == 0 || timing.ns > MAX_TASK_NS {
            return Err(out_of_range(&format!("{field}.table[{i}].ns"), timing.ns, "1 ns to an hour"));
        }
        if timing.tokens == 0 {
            return Err(out_of_range(&format!("{field}.table[{i}].tokens"), 0, "at least one token"));
        }
        if let Some(format) = &timing.format {
            crate::model::WeightFormat::parse(format)
                .map_err(|e| CoreError::invalid(format!("profile: {field}.table[{i}].format: {e}")))?;
        }
    }
    Ok(())
}

impl Profile {
    /// Checks every figure is usable: finite, positive where it divides, and within
    /// the range of real machines; errors name the field (`device_compute.peak_flops`).
    pub fn validate(&self) -> Result<()> {
        let curves = [
            ("disk_read", &self.disk_read),
            ("disk_write", &self.disk_write),
            ("host_to_device", &self.host_to_device),
            ("host_to_device_pageable", &self.host_to_device_pageable),
            ("device_to_host", &self.device_to_host),
        ];
        for (name, curve) in curves {
            check_curve(name, curve)?;
        }
        if let Some(curve) = &self.interference.disk_read_under_compute {
            check_curve("interference.disk_read_under_compute", curve)?;
        }
        for (i, link) in self.links.iter().enumerate() {
            check_curve(&format!("links[{i}].curve"), &link.curve)?;
        }
        if let Some(drift) = &self.drift {
            for (i, range) in drift.rates.iter().enumerate() {
                let field = format!("drift.rates[{i}]");
                check_range(&format!("{field}.low"), range.low, (1e-3, 1e3), "a ratio of rates")?;
                check_range(&format!("{field}.high"), range.high, (range.low, 1e3), "a ratio of rates, at least low")?;
            }
        }
        for (i, measured) in self.acceptance.iter().enumerate() {
            check_range(&format!("acceptance[{i}].acceptance_rate"), measured.acceptance_rate, (0.0, 1.0), "a rate")?;
        }
        check_compute("device_compute", &self.device_compute)?;
        check_compute("host_compute", &self.host_compute)?;
        let interference = &self.interference;
        for (name, value) in [
            ("device_compute_slowdown", interference.device_compute_slowdown),
            ("host_compute_slowdown", interference.host_compute_slowdown),
            ("copy_duplex_slowdown", interference.copy_duplex_slowdown),
        ] {
            check_range(&format!("interference.{name}"), value, (0.0, MAX_SLOWDOWN), "a slowdown")?;
        }
        check_reserve("memory_reserve_fraction", self.memory_reserve_fraction)?;
        for (name, bytes) in
            [("device_memory_bytes", self.device_memory_bytes), ("host_memory_bytes", self.host_memory_bytes)]
        {
            if bytes == 0 {
                return Err(out_of_range(name, 0, "more than 0 bytes"));
            }
        }
        self.check_devices()
    }

    fn check_devices(&self) -> Result<()> {
        let hosts = self.host_count() as u16;
        for (i, device) in self.devices.iter().enumerate() {
            if device.host >= hosts {
                return Err(CoreError::invalid(format!(
                    "profile: devices[{i}] is on host {} but the profile has {hosts} host(s) (host 0 and `hosts`)",
                    device.host
                )));
            }
            if device.memory_bytes == 0 {
                return Err(out_of_range(&format!("devices[{i}].memory_bytes"), 0, "more than 0 bytes"));
            }
            if let Some(kind) = &device.profile {
                let at = format!("devices[{i}].profile");
                check_compute(&format!("{at}.compute"), &kind.compute)?;
                for (name, curve) in [
                    ("host_to_device", &kind.host_to_device),
                    ("host_to_device_pageable", &kind.host_to_device_pageable),
                    ("device_to_host", &kind.device_to_host),
                ] {
                    check_curve(&format!("{at}.{name}"), curve)?;
                }
                check_range(
                    &format!("{at}.compute_slowdown"),
                    kind.compute_slowdown,
                    (0.0, MAX_SLOWDOWN),
                    "a slowdown",
                )?;
                check_reserve(&format!("{at}.memory_reserve_fraction"), kind.memory_reserve_fraction)?;
            }
        }
        for (i, host) in self.hosts.iter().enumerate() {
            let at = format!("hosts[{i}]");
            check_compute(&format!("{at}.compute"), &host.compute)?;
            check_curve(&format!("{at}.disk_read"), &host.disk_read)?;
            check_curve(&format!("{at}.disk_write"), &host.disk_write)?;
            check_range(&format!("{at}.compute_slowdown"), host.compute_slowdown, (0.0, MAX_SLOWDOWN), "a slowdown")?;
            if host.memory_bytes == 0 {
                return Err(out_of_range(&format!("{at}.memory_bytes"), 0, "more than 0 bytes"));
            }
        }
        let count = self.device_count() as u16;
        for link in &self.links {
            let known = |p: Place| match p {
                Place::Device(d) => d < count,
                Place::Host(h) => h < hosts,
            };
            if !known(link.from) || !known(link.to) || link.from == link.to {
                return Err(CoreError::invalid(format!(
                    "profile: link {}→{} names a place this machine lacks ({count} device(s), {hosts} host(s))",
                    link.from.token(),
                    link.to.token()
                )));
            }
        }
        Ok(())
    }
}

fn check_reserve(field: &str, fraction: f64) -> Result<()> {
    if (0.0..1.0).contains(&fraction) {
        Ok(())
    } else {
        Err(out_of_range(field, fraction, "a fraction in [0, 1)"))
    }
}

#[cfg(test)]
mod tests {
    use crate::catalog::Catalog;
    use crate::hardware::Hardware;
    use crate::profile::Profile;

    fn cpu_profile() -> Profile {
        let catalog = Catalog::builtin().unwrap();
        let gpu = catalog.gpu("cpu").unwrap().value;
        let host = catalog.host(&gpu.default_host).unwrap().value;
        Profile::from_datasheet(&Hardware { gpu, host })
    }

    /// Numbers in messages read as people write them: no `0e0`, exponents only for
    /// the very large and very small.
    #[test]
    fn out_of_range_numbers_read_plainly() {
        use super::readable;
        assert_eq!([readable(0.0), readable(-3.0), readable(0.25), readable(1e-300)], ["0", "-3", "0.25", "1e-300"]);
        assert_eq!(readable(4e11), "4e11");
        let err = refused(|p| p.device_compute.peak_flops = 0.0);
        assert!(err.contains("= 0 is out of range") && !err.contains("0e0"), "{err}");
    }

    /// Applies `edit` to a valid profile and returns the validation error's text.
    fn refused(edit: impl FnOnce(&mut Profile)) -> String {
        let mut profile = cpu_profile();
        edit(&mut profile);
        profile.validate().expect_err("the edited profile must be refused").to_string()
    }

    #[test]
    fn every_catalog_gpu_on_every_host_gives_a_valid_datasheet_profile() {
        let catalog = Catalog::builtin().unwrap();
        for gpu in &catalog.gpus {
            for host in &catalog.hosts {
                let hardware = Hardware { gpu: gpu.clone(), host: host.clone() };
                let profile = Profile::from_datasheet(&hardware);
                profile.validate().unwrap_or_else(|e| panic!("{} on {}: {e}", gpu.name, host.name));
            }
        }
    }

    #[test]
    fn implausible_figures_are_refused_naming_the_field() {
        type Edit = Box<dyn FnOnce(&mut Profile)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("device_compute.peak_flops", Box::new(|p| p.device_compute.peak_flops = 1e-300)),
            ("host_compute.peak_flops", Box::new(|p| p.host_compute.peak_flops = f64::INFINITY)),
            ("device_compute.memory_bytes_per_s", Box::new(|p| p.device_compute.memory_bytes_per_s = 1e20)),
            ("host_compute.matmul_efficiency", Box::new(|p| p.host_compute.matmul_efficiency = f64::NAN)),
            ("device_compute.task_overhead_ns", Box::new(|p| p.device_compute.task_overhead_ns = u64::MAX)),
            ("host_compute.handoff_ns", Box::new(|p| p.host_compute.handoff_ns = u64::MAX)),
            ("device_compute.release_ns_per_mib", Box::new(|p| p.device_compute.release_ns_per_mib = -1.0)),
            ("disk_read.points[0].gbps", Box::new(|p| p.disk_read.points[0].gbps = 1e-300)),
            ("disk_write.points[2].gbps", Box::new(|p| p.disk_write.points[2].gbps = f64::NAN)),
            ("host_to_device.latency_ns", Box::new(|p| p.host_to_device.latency_ns = 11_000_000_000)),
            ("device_to_host.points[1].concurrency", Box::new(|p| p.device_to_host.points[1].concurrency = 0)),
            ("disk_read.points[0].spread", Box::new(|p| p.disk_read.points[0].spread = Some(f64::INFINITY))),
            ("interference.device_compute_slowdown", Box::new(|p| p.interference.device_compute_slowdown = -0.5)),
            ("interference.copy_duplex_slowdown", Box::new(|p| p.interference.copy_duplex_slowdown = f64::NAN)),
            ("memory_reserve_fraction", Box::new(|p| p.memory_reserve_fraction = f64::NAN)),
            ("device_memory_bytes", Box::new(|p| p.device_memory_bytes = 0)),
            ("host_memory_bytes", Box::new(|p| p.host_memory_bytes = 0)),
            ("disk_write.points", Box::new(|p| p.disk_write.points.clear())),
            (
                "host_compute.dequantize[0].bytes_per_s",
                Box::new(|p| {
                    let rate = crate::profile::DequantRate {
                        format: "q4_k".into(),
                        bytes_per_s: 1e15,
                        product_flops_per_s: None,
                        row_order: None,
                    };
                    p.host_compute.dequantize.push(rate)
                }),
            ),
            (
                "device_compute.dequantize[0].format",
                Box::new(|p| {
                    let rate = crate::profile::DequantRate {
                        format: "q4_kk".into(),
                        bytes_per_s: 1e9,
                        product_flops_per_s: None,
                        row_order: None,
                    };
                    p.device_compute.dequantize.push(rate)
                }),
            ),
            (
                "host_compute.dequantize[0].product_flops_per_s",
                Box::new(|p| {
                    let rate = crate::profile::DequantRate {
                        format: "q4_0".into(),
                        bytes_per_s: 1e9,
                        product_flops_per_s: Some(f64::NAN),
                        row_order: None,
                    };
                    p.host_compute.dequantize.push(rate)
                }),
            ),
            (
                "device_compute.dequantize[0].row_order.bytes_per_s",
                Box::new(|p| {
                    let rate = crate::profile::DequantRate {
                        format: "q4_0".into(),
                        bytes_per_s: 1e9,
                        product_flops_per_s: None,
                        row_order: Some(crate::profile::ProductRates { bytes_per_s: -1.0, product_flops_per_s: None }),
                    };
                    p.device_compute.dequantize.push(rate)
                }),
            ),
        ];
        for (field, edit) in cases {
            let message = refused(edit);
            assert!(message.contains(field), "{field}: {message}");
        }
    }

    #[test]
    fn measured_table_and_curve_entries_are_checked_too() {
        let timing = crate::profile::KernelTiming {
            op: "mlp".into(),
            shape: "1x1".into(),
            tokens: 1,
            context: 0,
            ns: 0,
            format: None,
        };
        let message = refused(|p| p.host_compute.table.push(timing));
        assert!(message.contains("host_compute.table[0].ns"), "{message}");
        let mut curve = cpu_profile().disk_read;
        curve.points[3].gbps = 0.0;
        let message = refused(|p| p.interference.disk_read_under_compute = Some(curve));
        assert!(message.contains("interference.disk_read_under_compute.points[3].gbps"), "{message}");
    }

    #[test]
    fn unknown_keys_inside_a_section_are_refused_with_their_path() {
        let text = crate::yaml::to_yaml_string(&cpu_profile()).unwrap();
        for (section, key) in [
            ("device_compute:\n", "peak_flop"),
            ("interference:\n", "device_slowdown"),
            ("disk_read:\n", "latency"),
            ("provenance:\n", "gpuu"),
        ] {
            let at = text.find(section).unwrap_or_else(|| panic!("{section} in {text}")) + section.len();
            let edited = format!("{}  {key}: 1\n{}", &text[..at], &text[at..]);
            let err = crate::yaml::from_yaml_str::<Profile>(&edited, "profile.yaml").unwrap_err().to_string();
            let section = section.trim_end_matches(":\n");
            assert!(err.contains(key) && err.contains(section), "{section}.{key}: {err}");
        }
        let edited = text.replacen("  - chunk_bytes:", "  - chunk_byte: 1\n    chunk_bytes:", 1);
        let err = crate::yaml::from_yaml_str::<Profile>(&edited, "profile.yaml").unwrap_err().to_string();
        assert!(err.contains("chunk_byte") && err.contains("points[0]"), "{err}");
    }
}
