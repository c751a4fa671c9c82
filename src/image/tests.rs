//! Expected values come from Pillow 13.0.0 / 12.3.0 / 12.1.1 and
//! transformers 5.24 (`SiglipImageProcessorPil`), generated once with
//! Python and baked in here.

use super::decode::*;
use super::pillow::*;
use super::preprocess::*;
use super::rgb::RgbImage;
use image::codecs::gif::GifEncoder;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, Frame, ImageEncoder, RgbaImage};
use std::path::PathBuf;

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
    assert!(matches!(err, ImageError::InvalidResample { code: 6 }));
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
            0, 93, 212, 14, 95, 229, 14, 249, 69, 0, 93, 212, 14, 95, 229, 14, 249, 69, 217, 230,
            240, 58, 124, 164, 214, 245, 180, 217, 230, 240, 58, 124, 164, 214, 245, 180, 178, 157,
            97, 131, 113, 54, 101, 228, 233, 45, 205, 198, 196, 106, 24, 57, 89, 56, 45, 205, 198,
            196, 106, 24, 57, 89, 56,
        ],
        [
            0, 55, 220, 58, 49, 170, 68, 165, 12, 44, 132, 236, 38, 85, 191, 97, 174, 85, 148, 231,
            241, 28, 139, 201, 136, 196, 195, 207, 198, 186, 73, 151, 152, 131, 239, 230, 165, 133,
            143, 145, 130, 87, 108, 222, 166, 88, 173, 170, 181, 128, 73, 114, 139, 101, 39, 214,
            200, 189, 129, 78, 123, 83, 66,
        ],
        [
            6, 73, 213, 44, 75, 177, 71, 164, 43, 58, 129, 222, 47, 103, 185, 94, 178, 102, 142,
            219, 237, 52, 147, 197, 130, 201, 195, 162, 185, 189, 95, 145, 148, 123, 214, 194, 164,
            144, 143, 139, 136, 97, 111, 215, 173, 102, 178, 171, 159, 132, 85, 115, 146, 116, 63,
            199, 189, 172, 129, 78, 118, 103, 80,
        ],
        [
            0, 61, 217, 47, 61, 175, 68, 164, 24, 48, 125, 229, 42, 92, 187, 93, 177, 89, 148, 228,
            241, 38, 145, 200, 134, 201, 199, 181, 190, 188, 86, 146, 148, 126, 225, 209, 168, 137,
            139, 142, 133, 90, 109, 222, 174, 94, 179, 172, 171, 129, 77, 116, 140, 107, 50, 207,
            195, 184, 128, 75, 121, 91, 70,
        ],
        [
            7, 70, 213, 14, 95, 229, 81, 150, 39, 7, 70, 213, 14, 95, 229, 81, 150, 39, 141, 230,
            239, 58, 124, 164, 122, 197, 211, 171, 137, 146, 131, 113, 54, 113, 224, 171, 171, 137,
            146, 131, 113, 54, 113, 224, 171, 66, 199, 187, 196, 106, 24, 129, 106, 85, 66, 199,
            187, 196, 106, 24, 129, 106, 85,
        ],
        [
            5, 76, 213, 33, 82, 195, 64, 174, 46, 37, 107, 218, 37, 94, 193, 80, 181, 78, 159, 229,
            239, 55, 143, 186, 143, 209, 202, 166, 186, 187, 95, 136, 134, 127, 217, 195, 171, 142,
            134, 135, 129, 82, 110, 224, 185, 83, 188, 179, 172, 123, 64, 111, 126, 99, 60, 200,
            190, 181, 121, 59, 111, 101, 77,
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
        14, 47, 214, 147, 51, 8, 217, 230, 240, 14, 47, 214, 147, 51, 8, 217, 230, 240, 29, 149,
        242, 178, 157, 97, 131, 113, 54, 29, 149, 242, 178, 157, 97, 131, 113, 54, 45, 205, 198,
        196, 106, 24, 57, 89, 56, 70, 48, 235, 7, 20, 77, 249, 243, 75, 70, 48, 235, 7, 20, 77,
        249, 243, 75, 162, 89, 82, 227, 19, 27, 71, 123, 100, 162, 89, 82, 227, 19, 27, 71, 123,
        100,
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
    assert!(matches!(err, ImageError::Empty { .. }), "{err}");
    let path = temp_path("empty.png");
    std::fs::write(&path, b"").unwrap();
    let err = load_image(&path, 1000).unwrap_err();
    std::fs::remove_file(&path).ok();
    assert!(matches!(err, ImageError::Empty { .. }), "{err}");
    assert!(err.to_string().contains("empty.png"), "{err}");
}

#[test]
fn garbage_and_unsupported_formats_are_refused() {
    let garbage: Vec<u8> = pattern(40, 10).data;
    let err = decode_image(&garbage, 1000).unwrap_err();
    assert!(matches!(err, ImageError::UnsupportedFormat { .. }), "{err}");
    // A TIFF header: recognised, but not an enabled format.
    let err = decode_image(b"II*\0\x08\0\0\0\0\0\0\0\0\0\0\0", 1000).unwrap_err();
    assert!(matches!(err, ImageError::UnsupportedFormat { .. }), "{err}");
    assert!(err.to_string().contains("Tiff"), "{err}");
}

#[test]
fn missing_file_error_names_the_path() {
    let path = temp_path("does-not-exist.png");
    let err = load_image(&path, 1000).unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }), "{err}");
    assert!(err.to_string().contains("does-not-exist.png"), "{err}");
    let err = load_image(&std::env::temp_dir(), 1000).unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }), "{err}");
}

#[test]
fn truncated_files_are_corrupt() {
    let img = pattern(32, 24);
    let png = encode_png(32, 24, &img.data, ExtendedColorType::Rgb8);
    for cut in [png.len() / 2, png.len() - 13, 40] {
        let err = decode_image(&png[..cut], 1_000_000).unwrap_err();
        assert!(
            matches!(err, ImageError::Corrupt { .. }),
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
            matches!(err, ImageError::Corrupt { .. }),
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
        ImageError::TooLarge {
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
        ImageError::TooLarge { .. }
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
            ImageError::ZeroSized { .. } | ImageError::Corrupt { .. }
        ),
        "{err}"
    );
    // A GIF with a 0x0 logical screen and frame gets through the decoder:
    // our own check catches it.
    let gif =
        b"GIF89a\0\0\0\0\x80\0\0\0\0\0\xff\xff\xff\x2c\0\0\0\0\0\0\0\0\0\x02\x02\x44\x01\0\x3b";
    let err = decode_image(gif, 1000).unwrap_err();
    assert!(matches!(err, ImageError::ZeroSized { .. }), "{err}");
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

#[test]
fn resize_keeps_constants_and_identity() {
    let src: Vec<f32> = (0..64 * 64).map(|i| (i % 7) as f32 - 3.0).collect();
    assert_eq!(resize_bilinear_f32(&src, 64, 64, 64, 64), src);
    let flat = vec![0.25f32; 64 * 64];
    for (w, h) in [(97, 61), (3, 200), (1, 1), (64, 5)] {
        let r = resize_bilinear_f32(&flat, 64, 64, w, h);
        assert_eq!(r.len(), (w * h) as usize);
        assert!(r.iter().all(|&v| (v - 0.25).abs() < 1e-7), "{w}x{h}");
    }
}
