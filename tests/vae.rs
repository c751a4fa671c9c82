//! The segmentation mask decoder against the fixture of `models/fixtures/make_vae_fixture.py`
//! (random weights in big_vision's `vae-oid.npz` layout, reference maps from a float64
//! reimplementation of big_vision's Flax decoder, masks placed as big_vision's evaluator
//! does): decoder outputs, exact mask placement on non-square images, `convert-vae` errors,
//! and `pali segment --vae` end to end with the bundled model.

use pali::image::pillow::resize_bilinear_f32;
use pali::mask::{mask_box, place_mask, Mask, MaskDecoder, MAP_SIZE};
use pali::parse_segments;
use pali_convert::convert_vae;
use pali_convert::safetensors::Checkpoint;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("models/fixtures/vae").join(name)
}

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vae");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

struct Reference {
    json: serde_json::Value,
    tensors: Checkpoint,
}

impl Reference {
    fn tensor(&self, key: &str) -> Vec<f32> {
        let e = self
            .tensors
            .get(key)
            .unwrap_or_else(|| panic!("reference tensor {key}"));
        self.tensors.read_f32(e).unwrap()
    }

    fn codes(&self, case: usize) -> [u8; 16] {
        let v: Vec<u8> = self.json["codes"][case]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap() as u8)
            .collect();
        v.try_into().unwrap()
    }
}

fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| Reference {
        json: serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap())
            .unwrap(),
        tensors: Checkpoint::open_files(&[fixture("reference.safetensors")]).unwrap(),
    })
}

/// The fixture converted once per test binary.
fn vae_gguf() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let out = tmp("fixture-vae.gguf");
        let n = convert_vae(&fixture("vae-oid-tiny.npz"), &out, true).unwrap();
        assert_eq!(n, 25);
        out
    })
}

/// A decoder per test (it is not `Sync`: one ggml CPU backend computes one graph at a time).
fn decoder() -> MaskDecoder {
    MaskDecoder::load(vae_gguf(), 1).unwrap()
}

/// (case, image w, h, loc) of each recorded placement.
fn placements() -> Vec<(usize, u32, u32, [u16; 4], serde_json::Value)> {
    reference().json["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let u = |v: &serde_json::Value| v.as_u64().unwrap();
            let loc: Vec<u16> = p["loc"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| u(v) as u16)
                .collect();
            (
                u(&p["case"]) as usize,
                u(&p["image"][0]) as u32,
                u(&p["image"][1]) as u32,
                loc.try_into().unwrap(),
                p.clone(),
            )
        })
        .collect()
}

fn mask_from_f32(v: &[f32], w: u32, h: u32) -> Mask {
    Mask {
        width: w,
        height: h,
        data: v.iter().map(|&x| x != 0.0).collect(),
    }
}

/// The ggml decoder (F32 throughout) against big_vision's math in float64: within 1e-6 of the
/// largest output magnitude. (PyTorch's own float32 run of the same weights is 1.0e-6 of it
/// away from the float64 reference: see reference.json.)
#[test]
fn decoder_matches_the_reference_maps() {
    let r = reference();
    let d = decoder();
    assert_eq!(
        d.codebook_dim(),
        r.json["codebook_dim"].as_u64().unwrap() as usize
    );
    let n = r.json["codes"].as_array().unwrap().len();
    let mut worst = 0f64;
    for case in 0..n {
        let want = r.tensor(&format!("decode.{case}"));
        let got = d.decode(&r.codes(case)).unwrap();
        assert_eq!(got.len(), MAP_SIZE * MAP_SIZE);
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| f64::from((a - b).abs()))
            .fold(0f64, f64::max);
        let rel = err / scale;
        eprintln!(
            "case {case}: max |ggml - reference| = {err:.3e} ({rel:.2e} of max |ref| {scale:.3})"
        );
        worst = worst.max(rel);
        assert!(rel < 1e-6, "case {case}: {err} vs scale {scale}");
        // Both signs present: a real inside and outside.
        assert!(want.iter().any(|&v| v > 0.0) && want.iter().any(|&v| v < 0.0));
    }
    eprintln!("worst relative error {worst:.2e}");
    // Deterministic: the same codes give the same bits.
    assert_eq!(
        d.decode(&r.codes(0)).unwrap(),
        d.decode(&r.codes(0)).unwrap()
    );
    // Out-of-range codes are an error, not a crash.
    assert!(d
        .decode(&[200; 16])
        .unwrap_err()
        .to_string()
        .contains("200"));
}

