//! Fuzzing the input parsers: mutated plans, profiles and `config.json` files go through
//! the same functions the CLI calls (read, parse, resolve, validate). Whatever the
//! bytes, the answer is a value or an error, never a panic, and it comes quickly.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_core::catalog::Catalog;
use ferry_core::hardware::Hardware;
use ferry_core::profile::Profile;
use proptest::prelude::*;
use proptest::sample::Index;

/// Each parse must finish well inside this, even in a debug build.
const BOUND: Duration = Duration::from_secs(2);

const PLANS: [&str; 4] = [
    include_str!("../../configs/plans/cpu-tinyllama-512mib-pipelined.yaml"),
    include_str!("../../configs/plans/rtx3060-13b-layer-prefetch.yaml"),
    include_str!("../../configs/plans/rtx3060-laptop-13b-zigzag.yaml"),
    include_str!("../../configs/plans/t4-opt-30b-sequential.yaml"),
];

const CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "hidden_size": 128,
  "intermediate_size": 352,
  "num_hidden_layers": 4,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "vocab_size": 512,
  "max_position_embeddings": 256,
  "rms_norm_eps": 1e-05,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false,
  "hidden_act": "silu",
  "torch_dtype": "float32"
}"#;

/// Values that break naive parsers: wrong types, extremes, YAML specials, nesting.
const TOKENS: &[&str] = &[
    "-1",
    "0",
    "1e308",
    "-1e308",
    "1e-300",
    "NaN",
    ".nan",
    ".inf",
    "-.inf",
    "18446744073709551616",
    "99999999999999999999999",
    "\"128\"",
    "{}",
    "[]",
    "[[[[[[[[[[",
    "{a: {a: {a: {a:",
    "~",
    "null",
    "true",
    "&a [*a]",
    "*undefined",
    "!!binary AAAA",
    "!custom x",
    "\u{feff}",
    "\"\\u0000\"",
    "'",
    "\"",
    "- - - - -",
    ": :",
    "\t",
    "0x10",
    "1 GiB",
    "64ZiB",
    "18446744073709551615B",
    "é",
];

#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the value after one `: ` (or `":`) with a token, to the end of the line.
    Value(Index, usize),
    Insert(Index, usize),
    Flip(Index, u8),
    Delete(Index, usize),
    Truncate(Index),
    /// Copy a chunk of the document somewhere else.
    Duplicate(Index, usize, Index),
    Bytes(Index, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 0..TOKENS.len()).prop_map(|(i, t)| Mutation::Value(i, t)),
        2 => (any::<Index>(), 0..TOKENS.len()).prop_map(|(i, t)| Mutation::Insert(i, t)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        1 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), 1usize..200, any::<Index>()).prop_map(|(i, n, j)| Mutation::Duplicate(i, n, j)),
        1 => (any::<Index>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Mutation::Bytes(i, b)),
    ]
}

fn mutate(seed: &str, mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = seed.as_bytes().to_vec();
    for m in mutations {
        let len = bytes.len().max(1);
        match m {
            Mutation::Value(i, t) => {
                let starts: Vec<usize> = bytes
                    .windows(2)
                    .enumerate()
                    .filter(|(_, w)| w[1] == b' ' && (w[0] == b':'))
                    .map(|(p, _)| p + 2)
                    .collect();
                if starts.is_empty() {
                    continue;
                }
                let start = starts[i.index(starts.len())];
                let end =
                    bytes[start..].iter().position(|&b| b == b'\n' || b == b',').map_or(bytes.len(), |p| start + p);
                bytes.splice(start..end, TOKENS[*t].bytes());
            }
            Mutation::Insert(i, t) => {
                let at = i.index(len + 1).min(bytes.len());
                bytes.splice(at..at, TOKENS[*t].bytes());
            }
            Mutation::Flip(i, b) => {
                if !bytes.is_empty() {
                    let at = i.index(bytes.len());
                    bytes[at] ^= b.max(&1);
                }
            }
            Mutation::Delete(i, n) => {
                let at = i.index(len).min(bytes.len());
                let end = (at + n).min(bytes.len());
                bytes.drain(at..end);
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(len)),
            Mutation::Duplicate(i, n, j) => {
                let at = i.index(len).min(bytes.len());
                let chunk: Vec<u8> = bytes[at..(at + n).min(bytes.len())].to_vec();
                let to = j.index(bytes.len() + 1);
                bytes.splice(to..to, chunk);
            }
            Mutation::Bytes(i, b) => {
                let at = i.index(len + 1).min(bytes.len());
                bytes.splice(at..at, b.iter().copied());
            }
        }
    }
    bytes
}

fn profile_seed() -> String {
    let catalog = Catalog::builtin().unwrap();
    let gpu = catalog.gpu("t4").unwrap().value;
    let host = catalog.host(&gpu.default_host).unwrap().value;
    ferry_core::yaml::to_yaml_string(&Profile::from_datasheet(&Hardware { gpu, host })).unwrap()
}

