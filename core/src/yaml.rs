//! Reading and writing YAML and JSON documents with errors that name the file
//! and line. YAML goes through `serde_norway`, the maintained successor of
//! `serde_yaml`; every enum in the vocabulary is internally tagged so the same
//! document reads the same with any YAML crate.

use std::io::Read;
use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

use crate::error::{CoreError, Result};

/// The largest input file (plan, profile, config, index) Ferry reads: real ones are a
/// few kilobytes, and a bound keeps `/dev/zero` or a mistaken multi-gigabyte file from
/// being read until memory runs out.
pub const MAX_INPUT_BYTES: u64 = 64 << 20;

/// The deepest nesting of YAML collections accepted. Ferry's documents nest a handful of
/// levels; the YAML parser slows quadratically with depth, so deeper ones are refused
/// before parsing.
pub const MAX_YAML_DEPTH: usize = 64;

/// Parses a YAML document; `origin` names it in errors (a path or `catalog:gpus/t4.yaml`).
pub fn from_yaml_str<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    check_yaml_depth(text, origin)?;
    serde_norway::from_str(text).map_err(|err| {
        let (line, column) = err.location().map(|loc| (loc.line(), loc.column())).unwrap_or((0, 0));
        CoreError::Parse { file: origin.to_string(), line, column, message: strip_location(&err.to_string()) }
    })
}

/// Parses a JSON document; `origin` names it in errors.
pub fn from_json_str<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    serde_json::from_str(text).map_err(|err| CoreError::Parse {
        file: origin.to_string(),
        line: err.line(),
        column: err.column(),
        message: strip_location(&err.to_string()),
    })
}

