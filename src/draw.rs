//! Pictures of the results: boxes with label tags (and segmentation masks, shaded in the
//! label's colour) drawn onto the original image, and binary masks, written as PNG atomically.

use crate::image::RgbImage;
use crate::mask::Mask;
use crate::tasks::DetectionBox;
use crate::{Error, Result};
use pali_ggml::atomic_file::AtomicFile;
use std::path::Path;

/// Box colours, assigned to labels in order of first appearance (then reused cyclically):
/// saturated, mutually distinct, readable with white or black text.
pub(crate) const PALETTE: [[u8; 3]; 12] = [
    [230, 25, 75],  // red
    [60, 180, 75],  // green
    [0, 130, 200],  // blue
    [255, 225, 25], // yellow
    [245, 130, 48], // orange
    [145, 30, 180], // purple
    [70, 240, 240], // cyan
    [240, 50, 230], // magenta
    [210, 245, 60], // lime
    [0, 128, 128],  // teal
    [170, 110, 40], // brown
    [128, 0, 0],    // maroon
];

/// The colour of each object: one per distinct label, in order of first appearance.
pub fn label_colors(objects: &[DetectionBox]) -> Vec<[u8; 3]> {
    let mut seen: Vec<&str> = Vec::new();
    objects
        .iter()
        .map(|o| {
            let i = seen.iter().position(|l| *l == o.label).unwrap_or_else(|| {
                seen.push(&o.label);
                seen.len() - 1
            });
            PALETTE[i % PALETTE.len()]
        })
        .collect()
}

/// Line width used for an image: 2 px, 3 px when its shorter side is ≥ 600 px.
pub fn line_width(image: &RgbImage) -> u32 {
    if image.width.min(image.height) >= 600 {
        3
    } else {
        2
    }
}

/// A copy of `image` with each object's box outlined in its [`label_colors`] colour and a
/// filled tag carrying its label (5×7 bitmap font, ASCII; other characters drawn as a small
/// box), above the box's top-left corner (inside the box when there is no room above).
///
/// The outline lies inside the box: for a box with pixel edges x1..x2, y1..y2 (rounded), the
/// outline covers columns `x1 ..= x1 + w - 1` and `x2 - w ..= x2 - 1` (w = [`line_width`]),
/// and the same for rows; boxes are clipped to the image.
pub fn draw_detections(image: &RgbImage, objects: &[DetectionBox]) -> RgbImage {
    draw_segments(image, objects, &[])
}

/// Like [`draw_detections`], with each object's mask first shaded half-transparently in its
/// label colour: every pixel inside becomes `(pixel + colour) / 2` per channel, rounded up
/// (`masks[i]` belongs to `objects[i]`; `None` or a missing entry draws no mask; where masks
/// overlap, the later one is blended over the earlier). Then the boxes and tags on top.
/// Masks of another size than the image are ignored.
pub fn draw_segments(
    image: &RgbImage,
    objects: &[DetectionBox],
    masks: &[Option<&Mask>],
) -> RgbImage {
    let mut out = image.clone();
    let colors = label_colors(objects);
    for (m, &c) in masks.iter().zip(&colors) {
        let Some(m) = m else { continue };
        if (m.width, m.height) != (image.width, image.height) {
            continue;
        }
        for (px, _) in out
            .data
            .chunks_exact_mut(3)
            .zip(&m.data)
            .filter(|(_, &inside)| inside)
        {
            for (v, &cv) in px.iter_mut().zip(&c) {
                *v = (u16::from(*v) + u16::from(cv)).div_ceil(2) as u8;
            }
        }
    }
    let lw = line_width(image);
    for (o, &c) in objects.iter().zip(&colors) {
        draw_box(&mut out, o.rect(), c, lw);
    }
    // Tags after all boxes so no box line crosses a label.
    let scale = if image.width.min(image.height) >= 600 {
        2
    } else {
        1
    };
    for (o, &c) in objects.iter().zip(&colors) {
        if !o.label.is_empty() {
            draw_tag(&mut out, o.rect(), &o.label, c, scale);
        }
    }
    out
}

