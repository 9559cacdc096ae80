//! A `llama-server` / `llama-cli` command line read back into what Ferry models of it:
//! the model file, how many layers `-ngl` offloads, the context the KV cache is
//! allocated for, the parallel sequences and the cache type. The inverse of
//! `export::llama_cpp`, for `ferry check`.
//!
//! Flags that place tensors in ways Ferry's plans cannot say (`-ot`, `--n-cpu-moe`,
//! `-nkvo`, a split over several devices) are refused by name, never ignored: a check
//! that silently dropped them would predict a different program. Flags that change
//! neither memory nor placement (sampling, server, threads) are listed as ignored.

use crate::error::{CoreError, Result};
use crate::model::Dtype;

/// What a llama.cpp command line asks for, as far as memory and speed go.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaCppArgs {
    /// The program (`llama-server`, `llama-cli`, ...), as given.
    pub program: String,
    /// `-m`: a GGUF file (or, for a quick check, a catalog model name).
    pub model: String,
    /// `-ngl`: layers offloaded to the GPU (`None`: not given). More than the model's
    /// layers also offloads the output layer.
    pub gpu_layers: Option<u64>,
    /// `-c`: the context the KV cache is allocated for, over all sequences (`Some(0)`:
    /// the model's own; `None`: not given).
    pub context: Option<u64>,
    /// `-np`: sequences decoded together (`None`: not given).
    pub parallel: Option<u64>,
    /// `-n`: tokens to generate per request (`None`: not given).
    pub predict: Option<u64>,
    /// `-ctk` / `-ctv`: the KV cache's type (both must agree).
    pub kv_dtype: Dtype,
    /// Flags read but without effect on memory or placement, for the report.
    pub ignored: Vec<String>,
}

/// Flags whose value is read. Each entry lists a flag's spellings.
const MODEL: &[&str] = &["-m", "--model"];
const GPU_LAYERS: &[&str] = &["-ngl", "--gpu-layers", "--n-gpu-layers"];
const CONTEXT: &[&str] = &["-c", "--ctx-size"];
const PARALLEL: &[&str] = &["-np", "--parallel"];
const PREDICT: &[&str] = &["-n", "--n-predict", "--predict"];
const CACHE_K: &[&str] = &["-ctk", "--cache-type-k"];
const CACHE_V: &[&str] = &["-ctv", "--cache-type-v"];
const SPLIT_MODE: &[&str] = &["-sm", "--split-mode"];

/// Flags that place tensors or split the model in ways a Ferry plan cannot express,
/// with what they do.
const NOT_MODELLED: &[(&[&str], &str)] = &[
    (&["-ot", "--override-tensor"], "places tensors by name"),
    (&["-cmoe", "--cpu-moe", "-ncmoe", "--n-cpu-moe"], "computes experts on the CPU beside attention on the GPU"),
    (&["-nkvo", "--no-kv-offload"], "keeps the KV cache on the CPU and computes attention there"),
    (
        &["-ts", "--tensor-split", "-sm", "--split-mode", "-dev", "--device", "--rpc", "-mg", "--main-gpu"],
        "splits the model over several devices",
    ),
    (
        &["-md", "--model-draft", "-hfd", "--hf-repo-draft"],
        "adds a draft model (a plan with one: `ferry tune --draft MODEL --acceptance α`)",
    ),
    (&["-hf", "-hfr", "--hf-repo", "-mu", "--model-url"], "downloads the model; give the local file with -m"),
    (&["--lora", "--lora-scaled", "--control-vector"], "adds adapter weights"),
];

