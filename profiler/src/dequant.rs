//! The rates of the engine's quantized kernels: `kernels::linear_quant` (the products
//! straight from the blocks, activations as a run takes them by default) over weights
//! of each ggml block format, a projection's worth at a time, on the engine's compute
//! pool — the kernel `ferry run` runs — at one row (decoding) and at a prefill's many
//! rows; in the order a run keeps resident weights in and, where that is not the
//! file's, in the file's row order too (streamed weights run those kernels).
//!
//! The cost model charges a quantized task `FLOPs ÷ product rate + bytes ÷ decode
//! rate` (plus the roofline's memory bound; `sim::dequant`): per weight,
//! `t(rows) = 2·rows ÷ product + bytes per weight ÷ decode`. The two measured points
//! fix both: the product rate from how the time grows with the rows, the decode rate
//! from what the one-row product spends beyond its multiply-adds. Where that would be
//! nothing or less, the decoding is taken to cost a tenth of the one-row product,
//! never nothing; where the many rows took no longer than one (a broken timer), the
//! products are left at the peak as older profiles priced them.

use std::time::Instant;

use ferry_core::profile::{DequantRate, ProductRates};
use ferry_core::units::MIB;
use ferry_engine::kernels::quant::BlockFormat;
use ferry_engine::kernels::{self, BlockOrder, QuantMatrix};

use super::{median_spread, ProfileOptions};

/// Quantized bytes multiplied per one-row trial: tens of milliseconds on a fast machine.
const INPUT_BYTES: u64 = 32 * MIB;
/// Weights per product: a projection of a small model (about 2048 × 1820 in Q4_0).
/// Products of 256 KiB gave lower many-row rates than the model's own products
/// (BENCHMARKS.md, "Predicting quantized plans"), which priced prefill too slow;
/// at one row the roofline prices memory separately.
const STEP_INPUT_BYTES: u64 = 2 * MIB;
/// Values per weight row: a multiple of every block (256) and a common hidden size.
const COLS: usize = 2048;
/// Rows of the many-row products: a 64-token prompt's prefill.
const MANY_ROWS: usize = 64;
/// The many-row products cover this share of the input (they take `MANY_ROWS` times
/// the arithmetic per weight).
const MANY_ROWS_INPUT_SHARE: usize = 8;

/// One rate per block format the engine multiplies, named as plans name formats
/// (`q4_k`); `peak_flops` is the rate the cost model charges other FLOPs at. Where a
/// run keeps resident weights in another order than the file's
/// (`kernels::resident_order`), the products in the file's row order — those of
/// streamed weights — are measured too, the two orders' trials alternated so that
/// neither gets the machine's faster minute to itself.
pub(crate) fn measure_dequantize(options: &ProfileOptions, peak_flops: f64) -> Vec<DequantRate> {
    BlockFormat::ALL
        .iter()
        .map(|&format| {
            let rows_input = kernels::quant::sample_blocks(format, INPUT_BYTES as usize / format.block().1, 7);
            let resident_order = kernels::resident_order();
            // Each product's piece reordered once; the many-row input is whole pieces
            // of it from the start.
            let reordered = (resident_order != BlockOrder::Rows).then(|| {
                let mut reordered = rows_input.clone();
                let piece_rows = piece_rows(format);
                for piece in reordered.chunks_exact_mut(piece_rows * row_bytes(format)) {
                    kernels::interleave(format, piece_rows, COLS, piece);
                }
                reordered
            });
            let resident_input = reordered.as_deref().unwrap_or(&rows_input);
            let (mut resident, mut rows) = (Trials::default(), Trials::default());
            for _ in 0..options.trials.max(1) {
                resident.measure(format, resident_order, resident_input);
                if reordered.is_some() {
                    rows.measure(format, BlockOrder::Rows, &rows_input);
                }
            }
            let resident = resident.fit(format, peak_flops);
            DequantRate {
                format: format.name().to_ascii_lowercase(),
                bytes_per_s: resident.bytes_per_s,
                product_flops_per_s: resident.product_flops_per_s,
                row_order: reordered.is_some().then(|| rows.fit(format, peak_flops)),
            }
        })
        .collect()
}

/// Seconds per weight of one order's trials, at one row and at `MANY_ROWS`.
#[derive(Default)]
struct Trials {
    one: Vec<f64>,
    many: Vec<f64>,
}

impl Trials {
    fn measure(&mut self, format: BlockFormat, order: BlockOrder, input: &[u8]) {
        self.one.push(seconds_per_weight(format, order, input, 1));
        let many_input = &input[..input.len() / MANY_ROWS_INPUT_SHARE];
        self.many.push(seconds_per_weight(format, order, many_input, MANY_ROWS));
    }

    fn fit(&self, format: BlockFormat, peak_flops: f64) -> ProductRates {
        fit(format, median_spread(&self.one).0, median_spread(&self.many).0, peak_flops)
    }
}

