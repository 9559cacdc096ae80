//! Memory the engine owns: page-aligned buffers mapped straight from the kernel, so
//! that what the arenas account is what the process holds (malloc would keep freed
//! blocks and blur the budget), and direct I/O can read into them.

use std::ptr::NonNull;

mod recycler;
pub use recycler::Recycler;

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

/// The size of a transparent huge page on x86-64 and most arm64 kernels.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// An anonymous private mapping of `len` bytes (a multiple of `PAGE`) starting at a
/// multiple of `alignment` (a power of two, at least `PAGE`): `alignment − PAGE` bytes
/// more are mapped and the ends beyond the aligned stretch unmapped again.
fn map_aligned(len: usize, alignment: usize) -> std::io::Result<NonNull<u8>> {
    let slack = alignment - PAGE;
    // SAFETY: an anonymous private mapping with no address hint; checked for MAP_FAILED.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + slack,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = ptr as usize;
    let head = start.next_multiple_of(alignment) - start;
    let tail = slack - head;
    // SAFETY: both stretches lie inside the mapping just made and outside the part
    // kept; unmapping page-aligned parts of a private anonymous mapping cannot fail
    // but for a limit on mappings, which leaves them mapped (and is harmless).
    unsafe {
        if head > 0 {
            libc::munmap(ptr, head);
        }
        if tail > 0 {
            libc::munmap((start + head + len) as *mut libc::c_void, tail);
        }
    }
    NonNull::new((start + head) as *mut u8).ok_or_else(|| std::io::Error::other("mmap returned a null address"))
}

/// Which buffers huge pages are asked for (`FERRY_HUGE_PAGES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HugePages {
    /// None (`FERRY_HUGE_PAGES=off`, or a kernel whose huge pages are off).
    Off,
    /// Weights kept for the whole run only. Measured, not recommended: 1.03–1.07×
    /// in RAM, but under a tight budget, with the streamed weights in small pages
    /// beside resident ones in huge pages, runs went at 0.26–0.54× of `Off` in 13
    /// pairs of 19 (cause not found; BENCHMARKS.md, "Huge pages: where the time goes").
    Resident,
    /// Every buffer of 2 MiB or more, streamed weights too (the default).
    All,
}

/// `FERRY_HUGE_PAGES`' value: `on` (or unset), `off` or `resident`; any other value is
/// refused with the accepted ones, to be reported once.
fn huge_pages_setting(value: Option<&str>) -> Result<HugePages, String> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("on") | Some("all") => Ok(HugePages::All),
        Some("off") => Ok(HugePages::Off),
        Some("resident") => Ok(HugePages::Resident),
        Some(other) => Err(format!("FERRY_HUGE_PAGES={other:?} is not one of on, off, resident; using on")),
    }
}

/// Which pages the engine's weights go into, as a profile's provenance records it
/// ("weights in huge pages", "weights in small pages", "resident weights in huge
/// pages"): a direct read into small pages runs several times slower on some disks
/// (see `ask_for_huge_pages`), so a profile measured in one mode misprices runs in
/// the other (`page_mode_mismatch`).
pub fn page_mode() -> &'static str {
    match huge_pages() {
        HugePages::All => "weights in huge pages",
        HugePages::Resident => "resident weights in huge pages",
        HugePages::Off => "weights in small pages",
    }
}

/// A note when a measured profile's provenance (`provenance`, the profiler's
/// description of what it ran) names another page mode than this process runs
/// (`page_mode`); `None` when they agree. A profile that names none predates the
/// field: its reads went into small pages unless it was measured with
/// `FERRY_HUGE_PAGES=on`. Only the cpu backend's profiles read into these buffers.
pub fn page_mode_mismatch(provenance: &str) -> Option<String> {
    mode_mismatch(provenance, page_mode())
}

fn mode_mismatch(provenance: &str, running: &str) -> Option<String> {
    if !provenance.starts_with("cpu") {
        return None;
    }
    // The longest first: "weights in huge pages" is inside "resident weights in ...".
    const MODES: [&str; 3] = ["resident weights in huge pages", "weights in huge pages", "weights in small pages"];
    let advice = "measure the profile again, or run with FERRY_HUGE_PAGES=on|off|resident as it was measured";
    match MODES.iter().find(|mode| provenance.contains(*mode)) {
        Some(mode) if *mode == running => None,
        Some(mode) => Some(format!("the profile was measured with {mode}; this run has {running}: {advice}")),
        None if running == "weights in small pages" => None,
        None => Some(format!(
            "the profile does not say which pages its reads went into (profiles from before huge pages \
             were the default used small pages); this run has {running}: {advice}"
        )),
    }
}

/// Whether streamed weights' buffers are advised into huge pages (the default, `on`).
pub(crate) fn streams_in_huge_pages() -> bool {
    huge_pages() == HugePages::All
}

