//! Embeddings that stay in their file (`embeddings: disk`): a lookup reads only its
//! tokens' rows (whole pages around each, direct I/O) and gathers them into a small
//! table of its own, which the embed task of the same step and micro-batch takes.

use std::sync::Arc;

use ferry_core::graph::{Place, Task};
use ferry_core::model::WeightGroup;

use super::weights::Loaded;
use super::{lock, Engine};
use crate::io::ReadPriority;
use crate::memory::Buffer;
use crate::EngineError;

const PAGE: u64 = 4096;

/// The rows a lookup read: row `i` of `table` is token `ids[i]`'s.
pub(super) struct EmbeddingRows {
    /// Distinct token ids, ascending.
    ids: Vec<u32>,
    table: Arc<Loaded>,
}

impl EmbeddingRows {
    /// `tokens` as rows of the gathered table.
    pub(super) fn rows_of(&self, tokens: &[u32]) -> Result<Vec<u32>, EngineError> {
        tokens
            .iter()
            .map(|t| {
                self.ids.binary_search(t).map(|i| i as u32).map_err(|_| {
                    EngineError::Internal(format!("token {t} was not among the embedding rows read for its lookup"))
                })
            })
            .collect()
    }

    pub(super) fn table(&self) -> &Arc<Loaded> {
        &self.table
    }
}

impl Engine<'_> {
    /// Reads the embedding rows of the tokens the task's step and micro-batch look up.
    pub(super) fn read_embedding_rows(&self, task: &Task) -> Result<(), EngineError> {
        let at = self.positions_of(task)?;
        let mut ids = self.input_tokens(task, &at)?;
        ids.sort_unstable();
        ids.dedup();
        let stored = self.files.group(WeightGroup::Embeddings, 0).tensors.into_iter().next();
        let shape = self.spec.group_tensors(WeightGroup::Embeddings, 0).into_iter().next();
        let (Some(stored), Some(shape)) = (stored, shape) else {
            return Err(EngineError::Internal("the model has no embedding table".into()));
        };
        // Rows lie one after another (`Policy::validate` refuses group-wise formats here).
        let row_bytes = stored.format.bytes(1, shape.cols);
        let row_start = |id: u32| stored.start + id as u64 * row_bytes;
        // One range per run of rows whose pages touch, so no page is read twice.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut range_of = Vec::with_capacity(ids.len());
        for &id in &ids {
            if id as u64 >= shape.rows {
                return Err(EngineError::Internal(format!("token {id} is past the {} embedding rows", shape.rows)));
            }
            let (start, end) = (row_start(id), row_start(id) + row_bytes);
            match ranges.last_mut() {
                Some(last) if start / PAGE <= last.1.div_ceil(PAGE) => last.1 = end,
                _ => ranges.push((start, end)),
            }
            range_of.push(ranges.len() - 1);
        }
        let disk = self
            .disk_files
            .get(&stored.file)
            .ok_or_else(|| EngineError::Internal(format!("{} not open", stored.file.display())))?;
        let (read, starts) = self.reader.read_ranges(disk, &ranges, self.policy.chunk_bytes, ReadPriority::Urgent)?;
        *lock(&self.requested_read_bytes) += read.len() as u64;
        let mut gathered = Buffer::new(ids.len() * row_bytes as usize).map_err(|e| EngineError::io(&stored.file, e))?;
        for (i, (&id, &range)) in ids.iter().zip(&range_of).enumerate() {
            let offset = starts[range] + (row_start(id) - ranges[range].0) as usize;
            let row = &read.as_slice()[offset..offset + row_bytes as usize];
            self.files.check_finite(&shape.name, &stored.file, row_start(id), row)?;
            gathered.as_mut_slice()[i * row_bytes as usize..][..row_bytes as usize].copy_from_slice(row);
        }
        let place = task.acquire.first().map_or(Place::HOST, |m| m.pool);
        let table = Loaded::single(self.backend.adopt(place, gathered)?, ids.len(), shape.cols as usize, stored.format);
        lock(&self.embedding_rows).insert((task.step, task.micro_batch), EmbeddingRows { ids, table: Arc::new(table) });
        Ok(())
    }

    /// The rows the lookup of `task`'s step and micro-batch read (taken: one lookup each).
    pub(super) fn take_embedding_rows(&self, task: &Task) -> Result<EmbeddingRows, EngineError> {
        lock(&self.embedding_rows)
            .remove(&(task.step, task.micro_batch))
            .ok_or_else(|| EngineError::Internal(format!("{}: its embedding rows were not read", task.label())))
    }
}
