//! pali's and llama.cpp's log lines into Python's `logging`: logger `pali` and below
//! (`pali.model`, `pali.ggml.graph`, …), llama.cpp's own lines on `pali.llama_cpp` (its
//! info lines at DEBUG, its debug lines at level 5).
//!
//! The GIL: a line is forwarded with `Python::try_attach` from whichever thread logged it.
//! The package's threads never wait for the GIL while holding a lock a logging thread needs
//! (every library call runs with the GIL released), so this cannot deadlock; lines logged
//! while the interpreter shuts down (or after `pali._native._shutdown()`, registered with
//! `atexit`) are dropped. Levels below what Python's loggers would emit are filtered before
//! formatting: the threshold is read from `logging` at each call into the package.

use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

static EXITING: AtomicBool = AtomicBool::new(false);

/// Python's level for a `log` level (TRACE has none: 5, below DEBUG).
fn py_level(level: log::Level) -> i32 {
    match level {
        log::Level::Error => 40,
        log::Level::Warn => 30,
        log::Level::Info => 20,
        log::Level::Debug => 10,
        log::Level::Trace => 5,
    }
}

/// The Python logger for a `log` target: `llama.cpp` → `pali.llama_cpp`, `pali::model` →
/// `pali.model`, `pali_ggml::graph` → `pali.ggml.graph`.
fn logger_name(target: &str) -> String {
    if target == "llama.cpp" {
        return "pali.llama_cpp".into();
    }
    let path = target.replace("::", ".");
    match path.strip_prefix("pali_") {
        Some(rest) => format!("pali.{rest}"),
        None if path == "pali" || path.starts_with("pali.") => path,
        None => format!("pali.{path}"),
    }
}

struct PyLogger;

impl log::Log for PyLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level() && !EXITING.load(Ordering::Relaxed)
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let name = logger_name(record.target());
        let level = py_level(record.level());
        let message = record.args().to_string();
        let _ = Python::try_attach(|py| {
            // A line logged while an exception is being raised (a model freed during
            // unwinding) must not clobber it.
            let pending = PyErr::take(py);
            let sent = py.import("logging").and_then(|logging| {
                logging
                    .call_method1("getLogger", (name,))?
                    .call_method1("log", (level, message))
            });
            drop(sent);
            if let Some(e) = pending {
                e.restore(py);
            }
        });
    }

    fn flush(&self) {}
}

static LOGGER: PyLogger = PyLogger;

/// Installs the forwarding logger (once per process) and reads the threshold.
pub(crate) fn install(py: Python<'_>) -> PyResult<()> {
    // Fails only if something else in this process installed a `log` logger first.
    let _ = log::set_logger(&LOGGER);
    refresh(py)
}

/// Reads the lowest level the `pali` and `pali.llama_cpp` loggers would emit and lets only
/// lines at that level or above be formatted.
pub(crate) fn refresh(py: Python<'_>) -> PyResult<()> {
    let logging = py.import("logging")?;
    let mut lowest = i32::MAX;
    for name in ["pali", "pali.llama_cpp"] {
        let logger = logging.call_method1("getLogger", (name,))?;
        let level: i32 = logger.call_method0("getEffectiveLevel")?.extract()?;
        let disabled: bool = logger.getattr("disabled")?.extract()?;
        if !disabled {
            lowest = lowest.min(level);
        }
    }
    log::set_max_level(match lowest {
        i32::MIN..=5 => log::LevelFilter::Trace,
        6..=10 => log::LevelFilter::Debug,
        11..=20 => log::LevelFilter::Info,
        21..=30 => log::LevelFilter::Warn,
        31..=40 => log::LevelFilter::Error,
        _ => log::LevelFilter::Off,
    });
    Ok(())
}

/// Stops forwarding (the interpreter is exiting).
pub(crate) fn shutdown() {
    EXITING.store(true, Ordering::Relaxed);
}
