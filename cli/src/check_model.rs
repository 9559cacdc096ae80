//! The model a checked command line names. A `-m` GGUF file that is not on this
//! machine is read by its name — the catalog model the name starts with and the
//! weight type after it (`llama-2-13b.Q4_K_M.gguf`: llama-2-13b in Q4_K) — so a
//! command can be checked before the download, or away from the machine holding it.

use std::path::Path;

use anyhow::Result;
use ferry_core::catalog::Catalog;
use ferry_core::model::{ModelSpec, WeightFormat};
use ferry_core::resolve::resolve_model;
use ferry_core::CoreError;

/// A model as the command names it.
pub(crate) struct NamedModel {
    pub(crate) model: ModelSpec,
    /// The weight type read from a missing file's name (`None`: the model's own).
    pub(crate) format: Option<WeightFormat>,
    pub(crate) notes: Vec<String>,
}

pub(crate) fn resolve(catalog: &Catalog, name: &str, cwd: &Path) -> Result<NamedModel> {
    let missing_gguf = name.to_ascii_lowercase().ends_with(".gguf") && !cwd.join(name).exists();
    if !missing_gguf {
        let (model, notes) = resolve_model(catalog, name, cwd)?;
        return Ok(NamedModel { model, format: None, notes });
    }
    let file = Path::new(name).file_name().map_or(name.into(), |f| f.to_string_lossy());
    let stem = &file[..file.len() - ".gguf".len()];
    let Some((target, format, written)) = by_file_name(catalog, stem) else {
        return Err(CoreError::invalid(format!(
            "{name}: no such file, and its name does not start with a catalog model and say its weight type \
             (as in llama-2-13b.Q4_K_M.gguf); run the check where the file is, or name a catalog model \
             (`ferry list models`)"
        ))
        .into());
    };
    let model = catalog.model(&target)?.value;
    let note = format!(
        "{name} is not on this machine: checked as the catalog's {target} in {} (read from the file's name; \
         a {written} file's own mix of types may make it a little larger)",
        format.name()
    );
    Ok(NamedModel { model, format: Some(format), notes: vec![note] })
}

/// The catalog model (name or alias) a file name starts with — the longest, followed
/// by a `.`, `-` or `_` — and the last piece after it that names a weight type, with a
/// K-quant's size letter dropped (`Q4_K_M` → Q4_K), as written.
fn by_file_name(catalog: &Catalog, stem: &str) -> Option<(String, WeightFormat, String)> {
    let lower = stem.to_ascii_lowercase();
    let names = catalog
        .models
        .iter()
        .map(|m| (m.name.to_ascii_lowercase(), m.name.clone()))
        .chain(catalog.model_aliases.iter().map(|a| (a.alias.to_ascii_lowercase(), a.target.clone())));
    let (prefix, target) = names
        .filter(|(name, _)| lower.strip_prefix(name.as_str()).is_some_and(|rest| rest.starts_with(['.', '-', '_'])))
        .max_by_key(|(name, _)| name.len())?;
    let rest = &stem[prefix.len() + 1..];
    rest.split(['.', '-'])
        .rev()
        .find_map(|piece| weight_type(piece).map(|format| (target.clone(), format, piece.into())))
}

fn weight_type(piece: &str) -> Option<WeightFormat> {
    let lower = piece.to_ascii_lowercase();
    let base = ["_xs", "_s", "_m", "_l"]
        .iter()
        .find_map(|size| lower.strip_suffix(size))
        .filter(|base| base.ends_with("_k"))
        .unwrap_or(&lower);
    WeightFormat::parse(base).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_name_gives_the_model_and_its_weight_type() {
        let catalog = Catalog::builtin().unwrap();
        let read = |stem: &str| by_file_name(&catalog, stem).map(|(m, f, w)| (m, f.name(), w));
        let q4_k = Some(("llama-2-13b".to_string(), "q4_k".to_string(), "Q4_K_M".to_string()));
        assert_eq!(read("llama-2-13b.Q4_K_M"), q4_k);
        assert_eq!(
            read("Llama-2-13B-chat.Q4_K_M").map(|(m, f, _)| (m, f)),
            Some(("llama-2-13b".into(), "q4_k".into()))
        );
        assert_eq!(read("llama-2-7b.Q8_0").map(|(m, f, _)| (m, f)), Some(("llama-2-7b".into(), "q8_0".into())));
        assert_eq!(read("llama-2-7b-f16").map(|(m, f, _)| (m, f)), Some(("llama-2-7b".into(), "f16".into())));
        assert_eq!(read("llama-2-7b"), None, "no type");
        assert_eq!(read("mystery-model.Q4_0"), None, "no catalog model");
        assert_eq!(read("llama-2-13b.Q4_Z"), None, "no such type");
    }

    #[test]
    fn a_missing_file_is_checked_by_its_name_and_an_unreadable_name_says_what_to_do() {
        let catalog = Catalog::builtin().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let named = resolve(&catalog, "models/llama-2-13b.Q4_K_M.gguf", dir.path()).unwrap();
        assert_eq!(named.model.name, "llama-2-13b");
        assert_eq!(named.format, Some(WeightFormat::parse("q4_k").unwrap()));
        assert!(named.notes[0].contains("not on this machine"), "{:?}", named.notes);
        let err = resolve(&catalog, "mystery.gguf", dir.path()).err().unwrap().to_string();
        assert!(err.contains("no such file") && err.contains("ferry list models"), "{err}");
    }
}
