//! `round_bf16(x) · wᵀ` on AMX tiles (Intel Sapphire Rapids and later): TDPBF16PS
//! multiplies a 16 × 32 bf16 tile by a 32 × 16 one into 16 × 16 f32 sums, 8,192
//! multiply-adds per instruction.
//!
//! The roles are swapped so the weights need no transposing: the left tile is 16 rows of
//! `w` (its natural row-major layout, 32 values of k per row), the right tile 16 rows of x
//! in the pair-interleaved ("VNNI") layout the instruction wants, and the result is the
//! transpose of a 16 × 16 block of `out`. x is packed once per product (and rounded to
//! bf16 on the way); each task packs its weight rows (up to 128, blocks of 32) into one
//! contiguous run per 32 values of k, because 16 rows `cols × 2` bytes apart all fall in
//! the same L1 sets.
//!
//! Tiles 0–3 accumulate a 2 × 2 block (32 weight rows × 32 rows of x), 4–5 hold the
//! weights and 6–7 x: each loaded tile feeds two products. Tile state is per thread:
//! every task loads the configuration and releases the tiles when it ends, so a thread
//! switched out keeps no 8 KiB of tile state to save.
//!
//! Linux hands a process the tile registers only when asked (`arch_prctl`
//! `ARCH_REQ_XCOMP_PERM`); `available` asks once and says no on any refusal, and
//! `FERRY_AMX=off` declines them (benchmarks compare the two paths).

use std::arch::asm;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::kernels::{in_pool, Matrix, SendPtr};

/// Rows of a tile, and f32 sums per row of a result tile.
const TILE_ROWS: usize = 16;
/// k values per tile row: 64 bytes of bf16.
const TILE_K: usize = 32;
/// Weight rows per block: two left tiles.
const BLOCK_ROWS: usize = 2 * TILE_ROWS;

/// Whether this CPU has AMX with bf16 and the kernel lets this process use the tiles.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var("FERRY_AMX").map_or(true, |v| v != "off") && cpu_has_amx_bf16() && request_tiles()
    })
}

