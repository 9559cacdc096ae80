//! Speculative decoding end to end through the binary: a self-speculating plan
//! simulates with its expected rounds, runs with exactly the tokens of the same plan
//! without a draft and reports the acceptance rate it measured; `ferry tune --draft`
//! writes such a plan; bad speculation input is refused with exit status 2.

mod common;

use common::{ferry, text, TINY_PLAN};

const SPECULATION: &str = "  speculation: {draft: {kind: self, layers: 1}, draft_len: 3, acceptance_rate: 0.6}\n";

#[test]
fn a_speculative_plan_simulates_runs_and_measures_its_acceptance() {
    let dir = tempfile::tempdir().unwrap();
    // Later layers damped: the first layer predicts many of the model's tokens.
    let args =
        ["synth", "--model", "test-tiny", "--dtype", "f32", "--out", "tiny", "--damp-from", "1", "--damping", "0.3"];
    let synth = ferry(dir.path(), &args);
    assert!(synth.status.success(), "{}", text(&synth.stderr));
    let plain = TINY_PLAN.replace("gen_len: 5", "gen_len: 12");
    std::fs::write(dir.path().join("plain.yaml"), &plain).unwrap();
    std::fs::write(dir.path().join("spec.yaml"), plain.clone() + SPECULATION).unwrap();

    let out = ferry(dir.path(), &["simulate", "--plan", "spec.yaml", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let simulated: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // A micro-batch of 2 accepts a token at 0.6² = 0.36: 1 + 0.36 + 0.36² + 0.36³.
    let per_round = simulated["speculation"]["tokens_per_round"].as_f64().unwrap();
    assert!((per_round - 1.536256).abs() < 1e-6, "{simulated}");
    let out = ferry(dir.path(), &["simulate", "--plan", "spec.yaml"]);
    assert!(text(&out.stdout).contains("draft: the first 1 layers; 3 draft tokens per round"), "{}", text(&out.stdout));

    let run = |plan: &str| -> serde_json::Value {
        let out = ferry(dir.path(), &["run", "--model-dir", "tiny", "--plan", plan, "--json"]);
        assert!(out.status.success(), "{plan}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let reference = run("plain.yaml");
    let speculative = run("spec.yaml");
    assert_eq!(reference["tokens"], speculative["tokens"], "speculation changed the tokens");
    assert!(reference["speculation"].is_null());
    let measured = &speculative["speculation"];
    let rate = measured["acceptance_rate"].as_f64().unwrap();
    assert!(rate > 0.0 && rate < 1.0, "{measured}");
    assert!(measured["rounds"].as_u64().unwrap() < 11, "fewer rounds than tokens: {measured}");
    assert!(speculative["predicted_tokens_per_s_at_measured_acceptance"].as_f64().unwrap() > 0.0);
    assert_eq!(speculative["metrics"]["generated_tokens"], 48);
    // The human report says what was measured and what the plan assumed.
    let out = ferry(dir.path(), &["run", "--model-dir", "tiny", "--plan", "spec.yaml"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("(measured; the plan assumed 0.600)"), "{stdout}");
    assert!(stdout.contains("predicted at the measured α"), "{stdout}");
}

#[test]
fn tune_with_a_draft_writes_a_speculative_plan_or_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let tune = |extra: &[&str]| {
        let mut args =
            vec!["tune", "--gpu", "cpu", "--host", "ferry-ci-vm", "--device-mem", "4MiB", "--model", "test-tiny"];
        args.extend(["--batch", "1", "--prompt-len", "16", "--gen-len", "32"]);
        args.extend(extra);
        ferry(dir.path(), &args)
    };
    let out = tune(&["--draft", "self:1", "--acceptance", "0.9", "--out", "plan.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("draft tokens") && stdout.contains("vs no draft"), "{stdout}");
    let plan = std::fs::read_to_string(dir.path().join("plan.yaml")).unwrap();
    assert!(
        plan.contains("speculation:") && plan.contains("kind: self"),
        "at α = 0.9 the draft wins:\n{plan}\n{stdout}"
    );
    let out = ferry(dir.path(), &["simulate", "--plan", "plan.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    for (args, needle) in [
        (vec!["--draft", "self:9", "--acceptance", "0.5"], "1 to 4"),
        (vec!["--draft", "self:4", "--acceptance", "0.5"], "the model itself"),
        (vec!["--draft", "tiny-draft", "--acceptance", "0.5"], "self:L"),
        (vec!["--draft", "self:1", "--acceptance", "1.5"], "probability"),
        (vec!["--draft", "self:1", "--acceptance", "0.5", "--draft-len", "0"], "draft_len"),
    ] {
        let out = tune(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(needle), "{args:?}: {}", text(&out.stderr));
    }
    // --draft without --acceptance: clap says what is missing.
    let out = tune(&["--draft", "self:1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--acceptance"), "{}", text(&out.stderr));
}

#[test]
fn bad_speculation_sections_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (section, needle) in [
        ("  speculation: {draft: {kind: self, layers: 1}, draft_len: 0, acceptance_rate: 0.5}\n", "draft_len"),
        ("  speculation: {draft: {kind: self, layers: 7}, draft_len: 2, acceptance_rate: 0.5}\n", "1 to 4"),
        ("  speculation: {draft: {kind: self, layers: 1}, draft_len: 2, acceptance_rate: .nan}\n", "probability"),
        ("  speculation: {draft: {kind: other}, draft_len: 2, acceptance_rate: 0.5}\n", "other"),
        ("  speculation: {draft: {kind: self, layers: 1}, draft_len: 2}\n", "acceptance_rate"),
    ] {
        let plan = TINY_PLAN.replace("model: tiny", "model: test-tiny") + section;
        std::fs::write(dir.path().join("bad.yaml"), plan).unwrap();
        let out = ferry(dir.path(), &["simulate", "--plan", "bad.yaml"]);
        assert_eq!(out.status.code(), Some(2), "{section}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(needle), "{section}: {}", text(&out.stderr));
    }
    // Self-speculation shares the head on the device (of a machine with a host apart).
    let plan = TINY_PLAN
        .replace("model: tiny", "model: test-tiny")
        .replace("gpu: cpu", "gpu: rtx3060-12gb")
        .replace("  head: device", "  head: host")
        + SPECULATION;
    std::fs::write(dir.path().join("bad.yaml"), plan).unwrap();
    let out = ferry(dir.path(), &["simulate", "--plan", "bad.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("embeddings and head on the device"), "{}", text(&out.stderr));
}
