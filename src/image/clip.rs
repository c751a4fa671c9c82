//! Clips: K frames of a video file or an animated image, for one prompt about all of them
//! (PaliGemma 2's video transfers: big_vision feeds a clip's frames through SigLIP one by
//! one and lays their tokens out in frame order).
//!
//! - Animated GIF, APNG and WebP are decoded by the `image` crate; a video file (mp4, webm,
//!   mkv, mov, …) by the `ffmpeg` command when it is on the PATH — a subprocess writing the
//!   chosen frames to a pipe (no linking, no network), as llama.cpp's mtmd does for video.
//! - [`FrameSelection::Count`] picks K of the clip's n frames: frame i is `floor(i · n / K)`;
//!   a clip with fewer than K frames repeats its frames in order (big_vision's
//!   `video_replicate_img`: tiled, then cut to K) and says so in a warning.
//!   [`FrameSelection::PerSecond`] samples F frames per second of the clip's time.
//! - Planning ([`ClipPlan::open`]) reads how many frames the clip has (and their times)
//!   without keeping any: a 10000-frame GIF asked for 16 frames never holds more than one
//!   decoded frame besides the 16. The caller can check that K frames fit the context
//!   before [`ClipPlan::decode`] decodes them.

use super::decode::{to_rgb8_like_pil, AlphaMode, ImageError};
use super::rgb::{ImageSize, RgbImage};
use super::video::{self, Ffmpeg};
use image::{AnimationDecoder, DynamicImage, Frame};
use std::io::{BufRead, BufReader, Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which frames of a clip go into the prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FrameSelection {
    /// K frames spread over the clip: frame i (i = 0 … K−1) is `floor(i · n / K)` of its n.
    Count(usize),
    /// F frames per second of the clip's time (video files, and animated images whose frames
    /// have delays): the frame shown at 0, 1/F, 2/F, … seconds.
    PerSecond(f64),
}

/// A clip's frames chosen for a prompt, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Clip {
    /// The frames, as decoded RGB images (all of the clip's size).
    pub frames: Vec<RgbImage>,
    /// Each frame's index in the clip (repeated for a clip shorter than asked).
    pub indices: Vec<usize>,
    /// Frames in the whole clip.
    pub n_source: usize,
    /// A short clip's repeated frames, …: one line each.
    pub warnings: Vec<String>,
}

/// Where a clip's bytes are.
#[derive(Debug, Clone)]
enum Source {
    File(PathBuf),
    Bytes(Vec<u8>),
}

/// A video upload written to a temporary file for ffmpeg, removed when the plan goes.
#[derive(Debug)]
struct TempFile(PathBuf);

