//! The CPU as the device: every place is host RAM (a device is a RAM budget the
//! executor accounts against the plan's pools), copies are memcpy, and compute is the
//! `kernels` module on the compute thread pool. An accelerator's backend computes on
//! its host places with these same operations.

use std::cell::RefCell;

use ferry_core::graph::Place;
use ferry_core::model::WeightFormat;

use super::{AttentionShape, Backend, DeviceBuffer, HostBytes, KvLayout, Rotary, WeightRef};
use crate::kernels::quant::BlockFormat;
use crate::kernels::{self, Activations, BlockOrder, Matrix, QuantMatrix, Rows};
use crate::memory::Buffer;
use crate::EngineError;

/// The cpu backend; `activations` says how products treat their inputs (by default as
/// llama.cpp does: rounded to 8 bits for block-quantized weights, to bf16 for bf16
/// weights; f32 to compare with a float reference).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend {
    pub activations: Activations,
}

/// The host memory behind a buffer; another backend's memory is the executor's mistake.
pub(crate) fn host(buffer: &DeviceBuffer) -> Result<&HostBytes, EngineError> {
    match buffer {
        DeviceBuffer::Host(host) => Ok(host),
        #[allow(unreachable_patterns)]
        _ => Err(EngineError::Internal("device memory passed to a host operation".into())),
    }
}

pub(crate) fn host_mut(buffer: &mut DeviceBuffer) -> Result<&mut HostBytes, EngineError> {
    match buffer {
        DeviceBuffer::Host(host) => Ok(host),
        #[allow(unreachable_patterns)]
        _ => Err(EngineError::Internal("device memory passed to a host operation".into())),
    }
}

/// The stored bytes of a weight.
fn stored<'a>(w: &WeightRef<'a>) -> Result<&'a [u8], EngineError> {
    let bytes = host(w.memory)?.as_bytes();
    bytes.get(w.offset..w.offset + w.bytes()).ok_or_else(|| {
        EngineError::Internal(format!("a {}×{} weight at {} passes its buffer's end", w.rows, w.cols, w.offset))
    })
}

/// The block format of a ggml type the kernels decode.
fn block_format(format: WeightFormat) -> Result<BlockFormat, EngineError> {
    match format {
        WeightFormat::Block(t) => BlockFormat::from_ggml(t.name)
            .ok_or_else(|| EngineError::Unsupported(format!("the engine has no kernels for {} weights", t.name))),
        other => Err(EngineError::Unsupported(format!("the engine has no kernels for {} weights", other.name()))),
    }
}

/// Stored values in `format` as f32.
fn decode(format: WeightFormat, bytes: &[u8], out: &mut [f32]) -> Result<(), EngineError> {
    match format.dtype() {
        Some(dtype) => kernels::to_f32(dtype, bytes, out),
        None => kernels::quant::dequantize(block_format(format)?, bytes, out),
    }
    Ok(())
}

/// A 1-D weight (norm, bias) as f32.
fn vector(w: &WeightRef) -> Result<Vec<f32>, EngineError> {
    let mut out = vec![0.0; w.rows * w.cols];
    decode(w.format, stored(w)?, &mut out)?;
    Ok(out)
}

