//! `ferry profile --draft`'s measurement: the engine's own count of the draft tokens a
//! target accepts. A target whose later layers are damped agrees with its own first
//! layer far more often than one whose layers all matter; the rate is a rate, and it
//! is what the engine measured (the same run gives the same count).

use ferry_core::catalog::Catalog;
use ferry_core::hardware::Hardware;
use ferry_core::model::Dtype;
use ferry_core::plan::Draft;
use ferry_core::profile::Profile;
use ferry_engine::synth::{synthesize_damped, Damping};
use ferry_engine::weights::ModelFiles;
use ferry_profiler::acceptance::{measure_acceptance, AcceptanceRun};

#[test]
fn a_damped_target_accepts_its_first_layer_far_more_often_than_an_undamped_one() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::builtin().unwrap();
    let spec = catalog.model("test-tiny").unwrap().value;
    let profile = Profile::from_datasheet(&Hardware {
        gpu: catalog.gpu("cpu").unwrap().value,
        host: catalog.host("ferry-ci-vm").unwrap().value,
    });
    let damping = Some(Damping { from_layer: 1, factor: 0.05 });
    let mut rates = Vec::new();
    for (name, damping) in [("damped", damping), ("plain", None)] {
        let folder = dir.path().join(name);
        synthesize_damped(&spec, Dtype::F32, 3, damping, &folder, false, |_, _| {}).unwrap();
        let files = ModelFiles::open(&folder).unwrap();
        let run = AcceptanceRun::new(true, 4);
        let draft = Draft::SelfLayers { layers: 1 };
        let measured = measure_acceptance(&files, draft, None, "self:1", &profile, run, dir.path()).unwrap();
        assert!((0.0..=1.0).contains(&measured.acceptance_rate), "{measured:?}");
        assert!(measured.judged > 0 && measured.draft == "self:1" && measured.target == name, "{measured:?}");
        // Deterministic: the same prompts and weights judge the same tokens.
        let again = measure_acceptance(&files, draft, None, "self:1", &profile, run, dir.path()).unwrap();
        assert_eq!((again.acceptance_rate, again.judged), (measured.acceptance_rate, measured.judged));
        rates.push(measured.acceptance_rate);
    }
    assert!(rates[0] > 0.5 && rates[0] > rates[1] + 0.3, "damped {} against plain {}", rates[0], rates[1]);
}
