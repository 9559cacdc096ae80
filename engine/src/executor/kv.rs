//! The KV cache at every tier: resident regions on a device or the host, and the
//! scratch file of the disk tier; loads gather the past positions, stores scatter the
//! new ones.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use ferry_core::graph::Task;
use ferry_core::model::ModelSpec;
use ferry_core::plan::{Policy, Tier, Workload};

use super::{lock, Engine, RunOptions};
use crate::io::DiskFile;
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
        let region_bytes = (2 * policy.micro_batch_size * workload.max_context() * row).div_ceil(4096) * 4096;
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
    /// Copies positions `0..past` of every sequence out of a KV region (K then V).
    pub(super) fn gather_past(&self, region: &[u8], past: usize) -> Vec<u8> {
        let row = self.kv_row_bytes();
        let mb = self.policy.micro_batch_size as usize;
        let max = self.workload.max_context() as usize;
        let mut out = Vec::with_capacity(2 * mb * past * row);
        for half in 0..2 {
            for seq in 0..mb {
                let start = (half * mb + seq) * max * row;
                out.extend_from_slice(&region[start..start + past * row]);
            }
        }
        out
    }

    /// Writes new KV rows (K then V, [seq][new]) into a region at positions past..past+new.
    pub(super) fn scatter_new(&self, region: &mut [u8], new_kv: &[u8], past: usize, new: usize) {
        let row = self.kv_row_bytes();
        let mb = self.policy.micro_batch_size as usize;
        let max = self.workload.max_context() as usize;
        for half in 0..2 {
            for seq in 0..mb {
                let dst = ((half * mb + seq) * max + past) * row;
                let src = (half * mb + seq) * new * row;
                region[dst..dst + new * row].copy_from_slice(&new_kv[src..src + new * row]);
            }
        }
    }

    pub(super) fn read_kv(&self, task: &Task) -> Result<(), EngineError> {
        let kv = self.kv_file.as_ref().ok_or_else(|| EngineError::Internal("no KV file".into()))?;
        let past = self.past(task.step);
        let row = self.kv_row_bytes() as u64;
        let mb = self.policy.micro_batch_size;
        let max = self.workload.max_context();
        let base = kv.region_offset(self.kv_slot(task.layer, task.micro_batch));
        let ranges: Vec<(u64, u64)> = (0..2 * mb)
            .map(|i| {
                let start = base + i * max * row;
                (start, start + past as u64 * row)
            })
            .collect();
        let (buffer, starts) = self.reader.read_ranges(&kv.reader, &ranges, self.policy.chunk_bytes)?;
        *lock(&self.requested_read_bytes) += ranges.iter().map(|(s, e)| e - s).sum::<u64>();
        let mut bytes = Vec::with_capacity((2 * mb * past as u64 * row) as usize);
        for (i, &(s, e)) in ranges.iter().enumerate() {
            bytes.extend_from_slice(&buffer.as_slice()[starts[i]..starts[i] + (e - s) as usize]);
        }
        let key = (task.layer, task.micro_batch, task.step);
        // Staged in host memory (for host attention or a copy), or already in device memory.
        if Engine::lands_on_host(task) {
            lock(&self.kv_staged).insert(key, bytes);
        } else {
            lock(&self.kv_loaded).insert(key, bytes);
        }
        Ok(())
    }

    pub(super) fn copy_kv_to_device(&self, task: &Task) -> Result<(), EngineError> {
        let key = (task.layer, task.micro_batch, task.step);
        let source = match lock(&self.kv_staged).remove(&key) {
            Some(staged) => staged,
            None => {
                let slot = lock(&self.kv_host[self.kv_slot(task.layer, task.micro_batch)]);
                let region = slot.as_ref().ok_or_else(|| EngineError::Internal("host KV missing".into()))?;
                self.gather_past(region.as_slice(), self.past(task.step))
            }
        };
        let mut device = vec![0u8; source.len()];
        self.backend.copy(&mut device, &source);
        lock(&self.kv_loaded).insert(key, device);
        Ok(())
    }

    pub(super) fn store_kv_to_host(&self, task: &Task) -> Result<(), EngineError> {
        let key = (task.layer, task.micro_batch, task.step);
        let new_kv =
            lock(&self.kv_outbox).remove(&key).ok_or_else(|| EngineError::Internal("no new KV to store".into()))?;
        let mut host = vec![0u8; new_kv.len()];
        self.backend.copy(&mut host, &new_kv);
        if self.placements[task.layer as usize].kv == Tier::Host {
            let mut slot = lock(&self.kv_host[self.kv_slot(task.layer, task.micro_batch)]);
            let region = slot.as_mut().ok_or_else(|| EngineError::Internal("host KV missing".into()))?;
            self.scatter_new(region.as_mut_slice(), &host, self.past(task.step), self.new_tokens(task.step));
        } else {
            // On its way to disk.
            lock(&self.kv_outbox).insert(key, host);
        }
        Ok(())
    }

    pub(super) fn write_kv(&self, task: &Task) -> Result<(), EngineError> {
        let kv = self.kv_file.as_ref().ok_or_else(|| EngineError::Internal("no KV file".into()))?;
        let key = (task.layer, task.micro_batch, task.step);
        let new_kv =
            lock(&self.kv_outbox).remove(&key).ok_or_else(|| EngineError::Internal("no new KV to write".into()))?;
        let row = self.kv_row_bytes() as u64;
        let mb = self.policy.micro_batch_size;
        let max = self.workload.max_context();
        let new = self.new_tokens(task.step) as u64;
        let past = self.past(task.step) as u64;
        let base = kv.region_offset(self.kv_slot(task.layer, task.micro_batch));
        for i in 0..2 * mb {
            let offset = base + (i * max + past) * row;
            let src = &new_kv[(i * new * row) as usize..((i + 1) * new * row) as usize];
            kv.writer.write_all_at(src, offset).map_err(|e| EngineError::io(&kv.path, e))?;
        }
        Ok(())
    }
}
