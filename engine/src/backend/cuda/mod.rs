//! The CUDA device (cargo feature `cuda`): cudarc with the driver, cuBLAS and NVRTC
//! loaded at run time, so Ferry builds on any machine (no CUDA toolkit, no GPU) and
//! says plainly at run time what is missing.
//!
//! - `primitives`: loading checks, opening a device, device and page-locked memory,
//!   asynchronous copies, cuBLAS GEMMs (what `ferry profile --backend cuda` measures
//!   with);
//! - `CudaBackend` (`backend`, `device`): the engine's `Backend` on one GPU;
//! - `memory`: its device memory and its streams, one per calling thread, each call
//!   synchronised before it returns (why: see there);
//! - `kernels` and `kernels.cu`: the forward pass's kernels, compiled by NVRTC when
//!   the backend opens;
//! - `launches`: each kernel launch as data (kernel, grid, arguments), shared by the
//!   GPU path and the host emulation test;
//! - `shapes`: the launch arithmetic that needs no GPU (tested everywhere).

mod backend;
mod device;
#[cfg(test)]
mod emulated;
mod kernels;
mod launches;
mod memory;
mod primitives;
mod shapes;

pub use backend::{CudaBackend, HOST_KERNELS};
pub use memory::CudaBuffer;
pub use primitives::{
    check_libraries, copy_async, library_names, open_device, DeviceMemory, Direction, Gemm, GemmShape, PinnedMemory,
};
