//! GGUF files end to end with the real binary: `show model` describes a quantized file
//! by the tensor types it holds, `tune` and `simulate` plan float and quantized files
//! at the bytes the file holds, `run` runs a quantized file with 8-bit or f32
//! activations and refuses a plan in another format clearly. The files are written
//! by llama.cpp's `gguf` Python package (tests/reference/tiny_gguf.py; the README's
//! test command installs it).

mod common;

use std::path::Path;

use common::{ferry, text};

fn write_gguf(dir: &Path, name: &str, kind: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/tiny_gguf.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(dir.join(name))
        .arg(kind)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "the gguf package wrote no file (pip install gguf): {}", text(&out.stderr));
}

#[test]
fn show_describes_a_quantized_file_by_its_tensor_types() {
    let dir = tempfile::tempdir().unwrap();
    write_gguf(dir.path(), "q.gguf", "q");
    let out = ferry(dir.path(), &["show", "model", "q.gguf"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("2 layers, hidden 256, MLP 512, 4 heads (2 KV heads), vocabulary 300"), "{shown}");
    let mlp = shown.lines().find(|l| l.starts_with("MLP, all 2 layers")).unwrap();
    assert!(mlp.contains("Q4_K") && mlp.contains("Q6_K") && mlp.contains("F32"), "{mlp}");
    let out = ferry(dir.path(), &["show", "model", "q.gguf", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Q4_K: 144 bytes per 256 weights. Gate and up are 512 × 256 each, in 2 layers.
    assert_eq!(json["file"]["groups"]["mlp"]["by_type"]["Q4_K"], 2 * 2 * 512 * 256 / 256 * 144);
    assert_eq!(json["model"]["tie_word_embeddings"], false);
}

#[test]
fn tune_and_simulate_plan_float_and_quantized_files_at_their_own_bytes() {
    let dir = tempfile::tempdir().unwrap();
    write_gguf(dir.path(), "q.gguf", "q");
    write_gguf(dir.path(), "f.gguf", "f");
    for file in ["q.gguf", "f.gguf"] {
        let tune = ["tune", "--gpu", "cpu", "--device-mem", "64MiB", "--model", file, "--batch", "1"];
        let out = ferry(dir.path(), &[&tune[..], &["--json", "--out", "plan.yaml", "--force"]].concat());
        assert!(out.status.success(), "{file}: {}", text(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        // Planned as the file stores each tensor: its bytes are the tensor table's.
        let shown = ferry(dir.path(), &["show", "model", file, "--json"]);
        let described: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
        let file_bytes: u64 =
            described["file"]["groups"].as_object().unwrap().values().map(|g| g["bytes"].as_u64().unwrap()).sum();
        let row = &json["formats"][0];
        assert_eq!(row["weight_format"], "stored", "{file}");
        assert_eq!(row["weight_bytes"].as_u64(), Some(file_bytes), "{file}: {row}");
        let plan = std::fs::read_to_string(dir.path().join("plan.yaml")).unwrap();
        assert!(plan.contains("weight_format: stored"), "{plan}");
        let out = ferry(dir.path(), &["simulate", "--json", "--plan", "plan.yaml"]);
        assert!(out.status.success(), "{file}: {}", text(&out.stderr));
        let sim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(sim["metrics"]["tokens_per_s"], json["metrics"]["tokens_per_s"], "{file}");
    }
    // The quantized file's weights are a fraction of the float one's.
    let bytes = |file: &str| {
        let out = ferry(dir.path(), &["tune", "--gpu", "cpu", "--model", file, "--batch", "1", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["formats"][0]["weight_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(bytes("q.gguf") * 3 < bytes("f.gguf"));
    // Another format for a file is a different file: refused, saying what to do.
    let out = ferry(dir.path(), &["tune", "--gpu", "cpu", "--model", "q.gguf", "--weight-format", "q8_0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("plan it as stored"), "{}", text(&out.stderr));
    // The f16 file (the last plan written) runs; the package's random Q4_K blocks hold
    // non-finite scales, which the engine names instead of producing garbage.
    let out = ferry(dir.path(), &["run", "--model-dir", "f.gguf", "--plan", "plan.yaml", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["tokens"][0].as_array().map(Vec::len), Some(32), "{report}");
    let tune = ["tune", "--gpu", "cpu", "--device-mem", "64MiB", "--model", "q.gguf", "--batch", "1"];
    assert!(ferry(dir.path(), &[&tune[..], &["--out", "q.yaml"]].concat()).status.success());
    let out = ferry(dir.path(), &["run", "--model-dir", "q.gguf", "--plan", "q.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("non-finite value"), "{}", text(&out.stderr));
}

/// A quantized GGUF file Ferry wrote is tuned, simulated and run by the real binary,
/// from a folder holding it too, the plan's formats checked against the file's.
#[test]
fn a_quantized_gguf_file_tunes_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let synth = ["synth", "--model", "test-tiny", "--format", "gguf", "--dtype", "q4_0", "--out", "m/tiny.gguf"];
    assert!(ferry(dir.path(), &synth).status.success());
    let tune = ["tune", "--gpu", "cpu", "--device-mem", "64MiB", "--model", "m/tiny.gguf", "--batch", "2"];
    let out = ferry(dir.path(), &[&tune[..], &["--gen-len", "4", "--out", "plan.yaml"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    for model in ["m/tiny.gguf", "m"] {
        let out = ferry(dir.path(), &["run", "--model-dir", model, "--plan", "plan.yaml", "--json"]);
        assert!(out.status.success(), "{model}: {}", text(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["tokens"].as_array().map(Vec::len), Some(2), "{report}");
    }
    // With the KV cache on disk, its scratch file goes beside the GGUF file.
    let plan = std::fs::read_to_string(dir.path().join("plan.yaml")).unwrap();
    let resident_kv = "kv_cache:\n    device: 4\n    host: 0\n    disk: 0";
    assert!(plan.contains(resident_kv), "{plan}");
    let disk_kv = plan.replace(resident_kv, "kv_cache:\n    device: 0\n    host: 0\n    disk: 4");
    std::fs::write(dir.path().join("disk-kv.yaml"), disk_kv).unwrap();
    let out = ferry(dir.path(), &["run", "--model-dir", "m/tiny.gguf", "--plan", "disk-kv.yaml", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let left: Vec<_> = std::fs::read_dir(dir.path().join("m")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["tiny.gguf"], "the scratch file is removed");
    // Under a budget a third of the file's, the layers stream and the embedding table
    // stays in the file: the same tokens, each lookup reading its rows.
    let tokens = |plan: &str| {
        let out = ferry(dir.path(), &["run", "--model-dir", "m/tiny.gguf", "--plan", plan, "--json"]);
        assert!(out.status.success(), "{plan}: {}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["tokens"].clone()
    };
    let tight = [&tune[..4], &["1600KiB"], &tune[5..], &["--gen-len", "4", "--out", "tight.yaml"]].concat();
    let out = ferry(dir.path(), &tight);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan = std::fs::read_to_string(dir.path().join("tight.yaml")).unwrap();
    assert!(plan.contains("embeddings: disk") && plan.contains("disk: 4"), "{plan}");
    assert_eq!(tokens("tight.yaml"), tokens("plan.yaml"));
    // 8-bit activations (the default) and f32 ones give close, not equal, logits.
    for (activations, npy) in [("q8", "q8.npy"), ("f32", "f32.npy")] {
        let run = ["run", "--model-dir", "m/tiny.gguf", "--plan", "plan.yaml", "--activations", activations];
        let out = ferry(dir.path(), &[&run[..], &["--logits", npy]].concat());
        assert!(out.status.success(), "{activations}: {}", text(&out.stderr));
    }
    let compare = "import numpy as np\na, b = np.load('q8.npy'), np.load('f32.npy')\n\
                   scale = np.abs(b).max()\nworst = np.abs(a - b).max()\n\
                   assert 0 < worst < 0.05 * scale, (worst, scale)\n";
    let out = std::process::Command::new("python3").args(["-c", compare]).current_dir(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ferry(dir.path(), &["run", "--model-dir", "m/tiny.gguf", "--plan", "plan.yaml", "--activations", "int8"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("unknown activations 'int8'; use one of q8, f32"), "{}", text(&out.stderr));
    // A plan in another format than the file's is refused, saying what to plan.
    let plan = std::fs::read_to_string(dir.path().join("plan.yaml")).unwrap();
    std::fs::write(dir.path().join("q8.yaml"), plan.replace("weight_format: stored", "weight_format: q8_0")).unwrap();
    let out = ferry(dir.path(), &["run", "--model-dir", "m/tiny.gguf", "--plan", "q8.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("as q8_0 but") && err.contains("holds it as q4_0"), "{err}");
}

/// `synth --format gguf` writes the model `synth` writes (same seed) as a GGUF file
/// that llama.cpp's package reads: each tensor under llama.cpp's name, q/k rows in its
/// order, values within the format's rounding (tests/reference/compare_gguf.py); the
/// file describes the same shape; K-quant matrices of other widths take llama.cpp's fallback types.
#[test]
fn synth_writes_gguf_files_llama_cpp_reads_as_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let synth = |args: &[&str]| {
        let mut all = vec!["synth", "--model", "test-tiny", "--seed", "5"];
        all.extend_from_slice(args);
        ferry(dir.path(), &all)
    };
    let out = synth(&["--out", "float", "--dtype", "f32"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/compare_gguf.py");
    // test-tiny's rows of 128 and 352 values are not whole 256-value blocks: q4_k, q5_k,
    // q6_k, iq4_xs and q2_k store them as llama.cpp's quantizer does, in q5_0, q5_1,
    // q8_0, iq4_nl and q4_0 (checked by the script).
    for storage in
        ["f32", "f16", "q8_0", "q4_0", "q5_0", "q4_1", "q5_1", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "q2_k"]
    {
        let file = format!("tiny-{storage}.gguf");
        let out = synth(&["--format", "gguf", "--dtype", storage, "--out", &file]);
        assert!(out.status.success(), "{storage}: {}", text(&out.stderr));
        let check = std::process::Command::new("python3")
            .arg(&script)
            .arg(dir.path().join(&file))
            .arg(dir.path().join("float/model.safetensors"))
            .arg("32")
            .arg(storage)
            .output()
            .expect("python3 runs");
        assert!(check.status.success(), "{storage}: {}{}", text(&check.stdout), text(&check.stderr));
        let shown = text(&ferry(dir.path(), &["show", "model", &file]).stdout);
        assert!(shown.contains("4 layers, hidden 128, MLP 352, 4 heads (2 KV heads), vocabulary 512"), "{shown}");
    }
    // Q3_K_M's value projections are Q5_K, whose fallback is Q5_1: written, and read
    // back holding the types llama.cpp would write.
    let out = synth(&["--format", "gguf", "--dtype", "q3_k_m", "--out", "tiny-q3_k_m.gguf"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&ferry(dir.path(), &["show", "model", "tiny-q3_k_m.gguf"]).stdout);
    assert!(shown.contains("Q5_1") && shown.contains("Q4_0") && shown.contains("Q5_0"), "{shown}");
    // Q3_K's and Q2_K's is Q4_0 (IQ4_NL in older llama.cpp versions), IQ4_XS's IQ4_NL:
    // test-tiny's every matrix so (written above).
    for (storage, stored) in [("q2_k", "Q4_0"), ("iq4_xs", "IQ4_NL")] {
        let file = format!("tiny-{storage}.gguf");
        let shown = text(&ferry(dir.path(), &["show", "model", &file]).stdout);
        assert!(shown.contains(&format!("F32 2 %, {stored} 98 %")), "{shown}");
    }
    // An existing file is not overwritten without --force.
    let out = synth(&["--format", "gguf", "--dtype", "q8_0", "--out", "tiny-q8_0.gguf"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// A file in a ggml type the engine does not decode (here TQ2_0: an IQ2_XXS file's
/// tensors relabelled, the same 66-byte blocks) is read, shown and planned at its real bytes,
/// and `ferry run` refuses it naming the type and what it runs.
#[test]
fn a_file_of_a_type_the_engine_does_not_run_is_planned_and_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(
        dir.path(),
        &["synth", "--model", "test-small", "--format", "gguf", "--dtype", "iq2_xxs", "--out", "iq2.gguf"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let relabel = "import struct, sys\nfrom gguf import GGUFReader\nr = GGUFReader(sys.argv[1])\n\
                   data = bytearray(open(sys.argv[1], 'rb').read())\n\
                   for t in r.tensors:\n    if t.tensor_type.value == 16:\n\
                   \x20       at = t.field.parts[4].ctypes.data - r.data.ctypes.data\n\
                   \x20       struct.pack_into('<I', data, at, 35)\n\
                   open(sys.argv[2], 'wb').write(data)\n";
    let out = std::process::Command::new("python3")
        .args(["-c", relabel, "iq2.gguf", "tq2.gguf"])
        .current_dir(dir.path())
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = ferry(dir.path(), &["show", "model", "tq2.gguf"]);
    assert!(text(&shown.stdout).contains("MLP, all 10 layers        21.3 MiB"), "{}", text(&shown.stdout));
    assert!(text(&shown.stdout).contains("TQ2_0 100 %"), "{}", text(&shown.stdout));
    let tune = ["tune", "--gpu", "cpu", "--device-mem", "40MiB", "--model", "tq2.gguf", "--out", "plan.yaml"];
    let out = ferry(dir.path(), &tune);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ferry(dir.path(), &["run", "--model-dir", "tq2.gguf", "--plan", "plan.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("is TQ2_0; the engine runs") && err.contains("IQ1_M"), "{err}");
}
