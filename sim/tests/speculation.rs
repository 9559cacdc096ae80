//! Speculative decoding in the simulator: rounds yield the formula's tokens, a draft
//! that is never accepted never predicts a faster run, acceptance only helps, and the
//! tuner's speculative search says from which acceptance rate a draft pays.

use ferry_core::catalog::Catalog;
use ferry_core::hardware::Hardware;
use ferry_core::model::{Dtype, ModelSpec, WeightFormat, WeightFormats};
use ferry_core::plan::speculation::tokens_per_round;
use ferry_core::plan::{DeviceLayers, Draft, Policy, Schedule, Speculation, TierCounts, Workload};
use ferry_core::profile::Profile;
use ferry_core::schedule::expected_decode_rounds;
use ferry_core::units::MIB;
use ferry_sim::tune::{tune_speculative, BatchChoice, KnobSpace, Objective, TuneRequest};
use ferry_sim::{predict, Extrapolation};

fn setup() -> (ModelSpec, Profile) {
    let catalog = Catalog::builtin().unwrap();
    let mut profile = Profile::from_datasheet(&Hardware {
        gpu: catalog.gpu("cpu").unwrap().value,
        host: catalog.host("ferry-ci-vm").unwrap().value,
    });
    profile.device_memory_bytes = 1024 * MIB;
    (catalog.model("tinyllama-1.1b").unwrap().value, profile)
}

/// TinyLlama with two layers on the device and the rest streamed from disk, one read in
/// flight: with several, the disk model shares its bandwidth among them, and a read
/// that starts later can let the others finish sooner — a property of the disk model
/// (about 0.01 % here), not of speculation, which would blur the invariant below.
fn streamed(model: &ModelSpec, schedule: Schedule, micro_batch_size: u64) -> Policy {
    let layers = model.num_layers;
    let mut p = Policy::all_on_device(layers, micro_batch_size, Dtype::Bf16);
    p.schedule = schedule;
    p.attention_weights = TierCounts { device: 2, host: 0, disk: layers - 2 };
    p.mlp_weights = TierCounts { device: 2, host: 0, disk: layers - 2 };
    p.kv_dtype = Dtype::F16;
    p.chunk_bytes = 16 * MIB;
    p.io_queue_depth = 1;
    p
}

/// Tuning bf16 weights for throughput at a fixed batch, prompt 64, without a draft.
fn bf16_request<'a>(model: &'a ModelSpec, profile: &'a Profile, gen_len: u64, batch: u64) -> TuneRequest<'a> {
    TuneRequest {
        model,
        profile,
        prompt_len: 64,
        gen_len,
        batch: BatchChoice::Fixed(batch),
        objective: Objective::Throughput,
        weight_format: WeightFormats::uniform(WeightFormat::Bf16),
        kv_dtype: Dtype::F16,
        speculation: None,
    }
}

fn with(policy: &Policy, draft_len: u32, acceptance_rate: f64) -> Policy {
    let draft = Draft::SelfLayers { layers: 1 };
    Policy { speculation: Some(Speculation { draft, draft_len, acceptance_rate, draft_spec: None }), ..policy.clone() }
}

#[test]
fn long_generations_yield_the_formulas_tokens_per_round() {
    let (model, _) = setup();
    let policy = streamed(&model, Schedule::LayerPrefetch, 1);
    let workload = Workload { batch_size: 1, prompt_len: 16, gen_len: 2001 };
    for (k, a) in [(1, 0.3), (4, 0.6), (8, 0.9), (3, 1.0), (5, 0.0)] {
        let rounds = expected_decode_rounds(&with(&policy, k, a), &workload);
        let measured = 2000.0 / rounds;
        let formula = tokens_per_round(a, k);
        // A renewal count: rounds ≈ tokens ÷ mean, within a round or two at the end.
        assert!((measured / formula - 1.0).abs() < 2e-3, "k {k} α {a}: {measured} vs {formula}");
    }
}

