//! Library error types. Conversions to gRPC statuses live in `service`.

use std::path::Path;

/// A model directory that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("weights: {0}")]
    Weights(#[from] candle_core::Error),
    /// The compute backend could not start (accelerator runtime, device, compiled artifacts).
    #[error("{0}")]
    Backend(String),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.display().to_string(), source }
    }
}

/// A failure while a backend runs a batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The backend rejected the batch (shape or size the model cannot take).
    #[error("backend rejected the input: {0}")]
    InvalidInput(String),
    /// The execution did not finish in time.
    #[error("backend execution timed out: {0}")]
    Timeout(String),
    /// The device or runtime failed; the backend cannot serve until restarted.
    #[error("backend hardware or runtime failure: {0}")]
    Fatal(String),
    /// Any other failure of one batch.
    #[error("inference failed: {0}")]
    Inference(String),
}

impl From<candle_core::Error> for BackendError {
    fn from(e: candle_core::Error) -> Self {
        Self::Inference(e.to_string())
    }
}
