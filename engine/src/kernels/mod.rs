//! The arithmetic of a Llama-family decoder on the CPU, in f32: dtype conversion,
//! RMSNorm, rotary embeddings, grouped-query attention over a cache, SwiGLU, linear
//! layers (for few rows, `rows`: one pass over the stored weights with the CPU's
//! vector instructions; for more, matrix products by the `gemm` crate over weights
//! converted from bf16/f16 one row block at a time, so a layer never exists twice in
//! memory) and greedy sampling.

mod attention;
mod bf16;
mod convert;
pub mod exp;
pub mod keys_by_dim;
mod paths;
pub mod quant;
mod quant_rows;
mod rows;

use ferry_core::model::Dtype;
use rayon::prelude::*;

pub use bf16::{few_rows_path, linear_bf16, linear_bf16_for, matrix_path};
pub use convert::{element_bytes, from_f32, to_f32};
pub use paths::{description, kernels_mismatch};
pub use quant_rows::{
    byte_products_path, interleave, linear_q8, linear_quant, quant_converted, quant_rows, resident_order, Activations,
    BlockOrder, QuantMatrix, GROUP_ROWS,
};
pub use rows::{linear_rows, simd_path, SimdPath, MAX_ROWS};

/// A weight matrix of `rows` × `cols` stored row-major in `dtype`.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub bytes: &'a [u8],
    pub dtype: Dtype,
    pub rows: usize,
    pub cols: usize,
}

/// Rows of weights converted per block: about 1 MiB of f32 per block.
const BLOCK_ELEMENTS: usize = 1 << 18;

/// How many rows of x a product multiplies (`count`), and the row count whose kernel it
/// takes (`kernel_for`). The few-row kernels, the GEMM and the AMX tiles each compute a
/// row the same way whatever rows come with it, but they add in different orders, so a
/// row's last bits depend on the kernel: a caller that needs a row to come out as it
/// would among `kernel_for` rows (a decoding step's verification of k + 1 guesses per
/// sequence against plain decoding's one) says so here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub count: usize,
    pub kernel_for: usize,
}

impl Rows {
    /// `count` rows taking their own kernel.
    pub fn all(count: usize) -> Rows {
        Rows { count, kernel_for: count }
    }

    /// Whether the product takes the few-row kernels (a pass over the stored weights
    /// per `MAX_ROWS` rows of x), not the GEMM or the AMX tiles.
    pub fn few(self) -> bool {
        self.kernel_for <= MAX_ROWS
    }
}

/// `out[:, col0 .. col0 + w.rows] = x · wᵀ` for `x` of `m` rows × `w.cols`, where `out`
/// has `out_stride` columns. Row blocks of `w` are converted and multiplied in parallel.
pub fn linear(x: &[f32], m: usize, w: Matrix, out: &mut [f32], out_stride: usize, col0: usize) {
    linear_for(x, Rows::all(m), w, out, out_stride, col0)
}

/// `linear` with the kernel `rows.kernel_for` rows take (see `Rows`).
pub fn linear_for(x: &[f32], rows: Rows, w: Matrix, out: &mut [f32], out_stride: usize, col0: usize) {
    let m = rows.count;
    if let Some(path) = simd_path() {
        // Few rows (decoding): one pass over the stored weights per `MAX_ROWS` rows
        // beats converting them. A matrix this small (a mixture of experts' router)
        // costs little either way; taken a few rows at a time, a row's result never
        // depends on how many rows are multiplied with it, so the experts a token
        // chooses cannot change with the micro-batching (the GEMM adds in another order
        // than the few-row kernels, and on AVX-512 machines that moved a router's last bits).
        if rows.few() || w.rows <= ROW_INDEPENDENT_ROWS {
            return in_row_groups(x, m, w.cols, out, out_stride, |x, group, out| {
                linear_rows(path, x, group, w, out, out_stride, col0)
            });
        }
    }
    linear_converted(x, m, w, out, out_stride, col0);
}

/// Calls `product(x_group, rows, out_group)` for each run of at most `MAX_ROWS`
/// consecutive rows of `x` (`m` rows of `k` values): the few-row kernels' limit.
/// `out_group` starts at the group's first row of `out` (rows `out_stride` wide).
pub(crate) fn in_row_groups<T>(
    x: &[T],
    m: usize,
    k: usize,
    out: &mut [f32],
    out_stride: usize,
    mut product: impl FnMut(&[T], usize, &mut [f32]),
) {
    for first in (0..m).step_by(MAX_ROWS) {
        let rows = MAX_ROWS.min(m - first);
        product(&x[first * k..(first + rows) * k], rows, &mut out[first * out_stride..]);
    }
}

