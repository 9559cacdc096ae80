//! Weight bytes in memory: groups (or pipelined pieces) read from disk or copied from
//! host memory into per-visit buffers, and row-block views the kernels multiply by.

use std::collections::HashMap;
use std::sync::Arc;

use ferry_core::graph::{Place, Task, NO_LAYER, ROUTED_EXPERTS, ROUTER_PART, WHOLE_GROUP};
use ferry_core::model::{WeightFormat, WeightGroup};
use ferry_core::plan::Tier;
use ferry_core::schedule::format_pieces;

use super::{lock, Engine};
use crate::backend::{DeviceBuffer, WeightRef};
use crate::io::ReadPriority;
use crate::kernels::quant::BlockFormat;
use crate::kernels::{self, BlockOrder, Rows, GROUP_ROWS};
use crate::memory::{Buffer, Recycler};
use crate::weights::ModelFiles;
use crate::EngineError;

pub(super) type Key = (u8, u32, u32, u32, u32); // (group, layer, step, first micro-batch, piece)

#[derive(Clone)]
pub(super) struct View {
    buffer: usize,
    offset: usize,
    tensor: u32,
    row_start: usize,
    rows: usize,
    cols: usize,
    format: WeightFormat,
    order: BlockOrder,
}

/// Which of a group's bytes a read or a copy brings in.
pub(super) enum GroupPart {
    Whole,
    /// One pipelined piece (`schedule::format_pieces`).
    Piece(u32),
    /// Whole tensors by their index in `ModelSpec::group_tensors`: a mixture of
    /// experts' router part, or the experts a visit was routed to.
    Tensors(Vec<usize>),
}

/// Rows `row_start .. + rows` of one tensor of a group, at bytes `start..end` of `file`.
struct Part {
    tensor: u32,
    row_start: usize,
    rows: usize,
    cols: usize,
    format: WeightFormat,
    file: std::path::PathBuf,
    start: u64,
    end: u64,
}

/// Weight bytes in memory: buffers and where each tensor (or row block) is in them.
pub(super) struct Loaded {
    buffers: Vec<DeviceBuffer>,
    views: Vec<View>,
    /// Streamed weights go back to the recycler when freed (resident ones are unmapped).
    recycler: Option<Arc<Recycler>>,
}

impl Loaded {
    /// One tensor of `rows` × `cols` filling `buffer` (not recycled when freed).
    pub(super) fn single(buffer: DeviceBuffer, rows: usize, cols: usize, format: WeightFormat) -> Loaded {
        let view = View { buffer: 0, offset: 0, tensor: 0, row_start: 0, rows, cols, format, order: BlockOrder::Rows };
        Loaded { buffers: vec![buffer], views: vec![view], recycler: None }
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Some(recycler) = &self.recycler {
            for buffer in self.buffers.drain(..).filter_map(DeviceBuffer::into_mapped) {
                recycler.give(buffer);
            }
        }
    }
}

pub(super) fn group_code(group: WeightGroup) -> u8 {
    group as u8
}

/// What a weight read's bytes are for, which decides the memory they land in.
#[derive(Clone, Copy)]
pub(super) enum Lands {
    /// Kept for the whole run (resident weights, a draft, hot experts):
    /// `Buffer::resident`, in huge pages unless `FERRY_HUGE_PAGES=off`.
    Resident,
    /// Streamed: into a recycled buffer when the read has its key, else fresh memory.
    Streamed(Option<Key>),
}

impl<'a> Engine<'a> {
    /// Reads a weight group (or one pipelined piece of it) from disk into memory at
    /// `place`. A streamed read with its key lands in a recycled buffer (the one the
    /// scheduler reserved for this read, or any that fits) and returns to the recycler
    /// when freed; that needs memory the CPU addresses, so a backend whose `place` is
    /// not reads into fresh host memory and uploads it.
    pub(super) fn read_group(
        &self,
        group: WeightGroup,
        layer: u64,
        part: &GroupPart,
        place: Place,
        lands: Lands,
    ) -> Result<Loaded, EngineError> {
        self.read_group_of(self.files, self.spec, group, layer, part, place, lands)
    }

