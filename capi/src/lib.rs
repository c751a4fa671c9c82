//! libpali: the C API (`include/pali.h`, generated from this file by cbindgen).
//!
//! In the style of `llama.h`: an opaque model handle, plain parameter structs with
//! `*_default()` constructors, integer status codes with a message the caller frees, and
//! results as the same JSON the CLI prints with `--json`. No Rust panic crosses the
//! boundary: every entry point catches it and returns `PALI_ERR_INTERNAL`. The only global
//! state is the log callback.
//!
//! Thread safety: a `pali_model` may be used from several threads at once; each call runs
//! its own generation (the vision tower encodes one image at a time). Free a model only
//! when no call on it is running.
#![allow(non_camel_case_types)]

use pali_lib as pali;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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

/// A loaded model (decoder, vision tower, optional mask decoder).
pub struct pali_model {
    model: pali::Model,
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

/// A failure: status and message.
struct Failure(pali_status, String);

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

fn invalid(msg: impl Into<String>) -> Failure {
    Failure(PALI_ERR_INVALID_ARGUMENT, msg.into())
}

/// Runs `f`, turning failures and panics into a status and `*out_error`.
fn guard(out_error: *mut *mut c_char, f: impl FnOnce() -> Result<(), Failure>) -> pali_status {
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
fn new_string(s: &str) -> *mut c_char {
    CString::new(s.replace('\0', ""))
        .expect("no NUL left")
        .into_raw()
}

/// A C string argument, or None for NULL.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the call.
unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: per this function's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(Some)
        .map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// libpali's version ("0.1.0"), a static string.
#[no_mangle]
pub extern "C" fn pali_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Default model parameters.
#[no_mangle]
pub extern "C" fn pali_model_params_default() -> pali_model_params {
    pali_model_params {
        n_threads: 0,
        n_gpu_layers: 0,
        low_mem: -1,
    }
}

/// Default generation parameters (greedy, 64 tokens).
#[no_mangle]
pub extern "C" fn pali_generate_params_default() -> pali_generate_params {
    let d = pali::GenerateOptions::default();
    pali_generate_params {
        n_predict: d.n_predict as i32,
        n_ctx: 0,
        temperature: d.sampling.temperature,
        top_k: d.sampling.top_k as i32,
        top_p: d.sampling.top_p,
        seed: d.sampling.seed,
    }
}

/// Loads a model: the decoder GGUF, the mmproj GGUF and optionally (NULL: none) a mask
/// decoder GGUF for segment masks. On success `*out_model` is the model (free it with
/// `pali_model_free`); on failure `*out_error` (if not NULL) is a message to free with
/// `pali_string_free`.
///
/// # Safety
/// Paths are NULL or NUL-terminated; `out_model` and `out_error` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pali_model_load(
    decoder_path: *const c_char,
    mmproj_path: *const c_char,
    mask_decoder_path: *const c_char,
    params: pali_model_params,
    out_model: *mut *mut pali_model,
    out_error: *mut *mut c_char,
) -> pali_status {
    guard(out_error, || {
        if out_model.is_null() {
            return Err(invalid("out_model is NULL"));
        }
        // SAFETY: checked non-NULL; the caller passes a writable pointer.
        unsafe { *out_model = std::ptr::null_mut() };
        // SAFETY: per this function's contract.
        let (decoder, mmproj, vae) = unsafe {
            (
                opt_str(decoder_path, "decoder_path")?,
                opt_str(mmproj_path, "mmproj_path")?,
                opt_str(mask_decoder_path, "mask_decoder_path")?,
            )
        };
        let decoder = decoder.ok_or_else(|| invalid("decoder_path is NULL"))?;
        let mmproj = mmproj.ok_or_else(|| invalid("mmproj_path is NULL"))?;
        let mut paths = pali::ModelPaths::new(decoder, mmproj);
        if let Some(v) = vae {
            paths = paths.with_mask_decoder(v);
        }
        let opts = pali::LoadOptions {
            threads: if params.n_threads > 0 {
                params.n_threads
            } else {
                pali::default_threads()
            },
            n_gpu_layers: params.n_gpu_layers,
            low_mem: match params.low_mem {
                0 => Some(false),
                1 => Some(true),
                _ => None,
            },
            ..Default::default()
        };
        let model = pali::Model::load(&paths, &opts)?;
        let handle = Box::into_raw(Box::new(pali_model { model }));
        // SAFETY: checked non-NULL above.
        unsafe { *out_model = handle };
        Ok(())
    })
}

/// Frees a model (NULL is ignored).
///
/// # Safety
/// `model` is NULL or from `pali_model_load`, not yet freed, with no call on it running.
#[no_mangle]
pub unsafe extern "C" fn pali_model_free(model: *mut pali_model) {
    if !model.is_null() {
        // SAFETY: per this function's contract; a panic in a destructor is caught.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(model) })));
    }
}

/// The image as pali's RGB pixels.
///
/// # Safety
/// `image.data` points to `image.size` readable bytes (or is NULL).
unsafe fn read_image(image: &pali_image) -> Result<pali::RgbImage, Failure> {
    if image.data.is_null() || image.size == 0 {
        return Err(invalid("image.data is NULL or image.size is 0"));
    }
    // SAFETY: per this function's contract.
    let bytes = unsafe { std::slice::from_raw_parts(image.data, image.size) };
    match image.format {
        PALI_IMAGE_ENCODED => Ok(pali::image::decode_image(bytes, pali::MAX_IMAGE_PIXELS)
            .map_err(pali::Error::from)?),
        PALI_IMAGE_RGB8 => rgb_image(bytes, image.width, image.height, image.stride),
        f => Err(invalid(format!(
            "image.format {f}: use PALI_IMAGE_ENCODED ({PALI_IMAGE_ENCODED}) or PALI_IMAGE_RGB8 ({PALI_IMAGE_RGB8})"
        ))),
    }
}

/// Packs strided RGB8 rows, checking the sizes against the buffer.
fn rgb_image(bytes: &[u8], w: u32, h: u32, stride: u32) -> Result<pali::RgbImage, Failure> {
    let row = w as u64 * 3;
    let stride = if stride == 0 { row } else { u64::from(stride) };
    if w == 0 || h == 0 {
        return Err(invalid(format!(
            "image is {w}x{h}: width and height must be at least 1"
        )));
    }
    if u64::from(w) * u64::from(h) > pali::MAX_IMAGE_PIXELS {
        return Err(invalid(format!(
            "image is {w}x{h}: over the limit of {} pixels",
            pali::MAX_IMAGE_PIXELS
        )));
    }
    if stride < row {
        return Err(invalid(format!(
            "image.stride {stride} is less than width x 3 = {row}"
        )));
    }
    let need = stride * (u64::from(h) - 1) + row;
    if (bytes.len() as u64) < need {
        return Err(invalid(format!(
            "image.size {} is too small for {w}x{h} RGB8 with stride {stride}: needs {need} bytes",
            bytes.len()
        )));
    }
    let mut data = Vec::with_capacity((row * u64::from(h)) as usize);
    for y in 0..u64::from(h) {
        let start = (y * stride) as usize;
        data.extend_from_slice(&bytes[start..start + row as usize]);
    }
    Ok(pali::RgbImage::new(w, h, data).expect("sizes checked"))
}

/// Runs a task on `n_images` images (`images[0]` … `images[n_images - 1]`): one image, or
/// several as ONE prompt about all of them in order (PaliGemma 2's multi-image and video
/// transfers). A clip is its frames: decode the frames you want (from a camera, or with
/// ffmpeg: `pali caption CLIP --frames K` shows which) and pass them in order. On success
/// `*out_json` is the result as the CLI prints it with `--json` (free it with
/// `pali_string_free`); with several images it has `"n_images"`. `on_token` (may be NULL)
/// receives the text as it is generated and can cancel; `params` NULL means the defaults.
///
/// ABI change in 0.2: `pali_run` took one `const pali_image *`; it now takes the array and
/// its length (pass 1 for one image).
///
/// # Safety
/// `model` is from `pali_model_load`; `images` is NULL or points to `n_images` valid
/// images; `text`, `params` are NULL or valid; `out_json` and `out_error` are NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn pali_run(
    model: *const pali_model,
    images: *const pali_image,
    n_images: usize,
    task: pali_task,
    text: *const c_char,
    params: *const pali_generate_params,
    on_token: pali_token_callback,
    user_data: *mut c_void,
    out_json: *mut *mut c_char,
    out_error: *mut *mut c_char,
) -> pali_status {
    guard(out_error, || {
        if out_json.is_null() {
            return Err(invalid("out_json is NULL"));
        }
        // SAFETY: checked non-NULL.
        unsafe { *out_json = std::ptr::null_mut() };
        // SAFETY: per this function's contract (NULL checked).
        let model = &unsafe { model.as_ref() }
            .ok_or_else(|| invalid("model is NULL"))?
            .model;
        if images.is_null() {
            return Err(invalid("images is NULL"));
        }
        if n_images == 0 || n_images > PALI_MAX_IMAGES {
            return Err(invalid(format!(
                "n_images is {n_images}: pass 1 to {PALI_MAX_IMAGES} images"
            )));
        }
        // SAFETY: per this function's contract: `n_images` valid images at `images`.
        let images = unsafe { std::slice::from_raw_parts(images, n_images) };
        // SAFETY: as above.
        let text = unsafe { opt_str(text, "text")? };
        // SAFETY: as above.
        let params = unsafe { params.as_ref() }
            .copied()
            .unwrap_or_else(|| pali_generate_params_default());
        let imgs = images
            .iter()
            .enumerate()
            // SAFETY: as above.
            .map(|(i, image)| {
                unsafe { read_image(image) }.map_err(|Failure(s, m)| {
                    Failure(
                        s,
                        if n_images > 1 {
                            format!("images[{i}]: {m}")
                        } else {
                            m
                        },
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cancel = Arc::new(AtomicBool::new(false));
        let opts = generate_options(&params, &cancel)?;
        let mut on_text = |piece: &str| {
            if let Some(cb) = on_token {
                let c = CString::new(piece.replace('\0', "")).expect("no NUL left");
                // SAFETY: the caller's callback with its own user data.
                if !unsafe { cb(c.as_ptr(), user_data) } {
                    cancel.store(true, Ordering::Relaxed);
                }
            }
        };
        let json = run_task(model, &imgs, task, text, &opts, &mut on_text)?;
        // SAFETY: checked non-NULL above.
        unsafe { *out_json = new_string(&json.to_string()) };
        Ok(())
    })
}

fn generate_options(
    p: &pali_generate_params,
    cancel: &Arc<AtomicBool>,
) -> Result<pali::GenerateOptions, Failure> {
    // The library's one validation: the CLI's and the server's rules and messages.
    let values = pali::options::RequestValues {
        n_predict: Some(p.n_predict.into()),
        max_ctx: Some(p.n_ctx.into()),
        temperature: Some(p.temperature),
        top_k: Some(p.top_k.into()),
        top_p: Some(p.top_p),
        seed: Some(p.seed),
        ..Default::default()
    };
    Ok(pali::GenerateOptions {
        cancel: Some(cancel.clone()),
        ..pali::GenerateOptions::default().apply(&values)?
    })
}

/// One task through the library's task API, as the CLI's JSON.
fn run_task(
    model: &pali::Model,
    imgs: &[pali::RgbImage],
    task: pali_task,
    text: Option<&str>,
    opts: &pali::GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<serde_json::Value, Failure> {
    let need_text = |what: &str| text.ok_or_else(|| invalid(format!("text is NULL: give {what}")));
    let objects = || need_text("the object names, e.g. \"cat ; dog\"").map(|t| vec![t.to_string()]);
    let t = match task {
        PALI_TASK_DETECT => pali::Task::Detect(objects()?),
        PALI_TASK_SEGMENT => pali::Task::Segment(objects()?),
        PALI_TASK_CAPTION => pali::Task::Caption {
            lang: text.unwrap_or("en").into(),
            long: false,
        },
        PALI_TASK_ASK => pali::Task::Ask {
            lang: "en".into(),
            question: need_text("the question")?.into(),
        },
        PALI_TASK_OCR => pali::Task::Ocr,
        PALI_TASK_PROMPT => pali::Task::Raw(need_text("the prompt")?.into()),
        other => return Err(invalid(format!("task {other} is not a PALI_TASK_* value"))),
    };
    Ok(pali::tasks::to_json(&model.run(imgs, &t, opts, on_text)?))
}

/// Frees a string returned by libpali (NULL is ignored).
///
/// # Safety
/// `s` is NULL or a string from libpali, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn pali_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: per this function's contract: made by CString::into_raw.
        drop(unsafe { CString::from_raw(s) });
    }
}

/// The C log callback, once set.
struct CLogger {
    target: Mutex<Option<(unsafe extern "C" fn(i32, *const c_char, *mut c_void), usize)>>,
}

impl log::Log for CLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let target = *self.target.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cb, data)) = target {
            let text = format!("{}", record.args()).replace('\0', "");
            let text = CString::new(text).expect("no NUL left");
            // SAFETY: the caller's callback and user data, as registered.
            unsafe { cb(record.level() as i32, text.as_ptr(), data as *mut c_void) };
        } else if record.level() <= log::Level::Warn && record.target() != "llama.cpp" {
            eprintln!("pali: {}", record.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: CLogger = CLogger {
    target: Mutex::new(None),
};

/// Sends libpali's log lines (and llama.cpp's, at levels up to `max_level`) to `callback`
/// with `user_data`; NULL: warnings and errors go to stderr (before the first call, libpali logs nothing). The only
/// global state in libpali.
///
/// # Safety
/// `callback` stays callable with `user_data`, from any thread, until replaced.
#[no_mangle]
pub unsafe extern "C" fn pali_log_set(
    callback: pali_log_callback,
    user_data: *mut c_void,
    max_level: i32,
) {
    let _ = catch_unwind(|| {
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(match max_level {
            i32::MIN..=0 => log::LevelFilter::Off,
            1 => log::LevelFilter::Error,
            2 => log::LevelFilter::Warn,
            3 => log::LevelFilter::Info,
            4 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        });
        *LOGGER.target.lock().unwrap_or_else(|e| e.into_inner()) =
            callback.map(|cb| (cb, user_data as usize));
    });
}
