//! Weight formats end to end with the real binary: `tune --weight-format` compares
//! formats in a table and writes the best plan, which `simulate` predicts the same;
//! unknown names and formats a shape cannot hold are clear usage errors; `run` refuses
//! a quantized plan saying what the engine runs.

mod common;

use common::{ferry, text};

const TINYLLAMA_1GIB: [&str; 17] = [
    "tune",
    "--gpu",
    "cpu",
    "--host",
    "ferry-ci-vm",
    "--device-mem",
    "1GiB",
    "--model",
    "tinyllama-1.1b",
    "--prompt-len",
    "64",
    "--gen-len",
    "8",
    "--batch",
    "1",
    "--weight-format",
    "q4_k,f16",
];

/// TinyLlama in 1 GiB of RAM: its 2.05 GiB of f16 weights must stream from disk; in
/// Q4_K (590 MiB) every weight stays in memory, and that plan is the faster one.
#[test]
fn tune_compares_formats_and_writes_the_best_plan() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = TINYLLAMA_1GIB.to_vec();
    args.extend(["--json", "--out", "plan.yaml"]);
    let out = ferry(dir.path(), &args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = json["formats"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let (q4k, f16) = (&rows[0], &rows[1]);
    assert_eq!((q4k["weight_format"].as_str(), f16["weight_format"].as_str()), (Some("q4_k"), Some("f16")));
    let tiers =
        |row: &serde_json::Value| ["device", "host", "disk"].map(|t| row["weights_by_tier"][t].as_u64().unwrap());
    let [device, host, disk] = tiers(q4k);
    assert_eq!((host, disk), (0, 0), "Q4_K fits: {q4k}");
    assert_eq!(device, q4k["weight_bytes"].as_u64().unwrap());
    let [_, _, f16_disk] = tiers(f16);
    assert!(f16_disk > 0, "f16 has to stream from disk: {f16}");
    assert!(q4k["weight_bytes"].as_u64().unwrap() * 3 < f16["weight_bytes"].as_u64().unwrap());
    assert!(q4k["tokens_per_s"].as_f64().unwrap() > f16["tokens_per_s"].as_f64().unwrap());
    assert_eq!((q4k["chosen"].as_bool(), f16["chosen"].as_bool()), (Some(true), Some(false)));
    // The cpu device's datasheet figures have no calibration rows and no drift: no interval.
    assert!(q4k["tokens_per_s_interval"].is_null(), "{q4k}");
    // The plan written is the chosen one, in its format, and predicts what the table said.
    let plan = std::fs::read_to_string(dir.path().join("plan.yaml")).unwrap();
    assert!(plan.contains("weight_format: q4_k"), "{plan}");
    let out = ferry(dir.path(), &["simulate", "--json", "--plan", "plan.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no dequantization rate for q4_k"), "{}", text(&out.stderr));
    let sim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sim["metrics"]["tokens_per_s"], q4k["tokens_per_s"]);
    // For people: the table, then the chosen plan.
    let out = ferry(dir.path(), &TINYLLAMA_1GIB);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("weights on device / host / disk") && shown.contains("chosen: q4_k"), "{shown}");
    let f16_line = shown.lines().find(|l| l.starts_with("f16 ")).unwrap();
    // 917 MiB stay: every attention layer and six MLPs, with the embedding table (125
    // MiB) left on disk for lookups to read by the row and the KV cache on the device.
    assert!(f16_line.contains(" 917 MiB / 0 B / 1.15 GiB"), "{f16_line}");
}

#[test]
fn formats_are_checked_by_name_and_against_the_shape() {
    let dir = tempfile::tempdir().unwrap();
    let tune = |formats: &str| {
        ferry(dir.path(), &["tune", "--gpu", "cpu", "--model", "test-tiny", "--batch", "1", "--weight-format", formats])
    };
    let out = tune("q4_k,q8_00");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown weight format 'q8_00'; did you mean: q8_0"), "{}", text(&out.stderr));
    // test-tiny's rows are 128 and 352 values: not whole blocks of 256; q4_k stores its
    // matrices as llama.cpp's quantizer does, in q5_0, and says so.
    let out = tune("q8_0,q4_k");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("stored as q5_0") && err.contains("not whole q4_k blocks"), "{err}");
    // `show model` prices each matrix in the type it is stored in and says which fall back.
    let out = ferry(dir.path(), &["show", "model", "qwen1.5-moe-a2.7b"]);
    let shown = text(&out.stdout);
    let expert = shown.lines().find(|l| l.starts_with("one expert")).unwrap_or_default();
    // Gate and up (1408 rows of 2048) in Q4_K, down (2048 rows of 1408) in Q5_0: 4.98 MiB.
    assert!(expert.contains("4.98 MiB"), "{shown}");
    assert!(shown.contains("q4_k: mlp.experts.0.down_proj.weight and 59 more matrices stored as q5_0"), "{shown}");
    let out = ferry(dir.path(), &["tune", "--help"]);
    let help = text(&out.stdout);
    assert!(
        help.contains("--weight-format") && help.contains("q4_k") && help.contains("never lowers precision"),
        "{help}"
    );
}

/// The engine runs the weights as the files store them: a q8_0 plan on an f32 folder
/// is refused saying what to plan, and FlexGen's group-wise formats (priced, not run)
/// are refused saying what the engine runs.
#[test]
fn run_refuses_plans_in_formats_the_files_or_the_engine_do_not_hold() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(ferry(d, &["synth", "--model", "test-tiny", "--dtype", "f32", "--out", "tiny"]).status.success());
    let tune = ["tune", "--gpu", "cpu", "--device-mem", "64MiB", "--model", "tiny", "--batch", "1"];
    for (format, expected) in [("q8_0", "holds it as f32"), ("int4-g64", "not int4-g64")] {
        let out = ferry(d, &[&tune[..], &["--weight-format", format, "--out", "p.yaml", "--force"]].concat());
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = ferry(d, &["run", "--model-dir", "tiny", "--plan", "p.yaml", "--gen-len", "2"]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains(expected), "{format}: {err}");
    }
}
