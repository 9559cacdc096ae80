//! The per-group placement LP (good_lp + microlp): FlexGen's formulation extended with
//! our knobs. It chooses the fractions of attention weights, MLP weights and KV cache on
//! device / host / disk that minimise a lower bound on the run time under every memory
//! constraint. Also here: the per-layer figures the LP is written in, and the estimate
//! that ranks a group's members by the LP's time terms at the group's placement.
//!
//! The LP is written in GB and ms: badly scaled LPs are misreported as infeasible.

use good_lp::{microlp, variable, Constraint, Expression, ProblemVariables, Solution, SolverModel, Variable};

use ferry_core::graph::Op;
use ferry_core::model::WeightGroup;
use ferry_core::schedule::{pool_capacities, pool_specs};
use ferry_core::units::MIB;

use super::search::{Class, Group, Member, Searcher};
use super::{DEVICE_POOL, HOST_POOL};

/// Placement fractions chosen by a group's LP.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Fractions {
    pub(super) attention: [f64; 3],
    pub(super) mlp: [f64; 3],
    pub(super) kv: [f64; 3],
}

/// Per-layer figures the LP is written in (GB and ms).
pub(super) struct LayerFigures {
    pub(super) layers: f64,
    pub(super) attention_gb: f64,
    pub(super) mlp_gb: f64,
    /// MLP bytes one visit moves, [prefill, decode]: `mlp_gb`, or for a mixture of
    /// experts read as routed the router part and the experts its tokens are expected
    /// to choose.
    pub(super) mlp_moved_gb: [f64; 2],
    /// Full-sequence KV of one layer for the whole batch.
    pub(super) kv_full_gb: f64,
    /// KV one decode step reads per layer for the whole batch, at the mean context.
    pub(super) kv_read_gb: f64,
    /// Double buffer for streaming one micro-batch's KV of one layer.
    pub(super) kv_buffer_gb: f64,
    /// Per layer, all micro-batches: [prefill, decode] ms.
    pub(super) device_fused_ms: [f64; 2],
    pub(super) device_split_ms: [f64; 2],
    pub(super) host_core_ms: [f64; 2],
    pub(super) host_layer_ms: [f64; 2],
    /// The MLP's part of `device_fused_ms` and of `host_layer_ms` (`split_ms`).
    pub(super) device_mlp_ms: [f64; 2],
    pub(super) host_mlp_ms: [f64; 2],
    pub(super) device_static_gb: f64,
    pub(super) host_static_gb: f64,
    pub(super) device_capacity_gb: f64,
    pub(super) host_capacity_gb: f64,
    /// The offload disk's space, when known.
    pub(super) disk_capacity_gb: Option<f64>,
    pub(super) decode_steps: f64,
}

/// One phase's per-layer compute under llama.cpp's split, where each weight group is
/// computed where it lives, ms.
struct SplitTimes {
    device_attention: f64,
    device_mlp: f64,
    host_attention: f64,
    host_mlp: f64,
}

impl LayerFigures {
    fn split_ms(&self, phase: usize) -> SplitTimes {
        SplitTimes {
            device_attention: self.device_fused_ms[phase] - self.device_mlp_ms[phase],
            device_mlp: self.device_mlp_ms[phase],
            host_attention: self.host_layer_ms[phase] - self.host_mlp_ms[phase],
            host_mlp: self.host_mlp_ms[phase],
        }
    }
}

/// Per layer, all micro-batches: [prefill, decode] ms (see `LayerFigures`).
struct LayerTimes {
    device_fused_ms: [f64; 2],
    device_split_ms: [f64; 2],
    host_core_ms: [f64; 2],
    host_layer_ms: [f64; 2],
    device_mlp_ms: [f64; 2],
    host_mlp_ms: [f64; 2],
}

