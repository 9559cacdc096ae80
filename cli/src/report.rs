//! Printing predictions and measurements for people.

use ferry_core::graph::Resource;
use ferry_core::plan::Policy;
use ferry_core::profile::{Profile, Provenance};
use ferry_core::trace::Metrics;
use ferry_core::units::{format_bytes, format_ns};

use crate::table::Table;

pub fn provenance_line(profile: &Profile) -> String {
    match &profile.provenance {
        Provenance::Datasheet { gpu, host, .. } => format!(
            "predicted from datasheet figures ({gpu} in {host}); measure this machine with `ferry profile` for a checked prediction"
        ),
        Provenance::Measured { machine, date, backend } => {
            format!("predicted from a profile measured on {machine} ({backend} backend) on {date}")
        }
    }
}

pub fn policy_table(policy: &Policy) -> String {
    let mut table = Table::new(["knob", "value"]);
    for (knob, value) in policy.describe() {
        table.row([knob, value]);
    }
    table.render()
}

/// ` (10.2–15.9)`: a prediction's interval as printed after its tokens/s.
pub fn interval_text(interval: Option<&ferry_sim::Interval>) -> String {
    interval.map_or_else(String::new, |i| format!(" ({:.2}–{:.2})", i.slow_tokens_per_s, i.fast_tokens_per_s))
}

/// A prediction's or a measurement's figures; `interval` (a prediction's, from the
/// profile's drift) follows the tokens/s.
pub fn metrics_text(metrics: &Metrics, interval: Option<&ferry_sim::Interval>) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "throughput        {:.2} tokens/s{} ({} tokens in {})\n",
        metrics.tokens_per_s,
        interval_text(interval),
        metrics.generated_tokens,
        format_ns(metrics.total_ns)
    ));
    out.push_str(&format!("first token       {}\n", format_ns(metrics.time_to_first_token_ns)));
    out.push_str(&format!("per output token  {}\n", format_ns(metrics.time_per_output_token_ns)));
    out.push_str(&format!("bottleneck        {}\n\n", metrics.resource_label(metrics.bottleneck)));
    let mut table = Table::new(["resource", "busy"]);
    for usage in &metrics.resources {
        // Every device's compute is shown, busy or not; links and disks when used.
        let device_compute = matches!(usage.resource, Resource::Compute { at } if at.is_device());
        if usage.busy_ns > 0 || device_compute {
            table.row([metrics.resource_label(usage.resource), format!("{:.0} %", usage.utilization * 100.0)]);
        }
    }
    out.push_str(&table.render());
    out.push('\n');
    let mut table = Table::new(["memory", "peak", "budget", "resident", "use"]);
    for pool in &metrics.pools {
        if pool.peak_bytes == 0 && !pool.pool.is_device() {
            continue;
        }
        table.row([
            metrics.pool_label(pool.pool),
            format_bytes(pool.peak_bytes),
            format_bytes(pool.capacity_bytes),
            format_bytes(pool.resident_bytes),
            format!("{:.0} %", pool.peak_bytes as f64 * 100.0 / pool.capacity_bytes.max(1) as f64),
        ]);
    }
    out.push_str(&table.render());
    out
}
