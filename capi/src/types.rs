//! The C API's types and constants (what `pali.h` declares besides the functions).
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_void};

/// Most images one `pali_run` takes (a clip of 64 frames at 224 px is 16384 image tokens,
/// twice PaliGemma 2's context).
pub const PALI_MAX_IMAGES: usize = 64;

/// A status code: `PALI_OK` or one of the `PALI_ERR_*` values.
pub type pali_status = i32;
/// Success.
pub const PALI_OK: pali_status = 0;
/// A NULL pointer, a bad size or value passed in (the message says which).
pub const PALI_ERR_INVALID_ARGUMENT: pali_status = 1;
/// A file is missing or unreadable.
pub const PALI_ERR_IO: pali_status = 2;
/// A model file is of the wrong kind, corrupt, or the files do not belong together.
pub const PALI_ERR_MODEL: pali_status = 3;
/// The image cannot be decoded, is corrupt, or is over the pixel limit.
pub const PALI_ERR_IMAGE: pali_status = 4;
/// The prompt is unusable or does not fit the context (`n_ctx`).
pub const PALI_ERR_PROMPT: pali_status = 5;
/// The token callback returned false.
pub const PALI_ERR_CANCELLED: pali_status = 6;
/// Anything else, including a bug caught at the boundary.
pub const PALI_ERR_INTERNAL: pali_status = 7;

/// What `pali_run` does with the text argument.
pub type pali_task = i32;
/// `caption <lang>`: text is the language (NULL: "en").
pub const PALI_TASK_CAPTION: pali_task = 0;
/// `answer en <question>`: text is the question.
pub const PALI_TASK_ASK: pali_task = 1;
/// `ocr`: text is ignored.
pub const PALI_TASK_OCR: pali_task = 2;
/// `detect a ; b`: text is the object names ("cat ; dog"); the JSON has boxes.
pub const PALI_TASK_DETECT: pali_task = 3;
/// `segment a ; b`: boxes, mask codes and, with a mask decoder, masks.
pub const PALI_TASK_SEGMENT: pali_task = 4;
/// Any prompt as is: text is the prompt.
pub const PALI_TASK_PROMPT: pali_task = 5;

/// How `pali_image.data` is laid out.
pub type pali_image_format = i32;
/// An image file's bytes as read from disk or a camera (JPEG, PNG, WebP, BMP, GIF).
pub const PALI_IMAGE_ENCODED: pali_image_format = 0;
/// Raw RGB8 pixels: `height` rows of `width` × 3 bytes, each row `stride` bytes apart.
pub const PALI_IMAGE_RGB8: pali_image_format = 1;

/// The ABI of this header: 2 since `pali_generate_params` gained `lora` and `n_lora`
/// (LoRA adapters, `pali_adapter_load`) and `pali_run` takes an array of images and its
/// length instead of one image; a program built against an older pali.h must be rebuilt
/// (the struct grew, `pali_run`'s arguments changed).
pub const PALI_ABI_VERSION: i32 = 2;

/// A loaded model (decoder, vision tower, optional mask decoder).
pub struct pali_model {
    pub(crate) model: pali_lib::Model,
}

/// Model loading parameters; start from `pali_model_params_default()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pali_model_params {
    /// Threads for the vision tower and the decoder; 0 = the physical cores.
    pub n_threads: i32,
    /// Decoder layers on the GPU (GPU builds); the vision tower follows when > 0.
    pub n_gpu_layers: i32,
    /// Low-memory mode: -1 = automatic (small RAM), 0 = off, 1 = on.
    pub low_mem: i32,
}

/// Generation parameters; start from `pali_generate_params_default()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pali_generate_params {
    /// Most tokens to generate.
    pub n_predict: i32,
    /// Largest context (prefix + generated tokens); 0 = what the request needs.
    pub n_ctx: i32,
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: i32,
    /// 1 = off.
    pub top_p: f32,
    /// Sampling seed.
    pub seed: u64,
    /// LoRA adapters for this call (`pali_adapter_load`'s ids) with their scales, `n_lora`
    /// of them; adapters not listed are not applied. NULL with 0: the base model. (ABI 2.)
    pub lora: *const pali_adapter_scale,
    /// Entries at `lora`.
    pub n_lora: usize,
}

/// One LoRA adapter of a call and its scale (1 = as trained, 0 = not applied).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pali_adapter_scale {
    /// The id `pali_adapter_load` returned.
    pub id: i32,
    /// Multiplies the adapter's update.
    pub scale: f32,
}

/// An image: encoded bytes, or raw RGB8 pixels (what camera APIs hand over).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pali_image {
    /// `PALI_IMAGE_ENCODED` or `PALI_IMAGE_RGB8`.
    pub format: pali_image_format,
    /// The bytes.
    pub data: *const u8,
    /// Bytes at `data`.
    pub size: usize,
    /// RGB8: pixels per row.
    pub width: u32,
    /// RGB8: rows.
    pub height: u32,
    /// RGB8: bytes from one row to the next (0 = width × 3).
    pub stride: u32,
}

/// Receives each new piece of generated text (UTF-8, NUL-terminated, valid during the
/// call) on the calling thread; return false to cancel (`PALI_ERR_CANCELLED`).
pub type pali_token_callback =
    Option<unsafe extern "C" fn(piece: *const c_char, user_data: *mut c_void) -> bool>;

/// Receives log lines: level (1 error, 2 warn, 3 info, 4 debug, 5 trace) and text.
pub type pali_log_callback =
    Option<unsafe extern "C" fn(level: i32, text: *const c_char, user_data: *mut c_void)>;
