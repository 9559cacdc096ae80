//! Device memory and streams of the cuda backend.
//!
//! **One stream per calling thread, synchronised before every call returns.** The
//! executor calls its backend from several threads at once (the compute lane, the copy
//! lanes, the disk lanes) and counts a task as finished when its call returns; the task
//! that depends on it may run next on another thread. So each thread gets its own
//! stream (and cuBLAS handle), created the first time it calls, with the context bound
//! to it; every operation waits for its stream before it returns. Then:
//! - a task's measured time is its real GPU time (the trace and the simulator's
//!   comparison stay honest);
//! - dependencies between threads hold without events: whatever a finished task wrote
//!   is complete before the next task is even dispatched;
//! - copy lanes still overlap with compute, because they issue on their own streams;
//! - nothing in flight can outlive the memory it uses, since no work is pending once a
//!   call has returned (so freeing memory needs no further ordering).
//!
//! Memory comes from the device's stream-ordered pool (`cuMemAllocAsync`), whose
//! release threshold is raised at open so freed blocks are kept for reuse rather than
//! returned to the driver at every synchronisation: activations are allocated and freed
//! per operation. On a device without memory pools, plain `cuMemAlloc`/`cuMemFree`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdeviceptr, CUmemPool_attribute, CUstream};
use cudarc::driver::{result, CudaContext, CudaStream};

use crate::EngineError;

fn driver(what: &str) -> impl Fn(cudarc::driver::DriverError) -> EngineError + '_ {
    move |e| EngineError::Device(format!("{what}: {e}"))
}

/// Allocates and frees device memory of one context.
pub(super) struct Allocator {
    ctx: Arc<CudaContext>,
    /// Whether the device has stream-ordered memory pools.
    pools: bool,
}

impl Allocator {
    pub(super) fn new(ctx: &Arc<CudaContext>) -> Result<Arc<Allocator>, EngineError> {
        let pools = ctx.has_async_alloc();
        if pools {
            // SAFETY: the device handle comes from a live context; the attribute is a u64
            // (cuuint64_t), passed by pointer as the driver expects.
            unsafe {
                let pool = result::device::get_default_mem_pool(ctx.cu_device())
                    .map_err(driver("reading the device's memory pool"))?;
                let mut threshold = u64::MAX;
                result::mem_pool::set_attribute(
                    pool,
                    CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                )
                .map_err(driver("keeping freed device memory for reuse"))?;
            }
        }
        Ok(Arc::new(Allocator { ctx: Arc::clone(ctx), pools }))
    }

    /// `bytes` of uninitialised device memory, ordered on `stream` (usable once the
    /// stream is synchronised). Zero bytes allocate nothing.
    fn alloc(self: &Arc<Self>, bytes: usize, stream: &CudaStream) -> Result<DeviceAlloc, EngineError> {
        let ptr = if bytes == 0 {
            Ok(0)
        } else if self.pools {
            // SAFETY: a live stream of this context, bound to this thread by the lane.
            unsafe { result::malloc_async(stream.cu_stream(), bytes) }
        } else {
            // SAFETY: as above.
            unsafe { result::malloc_sync(bytes) }
        }
        .map_err(|e| EngineError::Device(format!("allocating {bytes} bytes of GPU memory: {e}")))?;
        Ok(DeviceAlloc { ptr, bytes, allocator: Arc::clone(self) })
    }
}

/// Device memory, freed on drop.
pub(super) struct DeviceAlloc {
    pub(super) ptr: CUdeviceptr,
    pub(super) bytes: usize,
    allocator: Arc<Allocator>,
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        // Errors cannot be returned from drop; a failed free leaks the block, no worse.
        let _ = self.allocator.ctx.bind_to_thread();
        // SAFETY: allocated by `Allocator::alloc`, freed once. No work using it is in
        // flight: every operation synchronised its stream before returning (module
        // docs), so freeing on the null stream orders after everything that used it.
        let _ = unsafe {
            if self.allocator.pools {
                result::free_async(self.ptr, std::ptr::null_mut())
            } else {
                result::free_sync(self.ptr)
            }
        };
    }
}

/// Memory on the GPU as the backend hands it out (`super::super::DeviceBuffer::Cuda`).
pub struct CudaBuffer(pub(super) DeviceAlloc);

impl CudaBuffer {
    pub fn len_bytes(&self) -> usize {
        self.0.bytes
    }

    pub(super) fn ptr(&self) -> CUdeviceptr {
        self.0.ptr
    }
}

/// A thread's stream and cuBLAS handle. The handle is only used by its thread.
pub(super) struct Lane {
    pub(super) blas: CudaBlas,
    pub(super) stream: Arc<CudaStream>,
}

/// Every calling thread's lane (see the module docs).
pub(super) struct Lanes {
    ctx: Arc<CudaContext>,
    by_thread: Mutex<HashMap<ThreadId, Arc<Lane>>>,
}

