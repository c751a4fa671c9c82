//! `pali._native.Model`: loading (GIL released), LoRA adapters, and every task as one call
//! that builds the library's `Task` and `GenerateOptions` (validated by
//! `GenerateOptions::apply`, the one set of rules every front end shares) and runs it on a
//! generation thread.

use crate::errors::{self, Kind};
use crate::input::Input;
use crate::job::{self, Job, PyAnswer, Stream};
use pali::options::RequestValues;
use pali::{AdapterId, AdapterScale, GenerateOptions, LoadOptions, ModelPaths, Task};
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A loaded model (see `pali.Model`).
#[pyclass(module = "pali._native", name = "Model", frozen)]
pub(crate) struct Model {
    inner: Arc<pali::Model>,
    /// The options every call starts from: the model's `ctx_size`, and the adapters every
    /// call uses unless it says otherwise (`lora=` when loading, `Model.lora = …`).
    base: Mutex<GenerateOptions>,
    paths: ModelPaths,
}

/// `low_mem`: "auto" / None, True / "on", False / "off".
fn low_mem(py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<Option<bool>> {
    if v.is_none() {
        return Ok(None);
    }
    if let Ok(b) = v.cast::<PyBool>() {
        return Ok(Some(b.is_true()));
    }
    match v.cast::<PyString>().map(|s| s.to_string()).as_deref() {
        Ok("auto") => Ok(None),
        Ok("on") => Ok(Some(true)),
        Ok("off") => Ok(Some(false)),
        _ => Err(errors::error(
            py,
            Kind::Option,
            format!("low_mem = {v}: use \"auto\", True (\"on\") or False (\"off\")"),
        )),
    }
}

/// One keyword argument converted by `convert`; a Python type error names the argument,
/// an integer out of the type's range is an `OptionError` naming it.
fn named<'py, T>(
    name: &str,
    v: Option<&Bound<'py, PyAny>>,
    convert: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<T>,
) -> PyResult<Option<T>> {
    let Some(v) = v.filter(|v| !v.is_none()) else {
        return Ok(None);
    };
    let py = v.py();
    convert(v).map(Some).map_err(|e| {
        if e.is_instance_of::<PyOverflowError>(py) {
            errors::error(
                py,
                Kind::Option,
                format!("{name} = {v}: out of range ({e})"),
            )
        } else if e.is_instance_of::<PyTypeError>(py) {
            PyTypeError::new_err(format!("{name}: {}", e.value(py)))
        } else {
            e
        }
    })
}

/// `stop`: a string or a sequence of strings.
fn stop_list(v: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(vec![s.to_string()]);
    }
    v.extract::<Vec<String>>()
        .map_err(|_| PyTypeError::new_err("a string or a list of strings"))
}

/// `lora`: adapter ids, `(id, scale)` pairs, or a dict `{id: scale}` (an id alone: scale 1).
fn lora_list(v: &Bound<'_, PyAny>) -> PyResult<Vec<(i64, f64)>> {
    let wrong = || {
        PyTypeError::new_err(
            "a list of adapter ids or (id, scale) pairs, or a dict {id: scale} ([] = no adapter)",
        )
    };
    if let Ok(d) = v.cast::<PyDict>() {
        return d
            .iter()
            .map(|(id, scale)| Ok((id.extract()?, scale.extract()?)))
            .collect::<PyResult<_>>()
            .map_err(|_: PyErr| wrong());
    }
    if v.is_instance_of::<PyString>() {
        return Err(wrong());
    }
    let items = v.try_iter().map_err(|_| wrong())?;
    items
        .map(|item| {
            let item = item?;
            match item.extract::<i64>() {
                Ok(id) => Ok((id, 1.0)),
                Err(_) => item.extract::<(i64, f64)>(),
            }
        })
        .collect::<PyResult<_>>()
        .map_err(|e| {
            if e.is_instance_of::<PyOverflowError>(v.py()) {
                e
            } else {
                wrong()
            }
        })
}