/// PIL's BILINEAR resize of a float image, bit for bit (both pass orders of Pillow 13,
/// one-axis resizes, identity, extreme shrinks).
#[test]
fn float_resize_is_bit_exact_with_pil() {
    let r = reference();
    let map = r.tensor("decode.0");
    for wh in r.json["resizes"].as_array().unwrap() {
        let (w, h) = (
            wh[0].as_u64().unwrap() as u32,
            wh[1].as_u64().unwrap() as u32,
        );
        let want = r.tensor(&format!("resize.{w}x{h}"));
        let got = resize_bilinear_f32(&map, 64, 64, w, h);
        let diff = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(diff, 0, "{w}x{h}: {diff} values differ");
    }
}

/// Mask placement on non-square images from the reference maps: box pixels, the resized map,
/// the final mask, its area and its COCO RLE all exactly as the reference.
#[test]
fn placement_matches_the_reference_exactly() {
    let r = reference();
    for (j, (case, w, h, loc, p)) in placements().into_iter().enumerate() {
        let map = r.tensor(&format!("decode.{case}"));
        let bbox = mask_box(loc, w, h);
        let want_box: Vec<u32> = p["box_pixels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(bbox.to_vec(), want_box, "placement {j}");
        let [x1, y1, x2, y2] = bbox;
        if x2 > x1 && y2 > y1 {
            let resized = resize_bilinear_f32(&map, 64, 64, x2 - x1, y2 - y1);
            assert_eq!(resized, r.tensor(&format!("resized.{j}")), "placement {j}");
        }
        let got = place_mask(&map, bbox, w, h);
        let want = mask_from_f32(&r.tensor(&format!("mask.{j}")), w, h);
        assert_eq!(got, want, "placement {j}");
        assert_eq!(got.area(), p["area"].as_u64().unwrap(), "placement {j}");
        let counts: Vec<u32> = p["rle"]["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(got.rle(), counts, "placement {j}");
        assert_eq!(p["rle"]["size"], serde_json::json!([h, w]));
    }
}

/// The whole path from the model's answer text: parse, decode on ggml, place. The masks equal
/// the reference masks (built from the float64 maps) exactly: no map value near 0 moved sign.
#[test]
fn crafted_answer_gives_the_reference_masks() {
    let r = reference();
    let d = decoder();
    for (j, (case, w, h, loc, _)) in placements().into_iter().enumerate() {
        let codes = r.codes(case);
        let text: String = loc
            .iter()
            .map(|b| format!("<loc{b:04}>"))
            .chain(codes.iter().map(|c| format!("<seg{c:03}>")))
            .collect::<String>()
            + " cat";
        let s = parse_segments(&text, w, h);
        let want = mask_from_f32(&r.tensor(&format!("mask.{j}")), w, h);
        if loc[2] <= loc[0] || loc[3] <= loc[1] {
            continue;
        }
        assert_eq!(s.objects.len(), 1, "{:?}", s.warnings);
        let got = d.mask(&s.objects[0], w, h).unwrap();
        let differ = got
            .data
            .iter()
            .zip(&want.data)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(differ, 0, "placement {j}: {differ} pixels differ");
    }
}

// ---------------------------------------------------------------------------
// convert-vae

/// Zip entries: (name, uncompressed bytes).
type Entries = Vec<(String, Vec<u8>)>;

/// The fixture's entries, uncompressed.
fn fixture_entries() -> Entries {
    let f = std::fs::File::open(fixture("vae-oid-tiny.npz")).unwrap();
    let mut z = zip::ZipArchive::new(f).unwrap();
    (0..z.len())
        .map(|i| {
            let mut e = z.by_index(i).unwrap();
            let mut b = Vec::new();
            e.read_to_end(&mut b).unwrap();
            (e.name().to_string(), b)
        })
        .collect()
}

/// Writes entries as a zip with stored (uncompressed) entries, like `np.savez`.
fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, b) in entries {
        z.start_file(name.as_str(), opts).unwrap();
        z.write_all(b).unwrap();
    }
    z.finish().unwrap();
}

