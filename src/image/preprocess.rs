//! The vision tower's input: resize to the model's square with Pillow's filter (aspect ratio
//! ignored, as SigLIP does), rescale by `1/255`, normalise with the per-channel mean/std and
//! lay out as CHW `f32` — Hugging Face's `SiglipImageProcessorPil` (transformers 5,
//! `SiglipImageProcessor` in 4.x) to the last bit.

use super::pillow::{resize_rgb8_compat, PillowCompat, ResampleFilter};
use super::rgb::RgbImage;

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
        }
    }
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
/// If `cfg.image_size` is zero or `img` is inconsistent (see [`super::pillow::resize_rgb8`]).
pub fn preprocess(img: &RgbImage, cfg: &PreprocessConfig) -> Vec<f32> {
    preprocess_compat(img, cfg, PillowCompat::default())
}

/// [`preprocess`] with the resize of a chosen Pillow release.
///
/// # Panics
/// As [`preprocess`].
#[doc(hidden)]
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
