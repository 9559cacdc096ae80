//! End-to-end tests: run the real `ferry` binary in a temporary directory and check
//! what a user would see (output, files, exit status).

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn ferry(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry")).args(args).current_dir(dir).output().expect("the ferry binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn list_gpus_shows_every_catalog_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(dir.path(), &["list", "gpus"]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    for gpu in ["rtx3060-laptop-6gb", "rtx3060-12gb", "t4", "a100-80gb", "h100-sxm", "jetson-agx-orin-64gb", "cpu"] {
        assert!(stdout.contains(gpu), "{gpu} missing from:\n{stdout}");
    }
    let json = ferry(dir.path(), &["list", "gpus", "--json"]);
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(parsed.as_array().unwrap().len() >= 13);
}

#[test]
fn list_models_shows_aliases() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(dir.path(), &["list", "models"]);
    let stdout = text(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("llama-2-13b")).unwrap();
    assert!(line.contains("13b"), "{line}");
}

#[test]
fn show_model_13b_matches_llama_2_13b() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(dir.path(), &["show", "model", "13b"]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(stdout.contains("llama-2-13b"));
    assert!(stdout.contains("13.02 B parameters"), "{stdout}");
    assert!(text(&out.stderr).contains("resolved to 'llama-2-13b'"));
}