#[test]
fn a_draft_never_accepted_never_predicts_a_faster_run_and_acceptance_only_helps() {
    let (model, profile) = setup();
    let workload = Workload { batch_size: 2, prompt_len: 64, gen_len: 24 };
    for schedule in Schedule::ALL {
        let plain = streamed(&model, schedule, 2);
        let base = predict(&plain, &model, &workload, &profile, Extrapolation::Full).unwrap().metrics.tokens_per_s;
        for k in [1, 3, 8] {
            let at = |a: f64| {
                predict(&with(&plain, k, a), &model, &workload, &profile, Extrapolation::Full)
                    .unwrap()
                    .metrics
                    .tokens_per_s
            };
            let (zero, half, all) = (at(0.0), at(0.5), at(1.0));
            assert!(zero <= base, "{schedule:?} k {k}: α = 0 predicts {zero} tok/s against {base} without a draft");
            assert!(zero <= half && half <= all, "{schedule:?} k {k}: {zero} {half} {all}");
            assert!(all > base, "{schedule:?} k {k}: every guess accepted must beat streaming per token");
        }
    }
}

#[test]
fn the_speculative_search_reports_its_gain_and_the_rate_it_needs() {
    let (model, profile) = setup();
    let request = bf16_request(&model, &profile, 24, 1);
    let speculation =
        Speculation { draft: Draft::SelfLayers { layers: 1 }, draft_len: 1, acceptance_rate: 0.8, draft_spec: None };
    let outcome = tune_speculative(&request, &KnobSpace::full(), speculation, &[2, 4]).unwrap();
    let best = outcome.best.as_ref().expect("a one-layer draft fits in 1 GiB");
    let plain = outcome.plain.result.best.metrics.tokens_per_s;
    assert!(best.metrics.tokens_per_s > plain, "streamed from disk at α = 0.8 a draft wins");
    assert_eq!(outcome.recommended(&request).policy.speculation.as_ref().map(|s| s.acceptance_rate), Some(0.8));
    let rate = outcome.break_even.expect("it wins at some rate");
    assert!(rate > 0.0 && rate < 0.8, "{rate}");
    // Just above the rate the plan wins; just below it does not.
    let score = |a: f64| {
        let mut p = best.policy.clone();
        p.speculation.as_mut().unwrap().acceptance_rate = a;
        predict(&p, &model, &best.workload, &profile, Extrapolation::Full).unwrap().metrics.tokens_per_s
    };
    assert!(score(rate + 0.01) > plain && score((rate - 0.01).max(0.0)) <= plain, "{rate}");
}

/// Each sequence accepts on its own: the rounds a batch needs depend on how many
/// sequences wait for the slowest, not on how they are grouped into micro-batches, and
/// a micro-batch of several sequences gains from a draft as one sequence does (a round
/// no longer needs every sequence to accept a guess).
#[test]
fn sequences_accept_on_their_own_whatever_their_micro_batch() {
    let (model, profile) = setup();
    let workload = Workload { batch_size: 4, prompt_len: 64, gen_len: 33 };
    let one_of_four = streamed(&model, Schedule::ZigzagBlock, 4);
    let four_of_one = Policy { micro_batch_size: 1, num_micro_batches: 4, ..one_of_four.clone() };
    let (a, b) = (with(&one_of_four, 4, 0.7), with(&four_of_one, 4, 0.7));
    assert_eq!(expected_decode_rounds(&a, &workload), expected_decode_rounds(&b, &workload));
    let single = Workload { batch_size: 1, ..workload };
    let alone = expected_decode_rounds(&with(&streamed(&model, Schedule::ZigzagBlock, 1), 4, 0.7), &single);
    let together = expected_decode_rounds(&a, &workload);
    // The slowest of four takes longer than one sequence, but far fewer rounds than
    // tokens (at α⁴ ≈ 0.24 per guess a micro-batch would need ~25 of 32).
    assert!(together > alone && together < 16.0, "{alone} {together}");
    let plain = predict(&one_of_four, &model, &workload, &profile, Extrapolation::Full).unwrap().metrics.tokens_per_s;
    let drafted = predict(&a, &model, &workload, &profile, Extrapolation::Full).unwrap().metrics.tokens_per_s;
    assert!(drafted > 1.5 * plain, "four sequences in one micro-batch: {drafted} vs {plain} tok/s");
}

