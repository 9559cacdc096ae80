//! The baselines the search is compared with, simulated on the same hardware:
//! Accelerate-like and llama.cpp-like greedy whole-layer placements, and FlexGen (the
//! search restricted to FlexGen's policy space).

use ferry_core::export::Engine;
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
    /// The engine it models, whose costs price it.
    pub engine: Option<Engine>,
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
    let flexgen = || {
        first_fit(&|b: u64| {
            let fixed = TuneRequest { batch: BatchChoice::Fixed(b), ..request.clone() };
            tune(&fixed, &KnobSpace::flexgen()).map(|r| r.best).map_err(|e| e.to_string())
        })
    };
    // Three independent searches, side by side.
    let (flexgen, (accelerate, llama_cpp)) = rayon::join(flexgen, || rayon::join(|| greedy(false), || greedy(true)));
    vec![
        Baseline {
            name: "accelerate",
            engine: Some(Engine::Accelerate),
            description: "Accelerate-like: sequential, greedy device-first whole layers, KV on device",
            outcome: accelerate,
        },
        Baseline {
            name: "llama.cpp",
            engine: Some(Engine::LlamaCpp),
            description: "llama.cpp-like: whole layers on the device as fit, the rest computed on the host",
            outcome: llama_cpp,
        },
        Baseline {
            name: "flexgen",
            engine: Some(Engine::Flexgen),
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
/// pass with no prefetch. On a device that shares the host's memory (the cpu device)
/// every layer is in that memory whatever `-ngl` says.
pub fn llama_cpp_policy(request: &TuneRequest, offloaded_layers: u64) -> Policy {
    let batch = match request.batch {
        BatchChoice::Fixed(b) => b,
        BatchChoice::Auto { max } => max,
    };
    Searcher::new(request, &NO_KNOBS).llama_cpp(batch, offloaded_layers)
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

    /// See `llama_cpp_policy`.
    fn llama_cpp(&self, batch: u64, offloaded_layers: u64) -> Policy {
        let layers = self.request.model.num_layers;
        let unified = self.unified();
        let (group, member) = self.whole_layer_knobs(batch, true);
        let mut policy = self.policy_for(&group, &Fractions::default(), &member);
        let device = if unified { layers } else { offloaded_layers.min(layers) };
        let placed = TierCounts { device, host: layers - device, disk: 0 };
        (policy.attention_weights, policy.mlp_weights, policy.kv_cache) = (placed, placed, placed);
        policy.head = if unified || offloaded_layers > layers { Tier::Device } else { Tier::Host };
        policy.embeddings = if unified { Tier::Device } else { Tier::Host };
        policy
    }

    /// Greedy whole-layer placement: as many layers on the device as fit beside the
    /// KV cache, the rest on the host, then disk. With `host_compute` (and a host apart
    /// from the device) llama.cpp's: the largest `-ngl` that fits, as `ferry check`
    /// finds it.
    fn greedy(&self, batch: u64, host_compute: bool) -> Result<Candidate, String> {
        let request = self.request;
        let layers = request.model.num_layers;
        let unified = self.unified();
        let (group, member) = self.whole_layer_knobs(batch, host_compute);
        let workload = Workload { batch_size: batch, prompt_len: request.prompt_len, gen_len: request.gen_len };
        if group.host_compute {
            let ngls = (0..=layers + 1).rev().map(|ngl| self.llama_cpp(batch, ngl));
            return self.first_that_runs(ngls, &workload, &workload, Extrapolation::Sampled);
        }
        let device_first = (0..=layers).rev().flat_map(move |device| {
            let rest = layers - device;
            (0..=if unified { 0 } else { rest }).rev().map(move |host| (device, host, rest - host))
        });
        let placements = device_first.map(|(device, host, disk)| {
            let mut policy = self.policy_for(&group, &Fractions::default(), &member);
            policy.attention_weights = TierCounts { device, host, disk };
            policy.mlp_weights = policy.attention_weights;
            policy.kv_cache = TierCounts::all(Tier::Device, layers);
            if !unified {
                policy.embeddings = Tier::Device;
            }
            policy
        });
        self.first_that_runs(placements, &workload, &workload, Extrapolation::Sampled)
    }

    /// The first of `placements` whose resident sets fit at `allocated` and which runs
    /// `workload` without running out of memory, with its prediction.
    fn first_that_runs(
        &self,
        placements: impl Iterator<Item = Policy>,
        allocated: &Workload,
        workload: &Workload,
        extrapolation: Extrapolation,
    ) -> Result<Candidate, String> {
        let request = self.request;
        let mut last_error = None;
        for policy in placements {
            let pools = pool_specs(&policy, request.model, allocated, request.profile);
            if pools.iter().any(|p| p.resident_bytes() > p.capacity_bytes) {
                continue;
            }
            // Resident sets fit; the streamed layer's buffer may still not: then keep fewer layers.
            match predict(&policy, request.model, workload, request.profile, extrapolation) {
                Ok(p) => return Ok(Candidate { policy, workload: *workload, metrics: p.metrics, bound_ns: 0 }),
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            format!(
                "does not fit at batch {}: its KV cache stays on the device and the layers that do not fit must fit in host RAM",
                allocated.batch_size
            )
        }))
    }
}

/// llama.cpp's best `-ngl` as Ferry models it: the largest whose resident sets fit
/// with the KV cache `allocated` (llama.cpp allocates the whole context's at start-up)
/// and which runs `workload` (predicted step by step), with that run.
pub fn llama_cpp_largest_fit(
    request: &TuneRequest,
    allocated: &Workload,
    workload: &Workload,
) -> Result<(u64, Candidate), String> {
    let searcher = Searcher::new(request, &NO_KNOBS);
    let layers = request.model.num_layers;
    let batch = allocated.batch_size;
    let ngls = (0..=layers + 1).rev();
    let candidate = searcher.first_that_runs(
        ngls.map(|ngl| searcher.llama_cpp(batch, ngl)),
        allocated,
        workload,
        Extrapolation::Full,
    )?;
    // The placement names its -ngl: the device layers, one more with the output layer.
    let p = &candidate.policy;
    let ngl = p.attention_weights.device + u64::from(p.head == Tier::Device && p.attention_weights.device == layers);
    Ok((ngl, candidate))
}
