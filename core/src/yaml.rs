//! Reading and writing YAML and JSON documents with errors that name the file
//! and line. YAML goes through `serde_norway`, the maintained successor of
//! `serde_yaml`; every enum in the vocabulary is internally tagged so the same
//! document reads the same with any YAML crate.

use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

use crate::error::{CoreError, Result};

/// Parses a YAML document; `origin` names it in errors (a path or `catalog:gpus/t4.yaml`).
pub fn from_yaml_str<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    serde_norway::from_str(text).map_err(|err| {
        let (line, column) = err.location().map(|loc| (loc.line(), loc.column())).unwrap_or((0, 0));
        CoreError::Parse { file: origin.to_string(), line, column, message: strip_location(&err.to_string()) }
    })
}

/// Parses a JSON document; `origin` names it in errors.
pub fn from_json_str<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|err| CoreError::Parse {
        file: origin.to_string(),
        line: err.line(),
        column: err.column(),
        message: strip_location(&err.to_string()),
    })
}

/// Reads and parses a YAML (or, by extension, JSON) file.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
    let origin = path.display().to_string();
    if path.extension().is_some_and(|ext| ext == "json") {
        from_json_str(&text, &origin)
    } else {
        from_yaml_str(&text, &origin)
    }
}

pub fn to_yaml_string<T: Serialize>(value: &T) -> Result<String> {
    serde_norway::to_string(value).map_err(|e| CoreError::invalid(format!("cannot write YAML: {e}")))
}

pub fn to_json_string<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string_pretty(value).map_err(|e| CoreError::invalid(format!("cannot write JSON: {e}")))
}

/// Writes `text` to `path`, refusing to replace an existing file unless `overwrite`.
/// Nothing the user owns is overwritten without being asked.
pub fn write_new_file(path: &Path, text: &str, overwrite: bool) -> Result<()> {
    if path.exists() && !overwrite {
        return Err(CoreError::invalid(format!("{} already exists; pass --force to overwrite it", path.display())));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| CoreError::io(parent, e))?;
    }
    std::fs::write(path, text).map_err(|e| CoreError::io(path, e))
}

/// The parsers append " at line X column Y" themselves; the file:line prefix says it already.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(index) => message[..index].to_string(),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Doc {
        name: String,
        count: u32,
    }

    #[test]
    fn yaml_errors_name_file_and_line() {
        let text = "name: x\ncount: not-a-number\n";
        let err = from_yaml_str::<Doc>(text, "plan.yaml").unwrap_err();
        match err {
            CoreError::Parse { file, line, .. } => {
                assert_eq!(file, "plan.yaml");
                assert_eq!(line, 2);
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn yaml_syntax_error_names_line() {
        let text = "name: x\ncount: [1, 2\n";
        let err = from_yaml_str::<Doc>(text, "bad.yaml").unwrap_err().to_string();
        assert!(err.starts_with("bad.yaml:"), "{err}");
    }

    #[test]
    fn refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.yaml");
        write_new_file(&path, "a", false).unwrap();
        let err = write_new_file(&path, "b", false).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        write_new_file(&path, "b", true).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "b");
    }
}
