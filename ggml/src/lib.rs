//! pali's thin, safe layer over the C API that `llama-cpp-sys-2` vendors: GGUF files, ggml
//! types and quantizers, ggml graphs on a backend, and the llama.cpp decoder. All `unsafe`
//! FFI of the project lives in this crate; everything above it is safe Rust.
//!
//! It also holds [`schema`], the single definition of pali's GGUF keys and tensor names.

#![warn(missing_docs)]

pub mod atomic_file;
pub mod backends;
pub mod blas;
mod gelu;
pub mod gguf;
pub mod graph;
pub mod llama;
pub mod logging;
pub mod mapped;
pub mod quant;
pub mod rpc;
pub mod schema;

pub use llama_cpp_sys_2 as sys;

use std::ffi::CStr;
use std::path::Path;

/// Errors of the FFI layer; messages name the file, tensor or key concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// Bad input (file contents, shapes, names).
    #[error("{0}")]
    Invalid(String),
    /// ggml or llama.cpp reported a failure.
    #[error("{0}")]
    Backend(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        Error::Io(format!("{}: {e}", path.display()))
    }
}

/// Result with the FFI layer's error.
pub type Result<T> = std::result::Result<T, Error>;

/// A ggml element type (`enum ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub sys::ggml_type);

impl GgmlType {
    #[allow(missing_docs)]
    pub const F32: GgmlType = GgmlType(sys::GGML_TYPE_F32);
    #[allow(missing_docs)]
    pub const F16: GgmlType = GgmlType(sys::GGML_TYPE_F16);
    #[allow(missing_docs)]
    pub const BF16: GgmlType = GgmlType(sys::GGML_TYPE_BF16);
    #[allow(missing_docs)]
    pub const Q8_0: GgmlType = GgmlType(sys::GGML_TYPE_Q8_0);
    #[allow(missing_docs)]
    pub const Q4_0: GgmlType = GgmlType(sys::GGML_TYPE_Q4_0);
    #[allow(missing_docs)]
    pub const Q4_K: GgmlType = GgmlType(sys::GGML_TYPE_Q4_K);
    #[allow(missing_docs)]
    pub const Q6_K: GgmlType = GgmlType(sys::GGML_TYPE_Q6_K);

    /// ggml's name for the type (`f32`, `q4_K`, …).
    pub fn name(self) -> String {
        // SAFETY: ggml_type_name returns a static string (or "NONE") for any value.
        unsafe {
            let p = sys::ggml_type_name(self.0);
            if p.is_null() {
                return format!("type{}", self.0);
            }
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }

    /// Elements per quantization block (1 for float types).
    pub fn block_size(self) -> i64 {
        // SAFETY: pure lookup.
        unsafe { sys::ggml_blck_size(self.0) }
    }

    /// Bytes of one row of `n` elements.
    pub fn row_size(self, n: i64) -> usize {
        // SAFETY: pure arithmetic lookup.
        unsafe { sys::ggml_row_size(self.0, n) }
    }

    /// Whether the type is a block-quantized one.
    pub fn is_quantized(self) -> bool {
        // SAFETY: pure lookup.
        unsafe { sys::ggml_is_quantized(self.0) }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// A function the CPU backend exports through ggml's registry (`ggml_threadpool_new`, …),
/// or `None`. The registry is the only way to reach them when the CPU backend is a module
/// loaded at run time (`dynamic-backends`); static builds answer the same way.
pub(crate) fn cpu_proc(name: &std::ffi::CStr) -> Option<*mut std::ffi::c_void> {
    logging::init();
    // SAFETY: registry lookups return NULL when absent, which is checked.
    unsafe {
        let dev = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
        if dev.is_null() {
            return None;
        }
        let reg = sys::ggml_backend_dev_backend_reg(dev);
        let f = sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
        (!f.is_null()).then_some(f)
    }
}

/// What SIMD the ggml CPU backend in use was compiled with (`AVX2`, `NEON`, `DOTPROD`, …),
/// from the backend's own feature list, so it also names the variant a `dynamic-backends`
/// build picked at run time.
pub fn cpu_features() -> Vec<String> {
    let mut v = Vec::new();
    let Some(f) = cpu_proc(c"ggml_backend_get_features") else {
        return v;
    };
    // SAFETY: the looked-up function has this signature (ggml-backend.h); the feature array
    // is static in the CPU backend and ends with a NULL name.
    unsafe {
        let reg = sys::ggml_backend_dev_backend_reg(sys::ggml_backend_dev_by_type(
            sys::GGML_BACKEND_DEVICE_TYPE_CPU,
        ));
        let get: sys::ggml_backend_get_features_t = std::mem::transmute(f);
        let mut p = get.expect("non-null")(reg);
        while !p.is_null() && !(*p).name.is_null() {
            let name = std::ffi::CStr::from_ptr((*p).name).to_string_lossy();
            let value = std::ffi::CStr::from_ptr((*p).value).to_string_lossy();
            // Flags are "1"; skip the others (e.g. the OpenMP or repack settings' values).
            if value == "1" && name != "REPACK" && name != "LLAMAFILE" {
                v.push(name.into_owned());
            }
            p = p.add(1);
        }
    }
    v
}

/// Ignores `SIGPIPE` again, for a server: hyper writes responses with `writev`, which (unlike
/// `send`) raises SIGPIPE when the client has reset the connection, and with the default
/// action that ends the whole server (found by the hostile-clients soak). Unix only.
pub fn ignore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to "ignore" has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Ends the process quietly on `SIGPIPE` when stdout or stderr is a pipe whose reader has
/// gone, as the default action would (a CLI piped into `head` stops like any Unix tool instead
/// of panicking on a "Broken pipe" write error; Rust programs ignore SIGPIPE). Any other
/// SIGPIPE is ignored, so the write fails with EPIPE instead: ggml-rpc's client `send`s
/// without MSG_NOSIGNAL, and a lost RPC server must reach pali's report
/// ([`rpc::install_abort_report`], exit 69), not kill the process without a word (the
/// killed-server test caught that when the client was sending at the moment). Unix only; a
/// no-op elsewhere.
pub fn default_sigpipe() {
    #[cfg(unix)]
    extern "C" fn on_sigpipe(_: libc::c_int) {
        let mut fds = [1, 2].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        });
        // SAFETY: poll, signal and raise are async-signal-safe; `fds` lives on this stack.
        unsafe {
            let ready = libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0);
            if ready > 0 && fds.iter().any(|p| p.revents & libc::POLLERR != 0) {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
        }
    }
    #[cfg(unix)]
    // SAFETY: installs a handler that only makes async-signal-safe calls.
    unsafe {
        libc::signal(
            libc::SIGPIPE,
            on_sigpipe as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}
