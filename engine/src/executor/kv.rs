//! The KV cache at every tier: resident regions on a device or the host, and the
//! scratch file of the disk tier; loads gather the past positions, stores scatter the
//! new ones.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use ferry_core::graph::{Place, Task};
use ferry_core::model::ModelSpec;
use ferry_core::plan::{Policy, Tier, Workload};

use super::speculate::{is_draft, Positions};
use super::{lock, Engine, RunOptions};
use crate::backend::{copy_kv_positions, copy_kv_rows, AttentionShape, DeviceBuffer, KvLayout};
use crate::io::{DiskFile, ReadPriority};
use crate::EngineError;

/// The disk-resident KV cache: one region per (layer, micro-batch), K then V, each
/// [sequence][position][kv_dim]. Read with direct I/O, written through the page cache.
pub(super) struct KvFile {
    path: PathBuf,
    reader: Arc<DiskFile>,
    writer: File,
    region_bytes: u64,
}

impl KvFile {
    pub(super) fn create(
        spec: &ModelSpec,
        policy: &Policy,
        workload: &Workload,
        options: &RunOptions,
    ) -> Result<KvFile, EngineError> {
        let row = spec.kv_dim() * (policy.kv_dtype.bits() / 8);
        let region_bytes = (2 * policy.micro_batch_size * policy.kv_positions(workload) * row).div_ceil(4096) * 4096;
        let regions = spec.num_layers * policy.num_micro_batches;
        std::fs::create_dir_all(&options.scratch_dir).map_err(|e| EngineError::io(&options.scratch_dir, e))?;
        // A name no other run can hold (two containers on one volume may share a pid),
        // created exclusively, opened for reading too, then unlinked at once: the file
        // lives as long as this run's descriptors and nothing is left behind on any exit,
        // SIGKILL included.
        let (path, writer) = create_unique(&options.scratch_dir)?;
        let reader = writer
            .set_len(regions * region_bytes)
            .map_err(|e| EngineError::io(&path, e))
            .and_then(|()| DiskFile::open(&path, options.allow_buffered_io));
        let _ = std::fs::remove_file(&path);
        Ok(KvFile { path, reader: Arc::new(reader?), writer, region_bytes })
    }

    pub(super) fn region_offset(&self, slot: usize) -> u64 {
        slot as u64 * self.region_bytes
    }
}

/// Creates `ferry-kv-<random>.bin` in `dir` with `create_new`, retrying on a clash.
fn create_unique(dir: &std::path::Path) -> Result<(PathBuf, File), EngineError> {
    let mut last = None;
    for attempt in 0..16u64 {
        let path = dir.join(format!("ferry-kv-{:016x}.bin", unique_token(attempt)));
        match std::fs::OpenOptions::new().create_new(true).read(true).write(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some((path, e)),
            Err(e) => return Err(EngineError::io(&path, e)),
        }
    }
    let (path, e) = last.unwrap_or_else(|| (dir.to_path_buf(), std::io::Error::other("no attempt made")));
    Err(EngineError::io(&path, e))
}

/// 64 bits that differ between runs and attempts: the clock's nanoseconds, the pid,
/// a stack address (randomised per process) and the attempt, mixed.
fn unique_token(attempt: u64) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let local = 0u8;
    let address = &local as *const u8 as u64;
    let mut x = nanos ^ (std::process::id() as u64).rotate_left(32) ^ address.rotate_left(17) ^ attempt;
    // SplitMix64's finaliser: every input bit reaches every output bit.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

impl<'a> Engine<'a> {
    /// How a resident region lays out its bytes (room for the whole context); blocks
    /// moved between places use it `with_capacity` the positions they carry.
    pub(super) fn kv_layout(&self) -> KvLayout {
        self.kv_layout_for(self.spec)
    }

    /// The layout of the cache a task's attention reads: the draft's (its own width)
    /// or the target's.
    pub(super) fn kv_layout_of(&self, task: &Task) -> KvLayout {
        self.kv_layout_for(self.spec_of(task))
    }

    pub(super) fn kv_layout_for(&self, spec: &ferry_core::model::ModelSpec) -> KvLayout {
        KvLayout {
            dtype: self.policy.kv_dtype,
            sequences: self.policy.micro_batch_size as usize,
            capacity: self.policy.kv_positions(self.workload) as usize,
            row_bytes: spec.kv_dim() as usize * crate::kernels::element_bytes(self.policy.kv_dtype),
        }
    }

    fn kv_key(task: &Task) -> (u32, u32, u32) {
        (task.layer, task.micro_batch, task.step)
    }

