//! pali's errors as Python exceptions: the classes are defined in `pali/_errors.py` (so that
//! `OptionError` can also be a `ValueError`), the messages are the library's.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// The Python class for each kind of library error.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// Anything else (`pali.Error`).
    Base,
    Model,
    Image,
    Prompt,
    ContextLength,
    Option,
    Cancelled,
}

impl Kind {
    fn class_name(self) -> &'static str {
        match self {
            Kind::Base => "Error",
            Kind::Model => "ModelError",
            Kind::Image => "ImageError",
            Kind::Prompt => "PromptError",
            Kind::ContextLength => "ContextLengthError",
            Kind::Option => "OptionError",
            Kind::Cancelled => "CancelledError",
        }
    }

    /// The class for a library error.
    pub(crate) fn of(e: &pali::Error) -> Kind {
        match e {
            pali::Error::Image(_) => Kind::Image,
            pali::Error::InvalidOption(_) => Kind::Option,
            pali::Error::Prompt(_) => Kind::Prompt,
            pali::Error::ContextLength(_) => Kind::ContextLength,
            // Missing or unreadable model files (`-m …: file not found`), bad GGUF files.
            pali::Error::Io(_) | pali::Error::Model(_) | pali::Error::Ggml(_) => Kind::Model,
            pali::Error::Cancelled => Kind::Cancelled,
        }
    }
}

/// A `pali.<Kind>` exception with `message`.
pub(crate) fn error(py: Python<'_>, kind: Kind, message: impl Into<String>) -> PyErr {
    static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    let message = message.into();
    let class = MODULE
        .get_or_try_init(py, || py.import("pali._errors").map(Bound::unbind))
        .and_then(|m| m.bind(py).getattr(kind.class_name()))
        .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
    match class {
        Ok(class) => PyErr::from_type(class, (message,)),
        // Only if the package's own Python files are broken.
        Err(e) => PyRuntimeError::new_err(format!("{message} (and pali._errors: {e})")),
    }
}

/// A library error as its Python exception.
pub(crate) fn from_pali(py: Python<'_>, e: pali::Error) -> PyErr {
    error(py, Kind::of(&e), e.to_string())
}

/// A panic caught on a worker thread, as `pali.Error` (never a Rust panic reaching Python).
pub(crate) fn from_panic(py: Python<'_>, payload: &(dyn std::any::Any + Send)) -> PyErr {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    error(
        py,
        Kind::Base,
        format!("internal error (a bug in pali): {what}"),
    )
}