/// Reads an input text file: a regular file of at most [`MAX_INPUT_BYTES`], in UTF-8,
/// with a leading byte-order mark dropped. Directories, devices and pipes are refused
/// with a message saying so; at most the limit is ever read.
pub fn read_text(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
    let metadata = file.metadata().map_err(|e| CoreError::io(path, e))?;
    if metadata.is_dir() {
        return Err(CoreError::invalid(format!("{}: is a directory, not a file", path.display())));
    }
    if !metadata.is_file() {
        return Err(CoreError::invalid(format!(
            "{}: not a regular file (a device, pipe or socket); give a file",
            path.display()
        )));
    }
    let too_large = |size: u64| {
        CoreError::invalid(format!(
            "{}: {size} bytes is more than the {} MiB Ferry reads from an input file",
            path.display(),
            MAX_INPUT_BYTES >> 20
        ))
    };
    if metadata.len() > MAX_INPUT_BYTES {
        return Err(too_large(metadata.len()));
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(MAX_INPUT_BYTES + 1).read_to_end(&mut bytes).map_err(|e| CoreError::io(path, e))?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    let text = String::from_utf8(bytes).map_err(|err| {
        let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = valid.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
        CoreError::Parse {
            file: path.display().to_string(),
            line,
            column,
            message: format!("not valid UTF-8 (byte {} of the file)", valid.len()),
        }
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// Reads and parses a YAML (or, by extension, JSON) file.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_text(path)?;
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

/// Writes `text` to `path` atomically (`atomic::write_atomic`), refusing to replace an
/// existing file unless `overwrite`, and a symbolic link always. Nothing the user owns
/// is overwritten without being asked, and a failed write leaves nothing half-written.
pub fn write_new_file(path: &Path, text: &str, overwrite: bool) -> Result<()> {
    crate::atomic::write_atomic(path, text.as_bytes(), overwrite)
}

/// Refuses YAML nested deeper than [`MAX_YAML_DEPTH`] in one linear pass, before the
/// parser sees it. The count errs on the deep side (every open flow bracket, every
/// block indentation level and every `- ` or `? ` entry marker counts as one level).
fn check_yaml_depth(text: &str, origin: &str) -> Result<()> {
    // Indentation columns of the open block levels.
    let mut blocks: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    for (index, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|&&b| b == b' ').count();
        if bytes.get(indent).is_none_or(|&b| b == b'#') {
            continue;
        }
        while blocks.last().is_some_and(|&open| open >= indent) {
            blocks.pop();
        }
        blocks.push(indent);
        let mut column = indent;
        // "- - - x" opens one sequence per marker.
        while column + 1 < bytes.len() && matches!(bytes[column], b'-' | b'?') && bytes[column + 1] == b' ' {
            column += 2;
            while column < bytes.len() && bytes[column] == b' ' {
                column += 1;
            }
            blocks.push(column);
        }
        let too_deep = |column: usize| CoreError::Parse {
            file: origin.to_string(),
            line: index + 1,
            column: column + 1,
            message: format!("nested more than {MAX_YAML_DEPTH} levels deep"),
        };
        if blocks.len() + flow > MAX_YAML_DEPTH {
            return Err(too_deep(column));
        }
        let mut quote: Option<u8> = None;
        let mut previous = b' ';
        while column < bytes.len() {
            let byte = bytes[column];
            match quote {
                Some(b'"') if byte == b'\\' => column += 1,
                Some(q) if byte == q => quote = None,
                Some(_) => {}
                None => match byte {
                    b'\'' | b'"' if matches!(previous, b' ' | b'\t' | b'[' | b'{' | b',' | b':') => quote = Some(byte),
                    b'#' if matches!(previous, b' ' | b'\t') => break,
                    b'[' | b'{' if matches!(previous, b' ' | b'\t' | b'[' | b'{' | b',' | b':') => flow += 1,
                    b']' | b'}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            if blocks.len() + flow > MAX_YAML_DEPTH {
                return Err(too_deep(column));
            }
            previous = byte;
            column += 1;
        }
    }
    Ok(())
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

    #[test]
    fn deep_nesting_fails_fast_with_a_clear_error() {
        for (open, close) in [("[", "]"), ("{a: ", "}"), ("- ", "")] {
            let text = format!("{}x{}\n", open.repeat(100_000), close.repeat(100_000));
            let started = std::time::Instant::now();
            let err = from_yaml_str::<serde_norway::Value>(&text, "deep.yaml").unwrap_err().to_string();
            assert!(started.elapsed() < std::time::Duration::from_secs(1), "{open}: {:?}", started.elapsed());
            assert!(err.starts_with("deep.yaml:1:") && err.contains("nested more than 64 levels"), "{err}");
        }
        let shallow = format!("{}x{}\n", "[".repeat(20), "]".repeat(20));
        from_yaml_str::<serde_norway::Value>(&shallow, "ok.yaml").unwrap();
        // Brackets and quotes inside scalars and comments are not nesting.
        let text = "name: 'a [[[[[' # [[[[\nnote: \"{{{{ \\\" [[[\"\nlist: [a, [b, {c: d}]]\n";
        let value: serde_norway::Value = from_yaml_str(text, "ok.yaml").unwrap();
        assert_eq!(value["name"].as_str(), Some("a [[[[["));
    }

    #[test]
    fn a_byte_order_mark_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc.yaml");
        std::fs::write(&path, "\u{feff}name: x\ncount: 3\n").unwrap();
        let doc: Doc = read_file(&path).unwrap();
        assert_eq!((doc.name.as_str(), doc.count), ("x", 3));
        let path = dir.path().join("doc.json");
        std::fs::write(&path, "\u{feff}{\"name\": \"x\", \"count\": 3}").unwrap();
        let doc: Doc = read_file(&path).unwrap();
        assert_eq!(doc.count, 3);
    }

    #[test]
    fn devices_directories_and_huge_files_are_refused() {
        let started = std::time::Instant::now();
        let err = read_file::<Doc>(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(err.contains("/dev/zero") && err.contains("not a regular file"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let dir = tempfile::tempdir().unwrap();
        let err = read_file::<Doc>(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
        let big = dir.path().join("big.yaml");
        std::fs::File::create(&big).unwrap().set_len(MAX_INPUT_BYTES + 1).unwrap();
        let err = read_file::<Doc>(&big).unwrap_err().to_string();
        assert!(err.contains("big.yaml") && err.contains("64 MiB"), "{err}");
    }

    /// The message a user sees: the error and its causes, as `anyhow` prints them.
    fn chain(err: &CoreError) -> String {
        let mut text = err.to_string();
        let mut cause = std::error::Error::source(err);
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        text
    }

    #[test]
    fn file_errors_say_the_os_message_once() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.yaml");
        let err = chain(&read_file::<Doc>(&missing).unwrap_err());
        assert!(err.contains("missing.yaml"), "{err}");
        assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, b"name: x\ncount: \xff\xfe\n").unwrap();
        let err = chain(&read_file::<Doc>(&bad).unwrap_err());
        assert!(err.starts_with(&format!("{}:2:8: ", bad.display())) && err.contains("UTF-8"), "{err}");
        assert_eq!(err.matches("UTF-8").count(), 1, "{err}");
    }
}
