//! ferry-core: the vocabulary every other Ferry crate speaks.
//!
//! Owns: hardware and model descriptions, the built-in catalog, memory arithmetic,
//! workloads, plans, profiles, the task graph (`schedule` lowers a plan into it),
//! traces and the metrics computed from them, and YAML/JSON I/O.
//!
//! Must never: estimate a duration (that is `ferry-sim`), run a kernel or read weights
//! (that is `ferry-engine`; a GGUF file's header is a model description, like
//! `config.json`, and is read here), or print for people (that is the CLI).

pub mod atomic;
pub mod catalog;
pub mod error;
pub mod hardware;
pub mod model;
pub mod units;
pub mod yaml;

pub use error::{Classify, CoreError, ErrorKind, Result};
pub mod dispatch;
pub mod engine_args;
pub mod export;
pub mod gguf;
pub mod graph;
pub mod machine;
pub mod npy;
pub mod plan;
pub mod profile;
mod profile_check;
mod profile_datasheet;
mod profile_drift;
pub mod resolve;
pub mod schedule;
pub mod topology;
pub mod trace;
