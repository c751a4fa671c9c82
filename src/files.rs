//! Which files make a model ([`ModelPaths`]: the decoder, the mmproj beside it, an optional
//! mask decoder; the bundled demo model) and how to load them ([`LoadOptions`], and
//! `--low-mem`'s automatic choice).

use crate::adapter::registry::is_adapter;
use crate::decoder::SlidingWindow;
use crate::system::{default_threads, total_ram_bytes};
use crate::vision::VisionPrecision;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The files of a converted model: decoder and vision tower, and optionally the mask
/// decoder that turns `segment` answers into masks.
#[derive(Debug, Clone)]
pub struct ModelPaths {
    /// Decoder GGUF (`-m`).
    pub decoder: PathBuf,
    /// Vision GGUF (`--mmproj`).
    pub mmproj: PathBuf,
    /// Mask decoder GGUF (`--vae`, made by `pali convert-vae`).
    pub mask_decoder: Option<PathBuf>,
}

impl ModelPaths {
    /// Decoder and vision tower, no mask decoder.
    pub fn new(decoder: impl Into<PathBuf>, mmproj: impl Into<PathBuf>) -> Self {
        ModelPaths {
            decoder: decoder.into(),
            mmproj: mmproj.into(),
            mask_decoder: None,
        }
    }

    /// The same files with a mask decoder.
    pub fn with_mask_decoder(mut self, path: impl Into<PathBuf>) -> Self {
        self.mask_decoder = Some(path.into());
        self
    }

    /// A decoder and the vision file beside it: the one `mmproj-*.gguf` in the decoder's
    /// folder (an error names the folder when there is none, or several).
    pub fn beside(decoder: impl Into<PathBuf>) -> Result<Self> {
        let decoder = decoder.into();
        // A mistyped model path is that, not "no mmproj next to it".
        if !decoder.is_file() {
            return Err(Error::Io(format!(
                "-m {}: file not found",
                decoder.display()
            )));
        }
        let dir = decoder
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // LoRA adapters' vision files (`mmproj-…-LoRA-…`) may lie beside the model too.
        let mmproj = one_gguf(dir, "mmproj-*.gguf next to the model", |f| {
            f.starts_with("mmproj-") && !is_adapter(&dir.join(f))
        })?;
        Ok(ModelPaths::new(decoder, mmproj))
    }

    /// The bundled demo model under `root` (`models/demo`): its one decoder, the one mmproj
    /// beside it (the rule of [`ModelPaths::beside`]) and its mask decoder
    /// (`vae-pali-demo.gguf`) when present.
    pub fn demo(root: &Path) -> Result<Self> {
        let dir = root.join("models/demo");
        let decoder = one_gguf(&dir, "decoder GGUF in the bundled model's folder", |f| {
            !f.starts_with("mmproj-") && !f.starts_with("vae-") && !is_adapter(&dir.join(f))
        })?;
        let paths = ModelPaths::beside(decoder)?;
        let vae = dir.join("vae-pali-demo.gguf");
        Ok(if vae.is_file() {
            paths.with_mask_decoder(vae)
        } else {
            paths
        })
    }
}

/// The one `.gguf` file in `dir` whose name `wanted` accepts; `what` names it in errors
/// ("no …" / "several …" in the folder: pass the file explicitly).
fn one_gguf(dir: &Path, what: &str, wanted: impl Fn(&str) -> bool) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::Io(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .map(|f| f.to_string_lossy())
                .is_some_and(|f| f.ends_with(".gguf") && wanted(&f))
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::Io(format!(
            "no {what} in {}: pass --mmproj",
            dir.display()
        ))),
        _ => Err(Error::Io(format!(
            "several {what} in {}: pass --mmproj",
            dir.display()
        ))),
    }
}

/// Model loading options.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Threads for the vision tower and the decoder (default: physical cores).
    pub threads: i32,
    /// Decoder layers on the GPU (GPU builds); the vision tower follows onto the GPU when > 0.
    /// Default 0 (the CLI's default is all layers when a GPU is found, as llama.cpp's).
    pub n_gpu_layers: i32,
    /// Sliding-window treatment.
    pub sliding_window: SlidingWindow,
    /// Never hold the vision tower and the decoder in memory at once: each is loaded when
    /// needed and dropped after use, and the decoder's weights are used in place from the
    /// memory map (no repacked copies). Peak memory ≈ the decoder file instead of both files
    /// plus copies, for a reload per image and a ~20 % slower prefill. `None`: on when the machine's RAM is less than twice
    /// the two files plus 1 GiB.
    pub low_mem: Option<bool>,
    /// ggml RPC servers (`host:port`, from `pali rpc-server`) whose devices take a share of
    /// the offloaded decoder layers; the vision tower stays local. No authentication: trusted
    /// networks only.
    pub rpc_servers: Vec<String>,
    /// Shares of the offloaded layers per device, in ggml's device order (the RPC servers
    /// first, then local GPUs), as llama.cpp's `--tensor-split`; empty = by free memory.
    pub tensor_split: Vec<f32>,
    /// The vision tower's compute precision (default `Auto`: F32 on every backend for now).
    pub vision_precision: VisionPrecision,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            threads: default_threads(),
            n_gpu_layers: 0,
            sliding_window: SlidingWindow::Off,
            low_mem: None,
            rpc_servers: Vec::new(),
            tensor_split: Vec::new(),
            vision_precision: VisionPrecision::Auto,
        }
    }
}

/// Low-memory mode's automatic choice.
pub(crate) struct LowMem;

impl LowMem {
    /// True when total RAM is below 2 × (decoder + mmproj file sizes) + 1 GiB, e.g. a 3B
    /// Q4_K_M (2.5 GB of files) on a 4 GB Raspberry Pi, or a 10B on an 8 GB Jetson.
    pub(crate) fn auto(paths: &ModelPaths) -> bool {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let files = size(&paths.decoder) + size(&paths.mmproj);
        match total_ram_bytes() {
            Some(ram) => ram < 2 * files + (1 << 30),
            None => false,
        }
    }
}
