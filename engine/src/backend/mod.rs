//! The device boundary. A backend owns what differs between a CPU and an accelerator:
//! memory at its places, moving bytes into, out of and between them, and the compute
//! operations of the forward pass on data in that memory. Everything else
//! (scheduling, disk I/O, memory accounting, tracing, the model's data flow) is the
//! executor's and is the same for every backend.
//!
//! Memory is handed out as `DeviceBuffer`s: opaque handles the executor keeps (weights,
//! KV caches, activations) and passes back to the same backend's operations; only a
//! backend looks inside one. On the `cpu` backend, the one this project tests
//! everywhere, every place is host RAM (a device is a RAM budget), so a buffer is the
//! memory itself. The `cuda` backend (cargo feature `cuda`) keeps device places in GPU
//! memory and computes there (its kernels compiled by NVRTC at start, linear layers by
//! cuBLAS in f32); its host places are host memory computed on by the CPU kernels,
//! exactly as on the cpu backend. It runs each call on the calling thread's own stream
//! and waits for it before returning, so a task's time is its GPU time and the next
//! task, on whatever thread, sees its results (`cuda::memory`).
//!
//! A new device kind is a new implementation of `Backend` (a file here) and a variant of
//! `DeviceBuffer`; the executor's forward pass does not change.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod host;
pub mod ragged;

use ferry_core::graph::Place;
use ferry_core::model::{Dtype, WeightFormat};

use crate::kernels::BlockOrder;

pub use cpu::CpuBackend;
pub use host::HostBytes;

pub use crate::kernels::RopeLayout;
use crate::kernels::Rows;
use crate::memory::Buffer;
use crate::EngineError;

/// Memory a backend holds at one place. Opaque to the executor, which only reads the
/// bytes of host-addressable memory (`host_bytes`) to write them to disk.
pub enum DeviceBuffer {
    /// Host-addressable memory: every place of the cpu backend, the host places of an
    /// accelerator's backend.
    Host(HostBytes),
    /// Memory on a CUDA device.
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaBuffer),
}

impl DeviceBuffer {
    /// A page-aligned mapping (read from disk, or kept for reuse) as host-addressable memory.
    pub fn from_mapped(buffer: Buffer) -> DeviceBuffer {
        DeviceBuffer::Host(HostBytes::Mapped(buffer))
    }

    /// The mapping behind host-addressable memory, to keep it for reuse.
    pub fn into_mapped(self) -> Option<Buffer> {
        match self {
            DeviceBuffer::Host(HostBytes::Mapped(buffer)) => Some(buffer),
            _ => None,
        }
    }

    pub fn len_bytes(&self) -> usize {
        match self {
            DeviceBuffer::Host(host) => host.len_bytes(),
            #[cfg(feature = "cuda")]
            DeviceBuffer::Cuda(device) => device.len_bytes(),
        }
    }

    /// The bytes, where the CPU can address them.
    pub fn host_bytes(&self) -> Option<&[u8]> {
        match self {
            DeviceBuffer::Host(host) => Some(host.as_bytes()),
            #[cfg(feature = "cuda")]
            DeviceBuffer::Cuda(_) => None,
        }
    }
}

/// A weight matrix (or a 1-D tensor: one row) stored in a buffer: `rows × cols`
/// values in `format` (a float dtype, or whole blocks per row) at byte `offset`.
#[derive(Clone, Copy)]
pub struct WeightRef<'a> {
    pub memory: &'a DeviceBuffer,
    pub offset: usize,
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    /// Where a block-quantized matrix's blocks lie (`Backend::resident_order`).
    pub order: BlockOrder,
}

impl WeightRef<'_> {
    pub fn bytes(&self) -> usize {
        self.format.bytes(self.rows as u64, self.cols as u64) as usize
    }
}

