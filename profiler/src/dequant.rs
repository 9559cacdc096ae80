//! Dequantization throughput of the engine's quantized kernels: `kernels::linear_quant`
//! (the products straight from the blocks, activations as a run takes them by
//! default) multiplying one row by weights of each ggml block format held in the
//! caches, on the engine's compute pool — the kernel `ferry run`
//! runs, at the decoding batch where its decoding shows most.
//!
//! The cost model charges a quantized task `FLOPs time + bytes ÷ rate` (plus the
//! roofline's memory bound; `sim::dequant`), FLOPs at the profile's peak. So that a
//! one-row product costs what it measured, the rate written is the product's time less
//! those FLOPs at that peak: bytes ÷ (measured − 2·weights ÷ peak). Where the FLOPs
//! would take most of the measured time, the decoding is taken to cost at least a
//! tenth of it (a rate 10× the product's), never nothing.

use std::time::Instant;

use ferry_core::profile::DequantRate;
use ferry_core::units::{KIB, MIB};
use ferry_engine::kernels::quant::BlockFormat;
use ferry_engine::kernels::{self, QuantMatrix};

use super::{median_spread, ProfileOptions};

/// Quantized bytes multiplied per trial: tens of milliseconds on a fast machine.
const INPUT_BYTES: u64 = 32 * MIB;
/// Weights per product: small enough to stay in the caches while it is multiplied,
/// so the figure is the kernel's, not the memory's (which the roofline prices).
const STEP_INPUT_BYTES: u64 = 256 * KIB;
/// Values per weight row: a multiple of every block (256) and a common hidden size.
const COLS: usize = 2048;

/// One rate per block format the engine multiplies, named as plans name formats
/// (`q4_k`); `peak_flops` is the measured rate the cost model charges FLOPs at.
pub(crate) fn measure_dequantize(options: &ProfileOptions, peak_flops: f64) -> Vec<DequantRate> {
    BlockFormat::ALL
        .iter()
        .map(|&format| {
            let input = kernels::quant::sample_blocks(format, INPUT_BYTES as usize / format.block().1, 7);
            let rates: Vec<f64> = (0..options.trials.max(1)).map(|_| decode_rate(format, &input, peak_flops)).collect();
            DequantRate { format: format.name().to_ascii_lowercase(), bytes_per_s: median_spread(&rates).0 }
        })
        .collect()
}

/// Bytes of `input` per second of decoding, from one pass of one-row products over it.
fn decode_rate(format: BlockFormat, input: &[u8], peak_flops: f64) -> f64 {
    let (weights, block_bytes) = format.block();
    let row_bytes = COLS / weights * block_bytes;
    let rows = (STEP_INPUT_BYTES as usize / row_bytes).max(1);
    let x = vec![0.25f32; COLS];
    let mut out = vec![0.0f32; rows];
    let pieces: Vec<&[u8]> = input.chunks_exact(rows * row_bytes).collect();
    // One pass untimed: the first touch of each page is not the kernel's cost.
    let mut run = || {
        for piece in &pieces {
            // Each piece twice: the second product reads it from the caches.
            for _ in 0..2 {
                let matrix = QuantMatrix { bytes: piece, format, rows, cols: COLS };
                // The product a run makes: activations as the cpu backend's default.
                kernels::linear_quant(&x, 1, matrix, &mut out, rows, 0, kernels::Activations::default());
            }
        }
    };
    run();
    let start = Instant::now();
    run();
    let seconds = start.elapsed().as_secs_f64();
    let bytes = 2.0 * (pieces.len() * rows * row_bytes) as f64;
    let flops_seconds = 2.0 * 2.0 * (pieces.len() * rows * COLS) as f64 / peak_flops.max(1.0);
    bytes / (seconds - flops_seconds).max(seconds / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_format_the_engine_decodes_gets_a_plausible_rate() {
        let options = ProfileOptions { trials: 1, ..ProfileOptions::quick(std::env::temp_dir()) };
        let rates = measure_dequantize(&options, 50e9);
        let names: Vec<&str> = rates.iter().map(|r| r.format.as_str()).collect();
        assert_eq!(names, ["q8_0", "q4_0", "q4_k", "q6_k"]);
        for rate in &rates {
            // Slower than 1 MB/s or faster than 10 TB/s would be a broken timer, not a CPU.
            assert!((1e6..1e13).contains(&rate.bytes_per_s), "{}: {}", rate.format, rate.bytes_per_s);
            ferry_core::model::WeightFormat::parse(&rate.format).unwrap();
        }
    }
}
