//! The device boundary. The executor asks a backend for the three things that differ
//! between a CPU and an accelerator: running a compute operation on device-resident
//! data, and copying bytes to and from the device. Everything else (scheduling,
//! I/O, memory accounting, tracing) is the executor's and is the same for every
//! backend.
//!
//! The `cpu` backend is the one this project can test everywhere: the device is the
//! CPU and device memory is a RAM budget. A `cuda` execution backend (not built yet;
//! the profiler's cuda path already measures GPUs through cudarc) implements the
//! same trait.

/// A named backend; `copy` moves bytes between host and device memory.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Copies `src` (host or device) into `dst` (device or host).
    fn copy(&self, dst: &mut [u8], src: &[u8]);
    /// Copies activations (f32).
    fn copy_f32(&self, dst: &mut [f32], src: &[f32]);
}

/// The CPU as the device: copies are memcpy, compute is `kernels` on all cores.
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn copy(&self, dst: &mut [u8], src: &[u8]) {
        dst.copy_from_slice(src);
    }

    fn copy_f32(&self, dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }
}

/// Picks a backend by name; `cuda` is not built yet and says so.
pub fn backend(name: &str) -> Result<Box<dyn Backend>, crate::EngineError> {
    match name {
        "cpu" => Ok(Box::new(CpuBackend)),
        "cuda" => Err(crate::EngineError::Unsupported(
            "the engine's cuda execution backend is not built yet: runs use --backend cpu \
             (ferry profile --backend cuda measures a GPU for the tuner)"
                .into(),
        )),
        other => Err(crate::EngineError::Unsupported(format!("unknown backend '{other}'; use cpu"))),
    }
}