/// Bandwidths (GB/s) and prefetch window (layers) of one member, or the best case of a group.
#[derive(Debug, Clone, Copy)]
pub(super) struct Transfer {
    pub(super) h2d_gbps: f64,
    pub(super) disk_gbps: f64,
    pub(super) window: f64,
}

/// The LP's variables: fractions [device, host, disk] of attention weights (`a`), MLP
/// weights (`m`) and KV cache, and the per-step prefill and decode times (ms).
struct LpVariables {
    a: [Variable; 3],
    m: [Variable; 3],
    kv: [Variable; 3],
    prefill: Variable,
    decode: Variable,
}

impl LpVariables {
    /// Adds the variables to `vars`; without `host_allowed` (unified memory) nothing goes on the host.
    fn new(vars: &mut ProblemVariables, host_allowed: bool) -> LpVariables {
        let mut fractions = || -> [Variable; 3] {
            [
                vars.add(variable().min(0.0).max(1.0)),
                vars.add(variable().min(0.0).max(if host_allowed { 1.0 } else { 0.0 })),
                vars.add(variable().min(0.0).max(1.0)),
            ]
        };
        let a = fractions();
        let m = fractions();
        let kv = fractions();
        let prefill = vars.add(variable().min(0.0));
        let decode = vars.add(variable().min(0.0));
        LpVariables { a, m, kv, prefill, decode }
    }
}

/// One phase's per-step load, in the LP's variables: GB streamed to the device and read
/// from disk, ms of device and host compute.
struct PhaseLoad {
    streamed: Expression,
    from_disk: Expression,
    device_ms: Expression,
    host_ms: Expression,
}

