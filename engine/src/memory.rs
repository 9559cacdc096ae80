//! Memory the engine owns: page-aligned buffers mapped straight from the kernel, so
//! that what the arenas account is what the process holds (malloc would keep freed
//! blocks and blur the budget), and direct I/O can read into them.

use std::ptr::NonNull;

pub const PAGE: usize = 4096;

/// What a run may hold beyond its device budget: the binary, thread stacks, the task
/// graph and trace, allocator slack and the KV/activation copies kernels make. Tested
/// (`tests/cli.rs`): a run's peak resident set stays within budget + this.
///
/// Measured on test-small (batch 2, prompt 16): resident set above the accounted
/// device use peaks at 46 MiB with two compute threads and 30 MiB with one — about
/// 14 MiB fixed plus 16 MiB per compute thread (the gemm crate's packing buffers and
/// the kernels' thread-local scratch), independent of the model's size.
pub const FIXED_OVERHEAD_BYTES: u64 = 64 << 20;

/// An anonymous, page-aligned, zero-filled mapping; unmapped on drop.
pub struct Buffer {
    ptr: NonNull<u8>,
    len: usize,
    mapped: usize,
}

// The buffer is plain memory owned by this value.
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

impl Buffer {
    pub fn new(len: usize) -> std::io::Result<Buffer> {
        let mapped = len.max(1).div_ceil(PAGE) * PAGE;
        // SAFETY: an anonymous private mapping with no address hint; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Buffer { ptr: NonNull::new(ptr.cast()).expect("mmap returned null"), len, mapped })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is at least `len` bytes and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The whole page-rounded mapping (direct I/O reads whole pages).
    pub fn mapped_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `mapped` bytes long.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.mapped) }
    }

    pub fn as_f32(&self) -> &[f32] {
        let (head, body, _) = unsafe { self.as_slice().align_to::<f32>() };
        debug_assert!(head.is_empty());
        body
    }

    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        let (head, body, _) = unsafe { self.as_mut_slice().align_to_mut::<f32>() };
        debug_assert!(head.is_empty());
        body
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: ptr/mapped came from a successful mmap and are unmapped once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.mapped);
        }
    }
}

/// Makes malloc return large freed blocks to the kernel. glibc otherwise raises its
/// mmap threshold after the first large free and serves later large vectors from
/// per-thread heaps it keeps, so the process would hold memory the plan released.
pub fn tame_allocator() {
    // SAFETY: mallopt only changes allocator tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

/// Peak resident set size of this process so far (VmHWM), bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_field("VmHWM:")
}

/// Current resident set size (VmRSS), bytes.
pub fn rss_bytes() -> Option<u64> {
    status_field("VmRSS:")
}

fn status_field(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes this process has caused to be read from storage (`read_bytes` of
/// /proc/self/io): reads served by the page cache do not count, so it shows whether
/// weights really came from the disk.
pub fn storage_read_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines().find(|l| l.starts_with("read_bytes:"))?.split_whitespace().nth(1)?.parse().ok()
}
