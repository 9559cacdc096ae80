//! Turning names into things: a `HardwareRef` into a `Profile`, a plan's model name
//! into a `ModelSpec`. Notes (alias resolutions, overrides) are returned for the CLI
//! to show.

use std::path::Path;

use crate::catalog::Catalog;
use crate::error::{CoreError, Result};
use crate::hardware::Hardware;
use crate::model::{ModelSpec, WeightFormat, WeightFormats};
use crate::plan::{HardwareRef, Plan};
use crate::profile::Profile;

/// A plan with its names resolved.
#[derive(Debug, Clone)]
pub struct ResolvedPlan {
    pub plan: Plan,
    pub model: ModelSpec,
    pub profile: Profile,
    pub notes: Vec<String>,
}

/// Builds the profile a hardware reference names. Relative profile paths are taken
/// relative to `base_dir` (the plan file's folder).
pub fn resolve_hardware(catalog: &Catalog, hardware: &HardwareRef, base_dir: &Path) -> Result<(Profile, Vec<String>)> {
    let mut notes = Vec::new();
    if hardware.cluster.is_some() || hardware.gpu.as_deref().is_some_and(|g| g.contains(',')) {
        return resolve_cluster(catalog, hardware, &mut notes).map(|profile| (profile, notes));
    }
    if hardware.link.is_some() {
        return Err(CoreError::invalid(
            "a link joins several devices: name them (--gpu rtx3060,jetson-agx-orin-64gb --link 1gbe) or a cluster",
        ));
    }
    let mut profile = match (&hardware.profile, &hardware.gpu) {
        (Some(_), Some(_)) => {
            return Err(CoreError::invalid("give either a GPU name or a profile file, not both"));
        }
        (Some(path), None) => {
            if hardware.disk.is_some() {
                return Err(CoreError::invalid(
                    "--disk applies to catalog hardware; a measured profile has its own disk figures",
                ));
            }
            let path = base_dir.join(path);
            let profile: Profile = crate::yaml::read_file(&path)?;
            profile.validate().map_err(|e| CoreError::invalid(format!("{}: {e}", path.display())))?;
            profile
        }
        (None, Some(gpu_name)) => {
            let gpu = catalog.gpu(gpu_name)?;
            notes.extend(gpu.note);
            let host_name = hardware.host.clone().unwrap_or_else(|| gpu.value.default_host.clone());
            if hardware.host.is_none() {
                notes.push(format!(
                    "host preset '{host_name}' (the usual host for {}; change it with --host)",
                    gpu.value.name
                ));
            }
            let host = catalog.host(&host_name)?;
            notes.extend(host.note);
            let mut host = host.value;
            let mut capacity = None;
            if let Some(disk_name) = &hardware.disk {
                let disk = catalog.disk(disk_name)?.value;
                host = host.with_disk(&disk);
                capacity = Some(disk.capacity_bytes);
            }
            let mut profile = Profile::from_datasheet(&Hardware { gpu: gpu.value, host });
            profile.disk_capacity_bytes = capacity;
            profile
        }
        (None, None) => {
            return Err(CoreError::invalid(
                "hardware: name a GPU (gpu: rtx3060) or a profile file (profile: profile.yaml)",
            ))
        }
    };
    let device_has_bytes = profile.device_memory_bytes;
    if let Some(bytes) = hardware.device_memory {
        profile.device_memory_bytes = bytes;
        // A profile of several devices (`ferry profile --as-nodes`): each one's budget.
        for slot in &mut profile.devices {
            slot.memory_bytes = bytes;
        }
    }
    if profile.devices.len() > 1 && !hardware.devices.is_empty() {
        // The profile places its devices on its machines: the plan sets their memory only.
        if hardware.devices.len() != profile.devices.len() {
            return Err(CoreError::invalid(format!(
                "hardware: the profile describes {} devices but `devices` lists {}; give each its memory, in order",
                profile.devices.len(),
                hardware.devices.len()
            )));
        }
        for (slot, given) in profile.devices.iter_mut().zip(&hardware.devices) {
            slot.memory_bytes = given.memory.unwrap_or(slot.memory_bytes);
        }
    } else if !hardware.devices.is_empty() {
        // Several devices of the profile's kind, each with its own memory.
        profile.devices = hardware
            .devices
            .iter()
            .map(|d| crate::topology::DeviceSlot {
                host: 0,
                memory_bytes: d.memory.unwrap_or(profile.device_memory_bytes),
                profile: None,
            })
            .collect();
    }
    if let Some(bytes) = hardware.host_memory {
        if bytes > profile.host_memory_bytes {
            let fmt = crate::units::format_bytes;
            notes.push(format!(
                "host memory {} is more than the host's {}; planning with it as given (a plan for memory the \
                 machine lacks runs out of it)",
                fmt(bytes),
                fmt(profile.host_memory_bytes)
            ));
        }
        profile.host_memory_bytes = bytes;
        profile.max_pinned_bytes = profile.max_pinned_bytes.min(bytes);
    }
    let zero = |bytes: Option<u64>| bytes == Some(0);
    if zero(hardware.device_memory) || zero(hardware.host_memory) || hardware.devices.iter().any(|d| zero(d.memory)) {
        return Err(CoreError::invalid(
            "hardware: device_memory, host_memory and every device's memory must be more than 0 bytes",
        ));
    }
    if let Some(bytes) = hardware.device_memory {
        notes.extend(memory_beyond_hardware(&profile, bytes, device_has_bytes));
    }
    // The overrides above change figures of a checked profile: check them again, so
    // every command that resolves a plan (simulate, run, export, tune) refuses alike.
    profile.validate()?;
    Ok((profile, notes))
}