fn out_of_range(what: &str) -> EngineError {
    EngineError::Internal(format!("{what} passes the end of its buffer"))
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn host_addressable(&self, _place: Place) -> bool {
        true
    }

    /// Interleaved by eights on the device places, where the products with 8-bit x
    /// have eight-row kernels; host-resident weights, which pieces are copied out of,
    /// keep the file's order.
    fn resident_order(&self, place: Place) -> BlockOrder {
        if place == Place::HOST || !self.activations.quantize_for_blocks() {
            return BlockOrder::Rows;
        }
        kernels::resident_order()
    }

    fn allocate(&self, place: Place, bytes: usize) -> Result<DeviceBuffer, EngineError> {
        let buffer = Buffer::new(bytes).map_err(|e| {
            EngineError::io(std::path::Path::new(&format!("{} memory ({bytes} bytes)", place.token())), e)
        })?;
        Ok(DeviceBuffer::from_mapped(buffer))
    }

    fn scratch(&self, _place: Place, bytes: usize) -> Result<DeviceBuffer, EngineError> {
        Ok(DeviceBuffer::Host(HostBytes::heap(bytes)))
    }

    fn adopt(&self, _place: Place, bytes: Buffer) -> Result<DeviceBuffer, EngineError> {
        Ok(DeviceBuffer::from_mapped(bytes))
    }

    fn copy(
        &self,
        src: &DeviceBuffer,
        src_offset: usize,
        dst: &mut DeviceBuffer,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<(), EngineError> {
        let from = host(src)?.as_bytes().get(src_offset..src_offset + bytes).ok_or_else(|| out_of_range("a copy"))?;
        let to = host_mut(dst)?
            .as_bytes_mut()
            .get_mut(dst_offset..dst_offset + bytes)
            .ok_or_else(|| out_of_range("a copy"))?;
        to.copy_from_slice(from);
        Ok(())
    }

    fn download_f32(&self, x: &DeviceBuffer) -> Result<Vec<f32>, EngineError> {
        Ok(host(x)?.as_f32().to_vec())
    }

    fn synchronize(&self) -> Result<(), EngineError> {
        Ok(())
    }

    fn embed(&self, table: WeightRef, tokens: &[u32], out: &mut DeviceBuffer) -> Result<(), EngineError> {
        // A lookup reads whole rows where the file has them (the executor keeps the
        // table in row order).
        if table.order != BlockOrder::Rows {
            return Err(EngineError::Internal("an embedding table interleaved by eights".into()));
        }
        let bytes = stored(&table)?;
        let row_bytes = table.format.bytes(1, table.cols as u64) as usize;
        let out = host_mut(out)?.as_f32_mut();
        for (&token, row) in tokens.iter().zip(out.chunks_exact_mut(table.cols)) {
            let at = token as usize * row_bytes;
            let src = bytes.get(at..at + row_bytes).ok_or_else(|| out_of_range("an embedding row"))?;
            decode(table.format, src, row)?;
        }
        Ok(())
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
        let (x, bytes, out) = (host(x)?.as_f32(), stored(&w)?, host_mut(out)?.as_f32_mut());
        match w.format.dtype() {
            Some(dtype) => {
                let matrix = Matrix { bytes, dtype, rows: w.rows, cols: w.cols };
                if self.activations == Activations::Bf16 {
                    kernels::linear_bf16_for(x, rows, matrix, out, out_stride, col0);
                } else {
                    kernels::linear_for(x, rows, matrix, out, out_stride, col0);
                }
            }
            None => {
                let format = block_format(w.format)?;
                let matrix = QuantMatrix { bytes, format, rows: w.rows, cols: w.cols, order: w.order };
                kernels::linear_quant(x, rows, matrix, out, out_stride, col0, self.activations);
            }
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &DeviceBuffer,
        weight: WeightRef,
        eps: f32,
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError> {
        kernels::rms_norm(host(x)?.as_f32(), &vector(&weight)?, eps, host_mut(out)?.as_f32_mut());
        Ok(())
    }

    fn rope(&self, x: &mut DeviceBuffer, r: Rotary, positions: &[usize]) -> Result<(), EngineError> {
        kernels::rope(host_mut(x)?.as_f32_mut(), r.heads, r.head_dim, positions, r.frequencies, r.layout);
        Ok(())
    }

    fn attention(
        &self,
        q: &DeviceBuffer,
        cache: &DeviceBuffer,
        layout: KvLayout,
        s: AttentionShape,
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError> {
        attend(q, cache, layout, s, |_| s.past, out)
    }

    fn attention_ragged(
        &self,
        _at: Place,
        q: &DeviceBuffer,
        cache: &DeviceBuffer,
        layout: KvLayout,
        s: AttentionShape,
        pasts: &[usize],
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError> {
        super::ragged::check_sequences(pasts, layout)?;
        attend(q, cache, layout, s, |seq| pasts[seq], out)
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
        store(rows, new, half, cache, layout, |_| position)
    }

    fn store_kv_ragged(
        &self,
        _at: Place,
        rows: &DeviceBuffer,
        new: usize,
        half: usize,
        cache: &mut DeviceBuffer,
        layout: KvLayout,
        positions: &[usize],
    ) -> Result<(), EngineError> {
        super::ragged::check_sequences(positions, layout)?;
        store(rows, new, half, cache, layout, |seq| positions[seq])
    }

    fn silu_mul(&self, gate: &mut DeviceBuffer, up: &DeviceBuffer) -> Result<(), EngineError> {
        kernels::silu_mul(host_mut(gate)?.as_f32_mut(), host(up)?.as_f32());
        Ok(())
    }

    fn add(&self, x: &mut DeviceBuffer, delta: &DeviceBuffer) -> Result<(), EngineError> {
        for (v, d) in host_mut(x)?.as_f32_mut().iter_mut().zip(host(delta)?.as_f32()) {
            *v += d;
        }
        Ok(())
    }

    fn add_bias(&self, out: &mut DeviceBuffer, bias: WeightRef, stride: usize, col0: usize) -> Result<(), EngineError> {
        kernels::add_bias(host_mut(out)?.as_f32_mut(), &vector(&bias)?, stride, col0);
        Ok(())
    }

    fn gather_rows(
        &self,
        x: &DeviceBuffer,
        width: usize,
        rows: &[usize],
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError> {
        let (x, out) = (host(x)?.as_f32(), host_mut(out)?.as_f32_mut());
        for (&row, dst) in rows.iter().zip(out.chunks_exact_mut(width)) {
            dst.copy_from_slice(x.get(row * width..(row + 1) * width).ok_or_else(|| out_of_range("a row"))?);
        }
        Ok(())
    }

    fn add_scaled_rows(
        &self,
        out: &mut DeviceBuffer,
        width: usize,
        rows: &[usize],
        scales: &[f32],
        y: &DeviceBuffer,
    ) -> Result<(), EngineError> {
        let (out, y) = (host_mut(out)?.as_f32_mut(), host(y)?.as_f32());
        if scales.len() != rows.len() || y.len() < rows.len() * width {
            return Err(out_of_range("the rows to add"));
        }
        for ((&row, &scale), source) in rows.iter().zip(scales).zip(y.chunks_exact(width)) {
            let dst = out.get_mut(row * width..(row + 1) * width).ok_or_else(|| out_of_range("a row"))?;
            for (d, s) in dst.iter_mut().zip(source) {
                *d += scale * s;
            }
        }
        Ok(())
    }

    fn rows_finite(&self, x: &DeviceBuffer, width: usize, rows: &[usize]) -> Result<bool, EngineError> {
        let x = host(x)?.as_f32();
        for &row in rows {
            let values = x.get(row * width..(row + 1) * width).ok_or_else(|| out_of_range("a row"))?;
            if values.iter().any(|v| !v.is_finite()) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Attention of each sequence's `s.new` rows at positions `past_of(seq) ..` over its
/// positions `0 .. past_of(seq) + s.new` of `cache`.
fn attend(
    q: &DeviceBuffer,
    cache: &DeviceBuffer,
    layout: KvLayout,
    s: AttentionShape,
    past_of: impl Fn(usize) -> usize,
    out: &mut DeviceBuffer,
) -> Result<(), EngineError> {
    let (q, cache, out) = (host(q)?.as_f32(), host(cache)?.as_bytes(), host_mut(out)?.as_f32_mut());
    let (width, kv_dim) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let most = (0..layout.sequences).map(&past_of).max().unwrap_or(0) + s.new;
    let keys_len = kernels::keys_by_dim::len_for(most, s.kv_heads, s.head_dim);
    with_kv_f32(keys_len, most * kv_dim, |keys, values| {
        for seq in 0..layout.sequences {
            let past = past_of(seq);
            let visible = past + s.new;
            let span = visible * layout.row_bytes;
            let (k_at, v_at) = (layout.offset(0, seq, 0), layout.offset(1, seq, 0));
            let k = cache.get(k_at..k_at + span).ok_or_else(|| out_of_range("attention's keys"))?;
            let v = cache.get(v_at..v_at + span).ok_or_else(|| out_of_range("attention's values"))?;
            let values = &mut values[..visible * kv_dim];
            // Keys by dimension, as the attention reads them, and values by position, side
            // by side on the compute threads: converting the whole cache every step is
            // O(context) (at 500 positions of TinyLlama, 26.5 µs on one thread;
            // `benches/decode_steps.rs`).
            kernels::in_pool(|| {
                rayon::join(
                    || kernels::keys_by_dim::from_rows(layout.dtype, k, visible, s.kv_heads, s.head_dim, keys),
                    || kernels::to_f32(layout.dtype, v, values),
                )
            });
            let rows = seq * s.new * width..(seq + 1) * s.new * width;
            kernels::attention(
                &q[rows.clone()],
                keys,
                values,
                past,
                s.new,
                s.heads,
                s.kv_heads,
                s.head_dim,
                &mut out[rows],
            );
        }
        Ok(())
    })
}

thread_local! {
    /// Each thread's keys and values in f32 for `attend`, kept between calls: two fresh
    /// zeroed vectors cost 9–10 µs of a TinyLlama decoding layer's attention (26 µs in
    /// all with them).
    static KV_F32: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `f(keys, values)` with f32 buffers of `keys_len` and `values_len` values, whose
/// contents are whatever the last call left (`attend` writes what it reads; the keys'
/// padding past the visible positions is read and its scores dropped).
fn with_kv_f32<R>(keys_len: usize, values_len: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    KV_F32.with(|kept| match kept.try_borrow_mut() {
        Ok(mut kept) => {
            let (keys, values) = &mut *kept;
            if keys.len() < keys_len {
                keys.resize(keys_len, 0.0);
            }
            if values.len() < values_len {
                values.resize(values_len, 0.0);
            }
            f(&mut keys[..keys_len], &mut values[..values_len])
        }
        // Only a call nested inside another on this thread; never expected.
        Err(_) => f(&mut vec![0.0; keys_len], &mut vec![0.0; values_len]),
    })
}

/// Each sequence's `new` rows of keys or values (f32) into its positions
/// `position_of(seq) ..` of `cache`, converted to the cache's dtype.
fn store(
    rows: &DeviceBuffer,
    new: usize,
    half: usize,
    cache: &mut DeviceBuffer,
    layout: KvLayout,
    position_of: impl Fn(usize) -> usize,
) -> Result<(), EngineError> {
    let (rows, cache) = (host(rows)?.as_f32(), host_mut(cache)?.as_bytes_mut());
    let kv_dim = layout.row_bytes / kernels::element_bytes(layout.dtype);
    for seq in 0..layout.sequences {
        let at = layout.offset(half, seq, position_of(seq));
        let dst = cache.get_mut(at..at + new * layout.row_bytes).ok_or_else(|| out_of_range("a KV store"))?;
        kernels::from_f32(layout.dtype, &rows[seq * new * kv_dim..(seq + 1) * new * kv_dim], dst);
    }
    Ok(())
}
