//! Attention and KV stores for micro-batches whose sequences sit at different
//! positions — a speculative round after its sequences accepted different counts —
//! built from any backend's uniform operations and copies, one sequence at a time. A
//! backend with a direct implementation (the cpu one) overrides them; these are the
//! default, and the reference the direct ones are tested against.

use ferry_core::graph::Place;

use super::{AttentionShape, Backend, DeviceBuffer, KvLayout};
use crate::EngineError;

/// Bytes of one f32.
const F32: usize = 4;

/// Sequence i's `shape.new` query rows attend over its positions `0 .. pasts[i] +
/// shape.new` of `cache`: each sequence's rows and cache are copied into a block of one
/// sequence, attended there with the backend's own `attention`, and copied back.
#[allow(clippy::too_many_arguments)]
pub fn attention_by_copies<B: Backend + ?Sized>(
    backend: &B,
    at: Place,
    q: &DeviceBuffer,
    cache: &DeviceBuffer,
    layout: KvLayout,
    shape: AttentionShape,
    pasts: &[usize],
    out: &mut DeviceBuffer,
) -> Result<(), EngineError> {
    check_sequences(pasts, layout)?;
    let rows_bytes = shape.new * shape.heads * shape.head_dim * F32;
    let mut one_q = backend.scratch(at, rows_bytes)?;
    let mut one_out = backend.scratch(at, rows_bytes)?;
    for (seq, &past) in pasts.iter().enumerate() {
        let visible = past + shape.new;
        let one = KvLayout { sequences: 1, capacity: visible, ..layout };
        let mut one_cache = backend.scratch(at, one.bytes())?;
        for half in 0..2 {
            let bytes = visible * layout.row_bytes;
            backend.copy(cache, layout.offset(half, seq, 0), &mut one_cache, one.offset(half, 0, 0), bytes)?;
        }
        backend.copy(q, seq * rows_bytes, &mut one_q, 0, rows_bytes)?;
        backend.attention(&one_q, &one_cache, one, AttentionShape { past, ..shape }, &mut one_out)?;
        backend.copy(&one_out, 0, out, seq * rows_bytes, rows_bytes)?;
    }
    Ok(())
}

/// Sequence i's `new` rows of keys (`half` 0) or values (1) stored at its positions
/// `positions[i] ..` of `cache`: all stored (converted) into a block of `new`
/// positions with the backend's own `store_kv`, then each copied into place.
#[allow(clippy::too_many_arguments)]
pub fn store_kv_by_copies<B: Backend + ?Sized>(
    backend: &B,
    at: Place,
    rows: &DeviceBuffer,
    new: usize,
    half: usize,
    cache: &mut DeviceBuffer,
    layout: KvLayout,
    positions: &[usize],
) -> Result<(), EngineError> {
    check_sequences(positions, layout)?;
    let block = layout.with_capacity(new);
    let mut stored = backend.scratch(at, block.bytes())?;
    backend.store_kv(rows, new, half, &mut stored, block, 0)?;
    for (seq, &position) in positions.iter().enumerate() {
        let (from, to) = (block.offset(half, seq, 0), layout.offset(half, seq, position));
        backend.copy(&stored, from, cache, to, new * layout.row_bytes)?;
    }
    Ok(())
}

