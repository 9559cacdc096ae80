//! A safetensors file whose layout is wrong is refused with the file and tensor named:
//! a header length that is off, tensors that overlap, leave gaps or trailing bytes,
//! duplicate names, sizes that overflow, and shard paths that leave the model folder
//! or name something other than a regular file.

use std::path::{Path, PathBuf};

use ferry_core::catalog::Catalog;
use ferry_core::model::Dtype;
use ferry_engine::safetensors::read_header;
use ferry_engine::weights::ModelFiles;

fn tiny(dir: &Path) -> PathBuf {
    let spec = Catalog::builtin().unwrap().model("test-tiny").unwrap().value;
    ferry_engine::synth::synthesize(&spec, Dtype::F32, 3, dir, false, |_, _| {}).unwrap();
    dir.join("model.safetensors")
}

fn error(dir: &Path) -> String {
    match ModelFiles::open(dir) {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            assert!(e.is_usage_error(), "{e} should be the user's to fix");
            e.to_string()
        }
    }
}

/// The header text and the data of a safetensors file.
fn split(file: &Path) -> (String, Vec<u8>) {
    let bytes = std::fs::read(file).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (String::from_utf8(bytes[8..8 + len].to_vec()).unwrap(), bytes[8 + len..].to_vec())
}

/// Rewrites a file's header with `edit`, keeping its data; the length field follows the new header.
fn edit_header(file: &Path, edit: impl FnOnce(String) -> String) {
    let (header, data) = split(file);
    let header = edit(header);
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(file, out).unwrap();
}

/// Changes one tensor's entry in the header through the parsed JSON.
fn edit_entry(file: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    edit_header(file, |header| {
        let mut map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&header).unwrap();
        edit(map.get_mut(name).unwrap());
        serde_json::to_string(&map).unwrap()
    });
}

fn offsets(file: &Path, name: &str) -> (u64, u64) {
    let map: serde_json::Value = serde_json::from_str(&split(file).0).unwrap();
    let o = &map[name]["data_offsets"];
    (o[0].as_u64().unwrap(), o[1].as_u64().unwrap())
}

/// The tensor stored second (the first one after offset 0).
fn second_tensor(file: &Path) -> String {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&split(file).0).unwrap();
    let mut entries: Vec<(u64, String)> = map
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (v["data_offsets"][0].as_u64().unwrap(), k.clone()))
        .collect();
    entries.sort();
    entries[1].1.clone()
}

#[test]
fn a_header_length_a_few_bytes_off_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(dir.path());
    let original = std::fs::read(&file).unwrap();
    for delta in [-4i64, -1, 1, 4] {
        let mut bytes = original.clone();
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as i64 + delta;
        bytes[..8].copy_from_slice(&(len as u64).to_le_bytes());
        std::fs::write(&file, &bytes).unwrap();
        let err = error(dir.path());
        assert!(err.contains("model.safetensors"), "{delta}: {err}");
        if delta < 0 {
            // The padding still parses: the extra data bytes at the end give it away.
            assert!(err.contains("trailing bytes") && err.contains("belong to no tensor"), "{delta}: {err}");
        }
    }
}

#[test]
fn overlapping_shifted_and_trailing_bytes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(dir.path());
    let original = std::fs::read(&file).unwrap();
    let name = second_tensor(&file);
    let (begin, end) = offsets(&file, &name);

    edit_entry(&file, &name, |e| e["data_offsets"] = serde_json::json!([begin - 4, end - 4]));
    let err = error(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains(&format!("'{name}'")) && err.contains("overlaps"),
        "{err}"
    );

    std::fs::write(&file, &original).unwrap();
    edit_entry(&file, &name, |e| e["data_offsets"] = serde_json::json!([begin + 4, end + 4]));
    let err = error(dir.path());
    assert!(err.contains(&format!("'{name}'")) && err.contains("belong to no tensor"), "{err}");

    let mut longer = original.clone();
    longer.extend_from_slice(&[0u8; 16]);
    std::fs::write(&file, &longer).unwrap();
    let err = error(dir.path());
    assert!(err.contains("16 trailing bytes"), "{err}");

    std::fs::write(&file, &original).unwrap();
    ModelFiles::open(dir.path()).unwrap();
}

#[test]
fn duplicate_tensor_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(dir.path());
    let name = second_tensor(&file);
    let (header, _) = split(&file);
    let map: serde_json::Value = serde_json::from_str(&header).unwrap();
    // The same name again, last in the header (where a JSON map would let it win),
    // pointing at the first tensor of the same size.
    let entry = map[&name].clone();
    edit_header(&file, |header| {
        let body = header.trim_end().strip_suffix('}').unwrap().to_string();
        format!("{body},\"{name}\":{entry}}}")
    });
    let err = error(dir.path());
    assert!(err.contains("model.safetensors") && err.contains(&format!("tensor '{name}' appears twice")), "{err}");
}

