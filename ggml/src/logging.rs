//! Routes ggml's and llama.cpp's log lines into the `log` crate (target `llama.cpp`), so
//! they are silent unless `RUST_LOG` asks for them.

use crate::sys;
use std::ffi::CStr;
use std::os::raw::{c_char, c_void};
use std::sync::{Mutex, Once};

/// The last error line ggml or llama.cpp logged, so that a failure can say why.
static LAST_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// Forgets the last logged error (call before the ggml call whose failure is explained).
pub fn clear_last_error() {
    if let Ok(mut e) = LAST_ERROR.lock() {
        *e = None;
    }
}

/// The last error line ggml or llama.cpp logged since [`clear_last_error`], if any
/// (without ggml's `function_name: ` prefix).
pub fn take_last_error() -> Option<String> {
    LAST_ERROR.lock().ok()?.take()
}

unsafe extern "C" fn forward(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: ggml passes a NUL-terminated string valid for the call.
    let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let msg = msg.trim_end();
    if msg.is_empty() {
        return;
    }
    let lvl = match level {
        sys::GGML_LOG_LEVEL_ERROR => log::Level::Error,
        sys::GGML_LOG_LEVEL_WARN => log::Level::Warn,
        sys::GGML_LOG_LEVEL_INFO => log::Level::Debug,
        _ => log::Level::Trace,
    };
    if lvl == log::Level::Error {
        if let Ok(mut e) = LAST_ERROR.lock() {
            let why = msg.split_once(": ").map_or(
                msg,
                |(f, rest)| {
                    if f.contains(' ') {
                        msg
                    } else {
                        rest
                    }
                },
            );
            *e = Some(why.to_string());
        }
    }
    log::log!(target: "llama.cpp", lvl, "{msg}");
}

/// Installs the forwarding callback (idempotent) and initialises llama.cpp's backends.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the callback is a plain function valid for the program's lifetime.
        unsafe {
            sys::llama_log_set(Some(forward), std::ptr::null_mut());
            sys::ggml_log_set(Some(forward), std::ptr::null_mut());
            // A `dynamic-backends` build has no backend linked in: load the CPU variant that
            // suits this machine (and any GPU module) from the executable's folder first.
            #[cfg(feature = "dynamic-backends")]
            sys::ggml_backend_load_all();
            sys::llama_backend_init();
        }
    });
}
