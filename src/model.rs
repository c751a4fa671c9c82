//! [`Model`]: loading a converted model (decoder, vision tower, optional mask decoder),
//! `--low-mem`'s load-on-demand, and the two halves of a generation: the image through the
//! vision tower, then the prefix through the decoder.

use crate::decoder::{Decoder, DecoderOptions, Generation, PrefixBatch, SlidingWindow};
use crate::image::{preprocess, ImageSize, PreprocessConfig, RgbImage};
use crate::mask::MaskDecoder;
use crate::options::GenerateOptions;
use crate::system::{default_threads, no_gpu_notice, total_ram_bytes};
use crate::vision::{VisionEncoder, VisionOutput, VisionPrecision};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

/// Most image tokens the vision tower encodes in one graph ([`Model::encode_images`]): the
/// batch of 16 frames at 224 px, or one 896 px image, so a batch's compute buffer is never
/// larger than one 896 px image's.
pub const BATCH_TOKENS: usize = 4096;

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
        let dir = decoder
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mmproj = one_gguf(dir, "mmproj-*.gguf next to the model", |f| {
            f.starts_with("mmproj-")
        })?;
        Ok(ModelPaths::new(decoder, mmproj))
    }

    /// The bundled demo model under `root` (`models/demo`): its one decoder, the one mmproj
    /// beside it (the rule of [`ModelPaths::beside`]) and its mask decoder
    /// (`vae-pali-demo.gguf`) when present.
    pub fn demo(root: &Path) -> Result<Self> {
        let dir = root.join("models/demo");
        let decoder = one_gguf(&dir, "decoder GGUF in the bundled model's folder", |f| {
            !f.starts_with("mmproj-") && !f.starts_with("vae-")
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

/// An image preprocessed and encoded by the vision tower ([`Model::encode_image`]).
#[derive(Debug, Clone)]
pub struct EncodedImage {
    /// Projected image features `[n_tokens][hidden]`.
    pub features: Vec<f32>,
    /// The first image's size (the frame of detected boxes).
    pub size: ImageSize,
    /// Images encoded (their features one after another).
    pub n_images: usize,
    #[allow(missing_docs)]
    pub preprocess_ms: f64,
    #[allow(missing_docs)]
    pub vision_ms: f64,
}

/// One half of the model (vision tower or decoder): resident, or in low-memory mode loaded
/// on demand and dropped after use. Several threads may use a loaded part at once (the
/// decoder runs one llama.cpp context per generation); loading and dropping wait for them.
struct Part<T: Sync> {
    name: &'static str,
    slot: RwLock<Option<T>>,
    load: Box<dyn Fn() -> Result<T> + Send + Sync>,
}

impl<T: Sync> Part<T> {
    fn new(
        name: &'static str,
        loaded: Option<T>,
        load: Box<dyn Fn() -> Result<T> + Send + Sync>,
    ) -> Self {
        Part {
            name,
            slot: RwLock::new(loaded),
            load,
        }
    }

    /// Runs `f` on the part, loading it first if it was dropped.
    fn with<R>(&self, f: impl FnOnce(&T) -> Result<R>) -> Result<R> {
        let mut f = Some(f);
        loop {
            {
                let slot = self.slot.read().unwrap_or_else(|e| e.into_inner());
                if let Some(part) = slot.as_ref() {
                    return f.take().expect("called once")(part);
                }
            }
            let mut slot = self.slot.write().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                log::info!("low-memory mode: loading the {}", self.name);
                *slot = Some((self.load)()?);
            }
        }
    }

    /// Runs `f` on the part if it is loaded now (never loads it).
    fn if_loaded<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
        let slot = self.slot.read().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().map(f)
    }

    /// Drops the part (it is reloaded on next use).
    fn release(&self) {
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// A loaded PaliGemma 2 model: vision tower + decoder.
///
/// A `Model` is `Send + Sync`: share it (e.g. in an `Arc`) and call it from several threads.
/// Generations run at the same time, each in its own llama.cpp context; the vision tower
/// and the mask decoder encode one image at a time.
pub struct Model {
    // ggml's CPU backend state is not thread-safe: one image through the tower at a time.
    vision: Part<Mutex<VisionEncoder>>,
    decoder: Part<Decoder>,
    mask_decoder: Option<Mutex<MaskDecoder>>,
    preprocess: PreprocessConfig,
    threads: i32,
    hidden: usize,
    loc_token: Option<u32>,
    n_ctx_train: usize,
    image_tokens: usize,
    decoder_path: PathBuf,
    vision_backend: String,
    low_mem: bool,
    load_ms: f64,
}

impl Model {
    /// Loads both files and checks that they belong together.
    pub fn load(paths: &ModelPaths, opts: &LoadOptions) -> Result<Self> {
        let t0 = Instant::now();
        for (p, flag) in [(&paths.decoder, "-m"), (&paths.mmproj, "--mmproj")] {
            if !p.exists() {
                return Err(Error::Io(format!("{flag} {}: file not found", p.display())));
            }
        }
        let low_mem = opts.low_mem.unwrap_or_else(|| {
            let auto = LowMem::auto(paths);
            if auto {
                log::info!("low-memory mode: this machine's RAM is small for these files");
            }
            auto
        });
        if !opts.rpc_servers.is_empty() {
            for device in pali_ggml::rpc::connect(&opts.rpc_servers)? {
                log::info!("RPC device {device}");
            }
        }
        // The tower follows the layers onto a local GPU; remote devices never take it.
        let gpu = opts.n_gpu_layers > 0 && pali_ggml::graph::has_local_gpu();
        if opts.n_gpu_layers > 0 && !gpu && opts.rpc_servers.is_empty() {
            log::warn!(
                "{}",
                no_gpu_notice().unwrap_or_else(|| "this build has no GPU backend (build with \
                    --features vulkan, cuda or metal); running on the CPU"
                    .into())
            );
        }
        let (mmproj, threads) = (paths.mmproj.clone(), opts.threads);
        let precision = opts.vision_precision;
        let load_vision = move || {
            let mut v = VisionEncoder::load(&mmproj, gpu, threads)?;
            v.set_precision(precision)?;
            Ok(Mutex::new(v))
        };
        let (decoder_path, dopts) = (
            paths.decoder.clone(),
            DecoderOptions {
                n_gpu_layers: opts.n_gpu_layers,
                sliding_window: opts.sliding_window,
                // llama.cpp's repacked copies are made while the whole file is mapped and
                // populated: 2.5 GiB at the peak for a 3B Q4_K_M instead of 1.6.
                skip_repack: low_mem,
                tensor_split: opts.tensor_split.clone(),
            },
        );
        let load_decoder = move || Decoder::load(&decoder_path, &dopts);
        let vision = load_vision()?;
        // In low-memory mode the decoder is only probed here (header, tokenizer, embedding
        // table) and loaded on first use, after the vision tower has been dropped.
        let (decoder, facts) = if low_mem {
            (None, Decoder::probe(&paths.decoder)?)
        } else {
            let d = load_decoder()?;
            let facts = d.facts();
            (Some(d), facts)
        };
        let vision_ref = vision.lock().unwrap_or_else(|e| e.into_inner());
        let vc = vision_ref.config().clone();
        if vc.projection_dim != facts.hidden {
            return Err(Error::Model(format!(
                "{} projects to width {}, but the decoder {} has hidden size {}: they are from different models",
                paths.mmproj.display(),
                vc.projection_dim,
                paths.decoder.display(),
                facts.hidden
            )));
        }
        let preprocess = vc.preprocess_config()?;
        let vision_backend = vision_ref.backend_name();
        drop(vision_ref);
        let image_tokens = (vc.image_size / vc.patch_size).pow(2);
        let mask_decoder = paths
            .mask_decoder
            .as_deref()
            .map(|p| MaskDecoder::load(p, opts.threads).map(Mutex::new))
            .transpose()?;
        Ok(Model {
            vision: Part::new("vision tower", Some(vision), Box::new(load_vision)),
            decoder: Part::new("decoder", decoder, Box::new(load_decoder)),
            preprocess,
            threads: opts.threads,
            hidden: facts.hidden,
            loc_token: facts.loc_token,
            n_ctx_train: facts.n_ctx_train,
            image_tokens,
            decoder_path: paths.decoder.clone(),
            vision_backend,
            low_mem,
            load_ms: ms(t0),
            mask_decoder,
        })
    }

    /// Whether low-memory mode is on (see [`LoadOptions::low_mem`]).
    pub fn low_mem(&self) -> bool {
        self.low_mem
    }

    /// The decoder's hidden size (the width of image features).
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Token id of `<loc0000>` (`<locN>` is this + N), if the vocabulary has loc tokens.
    pub fn loc_token(&self) -> Option<u32> {
        self.loc_token
    }

    /// The context length the decoder was trained for (8192 for PaliGemma 2).
    pub fn n_ctx_train(&self) -> usize {
        self.n_ctx_train
    }

    /// The mask decoder loaded with the model ([`ModelPaths::mask_decoder`]), if any.
    pub fn has_mask_decoder(&self) -> bool {
        self.mask_decoder.is_some()
    }

    /// How long [`Model::load`] took, in milliseconds.
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }

    /// The vision tower's ggml backend.
    pub fn vision_backend(&self) -> &str {
        &self.vision_backend
    }

    /// Runs `f` on the decoder (loaded first in low-memory mode): for tests and tools that
    /// work on the decoder itself.
    #[doc(hidden)]
    pub fn with_decoder<R>(&self, f: impl FnOnce(&Decoder) -> Result<R>) -> Result<R> {
        if self.low_mem {
            self.vision.release();
        }
        self.decoder.with(f)
    }

    /// Runs `f` on the vision tower (loaded first in low-memory mode, after dropping the
    /// decoder; it stays loaded until the decoder is needed, so that a group of images is
    /// encoded with one load, see [`Model::images_per_group`]).
    pub(crate) fn with_vision<R>(&self, f: impl FnOnce(&VisionEncoder) -> Result<R>) -> Result<R> {
        if self.low_mem {
            self.decoder.release();
        }
        self.vision
            .with(|v| f(&v.lock().unwrap_or_else(|e| e.into_inner())))
    }

    /// Runs `f` on the mask decoder, if one was loaded.
    pub(crate) fn with_mask_decoder<R>(
        &self,
        f: impl FnOnce(&MaskDecoder) -> Result<R>,
    ) -> Option<Result<R>> {
        self.mask_decoder
            .as_ref()
            .map(|m| f(&m.lock().unwrap_or_else(|e| e.into_inner())))
    }

    /// How many images a batch should encode before decoding them: 1, or in low-memory mode
    /// as many as keep their features within 64 MiB (e.g. 28 at 224 px for a 3B, but 1 at
    /// 896 px for a 10B, whose 59 MB of features per image would add to its peak), so that
    /// the vision tower and the decoder are each loaded once per group instead of once per
    /// image. See [`Model::encode_image`].
    pub fn images_per_group(&self) -> usize {
        const FEATURE_BUDGET: usize = 64 << 20;
        if self.low_mem {
            (FEATURE_BUDGET / (self.image_tokens * self.hidden * 4).max(1)).max(1)
        } else {
            1
        }
    }

    /// Preprocessing settings (from the mmproj file).
    pub fn preprocess_config(&self) -> &PreprocessConfig {
        &self.preprocess
    }

    /// Runs `prompt` on `image`; `on_text` receives the output as it is generated.
    pub fn generate(
        &self,
        image: &RgbImage,
        prompt: &str,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        opts.validate()?;
        self.check_context(1, prompt, opts)?;
        let encoded = self.encode_image(image)?;
        self.generate_encoded(encoded, prompt, opts, on_text)
    }

    /// The vision half of [`Model::generate`]: preprocessing and the vision tower.
    pub fn encode_image(&self, image: &RgbImage) -> Result<EncodedImage> {
        self.encode_images(std::slice::from_ref(image))
    }

    /// The vision half of a prompt about several images (a clip's frames, or images to
    /// compare): each squashed to the model's square and preprocessed, then through the
    /// tower in batches of up to [`BATCH_TOKENS`] tokens (one graph per batch: 16 frames at
    /// 224 px, or one 896 px image), their features in order. Each image's pixels are freed
    /// once its batch is encoded.
    pub fn encode_images(&self, images: &[RgbImage]) -> Result<EncodedImage> {
        let first = images
            .first()
            .ok_or_else(|| Error::Prompt("no image given".into()))?;
        let per_batch = (BATCH_TOKENS / self.image_tokens.max(1)).max(1);
        let (mut features, mut preprocess_ms, mut vision_ms) = (Vec::new(), 0.0, 0.0);
        for batch in images.chunks(per_batch) {
            let t0 = Instant::now();
            let pixels: Vec<Vec<f32>> = batch
                .iter()
                .map(|image| preprocess::preprocess(image, &self.preprocess))
                .collect();
            preprocess_ms += ms(t0);
            let t1 = Instant::now();
            let refs: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
            features.extend(self.with_vision(|v| v.encode_batch(&refs, VisionOutput::Projected))?);
            vision_ms += ms(t1);
        }
        Ok(EncodedImage {
            features,
            size: first.size(),
            n_images: images.len(),
            preprocess_ms,
            vision_ms,
        })
    }

    /// Image tokens per image (256 at 224 px, 1024 at 448, 4096 at 896).
    pub fn image_tokens(&self) -> usize {
        self.image_tokens
    }

    /// Tokens of the prefix's text part for `prompt` (`<bos>`, the prompt, `"\n"`), read
    /// with the decoder's tokenizer without loading the decoder in low-memory mode.
    pub fn text_tokens(&self, prompt: &str) -> Result<usize> {
        match self.decoder.if_loaded(|d| d.text_tokens(prompt)) {
            Some(n) => n,
            None => Decoder::probe_text_tokens(&self.decoder_path, prompt),
        }
    }

    /// Refuses, before any image is encoded, a prompt about `n_images` images whose prefix
    /// and `opts.n_predict` tokens do not fit the context: `opts.max_ctx` (`-c`) when set,
    /// else the context the model was trained for. The message says the numbers and how many
    /// images would fit.
    pub fn check_context(
        &self,
        n_images: usize,
        prompt: &str,
        opts: &GenerateOptions,
    ) -> Result<()> {
        let text = self.text_tokens(prompt)?;
        let n_prefix = n_images * self.image_tokens + text;
        let need = n_prefix + opts.n_predict;
        let (limit, which) = if opts.max_ctx > 0 {
            (opts.max_ctx, format!("--ctx-size {}", opts.max_ctx))
        } else {
            (
                self.n_ctx_train,
                format!(
                    "the model's context of {} tokens (-c to allow more)",
                    self.n_ctx_train
                ),
            )
        };
        if need <= limit {
            return Ok(());
        }
        let mut msg = format!(
            "the prompt needs {n_prefix} prefix tokens + {} to generate = {need}, more than {which}",
            opts.n_predict
        );
        if n_images > 1 {
            let fit = limit.saturating_sub(text + opts.n_predict) / self.image_tokens.max(1);
            msg = format!(
                "{msg}: {n_images} images × {} tokens + {text} text tokens; {fit} image{} would fit",
                self.image_tokens,
                if fit == 1 { "" } else { "s" }
            );
        }
        Err(Error::ContextLength(msg))
    }

    /// The decoder half of [`Model::generate`], on an image from [`Model::encode_image`]
    /// (its features are freed once the prefix is built, before the decoder runs); the
    /// timings include its preprocessing and vision time.
    pub fn generate_encoded(
        &self,
        image: EncodedImage,
        prompt: &str,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        opts.validate()?;
        let EncodedImage {
            features,
            preprocess_ms,
            vision_ms,
            ..
        } = image;
        let prefix = move |d: &Decoder| d.prefix(&features, prompt);
        let mut g = self.decode_prefix(prefix, opts, on_text)?;
        g.timings.preprocess_ms = preprocess_ms;
        g.timings.vision_ms = vision_ms;
        Ok(g)
    }

    /// Builds the prefix with `make_prefix` and generates from it.
    fn decode_prefix(
        &self,
        make_prefix: impl FnOnce(&Decoder) -> Result<PrefixBatch>,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let mut g = self.with_decoder(|decoder| {
            decoder.generate(make_prefix(decoder)?, opts, self.threads, on_text)
        })?;
        g.timings.load_ms = self.load_ms;
        Ok(g)
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
