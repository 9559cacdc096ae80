//! Freed buffers kept mapped for reuse within what the budget leaves free.

use super::{Buffer, PAGE};
use std::sync::atomic::{AtomicU64, Ordering};

/// Freed buffers kept mapped for reuse, so that streaming weights does not map,
/// page-fault (the kernel zeroes every page: about 0.3 ms per MiB of CPU here) and
/// unmap (about 20 µs per MiB) the same sizes over and over. How much it may keep is
/// set from outside (`set_limit`): the executor keeps it at the device budget minus
/// what the graph has accounted, so memory held never exceeds the budget.
///
/// Past the limit, kept buffers hand back only the pages they must (their tails,
/// largest buffer first), not whole buffers: under a budget the tuner filled, the room
/// left when a layer's weights are freed is often a few hundred KiB short of them once
/// the next read has its share, and unmapping the whole buffer then made every later
/// read of that size fault in and zero a fresh one (on test-small's CI plan streaming
/// 1 MiB requests, 1.29 GB of 1.76 GB read, the zeroing on the I/O threads taking
/// the compute threads' cores). A trimmed buffer faults in only its released tail
/// when it is reused.
#[derive(Default)]
pub struct Recycler {
    free: std::sync::Mutex<Vec<Buffer>>,
    /// Bytes served from kept pages, and faulted in anew (fresh mappings and trimmed
    /// tails), by `take`/`take_kept`.
    reused_bytes: AtomicU64,
    new_bytes: AtomicU64,
}

impl Recycler {
    pub fn new() -> Recycler {
        Recycler::default()
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<Buffer>> {
        self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Bytes kept for reuse now (the pages kept buffers hold).
    pub fn free_bytes(&self) -> u64 {
        self.free().iter().map(|b| b.populated() as u64).sum()
    }

    /// A kept buffer that can hold `len` bytes, or a new one.
    pub fn take(&self, len: usize) -> std::io::Result<Buffer> {
        match self.take_kept(len) {
            Some(buffer) => Ok(buffer),
            None => {
                self.new_bytes.fetch_add(len as u64, Ordering::Relaxed);
                Buffer::new(len)
            }
        }
    }

    /// A kept buffer for `len` bytes, if one is mapped large enough but not twice as
    /// large (a small read does not eat the pages a large one will want): of those, the
    /// one holding the most of the `len` bytes' pages (the fewest to fault in), then
    /// the smallest mapping. Its pages past `len` are handed back
    /// (`Buffer::release_past`), so it holds no more than the request accounts: a
    /// layer whose tensors mix formats (a Q4_K_M file's Q4_K and Q6_K MLPs: 19.0 and
    /// 21.9 MiB) reuses a larger layer's buffer instead of mapping its own.
    pub fn take_kept(&self, len: usize) -> Option<Buffer> {
        let needed = len.max(1).div_ceil(PAGE) * PAGE;
        let mut free = self.free();
        let fit = free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.mapped >= needed && b.mapped <= 2 * needed)
            .max_by_key(|(_, b)| (b.populated().min(needed), std::cmp::Reverse(b.mapped)))
            .map(|(i, _)| i)?;
        let mut buffer = free.swap_remove(fit);
        drop(free);
        buffer.release_past(len);
        let faulted = (len as u64).saturating_sub(buffer.populated() as u64);
        self.reused_bytes.fetch_add(len as u64 - faulted, Ordering::Relaxed);
        self.new_bytes.fetch_add(faulted, Ordering::Relaxed);
        Some(buffer.in_use().with_len(len))
    }

    /// (bytes served from kept pages, bytes faulted in anew) so far.
    pub fn counters(&self) -> (u64, u64) {
        (self.reused_bytes.load(Ordering::Relaxed), self.new_bytes.load(Ordering::Relaxed))
    }

    /// Keeps `buffer` for reuse. Called as memory the graph still accounts is freed
    /// (the freeing task has not completed), so keeping it changes nothing that is
    /// mapped; when the task completes the limit is set again (`set_limit`, from the
    /// budget's room, which then includes these bytes) and what no longer fits is
    /// handed back. Checking the limit here instead unmapped every buffer but the first
    /// that one task frees (a GGUF layer's tensors are several reads), so under a tight
    /// budget most loads mapped new memory, whose zeroing took the compute threads'
    /// time on two cores.
    pub fn give(&self, buffer: Buffer) {
        self.free().push(buffer);
    }

    /// Sets how many bytes may be kept, handing back kept pages past it: the tail of
    /// the buffer holding the most, then the next; a buffer left with nothing is
    /// unmapped.
    pub fn set_limit(&self, limit_bytes: u64) {
        let mut free = self.free();
        let mut kept: u64 = free.iter().map(|b| b.populated() as u64).sum();
        let mut unmapped = Vec::new();
        while kept > limit_bytes {
            let Some(largest) = (0..free.len()).max_by_key(|&i| free[i].populated()) else { break };
            let excess = (kept - limit_bytes) as usize;
            let buffer = &mut free[largest];
            match buffer.populated().checked_sub(excess) {
                Some(keep) if keep > 0 => {
                    kept -= buffer.release_from(keep) as u64;
                    if buffer.populated() == 0 {
                        // The granule took it all.
                        unmapped.push(free.swap_remove(largest));
                    }
                }
                _ => {
                    let gone = free.swap_remove(largest);
                    kept -= gone.populated() as u64;
                    unmapped.push(gone);
                }
            }
        }
        drop(free);
        drop(unmapped);
    }
}

#[cfg(test)]
mod tests {
    use super::super::HUGE_PAGE;
    use super::*;

