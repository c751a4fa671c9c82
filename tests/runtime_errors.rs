//! Bad input to the runtime gives a clear error naming the problem: never a panic or a crash.

mod common;
use common::*;
use pali::image::decode_image;
use pali::{Error, GenerateOptions, LoadOptions, Model, ModelPaths};
use pali_ggml::quant::FileType;
use std::path::PathBuf;

fn load(decoder: PathBuf, mmproj: PathBuf) -> Result<Model, Error> {
    load_mode(decoder, mmproj, false)
}

/// In low-memory mode the decoder is only probed at load time (header, tokenizer,
/// embedding table) and loaded through llama.cpp on first use.
fn load_mode(decoder: PathBuf, mmproj: PathBuf, low_mem: bool) -> Result<Model, Error> {
    Model::load(
        &ModelPaths::new(decoder, mmproj),
        &LoadOptions {
            threads: 1,
            low_mem: Some(low_mem),
            ..Default::default()
        },
    )
}

fn err_text<T>(r: Result<T, Error>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Passing the decoder as --mmproj, or the mmproj as -m, is refused by name.
#[test]
fn swapped_model_files_are_refused() {
    let c = converted("tiny-224", FileType::F16, FileType::F16);
    for low_mem in [false, true] {
        let e = err_text(load_mode(c.mmproj.clone(), c.decoder.clone(), low_mem));
        assert!(
            e.contains("not an mmproj") && e.contains("pass it with -m"),
            "{e}"
        );
        let e = err_text(load_mode(c.mmproj.clone(), c.mmproj.clone(), low_mem));
        assert!(
            e.contains("not a Gemma 2 decoder") && e.contains("--mmproj"),
            "{e}"
        );
    }
}

/// An mmproj from another model (other projection width) is refused before decoding.
#[test]
fn mismatched_projection_is_refused() {
    let a = converted("tiny-224", FileType::F16, FileType::F16);
    let b = converted("tiny-swa-98", FileType::F16, FileType::F16);
    for low_mem in [false, true] {
        let e = err_text(load_mode(a.decoder.clone(), b.mmproj.clone(), low_mem));
        assert!(
            e.contains("projects to width 96") && e.contains("hidden size 64"),
            "{e}"
        );
    }
}

/// A decoder cut short after its embedding table passes the low-memory probe, and is then
/// refused with its name when it is first loaded: an error, not a crash.
#[test]
fn truncated_decoder_in_low_memory_mode() {
    let c = converted("tiny-224", FileType::F16, FileType::F16);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("runtime_errors");
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = std::fs::read(&c.decoder).unwrap();
    let cut = dir.join("cut-decoder.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = match load_mode(cut.clone(), c.mmproj.clone(), true) {
        Err(e) => e.to_string(),
        Ok(model) => {
            let img = pali::RgbImage::new(20, 20, vec![128; 20 * 20 * 3]).unwrap();
            err_text(model.generate(&img, "caption en", &GenerateOptions::default(), &mut |_| {}))
        }
    };
    assert!(e.contains("cut-decoder.gguf"), "{e}");
    // The full load refuses it at once.
    let e = err_text(load_mode(cut, c.mmproj.clone(), false));
    assert!(e.contains("cut-decoder.gguf"), "{e}");
}

/// Missing, empty, truncated and non-GGUF model files.
#[test]
fn missing_and_corrupt_model_files() {
    let c = converted("tiny-224", FileType::F16, FileType::F16);
    let e = err_text(load("/nonexistent/model.gguf".into(), c.mmproj.clone()));
    assert!(
        e.contains("-m /nonexistent/model.gguf: file not found"),
        "{e}"
    );
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("runtime_errors");
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"not a gguf at all").unwrap();
    let e = err_text(load(junk.clone(), c.mmproj.clone()));
    assert!(e.contains("junk.gguf is not a GGUF file"), "{e}");
    // A truncated mmproj: header intact, tensor data cut off.
    let bytes = std::fs::read(&c.mmproj).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = err_text(load(c.decoder.clone(), cut));
    assert!(e.contains("cut.gguf"), "{e}");
}

/// Corrupt and empty images, and decompression bombs, fail with the image named.
#[test]
fn bad_images_are_refused() {
    assert!(decode_image(b"", pali::MAX_IMAGE_PIXELS)
        .unwrap_err()
        .to_string()
        .contains("empty"));
    assert!(decode_image(b"\x89PNG\r\n\x1a\ngarbage", pali::MAX_IMAGE_PIXELS).is_err());
    let e =
        pali::image::load_image("/nonexistent.png".as_ref(), pali::MAX_IMAGE_PIXELS).unwrap_err();
    assert!(e.to_string().contains("/nonexistent.png"), "{e}");
    // A real image above a (small) pixel limit is refused before decoding.
    let e = pali::image::load_image(&image_path("wide"), 100).unwrap_err();
    assert!(e.to_string().contains("wide.png"), "{e}");
}