    /// `read_group` from another model's files (a separate draft's).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn read_group_of(
        &self,
        files: &ModelFiles,
        spec: &ferry_core::model::ModelSpec,
        group: WeightGroup,
        layer: u64,
        part: &GroupPart,
        place: Place,
        lands: Lands,
    ) -> Result<Loaded, EngineError> {
        let kept_here = self.backend.host_addressable(place);
        let recycle = match lands {
            Lands::Streamed(key) => key.filter(|_| kept_here),
            Lands::Resident => None,
        };
        let resident = matches!(lands, Lands::Resident) && kept_here;
        // Kept weights in the order the backend's kernels read fastest; the embedding
        // table is looked up by rows.
        let order = match group {
            WeightGroup::Embeddings => BlockOrder::Rows,
            _ if resident => self.backend.resident_order(place),
            _ => BlockOrder::Rows,
        };
        // A piece of whole tensors packed together reads as those tensors.
        let packed;
        let part = match part {
            GroupPart::Piece(piece) => match self.pieces(group, layer).get(*piece as usize) {
                Some(p) if p.tensors > 1 => {
                    packed = GroupPart::Tensors(piece_tensors(p));
                    &packed
                }
                _ => part,
            },
            _ => part,
        };
        let location = files.group(group, layer);
        let tensors = spec.group_tensors(group, layer);
        let whole = |i: usize| -> Result<Part, EngineError> {
            let (t, loc) = tensors
                .get(i)
                .zip(location.tensors.get(i))
                .ok_or_else(|| EngineError::Internal(format!("tensor {i} of layer {layer} {group:?} out of range")))?;
            Ok(Part {
                tensor: i as u32,
                row_start: 0,
                rows: t.rows as usize,
                cols: t.cols as usize,
                format: loc.format,
                file: loc.file.clone(),
                start: loc.start,
                end: loc.end,
            })
        };
        let parts = match part {
            GroupPart::Whole => (0..tensors.len()).map(whole).collect::<Result<Vec<_>, _>>()?,
            GroupPart::Tensors(chosen) => {
                let mut parts = chosen.iter().map(|&i| whole(i)).collect::<Result<Vec<_>, _>>()?;
                // In file order, so that neighbours merge into one range (a GGUF file keeps
                // each projection of every expert together, not each expert).
                parts.sort_by(|a, b| (&a.file, a.start).cmp(&(&b.file, b.start)));
                parts
            }
            GroupPart::Piece(piece) => {
                let p = self
                    .pieces(group, layer)
                    .get(*piece as usize)
                    .copied()
                    .ok_or_else(|| EngineError::Internal(format!("piece {piece} out of range")))?;
                let (t, loc) = (&tensors[p.tensor as usize], &location.tensors[p.tensor as usize]);
                let start = loc.start + loc.format.bytes(p.row_start, t.cols);
                vec![Part {
                    tensor: p.tensor,
                    row_start: p.row_start as usize,
                    rows: p.rows as usize,
                    cols: t.cols as usize,
                    format: loc.format,
                    file: loc.file.clone(),
                    start,
                    end: start + p.bytes,
                }]
            }
        };
        // Merge byte ranges that touch (a group's tensors are usually adjacent in the file).
        let mut loaded = Loaded {
            buffers: Vec::new(),
            views: Vec::new(),
            recycler: recycle.map(|_| Arc::clone(self.recycler(layer as u32))),
        };
        let mut reserved = recycle.and_then(|key| lock(&self.reserved).remove(&key));
        let mut index = 0;
        while index < parts.len() {
            let file = parts[index].file.clone();
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            let mut members: Vec<(usize, usize)> = Vec::new(); // (part index, range index)
            let mut end = index;
            while end < parts.len() && parts[end].file == file {
                let (s, e) = (parts[end].start, parts[end].end);
                match ranges.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => ranges.push((s, e)),
                }
                members.push((end, ranges.len() - 1));
                end += 1;
            }
            let disk = self
                .disk_files
                .get(&file)
                .ok_or_else(|| EngineError::Internal(format!("{} not open", file.display())))?;
            let allocate = |len: usize| match (recycle, reserved.take()) {
                (None, _) if resident => Buffer::resident(len),
                (None, _) => Buffer::new(len),
                (Some(_), Some(buffer)) if buffer.mapped_len() >= len => Ok(buffer.with_len(len)),
                (Some(_), other) => {
                    // A reserved buffer too small for the merged ranges: unmap it first, so
                    // the new one does not come on top of it.
                    drop(other);
                    self.recycler(layer as u32).take(len)
                }
            };
            let (mut buffer, starts) =
                self.reader.read_ranges_into(disk, &ranges, self.policy.chunk_bytes, ReadPriority::Stream, allocate)?;
            *lock(&self.requested_read_bytes) += ranges.iter().map(|(s, e)| e - s).sum::<u64>();
            let buffer_index = loaded.buffers.len();
            for (part, range) in members {
                let p = &parts[part];
                let offset = starts[range] + (p.start - ranges[range].0) as usize;
                let name = &tensors[p.tensor as usize].name;
                let bytes = &buffer.as_slice()[offset..offset + (p.end - p.start) as usize];
                files.check_finite(name, &file, p.start, bytes)?;
                let order = interleave_if(order, p, &mut buffer.as_mut_slice()[offset..]);
                loaded.views.push(View {
                    buffer: buffer_index,
                    offset,
                    tensor: p.tensor,
                    row_start: p.row_start,
                    rows: p.rows,
                    cols: p.cols,
                    format: p.format,
                    order,
                });
            }
            loaded.buffers.push(self.backend.adopt(place, buffer)?);
            index = end;
        }
        Ok(loaded)
    }

    /// The pieces a pipelined transfer of (group, layer) cuts, as lowering cut them:
    /// from the plan's layout, which `check_plan` found equal to the files' formats.
    fn pieces(&self, group: WeightGroup, layer: u64) -> Vec<ferry_core::schedule::Piece> {
        format_pieces(self.spec, group, self.layout.group(group, layer), self.policy.chunk_bytes)
    }

    /// The loaded weights a compute of (group, layer) at (step, micro-batch) uses.
    pub(super) fn weights(
        &self,
        group: WeightGroup,
        layer: u32,
        step: u32,
        j: u32,
    ) -> Result<Vec<Arc<Loaded>>, EngineError> {
        if let Some(resident) = self.resident.get(&(group_code(group), layer)) {
            let split = self.policy.compute_host_layers_on_host;
            let on_host = self.placements.get(layer as usize).is_some_and(|p| p.computed_on_host(group, split));
            if self.weight_tier(group, layer as u64) == Tier::Device || on_host {
                return Ok(vec![Arc::clone(resident)]);
            }
        }
        let first = self.first_j(j);
        let streamed = lock(&self.streamed);
        let mut pieces: Vec<(u32, Arc<Loaded>)> = streamed
            .iter()
            .filter(|(k, _)| k.0 == group_code(group) && k.1 == layer && k.2 == step && k.3 == first)
            .map(|(k, v)| (k.4, Arc::clone(v)))
            .collect();
        if pieces.is_empty() {
            return Err(EngineError::Internal(format!(
                "weights of layer {layer} {group:?} step {step} were not loaded"
            )));
        }
        pieces.sort_by_key(|(piece, _)| *piece);
        let hot = if group == WeightGroup::Mlp { self.hot_loaded(layer) } else { None };
        Ok(pieces.into_iter().map(|(_, l)| l).chain(hot).collect())
    }

    /// Resident weights: embeddings, head, and every group the plan keeps on the device
    /// or the host (read once, before the clock starts).
    pub(super) fn read_resident(&self) -> Result<HashMap<(u8, u32), Arc<Loaded>>, EngineError> {
        let mut resident = HashMap::new();
        for group in [WeightGroup::Embeddings, WeightGroup::Head] {
            // Embeddings on disk stay there: each lookup reads its rows (`embed_rows`).
            if !self.holds_group(group, NO_LAYER) || self.weight_tier(group, 0) == Tier::Disk {
                continue;
            }
            let place = self.resident_place(group, NO_LAYER);
            let loaded = self.read_group(group, 0, &GroupPart::Whole, place, Lands::Resident)?;
            resident.insert((group_code(group), NO_LAYER), Arc::new(loaded));
        }
        for layer in 0..self.spec.num_layers {
            for group in WeightGroup::PER_LAYER {
                if self.weight_tier(group, layer) != Tier::Disk && self.holds_group(group, layer as u32) {
                    let place = self.resident_place(group, layer as u32);
                    let loaded = self.read_group(group, layer, &GroupPart::Whole, place, Lands::Resident)?;
                    resident.insert((group_code(group), layer as u32), Arc::new(loaded));
                }
            }
        }
        Ok(resident)
    }

    pub(super) fn resident_group(&self, group: WeightGroup) -> Arc<Loaded> {
        Arc::clone(&self.resident[&(group_code(group), NO_LAYER)])
    }

    /// Row blocks of tensor `tensor` across the loaded pieces: (first row, block).
    pub(super) fn matrix(loaded: &[Arc<Loaded>], tensor: u32) -> Vec<(usize, WeightRef<'_>)> {
        let mut blocks = Vec::new();
        for l in loaded {
            for v in l.views.iter().filter(|v| v.tensor == tensor) {
                let block = WeightRef {
                    memory: &l.buffers[v.buffer],
                    offset: v.offset,
                    format: v.format,
                    rows: v.rows,
                    cols: v.cols,
                    order: v.order,
                };
                blocks.push((v.row_start, block));
            }
        }
        blocks
    }

    /// A whole tensor held in one block (a norm weight, a bias, a table kept resident).
    pub(super) fn tensor(loaded: &[Arc<Loaded>], tensor: u32) -> Result<WeightRef<'_>, EngineError> {
        match Engine::matrix(loaded, tensor).as_slice() {
            [(0, block)] => Ok(*block),
            blocks => Err(EngineError::Internal(format!(
                "tensor {tensor} is in {} blocks where one whole was expected",
                blocks.len()
            ))),
        }
    }

    /// out (m × n) = x · Wᵀ for tensor `tensor` split in row blocks, into new memory at
    /// `place`, for `rows.count` = m rows of x (`product_rows`, `expert_rows`).
    pub(super) fn project(
        &self,
        loaded: &[Arc<Loaded>],
        tensor: u32,
        x: &DeviceBuffer,
        rows: Rows,
        n: usize,
        place: Place,
    ) -> Result<DeviceBuffer, EngineError> {
        let blocks = Engine::matrix(loaded, tensor);
        if blocks.is_empty() {
            return Err(EngineError::Internal(format!("tensor {tensor} of a group is not in memory")));
        }
        let mut out = self.activation(place, rows.count * n)?;
        for (row_start, block) in blocks {
            self.backend.linear(x, rows, block, &mut out, n, row_start)?;
        }
        Ok(out)
    }

    pub(super) fn load_weights_from_disk(&self, task: &Task, group: WeightGroup) -> Result<(), EngineError> {
        let on_host = Engine::lands_on_host(task);
        let (place, target) =
            if on_host { (Place::HOST, &self.staged) } else { (self.layer_device(task.layer), &self.streamed) };
        let recycle = (!on_host).then(|| self.key(task, group));
        let part = self.part_of(task)?;
        let loaded = Arc::new(self.read_group(group, task.layer as u64, &part, place, Lands::Streamed(recycle))?);
        lock(target).insert(self.key(task, group), loaded);
        Ok(())
    }

    /// Streamed-weight memory on the device of `layer`: a recycled mapping where the
    /// CPU addresses that memory, the backend's otherwise.
    fn device_memory(&self, layer: u32, bytes: usize) -> Result<DeviceBuffer, EngineError> {
        let place = self.layer_device(layer);
        if self.backend.host_addressable(place) {
            let buffer = self.recycler(layer).take(bytes).map_err(|e| EngineError::io(&self.files.dir, e))?;
            Ok(DeviceBuffer::from_mapped(buffer))
        } else {
            self.backend.scratch(place, bytes)
        }
    }

    pub(super) fn copy_weights_to_device(&self, task: &Task, group: WeightGroup) -> Result<(), EngineError> {
        let key = self.key(task, group);
        let recycler = Some(Arc::clone(self.recycler(task.layer)));
        let loaded = match lock(&self.staged).remove(&key) {
            Some(staged) => self.copy_whole(task.layer, &staged, recycler)?,
            None => {
                // Host-resident weights: the whole group or this piece of it.
                let whole = self.resident.get(&(group_code(group), task.layer)).ok_or_else(|| {
                    EngineError::Internal(format!("layer {} {group:?} is neither staged nor host-resident", task.layer))
                })?;
                match self.part_of(task)? {
                    GroupPart::Whole => self.copy_whole(task.layer, whole, recycler)?,
                    GroupPart::Piece(_) => self.copy_piece(task, group, whole, recycler)?,
                    GroupPart::Tensors(chosen) => self.copy_tensors(task, whole, &chosen, recycler)?,
                }
            }
        };
        lock(&self.streamed).insert(key, Arc::new(loaded));
        Ok(())
    }

    /// Every buffer of `source` to new memory on the layer's device (on the cpu
    /// backend: a memcpy).
    fn copy_whole(&self, layer: u32, source: &Loaded, recycler: Option<Arc<Recycler>>) -> Result<Loaded, EngineError> {
        let mut buffers = Vec::new();
        for b in &source.buffers {
            let mut copy = self.device_memory(layer, b.len_bytes())?;
            self.backend.copy(b, 0, &mut copy, 0, b.len_bytes())?;
            buffers.push(copy);
        }
        Ok(Loaded { buffers, views: source.views.clone(), recycler })
    }

    /// What part of its group a weight transfer moves.
    fn part_of(&self, task: &Task) -> Result<GroupPart, EngineError> {
        Ok(match task.piece {
            WHOLE_GROUP => GroupPart::Whole,
            ROUTER_PART => GroupPart::Tensors(self.router_part_tensors(task)),
            ROUTED_EXPERTS => {
                let spec = self.spec_of(task);
                GroupPart::Tensors(self.visit_experts(task)?.into_iter().flat_map(|e| spec.expert_tensors(e)).collect())
            }
            piece => GroupPart::Piece(piece.into()),
        })
    }

    /// Whole tensors of a host-resident group, copied into one buffer on the layer's device.
    fn copy_tensors(
        &self,
        task: &Task,
        whole: &Loaded,
        chosen: &[usize],
        recycler: Option<Arc<Recycler>>,
    ) -> Result<Loaded, EngineError> {
        let missing = |t: usize| EngineError::Internal(format!("{}: tensor {t} is not in memory", task.label()));
        let sources =
            chosen.iter().map(|&t| whole.views.iter().find(|v| v.tensor as usize == t).ok_or_else(|| missing(t)));
        let sources: Vec<&View> = sources.collect::<Result<_, _>>()?;
        let size = |v: &View| v.format.bytes(v.rows as u64, v.cols as u64) as usize;
        let mut buffer = self.device_memory(task.layer, sources.iter().map(|v| size(v)).sum())?;
        let mut views = Vec::with_capacity(sources.len());
        let mut offset = 0;
        for v in sources {
            self.backend.copy(&whole.buffers[v.buffer], v.offset, &mut buffer, offset, size(v))?;
            views.push(View { buffer: 0, offset, ..v.clone() });
            offset += size(v);
        }
        Ok(Loaded { recycler, buffers: vec![buffer], views })
    }

    /// One pipelined piece of a host-resident group, copied to the layer's device.
    fn copy_piece(
        &self,
        task: &Task,
        group: WeightGroup,
        whole: &Loaded,
        recycler: Option<Arc<Recycler>>,
    ) -> Result<Loaded, EngineError> {
        let pieces = self.pieces(group, task.layer as u64);
        let missing = || EngineError::Internal(format!("{}: no such piece in memory", task.label()));
        let p = *pieces.get(task.piece as usize).ok_or_else(missing)?;
        if p.tensors > 1 {
            return self.copy_tensors(task, whole, &piece_tensors(&p), recycler);
        }
        let view = whole.views.iter().find(|v| v.tensor == p.tensor).ok_or_else(missing)?;
        let start = view.offset + view.format.bytes(p.row_start, view.cols as u64) as usize;
        let mut buffer = self.device_memory(task.layer, p.bytes as usize)?;
        self.backend.copy(&whole.buffers[view.buffer], start, &mut buffer, 0, p.bytes as usize)?;
        Ok(Loaded {
            recycler,
            buffers: vec![buffer],
            views: vec![View {
                buffer: 0,
                offset: 0,
                tensor: p.tensor,
                row_start: p.row_start as usize,
                rows: p.rows as usize,
                cols: view.cols,
                format: view.format,
                order: view.order,
            }],
        })
    }

    /// Frees a visit's streamed weights after their last consumer, as the graph's
    /// release says (the last micro-batch of a layer-major visit; every visit otherwise).
    pub(super) fn release_weights_if_last(&self, task: &Task, group: WeightGroup) {
        let last = !self.layer_major() || task.micro_batch as u64 == self.policy.num_micro_batches - 1;
        if !last {
            return;
        }
        let first = self.first_j(task.micro_batch);
        lock(&self.streamed)
            .retain(|k, _| !(k.0 == group_code(group) && k.1 == task.layer && k.2 == task.step && k.3 == first));
    }
}

/// The order `part`'s bytes (at the start of `bytes`) end in: `order` for a
/// block-quantized matrix whose rows the engine has kernels for, interleaved here;
/// rows otherwise (float weights, vectors).
fn interleave_if(order: BlockOrder, part: &Part, bytes: &mut [u8]) -> BlockOrder {
    let format = match part.format {
        WeightFormat::Block(t) => BlockFormat::from_ggml(t.name),
        _ => None,
    };
    match format {
        Some(format) if order == BlockOrder::EightRows && part.rows >= GROUP_ROWS => {
            kernels::interleave(format, part.rows, part.cols, bytes);
            BlockOrder::EightRows
        }
        _ => BlockOrder::Rows,
    }
}

/// The whole tensors a packed piece holds (`Piece::tensors` above 1).
fn piece_tensors(piece: &ferry_core::schedule::Piece) -> Vec<usize> {
    (piece.tensor as usize..(piece.tensor + piece.tensors) as usize).collect()
}