    /// Attention over the cache where the plan keeps it; stores the new keys and values
    /// there (a resident region), or passes them on to where the cache lives.
    pub(super) fn attn_core(&self, task: &Task, side: Place) -> Result<(), EngineError> {
        let spec = self.spec_of(task);
        let at = self.positions_of(task)?;
        let new = at.new;
        let rows = self.policy.micro_batch_size as usize * new;
        let (q, k_new, v_new) = {
            let mut state = lock(self.activations_of(task));
            let a = state.at(side);
            (a.q.take(), a.k.take(), a.v.take())
        };
        let missing = || EngineError::Internal(format!("{}: q, k and v are not at {}", task.label(), side.token()));
        let (q, k_new, v_new) = (q.ok_or_else(missing)?, k_new.ok_or_else(missing)?, v_new.ok_or_else(missing)?);
        let shape = AttentionShape {
            past: at.most_past(),
            new,
            heads: spec.num_heads as usize,
            kv_heads: spec.num_kv_heads as usize,
            head_dim: spec.head_dim() as usize,
        };
        let mut out = self.activation(side, rows * spec.q_dim() as usize)?;
        let layout = self.kv_layout_of(task);
        // Where the cache lives decides where past rows come from and where new rows go.
        let resident_region = match (is_draft(task), self.placements[task.layer as usize].kv, side) {
            (true, _, _) => Some(self.draft_kv(task)?),
            (false, Tier::Device, _) => Some(&self.kv_device[self.kv_slot(task.layer, task.micro_batch)]),
            (false, Tier::Host, Place::Host(_)) => Some(&self.kv_host[self.kv_slot(task.layer, task.micro_batch)]),
            _ => None,
        };
        if let Some(region) = resident_region {
            let mut slot = lock(region);
            let region = slot.as_mut().ok_or_else(|| EngineError::Internal("KV region missing".into()))?;
            self.store_and_attend(side, [&k_new, &v_new], &q, region, layout, shape, &at, &mut out)?;
        } else {
            // The past positions arrived (read or copied) for this round; assembled with
            // the new ones into one block the attention reads. Sequences that accepted
            // fewer tokens than others hold rows beyond their own past here, which their
            // attention does not read and their new rows overwrite.
            let most = at.most_past();
            let visible = layout.with_capacity(most + new);
            let mut cache = self.backend.scratch(side, visible.bytes())?;
            if most > 0 {
                let arrived = if side.is_device() { &self.kv_loaded } else { &self.kv_staged };
                let past_kv = lock(arrived).remove(&Engine::kv_key(task)).ok_or_else(|| {
                    EngineError::Internal(format!("KV of layer {} did not arrive at {}", task.layer, side.token()))
                })?;
                // What arrived may hold more positions than this round reads (a
                // speculative round's loads carry the most it could need).
                let arrived_layout = layout.with_capacity(self.loaded_past(task.step));
                copy_kv_positions(self.backend, &past_kv, arrived_layout, 0, &mut cache, visible, 0, most)?;
            }
            self.store_and_attend(side, [&k_new, &v_new], &q, &mut cache, visible, shape, &at, &mut out)?;
            let carried = layout.with_capacity(new);
            let mut new_kv = self.backend.scratch(side, carried.bytes())?;
            let zeros = vec![0; at.pasts.len()];
            copy_kv_rows(self.backend, &cache, visible, &at.pasts, &mut new_kv, carried, &zeros, new)?;
            lock(&self.kv_outbox).insert(Engine::kv_key(task), new_kv);
        }
        lock(self.activations_of(task)).at(side).attn = Some(out);
        Ok(())
    }

    /// Stores the new keys and values at each sequence's position of `cache`, then
    /// attends over it: the backend's uniform operations when the sequences share their
    /// past, else its ragged ones.
    #[allow(clippy::too_many_arguments)]
    fn store_and_attend(
        &self,
        side: Place,
        new_kv: [&DeviceBuffer; 2],
        q: &DeviceBuffer,
        cache: &mut DeviceBuffer,
        layout: KvLayout,
        shape: AttentionShape,
        at: &Positions,
        out: &mut DeviceBuffer,
    ) -> Result<(), EngineError> {
        let (backend, pasts) = (self.backend, &at.pasts);
        match at.common_past() {
            Some(past) => {
                for (half, rows) in new_kv.into_iter().enumerate() {
                    backend.store_kv(rows, shape.new, half, cache, layout, past)?;
                }
                backend.attention(q, cache, layout, AttentionShape { past, ..shape }, out)
            }
            None => {
                for (half, rows) in new_kv.into_iter().enumerate() {
                    backend.store_kv_ragged(side, rows, shape.new, half, cache, layout, pasts)?;
                }
                backend.attention_ragged(side, q, cache, layout, shape, pasts, out)
            }
        }
    }

