//! The layer split of a pipeline: which contiguous range of layers each device (in a
//! given order) holds, exactly, by dynamic programming over (device, layers placed).
//!
//! A stage's cost `c` is its busy time over the run for one layer range (from its own
//! best offload plan: `stages`); a device may hold no layers (it is left out). With
//! `M` micro-batches in flight, the pipeline takes about (M − 1)·max(c)/M + Σc/M: the
//! slowest stage paces every micro-batch after the first, and the first crosses them
//! all. That is monotone in (max, Σ), so the DP keeps, per state, the Pareto frontier
//! of (max, Σ) pairs and the exact optimum is on the final frontier.

/// Cost of device number `device` (in the order) holding `layers` layers starting at
/// layer `start`; `None`: it cannot (memory).
pub(crate) type StageCost<'a> = dyn FnMut(usize, u64, u64) -> Option<f64> + 'a;

/// The pipeline's time for stage costs with this max and sum, `micro_batches` in flight.
pub(crate) fn pipeline_time(max: f64, sum: f64, micro_batches: u64) -> f64 {
    let m = micro_batches.max(1) as f64;
    ((m - 1.0) * max + sum) / m
}

/// One point of a frontier: (max, sum), and how it was reached.
#[derive(Debug, Clone, Copy)]
struct Point {
    max: f64,
    sum: f64,
    /// Layers the last device took, and the index of the predecessor point.
    layers: u64,
    from: usize,
}

/// The best split of `layers` layers over `devices` devices in order: layers per device
/// (zeros for devices left out) and the pipeline time, or `None` when nothing fits.
pub(crate) fn best_split(
    devices: usize,
    layers: u64,
    micro_batches: u64,
    cost: &mut StageCost,
) -> Option<(Vec<u64>, f64)> {
    let n = layers as usize;
    // frontier[i][j]: points after the first i devices hold the first j layers.
    let mut frontier: Vec<Vec<Vec<Point>>> = vec![vec![Vec::new(); n + 1]; devices + 1];
    frontier[0][0].push(Point { max: 0.0, sum: 0.0, layers: 0, from: 0 });
    for i in 0..devices {
        // Later starts first: of splits that tie, the first reached is kept, so the
        // earlier devices keep the layers (a plan that fits on the first machine of a
        // cluster runs there, as the head, not on an equal one across a link).
        for start in (0..=n).rev() {
            if frontier[i][start].is_empty() {
                continue;
            }
            for take in 0..=(n - start) {
                let stage = if take == 0 { Some(0.0) } else { cost(i, start as u64, take as u64) };
                let Some(c) = stage else { continue };
                let (before, after) = frontier.split_at_mut(i + 1);
                let target = &mut after[0][start + take];
                for (index, p) in before[i][start].iter().enumerate() {
                    let point = Point { max: p.max.max(c), sum: p.sum + c, layers: take as u64, from: index };
                    insert_pareto(target, point);
                }
            }
        }
    }
    let last = &frontier[devices][n];
    let (best, time) = last
        .iter()
        .enumerate()
        .map(|(i, p)| (i, pipeline_time(p.max, p.sum, micro_batches)))
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    // Walk back: each point's predecessor sits at (device − 1, layers − taken).
    let mut split = vec![0; devices];
    let (mut j, mut index) = (n, best);
    for i in (0..devices).rev() {
        let point = frontier[i + 1][j][index];
        split[i] = point.layers;
        j -= point.layers as usize;
        index = point.from;
    }
    Some((split, time))
}