impl Lanes {
    pub(super) fn new(ctx: &Arc<CudaContext>) -> Lanes {
        Lanes { ctx: Arc::clone(ctx), by_thread: Mutex::new(HashMap::new()) }
    }

    /// The calling thread's lane, created on its first call, with the context bound.
    /// (Threads are few and live as long as a run: the map stays small.)
    pub(super) fn current(&self) -> Result<Arc<Lane>, EngineError> {
        self.ctx.bind_to_thread().map_err(driver("binding the CUDA context to a thread"))?;
        let id = std::thread::current().id();
        let mut lanes = self.by_thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lane) = lanes.get(&id) {
            return Ok(Arc::clone(lane));
        }
        let stream = self.ctx.new_stream().map_err(driver("creating a CUDA stream"))?;
        let blas =
            CudaBlas::new(Arc::clone(&stream)).map_err(|e| EngineError::Device(format!("starting cuBLAS: {e}")))?;
        // SAFETY: a live handle. Plain f32 arithmetic: no TF32 tensor-core rounding of
        // the operands, so products match the CPU's f32 ones (the default today; set
        // explicitly so a changed default cannot change the tokens).
        unsafe { cublasSetMathMode(*blas.handle(), cublasMath_t::CUBLAS_DEFAULT_MATH) }
            .result()
            .map_err(|e| EngineError::Device(format!("setting cuBLAS's math mode: {e}")))?;
        let lane = Arc::new(Lane { blas, stream });
        lanes.insert(id, Arc::clone(&lane));
        Ok(lane)
    }

    /// Waits for every stream of the context.
    pub(super) fn synchronize(&self) -> Result<(), EngineError> {
        self.ctx.bind_to_thread().map_err(driver("binding the CUDA context"))?;
        self.ctx.synchronize().map_err(driver("synchronising the GPU"))
    }
}

/// One operation's work on its thread's lane: memory it needs only meanwhile (token
/// ids, row lists, widened weights) is kept until the stream has been synchronised.
pub(super) struct Scope<'a> {
    pub(super) lane: &'a Lane,
    allocator: &'a Arc<Allocator>,
    keep: Vec<DeviceAlloc>,
}

impl<'a> Scope<'a> {
    pub(super) fn stream(&self) -> &CudaStream {
        &self.lane.stream
    }

    pub(super) fn raw_stream(&self) -> CUstream {
        self.lane.stream.cu_stream()
    }

    /// Uninitialised device memory for the rest of the operation.
    pub(super) fn temp(&mut self, bytes: usize) -> Result<CUdeviceptr, EngineError> {
        let alloc = self.allocator.alloc(bytes, &self.lane.stream)?;
        let ptr = alloc.ptr;
        self.keep.push(alloc);
        Ok(ptr)
    }

    /// `values` copied to device memory for the rest of the operation.
    pub(super) fn upload<T: Copy>(&mut self, values: &[T]) -> Result<CUdeviceptr, EngineError> {
        let ptr = self.temp(std::mem::size_of_val(values))?;
        if !values.is_empty() {
            // SAFETY: `ptr` holds exactly the bytes of `values`; a copy from pageable
            // memory is staged before the call returns, and the stream is synchronised
            // before `values` can go.
            unsafe { result::memcpy_htod_async(ptr, values, self.raw_stream()) }.map_err(driver("uploading"))?;
        }
        Ok(ptr)
    }

    /// New device memory of `bytes`, zeroed, owned by the caller.
    pub(super) fn zeroed(&mut self, bytes: usize) -> Result<CudaBuffer, EngineError> {
        let alloc = self.allocator.alloc(bytes, &self.lane.stream)?;
        if bytes > 0 {
            // SAFETY: the whole of a fresh allocation, on the stream it was allocated on.
            unsafe { result::memset_d8_async(alloc.ptr, 0, bytes, self.raw_stream()) }.map_err(driver("memset"))?;
        }
        Ok(CudaBuffer(alloc))
    }

    /// New device memory of `bytes`, uninitialised (to be overwritten whole).
    pub(super) fn uninit(&mut self, bytes: usize) -> Result<CudaBuffer, EngineError> {
        Ok(CudaBuffer(self.allocator.alloc(bytes, &self.lane.stream)?))
    }
}

/// Runs `work` on the calling thread's lane, then waits for the lane's stream, even
/// when `work` failed part-way (nothing issued may outlive what it uses), and frees
/// the scope's temporary memory.
pub(super) fn on_lane<T>(
    lanes: &Lanes,
    allocator: &Arc<Allocator>,
    what: &str,
    work: impl FnOnce(&mut Scope) -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    let lane = lanes.current()?;
    let mut scope = Scope { lane: &lane, allocator, keep: Vec::new() };
    let result = work(&mut scope);
    let synced = lane.stream.synchronize().map_err(|e| EngineError::Device(format!("{what} on the GPU: {e}")));
    drop(scope);
    let value = result?;
    synced?;
    Ok(value)
}
