//! Helpers shared by the end-to-end tests that run the `ferry` binary: running it in a
//! folder, reading its output, and a small test-tiny plan to vary.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub fn ferry(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry")).args(args).current_dir(dir).output().expect("the ferry binary runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Tunes the test-small folder `small` in `dir` for a cpu RAM budget far below its
/// size (batch 2, prompt 16, 4 tokens) and writes the plan to `plan.yaml`.
pub fn tune_small(dir: &Path, budget_mib: u64) -> Output {
    let budget = format!("{budget_mib}MiB");
    let args = [
        "tune",
        "--gpu",
        "cpu",
        "--host",
        "ferry-ci-vm",
        "--device-mem",
        &budget,
        "--model",
        "small",
        "--batch",
        "2",
        "--prompt-len",
        "16",
        "--gen-len",
        "4",
        "--out",
        "plan.yaml",
    ];
    ferry(dir, &args)
}

/// A one-stage cpu plan for a `ferry synth --model test-tiny --dtype f32` folder named
/// `tiny`: some layers resident, some streamed from disk, two micro-batches.
pub const TINY_PLAN: &str = "model: tiny
hardware:
  gpu: cpu
  host: ferry-ci-vm
  device_memory: 64MiB
workload: {batch_size: 4, prompt_len: 6, gen_len: 5}
policy:
  schedule: layer-prefetch
  micro_batch_size: 2
  num_micro_batches: 2
  prefetch_depth: 1
  attention_weights: {device: 1, host: 0, disk: 3}
  mlp_weights: {device: 2, host: 0, disk: 2}
  embeddings: device
  head: device
  kv_cache: {device: 3, host: 0, disk: 1}
  host_attention: false
  weight_dtype: f32
  kv_dtype: f32
  chunk_bytes: 64KiB
  copy_streams: 1
  io_queue_depth: 2
  pinned_host_bytes: 0
";