    pub(super) fn read_kv(&self, task: &Task) -> Result<(), EngineError> {
        let kv = self.kv_file.as_ref().ok_or_else(|| EngineError::Internal("no KV file".into()))?;
        let past = self.loaded_past(task.step);
        let layout = self.kv_layout();
        let base = kv.region_offset(self.kv_slot(task.layer, task.micro_batch));
        let span = past * layout.row_bytes;
        let ranges: Vec<(u64, u64)> = (0..2 * layout.sequences)
            .map(|i| {
                let start = base + (i * layout.capacity * layout.row_bytes) as u64;
                (start, start + span as u64)
            })
            .collect();
        let (mut buffer, starts) =
            self.reader.read_ranges(&kv.reader, &ranges, self.policy.chunk_bytes, ReadPriority::Urgent)?;
        *lock(&self.requested_read_bytes) += ranges.iter().map(|(s, e)| e - s).sum::<u64>();
        // Packed in place into the layout of the positions read: each range lies at or
        // after its packed place, so moving them in order never overwrites one unread.
        let bytes = buffer.as_mut_slice();
        for (i, &start) in starts.iter().enumerate() {
            bytes.copy_within(start..start + span, i * span);
        }
        let buffer = buffer.with_len(layout.with_capacity(past).bytes());
        // Staged in host memory (for host attention or a copy), or already in device memory.
        let (place, arrived) = if Engine::lands_on_host(task) {
            (Place::HOST, &self.kv_staged)
        } else {
            (self.layer_device(task.layer), &self.kv_loaded)
        };
        let block = self.backend.adopt(place, buffer)?;
        lock(arrived).insert(Engine::kv_key(task), block);
        Ok(())
    }

    pub(super) fn copy_kv_to_device(&self, task: &Task) -> Result<(), EngineError> {
        let past = self.loaded_past(task.step);
        let layout = self.kv_layout();
        let carried = layout.with_capacity(past);
        let mut device = self.backend.scratch(self.layer_device(task.layer), carried.bytes())?;
        match lock(&self.kv_staged).remove(&Engine::kv_key(task)) {
            Some(staged) => self.backend.copy(&staged, 0, &mut device, 0, carried.bytes())?,
            None => {
                let slot = lock(&self.kv_host[self.kv_slot(task.layer, task.micro_batch)]);
                let region = slot.as_ref().ok_or_else(|| EngineError::Internal("host KV missing".into()))?;
                copy_kv_positions(self.backend, region, layout, 0, &mut device, carried, 0, past)?;
            }
        }
        lock(&self.kv_loaded).insert(Engine::kv_key(task), device);
        Ok(())
    }

    pub(super) fn store_kv_to_host(&self, task: &Task) -> Result<(), EngineError> {
        let key = Engine::kv_key(task);
        let new_kv =
            lock(&self.kv_outbox).remove(&key).ok_or_else(|| EngineError::Internal("no new KV to store".into()))?;
        let layout = self.kv_layout();
        let Positions { pasts, new } = self.positions_of(task)?;
        if self.placements[task.layer as usize].kv == Tier::Host {
            let mut slot = lock(&self.kv_host[self.kv_slot(task.layer, task.micro_batch)]);
            let region = slot.as_mut().ok_or_else(|| EngineError::Internal("host KV missing".into()))?;
            let zeros = vec![0; pasts.len()];
            copy_kv_rows(self.backend, &new_kv, layout.with_capacity(new), &zeros, region, layout, &pasts, new)?;
        } else {
            // On its way to disk.
            let host = self.on_host(&new_kv)?;
            lock(&self.kv_outbox).insert(key, host);
        }
        Ok(())
    }

    /// A copy of `rows` in host scratch memory (new KV on its way to disk).
    fn on_host(&self, rows: &DeviceBuffer) -> Result<DeviceBuffer, EngineError> {
        let bytes = rows.len_bytes();
        let mut host = self.backend.scratch(Place::HOST, bytes)?;
        self.backend.copy(rows, 0, &mut host, 0, bytes)?;
        Ok(host)
    }

    pub(super) fn write_kv(&self, task: &Task) -> Result<(), EngineError> {
        let kv = self.kv_file.as_ref().ok_or_else(|| EngineError::Internal("no KV file".into()))?;
        let new_kv = lock(&self.kv_outbox)
            .remove(&Engine::kv_key(task))
            .ok_or_else(|| EngineError::Internal("no new KV to write".into()))?;
        // A plan lowered for unified memory stores no copy to host before the write (its
        // device is host memory); on a discrete GPU's backend the rows are staged here.
        let new_kv = match new_kv.host_bytes() {
            Some(_) => new_kv,
            None => self.on_host(&new_kv)?,
        };
        let new_kv = new_kv
            .host_bytes()
            .ok_or_else(|| EngineError::Internal(format!("{}: host scratch is not host memory", task.label())))?;
        let layout = self.kv_layout();
        let Positions { pasts, new } = self.positions_of(task)?;
        let span = new * layout.row_bytes;
        let base = kv.region_offset(self.kv_slot(task.layer, task.micro_batch));
        // Rows of (half, sequence) in order: keys of every sequence, then values.
        for i in 0..2 * layout.sequences {
            let past = pasts[i % layout.sequences];
            let offset = base + ((i * layout.capacity + past) * layout.row_bytes) as u64;
            let src = &new_kv[i * span..(i + 1) * span];
            kv.writer.write_all_at(src, offset).map_err(|e| EngineError::io(&kv.path, e))?;
        }
        Ok(())
    }
}