/// A prompt that does not fit --ctx-size is an error, not an abort inside llama.cpp.
#[test]
fn prompt_longer_than_context_is_refused() {
    let c = converted("tiny-224", FileType::F16, FileType::F16);
    let m = load(c.decoder, c.mmproj).unwrap();
    let img = pali::image::load_image(&image_path("wide"), pali::MAX_IMAGE_PIXELS).unwrap();
    let opts = GenerateOptions {
        n_predict: 8,
        max_ctx: 100,
        ..Default::default()
    };
    let e = err_text(m.generate(&img, "caption en", &opts, &mut |_| {}));
    assert!(
        e.contains("--ctx-size 100") && e.contains("260 prefix tokens"),
        "{e}"
    );
}

/// ggml was built with this machine's SIMD, not the SSE2 baseline.
#[test]
fn ggml_uses_the_host_simd() {
    let f = pali_ggml::cpu_features();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        assert!(
            f.iter().any(|x| x == "AVX2"),
            "ggml lacks AVX2 on an AVX2 machine: {f:?}"
        );
    }
    #[cfg(target_arch = "aarch64")]
    assert!(f.iter().any(|x| x == "NEON"), "{f:?}");
    println!("ggml CPU features: {f:?}");
}

/// A decoder whose attention sizes llama.cpp would multiply past 32 bits (the wrapped
/// product can match the tensor shapes and then fail an assert in its graph), or whose KV
/// head count does not divide the head count, is refused naming the keys (found by fuzzing:
/// head_count_kv 0x30000004).
#[test]
fn inconsistent_attention_sizes_are_refused() {
    let demo = std::fs::read(root().join("models/demo/pali-demo-F16.gguf")).unwrap();
    // A u32 key's value: after the key (length-prefixed) and its type tag (4 = UINT32).
    let value_at = |key: &str| {
        let mut k = (key.len() as u64).to_le_bytes().to_vec();
        k.extend_from_slice(key.as_bytes());
        k.extend_from_slice(&4u32.to_le_bytes());
        demo.windows(k.len()).position(|w| w == k).unwrap() + k.len()
    };
    let mmproj = root().join("models/demo/mmproj-pali-demo-F16.gguf");
    for (key, value, needle) in [
        (
            "gemma2.attention.head_count_kv",
            0x3000_0004u32,
            "head_count_kv = 805306372 must divide",
        ),
        (
            "gemma2.attention.head_count_kv",
            3,
            "head_count_kv = 3 must divide gemma2.attention.head_count = 4",
        ),
        (
            "gemma2.attention.head_count",
            0x3000_0004,
            "larger than any Gemma 2",
        ),
    ] {
        let mut bad = demo.clone();
        let at = value_at(key);
        bad[at..at + 4].copy_from_slice(&value.to_le_bytes());
        let path = scratch_dir(&format!("attn-{value}")).join("dec.gguf");
        std::fs::write(&path, &bad).unwrap();
        for low_mem in [false, true] {
            let e = err_text(load_mode(path.clone(), mmproj.clone(), low_mem));
            assert!(
                e.contains(needle) && e.contains("dec.gguf"),
                "{key} {value}: {e}"
            );
        }
    }
}