/// Weight matrices of at most this many rows take the few-row kernels for any number
/// of rows of x (see `linear`): a router has one row per expert (128 in Qwen3's MoE).
const ROW_INDEPENDENT_ROWS: usize = 256;

/// `linear` through the GEMM: row blocks of `w` converted to f32 and multiplied in
/// parallel (the path for many rows; public so benchmarks can compare the two).
pub fn linear_converted(x: &[f32], m: usize, w: Matrix, out: &mut [f32], out_stride: usize, col0: usize) {
    let k = w.cols;
    debug_assert_eq!(x.len(), m * k);
    debug_assert!(col0 + w.rows <= out_stride && out.len() >= m * out_stride);
    let block_rows = (BLOCK_ELEMENTS / k.max(1)).clamp(1, w.rows.max(1));
    let blocks = w.rows.div_ceil(block_rows);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let element = element_bytes(w.dtype);
    in_pool(|| {
        (0..blocks).into_par_iter().for_each(|block| {
            SCRATCH.with_borrow_mut(|scratch| {
                linear_block(x, m, w, k, block, block_rows, element, &out_ptr, out_stride, col0, scratch)
            });
        })
    });
}

/// Niceness of the compute threads. Every disk request is issued by an I/O thread that
/// sleeps until the previous one completes; on a machine whose cores are all busy
/// computing, a woken I/O thread at equal priority waits for a time slice, and the disk
/// idles meanwhile. Measured on the 2-core build VM (reads of 1 MiB, 2 in flight, while
/// the linear runs on both cores): 1.48× slower at equal priority, 1.12× with compute at
/// nice 10. Compute loses nothing when nothing else wants the CPU.
pub const COMPUTE_NICE: i32 = 10;

/// The thread pool parallel kernels run on when called from outside any pool (the
/// profiler, benchmarks, tests): one thread per core at `COMPUTE_NICE` (Linux niceness
/// is per thread; `FERRY_COMPUTE_NICE` overrides it, e.g. 0 to compare), so I/O and
/// scheduling threads, which run briefly and often, are served first.
pub fn compute_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| compute_threads("ferry-compute").expect("start the compute threads"))
}

/// A new pool of one thread per core at `COMPUTE_NICE`, named `name-<i>`. The engine
/// gives each compute lane its own and runs the lane's tasks inside it, so a task's
/// products start their parallel work from a thread of the pool: handing each product
/// to a pool from outside costs two thread wake-ups, measured at about 15 µs on the
/// 2-core build VM against 2.5 µs from inside, which is most of a small expert's product.
/// Its own pool per lane because a pool thread waiting in a product may run another
/// task injected into the same pool: another lane's task, holding locks, on the stack
/// of this one.
pub fn compute_threads(name: &str) -> Result<rayon::ThreadPool, rayon::ThreadPoolBuildError> {
    let nice = std::env::var("FERRY_COMPUTE_NICE").ok().and_then(|v| v.parse().ok()).unwrap_or(COMPUTE_NICE);
    let name = name.to_string();
    rayon::ThreadPoolBuilder::new()
        .thread_name(move |i| format!("{name}-{i}"))
        .start_handler(move |_| {
            // SAFETY: plain system call on the calling thread; failure leaves the
            // default priority, which is correct, only slower beside I/O.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, nice);
            }
        })
        .build()
}

/// Pools of compute threads lent to one compute lane at a time (`lend_compute_threads`).
static IDLE_POOLS: std::sync::Mutex<Vec<rayon::ThreadPool>> = std::sync::Mutex::new(Vec::new());

/// A pool of compute threads for one compute lane of one run, back to the idle pools
/// when dropped: runs in one process (`ferry validate`, the profiler's kernel table)
/// reuse warm threads and their buffers instead of starting new ones each time, and
/// two runs at once never share a pool.
pub struct LentPool(Option<rayon::ThreadPool>);

impl std::ops::Deref for LentPool {
    type Target = rayon::ThreadPool;
    fn deref(&self) -> &rayon::ThreadPool {
        self.0.as_ref().expect("a lent pool is present until dropped")
    }
}

impl Drop for LentPool {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            IDLE_POOLS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(pool);
        }
    }
}

/// An idle pool of compute threads, or a new one named `name-<i>`.
pub fn lend_compute_threads(name: &str) -> Result<LentPool, rayon::ThreadPoolBuildError> {
    let idle = IDLE_POOLS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
    match idle {
        Some(pool) => Ok(LentPool(Some(pool))),
        None => compute_threads(name).map(|pool| LentPool(Some(pool))),
    }
}

/// Runs `op` (parallel work) in the pool the calling thread belongs to, or in
/// `compute_pool` from any other thread.
pub fn in_pool<R: Send>(op: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        op()
    } else {
        compute_pool().install(op)
    }
}

