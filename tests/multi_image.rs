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

// ---------------------------------------------------------------------------------------
// Clips

use pali::image::{frame_indices, ClipPlan, FrameSelection};
use std::path::{Path, PathBuf};

/// K frames of a 6-frame clip: frame i is floor(i × 6 / K); fewer frames than asked are
/// tiled in order (big_vision's video_replicate_img).
#[test]
fn frame_sampling_rule() {
    assert_eq!(frame_indices(6, 1), [0]);
    assert_eq!(frame_indices(6, 3), [0, 2, 4]);
    assert_eq!(frame_indices(6, 4), [0, 1, 3, 4]);
    assert_eq!(frame_indices(6, 6), [0, 1, 2, 3, 4, 5]);
    assert_eq!(frame_indices(6, 8), [0, 1, 2, 3, 4, 5, 0, 1]);
    assert_eq!(
        frame_indices(6, 13),
        [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0]
    );
    assert!(frame_indices(0, 4).is_empty());
    // F per second over frames starting at 0, 0.1, 0.2 s (sums of 100 ms delays): 10 per
    // second is every frame once, whatever the sums' rounding.
    let starts = [0.0, 0.1, 0.1 + 0.1];
    assert_eq!(
        pali::image::clip::frames_per_second(&starts, 0.1 + 0.1 + 0.1, 10.0),
        [0, 1, 2]
    );
    // The same through a 6-frame GIF, and the warning for a clip shorter than asked.
    let gif = write_gif("six.gif", &frames(6, 32), 100);
    let plan = ClipPlan::open(&gif, FrameSelection::Count(4), u64::MAX).unwrap();
    assert_eq!((plan.indices.clone(), plan.n_source), (vec![0, 1, 3, 4], 6));
    assert!(plan.warnings.is_empty());
    let plan = ClipPlan::open(&gif, FrameSelection::Count(8), u64::MAX).unwrap();
    assert_eq!(plan.indices, [0, 1, 2, 3, 4, 5, 0, 1]);
    assert!(
        plan.warnings[0].contains("6 frames, fewer than the 8 asked for"),
        "{:?}",
        plan.warnings
    );
    // 100 ms a frame: 4 frames a second are frames 0, 2 and 5 (0, 250, 500 ms).
    let plan = ClipPlan::open(&gif, FrameSelection::PerSecond(4.0), u64::MAX).unwrap();
    assert_eq!(plan.indices, [0, 2, 5]);
}

/// `n` 64×`side` frames of few colours (so a GIF holds them exactly): a red square moving
/// over a blue background, with a green bar.
fn frames(n: usize, side: u32) -> Vec<pali::RgbImage> {
    (0..n)
        .map(|i| {
            let mut data = Vec::with_capacity((side * side * 3) as usize);
            for y in 0..side {
                for x in 0..side {
                    let sq = (x as usize).wrapping_sub(i * 3) < side as usize / 3 && y < side / 2;
                    data.extend(match (sq, y > side * 3 / 4) {
                        (true, _) => [220, 30, 30],
                        (false, true) => [30, 200, 60],
                        _ => [20, 40, 200],
                    });
                }
            }
            pali::RgbImage::new(side, side, data).unwrap()
        })
        .collect()
}

/// A path for a file the test writes, in a folder of its own (tests run in parallel).
fn scratch(name: &str) -> PathBuf {
    scratch_dir(&format!("clip-{name}")).join(name)
}

fn write_gif(name: &str, frames: &[pali::RgbImage], delay_ms: u32) -> PathBuf {
    use image::codecs::gif::{GifEncoder, Repeat};
    let path = scratch(name);
    let mut enc = GifEncoder::new(std::fs::File::create(&path).unwrap());
    enc.set_repeat(Repeat::Infinite).unwrap();
    for f in frames {
        let rgba = image::RgbImage::from_raw(f.width, f.height, f.data.clone()).unwrap();
        let rgba = image::DynamicImage::ImageRgb8(rgba).into_rgba8();
        let delay = image::Delay::from_numer_denom_ms(delay_ms, 1);
        enc.encode_frame(image::Frame::from_parts(rgba, 0, 0, delay))
            .unwrap();
    }
    path
}