/// How a block of KV cache lays out its bytes: K then V, each
/// `[sequence][position][kv row]` with room for `capacity` positions per sequence.
/// A resident region has room for the whole context; a block moved between places
/// holds just the positions it carries.
#[derive(Debug, Clone, Copy)]
pub struct KvLayout {
    pub dtype: Dtype,
    pub sequences: usize,
    pub capacity: usize,
    /// Bytes of one position's keys (or values): kv_dim elements of `dtype`.
    pub row_bytes: usize,
}

impl KvLayout {
    pub fn bytes(&self) -> usize {
        2 * self.sequences * self.capacity * self.row_bytes
    }

    /// Where (half 0 = K, 1 = V; sequence; position) starts, in bytes.
    pub fn offset(&self, half: usize, sequence: usize, position: usize) -> usize {
        ((half * self.sequences + sequence) * self.capacity + position) * self.row_bytes
    }

    pub fn with_capacity(self, capacity: usize) -> KvLayout {
        KvLayout { capacity, ..self }
    }
}

/// A rotary embedding: `heads` heads of `head_dim` per row, pair i turning by
/// position × `frequencies[i]` (`ModelSpec::rope_frequencies`).
#[derive(Debug, Clone, Copy)]
pub struct Rotary<'a> {
    pub heads: usize,
    pub head_dim: usize,
    pub frequencies: &'a [f32],
    pub layout: RopeLayout,
}

/// The shape of causal attention over a micro-batch: per sequence, `new` query rows
/// at positions `past .. past + new` over `past + new` key and value rows.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub past: usize,
    pub new: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// What the executor asks of a device. Activations are f32; every operation may run
