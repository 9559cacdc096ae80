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
        self.kind() == ErrorKind::Usage
    }
}

/// What kind of failure an error is. Every library error says which, and the exit
/// status of every command follows from it the same way (`exit_status`), so one
/// error exits alike whichever command met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The user's request or files are at fault: an unknown name, a malformed or
    /// missing file, an impossible budget. Exit status 2.
    Usage,
    /// The machine failed: a full disk, a device that errs, a driver that is missing.
    /// Exit status 1.
    Environment,
    /// Ferry itself is wrong (a bug). Exit status 1.
    Internal,
}

impl ErrorKind {
    pub fn exit_status(self) -> u8 {
        match self {
            ErrorKind::Usage => 2,
            ErrorKind::Environment | ErrorKind::Internal => 1,
        }
    }

    /// The kind of an I/O failure on a file the user named: a missing, unreadable or
    /// malformed file is theirs to fix; anything else is the machine's.
    pub fn of_io(error: &std::io::Error) -> ErrorKind {
        use std::io::ErrorKind as Io;
        match error.kind() {
            Io::NotFound | Io::PermissionDenied | Io::InvalidData | Io::InvalidInput | Io::AlreadyExists => {
                ErrorKind::Usage
            }
            Io::IsADirectory | Io::NotADirectory => ErrorKind::Usage,
            _ => ErrorKind::Environment,
        }
    }
}

/// An error that knows its `ErrorKind`; implemented by the error type of every crate.
pub trait Classify {
    fn kind(&self) -> ErrorKind;
}

impl Classify for CoreError {
    fn kind(&self) -> ErrorKind {
        match self {
            CoreError::UnknownName { .. } | CoreError::Parse { .. } | CoreError::Invalid(_) => ErrorKind::Usage,
            CoreError::Io { error, .. } => ErrorKind::of_io(error),
        }
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