/// An mmproj whose vision block count exceeds what its tensors can hold is refused at once,
/// naming the key (2^31 layers made the shape check loop for ever: found by fuzzing).
#[test]
fn vision_block_count_beyond_the_tensors_is_refused() {
    let demo = std::fs::read(root().join("models/demo/mmproj-pali-demo-F16.gguf")).unwrap();
    let key = "clip.vision.block_count";
    let mut k = (key.len() as u64).to_le_bytes().to_vec();
    k.extend_from_slice(key.as_bytes());
    k.extend_from_slice(&4u32.to_le_bytes());
    let at = demo
        .windows(k.len())
        .position(|w| w == k.as_slice())
        .unwrap()
        + k.len();
    let mut bad = demo.clone();
    bad[at..at + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    let path = scratch_dir("vision-blocks").join("mm.gguf");
    std::fs::write(&path, &bad).unwrap();
    let e = err_text(load(root().join("models/demo/pali-demo-F16.gguf"), path));
    assert!(
        e.contains("clip.vision.block_count = 2147483647 but the file holds only")
            && e.contains("mm.gguf"),
        "{e}"
    );
}

/// `pali info --backends` lists ggml's backends and devices, the CPU among them, and which
/// device pali uses: the CPU in a CPU-only build, without a notice (a GPU build's side is in
/// tests/gpu.rs); `pali info` with neither a file nor --backends says what it needs.
#[test]
fn info_backends_lists_the_devices() {
    let v = info_backends();
    let has = |list: &str, key: &str, want: &str| {
        v[list].as_array().unwrap().iter().any(|d| d[key] == want)
    };
    assert!(has("backends", "name", "CPU"), "{v}");
    assert!(has("devices", "type", "CPU"), "{v}");
    if v["compiled_gpu_backends"].as_array().unwrap().is_empty() {
        assert_eq!(v["used"], "CPU", "{v}");
        assert!(v["notice"].is_null(), "{v}");
    }
    let text = pali_cmd().args(["info", "--backends"]).output().unwrap();
    assert_success(&text);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l == format!("used: {}", v["used"].as_str().unwrap())
                || l.starts_with(&format!("used: {} (", v["used"].as_str().unwrap()))),
        "{text}"
    );
    let out = pali_cmd().arg("info").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--backends") || err.contains("<FILE>"),
        "{err}"
    );
}

/// Without a usable GPU pali runs on the CPU: silently by default, with one line on stderr
/// when GPU layers were asked for (`-ngl 99`). Checked in builds that find no GPU (CPU-only
/// builds; GPU builds on a machine without one: scripts/vulkan_check.sh dynamic).
#[test]
fn no_gpu_is_one_line_and_the_cpu() {
    if pali_ggml::graph::has_local_gpu() {
        prerequisite_missing("no_gpu_is_one_line_and_the_cpu", "this machine has a GPU");
        return;
    }
    let img = path_str(&root().join("examples/images/one_shape.png"));
    let gpu_build = !pali_ggml::backends::compiled_gpu_backends().is_empty();
    for (ngl, notice) in [(None, gpu_build), (Some("99"), true)] {
        let mut args = vec!["caption", img.as_str(), "-t", "1", "--json"];
        args.extend(ngl.map(|n| ["-ngl", n]).iter().flatten());
        let out = pali_cmd().args(&args).output().unwrap();
        assert_success(&out);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["text"], "a green triangle");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        if notice {
            assert_eq!(lines.len(), 1, "{args:?}: {err}");
            assert!(lines[0].contains("running on the CPU"), "{args:?}: {err}");
        } else {
            assert!(lines.is_empty(), "{args:?}: {err}");
        }
    }
}

/// Bad sampling and length flags are usage errors (status 2) with the library's own message,
/// the one `pali serve` and the C library give, refused before any model loads.
#[test]
fn bad_options_get_the_librarys_refusal() {
    use pali::options::RequestValues;
    let img = path_str(&root().join("examples/images/one_shape.png"));
    let v = RequestValues::default;
    for (flags, values) in [
        (
            vec!["--temp=-1"],
            RequestValues {
                temperature: Some(-1.0),
                ..v()
            },
        ),
        (
            vec!["--temp", "nan"],
            RequestValues {
                temperature: Some(f32::NAN),
                ..v()
            },
        ),
        (
            vec!["--top-p=7"],
            RequestValues {
                top_p: Some(7.0),
                ..v()
            },
        ),
        (
            vec!["--top-k", "-1"],
            RequestValues {
                top_k: Some(-1),
                ..v()
            },
        ),
        (
            vec!["-n", "0"],
            RequestValues {
                n_predict: Some(0),
                ..v()
            },
        ),
        (
            vec!["-c", "-1"],
            RequestValues {
                max_ctx: Some(-1),
                ..v()
            },
        ),
    ] {
        let want = GenerateOptions::default()
            .apply(&values)
            .unwrap_err()
            .to_string();
        for cmd in [
            vec!["caption", img.as_str()],
            vec!["detect", img.as_str(), "triangle"],
        ] {
            let mut args = cmd.clone();
            args.extend(&flags);
            // A model that does not exist: the options are refused before it is looked at.
            args.extend([
                "-m",
                "/nonexistent/model.gguf",
                "--mmproj",
                "/nonexistent/mmproj.gguf",
            ]);
            let out = pali_cmd().args(&args).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert_eq!(err.trim(), format!("error: {want}"), "{args:?}");
        }
    }
}
