//! A call's inputs in the library's terms: images (encoded bytes or raw RGB8 rows), the
//! generation parameters through the library's one validation, the task.

use crate::boundary::{invalid, Failure};
use crate::types::*;
use pali_lib as pali;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The image as pali's RGB pixels.
///
/// # Safety
/// `image.data` points to `image.size` readable bytes (or is NULL).
pub(crate) unsafe fn read_image(image: &pali_image) -> Result<pali::RgbImage, Failure> {
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

/// # Safety
/// `p.lora` is NULL or points to `p.n_lora` readable entries.
pub(crate) unsafe fn generate_options(
    p: &pali_generate_params,
    cancel: &Arc<AtomicBool>,
) -> Result<pali::GenerateOptions, Failure> {
    let lora = match (p.lora.is_null(), p.n_lora) {
        (_, 0) => Vec::new(),
        (true, n) => return Err(invalid(format!("params.lora is NULL but n_lora is {n}"))),
        // SAFETY: per this function's contract.
        (false, n) => unsafe { std::slice::from_raw_parts(p.lora, n) }
            .iter()
            .map(|a| (i64::from(a.id), f64::from(a.scale)))
            .collect(),
    };
    // The library's one validation: the CLI's and the server's rules and messages.
    let values = pali::options::RequestValues {
        lora: Some(lora),
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
pub(crate) fn run_task(
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
