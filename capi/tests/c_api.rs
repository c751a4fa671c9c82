//! libpali from C: `examples/c/caption.c` and `tests/c/api_test.c` built with `cc` against
//! the freshly built `libpali.so` and run on the bundled demo model. Their JSON must equal
//! what the library's task calls give (the JSON `pali … --json` prints), and every bad input
//! must come back as a status and a message, never a crash.

use pali_lib as pali;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where cargo put libpali.so for this test: next to the test (target/<profile>/deps, as a
/// dependency of the test), else target/<profile> (after `cargo build -p pali-capi`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    [deps.clone(), deps.parent().unwrap().to_path_buf()]
        .into_iter()
        .find(|d| d.join("libpali.so").is_file())
        .unwrap_or_else(|| panic!("no libpali.so in or above {}", deps.display()))
}

/// Compiles a C file against pali.h and libpali.so.
fn build_c(src: &Path, name: &str) -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let status = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&out)
        .arg(src)
        .arg(format!("-I{}", root().join("capi/include").display()))
        .arg(format!("-L{}", lib_dir().display()))
        .arg("-lpali")
        .status()
        .expect("a C compiler (cc)");
    assert!(status.success(), "cc {} failed", src.display());
    out
}

fn run_c(exe: &Path, args: &[&str]) -> String {
    let out = Command::new(exe)
        .args(args)
        .env("LD_LIBRARY_PATH", lib_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed ({}): {}",
        exe.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn demo() -> (String, String) {
    let d = root().join("models/demo");
    let s = |f: &str| d.join(f).display().to_string();
    (s("pali-demo-F16.gguf"), s("mmproj-pali-demo-F16.gguf"))
}

fn model() -> pali::Model {
    let (m, p) = demo();
    pali::Model::load(&pali::ModelPaths::new(m, p), &Default::default()).unwrap()
}

/// The fields that do not depend on timing (`lib` goes through text too, so that both
/// sides' numbers are parsed the same way).
fn same_answer(c: &Value, lib: &Value) {
    let lib: Value = serde_json::from_str(&lib.to_string()).unwrap();
    for k in [
        "text",
        "tokens",
        "finish_reason",
        "objects",
        "image",
        "warnings",
    ] {
        assert_eq!(c[k], lib[k], "{k}");
    }
}

#[test]
fn c_example_captions_and_detects_like_the_library() {
    let exe = build_c(&root().join("examples/c/caption.c"), "caption");
    let (m, p) = demo();
    let model = model();
    let opts = pali::GenerateOptions::default();
    for name in ["three_shapes_wide.png", "two_shapes_tall.png"] {
        let img_path = root().join("examples/images").join(name);
        let out = run_c(
            &exe,
            &[&m, &p, img_path.to_str().unwrap(), "circle ; square"],
        );
        let lines: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        let img = pali::image::load_image(&img_path, pali::MAX_IMAGE_PIXELS).unwrap();
        let caption = pali::tasks::to_json(&model.caption(&img, "en", &opts).unwrap());
        let found = pali::tasks::to_json(&model.detect(&img, &["circle ; square"], &opts).unwrap());
        same_answer(&lines[0], &caption);
        same_answer(&lines[1], &found);
        assert!(!found["objects"].as_array().unwrap().is_empty());
        assert!(lines[0]["timings"]["vision_ms"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn bad_input_through_the_c_api_is_a_status_and_a_message() {
    let exe = build_c(&root().join("capi/tests/c/api_test.c"), "api_test");
    let (m, p) = demo();
    let png = root().join("examples/images/two_shapes_small.png");
    let img = pali::image::load_image(&png, pali::MAX_IMAGE_PIXELS).unwrap();
    let raw = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("two_shapes_small.rgb");
    std::fs::write(&raw, &img.data).unwrap();
    let (w, h) = (img.width.to_string(), img.height.to_string());
    let out = run_c(
        &exe,
        &[&m, &p, png.to_str().unwrap(), raw.to_str().unwrap(), &w, &h],
    );
    let line = |name: &str| -> (i32, String) {
        let l = out
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {out}"));
        let (st, msg) = l.split_once(' ').unwrap_or((l, ""));
        (st.parse().unwrap(), msg.to_string())
    };
    // (check, status, words of the message)
    let cases = [
        ("load_null_decoder", 1, "decoder_path is NULL"),
        ("load_missing_file", 2, "file not found"),
        ("load_swapped_files", 3, "mmproj"),
        ("load_null_out", 1, "out_model is NULL"),
        ("run_null_model", 1, "model is NULL"),
        ("run_null_image", 1, "images is NULL"),
        ("run_no_images", 1, "n_images is 0"),
        ("run_second_image_corrupt", 4, "images[1]: "),
        ("run_null_out_json", 1, "out_json is NULL"),
        ("run_corrupt_image", 4, "unknown or unsupported format"),
        ("run_truncated_image", 4, "corrupt or truncated"),
        ("run_rgb_too_small", 1, "too small"),
        ("run_rgb_bad_stride", 1, "stride"),
        ("run_bad_format", 1, "image.format 7"),
        ("run_bad_task", 1, "task 42"),
        ("run_detect_no_objects", 1, "object names"),
        ("run_prompt_too_long", 5, "ctx"),
        (
            "run_bad_params",
            1,
            "n_predict (-n, max_tokens) = 0: must be at least 1",
        ),
        ("run_cancelled", 6, "cancelled"),
    ];
    for (name, status, needle) in cases {
        let (st, msg) = line(name);
        assert_eq!(st, status, "{name}: {msg}");
        assert!(msg.contains(needle), "{name}: {needle:?} not in {msg:?}");
    }
    assert_eq!(line("load").0, 0);
    // Raw pixels, packed or with padded rows, caption like the encoded file.
    let encoded: Value = serde_json::from_str(&line("encoded").1).unwrap();
    for name in ["rgb_packed", "rgb_strided"] {
        let (st, json) = line(name);
        assert_eq!(st, 0, "{name}: {json}");
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["text"], encoded["text"], "{name}");
        assert_eq!(v["tokens"], encoded["tokens"], "{name}");
    }
    assert!(out.contains(&format!("version 0 {}", env!("CARGO_PKG_VERSION"))));
    // Two images in one prompt: the library's answer for the same two, with n_images.
    let (st, json) = line("two_images");
    assert_eq!(st, 0, "{json}");
    let two: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(two["n_images"], 2);
    let model = pali::Model::load(
        &pali::ModelPaths::demo(&root()).unwrap(),
        &pali::LoadOptions::default(),
    )
    .unwrap();
    let img = pali::image::load_image(&png, pali::MAX_IMAGE_PIXELS).unwrap();
    let task = pali::Task::Caption {
        lang: "en".into(),
        long: false,
    };
    let pali::Answer::Text(want) = model
        .run(&[img.clone(), img], &task, &Default::default(), &mut |_| {})
        .unwrap()
    else {
        panic!("a caption is text")
    };
    assert_eq!(two["tokens"], serde_json::json!(want.tokens));

    // Bad options: PALI_ERR_INVALID_ARGUMENT with exactly the library's message, the one
    // the CLI and `pali serve` give for the same value.
    use pali::options::RequestValues;
    for (name, values) in [
        (
            "run_bad_params",
            RequestValues {
                n_predict: Some(0),
                ..Default::default()
            },
        ),
        (
            "run_bad_temperature",
            RequestValues {
                temperature: Some(-1.0),
                ..Default::default()
            },
        ),
        (
            "run_bad_top_p",
            RequestValues {
                top_p: Some(7.0),
                ..Default::default()
            },
        ),
        (
            "run_bad_top_k",
            RequestValues {
                top_k: Some(-1),
                ..Default::default()
            },
        ),
    ] {
        let want = pali::GenerateOptions::default()
            .apply(&values)
            .unwrap_err()
            .to_string();
        assert_eq!(line(name), (1, want), "{name}");
    }
}

/// The tiny-224 fixture (F16) and its `hf` LoRA adapter (a decoder + mmproj pair), converted
/// into this test's folder: (decoder, mmproj, the adapter's decoder file).
fn lora_fixture() -> (PathBuf, PathBuf, PathBuf) {
    use pali_convert::{ConvertOptions, LoraConvertOptions};
    use pali_ggml::quant::FileType;
    let fixtures = root().join("models/fixtures");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("c-lora");
    let base = pali_convert::convert(
        &ConvertOptions {
            input: fixtures.join("tiny-224/hf"),
            out_dir: out.clone(),
            text_type: FileType::F16,
            vision_type: FileType::F16,
            force: true,
            name: Some("tiny".into()),
            threads: 2,
        },
        &mut |_, _, _| {},
    )
    .unwrap();
    let lora = pali_convert::convert_lora(
        &LoraConvertOptions {
            input: fixtures.join("lora/hf/adapter"),
            out_dir: out,
            ty: FileType::F16,
            force: true,
            name: Some("hf".into()),
        },
        &mut |_, _, _| {},
    )
    .unwrap();
    (base.decoder, base.mmproj, lora.decoder.unwrap())
}

/// `pali_adapter_load` / `pali_adapter_free` and `pali_generate_params.lora`: the C caption
/// with the adapter is the library's, scale 0 is the base, and every bad id, pointer, file
/// or scale is a status with the library's message.
#[test]
fn lora_adapters_through_the_c_api() {
    let exe = build_c(&root().join("capi/tests/c/lora_test.c"), "lora_test");
    let (m, p, a) = lora_fixture();
    let img = root().join("models/fixtures/images/wide.png");
    let s = |p: &Path| p.display().to_string();
    let out = run_c(&exe, &[&s(&m), &s(&p), &s(&a), &s(&img)]);
    let line = |name: &str| -> (i32, String) {
        let l = out
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {out}"));
        let (st, msg) = l.split_once(' ').unwrap_or((l, ""));
        (st.parse().unwrap(), msg.to_string())
    };
    assert_eq!(line("abi").0, 2);
    assert_eq!(line("adapter_load").0, 0);
    assert_eq!(line("adapter_id").0, 0);
    for (name, status, needle) in [
        ("adapter_null_path", 1, "path is NULL"),
        (
            "adapter_missing",
            2,
            "/nonexistent/adapter.gguf: file not found",
        ),
        ("adapter_not_adapter", 3, "is not a LoRA adapter"),
        ("adapter_null_out", 1, "out_id is NULL"),
        (
            "unknown_id",
            1,
            "lora (--lora)[0].id = 5: no such adapter (loaded: 0)",
        ),
        (
            "nan_scale",
            1,
            "lora (--lora)[0].scale = NaN: must be a finite number",
        ),
        ("null_lora", 1, "params.lora is NULL but n_lora is 1"),
        ("free_again", 1, "lora (--lora)[0].id = 0: no such adapter"),
        ("freed_id", 1, "no such adapter"),
    ] {
        let (st, msg) = line(name);
        assert_eq!(st, status, "{name}: {msg}");
        assert!(msg.contains(needle), "{name}: {needle:?} not in {msg:?}");
    }
    assert_eq!(line("free").0, 0);
    // The library with the same files and adapter.
    let model = pali::Model::load(
        &pali::ModelPaths::new(&m, &p),
        &pali::LoadOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let id = model.load_adapter(&a).unwrap();
    let image = pali::image::load_image(&img, pali::MAX_IMAGE_PIXELS).unwrap();
    let caption = |lora: Vec<pali::AdapterScale>| {
        let o = pali::GenerateOptions {
            n_predict: 8,
            lora,
            ..Default::default()
        };
        pali::tasks::to_json(&model.caption(&image, "en", &o).unwrap())
    };
    let json = |name: &str| -> Value {
        let (st, j) = line(name);
        assert_eq!(st, 0, "{name}: {j}");
        serde_json::from_str(&j).unwrap()
    };
    same_answer(
        &json("with_lora"),
        &caption(vec![pali::AdapterScale::new(id, 1.0)]),
    );
    same_answer(&json("base"), &caption(Vec::new()));
    same_answer(&json("scale_zero"), &json("base"));
    assert_ne!(json("with_lora")["tokens"], json("base")["tokens"]);
}
