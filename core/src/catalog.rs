//! The built-in catalog: GPUs, models and host presets from `configs/`, embedded
//! at build time, with short aliases (`13b`, `rtx3060`) and close-match suggestions
//! for names that do not exist. Model names may also be a Hugging Face folder or
//! its `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::hardware::{ClusterSpec, DiskSpec, GpuSpec, HostSpec, LinkSpec};
use crate::model::ModelSpec;
use crate::yaml::from_yaml_str;

include!(concat!(env!("OUT_DIR"), "/catalog_files.rs"));

/// One short name and what it stands for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alias {
    pub alias: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AliasFile {
    #[serde(default)]
    gpus: Vec<Alias>,
    #[serde(default)]
    models: Vec<Alias>,
    #[serde(default)]
    hosts: Vec<Alias>,
    /// Hugging Face repositories whose `config.json` has a catalog model's shape.
    #[serde(default)]
    repositories: Vec<Alias>,
}

/// A name as resolved: the entry, and a sentence to show when an alias was used.
#[derive(Debug, Clone)]
pub struct Resolved<T> {
    pub value: T,
    /// `Some("rtx3060 → rtx3060-12gb: ...")` when the user's name was an alias.
    pub note: Option<String>,
}

/// The whole catalog, parsed.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub gpus: Vec<GpuSpec>,
    pub models: Vec<ModelSpec>,
    pub hosts: Vec<HostSpec>,
    pub disks: Vec<DiskSpec>,
    /// Link presets (`configs/links/`): NVLink, PCIe peer-to-peer, Ethernet, Wi-Fi.
    pub links: Vec<LinkSpec>,
    /// Machines of several devices and clusters of machines (`configs/clusters/`).
    pub clusters: Vec<ClusterSpec>,
    pub gpu_aliases: Vec<Alias>,
    pub model_aliases: Vec<Alias>,
    pub host_aliases: Vec<Alias>,
    /// Hugging Face repository ids (`meta-llama/Llama-2-13b-hf`) a model is also known
    /// by, as vLLM and Accelerate users name it; matched case-insensitively, not listed.
    pub model_repositories: Vec<Alias>,
    /// Example plans shipped in `configs/plans/`, as (file name, text).
    pub plans: Vec<(String, String)>,
}

impl Catalog {
    /// The catalog compiled into this binary.
    pub fn builtin() -> Result<Catalog> {
        Catalog::from_files(CATALOG_FILES.iter().map(|(path, text)| (*path, *text)))
    }

    /// Parses a catalog from (relative path, text) pairs; errors name `catalog:<path>:<line>`.
    pub fn from_files<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Catalog> {
        let mut catalog = Catalog {
            gpus: Vec::new(),
            models: Vec::new(),
            hosts: Vec::new(),
            disks: Vec::new(),
            links: Vec::new(),
            clusters: Vec::new(),
            gpu_aliases: Vec::new(),
            model_aliases: Vec::new(),
            host_aliases: Vec::new(),
            model_repositories: Vec::new(),
            plans: Vec::new(),
        };
        for (path, text) in files {
            let origin = format!("catalog:{path}");
            if let Some(rest) = path.strip_prefix("gpus/") {
                let gpu: GpuSpec = from_yaml_str(text, &origin)?;
                check_file_name(&origin, rest, &gpu.name)?;
                gpu.validate().map_err(|e| CoreError::invalid(format!("{origin}: {e}")))?;
                catalog.gpus.push(gpu);
            } else if let Some(rest) = path.strip_prefix("models/") {
                let model: ModelSpec = from_yaml_str(text, &origin)?;
                check_file_name(&origin, rest, &model.name)?;
                model.validate()?;
                catalog.models.push(model);
            } else if let Some(rest) = path.strip_prefix("hosts/") {
                let host: HostSpec = from_yaml_str(text, &origin)?;
                check_file_name(&origin, rest, &host.name)?;
                catalog.hosts.push(host);
            } else if let Some(rest) = path.strip_prefix("disks/") {
                let disk: DiskSpec = from_yaml_str(text, &origin)?;
                check_file_name(&origin, rest, &disk.name)?;
                catalog.disks.push(disk);
            } else if let Some(rest) = path.strip_prefix("links/") {
                let link: LinkSpec = from_yaml_str(text, &origin)?;
                check_file_name(&origin, rest, &link.name)?;
                catalog.links.push(link);
            } else if let Some(rest) = path.strip_prefix("clusters/") {
                let cluster: ClusterSpec = from_yaml_str(text, &origin)?;
                check_file_name(&origin, rest, &cluster.name)?;
                catalog.clusters.push(cluster);
            } else if let Some(rest) = path.strip_prefix("plans/") {
                catalog.plans.push((rest.to_string(), text.to_string()));
            } else if path == "aliases.yaml" {
                let aliases: AliasFile = from_yaml_str(text, &origin)?;
                catalog.gpu_aliases = aliases.gpus;
                catalog.model_aliases = aliases.models;
                catalog.host_aliases = aliases.hosts;
                catalog.model_repositories = aliases.repositories;
            }
        }
        Ok(catalog)
    }

