//! How predictions are presented, end to end with the real binary: a profile with a
//! recorded drift gives `tune`, the plan it writes and `simulate` an interval around the
//! prediction (a profile without one gives none), and `tune` says why its plan heads
//! the list when a runner-up is predicted faster.

mod common;

use common::{ferry, text};

#[test]
fn a_profile_with_drift_gives_every_prediction_an_interval() {
    let dir = tempfile::tempdir().unwrap();
    let profile = text(&ferry(dir.path(), &["show", "profile", "cpu"]).stdout);
    let drift = "drift:\n  basis: a test's\n  rates:\n  - resource: disk\n    low: 0.5\n    high: 1.4\n  \
                 - resource: device_compute\n    low: 0.8\n    high: 1.1\n";
    std::fs::write(dir.path().join("drift.yaml"), format!("{profile}{drift}")).unwrap();
    let tune = [
        "tune",
        "--profile",
        "drift.yaml",
        "--model",
        "test-small",
        "--device-mem",
        "100MiB",
        "--batch",
        "1",
        "--prompt-len",
        "16",
        "--gen-len",
        "4",
        "--out",
        "plan.yaml",
    ];
    let out = ferry(dir.path(), &tune);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("interval: every resource at the slowest") && stdout.contains("a test's"), "{stdout}");
    // So does every row of the baselines table that has a speed.
    let rows = |stdout: &str| -> Vec<String> {
        let table = stdout.lines().skip_while(|l| !l.starts_with("Compared with baseline policies"));
        table
            .skip(3)
            .take_while(|l| !l.trim().is_empty() && !l.starts_with("  "))
            .filter(|l| !l.contains(" — "))
            .map(str::to_string)
            .collect()
    };
    let baselines = rows(&stdout);
    assert!(baselines.len() >= 2 && baselines[0].starts_with("ferry (this plan)"), "{stdout}");
    assert!(baselines.iter().all(|r| r.contains('–')), "{baselines:#?}");
    let plan = std::fs::read_to_string(dir.path().join("plan.yaml")).unwrap();
    assert!(plan.contains("tokens_per_s_interval"), "{plan}");
    let out = ferry(dir.path(), &["simulate", "--plan", "plan.yaml", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let predicted = json["metrics"]["tokens_per_s"].as_f64().unwrap();
    let [slow, fast] = [0, 1].map(|i| json["tokens_per_s_interval"][i].as_f64().unwrap());
    assert!(slow < predicted && predicted < fast, "{slow} {predicted} {fast}");
    // Without a drift there is no interval, and the outputs say nothing of one.
    let mut plain = tune.to_vec();
    plain[1..3].copy_from_slice(&["--gpu", "cpu"]);
    let last = plain.len() - 1;
    plain[last] = "plain.yaml";
    let out = ferry(dir.path(), &plain);
    assert!(out.status.success() && !text(&out.stdout).contains("interval"), "{}", text(&out.stdout));
    assert!(rows(&text(&out.stdout)).iter().all(|r| !r.contains('–')), "{}", text(&out.stdout));
    let out = ferry(dir.path(), &["simulate", "--plan", "plain.yaml", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["tokens_per_s_interval"].is_null());
}

/// A GPU's datasheet profile has no drift: its predictions carry the spread the
/// calibration set has shown between published speeds and Ferry's predictions.
#[test]
fn a_gpu_datasheet_prediction_carries_the_calibration_sets_spread() {
    let dir = tempfile::tempdir().unwrap();
    let tune = [
        "tune",
        "--gpu",
        "t4",
        "--model",
        "opt-6.7b",
        "--batch",
        "2",
        "--prompt-len",
        "64",
        "--gen-len",
        "8",
        "--out",
        "plan.yaml",
    ];
    let out = ferry(dir.path(), &tune);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("interval: real systems' published speeds ran"), "{stdout}");
    let out = ferry(dir.path(), &["simulate", "--plan", "plan.yaml", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let predicted = json["metrics"]["tokens_per_s"].as_f64().unwrap();
    let [slow, fast] = [0, 1].map(|i| json["tokens_per_s_interval"][i].as_f64().unwrap());
    let (low, high) = ferry_sim::calibration::DATASHEET_PUBLISHED_OVER_PREDICTED;
    assert!((slow - predicted * low).abs() < 1e-9 * predicted, "{slow} against {predicted} × {low}");
    assert!((fast - predicted * high).abs() < 1e-9 * predicted, "{fast} against {predicted} × {high}");
    // Each format's best plan in a comparison carries its own.
    let mut compare = tune[..tune.len() - 2].to_vec();
    compare.extend(["--weight-format", "q8_0,f16", "--json"]);
    let out = ferry(dir.path(), &compare);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for row in json["formats"].as_array().unwrap() {
        let predicted = row["tokens_per_s"].as_f64().unwrap();
        let slow = row["tokens_per_s_interval"][0].as_f64().unwrap();
        assert!((slow - predicted * low).abs() < 1e-9 * predicted, "{row}");
    }
}

/// The plan heads the list even where a runner-up is predicted a little faster (the
/// simplest near-tie wins); the output then says why, and only then.
#[test]
fn a_faster_runner_up_comes_with_the_reason_the_plan_heads_the_list() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(dir.path(), &["tune", "--gpu", "rtx3060", "--model", "13b"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let number = |line: &str, at: usize| line.split_whitespace().nth(at).and_then(|w| w.parse::<f64>().ok());
    let best = stdout.lines().find(|l| l.starts_with("throughput")).and_then(|l| number(l, 1)).unwrap();
    // Rows of the runners-up table start with their rank; the second column is tokens/s.
    let runners: Vec<f64> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("Runners-up"))
        .filter(|l| l.split_whitespace().next().is_some_and(|w| w.parse::<u32>().is_ok()))
        .filter_map(|l| number(l, 1))
        .collect();
    assert!(!runners.is_empty(), "{stdout}");
    let said = stdout.contains("the plan is the simplest within 0.5 % of the fastest");
    assert_eq!(said, runners.iter().any(|&r| r > best), "best {best}, runners-up {runners:?}:\n{stdout}");
}