/// `Model(lora=…)`: adapter files, each a path or a `(path, scale)` pair.
fn adapter_files(v: &Bound<'_, PyAny>) -> PyResult<Vec<(PathBuf, f32)>> {
    let wrong = || PyTypeError::new_err("a list of adapter files, each a path or (path, scale)");
    if v.is_instance_of::<PyString>() || v.hasattr("__fspath__")? {
        return Err(wrong());
    }
    v.try_iter()
        .map_err(|_| wrong())?
        .map(|item| {
            let item = item?;
            let (path, scale) = match item.extract::<PathBuf>() {
                Ok(path) => (path, 1.0),
                Err(_) => item.extract::<(PathBuf, f32)>().map_err(|_| wrong())?,
            };
            if !scale.is_finite() {
                let msg = format!(
                    "lora: {}: scale {scale}: must be a finite number",
                    path.display()
                );
                return Err(errors::error(v.py(), Kind::Option, msg));
            }
            Ok((path, scale))
        })
        .collect()
}

/// Object names: "cat ; dog" or a sequence of names.
fn objects(v: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    let Some(v) = v.filter(|v| !v.is_none()) else {
        return Ok(Vec::new());
    };
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(vec![s.to_string()]);
    }
    v.extract::<Vec<String>>()
        .map_err(|_| PyTypeError::new_err("objects: a string (\"cat ; dog\") or a list of names"))
}

/// The text argument of a task (question, prompt).
fn text(task: &str, v: Option<&Bound<'_, PyAny>>) -> PyResult<String> {
    match v.filter(|v| !v.is_none()) {
        Some(v) => v
            .extract::<String>()
            .map_err(|_| PyTypeError::new_err(format!("{task}: the text must be a string"))),
        None => Err(PyTypeError::new_err(format!("{task}: give the text"))),
    }
}

/// The names of a task call's options (`**options` of `run` / `stream`; the Python
/// wrapper's keyword arguments).
const OPTIONS: [&str; 11] = [
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "ctx_size",
    "ignore_eos",
    "lora",
    "frames",
    "fps",
];

/// The per-call options the keyword arguments of every task call give.
struct Request<'py>(Option<Bound<'py, PyDict>>);

impl<'py> Request<'py> {
    /// The options of a call; a name that is none of [`OPTIONS`] is a `TypeError`.
    fn new(options: Option<Bound<'py, PyDict>>) -> PyResult<Self> {
        if let Some(d) = &options {
            for key in d.keys() {
                let key = key.extract::<String>()?;
                if !OPTIONS.contains(&key.as_str()) {
                    return Err(PyTypeError::new_err(format!(
                        "unexpected keyword argument {key:?}"
                    )));
                }
            }
        }
        Ok(Request(options))
    }

    /// Option `name` converted by `convert` (see [`named`]); `None` when not given or None.
    fn get<T>(
        &self,
        name: &str,
        convert: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<T>,
    ) -> PyResult<Option<T>> {
        let v = match &self.0 {
            Some(d) => d.get_item(name)?,
            None => None,
        };
        named(name, v.as_ref(), convert)
    }

    /// Raw values for the library's one validation.
    fn values(&self) -> PyResult<RequestValues> {
        Ok(RequestValues {
            n_predict: self.get("max_tokens", |v| v.extract())?,
            max_ctx: self.get("ctx_size", |v| v.extract())?,
            temperature: self.get("temperature", |v| v.extract())?,
            top_k: self.get("top_k", |v| v.extract())?,
            top_p: self.get("top_p", |v| v.extract())?,
            seed: self.get("seed", |v| v.extract())?,
            stop: self.get("stop", stop_list)?,
            ignore_eos: self.get("ignore_eos", |v| v.extract())?,
            lora: self.get("lora", lora_list)?,
        })
    }
}

impl Model {
    fn load(
        py: Python<'_>,
        paths: ModelPaths,
        threads: Option<i32>,
        n_gpu_layers: Option<i32>,
        ctx_size: Option<&Bound<'_, PyAny>>,
        low_mem_mode: &Bound<'_, PyAny>,
        lora: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        crate::logging::refresh(py)?;
        let opts = LoadOptions {
            // As the C library: 0 or less = the default (physical cores).
            threads: threads
                .filter(|&t| t > 0)
                .unwrap_or_else(pali::default_threads),
            n_gpu_layers: n_gpu_layers.unwrap_or(0),
            low_mem: low_mem(py, low_mem_mode)?,
            ..Default::default()
        };
        let mut base = GenerateOptions::default()
            .apply(&RequestValues {
                max_ctx: named("ctx_size", ctx_size, |v| v.extract())?,
                ..Default::default()
            })
            .map_err(|e| errors::from_pali(py, e))?;
        let adapters = named("lora", lora, adapter_files)?.unwrap_or_default();
        let inner = py
            .detach(|| -> pali::Result<_> {
                let model = pali::Model::load(&paths, &opts)?;
                for (file, scale) in &adapters {
                    let id = model.load_adapter(file)?;
                    base.lora.push(AdapterScale::new(id, *scale));
                }
                Ok(model)
            })
            .map_err(|e| errors::from_pali(py, e))?;
        base.validate().map_err(|e| errors::from_pali(py, e))?;
        Ok(Model {
            inner: Arc::new(inner),
            base: Mutex::new(base),
            paths,
        })
    }