impl Searcher<'_> {
    pub(super) fn figures(&self, group: &Group) -> LayerFigures {
        let request = self.request;
        let model = request.model;
        let profile = request.profile;
        let layout = &self.layout;
        let batch = group.batch();
        let mb = group.micro_batch_size;
        let max_context = request.prompt_len + request.gen_len;
        let kv_token = model.kv_bytes_per_token_per_layer(request.kv_dtype) as f64;
        let mean_past = request.prompt_len as f64 + (request.gen_len as f64 - 2.0).max(0.0) / 2.0;
        // Per layer: the mean over layers (every layer alike but in a file's own mix).
        let attention_bytes = layout.mean_bytes(WeightGroup::Attention);
        let times = self.layer_times(group, mean_past);
        let (device_static, host_static) = self.static_resident_bytes(group);
        let (device_capacity, host_capacity) = pool_capacities(profile);
        let gb = |b: u64| b as f64 / 1e9;
        LayerFigures {
            layers: model.num_layers as f64,
            attention_gb: gb(attention_bytes),
            mlp_gb: gb(layout.mean_bytes(WeightGroup::Mlp)),
            mlp_moved_gb: [request.prompt_len, 1].map(|new_tokens| gb(self.mlp_moved_bytes(group, new_tokens))),
            kv_full_gb: kv_token * (batch * max_context) as f64 / 1e9,
            kv_read_gb: kv_token * batch as f64 * mean_past / 1e9,
            kv_buffer_gb: 2.0 * kv_token * (mb * max_context) as f64 / 1e9,
            device_fused_ms: times.device_fused_ms,
            device_split_ms: times.device_split_ms,
            host_core_ms: times.host_core_ms,
            host_layer_ms: times.host_layer_ms,
            device_mlp_ms: times.device_mlp_ms,
            host_mlp_ms: times.host_mlp_ms,
            device_static_gb: gb(device_static),
            host_static_gb: gb(host_static),
            device_capacity_gb: gb(device_capacity),
            host_capacity_gb: gb(host_capacity),
            disk_capacity_gb: profile.disk_capacity_bytes.map(gb),
            // With speculation, the expected rounds: each streams the weights once and
            // computes at least a plain step (the bound stays a lower bound).
            decode_steps: match &request.speculation {
                None => request.gen_len.saturating_sub(1) as f64,
                Some(s) => s.expected_rounds(request.gen_len.saturating_sub(1), group.batch()),
            },
        }
    }

    /// The mean layer's MLP bytes a visit moves when each sequence adds `new_tokens`:
    /// whole, or as routed reads move a mixture of experts (`schedule::experts`).
    fn mlp_moved_bytes(&self, group: &Group, new_tokens: u64) -> u64 {
        let whole = self.layout.mean_bytes(WeightGroup::Mlp);
        let Some(experts) = self.experts.as_ref().filter(|_| group.expert_reads.is_routed()) else { return whole };
        let sequences = if group.class == Class::LayerMajor { group.batch() } else { group.micro_batch_size };
        let expected = self.request.model.expected_experts(sequences * new_tokens);
        let first_layer = experts.router + experts.experts.iter().sum::<u64>();
        let moved = experts.router + experts.expected(expected);
        (whole as f64 * moved as f64 / first_layer.max(1) as f64).round() as u64
    }

    /// Compute time of one layer for all micro-batches, in prefill and in a decode step
    /// at the mean past context `mean_past`.
    fn layer_times(&self, group: &Group, mean_past: f64) -> LayerTimes {
        let request = self.request;
        let model = request.model;
        let profile = request.profile;
        let layout = &self.layout;
        let mb = group.micro_batch_size;
        let nmb = group.num_micro_batches as f64;
        let kv_token = model.kv_bytes_per_token_per_layer(request.kv_dtype) as f64;
        let (qkv_params, out_params) = model.attention_split_params();
        let attention_bytes = layout.mean_bytes(WeightGroup::Attention);
        let qkv_bytes = attention_bytes * qkv_params / model.params().attention_per_layer.max(1);
        let dev = &profile.device_compute;
        let host = &profile.host_compute;
        let mut device_fused_ms = [0.0; 2];
        let mut device_split_ms = [0.0; 2];
        let mut host_core_ms = [0.0; 2];
        let mut host_layer_ms = [0.0; 2];
        let mut device_mlp_ms = [0.0; 2];
        let mut host_mlp_ms = [0.0; 2];
        for (phase, (new_tokens, context)) in
            [(request.prompt_len, request.prompt_len), (1, (mean_past + 1.0).round() as u64)].into_iter().enumerate()
        {
            let rows = mb * new_tokens;
            let core_flops = mb * model.attention_core_flops(new_tokens, context);
            let kv_bytes = (kv_token * (mb * context) as f64) as u64;
            let qkv_flops = 2 * rows * qkv_params;
            let out_flops = 2 * rows * out_params;
            let mlp_flops = model.projection_flops(WeightGroup::Mlp, rows);
            let mlp_bytes = model.mlp_bytes_read(rows, layout.mean_bytes(WeightGroup::Mlp));
            let c = &self.cost;
            // Weights priced resident even where they stream: a bound takes the faster
            // order of their blocks.
            let dq = |on_host: bool, op: Op| c.quantized(on_host, op, None, rows, false);
            let fused = c.compute_ns(
                dev,
                Op::Attention,
                qkv_flops + core_flops + out_flops,
                attention_bytes + kv_bytes,
                rows,
                context,
                dq(false, Op::Attention),
            );
            let mlp = c.compute_ns(dev, Op::Mlp, mlp_flops, mlp_bytes, rows, context, dq(false, Op::Mlp));
            let split = c.compute_ns(dev, Op::AttnQkv, qkv_flops, qkv_bytes, rows, context, dq(false, Op::AttnQkv))
                + c.compute_ns(
                    dev,
                    Op::AttnOut,
                    out_flops,
                    attention_bytes - qkv_bytes,
                    rows,
                    context,
                    dq(false, Op::AttnOut),
                );
            device_fused_ms[phase] = nmb * (fused + mlp) / 1e6;
            device_split_ms[phase] = nmb * (split + mlp) / 1e6;
            host_core_ms[phase] =
                nmb * c.compute_ns(host, Op::AttnCore, core_flops, kv_bytes, rows, context, None) / 1e6;
            let host_mlp = c.compute_ns(host, Op::Mlp, mlp_flops, mlp_bytes, rows, context, dq(true, Op::Mlp));
            host_layer_ms[phase] = nmb
                * (c.compute_ns(
                    host,
                    Op::Attention,
                    qkv_flops + core_flops + out_flops,
                    attention_bytes + kv_bytes,
                    rows,
                    context,
                    dq(true, Op::Attention),
                ) + host_mlp)
                / 1e6;
            device_mlp_ms[phase] = nmb * mlp / 1e6;
            host_mlp_ms[phase] = nmb * host_mlp / 1e6;
        }
        LayerTimes { device_fused_ms, device_split_ms, host_core_ms, host_layer_ms, device_mlp_ms, host_mlp_ms }
    }

    /// Static memory (device, host bytes): the same resident items the lowering puts in
    /// the pools, with no weights or KV.
    fn static_resident_bytes(&self, group: &Group) -> (u64, u64) {
        let probe = self.policy_for(
            group,
            &Fractions { attention: [0.0, 0.0, 1.0], mlp: [0.0, 0.0, 1.0], kv: [0.0, 0.0, 1.0] },
            &Member {
                schedule: group.schedules[0],
                prefetch_depth: 1,
                chunk_bytes: 64 * MIB,
                copy_streams: 1,
                io_queue_depth: 1,
            },
        );
        let workload = self.workload(group);
        let pools = pool_specs(&probe, self.request.model, &workload, self.request.profile);
        // A draft's copies of its layers count whole: it shares only layers the target
        // keeps on the device, and the LP's placements spread device layers over the
        // model (`DeviceLayers::Spread`), so a self-speculating draft's first layers are
        // rarely among them. The leading plans are offered the draft's layers first on
        // the device afterwards (`shared_draft`).
        (pools[DEVICE_POOL].resident_bytes(), pools[HOST_POOL].resident_bytes())
    }

    /// Solves the group's placement LP; `None` when no placement fits.
    pub(super) fn solve(&self, group: &Group, f: &LayerFigures, transfer: Transfer) -> Option<(Fractions, f64)> {
        let mut vars = ProblemVariables::new();
        let v = LpVariables::new(&mut vars, !self.unified());
        let objective: Expression = Expression::from(v.prefill) + f.decode_steps * v.decode;
        let problem = vars
            .minimise(objective.clone())
            .using(microlp)
            .with_all([&v.a, &v.m, &v.kv].map(|set| (set[0] + set[1] + set[2]).eq(1.0)))
            .with_all(whole_layer_constraints(group, &v))
            .with_all(self.time_constraints(group, f, transfer, &v))
            .with_all(self.memory_constraints(group, f, transfer.window, &v));
        let solution = problem.solve().ok()?;
        let value = |x: Variable| solution.value(x).clamp(0.0, 1.0);
        let fr = Fractions {
            attention: [value(v.a[0]), value(v.a[1]), value(v.a[2])],
            mlp: [value(v.m[0]), value(v.m[1]), value(v.m[2])],
            kv: [value(v.kv[0]), value(v.kv[1]), value(v.kv[2])],
        };
        Some((fr, solution.eval(&objective)))
    }

    /// Per-step time ≥ each resource's busy time in both phases (≥ their sum for `sequential`).
    fn time_constraints(
        &self,
        group: &Group,
        f: &LayerFigures,
        transfer: Transfer,
        v: &LpVariables,
    ) -> Vec<Constraint> {
        let unified = self.unified();
        let mut constraints = Vec::new();
        for (phase, time) in [(0usize, v.prefill), (1, v.decode)] {
            let PhaseLoad { streamed, from_disk, device_ms, host_ms } = phase_load(group, f, v, phase);
            // GB ÷ GB/s = s → ×1000 for ms. On unified memory disk reads land on the device: no copy.
            let h2d_ms: Expression =
                if unified { Expression::from(0.0) } else { streamed * (1000.0 / transfer.h2d_gbps) };
            let disk_ms: Expression = from_disk * (1000.0 / transfer.disk_gbps);
            if group.class == Class::Sequential {
                constraints.push(Expression::from(time).geq(device_ms + host_ms + h2d_ms + disk_ms));
            } else {
                constraints.push(Expression::from(time).geq(device_ms));
                constraints.push(Expression::from(time).geq(host_ms));
                constraints.push(Expression::from(time).geq(h2d_ms));
                constraints.push(Expression::from(time).geq(disk_ms));
            }
        }
        constraints
    }

    /// Memory (GB): resident weights and full-sequence KV, prefetch windows and staging
    /// buffers fit beside the static items on each tier.
    fn memory_constraints(&self, group: &Group, f: &LayerFigures, window: f64, v: &LpVariables) -> Vec<Constraint> {
        let (a, m, kv) = (&v.a, &v.m, &v.kv);
        let l = f.layers;
        let mut constraints = Vec::new();
        let device_weights = l * (f.attention_gb * a[0] + f.mlp_gb * m[0]);
        // Under llama.cpp's split host-tier weights are computed where they are: only
        // disk-tier ones stream to the device.
        let stream_buffers = if group.host_compute {
            window * (f.attention_gb * a[2] + f.mlp_gb * m[2])
        } else {
            window * (f.attention_gb * (a[1] + a[2]) + f.mlp_gb * (m[1] + m[2]))
        };
        let kv_buffers = if group.host_attention || group.host_compute {
            Expression::from(0.0)
        } else {
            f.kv_buffer_gb * (kv[1] + kv[2])
        };
        let device_kv = l * f.kv_full_gb * kv[0];
        constraints.push(
            (device_weights + stream_buffers + kv_buffers + device_kv).leq(f.device_capacity_gb - f.device_static_gb),
        );
        if !self.unified() {
            let host_weights = l * (f.attention_gb * a[1] + f.mlp_gb * m[1]);
            let staging = window * (f.attention_gb * a[2] + f.mlp_gb * m[2]);
            let host_kv = l * f.kv_full_gb * kv[1];
            constraints.push((host_weights + staging + host_kv).leq(f.host_capacity_gb - f.host_static_gb));
        }
        if let Some(disk_gb) = f.disk_capacity_gb {
            let disk_weights = l * (f.attention_gb * a[2] + f.mlp_gb * m[2]);
            constraints.push((disk_weights + l * f.kv_full_gb * kv[2]).leq(disk_gb));
        }
        constraints
    }

    /// The LP's time terms at fixed fractions with a member's bandwidths: an estimate used
    /// to rank a group's members (ms).
    pub(super) fn estimate(&self, group: &Group, f: &LayerFigures, fr: &Fractions, transfer: Transfer) -> f64 {
        let l = f.layers;
        let visits = if group.class == Class::LayerMajor { 1.0 } else { group.num_micro_batches as f64 };
        let offloaded = fr.kv[1] + fr.kv[2];
        let mut total = 0.0;
        let (a, m) = (&fr.attention, &fr.mlp);
        for phase in 0..2 {
            let (streamed, from_disk, device, host) = if group.host_compute {
                // As `phase_load` prices llama.cpp's split.
                let mlp_streamed = visits * l * f.mlp_moved_gb[phase] * m[2];
                let t = f.split_ms(phase);
                let device = l * (t.device_attention * a[0] + t.device_mlp * (m[0] + m[2]));
                let host = l * (t.host_attention * a[1] + t.host_mlp * m[1]);
                (mlp_streamed, mlp_streamed, device, host)
            } else {
                let streamed = visits * l * (f.attention_gb * (a[1] + a[2]) + f.mlp_moved_gb[phase] * (m[1] + m[2]))
                    + if phase == 1 && !group.host_attention { l * f.kv_read_gb * offloaded } else { 0.0 };
                let from_disk = visits * l * (f.attention_gb * a[2] + f.mlp_moved_gb[phase] * m[2])
                    + if phase == 1 { l * f.kv_read_gb * fr.kv[2] } else { 0.0 };
                let host = if group.host_attention { l * f.host_core_ms[phase] * offloaded } else { 0.0 };
                (streamed, from_disk, l * f.device_fused_ms[phase], host)
            };
            let h2d = if self.unified() { 0.0 } else { streamed * 1000.0 / transfer.h2d_gbps };
            let disk = from_disk * 1000.0 / transfer.disk_gbps;
            let step = if group.class == Class::Sequential {
                device + host + h2d + disk
            } else {
                device.max(host).max(h2d).max(disk)
            };
            total += if phase == 0 { step } else { step * f.decode_steps };
        }
        total
    }
}

