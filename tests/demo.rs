//! The bundled model in models/demo (the trained demo model, see models/demo/README.md) is
//! exactly what `pali convert` makes from its checkpoint, and the CLI captions, detects and
//! segments with it.

mod common;
use common::*;
use pali_convert::ConvertOptions;
use pali_ggml::quant::FileType;

/// Committed GGUFs equal a fresh conversion of the committed checkpoint `models/demo/hf`,
/// with the options of models/demo/README.md (`pali convert models/demo/hf -o models/demo
/// --type f16 --name pali-demo --force`), so they can never go stale.
#[test]
fn bundled_gguf_equals_fresh_conversion() {
    let demo = root().join("models/demo");
    let opts = ConvertOptions {
        input: demo.join("hf"),
        out_dir: std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("demo-fresh"),
        text_type: FileType::F16,
        vision_type: FileType::F16,
        force: true,
        name: Some("pali-demo".to_string()),
        threads: 2,
    };
    let fresh = pali_convert::convert(&opts, &mut |_, _, _| {})
        .unwrap_or_else(|e| panic!("converting models/demo/hf: {e}"));
    for (f, name) in [
        (&fresh.decoder, "pali-demo-F16.gguf"),
        (&fresh.mmproj, "mmproj-pali-demo-F16.gguf"),
    ] {
        let a = std::fs::read(f).unwrap();
        let b = std::fs::read(demo.join(name)).unwrap();
        assert!(
            a == b,
            "models/demo/{name} differs from `pali convert` output: regenerate it (models/demo/README.md)"
        );
    }
}

/// The bundled mask decoder equals a fresh `pali convert-vae` of the committed
/// `models/demo/vae-shapes.npz` (made by models/demo/train_segment.py).
#[test]
fn bundled_vae_equals_fresh_conversion() {
    let demo = root().join("models/demo");
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("demo-vae-fresh.gguf");
    pali_convert::convert_vae(&demo.join("vae-shapes.npz"), &out, true).unwrap();
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(demo.join("vae-pali-demo.gguf")).unwrap(),
        "models/demo/vae-pali-demo.gguf differs from `pali convert-vae` output: regenerate it"
    );
}

/// `pali segment` with the bundled model (and, by default, its mask decoder) gives masks
/// that match the generator's true masks (`examples/images/truth.json`, COCO RLE): every
/// true object of the queried shape is covered by one predicted mask with IoU >= 0.7
/// (measured 0.91-0.94), and `--draw` / `--mask-out` write their PNGs.
#[test]
fn cli_segments_with_the_bundled_model() {
    let truth: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("examples/images/truth.json")).unwrap(),
    )
    .unwrap();
    let rle_mask = |m: &serde_json::Value| -> pali::Mask {
        let (h, w) = (
            m["size"][0].as_u64().unwrap(),
            m["size"][1].as_u64().unwrap(),
        );
        let counts: Vec<u32> = m["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap() as u32)
            .collect();
        pali::Mask::from_rle(w as u32, h as u32, &counts).expect("valid RLE")
    };
    let iou = |a: &pali::Mask, b: &pali::Mask| -> f64 {
        let (mut inter, mut union) = (0u64, 0u64);
        for (x, y) in a.data.iter().zip(&b.data) {
            inter += u64::from(*x && *y);
            union += u64::from(*x || *y);
        }
        inter as f64 / union.max(1) as f64
    };
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("demo-segment");
    std::fs::create_dir_all(&dir).unwrap();
    let mut checked = 0;
    for (image, query) in [
        ("three_shapes_wide.png", "circle"),
        ("one_shape.png", "triangle"),
        ("two_shapes_tall.png", "square"),
    ] {
        let (draw, mask_out) = (
            dir.join(format!("{query}.png")),
            dir.join(format!("{query}-mask.png")),
        );
        let v = pali_json(&[
            "segment",
            &example(image),
            query,
            "--draw",
            &path_str(&draw),
            "--mask-out",
            &path_str(&mask_out),
        ]);
        let predicted: Vec<pali::Mask> = v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| rle_mask(&o["mask"]))
            .collect();
        for t in truth[image]["objects"].as_array().unwrap() {
            if t["shape"] != query {
                continue;
            }
            let want = rle_mask(&t["mask"]);
            let best = predicted.iter().map(|p| iou(p, &want)).fold(0.0, f64::max);
            println!("{image} {query}: mask IoU {best:.3}");
            assert!(best >= 0.7, "{image} {query}: best mask IoU {best}: {v}");
            checked += 1;
        }
        assert!(image::open(&draw).is_ok() && image::open(&mask_out).is_ok());
    }
    assert_eq!(checked, 4);
}

