//! `CudaBackend`: the `Backend` of an NVIDIA GPU. Device places are GPU memory
//! computed on by `kernels.cu` and cuBLAS; host places are host memory computed on by
//! the CPU kernels, exactly as on the cpu backend (plans compute on the host too:
//! host attention, llama.cpp's split). An operation whose operands are all host memory
//! runs on the CPU, all GPU memory on the GPU; a mix is the executor's mistake (it
//! moves data with `copy` first) and an error naming the operation.

use std::sync::Arc;

use cudarc::driver::CudaContext;
use ferry_core::graph::Place;

use super::kernels::{Kernel, Kernels};
use super::memory::{Allocator, Lanes};
use super::primitives::{check_libraries, open_device};
use crate::backend::{AttentionShape, Backend, CpuBackend, DeviceBuffer, HostBytes, KvLayout, Rotary, WeightRef};
use crate::kernels::{BlockOrder, Rows};
use crate::memory::Buffer;
use crate::EngineError;

/// What host places compute on: the cpu backend's kernels with f32 activations, the
/// GPU kernels' numerics (x in f32 over widened weights), so that where a plan puts a
/// layer changes no token. (The cpu backend's default rounds x to bf16 over bf16
/// weights; with it, a bf16 head on the host differed from the GPU's by 3e-4 of the
/// largest logit on an H200.)
pub const HOST_KERNELS: CpuBackend = CpuBackend { activations: crate::kernels::Activations::F32 };

pub struct CudaBackend {
    pub(super) lanes: Lanes,
    pub(super) kernels: Kernels,
    pub(super) allocator: Arc<Allocator>,
    ctx: Arc<CudaContext>,
}

/// Where an operation's operands are.
#[derive(Debug, PartialEq, Eq)]
enum Side {
    Host,
    Gpu,
}

fn side(op: &str, operands: &[&DeviceBuffer]) -> Result<Side, EngineError> {
    let on_gpu: Vec<bool> = operands.iter().map(|b| matches!(b, DeviceBuffer::Cuda(_))).collect();
    side_of(op, &on_gpu)
}

/// `side` from whether each operand is in GPU memory.
fn side_of(op: &str, on_gpu: &[bool]) -> Result<Side, EngineError> {
    match on_gpu.iter().filter(|&&g| g).count() {
        0 => Ok(Side::Host),
        n if n == on_gpu.len() => Ok(Side::Gpu),
        n => Err(EngineError::Internal(format!(
            "{op}: {n} of its {} operands are in GPU memory and the rest in host memory; an operation \
             computes where all its operands are (the executor copies them there first)",
            on_gpu.len()
        ))),
    }
}

impl CudaBackend {
    /// Opens CUDA device `ordinal` and compiles the kernels for it. Fails with what to
    /// do when the driver, cuBLAS or NVRTC is missing, no device answers, or the
    /// kernels do not compile (NVRTC's log included).
    pub fn open(ordinal: usize) -> Result<CudaBackend, EngineError> {
        check_libraries()?;
        let ctx = open_device(ordinal)?;
        let allocator = Allocator::new(&ctx)?;
        let kernels = Kernels::load(&ctx)?;
        let backend = CudaBackend { lanes: Lanes::new(&ctx), kernels, allocator, ctx };
        backend.warm_up()?;
        Ok(backend)
    }

    /// Products through the real path (a lane, widening, SGEMM) at the row counts of
    /// decoding and of prefills, so that cuBLAS's initialisation and the kernels it
    /// picks for those shapes (CUDA loads each on its first launch) load here and not
    /// inside the first run's time: on an H200 a run's first compute task took 159 ms,
    /// the next ones 0.4 ms; warmed at one row only, still 153 ms; warmed so, 80 ms
    /// (the rest: the kernels of shapes not warmed here, loaded on first use).
    fn warm_up(&self) -> Result<(), EngineError> {
        const WIDTH: usize = 1024;
        const MOST_ROWS: usize = 512;
        let weights = self.gpu_upload(&vec![0u8; WIDTH * WIDTH * 2])?;
        let x = self.gpu_upload(&vec![0u8; MOST_ROWS * WIDTH * 4])?;
        let mut out = self.gpu_zeroed(MOST_ROWS * WIDTH * 4)?;
        let format = ferry_core::model::WeightFormat::Bf16;
        let w = || WeightRef { memory: &weights, offset: 0, format, rows: WIDTH, cols: WIDTH, order: BlockOrder::Rows };
        for rows in [1, 4, 16, 64, 128, MOST_ROWS] {
            self.linear(&x, Rows::all(rows), w(), &mut out, WIDTH, 0)?;
        }
        // The pool keeps what is freed (its release threshold is raised at open): the
        // largest block a product widens into is mapped once, here.
        drop(self.gpu_zeroed(super::shapes::f32_bytes(super::shapes::WIDEN_ELEMENTS))?);
        Ok(())
    }

