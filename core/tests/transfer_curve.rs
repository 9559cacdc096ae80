//! `TransferCurve::bytes_per_ns` against a plain reference: the measured levels sorted,
//! the points of a level sorted by request size, interpolated log-linearly in size and
//! linearly between levels. The curve answers without sorting (the simulator asks it
//! for every transfer task), so it must give the same number for any order of points,
//! repeated sizes and levels, and requests outside the measured range.

use ferry_core::profile::{CurvePoint, TransferCurve};
use proptest::prelude::*;

fn reference_at_level(points: &[CurvePoint], chunk_bytes: u64, level: u32) -> f64 {
    let mut at: Vec<&CurvePoint> = points.iter().filter(|p| p.concurrency == level).collect();
    at.sort_by_key(|p| p.chunk_bytes); // stable: equal sizes keep their listed order
    let x = (chunk_bytes.max(1) as f64).ln();
    match at.iter().position(|p| p.chunk_bytes >= chunk_bytes) {
        None => at.last().map_or(0.0, |p| p.gbps),
        Some(0) => at[0].gbps,
        Some(i) => {
            let (a, b) = (at[i - 1], at[i]);
            let (xa, xb) = ((a.chunk_bytes as f64).ln(), (b.chunk_bytes as f64).ln());
            a.gbps + (b.gbps - a.gbps) * (x - xa) / (xb - xa)
        }
    }
}

fn reference(points: &[CurvePoint], chunk_bytes: u64, concurrency: u32) -> f64 {
    let mut levels: Vec<u32> = points.iter().map(|p| p.concurrency).collect();
    levels.sort_unstable();
    levels.dedup();
    let below = levels.iter().rev().find(|&&c| c <= concurrency).or(levels.first());
    let above = levels.iter().find(|&&c| c >= concurrency).or(levels.last());
    let (Some(&low), Some(&high)) = (below, above) else {
        return 0.0;
    };
    let at_low = reference_at_level(points, chunk_bytes, low);
    if low == high {
        return at_low;
    }
    let at_high = reference_at_level(points, chunk_bytes, high);
    let weight = (concurrency - low) as f64 / (high - low) as f64;
    at_low + (at_high - at_low) * weight
}

fn point() -> impl Strategy<Value = CurvePoint> {
    // Few distinct sizes and levels, so that repeats are common.
    (0u32..6, prop::sample::select(vec![1u32, 2, 4, 8]), 0.1f64..20.0).prop_map(|(size, concurrency, gbps)| {
        CurvePoint { chunk_bytes: 4096u64 << (2 * size), concurrency, gbps, spread: None }
    })
}

proptest! {
    #[test]
    fn bytes_per_ns_matches_the_sorted_reference(
        points in prop::collection::vec(point(), 0..16),
        chunk_bytes in 1u64..(1 << 30),
        concurrency in 1u32..12,
    ) {
        let curve = TransferCurve { latency_ns: 0, points: points.clone() };
        let got = curve.bytes_per_ns(chunk_bytes, concurrency);
        let want = reference(&points, chunk_bytes, concurrency);
        prop_assert_eq!(got.to_bits(), want.to_bits(), "points {:?}", points);
    }
}

#[test]
fn repeated_sizes_take_the_first_listed_above_and_the_last_below() {
    let p = |chunk_bytes: u64, gbps: f64| CurvePoint { chunk_bytes, concurrency: 1, gbps, spread: None };
    // Above the request: 1 MiB listed twice, the first (4.0) is the end of the segment.
    let curve = TransferCurve { latency_ns: 0, points: vec![p(1 << 20, 4.0), p(1 << 10, 1.0), p(1 << 20, 9.0)] };
    assert_eq!(curve.bytes_per_ns(1 << 20, 1), 4.0);
    // Past the largest size: the last listed of the largest.
    assert_eq!(curve.bytes_per_ns(1 << 30, 1), 9.0);
    // Halfway in log size between 1 KiB and 1 MiB: halfway between 1.0 and 4.0.
    assert!((curve.bytes_per_ns(1 << 15, 1) - 2.5).abs() < 1e-12);
}
