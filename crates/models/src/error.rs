//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in `troupe-models`.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A row of an input file is malformed; names the file, the 1-based line and the field.
    #[error("{file}:{line}: field `{field}`: {reason}")]
    BadRow {
        file: String,
        line: u64,
        field: String,
        reason: String,
    },
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file lacks a required column.
    #[error("{file}: missing column `{column}` (header has: {header})")]
    MissingColumn {
        file: String,
        column: String,
        header: String,
    },
    /// Parameters that cannot work (zero factors, negative regularisation, ...).
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParam { name: String, reason: String },
    /// The ONNX encoder failed to load or run.
    #[error("content model: {0}")]
    Encoder(String),
    /// An empty data set where at least one row is needed.
    #[error("empty input: {0}")]
    Empty(String),
}

impl ModelError {
    /// Shorthand for [`ModelError::InvalidParam`].
    pub fn param(name: &str, reason: impl Into<String>) -> Self {
        ModelError::InvalidParam {
            name: name.to_string(),
            reason: reason.into(),
        }
    }

    /// True for errors caused by the caller's input (bad rows, missing columns, bad
    /// parameters) rather than by the machine.
    pub fn is_input_error(&self) -> bool {
        !matches!(self, ModelError::Encoder(_))
    }
}

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
