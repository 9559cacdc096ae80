//! From the LP's fractions to a concrete policy: whole layers per tier (`round_counts`),
//! the group's and member's knobs (`policy_for`), then layers moved off full tiers until
//! the resident sets fit (`fit`).

use ferry_core::plan::{Policy, Tier, TierCounts, Workload};
use ferry_core::schedule::pool_specs;

use super::lp::Fractions;
use super::search::{Group, Member, Searcher};
use super::{DEVICE_POOL, HOST_POOL};

impl Searcher<'_> {
    /// Rounds fractions to whole layers and builds the policy.
    pub(super) fn policy_for(&self, group: &Group, fr: &Fractions, member: &Member) -> Policy {
        let layers = self.request.model.num_layers;
        let unified = self.unified();
        // A self-speculating draft shares the embeddings and head on the device.
        let on_device = unified || self.request.speculation.as_ref().is_some_and(|s| s.is_self());
        let (mut embeddings, head) = if on_device { (Tier::Device, Tier::Device) } else { (Tier::Host, Tier::Device) };
        // A plan that streams layers from disk leaves the embedding table there too: a
        // lookup reads its tokens' rows (kilobytes a step), and the table's bytes hold
        // layers that would otherwise stream every step.
        let streams = [fr.attention, fr.mlp, fr.kv].iter().any(|f| f[2] > 1e-9);
        if streams && self.embeddings_may_stay_on_disk {
            embeddings = Tier::Disk;
        }
        let pinned_host_bytes = if group.pinned { self.request.profile.max_pinned_bytes } else { 0 };
        let mut policy = Policy {
            schedule: member.schedule,
            micro_batch_size: group.micro_batch_size,
            num_micro_batches: group.num_micro_batches,
            prefetch_depth: member.prefetch_depth,
            attention_weights: round_counts(fr.attention, layers),
            // Under llama.cpp's split a disk-tier MLP streams whole into a device buffer
            // the LP priced at its fraction; less than a layer of it rounds to the host,
            // where it is computed in place (`fit` moves layers back if the host is full).
            mlp_weights: if group.host_compute {
                round_counts_disk_down(fr.mlp, layers)
            } else {
                round_counts(fr.mlp, layers)
            },
            embeddings,
            head,
            kv_cache: round_counts(fr.kv, layers),
            device_layers: ferry_core::plan::DeviceLayers::Spread,
            host_attention: group.host_attention,
            compute_host_layers_on_host: group.host_compute,
            expert_reads: group.expert_reads,
            hot_experts: 0,
            prefetched_experts: 0,
            weight_dtype: ferry_core::model::Dtype::F32,
            weight_format: self.request.weight_format.clone(),
            kv_dtype: self.request.kv_dtype,
            chunk_bytes: member.chunk_bytes,
            copy_streams: member.copy_streams,
            io_queue_depth: member.io_queue_depth,
            pinned_host_bytes,
            stages: Vec::new(),
            speculation: self.request.speculation.clone(),
        };
        // The engine's float type follows the formats.
        policy.set_weight_format(self.request.weight_format.clone());
        policy
    }

    /// Moves device layers off the device (MLP first, then attention, then KV) until the
    /// resident sets fit; `None` if nothing fits.
    pub(super) fn fit(&self, mut policy: Policy, workload: &Workload) -> Option<Policy> {
        let request = self.request;
        // Embeddings are a cheap lookup: keep them on the host unless nothing else streams.
        let layers = request.model.num_layers;
        if policy.attention_weights.device == layers
            && policy.mlp_weights.device == layers
            && policy.kv_cache.device == layers
        {
            policy.embeddings = Tier::Device;
            let pools = pool_specs(&policy, request.model, workload, request.profile);
            if pools[DEVICE_POOL].resident_bytes() > pools[DEVICE_POOL].capacity_bytes && !self.unified() {
                policy.embeddings = Tier::Host;
            }
        }
        let spill = if self.unified() { Tier::Disk } else { Tier::Host };
        for _ in 0..(3 * request.model.num_layers + 3) {
            let pools = pool_specs(&policy, request.model, workload, request.profile);
            let device = &pools[DEVICE_POOL];
            let host = &pools[HOST_POOL];
            let device_ok = device.resident_bytes() <= device.capacity_bytes;
            let host_ok = host.resident_bytes() <= host.capacity_bytes;
            if device_ok && host_ok {
                return Some(policy);
            }
            // The embedding table leaves memory before any layer does (see `policy_for`).
            let embeddings_full = if self.unified() { !device_ok } else { !host_ok };
            if embeddings_full && policy.embeddings != Tier::Disk && self.embeddings_may_stay_on_disk {
                policy.embeddings = Tier::Disk;
                continue;
            }
            // Under llama.cpp's split attention stays off the disk and the KV cache
            // follows it (see the LP's `whole_layer_constraints`).
            let split = policy.compute_host_layers_on_host;
            if !device_ok {
                if !shift(&mut policy.mlp_weights, Tier::Device, spill)
                    && !shift(&mut policy.attention_weights, Tier::Device, spill)
                    && !shift(&mut policy.kv_cache, Tier::Device, spill)
                {
                    return None;
                }
            } else if !shift(&mut policy.mlp_weights, Tier::Host, Tier::Disk)
                && (split || !shift(&mut policy.attention_weights, Tier::Host, Tier::Disk))
                && (split || !shift(&mut policy.kv_cache, Tier::Host, Tier::Disk))
            {
                return None;
            }
            if split {
                policy.kv_cache = policy.attention_weights;
            }
        }
        None
    }

    /// `policy` with one layer less on the device (MLP first, then attention, then KV,
    /// as `fit` moves them); `None` when nothing is left there.
    pub(super) fn relaxed(&self, mut policy: Policy) -> Option<Policy> {
        let spill = if self.unified() { Tier::Disk } else { Tier::Host };
        let moved = shift(&mut policy.mlp_weights, Tier::Device, spill)
            || shift(&mut policy.attention_weights, Tier::Device, spill)
            || shift(&mut policy.kv_cache, Tier::Device, spill);
        if policy.compute_host_layers_on_host {
            policy.kv_cache = policy.attention_weights;
        }
        moved.then_some(policy)
    }
}