/// Pixel bounds `[x0, y0, x1, y1)` of a rect in pixels, rounded and clipped to the image.
fn pixel_bounds(img: &RgbImage, rect: [f32; 4]) -> [i64; 4] {
    let r = |v: f32, max: u32| (v.round() as i64).clamp(0, i64::from(max));
    [
        r(rect[0], img.width),
        r(rect[1], img.height),
        r(rect[2], img.width),
        r(rect[3], img.height),
    ]
}

/// Outlines `rect` (`[x1, y1, x2, y2]` in pixels) with a `width`-pixel line inside it.
pub(crate) fn draw_box(img: &mut RgbImage, rect: [f32; 4], color: [u8; 3], width: u32) {
    let [x0, y0, x1, y1] = pixel_bounds(img, rect);
    if x1 <= x0 || y1 <= y0 {
        return;
    }
    let w = i64::from(width.max(1));
    fill(img, x0, y0, x1, (y0 + w).min(y1), color);
    fill(img, x0, (y1 - w).max(y0), x1, y1, color);
    fill(img, x0, y0, (x0 + w).min(x1), y1, color);
    fill(img, (x1 - w).max(x0), y0, x1, y1, color);
}

/// Fills `[x0, x1) × [y0, y1)`, clipped to the image.
fn fill(img: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, color: [u8; 3]) {
    let (w, h) = (i64::from(img.width), i64::from(img.height));
    let (x0, x1, y0, y1) = (
        x0.clamp(0, w),
        x1.clamp(0, w),
        y0.clamp(0, h),
        y1.clamp(0, h),
    );
    for y in y0..y1 {
        let row = (y * w) as usize * 3;
        for x in x0..x1 {
            let i = row + x as usize * 3;
            img.data[i..i + 3].copy_from_slice(&color);
        }
    }
}

fn set(img: &mut RgbImage, x: i64, y: i64, color: [u8; 3]) {
    fill(img, x, y, x + 1, y + 1, color);
}

/// Glyph cell: 5×7 glyph plus 1 px spacing.
const GLYPH_W: i64 = 6;
const GLYPH_H: i64 = 7;
/// Tag padding around the text.
const PAD: i64 = 2;

/// A filled tag with `label` at the top-left of `rect`.
fn draw_tag(img: &mut RgbImage, rect: [f32; 4], label: &str, color: [u8; 3], scale: i64) {
    let [bx0, by0, _, _] = pixel_bounds(img, rect);
    let chars: Vec<char> = label.chars().take(40).collect();
    let tw = chars.len() as i64 * GLYPH_W * scale - scale + 2 * PAD;
    let th = GLYPH_H * scale + 2 * PAD;
    // Above the box if it fits, else just inside its top edge.
    let ty = if by0 >= th {
        by0 - th
    } else {
        by0.min(i64::from(img.height) - th).max(0)
    };
    let tx = bx0.min(i64::from(img.width) - tw).max(0);
    fill(img, tx, ty, tx + tw, ty + th, color);
    let luma = 299 * u32::from(color[0]) + 587 * u32::from(color[1]) + 114 * u32::from(color[2]);
    let ink = if luma > 150_000 {
        [0, 0, 0]
    } else {
        [255, 255, 255]
    };
    for (i, &ch) in chars.iter().enumerate() {
        let gx = tx + PAD + i as i64 * GLYPH_W * scale;
        let glyph = glyph(ch);
        for (col, bits) in glyph.iter().enumerate() {
            for row in 0..GLYPH_H {
                if bits >> row & 1 == 1 {
                    let (px, py) = (gx + col as i64 * scale, ty + PAD + row * scale);
                    for dy in 0..scale {
                        for dx in 0..scale {
                            set(img, px + dx, py + dy, ink);
                        }
                    }
                }
            }
        }
    }
}

/// Column-major 5×7 glyph (bit 0 = top row); non-ASCII and control characters are a box.
fn glyph(c: char) -> [u8; 5] {
    match c {
        ' '..='~' => FONT[c as usize - 0x20],
        _ => [0x7F, 0x41, 0x41, 0x41, 0x7F],
    }
}

