//! A plan's stages as the machines that run them: what each target's per-node
//! commands are made from. A distributed engine takes one command per node (a
//! worker, a Ray member, a rank), so the stages are grouped by the host their device
//! sits on, in the order of the first stage on each.

use serde::Serialize;

use crate::model::ModelSpec;
use crate::plan::{Plan, Tier};
use crate::profile::Profile;

/// One stage: its device, where that device sits, and how its layers are placed.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct StageView {
    pub index: usize,
    /// The device's index in the machine.
    pub device: u16,
    /// The device's index among its host's devices (`CUDA1`, `cuda:1` on that node).
    pub local_device: u16,
    pub host: u16,
    pub device_name: String,
    pub host_name: String,
    /// The device is a host CPU with a RAM budget (`gpu: cpu`), not an accelerator.
    pub cpu: bool,
    pub first_layer: u64,
    pub layers: u64,
    /// Layers whose attention and MLP weights both stay on the device.
    pub device_layers: u64,
    /// Layers with a weight group on disk.
    pub disk_layers: u64,
    /// Layers whose KV cache is kept off the device.
    pub offloaded_kv_layers: u64,
    /// Weight bytes of the stage's layers kept off the device.
    pub offloaded_weight_bytes: u64,
}

impl StageView {
    pub fn last_layer(&self) -> u64 {
        self.first_layer + self.layers - 1
    }

    /// "stage 1 (layers 16–31 on rtx3060, desktop)".
    pub fn describe(&self) -> String {
        format!(
            "stage {} (layers {}–{} on {}, node {})",
            self.index,
            self.first_layer,
            self.last_layer(),
            self.device_name,
            self.host
        )
    }
}

/// One machine of the plan and the stages on it, in pipeline order.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct NodeView {
    pub host: u16,
    pub host_name: String,
    pub stages: Vec<StageView>,
}

/// What one node runs, for the JSON form of an export.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeCommand {
    /// The node's host index in the machine (0 is the first node of the cluster).
    pub node: u16,
    /// The node's host preset.
    pub host: String,
    /// "head" (where requests enter, started last) or "worker".
    pub role: &'static str,
    /// Shell lines for that node, with `NODE<n>_ADDR` standing for the addresses.
    pub commands: String,
}

/// Every stage of `plan` (one for a plan without stages).
pub(super) fn stages(plan: &Plan, model: &ModelSpec, profile: &Profile) -> Vec<StageView> {
    let layout = crate::model::WeightLayout::of(model, &plan.policy.weight_format);
    let placements = plan.policy.layer_placements(model.num_layers);
    let mut out: Vec<StageView> = Vec::new();
    for (layer, place) in placements.iter().enumerate() {
        let layer = layer as u64;
        if out.last().is_none_or(|s| s.index != place.stage as usize) {
            let device = profile.device(place.device);
            let host = profile.host(device.host);
            let local_device = (0..place.device)
                .filter(|&d| profile.host_of(crate::topology::Place::Device(d)) == device.host)
                .count();
            out.push(StageView {
                index: place.stage as usize,
                device: place.device,
                local_device: local_device as u16,
                host: device.host,
                device_name: device.name.to_string(),
                host_name: host.name.to_string(),
                cpu: device.name == "cpu",
                first_layer: layer,
                layers: 0,
                device_layers: 0,
                disk_layers: 0,
                offloaded_kv_layers: 0,
                offloaded_weight_bytes: 0,
            });
        }
        let stage = out.last_mut().expect("pushed above");
        stage.layers += 1;
        if place.attention == Tier::Device && place.mlp == Tier::Device {
            stage.device_layers += 1;
        }
        if place.attention == Tier::Disk || place.mlp == Tier::Disk {
            stage.disk_layers += 1;
        }
        if place.kv != Tier::Device {
            stage.offloaded_kv_layers += 1;
        }
        for group in crate::model::WeightGroup::PER_LAYER {
            if place.tier(group) != Tier::Device {
                stage.offloaded_weight_bytes += layout.bytes(group, layer);
            }
        }
    }
    out
}

/// The stages grouped by node, nodes in the order their first stage comes.
pub(super) fn nodes(stages: &[StageView]) -> Vec<NodeView> {
    let mut out: Vec<NodeView> = Vec::new();
    for stage in stages {
        match out.iter_mut().find(|n| n.host == stage.host) {
            Some(node) => node.stages.push(stage.clone()),
            None => {
                out.push(NodeView { host: stage.host, host_name: stage.host_name.clone(), stages: vec![stage.clone()] })
            }
        }
    }
    out
}

/// The placeholder a command uses for a node's address.
pub(super) fn address(host: u16) -> String {
    format!("NODE{host}_ADDR")
}

/// Whether the pipeline leaves a node and comes back to it (stages of one node not
/// contiguous): engines that give each node one contiguous range cannot follow it.
pub(super) fn revisits_a_node(stages: &[StageView]) -> bool {
    let mut seen: Vec<u16> = Vec::new();
    for (i, stage) in stages.iter().enumerate() {
        if i > 0 && stages[i - 1].host == stage.host {
            continue;
        }
        if seen.contains(&stage.host) {
            return true;
        }
        seen.push(stage.host);
    }
    false
}

/// The settings text of per-node commands: one commented section per node, workers
/// first (they must listen before the head connects), the head last.
pub(super) fn script(nodes: &[NodeCommand]) -> String {
    let mut sections = Vec::new();
    for node in nodes.iter().filter(|n| n.role == "worker").chain(nodes.iter().filter(|n| n.role == "head")) {
        sections.push(format!("# node {} ({}), {}:\n{}", node.node, node.host, node.role, node.commands));
    }
    sections.join("\n\n")
}
