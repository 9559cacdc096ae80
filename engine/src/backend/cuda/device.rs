//! The cuda backend's operations on GPU memory: copies in every direction and the
//! forward pass's compute, each checked against its buffers' extents on the host,
//! issued on the calling thread's stream and waited for before returning
//! (`memory::on_lane`).

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::driver::result;
use ferry_core::model::Dtype;

use super::backend::CudaBackend;
use super::kernels::{Kernel, ATTN_MAX_HEAD_DIM};
use super::launches::{self, Launch};
use super::memory::{on_lane, CudaBuffer, Scope};
use super::shapes::{f32_bytes, sgemm_blocks, within, Sgemm, WIDEN_ELEMENTS};
use crate::backend::{AttentionShape, DeviceBuffer, KvLayout, Rotary, WeightRef};
use crate::kernels::element_bytes;
use crate::EngineError;

/// The kernels' code for a stored dtype (`DTYPE_*` in kernels.cu).
pub(super) fn dtype_code(dtype: Dtype) -> Result<i64, EngineError> {
    match dtype {
        Dtype::F32 => Ok(0),
        Dtype::F16 => Ok(1),
        Dtype::Bf16 => Ok(2),
        other => {
            Err(EngineError::Unsupported(format!("the cuda backend computes on f32, f16 and bf16 data, not {other:?}")))
        }
    }
}

fn gpu(buffer: &DeviceBuffer) -> Result<&CudaBuffer, EngineError> {
    match buffer {
        DeviceBuffer::Cuda(b) => Ok(b),
        DeviceBuffer::Host(_) => Err(EngineError::Internal("host memory passed to a GPU operation".into())),
    }
}

fn gpu_mut(buffer: &mut DeviceBuffer) -> Result<&mut CudaBuffer, EngineError> {
    match buffer {
        DeviceBuffer::Cuda(b) => Ok(b),
        DeviceBuffer::Host(_) => Err(EngineError::Internal("host memory passed to a GPU operation".into())),
    }
}

/// f32 values a buffer holds.
fn floats(buffer: &CudaBuffer) -> usize {
    buffer.len_bytes() / 4
}

fn driver(what: &str) -> impl Fn(cudarc::driver::DriverError) -> EngineError + '_ {
    move |e| EngineError::Device(format!("{what}: {e}"))
}

/// A float weight's dtype: the kernels here widen f32, f16 and bf16; block-quantized
/// weights run on the cpu backend only, for now.
fn weight_dtype(w: &WeightRef) -> Result<Dtype, EngineError> {
    w.format.dtype().ok_or_else(|| {
        EngineError::Unsupported(format!(
            "the cuda backend multiplies f32, f16 and bf16 weights; {} weights run on --backend cpu",
            w.format.name()
        ))
    })
}

/// A stored weight's device address and dtype code, its extent checked.
fn weight(w: &WeightRef) -> Result<(u64, i64), EngineError> {
    let buffer = gpu(w.memory)?;
    within(&format!("a {}×{} weight", w.rows, w.cols), w.offset, w.bytes(), buffer.len_bytes())?;
    Ok((buffer.ptr() + w.offset as u64, dtype_code(weight_dtype(w)?)?))
}

impl CudaBackend {
    fn on<T>(&self, what: &str, work: impl FnOnce(&mut Scope) -> Result<T, EngineError>) -> Result<T, EngineError> {
        on_lane(&self.lanes, &self.allocator, what, work)
    }

    /// Issues `launch` unless it is empty.
    fn launch(&self, scope: &Scope, launch: Launch) -> Result<(), EngineError> {
        match launch.config {
            Some(config) => self.kernels.launch(scope.stream(), launch.kernel, config, &launch.args),
            None => Ok(()),
        }
    }

    // ---- memory ------------------------------------------------------------------

    pub(super) fn gpu_zeroed(&self, bytes: usize) -> Result<DeviceBuffer, EngineError> {
        self.on("allocating", |scope| scope.zeroed(bytes)).map(DeviceBuffer::Cuda)
    }