thread_local! {
    /// Each thread's buffer for converted weight rows: reused, so the hot loop never
    /// allocates (fresh 1 MiB vectors per block cost page faults and allocator churn).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[allow(clippy::too_many_arguments)]
fn linear_block(
    x: &[f32],
    m: usize,
    w: Matrix,
    k: usize,
    block: usize,
    block_rows: usize,
    element: usize,
    out_ptr: &SendPtr,
    out_stride: usize,
    col0: usize,
    scratch: &mut Vec<f32>,
) {
    {
        let row0 = block * block_rows;
        let rows = block_rows.min(w.rows - row0);
        let src = &w.bytes[row0 * k * element..(row0 + rows) * k * element];
        let rhs: *const f32 = if w.dtype == Dtype::F32 && (src.as_ptr() as usize).is_multiple_of(4) {
            src.as_ptr().cast()
        } else {
            scratch.resize(rows * k, 0.0);
            to_f32(w.dtype, src, scratch);
            scratch.as_ptr()
        };
        // SAFETY: each block writes its own columns col0+row0 .. col0+row0+rows of `out`;
        // `rhs` is rows×k row-major, read as the k×rows matrix wᵀ (row stride 1, column stride k).
        unsafe {
            gemm::gemm(
                m,
                rows,
                k,
                out_ptr.0.add(col0 + row0),
                1,
                out_stride as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                rhs,
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

struct SendPtr(*mut f32);

impl SendPtr {
    /// Through a method, so closures capture the whole `SendPtr` (which is `Sync`),
    /// not its raw-pointer field.
    fn get(&self) -> *mut f32 {
        self.0
    }
}
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Adds a bias vector to every row.
pub fn add_bias(out: &mut [f32], bias: &[f32], stride: usize, col0: usize) {
    for row in out.chunks_exact_mut(stride) {
        for (o, b) in row[col0..col0 + bias.len()].iter_mut().zip(bias) {
            *o += b;
        }
    }
}

/// RMSNorm of each `width`-wide row of `x` into `out`, scaled by `weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    for (row, dst) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        for ((d, v), w) in dst.iter_mut().zip(row).zip(weight) {
            *d = v * scale * w;
        }
    }
}

/// Which elements of a head the rotary embedding rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Element i with element i + head_dim/2 (Hugging Face Llama's "rotate half").
    Halves,
    /// Element 2i with 2i + 1: llama.cpp's layout, whose GGUF files store the query and
    /// key rows of each head interleaved so that this gives the same attention scores.
    Pairs,
}

/// Rotary position embedding on each head of each row; `positions[r]` is row r's
/// position. Pair i turns by position × `frequencies[i]` in either layout (θ^(−2i/head_dim)
/// unscaled: `ferry_core::model::rope_frequencies`).
pub fn rope(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    positions: &[usize],
    frequencies: &[f32],
    layout: RopeLayout,
) {
    let half = head_dim / 2;
    assert_eq!(frequencies.len(), half, "rope: {} frequencies for heads of {head_dim}", frequencies.len());
    let (stride, partner) = match layout {
        RopeLayout::Halves => (1, half),
        RopeLayout::Pairs => (2, 1),
    };
    // A row's turns once for all its heads (per head, the sines and cosines were most
    // of the rotation's time: 32 heads of 64 took 4.7 µs).
    let mut turns = vec![(0.0f32, 0.0f32); half];
    for (row, &position) in x.chunks_exact_mut(heads * head_dim).zip(positions) {
        for (turn, &freq) in turns.iter_mut().zip(frequencies) {
            *turn = (position as f32 * freq).sin_cos();
        }
        for head in row.chunks_exact_mut(head_dim) {
            for (i, &(sin, cos)) in turns.iter().enumerate() {
                let (first, second) = (i * stride, i * stride + partner);
                let (a, b) = (head[first], head[second]);
                head[first] = a * cos - b * sin;
                head[second] = b * cos + a * sin;
            }
        }
    }
}

/// Causal grouped-query attention for one sequence: `q` holds `new` query rows
/// (heads × head_dim each) at positions `past .. past + new`; `keys` those positions'
/// keys by dimension (`keys_by_dim`: for each KV head, each dimension's values for
/// every position, rows of `keys_by_dim::stride_for(past + new)`, as the cpu backend
/// converts them from its cache), `values` their `past + new` rows of kv_heads ×
/// head_dim. Writes `new` rows of heads × head_dim.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    past: usize,
    new: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    out: &mut [f32],
) {
    assert_eq!(out.len(), new * heads * head_dim, "attention: output of {new} rows");
    assert!(q.len() >= new * heads * head_dim, "attention: {new} query rows");
    assert!(
        keys.len() >= keys_by_dim::len_for(past + new, kv_heads, head_dim)
            && values.len() >= (past + new) * kv_heads * head_dim,
        "attention: {} key and value rows",
        past + new
    );
    assert!(kv_heads > 0 && heads.is_multiple_of(kv_heads), "attention: {heads} heads over {kv_heads} KV heads");
    attention::attention(q, keys, values, attention::Shape { past, heads, kv_heads, head_dim }, out);
}

