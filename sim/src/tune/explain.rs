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

impl Searcher<'_> {
    /// Why a plan keeps layers on the disk, when it does: the host has no room for
    /// more of them, or holding them there was predicted slower or ran out of memory.
    /// `None` when nothing is on disk (or there is no host tier).
    pub(super) fn why_on_disk(&self, candidate: &super::Candidate) -> Option<String> {
        let policy = &candidate.policy;
        let on_disk: Vec<String> = [
            ("KV cache", policy.kv_cache.disk),
            ("attention weights", policy.attention_weights.disk),
            ("MLP weights", policy.mlp_weights.disk),
        ]
        .iter()
        .filter(|(_, layers)| *layers > 0)
        .map(|(what, layers)| layers_of(*layers, what))
        .collect();
        if on_disk.is_empty() || self.unified() {
            return None;
        }
        let request = self.request;
        let what = on_disk.join(", ");
        let in_flight = super::search::in_flight_bytes(candidate, false);
        let Some(promoted) = self.promoted(policy, &candidate.workload, in_flight) else {
            let pools = pool_specs(policy, request.model, &candidate.workload, request.profile);
            let host = &pools[HOST_POOL];
            return Some(format!(
                "{what} stay on disk: the host budget has no room for another layer of them ({} resident and {} in flight of {})",
                format_bytes(host.resident_bytes()),
                format_bytes(in_flight),
                format_bytes(host.capacity_bytes)
            ));
        };
        let moved = moved_to_host(policy, &promoted);
        let held = match crate::predict::predict(
            &promoted,
            request.model,
            &candidate.workload,
            request.profile,
            crate::predict::Extrapolation::Sampled,
        ) {
            Ok(p) => {
                let (with, without) = (p.metrics.total_ns as f64, candidate.metrics.total_ns as f64);
                format!(
                    "holding {moved} in host RAM instead is predicted {:.1} % slower",
                    (with / without - 1.0) * 100.0
                )
            }
            Err(error) => format!("holding {moved} in host RAM instead does not run: {error}"),
        };
        Some(format!("{what} stay on disk: {held}"))
    }
}

/// What `promoted` holds on the host that `policy` kept on disk, in words.
fn moved_to_host(policy: &ferry_core::plan::Policy, promoted: &ferry_core::plan::Policy) -> String {
    [
        ("KV cache", policy.kv_cache.disk - promoted.kv_cache.disk),
        ("attention weights", policy.attention_weights.disk - promoted.attention_weights.disk),
        ("MLP weights", policy.mlp_weights.disk - promoted.mlp_weights.disk),
    ]
    .iter()
    .filter(|(_, layers)| *layers > 0)
    .map(|(what, layers)| layers_of(*layers, what))
    .collect::<Vec<_>>()
    .join(", ")
}

/// "1 layer's KV cache", "3 layers' KV cache".
fn layers_of(layers: u64, what: &str) -> String {
    if layers == 1 {
        format!("1 layer's {what}")
    } else {
        format!("{layers} layers' {what}")
    }
}
