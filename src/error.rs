//! pali's one error type: every failure, with a message that names the file, tensor, key,
//! pixel size or field concerned.

/// Everything that can go wrong, with messages that name the file, key or input concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An image could not be read or is unusable.
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    /// A model file is missing, of the wrong kind, or inconsistent.
    #[error("{0}")]
    Model(String),
    /// A per-request option is out of range (the message names the field and its value):
    /// the CLI exits with status 2, `pali serve` answers 400, the C library returns
    /// `PALI_ERR_INVALID_ARGUMENT`.
    #[error("{0}")]
    InvalidOption(String),
    /// The prompt is unusable.
    #[error("{0}")]
    Prompt(String),
    /// The prefix and the tokens to generate do not fit the context (`-c`).
    #[error("{0}")]
    ContextLength(String),
    /// File system errors.
    #[error("{0}")]
    Io(String),
    /// ggml / llama.cpp errors.
    #[error(transparent)]
    Ggml(#[from] pali_ggml::Error),
    /// The generation was cancelled ([`crate::GenerateOptions::cancel`]).
    #[error("cancelled")]
    Cancelled,
}

/// Result with pali's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
