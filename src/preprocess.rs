//! Image loading and preprocessing for the SigLIP vision tower.
//!
//! Reproduces Hugging Face's PaliGemma input pipeline with the PIL backend
//! (`transformers.image_utils.load_image`, then `SiglipImageProcessorPil` in
//! transformers 5, `SiglipImageProcessor` in 4.x): decode, apply the EXIF
//! orientation, convert to RGB like PIL's `Image.convert("RGB")`, resize with
//! PIL's `Image.resize` (bit-exact, see [`resize_rgb8`]), rescale by `1/255`,
//! normalise with the per-channel mean/std, and lay out as CHW `f32`.
//!
//! Decoding uses the `image` crate (JPEG, PNG, WebP, BMP, GIF). Lossless
//! formats (and, in our tests, lossy WebP) decode to exactly PIL's pixels;
//! JPEG differs from libjpeg-turbo by up to ~4 levels on some pixels (IDCT
//! and chroma upsampling), which a pure-Rust decoder cannot avoid.

use std::io::{BufRead, Cursor, Seek};
use std::path::{Path, PathBuf};

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, Limits};

/// Name used in errors for images decoded from memory (no file path).
const MEMORY_SOURCE: &str = "<in-memory image>";

/// Resampling filter, with PIL's numbering as stored in
/// `preprocessor_config.json`'s `resample`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResampleFilter {
    /// PIL `NEAREST` (0): nearest neighbour through PIL's affine pixel-centre mapping.
    Nearest,
    /// PIL `LANCZOS` (1): truncated sinc, support 3.
    Lanczos,
    /// PIL `BILINEAR` (2): triangle filter, support 1.
    Bilinear,
    /// PIL `BICUBIC` (3): cubic convolution with `a = -0.5`, support 2 (PaliGemma's choice).
    Bicubic,
    /// PIL `BOX` (4): box filter, support 0.5.
    Box,
    /// PIL `HAMMING` (5): Hamming-windowed sinc, support 1.
    Hamming,
}

impl ResampleFilter {
    /// Maps PIL's integer filter code (`Image.Resampling`) to a filter.
    pub fn from_pil_code(code: u32) -> Result<Self, PreprocessError> {
        Ok(match code {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => return Err(PreprocessError::InvalidResample { code }),
        })
    }

    /// PIL's integer code for this filter (inverse of [`Self::from_pil_code`]).
    pub fn pil_code(self) -> u32 {
        match self {
            Self::Nearest => 0,
            Self::Lanczos => 1,
            Self::Bilinear => 2,
            Self::Bicubic => 3,
            Self::Box => 4,
            Self::Hamming => 5,
        }
    }

    /// Kernel and support radius as in Pillow's `Resample.c`; `None` for nearest,
    /// which Pillow implements as an affine transform instead.
    fn kernel(self) -> Option<(Kernel, f64)> {
        match self {
            Self::Nearest => None,
            Self::Box => Some((box_kernel, 0.5)),
            Self::Bilinear => Some((bilinear_kernel, 1.0)),
            Self::Hamming => Some((hamming_kernel, 1.0)),
            Self::Bicubic => Some((bicubic_kernel, 2.0)),
            Self::Lanczos => Some((lanczos_kernel, 3.0)),
        }
    }
}

/// What the vision tower expects (read from the mmproj file by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Side of the square model input in pixels (224, 448 or 896 for PaliGemma 2).
    pub image_size: u32,
    /// Per-channel mean subtracted after rescaling (RGB order).
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub std: [f32; 3],
    /// Factor applied to the 0..=255 pixel values first (normally `1/255`).
    pub rescale_factor: f32,
    /// Resampling filter used to resize to `image_size` x `image_size`.
    pub resample: ResampleFilter,
    /// Decompression-bomb guard: images with more pixels are refused before decoding.
    pub max_pixels: u64,
}

impl PreprocessConfig {
    /// PaliGemma / PaliGemma 2 defaults (`preprocessor_config.json` of the
    /// Google checkpoints): mean = std = 0.5, rescale 1/255, bicubic.
    pub fn paligemma(image_size: u32) -> Self {
        Self {
            image_size,
            mean: [0.5; 3],
            std: [0.5; 3],
            rescale_factor: (1.0f64 / 255.0) as f32,
            resample: ResampleFilter::Bicubic,
            max_pixels: 100_000_000,
        }
    }
}

/// A decoded RGB8 image in its original, orientation-corrected size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Interleaved pixels, row-major HWC, RGB; length `3 * width * height`.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps an HWC RGB8 buffer, checking that its length matches the size.
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Option<Self> {
        let expected = (width as u64).checked_mul(height as u64)?.checked_mul(3)?;
        (data.len() as u64 == expected).then_some(Self {
            width,
            height,
            data,
        })
    }
}

/// How an alpha channel is turned into RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AlphaMode {
    /// Drop alpha, keeping the stored colour: PIL's `convert("RGB")`, which is
    /// what `transformers.image_utils.load_image` applies.
    #[default]
    Drop,
    /// Composite over opaque white, bit-exact with PIL's `alpha_composite`:
    /// what transformers 5.x's `convert_to_rgb` does when a PIL image with
    /// transparency is handed straight to the processor.
    CompositeOnWhite,
}

/// Why an image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// The file could not be opened or read.
    #[error("cannot read image {}: {source}", path.display())]
    Io {
        /// File that failed.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file has no bytes at all.
    #[error("image {} is empty (0 bytes)", path.display())]
    Empty {
        /// Offending file.
        path: PathBuf,
    },
    /// Not a JPEG, PNG, WebP, BMP or GIF, or a variant the decoder does not handle.
    #[error(
        "image {} has an unknown or unsupported format ({detail}); supported: JPEG, PNG, WebP, BMP, GIF",
        path.display()
    )]
    UnsupportedFormat {
        /// Offending file.
        path: PathBuf,
        /// What the decoder reported.
        detail: String,
    },
    /// The data is corrupt or truncated.
    #[error("image {} is corrupt or truncated: {detail}", path.display())]
    Corrupt {
        /// Offending file.
        path: PathBuf,
        /// What the decoder reported.
        detail: String,
    },
    /// More than `max_pixels` pixels; refused before the pixel buffer is allocated.
    #[error(
        "image {} is too large: {width}x{height} = {} pixels exceeds the limit of {max_pixels}",
        path.display(), *width as u64 * *height as u64
    )]
    TooLarge {
        /// Offending file.
        path: PathBuf,
        /// Width claimed by the header.
        width: u32,
        /// Height claimed by the header.
        height: u32,
        /// The limit in force.
        max_pixels: u64,
    },
    /// The decoder's own memory limit was hit (derived from `max_pixels`).
    #[error("image {} exceeds the decoder's memory limit: {detail}", path.display())]
    DecoderLimit {
        /// Offending file.
        path: PathBuf,
        /// What the decoder reported.
        detail: String,
    },
    /// Width or height is zero.
    #[error("image {} has zero size ({width}x{height})", path.display())]
    ZeroSized {
        /// Offending file.
        path: PathBuf,
        /// Width claimed by the header.
        width: u32,
        /// Height claimed by the header.
        height: u32,
    },
    /// `resample` is not one of PIL's codes 0..=5.
    #[error("invalid resample filter code {code} (PIL codes are 0..=5)")]
    InvalidResample {
        /// The code found.
        code: u32,
    },
}

