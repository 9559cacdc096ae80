//! A prediction's interval from the profile's drift: the plan simulated with every
//! resource at its slowest and at its fastest recorded rate.

use ferry_core::catalog::Catalog;
use ferry_core::hardware::Hardware;
use ferry_core::model::{Dtype, ModelSpec};
use ferry_core::plan::{Policy, Schedule, TierCounts, Workload};
use ferry_core::profile::{Drift, Profile, RateRange, RateResource};
use ferry_sim::{interval, predict, Extrapolation, Interval};

/// test-small streaming most of its MLP weights from disk on the cpu device: a plan
/// whose speed depends on both the disk and the processor.
fn setup() -> (ModelSpec, Profile, Policy, Workload) {
    let catalog = Catalog::builtin().unwrap();
    let model = catalog.model("test-small").unwrap().value;
    let hardware =
        Hardware { gpu: catalog.gpu("cpu").unwrap().value, host: catalog.host("ferry-ci-vm").unwrap().value };
    let profile = Profile::from_datasheet(&hardware);
    let mut policy = Policy::all_on_device(model.num_layers, 1, Dtype::F32);
    policy.schedule = Schedule::LayerPrefetch;
    policy.prefetch_depth = 1;
    policy.mlp_weights = TierCounts { device: 4, host: 0, disk: model.num_layers - 4 };
    (model, profile, policy, Workload { batch_size: 1, prompt_len: 8, gen_len: 4 })
}

fn with_drift(profile: &Profile, disk: (f64, f64), compute: (f64, f64)) -> Profile {
    let range = |resource, (low, high)| RateRange { resource, low, high };
    let rates = vec![range(RateResource::Disk, disk), range(RateResource::DeviceCompute, compute)];
    Profile { drift: Some(Drift { basis: "test".into(), rates }), ..profile.clone() }
}

fn interval_of(profile: &Profile) -> Option<Interval> {
    let (model, _, policy, workload) = setup();
    interval(&policy, &model, &workload, profile, Extrapolation::Full).unwrap()
}

#[test]
fn the_interval_brackets_the_prediction_and_widens_with_the_drift() {
    let (model, profile, policy, workload) = setup();
    assert_eq!(interval_of(&profile), None, "no drift, no interval");
    let predicted = predict(&policy, &model, &workload, &profile, Extrapolation::Full).unwrap().metrics.tokens_per_s;
    let narrow = interval_of(&with_drift(&profile, (0.8, 1.2), (0.9, 1.1))).unwrap();
    assert!(narrow.slow_tokens_per_s < predicted && predicted < narrow.fast_tokens_per_s, "{narrow:?} {predicted}");
    assert!(narrow.covers(predicted) && !narrow.covers(predicted * 10.0));
    let wide = interval_of(&with_drift(&profile, (0.5, 1.5), (0.7, 1.3))).unwrap();
    assert!(wide.slow_tokens_per_s < narrow.slow_tokens_per_s && wide.fast_tokens_per_s > narrow.fast_tokens_per_s);
    // Ranges of exactly 1 are the prediction itself.
    let none = interval_of(&with_drift(&profile, (1.0, 1.0), (1.0, 1.0))).unwrap();
    assert!((none.slow_tokens_per_s / predicted - 1.0).abs() < 1e-9);
    assert!((none.fast_tokens_per_s / predicted - 1.0).abs() < 1e-9);
    // A machine that only ever ran slower than its profile: the interval lies below.
    let slower = interval_of(&with_drift(&profile, (0.4, 0.9), (0.6, 0.95))).unwrap();
    assert!(slower.fast_tokens_per_s < predicted);
}

#[test]
fn a_drift_that_makes_no_sense_is_refused_naming_the_field() {
    let (_, profile, _, _) = setup();
    let bad = with_drift(&profile, (1.2, 0.8), (1.0, 1.0));
    let error = bad.validate().unwrap_err().to_string();
    assert!(error.contains("drift.rates[0].high"), "{error}");
    let bad = with_drift(&profile, (f64::NAN, 1.0), (1.0, 1.0));
    assert!(bad.validate().unwrap_err().to_string().contains("drift.rates[0].low"));
}