    /// The GPU's name, as the driver reports it.
    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "an NVIDIA GPU".into())
    }

    /// Whether `place` is GPU memory. One GPU is the plan's device 0; a plan over
    /// several devices needs one backend device per stage, which this backend does
    /// not have yet.
    fn on_gpu(&self, place: Place) -> Result<bool, EngineError> {
        match place {
            Place::Host(_) => Ok(false),
            Place::Device(0) => Ok(true),
            Place::Device(n) => Err(EngineError::Unsupported(format!(
                "the cuda backend drives one GPU (CUDA device {}) as the plan's device 0; this plan also \
                 places work on device {n}",
                self.ctx.ordinal()
            ))),
        }
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn host_addressable(&self, place: Place) -> bool {
        !place.is_device()
    }

    fn allocate(&self, place: Place, bytes: usize) -> Result<DeviceBuffer, EngineError> {
        if self.on_gpu(place)? {
            self.gpu_zeroed(bytes)
        } else {
            HOST_KERNELS.allocate(place, bytes)
        }
    }

    fn scratch(&self, place: Place, bytes: usize) -> Result<DeviceBuffer, EngineError> {
        if self.on_gpu(place)? {
            self.gpu_zeroed(bytes)
        } else {
            Ok(DeviceBuffer::Host(HostBytes::heap(bytes)))
        }
    }

    /// Not yet: host weights, host KV and disk reads sit in ordinary mappings, so the
    /// driver stages every host→device copy (10 GB/s against 55 pinned on an H200's
    /// PCIe 5 link, measured by `ferry profile --backend cuda`).
    fn pins_host_memory(&self) -> bool {
        false
    }

    fn adopt(&self, place: Place, bytes: Buffer) -> Result<DeviceBuffer, EngineError> {
        if self.on_gpu(place)? {
            // Uploaded, then the host mapping goes.
            self.gpu_upload(bytes.as_slice())
        } else {
            Ok(DeviceBuffer::from_mapped(bytes))
        }
    }

    fn copy(
        &self,
        src: &DeviceBuffer,
        src_offset: usize,
        dst: &mut DeviceBuffer,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<(), EngineError> {
        match (src, &*dst) {
            (DeviceBuffer::Host(_), DeviceBuffer::Host(_)) => {
                HOST_KERNELS.copy(src, src_offset, dst, dst_offset, bytes)
            }
            _ => self.gpu_copy(src, src_offset, dst, dst_offset, bytes),
        }
    }

    fn download_f32(&self, x: &DeviceBuffer) -> Result<Vec<f32>, EngineError> {
        match x {
            DeviceBuffer::Host(_) => HOST_KERNELS.download_f32(x),
            DeviceBuffer::Cuda(buffer) => self.gpu_download_f32(buffer),
        }
    }

    fn synchronize(&self) -> Result<(), EngineError> {
        // Every operation has waited for its own stream already; this waits for all.
        self.lanes.synchronize()
    }

    fn embed(&self, table: WeightRef, tokens: &[u32], out: &mut DeviceBuffer) -> Result<(), EngineError> {
        match side("embed", &[table.memory, out])? {
            Side::Host => HOST_KERNELS.embed(table, tokens, out),
            Side::Gpu => self.gpu_embed(table, tokens, out),
        }
    }

    fn linear(
        &self,
        x: &DeviceBuffer,
        rows: Rows,
        w: WeightRef,
        out: &mut DeviceBuffer,
        out_stride: usize,
        col0: usize,
    ) -> Result<(), EngineError> {
        match side("linear", &[x, w.memory, out])? {
            Side::Host => HOST_KERNELS.linear(x, rows, w, out, out_stride, col0),
            // cuBLAS picks its algorithm by shape: whether a row's bits follow
            // `rows.kernel_for` there is not verified (no GPU on the build machines).
            Side::Gpu => self.gpu_linear(x, rows.count, w, out, out_stride, col0),
        }
    }

    fn rms_norm(
        &self,
        x: &DeviceBuffer,
        weight: WeightRef,
        eps: f32,
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError> {
        match side("rms_norm", &[x, weight.memory, out])? {
            Side::Host => HOST_KERNELS.rms_norm(x, weight, eps, out),
            Side::Gpu => self.gpu_rms_norm(x, weight, eps, out),
        }
    }

    fn rope(&self, x: &mut DeviceBuffer, rotary: Rotary, positions: &[usize]) -> Result<(), EngineError> {
        match side("rope", &[x])? {
            Side::Host => HOST_KERNELS.rope(x, rotary, positions),
            Side::Gpu => self.gpu_rope(x, rotary, positions),
        }
    }

    fn attention(
        &self,
        q: &DeviceBuffer,
        cache: &DeviceBuffer,
        layout: KvLayout,
        shape: AttentionShape,
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError> {
        match side("attention", &[q, cache, out])? {
            Side::Host => HOST_KERNELS.attention(q, cache, layout, shape, out),
            Side::Gpu => self.gpu_attention(q, cache, layout, shape, out),
        }
    }

    fn store_kv(
        &self,
        rows: &DeviceBuffer,
        new: usize,
        half: usize,
        cache: &mut DeviceBuffer,
        layout: KvLayout,
        position: usize,
    ) -> Result<(), EngineError> {
        match side("store_kv", &[rows, cache])? {
            Side::Host => HOST_KERNELS.store_kv(rows, new, half, cache, layout, position),
            Side::Gpu => self.gpu_store_kv(rows, new, half, cache, layout, position),
        }
    }

    fn silu_mul(&self, gate: &mut DeviceBuffer, up: &DeviceBuffer) -> Result<(), EngineError> {
        match side("silu_mul", &[gate, up])? {
            Side::Host => HOST_KERNELS.silu_mul(gate, up),
            Side::Gpu => self.gpu_pairwise(Kernel::SiluMul, gate, up),
        }
    }

    fn add(&self, x: &mut DeviceBuffer, delta: &DeviceBuffer) -> Result<(), EngineError> {
        match side("add", &[x, delta])? {
            Side::Host => HOST_KERNELS.add(x, delta),
            Side::Gpu => self.gpu_pairwise(Kernel::Add, x, delta),
        }
    }

    fn add_bias(&self, out: &mut DeviceBuffer, bias: WeightRef, stride: usize, col0: usize) -> Result<(), EngineError> {
        match side("add_bias", &[out, bias.memory])? {
            Side::Host => HOST_KERNELS.add_bias(out, bias, stride, col0),
            Side::Gpu => self.gpu_add_bias(out, bias, stride, col0),
        }
    }

    fn gather_rows(
        &self,
        x: &DeviceBuffer,
        width: usize,
        rows: &[usize],
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError> {
        match side("gather_rows", &[x, out])? {
            Side::Host => HOST_KERNELS.gather_rows(x, width, rows, out),
            Side::Gpu => self.gpu_gather_rows(x, width, rows, out),
        }
    }

    fn add_scaled_rows(
        &self,
        out: &mut DeviceBuffer,
        width: usize,
        rows: &[usize],
        scales: &[f32],
        y: &DeviceBuffer,
    ) -> Result<(), EngineError> {
        match side("add_scaled_rows", &[out, y])? {
            Side::Host => HOST_KERNELS.add_scaled_rows(out, width, rows, scales, y),
            Side::Gpu => self.gpu_add_scaled_rows(out, width, rows, scales, y),
        }
    }

    fn rows_finite(&self, x: &DeviceBuffer, width: usize, rows: &[usize]) -> Result<bool, EngineError> {
        match side("rows_finite", &[x])? {
            Side::Host => HOST_KERNELS.rows_finite(x, width, rows),
            Side::Gpu => self.gpu_rows_finite(x, width, rows),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_decide_where_an_operation_runs() {
        let host = DeviceBuffer::Host(HostBytes::heap(8));
        assert_eq!(side("add", &[&host, &host]).unwrap(), Side::Host);
        assert_eq!(side_of("rope", &[true]).unwrap(), Side::Gpu);
        assert_eq!(side_of("linear", &[true, true, true]).unwrap(), Side::Gpu);
        let mixed = side_of("linear", &[true, false, true]).unwrap_err();
        assert!(matches!(mixed, EngineError::Internal(_)));
        assert!(mixed.to_string().contains("linear: 2 of its 3 operands are in GPU memory"), "{mixed}");
    }
}
