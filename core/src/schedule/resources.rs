//! The pools and resources of a graph: one memory pool per place, one resource per
//! processor, link direction and disk, in a fixed order.

use super::{pool_capacity, Builder};
use crate::graph::{Place, PoolSpec, Resource, ResourceSpec};
use crate::model::WeightGroup;
use crate::plan::Tier;
use crate::profile::Profile;

impl Builder<'_> {
    pub(super) fn devices(&self) -> Vec<u16> {
        let mut devices: Vec<u16> = self.policy.stage_list().iter().map(|s| s.device).collect();
        devices.sort_unstable();
        devices.dedup();
        devices
    }

    /// The resources tasks run on, in a fixed order: the disk, each device's links to
    /// and from the host, the links between consecutive stages, each device's compute,
    /// the host's compute. One device gives exactly today's five.
    pub(super) fn resources(&self) -> Vec<ResourceSpec> {
        let policy = self.policy;
        let copy = |resource| ResourceSpec { resource, lanes: policy.copy_streams };
        let mut resources = vec![ResourceSpec { resource: Resource::DISK, lanes: policy.io_queue_depth }];
        let devices = self.devices();
        for &d in &devices {
            resources.push(copy(Resource::link(Place::HOST, Place::Device(d))));
            resources.push(copy(Resource::link(Place::Device(d), Place::HOST)));
        }
        for pair in policy.stage_list().windows(2) {
            resources.push(copy(Resource::link(Place::Device(pair[0].device), Place::Device(pair[1].device))));
        }
        for &d in &devices {
            resources.push(ResourceSpec { resource: Resource::compute(Place::Device(d)), lanes: 1 });
        }
        resources.push(ResourceSpec { resource: Resource::HOST_COMPUTE, lanes: 1 });
        // Every resource a task uses is one of these; `TaskGraph::validate` checks it.
        resources
    }

    /// Capacities and what stays resident in each pool for the whole run: one pool per
    /// stage device, then the host's.
    pub(super) fn pools(&self, profile: &Profile) -> Vec<PoolSpec> {
        let policy = self.policy;
        let model = self.model;
        let devices = self.devices();
        // Per device: resident bytes of each per-layer weight group, then of the KV cache.
        const KV: usize = WeightGroup::PER_LAYER.len();
        let mut on_device = vec![[0u64; KV + 1]; devices.len()];
        let mut host_weights = 0;
        let kv_per_layer = model.kv_bytes_per_token_per_layer(policy.kv_dtype)
            * self.workload.batch_size
            * policy.kv_positions(self.workload);
        for (layer, place) in self.placements.iter().enumerate() {
            let slot = devices.iter().position(|&d| d == place.device).unwrap_or(0);
            for (index, group) in WeightGroup::PER_LAYER.into_iter().enumerate() {
                match place.tier(group) {
                    Tier::Device => on_device[slot][index] += self.layout.bytes(group, layer as u64),
                    Tier::Host => host_weights += self.layout.bytes(group, layer as u64),
                    Tier::Disk => {}
                }
            }
            if place.kv == Tier::Device {
                on_device[slot][KV] += kv_per_layer;
            }
        }
        let hidden_states = self.workload.batch_size * self.workload.prompt_len * model.activation_bytes_per_token();
        let workspace = policy.micro_batch_size * self.workload.prompt_len * model.workspace_bytes_per_token()
            + model.attention_scratch_bytes(self.workload.prompt_len, policy.kv_positions(self.workload));
        let embeddings = self.layout.bytes(WeightGroup::Embeddings, 0);
        let head = self.layout.bytes(WeightGroup::Head, 0);
        let on = |tier: Tier, wanted: Tier, bytes: u64| if tier == wanted { bytes } else { 0 };
        let mut pools: Vec<PoolSpec> = devices
            .iter()
            .zip(&on_device)
            .map(|(&d, resident)| {
                let first = d == policy.first_device();
                let last = d == policy.last_device();
                PoolSpec {
                    pool: Place::Device(d),
                    capacity_bytes: pool_capacity(profile, Place::Device(d)),
                    resident: WeightGroup::PER_LAYER
                        .iter()
                        .zip(resident)
                        .map(|(group, &bytes)| (format!("resident {} weights", group.name()), bytes))
                        .chain([
                            (
                                "embeddings".into(),
                                if first { on(policy.embeddings, Tier::Device, embeddings) } else { 0 },
                            ),
                            ("head".into(), if last { on(policy.head, Tier::Device, head) } else { 0 }),
                            ("resident KV cache".into(), resident[KV]),
                            ("hidden states".into(), hidden_states),
                            ("workspace".into(), workspace),
                        ])
                        .chain(if first { self.draft_resident() } else { Vec::new() })
                        .collect(),
                }
            })
            .collect();
        let layers = model.num_layers;
        let host_computes = policy.compute_host_layers_on_host && (0..layers as u32).any(|l| self.on_host(l))
            || policy.host_attention && policy.kv_cache.device < layers
            || policy.embeddings == Tier::Host
            || policy.head == Tier::Host;
        let host_workspace = if host_computes && !self.unified { workspace + hidden_states } else { 0 };
        pools.push(PoolSpec {
            pool: Place::HOST,
            capacity_bytes: pool_capacity(profile, Place::HOST),
            resident: vec![
                ("host-resident weights".into(), host_weights),
                ("embeddings".into(), on(policy.embeddings, Tier::Host, embeddings)),
                ("head".into(), on(policy.head, Tier::Host, head)),
                ("host KV cache".into(), policy.kv_cache.host * kv_per_layer),
                ("host workspace".into(), host_workspace),
            ],
        });
        pools
    }
}
