//! The memory's read bandwidth: the ceiling of any product that streams its weights
//! from RAM. A measured profile keeps it as `memory_bytes_per_s`, and the share the
//! engine's one-row products reach of it as `memory_efficiency`, so the profile says
//! how close decoding from RAM comes to the memory itself (their product, the rate the
//! simulator charges, is the one-row products' measured rate either way).

use std::time::Instant;

use std::path::Path;

use ferry_engine::memory::Buffer;

use crate::{io_error, median_spread, ProfileError};

/// Read bandwidth, bytes/s: each of `threads` threads sums its share of a buffer of
/// `bytes` (larger than any last-level cache, so that the reads reach the memory), the
/// median over `trials`.
pub(crate) fn read_bytes_per_s(bytes: u64, threads: usize, trials: usize) -> Result<f64, ProfileError> {
    let words = (bytes / 8).max(8) as usize;
    // In the engine's own memory (huge pages where the kernel gives them), as the
    // weights the products read; written, so that every page is mapped before the timing.
    let mut buffer = Buffer::new(words * 8).map_err(io_error(Path::new("memory")))?;
    // SAFETY: any bytes are a valid u64; the buffer is page-aligned, so all of it
    // is in the aligned middle.
    let (_, data, _) = unsafe { buffer.as_mut_slice().align_to_mut::<u64>() };
    data.fill(1);
    let data: &[u64] = data;
    let per_thread = words.div_ceil(threads.max(1));
    let mut rates = Vec::new();
    for _ in 0..trials.max(1) {
        let start = Instant::now();
        let sum = std::thread::scope(|scope| {
            let sums: Vec<_> = data.chunks(per_thread).map(|chunk| scope.spawn(move || sum_words(chunk))).collect();
            sums.into_iter().map(|s| s.join().unwrap_or(0)).fold(0u64, u64::wrapping_add)
        });
        let seconds = start.elapsed().as_secs_f64();
        // Every word is 1: the sum says every word was read; `black_box` keeps the reads.
        debug_assert_eq!(sum, words as u64);
        std::hint::black_box(sum);
        rates.push((words * 8) as f64 / seconds.max(1e-9));
    }
    Ok(median_spread(&rates).0)
}

/// The sum of `words`, with the widest vector loads the CPU has: narrow loads issue
/// more instructions per cache line, and one core then keeps fewer lines in flight.
fn sum_words(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { sum_words_avx512(words) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { sum_words_avx2(words) };
        }
    }
    sum_words_portable(words)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_words_avx512(words: &[u64]) -> u64 {
    sum_words_portable(words)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(words: &[u64]) -> u64 {
    sum_words_portable(words)
}

/// A plain sum: integer addition is associative, so the compiler splits it over
/// several vector accumulators and the loop waits on memory, not on one chain of adds
/// (inlined into each caller, so that it is vectorized at the caller's width).
#[inline(always)]
fn sum_words_portable(words: &[u64]) -> u64 {
    words.iter().fold(0u64, |sum, &word| sum.wrapping_add(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_is_read_once() {
        let words: Vec<u64> = (1..=1001).collect();
        assert_eq!(sum_words(&words), 1001 * 1002 / 2);
        assert_eq!(sum_words_portable(&words), 1001 * 1002 / 2);
        let rate = read_bytes_per_s(8 << 20, 3, 2).unwrap();
        assert!(rate.is_finite() && rate > 1e8, "{rate} bytes/s");
    }
}