/// A note when a device memory override is more than the hardware has: most likely a
/// typo (100GiB for 10GiB), but a card variant the catalog lacks can have more memory
/// than its namesake, so the plan takes the figure as given and says so. On unified
/// memory (the cpu device) the budget is RAM, bounded by the host's.
fn memory_beyond_hardware(profile: &Profile, bytes: u64, device_has_bytes: u64) -> Option<String> {
    let fmt = crate::units::format_bytes;
    let (has, what) = if profile.unified_memory {
        (profile.host_memory_bytes, format!("the host's {} of RAM", fmt(profile.host_memory_bytes)))
    } else {
        (device_has_bytes, format!("the {}'s {}", profile.device_name, fmt(device_has_bytes)))
    };
    (bytes > has).then(|| {
        format!(
            "device memory {} is more than {what}; planning with it as given (a plan for memory the machine \
             lacks runs out of it)",
            fmt(bytes)
        )
    })
}

/// The profile of a cluster: a catalog cluster (or file), or a list of GPUs with a link.
fn resolve_cluster(catalog: &Catalog, hardware: &HardwareRef, notes: &mut Vec<String>) -> Result<Profile> {
    if hardware.profile.is_some() || hardware.disk.is_some() || !hardware.devices.is_empty() {
        return Err(CoreError::invalid(
            "hardware: a cluster (or a list of GPUs) takes its devices, hosts and disks from the catalog; \
             drop profile, disk and devices",
        ));
    }
    if hardware.device_memory.is_some() || hardware.host_memory.is_some() {
        return Err(CoreError::invalid(
            "hardware: a device memory or host memory budget (--device-mem, --host-mem; `device_memory:`, \
             `host_memory:` in a plan) applies to one device; over several, a cluster file sets each node's memory \
             (configs/clusters/ in the source holds examples)",
        ));
    }
    let spec = match (&hardware.cluster, &hardware.gpu) {
        (Some(_), Some(_)) => return Err(CoreError::invalid("give either a cluster or GPU names, not both")),
        (Some(name), None) => {
            if hardware.link.is_some() || hardware.host.is_some() {
                return Err(CoreError::invalid("a cluster names its own hosts and links; drop host and link"));
            }
            let found = catalog.cluster(name)?;
            notes.extend(found.note);
            found.value
        }
        (None, Some(list)) => cluster_of_list(list, hardware)?,
        (None, None) => unreachable!("resolve_cluster is called with a cluster or a GPU list"),
    };
    let cluster = cluster_hardware(catalog, &spec, notes)?;
    Profile::from_cluster(&cluster)
}

