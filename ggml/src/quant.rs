//! Element conversions and quantization, all by ggml's own routines so that pali's blocks
//! are bit-identical to llama.cpp's.

use crate::{sys, Error, GgmlType, Result};
use std::ffi::CString;
use std::path::Path;

/// llama.cpp file types (`enum llama_ftype`) pali can write: every `llama-quantize` type
/// that needs no importance matrix, with llama.cpp's own names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types, missing_docs)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q6_K,
    Q5_K_M,
    Q5_K_S,
    Q4_K_M,
    Q4_K_S,
    Q4_0,
    IQ4_NL,
    IQ4_XS,
    Q3_K_L,
    Q3_K_M,
    Q3_K_S,
    IQ3_M,
    IQ3_S,
    Q2_K,
}

/// Every file type, each with its `llama_ftype` and llama.cpp's label, largest first.
const FILE_TYPES: [(FileType, u32, &str); 18] = [
    (FileType::F32, sys::LLAMA_FTYPE_ALL_F32, "F32"),
    (FileType::F16, sys::LLAMA_FTYPE_MOSTLY_F16, "F16"),
    (FileType::BF16, sys::LLAMA_FTYPE_MOSTLY_BF16, "BF16"),
    (FileType::Q8_0, sys::LLAMA_FTYPE_MOSTLY_Q8_0, "Q8_0"),
    (FileType::Q6_K, sys::LLAMA_FTYPE_MOSTLY_Q6_K, "Q6_K"),
    (FileType::Q5_K_M, sys::LLAMA_FTYPE_MOSTLY_Q5_K_M, "Q5_K_M"),
    (FileType::Q5_K_S, sys::LLAMA_FTYPE_MOSTLY_Q5_K_S, "Q5_K_S"),
    (FileType::Q4_K_M, sys::LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q4_K_M"),
    (FileType::Q4_K_S, sys::LLAMA_FTYPE_MOSTLY_Q4_K_S, "Q4_K_S"),
    (FileType::Q4_0, sys::LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_0"),
    (FileType::IQ4_NL, sys::LLAMA_FTYPE_MOSTLY_IQ4_NL, "IQ4_NL"),
    (FileType::IQ4_XS, sys::LLAMA_FTYPE_MOSTLY_IQ4_XS, "IQ4_XS"),
    (FileType::Q3_K_L, sys::LLAMA_FTYPE_MOSTLY_Q3_K_L, "Q3_K_L"),
    (FileType::Q3_K_M, sys::LLAMA_FTYPE_MOSTLY_Q3_K_M, "Q3_K_M"),
    (FileType::Q3_K_S, sys::LLAMA_FTYPE_MOSTLY_Q3_K_S, "Q3_K_S"),
    (FileType::IQ3_M, sys::LLAMA_FTYPE_MOSTLY_IQ3_M, "IQ3_M"),
    (FileType::IQ3_S, sys::LLAMA_FTYPE_MOSTLY_IQ3_S, "IQ3_S"),
    (FileType::Q2_K, sys::LLAMA_FTYPE_MOSTLY_Q2_K, "Q2_K"),
];

/// llama-quantize types whose mixes put tensors in types that llama.cpp only quantizes with
/// an importance matrix (IQ1/IQ2/IQ3_XXS blocks, Q2_K_S's Q2_K): `pali convert` makes none.
pub const IMATRIX_TYPES: [&str; 9] = [
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S",
];

impl FileType {
    /// Every type, largest first.
    pub fn all() -> impl Iterator<Item = FileType> {
        FILE_TYPES.iter().map(|t| t.0)
    }

    fn entry(self) -> &'static (FileType, u32, &'static str) {
        FILE_TYPES
            .iter()
            .find(|t| t.0 == self)
            .expect("every type is in the table")
    }

    /// The `llama_ftype` value stored in `general.file_type`.
    pub fn llama_ftype(self) -> u32 {
        self.entry().1
    }

    /// llama.cpp's spelling, used in file names (`Q4_K_M`, `F16`, …).
    pub fn label(self) -> &'static str {
        self.entry().2
    }

    /// Parses a CLI spelling (`q4_k_m`, `Q8_0`, `f16`, …).
    pub fn parse(s: &str) -> Option<Self> {
        FILE_TYPES
            .iter()
            .find(|t| t.2.eq_ignore_ascii_case(s))
            .map(|t| t.0)
    }

    /// Whether `s` names a llama-quantize type that needs an importance matrix.
    pub fn needs_imatrix(s: &str) -> bool {
        IMATRIX_TYPES.iter().any(|t| t.eq_ignore_ascii_case(s))
    }

    /// The single element type of a non-mixed file type (F32, F16, BF16, Q8_0, Q4_0); `None`
    /// for llama.cpp's mixes, whose per-tensor types its quantizer chooses.
    pub fn matrix_type(self) -> Option<GgmlType> {
        match self {
            FileType::F32 => Some(GgmlType::F32),
            FileType::F16 => Some(GgmlType::F16),
            FileType::BF16 => Some(GgmlType::BF16),
            FileType::Q8_0 => Some(GgmlType::Q8_0),
            FileType::Q4_0 => Some(GgmlType::Q4_0),
            _ => None,
        }
    }
}