/// SwiGLU: `gate[i] = silu(gate[i]) × up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    match simd_path() {
        // SAFETY: the path is one this CPU supports.
        #[cfg(target_arch = "x86_64")]
        Some(SimdPath::Avx512) => unsafe { silu_mul_avx512(gate, up) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Some(SimdPath::Avx2) => unsafe { silu_mul_avx2(gate, up) },
        _ => silu_mul_body::<false>(gate, up),
    }
}

/// `silu_mul` on vectors: `exp` inlined and the loop vectorized.
#[inline(always)]
fn silu_mul_body<const FUSED: bool>(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp::exp::<FUSED>(-*g)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn silu_mul_avx512(gate: &mut [f32], up: &[f32]) {
    silu_mul_body::<true>(gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    silu_mul_body::<true>(gate, up)
}

/// Index of the largest value (the first on ties): greedy sampling.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod rows_for_tests;

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `x · wᵀ` straight from the definition, summed in f64.
    pub(in crate::kernels) fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn linear_matches_a_naive_product_for_every_dtype() {
        let (m, n, k) = (3, 37, 19);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) / 8.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 13) as f32 - 6.0) / 16.0).collect();
        let expected = naive(&x, m, &w, n, k);
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let mut bytes = vec![0u8; n * k * element_bytes(dtype)];
            from_f32(dtype, &w, &mut bytes);
            // Write into the middle columns of a wider output.
            let stride = n + 5;
            let mut out = vec![0.0f32; m * stride];
            linear(&x, m, Matrix { bytes: &bytes, dtype, rows: n, cols: k }, &mut out, stride, 2);
            for i in 0..m {
                for j in 0..n {
                    let got = out[i * stride + 2 + j];
                    assert!(
                        (got - expected[i * n + j]).abs() < 1e-5,
                        "{dtype:?} [{i},{j}] {got} vs {}",
                        expected[i * n + j]
                    );
                }
            }
        }
    }

    #[test]
    fn attention_of_one_key_returns_its_value() {
        let (heads, kv_heads, d) = (4, 2, 8);
        let q = vec![0.3f32; heads * d];
        let keys: Vec<f32> = (0..kv_heads * d).map(|i| i as f32 * 0.1).collect();
        let values: Vec<f32> = (0..kv_heads * d).map(|i| i as f32).collect();
        let mut out = vec![0.0f32; heads * d];
        let keys = keys_by_dim::from_f32_rows(&keys, 1, kv_heads, d);
        attention(&q, &keys, &values, 0, 1, heads, kv_heads, d, &mut out);
        for h in 0..heads {
            let kv = h / 2;
            assert_eq!(&out[h * d..(h + 1) * d], &values[kv * d..(kv + 1) * d]);
        }
    }

    #[test]
    fn rope_preserves_norm_and_is_identity_at_zero() {
        let mut x: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let original = x.clone();
        let frequencies = ferry_core::model::rope_frequencies(10000.0, 8, None, None);
        rope(&mut x, 2, 8, &[0], &frequencies, RopeLayout::Halves);
        assert_eq!(x, original);
        rope(&mut x, 2, 8, &[5], &frequencies, RopeLayout::Halves);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&x) - norm(&original)).abs() < 1e-3);
    }

    /// Every f16 bit pattern decodes to its exact value (NaNs stay NaN) from two copies
    /// one byte apart, so one is 2-byte aligned (the slice conversion) and the other is
    /// not (one value at a time).
    #[test]
    fn every_f16_decodes_exactly_aligned_or_not() {
        let patterns: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        let padded: Vec<u8> = [&[0u8][..], &patterns].concat();
        for input in [&patterns[..], &padded[1..]] {
            let mut out = vec![0f32; 65536];
            to_f32(Dtype::F16, input, &mut out);
            for (bits, v) in out.iter().enumerate() {
                let want = half::f16::from_bits(bits as u16).to_f32();
                assert!(v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn bf16_round_trips() {
        let values = [1.0f32, -2.5, 0.15625, 3.0e-3];
        let mut bytes = vec![0u8; 8];
        from_f32(Dtype::Bf16, &values, &mut bytes);
        let mut back = [0.0f32; 4];
        to_f32(Dtype::Bf16, &bytes, &mut back);
        for (a, b) in values.iter().zip(back) {
            assert!((a - b).abs() <= a.abs() / 128.0);
        }
    }
}