/// `--gpu a,b[,…]`: with a host, one machine of these devices (the link, if any, joins
/// them directly); without, each on its own default host, joined by the link.
fn cluster_of_list(list: &str, hardware: &HardwareRef) -> Result<crate::hardware::ClusterSpec> {
    use crate::hardware::{ClusterNode, ClusterSpec, NodeDevices};
    let names: Vec<&str> = list.split(',').map(str::trim).collect();
    if names.iter().any(|n| n.is_empty()) {
        return Err(CoreError::invalid(format!("gpu: `{list}` has an empty name; separate GPU names with commas")));
    }
    let device = |gpu: &str| NodeDevices { gpu: gpu.to_string(), count: 1, memory: None };
    let (nodes, peer_link, node_link) = match &hardware.host {
        Some(host) => (
            vec![ClusterNode { host: host.clone(), devices: names.iter().map(|n| device(n)).collect() }],
            hardware.link.clone(),
            None,
        ),
        None => {
            let Some(link) = &hardware.link else {
                return Err(CoreError::invalid(format!(
                    "gpu: `{list}` names {} devices, each on its own machine: say how the machines are joined \
                     (--link 1gbe, 10gbe or wifi6), or put them in one machine with --host",
                    names.len()
                )));
            };
            // Each device on its own default host: the host is found once the GPU is.
            let nodes = names.iter().map(|n| ClusterNode { host: String::new(), devices: vec![device(n)] }).collect();
            (nodes, None, Some(link.clone()))
        }
    };
    Ok(ClusterSpec {
        name: names.join("+"),
        description: format!("{} joined by {}", names.join(", "), hardware.link.as_deref().unwrap_or("their host")),
        nodes,
        peer_link,
        node_link,
        source: "named on the command line".into(),
    })
}

/// A cluster's catalog names resolved: GPUs, hosts (a node without one takes its first
/// GPU's default host) and link presets.
pub fn cluster_hardware(
    catalog: &Catalog,
    spec: &crate::hardware::ClusterSpec,
    notes: &mut Vec<String>,
) -> Result<crate::machine::ClusterHardware> {
    use crate::machine::{ClusterHardware, NodeHardware};
    let in_cluster = |e: CoreError| CoreError::invalid(format!("cluster {}: {e}", spec.name));
    let mut nodes = Vec::new();
    for node in &spec.nodes {
        let mut devices = Vec::new();
        // Entries that set their memory, with their GPU: checked once the host is known.
        let mut overrides = Vec::new();
        for entry in &node.devices {
            let gpu = catalog.gpu(&entry.gpu).map_err(in_cluster)?;
            notes.extend(gpu.note);
            if entry.count == 0 || entry.memory == Some(0) {
                return Err(in_cluster(CoreError::invalid(format!(
                    "{}: count and memory must be more than 0",
                    entry.gpu
                ))));
            }
            if let Some(bytes) = entry.memory {
                overrides.push((gpu.value.clone(), bytes));
            }
            let memory = entry.memory.unwrap_or(gpu.value.memory_bytes);
            devices.extend(std::iter::repeat_n((gpu.value, memory), entry.count as usize));
        }
        let Some((first, _)) = devices.first() else {
            return Err(in_cluster(CoreError::invalid(format!("node on host `{}` lists no devices", node.host))));
        };
        let host_name = if node.host.is_empty() { first.default_host.clone() } else { node.host.clone() };
        let host = catalog.host(&host_name).map_err(in_cluster)?;
        notes.extend(host.note);
        notes.extend(
            overrides.iter().filter_map(|(gpu, bytes)| node_memory_beyond(&spec.name, gpu, &host.value, *bytes)),
        );
        nodes.push(NodeHardware { host: host.value, devices });
    }
    let link = |name: &Option<String>| -> Result<Option<crate::hardware::LinkSpec>> {
        name.as_deref().map(|n| catalog.link(n).map(|l| l.value).map_err(in_cluster)).transpose()
    };
    Ok(ClusterHardware {
        name: spec.name.clone(),
        nodes,
        peer_link: link(&spec.peer_link)?,
        node_link: link(&spec.node_link)?,
    })
}

/// A note when a cluster node's device memory is more than its GPU has (or, on
/// unified memory, than its host's RAM): as `memory_beyond_hardware` says for
/// `--device-mem`, taken as given.
fn node_memory_beyond(
    cluster: &str,
    gpu: &crate::hardware::GpuSpec,
    host: &crate::hardware::HostSpec,
    bytes: u64,
) -> Option<String> {
    let fmt = crate::units::format_bytes;
    let (has, what) = match gpu.interconnect {
        crate::hardware::Interconnect::Unified => {
            (host.ram_bytes, format!("host {}'s {} of RAM", host.name, fmt(host.ram_bytes)))
        }
        _ => (gpu.memory_bytes, format!("the {}'s {}", gpu.name, fmt(gpu.memory_bytes))),
    };
    (bytes > has).then(|| {
        format!(
            "cluster {cluster}: {} memory {} is more than {what}; planning with it as given (a plan for memory \
             the machine lacks runs out of it)",
            gpu.name,
            fmt(bytes)
        )
    })
}

