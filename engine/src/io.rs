//! Disk I/O: reads with O_DIRECT into page-aligned buffers (the page cache is
//! bypassed, so the disk, not RAM, is measured), issued as `chunk_bytes` requests by
//! a pool of `io_queue_depth` threads shared by all disk tasks — the same request
//! size and requests-in-flight the simulator's disk curve is indexed by.
//!
//! The pool serves the reads in flight in turn, one request of each (round robin over
//! submissions), not in the order they were queued: the simulator shares the disk
//! among the tasks reading at once, and a small read (a KV cache) queued behind a
//! prefetch of several layers' weights would otherwise wait for all of them.
//!
//! Reads come in two priorities (`ReadPriority`): urgent ones (a layer's KV cache,
//! which the next attention waits on) are taken before any streamed weights. At the
//! disk they still queue behind the requests already submitted, and an elevator
//! scheduler (mq-deadline, a SATA or virtual disk's default) can hold a small read far
//! from a sequential stream up to its deadline (500 ms by default). Issuing the
//! streams in the kernel's idle I/O class removed most of that wait for a lone probe
//! but made whole runs no faster (BENCHMARKS.md), so every read keeps the default class.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use crate::memory::{Buffer, HUGE_PAGE, PAGE};
use crate::EngineError;

/// A file opened for direct reads (or, where the file system refuses O_DIRECT,
/// buffered reads followed by dropping the pages from the cache).
pub struct DiskFile {
    pub path: PathBuf,
    file: File,
    pub direct: bool,
}