/// Reads and decodes an image file; see [`load_image_with`].
pub fn load_image(path: &Path, max_pixels: u64) -> Result<RgbImage, PreprocessError> {
    load_image_with(path, max_pixels, AlphaMode::Drop)
}

/// Reads and decodes an image file: format guessed from content (not the
/// extension), EXIF orientation applied, converted to RGB8 like PIL.
pub fn load_image_with(
    path: &Path,
    max_pixels: u64,
    alpha: AlphaMode,
) -> Result<RgbImage, PreprocessError> {
    let io_err = |source| PreprocessError::Io {
        path: path.to_path_buf(),
        source,
    };
    if std::fs::metadata(path).map_err(io_err)?.is_dir() {
        return Err(io_err(std::io::Error::other("is a directory")));
    }
    // Whole file in memory: the JPEG decoder buffers it anyway, and the
    // truncation check needs the bytes. max_pixels bounds the pixel buffer.
    let bytes = std::fs::read(path).map_err(io_err)?;
    decode_bytes(&bytes, max_pixels, alpha, path)
}

/// Decodes an image held in memory; same semantics as [`load_image`].
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, PreprocessError> {
    decode_image_with(bytes, max_pixels, AlphaMode::Drop)
}

/// Decodes an image held in memory with a chosen [`AlphaMode`].
pub fn decode_image_with(
    bytes: &[u8],
    max_pixels: u64,
    alpha: AlphaMode,
) -> Result<RgbImage, PreprocessError> {
    decode_bytes(bytes, max_pixels, alpha, Path::new(MEMORY_SOURCE))
}

/// Shared decode path: sanity checks on the bytes, then [`decode_from`].
fn decode_bytes(
    bytes: &[u8],
    max_pixels: u64,
    alpha: AlphaMode,
    path: &Path,
) -> Result<RgbImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty {
            path: path.to_path_buf(),
        });
    }
    // The JPEG decoder conceals a cut-off file by padding it; PIL refuses it
    // ("image file is truncated"), so do the same.
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) && jpeg_is_truncated(bytes) {
        return Err(PreprocessError::Corrupt {
            path: path.to_path_buf(),
            detail: "JPEG data ends before the end-of-image marker (truncated file)".into(),
        });
    }
    decode_from(Cursor::new(bytes), max_pixels, alpha, path)
}

/// Walks the JPEG marker structure and reports whether the data runs out
/// before the EOI marker. Structural oddities are left to the decoder
/// (reported as not truncated).
fn jpeg_is_truncated(b: &[u8]) -> bool {
    let mut i = 2; // after SOI
    loop {
        // Expect a marker: one or more 0xFF fill bytes, then the code.
        if i >= b.len() {
            return true;
        }
        if b[i] != 0xFF {
            return false;
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&code) = b.get(i) else {
            return true;
        };
        i += 1;
        match code {
            0xD9 => return false,           // EOI
            0x01 | 0xD0..=0xD7 => continue, // standalone markers
            _ => {
                let Some(len) = b.get(i..i + 2) else {
                    return true;
                };
                i += u16::from_be_bytes([len[0], len[1]]) as usize;
                if code == 0xDA {
                    // SOS: skip entropy-coded data up to the next real marker.
                    loop {
                        match b.get(i) {
                            None => return true,
                            Some(0xFF) => {
                                let mut j = i + 1;
                                while b.get(j) == Some(&0xFF) {
                                    j += 1;
                                }
                                match b.get(j) {
                                    None => return true,
                                    Some(0x00 | 0xD0..=0xD7) => i = j + 1,
                                    Some(_) => break,
                                }
                            }
                            Some(_) => i += 1,
                        }
                    }
                }
            }
        }
    }
}

/// Shared decode path: guess format, check the header's size, then decode.
fn decode_from<R: BufRead + Seek>(
    reader: R,
    max_pixels: u64,
    alpha: AlphaMode,
    path: &Path,
) -> Result<RgbImage, PreprocessError> {
    let mut reader = ImageReader::new(reader)
        .with_guessed_format()
        .map_err(|source| PreprocessError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if reader.format().is_none() {
        return Err(PreprocessError::UnsupportedFormat {
            path: path.to_path_buf(),
            detail: "unrecognised file signature".into(),
        });
    }
    reader.limits(decoder_limits(max_pixels));
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| map_image_error(e, path))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(PreprocessError::ZeroSized {
            path: path.to_path_buf(),
            width,
            height,
        });
    }
    if width as u64 * height as u64 > max_pixels {
        return Err(PreprocessError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            max_pixels,
        });
    }
    // A malformed EXIF block is ignored, as PIL's exif_transpose does.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| map_image_error(e, path))?;
    img.apply_orientation(orientation);
    Ok(to_rgb8_like_pil(img, alpha))
}

/// Limits handed to the decoder. `max_pixels` itself is enforced by hand
/// right after the header is read (the crate has no pixel-count limit, and
/// per-side limits would report a different error); this only caps the
/// decoder's allocations: room for 16-bit RGBA plus working memory.
fn decoder_limits(max_pixels: u64) -> Limits {
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(256 << 20));
    limits
}

fn map_image_error(err: ImageError, path: &Path) -> PreprocessError {
    let path = path.to_path_buf();
    match err {
        ImageError::Unsupported(e) => PreprocessError::UnsupportedFormat {
            path,
            detail: e.to_string(),
        },
        ImageError::Limits(e) => PreprocessError::DecoderLimit {
            path,
            detail: e.to_string(),
        },
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            PreprocessError::Corrupt {
                path,
                detail: format!("unexpected end of data ({e})"),
            }
        }
        ImageError::IoError(source) => PreprocessError::Io { path, source },
        other => PreprocessError::Corrupt {
            path,
            detail: other.to_string(),
        },
    }
}

