//! Errors of CLI commands, classified into exit codes.

use troupe_models::ModelError;

/// A command failure: bad input (exit 2) or an internal error (exit 1).
#[derive(Debug)]
pub enum CliError {
    Input(String),
    Internal(anyhow::Error),
}

impl CliError {
    pub fn code(&self) -> u8 {
        match self {
            CliError::Input(_) => 2,
            CliError::Internal(_) => 1,
        }
    }

    /// One line for stderr.
    pub fn message(&self) -> String {
        match self {
            CliError::Input(m) => m.clone(),
            CliError::Internal(e) => format!("{e:#}"),
        }
    }

    pub fn input(msg: impl Into<String>) -> Self {
        CliError::Input(msg.into())
    }
}

impl From<ModelError> for CliError {
    fn from(e: ModelError) -> Self {
        if e.is_input_error() {
            CliError::Input(e.to_string())
        } else {
            CliError::Internal(anyhow::Error::new(e))
        }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::Internal(e)
    }
}

/// Result of a command.
pub type CmdResult = Result<(), CliError>;
