//! Device memory and streams of the cuda backend.
//!
//! **One stream per call in flight, synchronised before every call returns.** The
//! executor calls its backend from several threads at once (the compute lane, the copy
//! lanes, the disk lanes) and counts a task as finished when its call returns; the task
//! that depends on it may run next on another thread. So each call takes a stream (and
//! cuBLAS handle) no other call is using (`Lanes`), with the context bound to its
//! thread; every operation waits for its stream before it returns. Then:
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

use std::sync::{Arc, Mutex};

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

/// A stream and its cuBLAS handle, used by one call at a time.
pub(super) struct Lane {
    pub(super) blas: CudaBlas,
    pub(super) stream: Arc<CudaStream>,
}

/// The backend's lanes: each call takes a free one (or a new one) and gives it back
/// when it returns, so there are as many as calls ever ran at once, and they outlive
/// the threads and the runs that made them. Why: a new lane costs a stream and a
/// cuBLAS handle (the process's first one initialises cuBLAS), and lanes made per
/// thread were made again by every run's new worker threads, inside the run's time.
pub(super) struct Lanes {
    ctx: Arc<CudaContext>,
    free: Mutex<Vec<Lane>>,
}

/// A lane taken for one call; back to the free list on drop.
pub(super) struct TakenLane<'a> {
    lanes: &'a Lanes,
    lane: Option<Lane>,
}

impl std::ops::Deref for TakenLane<'_> {
    type Target = Lane;

    fn deref(&self) -> &Lane {
        // Present from `take` until drop.
        self.lane.as_ref().unwrap_or_else(|| unreachable!("a taken lane is held until dropped"))
    }
}

impl Drop for TakenLane<'_> {
    fn drop(&mut self) {
        if let Some(lane) = self.lane.take() {
            self.lanes.free.lock().unwrap_or_else(|e| e.into_inner()).push(lane);
        }
    }
}

impl Lanes {
    pub(super) fn new(ctx: &Arc<CudaContext>) -> Lanes {
        Lanes { ctx: Arc::clone(ctx), free: Mutex::new(Vec::new()) }
    }

    /// A lane for the calling thread's next call, with the context bound to the thread.
    pub(super) fn take(&self) -> Result<TakenLane<'_>, EngineError> {
        self.ctx.bind_to_thread().map_err(driver("binding the CUDA context to a thread"))?;
        let free = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let lane = match free {
            Some(lane) => lane,
            None => self.new_lane()?,
        };
        Ok(TakenLane { lanes: self, lane: Some(lane) })
    }

    fn new_lane(&self) -> Result<Lane, EngineError> {
        let stream = self.ctx.new_stream().map_err(driver("creating a CUDA stream"))?;
        let blas =
            CudaBlas::new(Arc::clone(&stream)).map_err(|e| EngineError::Device(format!("starting cuBLAS: {e}")))?;
        // SAFETY: a live handle. Plain f32 arithmetic: no TF32 tensor-core rounding of
        // the operands, so products match the CPU's f32 ones (the default today; set
        // explicitly so a changed default cannot change the tokens).
        unsafe { cublasSetMathMode(*blas.handle(), cublasMath_t::CUBLAS_DEFAULT_MATH) }
            .result()
            .map_err(|e| EngineError::Device(format!("setting cuBLAS's math mode: {e}")))?;
        Ok(Lane { blas, stream })
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
    let lane = lanes.take()?;
    let mut scope = Scope { lane: &lane, allocator, keep: Vec::new() };
    let result = work(&mut scope);
    let synced = lane.stream.synchronize().map_err(|e| EngineError::Device(format!("{what} on the GPU: {e}")));
    drop(scope);
    let value = result?;
    synced?;
    Ok(value)
}
