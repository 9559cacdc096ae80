//! How much slower a decoding step's compute runs while the read pool streams.

use std::collections::BTreeMap;

use super::Samples;

/// Runs of the kernel table's model alone and beside reads, in adjacent pairs (either
/// may run first): the machine's speed drifts by tens of percent within a minute, so
/// each pair is compared on its own and the slowdown is the median over pairs. (Pooled
/// over two pairs, the figure came out 0 %, 11 %, 15 %, 19 % and 32 % in five quick
/// profiles of one hour; with three pairs a round it still spread 0–25 % over a
/// session on the 2-core build VM, whose CPU runs at two speeds.)
#[derive(Default)]
pub(crate) struct PairedRuns {
    /// (alone, beside reads).
    pairs: Vec<(Samples, Samples)>,
    /// A pair's first run, waiting for its twin: (beside reads, samples).
    unpaired: Option<(bool, Samples)>,
}

impl PairedRuns {
    /// A run's samples; a run of the other kind than the waiting one completes a pair.
    pub(crate) fn push(&mut self, beside_reads: bool, run: Samples) {
        match self.unpaired.take() {
            Some((first_beside_reads, twin)) if first_beside_reads != beside_reads => {
                self.pairs.push(if beside_reads { (twin, run) } else { (run, twin) });
            }
            _ => self.unpaired = Some((beside_reads, run)),
        }
    }

    /// The median over pairs of `decoding_slowdown`; 0 without a pair.
    pub(crate) fn slowdown(&self, prompt_len: u64, layers: u64) -> f64 {
        let per_pair: Vec<f64> =
            self.pairs.iter().map(|(alone, reads)| decoding_slowdown(alone, reads, prompt_len, layers)).collect();
        if per_pair.is_empty() {
            0.0
        } else {
            median(&per_pair)
        }
    }
}

/// Σ (a decoding step's task time beside reads) ÷ Σ (the same alone) − 1, from a run
/// alone and one beside reads: each operation's decoding entries (contexts past the
/// prompt's) averaged over their contexts and rows, and weighted by how often one step
/// of the model runs it: the head and the embedding once, every other operation once
/// per layer (`layers`).
///
/// Prefill's entries are left out. They are the largest entries (a 32-token prefill's
/// MLP took 5.7 ms against 0.55 ms for a decoding step's), and compute-bound: beside
/// reads they slowed 1.03–1.11× where decoding's memory-bound products slowed
/// 1.07–1.33× in the same profile, so summed together the figure was prefill's, and
/// streamed plans, decoding beside their reads for all but one step, ran slower than
/// predicted. The per-layer weighting keeps attention, which the table files at every
/// context, from counting once per context.
pub(crate) fn decoding_slowdown(alone: &Samples, contended: &Samples, prompt_len: u64, layers: u64) -> f64 {
    // Per operation: Σ alone, Σ beside reads (medians of its entries), entries.
    let mut by_op: BTreeMap<&str, (f64, f64, f64)> = BTreeMap::new();
    for (key, durations) in alone {
        let (op, _, _, context) = key;
        let Some(slowed) = contended.get(key) else { continue };
        if *context <= prompt_len {
            continue;
        }
        let (alone_ns, slowed_ns) = (median(durations), median(slowed));
        if !(alone_ns > 0.0 && slowed_ns.is_finite()) {
            continue;
        }
        let sums = by_op.entry(op.as_str()).or_default();
        *sums = (sums.0 + alone_ns, sums.1 + slowed_ns, sums.2 + 1.0);
    }
    let (mut alone_ns, mut slowed_ns) = (0.0, 0.0);
    for (op, (alone, slowed, entries)) in by_op {
        let per_step = if matches!(op, "head" | "embed") { 1.0 } else { layers as f64 };
        alone_ns += per_step * alone / entries;
        slowed_ns += per_step * slowed / entries;
    }
    if alone_ns > 0.0 {
        (slowed_ns / alone_ns - 1.0).max(0.0)
    } else {
        0.0
    }
}

fn median(durations: &[f64]) -> f64 {
    crate::median_spread(durations).0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(entries: &[(&str, u64, u64, f64)]) -> Samples {
        entries.iter().map(|&(op, rows, context, ns)| ((op.to_string(), None, rows, context), vec![ns])).collect()
    }

    /// Prefill's entries (context = the prompt's) do not count, however large.
    #[test]
    fn prefill_entries_are_left_out() {
        let alone = samples(&[("mlp", 32, 32, 5_000.0), ("mlp", 1, 33, 500.0)]);
        let contended = samples(&[("mlp", 32, 32, 5_000.0), ("mlp", 1, 33, 600.0)]);
        assert!((decoding_slowdown(&alone, &contended, 32, 22) - 0.2).abs() < 1e-12);
    }

    /// Attention's entries (one per context) count as one task per layer, as the MLP's
    /// single pooled entry does; the head once per step.
    #[test]
    fn operations_weigh_by_how_often_a_step_runs_them() {
        let alone = samples(&[
            ("attention", 1, 33, 100.0),
            ("attention", 1, 34, 100.0),
            ("attention", 1, 35, 100.0),
            ("mlp", 1, 33, 100.0),
            ("head", 1, 33, 200.0),
        ]);
        let contended = samples(&[
            ("attention", 1, 33, 100.0),
            ("attention", 1, 34, 100.0),
            ("attention", 1, 35, 100.0),
            ("mlp", 1, 33, 200.0),
            ("head", 1, 33, 200.0),
        ]);
        // 2 layers: alone 2·100 + 2·100 + 200 = 600; beside reads 2·100 + 2·200 + 200 = 800.
        let expected = 800.0 / 600.0 - 1.0;
        assert!((decoding_slowdown(&alone, &contended, 32, 2) - expected).abs() < 1e-12);
    }

    /// Pairs form whichever run goes first, and the figure is their median.
    #[test]
    fn runs_pair_in_either_order_and_the_median_pair_counts() {
        let mlp = |ns: f64| samples(&[("mlp", 1, 33, ns)]);
        let mut runs = PairedRuns::default();
        assert_eq!(runs.slowdown(32, 1), 0.0);
        runs.push(false, mlp(100.0));
        runs.push(true, mlp(110.0));
        runs.push(true, mlp(300.0));
        runs.push(false, mlp(100.0));
        // Another run of the same kind replaces a waiting one: it pairs with the next.
        runs.push(true, mlp(900.0));
        runs.push(true, mlp(120.0));
        runs.push(false, mlp(100.0));
        assert_eq!(runs.pairs.len(), 3);
        assert!((runs.slowdown(32, 1) - 0.2).abs() < 1e-12, "median of 0.1, 2.0, 0.2");
    }

    /// Entries measured only alone, or nothing measured beside reads: no slowdown.
    #[test]
    fn entries_without_a_contended_twin_do_not_count() {
        let alone = samples(&[("mlp", 1, 33, 100.0), ("head", 1, 33, 100.0)]);
        let contended = samples(&[("mlp", 1, 33, 150.0)]);
        assert!((decoding_slowdown(&alone, &contended, 32, 1) - 0.5).abs() < 1e-12);
        assert_eq!(decoding_slowdown(&alone, &Samples::new(), 32, 1), 0.0);
    }
}
