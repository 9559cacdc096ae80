//! Plan files written by earlier releases keep working: every plan in
//! `tests/fixtures/plans-0.1/` (the shipped examples and `ferry tune` outputs of
//! Ferry 0.1) loads and predicts exactly the figures that release printed, on the
//! hardware figures that release had: where the catalog has since learnt a device's
//! published sustained rate (`sustained:` in `configs/gpus/`), the plan is predicted
//! with its datasheet profile at the old pricing (peak × 0.7), so what is checked is
//! the plan's handling, not the catalog's figures.

use std::path::Path;
use std::process::Command;

#[test]
fn plans_from_the_previous_release_predict_the_same_figures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/plans-0.1");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let expected = expected.as_object().unwrap();
    assert!(expected.len() >= 10, "fixtures missing");
    let scratch = tempfile::tempdir().unwrap();
    for (file, figures) in expected {
        let plan = at_release_figures(&dir.join(file), scratch.path());
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["simulate", "--json", "--plan"])
            .arg(&plan)
            .output()
            .unwrap();
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let metrics = json.get("metrics").unwrap_or(&json);
        for key in ["tokens_per_s", "time_to_first_token_ns", "time_per_output_token_ns", "total_ns"] {
            assert_eq!(metrics[key], figures[key], "{file}: {key}");
        }
    }
}

/// `plan` itself, or where its GPU now has a sustained rate in the catalog, a copy in
/// `scratch` naming a profile with the figures Ferry 0.1 derived for that GPU (in its
/// usual host, as every such fixture has it). Written as JSON, which YAML reads.
fn at_release_figures(plan: &Path, scratch: &Path) -> std::path::PathBuf {
    let yaml = |text: &str| -> serde_json::Value { ferry_core::yaml::from_yaml_str(text, "fixture").unwrap() };
    let ferry = |args: &[&str]| -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry")).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let mut plan_value = yaml(&std::fs::read_to_string(plan).unwrap());
    let Some(gpu) = plan_value["hardware"]["gpu"].as_str().map(str::to_string) else { return plan.to_path_buf() };
    let spec: serde_json::Value = serde_json::from_str(&ferry(&["show", "gpu", &gpu, "--json"])).unwrap();
    if spec.get("sustained").is_none() {
        return plan.to_path_buf();
    }
    if let Some(host) = plan_value["hardware"]["host"].as_str() {
        assert_eq!(host, spec["default_host"].as_str().unwrap(), "{}: a fixture in another host", plan.display());
    }
    let mut profile = yaml(&ferry(&["show", "profile", &gpu]));
    profile["device_compute"]["peak_flops"] = (spec["fp16_tflops"].as_f64().unwrap() * 1e12).into();
    let efficiency = ferry_core::profile::datasheet_assumptions::GPU_MATMUL_EFFICIENCY;
    profile["device_compute"]["matmul_efficiency"] = efficiency.into();
    let stem = plan.file_stem().unwrap().to_string_lossy().to_string();
    let profile_path = scratch.join(format!("{stem}-profile.yaml"));
    std::fs::write(&profile_path, serde_json::to_string(&profile).unwrap()).unwrap();
    plan_value["hardware"] = serde_json::json!({ "profile": profile_path.display().to_string() });
    let copy = scratch.join(format!("{stem}.yaml"));
    std::fs::write(&copy, serde_json::to_string(&plan_value).unwrap()).unwrap();
    copy
}
