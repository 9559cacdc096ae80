//! The pools and resources of a graph: one memory pool per place, one resource per
//! processor, link direction and disk, in a fixed order.

use super::{pool_capacity, Builder};
use crate::graph::{Place, PoolSpec, Resource, ResourceSpec};
use crate::model::WeightGroup;
use crate::plan::Tier;

impl Builder<'_> {
    pub(super) fn devices(&self) -> Vec<u16> {
        let mut devices: Vec<u16> = self.policy.stage_list().iter().map(|s| s.device).collect();
        devices.sort_unstable();
        devices.dedup();
        devices
    }

    /// The hosts of the stage devices, ascending (host 0 alone on one machine).
    pub(super) fn hosts(&self) -> Vec<u16> {
        let mut hosts: Vec<u16> = self.devices().iter().map(|&d| self.profile.host_of(Place::Device(d))).collect();
        hosts.sort_unstable();
        hosts.dedup();
        hosts
    }

    /// The resources tasks run on, in a fixed order: each host's disk, each device's
    /// links to and from its host, the links between consecutive stages, each device's
    /// compute, each host's compute. One device gives exactly today's five.
    pub(super) fn resources(&self) -> Vec<ResourceSpec> {
        let policy = self.policy;
        let copy = |resource| ResourceSpec { resource, lanes: policy.copy_streams };
        let hosts = self.hosts();
        let mut resources: Vec<ResourceSpec> = hosts
            .iter()
            .map(|&host| ResourceSpec { resource: Resource::Disk { host }, lanes: policy.io_queue_depth })
            .collect();
        let devices = self.devices();
        for &d in &devices {
            let host = Place::Host(self.profile.host_of(Place::Device(d)));
            resources.push(copy(Resource::link(host, Place::Device(d))));
            resources.push(copy(Resource::link(Place::Device(d), host)));
        }
        for pair in policy.stage_list().windows(2) {
            resources.push(copy(Resource::link(Place::Device(pair[0].device), Place::Device(pair[1].device))));
        }
        for &d in &devices {
            resources.push(ResourceSpec { resource: Resource::compute(Place::Device(d)), lanes: 1 });
        }
        for &host in &hosts {
            resources.push(ResourceSpec { resource: Resource::compute(Place::Host(host)), lanes: 1 });
        }
        // Every resource a task uses is one of these; `TaskGraph::validate` checks it.
        resources
    }

    /// Capacities and what stays resident in each pool for the whole run: one pool per
    /// stage device, then one per host.
    pub(super) fn pools(&self) -> Vec<PoolSpec> {
        let policy = self.policy;
        let model = self.model;
        let profile = self.profile;
        let devices = self.devices();
        let hosts = self.hosts();
        // Per device: resident bytes of each per-layer weight group, then of the KV
        // cache; per host: host-resident weights, then the host KV cache.
        const KV: usize = WeightGroup::PER_LAYER.len();
        let mut on_device = vec![[0u64; KV + 1]; devices.len()];
        let mut hot_experts = vec![0u64; devices.len()];
        let mut on_host = vec![[0u64; 2]; hosts.len()];
        let kv_per_layer = model.kv_bytes_per_token_per_layer(policy.kv_dtype)
            * self.workload.batch_size
            * policy.kv_positions(self.workload);
        for (layer, place) in self.placements.iter().enumerate() {
            let slot = devices.iter().position(|&d| d == place.device).unwrap_or(0);
            let host = profile.host_of(Place::Device(place.device));
            let host_slot = hosts.iter().position(|&h| h == host).unwrap_or(0);
            for (index, group) in WeightGroup::PER_LAYER.into_iter().enumerate() {
                match place.tier(group) {
                    Tier::Device => on_device[slot][index] += self.layout.bytes(group, layer as u64),
                    Tier::Host => on_host[host_slot][0] += self.layout.bytes(group, layer as u64),
                    Tier::Disk => {}
                }
            }
            hot_experts[slot] += self.hot_expert_bytes(layer as u32);
            match place.kv {
                Tier::Device => on_device[slot][KV] += kv_per_layer,
                Tier::Host => on_host[host_slot][1] += kv_per_layer,
                Tier::Disk => {}
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
            .zip(&hot_experts)
            .map(|((&d, resident), &hot)| {
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
                            ("hot experts".into(), hot),
                            ("hidden states".into(), hidden_states),
                            ("workspace".into(), workspace),
                        ])
                        .chain(if first { self.draft_resident() } else { Vec::new() })
                        .collect(),
                }
            })
            .collect();
        for (&host, resident) in hosts.iter().zip(&on_host) {
            let place = Place::Host(host);
            let first = self.end_host(true) == place;
            let last = self.end_host(false) == place;
            let layers_here = (0..self.placements.len() as u32).filter(|&l| self.host_of(l) == place);
            let unified = layers_here.clone().next().is_some_and(|l| self.unified(l));
            // Embeddings read from disk are looked up where the reads land: here unless unified.
            let embeds_here = policy.embeddings == Tier::Host || policy.embeddings == Tier::Disk && !unified;
            let host_computes = layers_here.clone().any(|l| {
                WeightGroup::PER_LAYER.iter().any(|&g| self.on_host(g, l))
                    || policy.host_attention && self.kv_tier(l) != Tier::Device && !self.unified(l)
            }) || first && embeds_here
                || last && policy.head == Tier::Host;
            let host_workspace = if host_computes && !unified { workspace + hidden_states } else { 0 };
            pools.push(PoolSpec {
                pool: place,
                capacity_bytes: pool_capacity(profile, place),
                resident: vec![
                    ("host-resident weights".into(), resident[0]),
                    ("embeddings".into(), if first { on(policy.embeddings, Tier::Host, embeddings) } else { 0 }),
                    ("head".into(), if last { on(policy.head, Tier::Host, head) } else { 0 }),
                    ("host KV cache".into(), resident[1]),
                    ("host workspace".into(), host_workspace),
                ],
            });
        }
        pools
    }
}
