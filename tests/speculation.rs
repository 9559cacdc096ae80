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
    // Each sequence accepts a token at 0.6 on its own: 1 + 0.6 + 0.6² + 0.6³.
    let per_round = simulated["speculation"]["tokens_per_round"].as_f64().unwrap();
    assert!((per_round - 2.176).abs() < 1e-6, "{simulated}");
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
    assert!(stdout.contains("tokens per round and sequence"), "{stdout}");
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
    // --draft without --acceptance and no measured rate: says both ways to give one.
    let out = tune(&["--draft", "self:1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("--acceptance") && err.contains("ferry profile"), "{err}");
    // A rate measured into the profile (`ferry profile --draft`) is used, and said.
    let mut profile = text(&ferry(dir.path(), &["show", "profile", "cpu"]).stdout);
    profile.push_str(
        "acceptance:\n- {target: test-tiny, draft: 'self:1', draft_len: 4, acceptance_rate: 0.9, judged: 120, \
         sequences: 4, tokens_per_sequence: 32}\n",
    );
    std::fs::write(dir.path().join("measured.yaml"), profile).unwrap();
    let args = ["tune", "--profile", "measured.yaml", "--device-mem", "4MiB", "--model", "test-tiny", "--batch", "1"];
    let mut args = args.to_vec();
    args.extend(["--prompt-len", "16", "--gen-len", "32", "--draft", "self:1", "--out", "measured-plan.yaml"]);
    let out = ferry(dir.path(), &args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("α = 0.900") && text(&out.stderr).contains("120 judged"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("planned at α = 0.900"), "{}", text(&out.stdout));
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

#[test]
fn a_separate_draft_model_runs_from_the_plans_models_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let args =
        ["synth", "--model", "test-tiny", "--dtype", "f32", "--out", "tiny", "--damp-from", "1", "--damping", "0.3"];
    assert!(ferry(dir.path(), &args).status.success());
    // The draft: the same shape cut to one layer, from the same seed (so its layer,
    // embeddings and head are the target's); and one with another vocabulary.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("tiny/config.json")).unwrap()).unwrap();
    for (folder, key, value) in [("cut", "num_hidden_layers", 1), ("wide", "vocab_size", 640)] {
        let mut variant = config.clone();
        variant[key] = value.into();
        variant.as_object_mut().unwrap().remove("ferry_synthetic");
        std::fs::create_dir_all(dir.path().join(format!("{folder}-config"))).unwrap();
        std::fs::write(dir.path().join(format!("{folder}-config/config.json")), variant.to_string()).unwrap();
        let config_path = format!("{folder}-config/config.json");
        let out = ferry(dir.path(), &["synth", "--model", &config_path, "--dtype", "f32", "--out", folder]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let plain = TINY_PLAN.replace("gen_len: 5", "gen_len: 12");
    let section = "  speculation: {draft: {kind: model}, draft_len: 3, acceptance_rate: 0.6}\n";
    let with_draft =
        |draft: &str| plain.replace("model: tiny\n", &format!("models: {{target: tiny, draft: {draft}}}\n")) + section;
    std::fs::write(dir.path().join("plain.yaml"), &plain).unwrap();
    std::fs::write(dir.path().join("cut.yaml"), with_draft("cut")).unwrap();
    std::fs::write(dir.path().join("self.yaml"), plain.clone() + SPECULATION).unwrap();

    let run = |plan: &str, extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["run", "--model-dir", "tiny", "--plan", plan, "--json"];
        args.extend(extra);
        let out = ferry(dir.path(), &args);
        assert!(out.status.success(), "{plan}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let reference = run("plain.yaml", &[]);
    let cut = run("cut.yaml", &[]);
    assert_eq!(reference["tokens"], cut["tokens"], "a separate draft changed the tokens");
    // The cut file is the self-speculating draft's layer: the same acceptance.
    let own = run("self.yaml", &[]);
    assert_eq!(own["speculation"]["agreed"], cut["speculation"]["agreed"]);
    assert_eq!(own["speculation"]["rejections"], cut["speculation"]["rejections"]);
    // --draft-dir stands in for the plan's draft.
    std::fs::write(dir.path().join("elsewhere.yaml"), with_draft("missing-folder")).unwrap();
    let out = ferry(dir.path(), &["run", "--model-dir", "tiny", "--plan", "elsewhere.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(run("elsewhere.yaml", &["--draft-dir", "cut"])["tokens"], reference["tokens"]);
    // The export names the draft where the engine takes one.
    let out = ferry(dir.path(), &["export", "--plan", "cut.yaml", "--to", "llama.cpp"]);
    assert!(text(&out.stdout).contains("-md cut --draft-max 3"), "{}", text(&out.stdout));

    // A draft of another vocabulary, in a plan or given to tune, is refused.
    std::fs::write(dir.path().join("wide.yaml"), with_draft("wide")).unwrap();
    let out = ferry(dir.path(), &["simulate", "--plan", "wide.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("vocabulary of 640 tokens"), "{}", text(&out.stderr));
    let tune =
        ["tune", "--gpu", "cpu", "--device-mem", "64MiB", "--model", "tiny", "--draft", "wide", "--acceptance", "0.5"];
    let out = ferry(dir.path(), &tune);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("vocabulary"), "{}", text(&out.stderr));
    // Half a draft: named without a speculation that uses it, or the reverse.
    std::fs::write(dir.path().join("half.yaml"), with_draft("cut").replace(section, "")).unwrap();
    let out = ferry(dir.path(), &["simulate", "--plan", "half.yaml"]);
    assert!(text(&out.stderr).contains("does not speculate with it"), "{}", text(&out.stderr));
    std::fs::write(dir.path().join("half.yaml"), plain.clone() + section).unwrap();
    let out = ferry(dir.path(), &["simulate", "--plan", "half.yaml"]);
    assert!(text(&out.stderr).contains("names none"), "{}", text(&out.stderr));
}