impl DiskFile {
    pub fn open(path: &Path, allow_buffered: bool) -> Result<DiskFile, EngineError> {
        match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(file) => Ok(DiskFile { path: path.to_path_buf(), file, direct: true }),
            Err(e) if allow_buffered && e.raw_os_error() == Some(libc::EINVAL) => {
                let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
                Ok(DiskFile { path: path.to_path_buf(), file, direct: false })
            }
            Err(e) => Err(EngineError::io(path, e)),
        }
    }

    /// Reads `len` bytes at `offset` into `dest` (page-aligned memory, page-multiple
    /// length, page-aligned offset when direct).
    fn read_at(&self, dest: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let mut done = 0;
        while done < dest.len() {
            let n = self.file.read_at(&mut dest[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        if !self.direct {
            // SAFETY: plain advisory call on an open descriptor.
            unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&self.file),
                    offset as i64,
                    dest.len() as i64,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
        Ok(done)
    }
}

/// Which reads the pool serves first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPriority {
    /// Small reads the next computation waits on (a KV cache): taken before streamed ones.
    Urgent,
    /// Weights streamed ahead of use: in turn among themselves.
    Stream,
}

struct Request {
    file: Arc<DiskFile>,
    offset: u64,
    dest: *mut u8,
    len: usize,
    /// Read through a bounce buffer of huge pages (`Bounces`), then copied to `dest`.
    bounce: bool,
    done: mpsc::Sender<std::io::Result<usize>>,
}

/// Buffers of whole huge pages that reads into small pages go through when streamed
/// weights are in huge pages (the default; see `memory`): a streamed
/// buffer's last partial 2 MiB keeps small pages, and on this project's VM a direct
/// read into small pages ran at about 0.8 GB/s against about 5 GB/s into huge pages
/// (each 4 KiB page is a segment of the disk's request, 254 to a request, so the read
/// is split into many requests): a 5.5 MiB read with 1.5 MiB in small pages ran at 2 GB/s, where the
/// profile, reading into whole huge pages, measured 5 (BENCHMARKS.md, "Huge pages:
/// where the time goes"). Copying the tail out of a bounce costs about 0.15 ms per
/// 1.5 MiB. `BOUNCES` of them at most (memory the budget does not see): a request
/// waits for one to be free rather than read into small pages (reading directly when
/// none could be mapped), since two reads in flight into huge pages outrun eight into
/// small ones.
#[derive(Default)]
struct Bounces {
    free: Mutex<(Vec<Buffer>, usize)>,
    returned: Condvar,
}

const BOUNCES: usize = 2;
const BOUNCE_BYTES: usize = HUGE_PAGE;

impl Bounces {
    /// Reads `dest.len()` (at most `BOUNCE_BYTES`) bytes at `offset` through a bounce
    /// buffer, or straight into `dest` when none can be had.
    fn read_through(&self, file: &DiskFile, dest: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let Some(mut bounce) = self.take() else { return file.read_at(dest, offset) };
        let len = dest.len();
        let result = file.read_at(&mut bounce.as_mut_slice()[..len], offset);
        if let Ok(done) = result {
            dest[..done].copy_from_slice(&bounce.as_slice()[..done]);
        }
        self.give(bounce);
        result
    }

    /// A free bounce buffer, a new one while fewer than `BOUNCES` exist, else the next
    /// one handed back; `None` if one could not be mapped (or the lock is poisoned).
    fn take(&self) -> Option<Buffer> {
        let mut state = self.free.lock().ok()?;
        loop {
            let (free, made) = &mut *state;
            if let Some(bounce) = free.pop() {
                return Some(bounce);
            }
            if *made < BOUNCES {
                *made += 1;
                drop(state);
                let bounce = Buffer::huge(BOUNCE_BYTES).ok();
                if bounce.is_none() {
                    // Never mapped: others may try again (and read directly meanwhile).
                    if let Ok(mut state) = self.free.lock() {
                        state.1 -= 1;
                    }
                }
                return bounce;
            }
            state = self.returned.wait(state).ok()?;
        }
    }

    fn give(&self, bounce: Buffer) {
        if let Ok(mut state) = self.free.lock() {
            state.0.push(bounce);
        }
        self.returned.notify_one();
    }
}

// The destination stays valid and untouched by others until the request's sender is
// answered (the submitting task waits for every answer before using the buffer).
unsafe impl Send for Request {}

/// The requests waiting, by submission (one read of one task), urgent ones apart: the
/// front urgent submission, else the front streamed one, gives the next request and
/// goes to the back of its queue if it has more.
#[derive(Default)]
struct Waiting {
    urgent: VecDeque<VecDeque<Request>>,
    streamed: VecDeque<VecDeque<Request>>,
    closed: bool,
}

impl Waiting {
    fn next(&mut self) -> Option<Request> {
        let queue = if self.urgent.is_empty() { &mut self.streamed } else { &mut self.urgent };
        let mut submission = queue.pop_front()?;
        let request = submission.pop_front();
        if !submission.is_empty() {
            queue.push_back(submission);
        }
        request
    }
}

/// `threads` workers serving read requests: the disk's queue depth.
pub struct ReadPool {
    waiting: Arc<(Mutex<Waiting>, Condvar)>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl ReadPool {
    pub fn new(threads: usize) -> ReadPool {
        let waiting: Arc<(Mutex<Waiting>, Condvar)> = Arc::default();
        let bounces: Arc<Bounces> = Arc::default();
        let workers = (0..threads.max(1))
            .map(|i| {
                let waiting = Arc::clone(&waiting);
                let bounces = Arc::clone(&bounces);
                std::thread::Builder::new()
                    .name(format!("ferry-io-{i}"))
                    .spawn(move || {
                        while let Some(request) = ReadPool::take(&waiting) {
                            // SAFETY: see `Request`.
                            let dest = unsafe { std::slice::from_raw_parts_mut(request.dest, request.len) };
                            let result = if request.bounce {
                                bounces.read_through(&request.file, dest, request.offset)
                            } else {
                                request.file.read_at(dest, request.offset)
                            };
                            let _ = request.done.send(result);
                        }
                    })
                    .expect("spawn an I/O thread")
            })
            .collect();
        ReadPool { waiting, workers }
    }

    /// The next request to serve, waiting for one; `None` once the pool is closed.
    fn take(waiting: &(Mutex<Waiting>, Condvar)) -> Option<Request> {
        let (lock, ready) = waiting;
        let mut queue = lock.lock().ok()?;
        loop {
            if let Some(request) = queue.next() {
                return Some(request);
            }
            if queue.closed {
                return None;
            }
            queue = ready.wait(queue).ok()?;
        }
    }

    /// Reads the byte ranges `ranges` (absolute file offsets) of `file` one after another
    /// into a new buffer, as `chunk_bytes` requests in flight on the pool. Returns the
    /// buffer and, for each range, where its bytes start in it.
    pub fn read_ranges(
        &self,
        file: &Arc<DiskFile>,
        ranges: &[(u64, u64)],
        chunk_bytes: u64,
        priority: ReadPriority,
    ) -> Result<(Buffer, Vec<usize>), EngineError> {
        self.read_ranges_into(file, ranges, chunk_bytes, priority, Buffer::new)
    }

    /// Reads `ranges` into a buffer from `recycler` and hands it straight back: the
    /// engine's steady-state read (no fresh mapping), for measurements that only need
    /// the bytes to arrive.
    pub fn read_recycled(
        &self,
        file: &Arc<DiskFile>,
        ranges: &[(u64, u64)],
        chunk_bytes: u64,
        priority: ReadPriority,
        recycler: &crate::memory::Recycler,
    ) -> Result<(), EngineError> {
        let (buffer, _) = self.read_ranges_into(file, ranges, chunk_bytes, priority, |len| recycler.take(len))?;
        recycler.give(buffer);
        Ok(())
    }

    /// `read_ranges` into a buffer from `allocate(bytes)` (e.g. a recycled one).
    pub fn read_ranges_into(
        &self,
        file: &Arc<DiskFile>,
        ranges: &[(u64, u64)],
        chunk_bytes: u64,
        priority: ReadPriority,
        allocate: impl FnOnce(usize) -> std::io::Result<Buffer>,
    ) -> Result<(Buffer, Vec<usize>), EngineError> {
        // Each range is widened to whole pages (direct I/O), read into its own page-aligned slot.
        let mut slots = Vec::new();
        let mut total = 0usize;
        for &(start, end) in ranges {
            let aligned_start = start / PAGE as u64 * PAGE as u64;
            let aligned_end = end.div_ceil(PAGE as u64) * PAGE as u64;
            slots.push((aligned_start, aligned_end, total, (start - aligned_start) as usize));
            total += (aligned_end - aligned_start) as usize;
        }
        let mut buffer = allocate(total).map_err(|e| EngineError::io(&file.path, e))?;
        let huge_bytes = buffer.huge_bytes();
        let base = buffer.mapped_mut().as_mut_ptr();
        // Where small pages start, when streamed weights are meant to be in huge pages
        // (see `Bounces`).
        let small_from = match crate::memory::streams_in_huge_pages() && file.direct {
            true => base as usize + huge_bytes,
            false => usize::MAX,
        };
        let pieces: Vec<_> = slots
            .iter()
            // SAFETY: every slot lies inside `buffer`, and slots do not overlap.
            .map(|&(aligned_start, aligned_end, slot, _)| {
                (aligned_start, unsafe { base.add(slot) }, (aligned_end - aligned_start) as usize)
            })
            .collect();
        self.read_pieces(file, &pieces, chunk_bytes, priority, small_from)?;
        let starts = slots.iter().map(|&(_, _, slot, skip)| slot + skip).collect();
        Ok((buffer, starts))
    }

    /// Reads `dest.len()` bytes of `file` at `offset` into `dest` (page-aligned memory
    /// owned by the caller, e.g. pinned host memory of a GPU backend; page-multiple length
    /// and page-aligned offset when the file is direct) as `chunk_bytes` requests.
    pub fn read_into(
        &self,
        file: &Arc<DiskFile>,
        offset: u64,
        dest: &mut [u8],
        chunk_bytes: u64,
        priority: ReadPriority,
    ) -> Result<(), EngineError> {
        if file.direct
            && (!(dest.as_ptr() as usize).is_multiple_of(PAGE)
                || !dest.len().is_multiple_of(PAGE)
                || !offset.is_multiple_of(PAGE as u64))
        {
            return Err(EngineError::Internal(format!(
                "direct read of {} bytes at {offset} into {:p}: needs page alignment",
                dest.len(),
                dest.as_ptr()
            )));
        }
        self.read_pieces(file, &[(offset, dest.as_mut_ptr(), dest.len())], chunk_bytes, priority, usize::MAX)
    }

    /// Queues every (file offset, destination, length) piece as `chunk_bytes` requests,
    /// then waits for all of them; requests into memory at or past the address
    /// `small_from` go through a bounce buffer (`Bounces`), no request crossing it.
    /// The destinations must stay valid and untouched until this returns.
    fn read_pieces(
        &self,
        file: &Arc<DiskFile>,
        pieces: &[(u64, *mut u8, usize)],
        chunk_bytes: u64,
        priority: ReadPriority,
        small_from: usize,
    ) -> Result<(), EngineError> {
        let chunk = (chunk_bytes as usize).max(PAGE) / PAGE * PAGE;
        let (done_tx, done_rx) = mpsc::channel();
        let mut submission = VecDeque::new();
        for &(start, base, len) in pieces {
            let mut done = 0;
            while done < len {
                // SAFETY: `done < len`, inside the caller's destination.
                let dest = unsafe { base.add(done) };
                let address = dest as usize;
                let bounce = address >= small_from;
                let n = match bounce {
                    true => chunk.min(BOUNCE_BYTES),
                    // Stop at the small pages, a whole number of pages away.
                    false => chunk.min(small_from.saturating_sub(address)),
                }
                .min(len - done);
                let offset = start + done as u64;
                let file = Arc::clone(file);
                submission.push_back(Request { file, offset, dest, len: n, bounce, done: done_tx.clone() });
                done += n;
            }
        }
        let requests = submission.len();
        {
            let (lock, ready) = &*self.waiting;
            let mut queue = lock.lock().map_err(|_| EngineError::Internal("I/O pool lock poisoned".into()))?;
            if queue.closed {
                return Err(EngineError::Internal("I/O pool stopped".into()));
            }
            match priority {
                ReadPriority::Urgent => queue.urgent.push_back(submission),
                ReadPriority::Stream => queue.streamed.push_back(submission),
            }
            ready.notify_all();
        }
        let mut first_error = None;
        for _ in 0..requests {
            match done_rx.recv() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => return Err(EngineError::Internal("I/O worker vanished".into())),
            }
        }
        match first_error {
            Some(e) => Err(EngineError::io(&file.path, e)),
            None => Ok(()),
        }
    }
}

impl Drop for ReadPool {
    fn drop(&mut self) {
        let (lock, ready) = &*self.waiting;
        if let Ok(mut queue) = lock.lock() {
            queue.closed = true;
        }
        ready.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads in flight take turns: a one-request read queued after a four-request one
    /// is served second, not fifth.
    #[test]
    fn the_pool_serves_the_reads_in_flight_in_turn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let file = Arc::new(DiskFile::open(&path, true).unwrap());
        let (done, _answers) = mpsc::channel();
        let request = |offset: u64| Request {
            file: Arc::clone(&file),
            offset,
            dest: std::ptr::null_mut(),
            len: 0,
            bounce: false,
            done: done.clone(),
        };
        let mut waiting = Waiting::default();
        waiting.streamed.push_back((0..4).map(request).collect());
        waiting.streamed.push_back([request(100)].into_iter().collect());
        let order: Vec<u64> = std::iter::from_fn(|| waiting.next()).map(|r| r.offset).collect();
        assert_eq!(order, [0, 100, 1, 2, 3]);
        // An urgent read queued after both streams goes before their next requests.
        waiting.streamed.push_back((0..3).map(request).collect());
        waiting.streamed.push_back((10..12).map(request).collect());
        assert_eq!(waiting.next().map(|r| r.offset), Some(0));
        waiting.urgent.push_back([request(50), request(51)].into_iter().collect());
        let order: Vec<u64> = std::iter::from_fn(|| waiting.next()).map(|r| r.offset).collect();
        assert_eq!(order, [50, 51, 10, 1, 11, 2]);
    }

    /// Reads of both priorities arrive whole and right.
    #[test]
    fn urgent_and_streamed_reads_return_the_files_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..64 * 4096u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = Arc::new(DiskFile::open(&path, true).unwrap());
        let pool = ReadPool::new(2);
        for priority in [ReadPriority::Stream, ReadPriority::Urgent] {
            let (buffer, starts) = pool.read_ranges(&file, &[(4096, 12288), (40960, 45056)], 4096, priority).unwrap();
            assert_eq!(&buffer.as_slice()[starts[0]..starts[0] + 8192], &bytes[4096..12288]);
            assert_eq!(&buffer.as_slice()[starts[1]..starts[1] + 4096], &bytes[40960..45056]);
        }
    }

    /// Requests into the small pages past a buffer's huge ones go through the bounce
    /// buffers, split where the small pages start, and every byte arrives, also when
    /// more such requests are in flight than there are bounce buffers.
    #[test]
    fn reads_into_small_pages_through_bounce_buffers_return_the_files_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let len = HUGE_PAGE * 3;
        let bytes: Vec<u8> = (0..len as u32).map(|i| (i * 13 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = Arc::new(DiskFile::open(&path, true).unwrap());
        let pool = ReadPool::new(2 * BOUNCES + 1);
        for (chunk, small_from) in [(HUGE_PAGE, 5 * PAGE), (3 * PAGE, HUGE_PAGE + 7 * PAGE), (len, 0)] {
            let mut buffer = Buffer::new(len - PAGE).unwrap();
            let dest = buffer.mapped_mut().as_mut_ptr();
            let small_from = dest as usize + small_from;
            let pieces = [(PAGE as u64, dest, len - PAGE)];
            pool.read_pieces(&file, &pieces, chunk as u64, ReadPriority::Stream, small_from).unwrap();
            assert!(buffer.as_slice() == &bytes[PAGE..], "chunks of {chunk} bytes, small pages from {small_from}");
        }
    }

    /// No more than `BOUNCES` bounce buffers are ever mapped: a request finding them
    /// all taken waits for one handed back, and gets that one.
    #[test]
    fn bounce_buffers_are_few_and_waited_for() {
        let bounces = Bounces::default();
        let mut taken: Vec<Buffer> = (0..BOUNCES).map_while(|_| bounces.take()).collect();
        assert_eq!(taken.len(), BOUNCES);
        assert!(taken.iter().all(|b| b.len() >= BOUNCE_BYTES));
        let returned = taken.pop().unwrap();
        let address = returned.as_slice().as_ptr() as usize;
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| bounces.take().map(|b| b.as_slice().as_ptr() as usize));
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!waiter.is_finished(), "a third request waits while both are taken");
            bounces.give(returned);
            assert_eq!(waiter.join().unwrap(), Some(address));
        });
        assert_eq!(bounces.free.lock().unwrap().1, BOUNCES);
    }
}