pub fn resolve_model(catalog: &Catalog, name: &str, base_dir: &Path) -> Result<(ModelSpec, Vec<String>)> {
    let candidate = base_dir.join(name);
    let lookup = if candidate.exists() { candidate.display().to_string() } else { name.to_string() };
    let model = catalog.model(&lookup)?;
    Ok((model.value, model.note.into_iter().collect()))
}

/// Reads a plan file and resolves its model and hardware.
pub fn load_plan(catalog: &Catalog, path: &Path) -> Result<ResolvedPlan> {
    let plan: Plan = crate::yaml::read_file(path)?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    resolve_plan(catalog, plan, base_dir)
}

pub fn resolve_plan(catalog: &Catalog, plan: Plan, base_dir: &Path) -> Result<ResolvedPlan> {
    let (model, notes) = resolve_model(catalog, &plan.models.target, base_dir)?;
    resolve_plan_with_model(catalog, plan, model, notes, base_dir)
}

/// Resolves a plan's hardware and checks its policy for `model`, which stands for the
/// plan's own model name (a folder the user named for a run); `notes` are kept.
pub fn resolve_plan_with_model(
    catalog: &Catalog,
    plan: Plan,
    model: ModelSpec,
    mut notes: Vec<String>,
    base_dir: &Path,
) -> Result<ResolvedPlan> {
    let mut plan = plan;
    let mut model = model;
    resolve_draft(catalog, &mut plan, base_dir, &mut notes)?;
    if let Some(file) = &plan.models.routing {
        model.routing = Some(std::sync::Arc::new(load_routing(&base_dir.join(file), &model)?));
    }
    let (profile, hardware_notes) = resolve_hardware(catalog, &plan.hardware, base_dir)?;
    notes.extend(hardware_notes);
    plan.policy.validate(&model, &plan.workload, profile.unified_memory)?;
    check_devices(&plan.policy, &profile)?;
    notes.extend(weight_format_notes(&plan.policy.weight_format, &model, &profile));
    notes.extend(knobs_past_their_reach(&plan.policy, &model, &profile));
    Ok(ResolvedPlan { plan, model, profile, notes })
}

/// Notes for transfer knobs larger than anything they can act on: a prefetch deeper
/// than the model's layers, requests larger than the device's memory. The plan runs
/// as given (both are capped where they act), but a typo should not pass unsaid.
fn knobs_past_their_reach(policy: &crate::plan::Policy, model: &ModelSpec, profile: &Profile) -> Vec<String> {
    let fmt = crate::units::format_bytes;
    let mut notes = Vec::new();
    if policy.prefetch_depth > model.num_layers {
        notes.push(format!(
            "prefetch_depth {} is more than the model's {} layers: it prefetches {} at most",
            policy.prefetch_depth, model.num_layers, model.num_layers
        ));
    }
    let device = profile.device(policy.first_device()).memory_bytes;
    if policy.chunk_bytes > device {
        notes.push(format!(
            "chunk_bytes {} is more than the device's {} of memory: no transfer is that large, so it acts as the \
             largest one",
            fmt(policy.chunk_bytes),
            fmt(device)
        ));
    }
    notes
}

/// A measured routing file for `model` (`ExpertPopularity`), checked against its
/// layers and experts.
pub fn load_routing(path: &Path, model: &ModelSpec) -> Result<crate::model::ExpertPopularity> {
    if model.num_experts == 0 {
        // Said before reading the file: whatever it holds, it cannot apply.
        return Err(CoreError::invalid(format!(
            "routing {}: a measured routing is a mixture of experts' (`ferry run --routing-out`), but {} is a \
             dense model with no experts to route",
            path.display(),
            model.name
        )));
    }
    let routing: crate::model::ExpertPopularity = crate::yaml::read_file(path)?;
    routing
        .check(model.num_layers, model.num_experts, model.experts_per_token)
        .map_err(|e| CoreError::invalid(format!("{}: {e}", path.display())))?;
    Ok(routing)
}