/// Converts to RGB8 the way PIL does after `Image.open`:
/// * grey is replicated to three channels;
/// * alpha is dropped or composited according to `alpha`;
/// * 16-bit RGB(A) and grey+alpha keep the high byte (`v >> 8`), as PIL's PNG
///   unpackers do;
/// * 16-bit grey without alpha is CLAMPED to 255 (`min(v, 255)`): PIL opens it
///   as mode `I;16` and `convert("RGB")` saturates rather than scales. Odd,
///   but it is what HF feeds the model for such files.
fn to_rgb8_like_pil(img: DynamicImage, alpha: AlphaMode) -> RgbImage {
    let (width, height) = (img.width(), img.height());
    let n = width as usize * height as usize;
    let mut data = Vec::with_capacity(n * 3);
    let mut push = |r: u8, g: u8, b: u8, a: u8| match alpha {
        AlphaMode::Drop => data.extend_from_slice(&[r, g, b]),
        AlphaMode::CompositeOnWhite => {
            data.extend_from_slice(&[over_white(r, a), over_white(g, a), over_white(b, a)])
        }
    };
    match img {
        DynamicImage::ImageRgb8(b) => return rgb_image(width, height, b.into_raw()),
        DynamicImage::ImageLuma8(b) => b.pixels().for_each(|p| push(p[0], p[0], p[0], 255)),
        DynamicImage::ImageLumaA8(b) => b.pixels().for_each(|p| push(p[0], p[0], p[0], p[1])),
        DynamicImage::ImageRgba8(b) => b.pixels().for_each(|p| push(p[0], p[1], p[2], p[3])),
        DynamicImage::ImageLuma16(b) => b.pixels().for_each(|p| {
            let v = p[0].min(255) as u8;
            push(v, v, v, 255)
        }),
        DynamicImage::ImageLumaA16(b) => b.pixels().for_each(|p| {
            let v = (p[0] >> 8) as u8;
            push(v, v, v, (p[1] >> 8) as u8)
        }),
        DynamicImage::ImageRgb16(b) => b
            .pixels()
            .for_each(|p| push((p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8, 255)),
        DynamicImage::ImageRgba16(b) => b.pixels().for_each(|p| {
            let [r, g, bl, a] = p.0.map(|c| (c >> 8) as u8);
            push(r, g, bl, a)
        }),
        // Float images: none of the enabled codecs produce these.
        other => {
            if alpha == AlphaMode::Drop {
                return rgb_image(width, height, other.to_rgb8().into_raw());
            }
            other
                .to_rgba8()
                .pixels()
                .for_each(|p| push(p[0], p[1], p[2], p[3]))
        }
    }
    rgb_image(width, height, data)
}

fn rgb_image(width: u32, height: u32, data: Vec<u8>) -> RgbImage {
    RgbImage {
        width,
        height,
        data,
    }
}

/// One channel of PIL's `alpha_composite(white, src)` (AlphaComposite.c with
/// an opaque white destination, where its coefficients reduce to `a * 128`).
fn over_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    let (c, a) = (c as u32, a as u32);
    let tmp = (c * a + 255 * (255 - a)) * 128 + (0x80 << 7);
    ((((tmp >> 8) + tmp) >> 8) >> 7) as u8
}

// ---------------------------------------------------------------------------
// Resampling: a transcription of Pillow's src/libImaging/Resample.c (8 bpc)
// and, for NEAREST, ImagingScaleAffine in Geometry.c.

/// A 1-D resampling kernel, evaluated in `f64` like Pillow's.
type Kernel = fn(f64) -> f64;

/// Fixed-point fraction bits of the convolution coefficients (Pillow's
/// `PRECISION_BITS`): 8 bits of result, 2 of headroom for negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn box_kernel(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_kernel(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn hamming_kernel(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let x = x * std::f64::consts::PI;
    // Pillow writes the window constants as C `float` literals (0.54f, 0.46f).
    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
}

