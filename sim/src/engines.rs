//! The engines Ferry exports to, each as a small model of how it would run a plan's
//! exported settings: where each layer computes, which copies are pinned, what
//! overlaps. A model turns a plan's policy into the policy that engine effectively
//! runs, so the simulator prices it (`ferry export` prints the speed), or says why it
//! cannot.
//!
//! - **llama.cpp** (`-ngl`, `-ot`): a layer whose attention and MLP are both on the
//!   device runs there beside its KV cache; every other layer sits in host RAM and is
//!   computed by the CPU beside its KV cache (mmap has no disk tier of its own: a
//!   disk-placed layer is priced in RAM, and the export says so). One pass, no
//!   prefetch (`tune::llama_cpp_policy`, which the tuner's baseline and `ferry check`
//!   use too). A layer split between device and host is priced wholly on the CPU: a
//!   lower bound, since llama.cpp keeps its device tensors on the GPU.
//! - **vLLM** (`--cpu-offload-gb`): off-device weights held in pinned host RAM and
//!   copied in whole as each layer runs (the copy is not overlapped), the KV cache all
//!   on the device, no disk tier, no host compute.
//! - **Accelerate** (`device_map`): the plan's placement, each module's weights copied
//!   from pageable host memory (or read from the offload folder) just before it runs,
//!   no overlap, the KV cache on the device.
//! - **FlexGen**: the plan on FlexGen's zig-zag block schedule with one layer
//!   prefetched, pinned weights, one copy stream, whole tensors (`KnobSpace::flexgen`).
//! - **prima.cpp**: not modelled.

use ferry_core::export::Engine;
use ferry_core::model::ModelSpec;
use ferry_core::plan::{Policy, Schedule, Tier, TierCounts};
use ferry_core::profile::Profile;
use ferry_core::units::MIB;

use crate::tune::{llama_cpp_policy, BatchChoice, KnobSpace, Objective, TuneRequest};

/// What an engine's own implementation costs beyond the work of the plan it runs,
/// where its code says so (each figure with the line it comes from). Ferry's engine
/// adds only what its profile measured of it (the scheduler's hand-over).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineCosts {
    /// Bytes an attention over a host-resident KV cache moves per byte of the cache.
    host_attention_bytes_per_cache_byte: f64,
    /// Whether each compute task waits the profile's `handoff_ns` for Ferry's
    /// scheduler to dispatch it: a measured profile times Ferry's engine, not
    /// another engine's scheduler.
    pays_ferry_handoff: bool,
}

impl EngineCosts {
    /// The costs of `engine` (`None`: Ferry's own engine).
    pub fn of(engine: Option<Engine>) -> EngineCosts {
        match engine {
            // FlexGen's attention over a CPU cache (flexgen/pytorch_backend.py,
            // `mha_gen`, commit 19753bc) converts the fp16 cache to f32 first
            // (`k, v = k.float(), v.float()`) and the batched products read the copy:
            // 2 bytes read, 4 written and 4 read again per cached value, at least five
            // times one pass over the cache.
            Some(Engine::Flexgen) => {
                EngineCosts { host_attention_bytes_per_cache_byte: 5.0, pays_ferry_handoff: false }
            }
            Some(_) => EngineCosts { host_attention_bytes_per_cache_byte: 1.0, pays_ferry_handoff: false },
            None => EngineCosts { host_attention_bytes_per_cache_byte: 1.0, pays_ferry_handoff: true },
        }
    }

    /// The wait before each compute task on a processor whose hand-over is `handoff_ns`.
    pub fn handoff_ns(&self, handoff_ns: u64) -> f64 {
        if self.pays_ferry_handoff {
            handoff_ns as f64
        } else {
            0.0
        }
    }

    /// Whether attention over a host cache costs what Ferry's engine makes it cost.
    pub fn host_attention_as_ferry(&self) -> bool {
        self.host_attention_bytes_per_cache_byte == 1.0
    }

    /// The bytes an attention reading `cache_bytes` of a host cache moves.
    pub fn host_attention_bytes(&self, cache_bytes: u64) -> f64 {
        cache_bytes as f64 * self.host_attention_bytes_per_cache_byte
    }
}

/// How an engine would run a plan, as a policy the simulator prices.
#[derive(Debug, Clone)]
pub enum EngineRun {
    /// The policy it runs, and what the model had to approximate (empty: nothing).
    Priced { policy: Box<Policy>, approximations: Vec<String> },
    /// Why the model cannot price it.
    NotModelled(String),
}

