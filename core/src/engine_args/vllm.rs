//! A `vllm serve` command line read back into what Ferry models of it: the model,
//! the weights offloaded to host RAM (`--cpu-offload-gb`), the share of GPU memory it
//! may take, the longest sequence it must hold and the sequences it batches. The
//! inverse of `export::vllm`, for `ferry check`.
//!
//! As with llama.cpp, flags Ferry's model cannot follow (tensor or pipeline
//! parallelism, quantization methods, 8-bit KV caches, speculative decoding) are refused by
//! name; flags without effect on memory or placement are listed as ignored.

use crate::error::{CoreError, Result};

/// What a `vllm serve` command line asks for, as far as memory and speed go.
#[derive(Debug, Clone, PartialEq)]
pub struct VllmArgs {
    /// The model (a folder, a GGUF file or a catalog name).
    pub model: String,
    /// `--cpu-offload-gb`: GiB of weights kept in host RAM, per GPU.
    pub cpu_offload_gib: f64,
    /// `--gpu-memory-utilization`: the share of the GPU's memory vLLM may use.
    pub gpu_memory_utilization: f64,
    /// `--max-model-len`: the longest sequence (`None`: the model's positions).
    pub max_model_len: Option<u64>,
    /// `--max-num-seqs`: the most sequences batched together (`None`: not given).
    pub max_num_seqs: Option<u64>,
    /// `--max-num-batched-tokens`: the most tokens one forward pass takes; vLLM's V1
    /// engine prefills a longer prompt in chunks of it (`None`: not given).
    pub max_num_batched_tokens: Option<u64>,
    /// `--dtype`: the weights' (and so the KV cache's) float type (`None`: `auto`, the
    /// model's own).
    pub dtype: Option<crate::model::Dtype>,
    /// Flags read but without effect on memory or placement, for the report.
    pub ignored: Vec<String>,
}

const MODEL: &[&str] = &["--model"];
const OFFLOAD: &[&str] = &["--cpu-offload-gb"];
const UTILIZATION: &[&str] = &["--gpu-memory-utilization"];
const MAX_LEN: &[&str] = &["--max-model-len"];
const MAX_SEQS: &[&str] = &["--max-num-seqs"];
const MAX_BATCHED: &[&str] = &["--max-num-batched-tokens"];
const DTYPE: &[&str] = &["--dtype"];
const KV_DTYPE: &[&str] = &["--kv-cache-dtype"];

/// Flags Ferry's model of vLLM cannot follow, with what they do.
const NOT_MODELLED: &[(&[&str], &str)] = &[
    (&["-tp", "--tensor-parallel-size", "-pp", "--pipeline-parallel-size"], "splits the model over several GPUs"),
    (&["-q", "--quantization"], "quantizes the weights with a method Ferry does not price"),
    (
        &["--speculative-config", "--speculative-model"],
        "adds speculative decoding (a plan with a draft: `ferry tune --draft MODEL --acceptance α`)",
    ),
    (&["--cpu-offload-params"], "chooses which parameters to offload"),
];

