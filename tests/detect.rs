//! Detection and segmentation output: coordinates from a crafted token sequence decoded by the
//! bundled model's tokenizer, the `--draw` picture checked pixel by pixel, and the
//! `pali detect` / `pali segment` commands end to end with the bundled model.

use pali::decoder::{Decoder, DecoderOptions};
use pali::draw::{draw_detections, label_colors, line_width, save_png};
use pali::RgbImage;
use pali::{parse_detections, parse_segments, DetectionBox, SlidingWindow};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("detect");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn wide() -> String {
    root()
        .join("models/fixtures/images/wide.png")
        .display()
        .to_string()
}

fn pali(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pali"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

/// Token ids → text with the bundled model's own tokenizer (the path `Model::generate` takes),
/// then parsed on a non-square image.
#[test]
fn crafted_tokens_give_pixel_boxes_on_a_non_square_image() {
    let paths = pali::ModelPaths::demo(&root()).expect("bundled model in models/demo");
    let dec = Decoder::load(
        &paths.decoder,
        &DecoderOptions {
            n_gpu_layers: 0,
            sliding_window: SlidingWindow::Off,
            skip_repack: false,
            ..Default::default()
        },
    )
    .unwrap();
    let tok = dec.tokenizer();
    let id = |piece: &str| {
        tok.token_to_id(piece)
            .unwrap_or_else(|| panic!("{piece} not in the vocabulary"))
    };
    let text_ids = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
    let mut ids = Vec::new();
    for bin in [256, 512, 768, 900] {
        ids.push(id(&format!("<loc{bin:04}>")));
    }
    ids.extend(text_ids(" cat ;"));
    for bin in [0, 0, 1023, 1023] {
        ids.push(id(&format!("<loc{bin:04}>")));
    }
    ids.extend(text_ids(" dog"));
    let text = tok.decode(&ids, true).unwrap();
    assert!(
        text.starts_with("<loc0256><loc0512><loc0768><loc0900>"),
        "{text:?}"
    );

    let d = parse_detections(&text, 640, 480);
    assert_eq!(d.warnings, Vec::<String>::new());
    assert_eq!(d.objects.len(), 2);
    let (cat, dog) = (&d.objects[0], &d.objects[1]);
    assert_eq!((cat.label.as_str(), dog.label.as_str()), ("cat", "dog"));
    assert_eq!(cat.loc, [256, 512, 768, 900]);
    // x = bin/1023 · 640, y = bin/1023 · 480.
    let want = [320.3128, 120.1173, 563.0499, 360.3519];
    for (got, want) in cat.rect().iter().zip(want) {
        assert!((got - want).abs() < 1e-3, "{:?}", cat.rect());
    }
    assert_eq!(dog.rect(), [0.0, 0.0, 640.0, 480.0]);

    // The same answer with 16 <seg> codes after each box.
    let mut seg_ids = ids[..4].to_vec();
    seg_ids.extend((0..16).map(|i| id(&format!("<seg{:03}>", i * 8))));
    seg_ids.extend(text_ids(" cat"));
    let s = parse_segments(&tok.decode(&seg_ids, true).unwrap(), 640, 480);
    assert_eq!(s.warnings, Vec::<String>::new());
    assert_eq!(s.objects[0].bbox.rect(), cat.rect());
    assert_eq!(
        s.objects[0].codes.to_vec(),
        (0..16).map(|i| i * 8).collect::<Vec<u8>>()
    );
}

fn read_png(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

/// A known box drawn on a known non-square image, written as PNG and read back: the edge has
/// the label's colour, pixels inside and outside the box are unchanged.
#[test]
fn drawn_box_edges_have_the_label_colour() {
    let (w, h) = (320u32, 200u32);
    // A gradient, so "unchanged" means something.
    let mut data = Vec::new();
    for y in 0..h {
        for x in 0..w {
            data.extend([(x % 256) as u8, (y % 256) as u8, 77]);
        }
    }
    let img = RgbImage::new(w, h, data).unwrap();
    // Bins 256..768 on both axes: x 80.08..240.23, y 50.05..150.15 px.
    let b = DetectionBox::from_loc([256, 256, 768, 768], "cat", w, h);
    let [x1, y1, x2, y2] = b.rect().map(|v| v.round() as u32);
    assert_eq!([x1, y1, x2, y2], [80, 50, 240, 150]);
    let other = DetectionBox::from_loc([900, 900, 1000, 1000], "dog", w, h);
    let objects = [b.clone(), other.clone()];
    let pic = draw_detections(&img, &objects);
    let out = tmp("box.png");
    let _ = std::fs::remove_file(&out);
    save_png(&pic, &out).unwrap();
    assert!(!tmp("box.png.partial").exists());

    let png = read_png(&out);
    assert_eq!(png.dimensions(), (w, h));
    let colors = label_colors(&objects);
    assert_ne!(colors[0], colors[1]);
    let lw = line_width(&img);
    let orig = |x: u32, y: u32| [(x % 256) as u8, (y % 256) as u8, 77];
    let at = |x: u32, y: u32| png.get_pixel(x, y).0;
    let mid_y = (y1 + y2) / 2;
    let mid_x = (x1 + x2) / 2;
    // Edges: the outline is `lw` px wide, inside the box.
    for (x, y) in [
        (x1, mid_y),
        (x1 + lw - 1, mid_y),
        (x2 - 1, mid_y),
        (x2 - lw, mid_y),
        (mid_x, y2 - 1),
        (mid_x, y2 - lw),
        (mid_x, y1),
    ] {
        assert_eq!(at(x, y), colors[0], "edge ({x},{y})");
    }
    // Just inside, just outside, well inside, well outside: unchanged.
    for (x, y) in [
        (x1 + lw, mid_y),
        (x1 - 1, mid_y),
        (x2 - lw - 1, mid_y),
        (x2, mid_y),
        (mid_x, y2),
        (mid_x, y2 - lw - 1),
        (mid_x, mid_y),
        (10, 190),
        (300, 10),
    ] {
        assert_eq!(at(x, y), orig(x, y), "({x},{y})");
    }
    // The label tag sits above the box's top-left corner, in the box colour.
    assert_eq!(at(x1, y1 - 1), colors[0]);
    // The second label's box has its own colour.
    let [ox1, oy1, _, oy2] = other.rect().map(|v| v.round() as u32);
    assert_eq!(at(ox1, (oy1 + oy2) / 2), colors[1]);
}

/// An unwritable `--draw` target: an error naming the path, no file and no `.partial` left.
#[test]
fn save_png_errors_name_the_path_and_leave_nothing() {
    let img = RgbImage::new(4, 3, vec![0; 36]).unwrap();
    let bad = tmp("no-such-dir/out.png");
    let e = save_png(&img, &bad).unwrap_err().to_string();
    assert!(e.contains(&bad.display().to_string()), "{e}");
    assert!(!bad.exists() && !bad.with_extension("png.partial").exists());
    let dir = tmp("");
    let e = save_png(&img, &dir).unwrap_err().to_string();
    assert!(e.contains(&dir.display().to_string()), "{e}");
    // Overwrites an existing file atomically.
    let ok = tmp("over.png");
    std::fs::write(&ok, b"old").unwrap();
    save_png(&img, &ok).unwrap();
    assert_eq!(read_png(&ok).dimensions(), (4, 3));
}

/// `pali detect … --json --draw` with the bundled model: whatever the (random) model says
/// parses, the JSON has an `objects` list, and the picture has the image's size.
#[test]
fn cli_detect_and_segment_with_the_bundled_model() {
    let drawn = tmp("cli.png");
    let _ = std::fs::remove_file(&drawn);
    let out = pali(&[
        "detect",
        &wide(),
        "cat ; dog",
        "--json",
        "-t",
        "1",
        "-n",
        "24",
        "--draw",
        &drawn.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let objects = v["objects"].as_array().expect("objects array");
    for o in objects {
        let b: Vec<f64> = o["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!(
            b[0] < b[2] && b[1] < b[3] && b[2] <= 61.0 && b[3] <= 37.0,
            "{o}"
        );
        assert!(o["label"].is_string());
    }
    assert!(v["text"].is_string() && v["warnings"].is_array());
    assert_eq!(v["tokens"].as_array().unwrap().len(), v["timings"]["n_gen"]);
    assert_eq!(v["image"]["width"], 61);
    assert_eq!(read_png(&drawn).dimensions(), (61, 37));

    // With explicit model files there is no mask decoder unless --vae names one; with the
    // bundled model, its own (models/demo/vae-pali-demo.gguf) is used.
    let paths = pali::ModelPaths::demo(&root()).expect("bundled model in models/demo");
    let (m, mm) = (
        paths.decoder.display().to_string(),
        paths.mmproj.display().to_string(),
    );
    let image = wide();
    for explicit in [true, false] {
        let mut args = vec!["segment", &image, "cat", "--json", "-t", "1", "-n", "24"];
        if explicit {
            args.extend(["-m", m.as_str(), "--mmproj", mm.as_str()]);
        }
        let out = pali(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for o in v["objects"].as_array().expect("objects array") {
            assert_eq!(o["codes"].as_array().unwrap().len(), 16);
            assert_eq!(o["mask"].is_null(), explicit, "{o}");
        }
        let warned = v["warnings"].as_array().unwrap().iter().any(|w| {
            w.as_str()
                .unwrap()
                .contains("no VQ-VAE decoder loaded (--vae)")
        });
        assert_eq!(warned, explicit, "{v}");
    }

    // An unwritable --draw target fails, names it, and leaves nothing behind.
    let bad = tmp("missing-dir/x.png");
    let out = pali(&[
        "detect",
        &wide(),
        "cat",
        "-t",
        "1",
        "-n",
        "1",
        "--draw",
        &bad.display().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&bad.display().to_string()));
    assert!(!bad.exists());
}
