//! What a plan's quantized weights add to compute, from the profile's measured rates
//! (`ComputeProfile::dequantize`), never from a constant: the time to decode them, and
//! the difference between the format's own product rate and the float peak the
//! task's FLOPs are otherwise charged at.
//!
//! A compute task that reads quantized weights decodes each of them once (the engine's
//! quantized kernels decode blocks inside the multiply); decoding and the multiply-adds
//! share the cores, memory streams beside both, so the task costs
//! `overhead + max(FLOPs time + dequantization time, bytes time)` at the format's real
//! bytes (`CostModel::compute_ns`), the products over its quantized weights at the
//! format's measured rate (8-bit integer products are not the float GEMM: over many
//! rows they ran 1.7× this machine's f32 peak). Where the profile has no rate for a
//! format — every datasheet GPU profile, older measured ones — the dequantization is
//! taken as fused into the matrix multiply at no extra cost, so the task is
//! memory-bound at its real bytes; `ferry_core::resolve::weight_format_notes` says so
//! beside the prediction.

use ferry_core::graph::Op;
use ferry_core::model::{GroupSize, ModelSpec, WeightFormat, WeightFormats, WeightGroup, WeightLayout};
use ferry_core::profile::{ComputeProfile, DequantRate, ProductRates, Profile};

/// Which processor's rates apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Device = 0,
    Host = 1,
}

/// What a task that reads quantized weights adds to its float price.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantized {
    /// Decoding, and the products at the format's rate rather than the float peak, ns
    /// (negative where the format's products outrun the peak), for weights resident as
    /// the kernel table measured them.
    pub extra_ns: f64,
    /// What weights in the file's row order add to that (`Task::weights_off_device`;
    /// the profile's `DequantRate::row_order`), ns: 0 for resident weights.
    pub row_order_ns: f64,
    /// The quantized formats of the weights the task multiplies by, each with its share
    /// of their weights (`FormatShares`): kernel tables measured over those formats
    /// price the task instead.
    pub shares: FormatShares,
}

/// Most formats one task's weights mix and still take the kernel table (a Q4_K_M
/// layer mixes two: Q4_K, and Q6_K for its value or down projection).
pub const MAX_MIXED_FORMATS: usize = 3;

/// The quantized formats of a task's weights and each one's share of them (summing to
/// 1), in the order the layout lists them. A task whose weights mix formats is priced
/// from the kernel table as the shares' mean of each format's entry: each format's
/// products take its share of the time a whole group in it takes, and the rest of the
/// task (norms, attention over the cache) is the same in every entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FormatShares {
    shares: [Option<(WeightFormat, f64)>; MAX_MIXED_FORMATS],
    /// More formats than fit: no table prices the task.
    overflow: bool,
}

impl FormatShares {
    /// Weights all in `format`.
    pub fn single(format: WeightFormat) -> FormatShares {
        let mut shares = [None; MAX_MIXED_FORMATS];
        shares[0] = Some((format, 1.0));
        FormatShares { shares, overflow: false }
    }

    /// The shares of `weights` (format, weights in it) by format.
    fn of(weights: impl Iterator<Item = (WeightFormat, f64)>) -> FormatShares {
        let mut out = FormatShares { shares: [None; MAX_MIXED_FORMATS], overflow: false };
        let mut total = 0.0;
        for (format, count) in weights {
            total += count;
            match out.shares.iter_mut().find(|slot| slot.is_none_or(|(f, _)| f == format)) {
                Some(slot) => *slot = Some((format, slot.map_or(0.0, |(_, c)| c) + count)),
                None => out.overflow = true,
            }
        }
        for (_, share) in out.shares.iter_mut().flatten() {
            *share /= total.max(f64::MIN_POSITIVE);
        }
        out
    }

    /// Each format and its share; `None` when they are more than `MAX_MIXED_FORMATS`.
    pub fn list(&self) -> Option<impl Iterator<Item = (WeightFormat, f64)> + '_> {
        (!self.overflow).then(|| self.shares.iter().flatten().copied())
    }
}

