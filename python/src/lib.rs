//! `pali._native`: the PyO3 module under the `pali` Python package (`python/pali/`).
//!
//! A thin front end over the `pali` library, like the CLI and libpali: it converts Python
//! values, calls `Model::run` and hands back the answer's JSON (`pali::tasks::to_json`,
//! exactly what `pali … --json` prints) plus segment masks as numpy arrays. Options are
//! built with `GenerateOptions::apply` (the library's one validation); errors are the
//! library's, as `pali.Error` subclasses. Files: `image.rs` (Python images to `RgbImage`),
//! `model.rs` (loading, tasks), `job.rs` (the generation thread, Ctrl-C, streaming),
//! `errors.rs`, `logging.rs` (the `log` crate into Python's `logging`).

#![forbid(unsafe_code)]

mod errors;
mod image;
mod input;
mod job;
mod logging;
mod model;

use pyo3::prelude::*;

/// At exit (registered with `atexit`): cancels running generations, waits up to 5 s for
/// their threads, then stops forwarding log lines to Python.
#[pyfunction]
fn _shutdown(py: Python<'_>) {
    job::cancel_all(py, std::time::Duration::from_secs(5));
    logging::shutdown();
}

/// Re-reads the `pali` loggers' levels (done at every call; for tests).
#[pyfunction]
fn _refresh_logging(py: Python<'_>) -> PyResult<()> {
    logging::refresh(py)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_IMAGE_PIXELS", pali::MAX_IMAGE_PIXELS)?;
    m.add_class::<image::Image>()?;
    m.add_class::<model::Model>()?;
    m.add_class::<job::Stream>()?;
    m.add_function(wrap_pyfunction!(job::running_generations, m)?)?;
    m.add_function(wrap_pyfunction!(_shutdown, m)?)?;
    m.add_function(wrap_pyfunction!(_refresh_logging, m)?)?;
    logging::install(m.py())?;
    Ok(())
}
