//! Pillow's resampling, bit-exact: `Image.resize` on RGB8 images (the vision tower's input,
//! [`resize_rgb8`]) and on 32-bit float images (the mask decoder's 64×64 maps,
//! [`resize_bilinear_f32`]), from one port of Pillow's `Resample.c` coefficient code.

use super::decode::ImageError;
use super::rgb::RgbImage;

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
    pub fn from_pil_code(code: u32) -> Result<Self, ImageError> {
        Ok(match code {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => return Err(ImageError::InvalidResample { code }),
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

/// Normalised `f64` weights of a 1-D resampling pass: per output pixel, the first input
/// index and one weight per tap. Pillow's `precompute_coeffs` for the full-image box
/// `(0, in_size)`, support widened by the scale when shrinking (antialiasing); the
/// float/double mix mirrors the C types exactly. Shared by the 8-bit and the float resize.
fn float_coeffs(
    in_size: u32,
    out_size: u32,
    kernel: Kernel,
    support: f64,
) -> Vec<(usize, Vec<f64>)> {
    // Pillow's box is `float[4]`: (double)(in1 - in0) / outSize.
    let in0 = 0.0f32;
    let in1 = in_size as f32;
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let inv_filterscale = 1.0 / filterscale;
    (0..out_size as usize)
        .map(|xx| {
            let center = in0 as f64 + (xx as f64 + 0.5) * scale;
            // C `(int)` truncates toward zero, as `as i32` does.
            let xmin = ((center - support + 0.5) as i32).max(0);
            let xmax = ((center + support + 0.5) as i32).min(in_size as i32);
            let mut k: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| kernel((x as f64 - center + 0.5) * inv_filterscale))
                .collect();
            let ww: f64 = k.iter().fold(0.0, |a, &w| a + w);
            if ww != 0.0 {
                k.iter_mut().for_each(|w| *w /= ww);
            }
            (xmin as usize, k)
        })
        .collect()
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

/// [`float_coeffs`] + Pillow's `normalize_coeffs_8bpc`: the weights in fixed point.
fn precompute_coeffs(in_size: u32, out_size: u32, kernel: Kernel, support: f64) -> Coeffs {
    let taps = float_coeffs(in_size, out_size, kernel, support);
    let ksize = taps.iter().map(|(_, k)| k.len()).max().unwrap_or(0);
    let mut bounds = Vec::with_capacity(taps.len());
    let mut weights = vec![0i32; taps.len() * ksize];
    for (xx, (xmin, k)) in taps.iter().enumerate() {
        for (dst, &w) in weights[xx * ksize..].iter_mut().zip(k) {
            let scaled = w * (1u32 << PRECISION_BITS) as f64;
            *dst = if w < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((*xmin, k.len()));
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
#[doc(hidden)]
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
#[doc(hidden)]
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
        return RgbImage {
            width,
            height,
            data: resize_nearest(img, width, height),
        };
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
    RgbImage {
        width,
        height,
        data,
    }
}

/// One 1-D pass of Pillow's 32-bit float resampling along rows (`horizontal`) or columns:
/// `f64` sums of `f32` pixels times `f64` weights, stored as `f32`.
fn resample_pass(src: &[f32], w: usize, h: usize, out: u32, horizontal: bool) -> Vec<f32> {
    let (in_len, lines) = if horizontal { (w, h) } else { (h, w) };
    let coeffs = float_coeffs(in_len as u32, out, bilinear_kernel, 1.0);
    let out = out as usize;
    let (ow, oh) = if horizontal { (out, h) } else { (w, out) };
    let mut dst = vec![0f32; ow * oh];
    for line in 0..lines {
        for (o, (xmin, k)) in coeffs.iter().enumerate() {
            let mut ss = 0.0f64;
            for (t, &kw) in k.iter().enumerate() {
                let i = xmin + t;
                let v = if horizontal {
                    src[line * w + i]
                } else {
                    src[i * w + line]
                };
                ss += f64::from(v) * kw;
            }
            let at = if horizontal {
                line * ow + o
            } else {
                o * ow + line
            };
            dst[at] = ss as f32;
        }
    }
    dst
}

/// Resizes a float image like PIL's `Image.fromarray(a)` (mode `"F"`)
/// `.resize((out_w, out_h), Image.BILINEAR)`: Pillow's two separable passes in `f64` with an
/// `f32` intermediate, each skipped when its side is unchanged, the vertical pass first when
/// the height shrinks by more than twice as many pixels as the width (Pillow ≥ 13), so the
/// result is bit-identical. `src` is row-major `in_w × in_h`; so is the result.
///
/// # Panics
/// If a size is zero or `src` does not hold `in_w · in_h` values.
pub fn resize_bilinear_f32(src: &[f32], in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> Vec<f32> {
    assert!(
        in_w > 0 && in_h > 0 && out_w > 0 && out_h > 0,
        "empty resize"
    );
    assert_eq!(src.len(), in_w as usize * in_h as usize, "source size");
    let (w, h) = (in_w as usize, in_h as usize);
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    match (need_h, need_v) {
        (false, false) => src.to_vec(),
        (true, false) => resample_pass(src, w, h, out_w, true),
        (false, true) => resample_pass(src, w, h, out_h, false),
        (true, true) => {
            if PillowCompat::V13.vertical_first(in_w, in_h, out_w, out_h) {
                let t = resample_pass(src, w, h, out_h, false);
                resample_pass(&t, w, out_h as usize, out_w, true)
            } else {
                let t = resample_pass(src, w, h, out_w, true);
                resample_pass(&t, out_w as usize, h, out_h, false)
            }
        }
    }
}
