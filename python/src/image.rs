//! Images from Python: a path, encoded bytes, a numpy array of pixels, a PIL image or a
//! `pali.Image`, turned into the library's `RgbImage` by one function ([`Source::decode`]).
//!
//! Pixels are copied exactly once, into the `RgbImage` the library needs (H × W × 3 bytes,
//! whatever the array's strides; BGR is swapped in that copy); encoded bytes are borrowed
//! and decoded without the GIL.

use crate::errors::{self, Kind};
use numpy::ndarray::Axis;
use numpy::prelude::*;
use numpy::{PyArray3, PyUntypedArray};
use pali::RgbImage;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyByteArray, PyBytes, PyList, PyString, PyTuple};
use std::path::PathBuf;
use std::sync::Arc;

/// An image as a Python object gave it, taken under the GIL; [`Source::decode`] finishes it
/// without the GIL.
pub(crate) enum Source {
    /// Pixels already in the library's layout.
    Pixels(Arc<RgbImage>),
    /// A file to decode.
    Path(PathBuf),
    /// An encoded file in memory (JPEG, PNG, WebP, BMP, GIF), borrowed from Python.
    Encoded(PyBackedBytes),
}

impl Source {
    /// Reads `obj` (see the module's docs); `bgr` says an array's channels are B, G, R.
    pub(crate) fn from_py(obj: &Bound<'_, PyAny>, bgr: bool) -> PyResult<Source> {
        let py = obj.py();
        let refuse = |msg: String| Err(errors::error(py, Kind::Image, msg));
        let not_pixels = |what: &str| {
            refuse(format!(
                "bgr=True is for arrays of pixels (OpenCV frames); {what} is decoded as RGB"
            ))
        };
        if let Ok(image) = obj.cast::<Image>() {
            if bgr {
                return not_pixels("a pali.Image");
            }
            return Ok(Source::Pixels(image.get().rgb.clone()));
        }
        if let Some(file) = Source::file(obj)? {
            if bgr {
                return not_pixels(match file {
                    Source::Path(_) => "an image file",
                    _ => "an encoded image",
                });
            }
            return Ok(file);
        }
        // An array exists only once numpy is imported (the numpy crate would panic
        // looking for numpy's API in a process without it).
        if imported(py, "numpy")? {
            if let Ok(array) = obj.cast::<PyUntypedArray>() {
                return Ok(Source::Pixels(Arc::new(pixels(array, bgr)?)));
            }
        }
        if let Some(rgb) = pil_pixels(obj)? {
            if bgr {
                return not_pixels("a PIL image");
            }
            return Ok(Source::Pixels(Arc::new(pixels(&rgb, false)?)));
        }
        if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
            return refuse(
                "a list (or tuple) where one image was expected: a task's list of images is one \
                 prompt, and its items are images, not lists"
                    .into(),
            );
        }
        refuse(format!(
            "unsupported image type {}: pass a path, encoded bytes, a numpy uint8 array (H, W, 3), a PIL image or a pali.Image",
            obj.get_type().name()?
        ))
    }

    /// A path (str or `os.PathLike`) or encoded bytes (`bytes`, `bytearray`), if `obj` is one:
    /// a file still to decode, an image's or a clip's.
    pub(crate) fn file(obj: &Bound<'_, PyAny>) -> PyResult<Option<Source>> {
        Ok(
            if obj.is_instance_of::<PyString>() || obj.hasattr("__fspath__")? {
                Some(Source::Path(obj.extract::<PathBuf>()?))
            } else if obj.is_instance_of::<PyBytes>() || obj.is_instance_of::<PyByteArray>() {
                Some(Source::Encoded(obj.extract::<PyBackedBytes>()?))
            } else {
                None
            },
        )
    }

    /// The decoded image (no GIL needed): the one place every input becomes an `RgbImage`.
    pub(crate) fn decode(self) -> Result<Arc<RgbImage>, pali::Error> {
        Ok(match self {
            Source::Pixels(rgb) => rgb,
            Source::Path(path) => Arc::new(pali::image::load_image(&path, pali::MAX_IMAGE_PIXELS)?),
            Source::Encoded(bytes) => {
                Arc::new(pali::image::decode_image(&bytes, pali::MAX_IMAGE_PIXELS)?)
            }
        })
    }
}

/// A PIL image's RGB pixels as a numpy array (PIL's own `convert("RGB")`, the rule the
/// library's decoder follows too), if `obj` is one. PIL is only looked at once imported.
fn pil_pixels<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyUntypedArray>>> {
    let py = obj.py();
    if !imported(py, "PIL.Image")? {
        return Ok(None);
    }
    let pil = py.import("PIL.Image")?;
    if !obj.is_instance(&pil.getattr("Image")?)? {
        return Ok(None);
    }
    need_numpy(py, "a PIL image")?;
    let rgb = if obj.getattr("mode")?.extract::<String>()? == "RGB" {
        obj.clone()
    } else {
        obj.call_method1("convert", ("RGB",))?
    };
    let array = py.import("numpy")?.call_method1("asarray", (rgb,))?;
    Ok(Some(
        array.cast_into::<PyUntypedArray>().map_err(PyErr::from)?,
    ))
}