    pub fn gpu(&self, name: &str) -> Result<Resolved<GpuSpec>> {
        resolve("GPU", name, &self.gpus, |g| &g.name, &self.gpu_aliases)
    }

    pub fn host(&self, name: &str) -> Result<Resolved<HostSpec>> {
        resolve("host", name, &self.hosts, |h| &h.name, &self.host_aliases)
    }

    pub fn disk(&self, name: &str) -> Result<Resolved<DiskSpec>> {
        resolve("disk", name, &self.disks, |d| &d.name, &[])
    }

    pub fn link(&self, name: &str) -> Result<Resolved<LinkSpec>> {
        resolve("link", name, &self.links, |l| &l.name, &[])
    }

    /// A catalog cluster by name, or a cluster file (`.yaml`).
    pub fn cluster(&self, name: &str) -> Result<Resolved<ClusterSpec>> {
        let path = Path::new(name);
        if path.is_file() {
            let value: ClusterSpec = crate::yaml::read_file(path)?;
            return Ok(Resolved { value, note: None });
        }
        if (name.starts_with(['.', '/', '~']) || name.ends_with(".yaml") || name.ends_with(".yml")) && !path.exists() {
            return Err(CoreError::invalid(format!("cluster {name}: no such file")));
        }
        resolve("cluster", name, &self.clusters, |c| &c.name, &[])
    }

    /// A catalog model name or alias, a Hugging Face model folder, or its `config.json`.
    pub fn model(&self, name: &str) -> Result<Resolved<ModelSpec>> {
        let path = Path::new(name);
        if path.is_file() && name.ends_with(".gguf") {
            return model_from_gguf(path).map(|value| Resolved { value, note: None });
        }
        if path.is_dir() && !path.join("config.json").exists() {
            // A folder holding one GGUF file and no config.json, as `ferry run` takes it.
            if let Some(file) = only_gguf_in(path)? {
                return model_from_gguf(&file).map(|value| Resolved { value, note: None });
            }
        }
        if path.is_dir() || (path.is_file() && name.ends_with(".json")) {
            return model_from_path(path).map(|value| Resolved { value, note: None });
        }
        let path_like =
            name.starts_with(['.', '/', '~']) || [".gguf", ".json", ".safetensors"].iter().any(|e| name.ends_with(e));
        if path_like && !path.exists() {
            return Err(CoreError::invalid(format!("model {name}: no such file or folder")));
        }
        if path_like && path.is_file() {
            return Err(CoreError::invalid(format!(
                "model {name}: give a .gguf file, or the folder holding config.json and the safetensors files"
            )));
        }
        let by_name = resolve("model", name, &self.models, |m| &m.name, &self.model_aliases);
        if by_name.is_ok() || !name.contains('/') {
            return by_name;
        }
        // A repository id the catalog knows (a folder of that name would have been read above).
        resolve("model", name, &self.models, |m| &m.name, &self.model_repositories).or(by_name)
    }