    /// The options every call starts from.
    fn base(&self) -> std::sync::MutexGuard<'_, GenerateOptions> {
        self.base.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts one call's generation (see [`Job::start`]): the library's task and options,
    /// checked, and the input as Python gave it.
    #[allow(clippy::too_many_arguments)]
    fn start(
        &self,
        py: Python<'_>,
        image: &Bound<'_, PyAny>,
        task: &str,
        arg: Option<&Bound<'_, PyAny>>,
        lang: &str,
        long: bool,
        bgr: bool,
        options: Option<Bound<'_, PyDict>>,
        stream: bool,
    ) -> PyResult<Job> {
        let request = Request::new(options)?;
        crate::logging::refresh(py)?;
        let task = match task {
            "caption" => Task::Caption {
                lang: lang.into(),
                long,
            },
            "ask" => Task::Ask {
                lang: lang.into(),
                question: text("ask", arg)?,
            },
            "ocr" => Task::Ocr,
            "detect" => Task::Detect(objects(arg)?),
            "segment" => Task::Segment(objects(arg)?),
            "prompt" => Task::Raw(text("prompt", arg)?),
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown task {other:?}: caption, ask, ocr, detect, segment or prompt"
                )))
            }
        };
        // Bad names and bad options are refused before the image is read.
        task.check().map_err(|e| errors::from_pali(py, e))?;
        let opts = self
            .base()
            .apply(&request.values()?)
            .map_err(|e| errors::from_pali(py, e))?;
        // Adapters that are not loaded (any more) are refused here, before the image.
        self.inner
            .check_options(&opts)
            .map_err(|e| errors::from_pali(py, e))?;
        let frames = request.get("frames", |v| v.extract())?;
        let fps = request.get("fps", |v| v.extract())?;
        let input = Input::from_py(image, bgr, frames, fps)?;
        Job::start(py, self.inner.clone(), input, task, opts, stream)
    }
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (model, mmproj = None, vae = None, *, threads = None, n_gpu_layers = None, ctx_size = None, low_mem = None, lora = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: PathBuf,
        mmproj: Option<PathBuf>,
        vae: Option<PathBuf>,
        threads: Option<i32>,
        n_gpu_layers: Option<i32>,
        ctx_size: Option<&Bound<'_, PyAny>>,
        low_mem: Option<&Bound<'_, PyAny>>,
        lora: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let paths = match mmproj {
            Some(mmproj) => ModelPaths::new(model, mmproj),
            None => ModelPaths::beside(model).map_err(|e| errors::from_pali(py, e))?,
        };
        let paths = match vae {
            Some(vae) => paths.with_mask_decoder(vae),
            None => paths,
        };
        let none = py.None().into_bound(py);
        Model::load(
            py,
            paths,
            threads,
            n_gpu_layers,
            ctx_size,
            low_mem.unwrap_or(&none),
            lora,
        )
    }

    /// The bundled demo model under `root` (`root/models/demo`), with its mask decoder.
    #[staticmethod]
    #[pyo3(signature = (root, *, threads = None, ctx_size = None, low_mem = None))]
    fn demo(
        py: Python<'_>,
        root: PathBuf,
        threads: Option<i32>,
        ctx_size: Option<&Bound<'_, PyAny>>,
        low_mem: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let paths = ModelPaths::demo(&root).map_err(|e| errors::from_pali(py, e))?;
        let none = py.None().into_bound(py);
        let low_mem = low_mem.unwrap_or(&none);
        Model::load(py, paths, threads, None, ctx_size, low_mem, None)
    }

    /// Runs a task and waits for its answer: `(json, masks)`. `options`: see [`OPTIONS`].
    #[pyo3(signature = (image, task, arg = None, *, lang = "en", long = false, bgr = false,
        **options))]
    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
        task: &str,
        arg: Option<&Bound<'py, PyAny>>,
        lang: &str,
        long: bool,
        bgr: bool,
        options: Option<Bound<'py, PyDict>>,
    ) -> PyResult<PyAnswer> {
        let job = self.start(py, image, task, arg, lang, long, bgr, options, false)?;
        job::wait(py, job)
    }

    /// Starts a task whose text is streamed: a `Stream` of pieces.
    #[pyo3(signature = (image, task, arg = None, *, lang = "en", long = false, bgr = false,
        **options))]
    #[allow(clippy::too_many_arguments)]
    fn stream<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
        task: &str,
        arg: Option<&Bound<'py, PyAny>>,
        lang: &str,
        long: bool,
        bgr: bool,
        options: Option<Bound<'py, PyDict>>,
    ) -> PyResult<Stream> {
        let job = self.start(py, image, task, arg, lang, long, bgr, options, true)?;
        Ok(Stream::new(job))
    }

    /// Loads a LoRA adapter (`pali convert-lora`'s files: either file of the pair) and
    /// returns its id; calls use it when they name it (`lora=[id]`) or once it is in the
    /// defaults (`lora` setter). Waits for running generations; GIL released.
    fn load_adapter(&self, py: Python<'_>, path: PathBuf) -> PyResult<u32> {
        crate::logging::refresh(py)?;
        py.detach(|| self.inner.load_adapter(&path))
            .map(|id| id.0)
            .map_err(|e| errors::from_pali(py, e))
    }

    /// Unloads adapter `id` (and drops it from the defaults).
    fn free_adapter(&self, py: Python<'_>, id: i64) -> PyResult<()> {
        let id = u32::try_from(id).map(AdapterId).map_err(|_| {
            errors::error(
                py,
                Kind::Option,
                format!("adapter id {id}: no such adapter"),
            )
        })?;
        py.detach(|| self.inner.free_adapter(id))
            .map_err(|e| errors::from_pali(py, e))?;
        self.base().lora.retain(|a| a.id != id);
        Ok(())
    }

    /// The loaded adapters as JSON (`pali serve`'s `/lora-adapters` fields and more).
    fn adapters_json(&self) -> String {
        serde_json::to_string(&self.inner.adapters()).expect("adapters serialize")
    }

    /// The adapters every call uses unless it passes `lora=`: `[(id, scale)]`.
    fn default_lora(&self) -> Vec<(u32, f32)> {
        self.base().lora.iter().map(|a| (a.id.0, a.scale)).collect()
    }

    /// Sets the default adapters (as `lora=` of a call, None = none; checked against the
    /// loaded ones).
    #[pyo3(signature = (value))]
    fn set_default_lora(&self, py: Python<'_>, value: Option<Bound<'_, PyAny>>) -> PyResult<()> {
        let lora = named("lora", value.as_ref(), lora_list)?.unwrap_or_default();
        let mut base = self.base();
        let opts = base
            .apply(&RequestValues {
                lora: Some(lora),
                ..Default::default()
            })
            .map_err(|e| errors::from_pali(py, e))?;
        self.inner
            .check_options(&opts)
            .map_err(|e| errors::from_pali(py, e))?;
        *base = opts;
        Ok(())
    }

    /// Decoder, vision and mask decoder files (the last None without one).
    #[getter]
    fn paths(&self) -> (PathBuf, PathBuf, Option<PathBuf>) {
        (
            self.paths.decoder.clone(),
            self.paths.mmproj.clone(),
            self.paths.mask_decoder.clone(),
        )
    }

    /// Whether low-memory mode is on.
    #[getter]
    fn low_mem(&self) -> bool {
        self.inner.low_mem()
    }

    /// How long loading took, in milliseconds.
    #[getter]
    fn load_ms(&self) -> f64 {
        self.inner.load_ms()
    }

    /// The vision tower's ggml backend.
    #[getter]
    fn vision_backend(&self) -> String {
        self.inner.vision_backend().to_string()
    }

    /// Whether a mask decoder was loaded (segment masks).
    #[getter]
    fn has_mask_decoder(&self) -> bool {
        self.inner.has_mask_decoder()
    }

    /// The context length the decoder was trained for.
    #[getter]
    fn n_ctx_train(&self) -> usize {
        self.inner.n_ctx_train()
    }
}