/// asynchronously on an accelerator (in the order issued), and `download_f32` and
/// `synchronize` wait for what came before.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    // ---- memory ----------------------------------------------------------------

    /// Whether the CPU can address memory at `place` (the cpu backend: everywhere).
    /// Disk reads land in such memory directly; elsewhere they arrive through `adopt`.
    fn host_addressable(&self, place: Place) -> bool;
    /// Whether copies from host memory into device memory start from page-locked
    /// memory, as the plan's pinned copies assume. A backend that pins nothing copies
    /// at the pageable rate (predictions of its runs take `Profile::with_pageable_copies`).
    fn pins_host_memory(&self) -> bool {
        true
    }
    /// The order in which block-quantized weights kept for the whole run at `place`
    /// lay out their blocks (`BlockOrder::EightRows` where this backend's kernels read
    /// interleaved groups faster); weights read per visit stay in the file's row order.
    fn resident_order(&self, _place: Place) -> BlockOrder {
        BlockOrder::Rows
    }
    /// `bytes` of zeroed memory at `place` that the plan accounts for (resident KV
    /// caches): on the host, a fresh mapping whose pages count as they fill.
    fn allocate(&self, place: Place, bytes: usize) -> Result<DeviceBuffer, EngineError>;
    /// `bytes` of zeroed working memory at `place` (activations, KV on its way).
    fn scratch(&self, place: Place, bytes: usize) -> Result<DeviceBuffer, EngineError>;
    /// Bytes the host holds (read from disk) as memory at `place`: kept as they are
    /// where `place` is host-addressable, uploaded otherwise.
    fn adopt(&self, place: Place, bytes: Buffer) -> Result<DeviceBuffer, EngineError>;
    /// Copies `bytes` bytes from `src` at `src_offset` to `dst` at `dst_offset`, between
    /// any two places.
    fn copy(
        &self,
        src: &DeviceBuffer,
        src_offset: usize,
        dst: &mut DeviceBuffer,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<(), EngineError>;
    /// The f32 values of `x`, on the host.
    fn download_f32(&self, x: &DeviceBuffer) -> Result<Vec<f32>, EngineError>;
    /// Waits until every operation issued so far has finished.
    fn synchronize(&self) -> Result<(), EngineError>;

    // ---- compute ---------------------------------------------------------------

    /// Row `t` of `out` = row `tokens[t]` of the embedding table, as f32.
    fn embed(&self, table: WeightRef, tokens: &[u32], out: &mut DeviceBuffer) -> Result<(), EngineError>;
    /// `out[:, col0 .. col0 + w.rows] = x · wᵀ` for `rows.count` rows of `x`; `out` rows
    /// are `out_stride` wide (a weight split in row blocks writes its columns in place).
    /// Each row comes out as it would among `rows.kernel_for` rows (`kernels::Rows`).
    fn linear(
        &self,
        x: &DeviceBuffer,
        rows: Rows,
        w: WeightRef,
        out: &mut DeviceBuffer,
        out_stride: usize,
        col0: usize,
    ) -> Result<(), EngineError>;
    /// RMSNorm of each row of `x` (rows as wide as `weight`) into `out`.
    fn rms_norm(
        &self,
        x: &DeviceBuffer,
        weight: WeightRef,
        eps: f32,
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError>;
    /// Rotary position embedding of each head of each row; `positions[r]` is row r's;
    /// `layout` says which elements turn together.
    fn rope(&self, x: &mut DeviceBuffer, rotary: Rotary, positions: &[usize]) -> Result<(), EngineError>;
    /// Causal grouped-query attention of every sequence of a micro-batch: `q` rows
    /// `[sequence][new][heads × head_dim]` over positions `0 .. past + new` of `cache`.
    fn attention(
        &self,
        q: &DeviceBuffer,
        cache: &DeviceBuffer,
        layout: KvLayout,
        shape: AttentionShape,
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError>;
    /// Stores `new` rows per sequence of keys (`half` 0) or values (1), f32
    /// `[sequence][new][kv_dim]`, into positions `position ..` of `cache`, converted to
    /// the cache's dtype.
    fn store_kv(
        &self,
        rows: &DeviceBuffer,
        new: usize,
        half: usize,
        cache: &mut DeviceBuffer,
        layout: KvLayout,
        position: usize,
    ) -> Result<(), EngineError>;
    /// `attention` where sequence i's queries sit at positions `pasts[i] .. pasts[i] +
    /// shape.new` (`shape.past` unused): a speculative round in which the sequences of
    /// a micro-batch accepted different counts. `at` is where the buffers live. The
    /// default works on any backend, one sequence at a time through copies
    /// (`ragged::attention_by_copies`).
    #[allow(clippy::too_many_arguments)]
    fn attention_ragged(
        &self,
        at: Place,
        q: &DeviceBuffer,
        cache: &DeviceBuffer,
        layout: KvLayout,
        shape: AttentionShape,
        pasts: &[usize],
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError> {
        ragged::attention_by_copies(self, at, q, cache, layout, shape, pasts, out)
    }
    /// `store_kv` with each sequence's rows at its own position `positions[i]`. The
    /// default stores them all at 0 of a block of `new` positions, then copies each
    /// sequence's into place.
    #[allow(clippy::too_many_arguments)]
    fn store_kv_ragged(
        &self,
        at: Place,
        rows: &DeviceBuffer,
        new: usize,
        half: usize,
        cache: &mut DeviceBuffer,
        layout: KvLayout,
        positions: &[usize],
    ) -> Result<(), EngineError> {
        ragged::store_kv_by_copies(self, at, rows, new, half, cache, layout, positions)
    }
    /// SwiGLU: `gate = silu(gate) × up`.
    fn silu_mul(&self, gate: &mut DeviceBuffer, up: &DeviceBuffer) -> Result<(), EngineError>;
    /// `x += delta` (the residual connection).
    fn add(&self, x: &mut DeviceBuffer, delta: &DeviceBuffer) -> Result<(), EngineError>;
    /// Adds `bias` to columns `col0 ..` of every `stride`-wide row of `out`.
    fn add_bias(&self, out: &mut DeviceBuffer, bias: WeightRef, stride: usize, col0: usize) -> Result<(), EngineError>;
    /// Rows `rows[i]` of `x` (rows `width` wide) into row i of `out`.
    fn gather_rows(
        &self,
        x: &DeviceBuffer,
        width: usize,
        rows: &[usize],
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError>;
    /// Row `rows[i]` of `out` += `scales[i]` × row i of `y` (rows `width` wide; the
    /// listed rows are distinct): an expert's output summed into a mixture of experts'
    /// output with its routing weight. Rounded as `out + (scale × y)`, two roundings
    /// and no fused multiply-add, on every backend.
    fn add_scaled_rows(
        &self,
        out: &mut DeviceBuffer,
        width: usize,
        rows: &[usize],
        scales: &[f32],
        y: &DeviceBuffer,
    ) -> Result<(), EngineError>;
    /// Whether rows `rows` of `x` (rows `width` wide) are all finite.
    fn rows_finite(&self, x: &DeviceBuffer, width: usize, rows: &[usize]) -> Result<bool, EngineError>;
}

/// Copies positions `src_position .. + count` of every sequence's keys and values
/// from a KV block laid out as `src_layout` to positions `dst_position ..` of another.
#[allow(clippy::too_many_arguments)]
pub fn copy_kv_positions(
    backend: &dyn Backend,
    src: &DeviceBuffer,
    src_layout: KvLayout,
    src_position: usize,
    dst: &mut DeviceBuffer,
    dst_layout: KvLayout,
    dst_position: usize,
    count: usize,
) -> Result<(), EngineError> {
    let sequences = src_layout.sequences;
    let (from, to) = (vec![src_position; sequences], vec![dst_position; sequences]);
    copy_kv_rows(backend, src, src_layout, &from, dst, dst_layout, &to, count)
}

/// `copy_kv_positions` with each sequence's own positions: sequence i's
/// `src_positions[i] .. + count` to its `dst_positions[i] ..`.
#[allow(clippy::too_many_arguments)]
pub fn copy_kv_rows(
    backend: &dyn Backend,
    src: &DeviceBuffer,
    src_layout: KvLayout,
    src_positions: &[usize],
    dst: &mut DeviceBuffer,
    dst_layout: KvLayout,
    dst_positions: &[usize],
    count: usize,
) -> Result<(), EngineError> {
    let bytes = count * src_layout.row_bytes;
    for half in 0..2 {
        for (seq, (&from, &to)) in src_positions.iter().zip(dst_positions).enumerate() {
            let from = src_layout.offset(half, seq, from);
            let to = dst_layout.offset(half, seq, to);
            backend.copy(src, from, dst, to, bytes)?;
        }
    }
    Ok(())
}

/// Picks a backend by name; `cuda` says what it needs when it cannot start.
/// `activations` applies to the cpu backend's products (the cuda backend runs its
/// host-side products with the default).
pub fn backend(name: &str, activations: crate::kernels::Activations) -> Result<Box<dyn Backend>, EngineError> {
    match name {
        "cpu" => Ok(Box::new(CpuBackend { activations })),
        "cuda" => cuda_backend(),
        other => Err(EngineError::Unsupported(format!("unknown backend '{other}'; use cpu or cuda"))),
    }
}

/// The cuda backend on CUDA device 0; the error says what is missing (driver, cuBLAS,
/// NVRTC, a GPU) or why the kernels did not compile.
#[cfg(feature = "cuda")]
fn cuda_backend() -> Result<Box<dyn Backend>, EngineError> {
    cuda::check_libraries()?;
    Ok(Box::new(cuda::CudaBackend::open(0)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend() -> Result<Box<dyn Backend>, EngineError> {
    Err(EngineError::Unsupported(
        "this ferry was built without the cuda backend: rebuild with `--features cuda` (the cudarc \
         libraries load at run time, so no CUDA toolkit is needed to build)"
            .into(),
    ))
}