/// The rates that make `t(rows) = 2·rows ÷ product + bytes per weight ÷ decode` pass
/// through the measured seconds per weight at one row and at `MANY_ROWS`.
fn fit(format: BlockFormat, one_row_s: f64, many_rows_s: f64, peak_flops: f64) -> ProductRates {
    let (weights, block_bytes) = format.block();
    let bytes_per_weight = block_bytes as f64 / weights as f64;
    let growth_s = many_rows_s - one_row_s;
    let product_flops_per_s = (growth_s > 0.0).then(|| 2.0 * (MANY_ROWS - 1) as f64 / growth_s);
    let flops_s = 2.0 / product_flops_per_s.unwrap_or(peak_flops.max(1.0));
    let decode_s = (one_row_s - flops_s).max(one_row_s / 10.0);
    ProductRates { bytes_per_s: bytes_per_weight / decode_s, product_flops_per_s }
}

/// Bytes of one weight row of `format`, `COLS` wide.
fn row_bytes(format: BlockFormat) -> usize {
    let (weights, block_bytes) = format.block();
    COLS / weights * block_bytes
}

/// Weight rows of one product (`STEP_INPUT_BYTES` of them).
fn piece_rows(format: BlockFormat) -> usize {
    (STEP_INPUT_BYTES as usize / row_bytes(format)).max(1)
}

/// Seconds per weight of a pass of `rows`-row products over `input` (in `order`).
fn seconds_per_weight(format: BlockFormat, order: BlockOrder, input: &[u8], rows: usize) -> f64 {
    let (row_bytes, weight_rows) = (row_bytes(format), piece_rows(format));
    let x = vec![0.25f32; rows * COLS];
    let mut out = vec![0.0f32; rows * weight_rows];
    let pieces: Vec<&[u8]> = input.chunks_exact(weight_rows * row_bytes).collect();
    // One pass untimed: the first touch of each page is not the kernel's cost.
    let mut run = || {
        for piece in &pieces {
            // Each piece twice: the second product finds it in the caches.
            for _ in 0..2 {
                let matrix = QuantMatrix { bytes: piece, format, rows: weight_rows, cols: COLS, order };
                // The product a run makes: activations as the cpu backend's default.
                kernels::linear_quant(
                    &x,
                    kernels::Rows::all(rows),
                    matrix,
                    &mut out,
                    weight_rows,
                    0,
                    kernels::Activations::default(),
                );
            }
        }
    };
    run();
    let start = Instant::now();
    run();
    let seconds = start.elapsed().as_secs_f64();
    seconds / (2 * pieces.len() * weight_rows * COLS).max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_passes_through_both_measured_points() {
        let (format, peak) = (BlockFormat::Q4_0, 50e9);
        let bytes_per_weight = 18.0 / 32.0;
        // 100 GFLOP/s products, 10 GB/s decoding.
        let t = |rows: f64| 2.0 * rows / 100e9 + bytes_per_weight / 10e9;
        let rate = fit(format, t(1.0), t(MANY_ROWS as f64), peak);
        assert!((rate.product_flops_per_s.unwrap() / 100e9 - 1.0).abs() < 1e-9, "{rate:?}");
        assert!((rate.bytes_per_s / 10e9 - 1.0).abs() < 1e-9, "{rate:?}");
        // Decoding that seems free costs a tenth of the one-row product; many rows no
        // slower than one leave the products at the peak.
        let free = fit(format, 2.0 / 100e9, t(MANY_ROWS as f64) - bytes_per_weight / 10e9, peak);
        assert!((free.bytes_per_s - bytes_per_weight / (0.1 * 2.0 / 100e9)).abs() < 1.0, "{free:?}");
        let broken = fit(format, t(1.0), t(1.0), peak);
        assert_eq!(broken.product_flops_per_s, None);
        assert!((broken.bytes_per_s - bytes_per_weight / (t(1.0) - 2.0 / peak)).abs() < 1.0, "{broken:?}");
    }

    #[test]
    fn every_block_format_the_engine_decodes_gets_a_plausible_rate() {
        let options = ProfileOptions { trials: 1, ..ProfileOptions::quick(std::env::temp_dir()) };
        let rates = measure_dequantize(&options, 50e9);
        let names: Vec<&str> = rates.iter().map(|r| r.format.as_str()).collect();
        assert_eq!(
            names,
            [
                "q8_0", "q4_0", "q5_0", "q4_k", "q5_k", "q6_k", "q3_k", "q2_k", "iq4_nl", "iq4_xs", "q4_1", "q5_1",
                "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m"
            ]
        );
        for rate in &rates {
            // The file's row order apart wherever runs keep resident weights otherwise.
            let reordered = kernels::resident_order() != BlockOrder::Rows;
            assert_eq!(rate.row_order.is_some(), reordered, "{}", rate.format);
            for (order, rates) in [("resident", rate.rates(false)), ("row order", rate.rates(true))] {
                // Slower than 1 MB/s or faster than 10 TB/s would be a broken timer, not a CPU.
                assert!((1e6..1e13).contains(&rates.bytes_per_s), "{} {order}: {rates:?}", rate.format);
                // Likewise slower than 10 MFLOP/s or faster than 10 PFLOP/s for two cores.
                let flops = rates.product_flops_per_s.unwrap_or_else(|| panic!("{}: no product rate", rate.format));
                assert!((1e7..1e16).contains(&flops), "{} {order}: {flops}", rate.format);
            }
            ferry_core::model::WeightFormat::parse(&rate.format).unwrap();
        }
    }
}
