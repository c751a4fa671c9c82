//! Caption an image with the library API.
//!
//! `cargo run --release --example caption -- [IMAGE] [MODEL.gguf MMPROJ.gguf]`
//! (defaults: an example scene and the bundled demo model in models/demo).

use pali::image::load_image;
use pali::{GenerateOptions, LoadOptions, Model, ModelPaths, Task};
use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let image = args.first().cloned().unwrap_or_else(|| {
        root.join("examples/images/three_shapes_wide.png")
            .display()
            .to_string()
    });
    let paths = match (args.get(1), args.get(2)) {
        (Some(m), Some(p)) => ModelPaths::new(m, p),
        _ => ModelPaths::demo(root)?,
    };

    // Load once…
    let model = Model::load(&paths, &LoadOptions::default())?;
    // …then generate as often as needed, streaming the text.
    let img = load_image(image.as_ref(), pali::MAX_IMAGE_PIXELS)?;
    let task = Task::Caption {
        lang: "en".into(),
        long: false,
    };
    let opts = GenerateOptions {
        n_predict: 16,
        ..Default::default()
    };
    let out = model.answer(&img, &task, &opts, &mut |piece| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
    })?;
    println!();
    // Boxes in the image's pixels, with the same JSON as `pali detect --json`.
    let found = model.detect(&img, &["circle"], &GenerateOptions::default())?;
    println!("{}", serde_json::to_string(&found.objects)?);
    eprintln!(
        "{} tokens; vision {:.1} ms, prefill {:.1} ms, decode {:.1} tok/s",
        out.tokens.len(),
        out.timings.vision_ms,
        out.timings.prefill_ms,
        out.timings.decode_tok_s
    );
    Ok(())
}
