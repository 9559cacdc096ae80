//! `ferry check -- llama-server ...` with the real binary: a llama.cpp command line
//! read back into memory per device, a verdict, a predicted speed and the largest
//! `-ngl` that fits; refusals of what it cannot model.

mod common;

use common::{ferry, text};

fn check_json(dir: &std::path::Path, gpu: &str, command: &str) -> (i32, serde_json::Value) {
    let mut args = vec!["check", "--gpu", gpu, "--json", "--"];
    args.extend(command.split_whitespace());
    let out = ferry(dir, &args);
    let code = out.status.code().unwrap();
    assert!(code == 0 || code == 1, "{command}: {}", text(&out.stderr));
    (code, serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout))))
}

fn device(json: &serde_json::Value) -> &serde_json::Value {
    json["memory"].as_array().unwrap().iter().find(|p| p["pool"] == "device").unwrap()
}

#[test]
fn a_command_that_runs_out_names_the_largest_ngl_that_fits() {
    let dir = tempfile::tempdir().unwrap();
    let (code, all) = check_json(dir.path(), "rtx3060", "llama-server -m llama-2-13b -ngl 99 -c 4096 --port 8080");
    assert_eq!(code, 1, "13B f16 does not fit a 12 GB card");
    assert_eq!(device(&all)["fits"], false);
    assert_eq!(all["runs"], false);
    // llama.cpp's own log for this model and context: "KV self size = 3200.00 MiB".
    let kv = device(&all)["items"].as_array().unwrap().iter().find(|i| i["what"] == "resident KV cache").unwrap();
    assert_eq!(kv["bytes"], 3200u64 << 20);
    assert_eq!(all["ignored"], serde_json::json!(["--port 8080"]));
    let best = &all["largest_gpu_layers_that_fit"];
    let ngl = best["gpu_layers"].as_u64().unwrap();
    assert!(ngl > 0 && ngl < 40, "{best}");
    // The -ngl it names fits and runs at the speed it said; one layer more does not fit.
    let (code, fits) = check_json(dir.path(), "rtx3060", &format!("llama-server -m llama-2-13b -ngl {ngl} -c 4096"));
    assert_eq!(code, 0);
    assert_eq!((device(&fits)["fits"].clone(), fits["runs"].clone()), (true.into(), true.into()));
    assert_eq!(fits["predicted"]["tokens_per_s"], best["tokens_per_s"]);
    // Every prediction printed carries its interval, the same for the same plan.
    assert_eq!(fits["predicted_tokens_per_s_interval"], best["tokens_per_s_interval"]);
    let plan = fits["ferry_plan_tokens_per_s"].as_f64().unwrap();
    let interval = fits["ferry_plan_tokens_per_s_interval"].as_array().expect("Ferry's plan's interval");
    assert!(interval[0].as_f64().unwrap() < interval[1].as_f64().unwrap(), "{interval:?}");
    assert!(interval[1].as_f64().unwrap() <= plan, "datasheet: published speeds ran below predictions");
    let (code, _) = check_json(dir.path(), "rtx3060", &format!("llama-server -m llama-2-13b -ngl {} -c 4096", ngl + 1));
    assert_eq!(code, 1);
    // A smaller context leaves room for more layers.
    let (_, short) = check_json(dir.path(), "rtx3060", "llama-server -m llama-2-13b -ngl 99 -c 512");
    assert!(short["largest_gpu_layers_that_fit"]["gpu_layers"].as_u64().unwrap() > ngl);
}

/// `ferry check --help`'s first example names a file this machine does not have: it
/// is checked as the catalog model and type its name gives, at that type's bytes.
#[test]
fn a_gguf_file_that_is_not_here_is_checked_by_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let command = "llama-server -m llama-2-13b.Q4_K_M.gguf -ngl 30 -c 4096";
    let (code, by_name) = check_json(dir.path(), "rtx3060", command);
    assert_eq!((code, by_name["model"].as_str()), (0, Some("llama-2-13b")), "{by_name}");
    let (_, f16) = check_json(dir.path(), "rtx3060", "llama-server -m llama-2-13b -ngl 30 -c 4096");
    let weights = |json: &serde_json::Value| -> u64 {
        let items = device(json)["items"].as_array().unwrap().clone();
        items
            .iter()
            .filter(|i| i["what"].as_str().unwrap().contains("weights"))
            .map(|i| i["bytes"].as_u64().unwrap())
            .sum()
    };
    // Q4_K: 144 bytes per 256 weights against f16's 512.
    let ratio = weights(&by_name) as f64 / weights(&f16) as f64;
    assert!((ratio - 144.0 / 512.0).abs() < 0.01, "{ratio}");
    let out = ferry(dir.path(), &["check", "--gpu", "rtx3060", "--", "llama-server", "-m", "llama-2-13b.Q4_K_M.gguf"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        stderr.contains("not on this machine") && stdout.contains("--model llama-2-13b --weight-format q4_k"),
        "{stderr}{stdout}"
    );
    let out = ferry(dir.path(), &["check", "--gpu", "rtx3060", "--", "llama-server", "-m", "mystery-7b.gguf"]);
    assert!(!out.status.success() && text(&out.stderr).contains("no such file"), "{}", text(&out.stderr));
}