/// The classic 5×7 ASCII font, 0x20 (space) ..= 0x7E (`~`), one byte per column.
const FONT: [[u8; 5]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00], // ' '
    [0x00, 0x00, 0x5F, 0x00, 0x00], // !
    [0x00, 0x07, 0x00, 0x07, 0x00], // "
    [0x14, 0x7F, 0x14, 0x7F, 0x14], // #
    [0x24, 0x2A, 0x7F, 0x2A, 0x12], // $
    [0x23, 0x13, 0x08, 0x64, 0x62], // %
    [0x36, 0x49, 0x55, 0x22, 0x50], // &
    [0x00, 0x05, 0x03, 0x00, 0x00], // '
    [0x00, 0x1C, 0x22, 0x41, 0x00], // (
    [0x00, 0x41, 0x22, 0x1C, 0x00], // )
    [0x08, 0x2A, 0x1C, 0x2A, 0x08], // *
    [0x08, 0x08, 0x3E, 0x08, 0x08], // +
    [0x00, 0x50, 0x30, 0x00, 0x00], // ,
    [0x08, 0x08, 0x08, 0x08, 0x08], // -
    [0x00, 0x60, 0x60, 0x00, 0x00], // .
    [0x20, 0x10, 0x08, 0x04, 0x02], // /
    [0x3E, 0x51, 0x49, 0x45, 0x3E], // 0
    [0x00, 0x42, 0x7F, 0x40, 0x00], // 1
    [0x42, 0x61, 0x51, 0x49, 0x46], // 2
    [0x21, 0x41, 0x45, 0x4B, 0x31], // 3
    [0x18, 0x14, 0x12, 0x7F, 0x10], // 4
    [0x27, 0x45, 0x45, 0x45, 0x39], // 5
    [0x3C, 0x4A, 0x49, 0x49, 0x30], // 6
    [0x01, 0x71, 0x09, 0x05, 0x03], // 7
    [0x36, 0x49, 0x49, 0x49, 0x36], // 8
    [0x06, 0x49, 0x49, 0x29, 0x1E], // 9
    [0x00, 0x36, 0x36, 0x00, 0x00], // :
    [0x00, 0x56, 0x36, 0x00, 0x00], // ;
    [0x08, 0x14, 0x22, 0x41, 0x00], // <
    [0x14, 0x14, 0x14, 0x14, 0x14], // =
    [0x00, 0x41, 0x22, 0x14, 0x08], // >
    [0x02, 0x01, 0x51, 0x09, 0x06], // ?
    [0x32, 0x49, 0x79, 0x41, 0x3E], // @
    [0x7E, 0x11, 0x11, 0x11, 0x7E], // A
    [0x7F, 0x49, 0x49, 0x49, 0x36], // B
    [0x3E, 0x41, 0x41, 0x41, 0x22], // C
    [0x7F, 0x41, 0x41, 0x22, 0x1C], // D
    [0x7F, 0x49, 0x49, 0x49, 0x41], // E
    [0x7F, 0x09, 0x09, 0x09, 0x01], // F
    [0x3E, 0x41, 0x49, 0x49, 0x7A], // G
    [0x7F, 0x08, 0x08, 0x08, 0x7F], // H
    [0x00, 0x41, 0x7F, 0x41, 0x00], // I
    [0x20, 0x40, 0x41, 0x3F, 0x01], // J
    [0x7F, 0x08, 0x14, 0x22, 0x41], // K
    [0x7F, 0x40, 0x40, 0x40, 0x40], // L
    [0x7F, 0x02, 0x0C, 0x02, 0x7F], // M
    [0x7F, 0x04, 0x08, 0x10, 0x7F], // N
    [0x3E, 0x41, 0x41, 0x41, 0x3E], // O
    [0x7F, 0x09, 0x09, 0x09, 0x06], // P
    [0x3E, 0x41, 0x51, 0x21, 0x5E], // Q
    [0x7F, 0x09, 0x19, 0x29, 0x46], // R
    [0x46, 0x49, 0x49, 0x49, 0x31], // S
    [0x01, 0x01, 0x7F, 0x01, 0x01], // T
    [0x3F, 0x40, 0x40, 0x40, 0x3F], // U
    [0x1F, 0x20, 0x40, 0x20, 0x1F], // V
    [0x3F, 0x40, 0x38, 0x40, 0x3F], // W
    [0x63, 0x14, 0x08, 0x14, 0x63], // X
    [0x07, 0x08, 0x70, 0x08, 0x07], // Y
    [0x61, 0x51, 0x49, 0x45, 0x43], // Z
    [0x00, 0x7F, 0x41, 0x41, 0x00], // [
    [0x02, 0x04, 0x08, 0x10, 0x20], // backslash
    [0x00, 0x41, 0x41, 0x7F, 0x00], // ]
    [0x04, 0x02, 0x01, 0x02, 0x04], // ^
    [0x40, 0x40, 0x40, 0x40, 0x40], // _
    [0x00, 0x01, 0x02, 0x04, 0x00], // `
    [0x20, 0x54, 0x54, 0x54, 0x78], // a
    [0x7F, 0x48, 0x44, 0x44, 0x38], // b
    [0x38, 0x44, 0x44, 0x44, 0x20], // c
    [0x38, 0x44, 0x44, 0x48, 0x7F], // d
    [0x38, 0x54, 0x54, 0x54, 0x18], // e
    [0x08, 0x7E, 0x09, 0x01, 0x02], // f
    [0x0C, 0x52, 0x52, 0x52, 0x3E], // g
    [0x7F, 0x08, 0x04, 0x04, 0x78], // h
    [0x00, 0x44, 0x7D, 0x40, 0x00], // i
    [0x20, 0x40, 0x44, 0x3D, 0x00], // j
    [0x7F, 0x10, 0x28, 0x44, 0x00], // k
    [0x00, 0x41, 0x7F, 0x40, 0x00], // l
    [0x7C, 0x04, 0x18, 0x04, 0x78], // m
    [0x7C, 0x08, 0x04, 0x04, 0x78], // n
    [0x38, 0x44, 0x44, 0x44, 0x38], // o
    [0x7C, 0x14, 0x14, 0x14, 0x08], // p
    [0x08, 0x14, 0x14, 0x18, 0x7C], // q
    [0x7C, 0x08, 0x04, 0x04, 0x08], // r
    [0x48, 0x54, 0x54, 0x54, 0x20], // s
    [0x04, 0x3F, 0x44, 0x40, 0x20], // t
    [0x3C, 0x40, 0x40, 0x20, 0x7C], // u
    [0x1C, 0x20, 0x40, 0x20, 0x1C], // v
    [0x3C, 0x40, 0x30, 0x40, 0x3C], // w
    [0x44, 0x28, 0x10, 0x28, 0x44], // x
    [0x0C, 0x50, 0x50, 0x50, 0x3C], // y
    [0x44, 0x64, 0x54, 0x4C, 0x44], // z
    [0x00, 0x08, 0x36, 0x41, 0x00], // {
    [0x00, 0x00, 0x7F, 0x00, 0x00], // |
    [0x00, 0x41, 0x36, 0x08, 0x00], // }
    [0x08, 0x04, 0x08, 0x10, 0x08], // ~
];