/// Reads `args` (the program first). Unknown flags are ignored and listed; a value that
/// does not parse, a flag without its value or a flag Ferry cannot model is an error.
pub fn parse(args: &[String]) -> Result<LlamaCppArgs> {
    let Some((program, rest)) = args.split_first() else {
        return Err(CoreError::invalid("no command given: put the llama.cpp command line after `--`"));
    };
    let name = std::path::Path::new(program).file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned());
    if !(name.starts_with("llama") || name == "main" || name == "server") {
        return Err(CoreError::invalid(format!(
            "'{program}' is not a llama.cpp program (llama-server, llama-cli, ...) or `vllm serve`: `ferry check` \
             reads those two engines' command lines"
        )));
    }
    let mut parsed = LlamaCppArgs {
        program: program.clone(),
        model: String::new(),
        gpu_layers: None,
        context: None,
        parallel: None,
        predict: None,
        kv_dtype: Dtype::F16,
        ignored: Vec::new(),
    };
    let (mut cache_k, mut cache_v) = (None, None);
    let mut flags = super::Flags::new(rest);
    while let Some((flag, inline)) = flags.next_token() {
        let advice =
            "check the command without it, or tune a plan (`ferry tune`) and export it (`ferry export --to llama.cpp`)";
        // `-sm none`: one GPU, which is what Ferry prices; every other split mode splits.
        if SPLIT_MODE.contains(&flag) {
            let value = flags.value(flag, inline.clone())?;
            if value == "none" {
                parsed.ignored.push(format!("{flag} none"));
                continue;
            }
        }
        super::refuse_unmodelled(NOT_MODELLED, flag, advice)?;
        let known = [MODEL, GPU_LAYERS, CONTEXT, PARALLEL, PREDICT, CACHE_K, CACHE_V];
        let Some(names) = known.iter().find(|names| names.contains(&flag)) else {
            if !flag.starts_with('-') {
                return Err(CoreError::invalid(format!(
                    "'{flag}' is not a flag and follows no flag Ferry reads; llama.cpp takes no positional arguments"
                )));
            }
            parsed.ignored.push(flags.ignored(flag, inline));
            continue;
        };
        let value = flags.value(flag, inline)?;
        let number = || -> Result<u64> {
            value
                .parse::<i64>()
                .map(|n| n.max(-1))
                .ok()
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| CoreError::invalid(format!("{flag} {value}: expected a whole number of at least 0")))
        };
        match *names {
            MODEL => parsed.model = value,
            GPU_LAYERS => parsed.gpu_layers = Some(gpu_layers(&value)?),
            CONTEXT => parsed.context = Some(number()?),
            PARALLEL => parsed.parallel = Some(number()?.max(1)),
            // `-n -1`: until the context is full (llama.cpp's default); no length to price.
            PREDICT => parsed.predict = if value.starts_with('-') { None } else { Some(number()?) },
            CACHE_K => cache_k = Some(cache_type(flag, &value)?),
            _ => cache_v = Some(cache_type(flag, &value)?),
        }
    }
    if parsed.model.is_empty() {
        return Err(CoreError::invalid("the command names no model: add -m MODEL.gguf"));
    }
    parsed.kv_dtype = match (cache_k, cache_v) {
        (Some(k), Some(v)) if k != v => {
            return Err(CoreError::invalid(format!(
                "-ctk {} and -ctv {} differ: Ferry prices one KV cache type",
                k.name(),
                v.name()
            )))
        }
        (Some(t), _) | (_, Some(t)) => t,
        (None, None) => Dtype::F16,
    };
    Ok(parsed)
}

/// `-ngl N`, or llama.cpp's `all` / `auto` / `-1` (every layer: more than any model has).
fn gpu_layers(value: &str) -> Result<u64> {
    match value {
        "all" | "auto" | "-1" => Ok(u64::MAX),
        _ => value
            .parse::<u64>()
            .map_err(|_| CoreError::invalid(format!("-ngl {value}: expected a number of layers (or all)"))),
    }
}

/// The float KV cache types Ferry prices; llama.cpp's quantized caches are refused.
fn cache_type(flag: &str, value: &str) -> Result<Dtype> {
    match value {
        "f16" => Ok(Dtype::F16),
        "f32" => Ok(Dtype::F32),
        "bf16" => Ok(Dtype::Bf16),
        _ => Err(CoreError::invalid(format!(
            "{flag} {value}: Ferry prices f16, bf16 and f32 KV caches; a quantized cache ({value}) is not modelled"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn reads_the_flags_that_set_memory_and_lists_the_rest() {
        let parsed = parse(&args(
            "llama-server -m m.gguf -ngl 30 -c 8192 -np 4 --port 8080 -fa -t 8 --ctx-size=4096 -ctk f32 -ctv f32",
        ))
        .unwrap();
        assert_eq!(parsed.model, "m.gguf");
        assert_eq!(parsed.gpu_layers, Some(30));
        assert_eq!(parsed.context, Some(4096), "the last -c wins, as in llama.cpp");
        assert_eq!(parsed.parallel, Some(4));
        assert_eq!(parsed.kv_dtype, Dtype::F32);
        assert_eq!(parsed.ignored, ["--port 8080", "-fa", "-t 8"]);
        assert_eq!(parse(&args("llama-cli -m x --n-gpu-layers all")).unwrap().gpu_layers, Some(u64::MAX));
        // `-sm none` keeps the model on one GPU: nothing to refuse.
        assert_eq!(parse(&args("llama-server -m m.gguf -sm none -ngl 9")).unwrap().ignored, ["-sm none"]);
    }

    #[test]
    fn refuses_what_it_cannot_model_or_read() {
        for (line, expected) in [
            ("llama-server -m m.gguf -ot blk.1=CPU", "-ot places tensors by name"),
            ("llama-server -m m.gguf --n-cpu-moe 10", "experts on the CPU"),
            ("llama-server -m m.gguf -ngl", "-ngl needs a value"),
            ("llama-server -m m.gguf -ngl lots", "-ngl lots"),
            ("llama-server -m m.gguf -c -5", "at least 0"),
            ("llama-server -ngl 10", "names no model"),
            ("llama-server -m m.gguf -ctk q8_0", "quantized cache"),
            ("llama-server -m m.gguf -ctk f16 -ctv f32", "differ"),
            ("llama-server m.gguf", "not a flag"),
            ("llama-server -m m.gguf -sm layer", "-sm splits the model"),
            ("ollama run m.gguf", "'ollama' is not a llama.cpp program"),
            ("llama-server -m m.gguf --split-mode=row", "--split-mode splits the model"),
        ] {
            let error = parse(&args(line)).unwrap_err().to_string();
            assert!(error.contains(expected), "{line}: {error}");
        }
        assert!(parse(&[]).is_err());
    }
}