#[test]
fn a_gguf_file_is_checked_at_its_own_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let synth = ["synth", "--model", "test-tiny", "--format", "gguf", "--dtype", "q4_0", "--out", "m/tiny.gguf"];
    assert!(ferry(dir.path(), &synth).status.success());
    let out =
        ferry(dir.path(), &["check", "--gpu", "rtx3060", "--", "llama-server", "-m", "m/tiny.gguf", "-ngl", "99"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("-ngl all: all ") && stdout.contains("predicted:"), "{stdout}");
    assert!(text(&out.stderr).contains("no -c: checked at 4096 tokens"));
    let args =
        ["check", "--gpu", "rtx3060", "--device-mem", "1MiB", "--", "llama-server", "-m", "m/tiny.gguf", "-ngl", "99"];
    let out = ferry(dir.path(), &args);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("OUT OF MEMORY"), "{}", text(&out.stdout));
}

#[test]
fn what_it_cannot_model_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (args, expected) in [
        (vec!["check", "--gpu", "rtx3060", "--", "llama-server", "-m", "13b", "-ot", "ffn=CPU"], "-ot places tensors"),
        (vec!["check", "--gpu", "rtx3060", "--", "llama-server", "-m", "13b", "-ctk", "q4_0"], "quantized cache"),
        (vec!["check", "--gpu", "rtx3060", "--", "llama-server", "-m", "nosuch"], "unknown model"),
        (vec!["check", "--gpu", "rtx3060", "--", "llama-server", "-m", "13b", "-c", "8", "-np", "8"], "larger -c"),
        (vec!["check", "--gpu", "rtx3060"], "COMMAND"),
        (vec!["check", "--gpu", "rtx3060", "--", "llama-server", "-m", "13b", "-md", "1b"], "ferry tune --draft"),
    ] {
        let out = ferry(dir.path(), &args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected) && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// vLLM starts once weights, one `--max-model-len` sequence's KV cache and the
/// activations of one prefill chunk (`--max-num-batched-tokens`, 2048 by default on
/// this card) fit: Mistral-7B's 32 768 positions fit a 3090, and do not where the
/// whole prompt is one chunk; and runs as many sequences as the KV cache holds.
#[test]
fn vllm_starts_and_runs_with_the_activations_of_one_prefill_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let (_, stock) = check_json(dir.path(), "rtx3090", "vllm serve mistralai/Mistral-7B-v0.1");
    assert_eq!(device(&stock)["fits"], true, "{stock}");
    let one_chunk = "vllm serve mistralai/Mistral-7B-v0.1 --max-num-batched-tokens 32768";
    let (code, whole) = check_json(dir.path(), "rtx3090", one_chunk);
    assert_eq!((code, device(&whole)["fits"].clone()), (1, false.into()), "{whole}");
    // Running, too, a step holds one chunk's activations, not the batch's prompts':
    // stock 7B on a 4090 runs the sequences its KV cache holds (said to run out before).
    let (code, running) = check_json(dir.path(), "rtx4090", "vllm serve meta-llama/Llama-2-7b-hf");
    assert_eq!((code, running["runs"].clone()), (0, true.into()), "{running}");
    assert!(running["sequences"].as_u64().unwrap() > 8, "{running}");
}