fn write_apng(name: &str, frames: &[pali::RgbImage]) -> PathBuf {
    let path = scratch(name);
    let (w, h) = (frames[0].width, frames[0].height);
    let mut enc = png::Encoder::new(std::fs::File::create(&path).unwrap(), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_animated(frames.len() as u32, 0).unwrap();
    enc.set_frame_delay(1, 10).unwrap();
    let mut w = enc.write_header().unwrap();
    for f in frames {
        w.write_image_data(&f.data).unwrap();
    }
    w.finish().unwrap();
    path
}

/// A lossless video of `frames` made by ffmpeg (FFV1, planar RGB), or `None` without it.
fn write_video(name: &str, frames: &[pali::RgbImage], fps: u32) -> Option<PathBuf> {
    if !pali::image::clip::has_ffmpeg() {
        prerequisite_missing("clips from video files", "no ffmpeg on the PATH");
        return None;
    }
    let dir = scratch_dir(&format!("video-{name}"));
    for (i, f) in frames.iter().enumerate() {
        pali::draw::save_png(f, &dir.join(format!("f{i:03}.png"))).unwrap();
    }
    let out = scratch(name);
    let status = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-framerate", &fps.to_string(), "-i"])
        .arg(dir.join("f%03d.png"))
        .args(["-c:v", "ffv1", "-pix_fmt", "gbrp"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    Some(out)
}

fn demo() -> pali::Model {
    pali::Model::load(
        &pali::ModelPaths::demo(&root()).unwrap(),
        &Default::default(),
    )
    .unwrap()
}

fn tokens(a: pali::Answer) -> (Vec<u32>, serde_json::Value) {
    let json = pali::tasks::to_json(&a);
    match a {
        pali::Answer::Text(t) => (t.tokens, json),
        pali::Answer::Located(l) => (l.tokens, json),
    }
}

/// An animated GIF, an APNG and a lossless video of K frames decode to exactly those frames,
/// and answer as the same K images passed as images do; the JSON names the frames.
#[test]
fn clips_equal_their_frames_as_images() {
    let model = demo();
    let source = frames(5, 64);
    let task = pali::Task::Caption {
        lang: "en".into(),
        long: false,
    };
    let opts = pali::GenerateOptions::default();
    let (want, _) = tokens(model.run(&source, &task, &opts, &mut |_| {}).unwrap());
    let mut clips = vec![
        write_gif("k.gif", &source, 100),
        write_apng("k.png", &source),
    ];
    clips.extend(write_video("k.mkv", &source, 10));
    for path in clips {
        let clip = ClipPlan::open(&path, FrameSelection::Count(5), pali::MAX_IMAGE_PIXELS)
            .unwrap()
            .decode(pali::MAX_IMAGE_PIXELS)
            .unwrap();
        assert_eq!(clip.indices, [0, 1, 2, 3, 4]);
        assert!(
            clip.frames == source,
            "{}: frames differ from the source",
            path.display()
        );
        let (got, json) = tokens(model.run_clip(clip, &task, &opts, &mut |_| {}).unwrap());
        assert_eq!(got, want, "{}", path.display());
        assert_eq!(json["frames"], serde_json::json!([0, 1, 2, 3, 4]));
        assert_eq!(json["n_images"], 5);
    }
}

/// Clips that are not: a truncated GIF, an APNG without frames, a text file as a video, a
/// still image, `--frames 0`, a one-frame video asked for 4 → named errors or bounded work.
#[test]
fn bad_clips_are_named_errors() {
    let source = frames(3, 32);
    let gif = write_gif("t.gif", &source, 100);
    let bytes = std::fs::read(&gif).unwrap();
    let cut = scratch("truncated.gif");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let open = |p: &Path, k| {
        ClipPlan::open(p, FrameSelection::Count(k), pali::MAX_IMAGE_PIXELS)
            .and_then(|plan| plan.decode(pali::MAX_IMAGE_PIXELS))
            .map_err(|e| e.to_string())
    };
    let e = open(&cut, 3).map(|c| c.indices).unwrap_err();
    assert!(e.contains("truncated.gif") && e.contains("corrupt"), "{e}");
    // An APNG whose acTL says 0 frames.
    let apng = std::fs::read(write_apng("one.png", &source[..1])).unwrap();
    let zero = scratch("zero.png");
    let at = apng.windows(4).position(|w| w == b"acTL").unwrap();
    let mut z = apng.clone();
    z[at + 4..at + 8].copy_from_slice(&0u32.to_be_bytes());
    std::fs::write(&zero, &z).unwrap();
    // Refused by name, or read as its one still image (bounded work): never a panic.
    match open(&zero, 2) {
        Err(e) => assert!(e.contains("zero.png"), "{e}"),
        Ok(clip) => assert!(clip.n_source == 1 && clip.warnings[0].contains("zero.png")),
    }
    let text = scratch("notes.mp4");
    std::fs::write(&text, "not a video at all").unwrap();
    let e = open(&text, 2).map(|c| c.indices).unwrap_err();
    assert!(e.contains("notes.mp4"), "{e}");
    // A still PNG is a one-frame clip (its frame repeated, with the warning); a JPEG still
    // is not a clip at all.
    let still = open(&image_path("wide"), 2).unwrap();
    assert_eq!(still.indices, [0, 0]);
    assert!(
        still.warnings[0].contains("wide.png has 1 frame"),
        "{:?}",
        still.warnings
    );
    let jpeg = scratch("still.jpg");
    let img = load_image(&image_path("wide"), u64::MAX).unwrap();
    image::RgbImage::from_raw(img.width, img.height, img.data)
        .unwrap()
        .save(&jpeg)
        .unwrap();
    let e = open(&jpeg, 2).map(|c| c.indices).unwrap_err();
    assert!(e.contains("still.jpg") && e.contains("not a clip"), "{e}");
    assert!(open(&gif, 0)
        .map(|c| c.indices)
        .unwrap_err()
        .contains("at least 1"));
    let fps = ClipPlan::open(&gif, FrameSelection::PerSecond(-1.0), u64::MAX).unwrap_err();
    assert!(fps.to_string().contains("--fps"), "{fps}");
    // A frame over the pixel limit is refused by name before its pixels are kept.
    let e = ClipPlan::open(&gif, FrameSelection::Count(2), 100)
        .unwrap_err()
        .to_string();
    assert!(e.contains("t.gif") && e.contains("too large"), "{e}");
    if let Some(one) = write_video("one.mkv", &source[..1], 5) {
        let clip = open(&one, 4).unwrap();
        assert_eq!(clip.indices, [0, 0, 0, 0]);
        assert!(
            clip.warnings[0].contains("1 frame, fewer than the 4"),
            "{:?}",
            clip.warnings
        );
    }
}

/// A 10000-frame GIF asked for 16 frames: counted and decoded one frame at a time (bounded
/// memory), 16 frames kept.
#[test]
fn a_long_gif_is_sampled_not_stored() {
    let many: Vec<pali::RgbImage> = (0..10_000)
        .map(|i| pali::RgbImage::new(4, 4, vec![(i % 251) as u8; 48]).unwrap())
        .collect();
    let gif = write_gif("long.gif", &many, 20);
    drop(many);
    let plan = ClipPlan::open(&gif, FrameSelection::Count(16), pali::MAX_IMAGE_PIXELS).unwrap();
    assert_eq!(plan.n_source, 10_000);
    assert_eq!(plan.indices, frame_indices(10_000, 16));
    let clip = plan.decode(pali::MAX_IMAGE_PIXELS).unwrap();
    assert_eq!(clip.frames.len(), 16);
    for (f, &i) in clip.frames.iter().zip(&clip.indices) {
        assert_eq!(f.data[0], (i % 251) as u8);
    }
}

/// A clip whose frames do not fit the context is refused before it is decoded or encoded,
/// with the numbers and the K that would fit.
#[test]
fn a_clip_too_long_for_the_context_says_what_fits() {
    let model = demo();
    let per = model.image_tokens();
    let opts = pali::GenerateOptions {
        max_ctx: 3 * per + 80,
        ..Default::default()
    };
    let e = model
        .check_context(8, "caption en", &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("8 images × {per} tokens")) && e.contains("3 images would fit"),
        "{e}"
    );
    let ok = model.check_context(
        3,
        "caption en",
        &pali::GenerateOptions {
            n_predict: 8,
            ..opts
        },
    );
    assert!(ok.is_ok(), "{ok:?}");
}

/// The CLI: `pali run --image A --image B` is one prompt about both; `pali caption CLIP
/// --frames K` answers as `pali run` with its K frames as images and reports them; a clip
/// too long for `-c` names the K that fits; a video without ffmpeg says what to do.
#[test]
fn the_cli_takes_several_images_and_clips() {
    let json = |args: &[&str]| -> serde_json::Value {
        let out = pali_cmd().args(args).output().unwrap();
        assert_success(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let source = frames(4, 64);
    let dir = scratch_dir("cli-frames");
    let files: Vec<String> = source
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let p = dir.join(format!("f{i}.png"));
            pali::draw::save_png(f, &p).unwrap();
            path_str(&p)
        })
        .collect();
    let mut run = vec!["run", "-p", "caption en", "--json"];
    for f in &files {
        run.extend(["--image", f.as_str()]);
    }
    let together = json(&run);
    assert_eq!(together["n_images"], 4);
    let model = demo();
    let task = pali::Task::Raw("caption en".into());
    let (lib, _) = tokens(
        model
            .run(&source, &task, &Default::default(), &mut |_| {})
            .unwrap(),
    );
    assert_eq!(together["tokens"], serde_json::json!(lib));

    let gif = path_str(&write_gif("cli.gif", &source, 100));
    let clip = json(&["caption", &gif, "--frames", "4", "--json"]);
    assert_eq!(clip["tokens"], together["tokens"]);
    assert_eq!(clip["frames"], serde_json::json!([0, 1, 2, 3]));
    let six = json(&["caption", &gif, "--frames", "6", "--json"]);
    assert_eq!(six["frames"], serde_json::json!([0, 1, 2, 3, 0, 1]));
    assert!(
        six["warnings"][0]
            .as_str()
            .unwrap()
            .contains("fewer than the 6"),
        "{six}"
    );

    let per = model.image_tokens();
    let ctx = (3 * per + 80).to_string();
    let out = pali_cmd()
        .args(["caption", &gif, "--frames", "8", "-c", &ctx])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("3 images would fit"),
        "{err}"
    );

    let video = scratch("no-ffmpeg.mkv");
    std::fs::write(&video, b"\x1a\x45\xdf\xa3 not really a video").unwrap();
    let out = pali_cmd()
        .args(["caption", &path_str(&video), "--frames", "4"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no-ffmpeg.mkv") && err.contains("install ffmpeg"),
        "{err}"
    );
}