/// The policy `engine` runs for `policy`'s exported settings (see the module docs).
pub fn as_run_by(engine: Engine, policy: &Policy, model: &ModelSpec, profile: &Profile, batch: u64) -> EngineRun {
    if policy.stages.len() > 1 {
        return EngineRun::NotModelled("a plan over several stages".into());
    }
    if policy.speculation.is_some() {
        return EngineRun::NotModelled("speculative decoding".into());
    }
    let mut approximations = Vec::new();
    let mut run = policy.clone();
    // Every engine but FlexGen batches the sequences together, in one pass per layer.
    if engine != Engine::Flexgen {
        (run.micro_batch_size, run.num_micro_batches) = (batch, 1);
    }
    let layers = model.num_layers;
    let device_resident = || TierCounts::all(Tier::Device, layers);
    match engine {
        Engine::LlamaCpp => return llama_cpp(policy, model, profile, batch),
        Engine::Vllm => {
            if profile.unified_memory {
                return EngineRun::NotModelled("vLLM's CPU backend".into());
            }
            for counts in [&mut run.attention_weights, &mut run.mlp_weights] {
                if counts.disk > 0 {
                    approximations.push(format!("{} disk-placed layers held in host RAM", counts.disk));
                }
                (counts.host, counts.disk) = (counts.host + counts.disk, 0);
            }
            run.kv_cache = device_resident();
            (run.host_attention, run.compute_host_layers_on_host) = (false, false);
            set_knobs(&mut run, Schedule::Sequential, 0, profile.max_pinned_bytes);
        }
        Engine::Accelerate => {
            run.kv_cache = device_resident();
            (run.host_attention, run.compute_host_layers_on_host) = (false, false);
            set_knobs(&mut run, Schedule::Sequential, 0, 0);
        }
        Engine::Flexgen => {
            let space = KnobSpace::flexgen();
            set_knobs(&mut run, space.schedules[0], space.prefetch_depths[0], profile.max_pinned_bytes);
            run.chunk_bytes = space.chunk_bytes[0];
        }
        Engine::PrimaCpp => return EngineRun::NotModelled("prima.cpp".into()),
    }
    EngineRun::Priced { policy: Box::new(run), approximations }
}

/// One pass per layer with no prefetch, or FlexGen's: whole-tensor copies on one
/// stream, one request at a time, pinned up to `pinned_host_bytes`.
fn set_knobs(policy: &mut Policy, schedule: Schedule, prefetch_depth: u64, pinned_host_bytes: u64) {
    policy.schedule = schedule;
    policy.prefetch_depth = prefetch_depth;
    policy.pinned_host_bytes = pinned_host_bytes;
    policy.chunk_bytes = 256 * MIB;
    policy.copy_streams = 1;
    policy.io_queue_depth = 1;
}