impl Searcher<'_> {
    /// `policy` with layers moved from the disk to the host while the host's resident
    /// set and `in_flight_bytes` (what tasks held at once beside it in the simulated
    /// plan) fit: the KV cache first (it is written to the SSD every step), then
    /// attention, then MLP weights. On unified memory (no host tier) the KV cache alone
    /// moves to the device: weights there would take the room the stream needs
    /// (`room`). `None` when nothing moves.
    ///
    /// The LP is indifferent between tiers that are not the bottleneck, so its vertex
    /// may leave a disk-tier cache beside gigabytes of free RAM; a person would not.
    pub(super) fn promoted(&self, policy: &Policy, workload: &Workload, in_flight_bytes: u64) -> Option<Policy> {
        let (pool, tier) = if self.unified() { (DEVICE_POOL, Tier::Device) } else { (HOST_POOL, Tier::Host) };
        let fits = |p: &Policy| {
            let pools = pool_specs(p, self.request.model, workload, self.request.profile);
            pools[pool].resident_bytes() + in_flight_bytes <= pools[pool].capacity_bytes
        };
        let mut out = policy.clone();
        let split = out.compute_host_layers_on_host;
        let groups: &[fn(&mut Policy) -> &mut TierCounts] = if self.unified() {
            &[|p| &mut p.kv_cache]
        } else {
            &[|p| &mut p.kv_cache, |p| &mut p.attention_weights, |p| &mut p.mlp_weights]
        };
        for group in groups {
            // The most layers of this group the host takes: its resident set grows with
            // each, so a bisection over the count finds it.
            let (mut low, mut high) = (0, group(&mut out).disk);
            while low < high {
                let mid = (low + high).div_ceil(2);
                let mut trial = out.clone();
                let counts = group(&mut trial);
                counts.disk -= mid;
                *tier_slot(counts, tier) += mid;
                if split {
                    trial.kv_cache = trial.attention_weights;
                }
                if fits(&trial) {
                    low = mid;
                } else {
                    high = mid - 1;
                }
            }
            let counts = group(&mut out);
            counts.disk -= low;
            *tier_slot(counts, tier) += low;
        }
        if split {
            out.kv_cache = out.attention_weights;
        }
        (out != *policy).then_some(out)
    }
}