fn timed<T>(what: &str, input: &[u8], f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    let elapsed = started.elapsed();
    assert!(elapsed < BOUND, "{what} took {elapsed:?} on:\n{}", String::from_utf8_lossy(input));
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// A mutated plan file, loaded as `ferry simulate plan.yaml` loads it.
    #[test]
    fn mutated_plans_never_panic(seed in 0..PLANS.len(), mutations in proptest::collection::vec(mutation(), 1..6)) {
        let bytes = mutate(PLANS[seed], &mutations);
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "plan.yaml", &bytes);
        let catalog = Catalog::builtin().unwrap();
        let _ = timed("load_plan", &bytes, || ferry_core::resolve::load_plan(&catalog, &path));
        let text = String::from_utf8_lossy(&bytes);
        let _ = timed("from_yaml_str", &bytes, || ferry_core::yaml::from_yaml_str::<ferry_core::plan::Plan>(&text, "plan.yaml"));
    }

    /// A mutated measured profile, parsed and validated as a plan's `profile:` is.
    #[test]
    fn mutated_profiles_never_panic(mutations in proptest::collection::vec(mutation(), 1..6)) {
        let bytes = mutate(&profile_seed(), &mutations);
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "profile.yaml", &bytes);
        let _ = timed("profile", &bytes, || {
            ferry_core::yaml::read_file::<Profile>(&path).map(|p| p.validate())
        });
    }

    /// A mutated `config.json`, read as a model folder.
    #[test]
    fn mutated_configs_never_panic(mutations in proptest::collection::vec(mutation(), 1..6)) {
        let bytes = mutate(CONFIG, &mutations);
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "config.json", &bytes);
        let result = timed("config.json", &bytes, || ferry_core::catalog::model_from_path(dir.path()));
        if let Ok(model) = result {
            // What parsed is usable: its arithmetic does not overflow.
            let _ = model.params();
            let _ = model.total_bytes(model.dtype);
            prop_assert!(model.rope_theta.is_finite() && model.rope_theta > 0.0);
            prop_assert!(model.rms_norm_eps.is_finite() && model.rms_norm_eps > 0.0);
        }
    }
}

/// Values of every JSON type, in and out of range.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        (-3i64..300).prop_map(|n| json!(n)),
        prop::sample::select(vec![u64::MAX, 1 << 40, 1 << 20, 4096]).prop_map(|n| json!(n)),
        prop::sample::select(vec![0.0, -1.0, 1e-300, 1e300, 1e-6, 0.5, 500000.0, 2.5]).prop_map(|x| json!(x)),
        prop::sample::select(vec!["128", "", "silu", "1e-5", "true"]).prop_map(|s| json!(s)),
        any::<bool>().prop_map(|b| json!(b)),
        Just(json!({})),
        Just(json!([64])),
    ]
}

const KEYS: &[&str] = &[
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// One `config.json` key set to a value of any type: it is either taken as given (the
    /// right type, in range) or refused; never replaced by a default.
    #[test]
    fn config_values_are_taken_or_refused_never_defaulted(key in 0..KEYS.len(), value in json_value()) {
        let key = KEYS[key];
        let mut config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(CONFIG).unwrap();
        config.insert(key.to_string(), value.clone());
        let text = serde_json::Value::Object(config).to_string();
        let Ok(model) = ferry_core::model::from_hf_config(&text, "config.json", "m") else { return Ok(()) };
        let taken = match key {
            "hidden_size" => value.as_u64() == Some(model.hidden_size),
            "intermediate_size" => value.as_u64() == Some(model.intermediate_size),
            "num_hidden_layers" => value.as_u64() == Some(model.num_layers),
            "num_attention_heads" => value.as_u64() == Some(model.num_heads),
            "num_key_value_heads" => value.as_u64() == Some(model.num_kv_heads),
            "vocab_size" => value.as_u64() == Some(model.vocab_size),
            "max_position_embeddings" => value.as_u64() == Some(model.max_position_embeddings),
            "rope_theta" => value.as_f64() == Some(model.rope_theta) && model.rope_theta > 0.0,
            "rms_norm_eps" => value.as_f64() == Some(model.rms_norm_eps) && model.rms_norm_eps > 0.0,
            "tie_word_embeddings" => value.as_bool() == Some(model.tie_word_embeddings),
            _ => unreachable!(),
        };
        prop_assert!(taken, "{key}: {value} was accepted as {model:?}");
        let _ = model.params();
    }
}

#[test]
fn the_seeds_parse() {
    let catalog = Catalog::builtin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for plan in PLANS {
        let path = write(dir.path(), "plan.yaml", plan.as_bytes());
        ferry_core::resolve::load_plan(&catalog, &path).unwrap();
    }
    let profile: Profile = ferry_core::yaml::from_yaml_str(&profile_seed(), "profile.yaml").unwrap();
    profile.validate().unwrap();
    write(dir.path(), "config.json", CONFIG.as_bytes());
    ferry_core::catalog::model_from_path(dir.path()).unwrap();
}
