//! pali against HF transformers, on the committed fixtures (see models/fixtures/README.md).

mod common;
use common::*;
use pali::preprocess::load_image;
use pali::siglip::{VisionEncoder, VisionOutput};
use pali::{GenerateOptions, LoadOptions, Model, ModelPaths};
use pali_ggml::quant::FileType;

fn model(name: &str, text: FileType, vision: FileType) -> Model {
    let c = converted(name, text, vision);
    Model::load(
        &ModelPaths::new(c.decoder, c.mmproj),
        &LoadOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap()
}

/// First-step logit tolerance (absolute; logits are soft-capped to ±30).
const LOGIT_TOL: f32 = 5e-2;

fn rel_diff(ours: &[f32], reference: &[f32]) -> f32 {
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    max_abs_diff(ours, reference) / scale
}

#[test]
fn preprocessing_matches_hf_processor() {
    for name in FIXTURES {
        let r = Reference::load(name);
        let m = model(name, FileType::F32, FileType::F32);
        for img in r.images() {
            let ours = pali::preprocess::preprocess(
                &load_image(&image_path(&img), pali::MAX_IMAGE_PIXELS).unwrap(),
                m.preprocess_config(),
            );
            let d = max_abs_diff(&ours, &r.tensor(&format!("pixel_values.{img}")));
            println!("{name} {img}: pixels max |diff| = {d:e}");
            assert!(d <= 1e-6, "{name} {img}: pixels differ by {d}");
        }
    }
}

#[test]
fn vision_tower_and_projector_match_hf() {
    for name in FIXTURES {
        let r = Reference::load(name);
        for vt in [FileType::F32, FileType::F16] {
            let c = converted(name, FileType::F32, vt);
            let enc = VisionEncoder::load(&c.mmproj, false, 2).unwrap();
            for img in r.images() {
                let px = r.tensor(&format!("pixel_values.{img}"));
                let tower = enc.encode(&px, VisionOutput::Tower).unwrap();
                let proj = enc.encode(&px, VisionOutput::Projected).unwrap();
                // Errors relative to the largest reference value.
                let dt = rel_diff(&tower, &r.tensor(&format!("vision.{img}")));
                let dp = rel_diff(&proj, &r.tensor(&format!("projector.{img}")));
                println!(
                    "{name} {img} vision {}: relative error tower {dt:.2e}, projector {dp:.2e}",
                    vt.label()
                );
                // F32: float reassociation only. F16: ggml rounds activations to F16 in
                // matmuls against F16 weights (~2^-11 per product, accumulated over layers).
                let bound = if vt == FileType::F32 { 2e-5 } else { 1e-2 };
                assert!(
                    dt < bound && dp < bound,
                    "{name} {img} {}: tower {dt}, projector {dp}",
                    vt.label()
                );
            }
        }
    }
}

#[test]
fn first_step_logits_and_greedy_tokens_match_hf() {
    for name in FIXTURES {
        let r = Reference::load(name);
        let m = model(name, FileType::F32, FileType::F32);
        let mut worst = 0f32;
        let prompts: Vec<String> = r.json["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect();
        for case in r.cases() {
            let img = case["image"].as_str().unwrap();
            let k = case["prompt_index"].as_u64().unwrap();
            let image = load_image(&image_path(img), pali::MAX_IMAGE_PIXELS).unwrap();
            let want = ids(&case["greedy"]);
            let opts = GenerateOptions {
                n_predict: want.len(),
                kv_f32: true,
                ..Default::default()
            };
            let g = m
                .generate(&image, &prompts[k as usize], &opts, &mut |_| {})
                .unwrap();
            let hf = r.tensor(&format!("logits.{img}.{k}"));
            let d = max_abs_diff(&g.first_logits, &hf[..r.vocab_real()]);
            worst = worst.max(d);
            let margins = floats(&case["margins"]);
            let want: Vec<u32> = want.into_iter().filter(|&t| t != 1).collect();
            let agree = g
                .tokens
                .iter()
                .zip(&want)
                .take_while(|(a, b)| a == b)
                .count();
            println!(
                "{name} {img} {:?}: first-step logits {d:e}, greedy {agree}/{} agree",
                prompts[k as usize],
                want.len()
            );
            // ggml's CPU GELU reads an F16 table (|x| < 10), ~1e-3 relative per activation.
            assert!(d < LOGIT_TOL, "{name} {img} {k}: logits differ by {d}");
            if agree < want.len() {
                // Only acceptable right after a near-tie in HF's own logits.
                assert!(
                    margins[agree] < LOGIT_TOL,
                    "{name} {img} {k}: diverged at step {agree} (HF margin {})",
                    margins[agree]
                );
            }
        }
    }
}

#[test]
fn text_only_decoder_matches_hf() {
    use pali_ggml::llama::{ContextParams, LlamaContext, LlamaModel, ModelParams};
    for name in FIXTURES {
        let r = Reference::load(name);
        let c = converted(name, FileType::F32, FileType::F32);
        let mp = ModelParams {
            int_overrides: vec![("gemma2.attention.sliding_window".into(), 1 << 30)],
            ..Default::default()
        };
        let lm = LlamaModel::load(&c.decoder, &mp).unwrap();
        let input: Vec<i32> = ids(&r.json["text_only"]["input_ids"])
            .into_iter()
            .map(|t| t as i32)
            .collect();
        let params = ContextParams {
            n_ctx: 256,
            n_batch: 64,
            threads: 2,
            threads_batch: 2,
            flash_attn: false,
            kv_f32: true,
        };
        let mut ctx = LlamaContext::new(&lm, &params).unwrap();
        ctx.decode_tokens(&input, 0).unwrap();
        let hf = r.tensor("text_logits");
        let d = max_abs_diff(ctx.logits(), &hf);
        println!("{name}: text-only last-position logits max |diff| {d:e}");
        assert!(d < LOGIT_TOL, "{name}: text-only logits differ by {d}");
    }
}