/// The dequantization costs of one plan's weights.
#[derive(Debug, Clone)]
pub struct Dequantization {
    layout: WeightLayout,
    /// Per side (device, host): each quantized format's measured rates (`None`: the
    /// profile has no figure).
    rates: [Vec<(WeightFormat, Option<DequantRate>)>; 2],
    /// Per side: the FLOPs rate the task's FLOPs are charged at.
    flops_per_s: [f64; 2],
    /// The q, k, v projections' share of a layer's attention weights.
    qkv_share: f64,
    num_layers: u64,
    model: ModelSpec,
}

impl Dequantization {
    /// `None` when the plan stores no weight quantized.
    pub fn new(profile: &Profile, model: &ModelSpec, formats: &WeightFormats) -> Option<Dequantization> {
        let layout = WeightLayout::of(model, formats);
        let mut used: Vec<WeightFormat> = Vec::new();
        for size in layout.all_groups().chain(std::iter::once(&layout.embedding_lookup(1))) {
            for (format, _) in &size.quantized {
                if !used.contains(format) {
                    used.push(*format);
                }
            }
        }
        if used.is_empty() {
            return None;
        }
        let rates_of = |compute: &ComputeProfile| -> Vec<(WeightFormat, Option<DequantRate>)> {
            used.iter().map(|&f| (f, compute.dequant_rate(&f.name()).cloned())).collect()
        };
        let (qkv_params, _) = model.attention_split_params();
        Some(Dequantization {
            rates: [rates_of(&profile.device_compute), rates_of(&profile.host_compute)],
            flops_per_s: [profile.device_compute.flops_per_s(), profile.host_compute.flops_per_s()],
            qkv_share: qkv_params as f64 / model.params().attention_per_layer.max(1) as f64,
            num_layers: model.num_layers,
            layout,
            model: model.clone(),
        })
    }

    /// What the quantized weights an `op` task of `layer` (`None`: the mean layer) reads
    /// over `rows` rows on `side` add to its float price, in the file's row order or not
    /// (`row_order`: `Task::weights_off_device`); `None` when it reads none.
    pub fn task(&self, side: Side, op: Op, layer: Option<u64>, rows: u64, row_order: bool) -> Option<Quantized> {
        match layer {
            Some(layer) => self.layer(side, op, layer, rows, row_order),
            None if self.layout.layers_alike() => self.layer(side, op, 0, rows, row_order),
            None => {
                let per_layer: Vec<Quantized> =
                    (0..self.num_layers).filter_map(|l| self.layer(side, op, l, rows, row_order)).collect();
                let mean = |ns: fn(&Quantized) -> f64| per_layer.iter().map(ns).sum::<f64>() / self.num_layers as f64;
                // The mean layer's formats: each layer's shares, averaged (a table
                // price is linear in them).
                let mut shares =
                    FormatShares::of(per_layer.iter().flat_map(|q| q.shares.shares.iter().flatten().copied()));
                shares.overflow |= per_layer.iter().any(|q| q.shares.overflow);
                Some(Quantized { extra_ns: mean(|q| q.extra_ns), row_order_ns: mean(|q| q.row_order_ns), shares })
            }
        }
    }