fn npy_f4(shape: &str, n: usize, descr: &str) -> Vec<u8> {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((header.len() as u16).to_le_bytes());
    b.extend(header.as_bytes());
    b.extend(vec![0u8; n]);
    b
}

/// A stored (np.savez-style) copy converts to the very same GGUF as the deflated fixture.
#[test]
fn stored_and_deflated_npz_convert_identically() {
    let dir = tmp("stored");
    std::fs::create_dir_all(&dir).unwrap();
    let npz = dir.join("vae-oid-tiny.npz");
    write_zip(&npz, &fixture_entries());
    let out = dir.join("out.gguf");
    convert_vae(&npz, &out, true).unwrap();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(vae_gguf()).unwrap()
    );
    assert!(!dir.join("out.gguf.partial").exists());
    // No overwrite without force.
    let e = convert_vae(&npz, &out, false).unwrap_err().to_string();
    assert!(e.contains("--force") && e.contains("out.gguf"), "{e}");
}

#[test]
fn convert_errors_name_the_problem_and_leave_no_file() {
    let entries = fixture_entries();
    let cases: Vec<(&str, Entries, Vec<&str>)> = vec![
        (
            "missing.npz",
            entries
                .iter()
                .filter(|(n, _)| n != "decoder.6.weight.npy")
                .cloned()
                .collect(),
            vec!["decoder.6.weight", "missing"],
        ),
        (
            "shape.npz",
            entries
                .iter()
                .map(|(n, b)| {
                    if n == "decoder.6.bias.npy" {
                        (n.clone(), npy_f4("(63,)", 63 * 4, "<f4"))
                    } else {
                        (n.clone(), b.clone())
                    }
                })
                .collect(),
            vec!["decoder.6.bias", "[63]", "[64]"],
        ),
        (
            "dtype.npz",
            entries
                .iter()
                .map(|(n, b)| {
                    if n == "decoder.12.weight.npy" {
                        (n.clone(), npy_f4("(1, 16, 1, 1)", 16 * 8, "<f8"))
                    } else {
                        (n.clone(), b.clone())
                    }
                })
                .collect(),
            vec!["decoder.12.weight", "'<f8'", "float32"],
        ),
        (
            "codebook.npz",
            entries
                .iter()
                .map(|(n, b)| {
                    if n == "_vq_vae._embedding.npy" {
                        (n.clone(), npy_f4("(100, 8)", 800 * 4, "<f4"))
                    } else {
                        (n.clone(), b.clone())
                    }
                })
                .collect(),
            vec!["_vq_vae._embedding", "[100, 8]", "[128, D]"],
        ),
    ];
    for (name, content, needles) in cases {
        let npz = tmp(name);
        write_zip(&npz, &content);
        let out = tmp(&format!("{name}.gguf"));
        let _ = std::fs::remove_file(&out);
        let e = convert_vae(&npz, &out, true).unwrap_err().to_string();
        assert!(e.contains(&npz.display().to_string()), "{name}: {e}");
        for n in needles {
            assert!(e.contains(n), "{name}: {e:?} lacks {n:?}");
        }
        assert!(!out.exists() && !tmp(&format!("{name}.gguf.partial")).exists());
    }
    // Not a zip at all, and a missing file.
    let junk = tmp("junk.npz");
    std::fs::write(&junk, b"this is not a zip archive").unwrap();
    let out = tmp("junk.gguf");
    let e = convert_vae(&junk, &out, true).unwrap_err().to_string();
    assert!(e.contains("junk.npz") && e.contains("not an .npz"), "{e}");
    assert!(!out.exists() && !tmp("junk.gguf.partial").exists());
    let e = convert_vae(&tmp("nope.npz"), &out, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.npz"), "{e}");
    assert!(!out.exists());
}

#[test]
fn loading_something_else_is_a_clear_error() {
    let paths = pali::ModelPaths::demo(&root()).expect("bundled model in models/demo");
    let e = MaskDecoder::load(&paths.mmproj, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("not a mask decoder file") && e.contains("convert-vae"),
        "{e}"
    );
    let e = MaskDecoder::load(&tmp("absent.gguf"), 1)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("absent.gguf") && e.contains("not found"), "{e}");
}