/// llama.cpp's run: the layers whole on the device stay there, the rest compute on
/// the CPU (see the module docs).
fn llama_cpp(policy: &Policy, model: &ModelSpec, profile: &Profile, batch: u64) -> EngineRun {
    let placements = policy.layer_placements(model.num_layers);
    let whole = |tier: Tier| placements.iter().filter(|p| p.attention == tier && p.mlp == tier).count() as u64;
    let on_device = whole(Tier::Device);
    let split = model.num_layers - on_device - whole(Tier::Host) - whole(Tier::Disk);
    let on_disk = placements.iter().filter(|p| p.attention == Tier::Disk || p.mlp == Tier::Disk).count();
    let mut approximations = Vec::new();
    if split > 0 {
        approximations.push(format!(
            "{split} layers split between the device and the host priced wholly on the CPU (a lower bound)"
        ));
    }
    if on_disk > 0 && !profile.unified_memory {
        approximations.push(format!("{on_disk} disk-placed layers priced in RAM (llama.cpp maps the file)"));
    }
    let request = TuneRequest {
        model,
        profile,
        prompt_len: 1,
        gen_len: 1,
        batch: BatchChoice::Fixed(batch),
        objective: Objective::Throughput,
        weight_format: policy.weight_format.clone(),
        kv_dtype: policy.kv_dtype,
        speculation: None,
    };
    // -ngl counts the output layer as one more when every layer is on the device.
    let ngl = on_device + u64::from(on_device == model.num_layers && policy.head == Tier::Device);
    EngineRun::Priced { policy: Box::new(llama_cpp_policy(&request, ngl)), approximations }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::catalog::Catalog;
    use ferry_core::hardware::Hardware;
    use ferry_core::model::Dtype;

    fn setup() -> (ModelSpec, Profile, Policy) {
        let catalog = Catalog::builtin().unwrap();
        let model = catalog.model("llama-2-13b").unwrap().value;
        let hardware = Hardware {
            gpu: catalog.gpu("rtx3060-12gb").unwrap().value,
            host: catalog.host("desktop-pcie4").unwrap().value,
        };
        let mut policy = Policy::all_on_device(model.num_layers, 1, Dtype::F16);
        policy.schedule = Schedule::Pipelined;
        policy.prefetch_depth = 2;
        policy.num_micro_batches = 2;
        policy.attention_weights = TierCounts { device: 30, host: 6, disk: 4 };
        policy.mlp_weights = TierCounts { device: 20, host: 16, disk: 4 };
        policy.kv_cache = TierCounts { device: 0, host: 40, disk: 0 };
        policy.host_attention = true;
        (model, Profile::from_datasheet(&hardware), policy)
    }

    #[test]
    fn each_engine_runs_the_plan_its_own_way() {
        let (model, profile, policy) = setup();
        let priced = |engine| match as_run_by(engine, &policy, &model, &profile, 8) {
            EngineRun::Priced { policy, approximations } => (*policy, approximations),
            EngineRun::NotModelled(why) => panic!("{why}"),
        };
        let (llama, notes) = priced(Engine::LlamaCpp);
        // The 20 layers whole on the device stay; the rest, split or not, go to the CPU.
        assert_eq!(llama.attention_weights, TierCounts { device: 20, host: 20, disk: 0 });
        assert_eq!((llama.mlp_weights, llama.kv_cache), (llama.attention_weights, llama.attention_weights));
        assert!(llama.compute_host_layers_on_host);
        let says = |what: &str| notes.iter().any(|n| n.contains(what));
        assert!(says("layers split between the device and the host") && says("disk-placed layers"), "{notes:?}");
        let (vllm, notes) = priced(Engine::Vllm);
        assert_eq!((vllm.mlp_weights.host, vllm.mlp_weights.disk), (20, 0));
        assert_eq!(vllm.kv_cache.device, 40);
        assert!(!vllm.host_attention && vllm.prefetch_depth == 0 && vllm.pinned_host_bytes > 0);
        assert_eq!((vllm.micro_batch_size, vllm.num_micro_batches), (8, 1));
        assert_eq!(notes.len(), 2);
        let (accelerate, notes) = priced(Engine::Accelerate);
        assert_eq!(accelerate.mlp_weights, policy.mlp_weights);
        assert_eq!((accelerate.schedule, accelerate.pinned_host_bytes), (Schedule::Sequential, 0));
        assert!(notes.is_empty());
        let (flexgen, _) = priced(Engine::Flexgen);
        assert_eq!((flexgen.schedule, flexgen.prefetch_depth), (Schedule::ZigzagBlock, 1));
        assert_eq!(flexgen.num_micro_batches, 2, "FlexGen keeps its GPU batches");
        assert!(matches!(as_run_by(Engine::PrimaCpp, &policy, &model, &profile, 8), EngineRun::NotModelled(_)));
    }

    #[test]
    fn flexgen_pays_for_converting_a_host_cache_and_nothing_else() {
        use crate::cost::{CostModel, TaskCost};
        use ferry_core::plan::Workload;
        use ferry_core::schedule::{lower, Steps};
        let (model, profile, mut policy) = setup();
        policy.schedule = Schedule::ZigzagBlock;
        let workload = Workload { batch_size: 2, prompt_len: 256, gen_len: 4 };
        let graph = lower(&policy, &model, &workload, &profile, &Steps::All).unwrap();
        let ferry = CostModel::for_policy(&profile, &model, &policy);
        let flexgen = CostModel::for_policy(&profile, &model, &policy).run_by(Some(Engine::Flexgen));
        let host = profile.host(0).compute;
        let nominal = |cost: &CostModel, task| match cost.task_cost(task) {
            TaskCost::Compute { nominal_ns } => nominal_ns,
            TaskCost::Transfer { work_bytes, .. } => work_bytes,
        };
        let (mut host_cores, mut slower) = (0, 0);
        for task in &graph.tasks {
            let (ours, theirs) = (nominal(&ferry, task), nominal(&flexgen, task));
            let host_core =
                matches!(task.payload, ferry_core::graph::Payload::Compute { op: ferry_core::graph::Op::AttnCore, .. })
                    && task.resource == ferry_core::graph::Resource::Compute { at: ferry_core::graph::Place::Host(0) };
            if !host_core {
                assert_eq!(ours, theirs, "{:?}", task.payload);
                continue;
            }
            host_cores += 1;
            // The roofline with five passes' worth of bytes over the cache.
            let pass_ns = task.bytes as f64 / (host.memory_bytes_per_s * host.memory_efficiency) * 1e9;
            let flops_ns = task.flops as f64 / host.flops_per_s() * 1e9;
            let expected = host.task_overhead_ns as f64 + flops_ns.max(5.0 * pass_ns);
            assert!((theirs - expected).abs() <= 1e-6 * theirs, "{theirs} against {expected}");
            assert!(theirs >= ours, "{theirs} against {ours}");
            slower += usize::from(theirs > 1.5 * ours);
        }
        assert!(host_cores > 0, "the plan computes attention on the host");
        assert!(slower > 0, "decoding's attention over the cache is memory-bound: FlexGen's is slower");
        for engine in [None, Some(Engine::Accelerate), Some(Engine::LlamaCpp), Some(Engine::Vllm)] {
            assert!(EngineCosts::of(engine).host_attention_as_ferry(), "{engine:?}");
        }
    }
}