    fn layer(&self, side: Side, op: Op, layer: u64, rows: u64, row_order: bool) -> Option<Quantized> {
        let lookup;
        // The group, the share of its bytes the task reads and the share of its weights
        // each row multiplies by.
        let (size, read, multiplied): (&GroupSize, f64, f64) = match op {
            Op::Attention => (self.layout.group(WeightGroup::Attention, layer), 1.0, 1.0),
            Op::AttnQkv => (self.layout.group(WeightGroup::Attention, layer), self.qkv_share, self.qkv_share),
            Op::AttnOut => {
                let share = 1.0 - self.qkv_share;
                (self.layout.group(WeightGroup::Attention, layer), share, share)
            }
            Op::Mlp => {
                let size = self.layout.group(WeightGroup::Mlp, layer);
                let read = self.model.mlp_bytes_read(rows, size.bytes) as f64 / size.bytes.max(1) as f64;
                // A token multiplies by its own experts only (the router stays float).
                let multiplied = match self.model.num_experts {
                    0 => 1.0,
                    experts => self.model.experts_per_token as f64 / experts as f64,
                };
                (size, read, multiplied)
            }
            Op::Head => (self.layout.group(WeightGroup::Head, 0), 1.0, 1.0),
            Op::Embed => {
                lookup = self.layout.embedding_lookup(rows);
                (&lookup, 1.0, 0.0)
            }
            // The router is a few rows per expert: nothing to speak of to decode.
            Op::AttnCore | Op::Route => return None,
        };
        if !size.is_quantized() {
            return None;
        }
        let rates = &self.rates[side as usize];
        let peak = self.flops_per_s[side as usize];
        let (mut extra_ns, mut row_order_ns) = (0.0, 0.0);
        for (format, bytes) in &size.quantized {
            let Some(rate) = rates.iter().find(|(f, _)| f == format).and_then(|(_, r)| r.as_ref()) else {
                continue;
            };
            let decode_ns = *bytes as f64 * read / rate.bytes_per_s * 1e9;
            // The products at the format's rate instead of the peak the task's FLOPs
            // are charged at.
            let flops = 2.0 * rows as f64 * format.weights_in(*bytes) * multiplied;
            let product_ns = rate.product_flops_per_s.map_or(0.0, |r| flops / r * 1e9 - flops / peak * 1e9);
            extra_ns += decode_ns + product_ns;
            if row_order && rate.row_order.is_some() {
                // Decoding and products at the row order's rates, less at the resident's.
                let seconds = |rates: ProductRates| {
                    *bytes as f64 * read / rates.bytes_per_s + flops / rates.product_flops_per_s.unwrap_or(peak)
                };
                row_order_ns += (seconds(rate.rates(true)) - seconds(rate.rates(false))) * 1e9;
            }
        }
        let shares =
            FormatShares::of(size.quantized.iter().map(|(format, bytes)| (*format, format.weights_in(*bytes))));
        Some(Quantized { extra_ns, row_order_ns, shares })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::CostModel;
    use ferry_core::catalog::Catalog;
    use ferry_core::hardware::Hardware;
    use ferry_core::model::Dtype;
    use ferry_core::plan::{Policy, Workload};
    use ferry_core::profile::KernelTiming;

    fn setup() -> (ModelSpec, Profile) {
        let catalog = Catalog::builtin().unwrap();
        let model = catalog.model("test-tiny").unwrap().value;
        let profile = Profile::from_datasheet(&Hardware {
            gpu: catalog.gpu("cpu").unwrap().value,
            host: catalog.host("ferry-ci-vm").unwrap().value,
        });
        (model, profile)
    }

    fn rate(bytes_per_s: f64, product_flops_per_s: Option<f64>) -> DequantRate {
        DequantRate { format: "q8_0".into(), bytes_per_s, product_flops_per_s, row_order: None }
    }

    fn q8_0() -> WeightFormats {
        WeightFormats::uniform(WeightFormat::parse("q8_0").unwrap())
    }

    /// test-tiny's MLP: gate and up are 352 × 128, down 128 × 352; in Q8_0 every row of
    /// 128 values is 4 blocks of 34 bytes, of 352 values 11 blocks: 47,872 bytes each.
    const MLP_Q8_0_BYTES: f64 = (2 * 352 * 4 * 34 + 128 * 11 * 34) as f64;

    /// The ns a quantized task adds, asserting it has one format.
    fn extra_ns(c: &CostModel, on_host: bool, model_rows: (Option<u64>, u64)) -> Option<f64> {
        let q = c.quantized(on_host, Op::Mlp, model_rows.0, model_rows.1, false)?;
        assert_eq!(q.shares, FormatShares::single(WeightFormat::parse("q8_0").unwrap()));
        Some(q.extra_ns)
    }

    #[test]
    fn dequantization_is_charged_at_the_profile_rate_and_only_there() {
        let (model, mut profile) = setup();
        let float =
            CostModel::for_formats(&profile, &model, &WeightFormats::float(ferry_core::model::Dtype::F16).unwrap());
        assert_eq!(float.quantized(false, Op::Mlp, Some(0), 1, false), None, "float weights decode nothing");
        // No rate: quantized, priced as fused (nothing added).
        let unpriced = CostModel::for_formats(&profile, &model, &q8_0());
        assert_eq!(extra_ns(&unpriced, false, (Some(0), 1)), Some(0.0));
        assert_eq!(unpriced.quantized(false, Op::AttnCore, Some(0), 1, false), None);
        // 1 GB/s: one ns per quantized byte, on the side that has the rate only.
        profile.device_compute.dequantize.push(rate(1e9, None));
        let priced = CostModel::for_formats(&profile, &model, &q8_0());
        let ns = extra_ns(&priced, false, (Some(0), 1)).unwrap();
        assert!((ns - MLP_Q8_0_BYTES).abs() < 1e-6, "{ns}");
        assert_eq!(extra_ns(&priced, true, (Some(0), 1)), Some(0.0));
        assert_eq!(extra_ns(&priced, false, (None, 1)), Some(ns), "every layer alike");
    }

    #[test]
    fn a_formats_measured_product_rate_replaces_the_peak_for_its_products() {
        let (model, mut profile) = setup();
        let peak = profile.device_compute.flops_per_s();
        profile.device_compute.dequantize.push(rate(1e9, Some(2.0 * peak)));
        let c = CostModel::for_formats(&profile, &model, &q8_0());
        let weights = (3 * 352 * 128) as f64;
        for rows in [1u64, 64] {
            let flops = 2.0 * rows as f64 * weights;
            let q = c.quantized(false, Op::Mlp, Some(0), rows, false).unwrap();
            let want = MLP_Q8_0_BYTES + flops / (2.0 * peak) * 1e9 - flops / peak * 1e9;
            assert!((q.extra_ns - want).abs() < 1e-6 * want.abs(), "{rows} rows: {q:?} against {want}");
            // The task: its FLOPs at the format's rate, its bytes decoded once.
            let compute = &profile.device_compute;
            let task = c.compute_ns(compute, Op::Mlp, flops as u64, 1, rows, 0, Some(q));
            let want = compute.task_overhead_ns as f64 + flops / (2.0 * peak) * 1e9 + MLP_Q8_0_BYTES;
            assert!((task - want).abs() < 1e-6 * want, "{rows} rows: {task} against {want}");
        }
        // A mixture of experts: a token multiplies by its own experts' weights only.
        let moe = Catalog::builtin().unwrap().model("test-moe").unwrap().value;
        let formats = q8_0();
        let without = {
            let mut p = profile.clone();
            p.device_compute.dequantize[0].product_flops_per_s = None;
            extra_ns(&CostModel::for_formats(&p, &moe, &formats), false, (Some(0), 64)).unwrap()
        };
        let with = extra_ns(&CostModel::for_formats(&profile, &moe, &formats), false, (Some(0), 64)).unwrap();
        let layout = WeightLayout::of(&moe, &formats);
        let experts: f64 = layout.group(WeightGroup::Mlp, 0).quantized.iter().map(|(f, b)| f.weights_in(*b)).sum();
        let routed = experts * moe.experts_per_token as f64 / moe.num_experts as f64;
        let want = -2.0 * 64.0 * routed / (2.0 * peak) * 1e9;
        assert!(((with - without) - want).abs() < 1e-6 * want.abs(), "{} against {want}", with - without);
    }

    #[test]
    fn weights_in_the_files_row_order_add_that_orders_rates_to_the_table_and_the_roofline() {
        let (model, mut profile) = setup();
        let peak = profile.device_compute.flops_per_s();
        let mut q8_rate = rate(1e9, Some(2.0 * peak));
        // Decoding at half the rate (one ns more per byte), products at the peak.
        q8_rate.row_order = Some(ProductRates { bytes_per_s: 0.5e9, product_flops_per_s: Some(peak) });
        profile.device_compute.dequantize.push(q8_rate);
        let shape = crate::cost::shape_key(&model);
        let timing = KernelTiming { op: "mlp".into(), shape, tokens: 1, context: 0, ns: 33_333_333, format: None };
        profile.device_compute.table.push(KernelTiming { format: Some("q8_0".into()), ..timing });
        let c = CostModel::for_formats(&profile, &model, &q8_0());
        let compute = &profile.device_compute;
        let flops = 2.0 * (3 * 352 * 128) as f64;
        let resident = c.quantized(false, Op::Mlp, Some(0), 1, false).unwrap();
        assert_eq!(resident.row_order_ns, 0.0);
        let streamed = c.quantized(false, Op::Mlp, Some(0), 1, true).unwrap();
        assert_eq!(streamed.extra_ns, resident.extra_ns);
        let want = MLP_Q8_0_BYTES + flops / peak * 1e9 - flops / (2.0 * peak) * 1e9;
        assert!((streamed.row_order_ns - want).abs() < 1e-6 * want, "{streamed:?} against {want}");
        // The table measured resident weights: the row order adds to its entry.
        let table = |q| c.compute_ns(compute, Op::Mlp, flops as u64, 1, 1, 0, Some(q));
        assert_eq!(table(resident), 33_333_333.0);
        assert!((table(streamed) - 33_333_333.0 - want).abs() < 1e-6 * want);
        // Without a table, the roofline at the row order's rates.
        let mut untabled = profile.clone();
        untabled.device_compute.table.clear();
        let c = CostModel::for_formats(&untabled, &model, &q8_0());
        let roofline = |q| c.compute_ns(&untabled.device_compute, Op::Mlp, flops as u64, 1, 1, 0, Some(q));
        assert!((roofline(streamed) - roofline(resident) - want).abs() < 1e-6 * want);
        // A profile that measured one order prices both alike.
        let mut one_order = untabled.clone();
        one_order.device_compute.dequantize[0].row_order = None;
        let c = CostModel::for_formats(&one_order, &model, &q8_0());
        assert_eq!(c.quantized(false, Op::Mlp, Some(0), 1, true).unwrap().row_order_ns, 0.0);
    }

    #[test]
    fn quantized_tasks_take_the_kernel_table_of_their_own_format_only() {
        let (model, mut profile) = setup();
        let shape = crate::cost::shape_key(&model);
        let entry = |ns: u64, format: Option<&str>| KernelTiming {
            op: "mlp".into(),
            shape: shape.clone(),
            tokens: 1,
            context: 0,
            ns,
            format: format.map(str::to_string),
        };
        profile.device_compute.table.push(entry(77_777_777, None));
        profile.device_compute.table.push(entry(55_555_555, Some("q4_0")));
        let c = CostModel::for_formats(&profile, &model, &q8_0());
        let compute = &profile.device_compute;
        assert_eq!(c.compute_ns(compute, Op::Mlp, 1000, 1000, 1, 0, None), 77_777_777.0, "float: float entries");
        let q8_0_format = WeightFormat::parse("q8_0").unwrap();
        let q8 =
            |extra_ns: f64| Some(Quantized { extra_ns, row_order_ns: 0.0, shares: FormatShares::single(q8_0_format) });
        let roofline = c.compute_ns(compute, Op::Mlp, 1000, 1000, 1, 0, q8(0.0));
        assert!(roofline < 1e6, "neither the float nor another format's entries: {roofline}");
        assert!(c.compute_ns(compute, Op::Mlp, 1000, 1000, 1, 0, q8(5e6)) > 5e6, "decoding adds to the FLOPs");
        // A table measured over the plan's format prices it.
        profile.device_compute.table.push(entry(33_333_333, Some("q8_0")));
        let c = CostModel::for_formats(&profile, &model, &q8_0());
        assert_eq!(c.compute_ns(&profile.device_compute, Op::Mlp, 1000, 1000, 1, 0, q8(0.0)), 33_333_333.0);
        // Weights mixing formats: each format's entry for its share of the weights.
        let compute = &profile.device_compute;
        let q4_0_format = WeightFormat::parse("q4_0").unwrap();
        let mixed = |formats: [(WeightFormat, f64); 3]| {
            let shares = FormatShares::of(formats.into_iter());
            Some(Quantized { extra_ns: 0.0, row_order_ns: 0.0, shares })
        };
        let ns = c.compute_ns(
            compute,
            Op::Mlp,
            1000,
            1000,
            1,
            0,
            mixed([(q8_0_format, 5.0), (q4_0_format, 3.0), (q8_0_format, 2.0)]),
        );
        let want = 0.7 * 33_333_333.0 + 0.3 * 55_555_555.0;
        assert!((ns - want).abs() < 1.0, "{ns} against {want}");
        // A format without an entry: the roofline.
        let q6_k_format = WeightFormat::parse("q6_k").unwrap();
        let unmeasured = mixed([(q8_0_format, 5.0), (q6_k_format, 3.0), (q8_0_format, 2.0)]);
        assert!(c.compute_ns(compute, Op::Mlp, 1000, 1000, 1, 0, unmeasured) < 1e6);
        // More formats than a task's table price mixes: the roofline.
        let q4_k_format = WeightFormat::parse("q4_k").unwrap();
        let formats = [q8_0_format, q4_0_format, q6_k_format, q4_k_format].map(|f| (f, 1.0));
        let many = Some(Quantized { extra_ns: 0.0, row_order_ns: 0.0, shares: FormatShares::of(formats.into_iter()) });
        assert!(c.compute_ns(compute, Op::Mlp, 1000, 1000, 1, 0, many) < 1e6);
    }

    #[test]
    fn a_slow_measured_decoder_slows_the_prediction() {
        let (model, mut profile) = setup();
        let workload = Workload { batch_size: 1, prompt_len: 8, gen_len: 4 };
        let mut policy = Policy::all_on_device(model.num_layers, 1, ferry_core::model::Dtype::F32);
        policy.set_weight_format(q8_0());
        let tokens_per_s = |profile: &Profile| {
            crate::predict(&policy, &model, &workload, profile, crate::Extrapolation::Full)
                .unwrap()
                .metrics
                .tokens_per_s
        };
        let fused = tokens_per_s(&profile);
        // 10 MB/s: each layer's 0.2 MB of Q8_0 weights take milliseconds to decode.
        profile.device_compute.dequantize.push(rate(1e7, None));
        let slow = tokens_per_s(&profile);
        assert!(slow < fused / 2.0, "{slow} vs {fused}");
    }

    #[test]
    fn a_slower_row_order_slows_the_plans_that_stream_and_only_them() {
        let (model, mut profile) = setup();
        let workload = Workload { batch_size: 1, prompt_len: 8, gen_len: 4 };
        let resident = Policy { weight_format: q8_0(), ..Policy::all_on_device(model.num_layers, 1, Dtype::F32) };
        let streamed = Policy {
            mlp_weights: ferry_core::plan::TierCounts::all(ferry_core::plan::Tier::Disk, model.num_layers),
            ..resident.clone()
        };
        let tokens_per_s = |policy: &Policy, profile: &Profile| {
            crate::predict(policy, &model, &workload, profile, crate::Extrapolation::Full).unwrap().metrics.tokens_per_s
        };
        profile.device_compute.dequantize.push(rate(1e8, None));
        let before = [tokens_per_s(&resident, &profile), tokens_per_s(&streamed, &profile)];
        // The file's row order decoded at a tenth of the rate.
        profile.device_compute.dequantize[0].row_order =
            Some(ProductRates { bytes_per_s: 1e7, product_flops_per_s: None });
        let after = [tokens_per_s(&resident, &profile), tokens_per_s(&streamed, &profile)];
        assert_eq!(after[0], before[0], "resident weights keep their order");
        assert!(after[1] < before[1] / 2.0, "streamed: {} against {}", after[1], before[1]);
    }
}