// ---------------------------------------------------------------------------
// CLI

fn pali(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pali"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

/// `pali convert-vae`, then `pali segment … --vae --json --mask-out --draw` with the bundled
/// (random) model: exit code, JSON shape, and PNGs of the image's size. Whether the random
/// model's answer holds a valid segment is up to chance, so masks are checked for shape only
/// (the library path is checked exactly above).
#[test]
fn cli_convert_vae_and_segment_with_masks() {
    let gguf = tmp("cli-vae.gguf");
    let _ = std::fs::remove_file(&gguf);
    let npz = fixture("vae-oid-tiny.npz").display().to_string();
    let out = pali(&["convert-vae", &npz, "-o", &gguf.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        gguf.display().to_string()
    );
    let again = pali(&["convert-vae", &npz, "-o", &gguf.display().to_string()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let wide = root()
        .join("models/fixtures/images/wide.png")
        .display()
        .to_string();
    let mask_png = tmp("cli-mask.png");
    let drawn = tmp("cli-draw.png");
    let _ = std::fs::remove_file(&mask_png);
    let out = pali(&[
        "segment",
        &wide,
        "cat",
        "--vae",
        &gguf.display().to_string(),
        "--json",
        "-t",
        "1",
        "-n",
        "40",
        "--mask-out",
        &mask_png.display().to_string(),
        "--draw",
        &drawn.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["image"], serde_json::json!({"width": 61, "height": 37}));
    for o in v["objects"].as_array().expect("objects") {
        assert_eq!(o["codes"].as_array().unwrap().len(), 16);
        assert_eq!(o["mask"]["size"], serde_json::json!([37, 61]));
        let counts: Vec<u32> = o["mask"]["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap() as u32)
            .collect();
        let m = Mask::from_rle(61, 37, &counts).expect("counts add up to the image");
        assert_eq!(m.area(), o["area"].as_u64().unwrap());
        assert_eq!(o["mask_box"].as_array().unwrap().len(), 4);
    }
    assert!(!v["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w.as_str().unwrap().contains("--vae")));
    let png = image::open(&mask_png).unwrap();
    assert_eq!(png.color(), image::ColorType::L8);
    assert_eq!((png.width(), png.height()), (61, 37));
    let area: u64 = v["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["area"].as_u64().unwrap())
        .sum();
    let lit = png.to_luma8().pixels().filter(|p| p.0[0] == 255).count() as u64;
    assert!(lit <= area && (lit == 0) == (area == 0), "{lit} vs {area}");
    assert!(png
        .to_luma8()
        .pixels()
        .all(|p| p.0[0] == 0 || p.0[0] == 255));
    assert_eq!(image::open(&drawn).unwrap().width(), 61);

    // --mask-out needs a mask decoder: --vae, or the bundled model's own (not used with
    // explicit model files); a bad --vae fails before the model runs.
    let paths = pali::ModelPaths::demo(&root()).expect("bundled model in models/demo");
    let out = pali(&[
        "segment",
        &wide,
        "cat",
        "-m",
        &paths.decoder.display().to_string(),
        "--mmproj",
        &paths.mmproj.display().to_string(),
        "--mask-out",
        &mask_png.display().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vae"));
    let out = pali(&["segment", &wide, "cat", "--vae", &wide]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wide.png"));
}
