//! Dequantization throughput: the engine's decoder of each ggml block format
//! (`kernels::quant::dequantize`, bit-identical to llama.cpp's) run on every thread of
//! the engine's compute pool, as quantized kernels will run it. The figure is bytes of
//! quantized input per second; the cost model charges a task's quantized bytes at it.

use std::time::Instant;

use ferry_core::profile::DequantRate;
use ferry_core::units::{KIB, MIB};
use ferry_engine::kernels::{self, quant::BlockFormat};

use super::{median_spread, ProfileOptions};

/// Quantized bytes decoded per trial: enough for tens of milliseconds on a fast machine.
const INPUT_BYTES: u64 = 32 * MIB;
/// Input decoded per step: its f32 output stays in a core's cache, so the figure is the
/// decoder's, not the memory's (which the roofline already prices).
const STEP_INPUT_BYTES: u64 = 16 * KIB;

/// One rate per block format the engine decodes, named as plans name formats (`q4_k`).
pub(crate) fn measure_dequantize(options: &ProfileOptions) -> Vec<DequantRate> {
    BlockFormat::ALL
        .iter()
        .map(|&format| {
            let input = blocks(format, INPUT_BYTES);
            let rates: Vec<f64> = (0..options.trials.max(1)).map(|_| timed_dequantize(format, &input)).collect();
            DequantRate { format: format.name().to_ascii_lowercase(), bytes_per_s: median_spread(&rates).0 }
        })
        .collect()
}

/// About `bytes` of whole blocks of `format` with pseudo-random values and plausible
/// f16 scales (0.01): random scale bits would include infinities and NaNs.
fn blocks(format: BlockFormat, bytes: u64) -> Vec<u8> {
    let (_, block_bytes) = format.block();
    let count = (bytes as usize / block_bytes).max(1);
    let mut rng = ferry_engine::synth::SplitMix64::new(block_bytes as u64);
    let mut data: Vec<u8> = (0..count * block_bytes).map(|_| rng.next_u64() as u8).collect();
    // 0.01 as an f16 (exponent 8, mantissa 287).
    let scale = 0x211Fu16.to_le_bytes();
    // Where each format keeps its f16 scales (ggml's block layouts).
    let scale_offsets: &[usize] = match format {
        BlockFormat::Q8_0 | BlockFormat::Q4_0 => &[0],
        BlockFormat::Q4K => &[0, 2],
        BlockFormat::Q6K => &[208],
    };
    for block in data.chunks_exact_mut(block_bytes) {
        for &at in scale_offsets {
            block[at..at + 2].copy_from_slice(&scale);
        }
    }
    data
}

/// Bytes of `input` decoded per second on every thread of the compute pool.
fn timed_dequantize(format: BlockFormat, input: &[u8]) -> f64 {
    let (weights, block_bytes) = format.block();
    let step = (STEP_INPUT_BYTES as usize / block_bytes).max(1) * block_bytes;
    let pool = kernels::compute_pool();
    let threads = pool.current_num_threads().max(1);
    let per_thread = input.len().div_ceil(threads).div_ceil(block_bytes) * block_bytes;
    let start = Instant::now();
    pool.scope(|scope| {
        for part in input.chunks(per_thread) {
            scope.spawn(move |_| {
                let mut out = vec![0.0f32; step / block_bytes * weights];
                for piece in part.chunks(step) {
                    let values = piece.len() / block_bytes * weights;
                    kernels::quant::dequantize(format, piece, &mut out[..values]);
                }
                std::hint::black_box(&out);
            });
        }
    });
    input.len() as f64 / start.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_format_the_engine_decodes_gets_a_plausible_rate() {
        let options = ProfileOptions { trials: 1, ..ProfileOptions::quick(std::env::temp_dir()) };
        let rates = measure_dequantize(&options);
        let names: Vec<&str> = rates.iter().map(|r| r.format.as_str()).collect();
        assert_eq!(names, ["q8_0", "q4_0", "q4_k", "q6_k"]);
        for rate in &rates {
            // Slower than 1 MB/s or faster than 10 TB/s would be a broken timer, not a CPU.
            assert!((1e6..1e13).contains(&rate.bytes_per_s), "{}: {}", rate.format, rate.bytes_per_s);
            ferry_core::model::WeightFormat::parse(&rate.format).unwrap();
        }
    }
}
