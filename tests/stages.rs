//! Plans over several devices, end to end through the binary: a two-stage plan on two
//! cpu devices (each with its own RAM budget, half the layers each, the hidden state
//! crossing the link between them) simulates with per-device figures and runs with
//! exactly the tokens of the one-stage plan.

mod common;

use common::{ferry, text, TINY_PLAN as ONE_STAGE};

fn two_stages() -> String {
    ONE_STAGE
        .replace("  device_memory: 64MiB\n", "  devices:\n    - memory: 24MiB\n    - memory: 24MiB\n")
        .replace("  attention_weights: {device: 1, host: 0, disk: 3}\n", "")
        .replace("  mlp_weights: {device: 2, host: 0, disk: 2}\n", "")
        .replace("  kv_cache: {device: 3, host: 0, disk: 1}\n", "")
        + "  stages:
    - device: 0
      attention_weights: {device: 1, host: 0, disk: 1}
      mlp_weights: {device: 1, host: 0, disk: 1}
      kv_cache: {device: 2, host: 0, disk: 0}
    - device: 1
      attention_weights: {device: 0, host: 0, disk: 2}
      mlp_weights: {device: 1, host: 0, disk: 1}
      kv_cache: {device: 1, host: 0, disk: 1}
"
}

#[test]
fn two_stages_on_two_cpu_devices_simulate_and_run_with_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let synth = ferry(dir.path(), &["synth", "--model", "test-tiny", "--dtype", "f32", "--out", "tiny"]);
    assert!(synth.status.success(), "{}", text(&synth.stderr));
    std::fs::write(dir.path().join("one.yaml"), ONE_STAGE).unwrap();
    std::fs::write(dir.path().join("two.yaml"), two_stages()).unwrap();

    let out = ferry(dir.path(), &["simulate", "--plan", "two.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for needle in ["device 0 compute", "device 1 compute", "device 0→device 1", "stage 1", "device 1  "] {
        assert!(stdout.contains(needle), "'{needle}' missing:\n{stdout}");
    }

    let run = |plan: &str| -> serde_json::Value {
        let out = ferry(dir.path(), &["run", "--model-dir", "tiny", "--plan", plan, "--json"]);
        assert!(out.status.success(), "{plan}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let one = run("one.yaml");
    let two = run("two.yaml");
    assert_eq!(one["tokens"], two["tokens"], "the split over two devices changed the tokens");
    let pools = two["metrics"]["pools"].as_array().unwrap();
    let devices: Vec<&serde_json::Value> = pools.iter().filter(|p| p["pool"] != "host0").collect();
    assert_eq!(devices.len(), 2, "{pools:?}");
    for pool in devices {
        assert!(pool["peak_bytes"].as_u64().unwrap() <= pool["capacity_bytes"].as_u64().unwrap(), "{pool}");
    }
    let link = two["metrics"]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["resource"]["kind"] == "link" && r["resource"]["from"] == "device0" && r["resource"]["to"] == "device1"
        })
        .expect("a device0→device1 link");
    assert!(link["busy_ns"].as_u64().unwrap() > 0, "activations crossed the link: {link}");
    // The human report names both devices too.
    let out = ferry(dir.path(), &["run", "--model-dir", "tiny", "--plan", "two.yaml"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("device 1 compute") && stdout.contains("over 2 devices"), "{stdout}");
}

#[test]
fn a_stage_on_a_missing_device_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let plan = two_stages()
        .replace("model: tiny", "model: test-tiny")
        .replace("  devices:\n    - memory: 24MiB\n    - memory: 24MiB\n", "  device_memory: 64MiB\n");
    std::fs::write(dir.path().join("two.yaml"), plan).unwrap();
    let out = ferry(dir.path(), &["simulate", "--plan", "two.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("device 1") && stderr.contains("hardware.devices"), "{stderr}");
    // Totals that contradict the stages are named.
    let bad = two_stages()
        .replace("model: tiny", "model: test-tiny")
        .replace("  stages:", "  kv_cache: {device: 4, host: 0, disk: 0}\n  stages:");
    std::fs::write(dir.path().join("bad.yaml"), bad).unwrap();
    let out = ferry(dir.path(), &["simulate", "--plan", "bad.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("kv_cache says 4 device / 0 host / 0 disk but the stages add up to 3 device"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_shipped_two_device_example_simulates_without_deadlock() {
    // Its stages stream 66 MiB MLP layers through 320 MiB budgets with two
    // micro-batches: prefetch gates must be per device, or a later visit's loads take
    // a device's memory while an earlier visit's loads wait on the other device.
    let dir = tempfile::tempdir().unwrap();
    let example = ferry(dir.path(), &["simulate", "--example", "cpu-two-devices-tinyllama"]);
    assert!(example.status.success(), "{}", text(&example.stderr));
    std::fs::write(dir.path().join("plan.yaml"), &example.stdout).unwrap();
    let out = ferry(dir.path(), &["simulate", "--plan", "plan.yaml", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["metrics"]["tokens_per_s"].as_f64().unwrap() > 0.0);
}