/// SpecOffload's interleaving comes from the dispatch rule: with two micro-batches
/// streaming the target one after the other, the second's draft passes run while the
/// first's target layers wait for their weights, not after the first's pass.
#[test]
fn one_micro_batchs_drafts_run_while_anothers_target_streams() {
    use ferry_core::graph::{Op, Payload};
    let (model, profile) = setup();
    let workload = Workload { batch_size: 2, prompt_len: 16, gen_len: 6 };
    let policy = with(&Policy { num_micro_batches: 2, ..streamed(&model, Schedule::LayerPrefetch, 1) }, 4, 0.6);
    let p = predict(&policy, &model, &workload, &profile, Extrapolation::Full).unwrap();
    let span = |id: usize| p.trace.spans.iter().find(|s| s.task as usize == id).unwrap();
    for step in 1..p.graph.rounds.len() as u32 {
        let of = |j: u32, draft: bool, op: Op| {
            p.graph.tasks.iter().enumerate().filter(move |(_, t)| {
                t.step == step
                    && t.micro_batch == j
                    && matches!(t.payload, Payload::Compute { op: o, draft: d, .. } if o == op && d == draft)
            })
        };
        // The first micro-batch's target pass: from its embedding to its head.
        let (first_embed, _) = of(0, false, Op::Embed).next().unwrap();
        let (first_head, _) = of(0, false, Op::Head).next().unwrap();
        let (from, to) = (span(first_embed).start_ns, span(first_head).end_ns);
        let inside = of(1, true, Op::Head).filter(|(id, _)| span(*id).end_ns < to && span(*id).start_ns > from).count();
        assert!(
            inside >= 3,
            "round {step}: {inside} of the second micro-batch's 4 draft passes end inside the first's pass"
        );
    }
}

/// Under a tight budget a resident draft leaves the target's stream little room: a few
/// target layers kept on the device beside it can leave less than two streamed layers
/// of room, and each layer's read then waits for the layer before. The tuner's plan is
/// never slower than itself with every weight layer streamed. (At these figures the LP
/// kept four attention layers resident: 9.58 tokens/s against 10.18 all streamed.)
/// And the draft's own copy of its layer is memory the target can use: the tuner keeps
/// the first layer on the device for both (`DeviceLayers::First`), which holds the same
/// bytes as the copy and streams one layer less.
#[test]
fn the_speculative_search_keeps_room_for_the_stream_and_shares_the_drafts_layer() {
    let catalog = Catalog::builtin().unwrap();
    let mut profile = Profile::from_datasheet(&Hardware {
        gpu: catalog.gpu("cpu").unwrap().value,
        host: catalog.host("laptop-pcie3").unwrap().value,
    });
    profile.device_memory_bytes = 512 * MIB;
    let model = catalog.model("tinyllama-1.1b").unwrap().value;
    let request = bf16_request(&model, &profile, 64, 4);
    let speculation =
        Speculation { draft: Draft::SelfLayers { layers: 1 }, draft_len: 3, acceptance_rate: 0.556, draft_spec: None };
    let outcome = tune_speculative(&request, &KnobSpace::full(), speculation, &[3]).unwrap();
    let best = outcome.best.expect("a one-layer draft fits in 512 MiB");
    let layers = model.num_layers;
    let policy = &best.policy;
    let predicted = |p: &Policy| predict(p, &model, &best.workload, &profile, Extrapolation::Full).unwrap().metrics;
    // The plan the LP's placement missed: every layer streamed, read one layer ahead.
    let mut streamed = Policy {
        schedule: Schedule::LayerPrefetch,
        device_layers: DeviceLayers::Spread,
        prefetch_depth: 1,
        ..policy.clone()
    };
    streamed.attention_weights = TierCounts { device: 0, host: 0, disk: layers };
    streamed.mlp_weights = TierCounts { device: 0, host: 0, disk: layers };
    let all_streamed = predicted(&streamed).tokens_per_s;
    assert!(
        best.metrics.tokens_per_s >= all_streamed,
        "the tuned plan ({} attention, {} MLP layers on the device) predicts {} tokens/s; streamed whole, {all_streamed}",
        policy.attention_weights.device,
        policy.mlp_weights.device,
        best.metrics.tokens_per_s
    );
    assert_eq!(policy.device_layers, DeviceLayers::First, "{policy:?}");
    assert!(policy.attention_weights.device >= 1 && policy.mlp_weights.device >= 1, "{policy:?}");
    // The same counts spread keep the last layer on the device: the draft then holds its
    // own copy of the first, more memory for a plan no faster.
    let spread = Policy { device_layers: DeviceLayers::Spread, ..policy.clone() };
    let resident = |p: &Policy| {
        let pools = ferry_core::schedule::pool_specs(p, &model, &best.workload, &profile);
        pools[0].resident_bytes()
    };
    let params = model.params();
    let layer_bytes = 2 * (params.attention_per_layer + params.mlp_per_layer + params.norms_per_layer);
    assert_eq!(resident(&spread) - resident(policy), layer_bytes, "the draft's copy of its bf16 layer");
    // (Here it does not even run: its window no longer fits beside the copy.)
    if let Ok(p) = predict(&spread, &model, &best.workload, &profile, Extrapolation::Full) {
        assert!(p.metrics.tokens_per_s <= best.metrics.tokens_per_s);
    }
}

