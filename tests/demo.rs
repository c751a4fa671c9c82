//! The bundled model in models/demo is exactly what `pali convert` makes from its checkpoint,
//! and the CLI captions with it.

mod common;
use common::*;
use pali_ggml::quant::FileType;

/// Committed GGUFs equal a fresh conversion (so they can never go stale).
#[test]
fn bundled_gguf_equals_fresh_conversion() {
    let fresh = converted("tiny-224", FileType::F16, FileType::F16);
    let demo = root().join("models/demo");
    for (f, name) in [
        (&fresh.decoder, "tiny-224-F16.gguf"),
        (&fresh.mmproj, "mmproj-tiny-224-F16.gguf"),
    ] {
        let a = std::fs::read(f).unwrap();
        let b = std::fs::read(demo.join(name)).unwrap();
        assert!(
            a == b,
            "models/demo/{name} differs from `pali convert` output: regenerate it (README)"
        );
    }
}

#[test]
fn cli_captions_with_the_bundled_model() {
    let exe = env!("CARGO_BIN_EXE_pali");
    let out = std::process::Command::new(exe)
        .args([
            "caption",
            &path_str(&image_path("wide")),
            "-t",
            "1",
            "-n",
            "4",
            "--json",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(v["timings"]["n_prefix"], 260);
    assert!(v["peak_rss_mb"].as_f64().unwrap() > 0.0);

    let out = std::process::Command::new(exe)
        .args(["caption", "/nonexistent/cat.jpg"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cat.jpg"));
}

/// Several images: JSON Lines with paths, a bad image gets an error line and exit code 1.
#[test]
fn cli_batch_keeps_going_past_a_bad_image() {
    let exe = env!("CARGO_BIN_EXE_pali");
    let out = std::process::Command::new(exe)
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
        .current_dir(root())
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