fn cpu_has_amx_bf16() -> bool {
    // Leaf 7 exists where the maximum leaf reaches it (checked first).
    if std::arch::x86_64::__cpuid(0).eax < 7 {
        return false;
    }
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    // EDX bit 22: AMX-BF16, bit 24: AMX-TILE.
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

/// Asks Linux for the tile data state (XFEATURE_XTILEDATA, 18) for this process.
fn request_tiles() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments; it changes only whether
        // this process may use the tile registers.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Whether `w`'s rows are whole tile rows (the tiles read k 32 values at a time).
pub fn fits(w: Matrix) -> bool {
    w.cols > 0 && w.cols.is_multiple_of(TILE_K) && w.bytes.len() >= w.rows * w.cols * 2
}

/// The tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// Tiles configured on the calling thread until dropped.
struct Tiles;

impl Tiles {
    fn configure() -> Tiles {
        let mut config =
            TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
        for tile in 0..8 {
            config.bytes_per_row[tile] = 64;
            config.rows[tile] = TILE_ROWS as u8;
        }
        // SAFETY: `available` said the CPU has the tiles and the process may use them;
        // the configuration is a valid palette-1 layout.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) &config as *const TileConfig, options(nostack, readonly)) };
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: releases the tiles this thread configured.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// See the module docs; `fits(w)` and `available()` hold, and `m > 0`.
pub fn linear(x: &[f32], m: usize, w: Matrix, out: &mut [f32], out_stride: usize, col0: usize) {
    let k = w.cols;
    assert!(x.len() >= m * k && out.len() >= (m - 1) * out_stride + col0 + w.rows, "amx::linear: shapes");
    let mut x_packed = X_PACKED.take();
    pack_x(x, m, k, &mut x_packed);
    let out_ptr = SendPtr(out.as_mut_ptr());
    // Up to four blocks of 32 weight rows per task (512 KiB at k = 2048 stays in L2),
    // each pair of x blocks multiplied against all of them in turn: x then comes from
    // L3 once per 128 weight rows, not once per 32 (at 512 rows of x the packed x is
    // 2 MiB, and streaming it per 32 rows bounded the product). Fewer where that would
    // leave a thread without a few tasks.
    let blocks = w.rows.div_ceil(BLOCK_ROWS);
    let per_task = (blocks / (4 * rayon::current_num_threads().max(1))).clamp(1, 4);
    let tasks = blocks.div_ceil(per_task);
    in_pool(|| {
        (0..tasks).into_par_iter().for_each(|task| {
            W_PACKED.with_borrow_mut(|w_packed| {
                let first_block = task * per_task;
                let row0 = first_block * BLOCK_ROWS;
                let rows = (per_task * BLOCK_ROWS).min(w.rows - row0);
                pack_w(w.bytes, k, row0, rows, w_packed);
                let _tiles = Tiles::configure();
                for pair in 0..m.div_ceil(2 * TILE_ROWS) {
                    for (block, packed) in
                        w_packed.chunks_exact(BLOCK_ROWS * k).take(rows.div_ceil(BLOCK_ROWS)).enumerate()
                    {
                        let block_row0 = row0 + block * BLOCK_ROWS;
                        let cols = BLOCK_ROWS.min(w.rows - block_row0);
                        // SAFETY: `packed` holds one block's k/32 runs; the tiles are
                        // configured; this task alone writes these columns of `out`.
                        unsafe {
                            block_product(packed, &x_packed, m, k, pair, &out_ptr, out_stride, col0 + block_row0, cols)
                        };
                    }
                }
            })
        })
    });
    X_PACKED.set(x_packed);
}

/// Columns `col .. col + cols` of `out` (cols ≤ 32) for x blocks `2·pair` and the one
/// after it (when there is one): 32 packed weight rows against them.
///
/// # Safety
/// The tiles are configured; `packed` holds k/32 runs of 32 × 32 bf16; no other thread
/// writes these columns of `out`, whose rows reach `m`.
#[allow(clippy::too_many_arguments)]
unsafe fn block_product(
    packed: &[u16],
    x_packed: &[u32],
    m: usize,
    k: usize,
    pair: usize,
    out: &SendPtr,
    out_stride: usize,
    col: usize,
    cols: usize,
) {
    let first = pair * 2;
    let blocks = (m.div_ceil(TILE_ROWS) - first).min(2);
    let x_block = |b: usize| x_packed[(first + b) * TILE_ROWS * k / 2..].as_ptr();
    multiply(packed.as_ptr(), x_block(0), x_block(blocks - 1), k / TILE_K, blocks == 2);
    let mut sums = [[0.0f32; TILE_ROWS]; TILE_ROWS];
    for (weights, b) in (0..2).flat_map(|weights| (0..blocks).map(move |b| (weights, b))) {
        let columns = cols.saturating_sub(weights * TILE_ROWS).min(TILE_ROWS);
        if columns == 0 {
            continue;
        }
        store(2 * weights + b, &mut sums);
        let block = first + b;
        for r in 0..TILE_ROWS.min(m - block * TILE_ROWS) {
            let at = (block * TILE_ROWS + r) * out_stride + col + weights * TILE_ROWS;
            for (c, sum) in sums[..columns].iter().enumerate() {
                *out.get().add(at + c) = sum[r];
            }
        }
    }
}

thread_local! {
    /// Each thread's packed weight rows, reused across products.
    static W_PACKED: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The calling thread's packed x, reused across products (taken out while the
    /// product runs, as `bf16::ROUNDED`).
    static X_PACKED: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// x rounded to bf16 and laid out for the right-hand tiles into `packed`: per block of
/// 16 rows, per pair of k, the 16 rows' two values side by side (rows past `m` zeros).
fn pack_x(x: &[f32], m: usize, k: usize, packed: &mut Vec<u32>) {
    let blocks = m.div_ceil(TILE_ROWS);
    packed.clear();
    packed.resize(blocks * TILE_ROWS * k / 2, 0);
    in_pool(|| {
        packed.par_chunks_mut(TILE_ROWS * k / 2).enumerate().for_each(|(block, packed)| {
            for r in 0..TILE_ROWS.min(m - block * TILE_ROWS) {
                let row = &x[(block * TILE_ROWS + r) * k..][..k];
                for (pair, values) in row.chunks_exact(2).enumerate() {
                    let (low, high) = (super::round_bits(values[0]) as u32, super::round_bits(values[1]) as u32);
                    packed[pair * TILE_ROWS + r] = low | (high << 16);
                }
            }
        })
    });
}

/// Weight rows `row0 .. row0 + rows` as blocks of 32 rows, each k/32 runs of 32 rows ×
/// 32 values; rows past `rows` in the last block are zeros.
fn pack_w(bytes: &[u8], k: usize, row0: usize, rows: usize, packed: &mut Vec<u16>) {
    packed.clear();
    packed.resize(rows.div_ceil(BLOCK_ROWS) * BLOCK_ROWS * k, 0);
    for r in 0..rows {
        let row = &bytes[(row0 + r) * k * 2..][..k * 2];
        let block = &mut packed[r / BLOCK_ROWS * BLOCK_ROWS * k..][..BLOCK_ROWS * k];
        for (run, values) in row.chunks_exact(TILE_K * 2).enumerate() {
            let at = (run * BLOCK_ROWS + r % BLOCK_ROWS) * TILE_K;
            for (to, v) in block[at..at + TILE_K].iter_mut().zip(values.chunks_exact(2)) {
                *to = u16::from_le_bytes([v[0], v[1]]);
            }
        }
    }
}

/// Tiles 0–3 = Σ over `runs` runs of k: weights (rows 0–15, 16–31) × x blocks 0 and 1
/// (tiles 0, 1: rows 0–15 with blocks 0, 1; tiles 2, 3: rows 16–31). With `two_blocks`
/// false only tiles 0 and 2 are computed, from `x0`.
///
/// # Safety
/// The tiles are configured (`Tiles`); `w` holds `runs` runs of 32 × 32 bf16 and `x0`,
/// `x1` `runs` × 16 rows of 16 pairs.
unsafe fn multiply(w: *const u16, x0: *const u32, x1: *const u32, runs: usize, two_blocks: bool) {
    const RUN_BYTES: usize = BLOCK_ROWS * TILE_K * 2;
    const X_RUN_BYTES: usize = TILE_ROWS * TILE_ROWS * 4;
    let (w, x0, x1) = (w.cast::<u8>(), x0.cast::<u8>(), x1.cast::<u8>());
    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    for run in 0..runs {
        let (w0, b0) = (w.add(run * RUN_BYTES), x0.add(run * X_RUN_BYTES));
        let w1 = w0.add(TILE_ROWS * TILE_K * 2);
        if two_blocks {
            // Loads between the products that free their tiles: tiles are not renamed,
            // so a load waits for every earlier product reading its tile.
            asm!(
                "tileloadd tmm4, [{w0} + {stride}*1]",
                "tileloadd tmm6, [{b0} + {stride}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {stride}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{w1} + {stride}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                w0 = in(reg) w0, w1 = in(reg) w1, b0 = in(reg) b0, b1 = in(reg) x1.add(run * X_RUN_BYTES),
                stride = in(reg) 64usize, options(nostack, readonly),
            );
        } else {
            asm!(
                "tileloadd tmm4, [{w0} + {stride}*1]",
                "tileloadd tmm6, [{b0} + {stride}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{w1} + {stride}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                w0 = in(reg) w0, w1 = in(reg) w1, b0 = in(reg) b0,
                stride = in(reg) 64usize, options(nostack, readonly),
            );
        }
    }
}

/// Stores result tile `tile` (0–3) into `sums` (row = weight row, column = row of x).
///
/// # Safety
/// The tiles are configured.
unsafe fn store(tile: usize, sums: &mut [[f32; TILE_ROWS]; TILE_ROWS]) {
    let (to, stride) = (sums.as_mut_ptr().cast::<u8>(), 64usize);
    match tile {
        0 => asm!("tilestored [{to} + {stride}*1], tmm0", to = in(reg) to, stride = in(reg) stride, options(nostack)),
        1 => asm!("tilestored [{to} + {stride}*1], tmm1", to = in(reg) to, stride = in(reg) stride, options(nostack)),
        2 => asm!("tilestored [{to} + {stride}*1], tmm2", to = in(reg) to, stride = in(reg) stride, options(nostack)),
        _ => asm!("tilestored [{to} + {stride}*1], tmm3", to = in(reg) to, stride = in(reg) stride, options(nostack)),
    }
}