/// Fills a speculative plan's separate draft (`models.draft`) into its speculation
/// section: a draft named without a speculation that uses it, or the reverse, is an
/// error saying which half is missing.
pub fn resolve_draft(catalog: &Catalog, plan: &mut Plan, base_dir: &Path, notes: &mut Vec<String>) -> Result<()> {
    use crate::plan::Draft;
    let wants = plan.policy.speculation.as_ref().map(|s| s.draft);
    match (&plan.models.draft, wants) {
        (None, Some(Draft::Model)) => Err(CoreError::invalid(
            "plan: the speculation's draft is a separate model but `models` names none (`models: {target: …, draft: …}`)",
        )),
        (Some(name), None | Some(Draft::SelfLayers { .. })) => Err(CoreError::invalid(format!(
            "plan: models.draft names {name} but the policy does not speculate with it; add `speculation: {{draft: \
             {{kind: model}}, draft_len: 4, acceptance_rate: …}}` to the policy, or remove the draft"
        ))),
        (Some(name), Some(Draft::Model)) => {
            let (draft, draft_notes) = resolve_model(catalog, name, base_dir)?;
            notes.extend(draft_notes.into_iter().map(|n| format!("draft: {n}")));
            if let Some(speculation) = plan.policy.speculation.as_mut() {
                speculation.draft_spec = Some(std::sync::Arc::new(draft));
            }
            Ok(())
        }
        (None, _) => Ok(()),
    }
}

/// What a prediction of weights stored in `formats` assumes about their dequantization:
/// for each quantized format the profile has no measured rate for, that it is taken as
/// fused into the matrix multiply at no extra cost (memory-bound at its real bytes);
/// where the profile has a kernel table but none of its entries timed a format, that the
/// format's tasks are priced by the roofline instead.
pub fn weight_format_notes(formats: &WeightFormats, model: &ModelSpec, profile: &Profile) -> Vec<String> {
    let quantized = formats.quantized_formats(model);
    let mut notes = formats.fallbacks(model);
    for format in &quantized {
        let name = format.name();
        let missing: Vec<&str> = [("device", &profile.device_compute), ("host", &profile.host_compute)]
            .into_iter()
            .filter(|(_, compute)| compute.dequant_rate(&name).is_none())
            .map(|(side, _)| side)
            .collect();
        if missing.is_empty() {
            continue;
        }
        let how = match (format, profile.device_name == "cpu") {
            (WeightFormat::Block(_), true) => "`ferry profile --backend cpu` measures it",
            (WeightFormat::Block(_), false) => "no GPU profile carries one yet",
            _ => "the engine has no decoder of it to measure yet",
        };
        notes.push(format!(
            "{name} weights: the profile has no dequantization rate for {name} on the {}, so it is priced as fused \
             into the matrix multiply (memory-bound at {name}'s real bytes), a lower bound on compute; {how}",
            missing.join(" or the ")
        ));
    }
    // A table measured over a format's own weights prices that format's tasks; a float
    // table leaves the others to the roofline.
    let tables = [&profile.device_compute.table, &profile.host_compute.table];
    let untimed: Vec<String> = quantized
        .iter()
        .map(|format| format.name())
        .filter(|name| tables.iter().all(|t| t.iter().all(|e| e.format.as_deref() != Some(name.as_str()))))
        .collect();
    if tables.iter().any(|t| !t.is_empty()) && !untimed.is_empty() {
        notes.push(format!(
            "the profile's kernel table did not time {} weights: those tasks are priced by the roofline at their \
             real bytes plus the dequantization instead (`ferry profile --model` with a file in that format times them)",
            untimed.join(", ")
        ));
    }
    notes
}

/// Every stage's device must exist on the machine.
pub fn check_devices(policy: &crate::plan::Policy, profile: &Profile) -> Result<()> {
    let count = profile.device_count();
    if policy.device_count() > count {
        return Err(CoreError::invalid(format!(
            "plan: a stage runs on device {} but the machine has {count} device(s); list the devices under \
             hardware.devices (e.g. `devices: [{{memory: 256MiB}}, {{memory: 256MiB}}]`)",
            policy.device_count() - 1
        )));
    }
    if policy.stages.len() > 1 {
        for (index, stage) in policy.stages.iter().enumerate() {
            let device = profile.device(stage.device);
            if !device.unified_memory {
                continue;
            }
            let first = index == 0;
            let last = index + 1 == policy.stages.len();
            let uses_host = stage.attention_weights.host + stage.mlp_weights.host + stage.kv_cache.host > 0
                || first && policy.embeddings == crate::plan::Tier::Host
                || last && policy.head == crate::plan::Tier::Host;
            if uses_host || policy.host_attention || policy.compute_host_layers_on_host {
                return Err(CoreError::invalid(format!(
                    "plan: stage {index} runs on device {} ({}), which shares memory with its host: place its \
                     things on device or disk only, without host attention",
                    stage.device, device.name
                )));
            }
        }
    }
    Ok(())
}
