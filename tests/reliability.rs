//! Reliability through the binary: limits checked before any work, and disk-tier KV
//! scratch files that no two runs share and that nothing leaves behind.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{ferry, text, tune_small, TINY_PLAN};

/// test-tiny with every layer's KV cache on disk and a longer generation: every decode
/// step reads and writes the scratch file.
fn disk_kv_plan() -> String {
    TINY_PLAN
        .replace("batch_size: 4, prompt_len: 6, gen_len: 5", "batch_size: 2, prompt_len: 8, gen_len: 24")
        .replace("micro_batch_size: 2\n  num_micro_batches: 2", "micro_batch_size: 2\n  num_micro_batches: 1")
        .replace("kv_cache: {device: 3, host: 0, disk: 1}", "kv_cache: {device: 0, host: 0, disk: 4}")
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let synth = ferry(dir.path(), &["synth", "--model", "test-tiny", "--dtype", "f32", "--out", "tiny"]);
    assert!(synth.status.success(), "{}", text(&synth.stderr));
    std::fs::write(dir.path().join("plan.yaml"), disk_kv_plan()).unwrap();
    dir
}

fn scratch_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|name| name.starts_with("ferry-kv"))
        .collect()
}

#[test]
fn two_disk_kv_runs_on_one_folder_at_once_get_identical_tokens() {
    let dir = setup();
    let args = ["run", "--model-dir", "tiny", "--plan", "plan.yaml", "--json", "--scratch-dir", "tiny"];
    // Each run in a PID namespace of its own where `unshare` can make one (root, or
    // user namespaces): both are then pid 1, as two containers on one volume would be.
    let namespaces = Command::new("unshare").args(["-p", "-f", "true"]).status().is_ok_and(|s| s.success());
    if !namespaces {
        eprintln!("note: unshare cannot make PID namespaces here; the two runs share one");
    }
    // Different prompts (seeds): runs sharing a scratch file would read each other's KV.
    let spawn = |seed: &str| {
        let mut command = if namespaces {
            let mut c = Command::new("unshare");
            c.args(["-p", "-f", env!("CARGO_BIN_EXE_ferry")]);
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_ferry"))
        };
        command
            .args(args)
            .args(["--seed", seed])
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("1"), spawn("2"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success(), "{} {}", text(&a.stderr), text(&b.stderr));
    let tokens = |out: &Output| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["tokens"].clone();
    let alone = |seed: &str| ferry(dir.path(), &[&args[..], &["--seed", seed]].concat());
    assert_eq!(tokens(&a), tokens(&alone("1")), "a concurrent run computed other tokens");
    assert_eq!(tokens(&b), tokens(&alone("2")), "a concurrent run computed other tokens");
    assert_ne!(tokens(&a), tokens(&b), "the two runs must have different prompts");
    assert!(scratch_files(&dir.path().join("tiny")).is_empty(), "scratch files left behind");
}

#[test]
fn a_killed_run_leaves_no_scratch_file() {
    let dir = setup();
    // A long generation, killed while it runs.
    let plan = disk_kv_plan().replace("gen_len: 24", "gen_len: 240");
    std::fs::write(dir.path().join("long.yaml"), plan).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["run", "--model-dir", "tiny", "--plan", "long.yaml", "--json", "--scratch-dir", "scratch"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the run has its scratch folder (the file is made right after), then kill.
    let scratch = dir.path().join("scratch");
    for _ in 0..200 {
        if scratch.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(scratch.exists(), "the run never started");
    assert!(!status.success(), "the run finished before it was killed: make it longer");
    assert!(scratch_files(&scratch).is_empty(), "a SIGKILL'd run left {:?}", scratch_files(&scratch));
}

#[test]
fn limits_are_checked_before_any_work() {
    let dir = setup();
    let many = disk_kv_plan().replace("copy_streams: 1", "copy_streams: 100000");
    std::fs::write(dir.path().join("many.yaml"), many).unwrap();
    for command in [vec!["simulate", "--plan", "many.yaml"], vec!["run", "--model-dir", "tiny", "--plan", "many.yaml"]]
    {
        let out = ferry(dir.path(), &command);
        assert_eq!(out.status.code(), Some(2), "{command:?}");
        assert!(text(&out.stderr).contains("at most 64"), "{}", text(&out.stderr));
    }
    // A generation past the model's positions is refused at once, by simulate as by run.
    let long = disk_kv_plan().replace("gen_len: 24", "gen_len: 10000000");
    std::fs::write(dir.path().join("long.yaml"), long).unwrap();
    for command in [vec!["simulate", "--plan", "long.yaml"], vec!["run", "--model-dir", "tiny", "--plan", "long.yaml"]]
    {
        let started = std::time::Instant::now();
        let out = ferry(dir.path(), &command);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("positions"), "{}", text(&out.stderr));
        assert!(started.elapsed().as_secs() < 10, "{command:?} worked before refusing");
    }
}

/// The most threads a plan may ask for (64 copy streams, 256 disk requests in flight)
/// keep the process inside its budget plus the documented 64 MiB: the threads' stacks
/// and buffers are part of the fixed overhead, not a way around the budget.
#[test]
fn the_most_threads_a_plan_may_ask_for_stay_inside_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = ferry(d, &["synth", "--model", "test-small", "--out", "small"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let budget_mib = 96u64;
    let out = tune_small(d, budget_mib);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan = std::fs::read_to_string(d.join("plan.yaml")).unwrap();
    let widest: String = plan
        .lines()
        .map(|line| match line.trim_start() {
            l if l.starts_with("copy_streams:") => "  copy_streams: 64".to_string(),
            l if l.starts_with("io_queue_depth:") => "  io_queue_depth: 256".to_string(),
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(widest.contains("copy_streams: 64") && widest.contains("io_queue_depth: 256"), "{widest}");
    std::fs::write(d.join("widest.yaml"), widest).unwrap();
    let out = ferry(d, &["run", "--model-dir", "small", "--plan", "widest.yaml", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let peak = json["peak_rss_bytes"].as_u64().unwrap();
    let limit = (budget_mib + 64) << 20;
    assert!(peak <= limit, "peak RSS {} MiB exceeds the {budget_mib} MiB budget + 64 MiB", peak >> 20);
}

#[test]
fn implausible_profile_figures_and_unknown_keys_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let shown = ferry(dir.path(), &["show", "profile", "cpu"]);
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    let profile = text(&shown.stdout);
    let tune = |edited: &str| {
        std::fs::write(dir.path().join("p.yaml"), edited).unwrap();
        ferry(
            dir.path(),
            &["tune", "--profile", "p.yaml", "--model", "test-tiny", "--prompt-len", "8", "--gen-len", "4"],
        )
    };
    let out = tune(&profile);
    assert!(out.status.success(), "the shown profile must tune: {}", text(&out.stderr));
    // A typo of an exponent: refused, not a prediction of hundreds of thousands of tokens/s.
    let tiny = profile.replacen("  peak_flops: 400000000000.0", "  peak_flops: 1e-300", 1);
    let out = tune(&tiny);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("device_compute.peak_flops"), "{}", text(&out.stderr));
    let typo = profile.replacen("  peak_flops: 400000000000.0", "  peak_flop: 4e11\n  peak_flops: 4e11", 1);
    let out = tune(&typo);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("device_compute") && stderr.contains("peak_flop`") && stderr.contains("p.yaml"),
        "{stderr}"
    );
}

#[test]
fn tune_writes_only_plans_that_run_and_export_refuses_what_simulate_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The catalog says test-tiny is f32; synth's default follows the catalog.
    let synth = ferry(d, &["synth", "--model", "test-tiny", "--out", "tiny"]);
    assert!(synth.status.success(), "{}", text(&synth.stderr));
    let config = std::fs::read_to_string(d.join("tiny/config.json")).unwrap();
    assert!(config.contains("\"torch_dtype\": \"float32\""), "{config}");
    // The default 512 + 32 tokens exceed test-tiny's 256 positions: shortened, said, and run.
    let tune = ferry(
        d,
        &["tune", "--gpu", "cpu", "--device-mem", "64MiB", "--model", "tiny", "--batch", "2", "--out", "plan.yaml"],
    );
    assert!(tune.status.success(), "{}", text(&tune.stderr));
    assert!(text(&tune.stderr).contains("256 positions"), "{}", text(&tune.stderr));
    let run = ferry(d, &["run", "--model-dir", "tiny", "--plan", "plan.yaml", "--json"]);
    assert!(run.status.success(), "tune wrote a plan run refuses: {}", text(&run.stderr));
    // Lengths the user gave are not changed behind their back.
    let args =
        ["tune", "--gpu", "cpu", "--model", "tiny", "--prompt-len", "250", "--gen-len", "10", "--out", "long.yaml"];
    let tune = ferry(d, &args);
    assert_eq!(tune.status.code(), Some(2), "{}", text(&tune.stderr));
    assert!(text(&tune.stderr).contains("--prompt-len 250 + --gen-len 10"), "{}", text(&tune.stderr));
    assert!(!d.join("long.yaml").exists());
    // A zero budget: refused alike by simulate, export and run.
    let plan = std::fs::read_to_string(d.join("plan.yaml")).unwrap();
    std::fs::write(d.join("zero.yaml"), plan.replace("device_memory: 64MiB", "device_memory: 0B")).unwrap();
    for command in [
        vec!["simulate", "--plan", "zero.yaml"],
        vec!["export", "--plan", "zero.yaml", "--to", "llama.cpp"],
        vec!["run", "--model-dir", "tiny", "--plan", "zero.yaml"],
    ] {
        let out = ferry(d, &command);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("device_memory"), "{}", text(&out.stderr));
    }
    // A budget that does not fit the plan: simulate refuses it, so export does.
    std::fs::write(d.join("small.yaml"), plan.replace("device_memory: 64MiB", "device_memory: 64KiB")).unwrap();
    for command in [vec!["simulate", "--plan", "small.yaml"], vec!["export", "--plan", "small.yaml", "--to", "vllm"]] {
        let out = ferry(d, &command);
        assert!(!out.status.success(), "{command:?} accepted a plan that does not fit");
    }
}

#[test]
fn byte_sizes_past_2_to_the_64_are_errors_not_saturated() {
    let dir = tempfile::tempdir().unwrap();
    for flag in ["--device-mem", "--host-mem"] {
        let args = ["tune", "--gpu", "cpu", "--model", "test-tiny", flag, "18446744073709551616B"];
        let out = ferry(dir.path(), &args);
        assert_eq!(out.status.code(), Some(2), "{flag}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("out of range"), "{}", text(&out.stderr));
    }
}

#[test]
fn plans_name_model_folders_and_profiles_relative_to_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("work/plans")).unwrap();
    std::fs::create_dir_all(d.join("elsewhere")).unwrap();
    let synth = ferry(d, &["synth", "--model", "test-tiny", "--out", "work/models/x"]);
    assert!(synth.status.success(), "{}", text(&synth.stderr));
    let shown = ferry(d, &["show", "profile", "cpu"]);
    std::fs::write(d.join("work/p.yaml"), &shown.stdout).unwrap();
    let work = d.join("work");
    let args = ["tune", "--profile", "p.yaml", "--device-mem", "64MiB", "--model", "models/x", "--batch", "2"];
    let tune = ferry(&work, &[&args[..], &["--out", "plans/plan.yaml"]].concat());
    assert!(tune.status.success(), "{}", text(&tune.stderr));
    let plan = std::fs::read_to_string(work.join("plans/plan.yaml")).unwrap();
    // From the plan's folder, the working directory's `models/x` is `../models/x`:
    // outside it, so written absolute.
    let model_line = plan.lines().find(|l| l.trim_start().starts_with("target:")).unwrap();
    assert!(model_line.ends_with("/work/models/x") && model_line.contains(": /"), "{model_line}");
    for command in [
        vec!["simulate", "--plan", "work/plans/plan.yaml"],
        vec!["run", "--model-dir", "work/models/x", "--plan", "work/plans/plan.yaml"],
    ] {
        let out = ferry(d, &command);
        assert!(out.status.success(), "{command:?}: {}", text(&out.stderr));
    }
    // A plan beside the model keeps a relative path, and runs from anywhere.
    let tune = ferry(&work, &[&args[..], &["--out", "plan.yaml"]].concat());
    assert!(tune.status.success(), "{}", text(&tune.stderr));
    let plan = std::fs::read_to_string(work.join("plan.yaml")).unwrap();
    assert!(plan.contains("target: models/x") && plan.contains("profile: p.yaml"), "{plan}");
    let model_dir = work.join("models/x").display().to_string();
    let out = ferry(&d.join("elsewhere"), &["run", "--model-dir", &model_dir, "--plan", "../work/plan.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A copy of the plan without the model beside it: the folder given stands in for
    // the plan's model name (same shape), with a note.
    let copy = plan.replace("profile: p.yaml", &format!("profile: {}", work.join("p.yaml").display()));
    std::fs::write(d.join("elsewhere/plan.yaml"), copy).unwrap();
    let out = ferry(&d.join("elsewhere"), &["run", "--model-dir", &model_dir, "--plan", "plan.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("'models/x' is not found"), "{}", text(&out.stderr));
}

/// Overwrites tensor `name` of a single-file safetensors model: `values(i)` for
/// element i, f32 (the folder must be synthesized with `--dtype f32`).
fn poke_tensor(file: &Path, name: &str, values: impl Fn(usize) -> Option<f32>) {
    let mut bytes = std::fs::read(file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let offsets = &header[name]["data_offsets"];
    let (start, end) = (offsets[0].as_u64().unwrap() as usize, offsets[1].as_u64().unwrap() as usize);
    let data = &mut bytes[8 + header_len + start..8 + header_len + end];
    for (i, element) in data.chunks_exact_mut(4).enumerate() {
        if let Some(v) = values(i) {
            element.copy_from_slice(&v.to_le_bytes());
        }
    }
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn non_finite_weights_and_activations_stop_a_run_naming_where() {
    let dir = setup();
    let weights = dir.path().join("tiny/model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let run = || ferry(dir.path(), &["run", "--model-dir", "tiny", "--plan", "plan.yaml", "--json"]);
    let clean = run();
    assert!(clean.status.success(), "{}", text(&clean.stderr));
    // A NaN in a weight streamed from disk: the tensor is named when it is read.
    let tensor = "model.layers.3.mlp.up_proj.weight";
    poke_tensor(&weights, tensor, |i| (i == 1000).then_some(f32::NAN));
    let out = run();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(tensor) && stderr.contains("element 1000"), "{stderr}");
    // Finite but huge norm weights: the MLP of layer 1 overflows f32 at the prompt,
    // and the logits that follow are refused, naming the step and the layer.
    std::fs::write(&weights, &original).unwrap();
    poke_tensor(&weights, "model.layers.1.post_attention_layernorm.weight", |_| Some(1e38));
    let out = run();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("step 0: the logits"), "{stderr}");
    assert!(stderr.contains("layer 1 (mlp) at step 0"), "{stderr}");
}

/// A device memory beyond the hardware's is planned as given (a card variant the
/// catalog lacks can have more) but said, so that a typo (100GiB for 10GiB) does not
/// pass for a plan the machine can run.
#[test]
fn device_memory_beyond_the_hardware_is_said() {
    let dir = tempfile::tempdir().unwrap();
    let tune = |gpu: &str, memory: &str| {
        let out = ferry(dir.path(), &["tune", "--gpu", gpu, "--model", "7b", "--batch", "1", "--device-mem", memory]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stderr)
    };
    let stderr = tune("rtx3060", "100GiB");
    assert!(stderr.contains("device memory 100 GiB is more than the rtx3060-12gb's 12.0 GiB"), "{stderr}");
    let stderr = tune("cpu", "1TiB");
    assert!(stderr.contains("device memory 1024 GiB is more than the host's") && stderr.contains("of RAM"), "{stderr}");
    for (gpu, memory) in [("rtx3060", "10GiB"), ("rtx3060", "12GiB"), ("cpu", "4GiB")] {
        let stderr = tune(gpu, memory);
        assert!(!stderr.contains("is more than"), "{gpu} with {memory}: {stderr}");
    }
    // The same for host memory.
    let out = ferry(dir.path(), &["tune", "--gpu", "rtx3060", "--model", "7b", "--batch", "1", "--host-mem", "1TiB"]);
    assert!(
        text(&out.stderr).contains("host memory 1024 GiB is more than the host's 64.0 GiB"),
        "{}",
        text(&out.stderr)
    );
}

/// The cpu datasheet profile as if measured by a backend described as `backend`
/// (returned: the profile's text for that description), and `measured-plan.yaml` in
/// `dir`, a plan priced by `measured.yaml`.
fn measured_profile(dir: &std::path::Path) -> impl Fn(&str) -> String {
    let datasheet = ferry(dir, &["show", "profile", "cpu"]);
    assert!(datasheet.status.success(), "{}", text(&datasheet.stderr));
    let plan = disk_kv_plan().replace("  gpu: cpu\n  host: ferry-ci-vm\n", "  profile: measured.yaml\n");
    std::fs::write(dir.join("measured-plan.yaml"), plan).unwrap();
    let datasheet = text(&datasheet.stdout);
    move |backend: &str| {
        let mut profile = String::new();
        let mut in_provenance = false;
        for line in datasheet.lines() {
            if line == "provenance:" {
                profile += &format!(
                    "provenance:\n  kind: measured\n  machine: ci\n  date: 2026-12-04\n  backend: '{backend}'\n"
                );
                in_provenance = true;
            } else if !(in_provenance && line.starts_with(' ')) {
                in_provenance = false;
                profile += line;
                profile += "\n";
            }
        }
        profile
    }
}

/// A run priced by a profile whose kernel table timed other kernels is told which:
/// 8-bit x by VNNI in the profile, declined in the run (`FERRY_VNNI=off`, so the same
/// on any CPU); a profile of the run's own choice gets no such note.
#[test]
fn a_run_priced_by_a_profile_of_other_kernels_says_which() {
    let dir = setup();
    let measured_as = measured_profile(dir.path());
    for (bytes, note) in [("vnni", Some("8-bit x: vnni in the profile, maddubs here")), ("maddubs", None)] {
        let backend = format!(
            "cpu, avx2 kernels, bf16 products on f32 (few rows: f32), 8-bit x by {bytes}, weights in huge pages \
             (profiled in 9 s)"
        );
        std::fs::write(dir.path().join("measured.yaml"), measured_as(&backend)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["run", "--model-dir", "tiny", "--plan", "measured-plan.yaml", "--gen-len", "2", "--json"])
            .env("FERRY_VNNI", "off")
            .env("FERRY_HUGE_PAGES", "on")
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{bytes}: {stderr}");
        match note {
            Some(note) => assert!(stderr.contains(note) && stderr.contains("FERRY_VNNI"), "{bytes}: {stderr}"),
            None => assert!(!stderr.contains("8-bit x"), "{bytes}: {stderr}"),
        }
    }
}

/// A measured cpu profile names the pages its reads went into (a direct read into
/// small pages ran at a fifth of the rate on this project's VM): a run priced by a
/// profile of the other mode, or of none, is told so; one in the same mode is not.
#[test]
fn a_run_priced_by_a_profile_of_another_page_mode_says_so() {
    let dir = setup();
    let measured_as = measured_profile(dir.path());
    let kernels = "cpu, avx2 kernels, bf16 products on f32 (few rows: f32)";
    let cases = [
        (
            format!("{kernels}, weights in small pages (profiled in 9 s)"),
            "on",
            Some("measured with weights in small pages"),
        ),
        (format!("{kernels}, weights in small pages (profiled in 9 s)"), "off", None),
        (format!("{kernels}, weights in huge pages (profiled in 9 s)"), "on", None),
        (
            format!("{kernels}, weights in huge pages (profiled in 9 s)"),
            "off",
            Some("this run has weights in small pages"),
        ),
        (format!("{kernels} (profiled in 9 s)"), "on", Some("does not say which pages")),
    ];
    for (backend, pages, note) in cases {
        std::fs::write(dir.path().join("measured.yaml"), measured_as(&backend)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["run", "--model-dir", "tiny", "--plan", "measured-plan.yaml", "--gen-len", "2", "--json"])
            .env("FERRY_HUGE_PAGES", pages)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{backend}, {pages}: {stderr}");
        match note {
            Some(note) => {
                assert!(stderr.contains(note) && stderr.contains("FERRY_HUGE_PAGES"), "{backend}, {pages}: {stderr}")
            }
            None => assert!(!stderr.contains("pages"), "{backend}, {pages}: {stderr}"),
        }
    }
}

/// `ferry validate --runs N` runs each plan N times, each run predicted and measured on
/// its own, and reports the run of median error with every run's error beside it and
/// the runs' spread as the machine's noise (one run says how to measure it); a count of
/// 0 is refused before anything runs.
#[test]
fn validate_with_several_runs_reports_the_run_of_median_error() {
    let dir = setup();
    let profile = ferry(dir.path(), &["show", "profile", "cpu"]);
    std::fs::write(dir.path().join("datasheet.yaml"), &profile.stdout).unwrap();
    let args = ["validate", "--model-dir", "tiny", "--profile", "datasheet.yaml", "--plans", "2"];
    let short = ["--prompt-len", "4", "--gen-len", "2", "--json"];
    let out = ferry(dir.path(), &[&args[..], &short, &["--runs", "3"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plans = json["plans"].as_array().unwrap();
    assert_eq!(plans.len(), 2);
    for plan in plans {
        let mut errors: Vec<f64> =
            plan["run_errors_pct"].as_array().unwrap().iter().map(|e| e.as_f64().unwrap()).collect();
        assert_eq!(errors.len(), 3, "{plan}");
        errors.sort_by(f64::total_cmp);
        assert_eq!(plan["signed_error_pct"].as_f64().unwrap(), errors[1], "{plan}");
    }
    // The runs' spread is the machine's noise, reported beside the errors.
    let noise = json["run_noise_pct"].as_f64().unwrap();
    assert!(noise.is_finite() && noise >= 0.0, "{noise}");
    let one = ferry(dir.path(), &[&args[..], &short[..short.len() - 1]].concat());
    assert!(one.status.success(), "{}", text(&one.stderr));
    assert!(text(&one.stdout).contains("--runs 3 also measures the machine's noise"), "{}", text(&one.stdout));
    let out = ferry(dir.path(), &[&args[..], &short, &["--runs", "0"]].concat());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--runs"), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
}

/// A scratch folder is made inside an existing one, not as a whole new path; plots are
/// not drawn "into" a file.
#[test]
fn outputs_that_name_the_wrong_kind_of_path_are_refused() {
    let dir = setup();
    std::fs::write(dir.path().join("plan.yaml"), disk_kv_plan()).unwrap();
    let run = |scratch: &str| {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["run", "--model-dir", "tiny", "--plan", "plan.yaml", "--json", "--scratch-dir", scratch])
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = run("no/such/place");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--scratch-dir no/such/place: the folder it would be made in, no/such, does not exist"));
    assert!(!dir.path().join("no").exists(), "no folders made");
    std::fs::write(dir.path().join("mine.txt"), "mine").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["tune", "--gpu", "rtx3060", "--model", "7b", "--plots", "mine.txt"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mine.txt is a file"));
    assert_eq!(std::fs::read_to_string(dir.path().join("mine.txt")).unwrap(), "mine");
}

/// Transfer knobs past anything they act on are run as given but said: a prefetch
/// deeper than the model, requests larger than the device.
#[test]
fn knobs_past_their_reach_are_said() {
    let dir = tempfile::tempdir().unwrap();
    let example = ferry(dir.path(), &["simulate", "--example", "rtx3060-13b-layer-prefetch"]);
    assert!(example.status.success(), "{}", text(&example.stderr));
    let plan = text(&example.stdout);
    let edited: String = plan
        .lines()
        .map(|line| match line.trim_start() {
            l if l.starts_with("prefetch_depth:") => "  prefetch_depth: 1000".to_string(),
            l if l.starts_with("chunk_bytes:") => "  chunk_bytes: 1TiB".to_string(),
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("p.yaml"), edited).unwrap();
    let out = ferry(dir.path(), &["simulate", "--plan", "p.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("prefetch_depth 1000 is more than the model's 40 layers"), "{stderr}");
    assert!(stderr.contains("chunk_bytes 1024 GiB is more than the device's 12.0 GiB"), "{stderr}");
    let plain = ferry(dir.path(), &["simulate", "--example", "rtx3060-13b-layer-prefetch"]);
    std::fs::write(dir.path().join("q.yaml"), text(&plain.stdout)).unwrap();
    let out = ferry(dir.path(), &["simulate", "--plan", "q.yaml"]);
    assert!(
        !text(&out.stderr).contains("past") && !text(&out.stderr).contains("is more than"),
        "{}",
        text(&out.stderr)
    );
}
