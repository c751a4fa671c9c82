//! Image files to RGB8 pixels, as Hugging Face's PaliGemma pipeline loads them with the PIL
//! backend (`transformers.image_utils.load_image`): format guessed from the content, EXIF
//! orientation applied, converted to RGB like PIL's `Image.convert("RGB")`.
//!
//! Decoding uses the `image` crate (JPEG, PNG, WebP, BMP, GIF). Lossless formats (and, in our
//! tests, lossy WebP) decode to exactly PIL's pixels; JPEG differs from libjpeg-turbo by up to
//! ~4 levels on some pixels (IDCT and chroma upsampling), which a pure-Rust decoder cannot
//! avoid.

use super::rgb::RgbImage;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageError as DecodeError, ImageReader, Limits};
use std::io::{BufRead, Cursor, Seek};
use std::path::{Path, PathBuf};

/// Largest image accepted, in pixels (Pillow's decompression-bomb error threshold): bigger
/// files are refused before their pixels are decoded.
pub const MAX_IMAGE_PIXELS: u64 = 178_956_970;

/// Name used in errors for images decoded from memory (no file path).
const MEMORY_SOURCE: &str = "<in-memory image>";

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
pub enum ImageError {
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
    /// A video file, and no `ffmpeg` / `ffprobe` on the PATH to decode it.
    #[error(
        "{} is a video: decoding it needs the ffmpeg command, not found on the PATH; install \
         ffmpeg, or pass an animated GIF/APNG or the frames as images",
        path.display()
    )]
    NeedsFfmpeg {
        /// The video.
        path: PathBuf,
    },
    /// ffmpeg could not read or decode a video file.
    #[error("{}: {detail}", path.display())]
    Video {
        /// The video.
        path: PathBuf,
        /// What ffmpeg said.
        detail: String,
    },
    /// A clip without a single frame.
    #[error("{} has no frames", path.display())]
    NoFrames {
        /// The clip.
        path: PathBuf,
    },
    /// A frame selection that cannot be met (`--frames 0`, `--fps` on frames without times).
    #[error("{0}")]
    BadSelection(String),
    /// `resample` is not one of PIL's codes 0..=5.
    #[error("invalid resample filter code {code} (PIL codes are 0..=5)")]
    InvalidResample {
        /// The code found.
        code: u32,
    },
}

/// Reads and decodes an image file; see [`load_image_with`].
pub fn load_image(path: &Path, max_pixels: u64) -> Result<RgbImage, ImageError> {
    load_image_with(path, max_pixels, AlphaMode::Drop)
}

/// Reads and decodes an image file: format guessed from content (not the
/// extension), EXIF orientation applied, converted to RGB8 like PIL.
pub fn load_image_with(
    path: &Path,
    max_pixels: u64,
    alpha: AlphaMode,
) -> Result<RgbImage, ImageError> {
    let io_err = |source| ImageError::Io {
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
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    decode_image_with(bytes, max_pixels, AlphaMode::Drop)
}

/// Decodes an image held in memory with a chosen [`AlphaMode`].
pub fn decode_image_with(
    bytes: &[u8],
    max_pixels: u64,
    alpha: AlphaMode,
) -> Result<RgbImage, ImageError> {
    decode_bytes(bytes, max_pixels, alpha, Path::new(MEMORY_SOURCE))
}

/// Shared decode path: sanity checks on the bytes, then [`decode_from`].
fn decode_bytes(
    bytes: &[u8],
    max_pixels: u64,
    alpha: AlphaMode,
    path: &Path,
) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty {
            path: path.to_path_buf(),
        });
    }
    // The JPEG decoder conceals a cut-off file by padding it; PIL refuses it
    // ("image file is truncated"), so do the same.
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) && jpeg_is_truncated(bytes) {
        return Err(ImageError::Corrupt {
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
) -> Result<RgbImage, ImageError> {
    let mut reader = ImageReader::new(reader)
        .with_guessed_format()
        .map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if reader.format().is_none() {
        return Err(ImageError::UnsupportedFormat {
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
        return Err(ImageError::ZeroSized {
            path: path.to_path_buf(),
            width,
            height,
        });
    }
    if width as u64 * height as u64 > max_pixels {
        return Err(ImageError::TooLarge {
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

fn map_image_error(err: DecodeError, path: &Path) -> ImageError {
    let path = path.to_path_buf();
    match err {
        DecodeError::Unsupported(e) => ImageError::UnsupportedFormat {
            path,
            detail: e.to_string(),
        },
        DecodeError::Limits(e) => ImageError::DecoderLimit {
            path,
            detail: e.to_string(),
        },
        DecodeError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageError::Corrupt {
                path,
                detail: format!("unexpected end of data ({e})"),
            }
        }
        DecodeError::IoError(source) => ImageError::Io { path, source },
        other => ImageError::Corrupt {
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
pub(super) fn to_rgb8_like_pil(img: DynamicImage, alpha: AlphaMode) -> RgbImage {
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
pub(super) fn over_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    let (c, a) = (c as u32, a as u32);
    let tmp = (c * a + 255 * (255 - a)) * 128 + (0x80 << 7);
    ((((tmp >> 8) + tmp) >> 8) >> 7) as u8
}
