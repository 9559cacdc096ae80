//! The device boundary. A backend owns what differs between a CPU and an accelerator:
//! memory at its places, moving bytes into, out of and between them, and the compute
//! operations of the forward pass on data in that memory. Everything else
//! (scheduling, I/O, memory accounting, tracing, the model's data flow) is the
//! executor's and is the same for every backend.
//!
//! The executor's forward pass (`executor::forward`) calls only these operations, so a
//! new device kind is a new implementation of `Backend` (a file here), not a change to
//! the forward pass.
//!
//! Operands are slices of the backend's memory. On the `cpu` backend, the one this
//! project tests everywhere, device memory is host RAM under a budget, so a slice is
//! the memory itself. An accelerator whose memory the host cannot address needs opaque
//! buffer handles in these signatures: that is the next step of the cuda execution
//! backend (see `backend("cuda")`); its device primitives (memory, pinned memory,
//! copies, cuBLAS) live in `cuda` behind the `cuda` cargo feature and are what
//! `ferry profile --backend cuda` measures with.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use ferry_core::graph::Place;
use ferry_core::model::Dtype;

pub use cpu::CpuBackend;

use crate::kernels::Matrix;
use crate::memory::Buffer;
use crate::EngineError;

/// The shape of one sequence's causal attention: `new` query rows at positions
/// `past .. past + new` over `past + new` key and value rows.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub past: usize,
    pub new: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// What the executor asks of a device.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    // ---- memory ----------------------------------------------------------------

    /// `bytes` of memory at `place`, zero-filled as it is first touched.
    fn allocate(&self, place: Place, bytes: usize) -> Result<Buffer, EngineError>;
    /// Copies bytes between places (host→device, device→host, device→device).
    fn copy(&self, dst: &mut [u8], src: &[u8]);
    /// Copies activations (f32) between places.
    fn copy_f32(&self, dst: &mut [f32], src: &[f32]);
    /// Waits until every operation issued so far has finished (copies and kernels may
    /// run asynchronously on accelerators; the cpu backend runs them in the call).
    fn synchronize(&self) -> Result<(), EngineError>;

    // ---- compute ---------------------------------------------------------------

    /// `out[:, col0 .. col0 + w.rows] = x · wᵀ` for `rows` rows of `x`; `out` rows are
    /// `out_stride` wide (a weight split in row blocks writes its columns in place).
    fn linear(&self, x: &[f32], rows: usize, w: Matrix, out: &mut [f32], out_stride: usize, col0: usize);
    /// RMSNorm of each row of `x` (rows as wide as `weight`) into `out`.
    fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]);
    /// Rotary position embedding of each head of each row; `positions[r]` is row r's.
    fn rope(&self, x: &mut [f32], heads: usize, head_dim: usize, positions: &[usize], theta: f32);
    /// Causal grouped-query attention of one sequence.
    fn attention(&self, q: &[f32], keys: &[f32], values: &[f32], shape: AttentionShape, out: &mut [f32]);
    /// SwiGLU: `gate = silu(gate) × up`.
    fn silu_mul(&self, gate: &mut [f32], up: &[f32]);
    /// `x += delta` (the residual connection).
    fn add(&self, x: &mut [f32], delta: &[f32]);
    /// Adds `bias` to columns `col0 ..` of every `stride`-wide row of `out`.
    fn add_bias(&self, out: &mut [f32], bias: &[f32], stride: usize, col0: usize);
    /// Converts stored values (weights, KV cache) to f32 (`decode`) and back (`encode`).
    fn decode(&self, dtype: Dtype, bytes: &[u8], out: &mut [f32]);
    fn encode(&self, dtype: Dtype, values: &[f32], out: &mut [u8]);
    /// Greedy sampling: the index of the largest logit (the first on ties).
    fn argmax(&self, logits: &[f32]) -> u32;
}

/// Picks a backend by name. `cuda` says what it can and cannot do yet.
pub fn backend(name: &str) -> Result<Box<dyn Backend>, EngineError> {
    match name {
        "cpu" => Ok(Box::new(CpuBackend)),
        "cuda" => Err(EngineError::Unsupported(
            "the engine's cuda execution backend is not built yet: runs use --backend cpu \
             (ferry profile --backend cuda measures a GPU for the tuner)"
                .into(),
        )),
        other => Err(EngineError::Unsupported(format!("unknown backend '{other}'; use cpu"))),
    }
}