fn example(name: &str) -> String {
    path_str(&root().join("examples/images").join(name))
}

/// `pali caption` with no -m uses the bundled model and gives the right caption (the
/// generator's truth; every step's top-1/top-2 logit margin is >= 2.5 in HF); a missing
/// image fails with exit code 1 and names the file.
#[test]
fn cli_captions_with_the_bundled_model() {
    // `-ngl` and `-ctk` as llama.cpp spells them (no GPU layers here: a CPU build ignores it).
    let v = pali_json(&[
        "caption",
        &example("three_shapes_wide.png"),
        "-ngl",
        "0",
        "-ctk",
        "f16",
    ]);
    assert_eq!(v["text"], "a red circle, a blue square and a green circle");
    assert_eq!(v["tokens"].as_array().unwrap().len(), 11);
    // 64 image tokens + <bos> + "caption en" (2 tokens) + "\n"
    assert_eq!(v["timings"]["n_prefix"], 68);
    assert!(v["peak_rss_mb"].as_f64().unwrap() > 0.0);
    // The memory split after the prefix: the mapped model files are file-backed pages, the
    // KV cache and compute buffers anonymous ones; together (with shared memory) the RSS.
    let m = &v["timings"]["memory_after_prefill"];
    let (rss, anon, file) = (
        m["rss_mib"].as_f64().unwrap(),
        m["anon_mib"].as_f64().unwrap(),
        m["file_mib"].as_f64().unwrap(),
    );
    assert!(anon > 1.0 && file > 1.0 && anon + file <= rss + 0.01, "{m}");
    assert!(rss <= v["peak_rss_mb"].as_f64().unwrap() + 0.01, "{v}");

    let out = pali_cmd()
        .args(["caption", "/nonexistent/cat.jpg"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cat.jpg"));
}

/// `detect` finds the one triangle: four loc tokens within 20 bins of the generator's box
/// (`<loc0563><loc0435><loc0929><loc0793> triangle`) and the label. Neighbouring loc bins
/// have close logits, so the test allows a few bins of numeric drift.
#[test]
fn cli_detects_with_the_bundled_model() {
    let v = pali_json(&[
        "run",
        "--image",
        &example("one_shape.png"),
        "-p",
        "detect triangle",
    ]);
    let text = v["text"].as_str().unwrap();
    let (locs, label) = text.split_at(text.find(' ').expect(text));
    assert_eq!(label, " triangle", "{text}");
    let bins: Vec<i32> = locs
        .split("<loc")
        .skip(1)
        .map(|p| p.trim_end_matches('>').parse().expect(text))
        .collect();
    assert_eq!(bins.len(), 4, "{text}");
    for (got, want) in bins.iter().zip([563, 435, 929, 793]) {
        assert!((got - want).abs() <= 20, "{text}");
    }
}

/// Several images: JSON Lines with paths, a bad image gets an error line and exit code 1.
#[test]
fn cli_batch_keeps_going_past_a_bad_image() {
    let out = pali_cmd()
        .args([
            "caption",
            &path_str(&image_path("wide")),
            "/nonexistent/x.png",
            &path_str(&image_path("gray")),
            "-t",
            "1",
            "-n",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0]["text"].is_string() && lines[2]["text"].is_string());
    assert!(lines[1]["error"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/x.png"));
}

/// Low-memory mode (vision tower and decoder loaded in turn, decoder weights used in place)
/// gives the same answers as the default, over several images and a detection, and loads
/// each half once for a batch of images (all encoded first, then all decoded).
#[test]
fn low_memory_mode_gives_the_same_answers() {
    let run = |low_mem: &str, args: &[&str]| -> (Vec<serde_json::Value>, String) {
        let out = pali_cmd()
            .args(args)
            .args(["-t", "1", "--json", "--low-mem", low_mem])
            .env("RUST_LOG", "pali=info")
            .output()
            .unwrap();
        assert_success(&out);
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (lines, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let images = [
        example("three_shapes_wide.png"),
        example("two_shapes_tall.png"),
        example("one_shape.png"),
    ];
    let caption: Vec<&str> = ["caption"]
        .into_iter()
        .chain(images.iter().map(|s| s.as_str()))
        .collect();
    let detect = ["detect", &images[0], "circle"];
    for args in [&caption[..], &detect[..]] {
        let ((on, log), (off, _)) = (run("on", args), run("off", args));
        assert_eq!(on.len(), off.len());
        assert!(!on.is_empty());
        for (a, b) in on.iter().zip(&off) {
            assert_eq!(a["text"], b["text"], "{args:?}");
            assert!(a["text"].as_str().is_some_and(|t| !t.is_empty()), "{a}");
        }
        // Loaded at start: the vision tower; on first use: the decoder, once.
        assert_eq!(log.matches("loading the decoder").count(), 1, "{log}");
        assert_eq!(log.matches("loading the vision tower").count(), 0, "{log}");
    }
}

/// `detect --json` gives each box a score in (0, 1]: the geometric mean probability of its
/// four loc tokens, and the text output prints it.
#[test]
fn detections_carry_scores() {
    let v = pali_json(&["detect", &example("three_shapes_wide.png"), "circle"]);
    let objects = v["objects"].as_array().unwrap();
    assert_eq!(objects.len(), 2, "{v}");
    for o in objects {
        let s = o["score"]
            .as_f64()
            .unwrap_or_else(|| panic!("no score: {o}"));
        assert!(s > 0.0 && s <= 1.0, "{o}");
    }
    let out = pali_cmd()
        .args(["detect", &example("three_shapes_wide.png"), "circle"])
        .args(["-t", "1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches(" score=").count(), 2, "{text}");
}

/// Output piped into a reader that stops early (`pali caption … | head -1`): pali ends
/// quietly on SIGPIPE like other Unix tools, without a panic message.
#[cfg(unix)]
#[test]
fn closed_stdout_ends_quietly() {
    use std::io::BufRead;
    use std::process::Stdio;
    let img = example("three_shapes_wide.png");
    let mut child = pali_cmd()
        .arg("caption")
        .args(std::iter::repeat_n(img.as_str(), 100))
        .args(["-t", "1", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("a red circle"), "{first}");
    // The pipe's read end is closed here.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.status.success());
}

/// Quantized KV caches (`--cache-type q8_0` / `q4_0`, flash attention on) give the same greedy captions
/// as the default F16 cache on the bundled model.
#[test]
fn quantized_kv_caches_give_the_same_captions() {
    let run = |cache: &str| {
        let out = pali_cmd()
            .arg("caption")
            .args(
                [
                    "three_shapes_wide.png",
                    "two_shapes_tall.png",
                    "one_shape.png",
                ]
                .map(example),
            )
            .args(["-t", "1", "--cache-type", cache])
            .output()
            .unwrap();
        assert_success(&out);
        String::from_utf8(out.stdout).unwrap()
    };
    let f16 = run("f16");
    assert_eq!(f16.lines().count(), 3, "{f16}");
    assert_eq!(run("q8_0"), f16);
    assert_eq!(run("q4_0"), f16);
}
