//! The CUDA primitives: loading checks, opening a device, device memory, page-locked
//! host memory, asynchronous copies on streams, and cuBLAS GEMMs at the shapes of a
//! model's projections. `ferry profile --backend cuda` measures with these; the
//! engine's `CudaBackend` is built on the same driver and cuBLAS.
//!
//! `check_libraries` must run before any other call here: cudarc panics when a
//! library is absent.

use std::sync::Arc;

use cudarc::cublas::sys::{cublasComputeType_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{result, CudaContext, CudaStream};

use crate::EngineError;

fn device_error(what: &str) -> impl Fn(cudarc::driver::DriverError) -> EngineError + '_ {
    move |e| EngineError::Device(format!("{what}: {e}"))
}

/// What to do with CUDA 13's libraries, which cudarc does not look for by their names
/// (libcublas.so.13): they served an H200 machine through unversioned links.
const CUDA_13: &str = "With only CUDA 13 installed (libcublas.so.13, libnvrtc.so.13), link each as \
    libcublas.so, libcublasLt.so and libnvrtc.so in a folder on LD_LIBRARY_PATH (bench/gpu-lease.sh does)";

/// Whether the CUDA driver, cuBLAS and NVRTC (which compiles the backend's kernels at
/// run time) can be loaded; the error names what is missing and how to get it.
pub fn check_libraries() -> Result<(), EngineError> {
    // SAFETY: only tries to dlopen the library; no CUDA function is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(EngineError::Device(format!(
            "no NVIDIA driver on this machine: could not load the CUDA driver library (looked for {}). \
             Install the NVIDIA driver (or add its folder to LD_LIBRARY_PATH), or use --backend cpu",
            library_names("cuda")
        )));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(EngineError::Device(format!(
            "the NVIDIA driver is present but cuBLAS is not (looked for {}). Install the CUDA 12 runtime \
             libraries (e.g. the nvidia-cublas-cu12 wheel or the toolkit) and add their folder to LD_LIBRARY_PATH. \
             {CUDA_13}",
            library_names("cublas")
        )));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(EngineError::Device(format!(
            "the NVIDIA driver and cuBLAS are present but NVRTC, which compiles Ferry's GPU kernels when the \
             cuda backend starts, is not (looked for {}). Install the CUDA 12 runtime compiler (e.g. the \
             nvidia-cuda-nvrtc-cu12 wheel or the toolkit) and add its folder to LD_LIBRARY_PATH. {CUDA_13}",
            library_names("nvrtc")
        )));
    }
    Ok(())
}

/// The file names cudarc tries for `library` on this platform, without repeats.
pub fn library_names(library: &str) -> String {
    let mut names: Vec<String> = Vec::new();
    for name in cudarc::get_lib_name_candidates(library) {
        // cudarc also lists the names of 64-bit Windows builds; they never apply here.
        if !names.contains(&name) && (cfg!(windows) || !name.contains("64")) {
            names.push(name);
        }
    }
    names.join(", ")
}

/// Opens device `ordinal` (after `check_libraries`); the error says how to check.
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>, EngineError> {
    CudaContext::new(ordinal).map_err(|e| {
        EngineError::Device(format!(
            "the CUDA driver loaded but device {ordinal} could not be opened: {e} \
             (is there an NVIDIA GPU, and does nvidia-smi list it?)"
        ))
    })
}

/// Device memory, freed on drop.
pub struct DeviceMemory {
    pub ptr: CUdeviceptr,
    pub bytes: usize,
}

impl DeviceMemory {
    /// `bytes` of device memory in the current context (bound to this thread).
    pub fn new(bytes: usize) -> Result<DeviceMemory, EngineError> {
        // SAFETY: the context is bound to this thread by the caller; freed in Drop.
        let ptr = unsafe { result::malloc_sync(bytes) }
            .map_err(|e| EngineError::Device(format!("allocating {bytes} bytes of device memory: {e}")))?;
        Ok(DeviceMemory { ptr, bytes })
    }

