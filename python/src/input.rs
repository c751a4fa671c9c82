//! The `image` argument of a task call: one image ([`Source`]), a list of them (ONE prompt
//! about all, in order) or a clip file with `frames=` / `fps=` ([`Input`]), run by one
//! function ([`Input::run`]) on the generation thread.

use crate::errors::{self, Kind};
use crate::image::Source;
use pali::image::{ClipPlan, FrameSelection};
use pali::{Answer, GenerateOptions, Task};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyList, PyTuple};
use std::path::PathBuf;
use std::sync::Arc;

/// A clip file: a path or its bytes.
pub(crate) enum ClipFile {
    Path(PathBuf),
    Encoded(PyBackedBytes),
}

/// What one task call is about: one image, several images (one prompt about all of them,
/// in order, as `pali run --image A --image B`), or a clip's frames (`frames=` / `fps=`, as
/// `pali caption CLIP --frames K`).
pub(crate) enum Input {
    Images(Vec<Source>),
    Clip(ClipFile, FrameSelection),
}

impl Input {
    /// Reads the `image` argument of a task call (see the module's docs).
    pub(crate) fn from_py(
        obj: &Bound<'_, PyAny>,
        bgr: bool,
        frames: Option<usize>,
        fps: Option<f64>,
    ) -> PyResult<Input> {
        let py = obj.py();
        let refuse = |kind, msg: String| Err(errors::error(py, kind, msg));
        let selection = match (frames, fps) {
            (Some(_), Some(_)) => {
                return refuse(Kind::Option, "give frames= or fps=, not both".into())
            }
            (Some(k), None) => Some(FrameSelection::Count(k)),
            (None, Some(f)) => Some(FrameSelection::PerSecond(f)),
            (None, None) => None,
        };
        if let Some(selection) = selection {
            if bgr {
                return refuse(
                    Kind::Image,
                    "bgr=True is for arrays of pixels, not a clip".into(),
                );
            }
            let file = match Source::file(obj)? {
                Some(Source::Path(path)) => ClipFile::Path(path),
                Some(Source::Encoded(bytes)) => ClipFile::Encoded(bytes),
                _ => {
                    return refuse(
                        Kind::Image,
                        format!(
                        "frames= / fps= choose frames of a clip: pass a video file (mp4, webm, \
                         mkv, mov, ...) or an animated GIF / APNG / WebP, as a path or its \
                         bytes, not {}; frames you already have go in as a list of images",
                        obj.get_type().name()?
                    ),
                    );
                }
            };
            return Ok(Input::Clip(file, selection));
        }
        if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
            let items = obj.try_iter()?.collect::<PyResult<Vec<_>>>()?;
            if items.is_empty() {
                return refuse(
                    Kind::Image,
                    "an empty list of images: pass at least one".into(),
                );
            }
            let sources = items.iter().map(|item| Source::from_py(item, bgr));
            return Ok(Input::Images(sources.collect::<PyResult<_>>()?));
        }
        Ok(Input::Images(vec![Source::from_py(obj, bgr)?]))
    }

    /// Decodes the input (no GIL needed) and runs `task` on it: several images as one
    /// prompt; a clip's K frames decoded once they are known to fit the context.
    pub(crate) fn run(
        self,
        model: &pali::Model,
        task: &Task,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> pali::Result<Answer> {
        match self {
            Input::Images(mut sources) if sources.len() == 1 => {
                let image = sources.pop().expect("one").decode()?;
                model.run(std::slice::from_ref(&*image), task, opts, on_text)
            }
            Input::Images(sources) => {
                // Pixels from arrays and files are owned here (no copy); a `pali.Image`
                // shared with Python is copied once into the list.
                let images = sources
                    .into_iter()
                    .map(|s| s.decode().map(Arc::unwrap_or_clone))
                    .collect::<Result<Vec<_>, _>>()?;
                model.run(&images, task, opts, on_text)
            }
            Input::Clip(file, selection) => {
                let plan = match file {
                    ClipFile::Path(path) => {
                        ClipPlan::open(&path, selection, pali::MAX_IMAGE_PIXELS)?
                    }
                    ClipFile::Encoded(bytes) => ClipPlan::from_bytes(
                        bytes.to_vec(),
                        "the clip's bytes",
                        selection,
                        pali::MAX_IMAGE_PIXELS,
                    )?,
                };
                model.run_clip_plan(plan, task, opts, on_text)
            }
        }
    }
}