/// Writes `image` as PNG to `path` atomically: to `path.partial` first (fsynced), then renamed,
/// so an error never leaves a half-written file at `path` (an existing file is replaced).
/// Errors name the path.
pub fn save_png(image: &RgbImage, path: &Path) -> Result<()> {
    write_png(
        &image.data,
        image.width,
        image.height,
        image::ExtendedColorType::Rgb8,
        path,
    )
}

/// The union of `masks` (all of `width` × `height`) as a single-channel 8-bit image, 255
/// inside any mask and 0 elsewhere, row-major.
pub(crate) fn union_mask(masks: &[&Mask], width: u32, height: u32) -> Vec<u8> {
    let mut out = vec![0u8; width as usize * height as usize];
    for m in masks {
        if (m.width, m.height) != (width, height) {
            continue;
        }
        for (o, &inside) in out.iter_mut().zip(&m.data) {
            if inside {
                *o = 255;
            }
        }
    }
    out
}

/// Writes the union of `masks` as a single-channel (grayscale 8-bit) PNG of `width` ×
/// `height` to `path`, 255 inside any mask, 0 elsewhere; atomically, like [`save_png`].
pub fn save_mask_png(masks: &[&Mask], width: u32, height: u32, path: &Path) -> Result<()> {
    let data = union_mask(masks, width, height);
    write_png(&data, width, height, image::ExtendedColorType::L8, path)
}