/// A ragged call's positions must name every sequence of the block.
pub(super) fn check_sequences(positions: &[usize], layout: KvLayout) -> Result<(), EngineError> {
    if positions.len() != layout.sequences {
        return Err(EngineError::Internal(format!(
            "{} positions for a block of {} sequences",
            positions.len(),
            layout.sequences
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use ferry_core::model::Dtype;

    fn buffer(backend: &CpuBackend, values: &[f32]) -> DeviceBuffer {
        let mut b = backend.scratch(Place::HOST, values.len() * F32).unwrap();
        crate::backend::cpu::host_mut(&mut b).unwrap().as_f32_mut().copy_from_slice(values);
        b
    }

    fn wave(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7 + seed * 13) % 23) as f32 - 11.0) / 7.0).collect()
    }

    /// The copies' way and the cpu backend's own agree with attending each sequence on
    /// its own, in every cache dtype, and stores land at each sequence's position.
    #[test]
    fn ragged_attention_and_stores_match_one_sequence_at_a_time() {
        let cpu = CpuBackend::default();
        let (heads, kv_heads, head_dim, new) = (4, 2, 8, 3);
        let pasts = [5usize, 0, 2];
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let kv_dim = kv_heads * head_dim;
            let layout = KvLayout {
                dtype,
                sequences: pasts.len(),
                capacity: 9,
                row_bytes: kv_dim * crate::kernels::element_bytes(dtype),
            };
            let mut cache = cpu.scratch(Place::HOST, layout.bytes()).unwrap();
            let mut by_copies = cpu.scratch(Place::HOST, layout.bytes()).unwrap();
            // Every position of every sequence holds something (beyond each one's past too:
            // attention must not read it).
            for half in 0..2 {
                let full = buffer(&cpu, &wave(pasts.len() * 9 * kv_dim, half + 1));
                cpu.store_kv(&full, 9, half, &mut cache, layout, 0).unwrap();
                cpu.store_kv(&full, 9, half, &mut by_copies, layout, 0).unwrap();
            }
            for half in 0..2 {
                let rows = buffer(&cpu, &wave(pasts.len() * new * kv_dim, half + 5));
                cpu.store_kv_ragged(Place::HOST, &rows, new, half, &mut cache, layout, &pasts).unwrap();
                store_kv_by_copies(&cpu, Place::HOST, &rows, new, half, &mut by_copies, layout, &pasts).unwrap();
            }
            assert_eq!(
                crate::backend::cpu::host(&cache).unwrap().as_bytes(),
                crate::backend::cpu::host(&by_copies).unwrap().as_bytes(),
                "{dtype:?}: stores differ"
            );
            let width = heads * head_dim;
            let q = buffer(&cpu, &wave(pasts.len() * new * width, 9));
            let shape = AttentionShape { past: 0, new, heads, kv_heads, head_dim };
            let mut direct = cpu.scratch(Place::HOST, pasts.len() * new * width * F32).unwrap();
            let mut copies = cpu.scratch(Place::HOST, pasts.len() * new * width * F32).unwrap();
            cpu.attention_ragged(Place::HOST, &q, &cache, layout, shape, &pasts, &mut direct).unwrap();
            attention_by_copies(&cpu, Place::HOST, &q, &cache, layout, shape, &pasts, &mut copies).unwrap();
            let (direct, copies) = (cpu.download_f32(&direct).unwrap(), cpu.download_f32(&copies).unwrap());
            assert_eq!(direct, copies, "{dtype:?}: attention differs");
            // Each sequence on its own, with the uniform operation.
            let q_all = cpu.download_f32(&q).unwrap();
            for (seq, &past) in pasts.iter().enumerate() {
                let one = KvLayout { sequences: 1, capacity: 9, ..layout };
                let mut own = cpu.scratch(Place::HOST, one.bytes()).unwrap();
                for half in 0..2 {
                    cpu.copy(
                        &cache,
                        layout.offset(half, seq, 0),
                        &mut own,
                        one.offset(half, 0, 0),
                        9 * layout.row_bytes,
                    )
                    .unwrap();
                }
                let rows = seq * new * width..(seq + 1) * new * width;
                let q_one = buffer(&cpu, &q_all[rows.clone()]);
                let mut out = cpu.scratch(Place::HOST, new * width * F32).unwrap();
                cpu.attention(&q_one, &own, one, AttentionShape { past, ..shape }, &mut out).unwrap();
                assert_eq!(cpu.download_f32(&out).unwrap(), direct[rows], "{dtype:?}: sequence {seq}");
            }
        }
    }
}
