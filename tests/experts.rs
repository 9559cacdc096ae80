//! End-to-end tests of a mixture of experts' plans: where `ferry tune` keeps the
//! experts of a model too large for the GPU, in llama.cpp's terms and in Ferry's own.

mod common;

use common::{ferry, text};

/// The `--n-cpu-moe` question for a mixture of experts on a 12 GB GPU, for a long
/// answer (256 tokens: decoding outweighs the prompt): the plan keeps attention and KV
/// on the device, some layers' experts in host RAM computed there, says how many, and
/// gives the llama.cpp command keeping exactly those layers' experts on the CPU; its
/// plan file reloads with the same prediction.
#[test]
fn tune_answers_where_a_mixture_of_experts_keeps_its_experts() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "tune",
        "--gpu",
        "rtx3060",
        "--model",
        "qwen3-30b-a3b",
        "--weight-format",
        "q4_k",
        "--batch",
        "1",
        "--gen-len",
        "256",
    ];
    let out = ferry(dir.path(), &[&args[..], &["--out", "plan.yaml"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("experts: ")).unwrap_or_else(|| panic!("{stdout}"));
    let on_cpu: u64 = line["experts: ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!((1..48).contains(&on_cpu), "{line}");
    assert!(line.contains(&format!("--n-cpu-moe {on_cpu}")), "{line}");
    let plan: ferry_core::plan::Plan = ferry_core::yaml::read_file(&dir.path().join("plan.yaml")).unwrap();
    let policy = &plan.policy;
    assert!(policy.compute_host_layers_on_host);
    assert_eq!((policy.attention_weights.device, policy.kv_cache.device), (48, 48));
    assert_eq!(policy.mlp_weights.host, on_cpu);
    // The -ot rule names exactly on_cpu layers' experts.
    let rule = stdout.lines().find(|l| l.contains("_exps")).unwrap_or_else(|| panic!("{stdout}"));
    let layers = rule.split('(').nth(1).unwrap().split(')').next().unwrap().split('|').count() as u64;
    assert_eq!(layers, on_cpu, "{rule}");
    let exported = ferry(dir.path(), &["export", "--plan", "plan.yaml", "--to", "llama.cpp"]);
    assert!(text(&exported.stdout).contains(rule.trim().trim_end_matches(" \\")), "{}", text(&exported.stdout));
}

/// For a short answer (32 tokens) the same GPU does better streaming the experts each
/// step routes to from host RAM (the 512-token prompt is then computed on the device,
/// not the CPU): the plan says so, and the llama.cpp export says llama.cpp cannot.
#[test]
fn tune_streams_only_the_routed_experts_where_that_wins() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["tune", "--gpu", "rtx3060", "--model", "qwen3-30b-a3b", "--weight-format", "q4_k", "--batch", "1"];
    let out = ferry(dir.path(), &[&args[..], &["--out", "plan.yaml"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("experts: ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("reads only the experts its tokens are routed to (about 8.0 of 128"), "{line}");
    // The llama.cpp command under it computes those experts on the CPU instead: said there.
    let note = stdout.lines().find(|l| l.starts_with("  not the same run: ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(note.contains("computes CPU-placed experts on the CPU") && note.contains("ferry export"), "{note}");
    let plan: ferry_core::plan::Plan = ferry_core::yaml::read_file(&dir.path().join("plan.yaml")).unwrap();
    assert!(plan.policy.expert_reads.is_routed() && !plan.policy.compute_host_layers_on_host);
    assert!(plan.policy.mlp_weights.host + plan.policy.mlp_weights.disk > 0);
    let exported = text(&ferry(dir.path(), &["export", "--plan", "plan.yaml", "--to", "llama.cpp"]).stdout);
    assert!(exported.contains("only the experts each step routes to"), "{exported}");
}

/// A run writes its routing (`--routing-out`); tuning with it (`--routing`) plans with
/// those shares and names the file in the plan, which `simulate` reads back; a routing
/// that does not fit the model, and a dense model's routing, are refused with a reason.
#[test]
fn a_runs_measured_routing_feeds_the_next_plan() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(ferry(d, &["synth", "--model", "test-tiny-moe", "--dtype", "f32", "--out", "moe"]).status.success());
    std::fs::write(d.join("plan.yaml"), common::TINY_PLAN.replace("model: tiny", "model: moe")).unwrap();
    let run = ferry(d, &["run", "--model-dir", "moe", "--plan", "plan.yaml", "--routing-out", "routing.yaml"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let routing: ferry_core::model::ExpertPopularity = ferry_core::yaml::read_file(&d.join("routing.yaml")).unwrap();
    assert_eq!((routing.layers.len(), routing.experts_per_token), (4, 2));
    // 4 sequences × (6 prompt + 4 decoded) tokens, each layer's shares adding up to k.
    assert_eq!(routing.tokens, 40);
    routing.check(4, 8, 2).unwrap();
    // Nothing is overwritten without --force.
    let again = ferry(d, &["run", "--model-dir", "moe", "--plan", "plan.yaml", "--routing-out", "routing.yaml"]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again.stderr));

    let args = ["tune", "--gpu", "cpu", "--host", "ferry-ci-vm", "--device-mem", "8MiB", "--model", "moe"];
    let tuned = ferry(d, &[&args[..], &["--routing", "routing.yaml", "--out", "tuned.yaml"]].concat());
    assert!(tuned.status.success(), "{}", text(&tuned.stderr));
    let plan: ferry_core::plan::Plan = ferry_core::yaml::read_file(&d.join("tuned.yaml")).unwrap();
    assert_eq!(plan.models.routing.as_deref(), Some("routing.yaml"));
    let simulated = ferry(d, &["simulate", "--plan", "tuned.yaml"]);
    assert!(simulated.status.success(), "{}", text(&simulated.stderr));
    // The same prompts again with each layer's 2 most popular experts kept on the device
    // and the next 2 read ahead: the run says what share of the tokens' choices those
    // took — the routing's own, as the tokens are the same.
    let kept = common::TINY_PLAN
        .replace("model: tiny", "models: {target: moe, routing: routing.yaml}")
        .replace("pinned_host_bytes: 0", "pinned_host_bytes: 0\n  hot_experts: 2\n  prefetched_experts: 2");
    std::fs::write(d.join("kept.yaml"), kept).unwrap();
    let run_kept = ferry(d, &["run", "--model-dir", "moe", "--plan", "kept.yaml"]);
    assert!(run_kept.status.success(), "{}", text(&run_kept.stderr));
    let out = text(&run_kept.stdout);
    let line = out.lines().find(|l| l.starts_with("experts:")).unwrap();
    let share = 100.0 * plan_model_with(&routing).hot_hit_rate(4);
    assert!(
        line.contains(&format!(
            "the 4 kept or read ahead per layer took {share:.0} % of the tokens' choices ({share:.0} % predicted)"
        )),
        "{line}"
    );

    // A layer whose shares do not add up to k: the file and the layer are named.
    let mut broken = routing.clone();
    broken.layers[0][0] = (broken.layers[0][0] + 0.5) % 1.0;
    std::fs::write(d.join("broken.yaml"), ferry_core::yaml::to_yaml_string(&broken).unwrap()).unwrap();
    let refused = ferry(d, &[&args[..], &["--routing", "broken.yaml"]].concat());
    assert_eq!(refused.status.code(), Some(2));
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("broken.yaml") && stderr.contains("layer 0"), "{stderr}");
    // A dense model has no routing to write.
    assert!(ferry(d, &["synth", "--model", "test-tiny", "--dtype", "f32", "--out", "tiny"]).status.success());
    std::fs::write(d.join("dense.yaml"), common::TINY_PLAN).unwrap();
    let dense =
        ferry(d, &["run", "--model-dir", "tiny", "--plan", "dense.yaml", "--routing-out", "dense-routing.yaml"]);
    assert_eq!(dense.status.code(), Some(2));
    assert!(text(&dense.stderr).contains("no mixture of experts"), "{}", text(&dense.stderr));
}

/// test-tiny-moe with `routing` as its measured routing.
fn plan_model_with(routing: &ferry_core::model::ExpertPopularity) -> ferry_core::model::ModelSpec {
    let mut model = ferry_core::catalog::Catalog::builtin().unwrap().model("test-tiny-moe").unwrap().value;
    model.routing = Some(std::sync::Arc::new(routing.clone()));
    model
}