/// PNG through [`AtomicFile::write_with`]: `path.partial` (fsynced), then renamed to `path`;
/// errors name `path`.
fn write_png(
    data: &[u8],
    width: u32,
    height: u32,
    color: image::ExtendedColorType,
    path: &Path,
) -> Result<()> {
    use image::ImageEncoder;
    AtomicFile::write_with(path, |w| {
        image::codecs::png::PngEncoder::new(w)
            .write_image(data, width, height, color)
            .map_err(std::io::Error::other)
    })
    .map_err(|e| Error::Io(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray(w: u32, h: u32) -> RgbImage {
        RgbImage::new(w, h, vec![100; (w * h * 3) as usize]).unwrap()
    }

    fn px(img: &RgbImage, x: u32, y: u32) -> [u8; 3] {
        let i = ((y * img.width + x) * 3) as usize;
        [img.data[i], img.data[i + 1], img.data[i + 2]]
    }

    #[test]
    fn font_renders_known_glyphs() {
        let render = |c| -> Vec<String> {
            (0..7)
                .map(|r| {
                    glyph(c)
                        .iter()
                        .map(|col| if col >> r & 1 == 1 { '#' } else { '.' })
                        .collect()
                })
                .collect()
        };
        assert_eq!(
            render('A'),
            [".###.", "#...#", "#...#", "#...#", "#####", "#...#", "#...#"]
        );
        assert_eq!(
            render('L'),
            ["#....", "#....", "#....", "#....", "#....", "#....", "#####"]
        );
        assert_eq!(render('é'), render('\u{1F68B}'));
        assert_eq!(FONT.len(), ('~' as usize) - (' ' as usize) + 1);
    }

    #[test]
    fn box_outline_is_inside_the_box_and_clipped() {
        let mut img = gray(50, 40);
        draw_box(&mut img, [10.0, 5.0, 30.0, 25.0], [255, 0, 0], 2);
        for (x, y) in [
            (10, 15),
            (11, 15),
            (29, 15),
            (28, 15),
            (20, 5),
            (20, 6),
            (20, 24),
            (20, 23),
        ] {
            assert_eq!(px(&img, x, y), [255, 0, 0], "({x},{y})");
        }
        for (x, y) in [
            (9, 15),
            (12, 15),
            (27, 15),
            (30, 15),
            (20, 4),
            (20, 7),
            (20, 22),
            (20, 25),
        ] {
            assert_eq!(px(&img, x, y), [100; 3], "({x},{y})");
        }
        // Out of the image: clipped, no panic.
        draw_box(&mut img, [-10.0, -10.0, 1e9, 1e9], [0, 255, 0], 3);
        assert_eq!(px(&img, 0, 0), [0, 255, 0]);
        assert_eq!(px(&img, 49, 39), [0, 255, 0]);
        draw_box(&mut img, [f32::NAN, 0.0, 5.0, 5.0], [0, 0, 255], 3);
    }

    #[test]
    fn masks_are_shaded_half_in_the_label_colour() {
        let img = gray(40, 30);
        let b = DetectionBox::from_loc([0, 0, 1023, 1023], "cat", 40, 30);
        let mut m = Mask::empty(40, 30);
        m.data[25 * 40 + 20] = true; // (20, 25): clear of the outline and the tag
        let out = draw_segments(&img, std::slice::from_ref(&b), &[Some(&m)]);
        let c = PALETTE[0];
        let want = c.map(|v| (100 + u16::from(v)).div_ceil(2) as u8);
        assert_eq!(px(&out, 20, 25), want);
        assert_eq!(px(&out, 19, 25), [100; 3]);
        assert_eq!(px(&out, 0, 15), c);
        // A mask of another size is ignored.
        let other = draw_segments(&img, &[b], &[Some(&Mask::empty(3, 3))]);
        assert_eq!(px(&other, 20, 25), [100; 3]);
        let u = union_mask(&[&m, &Mask::empty(40, 30)], 40, 30);
        assert_eq!(u.iter().filter(|&&v| v == 255).count(), 1);
        assert_eq!(u[25 * 40 + 20], 255);
    }

    #[test]
    fn same_label_same_colour() {
        let b = |l: &str| DetectionBox::from_loc([0, 0, 9, 9], l, 10, 10);
        let c = label_colors(&[b("cat"), b("dog"), b("cat"), b("bird")]);
        assert_eq!(c, [PALETTE[0], PALETTE[1], PALETTE[0], PALETTE[2]]);
    }
}