#[test]
fn unknown_model_is_a_usage_error_with_suggestions() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(dir.path(), &["show", "model", "13x"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("unknown model '13x'") && stderr.contains("13b"), "{stderr}");
    let out = ferry(dir.path(), &["show", "gpu", "rtx3070"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("did you mean"));
}

#[test]
fn show_gpu_alias_explains_the_resolution() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(dir.path(), &["show", "gpu", "rtx3060"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("12.0 GiB"));
    assert!(text(&out.stderr).contains("rtx3060-laptop-6gb"));
}

#[test]
fn model_folder_with_malformed_config_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("my-model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("config.json"), "{\n  \"model_type\": \"llama\",\n  \"hidden_size\": oops\n}").unwrap();
    let out = ferry(dir.path(), &["show", "model", "my-model"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("config.json:3:"), "{stderr}");
}

fn example_plan(dir: &Path, name: &str) -> std::path::PathBuf {
    let out = ferry(dir, &["simulate", "--example", name]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

#[test]
fn simulate_prints_metrics_and_writes_a_perfetto_trace() {
    let dir = tempfile::tempdir().unwrap();
    let plan = example_plan(dir.path(), "rtx3060-13b-layer-prefetch");
    let out = ferry(dir.path(), &["simulate", "--plan", plan.to_str().unwrap(), "--trace", "trace.json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for needle in ["tokens/s", "first token", "per output token", "bottleneck", "datasheet", "host→device"] {
        assert!(stdout.contains(needle), "{needle} missing:\n{stdout}");
    }
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("trace.json")).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    assert!(events.iter().any(|e| e["ph"] == "X" && e["dur"].as_f64().unwrap() > 0.0));
    assert!(events.iter().any(|e| e["name"] == "thread_name" && e["args"]["name"] == "device compute"));
    // The trace is not overwritten without --force.
    let again = ferry(dir.path(), &["simulate", "--plan", plan.to_str().unwrap(), "--trace", "trace.json"]);
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("--force"));
}

#[test]
fn simulate_json_is_machine_readable() {
    let dir = tempfile::tempdir().unwrap();
    let plan = example_plan(dir.path(), "cpu-tinyllama-512mib-pipelined");
    let out = ferry(dir.path(), &["simulate", "--plan", plan.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tps = json["metrics"]["tokens_per_s"].as_f64().unwrap();
    assert!(tps > 0.0);
    assert_eq!(json["profile"], "datasheet");
}

#[test]
fn simulate_reports_plans_that_cannot_fit() {
    let dir = tempfile::tempdir().unwrap();
    let plan = example_plan(dir.path(), "cpu-tinyllama-512mib-pipelined");
    let text_plan = std::fs::read_to_string(&plan).unwrap().replace("device_memory: 512MiB", "device_memory: 64MiB");
    std::fs::write(&plan, text_plan).unwrap();
    let out = ferry(dir.path(), &["simulate", "--plan", plan.to_str().unwrap()]);
    // An impossible budget is the user's to change: exit 2, as in `tune` and `run`.
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("device memory") && stderr.contains("short by"), "{stderr}");
}

#[test]
fn malformed_plan_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let plan = example_plan(dir.path(), "rtx3060-13b-layer-prefetch");
    let broken = std::fs::read_to_string(&plan).unwrap().replace("schedule: layer-prefetch", "schedule: layer-prefech");
    std::fs::write(&plan, broken).unwrap();
    let out = ferry(dir.path(), &["simulate", "--plan", plan.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("rtx3060-13b-layer-prefetch.yaml:") && stderr.contains("layer-prefech"), "{stderr}");
}

#[test]
fn tune_prints_a_plan_writes_it_and_it_simulates_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(
        dir.path(),
        &[
            "tune",
            "--gpu",
            "rtx3060-laptop-6gb",
            "--model",
            "7b",
            "--batch",
            "4",
            "--prompt-len",
            "128",
            "--gen-len",
            "8",
            "--out",
            "plan.yaml",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for needle in [
        "configurations considered",
        "Best plan",
        "tokens/s",
        "first token",
        "per output token",
        "bottleneck",
        "accelerate",
        "llama.cpp",
        "flexgen",
        "device",
        "datasheet",
    ] {
        assert!(stdout.contains(needle), "{needle} missing:\n{stdout}");
    }
    let plan = std::fs::read_to_string(dir.path().join("plan.yaml")).unwrap();
    let parsed: serde_json::Value = serde_norway::from_str(&plan).unwrap();
    let predicted = parsed["predicted"]["tokens_per_s"].as_f64().unwrap();
    let sim = ferry(dir.path(), &["simulate", "--plan", "plan.yaml", "--json"]);
    assert!(sim.status.success(), "{}", text(&sim.stderr));
    let json: serde_json::Value = serde_json::from_slice(&sim.stdout).unwrap();
    let simulated = json["metrics"]["tokens_per_s"].as_f64().unwrap();
    assert!((simulated - predicted).abs() / predicted < 0.001, "tune said {predicted}, simulate says {simulated}");
    // Not overwritten without --force.
    let again = ferry(
        dir.path(),
        &["tune", "--gpu", "rtx3060-laptop-6gb", "--model", "7b", "--batch", "4", "--out", "plan.yaml"],
    );
    assert_eq!(again.status.code(), Some(2));
    // Every engine export runs on it.
    for engine in ["llama.cpp", "vllm", "accelerate", "flexgen"] {
        let out = ferry(dir.path(), &["export", "--plan", "plan.yaml", "--to", engine]);
        assert!(out.status.success(), "{engine}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("cannot express"), "{engine}");
        // Each engine's model prices the settings, or says why it cannot.
        let out = ferry(dir.path(), &["export", "--plan", "plan.yaml", "--to", engine, "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!((json["plan_tokens_per_s"].as_f64().unwrap() - predicted).abs() / predicted < 0.001);
        let engine_prediction = &json["engine_prediction"];
        match engine_prediction["tokens_per_s"].as_f64() {
            Some(tokens_per_s) => assert!(tokens_per_s > 0.0, "{engine}: {engine_prediction}"),
            None => assert!(engine_prediction["not_predicted"].is_string(), "{engine}: {engine_prediction}"),
        }
    }
    let out = ferry(dir.path(), &["export", "--plan", "plan.yaml", "--to", "tensorrt"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn tune_json_reports_search_counts() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(
        dir.path(),
        &[
            "tune",
            "--gpu",
            "cpu",
            "--device-mem",
            "512MiB",
            "--host",
            "ferry-ci-vm",
            "--model",
            "tinyllama",
            "--batch",
            "2",
            "--prompt-len",
            "32",
            "--gen-len",
            "4",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["search"]["considered"].as_u64().unwrap() > json["search"]["simulated"].as_u64().unwrap());
    assert_eq!(json["plan"]["workload"]["batch_size"], 2);
    assert_eq!(json["baselines"].as_array().unwrap().len(), 3);
}

#[test]
fn tune_rejects_impossible_budgets_and_unknown_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(dir.path(), &["tune", "--gpu", "cpu", "--device-mem", "16MiB", "--model", "13b"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("device memory") && stderr.contains("short by"), "{stderr}");
    let out = ferry(dir.path(), &["tune", "--gpu", "rtx3070", "--model", "13b"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("did you mean"));
    let out = ferry(dir.path(), &["tune", "--gpu", "rtx3060", "--model", "13b", "--schedule", "zigzag"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("zigzag-block"));
}

#[test]
fn tune_plots_draws_png_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(
        dir.path(),
        &[
            "tune",
            "--gpu",
            "rtx3060-laptop-6gb",
            "--model",
            "tinyllama",
            "--batch",
            "2",
            "--prompt-len",
            "32",
            "--gen-len",
            "4",
            "--plots",
            "plots",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for stem in ["throughput-vs-batch", "decode-step-timeline", "throughput-vs-device-memory"] {
        for ext in ["png", "svg"] {
            let path = dir.path().join("plots").join(format!("{stem}.{ext}"));
            assert!(std::fs::metadata(&path).map(|m| m.len() > 1000).unwrap_or(false), "{path:?}");
        }
    }
}

/// Synthesizes test-small, tunes it for a RAM budget far below its size, runs the plan
/// and checks the run stayed within budget, really read from disk, and matches the plan.
#[test]
fn run_streams_from_disk_within_the_memory_budget() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(dir.path(), &["synth", "--model", "test-small", "--out", "small"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again = ferry(dir.path(), &["synth", "--model", "test-small", "--out", "small"]);
    assert_eq!(again.status.code(), Some(2), "synth must not overwrite");
    let budget_mib = 96u64;
    let out = common::tune_small(dir.path(), budget_mib);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ferry(
        dir.path(),
        &["run", "--model-dir", "small", "--plan", "plan.yaml", "--json", "--trace", "measured.json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let budget = budget_mib << 20;
    let peak = json["peak_rss_bytes"].as_u64().unwrap();
    let overhead = 64u64 << 20; // ferry_engine::memory::FIXED_OVERHEAD_BYTES
    assert!(peak <= budget + overhead, "peak RSS {} MiB exceeds the {budget_mib} MiB budget + 64 MiB", peak >> 20);
    // Most of the 247 MiB model was streamed, once per step, from storage (not the page cache).
    let requested = json["requested_read_bytes"].as_u64().unwrap();
    let from_storage = json["storage_read_bytes"].as_u64().unwrap();
    assert!(requested > 4 * budget, "only {requested} bytes streamed");
    assert_eq!(json["direct_io"], true, "/tmp is expected to support O_DIRECT here");
    assert!(from_storage as f64 >= 0.9 * requested as f64, "{from_storage} of {requested} bytes came from storage");
    let tokens = json["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2);
    assert!(tokens.iter().all(|t| t.as_array().unwrap().len() == 4));
    assert!(json["metrics"]["tokens_per_s"].as_f64().unwrap() > 0.0);
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("measured.json")).unwrap()).unwrap();
    assert!(trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "process_name" && e["args"]["name"] == "ferry (measured)"));

    // The same plan with a budget that cannot hold its resident set is refused up front.
    let plan = std::fs::read_to_string(dir.path().join("plan.yaml"))
        .unwrap()
        .replace("device_memory: 96MiB", "device_memory: 8MiB");
    std::fs::write(dir.path().join("small-plan.yaml"), plan).unwrap();
    let out = ferry(dir.path(), &["run", "--model-dir", "small", "--plan", "small-plan.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("short by"), "{}", text(&out.stderr));

    // A plan for another model is refused.
    let other = ferry(
        dir.path(),
        &[
            "tune",
            "--gpu",
            "cpu",
            "--device-mem",
            "1GiB",
            "--model",
            "tinyllama",
            "--batch",
            "1",
            "--out",
            "other.yaml",
        ],
    );
    assert!(other.status.success());
    let out = ferry(dir.path(), &["run", "--model-dir", "small", "--plan", "other.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("the plan is for tinyllama-1.1b"), "{}", text(&out.stderr));
}

#[test]
fn disks_are_a_catalog_and_capacity_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(dir.path(), &["list", "disks"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("nvme-pcie4"));
    let out = ferry(
        dir.path(),
        &["tune", "--gpu", "rtx3060-laptop-6gb", "--model", "opt-175b", "--disk", "virtio-ci", "--host-mem", "16GiB"],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("does not fit even on disk") && stderr.contains("short by"), "{stderr}");
    let out = ferry(dir.path(), &["tune", "--gpu", "rtx3060", "--model", "7b", "--disk", "ssd", "--batch", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("sata-ssd"));
    let out = ferry(
        dir.path(),
        &[
            "tune",
            "--gpu",
            "rtx3060",
            "--model",
            "7b",
            "--disk",
            "sata-ssd",
            "--batch",
            "1",
            "--prompt-len",
            "64",
            "--gen-len",
            "4",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn a_profile_file_can_replace_the_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(dir.path(), &["show", "profile", "cpu"]);
    assert!(out.status.success());
    // Double the disk bandwidth in the profile: the plan must get faster.
    let text_profile = text(&out.stdout);
    std::fs::write(dir.path().join("profile.yaml"), &text_profile).unwrap();
    let args = |profile: &str| {
        vec![
            "tune",
            "--profile",
            profile,
            "--model",
            "tinyllama",
            "--device-mem",
            "512MiB",
            "--batch",
            "1",
            "--prompt-len",
            "32",
            "--gen-len",
            "4",
            "--json",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let run = |profile: &str| -> f64 {
        let a = args(profile);
        let out = ferry(dir.path(), &a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "{}", text(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["metrics"]["tokens_per_s"].as_f64().unwrap()
    };
    let base = run("profile.yaml");
    let mut profile: serde_json::Value = serde_norway::from_str(&text_profile).unwrap();
    for point in profile["disk_read"]["points"].as_array_mut().unwrap() {
        let gbps = point["gbps"].as_f64().unwrap();
        point["gbps"] = serde_json::json!(gbps * 2.0);
    }
    std::fs::write(dir.path().join("fast.yaml"), serde_norway::to_string(&profile).unwrap()).unwrap();
    let fast = run("fast.yaml");
    assert!(fast > base * 1.3, "doubling the disk bandwidth gave {fast} vs {base} tokens/s");
    // A malformed profile names its line.
    std::fs::write(
        dir.path().join("bad.yaml"),
        text_profile.replacen("unified_memory: true", "unified_memory: maybe", 1),
    )
    .unwrap();
    let a = args("bad.yaml");
    let out = ferry(dir.path(), &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("bad.yaml:"), "{}", text(&out.stderr));
}

#[test]
fn profile_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    // CI machines have no NVIDIA driver: the cuda profile says so (cudarc would panic),
    // before it writes or measures anything.
    let out = ferry(dir.path(), &["profile", "--backend", "cuda", "--model", "llama-2-7b", "--out", "p.yaml"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no NVIDIA driver") && stderr.contains("--backend cpu"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no profile, no scratch file");
    let out = ferry(dir.path(), &["profile", "--backend", "rocm", "--out", "p.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("use cpu or cuda"));
    std::fs::write(dir.path().join("p.yaml"), "keep me").unwrap();
    let out = ferry(dir.path(), &["profile", "--out", "p.yaml", "--quick"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(dir.path().join("p.yaml")).unwrap(), "keep me");
    // A mistyped scratch folder would measure another disk: refused, nothing made.
    let out = ferry(dir.path(), &["profile", "--quick", "--scratch-dir", "nvme/scratch", "--out", "q.yaml"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--scratch-dir nvme/scratch does not exist"), "{stderr}");
    assert!(!dir.path().join("nvme").exists() && !dir.path().join("q.yaml").exists());
}

#[test]
fn validate_reports_errors_and_gates_on_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    assert!(ferry(dir.path(), &["synth", "--model", "test-tiny", "--dtype", "f32", "--out", "tiny"]).status.success());
    let profile = ferry(dir.path(), &["show", "profile", "cpu"]);
    std::fs::write(dir.path().join("datasheet.yaml"), &profile.stdout).unwrap();
    let args = [
        "validate",
        "--model-dir",
        "tiny",
        "--profile",
        "datasheet.yaml",
        "--plans",
        "3",
        "--prompt-len",
        "4",
        "--gen-len",
        "2",
        "--json",
    ];
    // Loose tolerances pass (exit 0) ...
    let mut loose = args.to_vec();
    loose.extend(["--tolerance", "100000"]);
    let out = ferry(dir.path(), &loose);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plans = json["plans"].as_array().unwrap();
    assert_eq!(plans.len(), 3);
    assert!(plans
        .iter()
        .all(|p| p["measured_tokens_per_s"].as_f64().unwrap() > 0.0
            && p["predicted_tokens_per_s"].as_f64().unwrap() > 0.0));
    assert!(json["median_abs_error_pct"].as_f64().unwrap() >= 0.0);
    // ... and a tolerance no prediction can meet fails with exit status 1.
    let mut strict = args.to_vec();
    strict.extend(["--tolerance", "0.0000001"]);
    let out = ferry(dir.path(), &strict);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["passed"], false);
    // A measured profile that never timed this model's kernels is refused, with the
    // command that measures one (its roofline alone was 44 % off on test-small).
    let mut measured = String::new();
    let mut in_provenance = false;
    for line in text(&profile.stdout).lines() {
        if line == "provenance:" {
            measured += "provenance:\n  kind: measured\n  machine: ci\n  date: 2026-12-02\n  backend: cpu\n";
            in_provenance = true;
        } else if !(in_provenance && line.starts_with(' ')) {
            in_provenance = false;
            measured += line;
            measured += "\n";
        }
    }
    std::fs::write(dir.path().join("measured.yaml"), measured).unwrap();
    let mut no_table = args.to_vec();
    no_table[4] = "measured.yaml";
    let out = ferry(dir.path(), &no_table);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no kernel table") && stderr.contains("ferry profile --backend cpu --quick --model tiny"),
        "{stderr}"
    );
    // On the cuda backend, where there is no NVIDIA driver: said before anything runs.
    let mut on_cuda = args.to_vec();
    on_cuda.extend(["--backend", "cuda"]);
    let out = ferry(dir.path(), &on_cuda);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no NVIDIA driver") && !stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "no plan ran");
    // A discrete GPU's profile on the cpu backend, whose device is host RAM: refused.
    let gpu = ferry(dir.path(), &["show", "profile", "rtx3060-12gb"]);
    std::fs::write(dir.path().join("gpu.yaml"), &gpu.stdout).unwrap();
    let mut discrete = args.to_vec();
    discrete[4] = "gpu.yaml";
    let out = ferry(dir.path(), &discrete);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("describes a discrete GPU") && stderr.contains("--backend cuda"), "{stderr}");
}

#[test]
fn one_error_exits_alike_in_every_command() {
    // The exit status follows from the error's kind, not from the command that met it.
    let dir = tempfile::tempdir().unwrap();
    let profile = ferry(dir.path(), &["show", "profile", "cpu"]);
    std::fs::write(dir.path().join("profile.yaml"), &profile.stdout).unwrap();
    let plan = example_plan(dir.path(), "cpu-tinyllama-512mib-pipelined");
    // A model folder that does not exist: a usage error in run and validate alike.
    let run = ferry(dir.path(), &["run", "--model-dir", "missing", "--plan", plan.to_str().unwrap()]);
    let validate = ferry(
        dir.path(),
        &["validate", "--model-dir", "missing", "--profile", "profile.yaml", "--plans", "2", "--json"],
    );
    assert_eq!(run.status.code(), Some(2), "{}", text(&run.stderr));
    assert_eq!(validate.status.code(), Some(2), "{}", text(&validate.stderr));
    // A plan file that does not exist: 2 in simulate, export and run.
    for args in [
        vec!["simulate", "--plan", "nope.yaml"],
        vec!["export", "--plan", "nope.yaml", "--to", "vllm"],
        vec!["run", "--model-dir", "missing", "--plan", "nope.yaml"],
    ] {
        let out = ferry(dir.path(), &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        let stderr = text(&out.stderr);
        // The OS message is printed once.
        assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
    }
}
