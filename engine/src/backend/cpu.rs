//! The CPU as the device: device memory is a RAM budget (page-aligned mappings the
//! executor accounts against the plan's pools), copies are memcpy, and compute is the
//! `kernels` module on the compute thread pool.

use ferry_core::graph::Place;
use ferry_core::model::Dtype;

use super::{AttentionShape, Backend};
use crate::kernels::{self, Matrix};
use crate::memory::Buffer;
use crate::EngineError;

pub struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn allocate(&self, place: Place, bytes: usize) -> Result<Buffer, EngineError> {
        Buffer::new(bytes)
            .map_err(|e| EngineError::io(std::path::Path::new(&format!("{} memory ({bytes} bytes)", place.token())), e))
    }

    fn copy(&self, dst: &mut [u8], src: &[u8]) {
        dst.copy_from_slice(src);
    }

    fn copy_f32(&self, dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }

    fn synchronize(&self) -> Result<(), EngineError> {
        Ok(())
    }

    fn linear(&self, x: &[f32], rows: usize, w: Matrix, out: &mut [f32], out_stride: usize, col0: usize) {
        kernels::linear(x, rows, w, out, out_stride, col0);
    }

    fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        kernels::rms_norm(x, weight, eps, out);
    }

    fn rope(&self, x: &mut [f32], heads: usize, head_dim: usize, positions: &[usize], theta: f32) {
        kernels::rope(x, heads, head_dim, positions, theta);
    }

    fn attention(&self, q: &[f32], keys: &[f32], values: &[f32], s: AttentionShape, out: &mut [f32]) {
        kernels::attention(q, keys, values, s.past, s.new, s.heads, s.kv_heads, s.head_dim, out);
    }

    fn silu_mul(&self, gate: &mut [f32], up: &[f32]) {
        kernels::silu_mul(gate, up);
    }

    fn add(&self, x: &mut [f32], delta: &[f32]) {
        for (v, d) in x.iter_mut().zip(delta) {
            *v += d;
        }
    }

    fn add_bias(&self, out: &mut [f32], bias: &[f32], stride: usize, col0: usize) {
        kernels::add_bias(out, bias, stride, col0);
    }

    fn decode(&self, dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
        kernels::to_f32(dtype, bytes, out);
    }

    fn encode(&self, dtype: Dtype, values: &[f32], out: &mut [u8]) {
        kernels::from_f32(dtype, values, out);
    }

    fn argmax(&self, logits: &[f32]) -> u32 {
        kernels::argmax(logits)
    }
}