fn huge_pages() -> HugePages {
    static SETTING: std::sync::OnceLock<HugePages> = std::sync::OnceLock::new();
    *SETTING.get_or_init(|| {
        // A kernel whose huge pages are off grants none: reading tails through bounce
        // buffers would then only add a copy.
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
        if thp.is_ok_and(|modes| modes.contains("[never]")) {
            return HugePages::Off;
        }
        huge_pages_setting(std::env::var("FERRY_HUGE_PAGES").ok().as_deref()).unwrap_or_else(|message| {
            eprintln!("warning: {message}");
            HugePages::All
        })
    })
}

/// Asks the kernel to back `len` bytes at `ptr` with transparent huge pages where it
/// can (`MADV_HUGEPAGE`; the whole 2 MiB-aligned stretches inside the mapping).
///
/// Why: the products stream eight weight rows side by side on every thread, and with
/// small pages each 4 KiB of each row costs a TLB walk; direct I/O pins every page it
/// reads into, 512 times as many with small pages. Measured end to end on
/// TinyLlama Q4_K_M, batch 1 from RAM: 1.06–1.25× faster decoding (BENCHMARKS.md).
/// Most distributions set THP to `madvise`, which backs a region with huge pages
/// only when asked. The budget is unchanged: a huge page lies wholly inside the
/// mapping, so the resident set never exceeds what the arenas account. A kernel
/// without THP refuses the advice, and the buffer keeps small pages: nothing to do.
///
/// A streamed buffer's last partial 2 MiB stays in small pages, which a direct read
/// fills at small pages' rate (on this project's VM a 5.5 MiB read with 1.5 MiB of it
/// in small pages ran at 2.2 GB/s against 5.0 for 6 MiB of whole huge pages, and the
/// profile, reading into whole huge pages, predicted streamed plans 30–70 % fast), so
/// the read pool reads such tails through buffers of huge pages (`io::Bounces`).
///
/// The default since CI's gate, run alternately with huge pages on and off by the same
/// build (four attempts each), erred less with them (median 11.8–13.6 %, max
/// 17.7–35.3 %) than without (median 7.4–21.2 %, max 37.7–62.4 %, one attempt failing),
/// and its streamed plans ran 1.5–2.5× faster. `FERRY_HUGE_PAGES=off` declines. (A
/// machine whose memory is fragmented may stall a huge page's first touch while the
/// kernel compacts memory for it.)
fn ask_for_huge_pages(ptr: NonNull<u8>, len: usize) {
    // SAFETY: advice on a mapping this process just created; it changes no contents.
    #[cfg(target_os = "linux")]
    let _refused = unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// An anonymous, page-aligned mapping (zero-filled when new); unmapped on drop.
pub struct Buffer {
    ptr: NonNull<u8>,
    len: usize,
    mapped: usize,
    /// Bytes from the start asked to be backed by huge pages: the whole 2 MiB pages
    /// of a buffer so advised (the rest, its last partial 2 MiB, keeps small pages).
    huge_bytes: usize,
    /// Bytes from the start that may hold pages; past them the kernel holds none
    /// (handed back by `release_from`), and touching them faults in zeroed pages.
    populated: usize,
}

// The buffer is plain memory owned by this value.
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

impl Buffer {
    /// A buffer for bytes that come and go (streamed weights, scratch): huge pages
    /// unless `FERRY_HUGE_PAGES` is `off` or `resident`.
    pub fn new(len: usize) -> std::io::Result<Buffer> {
        Buffer::map(len, huge_pages() == HugePages::All)
    }

    /// A buffer for weights kept for the whole run: huge pages unless
    /// `FERRY_HUGE_PAGES=off`.
    pub fn resident(len: usize) -> std::io::Result<Buffer> {
        Buffer::map(len, huge_pages() != HugePages::Off)
    }

    fn map(len: usize, huge: bool) -> std::io::Result<Buffer> {
        let mapped = len.max(1).div_ceil(PAGE) * PAGE;
        // A buffer of a huge page or more starts on a huge page's boundary, so that
        // all but its last partial stretch can be backed by huge pages.
        let alignment = if mapped >= HUGE_PAGE { HUGE_PAGE } else { PAGE };
        let ptr = map_aligned(mapped, alignment)?;
        let huge = huge && alignment == HUGE_PAGE;
        if huge {
            ask_for_huge_pages(ptr, mapped);
        }
        let huge_bytes = if huge { mapped / HUGE_PAGE * HUGE_PAGE } else { 0 };
        Ok(Buffer { ptr, len, mapped, huge_bytes, populated: mapped })
    }

    /// A buffer of whole huge pages (where the kernel gives them), whatever
    /// `FERRY_HUGE_PAGES` says: the read pool's bounce buffers (see `io`).
    pub(crate) fn huge(len: usize) -> std::io::Result<Buffer> {
        Buffer::map(len.next_multiple_of(HUGE_PAGE), true)
    }

    /// How many bytes from the start were asked to be huge pages (see the field).
    pub(crate) fn huge_bytes(&self) -> usize {
        self.huge_bytes
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

impl Buffer {
    /// This mapping viewed as `len` bytes (at most its mapped size): a recycled buffer
    /// serving a request of another size.
    pub(crate) fn with_len(mut self, len: usize) -> Buffer {
        debug_assert!(len <= self.mapped);
        self.len = len;
        self
    }

    /// Bytes mapped (the page-rounded size).
    pub fn mapped_len(&self) -> usize {
        self.mapped
    }

    /// Bytes from the start that may hold memory (see the field).
    pub(crate) fn populated(&self) -> usize {
        self.populated
    }

    /// Hands the pages past `keep` bytes back to the kernel, keeping the mapping: whole
    /// huge pages within the huge part (so the ones kept stay huge), small pages past
    /// it; `keep` is rounded down to that granule. Returns the bytes handed back.
    pub(crate) fn release_from(&mut self, keep: usize) -> usize {
        let granule = if keep < self.huge_bytes { HUGE_PAGE } else { PAGE };
        self.release_exactly_from(keep / granule * granule)
    }

    /// Hands back every page past `keep` bytes (rounded up to a small page), so that
    /// the buffer holds no more than a request of `keep` bytes accounts. Inside the huge
    /// part that splits a huge page: the huge part then ends before it (the read pool
    /// reads what follows through its bounce buffers, as any small-page tail).
    pub(crate) fn release_past(&mut self, keep: usize) -> usize {
        let keep = keep.next_multiple_of(PAGE);
        if keep < self.populated && keep < self.huge_bytes {
            self.huge_bytes = keep / HUGE_PAGE * HUGE_PAGE;
        }
        self.release_exactly_from(keep)
    }

    fn release_exactly_from(&mut self, keep: usize) -> usize {
        if keep >= self.populated {
            return 0;
        }
        // SAFETY: the range lies inside this mapping, which self owns; its contents
        // are not needed (a kept buffer's bytes are overwritten before use).
        let _ =
            unsafe { libc::madvise(self.ptr.as_ptr().add(keep).cast(), self.populated - keep, libc::MADV_DONTNEED) };
        let released = self.populated - keep;
        self.populated = keep;
        released
    }

    /// The buffer is taken for use: every page of it will be touched.
    pub(crate) fn in_use(mut self) -> Buffer {
        self.populated = self.mapped;
        self
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_pages_are_the_default_and_off_or_resident_decline_them() {
        assert_eq!(huge_pages_setting(None), Ok(HugePages::All));
        assert_eq!(huge_pages_setting(Some("")), Ok(HugePages::All));
        assert_eq!(huge_pages_setting(Some(" Resident ")), Ok(HugePages::Resident));
        assert_eq!(huge_pages_setting(Some("on")), Ok(HugePages::All));
        assert_eq!(huge_pages_setting(Some("ALL")), Ok(HugePages::All));
        assert_eq!(huge_pages_setting(Some("off")), Ok(HugePages::Off));
        let refused = huge_pages_setting(Some("yes")).unwrap_err();
        assert!(refused.contains("\"yes\"") && refused.contains("on, off, resident"), "{refused}");
    }

    #[test]
    fn a_profile_measured_in_another_page_mode_is_named() {
        let huge = "cpu, avx2 kernels, bf16 products on f32 (few rows: f32), weights in huge pages (profiled in 9 s)";
        let small = huge.replace("huge pages", "small pages");
        let resident = huge.replace("weights in huge", "resident weights in huge");
        let old = "cpu, avx2 kernels, bf16 products on f32 (few rows: f32) (profiled in 9 s)";
        assert_eq!(mode_mismatch(huge, "weights in huge pages"), None);
        assert_eq!(mode_mismatch(&small, "weights in small pages"), None);
        assert_eq!(mode_mismatch(&resident, "resident weights in huge pages"), None);
        let note = mode_mismatch(&small, "weights in huge pages").unwrap();
        assert!(note.contains("measured with weights in small pages") && note.contains("FERRY_HUGE_PAGES"), "{note}");
        let note = mode_mismatch(&resident, "weights in huge pages").unwrap();
        assert!(note.contains("measured with resident weights"), "{note}");
        assert!(mode_mismatch(old, "weights in huge pages").unwrap().contains("does not say"));
        assert_eq!(mode_mismatch(old, "weights in small pages"), None, "old profiles read into small pages");
        assert_eq!(mode_mismatch("cuda: NVIDIA H200 (profiled in 55 s)", "weights in huge pages"), None);
    }

    #[test]
    fn a_buffer_of_a_huge_page_or_more_starts_on_a_huge_page_boundary() {
        for len in [HUGE_PAGE, 3 * HUGE_PAGE + 5, 7 * PAGE] {
            let mut buffer = Buffer::new(len).unwrap();
            let alignment = if len >= HUGE_PAGE { HUGE_PAGE } else { PAGE };
            assert_eq!(buffer.as_slice().as_ptr() as usize % alignment, 0, "{len} bytes");
            // Zero-filled and writable to its last mapped byte.
            assert!(buffer.as_slice().iter().all(|&b| b == 0));
            let mapped = buffer.mapped_mut();
            assert_eq!(mapped.len(), len.div_ceil(PAGE) * PAGE);
            mapped.fill(7);
            assert!(buffer.as_slice().iter().all(|&b| b == 7));
        }
    }
}
