//! Reads a file through the engine's read pool into recycled buffers of one size and
//! prints the rate: the probe behind BENCHMARKS.md's "Huge pages: where the time goes".
//!
//! usage: read_rates FILE REQUEST_KIB [CHUNK_KIB] [IN_FLIGHT] [MISALIGN_BYTES]
//!
//! Each of IN_FLIGHT threads reads REQUEST_KIB at scattered offsets (plus
//! MISALIGN_BYTES, widened to whole pages as the engine does), in CHUNK_KIB requests,
//! into a buffer from one recycler, 512 MiB in all. Run it with `FERRY_HUGE_PAGES=on`
//! and without to compare the buffers' page sizes; a request that is not a whole
//! number of 2 MiB leaves its buffer's last part in small pages.

use std::sync::Arc;
use std::time::Instant;

use ferry_engine::io::{DiskFile, ReadPool, ReadPriority};
use ferry_engine::memory::Recycler;

const KIB: u64 = 1024;
const TOTAL_BYTES: u64 = 512 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: read_rates FILE REQUEST_KIB [CHUNK_KIB] [IN_FLIGHT] [MISALIGN_BYTES]";
    let path = std::path::PathBuf::from(args.first().ok_or(usage)?);
    let number = |i: usize, default: u64| -> Result<u64, String> {
        args.get(i).map_or(Ok(default), |v| v.parse().map_err(|_| format!("{v:?} is not a number; {usage}")))
    };
    let request = number(1, 0)? * KIB;
    let chunk = number(2, 32 * KIB)? * KIB;
    let in_flight = number(3, 1)?.max(1);
    let misalign = number(4, 0)?;
    let size = std::fs::metadata(&path)?.len();
    if request == 0 || request + misalign + 2 * 4096 > size {
        return Err(format!("a request of 1 KiB up to the file's {size} bytes; {usage}").into());
    }
    let disk = Arc::new(DiskFile::open(&path, false)?);
    let pool = ReadPool::new(8);
    let recycler = Recycler::new();
    recycler.set_limit(u64::MAX);
    let start = Instant::now();
    std::thread::scope(|scope| -> Result<(), ferry_engine::EngineError> {
        let workers: Vec<_> = (0..in_flight)
            .map(|thread| {
                let (pool, disk, recycler) = (&pool, &disk, &recycler);
                scope.spawn(move || -> Result<(), ferry_engine::EngineError> {
                    let mut index = thread;
                    for _ in 0..TOTAL_BYTES / request / in_flight {
                        // Scattered, page-aligned, then misaligned like a tensor's start.
                        let offset = (index * 7919 * request) % (size - request - 8192) / 4096 * 4096 + misalign;
                        let read = |len: usize| recycler.take(len);
                        let (buffer, _) = pool.read_ranges_into(
                            disk,
                            &[(offset, offset + request)],
                            chunk,
                            ReadPriority::Stream,
                            read,
                        )?;
                        recycler.give(buffer);
                        index += in_flight;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| ferry_engine::EngineError::Internal("a reader panicked".into()))??;
        }
        Ok(())
    })?;
    let read = TOTAL_BYTES / request / in_flight * request * in_flight;
    println!(
        "{} KiB requests in {} KiB chunks, {in_flight} in flight, misaligned by {misalign}: {:.2} GB/s",
        request / KIB,
        chunk / KIB,
        read as f64 / start.elapsed().as_secs_f64() / 1e9
    );
    Ok(())
}
