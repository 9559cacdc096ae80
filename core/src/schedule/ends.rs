//! The model's two ends in the graph: the embedding lookup (with its rows read from
//! the file when the table stays on disk) and the head that yields each round's tokens.

use super::builder::Builder;
use crate::graph::{MemOp, Op, Payload, Place, Task, TaskKind, NO_LAYER};
use crate::model::WeightGroup;
use crate::plan::Tier;

impl Builder<'_> {
    pub(super) fn embed(&mut self, step: u32, j: u32) {
        let side = match self.policy.embeddings {
            Tier::Device => Place::Device(self.policy.first_device()),
            // Rows read from the file land where disk reads of the first layer land.
            Tier::Disk => self.staging_pool(0),
            Tier::Host => self.end_host(true),
        };
        let rows = self.rows();
        let bytes = self.layout.embedding_lookup(rows).bytes;
        let mut task = self.compute_task(side, Op::Embed, (NO_LAYER, j, step), 0, bytes);
        task.deps.extend(self.last_head[j as usize]);
        if self.policy.embeddings == Tier::Disk {
            // The lookup's rows from the table in its file, once the tokens are known.
            let (read_bytes, request) = self.layout.embedding_disk_read(rows);
            let payload = Payload::Weights { group: WeightGroup::Embeddings };
            let mut read = Builder::new_task(TaskKind::DiskRead, self.disk_of(0), payload, NO_LAYER, j, step);
            read.bytes = read_bytes;
            read.chunk_bytes = Task::request_bytes(request.min(self.policy.chunk_bytes));
            read.deps = task.deps.clone();
            // The pages read, and the rows gathered from them for the lookup (both are
            // held while the rows are copied out).
            let held = read_bytes + bytes;
            read.acquire.push(MemOp { pool: side, bytes: held });
            task.release.push(MemOp { pool: side, bytes: held });
            task.deps.push(self.push(read));
        }
        let id = self.push(task);
        self.set_hidden(j, side, id);
    }

    pub(super) fn head(&mut self, step: u32, j: u32) {
        let side = match self.policy.head {
            Tier::Device => Place::Device(self.policy.last_device()),
            _ => self.end_host(false),
        };
        let dep = self.hidden_on(side, j, step, NO_LAYER);
        // Only the last position of each sequence is projected to the vocabulary, but a
        // verification needs the target's token after every guess.
        let rows = if self.round.drafted > 0 { self.rows() } else { self.policy.micro_batch_size };
        let flops = self.model.projection_flops(WeightGroup::Head, rows);
        let bytes = self.layout.bytes(WeightGroup::Head, 0);
        let mut task = self.compute_task(side, Op::Head, (NO_LAYER, j, step), flops, bytes);
        task.tokens = rows as u32;
        task.deps.extend(dep);
        let id = self.push(task);
        self.last_head[j as usize] = Some(id);
        self.set_hidden(j, side, id);
    }
}
