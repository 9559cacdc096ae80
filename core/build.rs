//! Embeds every file under `configs/` into the binary so the catalog works from
//! any directory: generates `catalog_files.rs`, a table of (relative path, text).

use std::{env, fs, path::Path};

fn main() {
    let root = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap()).join("../configs");
    let root = root.canonicalize().expect("configs/ folder next to core/");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut entries = Vec::new();
    collect(&root, &root, &mut entries);
    entries.sort();
    let mut out = String::from("pub static CATALOG_FILES: &[(&str, &str)] = &[\n");
    for (relative, absolute) in entries {
        println!("cargo:rerun-if-changed={absolute}");
        out.push_str(&format!("    ({relative:?}, include_str!({absolute:?})),\n"));
    }
    out.push_str("];\n");
    let dest = Path::new(&env::var("OUT_DIR").unwrap()).join("catalog_files.rs");
    fs::write(dest, out).unwrap();
}

fn collect(root: &Path, dir: &Path, entries: &mut Vec<(String, String)>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            println!("cargo:rerun-if-changed={}", path.display());
            collect(root, &path, entries);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            let relative = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
            entries.push((relative, path.display().to_string()));
        }
    }
}