#[test]
fn sizes_that_overflow_are_refused_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(dir.path());
    let name = second_tensor(&file);
    edit_entry(&file, &name, |e| {
        e["shape"] = serde_json::json!([1u64 << 40, 1u64 << 40]);
        e["data_offsets"] = serde_json::json!([0, u64::MAX]);
    });
    let err = read_header(&file).unwrap_err().to_string();
    assert!(err.contains(&format!("tensor '{name}'")) && err.contains("do not match shape"), "{err}");
}

#[test]
fn a_directory_named_model_safetensors_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny(dir.path());
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    let err = error(dir.path());
    assert!(err.contains("model.safetensors") && err.contains("is a directory"), "{err}");
    assert!(!err.contains("truncated"), "{err}");
}

/// Turns the single file into one shard listed by an index; returns the tensor names.
fn shard(dir: &Path) -> Vec<String> {
    let file = dir.join("model.safetensors");
    let names: Vec<String> = read_header(&file).unwrap().into_keys().collect();
    std::fs::rename(&file, dir.join("model-00001-of-00001.safetensors")).unwrap();
    write_index(dir, &names, |_| "model-00001-of-00001.safetensors".into());
    names
}

fn write_index(dir: &Path, names: &[String], shard_of: impl Fn(&str) -> serde_json::Value) {
    let map: serde_json::Map<String, serde_json::Value> = names.iter().map(|n| (n.clone(), shard_of(n))).collect();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn shard_paths_stay_inside_the_model_folder_and_name_regular_files() {
    let outer = tempfile::tempdir().unwrap();
    let dir = outer.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    tiny(&dir);
    let names = shard(&dir);
    ModelFiles::open(&dir).unwrap();
    let first = names[0].clone();
    let pointing = |target: &str| {
        let target = target.to_string();
        let first = first.clone();
        move |n: &str| {
            if n == first {
                serde_json::Value::String(target.clone())
            } else {
                "model-00001-of-00001.safetensors".into()
            }
        }
    };
    // A copy outside the folder, reached by '..', an absolute path or a link.
    std::fs::copy(dir.join("model-00001-of-00001.safetensors"), outer.path().join("outside.safetensors")).unwrap();
    let outside = outer.path().join("outside.safetensors");
    for target in ["../outside.safetensors", outside.to_str().unwrap(), "/dev/zero", ""] {
        write_index(&dir, &names, pointing(target));
        let err = error(&dir);
        assert!(
            err.contains("model.safetensors.index.json")
                && err.contains(&format!("tensor '{first}'"))
                && err.contains("relative path inside the model folder"),
            "{target}: {err}"
        );
    }
    // A link the user made is followed wherever it leads (the Hugging Face cache links
    // snapshots to blobs), but only to a regular file.
    std::os::unix::fs::symlink(&outside, dir.join("link.safetensors")).unwrap();
    write_index(&dir, &names, |_| "link.safetensors".into());
    let opened = ModelFiles::open(&dir);
    assert!(opened.is_ok(), "a shard linked to a regular file opens: {:?}", opened.err().map(|e| e.to_string()));
    std::os::unix::fs::symlink("/dev/zero", dir.join("zero.safetensors")).unwrap();
    write_index(&dir, &names, pointing("zero.safetensors"));
    let err = error(&dir);
    assert!(err.contains("shard 'zero.safetensors'") && err.contains("is not a regular file"), "{err}");
    std::fs::create_dir(dir.join("sub.safetensors")).unwrap();
    write_index(&dir, &names, pointing("sub.safetensors"));
    let err = error(&dir);
    assert!(err.contains("is a directory"), "{err}");
    write_index(&dir, &names, |_| serde_json::json!(7));
    let err = error(&dir);
    assert!(err.contains("must be a file name"), "{err}");
    // A link inside the folder is fine.
    std::os::unix::fs::symlink("model-00001-of-00001.safetensors", dir.join("inside.safetensors")).unwrap();
    write_index(&dir, &names, |_| "inside.safetensors".into());
    ModelFiles::open(&dir).unwrap();
}

#[test]
fn a_tensor_in_two_shards_or_missing_from_its_shard_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let names = shard(dir.path());
    std::fs::copy(dir.path().join("model-00001-of-00001.safetensors"), dir.path().join("copy.safetensors")).unwrap();
    let first = names[0].clone();
    write_index(dir.path(), &names, |n| {
        if n == first {
            "copy.safetensors".into()
        } else {
            "model-00001-of-00001.safetensors".into()
        }
    });
    let err = error(dir.path());
    assert!(err.contains("is also in") && err.contains("tensor names must be unique"), "{err}");
    let mut more = names.clone();
    more.push("model.extra.weight".into());
    write_index(dir.path(), &more, |_| "model-00001-of-00001.safetensors".into());
    let err = error(dir.path());
    assert!(err.contains("tensor 'model.extra.weight' is mapped to this shard"), "{err}");
}