/// Converts f32 values to `ty` (F32, F16, BF16 or a block-quantized type) as ggml does.
/// `n_per_row` is the row length (ggml `ne[0]`).
pub fn convert_f32(ty: GgmlType, src: &[f32], n_per_row: usize) -> Result<Vec<u8>> {
    if n_per_row == 0 || !src.len().is_multiple_of(n_per_row) {
        return Err(Error::Invalid(format!(
            "bad row length {n_per_row} for {} values",
            src.len()
        )));
    }
    let n = src.len() as i64;
    // SAFETY: destination buffers are sized by ggml_row_size for exactly these elements.
    unsafe {
        match ty {
            GgmlType::F32 => Ok(src.iter().flat_map(|v| v.to_le_bytes()).collect()),
            GgmlType::F16 => {
                let mut out = vec![0u8; src.len() * 2];
                sys::ggml_fp32_to_fp16_row(src.as_ptr(), out.as_mut_ptr() as *mut _, n);
                Ok(out)
            }
            GgmlType::BF16 => {
                let mut out = vec![0u8; src.len() * 2];
                sys::ggml_fp32_to_bf16_row_ref(src.as_ptr(), out.as_mut_ptr() as *mut _, n);
                Ok(out)
            }
            _ if ty.is_quantized() => {
                if n_per_row as i64 % ty.block_size() != 0 {
                    return Err(Error::Invalid(format!(
                        "row length {n_per_row} is not a multiple of the {ty} block size"
                    )));
                }
                if sys::ggml_quantize_requires_imatrix(ty.0) {
                    return Err(Error::Invalid(format!("{ty} needs an importance matrix")));
                }
                let rows = src.len() / n_per_row;
                let mut out = vec![0u8; ty.row_size(n_per_row as i64) * rows];
                let written = sys::ggml_quantize_chunk(
                    ty.0,
                    src.as_ptr(),
                    out.as_mut_ptr() as *mut _,
                    0,
                    rows as i64,
                    n_per_row as i64,
                    std::ptr::null(),
                );
                debug_assert_eq!(written, out.len());
                Ok(out)
            }
            _ => Err(Error::Invalid(format!("cannot convert to {ty}"))),
        }
    }
}

/// Widens raw little-endian F32/F16/BF16 bytes to f32 (F16 through ggml's own table-free
/// conversion, BF16 exactly).
pub fn to_f32(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>> {
    match ty {
        GgmlType::F32 => Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        GgmlType::BF16 => Ok(bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect()),
        GgmlType::F16 => {
            let n = bytes.len() / 2;
            let mut out = vec![0f32; n];
            // SAFETY: n halves in, n floats out. Copy first: the source may be unaligned.
            let halves: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            unsafe {
                sys::ggml_fp16_to_fp32_row(halves.as_ptr() as *const _, out.as_mut_ptr(), n as i64)
            };
            Ok(out)
        }
        _ if ty.is_quantized() => {
            // SAFETY: type traits table lookup; to_float converts whole blocks.
            unsafe {
                let traits = sys::ggml_get_type_traits(ty.0);
                let Some(f) = (*traits).to_float else {
                    return Err(Error::Invalid(format!("no dequantizer for {ty}")));
                };
                let n = bytes.len() / ty.row_size(ty.block_size()) * ty.block_size() as usize;
                let mut out = vec![0f32; n];
                f(bytes.as_ptr() as *const _, out.as_mut_ptr(), n as i64);
                Ok(out)
            }
        }
        _ => Err(Error::Invalid(format!("cannot read {ty} as f32"))),
    }
}

/// Quantizes a whole GGUF model file with llama.cpp's own quantizer (`llama_model_quantize`),
/// i.e. exactly what `llama-quantize` makes, including its per-tensor type choices.
/// `max_buf` bounds llama.cpp's working buffers (big tensors go in slabs); 0 = its default.
pub fn quantize_model_file(
    input: &Path,
    output: &Path,
    ftype: FileType,
    threads: i32,
    max_buf: usize,
) -> Result<()> {
    crate::logging::init();
    let inp = CString::new(input.to_string_lossy().as_bytes())
        .map_err(|_| Error::Invalid("bad path".into()))?;
    let out = CString::new(output.to_string_lossy().as_bytes())
        .map_err(|_| Error::Invalid("bad path".into()))?;
    // llama.cpp reads the input through a memory map and never lets go of the pages it has
    // read: the biggest tensor (the bf16 embedding, 1.8 GB for a 10B) would stay resident
    // whole. A watcher drops them while it runs; the quantizer re-reads any it still needs
    // from the page cache.
    crate::logging::clear_last_error();
    let rc = crate::llama::with_mapped_pages_released(input, || {
        // SAFETY: default params, valid paths; the function returns non-zero on failure.
        unsafe {
            let mut p = sys::llama_model_quantize_default_params();
            p.ftype = ftype.llama_ftype();
            p.nthread = threads;
            p.max_buf_size = max_buf;
            sys::llama_model_quantize(inp.as_ptr(), out.as_ptr(), &p)
        }
    });
    if rc != 0 {
        let why = crate::logging::take_last_error().unwrap_or_else(|| format!("code {rc}"));
        return Err(Error::Backend(format!(
            "llama.cpp failed to quantize {} to {} in {}: {why}",
            input.display(),
            ftype.label(),
            output.display()
        )));
    }
    Ok(())
}
