//! The baselines the search is compared with, simulated on the same hardware:
//! Accelerate-like and llama.cpp-like greedy whole-layer placements, and FlexGen (the
//! search restricted to FlexGen's policy space).

use ferry_core::plan::{Policy, Schedule, Tier, TierCounts, Workload};
use ferry_core::schedule::pool_specs;
use ferry_core::units::MIB;

use super::lp::Fractions;
use super::search::{Class, Group, Member, Searcher};
use super::{tune, BatchChoice, Candidate, KnobSpace, TuneRequest};
use crate::predict::{predict, Extrapolation};

/// A baseline policy simulated on the same hardware, or why it cannot run there.
#[derive(Debug, Clone)]
pub struct Baseline {
    pub name: &'static str,
    pub description: &'static str,
    pub outcome: Result<Candidate, String>,
}

/// The baselines of the comparison, at `batch`: Accelerate-like (sequential, greedy
/// device-first whole layers, KV on the device, pageable copies), llama.cpp-like (as
/// many whole layers on the device as fit, the rest computed by the host where they
/// live), and FlexGen (its block schedule and LP placement, without chunk, prefetch or
/// stream knobs).
///
/// A baseline that cannot run at `batch` is tried at halved batches, so the
/// comparison still says what it reaches on this hardware (its candidate's workload
/// tells the batch it ran at).
pub fn baselines(request: &TuneRequest, batch: u64) -> Vec<Baseline> {
    let batches: Vec<u64> = std::iter::successors(Some(batch), |b| (*b > 1).then_some(b / 2)).collect();
    let first_fit = |run: &dyn Fn(u64) -> Result<Candidate, String>| -> Result<Candidate, String> {
        let mut first_error = None;
        for &b in &batches {
            match run(b) {
                Ok(c) => return Ok(c),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_default())
    };
    let greedy = |host_compute: bool| {
        first_fit(&|b: u64| {
            let fixed = TuneRequest { batch: BatchChoice::Fixed(b), ..request.clone() };
            Searcher::new(&fixed, &NO_KNOBS).greedy(b, host_compute)
        })
    };
    let flexgen = first_fit(&|b: u64| {
        let fixed = TuneRequest { batch: BatchChoice::Fixed(b), ..request.clone() };
        tune(&fixed, &KnobSpace::flexgen()).map(|r| r.best).map_err(|e| e.to_string())
    });
    vec![
        Baseline {
            name: "accelerate",
            description: "Accelerate-like: sequential, greedy device-first whole layers, KV on device",
            outcome: greedy(false),
        },
        Baseline {
            name: "llama.cpp",
            description: "llama.cpp-like: whole layers on the device as fit, the rest computed on the host",
            outcome: greedy(true),
        },
        Baseline {
            name: "flexgen",
            description: "FlexGen: zig-zag block schedule, LP placement, no chunk/prefetch/stream knobs",
            outcome: flexgen,
        },
    ]
}

/// Knob space of the greedy baselines (they set every knob themselves).
static NO_KNOBS: std::sync::LazyLock<KnobSpace> = std::sync::LazyLock::new(KnobSpace::full);

/// llama.cpp's placement as Ferry models it (the llama.cpp baseline's): `-ngl
/// offloaded_layers` whole layers on the device with their KV cache, the rest in host
/// RAM and computed there beside their KV cache, the output layer on the device only
/// when `-ngl` exceeds the layers, the token embeddings on the host; one sequential
/// pass with no prefetch. On the cpu device every layer is in its RAM whatever `-ngl`.
pub fn llama_cpp_policy(request: &TuneRequest, offloaded_layers: u64) -> Policy {
    let searcher = Searcher::new(request, &NO_KNOBS);
    let layers = request.model.num_layers;
    let batch = match request.batch {
        BatchChoice::Fixed(b) => b,
        BatchChoice::Auto { max } => max,
    };
    let cpu = request.profile.device_name == "cpu";
    let (group, member) = searcher.whole_layer_knobs(batch, true);
    let mut policy = searcher.policy_for(&group, &Fractions::default(), &member);
    let device = if cpu { layers } else { offloaded_layers.min(layers) };
    let placed = TierCounts { device, host: layers - device, disk: 0 };
    (policy.attention_weights, policy.mlp_weights, policy.kv_cache) = (placed, placed, placed);
    policy.head = if cpu || offloaded_layers > layers { Tier::Device } else { Tier::Host };
    policy.embeddings = if cpu { Tier::Device } else { Tier::Host };
    policy
}

impl Searcher<'_> {
    /// The group and member of a whole-layer baseline: sequential, one micro-batch, no
    /// prefetch, one copy per weight group (no chunking knob; mmap-style small reads on
    /// unified memory), pageable memory.
    fn whole_layer_knobs(&self, batch: u64, host_compute: bool) -> (Group, Member) {
        let unified = self.unified();
        let group = Group {
            micro_batch_size: batch,
            num_micro_batches: 1,
            host_attention: false,
            host_compute: host_compute && !unified,
            pinned: false,
            class: Class::Sequential,
            schedules: vec![Schedule::Sequential],
            expert_reads: ferry_core::plan::ExpertReads::Routed,
        };
        let member = Member {
            schedule: Schedule::Sequential,
            prefetch_depth: 0,
            chunk_bytes: if unified { MIB } else { 256 * MIB },
            copy_streams: 1,
            io_queue_depth: 1,
        };
        (group, member)
    }

    /// Greedy whole-layer placement: as many layers on the device as fit beside the
    /// KV cache (device KV for device-computed layers), the rest on the host, then disk.
    fn greedy(&self, batch: u64, host_compute: bool) -> Result<Candidate, String> {
        let request = self.request;
        let layers = request.model.num_layers;
        let unified = self.unified();
        let workload = Workload { batch_size: batch, prompt_len: request.prompt_len, gen_len: request.gen_len };
        let (group, member) = self.whole_layer_knobs(batch, host_compute);
        let mut last_error = None;
        for device_layers in (0..=layers).rev() {
            let rest = layers - device_layers;
            for host_layers in (0..=if unified { 0 } else { rest }).rev() {
                let weights = TierCounts { device: device_layers, host: host_layers, disk: rest - host_layers };
                if group.host_compute && weights.disk > 0 {
                    continue; // llama.cpp computes non-offloaded layers from RAM
                }
                let kv = if group.host_compute {
                    TierCounts { device: device_layers, host: host_layers, disk: 0 }
                } else {
                    TierCounts::all(Tier::Device, layers)
                };
                let mut policy = self.policy_for(&group, &Fractions::default(), &member);
                policy.attention_weights = weights;
                policy.mlp_weights = weights;
                policy.kv_cache = kv;
                if !unified {
                    policy.embeddings = Tier::Device;
                }
                let pools = pool_specs(&policy, request.model, &workload, request.profile);
                if pools.iter().any(|p| p.resident_bytes() > p.capacity_bytes) {
                    continue;
                }
                // Resident sets fit; the streamed layer's buffer may still not: then keep fewer layers.
                match predict(&policy, request.model, &workload, request.profile, Extrapolation::Sampled) {
                    Ok(p) => return Ok(Candidate { policy, workload, metrics: p.metrics, bound_ns: 0 }),
                    Err(e) => last_error = Some(e.to_string()),
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            format!("does not fit at batch {batch}: its KV cache stays on the device and the layers that do not fit must fit in host RAM")
        }))
    }
}
