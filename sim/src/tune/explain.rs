//! Why nothing fits: the up-front check that the weights fit on all tiers together, and,
//! when the search finds no feasible plan, which memory falls short and by how much.

use ferry_core::model::WeightGroup;
use ferry_core::plan::{Schedule, Tier, TierCounts, Workload};
use ferry_core::schedule::{pool_capacities, pool_specs};
use ferry_core::units::{format_bytes, MIB};

use super::lp::Fractions;
use super::search::{Class, Group, Member, Searcher};
use super::{TuneError, DEVICE_POOL, HOST_POOL};

impl Searcher<'_> {
    /// Fails when the weights alone exceed every tier together.
    pub(super) fn check_capacity(&self) -> Result<(), TuneError> {
        let request = self.request;
        let Some(disk) = request.profile.disk_capacity_bytes else { return Ok(()) };
        let (device, host) = pool_capacities(request.profile);
        let room = device + if self.unified() { 0 } else { host } + disk;
        let weights = self.layout.total_bytes();
        if weights > room {
            return Err(TuneError::Impossible(format!(
                "the model does not fit even on disk: its weights need {} but device, host and disk hold {} together (short by {})",
                format_bytes(weights),
                format_bytes(room),
                format_bytes(weights - room)
            )));
        }
        Ok(())
    }

    /// Says which memory constraint makes every configuration infeasible, and by how much.
    pub(super) fn explain_impossible(&self) -> String {
        let request = self.request;
        let model = request.model;
        let (device_capacity, host_capacity) = pool_capacities(request.profile);
        // The smallest working set: batch 1, everything streamed, one layer in flight.
        let group = Group {
            micro_batch_size: 1,
            num_micro_batches: 1,
            host_attention: false,
            host_compute: false,
            pinned: false,
            class: Class::Sequential,
            schedules: vec![Schedule::Sequential],
            expert_reads: ferry_core::plan::ExpertReads::Routed,
        };
        let all_disk = Fractions { attention: [0.0, 0.0, 1.0], mlp: [0.0, 0.0, 1.0], kv: [0.0, 0.0, 1.0] };
        let member = Member {
            schedule: Schedule::Sequential,
            prefetch_depth: 0,
            chunk_bytes: MIB,
            copy_streams: 1,
            io_queue_depth: 1,
        };
        let mut policy = self.policy_for(&group, &all_disk, &member);
        // The KV cache streams too: from the host on a discrete GPU, from disk on unified memory.
        policy.kv_cache = TierCounts::all(if self.unified() { Tier::Disk } else { Tier::Host }, model.num_layers);
        let workload = Workload { batch_size: 1, prompt_len: request.prompt_len, gen_len: request.gen_len };
        let pools = pool_specs(&policy, model, &workload, request.profile);
        let layer = self.layout.max_bytes(WeightGroup::Mlp).max(self.layout.max_bytes(WeightGroup::Attention));
        let device_need = pools[DEVICE_POOL].resident_bytes() + layer;
        if device_need > device_capacity {
            let detail: Vec<String> = pools[DEVICE_POOL]
                .resident
                .iter()
                .filter(|(_, b)| *b > 0)
                .map(|(what, b)| format!("{what} {}", format_bytes(*b)))
                .chain(std::iter::once(format!("one streamed weight group {}", format_bytes(layer))))
                .collect();
            return format!(
                "device memory: even at batch 1 with every weight streamed, the working set needs {} but the usable budget is {} (short by {}): {}",
                format_bytes(device_need),
                format_bytes(device_capacity),
                format_bytes(device_need - device_capacity),
                detail.join(", ")
            );
        }
        let host_need = pools[HOST_POOL].resident_bytes() + layer;
        if !self.unified() && host_need > host_capacity {
            return format!(
                "host memory: the staging buffers and host-resident items need {} but the usable budget is {} (short by {})",
                format_bytes(host_need),
                format_bytes(host_capacity),
                format_bytes(host_need - host_capacity)
            );
        }
        format!(
            "no batch in the search fits: at the requested batch the KV cache ({} per sequence) or the working set exceeds the {} device and {} host budgets; try a smaller --batch, --prompt-len or --gen-len",
            format_bytes(model.kv_bytes_per_token_per_layer(request.kv_dtype) * model.num_layers * (request.prompt_len + request.gen_len)),
            format_bytes(device_capacity),
            format_bytes(host_capacity)
        )
    }
}
