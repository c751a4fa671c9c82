//! The boundary: failures as a status and a message, Rust panics caught, C strings in and
//! out.

use crate::types::*;
use pali_lib as pali;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A failure: status and message.
pub(crate) struct Failure(pub(crate) pali_status, pub(crate) String);

impl From<pali::Error> for Failure {
    fn from(e: pali::Error) -> Self {
        let status = match &e {
            pali::Error::Image(_) => PALI_ERR_IMAGE,
            pali::Error::InvalidOption(_) => PALI_ERR_INVALID_ARGUMENT,
            pali::Error::Prompt(_) | pali::Error::ContextLength(_) => PALI_ERR_PROMPT,
            pali::Error::Io(_) => PALI_ERR_IO,
            pali::Error::Model(_) | pali::Error::Ggml(_) => PALI_ERR_MODEL,
            pali::Error::Cancelled => PALI_ERR_CANCELLED,
        };
        Failure(status, e.to_string())
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> Failure {
    Failure(PALI_ERR_INVALID_ARGUMENT, msg.into())
}

/// Runs `f`, turning failures and panics into a status and `*out_error`.
pub(crate) fn guard(
    out_error: *mut *mut c_char,
    f: impl FnOnce() -> Result<(), Failure>,
) -> pali_status {
    if !out_error.is_null() {
        // SAFETY: the caller passes NULL or a valid `char **`.
        unsafe { *out_error = std::ptr::null_mut() };
    }
    let (status, msg) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return PALI_OK,
        Ok(Err(Failure(s, m))) => (s, m),
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            (
                PALI_ERR_INTERNAL,
                format!("internal error (a bug in pali): {what}"),
            )
        }
    };
    if !out_error.is_null() {
        // SAFETY: as above.
        unsafe { *out_error = new_string(&msg) };
    }
    status
}

/// A string the caller frees with `pali_string_free` (NULs inside are dropped).
pub(crate) fn new_string(s: &str) -> *mut c_char {
    CString::new(s.replace('\0', ""))
        .expect("no NUL left")
        .into_raw()
}

/// A C string argument, or None for NULL.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the call.
pub(crate) unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: per this function's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(Some)
        .map_err(|_| invalid(format!("{what} is not UTF-8")))
}
