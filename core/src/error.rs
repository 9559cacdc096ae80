//! Typed errors of the core crate. Every user-facing failure (unknown names,
//! malformed files, impossible requests) is one of these, never a panic.

use std::path::PathBuf;

/// Errors raised while reading, resolving or validating Ferry's vocabulary.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A catalog name (GPU, model, host) that does not exist.
    #[error("unknown {kind} '{name}'{}", suggestion_text(suggestions))]
    UnknownName { kind: &'static str, name: String, suggestions: Vec<String> },
    /// A YAML or JSON document that does not parse or does not match the schema.
    #[error("{file}:{line}:{column}: {message}")]
    Parse { file: String, line: usize, column: usize, message: String },
    /// A file that could not be read or written. The OS message is part of this error's
    /// text and deliberately not its `source()`, so a cause chain prints it once.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// A value that parses but makes no sense (negative sizes, mismatched counts, ...).
    #[error("{0}")]
    Invalid(String),
}

fn suggestion_text(suggestions: &[String]) -> String {
    if suggestions.is_empty() {
        String::new()
    } else {
        format!("; did you mean: {}?", suggestions.join(", "))
    }
}

impl CoreError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io { path: path.into(), error: source }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        CoreError::Invalid(message.into())
    }

    /// Whether the error is the user's input (a usage error) rather than the environment.
    pub fn is_usage_error(&self) -> bool {
        matches!(self, CoreError::UnknownName { .. } | CoreError::Parse { .. } | CoreError::Invalid(_))
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