    /// Sets every byte to `value` (asynchronously on `stream`).
    pub fn fill(&self, value: u8, stream: &CudaStream) -> Result<(), EngineError> {
        // SAFETY: the whole allocation, on a live stream.
        unsafe { result::memset_d8_async(self.ptr, value, self.bytes, stream.cu_stream()) }
            .map_err(device_error("memset"))
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_sync and not freed before.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// Page-locked host memory (copies from it run at the link's full rate), freed on drop.
pub struct PinnedMemory {
    ptr: *mut u8,
    bytes: usize,
}

impl PinnedMemory {
    pub fn new(bytes: usize) -> Result<PinnedMemory, EngineError> {
        // SAFETY: plain page-locked allocation (no flags: readable by the CPU at full speed).
        let ptr = unsafe { result::malloc_host(bytes, 0) }
            .map_err(|e| EngineError::Device(format!("pinning {bytes} bytes of host memory: {e}")))?;
        // SAFETY: `bytes` bytes were just allocated at `ptr`.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 1, bytes) };
        Ok(PinnedMemory { ptr: ptr as *mut u8, bytes })
    }

    pub fn slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: owned allocation of `bytes` bytes, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }
}

impl Drop for PinnedMemory {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host and not freed before.
        let _ = unsafe { result::free_host(self.ptr as *mut _) };
    }
}

/// Which way a copy goes over the host link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    HostToDevice,
    DeviceToHost,
}

/// Issues a copy of `host` to or from `device` at `offset` on `stream`; it runs
/// asynchronously: `host` must stay untouched until the stream is synchronised.
pub fn copy_async(
    stream: &CudaStream,
    direction: Direction,
    host: &mut [u8],
    device: &DeviceMemory,
    offset: usize,
) -> Result<(), EngineError> {
    if offset + host.len() > device.bytes {
        return Err(EngineError::Internal(format!(
            "a copy of {} bytes at {offset} passes the end of a {}-byte device buffer",
            host.len(),
            device.bytes
        )));
    }
    let device_ptr = device.ptr + offset as u64;
    // SAFETY: the device range lies inside its allocation (checked above); the caller
    // keeps `host` alive and untouched until the stream is synchronised.
    unsafe {
        match direction {
            Direction::HostToDevice => result::memcpy_htod_async(device_ptr, host, stream.cu_stream()),
            Direction::DeviceToHost => result::memcpy_dtoh_async(host, device_ptr, stream.cu_stream()),
        }
    }
    .map_err(device_error("copy"))
}

/// A projection's matrix product: `m` rows of activations times an `n × k` weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GemmShape {
    pub m: u64,
    pub n: u64,
    pub k: u64,
}

/// cuBLAS on a stream: bf16 operands with f32 accumulation, the way inference engines
/// call it.
pub struct Gemm {
    blas: CudaBlas,
}

impl Gemm {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Gemm, EngineError> {
        let blas = CudaBlas::new(stream.clone()).map_err(|e| EngineError::Device(format!("starting cuBLAS: {e}")))?;
        Ok(Gemm { blas })
    }

    /// `batch` products Cᵀ (n × m) = W (n × k) · Xᵀ (k × m), column-major, operands
    /// strided by their own size, bf16 in `w`, `x`, `c`.
    pub fn bf16(
        &self,
        w: &DeviceMemory,
        x: &DeviceMemory,
        c: &DeviceMemory,
        shape: GemmShape,
        batch: u64,
    ) -> Result<(), EngineError> {
        let fits = |memory: &DeviceMemory, rows: u64, cols: u64| batch * rows * cols * 2 <= memory.bytes as u64;
        if !fits(w, shape.n, shape.k) || !fits(x, shape.m, shape.k) || !fits(c, shape.n, shape.m) {
            return Err(EngineError::Internal(format!("GEMM {shape:?} × {batch} exceeds its buffers")));
        }
        let (m, n, k) = (shape.m as i32, shape.n as i32, shape.k as i32);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: operands lie inside their buffers (checked above); alpha and beta are
        // f32 host scalars, matching the f32 compute type.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                (&alpha as *const f32).cast(),
                w.ptr as *const _,
                cudaDataType::CUDA_R_16BF,
                k,
                (shape.n * shape.k) as i64,
                x.ptr as *const _,
                cudaDataType::CUDA_R_16BF,
                k,
                (shape.m * shape.k) as i64,
                (&beta as *const f32).cast(),
                c.ptr as *mut _,
                cudaDataType::CUDA_R_16BF,
                n,
                (shape.n * shape.m) as i64,
                batch as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cudarc::cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| EngineError::Device(format!("cuBLAS GEMM: {e}")))
    }
}