    #[test]
    fn the_recycler_reuses_mappings_within_its_limit() {
        let recycler = Recycler::new();
        recycler.set_limit(0);
        let first = recycler.take(100 * PAGE).unwrap();
        // Freed while the graph still accounts it: kept even at a limit of 0 (moving a
        // buffer to the kept list changes nothing that is mapped), a second one too ...
        recycler.give(first);
        recycler.give(Buffer::new(PAGE).unwrap());
        assert_eq!(recycler.free_bytes(), 101 * PAGE as u64);
        // ... until the limit is set again: the largest hands back what does not fit.
        recycler.set_limit(100 * PAGE as u64);
        assert_eq!(recycler.free_bytes(), 100 * PAGE as u64);
        recycler.set_limit(PAGE as u64);
        assert_eq!(recycler.free_bytes(), PAGE as u64);
        recycler.set_limit(0);
        assert_eq!(recycler.free_bytes(), 0);
        let first = recycler.take(100 * PAGE).unwrap();
        let address = first.as_slice().as_ptr();
        recycler.give(first);
        recycler.set_limit(100 * PAGE as u64);
        assert_eq!(recycler.free_bytes(), 100 * PAGE as u64);
        // The next request of a similar size gets the same mapping back, sized to it.
        let again = recycler.take(95 * PAGE + 1).unwrap();
        assert_eq!(again.as_slice().as_ptr(), address);
        assert_eq!(again.len(), 95 * PAGE + 1);
        assert_eq!(recycler.free_bytes(), 0);
        recycler.give(again);
        // Lowering the limit hands back pages until they fit, the mapping kept.
        recycler.set_limit(50 * PAGE as u64);
        assert_eq!(recycler.free_bytes(), 50 * PAGE as u64);
        // A request of less than half of it maps its own ...
        let tiny = recycler.take(49 * PAGE).unwrap();
        assert_ne!(tiny.as_slice().as_ptr(), address);
        drop(tiny);
        // ... a smaller one takes the larger mapping, which hands back its pages past
        // the request.
        let small = recycler.take(60 * PAGE).unwrap();
        assert_eq!(small.as_slice().as_ptr(), address);
        assert_eq!(small.populated(), small.mapped_len(), "in use: all of it may be touched");
        assert_eq!(recycler.free_bytes(), 0);
        recycler.set_limit(1 << 30);
        recycler.give(small);
        assert_eq!(recycler.free_bytes(), 100 * PAGE as u64, "counted whole again once given back");
        recycler.set_limit(10 * PAGE as u64);
        recycler.give(Buffer::new(20 * PAGE).unwrap());
        recycler.give(Buffer::new(30 * PAGE).unwrap());
        assert!(recycler.take_kept(120 * PAGE).is_none(), "nothing kept is large enough");
        // The one holding most of the request's pages, then the smallest mapping.
        assert_eq!(recycler.take_kept(19 * PAGE).map(|b| b.mapped_len()), Some(20 * PAGE));
        assert_eq!(recycler.take_kept(15 * PAGE).map(|b| b.mapped_len()), Some(30 * PAGE));
    }