/// Whether `module` is imported already (a value of its types can exist).
fn imported(py: Python<'_>, module: &str) -> PyResult<bool> {
    py.import("sys")?.getattr("modules")?.contains(module)
}

/// Imports numpy, or says that `what` needs it (`pali.Error`).
pub(crate) fn need_numpy(py: Python<'_>, what: &str) -> PyResult<()> {
    py.import("numpy").map(drop).map_err(|e| {
        errors::error(
            py,
            Kind::Base,
            format!("{what} needs numpy (pip install numpy): {e}"),
        )
    })
}

/// Copies an (H, W, 3) uint8 array of any strides into an `RgbImage`: H × W × 3 bytes, the
/// one copy; `bgr` swaps the channels in place afterwards.
fn pixels(array: &Bound<'_, PyUntypedArray>, bgr: bool) -> PyResult<RgbImage> {
    let py = array.py();
    let refuse = |msg: String| Err(errors::error(py, Kind::Image, msg));
    let shape = array.shape().to_vec();
    let shape_text = format!("{:?}", shape).replace('[', "(").replace(']', ")");
    let dtype = array.dtype();
    if !dtype.is_equiv_to(&numpy::dtype::<u8>(py)) {
        return refuse(format!(
            "image array has dtype {}: pass uint8 pixels of shape (H, W, 3) (e.g. array.astype(numpy.uint8))",
            dtype.str()?
        ));
    }
    let [h, w, 3] = shape[..] else {
        return refuse(format!(
            "image array has shape {shape_text}: expected (H, W, 3) RGB pixels"
        ));
    };
    if h == 0 || w == 0 {
        return refuse(format!(
            "image array has shape {shape_text}: width and height must be at least 1"
        ));
    }
    let (width, height) = match (u32::try_from(w), u32::try_from(h)) {
        (Ok(w), Ok(h)) if u64::from(w) * u64::from(h) <= pali::MAX_IMAGE_PIXELS => (w, h),
        _ => {
            return refuse(format!(
                "image array has shape {shape_text}: over the limit of {} pixels",
                pali::MAX_IMAGE_PIXELS
            ))
        }
    };
    let array = array
        .cast::<PyArray3<u8>>()
        .map_err(PyErr::from)?
        .readonly();
    let view = array.as_array();
    let mut data = Vec::with_capacity(h * w * 3);
    match view.as_slice() {
        Some(all) => data.extend_from_slice(all),
        None => {
            for row in view.axis_iter(Axis(0)) {
                match row.as_slice() {
                    Some(row) => data.extend_from_slice(row),
                    None => data.extend(row.iter().copied()),
                }
            }
        }
    }
    if bgr {
        for px in data.chunks_exact_mut(3) {
            px.swap(0, 2);
        }
    }
    Ok(RgbImage::new(width, height, data).expect("length is width x height x 3"))
}

/// A decoded RGB image, ready for any number of calls (pixels are not copied again).
///
/// `pali.Image(source, *, bgr=False)`: `source` is a path (str or os.PathLike), encoded
/// bytes (JPEG, PNG, WebP, BMP, GIF), a numpy uint8 array (H, W, 3), strided or not, a PIL
/// image or another `pali.Image`. `bgr=True` reads an array's channels as B, G, R (OpenCV's
/// order). Arrays are copied once (H × W × 3 bytes); files are decoded as `pali` decodes
/// them (EXIF orientation applied, alpha dropped).
#[pyclass(module = "pali", name = "Image", frozen)]
pub(crate) struct Image {
    pub(crate) rgb: Arc<RgbImage>,
}

#[pymethods]
impl Image {
    #[new]
    #[pyo3(signature = (source, *, bgr = false))]
    fn new(py: Python<'_>, source: &Bound<'_, PyAny>, bgr: bool) -> PyResult<Self> {
        let source = Source::from_py(source, bgr)?;
        let rgb = py
            .detach(|| source.decode())
            .map_err(|e| errors::from_pali(py, e))?;
        Ok(Image { rgb })
    }

    /// An image from an OpenCV frame: a uint8 array (H, W, 3) in B, G, R order.
    #[staticmethod]
    fn from_bgr(py: Python<'_>, array: &Bound<'_, PyAny>) -> PyResult<Self> {
        Image::new(py, array, true)
    }

    /// Width in pixels.
    #[getter]
    fn width(&self) -> u32 {
        self.rgb.width
    }

    /// Height in pixels.
    #[getter]
    fn height(&self) -> u32 {
        self.rgb.height
    }

    /// (width, height) in pixels.
    #[getter]
    fn size(&self) -> (u32, u32) {
        (self.rgb.width, self.rgb.height)
    }

    /// Bytes of pixels held: width × height × 3.
    #[getter]
    fn nbytes(&self) -> usize {
        self.rgb.data.len()
    }

    /// The pixels as a new numpy uint8 array (H, W, 3), RGB.
    fn to_numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray3<u8>>> {
        need_numpy(py, "Image.to_numpy()")?;
        let (h, w) = (self.rgb.height as usize, self.rgb.width as usize);
        let flat = numpy::PyArray1::from_slice(py, &self.rgb.data);
        flat.reshape([h, w, 3])
    }

    fn __repr__(&self) -> String {
        format!("pali.Image({}x{})", self.rgb.width, self.rgb.height)
    }
}