    /// Aliases that point at `target`, for listings.
    pub fn aliases_of<'a>(aliases: &'a [Alias], target: &str) -> Vec<&'a str> {
        aliases.iter().filter(|a| a.target == target).map(|a| a.alias.as_str()).collect()
    }
}

/// The one `.gguf` file in `dir`, if it holds exactly one (none, or a folder that
/// cannot be listed: `None`; several are an error naming them).
pub fn only_gguf_in(dir: &Path) -> Result<Option<std::path::PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let mut found: Vec<std::path::PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(CoreError::invalid(format!(
            "{} holds several GGUF files ({}); name the one to use",
            dir.display(),
            found.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Reads a model shape from a Hugging Face folder (its `config.json`) or the file itself.
pub fn model_from_path(path: &Path) -> Result<ModelSpec> {
    let config = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
    let text = crate::yaml::read_text(&config)?;
    let folder = if path.is_dir() { path } else { path.parent().unwrap_or(path) };
    let name = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".to_string());
    crate::model::from_hf_config(&text, &config.display().to_string(), &name)
}

/// The shape of a GGUF file, with its bytes per group by the tensor types it holds
/// (`ModelSpec::stored`): plans in the `stored` format use the file's exact mix.
pub fn model_from_gguf(path: &Path) -> Result<ModelSpec> {
    let header = crate::gguf::GgufHeader::open(path)?;
    let name = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".to_string());
    crate::model::from_gguf(&header, &name)
}

fn check_file_name(origin: &str, file: &str, name: &str) -> Result<()> {
    let stem = file.trim_end_matches(".yaml");
    if stem != name {
        return Err(CoreError::invalid(format!(
            "{origin}: entry is named '{name}' but the file is '{file}'; they must match"
        )));
    }
    Ok(())
}

fn resolve<T: Clone>(
    kind: &'static str,
    name: &str,
    entries: &[T],
    name_of: impl Fn(&T) -> &String,
    aliases: &[Alias],
) -> Result<Resolved<T>> {
    let wanted = name.trim().to_ascii_lowercase();
    if let Some(entry) = entries.iter().find(|e| *name_of(e) == wanted) {
        return Ok(Resolved { value: entry.clone(), note: None });
    }
    if let Some(alias) = aliases.iter().find(|a| a.alias.eq_ignore_ascii_case(&wanted)) {
        if let Some(entry) = entries.iter().find(|e| *name_of(e) == alias.target) {
            let mut note = format!("{kind} '{name}' resolved to '{}'", alias.target);
            if let Some(extra) = &alias.note {
                note.push_str(&format!(" ({extra})"));
            }
            return Ok(Resolved { value: entry.clone(), note: Some(note) });
        }
    }
    let candidates = entries.iter().map(|e| name_of(e).as_str()).chain(aliases.iter().map(|a| a.alias.as_str()));
    Err(CoreError::UnknownName { kind, name: name.to_string(), suggestions: closest_names(&wanted, candidates, 3) })
}

/// The `limit` names closest to `wanted` by edit distance (substring matches first).
pub fn closest_names<'a>(wanted: &str, candidates: impl IntoIterator<Item = &'a str>, limit: usize) -> Vec<String> {
    let mut scored: Vec<(usize, &str)> = candidates
        .into_iter()
        .map(|candidate| {
            let distance = edit_distance(wanted, candidate);
            // A name that contains what was typed (or the reverse) is a strong hint.
            let bonus = candidate.contains(wanted) || wanted.contains(candidate);
            (if bonus { distance.min(1) } else { distance }, candidate)
        })
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    let cutoff = (wanted.len() / 2).max(3);
    scored
        .into_iter()
        .filter(|(distance, _)| *distance <= cutoff)
        .take(limit)
        .map(|(_, name)| name.to_string())
        .collect()
}

/// Levenshtein distance over bytes (catalog names are ASCII).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a = a.as_bytes();
    let b = b.as_bytes();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, &ca) in a.iter().enumerate() {
        current[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_parses_and_has_required_entries() {
        let catalog = Catalog::builtin().unwrap();
        for gpu in [
            "rtx3060-laptop-6gb",
            "rtx3060-12gb",
            "rtx3090",
            "rtx4090",
            "t4",
            "a10g",
            "l4",
            "a100-40gb",
            "a100-80gb",
            "h100-pcie",
            "h100-sxm",
            "jetson-agx-orin-64gb",
            "cpu",
        ] {
            let resolved = catalog.gpu(gpu).unwrap();
            catalog.host(&resolved.value.default_host).unwrap();
        }
        for model in [
            "opt-6.7b",
            "opt-13b",
            "opt-30b",
            "opt-66b",
            "opt-175b",
            "llama-2-7b",
            "llama-2-13b",
            "llama-2-70b",
            "llama-3.1-8b",
            "llama-3.1-70b",
            "mistral-7b",
            "mixtral-8x7b",
            "qwen2.5-14b",
            "tinyllama-1.1b",
            "test-tiny",
            "test-small",
            "test-tiny-moe",
            "test-moe",
            "qwen3-30b-a3b",
            "qwen3-235b-a22b",
            "test-tiny-qwen3-moe",
            "test-tiny-qwen2",
            "test-tiny-qwen2-moe",
            "qwen1.5-moe-a2.7b",
        ] {
            catalog.model(model).unwrap();
        }
        for disk in ["nvme-pcie3", "nvme-pcie4", "sata-ssd", "hdd", "virtio-ci"] {
            catalog.disk(disk).unwrap();
        }
        for alias in catalog.gpu_aliases.iter().chain(&catalog.model_aliases).chain(&catalog.host_aliases) {
            let ok = catalog.gpus.iter().any(|g| g.name == alias.target)
                || catalog.models.iter().any(|m| m.name == alias.target)
                || catalog.hosts.iter().any(|h| h.name == alias.target);
            assert!(ok, "alias {} points at missing {}", alias.alias, alias.target);
        }
    }

    #[test]
    fn a_model_resolves_by_the_repository_its_shape_came_from() {
        let catalog = Catalog::builtin().unwrap();
        let mut named = 0;
        for model in &catalog.models {
            // `source: "meta-llama/Llama-2-13b-hf config.json"`: the repository it was read from.
            let Some(repository) = model.source.split_whitespace().next().filter(|s| s.contains('/')) else {
                continue;
            };
            named += 1;
            let resolved = catalog.model(repository).unwrap_or_else(|e| panic!("{repository}: {e}"));
            assert_eq!(resolved.value.name, model.name, "{repository}");
            assert!(resolved.note.unwrap().contains("resolved to"));
            assert_eq!(catalog.model(&repository.to_ascii_uppercase()).unwrap().value.name, model.name);
        }
        assert!(named >= 15, "only {named} models name their repository");
        for repository in &catalog.model_repositories {
            assert!(
                catalog.models.iter().any(|m| m.name == repository.target),
                "{} → {}",
                repository.alias,
                repository.target
            );
        }
        let unknown = catalog.model("meta-llama/Llama-2-13x-hf").unwrap_err().to_string();
        assert!(unknown.contains("unknown model"), "{unknown}");
    }

    #[test]
    fn aliases_resolve_with_a_note() {
        let catalog = Catalog::builtin().unwrap();
        let gpu = catalog.gpu("rtx3060").unwrap();
        assert_eq!(gpu.value.name, "rtx3060-12gb");
        assert!(gpu.note.unwrap().contains("rtx3060-laptop-6gb"));
        assert_eq!(catalog.gpu("a100").unwrap().value.name, "a100-80gb");
        assert_eq!(catalog.gpu("h100").unwrap().value.name, "h100-sxm");
        assert_eq!(catalog.model("13b").unwrap().value.name, "llama-2-13b");
        assert_eq!(catalog.model("70B").unwrap().value.name, "llama-2-70b");
    }

    #[test]
    fn unknown_names_suggest_close_matches() {
        let catalog = Catalog::builtin().unwrap();
        let err = catalog.model("13x").unwrap_err();
        match &err {
            CoreError::UnknownName { suggestions, .. } => {
                assert!(suggestions.iter().any(|s| s == "13b"), "{suggestions:?}")
            }
            other => panic!("{other:?}"),
        }
        let err = catalog.gpu("rtx3070").unwrap_err().to_string();
        assert!(err.contains("rtx3060") || err.contains("rtx3090"), "{err}");
        let err = catalog.model("lama-2-7b").unwrap_err().to_string();
        assert!(err.contains("llama-2-7b"), "{err}");
    }

    #[test]
    fn malformed_catalog_entry_names_file_and_line() {
        let bad = "name: t9\ndescription: x\nmemory_bytes: lots\n";
        let err = Catalog::from_files([("gpus/t9.yaml", bad)]).unwrap_err().to_string();
        assert!(err.starts_with("catalog:gpus/t9.yaml:3:"), "{err}");
        let err = Catalog::from_files([("gpus/t9.yaml", "name: [\n")]).unwrap_err().to_string();
        assert!(err.starts_with("catalog:gpus/t9.yaml:"), "{err}");
    }

    #[test]
    fn a_sustained_rate_past_the_datasheet_peak_is_refused_naming_the_file() {
        let t4 = CATALOG_FILES.iter().find(|(path, _)| *path == "gpus/t4.yaml").unwrap().1;
        let faster = t4.replace("fp16_gemm_tflops: 24", "fp16_gemm_tflops: 80");
        assert_ne!(faster, t4, "the shipped T4 entry carries a sustained rate");
        let err = Catalog::from_files([("gpus/t4.yaml", faster.as_str())]).unwrap_err().to_string();
        assert!(err.contains("catalog:gpus/t4.yaml") && err.contains("no larger than"), "{err}");
        let nan = t4.replace("fp16_gemm_tflops: 24", "fp16_gemm_tflops: .nan");
        assert!(Catalog::from_files([("gpus/t4.yaml", nan.as_str())]).is_err());
    }

    #[test]
    fn model_from_hf_folder() {
        let dir = tempfile::tempdir().unwrap();
        let config = r#"{"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 32000, "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}"#;
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        let catalog = Catalog::builtin().unwrap();
        let model = catalog.model(dir.path().to_str().unwrap()).unwrap().value;
        let reference = catalog.model("mistral-7b").unwrap().value;
        assert_eq!(model.params().total, reference.params().total);
        let err =
            catalog.model(dir.path().join("config.json").to_str().unwrap()).map(|_| ()).map_err(|e| e.to_string());
        assert!(err.is_ok());
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
        let err = catalog.model(dir.path().to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("unsupported model_type 'gpt2'"), "{err}");
    }

    /// A path that does not exist, or a weights file instead of its folder, says so,
    /// not "unknown model"; a folder holding one GGUF file is that file.
    #[test]
    fn model_paths_that_are_not_models_say_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::builtin().unwrap();
        let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
        let err = |name: &str| catalog.model(name).map(|_| ()).unwrap_err().to_string();
        assert!(err(&at("nope.gguf")).contains("no such file or folder"), "{}", err(&at("nope.gguf")));
        assert!(err("./missing-folder").contains("no such file or folder"));
        std::fs::write(dir.path().join("model.safetensors"), b"x").unwrap();
        assert!(err(&at("model.safetensors")).contains("the folder holding config.json"));
        assert!(err("llama-2-7").contains("did you mean"), "names are still looked up");
        let two = tempfile::tempdir().unwrap();
        std::fs::write(two.path().join("a.gguf"), b"GGUF").unwrap();
        std::fs::write(two.path().join("b.gguf"), b"GGUF").unwrap();
        let several = err(two.path().to_str().unwrap());
        assert!(several.contains("several GGUF files (a.gguf, b.gguf)"), "{several}");
    }

    #[test]
    fn edit_distance_is_levenshtein() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("13x", "13b"), 1);
    }
}
