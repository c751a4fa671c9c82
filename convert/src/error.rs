//! The converter's errors: each names the file, tensor or key concerned.

use std::path::Path;

/// Converter errors; each names the file, tensor or key concerned.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A required file is absent.
    #[error("missing input: {0}")]
    Missing(String),
    /// config.json / preprocessor_config.json problems.
    #[error("bad config: {0}")]
    Config(String),
    /// Tokenizer files problems.
    #[error("bad tokenizer: {0}")]
    Tokenizer(String),
    /// Corrupt safetensors.
    #[error("bad safetensors: {0}")]
    Safetensors(String),
    /// A tensor is absent or has the wrong shape.
    #[error("bad checkpoint: {0}")]
    Tensor(String),
    /// Bad options (type, output).
    #[error("{0}")]
    Usage(String),
    /// I/O failure.
    #[error("I/O error: {0}")]
    Io(String),
    /// ggml / llama.cpp failure.
    #[error(transparent)]
    Ggml(#[from] pali_ggml::Error),
    /// Interrupted by the user.
    #[error("interrupted")]
    Interrupted,
    /// `convert-vae`: the .npz or the output is unusable (the message names the file and the
    /// array).
    #[error("{0}")]
    Vae(String),
}

impl ConvertError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        ConvertError::Io(format!("{}: {e}", path.display()))
    }
}

/// Result with [`ConvertError`].
pub type Result<T> = std::result::Result<T, ConvertError>;
