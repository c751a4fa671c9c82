//! Which files a command works on: the model files from the flags or the bundled demo
//! model, and the images given directly or as folders.

use crate::args::ModelArgs;
use pali::ModelPaths;
use std::path::{Path, PathBuf};

/// Where the bundled demo model is looked for: the working directory, then the source tree.
fn bundled_roots() -> [PathBuf; 2] {
    [
        std::env::current_dir().unwrap_or_default(),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    ]
}

/// Finds the model files: the flags, else the bundled demo model; `vae` is the mask
/// decoder asked for (`--vae`), else with `demo_vae` the bundled model's own.
pub(crate) fn model_paths(
    args: &ModelArgs,
    vae: Option<&Path>,
    demo_vae: bool,
) -> Result<ModelPaths, String> {
    let paths = match (&args.model, &args.mmproj) {
        (Some(m), Some(p)) => ModelPaths::new(m, p),
        (Some(m), None) => ModelPaths::beside(m).map_err(|e| e.to_string())?,
        (None, Some(_)) => return Err("--mmproj needs -m (the decoder) as well".into()),
        (None, None) => {
            let root = bundled_roots()
                .into_iter()
                .find(|r| r.join("models/demo").is_dir())
                .ok_or("no model given (-m, --mmproj) and no bundled model in models/demo")?;
            let demo = ModelPaths::demo(&root).map_err(|e| e.to_string())?;
            // The bundled model's own mask decoder serves segment and serve only.
            ModelPaths {
                mask_decoder: demo.mask_decoder.filter(|_| demo_vae),
                ..demo
            }
        }
    };
    Ok(match vae {
        Some(v) => paths.with_mask_decoder(v),
        None => paths,
    })
}

/// Image files given directly or found (non-recursively) in given folders.
pub(crate) fn expand_images(inputs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.extension().is_some_and(|e| {
                        matches!(
                            e.to_ascii_lowercase().to_str(),
                            Some("jpg" | "jpeg" | "png" | "webp" | "bmp" | "gif")
                        )
                    })
                })
                .collect();
            v.sort();
            out.extend(v);
        } else {
            out.push(p.clone());
        }
    }
    out
}
