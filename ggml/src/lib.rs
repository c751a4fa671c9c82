//! pali's thin, safe layer over the C API that `llama-cpp-sys-2` vendors: GGUF files, ggml
//! types and quantizers, ggml graphs on a backend, and the llama.cpp decoder. All `unsafe`
//! FFI of the project lives in this crate; everything above it is safe Rust.
//!
//! It also holds [`schema`], the single definition of pali's GGUF keys and tensor names.

#![warn(missing_docs)]

pub mod gguf;
pub mod graph;
pub mod llama;
pub mod logging;
pub mod quant;
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

/// What SIMD the linked ggml CPU backend was compiled with (for the build check and logs).
pub fn cpu_features() -> Vec<&'static str> {
    let mut v = Vec::new();
    // SAFETY: feature queries have no preconditions.
    unsafe {
        if sys::ggml_cpu_has_avx() != 0 {
            v.push("AVX");
        }
        if sys::ggml_cpu_has_avx2() != 0 {
            v.push("AVX2");
        }
        if sys::ggml_cpu_has_fma() != 0 {
            v.push("FMA");
        }
        if sys::ggml_cpu_has_f16c() != 0 {
            v.push("F16C");
        }
        if sys::ggml_cpu_has_avx512() != 0 {
            v.push("AVX512");
        }
        if sys::ggml_cpu_has_neon() != 0 {
            v.push("NEON");
        }
        if sys::ggml_cpu_has_dotprod() != 0 {
            v.push("DOTPROD");
        }
        if sys::ggml_cpu_has_matmul_int8() != 0 {
            v.push("I8MM");
        }
    }
    v
}
