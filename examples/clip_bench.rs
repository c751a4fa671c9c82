//! The vision tower on a clip's K frames: ONE batch (what `pali` does) against one frame at a
//! time, alternating, medians of the rounds (BENCHMARKS.md, "Clips and several images").
//!
//!   cargo run --release --example clip_bench -- MODEL.gguf MMPROJ.gguf [K] [ROUNDS] [CLIP.gif]
//!
//! The frames are the example images, shifted and squashed to 320×240 camera frames; with
//! CLIP.gif they are also written as an animated GIF for `pali caption CLIP.gif --frames K`.

use pali::{LoadOptions, Model, ModelPaths, RgbImage};
use std::time::Instant;

fn frames(k: usize) -> Vec<RgbImage> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/images");
    let sources: Vec<image::RgbImage> = [
        "one_shape.png",
        "two_shapes_tall.png",
        "two_shapes_small.png",
        "three_shapes_wide.png",
    ]
    .iter()
    .map(|n| {
        image::open(root.join(n))
            .expect("example image")
            .into_rgb8()
    })
    .collect();
    (0..k)
        .map(|i| {
            let src = &sources[i % sources.len()];
            let f = image::imageops::resize(src, 320, 240, image::imageops::FilterType::Triangle);
            // A camera's frames differ a little from one to the next.
            let shifted = image::ImageBuffer::from_fn(320, 240, |x, y| {
                *f.get_pixel((x + 3 * i as u32) % 320, y)
            });
            RgbImage::new(320, 240, image::RgbImage::into_raw(shifted)).expect("sizes")
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, mmproj) = match (args.first(), args.get(1)) {
        (Some(m), Some(p)) => (m.clone(), p.clone()),
        _ => return Err("usage: clip_bench MODEL.gguf MMPROJ.gguf [K] [ROUNDS] [CLIP.gif]".into()),
    };
    let k: usize = args.get(2).map_or(Ok(16), |s| s.parse())?;
    let rounds: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let clip = frames(k);
    if let Some(out) = args.get(4) {
        let mut enc = image::codecs::gif::GifEncoder::new(std::fs::File::create(out)?);
        for f in &clip {
            let rgb = image::RgbImage::from_raw(f.width, f.height, f.data.clone()).expect("sizes");
            let rgba = image::DynamicImage::ImageRgb8(rgb).into_rgba8();
            let delay = image::Delay::from_numer_denom_ms(100, 1);
            enc.encode_frame(image::Frame::from_parts(rgba, 0, 0, delay))?;
        }
    }
    let opts = LoadOptions {
        low_mem: Some(false),
        ..Default::default()
    };
    let m = Model::load(&ModelPaths::new(model, mmproj), &opts)?;
    m.encode_images(&clip[..1])?; // warm-up
    let (mut batched, mut single) = (Vec::new(), Vec::new());
    let mut diff = 0f32;
    for round in 0..rounds {
        // Alternate which goes first: this VM's speed drifts.
        for which in [round % 2, 1 - round % 2] {
            let t = Instant::now();
            if which == 0 {
                let b = m.encode_images(&clip)?;
                batched.push(t.elapsed().as_secs_f64() * 1e3);
                if round == 0 {
                    let s: Vec<f32> = clip
                        .iter()
                        .map(|f| m.encode_image(f).map(|e| e.features))
                        .collect::<Result<Vec<_>, _>>()?
                        .concat();
                    diff = b
                        .features
                        .iter()
                        .zip(&s)
                        .fold(0f32, |d, (a, b)| d.max((a - b).abs()));
                }
            } else {
                for f in &clip {
                    m.encode_image(f)?;
                }
                single.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let (b, s) = (median(batched.clone()), median(single.clone()));
    println!(
        "{}",
        serde_json::json!({
            "frames": k, "image_tokens": m.image_tokens(), "rounds": rounds,
            "vision_backend": m.vision_backend(), "threads": pali::default_threads(),
            "batched_ms": batched, "one_by_one_ms": single,
            "median_batched_ms": b, "median_one_by_one_ms": s, "batched_over_one_by_one": b / s,
            "max_abs_feature_diff": diff, "cpu_features": pali_ggml::cpu_features(),
        })
    );
    Ok(())
}