impl TempFile {
    fn write(bytes: &[u8], name: &Path) -> Result<Self, ImageError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "pali-clip-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, bytes).map_err(|source| ImageError::Io {
            path: name.to_path_buf(),
            source,
        })?;
        Ok(TempFile(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How a clip is decoded.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// GIF, APNG or WebP through the `image` crate.
    Animated(image::ImageFormat),
    /// Anything else: a video for ffmpeg.
    Video,
}

/// A clip opened and measured, its frames chosen but not decoded yet.
#[derive(Debug, Clone)]
pub struct ClipPlan {
    source: Source,
    name: PathBuf,
    kind: Kind,
    /// A video's file for ffmpeg, and ffmpeg itself.
    video: Option<(Ffmpeg, VideoFile)>,
    /// The frames to decode, in prompt order.
    pub indices: Vec<usize>,
    /// Frames in the whole clip.
    pub n_source: usize,
    /// A frame's size (as stored: a rotated video's may be turned when decoded).
    pub frame_size: ImageSize,
    /// Lines to report with the answer.
    pub warnings: Vec<String>,
}

impl ClipPlan {
    /// Pixels the chosen frames will take once decoded (a request's budget).
    pub fn pixels(&self) -> u64 {
        self.indices.len() as u64
            * u64::from(self.frame_size.width)
            * u64::from(self.frame_size.height)
    }
}

/// Whether `ffmpeg` and `ffprobe` are on the PATH (video files need them; animated images
/// do not).
pub fn has_ffmpeg() -> bool {
    Ffmpeg::find().is_some()
}

/// `n` frames chosen as [`FrameSelection::Count`] `k` does: `floor(i · n / k)`, or for
/// `n < k` the frames tiled in order and cut to `k` (0, 1, …, n−1, 0, 1, …).
pub fn frame_indices(n: usize, k: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    if n < k {
        return (0..k).map(|i| i % n).collect();
    }
    (0..k).map(|i| i * n / k).collect()
}

/// The frames shown at 0, 1/`fps`, 2/`fps`, … seconds, for frames starting at `starts`
/// (seconds, ascending, the first 0) over a clip of `duration` seconds. Starts and duration
/// are sums of frame delays, so times are compared with a microsecond of slack (0.1 + 0.1 +
/// 0.1 must not land after 0.3).
pub fn frames_per_second(starts: &[f64], duration: f64, fps: f64) -> Vec<usize> {
    let mut out = Vec::new();
    let mut frame = 0;
    for j in 0.. {
        let t = j as f64 / fps;
        if t >= duration - 1e-6 || out.len() > 100_000 {
            break;
        }
        while frame + 1 < starts.len() && starts[frame + 1] <= t + 1e-6 {
            frame += 1;
        }
        out.push(frame);
    }
    out
}

impl ClipPlan {
    /// Opens a clip file and chooses its frames (see the module documentation); videos need
    /// `ffmpeg`. Errors name the file: no ffmpeg for a video, no frames, a corrupt file, a
    /// frame over `max_pixels`.
    pub fn open(
        path: &Path,
        selection: FrameSelection,
        max_pixels: u64,
    ) -> Result<Self, ImageError> {
        let io = |source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut head = Vec::with_capacity(64);
        std::fs::File::open(path)
            .map_err(io)?
            .take(64)
            .read_to_end(&mut head)
            .map_err(io)?;
        Self::plan(
            Source::File(path.to_path_buf()),
            path,
            &head,
            selection,
            max_pixels,
        )
    }

    /// [`ClipPlan::open`] on a clip's bytes (an upload); `name` names it in errors. A video
    /// is handed to ffmpeg through a temporary file (its container may need seeking).
    pub fn from_bytes(
        bytes: Vec<u8>,
        name: &str,
        selection: FrameSelection,
        max_pixels: u64,
    ) -> Result<Self, ImageError> {
        let head = bytes[..bytes.len().min(64)].to_vec();
        Self::plan(
            Source::Bytes(bytes),
            Path::new(name),
            &head,
            selection,
            max_pixels,
        )
    }

    fn plan(
        source: Source,
        name: &Path,
        head: &[u8],
        selection: FrameSelection,
        max_pixels: u64,
    ) -> Result<Self, ImageError> {
        match selection {
            FrameSelection::Count(0) => {
                return Err(ImageError::BadSelection(
                    "--frames must be at least 1".into(),
                ))
            }
            FrameSelection::PerSecond(f) if !(f.is_finite() && f > 0.0) => {
                return Err(ImageError::BadSelection(format!(
                    "--fps {f}: give frames per second, more than 0"
                )))
            }
            _ => {}
        }
        if head.is_empty() {
            return Err(ImageError::Empty {
                path: name.to_path_buf(),
            });
        }
        let kind = match image::guess_format(head) {
            Ok(
                f @ (image::ImageFormat::Gif | image::ImageFormat::Png | image::ImageFormat::WebP),
            ) => Kind::Animated(f),
            Ok(other) => {
                return Err(ImageError::UnsupportedFormat {
                    path: name.to_path_buf(),
                    detail: format!("a still {other:?} image is not a clip; pass it as an image"),
                })
            }
            Err(_) => Kind::Video,
        };
        let mut plan = ClipPlan {
            source,
            name: name.to_path_buf(),
            kind,
            video: None,
            indices: Vec::new(),
            n_source: 0,
            frame_size: ImageSize {
                width: 0,
                height: 0,
            },
            warnings: Vec::new(),
        };
        // How many frames, and when each starts (seconds), without keeping any.
        let (starts, duration) = match kind {
            Kind::Animated(_) => {
                let mut starts = Vec::new();
                let mut t = 0.0;
                let mut size = (0, 0);
                plan.frames(max_pixels, &mut |_, frame| {
                    size = frame.buffer().dimensions();
                    starts.push(t);
                    let (num, den) = frame.delay().numer_denom_ms();
                    t += f64::from(num) / f64::from(den.max(1)) / 1000.0;
                    Ok(true)
                })?;
                plan.frame_size = ImageSize {
                    width: size.0,
                    height: size.1,
                };
                (starts, t)
            }
            Kind::Video => {
                let ff = Ffmpeg::find().ok_or_else(|| ImageError::NeedsFfmpeg {
                    path: name.to_path_buf(),
                })?;
                let file = match &plan.source {
                    Source::File(p) => VideoFile::Path(p.clone()),
                    Source::Bytes(b) => VideoFile::Temp(Arc::new(TempFile::write(b, name)?)),
                };
                let probe = video::probe(&ff, file.path(), name)?;
                plan.video = Some((ff, file));
                plan.frame_size = ImageSize {
                    width: probe.size.0,
                    height: probe.size.1,
                };
                (probe.starts, probe.duration)
            }
        };
        let n = starts.len();
        if n == 0 {
            return Err(ImageError::NoFrames {
                path: name.to_path_buf(),
            });
        }
        plan.n_source = n;
        plan.indices = match selection {
            FrameSelection::Count(k) => frame_indices(n, k),
            FrameSelection::PerSecond(fps) if duration > 0.0 => {
                frames_per_second(&starts, duration, fps)
            }
            FrameSelection::PerSecond(_) => {
                return Err(ImageError::BadSelection(format!(
                    "{}: its frames have no timing; use --frames instead of --fps",
                    name.display()
                )))
            }
        };
        if let FrameSelection::Count(k) = selection {
            if n < k {
                plan.warnings.push(format!(
                    "{} has {n} frame{}, fewer than the {k} asked for: its frames repeat in order",
                    name.display(),
                    if n == 1 { "" } else { "s" }
                ));
            }
        }
        Ok(plan)
    }

    /// Decodes the chosen frames.
    pub fn decode(self, max_pixels: u64) -> Result<Clip, ImageError> {
        let mut wanted: Vec<usize> = self.indices.clone();
        wanted.sort_unstable();
        wanted.dedup();
        let mut decoded: Vec<(usize, RgbImage)> = Vec::with_capacity(wanted.len());
        match self.kind {
            Kind::Animated(_) => {
                let last = *wanted.last().expect("a plan has frames");
                self.frames(max_pixels, &mut |i, frame| {
                    if wanted.binary_search(&i).is_ok() {
                        let rgba = DynamicImage::ImageRgba8(frame.into_buffer());
                        decoded.push((i, to_rgb8_like_pil(rgba, AlphaMode::Drop)));
                    }
                    Ok(i < last)
                })?;
            }
            Kind::Video => {
                let (ff, file) = self.video.as_ref().expect("a video plan has ffmpeg");
                decoded = video::frames(ff, file.path(), &self.name, &wanted, max_pixels)?;
            }
        }
        let frames = self
            .indices
            .iter()
            .map(|i| {
                decoded
                    .iter()
                    .find(|(j, _)| j == i)
                    .map(|(_, f)| f.clone())
                    .ok_or_else(|| ImageError::Corrupt {
                        path: self.name.clone(),
                        detail: format!("frame {i} could not be decoded (the clip ends early)"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Clip {
            frames,
            indices: self.indices,
            n_source: self.n_source,
            warnings: self.warnings,
        })
    }

    /// Decodes an animated image's frames in order, handing each to `each(index, frame)`
    /// until it returns false; only the frame at hand is held.
    fn frames(
        &self,
        max_pixels: u64,
        each: &mut dyn FnMut(usize, Frame) -> Result<bool, ImageError>,
    ) -> Result<(), ImageError> {
        let bytes: Box<dyn BufReadSeek> = match &self.source {
            Source::File(p) => Box::new(BufReader::new(std::fs::File::open(p).map_err(
                |source| ImageError::Io {
                    path: p.clone(),
                    source,
                },
            )?)),
            Source::Bytes(b) => Box::new(Cursor::new(b.as_slice())),
        };
        let name = &self.name;
        let bad = |e: image::ImageError| ImageError::Corrupt {
            path: name.clone(),
            detail: e.to_string(),
        };
        let frames: image::Frames<'_> = match self.kind {
            Kind::Animated(image::ImageFormat::Gif) => image::codecs::gif::GifDecoder::new(bytes)
                .map_err(bad)?
                .into_frames(),
            Kind::Animated(image::ImageFormat::WebP) => {
                image::codecs::webp::WebPDecoder::new(bytes)
                    .map_err(bad)?
                    .into_frames()
            }
            _ => {
                let png = image::codecs::png::PngDecoder::new(bytes).map_err(bad)?;
                if !png.is_apng().map_err(bad)? {
                    // A still PNG is a one-frame clip.
                    let mut img = DynamicImage::from_decoder(png).map_err(bad)?;
                    check_size(name, img.width(), img.height(), max_pixels)?;
                    let rgba = std::mem::take(&mut img).into_rgba8();
                    each(0, Frame::new(rgba))?;
                    return Ok(());
                }
                png.apng().map_err(bad)?.into_frames()
            }
        };
        for (i, frame) in frames.enumerate() {
            let frame = frame.map_err(|e| ImageError::Corrupt {
                path: name.clone(),
                detail: format!("frame {i}: {e}"),
            })?;
            let (w, h) = frame.buffer().dimensions();
            check_size(name, w, h, max_pixels)?;
            if !each(i, frame)? {
                break;
            }
        }
        Ok(())
    }
}

/// A video's file: the caller's, or an upload written to a temporary file.
#[derive(Debug, Clone)]
enum VideoFile {
    Path(PathBuf),
    Temp(Arc<TempFile>),
}

impl VideoFile {
    fn path(&self) -> &Path {
        match self {
            VideoFile::Path(p) => p,
            VideoFile::Temp(t) => &t.0,
        }
    }
}

trait BufReadSeek: BufRead + std::io::Seek {}
impl<T: BufRead + std::io::Seek> BufReadSeek for T {}

/// Refuses a frame over the pixel limit (or of zero size), naming the clip.
fn check_size(name: &Path, width: u32, height: u32, max_pixels: u64) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSized {
            path: name.to_path_buf(),
            width,
            height,
        });
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageError::TooLarge {
            path: name.to_path_buf(),
            width,
            height,
            max_pixels,
        });
    }
    Ok(())
}