#[test]
fn vllm_serve_is_checked_within_its_share_of_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let vllm = |flags: &str| check_json(dir.path(), "rtx4090", &format!("vllm serve llama-2-13b {flags}"));
    // 13B in f16 (24 GiB) does not fit 90 % of a 24 GB card.
    let (code, all) = vllm("--max-model-len 4096");
    assert_eq!(code, 1);
    assert_eq!((device(&all)["fits"].clone(), all["runs"].clone()), (false.into(), false.into()));
    // Offloading 8 GiB of weights leaves room for the KV cache of a few sequences.
    let (code, offloaded) = vllm("--cpu-offload-gb 8 --max-model-len 2048 --max-num-seqs 16 --port 8000");
    assert_eq!(code, 0, "{offloaded}");
    let layers = offloaded["offloaded_layers"].as_u64().unwrap();
    assert!(layers > 0 && layers < 40, "{offloaded}");
    let host = offloaded["memory"].as_array().unwrap().iter().find(|p| p["pool"] == "host").unwrap();
    assert!(host["needs_bytes"].as_u64().unwrap() >= 8 << 30, "the offloaded weights sit in host RAM: {host}");
    let sequences = offloaded["sequences"].as_u64().unwrap();
    let predicted = offloaded["predicted"]["tokens_per_s"].as_f64().unwrap();
    assert!((1..=16).contains(&sequences) && predicted > 0.0);
    // A datasheet prediction carries the calibration set's spread, below it.
    let interval = offloaded["predicted_tokens_per_s_interval"].as_array().expect("an interval");
    let (slow, fast) = (interval[0].as_f64().unwrap(), interval[1].as_f64().unwrap());
    assert!(0.0 < slow && slow < fast && fast <= predicted, "{slow}–{fast} around {predicted}");
    assert_eq!(offloaded["ignored"], serde_json::json!(["--port 8000"]));
    // More offloaded leaves more room for sequences; a smaller share of the GPU, less.
    let (_, more) = vllm("--cpu-offload-gb 12 --max-model-len 2048 --max-num-seqs 16");
    assert!(more["sequences"].as_u64().unwrap() >= sequences, "{more}");
    let (code, _) = vllm("--cpu-offload-gb 8 --max-model-len 2048 --gpu-memory-utilization 0.4");
    assert_eq!(code, 1);
    // vLLM users name the model by its Hugging Face repository: the same check.
    let (_, by_repository) = check_json(
        dir.path(),
        "rtx4090",
        "vllm serve meta-llama/Llama-2-13b-chat-hf --cpu-offload-gb 8 --max-model-len 2048 --max-num-seqs 16 --port 8000",
    );
    assert_eq!(by_repository, offloaded);
    // `--dtype float32` loads the weights in f32: twice the bytes, fewer cache tokens.
    let (_, half) = check_json(dir.path(), "a100-80gb", "vllm serve llama-2-7b --max-model-len 2048 --max-num-seqs 8");
    let (_, float) = check_json(
        dir.path(),
        "a100-80gb",
        "vllm serve llama-2-7b --max-model-len 2048 --max-num-seqs 8 --dtype float32",
    );
    let needs = |json: &serde_json::Value| device(json)["needs_bytes"].as_u64().unwrap() as f64;
    assert!(needs(&float) > 1.8 * needs(&half), "{} against {}", needs(&float), needs(&half));
    assert!(float["kv_cache_tokens"].as_u64() < half["kv_cache_tokens"].as_u64());
    // Its server by the older module name is the same command.
    let (_, by_module) = check_json(
        dir.path(),
        "rtx4090",
        "python3 -m vllm.entrypoints.openai.api_server --model meta-llama/Llama-2-13b-chat-hf --cpu-offload-gb 8 \
         --max-model-len 2048 --max-num-seqs 16 --port 8000",
    );
    assert_eq!(by_module, offloaded);
    // What it cannot model is refused by name.
    let out = ferry(dir.path(), &["check", "--gpu", "rtx4090", "--", "vllm", "serve", "llama-2-13b", "-tp", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("several GPUs"), "{}", text(&out.stderr));
}

/// A request longer than a sequence's context is shortened and the note says to what;
/// a zero-length request is refused, as `tune` refuses it.
#[test]
fn a_request_past_the_context_is_shortened_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(
        dir.path(),
        &["check", "--gpu", "rtx3060", "--", "llama-server", "-m", "7b", "-c", "2048", "-n", "100000"],
    );
    let err = text(&out.stderr);
    assert!(err.contains("the speed is predicted for a prompt of 1 and 2047 new tokens"), "{err}");
    let out = ferry(dir.path(), &["check", "--gpu", "rtx3060", "--prompt-len", "0", "--", "llama-server", "-m", "7b"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("must be at least 1"), "{}", text(&out.stderr));
}
