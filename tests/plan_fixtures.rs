//! Plan files written by earlier releases keep working: every plan in
//! `tests/fixtures/plans-0.1/` (the shipped examples and `ferry tune` outputs of
//! Ferry 0.1) loads and predicts exactly the figures that release printed.

use std::path::Path;
use std::process::Command;

#[test]
fn plans_from_the_previous_release_predict_the_same_figures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/plans-0.1");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let expected = expected.as_object().unwrap();
    assert!(expected.len() >= 10, "fixtures missing");
    for (file, figures) in expected {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["simulate", "--json", "--plan"])
            .arg(dir.join(file))
            .output()
            .unwrap();
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let metrics = json.get("metrics").unwrap_or(&json);
        for key in ["tokens_per_s", "time_to_first_token_ns", "time_per_output_token_ns", "total_ns"] {
            assert_eq!(metrics[key], figures[key], "{file}: {key}");
        }
    }
}