/// Reads `args` (`vllm serve MODEL ...`). Unknown flags are ignored and listed.
pub fn parse(args: &[String]) -> Result<VllmArgs> {
    let rest = match args {
        [program, serve, rest @ ..] if program.ends_with("vllm") && serve == "serve" => rest,
        _ => return Err(CoreError::invalid("expected `vllm serve MODEL [flags]`")),
    };
    let mut parsed = VllmArgs {
        model: String::new(),
        cpu_offload_gib: 0.0,
        gpu_memory_utilization: 0.9,
        max_model_len: None,
        max_num_seqs: None,
        max_num_batched_tokens: None,
        dtype: None,
        ignored: Vec::new(),
    };
    let mut flags = super::Flags::new(rest);
    while let Some((flag, inline)) = flags.next_token() {
        if !flag.starts_with('-') {
            if !parsed.model.is_empty() {
                return Err(CoreError::invalid(format!("'{flag}': vllm serve takes one model")));
            }
            parsed.model = flag.to_string();
            continue;
        }
        super::refuse_unmodelled(NOT_MODELLED, flag, "check the command without it")?;
        let known = [MODEL, OFFLOAD, UTILIZATION, MAX_LEN, MAX_SEQS, MAX_BATCHED, DTYPE, KV_DTYPE];
        let Some(names) = known.iter().find(|names| names.contains(&flag)) else {
            parsed.ignored.push(flags.ignored(flag, inline));
            continue;
        };
        let value = flags.value(flag, inline)?;
        let number = |range: (f64, f64)| -> Result<f64> {
            value.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= range.0 && *v <= range.1).ok_or_else(|| {
                CoreError::invalid(format!("{flag} {value}: expected a number from {} to {}", range.0, range.1))
            })
        };
        match *names {
            MODEL => parsed.model = value,
            OFFLOAD => parsed.cpu_offload_gib = number((0.0, 1e6))?,
            UTILIZATION => parsed.gpu_memory_utilization = number((0.01, 1.0))?,
            MAX_LEN => parsed.max_model_len = Some(number((2.0, 1e9))? as u64),
            MAX_SEQS => parsed.max_num_seqs = Some(number((1.0, 1e6))? as u64),
            MAX_BATCHED => parsed.max_num_batched_tokens = Some(number((1.0, 1e9))? as u64),
            DTYPE => parsed.dtype = dtype(flag, &value)?,
            // `auto`: the weights' type, which `--dtype` sets; anything else is an fp8 cache.
            _ if value == "auto" => {}
            _ => {
                return Err(CoreError::invalid(format!(
                    "{flag} {value}: an 8-bit KV cache is not modelled (Ferry prices f16, bf16 and f32 caches); \
                     check the command without it"
                )))
            }
        }
    }
    if parsed.model.is_empty() {
        return Err(CoreError::invalid("the command names no model: vllm serve MODEL"));
    }
    Ok(parsed)
}

/// vLLM's `--dtype` names: `None` for `auto`.
fn dtype(flag: &str, value: &str) -> Result<Option<crate::model::Dtype>> {
    use crate::model::Dtype;
    Ok(match value {
        "auto" => None,
        "half" | "float16" => Some(Dtype::F16),
        "bfloat16" => Some(Dtype::Bf16),
        "float" | "float32" => Some(Dtype::F32),
        other => {
            return Err(CoreError::invalid(format!(
                "{flag} {other}: vLLM takes auto, half, float16, bfloat16, float or float32"
            )))
        }
    })
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
            "vllm serve llama-2-13b --cpu-offload-gb 10 --gpu-memory-utilization=0.85 --max-model-len 4096 \
             --max-num-seqs 8 --max-num-batched-tokens 512 --port 8000 --enforce-eager",
        ))
        .unwrap();
        assert_eq!(parsed.max_num_batched_tokens, Some(512));
        assert_eq!(parsed.model, "llama-2-13b");
        assert_eq!((parsed.cpu_offload_gib, parsed.gpu_memory_utilization), (10.0, 0.85));
        assert_eq!((parsed.max_model_len, parsed.max_num_seqs), (Some(4096), Some(8)));
        assert_eq!(parsed.ignored, ["--port 8000", "--enforce-eager"]);
        let typed = parse(&args("vllm serve m --dtype float32 --kv-cache-dtype auto")).unwrap();
        assert_eq!(typed.dtype, Some(crate::model::Dtype::F32));
        assert!(typed.ignored.is_empty(), "{:?}", typed.ignored);
        let defaults = parse(&args("vllm serve m")).unwrap();
        assert_eq!((defaults.cpu_offload_gib, defaults.gpu_memory_utilization), (0.0, 0.9));
    }

    #[test]
    fn refuses_what_it_cannot_model_or_read() {
        for (line, expected) in [
            ("vllm serve m -tp 2", "several GPUs"),
            ("vllm serve m --quantization awq", "quantizes"),
            ("vllm serve m --gpu-memory-utilization 1.5", "from 0.01 to 1"),
            ("vllm serve m --cpu-offload-gb", "needs a value"),
            ("vllm serve m n", "one model"),
            ("vllm serve --port 1", "names no model"),
            ("llama-server -m m", "vllm serve"),
            ("vllm serve m --kv-cache-dtype fp8", "8-bit KV cache is not modelled"),
            ("vllm serve m --dtype int8", "vLLM takes auto"),
        ] {
            let error = parse(&args(line)).unwrap_err().to_string();
            assert!(error.contains(expected), "{line}: {error}");
        }
    }
}
