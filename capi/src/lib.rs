//! libpali: the C API (`include/pali.h`, generated from this crate by cbindgen: the functions
//! here, the types in `types.rs`).
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

mod boundary;
mod input;
mod types;

pub use types::*;

use boundary::{guard, invalid, new_string, opt_str, Failure};
use input::{generate_options, read_image, run_task};
use pali_lib as pali;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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
        lora: std::ptr::null(),
        n_lora: 0,
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

/// Loads a LoRA adapter made by `pali convert-lora` onto a model: `path` is either file of
/// its pair (the decoder's, or the `mmproj-…` one beside it) and both parts are loaded,
/// each checked against the model first (an adapter for another model is
/// `PALI_ERR_MODEL` naming the tensor and both shapes). `*out_id` is its id for
/// `pali_generate_params.lora`: 0, 1, … in load order, never reused. Nothing is merged: one
/// model serves every adapter. Waits for calls running on the model.
///
/// # Safety
/// `model` is from `pali_model_load`; `path` is NULL or NUL-terminated; `out_id` and
/// `out_error` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pali_adapter_load(
    model: *const pali_model,
    path: *const c_char,
    out_id: *mut i32,
    out_error: *mut *mut c_char,
) -> pali_status {
    guard(out_error, || {
        if out_id.is_null() {
            return Err(invalid("out_id is NULL"));
        }
        // SAFETY: checked non-NULL; the caller passes a writable pointer.
        unsafe { *out_id = -1 };
        // SAFETY: per this function's contract (NULL checked).
        let model = &unsafe { model.as_ref() }
            .ok_or_else(|| invalid("model is NULL"))?
            .model;
        // SAFETY: as above.
        let path = unsafe { opt_str(path, "path")? }.ok_or_else(|| invalid("path is NULL"))?;
        let id = model.load_adapter(path)?;
        let id = i32::try_from(id.0).map_err(|_| invalid("too many adapters loaded"))?;
        // SAFETY: checked non-NULL above.
        unsafe { *out_id = id };
        Ok(())
    })
}

/// Unloads adapter `id` from a model (`PALI_ERR_INVALID_ARGUMENT` if it has none). Waits for
/// calls running on the model.
///
/// # Safety
/// `model` is from `pali_model_load`; `out_error` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pali_adapter_free(
    model: *const pali_model,
    id: i32,
    out_error: *mut *mut c_char,
) -> pali_status {
    guard(out_error, || {
        // SAFETY: per this function's contract (NULL checked).
        let model = &unsafe { model.as_ref() }
            .ok_or_else(|| invalid("model is NULL"))?
            .model;
        let id =
            u32::try_from(id).map_err(|_| invalid(format!("adapter id {id}: no such adapter")))?;
        Ok(model.free_adapter(pali::AdapterId(id))?)
    })
}

/// Runs a task on `n_images` images (`images[0]` … `images[n_images - 1]`): one image, or
/// several as ONE prompt about all of them in order (PaliGemma 2's multi-image and video
/// transfers). A clip is its frames: decode the frames you want (from a camera, or with
/// ffmpeg: `pali caption CLIP --frames K` shows which) and pass them in order. On success
/// `*out_json` is the result as the CLI prints it with `--json` (free it with
/// `pali_string_free`); with several images it has `"n_images"`. `on_token` (may be NULL)
/// receives the text as it is generated and can cancel; `params` NULL means the defaults.
///
/// ABI 2 (`PALI_ABI_VERSION`): `pali_run` took one `const pali_image *`; it now takes the
/// array and its length (pass 1 for one image).
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
        // SAFETY: as above: `lora` holds `n_lora` entries or is checked.
        let opts = unsafe { generate_options(&params, &cancel)? };
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