    #[test]
    fn a_trimmed_buffer_keeps_its_mapping_and_counts_its_tail_as_faulted_anew() {
        let recycler = Recycler::new();
        let mut buffer = recycler.take(64 * PAGE).unwrap();
        buffer.mapped_mut().fill(3);
        let address = buffer.as_slice().as_ptr();
        recycler.give(buffer);
        recycler.set_limit(40 * PAGE as u64);
        assert_eq!(recycler.free_bytes(), 40 * PAGE as u64);
        let (reused_before, new_before) = recycler.counters();
        let mut again = recycler.take(64 * PAGE).unwrap();
        assert_eq!(again.as_slice().as_ptr(), address, "the same mapping, not a new one");
        let (reused, new) = recycler.counters();
        assert_eq!(reused - reused_before, 40 * PAGE as u64);
        assert_eq!(new - new_before, 24 * PAGE as u64);
        // The kept head still holds its bytes; the handed-back tail reads as zeros and
        // is writable again.
        assert!(again.as_slice()[..40 * PAGE].iter().all(|&b| b == 3));
        assert!(again.as_slice()[40 * PAGE..].iter().all(|&b| b == 0));
        again.mapped_mut().fill(5);
        assert!(again.as_slice().iter().all(|&b| b == 5));
    }

    #[test]
    fn a_buffer_taken_for_less_holds_no_more_than_the_request() {
        let mut buffer = Buffer::huge(4 * HUGE_PAGE).unwrap();
        buffer.mapped_mut().fill(1);
        // Cut inside the second huge page: the huge part ends before it.
        assert_eq!(buffer.release_past(HUGE_PAGE + 3), 3 * HUGE_PAGE - PAGE);
        assert_eq!(buffer.populated(), HUGE_PAGE + PAGE);
        assert_eq!(buffer.huge_bytes(), HUGE_PAGE);
        assert!(buffer.as_slice()[..HUGE_PAGE + PAGE].iter().all(|&b| b == 1));
        assert!(buffer.as_slice()[HUGE_PAGE + PAGE..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_huge_page_buffer_hands_back_whole_huge_pages_of_its_head() {
        let mut buffer = Buffer::huge(4 * HUGE_PAGE).unwrap();
        buffer.mapped_mut().fill(1);
        // Keeping 2.5 huge pages' worth inside the huge part keeps 2 whole ones.
        assert_eq!(buffer.release_from(5 * HUGE_PAGE / 2), 2 * HUGE_PAGE);
        assert_eq!(buffer.populated(), 2 * HUGE_PAGE);
        assert_eq!(buffer.release_from(3 * HUGE_PAGE), 0, "nothing past what it holds");
        assert!(buffer.as_slice()[..2 * HUGE_PAGE].iter().all(|&b| b == 1));
        assert!(buffer.as_slice()[2 * HUGE_PAGE..].iter().all(|&b| b == 0));
    }
}
