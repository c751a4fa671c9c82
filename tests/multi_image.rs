//! Several images in one prompt (issue 26): the vision tower's batch, the prefix of several
//! images against HF's processor for a list of images, and the context check.

mod common;
use common::*;
use pali::image::{load_image, preprocess};
use pali::vision::{AttentionKernel, VisionEncoder, VisionOutput, VisionPrecision};
use pali_ggml::quant::FileType;

/// Frames encoded as ONE batch equal the frames encoded one by one, bit for bit on the CPU:
/// every linear layer works per token, and attention stays within each frame.
#[test]
fn batched_vision_equals_one_by_one() {
    let names = ["tall", "wide", "gray"];
    for (vt, kernel, precision, threads) in [
        (
            FileType::F32,
            AttentionKernel::Auto,
            VisionPrecision::F32,
            2,
        ),
        (
            FileType::F16,
            AttentionKernel::Auto,
            VisionPrecision::F32,
            3,
        ),
        (
            FileType::F16,
            AttentionKernel::Plain,
            VisionPrecision::F32,
            1,
        ),
        (
            FileType::F16,
            AttentionKernel::Auto,
            VisionPrecision::F16,
            2,
        ),
        (
            FileType::Q8_0,
            AttentionKernel::Auto,
            VisionPrecision::F32,
            2,
        ),
    ] {
        let c = converted("tiny-224", FileType::F32, vt);
        let mut enc = VisionEncoder::load(&c.mmproj, false, threads).unwrap();
        enc.set_attention(kernel);
        enc.set_precision(precision).unwrap();
        let cfg = enc.config().preprocess_config().unwrap();
        let pixels: Vec<Vec<f32>> = names
            .iter()
            .map(|n| preprocess(&load_image(&image_path(n), u64::MAX).unwrap(), &cfg))
            .collect();
        let refs: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
        for output in [VisionOutput::Tower, VisionOutput::Projected] {
            let batch = enc.encode_batch(&refs, output).unwrap();
            let single: Vec<f32> = refs
                .iter()
                .flat_map(|p| enc.encode(p, output).unwrap())
                .collect();
            assert_eq!(batch.len(), single.len());
            let (diff, rel) = (max_abs_diff(&batch, &single), rel_diff(&batch, &single));
            println!(
                "{} {kernel:?} {precision:?} {output:?}: max abs {diff:e}, rel {rel:e}",
                vt.label()
            );
            // OpenBLAS's SGEMM blocks its work by the column count, so a batch rounds a few
            // sums differently; ggml's own kernels (ARM, PALI_NO_BLAS=1) give the same bits.
            let bound = if pali_ggml::blas::library().is_some() {
                1e-5
            } else {
                0.0
            };
            assert!(
                rel <= bound,
                "{} {kernel:?} {precision:?} {output:?}: batched differs by {diff} (relative {rel})",
                vt.label()
            );
        }
    }
}

/// HF's processor on a list of images: every image's tokens in order, then `<bos>`, the
/// prompt and `"\n"`. pali's prefix of 2 and 3 images gives HF's greedy tokens (or diverges
/// only right after a near-tie in HF's logits) and its first-step logits within the bounds of
/// tests/parity.rs, through `Model::run` and through the encode / generate halves.
#[test]
fn several_images_match_hf() {
    let dir = fixture_dir("tiny-224");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("multi_image.json")).unwrap())
            .unwrap();
    let logits =
        pali_convert::safetensors::Checkpoint::open_files(&[dir.join("multi_image.safetensors")])
            .unwrap();
    let vocab = Reference::load("tiny-224").vocab_real();
    let mut failures = Vec::new();
    // As tests/parity.rs: F32 files with an F32 KV cache for exactness, and the default files.
    for (text, vision, kv, bound) in [
        (FileType::F32, FileType::F32, pali::KvCacheType::F32, 5e-2),
        (FileType::F16, FileType::F16, pali::KvCacheType::F16, 1.0),
    ] {
        let c = converted("tiny-224", text, vision);
        let m = pali::Model::load(
            &pali::ModelPaths::new(c.decoder, c.mmproj),
            &pali::LoadOptions {
                threads: 2,
                ..Default::default()
            },
        )
        .unwrap();
        let mut rows = Vec::new();
        for (i, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
            let names: Vec<&str> = case["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let images: Vec<pali::RgbImage> = names
                .iter()
                .map(|n| load_image(&image_path(n), pali::MAX_IMAGE_PIXELS).unwrap())
                .collect();
            let prompt = case["prompt"].as_str().unwrap();
            let want: Vec<u32> = ids(&case["greedy"])
                .into_iter()
                .filter(|&t| t != 1)
                .collect();
            let opts = pali::GenerateOptions {
                n_predict: want.len(),
                kv_type: kv,
                ..Default::default()
            };
            let encoded = m.encode_images(&images).unwrap();
            assert_eq!(encoded.n_images, images.len());
            let g = m
                .generate_encoded(encoded, prompt, &opts, &mut |_| {})
                .unwrap();
            assert_eq!(
                g.timings.n_prefix,
                case["input_ids"].as_array().unwrap().len()
            );
            // The one top-level call gives the same tokens, and says how many images it saw.
            let task = pali::Task::Raw(prompt.into());
            match m.run(&images, &task, &opts, &mut |_| {}).unwrap() {
                pali::Answer::Text(t) => {
                    assert_eq!(t.tokens, g.tokens);
                    assert_eq!(t.n_images, images.len());
                    let json = pali::tasks::to_json(&t);
                    assert_eq!(json["n_images"], images.len());
                }
                other => panic!("{other:?}"),
            }
            let hf = logits
                .read_f32(logits.get(&format!("logits.{i}")).unwrap())
                .unwrap();
            let agreed = g
                .tokens
                .iter()
                .zip(&want)
                .take_while(|(a, b)| a == b)
                .count();
            rows.push(CaseResult {
                image: names.join("+"),
                prompt: prompt.into(),
                logit_diff: max_abs_diff(&g.first_logits, &hf[..vocab]),
                first_token_equal: g.tokens.first() == want.first(),
                agreed,
                total: want.len(),
                margin_at_divergence: floats(&case["margins"])
                    .get(agreed)
                    .copied()
                    .unwrap_or(f32::INFINITY),
            });
        }
        for r in &rows {
            println!("  {} {:?}: {:.3e}", r.image, r.prompt, r.logit_diff);
        }
        let label = format!(
            "{} images: decoder {} vision {}",
            rows.len(),
            text.label(),
            vision.label()
        );
        failures.extend(judge(&label, &rows, bound, 1.0, true));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// One image's JSON stays as it was: no `n_images` or `frames` key.
#[test]
fn one_image_json_has_no_multi_image_keys() {
    let c = converted("tiny-224", FileType::F16, FileType::F16);
    let m = pali::Model::load(
        &pali::ModelPaths::new(c.decoder, c.mmproj),
        &Default::default(),
    )
    .unwrap();
    let img = load_image(&image_path("wide"), pali::MAX_IMAGE_PIXELS).unwrap();
    let opts = pali::GenerateOptions {
        n_predict: 3,
        ..Default::default()
    };
    let a = m
        .run(
            &[img],
            &pali::Task::Raw("caption en".into()),
            &opts,
            &mut |_| {},
        )
        .unwrap();
    let json = pali::tasks::to_json(&a);
    for key in ["n_images", "frames", "warnings"] {
        assert!(json.get(key).is_none(), "{key} in {json}");
    }
}
