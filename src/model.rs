//! [`Model`]: loading a converted model (decoder, vision tower, optional mask decoder),
//! `--low-mem`'s load-on-demand, LoRA adapters loaded beside it, and the two halves of a
//! generation: the image through the vision tower, then the prefix through the decoder.

use crate::adapter::registry::Registry;
use crate::decoder::{Decoder, DecoderOptions, Generation, PrefixBatch};
use crate::files::{LoadOptions, LowMem, ModelPaths};
use crate::image::{preprocess, ImageSize, PreprocessConfig, RgbImage};
use crate::mask::MaskDecoder;
use crate::options::{AdapterScale, GenerateOptions};
use crate::system::no_gpu_notice;
use crate::vision::{VisionEncoder, VisionOutput};
use crate::{Error, Result};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// Most image tokens the vision tower encodes in one graph ([`Model::encode_images`]): the
/// batch of 16 frames at 224 px, or one 896 px image, so a batch's compute buffer is never
/// larger than one 896 px image's.
pub const BATCH_TOKENS: usize = 4096;

/// An image preprocessed and encoded by the vision tower ([`Model::encode_image`]).
#[derive(Debug, Clone)]
pub struct EncodedImage {
    /// Projected image features `[n_tokens][hidden]`.
    pub features: Vec<f32>,
    /// The first image's size (the frame of detected boxes).
    pub size: ImageSize,
    /// Images encoded (their features one after another).
    pub n_images: usize,
    /// The LoRA adapters (and scales) the vision tower applied, in id order: a generation
    /// from these features must ask for the same ones ([`Model::encode_image_with`]).
    pub lora: Vec<AdapterScale>,
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

    /// Runs `f` on the part if it is loaded, once no one else uses it; nothing if it is not
    /// (its loader sees the change when it loads it).
    fn if_loaded_mut(&self, f: impl FnOnce(&mut T) -> Result<()>) -> Result<()> {
        match self
            .slot
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            Some(part) => f(part),
            None => Ok(()),
        }
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
    paths: ModelPaths,
    /// LoRA adapters loaded on both parts (a part loaded later loads them too).
    adapters: Arc<Registry>,
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
        let adapters = Arc::new(Registry::default());
        let registry = adapters.clone();
        let load_vision = move || {
            let mut v = VisionEncoder::load(&mmproj, gpu, threads)?;
            v.set_precision(precision)?;
            for a in registry.list() {
                if let Some(p) = &a.mmproj {
                    v.add_adapter(a.id, p)?;
                }
            }
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
        let registry = adapters.clone();
        let load_decoder = move || {
            let mut d = Decoder::load(&decoder_path, &dopts)?;
            for a in registry.list() {
                if let Some(p) = &a.decoder {
                    d.add_adapter(a.id, p)?;
                }
            }
            Ok(d)
        };
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
            paths: paths.clone(),
            adapters,
        })
    }

    /// The files it was loaded from.
    pub(crate) fn paths(&self) -> &ModelPaths {
        &self.paths
    }

    /// The LoRA adapters loaded on it (see `adapter/`).
    pub(crate) fn adapter_registry(&self) -> &Registry {
        &self.adapters
    }

    /// Runs `decoder` and `vision` on the loaded parts (in low-memory mode a part not loaded
    /// is skipped: it loads the registered adapters when it loads), once no generation uses
    /// them.
    pub(crate) fn update_parts(
        &self,
        decoder: impl FnOnce(&mut Decoder) -> Result<()>,
        vision: impl FnOnce(&mut VisionEncoder) -> Result<()>,
    ) -> Result<()> {
        self.decoder.if_loaded_mut(decoder)?;
        self.vision
            .if_loaded_mut(|v| vision(v.get_mut().unwrap_or_else(|e| e.into_inner())))
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
        self.check_options(opts)?;
        self.check_context(1, prompt, opts)?;
        let encoded = self.encode_image_with(image, &opts.lora)?;
        self.generate_encoded(encoded, prompt, opts, on_text)
    }

    /// The vision half of [`Model::generate`]: preprocessing and the vision tower (no
    /// adapters; see [`Model::encode_image_with`]).
    pub fn encode_image(&self, image: &RgbImage) -> Result<EncodedImage> {
        self.encode_images_with(std::slice::from_ref(image), &[])
    }

    /// [`Model::encode_image`] for a request with these LoRA adapters
    /// ([`GenerateOptions::lora`]): the ones with a vision part change the tower.
    pub fn encode_image_with(
        &self,
        image: &RgbImage,
        lora: &[AdapterScale],
    ) -> Result<EncodedImage> {
        self.encode_images_with(std::slice::from_ref(image), lora)
    }

    /// The vision half of a prompt about several images (a clip's frames, or images to
    /// compare): each squashed to the model's square and preprocessed, then through the
    /// tower in batches of up to [`BATCH_TOKENS`] tokens (one graph per batch: 16 frames at
    /// 224 px, or one 896 px image), their features in order. Each image's pixels are freed
    /// once its batch is encoded.
    pub fn encode_images(&self, images: &[RgbImage]) -> Result<EncodedImage> {
        self.encode_images_with(images, &[])
    }

    /// [`Model::encode_images`] for a request with these LoRA adapters (see
    /// [`Model::encode_image_with`]).
    pub fn encode_images_with(
        &self,
        images: &[RgbImage],
        lora: &[AdapterScale],
    ) -> Result<EncodedImage> {
        let first = images
            .first()
            .ok_or_else(|| Error::Prompt("no image given".into()))?;
        GenerateOptions {
            lora: lora.to_vec(),
            ..Default::default()
        }
        .check_adapters(&self.adapters.ids())?;
        let lora = self.adapters.selection(lora, true);
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
            features.extend(
                self.with_vision(|v| v.encode_batch_with(&refs, VisionOutput::Projected, &lora))?,
            );
            vision_ms += ms(t1);
        }
        Ok(EncodedImage {
            features,
            size: first.size(),
            n_images: images.len(),
            lora,
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
        self.check_options(opts)?;
        let EncodedImage {
            features,
            lora,
            preprocess_ms,
            vision_ms,
            ..
        } = image;
        let wanted = self.adapters.selection(&opts.lora, true);
        if lora != wanted {
            return Err(Error::InvalidOption(format!(
                "the image was encoded with the vision adapters {lora:?} but the request asks                  for {wanted:?}: encode it with Model::encode_image_with(image, &opts.lora)"
            )));
        }
        // The decoder sees only the adapters with a decoder part.
        let opts = &GenerateOptions {
            lora: self.adapters.selection(&opts.lora, false),
            ..opts.clone()
        };
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