/// With llama.cpp-style host compute each group is computed where it lives: the KV
/// cache follows attention (host attention over a host cache, device attention over a
/// device one), and attention is never on disk (llama.cpp cannot stream it; it would
/// also put a layer's attention and its cache on different tiers). MLPs are free: on
/// the host beside device attention is llama.cpp's `--n-cpu-moe`.
fn whole_layer_constraints(group: &Group, v: &LpVariables) -> Vec<Constraint> {
    let (a, kv) = (&v.a, &v.kv);
    let mut constraints = Vec::new();
    if group.host_compute {
        constraints.push((kv[0] - a[0]).eq(0.0));
        constraints.push((kv[1] - a[1]).eq(0.0));
        constraints.push(Expression::from(a[2]).eq(0.0));
        constraints.push(Expression::from(kv[2]).eq(0.0));
    }
    constraints
}

/// The per-step load of `phase` (0 prefill, 1 decode). Weights stream to the device in
/// both phases; KV only in decode.
fn phase_load(group: &Group, f: &LayerFigures, v: &LpVariables, phase: usize) -> PhaseLoad {
    let (a, m, kv) = (&v.a, &v.m, &v.kv);
    let l = f.layers;
    let visits = match group.class {
        Class::LayerMajor => 1.0,
        _ => group.num_micro_batches as f64,
    };
    if group.host_compute {
        // Attention is on the device or the host (`whole_layer_constraints`); disk-tier
        // MLPs stream to the device and are computed there.
        let t = f.split_ms(phase);
        return PhaseLoad {
            streamed: visits * l * f.mlp_moved_gb[phase] * m[2],
            from_disk: visits * l * f.mlp_moved_gb[phase] * m[2],
            device_ms: l * (t.device_attention * a[0] + t.device_mlp * (m[0] + m[2])),
            host_ms: l * (t.host_attention * a[1] + t.host_mlp * m[1]),
        };
    }
    let ha = if group.host_attention { 1.0 } else { 0.0 };
    let kv_offloaded: Expression = kv[1] + kv[2];
    let kv_h2d = if phase == 1 && !group.host_attention {
        l * f.kv_read_gb * kv_offloaded.clone()
    } else {
        Expression::from(0.0)
    };
    let kv_disk = if phase == 1 { l * f.kv_read_gb * kv[2] } else { Expression::from(0.0) };
    let split = if group.host_attention { f.device_split_ms[phase] - f.device_fused_ms[phase] } else { 0.0 };
    PhaseLoad {
        streamed: visits * l * (f.attention_gb * (a[1] + a[2]) + f.mlp_moved_gb[phase] * (m[1] + m[2])) + kv_h2d,
        from_disk: visits * l * (f.attention_gb * a[2] + f.mlp_moved_gb[phase] * m[2]) + kv_disk,
        device_ms: l * f.device_fused_ms[phase] + l * split * kv_offloaded.clone(),
        host_ms: l * f.host_core_ms[phase] * ha * kv_offloaded,
    }
}