/// On a measured kernel table, a verification's target tasks (4 sequences × 4
/// positions) are priced as the engine runs them: plain decoding's few-row kernels, a
/// pass per 8 rows (two 8-row entries), not the 16-row entry measured on the GEMM or
/// the AMX tiles; the draft's tasks and the prefill read the entry at their own rows.
#[test]
fn a_verification_is_priced_with_plain_decodings_kernels() {
    use ferry_core::graph::{Op, Payload};
    use ferry_core::profile::KernelTiming;
    use ferry_sim::cost::{shape_key, CostModel, TaskCost};
    let (model, mut profile) = setup();
    let shape = shape_key(&model);
    // Every op at every row count costs 1000 ns per row, but 16 rows (the GEMM's) 5000.
    let rows = [1u64, 2, 3, 4, 8, 16, 64, 256];
    let entry = |op: Op, tokens: u64| KernelTiming {
        op: op.name().into(),
        shape: shape.clone(),
        tokens,
        context: 64,
        ns: if tokens == 16 { 5_000 } else { 1_000 * tokens },
        format: None,
    };
    let ops = [Op::Embed, Op::Attention, Op::Mlp, Op::Head];
    profile.device_compute.table = ops.iter().flat_map(|&op| rows.map(|t| entry(op, t))).collect();
    profile.device_memory_bytes = 4096 * MIB;
    let policy = with(&Policy::all_on_device(model.num_layers, 4, Dtype::Bf16), 3, 0.5);
    let workload = Workload { batch_size: 4, prompt_len: 64, gen_len: 16 };
    let graph =
        ferry_core::schedule::lower(&policy, &model, &workload, &profile, &ferry_core::schedule::Steps::Bound).unwrap();
    let cost = CostModel::for_policy(&profile, &model, &policy);
    let costs = cost.graph_costs(&graph);
    let (mut verifications, mut drafts) = (0, 0);
    for (task, cost) in graph.tasks.iter().zip(&costs) {
        let (Payload::Compute { op: Op::Mlp, draft, .. }, TaskCost::Compute { nominal_ns }) = (task.payload, cost)
        else {
            continue;
        };
        let want = match (task.step, draft) {
            (0, _) => 256_000.0,
            (_, false) => {
                verifications += 1;
                16_000.0
            }
            (_, true) => {
                drafts += 1;
                1_000.0 * task.tokens as f64
            }
        };
        assert_eq!(*nominal_ns, want, "{} ({} rows)", task.label(), task.tokens);
        if task.step > 0 && !draft {
            assert_eq!(task.tokens, 16, "{}", task.label());
        }
    }
    assert!(verifications > 0 && drafts > 0, "{verifications} verifications, {drafts} draft passes");
}