impl Searcher<'_> {
    /// On unified memory, `policy` with every disk-tier KV layer on the device, paid for
    /// with the fewest device attention layers moved to the disk for the room beside
    /// what the simulated plan held in flight, and with one and two layers more (the
    /// room a layer more leaves the stream can pay for its bytes: at batch 4, three
    /// layers simulated 1.2 % slower than the plan and four 0.4 % faster). Empty where
    /// nothing of the cache is on disk, no attention layer is on the device, or even
    /// all of them would not make the room. The streamed attention layers' buffers are
    /// left to the simulation, which refuses a plan that cannot run in its memory.
    ///
    /// The trade `promoted` cannot make: at batch 8 a layer's cache is ~0.8 MB and an
    /// attention layer of a 4-bit 1B model ~5 MB, so a few streamed attention layers
    /// hold every layer's cache; each disk-tier cache layer otherwise waits every step
    /// on a small read behind the weight stream's large ones and on a small write.
    pub(super) fn kv_for_attention(&self, policy: &Policy, workload: &Workload, in_flight_bytes: u64) -> Vec<Policy> {
        if !self.unified() || policy.kv_cache.disk == 0 || policy.attention_weights.device == 0 {
            return Vec::new();
        }
        let traded = |moved: u64| {
            let mut trial = policy.clone();
            trial.attention_weights.device -= moved;
            trial.attention_weights.disk += moved;
            trial.kv_cache.device += trial.kv_cache.disk;
            trial.kv_cache.disk = 0;
            trial
        };
        let fits = |moved: u64| {
            let pools = pool_specs(&traded(moved), self.request.model, workload, self.request.profile);
            pools[DEVICE_POOL].resident_bytes() + in_flight_bytes <= pools[DEVICE_POOL].capacity_bytes
        };
        // The resident set shrinks with each layer moved, so a bisection finds the fewest.
        let (mut low, mut high) = (1, policy.attention_weights.device);
        if !fits(high) {
            return Vec::new();
        }
        while low < high {
            let mid = (low + high) / 2;
            if fits(mid) {
                high = mid;
            } else {
                low = mid + 1;
            }
        }
        (low..=(low + 2).min(policy.attention_weights.device)).map(traded).collect()
    }
}

/// The count of layers `counts` places on `tier`.
fn tier_slot(counts: &mut TierCounts, tier: Tier) -> &mut u64 {
    match tier {
        Tier::Device => &mut counts.device,
        Tier::Host => &mut counts.host,
        Tier::Disk => &mut counts.disk,
    }
}

/// Moves one layer from `from` to `to`; false if none is left on `from`.
fn shift(counts: &mut TierCounts, from: Tier, to: Tier) -> bool {
    if *tier_slot(counts, from) == 0 {
        return false;
    }
    *tier_slot(counts, from) -= 1;
    *tier_slot(counts, to) += 1;
    true
}

/// Fractions to whole layers as `round_counts` does for the device, the disk rounded
/// down and the host taking the rest.
fn round_counts_disk_down(fractions: [f64; 3], layers: u64) -> TierCounts {
    let rounded = round_counts(fractions, layers);
    let disk = ((fractions[2] * layers as f64) + 1e-6).floor().min(rounded.disk as f64) as u64;
    TierCounts { device: rounded.device, host: layers - rounded.device - disk, disk }
}

/// Fractions (device, host, disk) to whole layers: device rounded down (so the LP's
/// memory bound still holds), host to nearest, disk the rest. A fraction within 1e-6
/// of 1 counts as whole, so a model that fits stays entirely on the device.
fn round_counts(fractions: [f64; 3], layers: u64) -> TierCounts {
    let l = layers as f64;
    let device = ((fractions[0] * l) + 1e-6).floor().min(l) as u64;
    let host = ((fractions[1] * l).round() as u64).min(layers - device);
    TierCounts { device, host, disk: layers - device - host }
}