/// Adds `point` to a frontier unless another point is at least as good in both; drops
/// the points it beats (equal values keep the first).
fn insert_pareto(frontier: &mut Vec<Point>, point: Point) {
    if frontier.iter().any(|p| p.max <= point.max && p.sum <= point.sum) {
        return;
    }
    frontier.retain(|p| !(point.max <= p.max && point.sum <= p.sum));
    frontier.push(point);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every split of `layers` over `devices` (zeros allowed), by brute force.
    fn brute_force(devices: usize, layers: u64, m: u64, cost: &mut StageCost) -> Option<f64> {
        #[allow(clippy::too_many_arguments)]
        fn walk(
            i: usize,
            start: u64,
            devices: usize,
            layers: u64,
            acc: (f64, f64),
            m: u64,
            cost: &mut StageCost,
            best: &mut Option<f64>,
        ) {
            if i == devices {
                if start == layers {
                    let t = pipeline_time(acc.0, acc.1, m);
                    *best = Some(best.map_or(t, |b: f64| b.min(t)));
                }
                return;
            }
            for take in 0..=(layers - start) {
                let c = if take == 0 { Some(0.0) } else { cost(i, start, take) };
                if let Some(c) = c {
                    walk(i + 1, start + take, devices, layers, (acc.0.max(c), acc.1 + c), m, cost, best);
                }
            }
        }
        let mut best = None;
        walk(0, 0, devices, layers, (0.0, 0.0), m, cost, &mut best);
        best
    }

    /// Devices of different speeds and memories, ends that cost extra, a link penalty.
    fn toy_cost(speeds: Vec<f64>, fits: Vec<u64>, layers: u64) -> impl FnMut(usize, u64, u64) -> Option<f64> {
        move |i, start, take| {
            if take > fits[i] * 2 {
                return None;
            }
            // Layers past what fits are streamed at three times the cost.
            let resident = take.min(fits[i]) as f64;
            let streamed = take.saturating_sub(fits[i]) as f64;
            let ends = if start == 0 { 0.7 } else { 0.0 } + if start + take == layers { 1.3 } else { 0.0 };
            Some((resident + 3.0 * streamed + ends) / speeds[i] + 0.05)
        }
    }

    #[test]
    fn the_split_is_the_brute_force_optimum() {
        let cases = [
            (vec![1.0, 1.0], vec![3, 3], 6, 1),
            (vec![2.0, 1.0, 0.5], vec![2, 4, 8], 9, 4),
            (vec![1.0, 3.0, 1.0, 2.0], vec![1, 2, 3, 2], 10, 2),
            (vec![0.3, 5.0, 1.0], vec![9, 1, 4], 8, 8),
            (vec![1.0, 1.0, 1.0], vec![1, 1, 1], 7, 3),
        ];
        for (speeds, fits, layers, m) in cases {
            let devices = speeds.len();
            let mut cost = toy_cost(speeds.clone(), fits.clone(), layers);
            let expected = brute_force(devices, layers, m, &mut cost);
            let mut cost = toy_cost(speeds.clone(), fits.clone(), layers);
            let found = best_split(devices, layers, m, &mut cost);
            match (expected, found) {
                (None, None) => {}
                (Some(e), Some((split, t))) => {
                    assert!((e - t).abs() < 1e-9, "{speeds:?} {fits:?}: DP {t} vs brute force {e} ({split:?})");
                    assert_eq!(split.iter().sum::<u64>(), layers);
                    // The split the DP reports has the time it reports.
                    let mut cost = toy_cost(speeds.clone(), fits.clone(), layers);
                    let (mut max, mut sum, mut start) = (0.0f64, 0.0, 0);
                    for (i, &take) in split.iter().enumerate() {
                        let c = if take == 0 { 0.0 } else { cost(i, start, take).unwrap() };
                        (max, sum, start) = (max.max(c), sum + c, start + take);
                    }
                    assert!((pipeline_time(max, sum, m) - t).abs() < 1e-9);
                }
                other => panic!("{speeds:?} {fits:?}: {other:?}"),
            }
        }
    }

    /// One stage is as fast on any of three equal devices: the first holds it (the
    /// machine `ferry run` runs on), not an equal one across a link.
    #[test]
    fn ties_keep_the_layers_on_the_earlier_devices() {
        // Each stage costs one more than its layers: splitting never pays.
        let mut cost = |_: usize, _: u64, take: u64| Some(take as f64 + 1.0);
        assert_eq!(best_split(3, 4, 1, &mut cost).unwrap().0, [4, 0, 0]);
    }

    #[test]
    fn nothing_fits_is_none() {
        let mut cost = |_: usize, _: u64, take: u64| (take <= 2).then_some(1.0);
        assert!(best_split(2, 5, 1, &mut cost).is_none());
        assert_eq!(best_split(3, 5, 1, &mut cost).map(|(s, _)| s.iter().sum::<u64>()), Some(5));
    }
}