fn bicubic_kernel(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos_kernel(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Fixed-point weights of a 1-D resampling pass.
struct Coeffs {
    /// Stride between the weight rows of consecutive output pixels.
    ksize: usize,
    /// Per output pixel: first input index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `out_size * ksize` weights scaled by `2^PRECISION_BITS`.
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the full-image
/// box `(0, in_size)`; the float/double mix mirrors the C types exactly.
fn precompute_coeffs(in_size: u32, out_size: u32, kernel: Kernel, support: f64) -> Coeffs {
    // Pillow's box is `float[4]`: (double)(in1 - in0) / outSize.
    let in0 = 0.0f32;
    let in1 = in_size as f32;
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;

    let mut bounds = Vec::with_capacity(out_size as usize);
    let mut weights = vec![0i32; out_size as usize * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size as usize {
        let center = in0 as f64 + (xx as f64 + 0.5) * scale;
        // C `(int)` truncates toward zero, as `as i32` does.
        let xmin = ((center - support + 0.5) as i32).max(0);
        let xmax = ((center + support + 0.5) as i32).min(in_size as i32);
        let taps = (xmax - xmin).max(0) as usize;
        let mut ww = 0.0f64;
        for (x, kx) in k.iter_mut().enumerate().take(taps) {
            let w = kernel(((x as i32 + xmin) as f64 - center + 0.5) * inv_filterscale);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..xx * ksize + taps];
        for (dst, &w) in row.iter_mut().zip(&k[..taps]) {
            let w = if ww != 0.0 { w / ww } else { w };
            let scaled = w * (1u32 << PRECISION_BITS) as f64;
            *dst = if w < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin as usize, taps));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

/// Pillow's `clip8`: drop the fraction bits and saturate to 0..=255.
#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Rounding bias every accumulator starts from (one half in fixed point).
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over `rows` input rows starting at `first_row`.
fn resample_horizontal(
    data: &[u8],
    in_w: usize,
    first_row: usize,
    rows: usize,
    c: &Coeffs,
) -> Vec<u8> {
    let out_w = c.bounds.len();
    let mut out = vec![0u8; out_w * rows * 3];
    for (y, out_row) in out.chunks_exact_mut(out_w * 3).enumerate() {
        let in_row = &data[(first_row + y) * in_w * 3..(first_row + y + 1) * in_w * 3];
        for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
            let (xmin, taps) = c.bounds[xx];
            let k = &c.weights[xx * c.ksize..xx * c.ksize + taps];
            let src = &in_row[xmin * 3..(xmin + taps) * 3];
            let mut ss = [HALF; 3];
            for (s, &w) in src.chunks_exact(3).zip(k) {
                for ch in 0..3 {
                    // Wrapping, like Pillow's C `int`; real weights never overflow.
                    ss[ch] = ss[ch].wrapping_add((s[ch] as i32).wrapping_mul(w));
                }
            }
            for ch in 0..3 {
                px[ch] = clip8(ss[ch]);
            }
        }
    }
    out
}

/// Vertical pass; `row_offset` is subtracted from the bounds (Pillow shifts
/// them when the horizontal pass only produced the rows the vertical one needs).
fn resample_vertical(data: &[u8], width: usize, row_offset: usize, c: &Coeffs) -> Vec<u8> {
    let out_h = c.bounds.len();
    let stride = width * 3;
    let mut out = vec![0u8; stride * out_h];
    let mut ss = vec![HALF; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, taps) = c.bounds[yy];
        let ymin = ymin - row_offset;
        let k = &c.weights[yy * c.ksize..yy * c.ksize + taps];
        ss.iter_mut().for_each(|s| *s = HALF);
        for (y, &w) in k.iter().enumerate() {
            let in_row = &data[(ymin + y) * stride..(ymin + y + 1) * stride];
            for (s, &v) in ss.iter_mut().zip(in_row) {
                *s = s.wrapping_add((v as i32).wrapping_mul(w));
            }
        }
        for (o, &s) in out_row.iter_mut().zip(&ss) {
            *o = clip8(s);
        }
    }
    out
}

/// Pillow's NEAREST resize: `ImagingScaleAffine` with
/// `a = [in_w/out_w, 0, 0, 0, in_h/out_h, 0]`. Source coordinates are
/// accumulated by repeated addition exactly like the C loop, so that rounding
/// picks the same pixels.
fn resize_nearest(img: &RgbImage, out_w: u32, out_h: u32) -> Vec<u8> {
    let coord = |v: f64| if v < 0.0 { -1 } else { v as i64 };
    let a0 = (img.width as f32) as f64 / out_w as f64;
    let a4 = (img.height as f32) as f64 / out_h as f64;
    let mut xintab = Vec::with_capacity(out_w as usize);
    let mut xo = 0.0 + a0 * 0.5;
    for _ in 0..out_w {
        let xin = coord(xo);
        xintab.push((xin >= 0 && xin < img.width as i64).then_some(xin as usize));
        xo += a0;
    }
    let in_stride = img.width as usize * 3;
    let mut out = vec![0u8; out_w as usize * out_h as usize * 3];
    let mut yo = 0.0 + a4 * 0.5;
    for out_row in out.chunks_exact_mut(out_w as usize * 3) {
        let yi = coord(yo);
        yo += a4;
        if yi < 0 || yi >= img.height as i64 {
            continue; // Pillow fills with 0; cannot happen for a plain resize
        }
        let in_row = &img.data[yi as usize * in_stride..(yi as usize + 1) * in_stride];
        for (px, xin) in out_row.chunks_exact_mut(3).zip(&xintab) {
            if let Some(x) = xin {
                px.copy_from_slice(&in_row[x * 3..x * 3 + 3]);
            }
        }
    }
    out
}

/// Which Pillow release's pass order [`resize_rgb8_compat`] reproduces.
///
/// Every release computes the same two 1-D passes, but the order (and so the
/// rounding of the 8-bit intermediate image) changed twice, so results differ
/// by a few levels between releases when both sides are resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PillowCompat {
    /// Pillow up to 12.1: always horizontal pass first.
    Legacy,
    /// Pillow 12.2 and 12.3: vertical first only for images taller than 100x
    /// their width whose height shrinks (done in `Image.resize`, Python side).
    V12_2,
    /// Pillow 13.0 and later: vertical first when the height shrinks by more
    /// than twice as many pixels as the width does (`ImagingResampleInner`).
    #[default]
    V13,
}

impl PillowCompat {
    /// Whether Pillow runs the vertical pass first for this resize.
    fn vertical_first(self, in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> bool {
        match self {
            Self::Legacy => false,
            Self::V12_2 => in_h as u64 > in_w as u64 * 100 && out_h < in_h,
            Self::V13 => out_h < in_h && (in_h - out_h) as i64 > 2 * (in_w as i64 - out_w as i64),
        }
    }
}

/// Resizes like PIL's `Image.resize((width, height), resample=filter)` on an
/// RGB image (default `box`, `reducing_gap=None`), bit-exactly, following the
/// current Pillow ([`PillowCompat::V13`]); see [`resize_rgb8_compat`].
///
/// # Panics
/// If `width` or `height` is zero, or `img.data` is not `3 * img.width *
/// img.height` bytes (PIL refuses both as well).
pub fn resize_rgb8(img: &RgbImage, width: u32, height: u32, filter: ResampleFilter) -> RgbImage {
    resize_rgb8_compat(img, width, height, filter, PillowCompat::default())
}

/// [`resize_rgb8`] reproducing a chosen Pillow release.
///
/// Convolution filters run Pillow's two separable fixed-point passes, each
/// skipped when that side is unchanged, with the support widened on
/// downscale (antialiasing). The intermediate image is 8-bit like Pillow's,
/// which is why a single-pass float resize cannot match.
///
/// # Panics
/// As [`resize_rgb8`].
pub fn resize_rgb8_compat(
    img: &RgbImage,
    width: u32,
    height: u32,
    filter: ResampleFilter,
    compat: PillowCompat,
) -> RgbImage {
    assert!(width > 0 && height > 0, "resize target must be non-empty");
    assert_eq!(
        img.data.len() as u64,
        img.width as u64 * img.height as u64 * 3,
        "RgbImage data length does not match its size"
    );
    assert!(
        img.width > 0 && img.height > 0,
        "cannot resize an empty image"
    );
    if (img.width, img.height) == (width, height) {
        return img.clone();
    }
    let Some((kernel, support)) = filter.kernel() else {
        return rgb_image(width, height, resize_nearest(img, width, height));
    };
    let (in_w, in_h) = (img.width as usize, img.height as usize);
    let horiz = || precompute_coeffs(img.width, width, kernel, support);
    let vert = || precompute_coeffs(img.height, height, kernel, support);

    let data = if width == img.width {
        resample_vertical(&img.data, in_w, 0, &vert())
    } else if height == img.height {
        resample_horizontal(&img.data, in_w, 0, in_h, &horiz())
    } else if compat.vertical_first(img.width, img.height, width, height) {
        let tmp = resample_vertical(&img.data, in_w, 0, &vert());
        resample_horizontal(&tmp, in_w, 0, height as usize, &horiz())
    } else {
        // Only the source rows the vertical pass reads go through the
        // horizontal one (as in Pillow; it does not change any value).
        let vert = vert();
        let first_row = vert.bounds[0].0;
        let last_row = vert.bounds.last().map_or(0, |&(min, taps)| min + taps);
        let tmp = resample_horizontal(&img.data, in_w, first_row, last_row - first_row, &horiz());
        resample_vertical(&tmp, width as usize, first_row, &vert)
    };
    rgb_image(width, height, data)
}

/// Rescale factor as `f64`. HF multiplies in float64 by the Python float
/// `1/255` before casting to float32; an `f32` factor from the mmproj file that
/// is the rounding of `1/255` is widened back to that exact `f64` so the
/// products round the same way.
fn rescale_factor_f64(f: f32) -> f64 {
    let exact = 1.0f64 / 255.0;
    if f == exact as f32 {
        exact
    } else {
        f as f64
    }
}

/// Turns an image into the vision tower's input: resize to `R x R` (aspect
/// ratio ignored, as SigLIP does), then per channel
/// `(f32(x * rescale) - mean) / std` in `f32`, laid out CHW (planar), length
/// `3 * R * R`. Matches HF's PIL backend with Pillow >= 13 to the last bit.
///
/// # Panics
/// If `cfg.image_size` is zero or `img` is inconsistent (see [`resize_rgb8`]).
pub fn preprocess(img: &RgbImage, cfg: &PreprocessConfig) -> Vec<f32> {
    preprocess_compat(img, cfg, PillowCompat::default())
}

/// [`preprocess`] with the resize of a chosen Pillow release.
///
/// # Panics
/// As [`preprocess`].
pub fn preprocess_compat(img: &RgbImage, cfg: &PreprocessConfig, compat: PillowCompat) -> Vec<f32> {
    let r = cfg.image_size;
    let resized = resize_rgb8_compat(img, r, r, cfg.resample, compat);
    let plane = r as usize * r as usize;
    let scale = rescale_factor_f64(cfg.rescale_factor);
    let mut out = vec![0f32; 3 * plane];
    for (c, dst) in out.chunks_exact_mut(plane).enumerate() {
        let (mean, std) = (cfg.mean[c], cfg.std[c]);
        for (d, px) in dst.iter_mut().zip(resized.data.chunks_exact(3)) {
            // HF: float64 multiply, cast to float32, then float32 normalise.
            let v = (px[c] as f64 * scale) as f32;
            *d = (v - mean) / std;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    //! Expected values come from Pillow 13.0.0 / 12.3.0 / 12.1.1 and
    //! transformers 5.24 (`SiglipImageProcessorPil`), generated once with
    //! Python and baked in here.

    use super::*;
    use image::codecs::gif::GifEncoder;
    use image::codecs::jpeg::JpegEncoder;
    use image::codecs::png::PngEncoder;
    use image::{ExtendedColorType, Frame, ImageEncoder, RgbaImage};

    /// Deterministic noise image (a 32-bit integer hash of the byte index);
    /// the Python generator used the same formula.
    fn pattern(w: u32, h: u32) -> RgbImage {
        let data = (0..w * h * 3)
            .map(|i| {
                let mut x = i.wrapping_mul(0x9E37_79B1);
                x ^= x >> 15;
                x = x.wrapping_mul(0x85EB_CA77);
                x ^= x >> 13;
                (x >> 24) as u8
            })
            .collect();
        RgbImage::new(w, h, data).unwrap()
    }

    fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc32(&[&kind[..], data].concat()).to_be_bytes());
        out
    }

    fn encode_png(w: u32, h: u32, data: &[u8], color: ExtendedColorType) -> Vec<u8> {
        let mut out = Vec::new();
        PngEncoder::new(&mut out)
            .write_image(data, w, h, color)
            .unwrap();
        out
    }

    /// Rewrites the IHDR size of a PNG (CRC recomputed).
    fn patch_png_size(png: &mut [u8], w: u32, h: u32) {
        png[16..20].copy_from_slice(&w.to_be_bytes());
        png[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
    }

    /// Inserts a chunk right after IHDR (byte 33).
    fn insert_chunk(png: &[u8], kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        [&png[..33], &png_chunk(kind, data)[..], &png[33..]].concat()
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("pali-preprocess-{}-{name}", std::process::id()))
    }

    /// (width, height)
    type Size = (u32, u32);

    const ALL_FILTERS: [ResampleFilter; 6] = [
        ResampleFilter::Nearest,
        ResampleFilter::Lanczos,
        ResampleFilter::Bilinear,
        ResampleFilter::Bicubic,
        ResampleFilter::Box,
        ResampleFilter::Hamming,
    ];

    #[test]
    fn filter_codes_round_trip() {
        for (code, f) in ALL_FILTERS.iter().enumerate() {
            assert_eq!(f.pil_code(), code as u32);
            assert_eq!(ResampleFilter::from_pil_code(code as u32).unwrap(), *f);
        }
        let err = ResampleFilter::from_pil_code(6).unwrap_err();
        assert!(matches!(err, PreprocessError::InvalidResample { code: 6 }));
        assert!(err.to_string().contains('6'));
    }

    #[test]
    fn pattern_matches_python_generator() {
        assert_eq!(
            &pattern(5, 4).data[..12],
            &[0, 93, 212, 14, 47, 214, 14, 95, 229, 147, 51, 8]
        );
    }

    #[test]
    fn small_resize_matches_pillow_for_every_filter() {
        // Image.fromarray(pattern(5, 4)).resize((3, 7), resample=code), Pillow 13.0.0.
        let expected: [[u8; 63]; 6] = [
            [
                0, 93, 212, 14, 95, 229, 14, 249, 69, 0, 93, 212, 14, 95, 229, 14, 249, 69, 217,
                230, 240, 58, 124, 164, 214, 245, 180, 217, 230, 240, 58, 124, 164, 214, 245, 180,
                178, 157, 97, 131, 113, 54, 101, 228, 233, 45, 205, 198, 196, 106, 24, 57, 89, 56,
                45, 205, 198, 196, 106, 24, 57, 89, 56,
            ],
            [
                0, 55, 220, 58, 49, 170, 68, 165, 12, 44, 132, 236, 38, 85, 191, 97, 174, 85, 148,
                231, 241, 28, 139, 201, 136, 196, 195, 207, 198, 186, 73, 151, 152, 131, 239, 230,
                165, 133, 143, 145, 130, 87, 108, 222, 166, 88, 173, 170, 181, 128, 73, 114, 139,
                101, 39, 214, 200, 189, 129, 78, 123, 83, 66,
            ],
            [
                6, 73, 213, 44, 75, 177, 71, 164, 43, 58, 129, 222, 47, 103, 185, 94, 178, 102,
                142, 219, 237, 52, 147, 197, 130, 201, 195, 162, 185, 189, 95, 145, 148, 123, 214,
                194, 164, 144, 143, 139, 136, 97, 111, 215, 173, 102, 178, 171, 159, 132, 85, 115,
                146, 116, 63, 199, 189, 172, 129, 78, 118, 103, 80,
            ],
            [
                0, 61, 217, 47, 61, 175, 68, 164, 24, 48, 125, 229, 42, 92, 187, 93, 177, 89, 148,
                228, 241, 38, 145, 200, 134, 201, 199, 181, 190, 188, 86, 146, 148, 126, 225, 209,
                168, 137, 139, 142, 133, 90, 109, 222, 174, 94, 179, 172, 171, 129, 77, 116, 140,
                107, 50, 207, 195, 184, 128, 75, 121, 91, 70,
            ],
            [
                7, 70, 213, 14, 95, 229, 81, 150, 39, 7, 70, 213, 14, 95, 229, 81, 150, 39, 141,
                230, 239, 58, 124, 164, 122, 197, 211, 171, 137, 146, 131, 113, 54, 113, 224, 171,
                171, 137, 146, 131, 113, 54, 113, 224, 171, 66, 199, 187, 196, 106, 24, 129, 106,
                85, 66, 199, 187, 196, 106, 24, 129, 106, 85,
            ],
            [
                5, 76, 213, 33, 82, 195, 64, 174, 46, 37, 107, 218, 37, 94, 193, 80, 181, 78, 159,
                229, 239, 55, 143, 186, 143, 209, 202, 166, 186, 187, 95, 136, 134, 127, 217, 195,
                171, 142, 134, 135, 129, 82, 110, 224, 185, 83, 188, 179, 172, 123, 64, 111, 126,
                99, 60, 200, 190, 181, 121, 59, 111, 101, 77,
            ],
        ];
        let src = pattern(5, 4);
        for (f, exp) in ALL_FILTERS.iter().zip(&expected) {
            let out = resize_rgb8(&src, 3, 7, *f);
            assert_eq!((out.width, out.height), (3, 7));
            assert_eq!(&out.data[..], &exp[..], "{f:?}");
        }
        // NEAREST 7x5 -> 3x9.
        let nearest: [u8; 81] = [
            14, 47, 214, 147, 51, 8, 217, 230, 240, 14, 47, 214, 147, 51, 8, 217, 230, 240, 29,
            149, 242, 178, 157, 97, 131, 113, 54, 29, 149, 242, 178, 157, 97, 131, 113, 54, 45,
            205, 198, 196, 106, 24, 57, 89, 56, 70, 48, 235, 7, 20, 77, 249, 243, 75, 70, 48, 235,
            7, 20, 77, 249, 243, 75, 162, 89, 82, 227, 19, 27, 71, 123, 100, 162, 89, 82, 227, 19,
            27, 71, 123, 100,
        ];
        let out = resize_rgb8(&pattern(7, 5), 3, 9, ResampleFilter::Nearest);
        assert_eq!(&out.data[..], &nearest[..]);
    }

    #[test]
    fn resize_matches_pillow_13_checksums() {
        // FNV-1a of Image.fromarray(pattern(w, h)).resize((ow, oh), code).tobytes(), Pillow 13.0.0.
        let cases: [(Size, Size, u32, u64); 14] = [
            ((61, 37), (224, 224), 3, 0x2d16e3510c768714),
            ((29, 47), (98, 98), 3, 0x88de8944648718f8),
            ((640, 480), (56, 56), 3, 0x1be79853cdcf6c7d),
            ((1, 1), (14, 14), 3, 0x803036c0a6f6eea9),
            ((480, 640), (448, 448), 3, 0x0d01b667b98bd019),
            ((300, 1000), (224, 224), 3, 0xaaadfb83a7d1bb0a),
            ((2, 300), (224, 224), 3, 0xe6bda8bbc9eb905b),
            ((61, 37), (224, 224), 2, 0xbad4f474f0901886),
            ((61, 37), (224, 224), 0, 0xc664ac0a49760301),
            ((640, 480), (56, 56), 2, 0x27b2a64b312f0465),
            ((640, 480), (56, 56), 0, 0x3863db43f8832961),
            ((61, 37), (30, 100), 1, 0xd7003004b3337a74),
            ((61, 37), (30, 100), 4, 0x87b146c8faf19247),
            ((61, 37), (30, 100), 5, 0x1ade9befd4d8c7ee),
        ];
        for ((w, h), (ow, oh), code, hash) in cases {
            let f = ResampleFilter::from_pil_code(code).unwrap();
            let out = resize_rgb8(&pattern(w, h), ow, oh, f);
            assert_eq!(out.data.len(), (ow * oh * 3) as usize);
            assert_eq!(fnv1a(&out.data), hash, "{w}x{h} -> {ow}x{oh} {f:?}");
        }
    }

    #[test]
    fn resize_pass_order_follows_pillow_release() {
        // (size, Pillow <= 12.1, Pillow 12.2-12.3, Pillow >= 13), bicubic.
        let cases: [(Size, Size, [u64; 3]); 3] = [
            (
                (480, 640),
                (448, 448),
                [0x46d2723eb74640ca, 0x46d2723eb74640ca, 0x0d01b667b98bd019],
            ),
            (
                (300, 1000),
                (224, 224),
                [0xb13d828c50bd8316, 0xb13d828c50bd8316, 0xaaadfb83a7d1bb0a],
            ),
            (
                (2, 300),
                (224, 224),
                [0x6f77b5465cac2672, 0xe6bda8bbc9eb905b, 0xe6bda8bbc9eb905b],
            ),
        ];
        let compats = [PillowCompat::Legacy, PillowCompat::V12_2, PillowCompat::V13];
        for ((w, h), (ow, oh), hashes) in cases {
            let src = pattern(w, h);
            for (compat, hash) in compats.iter().zip(hashes) {
                let out = resize_rgb8_compat(&src, ow, oh, ResampleFilter::Bicubic, *compat);
                assert_eq!(fnv1a(&out.data), hash, "{w}x{h} -> {ow}x{oh} {compat:?}");
            }
        }
    }

    #[test]
    fn resize_keeps_flat_images_flat_and_same_size_is_identity() {
        let flat = RgbImage::new(13, 9, [10u8, 128, 250].repeat(13 * 9)).unwrap();
        for f in ALL_FILTERS {
            for (w, h) in [(1, 1), (4, 30), (13, 20), (40, 9), (224, 224)] {
                let out = resize_rgb8(&flat, w, h, f);
                assert!(
                    out.data.chunks(3).all(|p| p == [10, 128, 250]),
                    "{f:?} {w}x{h}"
                );
            }
            let src = pattern(13, 9);
            assert_eq!(resize_rgb8(&src, 13, 9, f), src);
        }
    }

    #[test]
    fn preprocess_matches_hf_numerics() {
        // 2x2 image, image_size 2 (no resampling): HF rescale (float64 * 1/255
        // -> float32) then float32 normalise. f32 bit patterns from numpy.
        let img = RgbImage::new(
            2,
            2,
            vec![0, 1, 2, 127, 128, 129, 200, 254, 255, 37, 91, 166],
        )
        .unwrap();
        let half: [u32; 12] = [
            0xbf800000, 0xbb808080, 0x3f119192, 0xbf35b5b6, 0xbf7dfdfe, 0x3b808100, 0x3f7dfdfe,
            0xbe929292, 0xbf7bfbfc, 0x3c40c100, 0x3f800000, 0x3e9a9a9c,
        ];
        let imagenet: [u32; 12] = [
            0xc0078bbd, 0x3d6939a6, 0x3fa74d4f, 0xbfbdfd27, 0xc0012a4f, 0x3e521b48, 0x401a4ee0,
            0xbee29973, 0xbfe281cc, 0x3ee349b7, 0x4028f5c3, 0x3f8b5ddc,
        ];
        let mut cfg = PreprocessConfig::paligemma(2);
        let got: Vec<u32> = preprocess(&img, &cfg).iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, half);
        cfg.mean = [0.485, 0.456, 0.406];
        cfg.std = [0.229, 0.224, 0.225];
        let got: Vec<u32> = preprocess(&img, &cfg).iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, imagenet);
    }

    #[test]
    fn preprocess_matches_hf_pil_backend_end_to_end() {
        // SiglipImageProcessorPil(224x224, mean=std=0.5, bicubic) on
        // pattern(w, h); FNV-1a of the little-endian f32 CHW pixel_values.
        for ((w, h), hash) in [
            ((61, 37), 0xc9399f90c269ded0u64),
            ((37, 61), 0x71eaef7963c16f3c),
        ] {
            let out = preprocess(&pattern(w, h), &PreprocessConfig::paligemma(224));
            assert_eq!(out.len(), 3 * 224 * 224);
            let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert_eq!(fnv1a(&bytes), hash, "{w}x{h}");
        }
    }

    #[test]
    fn preprocess_is_planar_chw() {
        let img = RgbImage::new(1, 1, vec![255, 0, 51]).unwrap();
        let out = preprocess(&img, &PreprocessConfig::paligemma(3));
        assert_eq!(out.len(), 27);
        assert!(out[..9].iter().all(|&v| v == 1.0));
        assert!(out[9..18].iter().all(|&v| v == -1.0));
        assert!(out[18..].iter().all(|&v| (v - -0.6).abs() < 1e-6));
    }

    #[test]
    fn empty_input_is_refused() {
        let err = decode_image(&[], 1000).unwrap_err();
        assert!(matches!(err, PreprocessError::Empty { .. }), "{err}");
        let path = temp_path("empty.png");
        std::fs::write(&path, b"").unwrap();
        let err = load_image(&path, 1000).unwrap_err();
        std::fs::remove_file(&path).ok();
        assert!(matches!(err, PreprocessError::Empty { .. }), "{err}");
        assert!(err.to_string().contains("empty.png"), "{err}");
    }

    #[test]
    fn garbage_and_unsupported_formats_are_refused() {
        let garbage: Vec<u8> = pattern(40, 10).data;
        let err = decode_image(&garbage, 1000).unwrap_err();
        assert!(
            matches!(err, PreprocessError::UnsupportedFormat { .. }),
            "{err}"
        );
        // A TIFF header: recognised, but not an enabled format.
        let err = decode_image(b"II*\0\x08\0\0\0\0\0\0\0\0\0\0\0", 1000).unwrap_err();
        assert!(
            matches!(err, PreprocessError::UnsupportedFormat { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("Tiff"), "{err}");
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let path = temp_path("does-not-exist.png");
        let err = load_image(&path, 1000).unwrap_err();
        assert!(matches!(err, PreprocessError::Io { .. }), "{err}");
        assert!(err.to_string().contains("does-not-exist.png"), "{err}");
        let err = load_image(&std::env::temp_dir(), 1000).unwrap_err();
        assert!(matches!(err, PreprocessError::Io { .. }), "{err}");
    }

    #[test]
    fn truncated_files_are_corrupt() {
        let img = pattern(32, 24);
        let png = encode_png(32, 24, &img.data, ExtendedColorType::Rgb8);
        for cut in [png.len() / 2, png.len() - 13, 40] {
            let err = decode_image(&png[..cut], 1_000_000).unwrap_err();
            assert!(
                matches!(err, PreprocessError::Corrupt { .. }),
                "cut {cut}: {err}"
            );
        }
        let mut jpeg = Vec::new();
        JpegEncoder::new_with_quality(&mut jpeg, 90)
            .write_image(&img.data, 32, 24, ExtendedColorType::Rgb8)
            .unwrap();
        assert!(decode_image(&jpeg, 1_000_000).is_ok());
        for cut in [jpeg.len() / 2, jpeg.len() - 2, 3] {
            let err = decode_image(&jpeg[..cut], 1_000_000).unwrap_err();
            assert!(
                matches!(err, PreprocessError::Corrupt { .. }),
                "cut {cut}: {err}"
            );
        }
        // Trailing bytes after the end-of-image marker are fine (PIL agrees).
        jpeg.extend_from_slice(b"trailing\xff");
        assert!(decode_image(&jpeg, 1_000_000).is_ok());
    }

    #[test]
    fn oversized_header_is_refused_before_decoding() {
        let mut png = encode_png(2, 2, &[7u8; 12], ExtendedColorType::Rgb8);
        patch_png_size(&mut png, 100_000, 100_000);
        let err = decode_image(&png, 100_000_000).unwrap_err();
        match &err {
            PreprocessError::TooLarge {
                width,
                height,
                max_pixels,
                ..
            } => assert_eq!(
                (*width, *height, *max_pixels),
                (100_000, 100_000, 100_000_000)
            ),
            other => panic!("expected TooLarge, got {other}"),
        }
        assert!(err.to_string().contains("100000x100000"), "{err}");
        // The limit is on the pixel count: 3x3 = 9 > 8.
        let png = encode_png(3, 3, &[7u8; 27], ExtendedColorType::Rgb8);
        assert!(matches!(
            decode_image(&png, 8).unwrap_err(),
            PreprocessError::TooLarge { .. }
        ));
        assert_eq!(decode_image(&png, 9).unwrap().data, vec![7u8; 27]);
    }

    #[test]
    fn zero_sized_image_is_refused() {
        let mut png = encode_png(2, 2, &[7u8; 12], ExtendedColorType::Rgb8);
        patch_png_size(&mut png, 0, 2);
        let err = decode_image(&png, 1000).unwrap_err();
        // The PNG decoder itself rejects a zero width as a malformed header.
        assert!(
            matches!(
                err,
                PreprocessError::ZeroSized { .. } | PreprocessError::Corrupt { .. }
            ),
            "{err}"
        );
        // A GIF with a 0x0 logical screen and frame gets through the decoder:
        // our own check catches it.
        let gif =
            b"GIF89a\0\0\0\0\x80\0\0\0\0\0\xff\xff\xff\x2c\0\0\0\0\0\0\0\0\0\x02\x02\x44\x01\0\x3b";
        let err = decode_image(gif, 1000).unwrap_err();
        assert!(matches!(err, PreprocessError::ZeroSized { .. }), "{err}");
    }

    #[test]
    fn grey_and_alpha_convert_like_pil() {
        let grey = encode_png(2, 1, &[0, 200], ExtendedColorType::L8);
        assert_eq!(
            decode_image(&grey, 10).unwrap().data,
            [0, 0, 0, 200, 200, 200]
        );
        let rgba = encode_png(
            2,
            1,
            &[1, 2, 3, 0, 77, 128, 200, 64],
            ExtendedColorType::Rgba8,
        );
        assert_eq!(
            decode_image(&rgba, 10).unwrap().data,
            [1, 2, 3, 77, 128, 200]
        );
        let white = decode_image_with(&rgba, 10, AlphaMode::CompositeOnWhite).unwrap();
        assert_eq!(white.data, [255, 255, 255, 210, 223, 241]);
        // PIL's alpha_composite over white: (channel, alpha) -> result.
        for (c, a, expected) in [
            (0, 1, 254),
            (0, 64, 191),
            (0, 128, 127),
            (0, 254, 1),
            (1, 128, 128),
            (1, 254, 2),
            (77, 64, 210),
            (77, 128, 166),
            (77, 254, 78),
            (128, 1, 255),
            (128, 64, 223),
            (128, 128, 191),
            (200, 128, 227),
            (255, 0, 255),
            (255, 255, 255),
            (0, 255, 0),
        ] {
            assert_eq!(over_white(c, a), expected, "c={c} a={a}");
        }
    }

    #[test]
    fn sixteen_bit_pngs_convert_like_pil() {
        let vals: [u16; 6] = [0, 255, 256, 0x7f80, 0x80ff, 0xffff];
        // PngEncoder takes 16-bit samples in native byte order.
        let ne = |v: &[u16]| -> Vec<u8> { v.iter().flat_map(|x| x.to_ne_bytes()).collect() };
        // Grey: PIL's I;16 -> RGB saturates at 255.
        let png = encode_png(6, 1, &ne(&vals), ExtendedColorType::L16);
        let out = decode_image(&png, 100).unwrap();
        let r: Vec<u8> = out.data.chunks(3).map(|p| p[0]).collect();
        assert_eq!(r, [0, 255, 255, 255, 255, 255]);
        // RGB: PIL keeps the high byte.
        let rgb: Vec<u16> = vals.iter().flat_map(|&v| [v, v, v]).collect();
        let png = encode_png(6, 1, &ne(&rgb), ExtendedColorType::Rgb16);
        let out = decode_image(&png, 100).unwrap();
        let r: Vec<u8> = out.data.chunks(3).map(|p| p[0]).collect();
        assert_eq!(r, [0, 0, 1, 127, 128, 255]);
    }

    #[test]
    fn exif_orientation_is_applied() {
        // 3x2 image, pixel value = 10 * index; EXIF orientation 6 (rotate 90 CW).
        let data: Vec<u8> = (0..6u8).flat_map(|i| [i * 10; 3]).collect();
        let png = encode_png(3, 2, &data, ExtendedColorType::Rgb8);
        let mut exif = b"MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        exif.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]);
        let png = insert_chunk(&png, b"eXIf", &exif);
        let out = decode_image(&png, 100).unwrap();
        assert_eq!((out.width, out.height), (2, 3));
        // Rows of the rotated image: [30, 0], [40, 10], [50, 20].
        let r: Vec<u8> = out.data.chunks(3).map(|p| p[0]).collect();
        assert_eq!(r, [30, 0, 40, 10, 50, 20]);
    }

    #[test]
    fn gif_uses_the_first_frame() {
        let mut gif = Vec::new();
        {
            let mut enc = GifEncoder::new(&mut gif);
            let frames = [[255u8, 0, 0, 255], [0, 0, 255, 255]]
                .map(|px| Frame::new(RgbaImage::from_pixel(4, 3, image::Rgba(px))));
            enc.encode_frames(frames).unwrap();
        }
        let out = decode_image(&gif, 100).unwrap();
        assert_eq!((out.width, out.height), (4, 3));
        assert!(out.data.chunks(3).all(|p| p == [255, 0, 0]));
    }

    #[test]
    fn format_is_guessed_from_content_not_extension() {
        let img = pattern(5, 4);
        let path = temp_path("actually-a-png.jpg");
        std::fs::write(&path, encode_png(5, 4, &img.data, ExtendedColorType::Rgb8)).unwrap();
        let out = load_image(&path, 100);
        std::fs::remove_file(&path).ok();
        assert_eq!(out.unwrap(), img);
    }
}