    pub(super) fn gpu_upload(&self, bytes: &[u8]) -> Result<DeviceBuffer, EngineError> {
        self.on("uploading", |scope| {
            let buffer = scope.uninit(bytes.len())?;
            if !bytes.is_empty() {
                // SAFETY: the fresh allocation holds exactly `bytes`; the stream is
                // synchronised before `bytes` can go.
                unsafe { result::memcpy_htod_async(buffer.ptr(), bytes, scope.raw_stream()) }
                    .map_err(driver("uploading to the GPU"))?;
            }
            Ok(DeviceBuffer::Cuda(buffer))
        })
    }

    /// A copy with at least one end in GPU memory.
    pub(super) fn gpu_copy(
        &self,
        src: &DeviceBuffer,
        src_offset: usize,
        dst: &mut DeviceBuffer,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<(), EngineError> {
        within("a copy's source", src_offset, bytes, src.len_bytes())?;
        within("a copy's destination", dst_offset, bytes, dst.len_bytes())?;
        if bytes == 0 {
            return Ok(());
        }
        self.on("copying", |scope| {
            let stream = scope.raw_stream();
            // SAFETY (all three): both ranges lie inside their buffers (checked above); the
            // host side stays borrowed until the stream is synchronised in `on`.
            match (src, dst) {
                (DeviceBuffer::Host(h), DeviceBuffer::Cuda(d)) => unsafe {
                    result::memcpy_htod_async(d.ptr() + dst_offset as u64, &h.as_bytes()[src_offset..][..bytes], stream)
                },
                (DeviceBuffer::Cuda(d), DeviceBuffer::Host(h)) => unsafe {
                    result::memcpy_dtoh_async(
                        &mut h.as_bytes_mut()[dst_offset..][..bytes],
                        d.ptr() + src_offset as u64,
                        stream,
                    )
                },
                (DeviceBuffer::Cuda(a), DeviceBuffer::Cuda(b)) => unsafe {
                    result::memcpy_dtod_async(b.ptr() + dst_offset as u64, a.ptr() + src_offset as u64, bytes, stream)
                },
                (DeviceBuffer::Host(_), DeviceBuffer::Host(_)) => {
                    return Err(EngineError::Internal("a host-to-host copy reached the GPU path".into()))
                }
            }
            .map_err(driver("copying"))
        })
    }

    pub(super) fn gpu_download_f32(&self, x: &CudaBuffer) -> Result<Vec<f32>, EngineError> {
        let mut values = vec![0.0f32; floats(x)];
        self.on("downloading", |scope| {
            if values.is_empty() {
                return Ok(());
            }
            // SAFETY: `values` holds the buffer's whole f32 prefix and outlives the
            // synchronisation at the end of `on`.
            unsafe { result::memcpy_dtoh_async(&mut values[..], x.ptr(), scope.raw_stream()) }
                .map_err(driver("downloading"))
        })?;
        Ok(values)
    }

    // ---- compute -----------------------------------------------------------------

    pub(super) fn gpu_embed(
        &self,
        table: WeightRef,
        tokens: &[u32],
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError> {
        let (table_ptr, code) = weight(&table)?;
        let out = gpu_mut(out)?;
        let cols = table.cols;
        // As the cpu backend: as many rows as both the ids and the output hold.
        let count = tokens.len().min(floats(out).checked_div(cols).unwrap_or(0));
        let mut ids = Vec::with_capacity(count);
        for &token in &tokens[..count] {
            if token as usize >= table.rows {
                return Err(EngineError::Internal(format!(
                    "token id {token} is past the {}-row embedding table",
                    table.rows
                )));
            }
            ids.push(token as i64);
        }
        self.on("embed", |scope| {
            let ids = scope.upload(&ids)?;
            self.launch(scope, launches::embed(table_ptr, code, ids, count, cols, out.ptr()))
        })
    }

    /// `out[:, col0 ..] = x · wᵀ` by cuBLAS SGEMM, in f32 like the cpu kernels: the
    /// weight widened to f32 (unless stored so), never multiplied in bf16/f16. A
    /// half-precision GEMM would round the activations to 16 bits and the products
    /// would drift from the cpu engine's, changing tokens.
    pub(super) fn gpu_linear(
        &self,
        x: &DeviceBuffer,
        rows: usize,
        w: WeightRef,
        out: &mut DeviceBuffer,
        out_stride: usize,
        col0: usize,
    ) -> Result<(), EngineError> {
        let k = w.cols;
        let (x, out) = (gpu(x)?, gpu_mut(out)?);
        within("a linear's input", 0, f32_bytes(rows * k), x.len_bytes())?;
        within("a linear's output", 0, f32_bytes(rows * out_stride), out.len_bytes())?;
        let (w_ptr, code) = weight(&w)?;
        // f32 weights at an f32-aligned address go to cuBLAS as they are.
        let dtype = weight_dtype(&w)?;
        let direct = dtype == Dtype::F32 && w_ptr.is_multiple_of(4);
        let limit = if direct { usize::MAX } else { WIDEN_ELEMENTS };
        let blocks = sgemm_blocks(rows, w.rows, k, out_stride, col0, limit)?;
        let element = element_bytes(dtype) as u64;
        self.on("linear", |scope| {
            let widest = blocks.iter().map(|g| g.rows).max().unwrap_or(0);
            let scratch = if direct { 0 } else { scope.temp(f32_bytes(widest * k))? };
            for g in &blocks {
                let first = (g.row0 * k) as u64;
                let a = if direct {
                    w_ptr + 4 * first
                } else {
                    let count = g.rows * k;
                    self.launch(scope, launches::decode(w_ptr + element * first, code, scratch, count))?;
                    scratch
                };
                sgemm(scope, g, a, x.ptr(), out.ptr() + 4 * g.c_offset as u64)?;
            }
            Ok(())
        })
    }

    pub(super) fn gpu_rms_norm(
        &self,
        x: &DeviceBuffer,
        weight_ref: WeightRef,
        eps: f32,
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError> {
        let (w_ptr, code) = weight(&weight_ref)?;
        let (x, out) = (gpu(x)?, gpu_mut(out)?);
        let width = weight_ref.rows * weight_ref.cols;
        // As the cpu kernel: the rows both buffers hold.
        let rows = floats(x).min(floats(out)).checked_div(width).unwrap_or(0);
        let launch = launches::rms_norm(x.ptr(), w_ptr, code, width, eps, out.ptr(), rows)?;
        self.on("rms_norm", |scope| self.launch(scope, launch))
    }

    pub(super) fn gpu_rope(&self, x: &mut DeviceBuffer, r: Rotary, positions: &[usize]) -> Result<(), EngineError> {
        let x = gpu_mut(x)?;
        let width = r.heads * r.head_dim;
        let rows = positions.len().min(floats(x).checked_div(width).unwrap_or(0));
        let (positions, inv_freq) = launches::rope_tables(&positions[..rows], r.frequencies);
        self.on("rope", |scope| {
            let tables = (scope.upload(&positions)?, scope.upload(&inv_freq)?);
            self.launch(scope, launches::rope(x.ptr(), rows, r.heads, r.head_dim, tables, r.layout))
        })
    }

    pub(super) fn gpu_attention(
        &self,
        q: &DeviceBuffer,
        cache: &DeviceBuffer,
        layout: KvLayout,
        s: AttentionShape,
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError> {
        let (q, cache, out) = (gpu(q)?, gpu(cache)?, gpu_mut(out)?);
        check_attention(layout, s)?;
        within("attention's KV block", 0, layout.bytes(), cache.len_bytes())?;
        let rows = layout.sequences * s.new * s.heads * s.head_dim;
        within("attention's queries", 0, f32_bytes(rows), q.len_bytes())?;
        within("attention's output", 0, f32_bytes(rows), out.len_bytes())?;
        let launch = launches::attention(q.ptr(), cache.ptr(), layout, s, out.ptr())?;
        self.on("attention", |scope| self.launch(scope, launch))
    }

    pub(super) fn gpu_store_kv(
        &self,
        rows: &DeviceBuffer,
        new: usize,
        half: usize,
        cache: &mut DeviceBuffer,
        layout: KvLayout,
        position: usize,
    ) -> Result<(), EngineError> {
        let (rows, cache) = (gpu(rows)?, gpu_mut(cache)?);
        let kv_dim = layout.row_bytes / element_bytes(layout.dtype);
        check_store(layout, half, position, new)?;
        within("a KV store's block", 0, layout.bytes(), cache.len_bytes())?;
        let count = layout.sequences * new * kv_dim;
        within("a KV store's rows", 0, f32_bytes(count), rows.len_bytes())?;
        let launch = launches::store_kv(rows.ptr(), cache.ptr(), layout, half, position, new)?;
        self.on("store_kv", |scope| self.launch(scope, launch))
    }

    /// `silu_mul` and `add`: element-wise over what both buffers hold.
    pub(super) fn gpu_pairwise(
        &self,
        kernel: Kernel,
        x: &mut DeviceBuffer,
        other: &DeviceBuffer,
    ) -> Result<(), EngineError> {
        let (x, other) = (gpu_mut(x)?, gpu(other)?);
        let count = floats(x).min(floats(other));
        self.on(kernel.name(), |scope| self.launch(scope, launches::pairwise(kernel, x.ptr(), other.ptr(), count)))
    }

    pub(super) fn gpu_add_bias(
        &self,
        out: &mut DeviceBuffer,
        bias: WeightRef,
        stride: usize,
        col0: usize,
    ) -> Result<(), EngineError> {
        let (bias_ptr, code) = weight(&bias)?;
        let out = gpu_mut(out)?;
        let width = bias.rows * bias.cols;
        if col0 + width > stride {
            return Err(EngineError::Internal(format!("a bias of {width} at column {col0} passes {stride}-wide rows")));
        }
        let rows = floats(out).checked_div(stride).unwrap_or(0);
        self.on("add_bias", |scope| {
            self.launch(scope, launches::add_bias(out.ptr(), bias_ptr, code, rows, stride, col0, width))
        })
    }

    /// Row indices as the kernels take them, each checked to lie within `x`.
    fn row_list(x: &CudaBuffer, width: usize, rows: &[usize]) -> Result<Vec<i64>, EngineError> {
        let mut list = Vec::with_capacity(rows.len());
        for &row in rows {
            within(&format!("row {row}"), f32_bytes(row * width), f32_bytes(width), x.len_bytes())?;
            list.push(row as i64);
        }
        Ok(list)
    }

    pub(super) fn gpu_gather_rows(
        &self,
        x: &DeviceBuffer,
        width: usize,
        rows: &[usize],
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError> {
        let (x, out) = (gpu(x)?, gpu_mut(out)?);
        let count = rows.len().min(floats(out).checked_div(width).unwrap_or(0));
        let list = CudaBackend::row_list(x, width, &rows[..count])?;
        self.on("gather_rows", |scope| {
            let list = scope.upload(&list)?;
            self.launch(scope, launches::gather_rows(x.ptr(), width, list, count, out.ptr()))
        })
    }

    pub(super) fn gpu_add_scaled_rows(
        &self,
        out: &mut DeviceBuffer,
        width: usize,
        rows: &[usize],
        scales: &[f32],
        y: &DeviceBuffer,
    ) -> Result<(), EngineError> {
        let (out, y) = (gpu_mut(out)?, gpu(y)?);
        if scales.len() != rows.len() || floats(y) < rows.len() * width {
            return Err(EngineError::Internal("add_scaled_rows: fewer scales or rows of y than rows".into()));
        }
        let list = CudaBackend::row_list(out, width, rows)?;
        self.on("add_scaled_rows", |scope| {
            let list = scope.upload(&list)?;
            let scales = scope.upload(scales)?;
            self.launch(scope, launches::add_scaled_rows(out.ptr(), width, list, scales, rows.len(), y.ptr()))
        })
    }

    pub(super) fn gpu_rows_finite(&self, x: &DeviceBuffer, width: usize, rows: &[usize]) -> Result<bool, EngineError> {
        let x = gpu(x)?;
        let list = CudaBackend::row_list(x, width, rows)?;
        let mut found = [0u32; 1];
        self.on("rows_finite", |scope| {
            let flag = scope.temp(4)?;
            // SAFETY: the 4 bytes just allocated, on their stream.
            unsafe { result::memset_d8_async(flag, 0, 4, scope.raw_stream()) }.map_err(driver("memset"))?;
            let list = scope.upload(&list)?;
            self.launch(scope, launches::rows_finite(x.ptr(), width, list, rows.len(), flag))?;
            // SAFETY: 4 bytes into `found`, which outlives the synchronisation in `on`.
            unsafe { result::memcpy_dtoh_async(&mut found[..], flag, scope.raw_stream()) }
                .map_err(driver("downloading"))
        })?;
        Ok(found[0] == 0)
    }
}

/// One SGEMM of `sgemm_blocks` on the scope's cuBLAS handle: `a` the weight block
/// (f32), `b` the activations, `c` where the block's first output column starts.
fn sgemm(scope: &Scope, g: &Sgemm, a: u64, b: u64, c: u64) -> Result<(), EngineError> {
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: the handle is this thread's, on this scope's stream; `a` holds g.rows × k
    // f32, `b` the rows × k activations and `c` the strided output columns (extents
    // checked by the caller and `sgemm_blocks`); alpha and beta are host scalars, the
    // handle's default pointer mode.
    unsafe {
        cudarc::cublas::result::sgemm(
            *scope.lane.blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            g.m,
            g.n,
            g.k,
            &alpha,
            a as *const f32,
            g.lda,
            b as *const f32,
            g.ldb,
            &beta,
            c as *mut f32,
            g.ldc,
        )
    }
    .map_err(|e| EngineError::Device(format!("cuBLAS SGEMM {}×{}×{}: {e}", g.m, g.n, g.k)))
}

/// What `ferry_attention` needs of its shape, checked before launch.
pub(super) fn check_attention(layout: KvLayout, s: AttentionShape) -> Result<(), EngineError> {
    if s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) {
        return Err(EngineError::Internal(format!("attention: {} heads over {} KV heads", s.heads, s.kv_heads)));
    }
    if s.head_dim > ATTN_MAX_HEAD_DIM {
        return Err(EngineError::Unsupported(format!(
            "the cuda attention kernel takes heads up to {ATTN_MAX_HEAD_DIM} wide, not {}",
            s.head_dim
        )));
    }
    if s.past + s.new > layout.capacity {
        return Err(EngineError::Internal(format!(
            "attention over {} positions of a block holding {}",
            s.past + s.new,
            layout.capacity
        )));
    }
    if s.kv_heads * s.head_dim * element_bytes(layout.dtype) > layout.row_bytes {
        return Err(EngineError::Internal("attention's heads are wider than the KV rows".into()));
    }
    Ok(())
}

/// What `ferry_store_kv` needs: a half that exists and positions within the block.
pub(super) fn check_store(layout: KvLayout, half: usize, position: usize, new: usize) -> Result<(), EngineError> {
    if half > 1 || position + new > layout.capacity {
        return Err(EngineError::Internal(format!(
            "a KV store of {new} positions at {position} (half {half}) into a block of {}",
            layout.capacity
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(capacity: usize) -> KvLayout {
        KvLayout { dtype: Dtype::Bf16, sequences: 2, capacity, row_bytes: 4 * 8 * 2 }
    }

    #[test]
    fn attention_shapes_are_checked_before_launch() {
        let s = AttentionShape { past: 3, new: 2, heads: 8, kv_heads: 4, head_dim: 8 };
        assert!(check_attention(layout(5), s).is_ok());
        assert!(check_attention(layout(4), s).is_err(), "positions past the block");
        assert!(check_attention(layout(5), AttentionShape { kv_heads: 3, ..s }).is_err());
        assert!(check_attention(layout(5), AttentionShape { kv_heads: 0, ..s }).is_err());
        assert!(check_attention(layout(5), AttentionShape { head_dim: 16, ..s }).is_err(), "wider than a row");
        let wide = KvLayout { row_bytes: 4 * 1024 * 2, ..layout(5) };
        assert!(check_attention(wide, AttentionShape { head_dim: 1024, ..s }).is_err(), "past the kernel");
    }

    #[test]
    fn kv_stores_stay_in_their_block() {
        assert!(check_store(layout(8), 1, 6, 2).is_ok());
        assert!(check_store(layout(8), 1, 7, 2).is_err());
        assert!(check_store(layout(8), 2, 0, 1).is_err());
    }

    #[test]
    fn only_float_dtypes_reach_the_kernels() {
        assert!(dtype_code(Dtype::Int8).is_err());
        assert!(dtype_code(Dtype::Int4).is_err());
    }
}
