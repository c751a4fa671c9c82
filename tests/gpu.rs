//! pali on a GPU backend against HF transformers and against pali on the CPU. Compiled only
//! into GPU builds (`--features cuda|vulkan|metal`), where a GPU must be present: these tests
//! fail, not skip, on a GPU build without one.
#![cfg(any(feature = "cuda", feature = "vulkan", feature = "metal"))]

mod common;
use common::*;
use pali::siglip::VisionEncoder;
use pali::{GenerateOptions, KvCacheType, LoadOptions, Model, ModelPaths};
use pali_ggml::quant::FileType;

fn gpu_model(name: &str, text: FileType, vision: FileType) -> Model {
    let c = converted(name, text, vision);
    let m = Model::load(
        &ModelPaths::new(c.decoder, c.mmproj),
        &LoadOptions {
            threads: 1,
            n_gpu_layers: 999,
            low_mem: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    assert_ne!(
        m.vision_backend(),
        "CPU",
        "the vision tower must follow the decoder onto the GPU"
    );
    m
}

#[test]
fn vision_tower_on_the_gpu_matches_hf() {
    for name in FIXTURES {
        let r = Reference::load(name);
        for vt in [FileType::F32, FileType::F16, FileType::Q8_0] {
            let c = converted(name, FileType::F32, vt);
            let enc = VisionEncoder::load(&c.mmproj, true, 1).unwrap();
            assert_ne!(enc.backend_name(), "CPU");
            for (img, dt, dp) in vision_errors(&r, &enc) {
                println!(
                    "{name} {img} vision {} on {}: relative error tower {dt:.2e}, projector {dp:.2e}",
                    vt.label(),
                    enc.backend_name()
                );
                // F32 is F16-class on the GPU: ggml runs F32 matmuls on cuBLAS in TF32 (10-bit
                // mantissa) and flash attention in F16. Measured on an H200: F32 and F16
                // 3e-3..1.04e-2 (tiny-swa-98's high-gain weights the most), Q8_0 0.10-0.16.
                let bound = match vt {
                    FileType::F32 | FileType::F16 => 2e-2,
                    _ => 0.25,
                };
                assert!(
                    dt < bound && dp < bound,
                    "{name} {img} {}: tower {dt}, projector {dp}",
                    vt.label()
                );
            }
        }
    }
}

/// Every case of every fixture with the whole model on the GPU: first-step logits, first
/// tokens and greedy tokens against HF's, judged like the CPU's quantized types
/// (tests/parity.rs) since every GPU row is F16-class: ggml runs F32 matmuls on cuBLAS in TF32
/// and attention in F16. These random fixtures' high-gain weights amplify that (the CPU's
/// F16 files already move tiny-swa-98's logits by 0.8). All rows are printed before judging.
#[test]
fn whole_model_on_the_gpu_matches_hf() {
    let mut failures: Vec<String> = Vec::new();
    for (text, vision, kv_type, logit_bound, min_first_top1) in [
        (FileType::F32, FileType::F32, KvCacheType::F32, 2.0, 0.9),
        (FileType::F16, FileType::F16, KvCacheType::F16, 2.0, 0.9),
        (FileType::Q8_0, FileType::F16, KvCacheType::F16, 8.0, 0.7),
    ] {
        let mut rows = Vec::new();
        for name in FIXTURES {
            let m = gpu_model(name, text, vision);
            let opts = GenerateOptions {
                kv_type,
                ..Default::default()
            };
            for c in run_cases(&m, name, opts) {
                println!(
                    "{name} {} {:?} decoder {} vision {} on {}: first-step |dlogit| {:.3e}, greedy {}/{} (HF margin at divergence {:.2})",
                    c.image,
                    c.prompt,
                    text.label(),
                    vision.label(),
                    m.vision_backend(),
                    c.logit_diff,
                    c.agreed,
                    c.total,
                    c.margin_at_divergence
                );
                rows.push(c);
            }
        }
        let label = format!("decoder {} vision {}", text.label(), vision.label());
        // Unquantized weights: a divergence only right after a near-tie in HF's logits.
        failures.extend(judge(
            &label,
            &rows,
            logit_bound,
            min_first_top1,
            text != FileType::Q8_0,
        ));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The bundled demo model captions the example images the same on the GPU as on the CPU.
#[test]
fn demo_captions_on_the_gpu_equal_the_cpu() {
    let dir = root().join("examples/images");
    let mut images: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .map(|p| path_str(&p))
        .collect();
    images.sort();
    assert!(!images.is_empty());
    let bench = pali_json(&["bench", &images[0], "-r", "1", "-ngl", "99"]);
    assert_ne!(bench["vision_backend"], "CPU", "{bench}");
    for img in &images {
        let cpu = pali_json(&["caption", img]);
        let gpu = pali_json(&["caption", img, "-ngl", "99"]);
        println!("{img}: cpu {:?} gpu {:?}", cpu["text"], gpu["text"]);
        assert_eq!(cpu["text"], gpu["text"], "{img}");
    }
}
